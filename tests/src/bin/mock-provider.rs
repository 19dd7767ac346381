//! `mock-provider`: a mock OpenAI-compatible provider (see `e2e::mock` for the endpoints).
//!
//! Prints `mock-provider NAME listening on http://127.0.0.1:PORT` on stdout once it accepts
//! connections (with `--port 0` the port is picked by the OS), then serves until SIGINT/SIGTERM.

use clap::Parser;
use e2e::mock::{FaultScope, Mock, Settings};
use std::io::Write;

#[derive(Parser, Debug)]
#[command(name = "mock-provider", about = "Mock OpenAI-compatible provider for tests and demos")]
struct Args {
    /// Address to bind.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port to bind; 0 = pick a free one and print it.
    #[arg(long, default_value_t = 0)]
    port: u16,
    /// Also write the bound port to this file.
    #[arg(long)]
    port_file: Option<std::path::PathBuf>,
    /// Name shown in replies (x-mock-provider header, owned_by, reply text).
    #[arg(long, default_value = "mock")]
    name: String,
    /// Accepted API key (repeatable).
    #[arg(long = "key", default_values_t = vec!["sk-mock".to_string()])]
    keys: Vec<String>,
    /// Models listed by GET /v1/models (comma-separated).
    #[arg(long, value_delimiter = ',', default_values_t = vec!["gpt-4o".to_string(), "gpt-4o-mini".to_string()])]
    models: Vec<String>,
    /// Answer 404 model_not_found for models not in --models.
    #[arg(long)]
    strict_models: bool,
    /// Content chunks per SSE reply.
    #[arg(long, default_value_t = 5)]
    chunks: usize,
    /// Milliseconds between SSE chunks.
    #[arg(long, default_value_t = 10)]
    chunk_delay_ms: u64,
    /// Milliseconds before every /v1/* reply.
    #[arg(long, default_value_t = 0)]
    delay_ms: u64,
    /// Status code of injected failures.
    #[arg(long, default_value_t = 500)]
    fail_status: u16,
    /// Fail every Nth request in scope (0 = never).
    #[arg(long, default_value_t = 0)]
    fail_every: u64,
    /// Fail this percentage of requests in scope.
    #[arg(long, default_value_t = 0.0)]
    fail_percent: f64,
    /// Drop the connection (no response) on every Nth request in scope.
    #[arg(long, default_value_t = 0)]
    drop_every: u64,
    /// Drop the connection on this percentage of requests in scope.
    #[arg(long, default_value_t = 0.0)]
    drop_percent: f64,
    /// Reset SSE streams after this many chunks.
    #[arg(long)]
    abort_stream_after: Option<usize>,
    /// Apply failure injection to `inference` (POST /v1/*) or `all` /v1/* requests.
    #[arg(long, default_value = "inference", value_parser = ["inference", "all"])]
    fault_scope: String,
    /// Tokio worker threads.
    #[arg(long, default_value_t = 1)]
    workers: usize,
}

fn main() -> std::io::Result<()> {
    let a = Args::parse();
    let settings = Settings {
        name: a.name.clone(),
        keys: a.keys,
        models: a.models,
        strict_models: a.strict_models,
        chunks: a.chunks,
        chunk_delay_ms: a.chunk_delay_ms,
        delay_ms: a.delay_ms,
        fail_status: a.fail_status,
        fail_every: a.fail_every,
        fail_percent: a.fail_percent,
        drop_every: a.drop_every,
        drop_percent: a.drop_percent,
        abort_stream_after: a.abort_stream_after,
        fault_scope: if a.fault_scope == "all" { FaultScope::All } else { FaultScope::Inference },
        ..Settings::default()
    };
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(a.workers.max(1)).enable_all().build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind((a.host.as_str(), a.port)).await?;
        let addr = listener.local_addr()?;
        if let Some(p) = &a.port_file {
            std::fs::write(p, format!("{}\n", addr.port()))?;
        }
        println!("mock-provider {} listening on http://{addr}", a.name);
        std::io::stdout().flush()?;
        let mock = Mock::new(settings);
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = mock.serve(listener) => {}
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        Ok(())
    })
}
