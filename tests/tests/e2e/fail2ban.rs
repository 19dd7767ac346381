//! fail2ban over the wire: provider 500s, a refused connection and an upstream timeout each ban a
//! credential; traffic moves; /health and the metrics say so; a timed ban lifts by itself.
//! With `max_provider_retries: 0`, so each failure reaches the client (retries: `retry.rs`).

use e2e::harness::{api_log, closed_port, control, cred, metric_value, mock, wait_for, Router, MASTER};
use serde_json::json;
use std::time::{Duration, Instant};

#[test]
fn three_500s_ban_and_a_2s_ban_lifts() {
    let a = mock("a", "sk-f2b-a-00000", &["gpt-4o"]);
    let b = mock("b", "sk-f2b-b-00000", &["gpt-4o"]);
    let cfg = format!(
        "server:\n  master_key: \"{MASTER}\"\n  max_provider_retries: 0\ncredentials:\n{}{}fail2ban:\n  max_attempts: 3\n  ban_duration: 2s\n  error_codes: [500, 502, 503, 504]\n",
        cred("cred_a", "sk-f2b-a-00000", &a.url(), -1),
        cred("cred_b", "sk-f2b-b-00000", &b.url(), -1),
    );
    let r = Router::start(&cfg);
    control(&a, json!({"fail_next": 3, "fail_status": 500}));
    let mut fails = 0;
    let mut banned_at = None;
    for _ in 0..6 {
        let resp = r.chat("gpt-4o");
        if resp.status == 500 {
            fails += 1;
            if fails == 3 {
                banned_at = Some(Instant::now());
            }
        } else {
            assert_eq!(resp.status, 200, "{}", resp.describe());
        }
    }
    assert_eq!(fails, 3);
    let banned_at = banned_at.unwrap();
    let (status, h) = r.health();
    assert_eq!(status, 200);
    assert_eq!(h, json!({"credentials_available": 1, "credentials_banned": 1, "status": "healthy", "total_credentials": 2}));
    let m = r.metrics();
    assert_eq!(metric_value(&m, "auto_ai_router_credential_banned", &[("credential", "cred_a")]), Some(1.0), "banned gauge");
    assert_eq!(metric_value(&m, "auto_ai_router_credential_banned", &[("credential", "cred_b")]).unwrap_or(0.0), 0.0);
    assert_eq!(metric_value(&m, "auto_ai_router_credential_errors_total", &[("credential", "cred_a")]), Some(3.0));
    assert_eq!(metric_value(&m, "auto_ai_router_requests_total", &[("credential", "cred_a"), ("status", "500")]), Some(3.0));

    // While banned, everything goes to b.
    let before = api_log(&a).len();
    for _ in 0..4 {
        let resp = r.chat("gpt-4o");
        assert_eq!((resp.status, resp.header("x-mock-provider")), (200, Some("b")), "{}", resp.describe());
    }
    assert_eq!(api_log(&a).len(), before, "a banned credential got traffic");

    // The 2 s ban lifts by itself.
    wait_for("the 2 s ban to lift", Duration::from_secs(8), || (r.health().1["credentials_banned"] == 0).then_some(()));
    let lifted = banned_at.elapsed();
    assert!(lifted >= Duration::from_millis(1500), "the ban lifted after {lifted:?}, before its 2 s");
    a.mock.reset_stats();
    for _ in 0..4 {
        assert_eq!(r.chat("gpt-4o").status, 200);
    }
    assert_eq!(api_log(&a).len(), 2, "a is back in the rotation");
    wait_for("the banned gauge back to 0", Duration::from_secs(5), || {
        (metric_value(&r.metrics(), "auto_ai_router_credential_banned", &[("credential", "cred_a")]) == Some(0.0)).then_some(())
    });
}

