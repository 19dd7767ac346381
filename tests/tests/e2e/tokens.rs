//! Token usage and TPM (issue 15) on a real Envoy: what providers report is read as the answer
//! streams past, counted per credential, and limits keys by tokens.

use e2e::harness::{control, mock, Router, MASTER};
use e2e::http::Request;
use serde_json::json;
use std::time::Duration;

fn cred_tpm(name: &str, key: &str, url: &str, tpm: i64) -> String {
    format!("  - name: {name}\n    api_key: \"{key}\"\n    base_url: \"{url}\"\n    tpm: {tpm}\n")
}

/// A chat request the mock answers with 60 tokens: 53 prompt words + its 7-word reply.
fn chat_60() -> Request {
    let prompt = vec!["word"; 53].join(" ");
    Request::post("/v1/chat/completions").bearer(MASTER).json(&json!({"model": "gpt-4o", "messages": [{"role": "user", "content": prompt}]}))
}

#[test]
fn tpm_100_on_two_keys_admits_four_60_token_answers_then_429() {
    let a = mock("a", "sk-tpm-a-00000", &["gpt-4o"]);
    let b = mock("b", "sk-tpm-b-00000", &["gpt-4o"]);
    let cfg = format!(
        "server:\n  master_key: \"{MASTER}\"\n  default_models_rpm: -1\ncredentials:\n{}{}",
        cred_tpm("cred_a", "sk-tpm-a-00000", &a.url(), 100),
        cred_tpm("cred_b", "sk-tpm-b-00000", &b.url(), 100),
    );
    let r = Router::start(&cfg);
    let mut statuses = vec![];
    for _ in 0..5 {
        let resp = chat_60().send(r.addr).expect("chat");
        if resp.status == 200 {
            let usage = &resp.json()["usage"];
            assert_eq!(usage["total_tokens"], 60, "the fixture's arithmetic: {usage}");
        }
        statuses.push(resp.status);
        if statuses.len() == 5 {
            assert_eq!(resp.error_type().as_deref(), Some("rate_limit_error"), "{}", resp.describe());
            let ra: u64 = resp.header("retry-after").and_then(|v| v.parse().ok()).expect("Retry-After");
            assert!((1..=61).contains(&ra), "{ra}");
        }
    }
    assert_eq!(statuses, [200, 200, 200, 200, 429], "60 + 60 reach 100 on each key: checked before, charged after");
    for c in ["cred_a", "cred_b"] {
        assert_eq!(r.metric("auto_ai_router_tokens_total", &[("credential", c), ("model", "gpt-4o"), ("type", "prompt")]), Some(106.0), "{c}");
        assert_eq!(r.metric("auto_ai_router_tokens_total", &[("credential", c), ("model", "gpt-4o"), ("type", "completion")]), Some(14.0), "{c}");
    }
    let creds = Request::get("/v1/credentials").bearer(MASTER).send(r.addr).expect("credentials").json();
    assert_eq!(creds["data"][0]["tpm"], json!({"used": 120, "limit": 100}), "{creds}");
}

#[test]
fn a_stream_with_include_usage_is_counted_and_still_streams() {
    let a = mock("a", "sk-tok-a-00000", &["gpt-4o"]);
    control(&a, json!({"chunks": 5, "chunk_delay_ms": 200}));
    let cfg = format!("server:\n  master_key: \"{MASTER}\"\ncredentials:\n{}", cred_tpm("cred_a", "sk-tok-a-00000", &a.url(), -1));
    let r = Router::start(&cfg);
    let req = Request::post("/v1/chat/completions").bearer(MASTER).json(&json!({
        "model": "gpt-4o", "stream": true, "stream_options": {"include_usage": true},
        "messages": [{"role": "user", "content": "one two three"}]
    }));
    let (resp, reads) = req.send_timed(r.addr).expect("stream");
    assert_eq!(resp.status, 200, "{}", resp.describe());
    let first = reads.iter().find(|(_, b)| String::from_utf8_lossy(b).contains("chat.completion.chunk")).expect("a chunk").0;
    let done = reads.iter().find(|(_, b)| String::from_utf8_lossy(b).contains("[DONE]")).expect("[DONE]").0;
    assert!(done - first >= Duration::from_millis(800), "first event at {first:?}, [DONE] at {done:?}: the stream was held back");
    assert!(resp.text().contains("\"usage\""), "the client asked for the usage event and got it");
    assert_eq!(r.metric("auto_ai_router_tokens_total", &[("credential", "cred_a"), ("model", "gpt-4o"), ("type", "prompt")]), Some(3.0));
    assert_eq!(r.metric("auto_ai_router_tokens_total", &[("credential", "cred_a"), ("model", "gpt-4o"), ("type", "completion")]), Some(7.0));

    // The same stream without include_usage: nothing reported, counted as missing; never injected.
    let req = Request::post("/v1/chat/completions")
        .bearer(MASTER)
        .json(&json!({"model": "gpt-4o", "stream": true, "messages": [{"role": "user", "content": "hi"}]}));
    let resp = req.send(r.addr).expect("stream");
    assert_eq!(resp.status, 200);
    assert!(!resp.text().contains("\"usage\""), "the router does not add include_usage");
    assert_eq!(r.metric("auto_ai_router_usage_missing_total", &[("credential", "cred_a")]), Some(1.0));
}
