;; host-sim's probe plugin: a hand-written proxy-wasm module that logs what the host shows it
;; (one Info log line per observation) so tests/capabilities.rs can check the host's ABI
;; without the router filter. Behaviour:
;; - context create / vm start / configure / log / done / delete: "create=<ctx>:<parent>",
;;   "vm_start=<ctx>", "config=<bytes>" (a configuration starting with 'x' is rejected),
;;   "log=<ctx>" (then "cancel=<status>" of proxy_grpc_cancel on the last gRPC token),
;;   "done=<ctx>", "delete=<ctx>".
;; - request headers: "root=<plugin_root_id>", "cluster=<xds.cluster_name>", "plan=<air_plan>"
;;   "fsread=<filter_state.envoy.test.key>" (each if present), then set_property(air_plan, p1) → "set_property=<status>",
;;   set_envoy_filter_state(envoy.test.key, v1) → "fs=<status>", clear_route_cache; Continue.
;; - request body: StopIterationAndBuffer until end of stream.
;; - request trailers: "body=<whole buffered body>", proxy_grpc_call(rls, svc, Check, body,
;;   100 ms), "trailer=<x-sum>", "grpc_call=<status>"; StopIteration if the call started.
;; - gRPC receive: "grpc=<message>", continue the request. gRPC close(code): local reply with
;;   status 500 + code, body = proxy_get_status's message.
;; - response headers: replace request header x-late → "late=<status>"; Continue.
(module
  (import "env" "proxy_log" (func $log (param i32 i32 i32) (result i32)))
  (import "env" "proxy_get_property" (func $get_property (param i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_set_property" (func $set_property (param i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_call_foreign_function" (func $foreign (param i32 i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_get_buffer_bytes" (func $get_buffer_bytes (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_get_header_map_value" (func $get_header (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_replace_header_map_value" (func $replace_header (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_grpc_call" (func $grpc_call (param i32 i32 i32 i32 i32 i32 i32 i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_grpc_cancel" (func $grpc_cancel (param i32) (result i32)))
  (import "env" "proxy_get_status" (func $get_status (param i32 i32 i32) (result i32)))
  (import "env" "proxy_continue_stream" (func $continue_stream (param i32) (result i32)))
  (import "env" "proxy_send_local_response" (func $local_response (param i32 i32 i32 i32 i32 i32 i32 i32) (result i32)))

  (memory (export "memory") 4)
  (data (i32.const 0) "plugin_root_id")
  (data (i32.const 16) "root=")
  (data (i32.const 24) "xds\00cluster_name")
  (data (i32.const 48) "cluster=")
  (data (i32.const 56) "air_plan")
  (data (i32.const 64) "plan=")
  (data (i32.const 72) "p1")
  (data (i32.const 80) "set_property=")
  (data (i32.const 96) "set_envoy_filter_state")
  ;; SetEnvoyFilterStateArguments{path: "envoy.test.key", value: "v1"} (20 bytes)
  (data (i32.const 120) "\0a\0eenvoy.test.key\12\02v1")
  (data (i32.const 144) "fs=")
  (data (i32.const 152) "clear_route_cache")
  (data (i32.const 176) "body=")
  (data (i32.const 184) "x-sum")
  (data (i32.const 192) "trailer=")
  (data (i32.const 200) "rls")
  (data (i32.const 204) "svc")
  (data (i32.const 208) "Check")
  (data (i32.const 216) "grpc_call=")
  (data (i32.const 232) "grpc=")
  (data (i32.const 240) "config=")
  (data (i32.const 248) "create=")
  (data (i32.const 256) ":")
  (data (i32.const 260) "done=")
  (data (i32.const 268) "delete=")
  (data (i32.const 276) "log=")
  (data (i32.const 284) "vm_start=")
  (data (i32.const 296) "cancel=")
  (data (i32.const 304) "x-late")
  (data (i32.const 312) "1")
  (data (i32.const 316) "late=")
  (data (i32.const 324) "grpc-failed")
  (data (i32.const 336) "filter_state\00envoy.test.key")
  (data (i32.const 368) "fsread=")
  ;; 1024: returned pointer, 1028: returned size, 1032: last gRPC token, 1036: status code,
  ;; 3100..3200: digits, 4096..: the log line being built, 16384..: heap.

  (global $heap (mut i32) (i32.const 16384))
  (global $len (mut i32) (i32.const 0))

  (func (export "malloc") (param $n i32) (result i32)
    (local $p i32)
    (local.set $p (global.get $heap))
    (global.set $heap (i32.and (i32.add (i32.add (global.get $heap) (local.get $n)) (i32.const 7)) (i32.const -8)))
    (local.get $p))

  ;; append bytes / a decimal number to the log line; log it
  (func $s (param $p i32) (param $l i32)
    (memory.copy (i32.add (i32.const 4096) (global.get $len)) (local.get $p) (local.get $l))
    (global.set $len (i32.add (global.get $len) (local.get $l))))
  (func $n (param $v i32)
    (local $i i32)
    (loop $digits
      (i32.store8 (i32.sub (i32.const 3199) (local.get $i)) (i32.add (i32.const 48) (i32.rem_u (local.get $v) (i32.const 10))))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (local.set $v (i32.div_u (local.get $v) (i32.const 10)))
      (br_if $digits (local.get $v)))
    (call $s (i32.sub (i32.const 3200) (local.get $i)) (local.get $i)))
  (func $flush
    (drop (call $log (i32.const 2) (i32.const 4096) (global.get $len)))
    (global.set $len (i32.const 0)))
  (func $clear
    (i32.store (i32.const 1024) (i32.const 0))
    (i32.store (i32.const 1028) (i32.const 0)))
  (func $returned
    (call $s (i32.load (i32.const 1024)) (i32.load (i32.const 1028))))
  (func $logprop (param $pp i32) (param $pl i32) (param $lp i32) (param $ll i32)
    (call $clear)
    (if (i32.eqz (call $get_property (local.get $pp) (local.get $pl) (i32.const 1024) (i32.const 1028)))
      (then (call $s (local.get $lp) (local.get $ll)) (call $returned) (call $flush))))
  (func $log_ctx (param $lp i32) (param $ll i32) (param $c i32)
    (call $s (local.get $lp) (local.get $ll)) (call $n (local.get $c)) (call $flush))

  (func (export "proxy_on_context_create") (param $c i32) (param $p i32)
    (call $s (i32.const 248) (i32.const 7)) (call $n (local.get $c))
    (call $s (i32.const 256) (i32.const 1)) (call $n (local.get $p)) (call $flush))
  (func (export "proxy_on_vm_start") (param $c i32) (param $size i32) (result i32)
    (call $log_ctx (i32.const 284) (i32.const 9) (local.get $c))
    (i32.const 1))
  (func (export "proxy_on_configure") (param $c i32) (param $size i32) (result i32)
    (call $clear)
    (drop (call $get_buffer_bytes (i32.const 7) (i32.const 0) (local.get $size) (i32.const 1024) (i32.const 1028)))
    (call $s (i32.const 240) (i32.const 7)) (call $returned) (call $flush)
    (if (result i32)
      (i32.and (i32.gt_u (i32.load (i32.const 1028)) (i32.const 0))
               (i32.eq (i32.load8_u (i32.load (i32.const 1024))) (i32.const 120)))
      (then (i32.const 0)) (else (i32.const 1))))

  (func (export "proxy_on_request_headers") (param $c i32) (param $h i32) (param $eos i32) (result i32)
    (call $logprop (i32.const 0) (i32.const 14) (i32.const 16) (i32.const 5))
    (call $logprop (i32.const 24) (i32.const 16) (i32.const 48) (i32.const 8))
    (call $logprop (i32.const 56) (i32.const 8) (i32.const 64) (i32.const 5))
    (call $logprop (i32.const 336) (i32.const 27) (i32.const 368) (i32.const 7))
    (call $s (i32.const 80) (i32.const 13))
    (call $n (call $set_property (i32.const 56) (i32.const 8) (i32.const 72) (i32.const 2)))
    (call $flush)
    (call $clear)
    (call $s (i32.const 144) (i32.const 3))
    (call $n (call $foreign (i32.const 96) (i32.const 22) (i32.const 120) (i32.const 20) (i32.const 1024) (i32.const 1028)))
    (call $flush)
    (drop (call $foreign (i32.const 152) (i32.const 17) (i32.const 0) (i32.const 0) (i32.const 1024) (i32.const 1028)))
    (i32.const 0))

  (func (export "proxy_on_request_body") (param $c i32) (param $size i32) (param $eos i32) (result i32)
    (if (result i32) (local.get $eos) (then (i32.const 0)) (else (i32.const 1))))

  (func (export "proxy_on_request_trailers") (param $c i32) (param $n i32) (result i32)
    (local $st i32)
    (call $clear)
    (drop (call $get_buffer_bytes (i32.const 0) (i32.const 0) (i32.const 65536) (i32.const 1024) (i32.const 1028)))
    (call $s (i32.const 176) (i32.const 5)) (call $returned) (call $flush)
    (local.set $st
      (call $grpc_call (i32.const 200) (i32.const 3) (i32.const 204) (i32.const 3) (i32.const 208) (i32.const 5)
        (i32.const 0) (i32.const 0) (i32.load (i32.const 1024)) (i32.load (i32.const 1028)) (i32.const 100) (i32.const 1032)))
    (call $clear)
    (if (i32.eqz (call $get_header (i32.const 1) (i32.const 184) (i32.const 5) (i32.const 1024) (i32.const 1028)))
      (then (call $s (i32.const 192) (i32.const 8)) (call $returned) (call $flush)))
    (call $log_ctx (i32.const 216) (i32.const 10) (local.get $st))
    (if (result i32) (local.get $st) (then (i32.const 0)) (else (i32.const 1))))

  (func (export "proxy_on_grpc_receive") (param $c i32) (param $t i32) (param $size i32)
    (call $clear)
    (drop (call $get_buffer_bytes (i32.const 5) (i32.const 0) (local.get $size) (i32.const 1024) (i32.const 1028)))
    (call $s (i32.const 232) (i32.const 5)) (call $returned) (call $flush)
    (drop (call $continue_stream (i32.const 0))))
  (func (export "proxy_on_grpc_close") (param $c i32) (param $t i32) (param $code i32)
    (call $clear)
    (drop (call $get_status (i32.const 1036) (i32.const 1024) (i32.const 1028)))
    (drop (call $local_response (i32.add (i32.const 500) (i32.load (i32.const 1036))) (i32.const 324) (i32.const 11)
      (i32.load (i32.const 1024)) (i32.load (i32.const 1028)) (i32.const 0) (i32.const 0) (i32.const -1))))

  (func (export "proxy_on_response_headers") (param $c i32) (param $h i32) (param $eos i32) (result i32)
    (call $log_ctx (i32.const 316) (i32.const 5)
      (call $replace_header (i32.const 0) (i32.const 304) (i32.const 6) (i32.const 312) (i32.const 1)))
    (i32.const 0))

  (func (export "proxy_on_log") (param $c i32)
    (call $log_ctx (i32.const 276) (i32.const 4) (local.get $c))
    (call $log_ctx (i32.const 296) (i32.const 7) (call $grpc_cancel (i32.load (i32.const 1032)))))
  (func (export "proxy_on_done") (param $c i32) (result i32)
    (call $log_ctx (i32.const 260) (i32.const 5) (local.get $c))
    (i32.const 1))
  (func (export "proxy_on_delete") (param $c i32)
    (call $log_ctx (i32.const 268) (i32.const 7) (local.get $c)))
)
