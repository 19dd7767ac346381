//! Model lists (issue 6) on host-sim: fetching, merging, model-aware routing, keeping the last good
//! list through failures, and refresh on the virtual clock.

use host_sim::*;
use serde_json::Value;

const MASTER: &str = "sk-master-0123456789";

fn cfg(extra_server: &str) -> String {
    format!(
        "server: {{master_key: {MASTER}, default_models_rpm: -1, replace_v1_models: true{extra_server}}}\ncredentials:\n\
         \x20 - {{name: c1, api_key: sk-c1-key, base_url: 'https://one.test'}}\n\
         \x20 - {{name: c2, api_key: sk-c2-key, base_url: 'https://two.test/v1'}}\n"
    )
}

fn list(ids: &[&str], owner: &str) -> CallReply {
    let data: Vec<String> = ids.iter().map(|i| format!(r#"{{"id":"{i}","object":"model","created":7,"owned_by":"{owner}"}}"#)).collect();
    CallReply::ok(format!(r#"{{"object":"list","data":[{}]}}"#, data.join(",")))
}

fn route(vm: &mut Vm, model: &str) -> String {
    let ex = vm.post("/v1/chat/completions", MASTER, &format!(r#"{{"model":"{model}"}}"#));
    match &ex.outcome {
        Outcome::Forwarded(f) => {
            let c = f.cluster.clone().expect("cluster");
            vm.respond(&ex, 200, &[], b"{}");
            c
        }
        Outcome::LocalReply(r) => r.status.to_string(),
        o => panic!("unexpected {o:?}"),
    }
}

fn routes(vm: &mut Vm, model: &str, n: usize) -> Vec<String> {
    (0..n).map(|_| route(vm, model)).collect()
}

fn get(vm: &mut Vm, path: &str) -> (u16, Value) {
    let auth = format!("Bearer {MASTER}");
    let ex = vm.http_request(&[(":method", "GET"), (":path", path), (":authority", "r"), ("authorization", &auth)], b"");
    let r = ex.expect_local();
    (r.status, serde_json::from_slice(&r.body).unwrap())
}

fn ids(v: &Value) -> Vec<String> {
    v["data"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap().to_string()).collect()
}

#[test]
fn two_providers_merge_into_three_models_and_routing_follows_the_lists() {
    let host = Host::new();
    host.script_http_call("c1", list(&["gpt-4", "gpt-3.5"], "one"));
    host.script_http_call("c2", list(&["gpt-4", "claude-3"], "two"));
    let mut vm = host.vm(cfg(""), &[]).unwrap();
    vm.tick();
    let calls = host.http_calls();
    let path = |c: &HttpCallRecord| c.headers.iter().find(|(k, _)| k == ":path").map(|(_, v)| v.clone());
    assert_eq!(calls.iter().map(path).collect::<Vec<_>>(), [Some("/v1/models".into()), Some("/v1/models".into())]);
    let (status, v) = get(&mut vm, "/v1/models");
    assert_eq!(status, 200);
    assert_eq!(v["object"], "list");
    assert_eq!(ids(&v), ["claude-3", "gpt-3.5", "gpt-4"]);
    assert_eq!(v["data"][2]["owned_by"], "one", "the first credential's entry wins");
    assert_eq!(v["data"][0]["object"], "model");
    assert_eq!(routes(&mut vm, "gpt-3.5", 3), ["c1", "c1", "c1"]);
    assert_eq!(routes(&mut vm, "claude-3", 3), ["c2", "c2", "c2"]);
    let both = routes(&mut vm, "gpt-4", 4);
    assert_eq!(both.iter().filter(|c| *c == "c1").count(), 2, "{both:?}");
    assert_eq!(routes(&mut vm, "llama", 1), ["404"], "model_not_found");
    let (status, m) = get(&mut vm, "/v1/models/claude-3");
    assert_eq!((status, m["id"].as_str(), m["owned_by"].as_str()), (200, Some("claude-3"), Some("two")));
    let (status, e) = get(&mut vm, "/v1/models/llama");
    assert_eq!(
        (status, e["error"]["type"].as_str(), e["error"]["code"].as_str()),
        (404, Some("invalid_request_error"), Some("model_not_found"))
    );
}

#[test]
fn a_failed_fetch_keeps_the_last_good_list() {
    let host = Host::new();
    host.script_http_call("c1", list(&["gpt-4", "gpt-3.5"], "one"));
    host.script_http_call("c2", list(&["gpt-4", "claude-3"], "two"));
    let mut vm = host.vm(cfg(", models_refresh: 60s"), &[]).unwrap();
    vm.tick();
    let failures = [
        ("401", CallReply::response(401, &[], r#"{"error":{"message":"bad key"}}"#)),
        ("invalid JSON", CallReply::ok("<html>oops</html>")),
        ("timeout", CallReply::Timeout),
    ];
    for (what, reply) in failures {
        host.queue_http_call("c1", reply);
        host.advance_ms(60_000);
        vm.tick();
        host.advance_ms(11_000); // past the callout timeout
        vm.run_due();
        // c1 still serves exactly its last good list: claude-3 never goes there.
        assert_eq!(routes(&mut vm, "claude-3", 2), ["c2", "c2"], "after {what}");
        assert_eq!(routes(&mut vm, "gpt-3.5", 2), ["c1", "c1"], "after {what}");
        let (_, v) = get(&mut vm, "/v1/models");
        assert_eq!(ids(&v), ["claude-3", "gpt-3.5", "gpt-4"], "after {what}");
    }
    let errors = host.log_messages(LogLevel::Error);
    assert!(errors.iter().filter(|m| m.contains("models fetch for credential c1 failed")).count() >= 3, "{errors:?}");
    assert!(errors.iter().all(|m| !m.contains("sk-c1-key")), "keys never logged");
}

#[test]
fn refresh_picks_up_a_new_model_after_the_period() {
    let host = Host::new();
    host.queue_http_call("c1", list(&["a"], "one"));
    host.script_http_call("c1", list(&["a", "b"], "one"));
    host.script_http_call("c2", list(&["x"], "two"));
    let mut vm = host.vm(cfg(", models_refresh: 2m"), &[]).unwrap();
    vm.tick();
    assert_eq!(routes(&mut vm, "b", 1), ["404"], "nobody serves b yet");
    host.advance_ms(60_000);
    vm.tick();
    assert_eq!(routes(&mut vm, "b", 1), ["404"], "not refreshed before the period");
    host.advance_ms(60_000);
    vm.tick();
    assert_eq!(routes(&mut vm, "b", 2), ["c1", "c1"]);
    let (_, v) = get(&mut vm, "/v1/models");
    assert_eq!(ids(&v), ["a", "b", "x"]);
}

#[test]
fn other_vms_read_the_lists_one_vm_fetched() {
    let host = Host::new();
    host.script_http_call("c1", list(&["only-one"], "one"));
    host.script_http_call("c2", list(&["only-two"], "two"));
    let mut vms = host.vms(3, cfg("").as_str(), &[]).unwrap();
    for vm in vms.iter_mut() {
        vm.tick();
    }
    assert_eq!(host.http_calls().len(), 2, "one fetch per credential in all: {:?}", host.http_calls());
    for vm in vms.iter_mut() {
        assert_eq!(routes(vm, "only-two", 1), ["c2"]);
        assert_eq!(routes(vm, "only-one", 1), ["c1"]);
    }
}

#[test]
fn without_replace_v1_models_the_list_is_routed_to_a_provider() {
    let host = Host::new();
    let mut vm = host.vm(cfg("").replace("replace_v1_models: true", "replace_v1_models: false"), &[]).unwrap();
    vm.tick();
    assert!(host.http_calls().is_empty(), "no fetching without replace_v1_models");
    let auth = format!("Bearer {MASTER}");
    let ex = vm.http_request(&[(":method", "GET"), (":path", "/v1/models"), (":authority", "r"), ("authorization", &auth)], b"");
    match &ex.outcome {
        Outcome::Forwarded(f) => assert_eq!(f.cluster.as_deref(), Some("c1")),
        o => panic!("expected the request to be routed, got {o:?}"),
    }
}

#[test]
fn model_labels_are_bounded_by_distinct_names_not_requests() {
    let host = Host::new();
    let mut vm = host.vm(cfg("").replace("replace_v1_models: true", "replace_v1_models: false").as_str(), &[]).unwrap();
    // Many requests for one model must not use up the label budget...
    for _ in 0..600 {
        let c = route(&mut vm, "popular");
        assert!(c == "c1" || c == "c2", "routed, got {c}");
    }
    // ...which then covers 512 distinct names; the rest are counted as "other".
    for i in 0..600 {
        route(&mut vm, &format!("m{i}"));
    }
    let series: Vec<(String, u64)> = host
        .metrics()
        .into_iter()
        .filter(|(_, name, _)| name.starts_with("auto_ai_router_model_requests_total."))
        .map(|(_, name, v)| (name, v))
        .collect();
    let count = |label: &str| -> u64 { series.iter().filter(|(n, _)| n.contains(&format!(".model=.={label};.;"))).map(|(_, v)| v).sum() };
    assert_eq!(count("popular"), 600);
    assert_eq!(count("m0"), 1);
    assert_eq!(count("m510"), 1, "512 distinct names: popular + m0..m510");
    assert_eq!(count("m511"), 0);
    assert_eq!(count("other"), 600 - 511);
}
