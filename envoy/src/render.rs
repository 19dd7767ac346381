//! The Envoy v3 bootstrap for a prepared configuration.
//!
//! Layout: one listener (HTTP connection manager) whose routes are `/metrics` → the admin
//! interface's `/stats/prometheus`, `/health` and `/v1/` → the wasm router (which picks the
//! cluster through the `x-auto-ai-router-cluster` header), anything else → 404 JSON; one cluster
//! per credential, named after it; an admin cluster; `stats_tags` that turn the filter's
//! Istio-style stat names into Prometheus labels.

use crate::prepare::{Prepared, ADMIN_CLUSTER};
use filter::config::{Credential, LogLevel, Scheme};
use serde_json::{json, Value};
use std::net::IpAddr;

pub const ROUTER_ROOT_ID: &str = "auto_ai_router";
pub const VM_ID: &str = "auto_ai_router";
/// A trap fails the request that hit it (503, never an unauthenticated pass-through) and Envoy
/// reloads the VM, so one bad request does not leave the gateway answering 503 for good (see README).
pub const FAILURE_POLICY: &str = "FAIL_RELOAD";
pub use filter::CLUSTER_HEADER;
/// Name of the router's HTTP filter in the chain (and in `typed_per_filter_config`).
pub const ROUTER_FILTER_NAME: &str = "auto_ai_router";
/// Extra request-body buffer above `max_body_size` so the filter's own 413 (OpenAI JSON) fires
/// before Envoy's plain one.
pub const BODY_BUFFER_SLACK: u64 = 1 << 20;

/// CA bundles tried in order when `--ca-bundle` is not given (Debian/Ubuntu/Alpine, RHEL, SUSE).
pub const CA_BUNDLES: [&str; 4] = [
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/ca-bundle.pem",
    "/etc/ssl/cert.pem",
];

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
    CA_BUNDLES
        .iter()
        .find(|p| std::path::Path::new(p).is_file())
        .unwrap_or(&CA_BUNDLES[0])
        .to_string()
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

fn openai_error_body(status: u16, message: &str, kind: &str, code: &str) -> String {
    let _ = status;
    json!({"error": {"message": message, "type": kind, "param": null, "code": code}}).to_string()
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
        m.insert(
            n.to_string(),
            json!({"@type": "type.googleapis.com/envoy.config.route.v3.FilterConfig", "disabled": true}),
        );
    }
    Value::Object(m)
}

fn routes(p: &Prepared) -> Vec<Value> {
    let timeout = duration(p.config.server.request_timeout.map(|d| d.as_secs().max(1)).unwrap_or(0));
    let body_limit = p.config.server.max_body_size_bytes + BODY_BUFFER_SLACK;
    let not_found = openai_error_body(
        404,
        "Not found: the router serves /v1/*, /health and /metrics",
        "not_found_error",
        "not_found",
    );
    vec![
        json!({
            "name": "metrics",
            "match": {"path": "/metrics"},
            "route": {"cluster": ADMIN_CLUSTER, "prefix_rewrite": "/stats/prometheus", "timeout": "10s"},
            "typed_per_filter_config": disable_wasm(),
        }),
        json!({
            "name": "health",
            "match": {"path": "/health"},
            // The filter answers /health itself; the route only has to reach it.
            "route": {"cluster_header": CLUSTER_HEADER, "timeout": "10s"},
        }),
        json!({
            "name": "v1",
            "match": {"prefix": "/v1/"},
            "route": {
                "cluster_header": CLUSTER_HEADER,
                "timeout": timeout,
                // Long SSE streams: no per-route idle cut-off (the route timeout bounds the request).
                "idle_timeout": "0s",
                // Only failures where the provider cannot have seen the request; on the same credential.
                "retry_policy": {"retry_on": "connect-failure,reset-before-request", "num_retries": 1},
            },
            // The filter buffers the whole body before routing: allow max_body_size (plus slack).
            "request_body_buffer_limit": body_limit,
            // The cluster choice is internal: providers never see it.
            "request_headers_to_remove": [CLUSTER_HEADER],
        }),
        json!({
            "name": "not_found",
            "match": {"prefix": "/"},
            "direct_response": {"status": 404, "body": {"inline_string": not_found}},
            "response_headers_to_add": [{
                "header": {"key": "content-type", "value": "application/json"},
                "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
            }],
            "typed_per_filter_config": disable_wasm(),
        }),
    ]
}

/// Envoy's own local replies for upstream failures, as OpenAI-style JSON. Only replies carrying
/// these response flags are rewritten, so the filter's JSON replies pass unchanged.
fn local_reply_config() -> Value {
    let mapper = |flags: &[&str], kind: &str, code: &str| {
        json!({
            "filter": {"response_flag_filter": {"flags": flags}},
            "body_format_override": {"json_format": {"error": {
                "message": "%LOCAL_REPLY_BODY%", "type": kind, "param": null, "code": code,
            }}},
        })
    };
    json!({"mappers": [
        mapper(&["UT"], "timeout_error", "upstream_timeout"),
        mapper(&["UF", "UH", "UC", "URX", "UO", "NC", "UMSDR", "DC"], "service_unavailable_error", "upstream_unavailable"),
    ]})
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
        // SSE streams may be quiet for long: no stream idle timeout (the route timeout bounds requests).
        "stream_idle_timeout": "0s",
        "common_http_protocol_options": {"idle_timeout": "300s"},
        "route_config": {
            "name": "auto_ai_router",
            "virtual_hosts": [{"name": "auto_ai_router", "domains": ["*"], "routes": routes(p)}],
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
        "filter_chains": [{"filters": [{
            "name": "envoy.filters.network.http_connection_manager",
            "typed_config": hcm,
        }]}],
    })
}

fn endpoint_cluster(name: &str, host: &str, port: u16) -> Value {
    json!({"cluster_name": name, "endpoints": [{"lb_endpoints": [{"endpoint": {"address": socket_address(host, port)}}]}]})
}

fn credential_cluster(c: &Credential, o: &RenderOptions) -> Value {
    let ip = c.host.parse::<IpAddr>().ok();
    let mut cluster = json!({
        "name": c.name,
        "connect_timeout": duration(o.connect_timeout_secs),
        "type": if ip.is_some() { "STATIC" } else { "LOGICAL_DNS" },
        "load_assignment": endpoint_cluster(&c.name, &c.host, c.port),
        "circuit_breakers": {"thresholds": [{
            "priority": "DEFAULT",
            "max_connections": 10000, "max_pending_requests": 10000, "max_requests": 10000, "max_retries": 10,
        }]},
    });
    if ip.is_none() {
        cluster["dns_lookup_family"] = json!("V4_PREFERRED");
    }
    // Close idle upstream connections before providers typically do, so none is reused half-closed.
    let common = json!({"idle_timeout": "50s"});
    let options = match c.scheme {
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
    let tags: Vec<Value> = filter::metrics::LABELS
        .iter()
        .map(|k| json!({"tag_name": k, "regex": filter::metrics::tag_regex(k)}))
        .collect();
    json!({
        "stats_tags": tags,
        // Request durations are recorded in milliseconds; buckets sized for LLM calls.
        "histogram_bucket_settings": [{
            "match": {"prefix": "wasmcustom.auto_ai_router_requests_duration"},
            "buckets": [5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000, 120000, 300000, 600000],
        }],
    })
}

/// The complete bootstrap.
pub fn render(p: &Prepared, o: &RenderOptions) -> Value {
    let mut clusters: Vec<Value> = p.config.credentials.iter().map(|c| credential_cluster(c, o)).collect();
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
