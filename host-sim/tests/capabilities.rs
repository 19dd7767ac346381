//! host-sim's own capabilities (trailers, plugins, configuration pushes, upstream filters,
//! filter state, gRPC callouts), checked with the hand-written probe module `probe.wat`
//! (it logs what the host shows it), so they hold whatever the router filter does.

use host_sim::*;

const PROBE: &str = include_str!("probe.wat");
const UP: &str = "auto_ai_router_upstream";

fn host() -> Host {
    let bytes = wat::parse_str(PROBE).unwrap_or_else(|e| panic!("probe.wat: {e}"));
    Host::from_wasm(&bytes).unwrap_or_else(|e| panic!("{e}"))
}

/// Info logs of VM `vm` since the last call (clears the log).
fn drain(host: &Host, vm: u32) -> Vec<String> {
    let logs = host.logs().into_iter().filter(|l| l.vm == vm && l.level == LogLevel::Info).map(|l| l.message).collect();
    host.clear_logs();
    logs
}

fn get(path: &str) -> Request {
    Request::new(&[(":method", "POST"), (":path", path), (":authority", "r"), (":scheme", "http")])
}

fn has(logs: &[String], line: &str) -> bool {
    logs.iter().any(|l| l == line)
}

#[test]
fn trailers_end_the_body_and_a_grpc_reply_resumes_the_request() {
    let host = host();
    host.script_grpc_call("rls", GrpcReply::ok(b"OVER?".to_vec()).delayed(5));
    let mut vm = host.vm_with(VmConfig::new("c")).unwrap();
    host.clear_logs();
    let ex = vm.send(get("/x").chunks(&[b"ab", b"cd"]).trailers(&[("x-sum", "abcd")]));
    let logs = drain(&host, 0);
    // every chunk arrived without end of stream (buffered), then the trailers callback saw the
    // whole body and the trailers map
    assert!(has(&logs, "body=abcd"), "{logs:?}");
    assert!(has(&logs, "trailer=abcd"), "{logs:?}");
    assert!(has(&logs, "grpc_call=0"), "{logs:?}");
    let f = ex.expect_forwarded();
    assert!(!f.complete, "held for the gRPC reply");
    assert!(f.trailers.is_none());
    let calls = host.grpc_calls();
    assert_eq!(calls.len(), 1);
    let c = &calls[0];
    assert_eq!((c.cluster.as_str(), c.service.as_str(), c.method.as_str()), ("rls", "svc", "Check"));
    assert_eq!(c.message, b"abcd");
    assert_eq!(c.timeout_ms, 100);
    assert_eq!(c.token % 2, 1, "unary call tokens are odd, as Envoy's");

    host.advance_ms(4);
    assert!(!vm.poll(&ex).expect_forwarded().complete);
    host.advance_ms(1);
    let ex = vm.poll(&ex);
    assert!(has(&drain(&host, 0), "grpc=OVER?"));
    let f = ex.expect_forwarded();
    assert!(f.complete);
    assert_eq!(f.body, b"abcd");
    assert_eq!(f.trailers.as_deref(), Some(&[("x-sum".to_string(), "abcd".to_string())][..]));
    let r = vm.respond(&ex, 200, &[], b"ok");
    assert_eq!(r.status, 200);
}

#[test]
fn grpc_failures_arrive_as_close_with_status_and_message() {
    let host = host();
    let mut vm = host.vm_with(VmConfig::new("c")).unwrap();
    let req = || get("/x").chunks(&[b"q"]).trailers(&[("x-sum", "1")]);

    // no such cluster: ParseFailure (4) from proxy_grpc_call, the request goes on
    let ex = vm.send(req());
    assert!(has(&drain(&host, 0), "grpc_call=4"));
    assert!(ex.expect_forwarded().complete);
    assert!(host.grpc_calls().is_empty());

    // UNAVAILABLE right away
    host.queue_grpc_call("rls", GrpcReply::unavailable());
    let r = vm.send(req()).expect_local().clone();
    assert_eq!(r.status, 514, "500 + the status code from proxy_get_status");
    assert!(r.body_str().contains("upstream connect error"), "{}", r.body_str());

    // any status the test picks, after a delay
    host.queue_grpc_call("rls", GrpcReply::status(8, "quota").delayed(3));
    let ex = vm.send(req());
    assert!(ex.local_reply().is_none());
    host.advance_ms(3);
    let r = vm.poll(&ex).expect_local().clone();
    assert_eq!((r.status, r.body_str()), (508, "quota"));

    // no answer: status 14 "upstream request timeout" at the call's 100 ms timeout; so is an
    // answer slower than the timeout
    for reply in [GrpcReply::Timeout, GrpcReply::ok(b"late".to_vec()).delayed(150)] {
        host.queue_grpc_call("rls", reply);
        let ex = vm.send(req());
        host.advance_ms(99);
        assert!(vm.poll(&ex).local_reply().is_none());
        host.advance_ms(1);
        let r = vm.poll(&ex).expect_local().clone();
        assert_eq!((r.status, r.body_str()), (514, "upstream request timeout"));
    }
    assert_eq!(host.grpc_calls().len(), 4);
}

