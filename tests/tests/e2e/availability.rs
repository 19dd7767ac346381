//! Availability (issue 23) on a real Envoy: weighted shares and per-key concurrency caps.

use e2e::harness::{api_log, control, mock, Router, MASTER};
use serde_json::json;

fn cred(name: &str, key: &str, url: &str, extra: &str) -> String {
    format!("  - name: {name}\n    api_key: \"{key}\"\n    base_url: \"{url}\"\n{extra}")
}

/// Weights 1:3 over 400 requests land 100:300 (± the workers' interleaving).
#[test]
fn weights_one_to_three_split_four_hundred_requests() {
    let a = mock("a", "sk-av-w-a-000000", &["gpt-4o"]);
    let b = mock("b", "sk-av-w-b-000000", &["gpt-4o"]);
    let cfg = format!(
        "server:\n  master_key: \"{MASTER}\"\n  default_models_rpm: -1\ncredentials:\n{}{}",
        cred("cred_a", "sk-av-w-a-000000", &a.url(), "    weight: 1\n"),
        cred("cred_b", "sk-av-w-b-000000", &b.url(), "    weight: 3\n"),
    );
    let r = Router::start(&cfg);
    let statuses: Vec<u16> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..4).map(|_| s.spawn(|| (0..100).map(|_| r.chat("gpt-4o").status).collect::<Vec<_>>())).collect();
        hs.into_iter().flat_map(|h| h.join().unwrap()).collect()
    });
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    let (na, nb) = (api_log(&a).len(), api_log(&b).len());
    assert_eq!(na + nb, 400);
    assert!((98..=102).contains(&na) && (298..=302).contains(&nb), "a={na} b={nb}");
}

/// `max_concurrent: 2` on two slow keys and 10 parallel requests: never 3 in flight at a mock;
/// the requests that find both keys full get 429 with Retry-After; slots come back afterwards.
#[test]
fn max_concurrent_caps_requests_in_flight_per_key() {
    let a = mock("a", "sk-av-c-a-000000", &["gpt-4o"]);
    let b = mock("b", "sk-av-c-b-000000", &["gpt-4o"]);
    for m in [&a, &b] {
        control(m, json!({"delay_ms": 700}));
    }
    let cfg = format!(
        "server:\n  master_key: \"{MASTER}\"\n  default_models_rpm: -1\ncredentials:\n{}{}",
        cred("cred_a", "sk-av-c-a-000000", &a.url(), "    max_concurrent: 2\n"),
        cred("cred_b", "sk-av-c-b-000000", &b.url(), "    max_concurrent: 2\n"),
    );
    let r = Router::start(&cfg);
    let burst = |n: usize| -> Vec<e2e::http::Response> {
        std::thread::scope(|s| {
            let hs: Vec<_> = (0..n).map(|_| s.spawn(|| r.chat("gpt-4o"))).collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        })
    };
    let first = burst(10);
    let ok = first.iter().filter(|x| x.status == 200).count();
    for x in first.iter().filter(|x| x.status != 200) {
        assert_eq!(x.status, 429, "{}", x.describe());
        assert!(x.header("retry-after").is_some(), "{}", x.describe());
    }
    for m in [&a, &b] {
        let st = m.mock.stats();
        assert!(st.max_in_flight <= 2, "{} had {} in flight", m.mock.settings().name, st.max_in_flight);
    }
    assert!(ok >= 4, "both keys' slots were used: {ok} answered");
    assert!(a.mock.stats().max_in_flight == 2 || b.mock.stats().max_in_flight == 2, "the cap was reached");
    // Every slot came back: four at once fit again.
    let second = burst(4);
    assert!(second.iter().all(|x| x.status == 200), "{:?}", second.iter().map(|x| x.status).collect::<Vec<_>>());
}

