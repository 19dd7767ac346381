//! Request bodies: invalid JSON, no model, the size limit, chunked uploads.

use e2e::harness::{api_log, cred, mock, Router, MASTER};
use e2e::http::Request;
use serde_json::json;
use std::time::Duration;

#[test]
fn bodies_invalid_json_missing_model_too_large_and_chunked() {
    let a = mock("a", "sk-body-a-0000", &["gpt-4o"]);
    let cfg = format!(
        "server:\n  master_key: \"{MASTER}\"\n  max_body_size_mb: 1\ncredentials:\n{}",
        cred("cred_a", "sk-body-a-0000", &a.url(), -1)
    );
    let r = Router::start(&cfg);
    let post = || Request::post("/v1/chat/completions").bearer(MASTER).header("Content-Type", "application/json");

    let resp = r.send(&post().body(&b"{\"model\": \"gpt-4o\", \"messages\": ["[..]));
    assert_eq!(
        (resp.status, resp.error_code().as_deref(), resp.error_type().as_deref()),
        (400, Some("invalid_json"), Some("invalid_request_error")),
        "{}",
        resp.describe()
    );

    let resp = r.send(&post().body(&b"{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}]}"[..]));
    assert_eq!(
        (resp.status, resp.error_code().as_deref(), resp.error_type().as_deref()),
        (400, Some("missing_model"), Some("invalid_request_error")),
        "{}",
        resp.describe()
    );

    let resp = r.send(&post());
    assert_eq!((resp.status, resp.error_code().as_deref()), (400, Some("missing_model")), "no body at all: {}", resp.describe());

    // Over 1 MB → 413 from the filter (OpenAI JSON), never forwarded.
    let pad = "x".repeat(1_300_000);
    let big = json!({"model": "gpt-4o", "messages": [{"role": "user", "content": pad}]});
    let resp = r.send(&post().body(serde_json::to_vec(&big).unwrap()));
    assert_eq!(
        (resp.status, resp.error_code().as_deref(), resp.error_type().as_deref()),
        (413, Some("request_too_large"), Some("invalid_request_error")),
        "{}",
        resp.describe()
    );

    // Just under the limit passes, whole.
    let pad = "y".repeat(1_000_000);
    let under = serde_json::to_vec(&json!({"model": "gpt-4o", "messages": [{"role": "user", "content": pad}]})).unwrap();
    let resp = r.send(&post().body(under.clone()));
    assert_eq!(resp.status, 200, "{}", resp.describe());
    assert_eq!(a.mock.stats().last_request.unwrap()["body_len"].as_u64(), Some(under.len() as u64));

    // A chunked upload (no Content-Length), in pieces with pauses, arrives whole and routes.
    let body = serde_json::to_vec(&json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "z".repeat(20_000)}]})).unwrap();
    let pieces: Vec<Vec<u8>> = body.chunks(6_000).map(<[u8]>::to_vec).collect();
    assert!(pieces.len() >= 3);
    let resp = r.send(&post().chunked(pieces, Duration::from_millis(50)));
    assert_eq!(resp.status, 200, "{}", resp.describe());
    let last = a.mock.stats().last_request.unwrap();
    assert_eq!(last["body_len"].as_u64(), Some(body.len() as u64), "the provider got the whole chunked body");
    assert_eq!(last["body"]["model"], "gpt-4o");

    // A chunked body over the limit is refused too.
    let pieces: Vec<Vec<u8>> = (0..6).map(|_| vec![b' '; 250_000]).collect();
    let resp = r.send(&post().chunked(pieces, Duration::from_millis(10)));
    assert_eq!((resp.status, resp.error_code().as_deref()), (413, Some("request_too_large")), "{}", resp.describe());

    assert_eq!(api_log(&a).len(), 2, "only the two valid requests reached the provider");
}
