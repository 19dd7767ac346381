//! The Envoy v3 bootstrap for a prepared configuration.
//!
//! Layout: one listener (HTTP connection manager) with one virtual host for the router, whose
//! domains are `server.hosts` (`*` when empty; other hosts get Envoy's 404). Its routes: the
//! routed route (any path of a request the filter routed, matched on the filter state the filter
//! writes), `/metrics` → the admin interface's `/stats/prometheus`, `/health` (the filter answers
//! it), `/v1/` before routing (no endpoint), anything else → 404 JSON; one cluster per credential,
//! named after it; an admin cluster; `stats_tags` that turn the filter's Istio-style stat names
//! into Prometheus labels.
//!
//! Routing never depends on a header: the filter writes the credential into filter state
//! ([`retry_contract::NEXT_FILTER_STATE`]) and clears the route cache; a matcher cluster specifier
//! on that filter state picks the cluster. The filter leaves `:authority` alone (Envoy's
//! `auto_host_rewrite` sets each attempt's from the endpoint), so the route stays in the router's
//! virtual host on a gateway where each host has its own.
//!
//! With `server.max_provider_retries` N > 0 the routed route retries (re-running the cluster
//! specifier per attempt, `refresh_cluster_on_retry`), and the same `.wasm` runs as an upstream
//! HTTP filter in every credential cluster: it injects each attempt's key and path and, when an
//! attempt fails, writes the next credential and flags the response with
//! [`retry_contract::RETRY_HEADER`], which the route retries on (up to N times) and removes before
//! the client.

use crate::prepare::{Prepared, ADMIN_CLUSTER, NO_CREDENTIAL_CLUSTER};
use filter::config::RLS_CLUSTER;
use filter::config::{Credential, HostMatch, LogLevel, Scheme};
use serde_json::{json, Value};
use std::net::IpAddr;

pub const ROUTER_ROOT_ID: &str = "auto_ai_router";
pub const VM_ID: &str = "auto_ai_router";
/// A trap fails the request that hit it (503, never an unauthenticated pass-through) and Envoy
/// reloads the VM, so one bad request does not leave the gateway answering 503 for good (see README).
pub const FAILURE_POLICY: &str = "FAIL_RELOAD";
pub use filter::retry_contract;
/// Name of the route of requests the filter routed.
pub const ROUTED_ROUTE: &str = "v1_routed";
/// Name of the router's HTTP filter in the chain (and in `typed_per_filter_config`).
pub const ROUTER_FILTER_NAME: &str = "auto_ai_router";
/// Name of the upstream HTTP filter in each credential cluster (when retries are on).
pub const UPSTREAM_FILTER_NAME: &str = "auto_ai_router_upstream";
/// The matcher cluster specifier's action type (a credential name → its cluster).
const CLUSTER_ACTION_TYPE: &str = "type.googleapis.com/envoy.extensions.router.cluster_specifiers.matcher.v3.ClusterAction";
/// What the `/v1/` route retries on. `retriable-headers`: the upstream filter flagged a failed
/// attempt (a status in `retry_on_status`) and already chose the next credential; the others are
/// failures without a provider response (refused connection, reset before or after the request was
/// sent but before any response byte), after which the upstream filter also chose the next one.
/// Envoy never retries once response headers went to the client (an SSE stream is never restarted).
pub const RETRY_ON: &str = "retriable-headers,connect-failure,reset-before-request,reset";
/// Envoy's filter-state key for the filter's `set_property(PLAN_PROPERTY)` (wasm properties are
/// kept under `wasm.<name>`, as [`retry_contract::NEXT_FILTER_STATE`] is for `NEXT_PROPERTY`).
pub const PLAN_FILTER_STATE: &str = "wasm.auto_ai_router_plan";
/// Concurrent retries per cluster: retries go to other credentials, so a key that fails under
/// load should be able to move all its traffic (Envoy's default is 3; overflow means no retry).
pub const MAX_CONCURRENT_RETRIES: u32 = 1000;
/// Extra request-body buffer above `max_body_size` so the filter's own 413 (OpenAI JSON) fires
/// before Envoy's plain one.
pub const BODY_BUFFER_SLACK: u64 = 1 << 20;
/// The listener's stream idle timeout (routes other than /v1/ and the time before routing).
pub const STREAM_IDLE_TIMEOUT: &str = "300s";
/// How long a client may take to send its request headers.
pub const REQUEST_HEADERS_TIMEOUT: &str = "10s";
/// HTTP/2 limits for clients, as Envoy's edge-proxy best practices give them.
pub const HTTP2_MAX_CONCURRENT_STREAMS: u32 = 100;
pub const HTTP2_INITIAL_STREAM_WINDOW: u32 = 65_536;
pub const HTTP2_INITIAL_CONNECTION_WINDOW: u32 = 1_048_576;
/// Envoy's response code details for a request failed by the wasm failure policy (a VM trap, or
/// a worker whose VM is still being reloaded).
pub const WASM_FAIL_DETAILS: &str = "wasm_fail_stream";

/// CA bundles tried in order when `--ca-bundle` is not given (Debian/Ubuntu/Alpine, RHEL, SUSE).
pub const CA_BUNDLES: [&str; 4] =
    ["/etc/ssl/certs/ca-certificates.crt", "/etc/pki/tls/certs/ca-bundle.crt", "/etc/ssl/ca-bundle.pem", "/etc/ssl/cert.pem"];

#[derive(Debug, Clone)]
pub struct RenderOptions {
    /// Path of `filter.wasm` as Envoy will see it.
    pub wasm_path: String,
    /// Listener address (default 0.0.0.0).
    pub listen_address: String,
    /// Listener port; None = `server.port`.
    pub listen_port: Option<u16>,
    pub admin_address: String,
    pub admin_port: u16,
    /// CA bundle for https providers.
    pub ca_bundle: String,
    pub connect_timeout_secs: u64,
    /// Access log on stdout; None = on for info/debug logging levels.
    pub access_log: Option<bool>,
}

impl Default for RenderOptions {
    fn default() -> Self {
        RenderOptions {
            wasm_path: "filter.wasm".into(),
            listen_address: "0.0.0.0".into(),
            listen_port: None,
            admin_address: "127.0.0.1".into(),
            admin_port: 9901,
            ca_bundle: default_ca_bundle(),
            connect_timeout_secs: 10,
            access_log: None,
        }
    }
}

pub fn default_ca_bundle() -> String {
    CA_BUNDLES.iter().find(|p| std::path::Path::new(p).is_file()).unwrap_or(&CA_BUNDLES[0]).to_string()
}

