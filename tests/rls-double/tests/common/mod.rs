//! Test helpers: a real `redis-server` on a free loopback port (no persistence) and `rls-double`
//! processes, both killed on drop, plus a gRPC client and request builders.
#![allow(dead_code)]

use envoy_types::pb::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::{Entry, RateLimitOverride};
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::rate_limit::Unit;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient;
use envoy_types::pb::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use envoy_types::pb::google::protobuf::UInt64Value;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tonic::transport::Channel;

pub const INSTALL_HINT: &str = "install it with `make redis` or `apt-get install redis-server`";

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("bind 127.0.0.1:0")
}

/// `$REDIS_SERVER`, else `redis-server` on PATH; panics with the install hint.
pub fn redis_server_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("REDIS_SERVER").filter(|v| !v.is_empty()) {
        return PathBuf::from(p);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join("redis-server"))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("redis-server not found on PATH: this test needs a real Redis; {INSTALL_HINT}"))
}

fn ping(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else { return false };
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    let mut buf = [0u8; 7];
    s.write_all(b"PING\r\n").is_ok() && s.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n"
}

/// A `redis-server --bind 127.0.0.1 --port P --save '' --appendonly no`, killed on drop.
pub struct Redis {
    pub port: u16,
    child: Child,
}

impl Redis {
    pub fn start() -> Redis {
        let bin = redis_server_bin();
        for _ in 0..3 {
            let port = free_port();
            let mut child = Command::new(&bin)
                .args(["--bind", "127.0.0.1", "--port", &port.to_string(), "--save", "", "--appendonly", "no"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap_or_else(|e| panic!("{}: {e}; {INSTALL_HINT}", bin.display()));
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    break; // lost a port race: try another port
                }
                if ping(port) {
                    return Redis { port, child };
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!("redis-server ({}) did not answer PING on a free port after 3 attempts", bin.display());
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn conn(&self) -> redis::Connection {
        redis::Client::open(self.url()).and_then(|c| c.get_connection()).expect("connect to the test Redis")
    }

    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.stop();
    }
}

/// One `rls-double` process (binds port 0 and reports its ports in its ready line), killed on drop.
pub struct Double {
    pub grpc: SocketAddr,
    pub stats: SocketAddr,
    child: Child,
}

impl Double {
    pub fn start(redis: &Redis, extra: &[&str]) -> Double {
        let mut child = Command::new(env!("CARGO_BIN_EXE_rls-double"))
            .args(["--listen", "127.0.0.1:0", "--stats-listen", "127.0.0.1:0", "--redis", &redis.url()])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn rls-double");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx.recv_timeout(Duration::from_secs(20)).unwrap_or_default();
        let field =
            |name: &str| -> Option<SocketAddr> { line.split_whitespace().find_map(|w| w.strip_prefix(name)).and_then(|v| v.parse().ok()) };
        match (line.starts_with("rls-double ready"), field("grpc="), field("stats=")) {
            (true, Some(grpc), Some(stats)) => Double { grpc, stats, child },
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("rls-double did not print its ready line (got {line:?})");
            }
        }
    }

    pub async fn client(&self) -> RateLimitServiceClient<Channel> {
        RateLimitServiceClient::connect(format!("http://{}", self.grpc)).await.expect("connect to rls-double")
    }

    fn http(&self, method: &str, path: &str, body: &str) -> serde_json::Value {
        let mut s = TcpStream::connect(self.stats).expect("connect to the stats port");
        write!(s, "{method} {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}", body.len()).unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").expect("an HTTP response");
        assert!(head.starts_with("HTTP/1.1 200"), "{method} {path}: {head}");
        serde_json::from_str(body).expect("JSON")
    }

    pub fn stats(&self) -> serde_json::Value {
        self.http("GET", "/stats", "")
    }

    pub fn set_delay(&self, d: Duration) {
        self.http("POST", "/control", &format!("{{\"delay_ms\":{}}}", d.as_millis()));
    }
}

impl Drop for Double {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() as i64
}

/// Sleeps past the next `divider` boundary when fewer than `need` seconds are left in the
/// current window, so a test's calls all land in one window.
pub fn ensure_window_room(divider: i64, need: i64) {
    let left = divider - now() % divider;
    if left < need {
        std::thread::sleep(Duration::from_millis(left as u64 * 1000 + 100));
    }
}

pub fn desc(entries: &[(&str, &str)], limit: Option<(u32, Unit)>, hits: Option<u64>) -> RateLimitDescriptor {
    RateLimitDescriptor {
        entries: entries.iter().map(|(k, v)| Entry { key: k.to_string(), value: v.to_string() }).collect(),
        limit: limit.map(|(n, u)| RateLimitOverride { requests_per_unit: n, unit: u as i32 }),
        hits_addend: hits.map(|value| UInt64Value { value }),
        ..Default::default()
    }
}

pub fn req(domain: &str, descriptors: Vec<RateLimitDescriptor>, hits_addend: u32) -> RateLimitRequest {
    RateLimitRequest { domain: domain.into(), descriptors, hits_addend }
}

pub async fn call(c: &mut RateLimitServiceClient<Channel>, r: RateLimitRequest) -> RateLimitResponse {
    c.should_rate_limit(r).await.expect("ShouldRateLimit").into_inner()
}
