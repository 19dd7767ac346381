//! Compressed bodies on a real Envoy (issues 26 and 21): request bodies with a `Content-Encoding`
//! are routed on their decoded model and reach the provider as the client sent them (retries
//! included); unknown codings, corrupt payloads and inflation bombs are refused before any
//! provider; compressed answers (JSON and SSE) have their tokens counted and still reach the client
//! as the provider compressed them.

use e2e::codings::{self, Coding};
use e2e::harness::{api_log, control, cred, metric_value, mock, Router, MASTER};
use e2e::http::{Request, Response};
use serde_json::{json, Value};
use std::io::Write;
use std::time::{Duration, Instant};

fn crc32(b: &[u8]) -> u32 {
    let mut c = flate2::Crc::new();
    c.update(b);
    c.sum()
}

fn compressed(path: &str, coding: Coding, body: &Value) -> (Request, Vec<u8>) {
    let enc = codings::encode(coding, &serde_json::to_vec(body).unwrap());
    let req = Request::post(path)
        .bearer(MASTER)
        .header("Content-Type", "application/json")
        .header("Content-Encoding", coding.name())
        .body(enc.clone());
    (req, enc)
}

fn last_body(m: &e2e::mock::BackgroundMock) -> Value {
    m.mock.stats().last_request.expect("the mock got a request")["body"].clone()
}

#[test]
fn gzip_br_and_zstd_request_bodies_are_routed_and_reach_the_provider_as_sent() {
    let a = mock("a", "sk-ce-a-0000000", &["gpt-4o"]);
    let r =
        Router::start(&format!("server:\n  master_key: \"{MASTER}\"\ncredentials:\n{}", cred("cred_a", "sk-ce-a-0000000", &a.url(), -1)));
    let long = "a long prompt that compresses well ".repeat(400);
    for coding in [Coding::Gzip, Coding::Br, Coding::Zstd, Coding::Deflate] {
        let chat = json!({"model": "gpt-4o", "messages": [{"role": "user", "content": long}]});
        let (req, enc) = compressed("/v1/chat/completions", coding, &chat);
        let resp = r.send(&req);
        assert_eq!(resp.status, 200, "{coding:?}: {}", resp.describe());
        assert!(resp.json()["choices"][0]["message"]["content"].as_str().unwrap().contains("gpt-4o"));
        let entry = api_log(&a).pop().unwrap();
        assert_eq!(entry.content_encoding.as_deref(), Some(coding.name()), "{coding:?}: the Content-Encoding went on");
        assert_eq!((entry.body_len, entry.body_crc32), (enc.len(), crc32(&enc)), "{coding:?}: the very bytes the client sent");
        assert_eq!(entry.model.as_deref(), Some("gpt-4o"), "the mock decoded the body and read the model");
        assert_eq!(last_body(&a)["messages"][0]["content"], long.as_str());

        let responses = json!({"model": "gpt-4o", "input": long});
        let (req, enc) = compressed("/v1/responses", coding, &responses);
        let resp = r.send(&req);
        assert_eq!(resp.status, 200, "{coding:?}: {}", resp.describe());
        assert_eq!(resp.json()["model"], "gpt-4o", "the mock's echo read the decoded model");
        let entry = api_log(&a).pop().unwrap();
        assert_eq!((entry.path.as_str(), entry.body_crc32), ("/v1/responses", crc32(&enc)));
    }
    assert_eq!(
        r.metric("auto_ai_router_model_requests_total", &[("credential", "cred_a"), ("model", "gpt-4o")]),
        Some(8.0),
        "routed on the decoded model"
    );
}

fn rss_kb(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field =
        |name: &str| status.lines().find(|l| l.starts_with(name)).and_then(|l| l.split_whitespace().nth(1)?.parse().ok()).unwrap_or(0);
    (field("VmRSS:"), field("VmHWM:"))
}