/// Envoy's `--component-log-level` value for the configured `logging_level`.
pub fn wasm_log_level(level: LogLevel) -> &'static str {
    match level {
        LogLevel::Debug => "debug",
        LogLevel::Info => "info",
        LogLevel::Warn => "warning",
        LogLevel::Error => "error",
    }
}

/// Command-line arguments Envoy needs besides `-c bootstrap.yaml`.
pub fn envoy_args(p: &Prepared) -> Vec<String> {
    vec!["--component-log-level".into(), format!("wasm:{}", wasm_log_level(p.config.server.logging_level))]
}

fn socket_address(address: &str, port: u16) -> Value {
    json!({"socket_address": {"address": address, "port_value": port}})
}

fn duration(secs: u64) -> String {
    format!("{secs}s")
}

/// A protobuf JSON Duration to the millisecond ("90s", "1.500s"), so sub-second parts of
/// `request_timeout` are kept; never below 1 ms (Envoy reads "0s" as "no timeout").
fn duration_ms(d: std::time::Duration) -> String {
    let ms = d.as_millis().max(1);
    match ms % 1000 {
        0 => format!("{}s", ms / 1000),
        frac => format!("{}.{frac:03}s", ms / 1000),
    }
}

/// One wasm HTTP filter on the shared VM (same `vm_id` and code → Envoy shares one VM per worker).
pub fn wasm_filter(name: &str, root_id: &str, configuration: &str, wasm_path: &str, env_keys: &[String]) -> Value {
    let mut vm_config = json!({
        "vm_id": VM_ID,
        "runtime": "envoy.wasm.runtime.v8",
        "code": {"local": {"filename": wasm_path}},
    });
    if !env_keys.is_empty() {
        vm_config["environment_variables"] = json!({"host_env_keys": env_keys});
    }
    json!({
        "name": name,
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm",
            "config": {
                "name": name,
                "root_id": root_id,
                "vm_config": vm_config,
                "configuration": {
                    "@type": "type.googleapis.com/google.protobuf.StringValue",
                    "value": configuration,
                },
                "failure_policy": FAILURE_POLICY,
                // After a trap, reload the VM quickly (Envoy's default waits 1 s, failing every
                // request on that worker meanwhile); repeated crashes back off up to 10 s.
                "reload_config": {"backoff": {"base_interval": "0.05s", "max_interval": "10s"}},
                "allow_on_headers_stop_iteration": true,
            }
        }
    })
}

/// The HTTP filter chain: the router wasm filter (which also fetches the model lists), then Envoy's router.
fn http_filters(p: &Prepared, o: &RenderOptions) -> Vec<Value> {
    let plugin = p.plugin_json();
    let env = p.env_names();
    vec![
        wasm_filter(ROUTER_FILTER_NAME, ROUTER_ROOT_ID, &plugin, &o.wasm_path, &env),
        json!({"name": "envoy.filters.http.router",
               "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}),
    ]
}

/// Names of the wasm filters, for disabling them on routes they have nothing to do with.
fn wasm_filter_names() -> Vec<&'static str> {
    vec![ROUTER_FILTER_NAME]
}

fn disable_wasm() -> Value {
    let mut m = serde_json::Map::new();
    for n in wasm_filter_names() {
        m.insert(n.to_string(), json!({"@type": "type.googleapis.com/envoy.config.route.v3.FilterConfig", "disabled": true}));
    }
    Value::Object(m)
}

/// `max_provider_retries` > 0: the route follows the filter's per-attempt choice and retries.
fn retries_on(p: &Prepared) -> bool {
    p.config.server.max_provider_retries > 0
}

/// Filter state (written by the filter) → the credential's cluster, and
/// [`retry_contract::NO_CREDENTIAL`] → [`NO_CREDENTIAL_CLUSTER`], which has no endpoint: Envoy
/// answers 503 (`UH`) at once and stops. A value matching no cluster would not do: on a retry
/// Envoy 1.40 then keeps the previous attempt's cluster (checked: a refused connection was retried
/// on the same dead credential until `num_retries` ran out). No filter state at all (the filter
/// did not route the request) matches nothing: 503 `NC`.
fn cluster_specifier(p: &Prepared) -> Value {
    let action = |cluster: &str| json!({"action": {"name": "cluster", "typed_config": {"@type": CLUSTER_ACTION_TYPE, "cluster": cluster}}});
    let mut map = serde_json::Map::new();
    for c in &p.config.credentials {
        map.insert(c.name.clone(), action(&c.name));
    }
    map.insert(retry_contract::NO_CREDENTIAL.to_string(), action(NO_CREDENTIAL_CLUSTER));
    json!({"extension": {
        "name": "envoy.router.cluster_specifier_plugin.matcher",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.router.cluster_specifiers.matcher.v3.MatcherClusterSpecifier",
            "cluster_matcher": {"matcher_tree": {
                "input": {"name": "next_credential", "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.matching.common_inputs.network.v3.FilterStateInput",
                    "key": retry_contract::NEXT_FILTER_STATE,
                }},
                "exact_match_map": {"map": map},
            }},
        },
    }})
}

/// The route of every request the filter routed: first in the router's virtual host, matched on
/// the filter state the filter writes ([`retry_contract::NEXT_FILTER_STATE`]), which no client can
/// send, on any path. The filter keeps the client's `:authority` (so the virtual host stays the
/// router's on a gateway with per-host virtual hosts) and may prefix `:path` with the base_url's
/// path (this route matches any path); Envoy sets each attempt's `:authority` from the chosen
/// endpoint's `hostname` (`auto_host_rewrite`, the credential's authority). The cluster comes from
/// the same filter state (a matcher cluster specifier), re-read before each retry.
fn routed_route(p: &Prepared, timeout: &str, body_limit: u64) -> Value {
    let mut route = json!({
        "name": ROUTED_ROUTE,
        "match": {"prefix": "/", "filter_state": [{
            "key": retry_contract::NEXT_FILTER_STATE,
            "string_match": {"safe_regex": {"regex": ".+"}},
        }]},
        "route": {
            "inline_cluster_specifier_plugin": cluster_specifier(p),
            "auto_host_rewrite": true,
            "timeout": timeout,
            // Long SSE streams and long non-streaming generations: no idle cut-off once routed (the
            // route timeout bounds the request).
            "idle_timeout": "0s",
        },
        // Retries replay the body from this buffer, so every accepted body stays retryable.
        "request_body_buffer_limit": body_limit,
    });
    if retries_on(p) {
        route["route"]["retry_policy"] = json!({
            "retry_on": RETRY_ON,
            "retriable_headers": [{"name": retry_contract::RETRY_HEADER, "present_match": true}],
            "num_retries": p.config.server.max_provider_retries,
            // Re-run the cluster specifier per attempt: the next credential's cluster.
            "refresh_cluster_on_retry": true,
            // Another key, not the same one later: retry at once (Envoy's minimum is 1 ms).
            "retry_back_off": {"base_interval": "0.001s", "max_interval": "0.002s"},
        });
        if let Some(d) = p.config.server.attempt_timeout {
            // An attempt without response headers by then is abandoned and retried elsewhere.
            route["route"]["retry_policy"]["per_try_timeout"] = json!(duration_ms(d));
        }
        // The retry flag is between the upstream filter and the router: never to the client.
        route["response_headers_to_remove"] = json!([retry_contract::RETRY_HEADER]);
    }
    route
}

