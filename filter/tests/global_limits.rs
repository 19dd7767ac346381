//! Global limits on an in-memory host: replicas are separate shared-data stores in front of one
//! rate-limit service. The service here is a test fixture: an in-memory fixed window per
//! descriptor, counting the hits it is asked for (as envoyproxy/ratelimit's Redis cache does:
//! INCRBY, then OVER_LIMIT iff the new count is above the limit). host-sim and the e2e suite run
//! the same flows on the real `.wasm` against a real service.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use filter::config;
use filter::host::Action;
use filter::request::Request;
use filter::rls::{DescriptorStatus, ProtoDuration, RateLimitRequest, RateLimitResponse};
use filter::runtime::Runtime;
use filter::store::MemStore;
use filter::testing::MemHost;
use prost::Message;
use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

const MASTER: &str = "sk-master-global-0123";
/// 10:00:15 into some minute: 45 s left in the service's window.
const T0: u64 = 1_800_000_015_000;

fn runtime(global: &str, creds: &[(&str, i64)], retries: u32) -> Runtime {
    let list: Vec<String> = creds
        .iter()
        .map(|(n, rpm)| format!("  - {{name: {n}, api_key: sk-{n}-secret, base_url: 'http://{n}.test', rpm: {rpm}}}"))
        .collect();
    let text = format!(
        "server: {{master_key: {MASTER}, default_models_rpm: -1, max_provider_retries: {retries}}}\ncredentials:\n{}\nglobal_limits: {{service: 'rls:8081'{global}}}\n",
        list.join("\n")
    );
    Runtime::new(config::load(&text, &|_| None).unwrap())
}

/// The stand-in rate-limit service (see the file's first lines).
#[derive(Default)]
struct Service {
    counts: RefCell<HashMap<String, u64>>,
    calls: RefCell<u32>,
    hits: RefCell<u64>,
}

impl Service {
    fn answer(&self, message: &[u8], now_ms: u64) -> Vec<u8> {
        let req = RateLimitRequest::decode(message).unwrap();
        *self.calls.borrow_mut() += 1;
        let hits = req.hits_addend.max(1) as u64;
        *self.hits.borrow_mut() += hits;
        let window = now_ms / 60_000;
        let reset = 60 - (now_ms / 1000) % 60;
        let mut over = false;
        let statuses = req
            .descriptors
            .iter()
            .map(|d| {
                let key = format!("{}_{:?}_{window}", req.domain, d.entries.iter().map(|e| (&e.key, &e.value)).collect::<Vec<_>>());
                let limit = d.limit.as_ref().unwrap().requests_per_unit as u64;
                let mut counts = self.counts.borrow_mut();
                let c = counts.entry(key).or_default();
                *c += hits;
                let is_over = *c > limit;
                over |= is_over;
                DescriptorStatus {
                    code: if is_over { 2 } else { 1 },
                    limit_remaining: limit.saturating_sub(*c) as u32,
                    duration_until_reset: Some(ProtoDuration { seconds: reset as i64, nanos: 0 }),
                }
            })
            .collect();
        RateLimitResponse { overall_code: if over { 2 } else { 1 }, statuses }.encode_to_vec()
    }
}

enum Outcome {
    Routed(String),
    Reply(u16, serde_json::Value, Option<String>),
}