#[test]
fn an_inflation_bomb_is_413_at_once_with_envoy_memory_bounded() {
    let a = mock("a", "sk-ce-bomb-00000", &["gpt-4o"]);
    let r = Router::start(&format!(
        "server:\n  master_key: \"{MASTER}\"\n  max_body_size_mb: 2\ncredentials:\n{}",
        cred("cred_a", "sk-ce-bomb-00000", &a.url(), -1)
    ));
    assert_eq!(std::fs::read_to_string(format!("/proc/{}/comm", r.pid())).unwrap_or_default().trim(), "envoy", "the pid is Envoy's");
    // 1 GiB of spaces inside a JSON string: about 1 MB of gzip, 34 KB of zstd.
    let head = br#"{"model":"gpt-4o","messages":[{"role":"user","content":""#;
    let spaces = vec![b' '; 1 << 20];
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    let mut zs = zstd::stream::Encoder::new(Vec::new(), 3).unwrap();
    gz.write_all(head).unwrap();
    zs.write_all(head).unwrap();
    for _ in 0..1024 {
        gz.write_all(&spaces).unwrap();
        zs.write_all(&spaces).unwrap();
    }
    let (gz, zs) = (gz.finish().unwrap(), zs.finish().unwrap());
    assert!(gz.len() < 1 << 20, "the gzip bomb is under the 2 MB limit itself: {}", gz.len());
    // Warm up (the workers' VMs, connections), then measure.
    assert_eq!(r.chat("gpt-4o").status, 200);
    let (rss_before, _) = rss_kb(r.pid());
    for (coding, bomb) in [("gzip", &gz), ("zstd", &zs), ("gzip", &gz)] {
        let req = Request::post("/v1/chat/completions")
            .bearer(MASTER)
            .header("Content-Type", "application/json")
            .header("Content-Encoding", coding)
            .body(bomb.clone());
        let t = Instant::now();
        let resp = r.send(&req);
        assert_eq!(
            (resp.status, resp.error_code().as_deref(), resp.error_type().as_deref()),
            (413, Some("request_too_large"), Some("invalid_request_error")),
            "{coding}: {}",
            resp.describe()
        );
        assert!(resp.json()["error"]["message"].as_str().unwrap().contains("decoded"), "{}", resp.describe());
        assert!(t.elapsed() < Duration::from_secs(2), "{coding}: {:?}", t.elapsed());
    }
    let (rss_after, hwm) = rss_kb(r.pid());
    eprintln!("Envoy RSS {rss_before} kB before the bombs, {rss_after} kB after (peak {hwm} kB)");
    assert!(rss_after < rss_before + 48 * 1024, "Envoy grew from {rss_before} to {rss_after} kB: the bomb was inflated");
    assert!(hwm < 400 * 1024, "Envoy's peak RSS {hwm} kB");
    assert_eq!(api_log(&a).len(), 1, "no bomb reached the provider");
    assert_eq!(r.metric("auto_ai_router_rejections_total", &[("reason", "too_large")]), Some(3.0));
}