/// `/v1/` before the filter routed the request: the route Envoy holds while the filter reads the
/// body. It sets the body's buffer limit and the body-phase idle limit (a client that stalls mid
/// upload is cut; once routed, [`routed_route`] turns the idle timer off). Its cluster has no
/// endpoint: a request the filter did not route never reaches a provider (Envoy's 503).
fn unrouted_v1_route(p: &Prepared, timeout: &str, body_limit: u64) -> Value {
    let idle = p.config.server.body_idle_timeout.map(duration_ms).unwrap_or_else(|| "0s".into());
    json!({
        "name": "v1",
        "match": {"prefix": "/v1/"},
        "route": {"cluster": NO_CREDENTIAL_CLUSTER, "timeout": timeout, "idle_timeout": idle},
        "request_body_buffer_limit": body_limit,
    })
}

/// The router's virtual host `domains`: `server.hosts` as Envoy matches them (a name without a
/// port also as `name:*`), or `*` when it is empty.
pub fn domains(hosts: &[HostMatch]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let mut push = |d: String| {
        if !out.contains(&d) {
            out.push(d);
        }
    };
    for h in hosts {
        let bracket = |host: &str| if host.contains(':') { format!("[{host}]") } else { host.to_string() };
        match h {
            HostMatch::Any => return vec!["*".into()],
            HostMatch::Exact { host, port: Some(port) } => push(format!("{}:{port}", bracket(host))),
            HostMatch::Exact { host, port: None } => {
                push(bracket(host));
                push(format!("{}:*", bracket(host)));
            }
            HostMatch::Suffix { suffix, port: Some(port) } => push(format!("*{suffix}:{port}")),
            // Envoy allows one wildcard per domain, so `*.example.com:*` can't be written; with a
            // port, `*.example.com` requests need their `name:port` entry.
            HostMatch::Suffix { suffix, port: None } => push(format!("*{suffix}")),
        }
    }
    if out.is_empty() {
        out.push("*".into());
    }
    out
}

fn routes(p: &Prepared) -> Vec<Value> {
    // No request_timeout (-1) is "0s": Envoy's "no route timeout".
    let timeout = p.config.server.request_timeout.map(duration_ms).unwrap_or_else(|| "0s".into());
    let body_limit = p.config.server.max_body_size_bytes + BODY_BUFFER_SLACK;
    let not_found = filter::errors::body(404, "Not found: the router serves /v1/*, /health and /metrics", Some("not_found"));
    // Reached only when the filter did not answer /health itself (it always does when it runs).
    let unavailable = filter::errors::body(503, "The router is not running on this Envoy; see its log.", Some("router_unavailable"));
    let json_type = json!([{
        "header": {"key": "content-type", "value": "application/json"},
        "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
    }]);
    vec![
        routed_route(p, &timeout, body_limit),
        json!({
            "name": "metrics",
            "match": {"path": "/metrics"},
            "route": {"cluster": ADMIN_CLUSTER, "prefix_rewrite": "/stats/prometheus", "timeout": "10s"},
            "typed_per_filter_config": disable_wasm(),
        }),
        json!({
            "name": "health",
            "match": {"path": "/health"},
            "direct_response": {"status": 503, "body": {"inline_string": unavailable}},
            "response_headers_to_add": json_type,
        }),
        unrouted_v1_route(p, &timeout, body_limit),
        json!({
            "name": "not_found",
            "match": {"prefix": "/"},
            "direct_response": {"status": 404, "body": {"inline_string": not_found}},
            "response_headers_to_add": json_type,
            "typed_per_filter_config": disable_wasm(),
        }),
    ]
}

/// An access-log filter on a CEL expression (Envoy's local-reply mappers take these).
fn cel_filter(expression: &str) -> Value {
    json!({"extension_filter": {
        "name": "envoy.access_loggers.extension_filters.cel",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.access_loggers.filters.cel.v3.ExpressionFilter",
            "expression": expression,
        },
    }})
}

/// Envoy's own local replies as OpenAI-style JSON: upstream failures (by response flag) and the
/// wasm failure policy's 503 (a VM trap, or a worker whose VM is being reloaded), which Envoy
/// sends with an empty body; matched on its response code details. The filter's own JSON replies
/// match neither and pass unchanged.
fn local_reply_config() -> Value {
    let mapper = |flags: &[&str], kind: &str, code: &str| {
        json!({
            "filter": {"response_flag_filter": {"flags": flags}},
            "body_format_override": {"json_format": {"error": {
                "message": "%LOCAL_REPLY_BODY%", "type": kind, "param": null, "code": code,
            }}},
        })
    };
    let mut mappers = vec![mapper(&["UT"], "timeout_error", "upstream_timeout")];
    // The filter wrote NO_CREDENTIAL after a failure without a provider response (every other
    // credential was tried or is unavailable), or a request reached `/v1/` unrouted: Envoy's 503
    // from the endpoint-less cluster.
    mappers.push(json!({
        "filter": {"and_filter": {"filters": [
            {"response_flag_filter": {"flags": ["UH"]}},
            cel_filter(&format!("xds.cluster_name == '{NO_CREDENTIAL_CLUSTER}'")),
        ]}},
        "body_format_override": {"json_format": {"error": {
            "message": "No credential is available: every credential that could serve this request failed or was already tried",
            "type": "service_unavailable_error", "param": null, "code": "no_credential_available",
        }}},
    }));
    mappers.extend([
        mapper(&["UF", "UH", "UC", "URX", "UO", "NC", "UMSDR", "DC"], "service_unavailable_error", "upstream_unavailable"),
        json!({
            "filter": cel_filter(&format!("response.code_details == '{WASM_FAIL_DETAILS}'")),
            "body_format_override": {"json_format": {"error": {
                "message": "The router failed on this request and refused it (it reached no provider); retry it",
                "type": "service_unavailable_error", "param": null, "code": "router_unavailable",
            }}},
        }),
    ]);
    json!({"mappers": mappers})
}

