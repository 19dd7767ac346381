//! The request state machine on an in-memory host (no VM): scope, trailers, host failures, the
//! client-facing statuses. host-sim runs the same flows on the real `.wasm`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use filter::config;
use filter::host::Action;
use filter::request::Request;
use filter::runtime::Runtime;
use filter::store::MemStore;
use filter::testing::MemHost;
use std::rc::Rc;

const MASTER: &str = "sk-master-flow-0123";

fn runtime(extra_server: &str, rpm: i64) -> Runtime {
    let text = format!(
        "server: {{master_key: {MASTER}, default_models_rpm: -1{extra_server}}}\ncredentials:\n\
         \x20 - {{name: c1, api_key: sk-c1-secret, base_url: 'http://c1.test', rpm: {rpm}}}\n\
         \x20 - {{name: c2, api_key: sk-c2-secret, base_url: 'http://c2.test/base', rpm: {rpm}}}\n"
    );
    Runtime::new(config::load(&text, &|_| None).unwrap())
}

fn chat_headers(authority: &str) -> Vec<(&'static str, String)> {
    vec![
        (":method", "POST".into()),
        (":path", "/v1/chat/completions".into()),
        (":authority", authority.into()),
        ("authorization", format!("Bearer {MASTER}")),
        ("content-type", "application/json".into()),
    ]
}