#[test]
fn grpc_cancel_removes_the_pending_call() {
    let host = host();
    host.script_grpc_call("rls", GrpcReply::Timeout);
    let mut vm = host.vm_with(VmConfig::new("c")).unwrap();
    let ex = vm.send(get("/x").chunks(&[b"q"]).trailers(&[("x-sum", "1")]));
    host.clear_logs();
    vm.abort(&ex); // on_log cancels the pending call
    let logs = drain(&host, 0);
    assert!(has(&logs, "cancel=0"), "{logs:?}");
    let token = host.grpc_calls()[0].token;
    assert_eq!(host.grpc_cancellations(), vec![(0, token)]);
    host.advance_ms(1000);
    vm.run_due();
    assert!(drain(&host, 0).is_empty(), "a cancelled call never calls back");

    // a call that completed cannot be cancelled: NotFound
    host.script_grpc_call("rls", GrpcReply::ok(b"x".to_vec()));
    let ex = vm.send(get("/x").chunks(&[b"q"]).trailers(&[("x-sum", "1")]));
    host.clear_logs();
    vm.respond(&ex, 200, &[], b"");
    assert!(has(&drain(&host, 0), "cancel=1"));
}

#[test]
fn two_plugins_in_one_vm_and_an_upstream_attempt_sharing_filter_state() {
    let host = host();
    let mut vm = host.vm_with(VmConfig::new("down-cfg").plugin(UP, "up-cfg")).unwrap();
    let logs = drain(&host, 0);
    // each root: context create (parent 0), vm start, its own configuration
    for line in ["create=1:0", "vm_start=1", "config=down-cfg", "create=2:0", "vm_start=2", "config=up-cfg"] {
        assert!(has(&logs, line), "{line} missing in {logs:?}");
    }
    assert_eq!(vm.root_context(ROUTER_ROOT_ID), Some(1));
    assert_eq!(vm.root_context(UP), Some(2));

    let down = vm.send(get("/x").body(b"hello".to_vec()));
    let logs = drain(&host, 0);
    assert!(has(&logs, "create=3:1") && has(&logs, "root=auto_ai_router"), "{logs:?}");
    assert!(has(&logs, "set_property=0") && has(&logs, "fs=0"), "{logs:?}");
    assert!(!logs.iter().any(|l| l.starts_with("plan=") || l.starts_with("fsread=")), "no filter state before it is set: {logs:?}");
    let f = down.expect_forwarded().clone();
    assert_eq!(f.filter_state.get("wasm.air_plan").map(Vec::as_slice), Some(&b"p1"[..]));
    assert_eq!(f.filter_state.get("envoy.test.key").map(Vec::as_slice), Some(&b"v1"[..]));

    let up = vm.upstream_request(&down, UP, "cluster_b");
    let logs = drain(&host, 0);
    assert!(has(&logs, "create=4:2") && has(&logs, "root=auto_ai_router_upstream"), "{logs:?}");
    assert!(has(&logs, "cluster=cluster_b"), "{logs:?}");
    assert!(has(&logs, "plan=p1"), "the downstream filter's set_property is visible: {logs:?}");
    assert!(has(&logs, "fsread=v1"), "and its set_envoy_filter_state, as filter_state.<key>: {logs:?}");
    let uf = up.expect_forwarded();
    assert_eq!((uf.cluster.as_deref(), uf.body.as_slice(), uf.complete), (Some("cluster_b"), &b"hello"[..], true));

    let r = vm.respond(&up, 429, &[("retry-after", "7")], b"");
    assert_eq!(r.status, 429);
    let logs = drain(&host, 0);
    assert!(has(&logs, "late=2"), "upstream filter: request headers are read-only in the response phase: {logs:?}");
    assert!(has(&logs, "done=4") && has(&logs, "delete=4"), "{logs:?}");
    assert!(!has(&logs, "log=4"), "upstream filters get no on_log: {logs:?}");

    let r = vm.respond(&down, 200, &[], b"ok");
    let logs = drain(&host, 0);
    assert!(has(&logs, "late=0") && has(&logs, "log=3") && has(&logs, "done=3"), "{logs:?}");
    assert_eq!(r.filter_state.get("wasm.air_plan").map(Vec::as_slice), Some(&b"p1"[..]));
}