fn access_log() -> Value {
    json!([{
        "name": "envoy.access_loggers.stdout",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.access_loggers.stream.v3.StdoutAccessLog",
            "log_format": {"text_format_source": {"inline_string":
                "[%START_TIME%] \"%REQ(:METHOD)% %PATH(NQ:ORIG_OR_PATH)% %PROTOCOL%\" %RESPONSE_CODE% %RESPONSE_FLAGS% credential=%UPSTREAM_CLUSTER% %BYTES_RECEIVED%B>%BYTES_SENT%B %DURATION%ms\n"
            }},
        }
    }])
}

fn listener(p: &Prepared, o: &RenderOptions) -> Value {
    let port = o.listen_port.unwrap_or(p.config.server.port);
    let level = p.config.server.logging_level;
    let mut hcm = json!({
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "auto_ai_router",
        "codec_type": "AUTO",
        "use_remote_address": true,
        // No path normalisation here: the filter itself refuses `..`, `.`, `//` and encoded
        // separators under /v1/ with 404, and the other routes match exact paths.
        // Edge-proxy defaults (Envoy's "Configuring Envoy as an edge proxy"): a stream quiet for
        // 5 min is closed, except on /v1/, whose route sets `idle_timeout: 0s` for long SSE
        // streams; a client has 10 s to send its request headers; HTTP/2 clients get bounded
        // streams and flow-control windows.
        "stream_idle_timeout": STREAM_IDLE_TIMEOUT,
        "request_headers_timeout": REQUEST_HEADERS_TIMEOUT,
        "common_http_protocol_options": {"idle_timeout": "300s"},
        "http2_protocol_options": {
            "max_concurrent_streams": HTTP2_MAX_CONCURRENT_STREAMS,
            "initial_stream_window_size": HTTP2_INITIAL_STREAM_WINDOW,
            "initial_connection_window_size": HTTP2_INITIAL_CONNECTION_WINDOW,
        },
        "route_config": {
            "name": "auto_ai_router",
            "virtual_hosts": [{"name": "auto_ai_router", "domains": domains(&p.config.server.hosts), "routes": routes(p)}],
        },
        "local_reply_config": local_reply_config(),
        "http_filters": http_filters(p, o),
    });
    if o.access_log.unwrap_or(level <= LogLevel::Info) {
        hcm["access_log"] = access_log();
    }
    json!({
        "name": "auto_ai_router",
        "address": socket_address(&o.listen_address, port),
        // A second router on the same port must fail to start ("Address already in use"), not
        // bind beside this one and have the kernel split connections between two processes
        // whose limits and bans are separate.
        "enable_reuse_port": false,
        "filter_chains": [{"filters": [{
            "name": "envoy.filters.network.http_connection_manager",
            "typed_config": hcm,
        }]}],
    })
}

fn endpoint_cluster(name: &str, host: &str, port: u16) -> Value {
    json!({"cluster_name": name, "endpoints": [{"lb_endpoints": [{"endpoint": {"address": socket_address(host, port)}}]}]})
}

/// A credential's endpoint, with `hostname` = the `:authority` the provider expects, which the
/// routed route's `auto_host_rewrite` puts on every attempt to it.
fn credential_endpoints(c: &Credential) -> Value {
    json!({"cluster_name": c.name, "endpoints": [{"lb_endpoints": [{"endpoint": {
        "address": socket_address(&c.host, c.port),
        "hostname": c.authority,
    }}]}]})
}

/// The upstream HTTP filter chain of a credential cluster when retries are on: the same `.wasm`,
/// VM and configuration string as the downstream filter (one VM per worker, shared data shared;
/// one identical string gives one upstream root context per worker), its own root id, then the
/// codec Envoy requires last.
///
/// The wasm filter is skipped (`match_delegate`, `SkipFilter`) for requests without the filter's
/// plan in filter state: the filter's own `/v1/models` fetches through these clusters. Envoy
/// creates the upstream filter's context synchronously inside `dispatch_http_call`, re-entering
/// the VM from the root's `on_tick`, and the proxy-wasm 0.2.5 SDK panics there ("RefCell already
/// mutably borrowed"; checked on Envoy 1.40: the fetch failed and the VM trapped). A skipped
/// filter never gets a context. Router requests always have a plan (no plan: no route, 503 NC).
fn upstream_filters(p: &Prepared, o: &RenderOptions) -> Value {
    let wasm = wasm_filter(UPSTREAM_FILTER_NAME, retry_contract::UPSTREAM_ROOT_ID, &p.plugin_json(), &o.wasm_path, &p.env_names());
    let no_plan = json!({"not_matcher": {"single_predicate": {
        "input": {"name": "plan", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.matching.common_inputs.network.v3.FilterStateInput",
            "key": PLAN_FILTER_STATE,
        }},
        "value_match": {"safe_regex": {"google_re2": {}, "regex": "(?s).*"}},
    }}});
    json!([
        {"name": UPSTREAM_FILTER_NAME, "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.common.matching.v3.ExtensionWithMatcher",
            "extension_config": wasm,
            "xds_matcher": {"matcher_list": {"matchers": [{
                "predicate": no_plan,
                "on_match": {"action": {"name": "skip", "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.common.matcher.action.v3.SkipFilter",
                }}},
            }]}},
        }},
        {"name": "envoy.filters.http.upstream_codec",
         "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.upstream_codec.v3.UpstreamCodec"}},
    ])
}

/// One cluster per credential; `upstream` is the upstream filter chain (retries on) or None.
fn credential_cluster(c: &Credential, o: &RenderOptions, upstream: Option<&Value>) -> Value {
    let ip = c.host.parse::<IpAddr>().ok();
    let mut cluster = json!({
        "name": c.name,
        "connect_timeout": duration(o.connect_timeout_secs),
        "type": if ip.is_some() { "STATIC" } else { "LOGICAL_DNS" },
        "load_assignment": credential_endpoints(c),
        "circuit_breakers": {"thresholds": [{
            "priority": "DEFAULT",
            "max_connections": 10000, "max_pending_requests": 10000, "max_requests": 10000,
            "max_retries": if upstream.is_some() { MAX_CONCURRENT_RETRIES } else { 10 },
        }]},
    });
    if ip.is_none() {
        cluster["dns_lookup_family"] = json!("V4_PREFERRED");
    }
    // Close idle upstream connections before providers typically do, so none is reused half-closed.
    let common = json!({"idle_timeout": "50s"});
    let mut options = match c.scheme {
        Scheme::Https => json!({
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "common_http_protocol_options": common,
            // ALPN: HTTP/2 when the provider offers it, else HTTP/1.1.
            "auto_config": {"http_protocol_options": {}, "http2_protocol_options": {}},
        }),
        Scheme::Http => json!({
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "common_http_protocol_options": common,
            "explicit_http_config": {"http_protocol_options": {}},
        }),
    };
    if let Some(filters) = upstream {
        options["http_filters"] = filters.clone();
    }
    cluster["typed_extension_protocol_options"] = json!({"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": options});
    if c.scheme == Scheme::Https {
        let san = if ip.is_some() {
            json!({"san_type": "IP_ADDRESS", "matcher": {"exact": c.host}})
        } else {
            json!({"san_type": "DNS", "matcher": {"exact": c.host}})
        };
        let mut tls = json!({
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
            "common_tls_context": {
                "alpn_protocols": ["h2", "http/1.1"],
                "validation_context": {
                    "trusted_ca": {"filename": o.ca_bundle},
                    "match_typed_subject_alt_names": [san],
                },
            },
        });
        if ip.is_none() {
            tls["sni"] = json!(c.host);
        }
        cluster["transport_socket"] = json!({"name": "envoy.transport_sockets.tls", "typed_config": tls});
    }
    cluster
}

