//! The shipped Istio manifests themselves, run: envoy/istio/envoyfilter.yaml (module from a file,
//! retries on) and envoy/istio/oci/envoyfilter.yaml (module over ECDS, retries off) applied, the
//! way istiod applies EnvoyFilter patches, to a gateway-shaped bootstrap (the router's Gateway host
//! as its own virtual host, another app's host and a catch-all `*` beside it on the same port;
//! `e2e::istio`, a test fixture standing in for istiod), on Envoy 1.40. Chats for the router's host
//! reach only the provider, with the provider's own authority and key; the other app's backend
//! never sees a provider key.

use e2e::harness::{api_log, closed_port, free_port, mock, repo_root, wasm_path, Router, Wasm, MASTER};
use e2e::http::Request;
use e2e::istio::{apply, envoyfilter, replace_filename, Gateway};
use serde_json::{json, Value};

const OPENAI_KEY: &str = "sk-istio-openai-key-0123456";

fn run_manifest(rel: &str, retries: bool) {
    let provider = mock("openai", OPENAI_KEY, &["gpt-4o"]);
    let other = mock("other", "sk-other-app-own-key", &[]);
    let vs = std::fs::read_to_string(repo_root().join("envoy/istio/virtualservice.yaml")).unwrap();
    let route_name = vs.lines().find_map(|l| l.trim().strip_prefix("- name: ")).expect("the VirtualService route's name").to_string();
    let gw = Gateway {
        listen: ([127, 0, 0, 1], free_port()).into(),
        admin: ([127, 0, 0, 1], free_port()).into(),
        host: "ai.example.com".into(),
        route_name,
        provider_cluster: "outbound|443||api.openai.com".into(),
        provider_host: "api.openai.com".into(),
        provider: provider.addr,
        other_hosts: vec!["shop.example.com".into(), "*".into()],
        other: other.addr,
    };
    let mut b = gw.bootstrap();
    apply(&mut b, &envoyfilter(&repo_root().join(rel)), "istio-system/auto-ai-router");
    replace_filename(&mut b, "/etc/istio/extensions/filter.wasm", &wasm_path(Wasm::Release).display().to_string());
    // The rate-limit service's DNS name is the mesh's: here a refused port on loopback (the
    // manifests' `on_unavailable: local` then enforces rpm / replicas).
    for c in b["static_resources"]["clusters"].as_array_mut().unwrap() {
        if c["name"] == "auto_ai_router_rls" {
            c["type"] = json!("STATIC");
            c["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"] =
                json!({"socket_address": {"address": "127.0.0.1", "port_value": closed_port()}});
        }
    }
    let env = [("ROUTER_MASTER_KEY", MASTER), ("OPENAI_API_KEY", OPENAI_KEY)];
    let r = Router::start_bootstrap(&b, gw.listen.port(), gw.admin.port(), &env, Some("ai.example.com"));

    let (status, health) = {
        let h = r.send(&Request::get("/health").host("ai.example.com"));
        (h.status, h.json())
    };
    assert_eq!((status, &health["total_credentials"]), (200, &json!(1)), "{rel}: {health}");
    for i in 0..4 {
        let resp = r.send(&Request::chat(MASTER, "gpt-4o").host("ai.example.com"));
        assert_eq!(resp.status, 200, "{rel} chat {i}: {}", resp.describe());
        // The upstream filter in the aggregate credential cluster ran (it counts the attempts).
        assert_eq!(resp.header("x-auto-ai-router-attempts").is_some(), retries, "{rel}: {}", resp.describe());
    }
    let log = api_log(&provider);
    assert_eq!(log.len(), 4, "{rel}: {log:?}");
    for e in &log {
        assert_eq!((e.key.as_str(), e.host.as_str(), e.path.as_str()), (OPENAI_KEY, "api.openai.com", "/v1/chat/completions"), "{rel}");
    }
    let last: Value = provider.mock.stats().last_request.unwrap();
    assert!(!last.to_string().contains(MASTER), "{rel}: the master key reached the provider");
    // Another app's host, and a host nobody configured (the catch-all's), are the other app's.
    for host in ["shop.example.com", "evil.example.net"] {
        let resp = r.send(
            &Request::post("/v1/chat/completions")
                .host(host)
                .bearer("their-own-token")
                .header("x-auto-ai-router-cluster", "openai_main")
                .body("{}"),
        );
        assert_eq!(resp.header("x-mock-provider"), Some("other"), "{rel} {host}: {}", resp.describe());
    }
    let theirs = other.mock.stats();
    assert_eq!(theirs.log.len(), 2, "{rel}: only the other app's requests reached it: {:?}", theirs.log);
    let text = serde_json::to_string(&theirs.log).unwrap() + &theirs.last_request.map(|v| v.to_string()).unwrap_or_default();
    assert!(!text.contains(OPENAI_KEY), "{rel}: the provider key reached another app: {text}");
    assert_eq!(api_log(&provider).len(), 4, "{rel}: a foreign host's request reached the provider");
}

#[test]
fn the_istio_manifest_routes_on_a_shared_gateway_with_retries() {
    run_manifest("envoy/istio/envoyfilter.yaml", true);
}

#[test]
fn the_istio_oci_manifest_routes_on_a_shared_gateway() {
    run_manifest("envoy/istio/oci/envoyfilter.yaml", false);
}