#[test]
fn unknown_codings_are_415_and_corrupt_payloads_400_before_any_provider() {
    let a = mock("a", "sk-ce-bad-000000", &["gpt-4o"]);
    let r =
        Router::start(&format!("server:\n  master_key: \"{MASTER}\"\ncredentials:\n{}", cred("cred_a", "sk-ce-bad-000000", &a.url(), -1)));
    let body = serde_json::to_vec(&json!({"model": "gpt-4o", "messages": []})).unwrap();
    let post = |encoding: &str, bytes: Vec<u8>| {
        r.send(&Request::post("/v1/chat/completions").bearer(MASTER).header("Content-Encoding", encoding).body(bytes))
    };
    for encoding in ["compress", "gzip, br", "lz4"] {
        let resp = post(encoding, codings::encode(Coding::Gzip, &body));
        assert_eq!(
            (resp.status, resp.error_code().as_deref(), resp.error_type().as_deref()),
            (415, Some("unsupported_content_encoding"), Some("invalid_request_error")),
            "{encoding}: {}",
            resp.describe()
        );
    }
    let mut corrupt = codings::encode(Coding::Gzip, &body);
    let mid = corrupt.len() / 2;
    corrupt[mid] ^= 0x55;
    corrupt[mid + 1] ^= 0xaa;
    let enc = codings::encode(Coding::Gzip, &body);
    for (what, bytes) in [("corrupt", corrupt), ("cut", enc[..enc.len() - 4].to_vec()), ("plain JSON", body.clone())] {
        let resp = post("gzip", bytes);
        assert_eq!((resp.status, resp.error_code().as_deref()), (400, Some("invalid_body")), "{what}: {}", resp.describe());
    }
    assert!(api_log(&a).is_empty(), "nothing reached the provider");
    let m = r.metrics();
    assert_eq!(metric_value(&m, "auto_ai_router_rejections_total", &[("reason", "unsupported_encoding")]), Some(3.0));
    assert_eq!(metric_value(&m, "auto_ai_router_rejections_total", &[("reason", "bad_request")]), Some(3.0));
}

#[test]
fn a_retried_compressed_request_replays_the_same_bytes_on_the_next_key() {
    let a = mock("a", "sk-ce-ra-0000000", &["gpt-4o"]);
    let b = mock("b", "sk-ce-rb-0000000", &["gpt-4o"]);
    control(&a, json!({"fail_every": 1, "fail_status": 429}));
    let r = Router::start(&format!(
        "server:\n  master_key: \"{MASTER}\"\ncredentials:\n{}{}",
        cred("cred_a", "sk-ce-ra-0000000", &a.url(), -1),
        cred("cred_b", "sk-ce-rb-0000000", &b.url(), -1)
    ));
    let chat = json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "retry me ".repeat(300)}]});
    let (req, enc) = compressed("/v1/chat/completions", Coding::Zstd, &chat);
    // Round robin: within two requests one starts on a.
    for _ in 0..2 {
        let resp = r.send(&req);
        assert_eq!((resp.status, resp.header("x-mock-provider")), (200, Some("b")), "{}", resp.describe());
    }
    let (la, lb) = (api_log(&a), api_log(&b));
    assert_eq!(la.len(), 1, "a got one attempt and answered 429");
    assert_eq!((la[0].status, la[0].model.as_deref()), (429, Some("gpt-4o")));
    assert_eq!(lb.len(), 2);
    for e in la.iter().chain(&lb) {
        assert_eq!((e.content_encoding.as_deref(), e.body_len, e.body_crc32), (Some("zstd"), enc.len(), crc32(&enc)), "the same bytes");
    }
}

/// A chat request the mock answers with 60 tokens (53 prompt words and its 7-word reply), asking
/// for a compressed answer.
fn chat_60(stream: bool) -> Request {
    let prompt = vec!["word"; 53].join(" ");
    let mut body = json!({"model": "gpt-4o", "messages": [{"role": "user", "content": prompt}]});
    if stream {
        body["stream"] = json!(true);
        body["stream_options"] = json!({"include_usage": true});
    }
    Request::post("/v1/chat/completions").bearer(MASTER).header("Accept-Encoding", "gzip, deflate, br, zstd").json(&body)
}

fn tpm_router(coding: Coding) -> (e2e::mock::BackgroundMock, Router) {
    let a = mock("a", "sk-ce-tpm-000000", &["gpt-4o"]);
    control(&a, json!({"compress": coding.name(), "chunk_delay_ms": 0}));
    let r = Router::start(&format!(
        "server:\n  master_key: \"{MASTER}\"\n  default_models_rpm: -1\ncredentials:\n  - name: cred_a\n    api_key: \"sk-ce-tpm-000000\"\n    base_url: \"{}\"\n    tpm: 100\n",
        a.url()
    ));
    (a, r)
}