#[test]
fn a_refused_connection_counts_and_bans() {
    let a = mock("a", "sk-f2b-up-0000", &["gpt-4o"]);
    let dead = format!("http://127.0.0.1:{}", closed_port());
    let cfg = format!(
        "server:\n  master_key: \"{MASTER}\"\n  max_provider_retries: 0\ncredentials:\n{}{}fail2ban:\n  max_attempts: 3\n",
        cred("up", "sk-f2b-up-0000", &a.url(), -1),
        cred("dead", "sk-f2b-dead-000", &dead, -1),
    );
    let r = Router::start(&cfg);
    let mut refused = 0;
    for _ in 0..6 {
        let resp = r.chat("gpt-4o");
        if resp.status != 200 {
            refused += 1;
            assert_eq!(resp.status, 503, "{}", resp.describe());
            assert_eq!(
                resp.error_type().as_deref(),
                Some("service_unavailable_error"),
                "Envoy's reply is OpenAI JSON: {}",
                resp.describe()
            );
        }
    }
    assert_eq!(refused, 3, "every other request went to the dead credential until its ban");
    let (_, h) = r.health();
    assert_eq!(h["credentials_banned"], 1, "{h}");
    let m = r.metrics();
    assert_eq!(
        metric_value(&m, "auto_ai_router_requests_total", &[("credential", "dead"), ("status", "502")]),
        Some(3.0),
        "a connect failure counts as 502"
    );
    assert_eq!(metric_value(&m, "auto_ai_router_credential_errors_total", &[("credential", "dead")]), Some(3.0));
    for _ in 0..4 {
        assert_eq!(r.chat("gpt-4o").status, 200);
    }
    assert_eq!(api_log(&a).len(), 7);
}

#[test]
fn request_timeout_gives_504_and_counts_for_fail2ban() {
    let slow = mock("slow", "sk-f2b-slow-000", &["gpt-4o"]);
    let fast = mock("fast", "sk-f2b-fast-000", &["gpt-4o"]);
    // 4 s rather than 3: on a loaded 2-core machine Envoy's first request on a worker can take a
    // while to reach the router filter, and the bound below must still separate "timed out" from
    // "waited for the provider".
    control(&slow, json!({"delay_ms": 4000}));
    let cfg = format!(
        "server:\n  master_key: \"{MASTER}\"\n  request_timeout: 1s\n  max_provider_retries: 0\ncredentials:\n{}{}fail2ban:\n  max_attempts: 2\n",
        cred("slow", "sk-f2b-slow-000", &slow.url(), -1),
        cred("fast", "sk-f2b-fast-000", &fast.url(), -1),
    );
    let r = Router::start(&cfg);
    let mut timeouts = 0;
    for _ in 0..4 {
        let resp = r.chat("gpt-4o");
        if resp.status == 504 {
            timeouts += 1;
            assert_eq!(resp.error_code().as_deref(), Some("upstream_timeout"), "{}", resp.describe());
            assert!(
                resp.elapsed >= Duration::from_millis(900) && resp.elapsed < Duration::from_millis(3800),
                "504 after {:?}: not the 1 s route timeout",
                resp.elapsed
            );
        } else {
            assert_eq!((resp.status, resp.header("x-mock-provider")), (200, Some("fast")), "{}", resp.describe());
        }
    }
    assert_eq!(timeouts, 2);
    let (_, h) = r.health();
    assert_eq!(h["credentials_banned"], 1, "two timeouts ban with max_attempts 2: {h}");
    let m = r.metrics();
    assert_eq!(metric_value(&m, "auto_ai_router_requests_total", &[("credential", "slow"), ("status", "504")]), Some(2.0));
    assert_eq!(metric_value(&m, "auto_ai_router_credential_errors_total", &[("credential", "slow")]), Some(2.0));
    for _ in 0..3 {
        let resp = r.chat("gpt-4o");
        assert_eq!((resp.status, resp.header("x-mock-provider")), (200, Some("fast")));
    }
}

