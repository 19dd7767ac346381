//! The official `openai` Python client (pinned in mk/envoy.mk, installed into .venv) through the
//! router, as the README shows it.

use e2e::harness::{api_log, cred, mock, repo_root, wait_for, Router, MASTER};
use e2e::http::Request;
use serde_json::Value;
use std::process::Command;
use std::time::Duration;

#[test]
fn official_openai_python_client() {
    let python = repo_root().join(".venv/bin/python");
    assert!(python.is_file(), "{} is missing: run `make venv`", python.display());
    let a = mock("a", "sk-py-a-000000", &["gpt-4o", "gpt-4o-mini"]);
    let b = mock("b", "sk-py-b-000000", &["gpt-4o-mini", "text-embedding-3-small"]);
    let cfg = format!(
        "server:\n  master_key: \"{MASTER}\"\n  replace_v1_models: true\ncredentials:\n{}{}",
        cred("mock_a", "sk-py-a-000000", &a.url(), 60),
        cred("mock_b", "sk-py-b-000000", &format!("{}/v1", b.url()), -1),
    );
    let r = Router::start(&cfg);
    wait_for("both model lists", Duration::from_secs(20), || {
        let resp = r.send(&Request::get("/v1/models").bearer(MASTER));
        (resp.json()["data"].as_array().map(Vec::len) == Some(3)).then_some(())
    });
    let out = Command::new(&python)
        .arg(repo_root().join("tests/python/openai_client.py"))
        .arg(format!("http://{}/v1", r.addr))
        .arg(MASTER)
        .output()
        .expect("run python");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "the openai client failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{e}: {stdout}"));
    assert_eq!(v["openai_version"], "1.109.1");
    assert_eq!(v["chat"]["model"], "gpt-4o-mini");
    assert_eq!(v["chat"]["finish_reason"], "stop");
    assert!(v["chat"]["content"].as_str().unwrap().starts_with("Hello! This is "), "{v}");
    assert_eq!(v["stream"]["finish_reason"], "stop");
    assert!(v["stream"]["chunks"].as_u64().unwrap() >= 2, "{v}");
    assert_eq!(v["stream"]["content"], "Hello! This is a answering with gpt-4o.", "gpt-4o only on mock a");
    assert_eq!(v["models"], serde_json::json!(["gpt-4o", "gpt-4o-mini", "text-embedding-3-small"]));
    assert_eq!(v["wrong_key"]["status"], 401);
    assert_eq!(v["wrong_key"]["code"], "invalid_api_key");
    let total: usize = [&a, &b].iter().map(|m| api_log(m).len()).sum();
    assert_eq!(total, 2, "two completions reached the providers");
    assert!(api_log(&a).iter().any(|e| e.stream && e.model.as_deref() == Some("gpt-4o")));
}
