//! TEST FIXTURE standing in for istiod (and the istio-agent's ECDS conversion): builds the
//! bootstrap an Istio ingress gateway would run for envoy/istio/virtualservice.yaml (a virtual host
//! per Gateway host, named `<host>:<port>`, on the listener `0.0.0.0_8080`), with other apps'
//! virtual hosts beside it, and applies an EnvoyFilter's `configPatches` to it the way istiod does
//! for the operations our manifests use (HTTP_FILTER INSERT_BEFORE, CLUSTER ADD, HTTP_ROUTE MERGE
//! and INSERT_FIRST, EXTENSION_CONFIG ADD). Anything else panics, so a manifest never uses a patch
//! this fixture does not model. Not Istio: only what our tests need of it, all on 127.0.0.1.

use serde_json::{json, Map, Value};
use std::net::SocketAddr;

/// The pod port of Istio's default ingress gateway behind the Gateway's port 80.
pub const GATEWAY_PORT: u16 = 8080;

/// An EnvoyFilter manifest as JSON (YAML anchors resolved, as kubectl sends it).
pub fn envoyfilter(path: &std::path::Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

pub struct Gateway {
    /// Where the listener really binds (it stands for the pod's port 8080).
    pub listen: SocketAddr,
    pub admin: SocketAddr,
    /// The router's Gateway host and its VirtualService route name.
    pub host: String,
    pub route_name: String,
    /// `outbound|443||<provider>` (the ServiceEntry's cluster): its endpoint, with the provider's
    /// host name as the endpoint's hostname, as Istio's DNS cluster has it. Plain HTTP here: the
    /// DestinationRule's TLS origination is Istio's, not ours, and the mock has no certificate.
    pub provider_cluster: String,
    pub provider_host: String,
    pub provider: SocketAddr,
    /// Other apps' hosts on the same port (a `*` one among them), all routed to this backend.
    pub other_hosts: Vec<String>,
    pub other: SocketAddr,
}

fn address(a: SocketAddr) -> Value {
    json!({"socket_address": {"address": a.ip().to_string(), "port_value": a.port()}})
}

fn static_cluster(name: &str, a: SocketAddr, hostname: Option<&str>) -> Value {
    let mut endpoint = json!({"address": address(a)});
    if let Some(h) = hostname {
        endpoint["hostname"] = json!(h);
    }
    json!({"name": name, "type": "STATIC", "connect_timeout": "2s",
           "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [{"endpoint": endpoint}]}]}})
}

impl Gateway {
    /// The gateway's bootstrap before any EnvoyFilter.
    pub fn bootstrap(&self) -> Value {
        let vs_route =
            |m: Value| json!({"name": self.route_name, "match": m, "route": {"cluster": self.provider_cluster, "timeout": "0s"}});
        let mut vhosts = vec![json!({
            "name": format!("{}:80", self.host),
            "domains": [self.host.clone(), format!("{}:*", self.host)],
            "routes": [vs_route(json!({"prefix": "/v1/"})), vs_route(json!({"path": "/health"}))],
        })];
        for h in &self.other_hosts {
            let domains = if h == "*" { json!(["*"]) } else { json!([h, format!("{h}:*")]) };
            vhosts.push(json!({"name": format!("{h}:80"), "domains": domains,
                               "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "outbound|80||other-app"}}]}));
        }
        json!({
            "node": {"id": "router~10.0.0.1~istio-ingressgateway.istio-system~istio-system.svc.cluster.local", "cluster": "istio-ingressgateway"},
            "admin": {"address": address(self.admin)},
            "static_resources": {
                "listeners": [{
                    "name": format!("0.0.0.0_{GATEWAY_PORT}"),
                    "address": address(self.listen),
                    "enable_reuse_port": false,
                    "filter_chains": [{"filters": [{
                        "name": "envoy.filters.network.http_connection_manager",
                        "typed_config": {
                            "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                            "stat_prefix": format!("outbound_0.0.0.0_{GATEWAY_PORT}"),
                            "route_config": {"name": "http.8080", "virtual_hosts": vhosts},
                            "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
                                "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}],
                        },
                    }]}],
                }],
                "clusters": [
                    static_cluster(&self.provider_cluster, self.provider, Some(&self.provider_host)),
                    static_cluster("outbound|80||other-app", self.other, None),
                ],
            },
        })
    }
}

fn hcm(b: &mut Value) -> &mut Value {
    b.pointer_mut("/static_resources/listeners/0/filter_chains/0/filters/0/typed_config").expect("the gateway's HCM")
}

fn str_at<'a>(v: &'a Value, pointer: &str) -> Option<&'a str> {
    v.pointer(pointer).and_then(Value::as_str)
}

/// Protobuf merge as istiod's MERGE does it: messages merge field by field, scalars and lists
/// of the patch replace (lists are appended in protobuf; our patches set none that the gateway
/// already has), and setting one member of a route's action oneof clears the others.
fn merge(into: &mut Value, patch: &Value) {
    match (into, patch) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in b {
                match a.get_mut(k) {
                    Some(existing) if existing.is_object() && v.is_object() => merge(existing, v),
                    _ => {
                        a.insert(k.clone(), v.clone());
                    }
                }
            }
        }
        (a, b) => *a = b.clone(),
    }
}

/// A route action field's oneof siblings (RouteAction.cluster_specifier).
const CLUSTER_SPECIFIERS: [&str; 5] =
    ["cluster", "cluster_header", "weighted_clusters", "cluster_specifier_plugin", "inline_cluster_specifier_plugin"];

fn merge_route(route: &mut Value, patch: &Value) {
    if let Some(action) = patch.get("route").and_then(Value::as_object) {
        if let Some(set) = CLUSTER_SPECIFIERS.iter().find(|k| action.contains_key(**k)) {
            if let Some(r) = route.get_mut("route").and_then(Value::as_object_mut) {
                for k in CLUSTER_SPECIFIERS.iter().filter(|k| *k != set) {
                    r.remove(*k);
                }
            }
        }
    }
    merge(route, patch);
}

/// Applies `envoyfilter`'s patches to `bootstrap` (a gateway of [`Gateway::bootstrap`]).
pub fn apply(bootstrap: &mut Value, envoyfilter: &Value, gateway: &str) {
    let patches = envoyfilter.pointer("/spec/configPatches").and_then(Value::as_array).expect("spec.configPatches");
    let mut ecds: Map<String, Value> = Map::new();
    for p in patches {
        let apply_to = str_at(p, "/applyTo").expect("applyTo");
        let op = str_at(p, "/patch/operation").expect("patch.operation");
        let value = p.pointer("/patch/value").cloned().expect("patch.value");
        assert_eq!(str_at(p, "/match/context"), Some("GATEWAY"), "{apply_to}: only gateway patches are modelled");
        match (apply_to, op) {
            ("EXTENSION_CONFIG", "ADD") => {
                let name = str_at(&value, "/name").expect("name").to_string();
                ecds.insert(name, value["typed_config"].clone());
            }
            ("HTTP_FILTER", "INSERT_BEFORE") => {
                assert_eq!(p.pointer("/match/listener/portNumber").and_then(Value::as_u64), Some(GATEWAY_PORT as u64), "{p}");
                assert_eq!(str_at(p, "/match/listener/filterChain/filter/name"), Some("envoy.filters.network.http_connection_manager"));
                let before = str_at(p, "/match/listener/filterChain/filter/subFilter/name").expect("subFilter");
                let filters = hcm(bootstrap)["http_filters"].as_array_mut().expect("http_filters");
                let at = filters.iter().position(|f| f["name"] == before).unwrap_or_else(|| panic!("no {before} filter"));
                filters.insert(at, value);
            }
            ("CLUSTER", "ADD") => bootstrap["static_resources"]["clusters"].as_array_mut().expect("clusters").push(value),
            ("HTTP_ROUTE", op) => {
                assert_eq!(str_at(p, "/match/routeConfiguration/gateway"), Some(gateway), "{p}");
                let vhost_name = str_at(p, "/match/routeConfiguration/vhost/name");
                let route_name = str_at(p, "/match/routeConfiguration/vhost/route/name");
                let vhosts = hcm(bootstrap)["route_config"]["virtual_hosts"].as_array_mut().expect("virtual hosts");
                let mut matched = 0;
                for vh in vhosts.iter_mut().filter(|vh| vhost_name.is_none_or(|n| vh["name"] == n)) {
                    let routes = vh["routes"].as_array_mut().expect("routes");
                    match op {
                        "MERGE" => {
                            for r in routes.iter_mut().filter(|r| route_name.is_none_or(|n| r["name"] == n)) {
                                merge_route(r, &value);
                                matched += 1;
                            }
                        }
                        "INSERT_FIRST" => {
                            assert!(route_name.is_none(), "INSERT_FIRST matches a virtual host");
                            routes.insert(0, value.clone());
                            matched += 1;
                        }
                        other => panic!("HTTP_ROUTE {other} is not modelled"),
                    }
                }
                assert!(matched > 0, "the HTTP_ROUTE patch matched nothing: {p}");
            }
            (a, o) => panic!("{a} {o} is not modelled by this fixture"),
        }
    }
    // The istio-agent's part for ECDS filters: the resource, with the module pulled to a local file.
    let filters = hcm(bootstrap)["http_filters"].as_array_mut().expect("http_filters");
    for f in filters.iter_mut() {
        if f.get("config_discovery").is_some() {
            let name = f["name"].as_str().expect("name").to_string();
            let mut typed = ecds.get(&name).cloned().unwrap_or_else(|| panic!("no EXTENSION_CONFIG {name}"));
            let code = &mut typed["config"]["vm_config"]["code"];
            assert!(str_at(code, "/remote/http_uri/uri").is_some_and(|u| u.starts_with("oci://")), "{code}");
            *code = json!({"local": {"filename": "/etc/istio/extensions/filter.wasm"}});
            *f = json!({"name": name, "typed_config": typed});
        }
    }
}

/// Replaces every `{"filename": from}` with `to` (the module's path inside the gateway pod).
pub fn replace_filename(v: &mut Value, from: &str, to: &str) {
    match v {
        Value::Object(m) => {
            for (k, x) in m.iter_mut() {
                if k == "filename" && x == from {
                    *x = json!(to);
                } else {
                    replace_filename(x, from, to);
                }
            }
        }
        Value::Array(a) => a.iter_mut().for_each(|x| replace_filename(x, from, to)),
        _ => {}
    }
}
