//! SSE passes through chunk by chunk.

use e2e::harness::{control, cred, mock, Router, MASTER};
use e2e::http::Request;
use serde_json::json;
use std::time::Duration;

#[test]
fn sse_streams_chunk_by_chunk() {
    let a = mock("a", "sk-sse-a-00000", &["gpt-4o"]);
    // 5 content chunks + the final event + [DONE], 200 ms apart: the mock needs 1.2 s in all.
    control(&a, json!({"chunks": 5, "chunk_delay_ms": 200}));
    let cfg = format!("server:\n  master_key: \"{MASTER}\"\ncredentials:\n{}", cred("cred_a", "sk-sse-a-00000", &a.url(), -1));
    let r = Router::start(&cfg);
    let req = Request::post("/v1/chat/completions")
        .bearer(MASTER)
        .json(&json!({"model": "gpt-4o", "stream": true, "messages": [{"role": "user", "content": "Hello!"}]}));
    let (resp, reads) = req.send_timed(r.addr).expect("stream");
    assert_eq!(resp.status, 200, "{}", resp.describe());
    assert!(resp.header("content-type").unwrap_or("").starts_with("text/event-stream"), "{:?}", resp.headers);
    let text = resp.text();
    let events: Vec<&str> = text.split("\n\n").filter(|e| !e.trim().is_empty()).collect();
    assert_eq!(events.len(), 7, "5 chunks, the final event, [DONE]: {text}");
    assert!(events.iter().all(|e| e.starts_with("data: ")), "{text}");
    assert_eq!(*events.last().unwrap(), "data: [DONE]");
    let first = reads.iter().find(|(_, b)| String::from_utf8_lossy(b).contains("chat.completion.chunk")).expect("a chunk").0;
    let done = reads.iter().find(|(_, b)| String::from_utf8_lossy(b).contains("[DONE]")).expect("[DONE]").0;
    // The mock sends its last event ~1.2 s after its first: a first chunk that arrived at least
    // 0.8 s before [DONE] arrived before the mock had even sent its fifth chunk.
    assert!(done - first >= Duration::from_millis(800), "first chunk at {first:?}, [DONE] at {done:?}: buffered");
    let arrivals = reads.iter().filter(|(_, b)| String::from_utf8_lossy(b).contains("data: ")).count();
    assert!(arrivals >= 5, "events arrived in {arrivals} reads: not chunk by chunk");
    let stats = a.mock.stats();
    assert_eq!(stats.log.iter().filter(|e| e.stream).count(), 1);
}
