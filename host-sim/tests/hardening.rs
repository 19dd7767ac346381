//! Issue 11 on the real `filter.wasm`: what survives a configuration push, one fetcher even when
//! VMs start together, a foreign host passes untouched, the module logs its version.

use host_sim::*;
use std::sync::{Arc, Mutex};

const MASTER: &str = "sk-master-0123456789";
const CHAT: &str = "/v1/chat/completions";
const BODY: &str = r#"{"model":"m"}"#;

fn cfg(key_b: &str, fail2ban: &str, extra_server: &str) -> String {
    format!(
        "server: {{master_key: {MASTER}, default_models_rpm: -1, replace_v1_models: false, max_provider_retries: 0{extra_server}}}\ncredentials:\n\
         \x20 - {{name: a, api_key: sk-a-secret-key, base_url: 'https://a.test', rpm: 2}}\n\
         \x20 - {{name: b, api_key: {key_b}, base_url: 'https://b.test', rpm: -1}}\n\
         fail2ban: {fail2ban}\n"
    )
}

const PERMANENT: &str = "{max_attempts: 1, ban_duration: permanent, error_codes: [401]}";

fn route(vm: &mut Vm, status: u16) -> String {
    let ex = vm.post(CHAT, MASTER, BODY);
    match ex.cluster() {
        Some(c) => {
            let c = c.to_string();
            vm.respond(&ex, status, &[], b"{}");
            c
        }
        None => ex.status().map_or("none".into(), |s| s.to_string()),
    }
}

#[test]
fn a_config_push_keeps_bans_and_windows_unless_the_credential_changed() {
    let host = Host::new();
    let mut vm = host.vm(cfg("sk-b-old-key", PERMANENT, ""), &[]).unwrap();
    assert_eq!(route(&mut vm, 200), "a");
    assert_eq!(route(&mut vm, 401), "b", "b is banned for good");
    assert_eq!(route(&mut vm, 200), "a", "a's 2 of 2");
    assert_eq!(route(&mut vm, 200), "503", "a full, b banned");

    // The same configuration pushed again (e.g. an unrelated xDS update): state stays.
    vm.reconfigure(cfg("sk-b-old-key", PERMANENT, ", logging_level: debug")).unwrap();
    assert_eq!(route(&mut vm, 200), "503", "a's window and b's ban survive the push");

    // b's key rotated: a new provider key is not banned; a is unchanged and still full.
    vm.reconfigure(cfg("sk-b-new-key", PERMANENT, "")).unwrap();
    let ex = vm.post(CHAT, MASTER, BODY);
    assert_eq!(ex.cluster(), Some("b"));
    assert_eq!(ex.expect_forwarded().header("authorization"), Some("Bearer sk-b-new-key"));
    vm.abort(&ex);

    // A new fail2ban policy judges afresh: back to the old key, under a timed policy, not banned.
    vm.reconfigure(cfg("sk-b-old-key", "{max_attempts: 3, ban_duration: 1m, error_codes: [401]}", "")).unwrap();
    assert_eq!(route(&mut vm, 200), "b");
    assert!(host.shared_data_keys().iter().all(|k| !k.contains("secret") && !k.contains("key")), "no key material in key names");
    assert!(host.traps().is_empty(), "{:?}", host.traps());
}

#[test]
fn vms_starting_together_elect_one_fetcher() {
    let host = Host::new();
    for c in ["a", "b"] {
        host.script_http_call(c, CallReply::ok(r#"{"object":"list","data":[{"id":"m"}]}"#.to_string()));
    }
    let config = cfg("sk-b", PERMANENT, "").replace("replace_v1_models: false", "replace_v1_models: true");
    let vms: Vec<Arc<Mutex<Vm>>> = host.vms(2, &config, &[]).unwrap().into_iter().map(|v| Arc::new(Mutex::new(v))).collect();
    // VM 1 ticks inside VM 0's read of the (still absent) lease: both see no lease.
    {
        let (other, mut fired) = (vms[1].clone(), false);
        host.set_preempt(Some(Box::new(move || {
            if !fired {
                fired = true;
                other.lock().unwrap().tick();
            }
        })));
    }
    vms[0].lock().unwrap().tick();
    host.set_preempt(None);
    vms[1].lock().unwrap().tick();
    assert_eq!(host.http_calls().len(), 2, "one fetch per credential, by one VM: {:?}", host.http_calls());
}

#[test]
fn a_foreign_host_passes_untouched_and_ours_is_routed() {
    let host = Host::new();
    let mut vm = host.vm(cfg("sk-b", PERMANENT, ", hosts: [ai.example.com]"), &[]).unwrap();
    let headers = [
        (":method", "POST"),
        (":path", "/v1/x"),
        (":authority", "shop.example.com"),
        ("authorization", "Bearer their-token"),
        ("x-api-key", "their-api-key"),
        ("x-auto-ai-router-cluster", "b"),
    ];
    let ex = vm.http_request(&headers, b"anything");
    let f = ex.expect_forwarded();
    for (k, v) in headers {
        assert_eq!(f.header(k), Some(v), "{k} passes byte for byte");
    }
    assert_eq!(f.body, b"anything");
    assert_eq!(f.route_cache_clears, 0);
    let health = vm.http_request(&[(":method", "GET"), (":path", "/health"), (":authority", "shop.example.com")], b"");
    assert!(health.expect_forwarded().header(":path") == Some("/health"), "the other app's /health is theirs");
    let ours = vm.http_request(&[(":method", "GET"), (":path", "/health"), (":authority", "AI.example.com:443")], b"");
    assert_eq!(ours.status(), Some(200));
}

#[test]
fn the_module_logs_its_version_at_start() {
    let host = Host::new();
    let _vm = host.vm(cfg("sk-b", PERMANENT, ""), &[]).unwrap();
    let info = host.log_messages(LogLevel::Info);
    assert!(info.iter().any(|m| m.starts_with("auto-ai-router filter 0.") && m.contains("started")), "{info:?}");
}
