//! Global limits (issue 14) on the real `filter.wasm`: the check inside selection as a unary gRPC
//! call to the rate-limit service (scripted replies here), pause and resume, leases shared by
//! VMs, the failure modes and the breaker. The e2e suite runs it against a real service.

use host_sim::*;

const MASTER: &str = "sk-master-0123456789";
const CHAT: &str = "/v1/chat/completions";
const BODY: &str = r#"{"model":"m"}"#;
const RLS: &str = "auto_ai_router_rls";

fn cfg(global: &str) -> String {
    format!(
        "server: {{master_key: {MASTER}, default_models_rpm: -1, replace_v1_models: false}}\ncredentials:\n\
         \x20 - {{name: a, api_key: sk-a-secret-key, base_url: 'https://a.test', rpm: 100}}\n\
         \x20 - {{name: b, api_key: sk-b-secret-key, base_url: 'https://b.test', rpm: 100}}\n\
         global_limits: {{service: 'rls.test:8081'{global}}}\n"
    )
}

fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// A `RateLimitResponse` (protobuf, by hand): overall code, then one status per (code, remaining,
/// seconds until reset), each with a `current_limit` of 100 per minute. Codes: 1 OK, 2 OVER_LIMIT.
fn reply(overall: u64, statuses: &[(u64, u64, u64)]) -> Vec<u8> {
    let mut out = vec![0x08];
    varint(&mut out, overall);
    for &(code, remaining, reset) in statuses {
        let mut d = vec![0x08];
        varint(&mut d, reset);
        let mut s = vec![0x08];
        varint(&mut s, code);
        s.extend_from_slice(&[0x12, 4, 0x08, 100, 0x10, 2]);
        s.push(0x18);
        varint(&mut s, remaining);
        s.push(0x22);
        varint(&mut s, d.len() as u64);
        s.extend(d);
        out.push(0x12);
        varint(&mut out, s.len() as u64);
        out.extend(s);
    }
    out
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn an_admitted_request_is_paused_for_the_call_and_routed_after_it() {
    let host = Host::new();
    host.script_grpc_call(RLS, GrpcReply::ok(reply(1, &[(1, 99, 40)])).delayed(3));
    let mut vm = host.vm(cfg(", timeout: 250ms"), &[]).unwrap();
    let ex = vm.post(CHAT, MASTER, BODY);
    assert_eq!(ex.cluster(), None, "paused while the service decides");
    host.advance_ms(3);
    let ex = vm.poll(&ex);
    assert_eq!(ex.cluster(), Some("a"));
    assert_eq!(ex.expect_forwarded().header("authorization"), None, "retries on: the upstream filter sets the key");
    let calls = host.grpc_calls();
    assert_eq!(calls.len(), 1);
    let c = &calls[0];
    assert_eq!(
        (c.cluster.as_str(), c.service.as_str(), c.method.as_str()),
        (RLS, "envoy.service.ratelimit.v3.RateLimitService", "ShouldRateLimit")
    );
    assert_eq!(c.timeout_ms, 250);
    assert!(contains(&c.message, b"auto-ai-router") && contains(&c.message, b"credential") && contains(&c.message, b"\x12\x01a"));
    assert!(!contains(&c.message, b"secret"), "no key in the descriptors");
    assert!(host.traps().is_empty(), "{:?}", host.traps());
}

#[test]
fn over_the_global_limit_tries_the_next_key_and_429s_when_all_are_full() {
    let host = Host::new();
    host.queue_grpc_call(RLS, GrpcReply::ok(reply(2, &[(2, 0, 17)])));
    host.queue_grpc_call(RLS, GrpcReply::ok(reply(1, &[(1, 5, 17)])));
    let mut vm = host.vm(cfg(""), &[]).unwrap();
    assert_eq!(vm.post(CHAT, MASTER, BODY).cluster(), Some("b"), "a is full globally");
    assert_eq!(host.grpc_calls().len(), 2);
    // a is noted full until its window ends: the next request asks only about b.
    host.queue_grpc_call(RLS, GrpcReply::ok(reply(2, &[(2, 0, 12)])));
    let ex = vm.post(CHAT, MASTER, BODY);
    assert_eq!(host.grpc_calls().len(), 3, "no call for a");
    let r = ex.expect_local();
    assert_eq!(r.status, 429);
    assert_eq!(r.header("retry-after"), Some("12"));
    assert!(r.body_str().contains("rate_limit_exceeded"));
}

#[test]
fn a_failed_service_follows_on_unavailable_and_the_breaker_saves_the_timeouts() {
    let host = Host::new();
    host.script_grpc_call(RLS, GrpcReply::Timeout);
    let mut vm = host.vm(cfg(", timeout: 100ms, breaker: 5s"), &[]).unwrap();
    let ex = vm.post(CHAT, MASTER, BODY);
    host.advance_ms(100);
    let r = vm.poll(&ex);
    let r = r.expect_local();
    assert_eq!(r.status, 503);
    assert!(r.body_str().contains("rate_limit_service_unavailable"), "{}", r.body_str());
    for _ in 0..5 {
        assert_eq!(vm.post(CHAT, MASTER, BODY).status(), Some(503), "denied at once while the breaker is open");
    }
    assert_eq!(host.grpc_calls().len(), 1, "one timeout per breaker period");

    let host = Host::new();
    host.script_grpc_call(RLS, GrpcReply::unavailable());
    let mut vm = host.vm(cfg(", on_unavailable: allow"), &[]).unwrap();
    assert_eq!(vm.post(CHAT, MASTER, BODY).cluster(), Some("a"));
    assert_eq!(vm.post(CHAT, MASTER, BODY).cluster(), Some("b"));
    assert_eq!(host.grpc_calls().len(), 1);
    assert!(host.traps().is_empty(), "{:?}", host.traps());
}

#[test]
fn a_lease_is_shared_by_the_workers_of_one_envoy() {
    let host = Host::new();
    host.script_grpc_call(RLS, GrpcReply::ok(reply(1, &[(1, 95, 30)])));
    let mut vms = host.vms(2, &cfg(", lease: 5"), &[]).unwrap();
    let mut routed = 0;
    for i in 0..10 {
        if vms[i % 2].post(CHAT, MASTER, BODY).cluster().is_some() {
            routed += 1;
        }
    }
    assert_eq!(routed, 10);
    // Round-robin over a and b, 5 each: one call per key, 4 spare slots each used by either VM.
    assert_eq!(host.grpc_calls().len(), 2, "{:?}", host.grpc_calls().iter().map(|c| c.vm).collect::<Vec<_>>());
    assert!(host.grpc_calls().iter().all(|c| contains(&c.message, &[0x18, 5])), "hits_addend 5");
}

#[test]
fn after_the_breaker_period_one_trial_call_at_a_time_decides_for_every_vm() {
    let host = Host::new();
    host.script_grpc_call(RLS, GrpcReply::Timeout);
    let mut vms = host.vms(2, &cfg(", timeout: 100ms, breaker: 5s"), &[]).unwrap();
    let ex = vms[0].post(CHAT, MASTER, BODY);
    host.advance_ms(100);
    assert_eq!(vms[0].poll(&ex).status(), Some(503), "the first timeout opens the breaker");
    host.advance_ms(5_000);
    // The period is over: vm0's request is the trial; while it waits, every other request on
    // either VM is answered as while the breaker is open (deny: 503 at once), without a call.
    let trial = vms[0].post(CHAT, MASTER, BODY);
    assert_eq!(trial.status(), None, "paused on the trial call");
    for vm in vms.iter_mut() {
        for _ in 0..3 {
            assert_eq!(vm.post(CHAT, MASTER, BODY).status(), Some(503));
        }
    }
    assert_eq!(host.grpc_calls().len(), 2, "one trial call, not one timeout per request");
    host.advance_ms(100);
    assert_eq!(vms[0].poll(&trial).status(), Some(503), "the trial timed out: open again");
    host.advance_ms(4_000);
    assert_eq!(vms[1].post(CHAT, MASTER, BODY).status(), Some(503));
    assert_eq!(host.grpc_calls().len(), 2, "within the new period");
    host.advance_ms(1_000);
    // The service is back: vm1's trial succeeds and closes the breaker for both VMs.
    host.queue_grpc_call(RLS, GrpcReply::ok(reply(1, &[(1, 90, 30)])).delayed(3));
    let trial = vms[1].post(CHAT, MASTER, BODY);
    assert_eq!(vms[0].post(CHAT, MASTER, BODY).status(), Some(503), "the trial is in flight");
    host.advance_ms(3);
    assert!(vms[1].poll(&trial).cluster().is_some(), "the trial succeeded: routed");
    host.queue_grpc_call(RLS, GrpcReply::ok(reply(1, &[(1, 89, 30)])));
    assert!(vms[0].post(CHAT, MASTER, BODY).cluster().is_some(), "closed: vm0 asks and is routed");
    assert_eq!(host.grpc_calls().len(), 4);
    assert!(host.traps().is_empty(), "{:?}", host.traps());
}

#[test]
fn tokens_are_checked_with_each_call_and_charged_after_the_answer() {
    let host = Host::new();
    host.script_grpc_call(RLS, GrpcReply::ok(reply(1, &[(1, 940, 30)])));
    let config = format!(
        "server: {{master_key: {MASTER}, default_models_rpm: -1, replace_v1_models: false, max_provider_retries: 0}}\ncredentials:\n\
         \x20 - {{name: a, api_key: sk-a-secret-key, base_url: 'https://a.test', tpm: 1000}}\n\
         global_limits: {{service: 'rls.test:8081'}}\n"
    );
    let mut vm = host.vm(config, &[]).unwrap();
    let ex = vm.post(CHAT, MASTER, BODY);
    assert_eq!(ex.cluster(), Some("a"));
    let check = &host.grpc_calls()[0].message;
    // The token descriptor [credential a, tokens total] with its TPM and hits_addend 0 (check only).
    assert!(contains(check, b"\x0a\x06tokens\x12\x05total") && contains(check, &[0x1a, 0x00]), "{check:?}");
    let usage =
        br#"{"id":"1","object":"chat.completion","choices":[],"usage":{"prompt_tokens":10,"completion_tokens":50,"total_tokens":60}}"#;
    vm.respond(&ex, 200, &[("content-type", "application/json")], usage);
    let calls = host.grpc_calls();
    assert_eq!(calls.len(), 2, "the answer's tokens are charged");
    assert!(contains(&calls[1].message, &[0x1a, 0x02, 0x08, 60]), "hits_addend 60 on the token descriptor: {:?}", calls[1].message);
    assert!(!contains(&calls[1].message, b"secret"));
    assert!(host.traps().is_empty(), "{:?}", host.traps());
}