/// One chat request on a replica: headers, body, and the service's answers as they are asked for.
/// `service: None` makes every call fail with gRPC status 14 (unavailable).
fn chat(rt: &Runtime, store: &Rc<MemStore>, service: Option<&Service>, now_ms: u64) -> Outcome {
    let body = br#"{"model":"m","messages":[]}"#;
    let h = MemHost::new(store.clone()).with_request(
        &[(":method", "POST"), (":path", "/v1/chat/completions"), (":authority", "r"), ("authorization", &format!("Bearer {MASTER}"))],
        body,
    );
    h.now_ms.set(now_ms);
    let mut r = Request::default();
    assert_eq!(r.on_request_headers(Some(rt), &h, false), Action::Pause);
    let mut action = r.on_request_body(Some(rt), &h, body.len(), true);
    let mut answered = 0;
    while action == Action::Pause && h.reply.borrow().is_none() {
        let calls = h.grpc_calls.borrow().clone();
        assert_eq!(calls.len(), answered + 1, "paused without a call to the service");
        let call = &calls[answered];
        assert_eq!(
            (call.cluster.as_str(), call.service.as_str(), call.method.as_str()),
            ("auto_ai_router_rls", "envoy.service.ratelimit.v3.RateLimitService", "ShouldRateLimit")
        );
        answered += 1;
        let resumed = h.resumed.get();
        match service {
            Some(s) => {
                *h.grpc_reply.borrow_mut() = s.answer(&call.message, now_ms);
                let len = h.grpc_reply.borrow().len();
                r.on_grpc_reply(Some(rt), &h, answered as u32, 0, len);
            }
            None => r.on_grpc_reply(Some(rt), &h, answered as u32, 14, 0),
        }
        if h.resumed.get() > resumed {
            action = Action::Continue;
        }
    }
    if let Some(reply) = h.reply.borrow().clone() {
        let ra = reply.headers.iter().find(|(k, _)| k == "retry-after").map(|(_, v)| v.clone());
        return Outcome::Reply(reply.status, serde_json::from_str(&reply.body).unwrap(), ra);
    }
    assert_eq!(action, Action::Continue);
    Outcome::Routed(h.routed_to().expect("routed"))
}

fn routed(o: &Outcome) -> Option<&str> {
    match o {
        Outcome::Routed(c) => Some(c),
        _ => None,
    }
}

#[test]
fn two_replicas_admit_exactly_the_limit_and_refuse_with_retry_after() {
    let rt = runtime("", &[("a", 10)], 0);
    let service = Service::default();
    let replicas = [Rc::new(MemStore::default()), Rc::new(MemStore::default())];
    let mut admitted = 0;
    for i in 0..30 {
        match chat(&rt, &replicas[i % 2], Some(&service), T0 + i as u64 * 10) {
            Outcome::Routed(c) => {
                assert_eq!(c, "a");
                admitted += 1;
            }
            Outcome::Reply(status, body, ra) => {
                assert_eq!(status, 429, "{body}");
                assert_eq!(body["error"]["code"], "rate_limit_exceeded");
                let ra: u64 = ra.expect("Retry-After").parse().unwrap();
                assert!((1..=45).contains(&ra), "Retry-After {ra} is the service's window end");
            }
        }
    }
    assert_eq!(admitted, 10, "each replica alone would admit 10");
    // After a refusal each replica notes the key full until the window ends: no more calls.
    assert!(*service.calls.borrow() <= 12, "{} calls", service.calls.borrow());
}

#[test]
fn a_lease_takes_several_slots_per_call_and_still_holds_the_limit() {
    let rt = runtime(", lease: 5", &[("a", 20)], 0);
    let service = Service::default();
    let replicas = [Rc::new(MemStore::default()), Rc::new(MemStore::default())];
    let admitted = (0..60u64).filter(|i| routed(&chat(&rt, &replicas[(i % 2) as usize], Some(&service), T0 + i * 10)).is_some()).count();
    assert_eq!(admitted, 20);
    let calls = *service.calls.borrow();
    assert!(calls <= 20 / 5 + 2, "{calls} calls for 20 admissions with lease 5");
    // The next window: leases of the old one are gone, the key admits again.
    let next = T0 + 60_000;
    assert!(routed(&chat(&rt, &replicas[0], Some(&service), next)).is_some());
}

#[test]
fn a_key_full_globally_moves_traffic_to_the_next_one() {
    let rt = runtime("", &[("a", 3), ("b", 3)], 0);
    let service = Service::default();
    let replicas = [Rc::new(MemStore::default()), Rc::new(MemStore::default())];
    let mut by_key: HashMap<String, u32> = HashMap::new();
    let mut refused = 0;
    for i in 0..10 {
        match chat(&rt, &replicas[i % 2], Some(&service), T0 + i as u64) {
            Outcome::Routed(c) => *by_key.entry(c).or_default() += 1,
            Outcome::Reply(429, _, _) => refused += 1,
            Outcome::Reply(s, b, _) => panic!("{s} {b}"),
        }
    }
    assert_eq!(by_key.get("a"), Some(&3));
    assert_eq!(by_key.get("b"), Some(&3));
    assert_eq!(refused, 4, "429 only once both are full");
}

