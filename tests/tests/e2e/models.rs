//! Model lists: the merged GET /v1/models, /v1/models/{id}, and model-aware routing.

use e2e::harness::{api_log, control, cred, mock, wait_for, Router, MASTER};
use e2e::http::Request;
use serde_json::{json, Value};
use std::time::Duration;

#[test]
fn merged_models_and_model_aware_routing() {
    let a = mock("a", "sk-mod-a-00000", &["gpt-4o", "shared-model"]);
    let b = mock("b", "sk-mod-b-00000", &["shared-model", "claude-3"]);
    let cfg = format!(
        "server:\n  master_key: \"{MASTER}\"\n  replace_v1_models: true\n  models_refresh: 2s\ncredentials:\n{}{}",
        cred("cred_a", "sk-mod-a-00000", &a.url(), -1),
        cred("cred_b", "sk-mod-b-00000", &format!("{}/v1", b.url()), -1),
    );
    let r = Router::start(&cfg);
    let list_req = Request::get("/v1/models").bearer(MASTER);
    // The lists are fetched at start; wait (bounded) until both arrived.
    let list: Value = wait_for("both model lists", Duration::from_secs(20), || {
        let resp = r.send(&list_req);
        (resp.status == 200 && resp.json()["data"].as_array().map(Vec::len) == Some(3)).then(|| resp.json())
    });
    assert_eq!(list["object"], "list");
    let ids: Vec<&str> = list["data"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["claude-3", "gpt-4o", "shared-model"], "the union, de-duplicated and sorted by id");
    for m in list["data"].as_array().unwrap() {
        assert_eq!(m["object"], "model");
        assert!(m["created"].is_u64() && m["owned_by"].is_string(), "{m}");
    }
    assert_eq!(list["data"][2]["owned_by"], "a", "taken from the first credential that listed it");
    // Each fetch used that credential's own key, on its own mock.
    for (m, key) in [(&a, "sk-mod-a-00000"), (&b, "sk-mod-b-00000")] {
        let fetches: Vec<_> = m.mock.stats().log.into_iter().filter(|e| e.path == "/v1/models").collect();
        assert!(!fetches.is_empty() && fetches.iter().all(|e| e.key == key && e.method == "GET"), "{fetches:?}");
    }
    assert_eq!(api_log(&a).len() + api_log(&b).len(), 0, "the merged list is answered by the router, not a provider");

    // /v1/models/{id}
    let one = r.send(&Request::get("/v1/models/claude-3").bearer(MASTER));
    assert_eq!(one.status, 200, "{}", one.describe());
    assert_eq!(
        (one.json()["id"].as_str(), one.json()["owned_by"].as_str(), one.json()["object"].as_str()),
        (Some("claude-3"), Some("b"), Some("model"))
    );
    let none = r.send(&Request::get("/v1/models/nope-9").bearer(MASTER));
    assert_eq!(none.status, 404, "{}", none.describe());
    assert_eq!(
        (none.error_type().as_deref(), none.error_code().as_deref()),
        (Some("invalid_request_error"), Some("model_not_found")),
        "as OpenAI answers it"
    );
    let unauth = r.send(&Request::get("/v1/models"));
    assert_eq!((unauth.status, unauth.error_code().as_deref()), (401, Some("missing_api_key")), "the list needs the master key");

    // Routing follows the lists, at most a second late on each worker (their index reloads on the
    // 1 s tick; README): wait one tick so both workers route on them.
    std::thread::sleep(Duration::from_millis(1100));
    for _ in 0..5 {
        assert_eq!(r.chat("claude-3").header("x-mock-provider"), Some("b"));
        assert_eq!(r.chat("gpt-4o").header("x-mock-provider"), Some("a"));
    }
    for _ in 0..4 {
        assert_eq!(r.chat("shared-model").status, 200);
    }
    let count = |m: &e2e::mock::BackgroundMock, model: &str| api_log(m).iter().filter(|e| e.model.as_deref() == Some(model)).count();
    assert_eq!((count(&a, "gpt-4o"), count(&b, "gpt-4o")), (5, 0));
    assert_eq!((count(&a, "claude-3"), count(&b, "claude-3")), (0, 5));
    assert_eq!((count(&a, "shared-model"), count(&b, "shared-model")), (2, 2), "a shared model is balanced");

    // A model no credential lists: OpenAI's 404 model_not_found, as a provider would answer it.
    let unknown = r.chat("no-such-model");
    assert_eq!(unknown.status, 404, "{}", unknown.describe());
    assert_eq!(
        (unknown.error_type().as_deref(), unknown.error_code().as_deref()),
        (Some("invalid_request_error"), Some("model_not_found"))
    );
    assert_eq!(api_log(&a).len() + api_log(&b).len(), 14, "an unknown model reaches no provider");

    // Refresh (models_refresh: 2s): a new model on a appears; b's list fetch now fails (500) and
    // its last good list is kept.
    control(&a, json!({"models": ["gpt-4o", "shared-model", "gpt-new"]}));
    control(&b, json!({"fault_scope": "all", "fail_every": 1, "fail_status": 500}));
    let list: Value = wait_for("the refreshed list", Duration::from_secs(15), || {
        let resp = r.send(&list_req);
        let v = resp.json();
        let has_new = v["data"].as_array().is_some_and(|d| d.iter().any(|m| m["id"] == "gpt-new"));
        let b_failed = b.mock.stats().log.iter().any(|e| e.path == "/v1/models" && e.status == 500);
        (has_new && b_failed).then_some(v)
    });
    let ids: Vec<&str> = list["data"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["claude-3", "gpt-4o", "gpt-new", "shared-model"], "b's last good list is kept after a failed fetch");
    std::thread::sleep(Duration::from_millis(1100)); // one tick: both workers route on the new lists
    control(&b, json!({"fault_scope": "inference", "fail_every": 0}));
    for _ in 0..3 {
        assert_eq!(r.chat("gpt-new").header("x-mock-provider"), Some("a"));
        assert_eq!(r.chat("claude-3").header("x-mock-provider"), Some("b"));
    }
}
