//! Retries on another credential (issue 12) on the real `filter.wasm`: the downstream filter and
//! the same module as the upstream filter (root `auto_ai_router_upstream`) in one VM, attempt by
//! attempt as Envoy's router runs them.

use host_sim::*;

const MASTER: &str = "sk-master-0123456789";
const CHAT: &str = "/v1/chat/completions";
const BODY: &str = r#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#;
const UP: &str = "auto_ai_router_upstream";
const NEXT: &str = "wasm.auto_ai_router_next";
const RETRY: &str = "x-auto-ai-router-retry";

/// Credentials a, b, c with their own base_url path prefixes.
fn cfg(server: &str, rpm_b: i64) -> String {
    format!(
        "server: {{master_key: {MASTER}, default_models_rpm: -1, replace_v1_models: false{server}}}\ncredentials:\n\
         \x20 - {{name: a, api_key: sk-a-secret-key, base_url: 'https://a.test/pa', rpm: -1}}\n\
         \x20 - {{name: b, api_key: sk-b-secret-key, base_url: 'https://b.test/pb', rpm: {rpm_b}}}\n\
         \x20 - {{name: c, api_key: sk-c-secret-key, base_url: 'https://c.test', rpm: -1}}\n\
         fail2ban: {{max_attempts: 2, ban_duration: 1m, error_codes: [401, 403, 429, 500, 502, 503, 504]}}\n"
    )
}

fn vm(host: &Host, server: &str, rpm_b: i64) -> Vm {
    let c = cfg(server, rpm_b);
    host.vm_with(VmConfig::new(c.clone()).plugin(UP, c)).unwrap_or_else(|e| panic!("{e:?}\n{}", e.messages()))
}

/// The attempt's connection is refused: Envoy sets the transport failure reason, then the
/// attempt ends without a response.
fn refuse(vm: &mut Vm, up: &Exchange) {
    vm.set_stream_property(up, "upstream.transport_failure_reason", "delayed connect error: Connection refused");
    vm.abort(up);
}

fn next(vm: &Vm, ex: &Exchange) -> Option<String> {
    vm.filter_state(ex).get(NEXT).map(|v| String::from_utf8_lossy(v).into_owned())
}

fn credentials(vm: &mut Vm) -> serde_json::Value {
    let auth = format!("Bearer {MASTER}");
    let ex = vm.http_request(&[(":method", "GET"), (":path", "/v1/credentials"), (":authority", "r"), ("authorization", &auth)], b"");
    serde_json::from_slice(&ex.expect_local().body).unwrap()
}

fn state<'a>(v: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    v["data"].as_array().unwrap().iter().find(|c| c["name"] == name).unwrap()
}