/// The TPM example of issue 21: `tpm: 100`, 60-token answers: 200, 200, then 429 until the window frees.
fn four_requests(r: &Router, coding: Coding, stream: bool) -> Vec<Response> {
    let mut out = vec![];
    for i in 0..4 {
        let resp = r.send(&chat_60(stream));
        if i < 2 {
            assert_eq!(resp.status, 200, "{coding:?} {i}: {}", resp.describe());
            assert_eq!(resp.header("content-encoding"), Some(coding.name()), "the provider's compressed answer reached the client as sent");
        }
        out.push(resp);
    }
    let statuses: Vec<u16> = out.iter().map(|r| r.status).collect();
    assert_eq!(statuses, [200, 200, 429, 429], "{coding:?} stream={stream}: tokens read from the compressed answers");
    assert_eq!(r.metric("auto_ai_router_tokens_total", &[("credential", "cred_a"), ("type", "prompt")]), Some(106.0));
    assert_eq!(r.metric("auto_ai_router_tokens_total", &[("credential", "cred_a"), ("type", "completion")]), Some(14.0));
    assert_eq!(r.metric("auto_ai_router_usage_missing_total", &[("credential", "cred_a")]), None);
    out
}

#[test]
fn gzip_json_answers_count_their_tokens_and_the_client_decodes_them() {
    let (_a, r) = tpm_router(Coding::Gzip);
    let out = four_requests(&r, Coding::Gzip, false);
    let v: Value = serde_json::from_slice(&out[0].decoded()).unwrap();
    assert_eq!(v["usage"]["total_tokens"], 60, "{v}");
    assert!(out[0].body.len() != out[0].decoded().len(), "the body on the wire was compressed");
}

#[test]
fn gzip_sse_answers_count_their_usage_event_and_still_stream() {
    let (a, r) = tpm_router(Coding::Gzip);
    control(&a, json!({"chunk_delay_ms": 150}));
    let (resp, reads) = chat_60(true).send_timed(r.addr).expect("stream");
    assert_eq!((resp.status, resp.header("content-encoding")), (200, Some("gzip")), "{}", resp.describe());
    let text = String::from_utf8(resp.decoded()).unwrap();
    assert!(text.contains("\"usage\"") && text.ends_with("data: [DONE]\n\n"), "{text}");
    assert!(reads.len() >= 4, "the compressed stream arrived in pieces, not held back: {} reads", reads.len());
    let span = reads.last().unwrap().0 - reads[0].0;
    assert!(span >= Duration::from_millis(600), "first and last read {span:?} apart: the stream was held back");
    control(&a, json!({"chunk_delay_ms": 0}));
    // That answer's 60 tokens are in the window: one more 200, then 429s.
    let second = r.send(&chat_60(true));
    assert_eq!(second.status, 200, "{}", second.describe());
    for _ in 0..2 {
        assert_eq!(r.send(&chat_60(true)).status, 429);
    }
    assert_eq!(r.metric("auto_ai_router_tokens_total", &[("credential", "cred_a"), ("type", "prompt")]), Some(106.0));
    assert_eq!(r.metric("auto_ai_router_usage_missing_total", &[("credential", "cred_a")]), None);
}

#[test]
fn br_answers_count_their_tokens_and_a_client_without_accept_encoding_gets_plain_ones() {
    let (_a, r) = tpm_router(Coding::Br);
    let out = four_requests(&r, Coding::Br, false);
    let v: Value = serde_json::from_slice(&out[1].decoded()).unwrap();
    assert_eq!(v["usage"]["total_tokens"], 60, "{v}");
    // The mock honours Accept-Encoding: without it the answer is plain.
    let (_b, r) = tpm_router(Coding::Br);
    let plain = Request::chat(MASTER, "gpt-4o");
    let resp = r.send(&plain);
    assert_eq!((resp.status, resp.header("content-encoding")), (200, None), "{}", resp.describe());
}
