//! Global limits (issue 14) across two Envoy processes: one Redis (Debian's redis-server), the
//! rate-limit service test double over it (tests/rls-double: envoyproxy/ratelimit's fixed-window
//! algorithm on the real RLS v3 protos), the mock providers counting what reaches each key.
//! `make test-global` runs this module.

use e2e::global::{Redis, RlsDouble};
use e2e::harness::{api_log, cred, metric_value, mock, wait_for, Router, MASTER};
use e2e::http::{Request, Response};
use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The service's windows are calendar minutes: start a run with at least `secs` of this one left,
/// so one run's requests fall in one window.
fn fresh_window(secs: u64) {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).expect("clock").as_millis() as u64;
    let left = 60_000 - now % 60_000;
    if left < secs * 1000 {
        std::thread::sleep(Duration::from_millis(left + 200));
    }
}

fn config(creds: &str, rls: &RlsDouble, global: &str) -> String {
    format!(
        "server:\n  master_key: \"{MASTER}\"\n  default_models_rpm: -1\ncredentials:\n{creds}global_limits:\n  service: \"127.0.0.1:{}\"\n  timeout: 500ms\n{global}",
        rls.port
    )
}

/// `n` chat requests spread over `routers` by `threads` threads, each request on its own connection.
fn spread(routers: &[&Router], n: usize, threads: usize) -> Vec<(usize, Response)> {
    spread_with(routers, n, threads, || Request::chat(MASTER, "gpt-4o"))
}

/// [`spread`] with the request `make` builds.
fn spread_with(routers: &[&Router], n: usize, threads: usize, make: fn() -> Request) -> Vec<(usize, Response)> {
    let addrs: Vec<SocketAddr> = routers.iter().map(|r| r.addr).collect();
    let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let (addrs, next) = (addrs.clone(), next.clone());
            std::thread::spawn(move || {
                let mut out = Vec::new();
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    if i >= n {
                        return out;
                    }
                    let which = i % addrs.len();
                    let resp = make().send(addrs[which]).unwrap_or_else(|e| panic!("request {i}: {e}"));
                    out.push((which, resp));
                }
            })
        })
        .collect();
    handles.into_iter().flat_map(|h| h.join().expect("client thread")).collect()
}

fn check_429(resp: &Response) {
    assert_eq!(resp.status, 429, "{}", resp.describe());
    assert_eq!(resp.error_code().as_deref(), Some("rate_limit_exceeded"), "{}", resp.describe());
    let ra: u64 = resp.header("retry-after").and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("no Retry-After: {}", resp.describe()));
    assert!((1..=61).contains(&ra), "Retry-After {ra}");
}

fn statuses(results: &[(usize, Response)]) -> (usize, Vec<&Response>, Vec<String>) {
    let ok = results.iter().filter(|(_, r)| r.status == 200).count();
    let limited = results.iter().filter(|(_, r)| r.status == 429).map(|(_, r)| r).collect();
    let other = results.iter().filter(|(_, r)| r.status != 200 && r.status != 429).map(|(_, r)| r.describe()).collect();
    (ok, limited, other)
}

#[test]
fn two_envoys_admit_exactly_the_limit_per_key() {
    const L: usize = 12;
    let redis = Redis::start();
    let rls = RlsDouble::start(&redis);
    let a = mock("a", "sk-glob-a-0000", &["gpt-4o"]);
    let cfg = config(&cred("ga", "sk-glob-a-0000", &a.url(), L as i64), &rls, "");
    let (r1, r2) = (Router::start(&cfg), Router::start(&cfg));
    fresh_window(25);
    let results = spread(&[&r1, &r2], 3 * L, 12);
    let (ok, limited, other) = statuses(&results);
    assert!(other.is_empty(), "unexpected replies: {other:?}");
    assert_eq!(api_log(&a).len(), L, "the provider sees exactly the global limit (each Envoy alone would admit {L})");
    assert_eq!((ok, limited.len()), (L, 2 * L));
    limited.iter().for_each(|r| check_429(r));
    let by_envoy = [0, 1].map(|w| results.iter().filter(|(e, r)| *e == w && r.status == 200).count());
    assert!(by_envoy.iter().all(|n| *n > 0), "both Envoys admitted some: {by_envoy:?}");
    let (calls, _) = rls.stats();
    assert!(calls >= L as u64, "lease 1: one call per admission ({calls} calls)");
    let counted: f64 = [&r1, &r2]
        .iter()
        .map(|r| {
            ["ok", "over_limit"]
                .iter()
                .filter_map(|res| metric_value(&r.metrics(), "auto_ai_router_global_checks_total", &[("result", res)]))
                .sum::<f64>()
        })
        .sum();
    assert_eq!(counted as u64, calls, "every call is counted by result");
}

