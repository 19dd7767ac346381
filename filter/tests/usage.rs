//! The usage reader on every response shape providers send, whatever the chunking; against
//! serde_json on generated bodies; on hostile bodies (bounded memory, no panic); and its throughput.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use filter::usage::{Format, Usage, UsageReader, MAX_USAGE_LEN};
use proptest::prelude::*;
use serde_json::{json, Value};
use std::time::Instant;

fn u(prompt: u64, completion: u64, total: u64) -> Option<Usage> {
    Some(Usage { prompt, completion, total })
}

/// Feeds `body` cut at `cuts` (clamped, any order); checks the buffer bound after every chunk.
fn chunked(format: Format, body: &[u8], cuts: &[usize]) -> Option<Usage> {
    let mut cuts: Vec<usize> = cuts.iter().map(|&c| c.min(body.len())).collect();
    cuts.sort_unstable();
    let mut r = UsageReader::new(format);
    let mut from = 0;
    for c in cuts.into_iter().chain([body.len()]) {
        r.feed(&body[from..c]);
        assert!(r.buffered_bytes() <= MAX_USAGE_LEN);
        from = c;
    }
    r.finish()
}

fn bytewise(format: Format, body: &[u8]) -> Option<Usage> {
    let mut r = UsageReader::new(format);
    for b in body {
        r.feed(std::slice::from_ref(b));
    }
    assert!(r.buffered_bytes() <= MAX_USAGE_LEN);
    r.finish()
}

/// Whole, split at every byte, and byte by byte: always `want`. Every prefix (a body cut off)
/// reads nothing or `want` (bodies with one usage).
fn check_every_split(format: Format, body: &[u8], want: Option<Usage>) {
    check_splits(format, body, want, true);
}

fn check_splits(format: Format, body: &[u8], want: Option<Usage>, prefixes: bool) {
    let text = String::from_utf8_lossy(body);
    assert_eq!(chunked(format, body, &[]), want, "whole: {text}");
    assert_eq!(bytewise(format, body), want, "byte by byte: {text}");
    for k in 0..=body.len() {
        assert_eq!(chunked(format, body, &[k]), want, "split at {k}: {text}");
        let prefix = chunked(format, &body[..k], &[]);
        assert!(!prefixes || prefix.is_none() || prefix == want, "prefix of {k} bytes read {prefix:?}: {text}");
    }
}

const CHAT: &str = r#"{"id":"chatcmpl-9x","object":"chat.completion","created":1718000000,"model":"gpt-4o-mini-2024-07-18","choices":[{"index":0,"message":{"role":"assistant","content":"Hello! \"usage\": {\"prompt_tokens\": 999} is text, \"{[\" é 中文 😀 \\ done.","refusal":null},"logprobs":null,"finish_reason":"stop"}],"usage":{"prompt_tokens":19,"completion_tokens":10,"total_tokens":29,"prompt_tokens_details":{"cached_tokens":0,"audio_tokens":0},"completion_tokens_details":{"reasoning_tokens":0,"audio_tokens":0,"accepted_prediction_tokens":0,"rejected_prediction_tokens":0}},"system_fingerprint":"fp_1"}"#;

/// Usage first, pretty-printed with CRLF, as some OpenAI-compatible servers answer.
const CHAT_USAGE_FIRST: &str = "{\r\n  \"usage\" : {\r\n    \"prompt_tokens\" : 7,\r\n    \"completion_tokens\" : 5,\r\n    \"total_tokens\" : 12\r\n  },\r\n  \"id\" : \"x\",\r\n  \"choices\" : [ { \"message\" : { \"role\" : \"assistant\", \"content\" : \"hi\" } } ]\r\n}\r\n";

const COMPLETIONS: &str = r#"{"id":"cmpl-1","object":"text_completion","created":1,"model":"gpt-3.5-turbo-instruct","choices":[{"text":"\n\nThis is a test.","index":0,"logprobs":{"tokens":["a"],"token_logprobs":[-0.5],"top_logprobs":[{"a":-0.5}],"text_offset":[0]},"finish_reason":"length"}],"usage":{"prompt_tokens":5,"completion_tokens":7,"total_tokens":12}}"#;

