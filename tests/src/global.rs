//! Pieces for the multi-replica (global limits) e2e suite: a real Redis and the rate-limit
//! service double `rls-double` (tests/rls-double/, a TEST FIXTURE standing in for
//! envoyproxy/ratelimit), both child processes on 127.0.0.1, killed on drop (and with
//! `PR_SET_PDEATHSIG`, so they die with the test process).
//!
//! - Redis: `$REDIS_SERVER`, else `redis-server` on PATH (`make redis` installs Debian's), started
//!   as `redis-server --bind 127.0.0.1 --port P --save '' --appendonly no` on a
//!   [`free_port`](crate::harness::free_port); a lost port race is retried.
//! - rls-double: `$RLS_DOUBLE_BIN`, else `rls-double` next to the test binary's profile directory
//!   (`<target>/<profile>/rls-double`: cargo sets `CARGO_BIN_EXE_*` only for the same package).
//!   Build it first with `cargo build -p rls-double` or `cargo test -p rls-double` (`make test-global`
//!   does the latter). It binds port 0 and reports its real ports in its ready line, so it never
//!   races for a port.
//!
//! ```ignore
//! let redis = Redis::start();
//! let rls = RlsDouble::start(&redis);
//! // config: global_limits: { service: "127.0.0.1:{rls.port}" }
//! let (calls, hits) = rls.stats();
//! rls.set_delay(Duration::from_millis(500)); // every call stalls (timeouts)
//! rls.stop();                                  // the service is down
//! rls.restart();                               // back on the same ports
//! ```

use crate::harness::free_port;
use crate::http::Request;
use serde_json::Value;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const REDIS_INSTALL_HINT: &str = "install it with `make redis` or `apt-get install redis-server`";

fn die_with_parent(cmd: &mut Command) {
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
}

fn kill(child: &mut Option<Child>) {
    if let Some(mut c) = child.take() {
        let _ = c.kill();
        let _ = c.wait();
    }
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
        .unwrap_or_else(|| panic!("redis-server not found on PATH: the global-limits tests need a real Redis; {REDIS_INSTALL_HINT}"))
}

fn redis_ping(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else { return false };
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    let mut buf = [0u8; 7];
    s.write_all(b"PING\r\n").is_ok() && s.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n"
}

/// A throwaway `redis-server` on 127.0.0.1 (no persistence); killed on drop.
pub struct Redis {
    pub port: u16,
    child: Option<Child>,
}