#[test]
fn filter_state_keys_and_routing_by_filter_state() {
    let host = host();
    let mut vm = host.vm_with(VmConfig::new("c")).unwrap();
    // the probe writes envoy.test.key = v1 and clears the route cache before continuing
    host.route_by_filter_state(Some("envoy.test.key"));
    let ex = vm.send(get("/x").body(b"b".to_vec()));
    assert_eq!(ex.cluster(), Some("v1"));
    assert_eq!(ex.expect_forwarded().route_cache_clears, 1);

    // a key without an object factory: NotFound, nothing written, no cluster (no route reads a header)
    host.set_filter_state_keys(Some(&["envoy.other"]));
    host.clear_logs();
    let ex = vm.send(Request::new(&[(":method", "GET"), (":path", "/"), ("x-auto-ai-router-cluster", "hdr")]));
    assert!(has(&drain(&host, 0), "fs=1"));
    assert_eq!(ex.cluster(), None);
    assert!(!ex.expect_forwarded().filter_state.contains_key("envoy.test.key"));
}

#[test]
fn per_stream_properties_win() {
    let host = host();
    host.set_property("xds.cluster_name", b"host-wide".to_vec());
    let mut vm = host.vm_with(VmConfig::new("c")).unwrap();
    host.clear_logs();
    vm.send(get("/x").property("xds.cluster_name", b"mine".to_vec()).property("air_plan", b"given".to_vec()));
    let logs = drain(&host, 0);
    assert!(has(&logs, "cluster=mine") && has(&logs, "plan=given"), "{logs:?}");
    vm.send(get("/x"));
    assert!(has(&drain(&host, 0), "cluster=host-wide"));
}

#[test]
fn a_configuration_push_creates_a_new_root_and_retires_the_old_after_its_streams() {
    let host = host();
    let mut vm = host.vm_with(VmConfig::new("cfg-1")).unwrap();
    let old_stream = vm.send(get("/x"));
    assert!(old_stream.expect_forwarded().complete);
    host.clear_logs();

    let new_root = vm.reconfigure("cfg-2").unwrap();
    assert_eq!(new_root, 3);
    // the canary (a throwaway clone, vm1) configured first, then this VM's new root context
    let canary = drain_vm(&host, 1);
    assert!(has(&canary, "config=cfg-2"), "{canary:?}");
    let logs = drain(&host, 0);
    assert_eq!(logs, ["create=3:0", "vm_start=3", "config=cfg-2"], "the old root is untouched while its stream lives");
    assert_eq!(vm.root_contexts(), vec![(1, ROUTER_ROOT_ID.to_string(), true), (3, ROUTER_ROOT_ID.to_string(), false)]);

    let y = vm.send(get("/y"));
    assert!(has(&drain(&host, 0), "create=4:3"), "new streams use the new root");

    vm.respond(&old_stream, 200, &[], b"");
    let logs = drain(&host, 0);
    assert!(has(&logs, "done=1") && has(&logs, "delete=1"), "the old root goes once its last stream ends: {logs:?}");
    assert_eq!(vm.root_contexts(), vec![(3, ROUTER_ROOT_ID.to_string(), false)]);

    // the same configuration again: nothing happens
    assert_eq!(vm.reconfigure("cfg-2").unwrap(), 3);
    assert!(host.logs().is_empty());

    // rejected by the canary: an error, and the running root keeps serving
    let e = vm.reconfigure("x-bad").unwrap_err();
    assert!(matches!(&e, VmError::ConfigureFailed(_)) && e.messages().contains("config=x-bad"), "{e:?}");
    assert_eq!(vm.root_contexts(), vec![(3, ROUTER_ROOT_ID.to_string(), false)]);
    host.clear_logs();
    let z = vm.send(get("/z"));
    assert!(has(&drain(&host, 0), "create=5:3"));

    // a push without streams retires the old root at once
    vm.abort(&y);
    vm.abort(&z);
    host.clear_logs();
    vm.reconfigure("cfg-3").unwrap();
    let logs = drain(&host, 0);
    assert!(has(&logs, "done=3") && has(&logs, "delete=3"), "{logs:?}");
}

fn drain_vm(host: &Host, vm: u32) -> Vec<String> {
    host.logs().into_iter().filter(|l| l.vm == vm && l.level == LogLevel::Info).map(|l| l.message).collect()
}
