//! The router filter (`filter.wasm`) under configuration pushes, with two plugins in one VM,
//! and with a body that ends in request trailers.

use host_sim::*;

const MASTER: &str = "sk-master-0123456789";
const CHAT: &str = "/v1/chat/completions";
const BODY: &str = r#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#;

/// Retries off: this suite checks what the router itself sends upstream (with retries on, the
/// upstream filter sets each attempt's key: tests/retry.rs).
fn cfg(names: &[&str]) -> String {
    let creds: String = names
        .iter()
        .map(|n| format!("  - {{name: {n}, api_key: sk-{n}-secret-key, base_url: 'https://{n}.provider.test/v1', rpm: -1}}\n"))
        .collect();
    format!("server: {{master_key: {MASTER}, default_models_rpm: -1, replace_v1_models: false, max_provider_retries: 0}}\ncredentials:\n{creds}")
}

fn chat_request() -> Request {
    let len = BODY.len().to_string();
    let auth = format!("Bearer {MASTER}");
    Request::new(&[
        (":method", "POST"),
        (":path", CHAT),
        (":authority", "router.local"),
        (":scheme", "http"),
        ("authorization", &auth),
        ("content-type", "application/json"),
        ("content-length", &len),
    ])
}

#[test]
fn a_config_push_serves_new_streams_with_the_new_configuration() {
    let host = Host::new();
    let mut vm = host.vm(cfg(&["a"]), &[]).unwrap();
    let before = vm.post(CHAT, MASTER, BODY);
    assert_eq!(before.cluster(), Some("a"));
    let keys_before = host.shared_data_keys();

    let root = vm.reconfigure(cfg(&["b"])).unwrap();
    assert_eq!(vm.root_context(ROUTER_ROOT_ID), Some(root));
    let after = vm.post(CHAT, MASTER, BODY);
    assert_eq!(after.cluster(), Some("b"), "streams after the push use the new root context");
    assert_eq!(after.expect_forwarded().header("authorization"), Some("Bearer sk-b-secret-key"));

    // the stream started before the push still finishes on the old root context, which is
    // retired only then
    assert_eq!(vm.root_contexts().len(), 2);
    let r = vm.respond(&before, 200, &[("content-type", "application/json")], b"{}");
    assert_eq!(r.status, 200);
    assert_eq!(vm.root_contexts(), vec![(root, ROUTER_ROOT_ID.to_string(), false)]);
    vm.respond(&after, 200, &[("content-type", "application/json")], b"{}");
    // shared data belongs to the VM id: what the old configuration wrote is still there
    let keys_after = host.shared_data_keys();
    assert!(keys_before.iter().all(|k| keys_after.contains(k)), "{keys_before:?} vs {keys_after:?}");
    assert!(host.traps().is_empty(), "{:?}", host.traps());
}

#[test]
fn a_rejected_config_push_leaves_the_running_configuration_serving() {
    let host = Host::new();
    let mut vm = host.vm(cfg(&["a"]), &[]).unwrap();
    let e = vm.reconfigure("server: {master_key: 1}\ncredentials: nope").unwrap_err();
    assert!(matches!(e, VmError::ConfigureFailed(_)), "{e:?}");
    assert_eq!(vm.root_contexts().len(), 1);
    assert_eq!(vm.post(CHAT, MASTER, BODY).cluster(), Some("a"));
}

#[test]
fn two_plugins_in_one_vm_each_with_its_own_configuration() {
    let host = Host::new();
    // (Any root id but the upstream filter's runs the router.)
    let mut vm = host.vm_with(VmConfig::new(cfg(&["a"])).plugin("second_router", cfg(&["b"]))).unwrap();
    let ex = vm.send(chat_request().body(BODY));
    assert_eq!(ex.cluster(), Some("a"));
    vm.respond(&ex, 500, &[], b"{}");
    let ex = vm.send(chat_request().body(BODY).root("second_router"));
    assert_eq!(ex.cluster(), Some("b"));
    vm.respond(&ex, 500, &[], b"{}");
    // one VM, one shared-data store: both plugins' records (fail2ban counts) are in it
    let keys = host.shared_data_keys();
    assert!(keys.iter().any(|k| k.starts_with("aar/ban3/a/")) && keys.iter().any(|k| k.starts_with("aar/ban3/b/")), "{keys:?}");
}

/// A body that ends with HTTP/2 trailers (no end-of-stream data frame) is routed: trailers end the
/// body. (Before, the SDK's default Continue released it unrouted, master key still in place.)
#[test]
fn a_trailers_terminated_body_is_routed() {
    let host = Host::new();
    let mut vm = host.vm(cfg(&["a"]), &[]).unwrap();
    let (head, tail) = BODY.as_bytes().split_at(10);
    let ex = vm.send(chat_request().chunks(&[head, tail]).trailers(&[("x-checksum", "1")]));
    let f = ex.expect_forwarded();
    assert!(f.complete);
    assert_eq!(f.body, BODY.as_bytes());
    assert_eq!(f.trailers.as_deref(), Some(&[("x-checksum".to_string(), "1".to_string())][..]));
    assert_eq!(f.cluster.as_deref(), Some("a"));
    assert_eq!(f.header("authorization"), Some("Bearer sk-a-secret-key"), "the credential's key, not the master key");
    // the same body without trailers is routed
    assert_eq!(vm.send(chat_request().chunks(&[head, tail])).cluster(), Some("a"));
}
