//! Round-robin over three credentials, observed at the mocks, and skipping a banned one.

use e2e::harness::{api_log, control, cred, mock, Router, MASTER};
use serde_json::json;

#[test]
fn round_robin_over_three_credentials_skips_a_banned_one() {
    let mocks =
        [mock("a", "sk-rr-a-000000", &["gpt-4o"]), mock("b", "sk-rr-b-000000", &["gpt-4o"]), mock("c", "sk-rr-c-000000", &["gpt-4o"])];
    let cfg = format!(
        "server:\n  master_key: \"{MASTER}\"\ncredentials:\n{}{}{}fail2ban:\n  max_attempts: 3\n  ban_duration: permanent\n  error_codes: [500]\n",
        cred("cred_a", "sk-rr-a-000000", &mocks[0].url(), -1),
        cred("cred_b", "sk-rr-b-000000", &mocks[1].url(), -1),
        cred("cred_c", "sk-rr-c-000000", &mocks[2].url(), -1),
    );
    let r = Router::start(&cfg);

    // Sequential requests: the answering mock (x-mock-provider) must cycle a, b, c in config order.
    let mut order = Vec::new();
    for _ in 0..12 {
        let resp = r.chat("gpt-4o");
        assert_eq!(resp.status, 200, "{}", resp.describe());
        order.push(resp.header("x-mock-provider").unwrap_or("?").to_string());
    }
    let names = ["a", "b", "c"];
    let start = names.iter().position(|n| *n == order[0]).expect("a known mock answered");
    let expected: Vec<String> = (0..12).map(|i| names[(start + i) % 3].to_string()).collect();
    assert_eq!(order, expected, "round-robin order in config order");
    for (m, key) in mocks.iter().zip(["sk-rr-a-000000", "sk-rr-b-000000", "sk-rr-c-000000"]) {
        let log = api_log(m);
        assert_eq!(log.len(), 4, "each credential gets a third: {log:?}");
        assert!(log.iter().all(|e| e.key == key));
    }

    // Ban b: its next three requests fail with 500; each is retried on another key, so the
    // client never sees them.
    control(&mocks[1], json!({"fail_next": 3, "fail_status": 500}));
    for _ in 0..9 {
        let resp = r.chat("gpt-4o");
        assert_eq!(resp.status, 200, "{}", resp.describe());
        assert_ne!(resp.header("x-mock-provider"), Some("b"), "{}", resp.describe());
    }
    let b_failures = api_log(&mocks[1]).iter().filter(|e| e.status == 500).count();
    assert_eq!(b_failures, 3, "b answered 500 three times");
    let (status, health) = r.health();
    assert_eq!((status, health["credentials_banned"].as_u64()), (200, Some(1)), "{health}");

    for m in &mocks {
        m.mock.reset_stats();
    }
    let mut order = Vec::new();
    for _ in 0..10 {
        let resp = r.chat("gpt-4o");
        assert_eq!(resp.status, 200, "{}", resp.describe());
        order.push(resp.header("x-mock-provider").unwrap_or("?").to_string());
    }
    assert_eq!(api_log(&mocks[1]).len(), 0, "a banned credential got traffic: {order:?}");
    assert_eq!((api_log(&mocks[0]).len(), api_log(&mocks[2]).len()), (5, 5), "a and c alternate: {order:?}");
    assert!(order.windows(2).all(|w| w[0] != w[1]), "a and c alternate strictly: {order:?}");
}
