//! The router filter's behaviour on host-sim, against the real `filter.wasm` (`make wasm`).

use host_sim::*;
use serde_json::Value;
use std::sync::{Arc, Mutex};

const MASTER: &str = "sk-master-0123456789";
const CHAT: &str = "/v1/chat/completions";

fn creds(list: &[(&str, i64)]) -> String {
    list.iter()
        .map(|(n, rpm)| format!("  - {{name: {n}, api_key: sk-{n}-secret-key, base_url: 'https://{n}.provider.test/v1', rpm: {rpm}}}\n"))
        .collect()
}

/// This suite drives the router filter alone (no upstream filter), so retries are off and the
/// router accounts each response itself; `tests/retry.rs` covers the retries-on path.
fn cfg(list: &[(&str, i64)], extra: &str) -> String {
    format!("server: {{master_key: {MASTER}, default_models_rpm: -1, replace_v1_models: false, max_provider_retries: 0}}\ncredentials:\n{}{extra}", creds(list))
}

fn vm_for(host: &Host, config: &str) -> Vm {
    host.vm(config, &[]).unwrap_or_else(|e| panic!("VM did not start: {e:?}\n{}", e.messages()))
}

fn chat(vm: &mut Vm, model: &str) -> Exchange {
    vm.post(CHAT, MASTER, &format!(r#"{{"model":"{model}","messages":[{{"role":"user","content":"hi"}}]}}"#))
}

/// One request answered by the upstream with `status(cluster)`; returns the cluster or the
/// local reply status.
fn drive(vm: &mut Vm, model: &str, status: impl Fn(&str) -> u16) -> String {
    let ex = chat(vm, model);
    match &ex.outcome {
        Outcome::Forwarded(f) => {
            let c = f.cluster.clone().expect("forwarded without a cluster");
            vm.respond(&ex, status(&c), &[("content-type", "application/json")], b"{}");
            c
        }
        Outcome::LocalReply(r) => r.status.to_string(),
        o => panic!("unexpected outcome {o:?}"),
    }
}

fn names(vm: &mut Vm, n: usize, model: &str) -> Vec<String> {
    (0..n).map(|_| drive(vm, model, |_| 200)).collect()
}

fn json(r: &Response) -> Value {
    serde_json::from_slice(&r.body).unwrap_or_else(|e| panic!("body is not JSON ({e}): {}", r.body_str()))
}

fn health(vm: &mut Vm) -> (u16, Value) {
    let ex = vm.http_request(&[(":method", "GET"), (":path", "/health"), (":authority", "r")], b"");
    let r = ex.expect_local();
    (r.status, json(r))
}

fn assert_openai_error(r: &Response, status: u16, ty: &str) -> Value {
    assert_eq!(r.status, status, "body: {}", r.body_str());
    assert_eq!(r.header("content-type"), Some("application/json"));
    let v = json(r);
    assert_eq!(v["error"]["type"], ty, "body: {v}");
    assert!(v["error"]["message"].as_str().is_some_and(|m| !m.is_empty()));
    v
}

/// Bans `victim` by answering its requests with 500 (others 200) until /health counts a ban.
fn ban(vm: &mut Vm, victim: &str) {
    for _ in 0..100 {
        let (_, h) = health(vm);
        if h["credentials_banned"].as_u64().unwrap() > 0 {
            return;
        }
        drive(vm, "m", |c| if c == victim { 500 } else { 200 });
    }
    panic!("{victim} never got banned");
}

// ---------------------------------------------------------------- selection (issue 2 cases)

#[test]
fn three_credentials_round_robin() {
    let host = Host::new();
    let mut vm = vm_for(&host, &cfg(&[("c1", -1), ("c2", -1), ("c3", -1)], ""));
    assert_eq!(names(&mut vm, 4, "m"), ["c1", "c2", "c3", "c1"]);
}

#[test]
fn round_robin_cursor_is_shared_by_all_vms() {
    let host = Host::new();
    let c = cfg(&[("c1", -1), ("c2", -1), ("c3", -1)], "");
    let mut vms = host.vms(3, &c, &[]).unwrap();
    let got: Vec<String> = (0..6).map(|i| drive(&mut vms[i % 3], "m", |_| 200)).collect();
    assert_eq!(got, ["c1", "c2", "c3", "c1", "c2", "c3"]);
}

#[test]
fn banned_credential_is_skipped() {
    let host = Host::new();
    let mut vm = vm_for(&host, &cfg(&[("c1", -1), ("c2", -1), ("c3", -1)], "fail2ban: {max_attempts: 1}\n"));
    ban(&mut vm, "c2");
    let got = names(&mut vm, 3, "m");
    assert!(!got.contains(&"c2".to_string()), "{got:?}");
    // after a full turn the order is c1, c3, c1 from c1
    let mut vm2 = vm_for(&Host::new(), &cfg(&[("c1", -1), ("c2", -1), ("c3", -1)], "fail2ban: {max_attempts: 1}\n"));
    assert_eq!(drive(&mut vm2, "m", |_| 200), "c1");
    assert_eq!(drive(&mut vm2, "m", |_| 500), "c2");
    assert_eq!(names(&mut vm2, 3, "m"), ["c3", "c1", "c3"]);
}

#[test]
fn rpm_limited_credential_is_skipped() {
    let host = Host::new();
    let mut vm = vm_for(&host, &cfg(&[("c1", 2), ("c2", -1), ("c3", -1)], ""));
    assert_eq!(names(&mut vm, 5, "m"), ["c1", "c2", "c3", "c1", "c2"]);
    assert_eq!(names(&mut vm, 2, "m"), ["c3", "c2"], "c1 is full: its turn goes to c2");
}

#[test]
fn all_banned_is_503() {
    let host = Host::new();
    let mut vm = vm_for(&host, &cfg(&[("c1", -1), ("c2", -1)], "fail2ban: {max_attempts: 1}\n"));
    drive(&mut vm, "m", |_| 500);
    drive(&mut vm, "m", |_| 500);
    let ex = chat(&mut vm, "m");
    let v = assert_openai_error(ex.expect_local(), 503, "service_unavailable_error");
    assert!(ex.expect_local().header("retry-after").is_none(), "{v}");
    let (status, h) = health(&mut vm);
    assert_eq!(status, 503);
    assert_eq!(h["credentials_banned"], 2);
    assert_eq!(h["status"], "unhealthy");
}

#[test]
fn two_credentials_at_rpm_1_third_request_is_429_with_retry_after() {
    let host = Host::new();
    let mut vm = vm_for(&host, &cfg(&[("c1", 1), ("c2", 1)], ""));
    assert_eq!(drive(&mut vm, "m", |_| 200), "c1");
    host.advance_ms(10_000);
    assert_eq!(drive(&mut vm, "m", |_| 200), "c2");
    host.advance_ms(10_000);
    let ex = chat(&mut vm, "m");
    let r = ex.expect_local();
    assert_openai_error(r, 429, "rate_limit_error");
    assert_eq!(r.header("retry-after"), Some("41"), "earliest slot frees at 61 s (any real 60 s holds at most the limit)");
}

fn models_reply(ids: &[&str]) -> CallReply {
    let data: Vec<String> = ids.iter().map(|i| format!(r#"{{"id":"{i}","object":"model","created":1,"owned_by":"x"}}"#)).collect();
    CallReply::ok(format!(r#"{{"object":"list","data":[{}]}}"#, data.join(",")))
}

fn model_aware(list: &[(&str, i64)], extra: &str) -> String {
    format!("server: {{master_key: {MASTER}, default_models_rpm: -1, replace_v1_models: true, max_provider_retries: 0}}\ncredentials:\n{}{extra}", creds(list))
}

#[test]
fn model_served_only_by_c1_goes_to_c1_and_unknown_model_is_404() {
    let host = Host::new();
    host.script_http_call("c1", models_reply(&["gpt-4o", "special"]));
    host.script_http_call("c2", models_reply(&["gpt-4o"]));
    let mut vm = vm_for(&host, &model_aware(&[("c1", -1), ("c2", -1)], ""));
    vm.tick();
    let calls = host.http_calls();
    assert_eq!(calls.len(), 2, "one /v1/models fetch per credential: {calls:?}");
    assert!(calls.iter().all(|c| c.headers.iter().any(|(k, v)| k == ":path" && v == "/v1/models")));
    assert!(calls.iter().any(|c| c.headers.iter().any(|(k, v)| k == "authorization" && v == "Bearer sk-c1-secret-key")));
    assert_eq!(names(&mut vm, 3, "special"), ["c1", "c1", "c1"]);
    let ex = chat(&mut vm, "ghost");
    let e = assert_openai_error(ex.expect_local(), 404, "invalid_request_error");
    assert_eq!(e["error"]["code"], "model_not_found", "a client error, as OpenAI answers it: SDKs don't retry it");
    // /v1/models merges both lists
    let ex = vm.http_request(&[(":method", "GET"), (":path", "/v1/models"), ("authorization", &format!("Bearer {MASTER}"))], b"");
    let v = json(ex.expect_local());
    let ids: Vec<&str> = v["data"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["gpt-4o", "special"]);
}

#[test]
fn model_fetch_is_done_by_one_vm_only() {
    let host = Host::new();
    host.script_http_call("c1", models_reply(&["a"]));
    let mut vms = host.vms(4, &model_aware(&[("c1", -1)], ""), &[]).unwrap();
    host.advance_ms(1000);
    for vm in vms.iter_mut() {
        vm.run_due();
    }
    assert_eq!(host.http_calls().len(), 1, "the lease elects one fetcher: {:?}", host.http_calls());
}

#[test]
fn model_fetch_failure_keeps_routing_to_every_credential() {
    let host = Host::new();
    host.script_http_call("c1", CallReply::Timeout);
    host.script_http_call("c2", CallReply::Failure);
    let mut vm = vm_for(&host, &model_aware(&[("c1", -1), ("c2", -1)], ""));
    vm.tick();
    host.advance_ms(11_000);
    vm.run_due();
    assert_eq!(names(&mut vm, 2, "anything"), ["c1", "c2"]);
    assert!(host.log_messages(LogLevel::Error).iter().any(|m| m.contains("models fetch for credential c2 failed")), "{:?}", host.logs());
}

#[test]
fn model_rpm_1_second_request_429_although_another_credential_is_free() {
    let host = Host::new();
    host.script_http_call("c1", models_reply(&["gpt-4o"]));
    host.script_http_call("c2", models_reply(&["other"]));
    let mut vm = vm_for(&host, &model_aware(&[("c1", -1), ("c2", -1)], "models: [{name: gpt-4o, rpm: 1}]\n"));
    vm.tick();
    assert_eq!(drive(&mut vm, "gpt-4o", |_| 200), "c1");
    host.advance_ms(1000);
    let ex = chat(&mut vm, "gpt-4o");
    assert_eq!(ex.expect_local().status, 429);
    assert_eq!(ex.expect_local().header("retry-after"), Some("60"));
    assert_eq!(drive(&mut vm, "other", |_| 200), "c2", "c2 itself is free");
}

#[test]
fn one_banned_plus_one_rate_limited_is_503() {
    let host = Host::new();
    let mut vm = vm_for(&host, &cfg(&[("c1", 1), ("c2", -1)], "fail2ban: {max_attempts: 1}\n"));
    assert_eq!(drive(&mut vm, "m", |_| 200), "c1");
    assert_eq!(drive(&mut vm, "m", |_| 500), "c2");
    let ex = chat(&mut vm, "m");
    assert_openai_error(ex.expect_local(), 503, "service_unavailable_error");
}

// ---------------------------------------------------------------- fail2ban (issue 2 cases)

fn one_cred(extra: &str) -> (Host, Vm) {
    let host = Host::new();
    let vm = vm_for(&host, &cfg(&[("c1", -1)], extra));
    (host, vm)
}

fn banned(vm: &mut Vm) -> bool {
    health(vm).1["credentials_banned"] == 1
}

#[test]
fn errors_401_403_then_500_with_max_3_ban() {
    let (host, mut vm) = one_cred("fail2ban: {max_attempts: 3}\n");
    for (i, s) in [401, 403, 500].into_iter().enumerate() {
        assert!(!banned(&mut vm), "banned after only {i} errors");
        drive(&mut vm, "m", |_| s);
    }
    assert!(banned(&mut vm));
    assert_eq!(host.metric("auto_ai_router_credential_errors_total.credential=.=c1;.;"), Some(3));
    assert_eq!(host.metric("auto_ai_router_credential_banned.credential=.=c1;.;"), Some(1));
    assert!(host.log_messages(LogLevel::Warn).iter().any(|m| m.contains("credential c1 banned")));
    assert_eq!(chat(&mut vm, "m").expect_local().status, 503);
}

#[test]
fn two_errors_then_200_resets_the_count() {
    let (_h, mut vm) = one_cred("fail2ban: {max_attempts: 3}\n");
    drive(&mut vm, "m", |_| 500);
    drive(&mut vm, "m", |_| 502);
    drive(&mut vm, "m", |_| 200);
    drive(&mut vm, "m", |_| 500);
    drive(&mut vm, "m", |_| 500);
    assert!(!banned(&mut vm), "the 200 reset the count to 0");
    drive(&mut vm, "m", |_| 500);
    assert!(banned(&mut vm));
}

#[test]
fn untracked_404_changes_nothing() {
    let (_h, mut vm) = one_cred("fail2ban: {max_attempts: 2}\n");
    drive(&mut vm, "m", |_| 500);
    for _ in 0..5 {
        drive(&mut vm, "m", |_| 404);
    }
    assert!(!banned(&mut vm));
    drive(&mut vm, "m", |_| 500);
    assert!(banned(&mut vm), "404s neither counted nor reset");
}

#[test]
fn responses_while_banned_are_ignored() {
    let (host, mut vm) = one_cred("fail2ban: {max_attempts: 2, ban_duration: 10s}\n");
    // two requests in flight; both fail; a third was also in flight and returns 200 late
    let a = chat(&mut vm, "m");
    let b = chat(&mut vm, "m");
    let c = chat(&mut vm, "m");
    vm.respond(&a, 500, &[], b"");
    vm.respond(&b, 500, &[], b"");
    assert!(banned(&mut vm));
    vm.respond(&c, 200, &[], b"{}");
    assert!(banned(&mut vm), "a 200 arriving while banned does not lift the ban");
    host.advance_ms(10_001);
    assert!(!banned(&mut vm));
    // and the count restarted: one error is not enough
    drive(&mut vm, "m", |_| 500);
    assert!(!banned(&mut vm));
}

#[test]
fn ban_of_100ms_has_lifted_at_150ms_with_count_reset() {
    let (host, mut vm) = one_cred("fail2ban: {max_attempts: 2, ban_duration: 100ms}\n");
    drive(&mut vm, "m", |_| 500);
    drive(&mut vm, "m", |_| 500);
    assert!(banned(&mut vm));
    host.advance_ms(50);
    assert!(banned(&mut vm));
    host.advance_ms(100);
    assert!(!banned(&mut vm));
    assert_eq!(drive(&mut vm, "m", |_| 500), "c1");
    assert!(!banned(&mut vm), "count reset when the ban lifted");
}

#[test]
fn permanent_ban_never_lifts() {
    let (host, mut vm) = one_cred("fail2ban: {max_attempts: 1, ban_duration: permanent}\n");
    drive(&mut vm, "m", |_| 401);
    host.advance_ms(24 * 3600 * 1000);
    assert!(banned(&mut vm));
}

#[test]
fn errors_on_one_credential_never_touch_another() {
    let host = Host::new();
    let mut vm = vm_for(&host, &cfg(&[("c1", -1), ("c2", -1)], "fail2ban: {max_attempts: 2}\n"));
    assert_eq!(drive(&mut vm, "m", |_| 500), "c1");
    assert_eq!(drive(&mut vm, "m", |_| 200), "c2");
    assert_eq!(drive(&mut vm, "m", |_| 500), "c1");
    let (_, h) = health(&mut vm);
    assert_eq!(h["credentials_banned"], 1);
    assert_eq!(names(&mut vm, 3, "m"), ["c2", "c2", "c2"]);
    assert_eq!(host.metric("auto_ai_router_credential_errors_total.credential=.=c2;.;"), None);
}

#[test]
fn connect_failure_and_timeout_count_as_502_and_504() {
    let (host, mut vm) = one_cred("fail2ban: {max_attempts: 2, error_codes: [502, 504]}\n");
    let ex = chat(&mut vm, "m");
    let r = vm.respond_failure(&ex, UpstreamFailure::ConnectFailure);
    assert_eq!(r.status, 503, "the client sees Envoy's reply");
    assert!(!banned(&mut vm));
    let ex = chat(&mut vm, "m");
    vm.respond_failure(&ex, UpstreamFailure::Timeout);
    assert!(banned(&mut vm), "connect failure counted as 502, timeout as 504");
    let m = host.metrics();
    assert!(m.iter().any(|(_, n, v)| n.contains("requests_total") && n.contains("status=.=502") && *v == 1), "{m:?}");
    assert!(m.iter().any(|(_, n, v)| n.contains("requests_total") && n.contains("status=.=504") && *v == 1), "{m:?}");
}

#[test]
fn upstream_503_is_a_503_not_a_connect_failure() {
    let (_h, mut vm) = one_cred("fail2ban: {max_attempts: 1, error_codes: [502]}\n");
    drive(&mut vm, "m", |_| 503);
    assert!(!banned(&mut vm), "a real upstream 503 is not counted as 502");
}

// ---------------------------------------------------------------- RPM windows

#[test]
fn rpm_unlimited_admits_1000_in_a_row() {
    let (_h, mut vm) = one_cred("");
    for i in 0..1000 {
        let ex = chat(&mut vm, "m");
        assert_eq!(ex.cluster(), Some("c1"), "request {i}: {:?}", ex.outcome);
        vm.abort(&ex);
    }
}

#[test]
fn window_slides_admissions_older_than_60s_no_longer_count() {
    let host = Host::new();
    let mut vm = vm_for(&host, &cfg(&[("c1", 2)], ""));
    assert_eq!(drive(&mut vm, "m", |_| 200), "c1");
    host.advance_ms(30_000);
    assert_eq!(drive(&mut vm, "m", |_| 200), "c1");
    host.advance_ms(29_999);
    let ex = chat(&mut vm, "m");
    assert_eq!(ex.expect_local().status, 429);
    assert_eq!(ex.expect_local().header("retry-after"), Some("2"));
    host.advance_ms(1);
    let ex = chat(&mut vm, "m");
    assert_eq!(ex.expect_local().status, 429, "second 0 counts through second 60: an admission in it may have been at 0.999 s");
    assert_eq!(ex.expect_local().header("retry-after"), Some("1"));
    host.advance_ms(1000);
    assert_eq!(drive(&mut vm, "m", |_| 200), "c1", "the admission in second 0 has left the window");
    assert_eq!(chat(&mut vm, "m").expect_local().status, 429);
}

// ---------------------------------------------------------------- auth, errors, rewrite

#[test]
fn three_distinct_401s() {
    let (host, mut vm) = one_cred("");
    let body = br#"{"model":"m"}"#;
    let base = [(":method", "POST"), (":path", CHAT), (":authority", "r")];
    let missing = vm.http_request(&base, body);
    let mut h = base.to_vec();
    h.push(("authorization", "Basic Zm9vOmJhcg=="));
    let malformed = vm.http_request(&h, body);
    let mut h = base.to_vec();
    h.push(("authorization", "Bearer sk-wrong-key-1234567"));
    let wrong = vm.http_request(&h, body);
    let msgs: Vec<String> = [&missing, &malformed, &wrong]
        .iter()
        .map(|ex| assert_openai_error(ex.expect_local(), 401, "authentication_error")["error"]["message"].as_str().unwrap().to_string())
        .collect();
    assert_ne!(msgs[0], msgs[1]);
    assert_ne!(msgs[1], msgs[2]);
    assert_ne!(msgs[0], msgs[2]);
    assert!(!wrong.expect_local().body_str().contains("sk-wrong"), "the key is not echoed");
    assert_eq!(host.metric("auto_ai_router_rejections_total.reason=.=auth;.;"), Some(3));
    assert!(host.http_calls().is_empty());
}

#[test]
fn master_key_is_never_forwarded_and_is_swapped_for_the_provider_key() {
    let (host, mut vm) = one_cred("");
    let ex = vm.http_request(
        &[
            (":method", "POST"),
            (":path", CHAT),
            (":authority", "router.local"),
            ("authorization", &format!("Bearer {MASTER}")),
            ("x-api-key", MASTER),
            ("x-auto-ai-router-cluster", "evil"),
            ("x-trace", "keep-me"),
        ],
        br#"{"model":"m"}"#,
    );
    let f = ex.expect_forwarded();
    assert_eq!(f.header_all("authorization"), ["Bearer sk-c1-secret-key"]);
    assert!(f.headers.iter().all(|(_, v)| !v.contains(MASTER)), "master key forwarded: {:?}", f.headers);
    assert_eq!(f.header("x-api-key"), None);
    // The client's authority stays (the route must stay the router's on a gateway with a virtual
    // host per host name); Envoy puts the provider's on each attempt (auto_host_rewrite).
    assert_eq!(f.header(":authority"), Some("router.local"));
    assert_eq!(f.header(":path"), Some(CHAT));
    assert_eq!(f.header("x-trace"), Some("keep-me"));
    assert_eq!(f.cluster.as_deref(), Some("c1"), "route recomputed after the filter wrote the credential into filter state");
    assert!(f.route_cache_clears >= 1);
    assert_eq!(f.body, br#"{"model":"m"}"#, "body passes unchanged");
    assert!(host.logs().iter().all(|l| !l.message.contains("sk-c1-secret-key") && !l.message.contains(MASTER)), "a key was logged in full");
}

#[test]
fn only_the_filter_picks_the_cluster() {
    let host = Host::new();
    let mut vm = vm_for(&host, &cfg(&[("c1", -1), ("c2", -1)], ""));
    let mut seen = Vec::new();
    for _ in 0..4 {
        // The header that picked the cluster in earlier versions means nothing now.
        let ex = vm.http_request(
            &[(":method", "POST"), (":path", CHAT), ("authorization", &format!("Bearer {MASTER}")), ("x-auto-ai-router-cluster", "c2")],
            br#"{"model":"m"}"#,
        );
        let f = ex.expect_forwarded();
        assert_eq!(f.cluster.as_deref(), f.filter_state.get(ROUTE_FILTER_STATE).map(|v| std::str::from_utf8(v).unwrap()));
        seen.push(f.cluster.clone().unwrap());
        vm.abort(&ex);
    }
    assert_eq!(seen, ["c1", "c2", "c1", "c2"], "round-robin, whatever the client sent");
    // A request the router does not handle passes untouched and unrouted (on a shared gateway
    // other apps' headers are theirs); no route of the bootstrap reads a client header.
    let ex = vm.http_request(&[(":method", "GET"), (":path", "/metrics"), ("x-auto-ai-router-cluster", "c2"), ("x-api-key", "k")], b"");
    let f = ex.expect_forwarded();
    assert_eq!(f.cluster, None);
    assert_eq!(f.header("x-api-key"), Some("k"));
}

#[test]
fn base_url_path_is_prefixed() {
    let host = Host::new();
    let c = format!(
        "server: {{master_key: {MASTER}, replace_v1_models: false, max_provider_retries: 0}}\ncredentials:\n  - {{name: az, api_key: sk-az-secret-key, base_url: 'http://gw.test:8443/openai/', rpm: -1}}\n"
    );
    let mut vm = vm_for(&host, &c);
    let ex = chat(&mut vm, "m");
    let f = ex.expect_forwarded();
    assert_eq!(f.header(":path"), Some("/openai/v1/chat/completions"));
    assert_eq!(f.cluster.as_deref(), Some("az"));
}

#[test]
fn bad_json_and_missing_model_are_400() {
    let (host, mut vm) = one_cred("");
    for body in ["not json", r#"{"messages":[]}"#, r#"{"model": 5}"#, r#"[1,2]"#, ""] {
        let ex = vm.post(CHAT, MASTER, body);
        assert_openai_error(ex.expect_local(), 400, "invalid_request_error");
    }
    assert_eq!(host.metric("auto_ai_router_rejections_total.reason=.=bad_request;.;"), Some(5));
}

#[test]
fn body_above_max_body_size_is_413_also_in_chunks() {
    let host = Host::new();
    let c =
        format!("server: {{master_key: {MASTER}, max_body_size_mb: 1, replace_v1_models: false}}\ncredentials:\n{}", creds(&[("c1", -1)]));
    let mut vm = vm_for(&host, &c);
    let big = format!(r#"{{"model":"m","pad":"{}"}}"#, "x".repeat(1 << 20));
    let ex = vm.post(CHAT, MASTER, &big);
    let v = assert_openai_error(ex.expect_local(), 413, "invalid_request_error");
    assert!(v["error"]["message"].as_str().unwrap().contains("1 MB"));
    let chunk = vec![b' '; 300 * 1024];
    let chunks: Vec<&[u8]> = vec![br#"{"model":"m","#, &chunk, &chunk, &chunk, &chunk, b"}"];
    let ex = vm.http_request_chunks(&[(":method", "POST"), (":path", CHAT), ("authorization", &format!("Bearer {MASTER}"))], &chunks);
    assert_eq!(ex.expect_local().status, 413);
    // just under the limit passes, body intact
    let ok = format!(r#"{{"model":"m","pad":"{}"}}"#, "x".repeat(1000 * 1000));
    let ex = vm.post(CHAT, MASTER, &ok);
    assert_eq!(ex.expect_forwarded().body.len(), ok.len());
    assert_eq!(host.metric("auto_ai_router_rejections_total.reason=.=too_large;.;"), Some(2));
}

#[test]
fn chunked_body_is_held_until_end_of_stream() {
    let (_h, mut vm) = one_cred("");
    let chunks: Vec<&[u8]> = vec![br#"{"mo"#, br#"del":"m","messages""#, br#":[]}"#];
    let ex = vm.http_request_chunks(&[(":method", "POST"), (":path", CHAT), ("authorization", &format!("Bearer {MASTER}"))], &chunks);
    let f = ex.expect_forwarded();
    assert_eq!(f.body, br#"{"model":"m","messages":[]}"#);
    assert!(f.complete);
    assert_eq!(f.cluster.as_deref(), Some("c1"));
}

#[test]
fn other_v1_paths_route_without_a_model_and_unknown_paths_pass() {
    let (_h, mut vm) = one_cred("");
    let ex = vm.http_request(&[(":method", "GET"), (":path", "/v1/files"), ("authorization", &format!("Bearer {MASTER}"))], b"");
    assert_eq!(ex.cluster(), Some("c1"));
    let ex = vm.http_request(&[(":method", "GET"), (":path", "/v1/files")], b"");
    assert_eq!(ex.expect_local().status, 401);
}

#[test]
fn sse_response_passes_chunk_by_chunk() {
    let (_h, mut vm) = one_cred("");
    let ex = chat(&mut vm, "m");
    let events: Vec<&[u8]> = vec![b"data: {\"a\":1}\n\n", b"data: {\"a\":2}\n\n", b"data: [DONE]\n\n"];
    let r = vm.respond_chunks(&ex, 200, &[("content-type", "text/event-stream")], &events);
    assert_eq!(r.chunks.len(), 3, "the response body is never buffered");
    assert!(r.complete);
}

#[test]
fn upstream_error_body_passes_unchanged() {
    let (_h, mut vm) = one_cred("");
    let ex = chat(&mut vm, "m");
    let body = br#"{"error":{"message":"quota","type":"insufficient_quota"}}"#;
    let r = vm.respond(&ex, 429, &[("content-type", "application/json")], body);
    assert_eq!(r.status, 429);
    assert_eq!(r.body, body);
}

#[test]
fn health_needs_no_auth() {
    let host = Host::new();
    let mut vm = vm_for(&host, &cfg(&[("c1", -1), ("c2", -1)], ""));
    let (status, h) = health(&mut vm);
    assert_eq!(status, 200);
    assert_eq!(h, serde_json::json!({"credentials_available":2,"credentials_banned":0,"status":"healthy","total_credentials":2}));
}

#[test]
fn metrics_count_requests_by_credential_endpoint_status() {
    let host = Host::new();
    let mut vm = vm_for(&host, &cfg(&[("c1", -1)], ""));
    drive(&mut vm, "gpt-4o", |_| 200);
    drive(&mut vm, "gpt-4o", |_| 200);
    host.advance_ms(5);
    let ex = chat(&mut vm, "gpt-4o");
    host.advance_ms(250);
    vm.respond(&ex, 500, &[], b"");
    assert_eq!(host.metric("auto_ai_router_requests_total.credential=.=c1;.;.endpoint=.=/v1/chat/completions;.;.status=.=200;.;"), Some(2));
    assert_eq!(host.metric("auto_ai_router_requests_total.credential=.=c1;.;.endpoint=.=/v1/chat/completions;.;.status=.=500;.;"), Some(1));
    assert_eq!(host.metric("auto_ai_router_model_requests_total.credential=.=c1;.;.model=.=gpt-4o;.;"), Some(3));
    let hist =
        host.histogram("auto_ai_router_requests_duration_milliseconds.credential=.=c1;.;.endpoint=.=/v1/chat/completions;.;").unwrap();
    assert_eq!(hist.len(), 3);
    assert!(hist.contains(&250), "{hist:?}");
}

// ---------------------------------------------------------------- configuration

#[test]
fn os_environ_keys_resolve_from_vm_environment() {
    let host = Host::new();
    let c = "server: {master_key: os.environ/MK, replace_v1_models: false, max_provider_retries: 0}\ncredentials:\n  - {name: c1, api_key: os.environ/C1_KEY, base_url: 'https://a.test', rpm: -1}\n";
    let mut vm = host.vm(c, &[("MK", "sk-from-env-master"), ("C1_KEY", "sk-from-env-provider")]).unwrap();
    let ex = vm.post(CHAT, "sk-from-env-master", r#"{"model":"m"}"#);
    assert_eq!(ex.expect_forwarded().header("authorization"), Some("Bearer sk-from-env-provider"));
    assert_eq!(vm.post(CHAT, "os.environ/MK", r#"{"model":"m"}"#).expect_local().status, 401);
    // a missing variable is a configuration error naming it
    let err = Host::new().vm(c, &[("MK", "x")]).err().expect("missing variable must be refused");
    assert!(matches!(err, VmError::ConfigureFailed(_)));
    assert!(err.messages().contains("C1_KEY"), "{}", err.messages());
}

#[test]
fn config_errors_are_rejected_by_on_configure() {
    let cases = [
        ("credentials: []\n", "master_key"),
        (&*format!("server: {{master_key: k}}\ncredentials:\n{}", creds(&[("c1", 0)])), "rpm"),
        (&*format!("server: {{master_key: k}}\ncredentials:\n{}{}", creds(&[("c1", 1)]), creds(&[("c1", 1)])), "c1"),
        (&*format!("server: {{master_key: k, bogus: 1}}\ncredentials:\n{}", creds(&[("c1", 1)])), "bogus"),
        (&*format!("server: {{master_key: k}}\ncredentials:\n{}fail2ban: {{ban_duration: soon}}\n", creds(&[("c1", 1)])), "soon"),
        ("{not yaml", ""),
    ];
    for (c, needle) in cases {
        let host = Host::new();
        match host.vm(c, &[]) {
            Err(e @ VmError::ConfigureFailed(_)) => {
                assert!(e.messages().contains(needle), "config {c:?}: message lacks {needle:?}: {}", e.messages())
            }
            Err(e) => panic!("config {c:?}: expected on_configure to return false, got {e:?}"),
            Ok(_) => panic!("config {c:?} was accepted"),
        }
        assert!(host.traps().is_empty(), "{:?}", host.traps());
    }
}

#[test]
fn json_plugin_configuration_is_accepted() {
    let host = Host::new();
    let c = r#"{"server":{"master_key":"mk-json","replace_v1_models":false},"credentials":[{"name":"c1","api_key":"sk-1234567890","base_url":"https://a.test","rpm":-1}]}"#;
    let mut vm = host.vm(c, &[]).unwrap();
    assert_eq!(vm.post(CHAT, "mk-json", r#"{"model":"m"}"#).cluster(), Some("c1"));
}

// ---------------------------------------------------------------- concurrency

/// 4 VMs, 1000 requests interleaved (each VM's read-then-CAS window is preempted by another VM's
/// whole request), rpm 100 on one credential: exactly 100 admitted per 60 s, never more.
#[test]
fn four_vms_1000_requests_rpm_100_admit_exactly_100_per_minute() {
    let host = Host::new();
    let c = cfg(&[("c1", 100)], "");
    let vms: Vec<Arc<Mutex<Vm>>> = host.vms(4, &c, &[]).unwrap().into_iter().map(|v| Arc::new(Mutex::new(v))).collect();
    let admitted: Arc<Mutex<Vec<u64>>> = Arc::default();
    let rejected = Arc::new(Mutex::new(0u32));
    let remaining = Arc::new(Mutex::new(1000u32));
    let run_one = {
        let (host, admitted, rejected) = (host.clone(), admitted.clone(), rejected.clone());
        move |vm: &mut Vm| {
            let ex = chat(vm, "m");
            match &ex.outcome {
                Outcome::Forwarded(_) => {
                    admitted.lock().unwrap().push(host.elapsed_ms());
                    vm.abort(&ex);
                }
                Outcome::LocalReply(r) if r.status == 429 => *rejected.lock().unwrap() += 1,
                o => panic!("unexpected {o:?}"),
            }
        }
    };
    // Preemption: inside one VM's shared-data read, another idle VM runs a whole request.
    let preempts = Arc::new(Mutex::new(0u32));
    {
        let (vms, remaining, run_one, preempts) = (vms.clone(), remaining.clone(), run_one.clone(), preempts.clone());
        let mut turn = 0usize;
        host.set_preempt(Some(Box::new(move || {
            turn += 1;
            if !turn.is_multiple_of(3) {
                return;
            }
            for k in 0..vms.len() {
                if let Ok(mut vm) = vms[(turn + k) % vms.len()].try_lock() {
                    {
                        let mut r = remaining.lock().unwrap();
                        if *r == 0 {
                            return;
                        }
                        *r -= 1;
                    }
                    *preempts.lock().unwrap() += 1;
                    run_one(&mut vm);
                    return;
                }
            }
        })));
    }
    let mut i = 0usize;
    loop {
        {
            let mut r = remaining.lock().unwrap();
            if *r == 0 {
                break;
            }
            *r -= 1;
            // 1000 requests over 180 s; a preempting request runs at its victim's time (the
            // clock-skew case has its own test below)
            let target = 180 * (1000 - *r as u64);
            host.advance_ms(target.saturating_sub(host.elapsed_ms()));
        }
        let mut vm = vms[i % 4].lock().unwrap();
        run_one(&mut vm);
        i += 1;
    }
    host.set_preempt(None);
    let admitted = admitted.lock().unwrap().clone();
    let total = admitted.len() as u32 + *rejected.lock().unwrap();
    assert_eq!(total, 1000);
    assert!(*preempts.lock().unwrap() > 100, "the interleaving did not happen");
    let first_minute = admitted.iter().filter(|t| **t < 60_000).count();
    assert_eq!(first_minute, 100, "first 60 s must admit exactly 100");
    // never more than 100 in any 60 s window (1 s granularity)
    let secs: Vec<u64> = admitted.iter().map(|t| t / 1000).collect();
    for &s in &secs {
        let in_window = secs.iter().filter(|&&x| x + 60 > s && x <= s).count();
        assert!(in_window <= 100, "{in_window} admissions in the 60 s window ending at {s} s");
    }
    assert!(admitted.len() >= 250, "the window slides: {} admitted over 180 s", admitted.len());
    assert!(host.traps().is_empty(), "{:?}", host.traps());
}

/// Error responses arriving on 4 VMs with interleaved read-modify-CAS: none is lost.
#[test]
fn four_vms_fail2ban_increments_are_never_lost() {
    for (errors, expect_banned) in [(49, false), (50, true)] {
        let host = Host::new();
        let c = cfg(&[("c1", -1), ("c2", -1)], "fail2ban: {max_attempts: 50, ban_duration: 1h}\n");
        let vms: Vec<Arc<Mutex<Vm>>> = host.vms(4, &c, &[]).unwrap().into_iter().map(|v| Arc::new(Mutex::new(v))).collect();
        // open `errors` streams to c1 spread over the VMs (c2 requests are answered 200 at once)
        let pending: Arc<Mutex<Vec<(usize, Exchange)>>> = Arc::default();
        let mut i = 0;
        while pending.lock().unwrap().len() < errors {
            let mut vm = vms[i % 4].lock().unwrap();
            let ex = chat(&mut vm, "m");
            if ex.cluster() == Some("c1") {
                pending.lock().unwrap().push((i % 4, ex));
            } else {
                vm.respond(&ex, 200, &[], b"{}");
            }
            i += 1;
        }
        {
            let (vms, pending) = (vms.clone(), pending.clone());
            host.set_preempt(Some(Box::new(move || {
                let next = {
                    let mut p = pending.lock().unwrap();
                    let pos = p.iter().position(|(v, _)| vms[*v].try_lock().is_ok());
                    pos.map(|pos| p.remove(pos))
                };
                if let Some((v, ex)) = next {
                    let mut vm = vms[v].lock().unwrap();
                    vm.respond(&ex, 500, &[], b"");
                }
            })));
        }
        loop {
            let next = pending.lock().unwrap().pop();
            let Some((v, ex)) = next else { break };
            let mut vm = vms[v].lock().unwrap();
            vm.respond(&ex, 500, &[], b"");
        }
        host.set_preempt(None);
        let mut vm = vms[0].lock().unwrap();
        assert_eq!(banned(&mut vm), expect_banned, "{errors} errors with max_attempts 50 (lost increments?)");
        assert_eq!(host.metric("auto_ai_router_credential_errors_total.credential=.=c1;.;"), Some(errors as u64));
    }
}

// ---------------------------------------------------------------- host-level behaviour

#[test]
fn fail_closed_when_configuration_was_never_valid_is_not_a_pass_through() {
    // A VM whose on_configure failed is refused as a whole (Envoy rejects the listener).
    let host = Host::new();
    assert!(host.vm("server: {}\n", &[]).is_err());
}

#[test]
fn vms_share_shared_data_and_metrics() {
    let host = Host::new();
    let c = cfg(&[("c1", 3)], "");
    let mut vms = host.vms(2, &c, &[]).unwrap();
    for k in 0..3 {
        assert_eq!(drive(&mut vms[k % 2], "m", |_| 200), "c1");
    }
    assert_eq!(chat(&mut vms[1], "m").expect_local().status, 429);
    assert_eq!(host.metric("auto_ai_router_requests_total.credential=.=c1;.;.endpoint=.=/v1/chat/completions;.;.status=.=200;.;"), Some(3));
    host.advance_ms(1000);
    vms[0].run_due();
    assert_eq!(host.metric("auto_ai_router_credential_rpm_current.credential=.=c1;.;"), Some(3));
    let keys = host.shared_data_keys();
    assert!(keys.len() < 20, "shared data keys stay bounded: {keys:?}");
}

#[test]
fn no_traps_over_a_varied_run() {
    let host = Host::new();
    let mut vm = vm_for(&host, &cfg(&[("c1", 5), ("c2", -1)], "fail2ban: {max_attempts: 2, ban_duration: 1s}\n"));
    for i in 0..200u64 {
        host.advance_ms(97);
        match i % 5 {
            0 => drop(vm.http_request(&[(":method", "GET"), (":path", "/health")], b"")),
            1 => drop(vm.post(CHAT, "wrong", "{}")),
            2 => drop(vm.post(CHAT, MASTER, "{bad")),
            _ => {
                drive(&mut vm, "m", |c| if c == "c2" && i % 7 == 0 { 500 } else { 200 });
            }
        }
    }
    assert!(host.traps().is_empty(), "{:?}", host.traps());
    assert!(vm.failure().is_none());
}

/// Worker A reads the clock at x.999 s, worker B admits at x+1.000 s inside A's read-then-CAS
/// window; A's retried charge must not corrupt the window (Envoy workers' clocks interleave).
#[test]
fn second_boundary_race_between_two_vms_keeps_the_window() {
    let host = Host::new();
    let c = cfg(&[("c1", 2)], "");
    let vms: Vec<Arc<Mutex<Vm>>> = host.vms(2, &c, &[]).unwrap().into_iter().map(|v| Arc::new(Mutex::new(v))).collect();
    host.advance_ms(10_999);
    for vm in &vms {
        vm.lock().unwrap().run_due(); // ticks now, so the race below happens inside A's request
    }
    {
        let (vms, host2) = (vms.clone(), host.clone());
        let mut fired = false;
        host.set_preempt(Some(Box::new(move || {
            if fired {
                return;
            }
            fired = true;
            host2.advance_ms(1);
            let mut b = vms[1].lock().unwrap();
            let ex = chat(&mut b, "m");
            assert_eq!(ex.cluster(), Some("c1"));
            b.abort(&ex);
        })));
    }
    let ex = chat(&mut vms[0].lock().unwrap(), "m");
    assert_eq!(ex.cluster(), Some("c1"), "A is admitted too (2 of rpm 2)");
    host.set_preempt(None);
    let third = chat(&mut vms[1].lock().unwrap(), "m");
    assert_eq!(
        third.status(),
        Some(429),
        "rpm 2: a third admission within the minute must be refused, got {:?} (rate record after the race: {:?})",
        third.outcome,
        host.shared_data_keys().iter().map(|k| (k.clone(), host.shared_data(k).unwrap().0)).collect::<Vec<_>>()
    );
}