impl Redis {
    pub fn start() -> Redis {
        let bin = redis_server_bin();
        for _ in 0..3 {
            let port = free_port();
            let mut cmd = Command::new(&bin);
            cmd.args(["--bind", "127.0.0.1", "--port", &port.to_string(), "--save", "", "--appendonly", "no"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            die_with_parent(&mut cmd);
            let mut child = cmd.spawn().unwrap_or_else(|e| panic!("{}: {e}; {REDIS_INSTALL_HINT}", bin.display()));
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    break; // lost the port race: another port
                }
                if redis_ping(port) {
                    return Redis { port, child: Some(child) };
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            kill(&mut Some(child));
        }
        panic!("redis-server ({}) did not answer PING on a free port after 3 attempts", bin.display());
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Kills Redis (the double then answers every call with a gRPC error).
    pub fn stop(&mut self) {
        kill(&mut self.child);
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Where the built `rls-double` is: `$RLS_DOUBLE_BIN`, else `<target>/<profile>/rls-double`
/// beside this test binary (`<target>/<profile>/deps/…`).
pub fn rls_double_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("RLS_DOUBLE_BIN").filter(|v| !v.is_empty()) {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("the test binary's path");
    let profile_dir = exe.parent().and_then(|deps| deps.parent()).expect("<target>/<profile>/deps/<test binary>");
    let p = profile_dir.join("rls-double");
    assert!(
        p.is_file(),
        "{} is missing: build it with `cargo build -p rls-double` (or `make test-global`), or set RLS_DOUBLE_BIN",
        p.display()
    );
    p
}

/// A running `rls-double` (the rate-limit service double) over a [`Redis`]; killed on drop.
pub struct RlsDouble {
    /// The gRPC port (`envoy.service.ratelimit.v3.RateLimitService`, HTTP/2 cleartext).
    pub port: u16,
    /// The plain-HTTP stats/control port (`GET /stats`, `POST /control`).
    pub stats_port: u16,
    args: Vec<String>,
    child: Option<Child>,
}

impl RlsDouble {
    /// With the defaults (STOP_CACHE_KEY_INCREMENT_WHEN_OVERLIMIT on, no prefix, no delay).
    pub fn start(redis: &Redis) -> RlsDouble {
        RlsDouble::start_with(redis, &[])
    }

    /// With extra CLI flags, e.g. `["--stop-cache-key-increment-when-overlimit", "false"]`.
    pub fn start_with(redis: &Redis, extra: &[&str]) -> RlsDouble {
        let mut args = vec!["--redis".to_string(), redis.url()];
        args.extend(extra.iter().map(|s| s.to_string()));
        let (child, port, stats_port) = spawn(&args, 0, 0);
        RlsDouble { port, stats_port, args, child: Some(child) }
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// `host:port` for `global_limits.service`.
    pub fn service(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Everything `GET /stats` reports: calls, hits, descriptor_hits, ok, over_limit, errors, delay_ms.
    pub fn stats_json(&self) -> Value {
        let r = Request::get("/stats").send(SocketAddr::from(([127, 0, 0, 1], self.stats_port))).expect("rls-double GET /stats");
        assert_eq!(r.status, 200, "rls-double /stats: {}", r.describe());
        r.json()
    }

    /// (ShouldRateLimit calls served, total request-level hits: each call's `hits_addend`, 0 as 1).
    pub fn stats(&self) -> (u64, u64) {
        let v = self.stats_json();
        (v["calls"].as_u64().unwrap_or(0), v["hits"].as_u64().unwrap_or(0))
    }

    /// Every later call stalls `d` before it is handled (zero turns it off). Needs it running.
    pub fn set_delay(&self, d: Duration) {
        let body = serde_json::json!({ "delay_ms": d.as_millis() as u64 });
        let r = Request::post("/control")
            .json(&body)
            .send(SocketAddr::from(([127, 0, 0, 1], self.stats_port)))
            .expect("rls-double POST /control");
        assert_eq!(r.status, 200, "rls-double /control: {}", r.describe());
    }

    /// Kills it: the service is down (connections refused) until [`RlsDouble::restart`].
    pub fn stop(&mut self) {
        kill(&mut self.child);
    }

    /// Starts it again on the same ports (counters and delay start from zero).
    pub fn restart(&mut self) {
        self.stop();
        let (child, _, _) = spawn(&self.args, self.port, self.stats_port);
        self.child = Some(child);
    }
}

impl Drop for RlsDouble {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Spawns rls-double and waits for `rls-double ready grpc=ADDR stats=ADDR redis=URL`.
fn spawn(args: &[String], port: u16, stats_port: u16) -> (Child, u16, u16) {
    let bin = rls_double_bin();
    let mut cmd = Command::new(&bin);
    cmd.args(["--listen", &format!("127.0.0.1:{port}"), "--stats-listen", &format!("127.0.0.1:{stats_port}")])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    die_with_parent(&mut cmd);
    let mut child = cmd.spawn().unwrap_or_else(|e| panic!("{}: {e}", bin.display()));
    let stdout = child.stdout.take().expect("piped stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    let line = rx.recv_timeout(Duration::from_secs(20)).unwrap_or_default();
    let port_of = |name: &str| -> Option<u16> {
        line.split_whitespace().find_map(|w| w.strip_prefix(name)).and_then(|v| v.parse::<SocketAddr>().ok()).map(|a| a.port())
    };
    match (line.starts_with("rls-double ready"), port_of("grpc="), port_of("stats=")) {
        (true, Some(p), Some(s)) => (child, p, s),
        _ => {
            kill(&mut Some(child));
            panic!("{} did not print its ready line (got {line:?}; its stderr is above)", bin.display());
        }
    }
}
