//! Fail-closed: with the test-only fault build (`make wasm-fault`), a request carrying
//! `x-auto-ai-router-fault: trap` makes the filter panic (a wasm trap). The bootstrap's
//! `failure_policy: FAIL_RELOAD` must fail that request with a 5xx — never pass it upstream
//! unauthenticated — and the gateway must serve again, auth still enforced.
//!
//! Measured on Envoy 1.40: after a trap, the worker's VM is reloaded only after the reload backoff
//! (`PluginConfig.reload_config`, default base interval 1 s); until then that worker answers 503
//! (Envoy's reply has an empty body; the bootstrap's local-reply mapper, matching its response code
//! details `wasm_fail_stream`, gives it OpenAI's JSON error shape). The test asserts that every
//! request in that window is refused with that JSON and reaches no provider, and that service is
//! back within a bounded time.

use e2e::harness::{api_log, cred, mock, Options, Router, Wasm, MASTER};
use e2e::http::{Request, Response};
use std::time::{Duration, Instant};

/// How long a worker may stay failed after a trap before the VM must have been reloaded.
const RECOVERY_BOUND: Duration = Duration::from_secs(4);

/// The wasm failure policy's 503 (Envoy sends it with an empty body) as the bootstrap's local-reply
/// mapper rewrites it: OpenAI's JSON error shape, so SDKs show a message instead of a parse error.
fn assert_router_unavailable(x: &Response, what: &str) {
    assert_eq!(x.status, 503, "{what}: {}", x.describe());
    assert!(x.header("content-type").unwrap_or("").starts_with("application/json"), "{what}: {}", x.describe());
    assert_eq!(x.error_type().as_deref(), Some("service_unavailable_error"), "{what}: {}", x.describe());
    assert_eq!(x.error_code().as_deref(), Some("router_unavailable"), "{what}: {}", x.describe());
    assert!(x.json()["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{what}: {}", x.describe());
}

#[test]
fn a_trap_fails_closed_and_the_vm_reloads() {
    let a = mock("a", "sk-fault-a-0000", &["gpt-4o"]);
    let cfg = format!("server:\n  master_key: \"{MASTER}\"\ncredentials:\n{}", cred("cred_a", "sk-fault-a-0000", &a.url(), -1));
    let r = Router::start_with(&cfg, Options { wasm: Wasm::Fault, ..Options::default() });
    assert_eq!(r.chat("gpt-4o").status, 200, "the fault build serves normally without the header");
    a.mock.reset_stats();

    for round in 0..2 {
        // With and without a valid key: the trap never becomes a pass-through.
        for req in [
            Request::chat(MASTER, "gpt-4o").header("x-auto-ai-router-fault", "trap"),
            Request::chat("sk-not-the-key", "gpt-4o").header("x-auto-ai-router-fault", "trap"),
            Request::post("/v1/chat/completions").header("x-auto-ai-router-fault", "trap").body("{\"model\":\"gpt-4o\"}"),
        ] {
            match req.send(r.addr) {
                Ok(x) => assert_router_unavailable(&x, &format!("round {round}: a trap")),
                Err(e) => panic!("round {round}: a trap closed the connection without a reply ({e}); expected a 5xx"),
            }
            assert_eq!(api_log(&a).len(), 0, "round {round}: a trapped request reached the provider");
        }
        // Until each worker's VM is reloaded: refused (5xx) with or without a key, never
        // forwarded. Fresh connections land on either worker, and a VM that crashed again waits
        // out a longer reload backoff: wait for 8 good pairs in a row, 60 ms apart (≈ 0.5 s of
        // both workers serving; 4 pairs at once could all land on the healthy worker).
        let start = Instant::now();
        let (mut refused, mut served, mut good_in_a_row) = (0, 0, 0);
        while good_in_a_row < 8 {
            let unauth = r.send(&Request::post("/v1/chat/completions").body("{\"model\":\"gpt-4o\"}"));
            let ok = r.chat("gpt-4o");
            for x in [&unauth, &ok] {
                assert!(
                    (500..600).contains(&x.status)
                        || x.status == 401 && std::ptr::eq(x, &unauth)
                        || x.status == 200 && std::ptr::eq(x, &ok),
                    "round {round}: {}",
                    x.describe()
                );
            }
            for x in [&unauth, &ok] {
                if (500..600).contains(&x.status) {
                    assert_router_unavailable(x, &format!("round {round}: in the reload window"));
                }
            }
            served += (ok.status == 200) as usize;
            refused += (ok.status != 200) as usize + (unauth.status != 401) as usize;
            good_in_a_row = if ok.status == 200 && unauth.status == 401 { good_in_a_row + 1 } else { 0 };
            assert_eq!(api_log(&a).len(), served, "round {round}: a refused request reached the provider");
            assert!(start.elapsed() < RECOVERY_BOUND, "round {round}: still failing after {RECOVERY_BOUND:?} ({refused} refused)");
            std::thread::sleep(Duration::from_millis(60));
        }
        eprintln!("round {round}: served again after {:?} ({refused} refused in the reload window)", start.elapsed());
        a.mock.reset_stats();
        // Served normally, auth still enforced, on both workers (several fresh connections).
        for _ in 0..6 {
            assert_eq!(r.chat("gpt-4o").status, 200, "round {round}");
            let denied = r.send(&Request::chat("sk-not-the-key", "gpt-4o"));
            assert_eq!(
                (denied.status, denied.error_code().as_deref()),
                (401, Some("invalid_api_key")),
                "round {round}: {}",
                denied.describe()
            );
        }
        let log = api_log(&a);
        assert_eq!(log.len(), 6, "round {round}: only the authorised requests reached the provider");
        assert!(log.iter().all(|e| e.key == "sk-fault-a-0000"));
        a.mock.reset_stats();
    }
    assert_eq!(r.health().0, 200);
}
