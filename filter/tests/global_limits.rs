//! Global limits on an in-memory host: replicas are separate shared-data stores in front of one
//! rate-limit service. The service here is a test fixture: an in-memory fixed window per
//! descriptor, counting the hits it is asked for (as envoyproxy/ratelimit's Redis cache does:
//! INCRBY, then OVER_LIMIT iff the new count is above the limit). host-sim and the e2e suite run
//! the same flows on the real `.wasm` against a real service.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use filter::config;
use filter::host::Action;
use filter::request::Request;
use filter::rls::{CurrentLimit, DescriptorStatus, ProtoDuration, RateLimitRequest, RateLimitResponse};
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

/// The stand-in rate-limit service (see the file's first lines): per-descriptor `hits_addend`
/// (0 = check only), `current_limit` on every limited status, whole-second
/// `duration_until_reset` as envoyproxy/ratelimit computes it, and its
/// STOP_CACHE_KEY_INCREMENT_WHEN_OVERLIMIT (only the keys that would go over are incremented).
#[derive(Default)]
struct Service {
    counts: RefCell<HashMap<String, u64>>,
    calls: RefCell<u32>,
    hits: RefCell<u64>,
    /// Answers as for an unknown domain: OK, no `current_limit`, no reset.
    no_limits: std::cell::Cell<bool>,
}

fn cache_key(domain: &str, entries: &[(&str, &str)], now_ms: u64) -> String {
    format!("{domain}_{entries:?}_{}", now_ms / 60_000)
}

impl Service {
    fn answer(&self, message: &[u8], now_ms: u64) -> Vec<u8> {
        let req = RateLimitRequest::decode(message).unwrap();
        *self.calls.borrow_mut() += 1;
        *self.hits.borrow_mut() += req.hits_addend.max(1) as u64;
        if self.no_limits.get() {
            let statuses = req.descriptors.iter().map(|_| DescriptorStatus { code: 1, ..Default::default() }).collect();
            return RateLimitResponse { overall_code: 1, statuses }.encode_to_vec();
        }
        let reset = 60 - (now_ms / 1000) % 60;
        let mut counts = self.counts.borrow_mut();
        let keyed: Vec<(String, u64, u64)> = req
            .descriptors
            .iter()
            .map(|d| {
                let entries: Vec<(&str, &str)> = d.entries.iter().map(|e| (e.key.as_str(), e.value.as_str())).collect();
                let hits = d.hits_addend.as_ref().map_or(req.hits_addend.max(1) as u64, |h| h.value);
                (cache_key(&req.domain, &entries, now_ms), hits, d.limit.as_ref().unwrap().requests_per_unit as u64)
            })
            .collect();
        let near: Vec<bool> = keyed.iter().map(|(k, h, l)| counts.get(k).copied().unwrap_or(0) + h > *l).collect();
        let any_near = near.iter().any(|n| *n);
        let mut over = false;
        let statuses = keyed
            .iter()
            .zip(&near)
            .map(|((key, hits, limit), near)| {
                let c = counts.entry(key.clone()).or_default();
                if !any_near || *near {
                    *c += hits;
                }
                let is_over = *c > *limit;
                over |= is_over;
                DescriptorStatus {
                    code: if is_over { 2 } else { 1 },
                    current_limit: Some(CurrentLimit { requests_per_unit: *limit as u32, unit: 2, name: String::new() }),
                    limit_remaining: limit.saturating_sub(*c) as u32,
                    duration_until_reset: Some(ProtoDuration { seconds: reset as i64, nanos: 0 }),
                }
            })
            .collect();
        RateLimitResponse { overall_code: if over { 2 } else { 1 }, statuses }.encode_to_vec()
    }

    fn count(&self, entries: &[(&str, &str)], now_ms: u64) -> u64 {
        self.counts.borrow().get(&cache_key("auto-ai-router", entries, now_ms)).copied().unwrap_or(0)
    }
}

enum Outcome {
    Routed(String),
    Reply(u16, serde_json::Value, Option<String>),
}

/// One chat request on a replica: headers, body, and the service's answers as they are asked for.
/// `service: None` makes every call fail with gRPC status 14 (unavailable).
fn chat(rt: &Runtime, store: &Rc<MemStore>, service: Option<&Service>, now_ms: u64) -> Outcome {
    chat_on(rt, store, service, now_ms, "m").0
}

