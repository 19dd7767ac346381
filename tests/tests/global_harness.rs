//! The global-limits harness pieces (e2e::global) on their own: Redis and rls-double start,
//! report, stall, stop and come back. Run by `make test-global` (needs `cargo build -p rls-double`).

use e2e::global::{Redis, RlsDouble};
use std::net::TcpStream;
use std::time::Duration;

#[test]
fn redis_and_the_double_start_report_stall_stop_and_restart() {
    let mut redis = Redis::start();
    let mut rls = RlsDouble::start(&redis);
    assert_eq!(rls.stats(), (0, 0));
    assert!(TcpStream::connect(rls.addr()).is_ok());
    rls.set_delay(Duration::from_millis(250));
    assert_eq!(rls.stats_json()["delay_ms"].as_u64(), Some(250));
    let (port, stats_port) = (rls.port, rls.stats_port);
    rls.stop();
    assert!(TcpStream::connect(rls.addr()).is_err(), "stopped: connections are refused");
    rls.restart();
    assert_eq!((rls.port, rls.stats_port), (port, stats_port));
    assert_eq!(rls.stats_json()["delay_ms"].as_u64(), Some(0));
    assert_eq!(rls.service(), format!("127.0.0.1:{port}"));
    redis.stop();
}
