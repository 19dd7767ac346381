//! Shared gateways (issue 20): the router on a gateway shaped the way Istio builds one — each
//! host its own virtual host on the port, other apps beside it, one of them a catch-all `*` — with
//! retries on and off and a `base_url` with a path. A request the router owns is forwarded only by
//! the router's own route, to the cluster the filter chose: no other app ever sees a provider key,
//! and no client header picks a credential's cluster.

use e2e::harness::{control, hcm, mock, BootstrapEdit, Options, Router, MASTER};
use e2e::http::Request;
use e2e::mock::BackgroundMock;
use serde_json::{json, Value};

const KEY_A: &str = "sk-gw-prov-a-111111111";
const KEY_B: &str = "sk-gw-prov-b-222222222";
const HOST: &str = "ai.example.com";

fn config(retries: u32, creds: &str) -> String {
    format!(
        "server:\n  master_key: \"{MASTER}\"\n  hosts: [{HOST}]\n  max_provider_retries: {retries}\n  default_models_rpm: -1\ncredentials:\n{creds}"
    )
}

fn cred(name: &str, key: &str, url: &str) -> String {
    format!("  - name: {name}\n    api_key: \"{key}\"\n    base_url: \"{url}\"\n    rpm: -1\n")
}

/// The rendered bootstrap reshaped as Istio's gateway: the router's virtual host named and
/// matched as Istio names a Gateway host, then another app's host and a catch-all `*` host, both
/// routed to the other app's backend (a recording mock) on the same port.
fn istio_shaped(other: std::net::SocketAddr) -> BootstrapEdit {
    BootstrapEdit::new(move |b: &mut Value| {
        let vhosts = hcm(b)["route_config"]["virtual_hosts"].as_array_mut().expect("virtual hosts");
        vhosts[0]["name"] = json!(format!("{HOST}:80"));
        vhosts[0]["domains"] = json!([HOST, format!("{HOST}:*")]);
        let other_route = json!([{"match": {"prefix": "/"}, "route": {"cluster": "other_app"}}]);
        vhosts.push(json!({"name": "shop.example.com:80", "domains": ["shop.example.com", "shop.example.com:*"], "routes": other_route}));
        vhosts.push(json!({"name": "*:80", "domains": ["*"], "routes": other_route}));
        b["static_resources"]["clusters"].as_array_mut().expect("clusters").push(json!({
            "name": "other_app", "type": "STATIC", "connect_timeout": "1s",
            "load_assignment": {"cluster_name": "other_app", "endpoints": [{"lb_endpoints": [{"endpoint": {
                "address": {"socket_address": {"address": other.ip().to_string(), "port_value": other.port()}}}}]}]},
        }));
    })
}

/// Nothing the other app received carries a provider key.
fn assert_no_key_reached(other: &BackgroundMock, what: &str) {
    let stats = other.mock.stats();
    let text = serde_json::to_string(&stats.log).unwrap() + &stats.last_request.map(|v| v.to_string()).unwrap_or_default();
    for key in [KEY_A, KEY_B] {
        assert!(!text.contains(key), "{what}: a provider key reached the other app: {text}");
    }
}

#[test]
fn on_an_istio_shaped_gateway_chats_reach_only_the_providers_with_retries_on_and_off() {
    for retries in [0, 2] {
        let a = mock("a", KEY_A, &["gpt-4o"]);
        let b = mock("b", KEY_B, &["gpt-4o"]);
        // b's base_url has a path: it must not fall off a /v1/ prefix route.
        control(&b, json!({"path_prefix": "/openai"}));
        let other = mock("other", "sk-other-app-own-key", &[]);
        let creds = cred("cred_a", KEY_A, &a.url()) + &cred("cred_b", KEY_B, &format!("{}/openai/v1", b.url()));
        let r =
            Router::start_with(&config(retries, &creds), Options { edit_bootstrap: Some(istio_shaped(other.addr)), ..Options::default() });
        for i in 0..6 {
            let resp = r.send(&Request::chat(MASTER, "gpt-4o").host(HOST));
            assert_eq!(resp.status, 200, "retries {retries}, chat {i}: {}", resp.describe());
        }
        for (m, key, path, name) in [(&a, KEY_A, "/v1/chat/completions", "a"), (&b, KEY_B, "/openai/v1/chat/completions", "b")] {
            let log = e2e::harness::api_log(m);
            assert_eq!(log.len(), 3, "retries {retries}: round-robin to {name}: {log:?}");
            for e in &log {
                assert_eq!(
                    (e.key.as_str(), e.path.as_str(), e.host.as_str()),
                    (key, path, m.addr.to_string().as_str()),
                    "retries {retries}"
                );
            }
        }
        if retries > 0 {
            // A retried request (a answers 429) is retried on b's route, not another app's.
            control(&a, json!({"fail_every": 1, "fail_status": 429, "fail_headers": {}}));
            for _ in 0..2 {
                let resp = r.send(&Request::chat(MASTER, "gpt-4o").host(HOST));
                assert_eq!((resp.status, resp.header("x-mock-provider")), (200, Some("b")), "{}", resp.describe());
            }
        }
        // Another app's host on the same port is theirs, untouched by the router.
        let theirs = r.send(&Request::post("/v1/chat/completions").host("shop.example.com").bearer("their-own-token").body("{}"));
        assert_eq!(theirs.header("x-mock-provider"), Some("other"), "{}", theirs.describe());
        let log = other.mock.stats().log;
        assert_eq!(log.len(), 1, "retries {retries}: only the request for the other app's host reached it: {log:?}");
        assert_eq!(log[0].key, "their-own-token");
        assert_no_key_reached(&other, &format!("retries {retries}"));
    }
}

#[test]
fn a_foreign_host_with_a_cluster_header_never_reaches_a_provider() {
    for retries in [0, 2] {
        let a = mock("a", KEY_A, &["gpt-4o"]);
        let r = Router::start(&config(retries, &cred("cred_a", KEY_A, &a.url())));
        // The renderer puts server.hosts into the router's virtual host: other hosts get Envoy's 404.
        for path in ["/v1/chat/completions", "/health", "/v1/models"] {
            let req = Request::post(path)
                .host("evil.example.net")
                .bearer(MASTER)
                .header("x-auto-ai-router-cluster", "cred_a")
                .body(serde_json::to_vec(&json!({"model": "gpt-4o", "messages": []})).unwrap());
            let resp = r.send(&req);
            assert_eq!(resp.status, 404, "retries {retries} {path}: {}", resp.describe());
            // The client's own key, or none: nothing in the 404 comes from a provider.
            let resp =
                r.send(&Request::post(path).host("evil.example.net").bearer("sk-anything").header("x-auto-ai-router-cluster", "cred_a"));
            assert_eq!(resp.status, 404, "retries {retries} {path}");
        }
        // /health with the header on the router's host is the filter's answer, not a provider's.
        let health = r.send(&Request::get("/health").host(HOST).header("x-auto-ai-router-cluster", "cred_a"));
        assert_eq!(health.status, 200, "{}", health.describe());
        assert_eq!(health.json()["total_credentials"], 1);
        // The router's own host still works, with the router's own port too.
        let resp = r.send(&Request::chat(MASTER, "gpt-4o").host(&format!("{HOST}:8080")));
        assert_eq!(resp.status, 200, "{}", resp.describe());
        assert_eq!(a.mock.stats().log.iter().filter(|e| e.path.starts_with("/v1/chat")).count(), 1, "retries {retries}");
    }
}