#[test]
fn a_key_full_globally_sends_traffic_to_the_next_key() {
    const L: usize = 5;
    let redis = Redis::start();
    let rls = RlsDouble::start(&redis);
    let a = mock("a", "sk-glob2-a-000", &["gpt-4o"]);
    let b = mock("b", "sk-glob2-b-000", &["gpt-4o"]);
    let creds = format!("{}{}", cred("g2a", "sk-glob2-a-000", &a.url(), L as i64), cred("g2b", "sk-glob2-b-000", &b.url(), 100));
    let cfg = config(&creds, &rls, "");
    let (r1, r2) = (Router::start(&cfg), Router::start(&cfg));
    fresh_window(20);
    let results = spread(&[&r1, &r2], 30, 8);
    let (ok, _, other) = statuses(&results);
    assert!(other.is_empty(), "{other:?}");
    assert_eq!(ok, 30, "b takes what a can't");
    assert_eq!(api_log(&a).len(), L);
    assert_eq!(api_log(&b).len(), 30 - L);
}

#[test]
fn a_lease_of_five_holds_the_bound_with_fewer_calls() {
    const L: usize = 60;
    const THREADS: usize = 8;
    let redis = Redis::start();
    let rls = RlsDouble::start(&redis);
    let a = mock("a", "sk-glob3-a-000", &["gpt-4o"]);
    let cfg = config(&cred("g3a", "sk-glob3-a-000", &a.url(), L as i64), &rls, "  lease: 5\n");
    let (r1, r2) = (Router::start(&cfg), Router::start(&cfg));
    fresh_window(30);
    let results = spread(&[&r1, &r2], 3 * L, THREADS);
    let (ok, limited, other) = statuses(&results);
    assert!(other.is_empty(), "{other:?}");
    assert!(api_log(&a).len() <= L, "never above the limit: {}", api_log(&a).len());
    assert_eq!(ok, api_log(&a).len());
    // Spare slots of a lease may go unused: at most replicas × (lease − 1) per window.
    assert!(ok >= L - 2 * 4, "{ok} admitted");
    limited.iter().for_each(|r| check_429(r));
    let (calls, hits) = rls.stats();
    eprintln!("lease 5: {ok} admitted, {calls} calls for {hits} slots");
    // An Envoy makes one lease call per key at a time (so spare slots stay within lease − 1);
    // requests that find no spare slot meanwhile ask for their own slot, a call each: with 8
    // client threads on 2 Envoys that is most of them while a lease is in flight. Lease 1 would
    // take at least L calls.
    assert!(calls < L as u64, "{calls} calls to the service for {ok} admissions");
    assert!(hits >= ok as u64 && hits <= calls * 5);
}

#[test]
fn a_stopped_service_denies_allows_or_shares_by_configuration() {
    const L: usize = 10;
    let redis = Redis::start();
    let mut rls = RlsDouble::start(&redis);
    let a = mock("a", "sk-glob4-a-000", &["gpt-4o"]);
    let creds = cred("g4a", "sk-glob4-a-000", &a.url(), L as i64);
    let deny = Router::start(&config(&creds, &rls, ""));
    let allow = Router::start(&config(&creds, &rls, "  on_unavailable: allow\n"));
    let local = config(&creds, &rls, "  on_unavailable: local\n  replicas: 2\n");
    let (l1, l2) = (Router::start(&local), Router::start(&local));
    rls.stop();

    let resp = deny.chat("gpt-4o");
    assert_eq!(resp.status, 503, "{}", resp.describe());
    assert_eq!(resp.error_code().as_deref(), Some("rate_limit_service_unavailable"));
    let resp = allow.chat("gpt-4o");
    assert_eq!(resp.status, 200, "{}", resp.describe());
    let before = api_log(&a).len();
    for r in [&l1, &l2] {
        let ok = (0..L).filter(|_| r.chat("gpt-4o").status == 200).count();
        assert_eq!(ok, L / 2, "each Envoy keeps to floor({L} / 2) while the service is down");
    }
    assert_eq!(api_log(&a).len() - before, L);
}

#[test]
fn a_stalled_service_costs_one_timeout_per_breaker_period() {
    let redis = Redis::start();
    let rls = RlsDouble::start(&redis);
    let a = mock("a", "sk-glob5-a-000", &["gpt-4o"]);
    let creds = cred("g5a", "sk-glob5-a-000", &a.url(), 100);
    let cfg = format!(
        "server:\n  master_key: \"{MASTER}\"\n  default_models_rpm: -1\ncredentials:\n{creds}global_limits:\n  service: \"127.0.0.1:{}\"\n  timeout: 300ms\n  breaker: 30s\n  on_unavailable: allow\n",
        rls.port
    );
    let r = Router::start(&cfg);
    rls.set_delay(Duration::from_secs(2));
    let t = Instant::now();
    assert_eq!(r.chat("gpt-4o").status, 200, "allow: served after the timeout");
    let first = t.elapsed();
    assert!(first >= Duration::from_millis(280), "the first request waited for the timeout ({first:?})");
    for _ in 0..10 {
        assert_eq!(r.chat("gpt-4o").status, 200);
    }
    assert_eq!(rls.stats().0, 1, "one call reached the service: the others skipped it while the breaker was open");
}

