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

/// Sends a request head announcing `Content-Length: 1000` and 10 body bytes, then goes quiet.
fn stalled_upload(addr: std::net::SocketAddr, host: &str) -> (std::io::Result<e2e::http::Response>, Duration) {
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {MASTER}\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{{\"model\":"
    );
    let start = Instant::now();
    let resp = send_raw(addr, head.as_bytes());
    (resp, start.elapsed())
}

fn assert_cut(what: &str, (resp, waited): (std::io::Result<e2e::http::Response>, Duration), min: Duration, max: Duration) {
    assert!(waited >= min && waited < max, "{what}: cut after {waited:?} ({resp:?})");
    if let Ok(resp) = resp {
        assert!(resp.status == 408 || resp.status >= 500, "{what}: {}", resp.describe());
    }
}

/// `server.body_idle_timeout` cuts an authenticated client that stalls mid-upload, but neither a
/// slow steady upload nor a long quiet generation once the request is routed.
#[test]
fn a_stalled_upload_is_cut_but_slow_uploads_and_quiet_generations_are_not() {
    let a = mock("a", "sk-listen-d-0000", &["gpt-4o"]);
    let r = Router::start(&config("sk-listen-d-0000", &a.url(), "  body_idle_timeout: 1s\n  max_provider_retries: 0\n"));
    assert_cut("stalled body", stalled_upload(r.addr, "r"), Duration::from_millis(800), Duration::from_secs(4));
    assert_eq!(e2e::harness::api_log(&a).len(), 0, "a partial body reached the provider");

    // 5 chunks 400 ms apart: 2 s of upload, never 1 s quiet.
    let body = serde_json::to_vec(&json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "Hello!"}]})).unwrap();
    let pieces: Vec<Vec<u8>> = body.chunks(body.len() / 4).map(<[u8]>::to_vec).collect();
    let slow = Request::post("/v1/chat/completions").bearer(MASTER).chunked(pieces, Duration::from_millis(400)).send(r.addr).unwrap();
    assert_eq!(slow.status, 200, "{}", slow.describe());

    // A non-streaming answer that takes 2.5 s: quiet for longer than the body idle limit.
    control(&a, json!({"delay_ms": 2500}));
    let quiet = r.chat("gpt-4o");
    assert_eq!(quiet.status, 200, "{}", quiet.describe());
}

/// The compose front Envoy's shipped bootstrap, run on the local Envoy in front of a local router:
/// its listener has the router's edge limits, and slow-header and stalled-body clients are cut
/// through it too.
#[test]
fn the_compose_front_envoy_cuts_slow_headers_and_stalled_bodies() {
    let path = e2e::harness::repo_root().join("envoy/docker/front-envoy.yaml");
    let text = std::fs::read_to_string(&path).unwrap();
    let mut front: Value = serde_yaml::from_str(&text).unwrap();
    let hcm = front.pointer_mut("/static_resources/listeners/0/filter_chains/0/filters/0/typed_config").unwrap();
    for (field, want) in [
        ("/request_headers_timeout", json!("10s")),
        ("/stream_idle_timeout", json!("300s")),
        ("/http2_protocol_options/max_concurrent_streams", json!(100)),
        ("/http2_protocol_options/initial_stream_window_size", json!(65536)),
        ("/http2_protocol_options/initial_connection_window_size", json!(1048576)),
    ] {
        assert_eq!(hcm.pointer(field), Some(&want), "front-envoy.yaml {field}");
    }
    // Shorter header timeout for the test; the rest as shipped, the addresses made local.
    hcm["request_headers_timeout"] = json!("1s");
    assert_eq!(front.pointer("/static_resources/listeners/0/enable_reuse_port"), Some(&json!(false)));

    let a = mock("a", "sk-listen-e-0000", &["gpt-4o"]);
    let r = Router::start(&config("sk-listen-e-0000", &a.url(), "  body_idle_timeout: 1s\n"));
    let (port, admin) = (e2e::harness::free_port(), e2e::harness::free_port());
    front["admin"]["address"]["socket_address"] = json!({"address": "127.0.0.1", "port_value": admin});
    front["static_resources"]["listeners"][0]["address"]["socket_address"] = json!({"address": "127.0.0.1", "port_value": port});
    let routers = &mut front["static_resources"]["clusters"][0];
    routers["type"] = json!("STATIC");
    routers["load_assignment"]["endpoints"][0]["lb_endpoints"] =
        json!([{"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": r.addr.port()}}}}]);
    let f = Router::start_bootstrap(&front, port, admin, &[], None);

    let ok = f.chat("gpt-4o");
    assert_eq!(ok.status, 200, "through the front: {}", ok.describe());
    let start = Instant::now();
    let cut = send_raw(f.addr, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ");
    assert_cut("slow headers at the front", (cut, start.elapsed()), Duration::from_millis(800), Duration::from_secs(4));
    assert_cut("stalled body through the front", stalled_upload(f.addr, "x"), Duration::from_millis(800), Duration::from_secs(5));
    assert_eq!(e2e::harness::api_log(&a).iter().filter(|e| e.method == "POST").count(), 1);
}