const EMBEDDINGS: &str = r#"{"object":"list","data":[{"object":"embedding","index":0,"embedding":[0.0023064255,-0.009327292,1e-7,-4.0E+2]}],"model":"text-embedding-3-small","usage":{"prompt_tokens":8,"total_tokens":8}}"#;

const RESPONSES: &str = r#"{"id":"resp_1","object":"response","created_at":1741476542,"status":"completed","error":null,"model":"gpt-4.1","output":[{"type":"message","id":"msg_1","status":"completed","role":"assistant","content":[{"type":"output_text","text":"In a peaceful grove...","annotations":[]}]}],"parallel_tool_calls":true,"reasoning":{"effort":null,"summary":null},"text":{"format":{"type":"text"}},"tools":[],"usage":{"input_tokens":36,"input_tokens_details":{"cached_tokens":0},"output_tokens":87,"output_tokens_details":{"reasoning_tokens":0},"total_tokens":123},"user":null,"metadata":{}}"#;

/// `usage` only inside `choices` and inside a string: not the response's.
const NESTED_ONLY: &str = r#"{"choices":[{"usage":{"prompt_tokens":1,"completion_tokens":1}}],"meta":{"usage":{"prompt_tokens":2}},"note":"\"usage\":{\"prompt_tokens\":3}"}"#;

