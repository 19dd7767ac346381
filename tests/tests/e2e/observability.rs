//! /health, /metrics and 404s on the public port.

use e2e::harness::{api_log, control, cred, metric_value, mock, wait_for, Router, MASTER};
use e2e::http::Request;
use serde_json::json;
use std::time::Duration;

#[test]
fn health_metrics_and_unknown_paths() {
    let a = mock("a", "sk-obs-a-00000", &["gpt-4o", "text-embedding-3-small"]);
    let b = mock("b", "sk-obs-b-00000", &["gpt-4o", "text-embedding-3-small"]);
    let cfg = format!(
        "server:\n  master_key: \"{MASTER}\"\n  default_models_rpm: -1\n  max_provider_retries: 0\ncredentials:\n{}{}fail2ban:\n  max_attempts: 3\n",
        cred("cred_a", "sk-obs-a-00000", &a.url(), 100),
        cred("cred_b", "sk-obs-b-00000", &b.url(), 100),
    );
    let r = Router::start(&cfg);
    let (status, h) = r.health();
    assert_eq!(status, 200);
    assert_eq!(h, json!({"credentials_available": 2, "credentials_banned": 0, "status": "healthy", "total_credentials": 2}));

    // Traffic with known outcomes: 4 chats + 2 embeddings alternate a/b; 2 auth and 1 bad body refusals.
    for _ in 0..4 {
        assert_eq!(r.chat("gpt-4o").status, 200);
    }
    for _ in 0..2 {
        let resp = r.send(&Request::post("/v1/embeddings").bearer(MASTER).json(&json!({"model": "text-embedding-3-small", "input": "hi"})));
        assert_eq!(resp.status, 200, "{}", resp.describe());
    }
    assert_eq!(r.send(&Request::chat("sk-wrong", "gpt-4o")).status, 401);
    assert_eq!(r.send(&Request::post("/v1/chat/completions").json(&json!({"model": "gpt-4o"}))).status, 401);
    assert_eq!(r.send(&Request::post("/v1/chat/completions").bearer(MASTER).body("nope")).status, 400);

    let m = r.metrics();
    for c in ["cred_a", "cred_b"] {
        let chat = [("credential", c), ("endpoint", "/v1/chat/completions"), ("status", "200")];
        assert_eq!(metric_value(&m, "auto_ai_router_requests_total", &chat), Some(2.0), "{c} chat\n{}", grep(&m));
        let emb = [("credential", c), ("endpoint", "/v1/embeddings"), ("status", "200")];
        assert_eq!(metric_value(&m, "auto_ai_router_requests_total", &emb), Some(1.0), "{c} embeddings");
        assert_eq!(metric_value(&m, "auto_ai_router_model_requests_total", &[("credential", c), ("model", "gpt-4o")]), Some(2.0));
        assert_eq!(
            metric_value(&m, "auto_ai_router_model_requests_total", &[("credential", c), ("model", "text-embedding-3-small")]),
            Some(1.0)
        );
        assert_eq!(api_log(if c == "cred_a" { &a } else { &b }).len(), 3);
    }
    assert_eq!(metric_value(&m, "auto_ai_router_rejections_total", &[("reason", "auth")]), Some(2.0));
    assert_eq!(metric_value(&m, "auto_ai_router_rejections_total", &[("reason", "bad_request")]), Some(1.0));
    // Gauges come from the filter's 1 s tick; the histogram from Envoy's stats flush (5 s).
    wait_for("the rpm and banned gauges", Duration::from_secs(5), || {
        let m = r.metrics();
        let v = |c| metric_value(&m, "auto_ai_router_credential_rpm_current", &[("credential", c)]);
        let banned = |c| metric_value(&m, "auto_ai_router_credential_banned", &[("credential", c)]);
        (v("cred_a") == Some(3.0) && v("cred_b") == Some(3.0) && banned("cred_a") == Some(0.0) && banned("cred_b") == Some(0.0))
            .then_some(())
    });
    wait_for("the duration histogram", Duration::from_secs(12), || {
        let m = r.metrics();
        let n = metric_value(
            &m,
            "auto_ai_router_requests_duration_milliseconds_count",
            &[("credential", "cred_a"), ("endpoint", "/v1/chat/completions")],
        );
        (n == Some(2.0)).then_some(())
    });

    // Ban both: /health says 503 unhealthy, requests get 503 and reach no provider.
    control(&a, json!({"fail_next": 3}));
    control(&b, json!({"fail_next": 3}));
    for _ in 0..6 {
        assert_eq!(r.chat("gpt-4o").status, 500);
    }
    let (status, h) = r.health();
    assert_eq!(status, 503);
    assert_eq!(h, json!({"credentials_available": 0, "credentials_banned": 2, "status": "unhealthy", "total_credentials": 2}));
    let resp = r.chat("gpt-4o");
    assert_eq!((resp.status, resp.error_code().as_deref()), (503, Some("no_credential_available")), "{}", resp.describe());
    assert_eq!(api_log(&a).len() + api_log(&b).len(), 12);
    let m = r.metrics();
    for c in ["cred_a", "cred_b"] {
        assert_eq!(metric_value(&m, "auto_ai_router_credential_banned", &[("credential", c)]), Some(1.0));
        assert_eq!(metric_value(&m, "auto_ai_router_credential_errors_total", &[("credential", c)]), Some(3.0));
    }
    assert_eq!(metric_value(&m, "auto_ai_router_rejections_total", &[("reason", "no_credential")]), Some(1.0));

    // Everything outside /v1/, /health and /metrics is a 404 JSON.
    for (method, path) in
        [("GET", "/"), ("GET", "/foo"), ("POST", "/v2/chat/completions"), ("GET", "/v1"), ("GET", "/healthz"), ("GET", "/metrics/x")]
    {
        let resp = r.send(&Request::new(method, path));
        assert_eq!(resp.status, 404, "{method} {path}: {}", resp.describe());
        assert_eq!(resp.error_type().as_deref(), Some("not_found_error"), "{method} {path}: {}", resp.describe());
        assert!(resp.header("content-type").unwrap_or("").starts_with("application/json"));
    }
}

fn grep(m: &str) -> String {
    m.lines().filter(|l| l.contains("auto_ai_router_")).collect::<Vec<_>>().join("\n")
}
