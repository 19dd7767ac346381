//! Compressed bodies through the request state machine on an in-memory host: request bodies with a
//! `Content-Encoding` are routed on their decoded model and go on unchanged; unknown codings,
//! corrupt payloads and bombs are refused; compressed answers have their usage read.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use filter::config;
use filter::host::Action;
use filter::request::Request;
use filter::runtime::Runtime;
use filter::store::MemStore;
use filter::testing::MemHost;

use std::io::Write;
use std::rc::Rc;
use std::time::{Duration, Instant};

const MASTER: &str = "sk-master-flow-0123";

fn runtime(extra_server: &str) -> Runtime {
    let text = format!(
        "server: {{master_key: {MASTER}, default_models_rpm: -1, max_provider_retries: 0{extra_server}}}\ncredentials:\n\
         \x20 - {{name: c1, api_key: sk-c1-secret, base_url: 'http://c1.test', tpm: 1000000}}\n"
    );
    Runtime::new(config::load(&text, &|_| None).unwrap())
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

fn encode(coding: &str, data: &[u8]) -> Vec<u8> {
    match coding {
        "gzip" => gzip(data),
        "deflate" => {
            let mut e = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
            e.write_all(data).unwrap();
            e.finish().unwrap()
        }
        "br" => {
            let mut out = Vec::new();
            brotli::CompressorWriter::new(&mut out, 4096, 5, 22).write_all(data).unwrap();
            out
        }
        "zstd" => zstd::encode_all(data, 3).unwrap(),
        other => panic!("{other}"),
    }
}

fn host(store: &Rc<MemStore>, encoding: Option<&str>, body: &[u8]) -> MemHost {
    let auth = format!("Bearer {MASTER}");
    let mut h: Vec<(&str, &str)> = vec![
        (":method", "POST"),
        (":path", "/v1/chat/completions"),
        (":authority", "r"),
        ("authorization", &auth),
        ("content-type", "application/json"),
    ];
    if let Some(e) = encoding {
        h.push(("content-encoding", e));
    }
    MemHost::new(store.clone()).with_request(&h, body)
}

/// Headers, then the body as Envoy buffers it: `steps` growing prefixes, the last at end of stream.
fn run(rt: &Runtime, h: &MemHost, steps: usize) -> (Request, Action) {
    let mut r = Request::default();
    assert_eq!(r.on_request_headers(Some(rt), h, false), Action::Pause, "{:?}", h.reply.borrow());
    let len = h.request_body.borrow().len();
    let mut action = Action::Pause;
    for i in 1..=steps {
        action = r.on_request_body(Some(rt), h, len * i / steps, i == steps);
        if action == Action::Continue || h.reply.borrow().is_some() {
            break;
        }
    }
    (r, action)
}

fn reply(h: &MemHost) -> (u16, serde_json::Value) {
    let r = h.reply.borrow().clone().expect("a local reply");
    (r.status, serde_json::from_str(&r.body).expect("JSON body"))
}

const BODY: &[u8] = br#"{"messages":[{"role":"user","content":"hi there, this body is compressed"}],"model":"gpt-4o"}"#;

#[test]
fn compressed_bodies_route_on_their_decoded_model_and_go_on_unchanged() {
    for coding in ["gzip", "deflate", "br", "zstd"] {
        for steps in [1, 3] {
            let rt = runtime("");
            let store = Rc::new(MemStore::default());
            let enc = encode(coding, BODY);
            let h = host(&store, Some(coding), &enc);
            let (_, action) = run(&rt, &h, steps);
            assert_eq!(action, Action::Continue, "{coding}: {:?}", h.reply.borrow());
            assert_eq!(h.routed_to().as_deref(), Some("c1"));
            assert_eq!(*h.request_body.borrow(), enc, "{coding}: the provider gets the client's bytes");
            assert_eq!(h.header("content-encoding").as_deref(), Some(coding), "and its Content-Encoding");
            assert_eq!(h.metric("auto_ai_router_model_requests_total.credential=.=c1;.;.model=.=gpt-4o;.;"), 0, "counted on the answer");
        }
    }
}

#[test]
fn unknown_or_stacked_codings_are_415_before_the_body() {
    for value in ["compress", "gzip, br", "snappy"] {
        let rt = runtime("");
        let store = Rc::new(MemStore::default());
        let h = host(&store, Some(value), &gzip(BODY));
        let mut r = Request::default();
        assert_eq!(r.on_request_headers(Some(&rt), &h, false), Action::Pause);
        let (status, v) = reply(&h);
        assert_eq!(
            (status, v["error"]["type"].as_str(), v["error"]["code"].as_str()),
            (415, Some("invalid_request_error"), Some("unsupported_content_encoding")),
            "{value}"
        );
        assert!(v["error"]["message"].as_str().unwrap().contains("gzip, deflate, br or zstd"));
        assert_eq!(h.metric("auto_ai_router_rejections_total.reason=.=unsupported_encoding;.;"), 1);
        assert_eq!(h.routed_to(), None, "never routed");
    }
    // identity is no coding at all.
    let rt = runtime("");
    let h = host(&Rc::new(MemStore::default()), Some("identity"), BODY);
    assert_eq!(run(&rt, &h, 1).1, Action::Continue);
}

#[test]
fn corrupt_and_cut_payloads_are_400_invalid_body() {
    let rt = runtime("");
    let store = Rc::new(MemStore::default());
    let mut bad = gzip(BODY);
    bad[12] ^= 0xff;
    let enc = gzip(BODY);
    for (what, body) in [("corrupt", bad), ("cut", enc[..enc.len() - 5].to_vec()), ("not gzip", BODY.to_vec())] {
        let h = host(&store, Some("gzip"), &body);
        run(&rt, &h, 1);
        let (status, v) = reply(&h);
        assert_eq!((status, v["error"]["code"].as_str()), (400, Some("invalid_body")), "{what}: {v}");
        assert!(v["error"]["message"].as_str().unwrap().contains("gzip"), "{v}");
        assert_eq!(h.routed_to(), None);
    }
    // Decodes fine but is not JSON: the JSON error, as for a plain body.
    let h = host(&store, Some("br"), &encode("br", b"model=gpt-4o"));
    run(&rt, &h, 1);
    assert_eq!(reply(&h).1["error"]["code"], "invalid_json");
}

#[test]
fn the_decoded_size_counts_against_the_body_limit_and_a_bomb_stops_at_once() {
    let rt = runtime(", max_body_size_mb: 1");
    let store = Rc::new(MemStore::default());
    // Just under 1 MB decoded passes; just over is 413.
    let pad = |n: usize| format!("{{\"model\":\"gpt-4o\",\"pad\":\"{}\"}}", "x".repeat(n - 27));
    let under = pad(1 << 20);
    assert_eq!(under.len(), 1 << 20);
    let h = host(&store, Some("gzip"), &gzip(under.as_bytes()));
    assert_eq!(run(&rt, &h, 2).1, Action::Continue, "{:?}", h.reply.borrow());
    let h = host(&store, Some("gzip"), &gzip(pad((1 << 20) + 1).as_bytes()));
    run(&rt, &h, 2);
    assert_eq!(reply(&h).0, 413);

    // 1 GiB of zeros after a JSON start, gzip'd into about 1 MB.
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    e.write_all(br#"{"model":"gpt-4o","pad":""#).unwrap();
    let zeros = vec![b' '; 1 << 20];
    for _ in 0..1024 {
        e.write_all(&zeros).unwrap();
    }
    let bomb = e.finish().unwrap();
    assert!(bomb.len() < (1 << 20) + (1 << 19), "{}", bomb.len());
    let rt = runtime(", max_body_size_mb: 1"); // (metric ids are cached per runtime; a fresh host needs a fresh one)
    let h = host(&store, Some("gzip"), &bomb);
    let t = Instant::now();
    run(&rt, &h, 4);
    let (status, v) = reply(&h);
    assert_eq!((status, v["error"]["code"].as_str()), (413, Some("request_too_large")), "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("decoded"), "{v}");
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    assert!(h.body_bytes_read.get() <= 64 * 1024, "refused on the first chunk: {} bytes read", h.body_bytes_read.get());
    assert_eq!(h.metric("auto_ai_router_rejections_total.reason=.=too_large;.;"), 1);
}

#[test]
fn include_usage_is_found_in_the_decoded_body() {
    // No TPM anywhere: a stream is scanned only because the client asked for its usage event.
    let text = format!(
        "server: {{master_key: {MASTER}, default_models_rpm: -1, max_provider_retries: 0}}\ncredentials:\n  - {{name: c1, api_key: sk-c1-secret, base_url: 'http://c1.test'}}\n"
    );
    let rt = Runtime::new(config::load(&text, &|_| None).unwrap());
    let store = Rc::new(MemStore::default());
    let body = br#"{"model":"m","stream":true,"stream_options":{"include_usage":true}}"#;
    let h = host(&store, Some("zstd"), &encode("zstd", body));
    let (mut r, action) = run(&rt, &h, 1);
    assert_eq!(action, Action::Continue);
    respond(
        &rt,
        &h,
        &mut r,
        &[("content-type", "text/event-stream")],
        &[b"data: {\"choices\":[],\"usage\":{\"prompt_tokens\":2,\"completion_tokens\":3}}\n\n"],
    );
    assert_eq!(h.metric("auto_ai_router_tokens_total.credential=.=c1;.;.model=.=m;.;.type=.=completion;.;"), 3);
}

/// The answer's headers, then its body in `chunks`, then the end of the stream.
fn respond(rt: &Runtime, h: &MemHost, r: &mut Request, headers: &[(&str, &str)], chunks: &[&[u8]]) {
    let mut all = vec![(":status".to_string(), b"200".to_vec())];
    all.extend(headers.iter().map(|(k, v)| (k.to_string(), v.as_bytes().to_vec())));
    *h.response_headers.borrow_mut() = all;
    r.on_response_headers(Some(rt), h);
    for (i, c) in chunks.iter().enumerate() {
        *h.response_chunk.borrow_mut() = c.to_vec();
        r.on_response_body(Some(rt), h, c.len(), i + 1 == chunks.len());
    }
    r.on_log(Some(rt), h);
}

#[test]
fn compressed_answers_have_their_usage_read_and_unreadable_ones_count_as_missing() {
    let rt = runtime("");
    let store = Rc::new(MemStore::default());
    let json =
        br#"{"id":"x","choices":[{"message":{"content":"hi"}}],"usage":{"prompt_tokens":20,"completion_tokens":40,"total_tokens":60}}"#;
    let sse = b"data: {\"choices\":[{\"delta\":{}}]}\n\ndata: {\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":7,\"total_tokens\":12}}\n\ndata: [DONE]\n\n";
    let h = host(&store, None, BODY);
    let request_headers = h.request_headers.borrow().clone();
    let tokens = |kind: &str| h.metric(&format!("auto_ai_router_tokens_total.credential=.=c1;.;.model=.=gpt-4o;.;.type=.={kind};.;"));
    let missing = || h.metric("auto_ai_router_usage_missing_total.credential=.=c1;.;");
    let answer = |ct: &str, encoding: &str, body: &[u8], split: usize| {
        // Routing rewrote the headers: each request starts from the client's.
        *h.request_headers.borrow_mut() = request_headers.clone();
        *h.reply.borrow_mut() = None;
        let (mut r, action) = run(&rt, &h, 1);
        assert_eq!((action, h.reply.borrow().clone()), (Action::Continue, None));
        let split = split.min(body.len());
        respond(&rt, &h, &mut r, &[("content-type", ct), ("content-encoding", encoding)], &[&body[..split], &body[split..]]);
    };
    let mut expect = (0, 0);
    for coding in ["gzip", "deflate", "br", "zstd"] {
        let enc = encode(coding, json);
        for split in [0, 7, enc.len() / 2, enc.len()] {
            answer("application/json", coding, &enc, split);
            expect = (expect.0 + 20, expect.1 + 40);
            assert_eq!((tokens("prompt"), tokens("completion")), expect, "{coding} JSON split at {split}");
        }
        answer("text/event-stream", coding, &encode(coding, sse), 9);
        expect = (expect.0 + 5, expect.1 + 7);
        assert_eq!((tokens("prompt"), tokens("completion")), expect, "{coding} SSE");
    }
    assert_eq!(missing(), 0);
    // A coding the router can't read: no usage, and no chunk copied for nothing.
    let copies = h.calls.borrow().get("response_body").copied().unwrap_or(0);
    answer("application/json", "compress", json, 10);
    assert_eq!(missing(), 1);
    assert_eq!(h.calls.borrow().get("response_body").copied().unwrap_or(0), copies, "not scanned");
    // A corrupt one: missing too, and the client's bytes are untouched (the filter only reads).
    let mut bad = encode("gzip", json);
    bad[11] ^= 0xff;
    answer("application/json", "gzip", &bad, 10);
    assert_eq!(missing(), 2);
    // Plain bytes labelled gzip.
    answer("application/json", "gzip", json, 10);
    assert_eq!(missing(), 3);
    assert_eq!((tokens("prompt"), tokens("completion")), expect);
}