fn stats_config() -> Value {
    let tags: Vec<Value> = filter::metrics::LABELS.iter().map(|k| json!({"tag_name": k, "regex": filter::metrics::tag_regex(k)})).collect();
    json!({
        "stats_tags": tags,
        // Request durations are recorded in milliseconds; buckets sized for LLM calls.
        "histogram_bucket_settings": [{
            "match": {"prefix": "wasmcustom.auto_ai_router_requests_duration"},
            "buckets": [5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000, 120000, 300000, 600000],
        }, {
            // The router's own hold time in microseconds: from a few µs to a slow client's upload.
            "match": {"prefix": "wasmcustom.auto_ai_router_overhead_microseconds"},
            "buckets": [5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 50000, 250000, 1000000, 10000000],
        }, {
            // Waiting for a key (`server.queue_timeout`), in milliseconds.
            "match": {"prefix": "wasmcustom.auto_ai_router_queue_wait_milliseconds"},
            "buckets": [10, 50, 100, 250, 500, 1000, 2000, 5000, 10000, 30000],
        }],
    })
}

/// The rate-limit service of `global_limits`: gRPC, so HTTP/2 (without it every call fails with
/// gRPC status 14 "protocol error"). Plaintext: it runs next to the router (a sidecar, a pod in
/// the mesh, a compose service).
fn rls_cluster(g: &filter::config::GlobalLimits, o: &RenderOptions) -> Value {
    let ip = g.host.parse::<IpAddr>().ok();
    let mut cluster = json!({
        "name": RLS_CLUSTER,
        "connect_timeout": duration(o.connect_timeout_secs),
        "type": if ip.is_some() { "STATIC" } else { "STRICT_DNS" },
        "load_assignment": endpoint_cluster(RLS_CLUSTER, &g.host, g.port),
        "typed_extension_protocol_options": {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "explicit_http_config": {"http2_protocol_options": {}},
        }},
        "circuit_breakers": {"thresholds": [{
            "priority": "DEFAULT",
            "max_connections": 10000, "max_pending_requests": 10000, "max_requests": 10000,
        }]},
    });
    if ip.is_none() {
        cluster["dns_lookup_family"] = json!("V4_PREFERRED");
    }
    cluster
}

/// The complete bootstrap.
pub fn render(p: &Prepared, o: &RenderOptions) -> Value {
    let upstream = retries_on(p).then(|| upstream_filters(p, o));
    let mut clusters: Vec<Value> = p.config.credentials.iter().map(|c| credential_cluster(c, o, upstream.as_ref())).collect();
    clusters.push(json!({
        "name": NO_CREDENTIAL_CLUSTER,
        "connect_timeout": "1s",
        "type": "STATIC",
        "load_assignment": {"cluster_name": NO_CREDENTIAL_CLUSTER, "endpoints": []},
        // Envoy counts the retry that lands here against this cluster's retry budget.
        "circuit_breakers": {"thresholds": [{"priority": "DEFAULT", "max_retries": MAX_CONCURRENT_RETRIES}]},
    }));
    if let Some(g) = &p.config.global {
        clusters.push(rls_cluster(g, o));
    }
    clusters.push(json!({
        "name": ADMIN_CLUSTER,
        "connect_timeout": "1s",
        "type": "STATIC",
        "load_assignment": endpoint_cluster(ADMIN_CLUSTER, &o.admin_address, o.admin_port),
    }));
    json!({
        "node": {"id": "auto-ai-router", "cluster": "auto-ai-router"},
        "admin": {"address": socket_address(&o.admin_address, o.admin_port)},
        "stats_config": stats_config(),
        "overload_manager": {"resource_monitors": [{
            "name": "envoy.resource_monitors.global_downstream_max_connections",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.resource_monitors.downstream_connections.v3.DownstreamConnectionsConfig",
                "max_active_downstream_connections": 50000,
            },
        }]},
        "static_resources": {
            "listeners": [listener(p, o)],
            "clusters": clusters,
        },
    })
}