#[test]
fn a_down_service_denies_allows_or_shares_as_configured() {
    let store = Rc::new(MemStore::default());
    let deny = runtime("", &[("a", 10)], 0);
    match chat(&deny, &store, None, T0) {
        Outcome::Reply(503, body, _) => assert_eq!(body["error"]["code"], "rate_limit_service_unavailable"),
        _ => panic!("deny answers 503"),
    }
    let allow = runtime(", on_unavailable: allow", &[("a", 10)], 0);
    let store = Rc::new(MemStore::default());
    let admitted = (0..15).filter(|i| routed(&chat(&allow, &store, None, T0 + i)).is_some()).count();
    assert_eq!(admitted, 10, "allow keeps the local limit");
    let local = runtime(", on_unavailable: local, replicas: 2", &[("a", 10)], 0);
    let replicas = [Rc::new(MemStore::default()), Rc::new(MemStore::default())];
    for store in &replicas {
        let admitted = (0..10).filter(|i| routed(&chat(&local, store, None, T0 + i)).is_some()).count();
        assert_eq!(admitted, 5, "each replica enforces floor(10 / 2)");
    }
}

#[test]
fn the_breaker_skips_a_failed_service_for_its_period() {
    let rt = runtime(", on_unavailable: allow, breaker: 5s", &[("a", 100)], 0);
    let store = Rc::new(MemStore::default());
    let calls = |now| {
        let body = br#"{"model":"m"}"#;
        let h = MemHost::new(store.clone())
            .with_request(&[(":method", "POST"), (":path", "/v1/chat/completions"), ("authorization", &format!("Bearer {MASTER}"))], body);
        h.now_ms.set(now);
        let mut r = Request::default();
        r.on_request_headers(Some(&rt), &h, false);
        r.on_request_body(Some(&rt), &h, body.len(), true);
        let n = h.grpc_calls.borrow().len();
        if n > 0 {
            r.on_grpc_reply(Some(&rt), &h, 1, 14, 0);
            assert_eq!(h.resumed.get(), 1, "allow: the request goes on");
        }
        n
    };
    assert_eq!(calls(T0), 1);
    for i in 1..20 {
        assert_eq!(calls(T0 + i * 200), 0, "within the breaker period");
    }
    assert_eq!(calls(T0 + 5_001), 1, "after it, the service is asked again");
}

#[test]
fn a_credential_without_a_limit_never_asks_the_service() {
    let rt = runtime("", &[("free", -1)], 0);
    let store = Rc::new(MemStore::default());
    let service = Service::default();
    for i in 0..5 {
        assert_eq!(routed(&chat(&rt, &store, Some(&service), T0 + i)), Some("free"));
    }
    assert_eq!(*service.calls.borrow(), 0);
}

#[test]
fn a_reply_for_another_call_or_after_the_request_ended_changes_nothing() {
    let rt = runtime("", &[("a", 10)], 0);
    let store = Rc::new(MemStore::default());
    let body = br#"{"model":"m"}"#;
    let h = MemHost::new(store.clone())
        .with_request(&[(":method", "POST"), (":path", "/v1/chat/completions"), ("authorization", &format!("Bearer {MASTER}"))], body);
    h.now_ms.set(T0);
    let mut r = Request::default();
    r.on_request_headers(Some(&rt), &h, false);
    assert_eq!(r.on_request_body(Some(&rt), &h, body.len(), true), Action::Pause);
    r.on_grpc_reply(Some(&rt), &h, 99, 0, 0);
    assert_eq!((h.resumed.get(), h.reply.borrow().is_none()), (0, true), "a stray token is ignored");
    // An undecodable reply is a failure (deny: 503), never a trap.
    *h.grpc_reply.borrow_mut() = vec![0xff; 7];
    r.on_grpc_reply(Some(&rt), &h, 1, 0, 7);
    assert_eq!(h.reply.borrow().as_ref().map(|r| r.status), Some(503));
    r.on_grpc_reply(Some(&rt), &h, 1, 0, 7);
    assert_eq!(h.resumed.get(), 0);
}

