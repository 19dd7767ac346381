//! TEST FIXTURE standing in for envoyproxy/ratelimit: copies its Redis fixed-window behaviour (`src/redis/fixed_cache_impl.go`, `src/limiter/base_limiter.go`, `src/limiter/cache_key.go`, `src/utils/utilities.go`, `src/service/ratelimit.go`).
//!
//! `rls-double --listen 127.0.0.1:PORT --redis redis://127.0.0.1:RPORT --stats-listen 127.0.0.1:SPORT`
//! serves `envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit` (gRPC, HTTP/2 cleartext)
//! and the stats/control port (see `rls_double::stats`). Port 0 picks a free port; the ready line
//! `rls-double ready grpc=127.0.0.1:P stats=127.0.0.1:S redis=URL` on stdout gives the real ones
//! once both accept and Redis answered PING. Stop it by killing it.

use anyhow::{Context, Result};
use clap::Parser;
use rls_double::limiter::Settings;
use rls_double::service::{Counters, Service};
use std::io::Write;
use std::net::SocketAddr;
use std::sync::Arc;

#[derive(Parser, Debug)]
#[command(name = "rls-double", about = "TEST FIXTURE standing in for envoyproxy/ratelimit (Redis fixed windows)")]
struct Args {
    /// gRPC listen address.
    #[arg(long, default_value = "127.0.0.1:8081")]
    listen: SocketAddr,
    /// Redis URL.
    #[arg(long, default_value = "redis://127.0.0.1:6379")]
    redis: String,
    /// Plain-HTTP stats/control listen address (`GET /stats`, `POST /control`).
    #[arg(long, default_value = "127.0.0.1:0")]
    stats_listen: SocketAddr,
    /// Cache key prefix (upstream CACHE_KEY_PREFIX).
    #[arg(long, default_value = "")]
    prefix: String,
    /// Upstream STOP_CACHE_KEY_INCREMENT_WHEN_OVERLIMIT (upstream's default is false; ours true).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    stop_cache_key_increment_when_overlimit: bool,
    /// Upstream EXPIRATION_JITTER_MAX_SECONDS.
    #[arg(long, default_value_t = 300)]
    expiration_jitter_max_seconds: i64,
    /// Every call stalls this long before it is handled (also `POST /control {"delay_ms":N}`).
    #[arg(long, default_value_t = 0)]
    delay_ms: u64,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let a = Args::parse();
    let client = redis::Client::open(a.redis.as_str()).with_context(|| format!("--redis {}", a.redis))?;
    let mut conn = client.get_multiplexed_async_connection().await.with_context(|| format!("connecting to Redis at {}", a.redis))?;
    let pong: String = redis::cmd("PING").query_async(&mut conn).await.with_context(|| format!("PING to Redis at {}", a.redis))?;
    anyhow::ensure!(pong == "PONG", "Redis at {} answered PING with {pong:?}", a.redis);

    let grpc = tokio::net::TcpListener::bind(a.listen).await.with_context(|| format!("binding --listen {}", a.listen))?;
    let stats =
        tokio::net::TcpListener::bind(a.stats_listen).await.with_context(|| format!("binding --stats-listen {}", a.stats_listen))?;
    let (grpc_addr, stats_addr) = (grpc.local_addr()?, stats.local_addr()?);

    let counters = Arc::new(Counters::default());
    counters.delay_ms.store(a.delay_ms, std::sync::atomic::Ordering::SeqCst);
    let settings = Settings {
        prefix: a.prefix,
        stop_when_overlimit: a.stop_cache_key_increment_when_overlimit,
        expiration_jitter_max_seconds: a.expiration_jitter_max_seconds,
    };
    tokio::spawn(rls_double::stats::serve(stats, counters.clone()));
    let svc = Arc::new(Service { conn, settings, counters });

    println!("rls-double ready grpc={grpc_addr} stats={stats_addr} redis={}", a.redis);
    std::io::stdout().flush().ok();
    rls_double::service::serve(grpc, svc).await;
    Ok(())
}