/// The bootstrap as YAML, with a header saying where it came from and what Envoy needs.
pub fn to_yaml(p: &Prepared, bootstrap: &Value) -> String {
    let mut out = String::new();
    out.push_str("# Envoy bootstrap rendered by `auto-ai-router render`");
    if let Some(c) = &p.config_path {
        out.push_str(&format!(" from {}", c.display()));
    }
    out.push_str(".\n# It holds no secret: the filter reads them from these environment variables of the Envoy process:\n");
    for v in &p.env {
        out.push_str(&format!("#   {}  ({})\n", v.name, v.used_by));
    }
    out.push_str(&format!("# Run: envoy -c THIS_FILE {}\n", envoy_args(p).join(" ")));
    out.push_str(&serde_yaml::to_string(bootstrap).expect("YAML"));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::prepare::prepare;

    const KEY: &str = "sk-render-unit-secret-0001";
    const MASTER: &str = "sk-render-unit-master-0002";

    fn bootstrap_for(server_extra: &str) -> Value {
        let text = format!(
            "server:\n  master_key: \"{MASTER}\"\n{server_extra}credentials:\n  - name: a\n    api_key: \"{KEY}\"\n    base_url: \"https://api.example.com/v1\"\n    rpm: 60\n"
        );
        let p = prepare(&text, None, &|_| None, "config.yaml", "models.yaml").unwrap_or_else(|e| panic!("{e}"));
        render(&p, &RenderOptions { ca_bundle: "/ca.pem".into(), ..RenderOptions::default() })
    }

    fn at<'a>(v: &'a Value, pointer: &str) -> &'a Value {
        v.pointer(pointer).unwrap_or_else(|| panic!("no {pointer} in the bootstrap"))
    }

    const LISTENER: &str = "/static_resources/listeners/0";
    const HCM: &str = "/static_resources/listeners/0/filter_chains/0/filters/0/typed_config";

    fn route<'a>(b: &'a Value, name: &str) -> &'a Value {
        at(b, &format!("{HCM}/route_config/virtual_hosts/0/routes"))
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["name"] == name)
            .unwrap_or_else(|| panic!("no route {name}"))
    }

    #[test]
    fn listener_has_edge_timeouts_http2_limits_and_no_port_reuse() {
        let b = bootstrap_for("");
        assert_eq!(at(&b, &format!("{LISTENER}/enable_reuse_port")), false);
        assert_eq!(at(&b, &format!("{HCM}/stream_idle_timeout")), "300s");
        assert_eq!(at(&b, &format!("{HCM}/request_headers_timeout")), "10s");
        assert_eq!(at(&b, &format!("{HCM}/common_http_protocol_options/idle_timeout")), "300s");
        assert_eq!(at(&b, &format!("{HCM}/http2_protocol_options/max_concurrent_streams")), 100);
        assert_eq!(at(&b, &format!("{HCM}/http2_protocol_options/initial_stream_window_size")), 65536);
        assert_eq!(at(&b, &format!("{HCM}/http2_protocol_options/initial_connection_window_size")), 1048576);
        // While the body arrives (route `v1`) a stalled client is cut; once routed, long quiet SSE
        // streams and generations are not.
        assert_eq!(route(&b, "v1")["route"]["idle_timeout"], "60s");
        assert_eq!(route(&b, ROUTED_ROUTE)["route"]["idle_timeout"], "0s");
        assert_eq!(route(&bootstrap_for("  body_idle_timeout: 1500ms\n"), "v1")["route"]["idle_timeout"], "1.500s");
        assert_eq!(route(&bootstrap_for("  body_idle_timeout: -1\n"), "v1")["route"]["idle_timeout"], "0s");
        for r in ["metrics", "health", "not_found"] {
            assert!(route(&b, r).pointer("/route/idle_timeout").is_none(), "{r} overrides the listener's idle timeout");
        }
    }

    #[test]
    fn the_route_timeout_is_request_timeout_to_the_millisecond() {
        for (setting, want) in [
            ("", "300s"), // the default, 5m
            ("  request_timeout: 1500ms\n", "1.500s"),
            ("  request_timeout: 250ms\n", "0.250s"),
            ("  request_timeout: 2m\n", "120s"),
            ("  request_timeout: 90\n", "90s"),
            ("  request_timeout: 500us\n", "0.001s"), // never "0s", which would mean none
            ("  request_timeout: -1\n", "0s"),
        ] {
            let b = bootstrap_for(setting);
            assert_eq!(route(&b, ROUTED_ROUTE)["route"]["timeout"], want, "{setting:?}");
        }
    }

    #[test]
    fn routes_send_only_health_and_v1_through_the_filter() {
        let b = bootstrap_for("");
        assert_eq!(route(&b, "v1")["match"], json!({"prefix": "/v1/"}));
        // Unrouted, /v1/ reaches no provider: its cluster has no endpoint.
        assert_eq!(route(&b, "v1")["route"]["cluster"], NO_CREDENTIAL_CLUSTER);
        assert_eq!(route(&b, "health")["match"], json!({"path": "/health"}));
        // The filter answers /health; the route itself never goes upstream.
        assert_eq!(at(route(&b, "health"), "/direct_response/status"), 503);
        assert_eq!(route(&b, "metrics")["route"]["prefix_rewrite"], "/stats/prometheus");
        let off = json!({"@type": "type.googleapis.com/envoy.config.route.v3.FilterConfig", "disabled": true});
        for r in ["metrics", "not_found"] {
            assert_eq!(route(&b, r)["typed_per_filter_config"][ROUTER_FILTER_NAME], off, "{r}");
        }
        for r in ["not_found", "health"] {
            let body = at(route(&b, r), "/direct_response/body/inline_string").as_str().unwrap();
            let body: Value = serde_json::from_str(body).unwrap();
            assert!(body["error"]["type"].is_string(), "{r}: {body}");
        }
        let filter = at(&b, &format!("{HCM}/http_filters/0/typed_config/config"));
        assert_eq!(filter["allow_on_headers_stop_iteration"], true);
        assert_eq!(filter["failure_policy"], FAILURE_POLICY);
        assert_eq!(at(&b, &format!("{HCM}/http_filters/1/name")), "envoy.filters.http.router");
    }

    #[test]
    fn the_virtual_host_serves_server_hosts_only() {
        let vhost = |extra: &str| at(&bootstrap_for(extra), &format!("{HCM}/route_config/virtual_hosts/0/domains")).clone();
        assert_eq!(vhost(""), json!(["*"]));
        assert_eq!(
            vhost("  hosts: [AI.example.com, \"api.example.com:8443\", \"*.corp.example\", \"[::1]\"]\n"),
            json!(["ai.example.com", "ai.example.com:*", "api.example.com:8443", "*.corp.example", "[::1]", "[::1]:*"])
        );
        assert_eq!(vhost("  hosts: [a.example.com, \"*\"]\n"), json!(["*"]));
        assert_eq!(vhost("  hosts: []\n"), json!(["*"]));
    }

    #[test]
    fn no_route_takes_its_cluster_from_a_header() {
        for setting in ["", "  max_provider_retries: 0\n"] {
            let text = two_credentials(setting).to_string();
            assert!(!text.contains("cluster_header"), "{setting:?}: {text}");
            assert!(!text.contains("x-auto-ai-router-cluster"), "{setting:?}");
        }
    }

    #[test]
    fn local_replies_get_openai_bodies_for_upstream_failures_and_traps() {
        let b = bootstrap_for("");
        let mappers = at(&b, &format!("{HCM}/local_reply_config/mappers")).as_array().unwrap();
        let flags: Vec<&Value> = mappers.iter().filter_map(|m| m.pointer("/filter/response_flag_filter/flags")).collect();
        assert_eq!(flags.len(), 2);
        assert!(flags[0].as_array().unwrap().contains(&json!("UT")));
        assert!(flags[1].as_array().unwrap().contains(&json!("UF")));
        // Retries on: the no-credential cluster's 503 has its own message, before the generic
        // upstream mapper (first match wins).
        let none = &mappers[1];
        assert_eq!(at(none, "/filter/and_filter/filters/0/response_flag_filter/flags"), &json!(["UH"]));
        let cel = at(none, "/filter/and_filter/filters/1/extension_filter/typed_config/expression").as_str().unwrap();
        assert_eq!(cel, format!("xds.cluster_name == '{NO_CREDENTIAL_CLUSTER}'"));
        assert_eq!(at(none, "/body_format_override/json_format/error/code"), "no_credential_available");
        // The same with retries off: a request that reached `/v1/` unrouted gets it too.
        let off = bootstrap_for("  max_provider_retries: 0\n");
        let off_mappers = at(&off, &format!("{HCM}/local_reply_config/mappers")).as_array().unwrap();
        assert_eq!(off_mappers, mappers);
        let trap =
            mappers.iter().find(|m| m.pointer("/filter/extension_filter").is_some()).expect("a mapper for the wasm failure policy's 503");
        let cel = at(trap, "/filter/extension_filter/typed_config/expression").as_str().unwrap();
        assert!(cel.contains(WASM_FAIL_DETAILS), "{cel}");
        assert_eq!(at(trap, "/body_format_override/json_format/error/type"), "service_unavailable_error");
        assert_eq!(at(trap, "/body_format_override/json_format/error/code"), "router_unavailable");
    }

    #[test]
    fn no_secret_in_the_bootstrap() {
        let text = bootstrap_for("").to_string();
        assert!(!text.contains(KEY) && !text.contains(MASTER), "{text}");
        assert!(text.contains("os.environ/AUTO_AI_ROUTER_A_API_KEY"), "{text}");
    }

    #[test]
    fn global_limits_render_an_http2_cluster_for_the_service() {
        let b = bootstrap_for("");
        assert!(clusters(&b).iter().all(|c| c["name"] != RLS_CLUSTER), "none without global_limits");
        let text = format!(
            "server:\n  master_key: \"{MASTER}\"\ncredentials:\n  - name: a\n    api_key: \"{KEY}\"\n    base_url: \"http://127.0.0.1:9\"\n    rpm: 60\nglobal_limits:\n  service: \"ratelimit.default.svc:8081\"\n"
        );
        let p = prepare(&text, None, &|_| None, "config.yaml", "models.yaml").unwrap();
        let b = render(&p, &RenderOptions::default());
        let c = clusters(&b).iter().find(|c| c["name"] == RLS_CLUSTER).expect("the rate-limit service's cluster");
        assert_eq!(c["type"], "STRICT_DNS");
        assert_eq!(at(c, "/load_assignment/endpoints/0/lb_endpoints/0/endpoint/address/socket_address/port_value"), 8081);
        let h2 = at(c, "/typed_extension_protocol_options/envoy.extensions.upstreams.http.v3.HttpProtocolOptions/explicit_http_config");
        assert_eq!(h2, &json!({"http2_protocol_options": {}}));
    }

    #[test]
    fn https_credentials_get_tls_with_sni_and_san() {
        let b = bootstrap_for("");
        let c = at(&b, "/static_resources/clusters/0");
        assert_eq!(c["name"], "a");
        assert_eq!(c["type"], "LOGICAL_DNS");
        let tls = at(c, "/transport_socket/typed_config");
        assert_eq!(tls["sni"], "api.example.com");
        assert_eq!(at(tls, "/common_tls_context/validation_context/trusted_ca/filename"), "/ca.pem");
        assert_eq!(at(tls, "/common_tls_context/validation_context/match_typed_subject_alt_names/0/matcher/exact"), "api.example.com");
    }

    fn two_credentials(server_extra: &str) -> Value {
        let text = format!(
            "server:\n  master_key: \"{MASTER}\"\n{server_extra}credentials:\n  - name: a\n    api_key: \"{KEY}\"\n    base_url: \"https://api.example.com/v1\"\n  - name: b.2\n    api_key: \"{KEY}\"\n    base_url: \"http://127.0.0.1:9000/prefix\"\n"
        );
        let p = prepare(&text, None, &|_| None, "config.yaml", "models.yaml").unwrap_or_else(|e| panic!("{e}"));
        render(&p, &RenderOptions { ca_bundle: "/ca.pem".into(), ..RenderOptions::default() })
    }

    fn clusters(b: &Value) -> &Vec<Value> {
        at(b, "/static_resources/clusters").as_array().unwrap()
    }

    const PROTO: &str = "/typed_extension_protocol_options/envoy.extensions.upstreams.http.v3.HttpProtocolOptions";

    #[test]
    fn the_routed_route_follows_the_filter_state_with_a_retry_policy_when_retries_are_on() {
        let b = two_credentials("  max_provider_retries: 3\n");
        let routed = route(&b, ROUTED_ROUTE);
        let spec = at(routed, "/route/inline_cluster_specifier_plugin/extension");
        assert_eq!(spec["name"], "envoy.router.cluster_specifier_plugin.matcher");
        let tree = at(spec, "/typed_config/cluster_matcher/matcher_tree");
        assert_eq!(
            at(tree, "/input/typed_config/@type"),
            "type.googleapis.com/envoy.extensions.matching.common_inputs.network.v3.FilterStateInput"
        );
        assert_eq!(at(tree, "/input/typed_config/key"), retry_contract::NEXT_FILTER_STATE);
        let map = at(tree, "/exact_match_map/map").as_object().unwrap();
        assert_eq!(map.keys().collect::<Vec<_>>(), [retry_contract::NO_CREDENTIAL, "a", "b.2"]);
        for (name, entry) in map {
            assert_eq!(at(entry, "/action/typed_config/@type"), CLUSTER_ACTION_TYPE);
            let want = if name == retry_contract::NO_CREDENTIAL { NO_CREDENTIAL_CLUSTER } else { name.as_str() };
            assert_eq!(at(entry, "/action/typed_config/cluster"), want);
        }
        // NO_CREDENTIAL goes to a cluster without endpoints (Envoy's immediate 503, no further
        // attempt), and nothing routes a request the filter did not choose for.
        let none = clusters(&b).iter().find(|c| c["name"] == NO_CREDENTIAL_CLUSTER).expect("the no-credential cluster");
        assert_eq!(at(none, "/load_assignment/endpoints"), &json!([]));
        assert!(at(spec, "/typed_config/cluster_matcher").get("on_no_match").is_none());
        assert_eq!(at(routed, "/route/auto_host_rewrite"), true);

        let policy = at(routed, "/route/retry_policy");
        assert_eq!(policy["retry_on"], "retriable-headers,connect-failure,reset-before-request,reset");
        assert_eq!(policy["retriable_headers"], json!([{"name": retry_contract::RETRY_HEADER, "present_match": true}]));
        assert_eq!(policy["num_retries"], 3);
        assert_eq!(policy["refresh_cluster_on_retry"], true);
        assert_eq!(policy["retry_back_off"], json!({"base_interval": "0.001s", "max_interval": "0.002s"}));
        assert_eq!(routed["response_headers_to_remove"], json!([retry_contract::RETRY_HEADER]));
        // Retries replay the body from the route's buffer: it holds every accepted body.
        assert_eq!(routed["request_body_buffer_limit"], json!(100 * 1024 * 1024 + BODY_BUFFER_SLACK));
        assert_eq!(
            route(&b, "v1")["request_body_buffer_limit"],
            routed["request_body_buffer_limit"],
            "the body is buffered before routing"
        );
        // The default is 2; no per-try timeout unless server.attempt_timeout is set.
        assert_eq!(at(route(&two_credentials(""), ROUTED_ROUTE), "/route/retry_policy/num_retries"), 2);
        assert!(policy.get("per_try_timeout").is_none());
        let timed = two_credentials("  attempt_timeout: 1500ms\n");
        assert_eq!(at(route(&timed, ROUTED_ROUTE), "/route/retry_policy/per_try_timeout"), "1.500s");
    }

    #[test]
    fn each_endpoint_names_the_authority_its_provider_expects() {
        let b = two_credentials("");
        for (name, authority) in [("a", "api.example.com"), ("b.2", "127.0.0.1:9000")] {
            let c = clusters(&b).iter().find(|c| c["name"] == name).unwrap();
            assert_eq!(at(c, "/load_assignment/endpoints/0/lb_endpoints/0/endpoint/hostname"), authority, "{name}");
        }
    }

    #[test]
    fn retries_on_every_credential_cluster_runs_the_upstream_filter_before_the_codec() {
        let b = two_credentials("");
        let downstream = at(&b, &format!("{HCM}/http_filters/0/typed_config/config")).clone();
        for name in ["a", "b.2"] {
            let c = clusters(&b).iter().find(|c| c["name"] == name).unwrap();
            let proto = at(c, PROTO);
            let filters = at(proto, "/http_filters").as_array().unwrap();
            assert_eq!(filters.len(), 2, "{name}");
            assert_eq!(filters[0]["name"], UPSTREAM_FILTER_NAME);
            // Skipped for requests without a plan (the filter's own model-list fetches).
            let delegate = at(&filters[0], "/typed_config");
            assert_eq!(delegate["@type"], "type.googleapis.com/envoy.extensions.common.matching.v3.ExtensionWithMatcher");
            let m = at(delegate, "/xds_matcher/matcher_list/matchers/0");
            assert_eq!(at(m, "/predicate/not_matcher/single_predicate/input/typed_config/key"), PLAN_FILTER_STATE);
            assert_eq!(
                at(m, "/on_match/action/typed_config/@type"),
                "type.googleapis.com/envoy.extensions.filters.common.matcher.action.v3.SkipFilter"
            );
            let up = at(delegate, "/extension_config/typed_config/config");
            assert_eq!(up["root_id"], retry_contract::UPSTREAM_ROOT_ID);
            assert_ne!(up["root_id"], downstream["root_id"]);
            // Same VM (vm_id, code, env keys), same configuration string, same failure policy.
            for field in ["vm_config", "configuration", "failure_policy", "reload_config"] {
                assert_eq!(up[field], downstream[field], "{name}: {field}");
            }
            assert_eq!(filters[1]["name"], "envoy.filters.http.upstream_codec");
            assert_eq!(
                at(&filters[1], "/typed_config/@type"),
                "type.googleapis.com/envoy.extensions.filters.http.upstream_codec.v3.UpstreamCodec"
            );
            assert_eq!(at(c, "/circuit_breakers/thresholds/0/max_retries"), MAX_CONCURRENT_RETRIES);
        }
        // Merged with the protocol settings each scheme already had.
        let a = clusters(&b).iter().find(|c| c["name"] == "a").unwrap();
        assert!(a.pointer(&format!("{PROTO}/auto_config")).is_some());
        let b2 = clusters(&b).iter().find(|c| c["name"] == "b.2").unwrap();
        assert_eq!(at(b2, &format!("{PROTO}/explicit_http_config")), &json!({"http_protocol_options": {}}));
        assert_eq!(at(b2, &format!("{PROTO}/common_http_protocol_options/idle_timeout")), "50s");
        // The admin cluster has no filter.
        let admin = clusters(&b).iter().find(|c| c["name"] == ADMIN_CLUSTER).unwrap();
        assert!(admin.get("typed_extension_protocol_options").is_none());
        // Still no secret anywhere, the upstream filter's copy of the configuration included.
        let text = b.to_string();
        assert!(!text.contains(KEY) && !text.contains(MASTER));
    }

    #[test]
    fn a_routed_request_keeps_its_route_on_any_path() {
        for setting in ["", "  max_provider_retries: 0\n"] {
            let b = two_credentials(setting);
            let routes = at(&b, &format!("{HCM}/route_config/virtual_hosts/0/routes")).as_array().unwrap();
            // First, so a prefixed path (/prefix/v1/...) after the filter's rewrite or before a
            // retry still finds it; keyed on filter state, which only the filter writes.
            let routed = &routes[0];
            assert_eq!(routed["name"], ROUTED_ROUTE, "{setting:?}");
            assert_eq!(
                routed["match"],
                json!({"prefix": "/", "filter_state": [{"key": retry_contract::NEXT_FILTER_STATE, "string_match": {"safe_regex": {"regex": ".+"}}}]})
            );
            assert!(routed.pointer("/route/inline_cluster_specifier_plugin").is_some(), "{setting:?}");
            // Never a route any client header can reach on any path.
            for r in routes {
                assert!(r.pointer("/match/headers").is_none(), "{r}");
            }
        }
    }

    #[test]
    fn retries_off_render_nothing_retry_related() {
        let b = two_credentials("  max_provider_retries: 0\n");
        let routed = route(&b, ROUTED_ROUTE);
        assert!(routed.pointer("/route/retry_policy").is_none(), "{routed}");
        assert!(routed.get("response_headers_to_remove").is_none());
        for c in clusters(&b) {
            assert!(c.pointer(&format!("{PROTO}/http_filters")).is_none(), "{}", c["name"]);
        }
        let text = b.to_string();
        for needle in [retry_contract::UPSTREAM_ROOT_ID, retry_contract::RETRY_HEADER, "retry_policy", "upstream_codec"] {
            assert!(!text.contains(needle), "{needle} in a bootstrap without retries");
        }
    }

    #[test]
    fn filter_state_keys_follow_the_property_names() {
        assert_eq!(PLAN_FILTER_STATE, format!("wasm.{}", retry_contract::PLAN_PROPERTY));
        assert_eq!(retry_contract::NEXT_FILTER_STATE, format!("wasm.{}", retry_contract::NEXT_PROPERTY));
    }

    #[test]
    fn durations_keep_milliseconds() {
        use std::time::Duration;
        assert_eq!(duration_ms(Duration::from_millis(1500)), "1.500s");
        assert_eq!(duration_ms(Duration::from_millis(1005)), "1.005s");
        assert_eq!(duration_ms(Duration::from_secs(300)), "300s");
        assert_eq!(duration_ms(Duration::from_micros(10)), "0.001s");
    }
}