#[test]
fn spare_slots_of_concurrent_calls_in_one_window_add_up() {
    let rt = runtime(", lease: 5", &[("a", 100)], 0);
    let service = Service::default();
    let store = Rc::new(MemStore::default());
    let body = br#"{"model":"m"}"#;
    // Two requests ask at once (no lease yet), the answers come back in turn.
    let hosts: Vec<MemHost> = (0..2)
        .map(|i| {
            let h = MemHost::new(store.clone()).with_request(
                &[(":method", "POST"), (":path", "/v1/chat/completions"), ("authorization", &format!("Bearer {MASTER}"))],
                body,
            );
            h.now_ms.set(T0 + i);
            h
        })
        .collect();
    let mut reqs: Vec<Request> = (0..2).map(|_| Request::default()).collect();
    for (r, h) in reqs.iter_mut().zip(&hosts) {
        r.on_request_headers(Some(&rt), h, false);
        assert_eq!(r.on_request_body(Some(&rt), h, body.len(), true), Action::Pause);
    }
    for (r, h) in reqs.iter_mut().zip(&hosts) {
        let call = h.grpc_calls.borrow()[0].clone();
        *h.grpc_reply.borrow_mut() = service.answer(&call.message, h.now_ms.get());
        let len = h.grpc_reply.borrow().len();
        r.on_grpc_reply(Some(&rt), h, 1, 0, len);
        assert_eq!(h.resumed.get(), 1);
    }
    let admitted = (0..8).filter(|i| routed(&chat(&rt, &store, Some(&service), T0 + 10 + i)).is_some()).count();
    assert_eq!((admitted, *service.calls.borrow()), (8, 2), "both calls' 4 spare slots were kept");
}

/// A multipart upload (a route selected at the request headers, with a body behind them) paused on
/// the rate-limit service keeps its pause through every body and trailer callback, and resumes
/// exactly once, routed, when the service answers; a client that hangs up meanwhile is charged
/// nothing.
#[test]
fn an_upload_paused_on_the_service_resumes_once_routed_whatever_arrives_meanwhile() {
    let rt = runtime("", &[("a", 60)], 0);
    let store = Rc::new(MemStore::default());
    let service = Service::default();
    let upload = |hang_up: bool| {
        let body = b"--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\n\r\nRIFF....\r\n--b--\r\n";
        let h = MemHost::new(store.clone()).with_request(
            &[
                (":method", "POST"),
                (":path", "/v1/audio/transcriptions"),
                (":authority", "r"),
                ("authorization", &format!("Bearer {MASTER}")),
                ("content-type", "multipart/form-data; boundary=b"),
            ],
            body,
        );
        h.now_ms.set(T0);
        let mut r = Request::default();
        assert_eq!(r.on_request_headers(Some(&rt), &h, false), Action::Pause, "paused for the service");
        assert_eq!(h.grpc_calls.borrow().len(), 1);
        assert_eq!(r.on_request_body(Some(&rt), &h, 10, false), Action::Pause, "the first chunk");
        assert_eq!(r.on_request_body(Some(&rt), &h, body.len(), false), Action::Pause);
        assert_eq!(r.on_request_trailers(Some(&rt), &h), Action::Pause, "trailers");
        assert!(h.routed_to().is_none() && h.reply.borrow().is_none());
        if hang_up {
            r.on_log(Some(&rt), &h);
        }
        *h.grpc_reply.borrow_mut() = service.answer(&h.grpc_calls.borrow()[0].message, T0);
        let len = h.grpc_reply.borrow().len();
        r.on_grpc_reply(Some(&rt), &h, 1, 0, len);
        // A duplicate reply (or any late callback) changes nothing.
        r.on_grpc_reply(Some(&rt), &h, 1, 0, len);
        if !hang_up {
            assert_eq!(r.on_request_body(Some(&rt), &h, body.len(), true), Action::Continue, "routed: the body flows");
        }
        (h.routed_to(), h.resumed.get())
    };
    assert_eq!(upload(false), (Some("a".into()), 1), "resumed exactly once, routed");
    let before = filter::balancer::rpm_current(&*store, &rt.keys[0], T0);
    assert_eq!(upload(true), (None, 0), "the client left: nothing routed or resumed");
    assert_eq!(filter::balancer::rpm_current(&*store, &rt.keys[0], T0), before, "nothing charged for a client that left");
}