/// Envoy's own circuit-breaker overflow on a credential's cluster (`UO`) is load on our side, not
/// the provider failing: it bans no key, with retries on and off, and counts as its own reason.
#[test]
fn a_circuit_breaker_overflow_is_never_a_strike() {
    fn one_request_at_a_time(b: &mut serde_json::Value) {
        for c in b["static_resources"]["clusters"].as_array_mut().unwrap() {
            if c["name"] == "cred_a" {
                c["circuit_breakers"]["thresholds"][0]["max_requests"] = json!(1);
                c["circuit_breakers"]["thresholds"][0]["max_pending_requests"] = json!(1);
            }
        }
    }
    for retries in [0, 2] {
        let a = mock("a", "sk-f2b-uo-a-000", &["gpt-4o"]);
        control(&a, json!({"delay_ms": 400}));
        let cfg = format!(
            "server:\n  master_key: \"{MASTER}\"\n  max_provider_retries: {retries}\ncredentials:\n{}fail2ban:\n  max_attempts: 2\n  error_codes: [500, 502, 503, 504]\n",
            cred("cred_a", "sk-f2b-uo-a-000", &a.url(), -1),
        );
        let o =
            e2e::harness::Options { edit_bootstrap: Some(e2e::harness::BootstrapEdit::new(one_request_at_a_time)), ..Default::default() };
        let r = Router::start_with(&cfg, o);
        let statuses: Vec<u16> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..8).map(|_| s.spawn(|| r.chat("gpt-4o").status)).collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let overflowed = statuses.iter().filter(|s| **s == 503).count();
        assert!(overflowed >= 2, "retries {retries}: the breaker never overflowed: {statuses:?}");
        assert!(statuses.contains(&200), "{statuses:?}");
        let (_, h) = r.health();
        assert_eq!(h["credentials_banned"], 0, "retries {retries}: an overflow banned the key ({statuses:?}): {h}");
        let resp = r.chat("gpt-4o");
        assert_eq!(resp.status, 200, "retries {retries}: {}", resp.describe());
        if retries == 0 {
            let n = r.metric("auto_ai_router_rejections_total", &[("reason", "upstream_overflow")]);
            assert_eq!(n, Some(overflowed as f64), "{statuses:?}");
        }
    }
}

/// A 429 that says "now" (`Retry-After: 0`, an HTTP date gone by, `x-ratelimit-reset-requests:
/// 0s`) rests the key for `cooldown_default` and is no strike: three of them at once ban nothing
/// (they were one strike each, a ban, before).
#[test]
fn three_429s_that_say_now_rest_the_key_and_ban_nothing() {
    let a = mock("a", "sk-f2b-ra0-a-000", &["gpt-4o"]);
    let cfg = format!(
        "server:\n  master_key: \"{MASTER}\"\n  max_provider_retries: 0\n  cooldown_default: 1s\ncredentials:\n{}fail2ban:\n  max_attempts: 3\n",
        cred("cred_a", "sk-f2b-ra0-a-000", &a.url(), -1),
    );
    let r = Router::start(&cfg);
    for hint in
        [json!({"retry-after": "0"}), json!({"retry-after": "Sun, 06 Nov 1994 08:49:37 GMT"}), json!({"x-ratelimit-reset-requests": "0s"})]
    {
        control(&a, json!({"fail_next": 3, "fail_status": 429, "fail_headers": hint, "delay_ms": 300}));
        let statuses: Vec<(u16, Option<String>)> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..3).map(|_| s.spawn(|| r.chat("gpt-4o"))).collect();
            hs.into_iter().map(|h| h.join().unwrap()).map(|x| (x.status, x.header("x-mock-provider").map(str::to_string))).collect()
        });
        assert!(statuses.iter().all(|(s, p)| *s == 429 && p.as_deref() == Some("a")), "{hint}: the provider's own 429s: {statuses:?}");
        let (_, h) = r.health();
        assert_eq!(h["credentials_banned"], 0, "{hint}: banned after three 429s: {h}");
        // Resting (the router's own 429 with Retry-After), then back after cooldown_default.
        let rest = r.chat("gpt-4o");
        assert_eq!((rest.status, rest.header("x-mock-provider")), (429, None), "{hint}: {}", rest.describe());
        control(&a, json!({"delay_ms": 0}));
        std::thread::sleep(Duration::from_millis(1100));
        let ok = r.chat("gpt-4o");
        assert_eq!(ok.status, 200, "{hint}: {}", ok.describe());
    }
    assert_eq!(r.metric("auto_ai_router_credential_errors_total", &[("credential", "cred_a")]).unwrap_or(0.0), 0.0, "no strike counted");
}