/// A VM that traps with a request in flight never gives that request's slot back (Envoy drops the
/// VM's contexts): the slot expires after `request_timeout` and the key serves again.
#[test]
fn a_slot_held_by_a_trapped_vm_comes_back_after_request_timeout() {
    let a = mock("a", "sk-av-t-a-000000", &["gpt-4o"]);
    let cfg = format!(
        "server:\n  master_key: \"{MASTER}\"\n  default_models_rpm: -1\n  max_provider_retries: 0\n  request_timeout: 3s\ncredentials:\n{}",
        cred("cred_a", "sk-av-t-a-000000", &a.url(), "    max_concurrent: 1\n"),
    );
    let r = Router::start_with(&cfg, e2e::harness::Options { wasm: e2e::harness::Wasm::Fault, ..Default::default() });
    assert_eq!(r.chat("gpt-4o").status, 200, "the slot is given back after an answer");
    // Routed (the slot taken), then the VM traps on the answer: the client gets a 5xx.
    let trapped = r.send(&e2e::http::Request::chat(MASTER, "gpt-4o").header("x-auto-ai-router-fault", "trap-response"));
    assert!(trapped.status >= 500, "{}", trapped.describe());
    let start = std::time::Instant::now();
    // Meanwhile the key is at its cap on every worker (429), until the slot expires.
    let mut first_ok = None;
    while start.elapsed() < std::time::Duration::from_secs(8) {
        let x = r.chat("gpt-4o");
        match x.status {
            200 => {
                first_ok = Some(start.elapsed());
                break;
            }
            429 | 503 => std::thread::sleep(std::time::Duration::from_millis(200)),
            s => panic!("{s}: {}", x.describe()),
        }
    }
    let back = first_ok.expect("the slot never came back");
    assert!(back >= std::time::Duration::from_millis(2000), "back after {back:?}: the trapped request's slot was not held");
}

/// `server.queue_timeout: 2s`: a request that finds the only key resting for 1 s waits and is
/// answered after about a second, instead of a 429; a rest longer than the wait is a 429 at once.
#[test]
fn a_request_waits_about_a_second_for_a_key_that_rests_a_second() {
    let a = mock("a", "sk-av-q-a-000000", &["gpt-4o"]);
    let cfg = format!(
        "server:\n  master_key: \"{MASTER}\"\n  default_models_rpm: -1\n  max_provider_retries: 0\n  queue_timeout: 2s\ncredentials:\n{}",
        cred("cred_a", "sk-av-q-a-000000", &a.url(), ""),
    );
    let r = Router::start(&cfg);
    control(&a, json!({"fail_next": 1, "fail_status": 429, "fail_headers": {"retry-after": "1"}}));
    assert_eq!(r.chat("gpt-4o").status, 429, "the provider's own 429: the key rests 1 s");
    let start = std::time::Instant::now();
    let waited = r.chat("gpt-4o");
    let took = start.elapsed();
    assert_eq!(waited.status, 200, "{}", waited.describe());
    assert!(took >= std::time::Duration::from_millis(700) && took < std::time::Duration::from_millis(1900), "answered after {took:?}");
    // Histograms reach /metrics at Envoy's stats flush (5 s).
    e2e::harness::wait_for("the queue wait histogram", std::time::Duration::from_secs(8), || {
        (r.metric("auto_ai_router_queue_wait_milliseconds_count", &[]).unwrap_or(0.0) >= 1.0).then_some(())
    });
    // A rest longer than the wait: today's 429, at once.
    control(&a, json!({"fail_next": 1, "fail_status": 429, "fail_headers": {"retry-after": "30"}}));
    assert_eq!(r.chat("gpt-4o").status, 429);
    let start = std::time::Instant::now();
    let refused = r.chat("gpt-4o");
    assert_eq!((refused.status, refused.header("x-mock-provider")), (429, None), "{}", refused.describe());
    assert!(start.elapsed() < std::time::Duration::from_millis(500), "refused at once, not after the wait");
}