/// [`chat`] for `model`, with the request's host (its calls, logs, metrics) and state.
fn chat_on(rt: &Runtime, store: &Rc<MemStore>, service: Option<&Service>, now_ms: u64, model: &str) -> (Outcome, MemHost, Request) {
    let body = format!(r#"{{"model":"{model}","messages":[]}}"#);
    let body = body.as_bytes();
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
    let reply = h.reply.borrow().clone();
    if let Some(reply) = reply {
        let ra = reply.headers.iter().find(|(k, _)| k == "retry-after").map(|(_, v)| v.clone());
        return (Outcome::Reply(reply.status, serde_json::from_str(&reply.body).unwrap(), ra), h, r);
    }
    assert_eq!(action, Action::Continue);
    let to = h.routed_to().expect("routed");
    (Outcome::Routed(to), h, r)
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
fn concurrent_requests_make_one_lease_call_at_a_time() {
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
    assert_eq!(
        RateLimitRequest::decode(hosts[1].grpc_calls.borrow()[0].message.as_slice()).unwrap().hits_addend,
        1,
        "the second asks for its own slot"
    );
    let admitted = (0..8).filter(|i| routed(&chat(&rt, &store, Some(&service), T0 + 10 + i)).is_some()).count();
    assert_eq!((admitted, *service.calls.borrow()), (8, 3), "4 spare slots, then the next lease");
    assert_eq!(*service.hits.borrow(), 11, "at most lease − 1 slots spare at any time");
}

/// 10:00:59.5: the service reports 1 s left (it truncates 0.5 s to whole seconds).
const LAST_HALF_SECOND: u64 = T0 - 15_000 + 59_500;

#[test]
fn a_leased_slot_is_never_used_after_its_service_window() {
    let rt = runtime(", lease: 5", &[("a", 10)], 0);
    let service = Service::default();
    // Two replicas, so that their local windows (10 each) don't hide what the service allows.
    let replicas = [Rc::new(MemStore::default()), Rc::new(MemStore::default())];
    let mut per_window: HashMap<u64, u32> = HashMap::new();
    // One request every 100 ms from the last half second of a window into the next.
    for i in 0..80u64 {
        let now = LAST_HALF_SECOND + i * 100;
        if routed(&chat(&rt, &replicas[(i % 2) as usize], Some(&service), now)).is_some() {
            *per_window.entry(now / 60_000).or_default() += 1;
        }
    }
    let next = per_window.get(&(LAST_HALF_SECOND / 60_000 + 1)).copied().unwrap_or(0);
    assert_eq!(next, 10, "the next window admits its own limit, no slot of the old one: {per_window:?}");
    assert!(per_window.values().all(|n| *n <= 10), "{per_window:?}");
}

#[test]
fn unused_lease_slots_are_bounded_per_credential_not_per_model() {
    const K: u32 = 5;
    let models = ["m1", "m2", "m3", "m4", "m5", "m6"];
    let list: Vec<String> = models.iter().map(|m| format!("{{name: {m}, rpm: 100}}")).collect();
    let text = format!(
        "server: {{master_key: {MASTER}, default_models_rpm: -1, max_provider_retries: 0}}\ncredentials:\n  - {{name: a, api_key: sk-a-secret, base_url: 'http://a.test', rpm: 100}}\nglobal_limits: {{service: 'rls:8081', lease: {K}}}\nmodels: [{}]\n",
        list.join(", ")
    );
    let rt = Runtime::new(config::load(&text, &|_| None).unwrap());
    let service = Service::default();
    let replicas = [Rc::new(MemStore::default()), Rc::new(MemStore::default())];
    let mut admitted = 0;
    for (r, store) in replicas.iter().enumerate() {
        for (i, m) in models.iter().enumerate() {
            if routed(&chat_on(&rt, store, Some(&service), T0 + (r * 10 + i) as u64, m).0).is_some() {
                admitted += 1;
            }
        }
    }
    assert_eq!(admitted, 12);
    let charged = service.count(&[("credential", "a")], T0);
    let unused = charged - admitted;
    assert!(unused <= 2 * (K as u64 - 1), "{unused} unused slots of credential a (a lease per model would leave 2 × 6 × 4)");
    assert!(*service.calls.borrow() <= 12);
}

#[test]
fn a_service_without_limits_is_counted_logged_once_and_shown() {
    let service = Service::default();
    service.no_limits.set(true);
    let store = Rc::new(MemStore::default());
    let (mut logs, mut no_limit) = (vec![], 0);
    // A runtime per request (a worker's metric ids belong to one host here), all of one Envoy.
    let workers = [runtime("", &[("a", 100)], 0), runtime("", &[("a", 100)], 0)];
    for i in 0..20u64 {
        let (o, h, _) = chat_on(&runtime("", &[("a", 100)], 0), &store, Some(&service), T0 + i, "m");
        assert!(
            routed(&o).is_some(),
            "the service said OK: admitted ({:?})",
            match &o {
                Outcome::Reply(s, b, _) => format!("{s} {b}"),
                _ => String::new(),
            }
        );
        no_limit += h.metric("auto_ai_router_global_checks_total.result=.=no_limit;.;");
        assert_eq!(h.metric("auto_ai_router_global_checks_total.result=.=ok;.;"), 0);
        logs.extend(h.logs.borrow().iter().filter(|(_, m)| m.contains("no limit")).map(|(_, m)| m.clone()));
    }
    assert_eq!(no_limit, 20, "every call is counted");
    assert_eq!(logs.len(), 1, "logged once per configuration: {logs:?}");
    assert!(logs[0].contains("credential a") && logs[0].contains("auto-ai-router") && !logs[0].contains("secret"), "{}", logs[0]);
    let credentials = |rt: &Runtime| {
        let h = MemHost::new(store.clone())
            .with_request(&[(":method", "GET"), (":path", "/v1/credentials"), ("authorization", &format!("Bearer {MASTER}"))], b"");
        let mut r = Request::default();
        r.on_request_headers(Some(rt), &h, true);
        let body: serde_json::Value = serde_json::from_str(&h.reply.borrow().as_ref().unwrap().body).unwrap();
        body["data"][0]["global_limit"].clone()
    };
    assert_eq!(credentials(&workers[0]), "missing");
    service.no_limits.set(false);
    assert!(routed(&chat(&workers[0], &store, Some(&service), T0 + 100)).is_some());
    assert_eq!(credentials(&workers[1]), "enforced");
}

const ANSWER_300: &[u8] =
    br#"{"id":"1","object":"chat.completion","choices":[],"usage":{"prompt_tokens":100,"completion_tokens":200,"total_tokens":300}}"#;

/// A chat whose answer reports 300 tokens; the charge call it makes afterwards is fed to the
/// service (its reply is not read). Some(credential) when admitted. Without a service (down,
/// the breaker open) no charge is sent.
fn chat_answered(
    rt: &Runtime,
    store: &Rc<MemStore>,
    service: impl Into<Option<&'static Service>>,
    now_ms: u64,
    model: &str,
) -> Option<String> {
    let service = service.into();
    let (o, h, mut r) = chat_on(rt, store, service, now_ms, model);
    let to = routed(&o)?.to_string();
    let asked = h.grpc_calls.borrow().len();
    *h.response_headers.borrow_mut() = vec![(":status".into(), b"200".to_vec()), ("content-type".into(), b"application/json".to_vec())];
    *h.response_chunk.borrow_mut() = ANSWER_300.to_vec();
    r.on_response_headers(Some(rt), &h);
    r.on_response_body(Some(rt), &h, ANSWER_300.len(), true);
    let calls = h.grpc_calls.borrow();
    let Some(service) = service else {
        assert_eq!(calls.len(), asked, "no charge while the service is skipped");
        return Some(to);
    };
    assert_eq!(calls.len(), asked + 1, "one charge call after the answer");
    let charge = RateLimitRequest::decode(calls[asked].message.as_slice()).unwrap();
    assert!(charge.descriptors.iter().all(|d| d.entries.iter().any(|e| e.key == "tokens")), "only token descriptors are charged");
    assert!(charge.descriptors.iter().all(|d| d.hits_addend.as_ref().map(|h| h.value) == Some(300)));
    service.answer(&calls[asked].message, now_ms);
    Some(to)
}

#[test]
fn tpm_holds_across_replicas_and_a_full_key_costs_no_call() {
    let text = format!(
        "server: {{master_key: {MASTER}, default_models_rpm: -1, max_provider_retries: 0}}\ncredentials:\n  - {{name: a, api_key: sk-a-secret, base_url: 'http://a.test', tpm: 1000}}\nglobal_limits: {{service: 'rls:8081'}}\n"
    );
    let rt = Runtime::new(config::load(&text, &|_| None).unwrap());
    let service: &'static Service = Box::leak(Box::default());
    let replicas = [Rc::new(MemStore::default()), Rc::new(MemStore::default())];
    let mut admitted = 0;
    let mut calls_after_full = None;
    for i in 0..12u64 {
        match chat_answered(&rt, &replicas[(i % 2) as usize], service, T0 + i * 100, "m") {
            Some(_) => admitted += 1,
            None => {
                calls_after_full.get_or_insert(*service.calls.borrow());
            }
        }
    }
    // Each request is checked against the fleet's count (0, 300, 600, 900: below 1000); each
    // replica alone would admit 4 (its own 1,200 tokens).
    assert_eq!(admitted, 4);
    assert_eq!(service.count(&[("credential", "a"), ("tokens", "total")], T0), 1200, "every answer charged; over by one answer at most");
    let after = *service.calls.borrow() - calls_after_full.unwrap();
    assert!(after <= 1, "{after} calls after the key was full: each replica learns it once, then no call");
    // A TPM-only key keeps no request window.
    assert!(filter::store::SharedStore::get(&*replicas[0], &rt.keys[0].rate).unwrap().0.is_none());
    // The next window admits again.
    assert!(chat_answered(&rt, &replicas[0], service, T0 + 60_000, "m").is_some());
}

#[test]
fn model_tpm_holds_across_replicas_per_credential_and_model() {
    let text = format!(
        "server: {{master_key: {MASTER}, default_models_rpm: -1, max_provider_retries: 0}}\ncredentials:\n  - {{name: a, api_key: sk-a-secret, base_url: 'http://a.test'}}\nglobal_limits: {{service: 'rls:8081', lease: 3}}\nmodels: [{{name: big, tpm: 500}}]\n"
    );
    let rt = Runtime::new(config::load(&text, &|_| None).unwrap());
    let service: &'static Service = Box::leak(Box::default());
    let replicas = [Rc::new(MemStore::default()), Rc::new(MemStore::default())];
    let big = (0..8u64).filter(|i| chat_answered(&rt, &replicas[(i % 2) as usize], service, T0 + i * 100, "big").is_some()).count();
    // Lease 3: a replica may admit up to 2 more on check slots it took before the count reached
    // the limit (the README's bound); with lease 1 it would be exactly 2 (0 and 300 < 500).
    assert!((2..=2 + 2 * 2).contains(&big), "{big} answers of 300 tokens for a 500 TPM model");
    let counted = service.count(&[("credential", "a"), ("model", "big"), ("tokens", "total")], T0);
    assert_eq!(counted, 300 * big as u64);
    let (o, _, _) = chat_on(&rt, &replicas[0], Some(service), T0 + 1000, "small");
    assert!(routed(&o).is_some(), "another model of the key is not limited");
}

#[test]
fn while_the_service_is_down_local_keeps_each_replica_to_its_share_of_tpm() {
    let text = format!(
        "server: {{master_key: {MASTER}, default_models_rpm: -1, max_provider_retries: 0}}\ncredentials:\n  - {{name: a, api_key: sk-a-secret, base_url: 'http://a.test', tpm: 1200}}\nglobal_limits: {{service: 'rls:8081', on_unavailable: local, replicas: 2}}\n"
    );
    let rt = Runtime::new(config::load(&text, &|_| None).unwrap());
    for store in [Rc::new(MemStore::default()), Rc::new(MemStore::default())] {
        // The first call fails and opens the breaker; then no call and no charge.
        let admitted = (0..6u64).filter(|i| chat_answered(&rt, &store, None, T0 + i * 100, "m").is_some()).count();
        assert_eq!(admitted, 2, "floor(1200 / 2) = 600: 0 and 300 are below it, 600 is not");
    }
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
