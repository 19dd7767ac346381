//! The listener's edges: its stream idle timeout cuts quiet streams but not /v1/ SSE (the route's
//! `idle_timeout: 0s`), a second router on the same port fails to start instead of sharing it, and
//! a sub-second `request_timeout` is kept to the millisecond.

use e2e::harness::{control, cred, hcm, mock, BootstrapEdit, Options, Router, MASTER};
use e2e::http::{send_raw, Request};
use serde_json::{json, Value};
use std::time::{Duration, Instant};

/// The listener's stream idle timeout in the quiet-stream test (the rendered default is 300 s).
const SHORT_IDLE: &str = "1s";

fn short_stream_idle(b: &mut Value) {
    hcm(b)["stream_idle_timeout"] = json!(SHORT_IDLE);
}

fn config(key: &str, url: &str, server_extra: &str) -> String {
    format!("server:\n  master_key: \"{MASTER}\"\n{server_extra}credentials:\n{}", cred("cred_a", key, url, -1))
}

#[test]
fn a_quiet_sse_stream_outlives_the_listener_stream_idle_timeout() {
    let a = mock("a", "sk-listen-a-0000", &["gpt-4o"]);
    // One content chunk, the final event, [DONE]: two silences of 2.5 s, each longer than the
    // listener's stream idle timeout.
    control(&a, json!({"chunks": 1, "chunk_delay_ms": 2500}));
    let r = Router::start_with(
        &config("sk-listen-a-0000", &a.url(), ""),
        Options { edit_bootstrap: Some(BootstrapEdit::new(short_stream_idle)), ..Options::default() },
    );
    let dump = r.admin_get("/config_dump").text();
    assert!(dump.contains(&format!("\"stream_idle_timeout\": \"{SHORT_IDLE}\"")), "the edited listener is not the one Envoy runs");

    // The listener's timer is live: a client that stops in the middle of its request headers
    // is cut off after about 1 s.
    let start = Instant::now();
    let cut = send_raw(r.addr, b"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ");
    let waited = start.elapsed();
    assert!(waited >= Duration::from_millis(800) && waited < Duration::from_secs(5), "a stalled client was cut after {waited:?}: {cut:?}");
    if let Ok(resp) = &cut {
        assert_eq!(resp.status, 408, "{}", resp.describe());
    }

    // /v1/: the stream survives both silences.
    let req = Request::post("/v1/chat/completions")
        .bearer(MASTER)
        .json(&json!({"model": "gpt-4o", "stream": true, "messages": [{"role": "user", "content": "Hello!"}]}));
    let (resp, reads) = req.send_timed(r.addr).expect("stream");
    assert_eq!(resp.status, 200, "{}", resp.describe());
    let text = resp.text();
    let events: Vec<&str> = text.split("\n\n").filter(|e| !e.trim().is_empty()).collect();
    assert_eq!(events.len(), 3, "the chunk, the final event, [DONE]: {text}");
    assert_eq!(*events.last().unwrap(), "data: [DONE]");
    let done = reads.iter().find(|(_, b)| String::from_utf8_lossy(b).contains("[DONE]")).expect("[DONE]").0;
    assert!(done >= Duration::from_millis(4500), "[DONE] after {done:?}: the mock did not pause");
}

#[test]
fn a_second_router_on_the_same_port_fails_loudly() {
    let a = mock("a", "sk-listen-b-0000", &["gpt-4o"]);
    let cfg = config("sk-listen-b-0000", &a.url(), "");
    let first = Router::start(&cfg);
    let dump = first.admin_get("/config_dump?resource=static_listeners").text();
    assert!(dump.contains("\"enable_reuse_port\": false"), "the harness's listener reuses ports:\n{dump}");

    let o = Options { listen_port: Some(first.addr.port()), ..Options::default() };
    match Router::try_start_with(&cfg, &o) {
        Ok(second) => panic!("a second Envoy bound {} beside the first (pid {} and {})", first.addr, first.pid(), second.pid()),
        Err(msg) => {
            assert!(msg.contains("Envoy exited"), "{msg}");
            assert!(msg.contains("ddress already in use"), "{msg}");
        }
    }
    // The first one serves every connection on its own.
    for _ in 0..4 {
        assert_eq!(first.chat("gpt-4o").status, 200);
    }
    assert_eq!(a.mock.stats().log.iter().filter(|e| e.method == "POST").count(), 4);
}

#[test]
fn a_sub_second_request_timeout_is_kept_to_the_millisecond() {
    let a = mock("a", "sk-listen-c-0000", &["gpt-4o"]);
    let r = Router::start(&config("sk-listen-c-0000", &a.url(), "  request_timeout: 1500ms\n"));
    // 1.2 s is inside 1.5 s (a timeout truncated to 1 s gave 504 here).
    control(&a, json!({"delay_ms": 1200}));
    let ok = r.chat("gpt-4o");
    assert_eq!(ok.status, 200, "{}", ok.describe());
    // 3 s is not: 504 after about 1.5 s.
    control(&a, json!({"delay_ms": 3000}));
    let late = r.chat("gpt-4o");
    assert_eq!(late.status, 504, "{}", late.describe());
    assert!(late.elapsed >= Duration::from_millis(1400) && late.elapsed < Duration::from_millis(2800), "504 after {:?}", late.elapsed);
}