#[test]
fn a_429_is_retried_on_the_next_key_with_that_keys_own_credentials() {
    let host = Host::new();
    let mut vm = vm(&host, "", -1);
    let ex = vm.post(CHAT, MASTER, BODY);
    assert_eq!(ex.cluster(), Some("a"));
    assert_eq!(next(&vm, &ex).as_deref(), Some("a"), "the matcher's input");

    let up = vm.upstream_request(&ex, UP, "a");
    let f = up.expect_forwarded();
    assert_eq!(f.header("authorization"), Some("Bearer sk-a-secret-key"));
    assert_eq!(f.header(":path"), Some("/pa/v1/chat/completions"));
    // `:authority` is Envoy's to set per attempt (auto_host_rewrite from the endpoint).
    assert_ne!(f.header(":authority"), Some("a.test"));
    let r = vm.respond(&up, 429, &[("retry-after", "30")], br#"{"error":"slow down"}"#);
    assert_eq!(r.header(RETRY), Some("1"), "the route retries on this header");
    assert_eq!(r.header("x-auto-ai-router-attempts"), Some("1"));
    assert_eq!(next(&vm, &ex).as_deref(), Some("b"));

    let up = vm.upstream_request(&ex, UP, "b");
    let f = up.expect_forwarded();
    assert_eq!(f.header("authorization"), Some("Bearer sk-b-secret-key"), "never the previous attempt's key");
    assert_eq!(f.header(":path"), Some("/pb/v1/chat/completions"), "rebuilt from the client's path, not /pb/pa/...");
    assert_eq!(f.body, BODY.as_bytes(), "the body is replayed intact");
    let r = vm.respond(&up, 200, &[], b"{}");
    assert_eq!(r.header(RETRY), None);
    assert_eq!(r.header("x-auto-ai-router-attempts"), Some("2"));
    let final_answer = vm.respond(&ex, 200, &[], b"{}");
    assert_eq!(final_answer.status, 200);

    // Per attempt: each credential's own status.
    let m = host.metrics();
    let count = |name: &str| m.iter().find(|(_, k, _)| k.as_str() == name).map(|(_, _, v)| *v);
    assert_eq!(count("auto_ai_router_requests_total.credential=.=a;.;.endpoint=.=/v1/chat/completions;.;.status=.=429;.;"), Some(1));
    assert_eq!(count("auto_ai_router_requests_total.credential=.=b;.;.endpoint=.=/v1/chat/completions;.;.status=.=200;.;"), Some(1));
    assert_eq!(count("auto_ai_router_retries_total.credential=.=a;.;.reason=.=429;.;"), Some(1));

    // a cools down for 30 s and its 429 was no strike; b and c serve meanwhile.
    let v = credentials(&mut vm);
    assert_eq!((state(&v, "a")["status"].as_str(), state(&v, "a")["consecutive_errors"].as_u64()), (Some("cooldown"), Some(0)));
    for _ in 0..4 {
        let ex = vm.post(CHAT, MASTER, BODY);
        assert_ne!(ex.cluster(), Some("a"));
        vm.abort(&ex);
    }
    host.advance_ms(30_000);
    let v = credentials(&mut vm);
    assert_eq!(state(&v, "a")["status"], "available");
    assert!(!serde_json::to_string(&v).unwrap().contains("secret"), "never a key");
    assert!(host.traps().is_empty(), "{:?}", host.traps());
}

#[test]
fn retries_stop_at_max_provider_retries_and_the_last_answer_is_the_providers() {
    let host = Host::new();
    let mut vm = vm(&host, ", max_provider_retries: 1", -1);
    let ex = vm.post(CHAT, MASTER, BODY);
    let up = vm.upstream_request(&ex, UP, "a");
    assert_eq!(vm.respond(&up, 500, &[], b"boom-a").header(RETRY), Some("1"));
    let up = vm.upstream_request(&ex, UP, "b");
    let r = vm.respond(&up, 500, &[], b"boom-b");
    assert_eq!(r.header(RETRY), None, "1 + max_provider_retries attempts, no more");
    assert_eq!(r.body, b"boom-b");
}

#[test]
fn statuses_outside_retry_on_status_are_not_retried() {
    let host = Host::new();
    let mut vm = vm(&host, ", retry_on_status: [503]", -1);
    let ex = vm.post(CHAT, MASTER, BODY);
    let up = vm.upstream_request(&ex, UP, "a");
    assert_eq!(vm.respond(&up, 500, &[], b"{}").header(RETRY), None);
    assert_eq!(next(&vm, &ex).as_deref(), Some("a"));
}

#[test]
fn a_connect_failure_moves_to_the_next_key_and_counts_as_502() {
    let host = Host::new();
    let mut vm = vm(&host, "", -1);
    let ex = vm.post(CHAT, MASTER, BODY);
    let up = vm.upstream_request(&ex, UP, "a");
    refuse(&mut vm, &up); // no response headers: on_done only
    assert_eq!(next(&vm, &ex).as_deref(), Some("b"), "Envoy retries connect failures itself; the matcher sends it to b");
    let v = credentials(&mut vm);
    assert_eq!(state(&v, "a")["consecutive_errors"], 1);
    let m = host.metrics();
    assert!(m.iter().any(|(_, k, v)| k.contains("retries_total.credential=.=a;.;.reason=.=connect_failure") && *v == 1), "{m:?}");
    // b and c refuse too: no key left after c.
    let up = vm.upstream_request(&ex, UP, "b");
    refuse(&mut vm, &up);
    assert_eq!(next(&vm, &ex).as_deref(), Some("c"));
    let up = vm.upstream_request(&ex, UP, "c");
    refuse(&mut vm, &up);
    assert_eq!(next(&vm, &ex).as_deref(), Some("c"), "max_provider_retries (2) reached: nothing more is chosen");
}

#[test]
fn no_key_left_writes_no_credential() {
    let host = Host::new();
    let mut vm = vm(&host, ", max_provider_retries: 5", -1);
    let ex = vm.post(CHAT, MASTER, BODY);
    for c in ["a", "b", "c"] {
        let up = vm.upstream_request(&ex, UP, c);
        refuse(&mut vm, &up);
    }
    assert_eq!(next(&vm, &ex).as_deref(), Some("-"), "matches no cluster: Envoy answers 503, never a tried key again");
}

#[test]
fn a_retry_pick_is_charged_and_skips_full_banned_and_cooling_keys() {
    let host = Host::new();
    let mut vm = vm(&host, "", 1);
    // b is full after one admission; the second request's retry from a must skip it.
    let first = vm.post(CHAT, MASTER, BODY);
    let up = vm.upstream_request(&first, UP, "a");
    vm.respond(&up, 503, &[], b"{}");
    assert_eq!(next(&vm, &first).as_deref(), Some("b"), "the retry took b's only slot");
    let second = vm.post(CHAT, MASTER, BODY);
    assert_eq!(second.cluster(), Some("c"), "b is full: its retry admission was charged");
    let up = vm.upstream_request(&second, UP, "c");
    vm.respond(&up, 429, &[], b"{}");
    assert_eq!(next(&vm, &second).as_deref(), Some("a"), "b full, c cooling (default 5 s)");
}

#[test]
fn a_provider_sent_retry_flag_has_no_effect() {
    let host = Host::new();
    let mut vm = vm(&host, "", -1);
    let ex = vm.post(CHAT, MASTER, BODY);
    let up = vm.upstream_request(&ex, UP, "a");
    let r = vm.respond(&up, 200, &[(RETRY, "1")], b"{}");
    assert_eq!(r.header(RETRY), None, "stripped before the router decides");
    assert_eq!(next(&vm, &ex).as_deref(), Some("a"));
}

#[test]
fn a_request_without_a_plan_passes_the_upstream_filter_untouched() {
    // The filter's own /v1/models fetch goes through the credential's cluster too.
    let host = Host::new();
    let mut vm = vm(&host, "", -1);
    let ex = vm.send(
        Request::new(&[(":method", "GET"), (":path", "/v1/models"), (":authority", "a.test"), ("authorization", "Bearer sk-a-secret-key")])
            .root(UP)
            .property("xds.cluster_name", "a"),
    );
    let f = ex.expect_forwarded();
    assert_eq!((f.header(":path"), f.header("authorization")), (Some("/v1/models"), Some("Bearer sk-a-secret-key")));
    let r = vm.respond(&ex, 500, &[], b"{}");
    assert_eq!(r.header(RETRY), None);
    assert_eq!(state(&credentials(&mut vm), "a")["consecutive_errors"], 0, "not accounted");
}

#[test]
fn with_retries_off_the_downstream_filter_accounts_and_cools_down_itself() {
    let host = Host::new();
    let c = cfg(", max_provider_retries: 0", -1);
    let mut vm = host.vm(c, &[]).unwrap();
    let ex = vm.post(CHAT, MASTER, BODY);
    assert_eq!(ex.cluster(), Some("a"));
    assert!(!vm.filter_state(&ex).contains_key("wasm.auto_ai_router_plan"), "no plan: nothing retry-related");
    assert_eq!(next(&vm, &ex).as_deref(), Some("a"), "the route for a rewritten base path matches on it");
    vm.respond(&ex, 429, &[("x-ratelimit-reset-requests", "20s")], b"{}");
    let v = credentials(&mut vm);
    assert_eq!((state(&v, "a")["status"].as_str(), state(&v, "a")["consecutive_errors"].as_u64()), (Some("cooldown"), Some(0)));
    let ex = vm.post(CHAT, MASTER, BODY);
    assert_eq!(ex.cluster(), Some("b"));
    vm.respond(&ex, 200, &[("x-ratelimit-remaining-requests", "0"), ("x-ratelimit-reset-requests", "2s")], b"{}");
    assert_eq!(state(&credentials(&mut vm), "b")["status"], "cooldown", "cooled down before the 429 comes");
}

#[test]
fn a_reset_without_a_transport_failure_is_no_strike_but_moves_on() {
    // A client that hangs up, or a provider that resets before answering: the key isn't at fault.
    let host = Host::new();
    let mut vm = vm(&host, "", -1);
    let ex = vm.post(CHAT, MASTER, BODY);
    let up = vm.upstream_request(&ex, UP, "a");
    vm.abort(&up);
    assert_eq!(state(&credentials(&mut vm), "a")["consecutive_errors"], 0);
    assert_eq!(next(&vm, &ex).as_deref(), Some("b"), "if Envoy retries the reset, it goes elsewhere");
}

#[test]
fn an_attempt_cut_by_the_route_timeout_counts_504_and_is_not_retried() {
    let host = Host::new();
    let mut vm = vm(&host, ", request_timeout: 2s", -1);
    let ex = vm.post(CHAT, MASTER, BODY);
    let up = vm.upstream_request(&ex, UP, "a");
    host.advance_ms(2_000);
    vm.abort(&up);
    assert_eq!(state(&credentials(&mut vm), "a")["consecutive_errors"], 1);
    assert_eq!(next(&vm, &ex).as_deref(), Some("a"), "the time is spent: nothing more is chosen (or charged)");
    assert!(host.metrics().iter().any(|(_, k, v)| k.contains("credential=.=a;.;") && k.contains("status=.=504;.;") && *v == 1));
}

/// A retry's next key is picked and charged when an attempt fails, but when Envoy does not retry
/// (the answer goes to the client, or the client hangs up) the slot goes back: a key is charged
/// only for attempts it really gets.
#[test]
fn a_pick_envoy_never_uses_is_given_back() {
    let host = Host::new();
    let mut vm = self::vm(&host, "", 1);
    let rpm_b = |vm: &mut Vm| state(&credentials(vm), "b")["rpm"]["used"].as_u64();
    // The answer goes to the client (here: Envoy declined to retry): b's slot comes back.
    let ex = vm.post(CHAT, MASTER, BODY);
    let up = vm.upstream_request(&ex, UP, "a");
    vm.respond(&up, 503, &[], b"{}");
    assert_eq!(next(&vm, &ex).as_deref(), Some("b"));
    assert_eq!(rpm_b(&mut vm), Some(1), "charged when picked");
    vm.respond(&ex, 503, &[], b"{}");
    assert_eq!(rpm_b(&mut vm), Some(0), "given back: Envoy never sent the attempt");
    // The client hangs up after the failed attempt: given back as well.
    let host = Host::new();
    let mut vm = self::vm(&host, "", 1);
    let ex = vm.post(CHAT, MASTER, BODY);
    let up = vm.upstream_request(&ex, UP, "a");
    vm.abort(&up);
    assert_eq!(next(&vm, &ex).as_deref(), Some("b"));
    assert_eq!(rpm_b(&mut vm), Some(1));
    vm.abort(&ex);
    assert_eq!(rpm_b(&mut vm), Some(0), "the client left before the retry");
    // Envoy does retry: b's slot stays charged.
    let host = Host::new();
    let mut vm = self::vm(&host, "", 1);
    let ex = vm.post(CHAT, MASTER, BODY);
    let up = vm.upstream_request(&ex, UP, "a");
    vm.respond(&up, 503, &[], b"{}");
    let up = vm.upstream_request(&ex, UP, "b");
    vm.respond(&up, 200, &[], b"{}");
    vm.respond(&ex, 200, &[], b"{}");
    assert_eq!(rpm_b(&mut vm), Some(1), "used");
}