fn host(store: &Rc<MemStore>, headers: &[(&'static str, String)], body: &[u8]) -> MemHost {
    let h: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
    MemHost::new(store.clone()).with_request(&h, body)
}

/// Headers, then the whole body at end of stream.
fn run(rt: &Runtime, h: &MemHost) -> (Action, Action) {
    let mut r = Request::default();
    let a = r.on_request_headers(Some(rt), h, false);
    let size = h.request_body.borrow().len();
    let b = r.on_request_body(Some(rt), h, size, true);
    (a, b)
}

fn reply_json(h: &MemHost) -> (u16, serde_json::Value) {
    let r = h.reply.borrow().clone().expect("a local reply");
    (r.status, serde_json::from_str(&r.body).expect("JSON body"))
}

#[test]
fn a_foreign_host_passes_byte_for_byte() {
    let rt = runtime(", replace_v1_models: false, hosts: [ai.example.com]", -1);
    let store = Rc::new(MemStore::default());
    let mut headers = chat_headers("other-app.example.com");
    headers.push(("x-api-key", "their-own-key".into()));
    headers.push(("x-auto-ai-router-cluster", "whatever".into()));
    headers[3].1 = "Bearer not-our-key".into();
    let h = host(&store, &headers, br#"{"model":"m"}"#);
    let before = h.request_headers.borrow().clone();
    assert_eq!(run(&rt, &h), (Action::Continue, Action::Continue));
    assert_eq!(*h.request_headers.borrow(), before, "not one header touched");
    assert!(h.reply.borrow().is_none());
    assert_eq!(h.calls.borrow().get("set_request_header"), None);
    assert!(store.keys().is_empty(), "no state touched either");
    // /health on the foreign host is not ours either.
    let h = host(&store, &[(":method", "GET".into()), (":path", "/health".into()), (":authority", "other:443".into())], b"");
    assert_eq!(Request::default().on_request_headers(Some(&rt), &h, true), Action::Continue);
    assert!(h.reply.borrow().is_none());
}

#[test]
fn our_host_is_routed_and_loses_client_routing_headers() {
    let rt = runtime(", replace_v1_models: false, max_provider_retries: 0, hosts: ['AI.example.com']", -1);
    let store = Rc::new(MemStore::default());
    let mut headers = chat_headers("ai.example.com:8443");
    headers.push(("x-api-key", "client-key".into()));
    headers.push(("x-auto-ai-router-cluster", "c2".into()));
    let h = host(&store, &headers, br#"{"model":"m"}"#);
    assert_eq!(run(&rt, &h), (Action::Pause, Action::Continue));
    assert_eq!(h.routed_to().as_deref(), Some("c1"), "the client's c2 had no effect");
    assert_eq!(h.header("x-api-key"), None);
    assert_eq!(h.header("authorization").as_deref(), Some("Bearer sk-c1-secret"));
    assert_eq!(h.header(":authority").as_deref(), Some("ai.example.com:8443"), "the client's: the route must stay the router's");
    assert_eq!(h.route_cache_cleared.get(), 1);
}

#[test]
fn paths_outside_the_router_keep_their_headers() {
    let rt = runtime("", -1);
    let store = Rc::new(MemStore::default());
    let h = host(&store, &[(":method", "GET".into()), (":path", "/metrics".into()), ("x-api-key", "k".into())], b"");
    assert_eq!(Request::default().on_request_headers(Some(&rt), &h, true), Action::Continue);
    assert_eq!(h.header("x-api-key").as_deref(), Some("k"));
}

#[test]
fn trailers_end_the_body() {
    let rt = runtime("", -1);
    let store = Rc::new(MemStore::default());
    let body = br#"{"model":"m","messages":[]}"#;
    let h = host(&store, &chat_headers("r"), body);
    let mut r = Request::default();
    assert_eq!(r.on_request_headers(Some(&rt), &h, false), Action::Pause);
    assert_eq!(r.on_request_body(Some(&rt), &h, body.len(), false), Action::Pause, "more may come");
    assert_eq!(r.on_request_trailers(Some(&rt), &h), Action::Continue);
    assert_eq!(h.routed_to().as_deref(), Some("c1"));
}

#[test]
fn a_failing_host_call_is_a_503_for_that_request_only() {
    let rt = runtime("", -1);
    let store = Rc::new(MemStore::default());
    let limited = runtime("", 100);
    for call in ["request_headers", "set_request_header", "request_body", "clear_route_cache", "get_shared_data", "set_shared_data"] {
        let h = host(&store, &chat_headers("r"), br#"{"model":"m"}"#);
        h.failing.borrow_mut().push(call);
        let (a, b) = run(if call == "set_shared_data" { &limited } else { &rt }, &h);
        let b = if call == "request_headers" { a } else { b };
        let (status, v) = reply_json(&h);
        assert_eq!((status, b), (503, Action::Pause), "{call}");
        assert_eq!(v["error"]["type"], "service_unavailable_error", "{call}");
        assert!(h.routed_to().is_none() || call == "clear_route_cache", "{call}: never routed half-way");
    }
    // The next request on the same worker is served normally.
    let h = host(&store, &chat_headers("r"), br#"{"model":"m"}"#);
    assert_eq!(run(&rt, &h).1, Action::Continue);
}

#[test]
fn when_even_the_reply_fails_the_request_stays_paused() {
    let rt = runtime("", -1);
    let store = Rc::new(MemStore::default());
    let h = host(&store, &chat_headers("r"), br#"{"model":"m"}"#);
    h.failing.borrow_mut().extend(["request_body", "send_reply"]);
    assert_eq!(run(&rt, &h).1, Action::Pause, "fail closed: never continue unrouted");
    assert!(h.routed_to().is_none());
    assert!(h.header("authorization").is_some_and(|a| a.contains(MASTER)), "untouched, and it goes nowhere");
}

#[test]
fn a_model_nobody_serves_is_404_model_not_found() {
    let rt = runtime(", replace_v1_models: true", -1);
    let store = Rc::new(MemStore::default());
    // c1 lists only gpt-4o; c2 has no list yet, so it serves everything: "ghost" is routed to c2.
    let keys = &rt.keys;
    let entry = |id: &str| filter::models_index::ModelEntry { id: id.into(), created: 0, owned_by: String::new() };
    filter::models_index::store_list(&*store, &keys[0].models, &[entry("gpt-4o")]).unwrap();
    let h = host(&store, &chat_headers("r"), br#"{"model":"ghost"}"#);
    rt.refresh_index(&h); // the 1 s tick
    assert_eq!(run(&rt, &h).1, Action::Continue);
    assert_eq!(h.routed_to().as_deref(), Some("c2"));
    filter::models_index::store_list(&*store, &keys[1].models, &[entry("claude")]).unwrap();
    let h = host(&store, &chat_headers("r"), br#"{"model":"ghost"}"#);
    let before = rt.index.borrow().serves(1, "ghost");
    rt.refresh_index(&h);
    assert!(before && !rt.index.borrow().serves(1, "ghost"), "routing sees a new list on the tick, not per request");
    run(&rt, &h);
    let (status, v) = reply_json(&h);
    assert_eq!(status, 404, "a client error: OpenAI SDKs don't retry it");
    assert_eq!(v["error"]["type"], "invalid_request_error");
    assert_eq!(v["error"]["code"], "model_not_found");
    assert!(v["error"]["message"].as_str().unwrap().contains("ghost"));
}

#[test]
fn contention_is_503_with_its_own_reason_not_a_rate_limit() {
    let rate_limited = runtime("", 5);
    let store = Rc::new(MemStore::default());
    let h = host(&store, &chat_headers("r"), br#"{"model":"m"}"#);
    store.fail_next_sets.set(10_000);
    run(&rate_limited, &h);
    store.fail_next_sets.set(0);
    let (status, v) = reply_json(&h);
    assert_eq!(status, 503);
    assert_eq!(v["error"]["code"], "router_busy");
    assert_eq!(h.metric("auto_ai_router_rejections_total.reason=.=contention;.;"), 1);
    assert_eq!(h.metric("auto_ai_router_rejections_total.reason=.=rate_limited;.;"), 0);
}

#[test]
fn a_large_body_is_scanned_chunk_by_chunk_never_copied_whole() {
    let rt = runtime("", -1);
    let store = Rc::new(MemStore::default());
    let filler = "x".repeat(3 << 20);
    let body = format!(r#"{{"messages":[{{"role":"user","content":"{filler}"}}],"model":"m-late"}}"#);
    let h = host(&store, &chat_headers("r"), body.as_bytes());
    let mut r = Request::default();
    assert_eq!(r.on_request_headers(Some(&rt), &h, false), Action::Pause);
    // Envoy reports the buffered total as data arrives.
    for part in [1 << 20, 2 << 20] {
        assert_eq!(r.on_request_body(Some(&rt), &h, part, false), Action::Pause);
    }
    assert_eq!(r.on_request_body(Some(&rt), &h, body.len(), true), Action::Continue);
    assert_eq!(h.routed_to().as_deref(), Some("c1"));
    assert_eq!(h.body_bytes_read.get(), body.len(), "every byte read once");
    assert!(h.largest_body_read.get() <= 64 * 1024, "copies stay small: {}", h.largest_body_read.get());
}

#[test]
fn a_body_that_is_not_json_is_refused_before_it_ends() {
    let rt = runtime("", -1);
    let store = Rc::new(MemStore::default());
    let h = host(&store, &chat_headers("r"), b"{\"model\": nope, and a lot more to come");
    let mut r = Request::default();
    r.on_request_headers(Some(&rt), &h, false);
    assert_eq!(r.on_request_body(Some(&rt), &h, 20, false), Action::Pause);
    let (status, v) = reply_json(&h);
    assert_eq!((status, v["error"]["code"].as_str()), (400, Some("invalid_json")));
}

#[test]
fn the_overhead_histogram_records_routed_and_refused_requests() {
    let rt = runtime("", -1);
    let store = Rc::new(MemStore::default());
    let h = host(&store, &chat_headers("r"), br#"{"model":"m"}"#);
    h.now_ms.set(5_000);
    run(&rt, &h);
    assert!(h.metrics.borrow().contains_key("auto_ai_router_overhead_microseconds"), "{:?}", h.metrics.borrow().keys().collect::<Vec<_>>());
    let mut headers = chat_headers("r");
    headers[3].1 = "Bearer wrong".into();
    let h = host(&store, &headers, b"");
    h.now_ms.set(6_000);
    let rt = runtime("", -1); // (metric ids are cached per runtime; a fresh host needs a fresh one)
    Request::default().on_request_headers(Some(&rt), &h, true);
    assert!(h.metrics.borrow().contains_key("auto_ai_router_overhead_microseconds"), "a local reply is timed too");
}

/// The response phase of a routed request: headers, then the body in `chunks`.
fn respond(rt: &Runtime, h: &MemHost, r: &mut Request, content_type: &str, chunks: &[&[u8]]) {
    *h.response_headers.borrow_mut() = vec![(":status".into(), b"200".to_vec()), ("content-type".into(), content_type.as_bytes().to_vec())];
    r.on_response_headers(Some(rt), h);
    for (i, c) in chunks.iter().enumerate() {
        *h.response_chunk.borrow_mut() = c.to_vec();
        r.on_response_body(Some(rt), h, c.len(), i + 1 == chunks.len());
    }
    r.on_log(Some(rt), h);
}

#[test]
fn reported_tokens_are_counted_and_charged_to_tpm_and_missing_usage_is_counted() {
    let text = format!(
        "server: {{master_key: {MASTER}, default_models_rpm: -1, max_provider_retries: 0}}\ncredentials:\n  - {{name: c1, api_key: sk-c1-secret, base_url: 'http://c1.test', tpm: 100}}\n"
    );
    let rt = Runtime::new(config::load(&text, &|_| None).unwrap());
    let store = Rc::new(MemStore::default());
    let json =
        br#"{"id":"x","choices":[{"message":{"content":"hi"}}],"usage":{"prompt_tokens":20,"completion_tokens":40,"total_tokens":60}}"#;
    let sse: [&[u8]; 3] = [
        b"data: {\"choices\":[{\"delta\":{}}]}\n\n",
        b"data: {\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"comp",
        b"letion_tokens\":7,\"total_tokens\":12}}\n\ndata: [DONE]\n\n",
    ];
    // One host for all requests: metric ids are cached per runtime.
    let h = host(&store, &chat_headers("r"), br#"{"model":"m"}"#);
    let served = |body_chunks: &[&[u8]], ct: &str| {
        *h.request_headers.borrow_mut() = chat_headers("r").iter().map(|(k, v)| (k.to_string(), v.as_bytes().to_vec())).collect();
        *h.reply.borrow_mut() = None;
        let mut r = Request::default();
        r.on_request_headers(Some(&rt), &h, false);
        let routed = r.on_request_body(Some(&rt), &h, 13, true);
        if routed == Action::Continue {
            respond(&rt, &h, &mut r, ct, body_chunks);
        }
        routed
    };
    let tokens = |kind: &str| h.metric(&format!("auto_ai_router_tokens_total.credential=.=c1;.;.model=.=m;.;.type=.={kind};.;"));
    assert_eq!(served(&[&json[..30], &json[30..]], "application/json"), Action::Continue);
    assert_eq!((tokens("prompt"), tokens("completion")), (20, 40));
    assert_eq!(served(&sse, "text/event-stream; charset=utf-8"), Action::Continue, "60 < 100 at the check");
    assert_eq!((tokens("prompt"), tokens("completion")), (25, 47), "the usage event of a stream, split across chunks");
    assert_eq!(served(&[b"{\"no\":\"usage\"}"], "application/json"), Action::Continue, "72 < 100");
    assert_eq!(h.metric("auto_ai_router_usage_missing_total.credential=.=c1;.;"), 1);
    assert_eq!(served(&[json], "application/json"), Action::Continue, "72 < 100");
    assert_eq!(served(&[json], "application/json"), Action::Pause, "132 >= 100: refused until tokens leave the window");
    assert_eq!(reply_json(&h).0, 429);
}

#[test]
fn a_stream_nobody_asked_usage_of_is_not_scanned_unless_a_tpm_limit_needs_it() {
    let rt = runtime(", max_provider_retries: 0", -1);
    let store = Rc::new(MemStore::default());
    let sse: [&[u8]; 2] = [
        b"data: {\"choices\":[{\"delta\":{}}]}\n\n",
        b"data: {\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":7,\"total_tokens\":12}}\n\ndata: [DONE]\n\n",
    ];
    let h = host(&store, &chat_headers("r"), b"");
    let ask = |body: &[u8], split: usize| {
        *h.request_headers.borrow_mut() = chat_headers("r").iter().map(|(k, v)| (k.to_string(), v.as_bytes().to_vec())).collect();
        *h.request_body.borrow_mut() = body.to_vec();
        let mut r = Request::default();
        r.on_request_headers(Some(&rt), &h, false);
        assert_eq!(r.on_request_body(Some(&rt), &h, split, false), Action::Pause);
        assert_eq!(r.on_request_body(Some(&rt), &h, body.len(), true), Action::Continue);
        respond(&rt, &h, &mut r, "text/event-stream", &sse);
    };
    // (Round robin: the second request goes to c2.)
    let completion = || h.metric("auto_ai_router_tokens_total.credential=.=c2;.;.model=.=m;.;.type=.=completion;.;");
    ask(br#"{"model":"m","stream":true}"#, 5);
    assert_eq!(h.calls.borrow().get("response_body"), None, "no chunk copied into the VM");
    assert_eq!(h.metric("auto_ai_router_usage_missing_total.credential=.=c1;.;"), 1);
    let asked = br#"{"model":"m","stream":true,"stream_options":{"include_usage":true}}"#;
    let split = asked.windows(7).position(|w| w == b"_usage\"").unwrap();
    ask(asked, split);
    assert_eq!(completion(), 7, "include_usage found across the body chunk boundary: scanned");
}

#[test]
fn with_retries_on_the_router_leaves_the_key_to_the_upstream_filter_and_drops_the_master_key() {
    let rt = runtime(", replace_v1_models: false", -1);
    let store = Rc::new(MemStore::default());
    let h = host(&store, &chat_headers("r"), br#"{"model":"m"}"#);
    assert_eq!(run(&rt, &h), (Action::Pause, Action::Continue));
    assert_eq!(h.header("authorization"), None, "the master key never leaves Envoy, whatever the bootstrap");
    assert_eq!(h.header(":authority").as_deref(), Some("r"), "each attempt sets its own");
    let plan = filter::attempt::Plan::decode(&h.properties.borrow()["auto_ai_router_plan"]).unwrap();
    assert_eq!((plan.tried.as_slice(), plan.path.as_str()), (&[0u16][..], "/v1/chat/completions"));
    assert_eq!(h.properties.borrow()["auto_ai_router_next"], b"c1");
}

#[test]
fn a_circuit_breaker_overflow_is_load_on_our_side_not_a_strike() {
    let rt = runtime(", replace_v1_models: false, max_provider_retries: 0", -1);
    let store = Rc::new(MemStore::default());
    let answer = |details: &str| {
        let h = host(&store, &chat_headers("r"), br#"{"model":"m"}"#);
        let mut r = Request::default();
        r.on_request_headers(Some(&rt), &h, false);
        let size = h.request_body.borrow().len();
        assert_eq!(r.on_request_body(Some(&rt), &h, size, true), Action::Continue);
        *h.response_headers.borrow_mut() = vec![(":status".into(), b"503".to_vec())];
        h.properties.borrow_mut().insert("response.code_details".into(), details.as_bytes().to_vec());
        r.on_response_headers(Some(&rt), &h);
        (h.routed_to().unwrap(), h.metric("auto_ai_router_rejections_total.reason=.=upstream_overflow;.;"))
    };
    // Five overflows on each key (fail2ban's max_attempts is 3): no key is banned.
    for i in 0..10 {
        let (_, overflows) = answer("upstream_reset_before_response_started{overflow}");
        // (metric ids are defined on the first request's host only)
        assert!(i > 0 || overflows == 1, "counted as its own reason");
    }
    let h = host(&store, &chat_headers("r"), b"");
    let health = filter::balancer::health(&h, &rt.keys, 0);
    assert_eq!(health.available(), 2, "an overflow banned a key");
    // The provider's own 503s do count.
    for _ in 0..6 {
        answer("via_upstream");
    }
    assert_eq!(filter::balancer::health(&h, &rt.keys, 0).available(), 0);
}

/// `server.queue_timeout`: a request refused only by a limit that frees within the timeout waits
/// (paused, nothing charged), and a tick after the key is free again routes it; past the timeout
/// it gets today's 429; the queue is bounded per worker; a client that leaves is forgotten.
#[test]
fn a_request_waits_for_a_resting_key_within_queue_timeout() {
    let rt = runtime(", replace_v1_models: false, max_provider_retries: 0, queue_timeout: 2s, queue_max: 1", -1);
    let store = Rc::new(MemStore::default());
    // Both keys rest for 1 s (a provider 429 with Retry-After: 1 on each).
    for _ in 0..2 {
        let h = host(&store, &chat_headers("r"), br#"{"model":"m"}"#);
        let mut r = Request::default();
        r.on_request_headers(Some(&rt), &h, false);
        assert_eq!(r.on_request_body(Some(&rt), &h, 13, true), Action::Continue);
        *h.response_headers.borrow_mut() = vec![(":status".into(), b"429".to_vec()), ("retry-after".into(), b"1".to_vec())];
        r.on_response_headers(Some(&rt), &h);
    }
    let h = host(&store, &chat_headers("r"), br#"{"model":"m"}"#);
    h.now_ms.set(100);
    let mut waiting = Request::default();
    waiting.on_request_headers(Some(&rt), &h, false);
    assert_eq!(waiting.on_request_body(Some(&rt), &h, 13, true), Action::Pause, "waits instead of 429");
    assert!(waiting.take_enqueue() && !waiting.take_enqueue(), "queued once");
    assert!(h.reply.borrow().is_none() && h.routed_to().is_none());
    // The queue holds one: the next one gets its 429 at once.
    let h2 = host(&store, &chat_headers("r"), br#"{"model":"m"}"#);
    h2.now_ms.set(100);
    let mut second = Request::default();
    second.on_request_headers(Some(&rt), &h2, false);
    second.on_request_body(Some(&rt), &h2, 13, true);
    assert_eq!(reply_json(&h2).0, 429, "queue_max reached");
    // Ticks while the keys rest: still waiting; once they are free: routed and resumed once.
    h.now_ms.set(600);
    assert!(waiting.on_wait_tick(Some(&rt), &h));
    h.now_ms.set(1_050);
    assert!(!waiting.on_wait_tick(Some(&rt), &h), "routed");
    assert!(h.routed_to().is_some() && h.resumed.get() == 1 && h.reply.borrow().is_none());
    // Past the timeout: the 429 after all.
    for _ in 0..2 {
        let h = host(&store, &chat_headers("r"), br#"{"model":"m"}"#);
        h.now_ms.set(2_000);
        let mut r = Request::default();
        r.on_request_headers(Some(&rt), &h, false);
        r.on_request_body(Some(&rt), &h, 13, true);
        *h.response_headers.borrow_mut() = vec![(":status".into(), b"429".to_vec()), ("retry-after".into(), b"60".to_vec())];
        r.on_response_headers(Some(&rt), &h);
    }
    let h = host(&store, &chat_headers("r"), br#"{"model":"m"}"#);
    h.now_ms.set(2_100);
    let mut late = Request::default();
    late.on_request_headers(Some(&rt), &h, false);
    late.on_request_body(Some(&rt), &h, 13, true);
    assert_eq!(reply_json(&h).0, 429, "a rest of 60 s is longer than the 2 s wait: no waiting");
}