fn sse_chat(line_end: &str, data: &str) -> String {
    let chunk = |delta: &str, finish: &str| {
        format!(
            r#"{data}{{"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"gpt-4o-mini","system_fingerprint":"fp","choices":[{{"index":0,"delta":{delta},"logprobs":null,"finish_reason":{finish}}}],"usage":null}}{line_end}{line_end}"#
        )
    };
    let mut s = String::new();
    s.push_str(&chunk(r#"{"role":"assistant","content":"","refusal":null}"#, "null"));
    s.push_str(&chunk(r#"{"content":"Hello \"usage\":{\"prompt_tokens\":1} 😀"}"#, "null"));
    s.push_str(&chunk("{}", r#""stop""#));
    s.push_str(&format!(
        r#"{data}{{"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"gpt-4o-mini","choices":[],"usage":{{"prompt_tokens":9,"completion_tokens":2,"total_tokens":11,"prompt_tokens_details":{{"cached_tokens":0}}}}}}{line_end}{line_end}"#
    ));
    s.push_str(&format!("{data}[DONE]{line_end}{line_end}"));
    s
}

fn sse_chat_without_usage() -> String {
    let mut s = String::new();
    for c in ["Hel", "lo"] {
        s.push_str(&format!("data: {{\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"{c}\"}},\"finish_reason\":null}}]}}\n\n"));
    }
    s.push_str(": keep-alive\n\nid: 3\nretry: 1000\ndata: [DONE]\n\n");
    s
}

/// The Responses API stream: `response.created` / `.in_progress` carry `"usage":null`, deltas,
/// then `response.completed` with the usage inside `response`.
fn sse_responses() -> String {
    let resp = |status: &str, usage: &str| {
        format!(
            r#"{{"id":"resp_1","object":"response","created_at":1,"status":"{status}","model":"gpt-4.1","output":[],"usage":{usage},"metadata":{{}}}}"#
        )
    };
    let mut s = String::new();
    s.push_str(&format!(
        "event: response.created\ndata: {{\"type\":\"response.created\",\"sequence_number\":0,\"response\":{}}}\n\n",
        resp("in_progress", "null")
    ));
    s.push_str(&format!(
        "event: response.in_progress\ndata: {{\"type\":\"response.in_progress\",\"sequence_number\":1,\"response\":{}}}\n\n",
        resp("in_progress", "null")
    ));
    s.push_str("event: response.output_text.delta\ndata: {\"type\":\"response.output_text.delta\",\"sequence_number\":2,\"item_id\":\"msg_1\",\"output_index\":0,\"content_index\":0,\"delta\":\"Hi \\\"usage\\\"\"}\n\n");
    s.push_str(&format!(
        "event: response.completed\ndata: {{\"type\":\"response.completed\",\"sequence_number\":3,\"response\":{}}}\n\n",
        resp("completed", r#"{"input_tokens":37,"input_tokens_details":{"cached_tokens":0},"output_tokens":11,"output_tokens_details":{"reasoning_tokens":0},"total_tokens":48}"#)
    ));
    s
}

fn json_shapes() -> Vec<(&'static str, String, Option<Usage>)> {
    vec![
        ("chat", CHAT.to_string(), u(19, 10, 29)),
        ("chat, usage first, pretty CRLF", CHAT_USAGE_FIRST.to_string(), u(7, 5, 12)),
        ("completions", COMPLETIONS.to_string(), u(5, 7, 12)),
        ("embeddings", EMBEDDINGS.to_string(), u(8, 0, 8)),
        ("responses", RESPONSES.to_string(), u(36, 87, 123)),
        ("usage nested only", NESTED_ONLY.to_string(), None),
        ("no total", r#"{"usage":{"prompt_tokens":4,"completion_tokens":6}}"#.to_string(), u(4, 6, 10)),
        ("usage null", r#"{"id":"x","usage":null}"#.to_string(), None),
        ("error body", r#"{"error":{"message":"Rate limit","type":"requests","code":"429"}}"#.to_string(), None),
        ("not an object", r#"[{"usage":{"prompt_tokens":1}}]"#.to_string(), None),
    ]
}

fn sse_shapes() -> Vec<(&'static str, String, Option<Usage>)> {
    vec![
        ("chat include_usage LF", sse_chat("\n", "data: "), u(9, 2, 11)),
        ("chat include_usage CRLF, data: without space", sse_chat("\r\n", "data:"), u(9, 2, 11)),
        ("responses", sse_responses(), u(37, 11, 48)),
        ("chat without usage", sse_chat_without_usage(), None),
        ("last of running totals wins", "data: {\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":1}}\n\ndata: {\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":5}}\n\ndata: {\"usage\":null}\n\n".to_string(), u(3, 5, 8)),
        ("last line without newline", "data: {\"usage\":{\"total_tokens\":3}}".to_string(), u(0, 0, 3)),
        ("usage in an object after response", "data: {\"response\":{\"id\":1},\"x\":{\"usage\":{\"total_tokens\":3}}}\n".to_string(), None),
        ("unclosed event is not counted", "data: {\"usage\":{\"total_tokens\":3}\n\n".to_string(), None),
    ]
}

#[test]
fn every_shape_whole_split_at_every_byte_and_byte_by_byte() {
    for (name, body, want) in json_shapes() {
        eprintln!("json: {name}");
        check_every_split(Format::Json, body.as_bytes(), want);
    }
    for (name, body, want) in sse_shapes() {
        eprintln!("sse: {name}");
        check_splits(Format::Sse, body.as_bytes(), want, !name.starts_with("last of running"));
    }
    // A JSON reader on a stream, and an SSE reader on a JSON body (one line with no `data:`), read nothing.
    assert_eq!(chunked(Format::Json, sse_chat("\n", "data: ").as_bytes(), &[]), None);
    assert_eq!(chunked(Format::Sse, CHAT.as_bytes(), &[]), None);
}

/// The stream's usage is known as soon as its event's line ends, before `[DONE]` and the end.
#[test]
fn sse_usage_is_known_when_its_line_ends() {
    let body = sse_chat("\n", "data: ");
    let usage_line = body.find("\"choices\":[]").unwrap();
    let line_end = usage_line + body[usage_line..].find('\n').unwrap();
    let mut r = UsageReader::new(Format::Sse);
    r.feed(&body.as_bytes()[..line_end]);
    assert_eq!(r.usage(), None, "the line has not ended");
    r.feed(&body.as_bytes()[line_end..=line_end]);
    assert_eq!(r.usage(), u(9, 2, 11));
    r.feed(&body.as_bytes()[line_end + 1..]);
    assert_eq!(r.usage(), u(9, 2, 11));
    // JSON: as soon as the usage value closes, also when it comes first.
    let mut r = UsageReader::new(Format::Json);
    let end = CHAT_USAGE_FIRST.find('}').unwrap();
    r.feed(&CHAT_USAGE_FIRST.as_bytes()[..=end]);
    assert_eq!(r.usage(), u(7, 5, 12));
}

#[test]
fn counts_that_are_not_non_negative_integers_are_absent() {
    for (count, want) in [
        ("12", Some(12)),
        ("0", Some(0)),
        ("12.0", None),
        ("-3", None),
        ("1e3", None),
        ("\"12\"", None),
        ("true", None),
        ("99999999999999999999", None),
        ("{}", None),
    ] {
        let body = format!(r#"{{"usage":{{"prompt_tokens":{count},"completion_tokens":1}}}}"#);
        let got = chunked(Format::Json, body.as_bytes(), &[]);
        assert_eq!(got, u(want.unwrap_or(0), 1, want.unwrap_or(0) + 1), "{count}");
    }
}

#[test]
fn duplicates_and_unreadable_usage() {
    // Last readable wins; null, non-objects, too long and count-free ones don't replace it.
    let pad = "x".repeat(MAX_USAGE_LEN);
    for later in ["null", "1", "\"s\"", "[1]", "{}", &format!(r#"{{"prompt_tokens":5,"pad":"{pad}"}}"#)] {
        let body = format!(r#"{{"usage":{{"prompt_tokens":1}},"x":1,"usage":{later}}}"#);
        assert_eq!(chunked(Format::Json, body.as_bytes(), &[]), u(1, 0, 1), "{later}");
    }
    let body = r#"{"usage":{"prompt_tokens":1},"usage":{"prompt_tokens":2}}"#;
    assert_eq!(chunked(Format::Json, body.as_bytes(), &[]), u(2, 0, 2));
    // Just under the bound is read.
    let fits = |n: usize| format!(r#"{{"usage":{{"prompt_tokens":5,"pad":"{}"}}}}"#, "x".repeat(n));
    let overhead = r#"{"prompt_tokens":5,"pad":""}"#.len();
    assert_eq!(chunked(Format::Json, fits(MAX_USAGE_LEN - overhead).as_bytes(), &[100, 2000]), u(5, 0, 5));
    assert_eq!(chunked(Format::Json, fits(MAX_USAGE_LEN - overhead + 1).as_bytes(), &[100, 2000]), None);
}

/// Feeds `parts` (each repeated `times`) in chunks of at most 64 KiB without building the body.
fn feed_repeated(r: &mut UsageReader, parts: &[(&[u8], usize)]) {
    for &(part, times) in parts {
        let per = (65536 / part.len().max(1)).max(1);
        let block = part.repeat(per);
        let mut left = times;
        while left > 0 {
            let n = left.min(per);
            r.feed(&block[..n * part.len()]);
            assert!(r.buffered_bytes() <= MAX_USAGE_LEN);
            left -= n;
        }
    }
}

#[test]
fn hostile_bodies_stay_bounded() {
    let usage = br#","usage":{"prompt_tokens":2,"completion_tokens":3}}"#;
    // 50 MB of nested arrays, then the usage (valid JSON: it counts).
    let mut r = UsageReader::new(Format::Json);
    feed_repeated(&mut r, &[(b"{\"a\":", 1), (b"[", 25 << 20), (b"]", 25 << 20), (usage, 1)]);
    assert_eq!(r.buffered_bytes(), MAX_USAGE_LEN);
    assert_eq!(r.finish(), u(2, 3, 5));
    // The same nesting never closed, and nesting inside the usage value itself.
    let mut r = UsageReader::new(Format::Json);
    feed_repeated(&mut r, &[(b"{\"a\":", 1), (b"[{\"usage\":", 1 << 20), (usage, 1)]);
    assert_eq!((r.buffered_bytes(), r.finish()), (0, None));
    let mut r = UsageReader::new(Format::Json);
    feed_repeated(&mut r, &[(b"{\"usage\":{\"prompt_tokens\":1,\"d\":", 1), (b"[", 1 << 20), (b"]", 1 << 20), (b"}}", 1)]);
    assert_eq!(r.finish(), None);
    // Within serde's recursion limit it is read; past it, not (and no stack overflow).
    // A field we don't read is skipped at any depth; one we read is built, within serde's recursion
    // limit (past it the usage is unreadable, and no stack overflows).
    let deep = |key: &str, d: usize| format!(r#"{{"usage":{{"completion_tokens":1,"{key}":{}{}}}}}"#, "[".repeat(d), "]".repeat(d));
    assert_eq!(chunked(Format::Json, deep("d", 2000).as_bytes(), &[]), u(0, 1, 1));
    assert_eq!(chunked(Format::Json, deep("prompt_tokens", 100).as_bytes(), &[]), u(0, 1, 1));
    assert_eq!(chunked(Format::Json, deep("prompt_tokens", 2000).as_bytes(), &[]), None);
    // A 1 MB usage value: skipped, an earlier one stays.
    let mut r = UsageReader::new(Format::Json);
    feed_repeated(&mut r, &[(br#"{"usage":{"total_tokens":4},"usage":{"prompt_tokens":1,"pad":""#, 1), (b"pad ", 1 << 18), (b"\"}}", 1)]);
    assert_eq!(r.finish(), u(0, 0, 4));
    // A 10 MB single SSE line, its usage at the end: read without storing the line.
    let mut r = UsageReader::new(Format::Sse);
    feed_repeated(
        &mut r,
        &[(br#"data: {"choices":[{"delta":{"content":""#, 1), (b"0123456789", 1 << 20), (b"\"}}]", 1), (usage, 1), (b"\n\n", 1)],
    );
    assert_eq!(r.usage(), u(2, 3, 5));
    // 10 MB of junk without a newline, then a proper event.
    let mut r = UsageReader::new(Format::Sse);
    feed_repeated(
        &mut r,
        &[
            (b"data: {\"usage\":{\"prompt_tokens\":1,\"x\":\"", 1),
            (b"\x00\xff{[\"\\", 2 << 20),
            (b"\ndata: {\"x\":0", 1),
            (usage, 1),
            (b"\n", 1),
        ],
    );
    assert_eq!(r.finish(), u(2, 3, 5));
    // 10 MB of field lines without any newline.
    let mut r = UsageReader::new(Format::Sse);
    feed_repeated(&mut r, &[(b"event: ", 1), (b"x", 10 << 20), (b"\ndata: {\"usage\":{\"total_tokens\":1}}\n", 1)]);
    assert_eq!((r.buffered_bytes(), r.finish()), (MAX_USAGE_LEN, u(0, 0, 1)));
}

#[test]
fn invalid_utf8_and_garbage() {
    // Invalid UTF-8 in strings we skip does not hide the usage (serde would take it too).
    let body =
        b"{\"id\":\"\xff\xfe\xc3\",\"choices\":[{\"text\":\"\xed\xa0\x80\"}],\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":2}}";
    check_every_split(Format::Json, body, u(1, 2, 3));
    // In a usage field we don't read, neither (serde skips it unchecked); in one we read, the usage is unreadable.
    check_every_split(Format::Json, b"{\"usage\":{\"prompt_tokens\":1,\"x\":\"\xff\"}}", u(1, 0, 1));
    check_every_split(Format::Json, b"{\"usage\":{\"prompt_tokens\":1,\"total_tokens\":\"\xff\"}}", None);
    // A key with invalid UTF-8 is not `usage`.
    check_every_split(Format::Json, b"{\"usage\xff\":{\"prompt_tokens\":1}}", None);
    let sse = b"data: \xff\xfe\n\ndata: {\"x\":\"\xff\",\"usage\":{\"total_tokens\":2}}\r\n\r\n\xff\xff\n";
    check_every_split(Format::Sse, sse, u(0, 0, 2));
    for junk in [&b""[..], b"{", b"}", b"\"", b"\\", b"{\"usage\":", b"{\"usage\":{", b"]]]]}}}}", b"{\"usage\\"] {
        check_every_split(Format::Json, junk, None);
        check_every_split(Format::Sse, junk, None);
    }
    // Non-validated: a count is read from a body that is broken after it (the tokens were spent).
    check_every_split(Format::Json, br#"{"usage":{"prompt_tokens":1}, oops"#, u(1, 0, 1));
}

// Generated bodies against serde_json: the reference reads `usage` from the parsed `Value`.

fn reference_json(body: &[u8]) -> Option<Usage> {
    let v: Value = serde_json::from_slice(body).ok()?;
    let usage = v.as_object()?.get("usage")?;
    usage.as_object()?;
    Usage::parse(&serde_json::to_vec(usage).unwrap())
}

fn reference_sse(body: &[u8]) -> Option<Usage> {
    let mut last = None;
    for line in body.split(|&b| b == b'\n') {
        let Some(data) = line.strip_prefix(b"data:") else { continue };
        let data = data.strip_prefix(b" ").unwrap_or(data);
        let Ok(v) = serde_json::from_slice::<Value>(data) else { continue };
        // In text order: serde_json's maps are sorted, `response` before `usage`.
        for usage in [v.get("response").and_then(|r| r.get("usage")), v.get("usage")].into_iter().flatten() {
            if usage.is_object() {
                if let Some(found) = Usage::parse(&serde_json::to_vec(usage).unwrap()) {
                    last = Some(found);
                }
            }
        }
    }
    last
}

fn count() -> impl Strategy<Value = Value> {
    prop_oneof![
        6 => (0u64..100_000).prop_map(Value::from),
        1 => Just(Value::from(u64::MAX)),
        1 => Just(json!(1.5)),
        1 => Just(json!(-3)),
        1 => Just(json!("12")),
        1 => Just(Value::Null),
    ]
}

fn usage_value() -> impl Strategy<Value = Value> {
    let field = prop::sample::select(vec![
        "prompt_tokens",
        "completion_tokens",
        "total_tokens",
        "input_tokens",
        "output_tokens",
        "prompt_tokens_details",
        "other",
    ]);
    prop_oneof![
        8 => prop::collection::btree_map(field, prop_oneof![4 => count(), 1 => Just(json!({"cached_tokens": 3, "usage": {"prompt_tokens": 7}}))], 0..6)
            .prop_map(|m| Value::Object(m.into_iter().map(|(k, v)| (k.to_string(), v)).collect())),
        1 => Just(Value::Null),
        1 => Just(json!([1, 2])),
    ]
}

fn leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        prop::sample::select(vec!["", "usage", "\"usage\":{\"prompt_tokens\":1}", "é中😀", "a\\b\"c\n", "{[}]"]).prop_map(Value::from),
        (-1000i64..1000).prop_map(Value::from),
        Just(json!(0.25)),
        Just(Value::Bool(true)),
        Just(Value::Null),
    ]
}

fn key() -> impl Strategy<Value = String> {
    prop::sample::select(vec!["id", "choices", "usage", "response", "model", "usag", "usages", "data", "x"]).prop_map(str::to_string)
}

/// Any value, with `usage` objects nested inside (which must not count).
fn value() -> impl Strategy<Value = Value> {
    leaf().prop_recursive(4, 32, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map(key(), prop_oneof![3 => inner, 1 => usage_value()], 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A top-level object written by hand: keys in any order (usage first or last), at most one
/// `usage`, sometimes spelled with an escape; compact or with whitespace.
fn document() -> impl Strategy<Value = String> {
    let entries = prop::collection::vec((key(), value()), 0..5);
    (entries, prop::option::weighted(0.8, usage_value()), any::<prop::sample::Index>(), any::<bool>(), any::<bool>()).prop_map(
        |(entries, usage, at, escaped, spaced)| {
            let mut entries: Vec<(String, Value)> = entries.into_iter().filter(|(k, _)| k != "usage").collect();
            let mut seen = std::collections::BTreeSet::new();
            entries.retain(|(k, _)| seen.insert(k.clone()));
            if let Some(usage) = usage {
                entries.insert(at.index(entries.len() + 1), ("usage".to_string(), usage));
            }
            let sep = if spaced { " \r\n\t" } else { "" };
            let parts: Vec<String> = entries
                .iter()
                .map(|(k, v)| {
                    let key = if k == "usage" && escaped { r#""us\u0061ge""#.to_string() } else { serde_json::to_string(k).unwrap() };
                    let value = if spaced { serde_json::to_string_pretty(v).unwrap() } else { serde_json::to_string(v).unwrap() };
                    format!("{sep}{key}{sep}:{sep}{value}{sep}")
                })
                .collect();
            format!("{sep}{{{}}}{sep}", parts.join(","))
        },
    )
}

#[derive(Debug, Clone)]
enum Event {
    Chat(Option<Value>),
    Responses(Option<Value>),
    Other(Value),
    Done,
    Comment,
    Field(&'static str),
}

fn event() -> impl Strategy<Value = Event> {
    prop_oneof![
        3 => prop::option::of(usage_value()).prop_map(Event::Chat),
        2 => prop::option::of(usage_value()).prop_map(Event::Responses),
        2 => value().prop_map(Event::Other),
        1 => Just(Event::Done),
        1 => Just(Event::Comment),
        1 => prop::sample::select(vec!["event: response.completed", "id: 7", "retry: 10", "data", "dat: {\"usage\":{\"total_tokens\":1}}", "", " data: {\"usage\":{\"total_tokens\":1}}"]).prop_map(Event::Field),
    ]
}

fn stream() -> impl Strategy<Value = String> {
    (prop::collection::vec((event(), any::<bool>()), 0..8), any::<bool>(), any::<bool>()).prop_map(|(events, crlf, last_newline)| {
        let nl = if crlf { "\r\n" } else { "\n" };
        let mut s = String::new();
        for (e, space) in events {
            let data = if space { "data: " } else { "data:" };
            let line = match e {
                Event::Chat(usage) => {
                    let mut m = serde_json::Map::new();
                    m.insert("choices".into(), json!([{"delta": {"content": "usage"}}]));
                    if let Some(usage) = usage {
                        m.insert("usage".into(), usage);
                    }
                    format!("{data}{}", Value::Object(m))
                }
                Event::Responses(usage) => {
                    let mut r = serde_json::Map::new();
                    r.insert("id".into(), json!("resp"));
                    if let Some(usage) = usage {
                        r.insert("usage".into(), usage);
                    }
                    format!("{data}{}", json!({"type": "response.completed", "response": Value::Object(r)}))
                }
                Event::Other(v) => format!("{data}{v}"),
                Event::Done => format!("{data}[DONE]"),
                Event::Comment => ": ping {\"usage\":{\"total_tokens\":1}}".to_string(),
                Event::Field(f) => f.to_string(),
            };
            s.push_str(&line);
            s.push_str(nl);
            s.push_str(nl);
        }
        if !last_newline {
            s.truncate(s.trim_end().len());
        }
        s
    })
}

fn cuts() -> impl Strategy<Value = Vec<usize>> {
    prop::collection::vec(0usize..2048, 0..8)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2048, ..ProptestConfig::default() })]

    #[test]
    fn json_agrees_with_serde(doc in document(), cuts in cuts()) {
        let body = doc.as_bytes();
        let want = reference_json(body);
        prop_assert!(serde_json::from_slice::<Value>(body).is_ok(), "generated invalid JSON: {}", doc);
        prop_assert_eq!(chunked(Format::Json, body, &[]), want, "{}", doc);
        prop_assert_eq!(chunked(Format::Json, body, &cuts), want, "{:?} {}", cuts, doc);
        prop_assert_eq!(bytewise(Format::Json, body), want, "{}", doc);
    }

    #[test]
    fn sse_agrees_with_serde(s in stream(), cuts in cuts()) {
        let body = s.as_bytes();
        let want = reference_sse(body);
        prop_assert_eq!(chunked(Format::Sse, body, &[]), want, "{}", s);
        prop_assert_eq!(chunked(Format::Sse, body, &cuts), want, "{:?} {}", cuts, s);
        prop_assert_eq!(bytewise(Format::Sse, body), want, "{}", s);
    }

    /// Any bytes (mostly JSON and SSE punctuation): no panic, bounded, chunking never matters.
    #[test]
    fn any_bytes(body in prop::collection::vec(prop_oneof![1 => any::<u8>(), 3 => prop::sample::select(b"{}[]\":,\\ \r\nusagerpontd0123456789-.".to_vec())], 0..512), cuts in cuts()) {
        for format in [Format::Json, Format::Sse] {
            let whole = chunked(format, &body, &[]);
            prop_assert_eq!(chunked(format, &body, &cuts), whole);
            prop_assert_eq!(bytewise(format, &body), whole);
        }
    }

    /// Generated documents cut and spliced with raw bytes: the same under any chunking.
    #[test]
    fn broken_documents(doc in document(), at in any::<prop::sample::Index>(), junk in prop::collection::vec(any::<u8>(), 0..4), cut in any::<prop::sample::Index>(), cuts in cuts()) {
        let mut body = doc.into_bytes();
        let p = at.index(body.len() + 1);
        body.splice(p..p, junk);
        body.truncate(cut.index(body.len() + 1).max(p));
        let whole = chunked(Format::Json, &body, &[]);
        prop_assert_eq!(chunked(Format::Json, &body, &cuts), whole);
        prop_assert_eq!(bytewise(Format::Json, &body), whole);
    }
}

/// The generators reach both answers (so the properties are not vacuous).
#[test]
fn generated_bodies_have_and_lack_usage() {
    use proptest::strategy::ValueTree;
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    let (mut json_some, mut sse_some) = (0, 0);
    for _ in 0..1000 {
        json_some += usize::from(reference_json(document().new_tree(&mut runner).unwrap().current().as_bytes()).is_some());
        sse_some += usize::from(reference_sse(stream().new_tree(&mut runner).unwrap().current().as_bytes()).is_some());
    }
    eprintln!("with usage: json {json_some}/1000, sse {sse_some}/1000");
    assert!((200..900).contains(&json_some), "{json_some}");
    assert!((200..900).contains(&sse_some), "{sse_some}");
}

fn rate(bytes: usize, f: &mut dyn FnMut()) -> f64 {
    let start = Instant::now();
    let mut rounds = 0usize;
    while rounds < 3 || start.elapsed().as_millis() < 200 {
        f();
        rounds += 1;
    }
    (bytes * rounds) as f64 / start.elapsed().as_secs_f64()
}

fn read_in_chunks(format: Format, body: &[u8], chunk: usize) -> Option<Usage> {
    let mut r = UsageReader::new(format);
    for c in body.chunks(chunk) {
        r.feed(std::hint::black_box(c));
    }
    r.finish()
}

/// Not a benchmark harness, numbers for the record (not asserted):
/// `cargo test -p filter --profile bench-tools --test usage -- --nocapture throughput`.
#[test]
fn throughput() {
    let build = if cfg!(debug_assertions) { "debug build, meaningless" } else { "optimised" };
    let text = "The quick brown fox jumps over the lazy dog; caf\\u00e9, \\\"quoted\\\", 中文 😀.\\n";
    // 1 MB chat completion, usage last (all of it is scanned).
    let content = text.repeat((1 << 20) / text.len());
    let json = CHAT.replacen("Hello!", &content, 1).into_bytes();
    // 1 MB stream of ~250-byte chunks with `"usage":null`, the usage event last.
    let one = sse_chat("\n", "data: ");
    let mut sse = String::new();
    while sse.len() < 1 << 20 {
        sse.push_str(one.split("\n\n").next().unwrap());
        sse.push_str("\n\n");
    }
    sse.push_str(&one);
    let sse = sse.into_bytes();
    let logprobs: String = (0..1 << 20).map(|i| if i % 12 == 0 { ",-0.0123" } else { "" }).collect();
    let numbers = format!(r#"{{"choices":[{{"logprobs":[0{logprobs}]}}],"usage":{{"prompt_tokens":1}}}}"#).into_bytes();
    for (name, format, body, want) in [
        ("JSON chat", Format::Json, &json, u(19, 10, 29)),
        ("JSON of numbers (logprobs)", Format::Json, &numbers, u(1, 0, 1)),
        ("SSE chat", Format::Sse, &sse, u(9, 2, 11)),
    ] {
        assert_eq!(read_in_chunks(format, body, 16 * 1024), want);
        let r = rate(body.len(), &mut || assert!(read_in_chunks(format, body, 16 * 1024).is_some()));
        eprintln!("usage ({build}), {:.1} MB {name} in 16 KB chunks: {:.0} MB/s", body.len() as f64 / 1e6, r / 1e6);
    }
    let serde = rate(json.len(), &mut || assert!(reference_json(std::hint::black_box(&json)).is_some()));
    eprintln!("usage ({build}), for scale: serde_json::Value on the whole 1 MB JSON: {:.0} MB/s", serde / 1e6);
    // Per response: a typical answer and a typical short stream, fed as one chunk.
    for (name, format, body) in [("chat JSON", Format::Json, CHAT.to_string()), ("chat SSE", Format::Sse, sse_chat("\n", "data: "))] {
        let r = rate(body.len(), &mut || assert!(read_in_chunks(format, body.as_bytes(), usize::MAX).is_some()));
        eprintln!("usage ({build}), {} B {name}: {:.0} ns per response", body.len(), body.len() as f64 / r * 1e9);
    }
}