/// A multipart upload (`/v1/audio/transcriptions`: routed at the request headers, a body behind
/// them) with global limits on waits for the service through its body and is routed: the provider
/// gets the whole upload (it was a 503 `upstream_unavailable` when the body resumed the request
/// before the service answered).
#[test]
fn a_multipart_upload_with_global_limits_is_routed_whole() {
    let redis = Redis::start();
    let rls = RlsDouble::start(&redis);
    let a = mock("a", "sk-glob-up-a-0000", &["whisper-1"]);
    let r = Router::start(&config(&cred("cred_a", "sk-glob-up-a-0000", &a.url(), 60), &rls, ""));
    let mut body = b"--XyZ\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nwhisper-1\r\n--XyZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\nContent-Type: audio/wav\r\n\r\n".to_vec();
    body.extend(std::iter::repeat_n(b'x', 300_000));
    body.extend_from_slice(b"\r\n--XyZ--\r\n");
    for (i, chunked) in [false, true].into_iter().enumerate() {
        let mut req = Request::post("/v1/audio/transcriptions").bearer(MASTER).header("Content-Type", "multipart/form-data; boundary=XyZ");
        req = if chunked {
            let pieces: Vec<Vec<u8>> = body.chunks(64 * 1024).map(<[u8]>::to_vec).collect();
            req.chunked(pieces, Duration::from_millis(20))
        } else {
            req.body(body.clone())
        };
        let resp = r.send(&req);
        assert_eq!(resp.status, 200, "upload {i}: {}", resp.describe());
        let log = api_log(&a);
        assert_eq!(log.len(), i + 1, "{log:?}");
        assert_eq!((log[i].path.as_str(), log[i].body_len), ("/v1/audio/transcriptions", body.len()), "the whole upload");
    }
    assert_eq!(rls.stats().0, 2, "one call to the service per upload");
}

/// A chat whose answer reports 100 tokens from the mock (93 prompt words + 7 answer words).
fn chat_100_tokens() -> Request {
    let words = vec!["word"; 93].join(" ");
    Request::post("/v1/chat/completions")
        .bearer(MASTER)
        .json(&serde_json::json!({"model": "gpt-4o", "messages": [{"role": "user", "content": words}]}))
}

#[test]
fn two_envoys_keep_a_keys_tpm_within_the_fleet_bound() {
    const TPM: u64 = 2000;
    const THREADS: usize = 4;
    let redis = Redis::start();
    let rls = RlsDouble::start(&redis);
    let a = mock("a", "sk-glob6-a-000", &["gpt-4o"]);
    let creds = format!("  - name: g6a\n    api_key: \"sk-glob6-a-000\"\n    base_url: \"{}\"\n    tpm: {TPM}\n", a.url());
    let cfg = config(&creds, &rls, "");
    let (r1, r2) = (Router::start(&cfg), Router::start(&cfg));
    fresh_window(30);
    let results = spread_with(&[&r1, &r2], 80, THREADS, chat_100_tokens);
    let (ok, limited, other) = statuses(&results);
    assert!(other.is_empty(), "unexpected replies: {other:?}");
    limited.iter().for_each(|r| check_429(r));
    let tokens: Vec<u64> =
        results.iter().filter(|(_, r)| r.status == 200).map(|(_, r)| r.json()["usage"]["total_tokens"].as_u64().expect("usage")).collect();
    let per = tokens[0];
    assert!(tokens.iter().all(|t| *t == per) && per == 100, "{tokens:?}");
    let fleet: u64 = tokens.iter().sum();
    // A request is admitted only while the fleet's count (at the service) is below the TPM; what
    // passes it was admitted but not charged yet: each client thread's request in flight, and
    // its previous one whose charge may still be on its way. Each Envoy alone would admit 2,000.
    assert!(fleet >= TPM, "the limit was reached: {fleet}");
    assert!(fleet < TPM + 2 * THREADS as u64 * per, "{fleet} tokens for a {TPM} TPM key over two Envoys ({ok} answers)");
    assert!((ok as u64) < 2 * TPM / per, "each Envoy on its own would admit {} answers", TPM / per);
    // Every answer was charged to the service, after it (fire and forget: wait for the last).
    wait_for("the charges to reach the service", Duration::from_secs(5), || {
        (rls.stats_json()["descriptor_hits"].as_u64() == Some(fleet)).then_some(())
    });
    let charges: f64 =
        [&r1, &r2].iter().filter_map(|r| metric_value(&r.metrics(), "auto_ai_router_global_checks_total", &[("result", "charge")])).sum();
    assert_eq!(charges as usize, ok, "one charge per answer");
    // No call per request for a key known full: each Envoy learns it from a refused check.
    let (calls, _) = rls.stats();
    let checks = calls - ok as u64;
    assert!(checks <= (ok + 2 * THREADS) as u64, "{checks} checks for {ok} admissions and {} refusals", limited.len());
    eprintln!("tpm {TPM}: {ok} answers, {fleet} tokens, {checks} checks, {} refused", limited.len());
}
