//! Authentication: the three 401s, the key swap, and no client routing.

use e2e::harness::{api_log, cred, mock, Router, MASTER};
use e2e::http::Request;
use serde_json::json;

#[test]
fn auth_three_401s_key_swap_and_no_client_routing() {
    let a = mock("a", "sk-prov-a-1111111111", &["gpt-4o"]);
    let b = mock("b", "sk-prov-b-2222222222", &["gpt-4o"]);
    let cfg = format!(
        "server:\n  master_key: \"{MASTER}\"\ncredentials:\n{}{}",
        cred("cred_a", "sk-prov-a-1111111111", &a.url(), -1),
        cred("cred_b", "sk-prov-b-2222222222", &format!("{}/v1", b.url()), -1)
    );
    let r = Router::start(&cfg);
    let body = json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]});

    // The three distinct 401s; none reaches a provider.
    let cases = [
        (Request::post("/v1/chat/completions").json(&body), "missing_api_key"),
        (
            Request::post("/v1/chat/completions").header("Authorization", &format!("Basic {MASTER}")).json(&body),
            "invalid_authorization_header",
        ),
        (Request::post("/v1/chat/completions").bearer("sk-e2e-wrong-key").json(&body), "invalid_api_key"),
    ];
    let mut messages = Vec::new();
    for (req, code) in &cases {
        let resp = r.send(req);
        assert_eq!(resp.status, 401, "{code}: {}", resp.describe());
        assert_eq!(resp.error_code().as_deref(), Some(*code), "{}", resp.describe());
        assert_eq!(resp.error_type().as_deref(), Some("authentication_error"));
        assert!(resp.header("content-type").unwrap_or("").starts_with("application/json"));
        assert!(!resp.text().contains(MASTER) && !resp.text().contains("sk-e2e-wrong-key"), "a 401 echoes a key: {}", resp.text());
        messages.push(resp.json()["error"]["message"].as_str().unwrap().to_string());
    }
    messages.sort();
    messages.dedup();
    assert_eq!(messages.len(), 3, "the three 401 messages must differ: {messages:?}");
    assert_eq!(a.mock.stats().total + b.mock.stats().total, 0, "a refused request reached a provider");

    // Authorised requests: each provider sees only its own key, never the master key, and its own
    // authority; the path gets the base_url's prefix (b has "/v1" stripped).
    for _ in 0..4 {
        let resp = r.chat("gpt-4o");
        assert_eq!(resp.status, 200, "{}", resp.describe());
    }
    for (m, key) in [(&a, "sk-prov-a-1111111111"), (&b, "sk-prov-b-2222222222")] {
        let log = api_log(m);
        assert_eq!(log.len(), 2, "round-robin over two credentials: {log:?}");
        assert!(log.iter().all(|e| e.key == key && e.path == "/v1/chat/completions"), "{log:?}");
        let last = m.mock.stats().last_request.unwrap();
        let text = last.to_string();
        assert!(!text.contains(MASTER), "the provider saw the master key: {text}");
        assert_eq!(last["headers"]["authorization"], format!("Bearer {key}"));
        assert_eq!(last["headers"]["host"].as_str().unwrap(), m.addr.to_string(), ":authority is the provider's");
    }

    // The header that once picked the cluster steers nothing (no route reads a header), and a
    // client's x-api-key never leaks upstream.
    a.mock.reset_stats();
    b.mock.reset_stats();
    for _ in 0..6 {
        let resp =
            r.send(&Request::chat(MASTER, "gpt-4o").header("x-auto-ai-router-cluster", "cred_a").header("x-api-key", "sk-smuggled-key"));
        assert_eq!(resp.status, 200, "{}", resp.describe());
    }
    let (na, nb) = (api_log(&a).len(), api_log(&b).len());
    assert_eq!((na, nb), (3, 3), "client routing header steered traffic: a={na} b={nb}");
    for m in [&a, &b] {
        let last = m.mock.stats().last_request.unwrap();
        assert!(last["headers"].get("x-api-key").is_none(), "client x-api-key reached the provider: {last}");
    }
    // Without a valid key the header doesn't help either.
    let resp = r.send(&Request::chat("sk-nope", "gpt-4o").header("x-auto-ai-router-cluster", "cred_a"));
    assert_eq!(resp.status, 401);
    assert_eq!(api_log(&a).len() + api_log(&b).len(), 6);
}
