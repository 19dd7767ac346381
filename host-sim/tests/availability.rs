//! Availability (issue 23) on the real `filter.wasm`: weighted shares and `max_concurrent` slots
//! across VMs (Envoy's workers) over one shared-data store, and a slot left behind by a VM that
//! is gone (Envoy loses a trapped VM's contexts) coming back after `request_timeout`.

use host_sim::*;

const MASTER: &str = "sk-master-0123456789";
const CHAT: &str = "/v1/chat/completions";
const BODY: &str = r#"{"model":"m","messages":[]}"#;

fn cfg(creds: &str, server: &str) -> String {
    format!("server: {{master_key: {MASTER}, default_models_rpm: -1, replace_v1_models: false, max_provider_retries: 0{server}}}\ncredentials:\n{creds}")
}

#[test]
fn weights_across_vms_land_their_shares() {
    let host = Host::new();
    let c = cfg(
        "  - {name: a, api_key: sk-a-secret-key, base_url: 'http://a.test', weight: 1}\n  - {name: b, api_key: sk-b-secret-key, base_url: 'http://b.test', weight: 2}\n  - {name: c, api_key: sk-c-secret-key, base_url: 'http://c.test', weight: 3}\n",
        "",
    );
    let mut vms = host.vms(2, &c, &[]).unwrap();
    let mut seen = std::collections::BTreeMap::<String, u32>::new();
    for i in 0..600 {
        let vm = &mut vms[i % 2];
        let ex = vm.post(CHAT, MASTER, BODY);
        *seen.entry(ex.cluster().unwrap().to_string()).or_default() += 1;
        vm.respond(&ex, 200, &[], b"{}");
    }
    let n = |k: &str| seen.get(k).copied().unwrap_or(0);
    assert!((98..=102).contains(&n("a")) && (198..=202).contains(&n("b")) && (298..=302).contains(&n("c")), "{seen:?}");
}

#[test]
fn max_concurrent_slots_hold_across_vms_and_a_lost_vm_s_slot_expires() {
    let host = Host::new();
    let c = cfg(
        "  - {name: a, api_key: sk-a-secret-key, base_url: 'http://a.test', max_concurrent: 2}\n  - {name: b, api_key: sk-b-secret-key, base_url: 'http://b.test', max_concurrent: 1}\n",
        ", request_timeout: 5s",
    );
    let mut vms = host.vms(2, &c, &[]).unwrap();
    let one = vms[0].post(CHAT, MASTER, BODY);
    let two = vms[1].post(CHAT, MASTER, BODY);
    let three = vms[0].post(CHAT, MASTER, BODY);
    let mut clusters: Vec<&str> = [&one, &two, &three].iter().map(|e| e.cluster().unwrap()).collect();
    clusters.sort();
    assert_eq!(clusters, ["a", "a", "b"], "three slots in all");
    let full = vms[1].post(CHAT, MASTER, BODY);
    assert_eq!(full.status(), Some(429), "every slot held: a limit, with Retry-After");
    // One ends: its slot comes back, on any VM.
    vms[0].respond(&one, 200, &[], b"{}");
    let four = vms[1].post(CHAT, MASTER, BODY);
    assert_eq!(four.cluster(), one.cluster());
    // A VM that goes away with a request in flight (as a trapped VM's contexts do) never gives
    // its slot back: it expires after request_timeout.
    drop(vms.remove(1));
    let held = vms[0].post(CHAT, MASTER, BODY);
    assert_eq!(held.status(), Some(429), "the lost VM's slots still count");
    host.advance_ms(5_001);
    let back = vms[0].post(CHAT, MASTER, BODY);
    assert!(back.cluster().is_some(), "expired after request_timeout: {:?}", back.status());
}
