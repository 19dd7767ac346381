//! Secrets never show: not in the rendered bootstrap, not in the admin /config_dump, not in
//! Envoy's log (filter at debug level, access log on), not in error replies.

use e2e::harness::{control, mock, wait_for, Options, Router};
use e2e::http::Request;
use serde_json::json;
use std::time::Duration;

const MASTER_SECRET: &str = "sk-master-SECRET-5b1e0c7d9a2f4e68";
const KEY_A: &str = "sk-provA-SECRET-0d9c8b7a6f5e4d3c";
const KEY_B: &str = "sk-provB-SECRET-1a2b3c4d5e6f7a8b";
const KEY_C: &str = "sk-provC-LITERAL-9f8e7d6c5b4a3f2e";

#[test]
fn keys_stay_out_of_config_dump_and_logs() {
    let a = mock("a", KEY_A, &["gpt-4o"]);
    let b = mock("b", KEY_B, &["gpt-4o"]);
    let c = mock("c", KEY_C, &["gpt-4o"]);
    let cfg = format!(
        "server:\n  master_key: os.environ/E2E_SECRET_MASTER\n  logging_level: debug\n  replace_v1_models: true\n\
         credentials:\n\
         \x20 - name: cred_a\n    api_key: os.environ/E2E_SECRET_KEY_A\n    base_url: \"{}\"\n    rpm: 100\n\
         \x20 - name: cred_b\n    api_key: \"os.environ/E2E_SECRET_KEY_B\"\n    base_url: \"{}\"\n    rpm: 100\n\
         \x20 - name: cred_c\n    api_key: \"{KEY_C}\"\n    base_url: \"{}\"\n    rpm: 100\n",
        a.url(),
        b.url(),
        c.url()
    );
    let env = vec![
        ("E2E_SECRET_MASTER".to_string(), MASTER_SECRET.to_string()),
        ("E2E_SECRET_KEY_A".to_string(), KEY_A.to_string()),
        ("E2E_SECRET_KEY_B".to_string(), KEY_B.to_string()),
    ];
    let r = Router::start_with(&cfg, Options { env, ..Options::default() });

    // Exercise the paths that log: success, wrong keys (incl. a provider key as master key), a
    // ban, model fetches, /v1/models.
    for _ in 0..3 {
        assert_eq!(r.send(&Request::chat(MASTER_SECRET, "gpt-4o")).status, 200);
    }
    for wrong in [KEY_A, &MASTER_SECRET[..MASTER_SECRET.len() - 1], "sk-totally-wrong"] {
        let resp = r.send(&Request::chat(wrong, "gpt-4o"));
        assert_eq!(resp.status, 401);
        assert!(!resp.text().contains(wrong), "a 401 echoes the key: {}", resp.text());
    }
    // A client that puts the master key in the query string (as some SDKs do with `?key=`) is
    // refused, and the key must not end up in the access log either.
    let resp = r.send(&Request::post(&format!("/v1/chat/completions?api_key={MASTER_SECRET}")).body("{}"));
    assert_eq!(resp.status, 401);
    control(&b, json!({"fail_next": 3, "fail_status": 401}));
    for _ in 0..9 {
        r.send(&Request::chat(MASTER_SECRET, "gpt-4o"));
    }
    assert_eq!(r.health().1["credentials_banned"], 1);
    let list = r.send(&Request::get("/v1/models").bearer(MASTER_SECRET));
    assert_eq!(list.status, 200);

    let secrets = [MASTER_SECRET, KEY_A, KEY_B, KEY_C];
    let dump = r.admin_get("/config_dump?include_eds");
    assert_eq!(dump.status, 200);
    assert!(dump.text().contains("os.environ/E2E_SECRET_MASTER"), "config_dump has the plugin configuration (with references)");
    let bootstrap = std::fs::read_to_string(&r.bootstrap).unwrap();
    // Envoy flushes the stdout access log periodically: wait for the last request's line.
    let log = wait_for("the access log to be flushed", Duration::from_secs(15), || {
        let log = r.log();
        log.contains("\"GET /v1/models").then_some(log)
    });
    assert!(log.contains("configured 3 credentials"), "the filter logged at start:\n{log}");
    assert!(log.contains("/v1/chat/completions"), "the access log is on");
    let mut leaks = Vec::new();
    for s in secrets {
        // Not even a 12-character prefix (masking keeps 7 characters).
        let p = &s[..12];
        for (what, text) in
            [("admin /config_dump", dump.text()), ("the rendered bootstrap", bootstrap.clone()), ("Envoy's log", log.clone())]
        {
            if text.contains(p) {
                let lines: Vec<&str> = text.lines().filter(|l| l.contains(p)).take(3).collect();
                leaks.push(format!("{what} contains {p}...: {lines:?}"));
            }
        }
    }
    assert!(leaks.is_empty(), "secrets leaked:\n{}", leaks.join("\n"));
    // The providers saw only their own keys; never the master key.
    for (m, key) in [(&a, KEY_A), (&b, KEY_B), (&c, KEY_C)] {
        let st = m.mock.stats();
        assert!(st.log.iter().all(|e| e.key == key), "{:?}", st.by_key);
        assert!(!serde_json::to_string(&st).unwrap().contains(MASTER_SECRET));
    }
}
