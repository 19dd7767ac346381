//! docker-compose and Istio deployment files: the compose bootstrap is current and passes
//! `envoy --mode validate`; the manifests parse and carry the fields Istio's schema has, with a
//! plugin configuration the filter accepts, scoped to the router's listener, Gateway and hosts.
//! (Docker and Kubernetes are not available here.)

use auto_ai_router::locate;
use filter::config;
use serde_yaml::Value;
use std::path::{Path, PathBuf};
use std::process::Command;

mod common;
use common::{docs, get, repo, str_of};

/// The router replicas of docker-compose (behind the `front` Envoy).
const ROUTERS: [&str; 2] = ["router-1", "router-2"];

const COMPOSE_ENV: [(&str, &str); 3] =
    [("ROUTER_MASTER_KEY", "sk-your-secret-key"), ("MOCK_A_API_KEY", "sk-mock-a-key"), ("MOCK_B_API_KEY", "sk-mock-b-key")];

#[test]
fn compose_bootstrap_is_current_and_envoy_accepts_it() {
    let committed = std::fs::read_to_string(repo().join("envoy/docker/envoy.yaml")).unwrap();
    let dir = std::env::temp_dir().join(format!("auto-ai-router-compose-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let fresh = dir.join("envoy.yaml");
    // The same command as `make compose-bootstrap`.
    let o = Command::new(env!("CARGO_BIN_EXE_auto-ai-router"))
        .current_dir(repo())
        .args(["render", "--config", "envoy/docker/config.yaml", "--wasm", "/etc/envoy/filter.wasm"])
        .args(["--ca-bundle", "/etc/ssl/certs/ca-certificates.crt", "--out", fresh.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(std::fs::read_to_string(&fresh).unwrap(), committed, "envoy/docker/envoy.yaml is stale: run `make compose-bootstrap`");
    for (_, value) in COMPOSE_ENV {
        assert!(!committed.contains(value), "the compose bootstrap holds a key value");
    }
    // Validate it with this machine's paths for the module.
    let wasm = locate::find_wasm(None).unwrap();
    let local = committed.replace("/etc/envoy/filter.wasm", wasm.to_str().unwrap());
    std::fs::write(&fresh, local).unwrap();
    let envoy = locate::find_envoy().unwrap_or_else(|e| panic!("{e}"));
    let o = Command::new(envoy)
        .args(["--mode", "validate", "-c", fresh.to_str().unwrap(), "-l", "warning"])
        .env_clear()
        .envs(COMPOSE_ENV)
        .output()
        .unwrap();
    let log = format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert!(o.status.success() && log.contains("OK"), "envoy --mode validate:\n{log}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn compose_file_uses_the_official_image_and_mounts_module_and_bootstrap() {
    let d = &docs("envoy/docker-compose.yml")[0];
    for name in ROUTERS {
        let router = get(d, &format!("services.{name}"));
        assert!(str_of(router, "image").starts_with("envoyproxy/envoy:v1.40"));
        let mounts: Vec<&str> = get(router, "volumes").as_sequence().unwrap().iter().filter_map(Value::as_str).collect();
        assert!(mounts.iter().any(|m| m.ends_with(":/etc/envoy/filter.wasm:ro")), "{name}: {mounts:?}");
        assert!(mounts.iter().any(|m| m.starts_with("./docker/envoy.yaml:")), "{name}: {mounts:?}");
        for (var, _) in COMPOSE_ENV {
            assert!(get(router, "environment").get(var).is_some(), "{name} env lacks {var}");
        }
    }
    for svc in ["mock-a", "mock-b"] {
        assert_eq!(str_of(d, &format!("services.{svc}.build.dockerfile")), "envoy/docker/Dockerfile.mock");
    }
    assert!(repo().join("envoy/docker/Dockerfile.mock").is_file());
}

fn kinds(path: &str) -> Vec<(String, Value)> {
    docs(path)
        .into_iter()
        .map(|d| {
            assert!(str_of(&d, "apiVersion").contains("istio.io/"), "{path}: apiVersion");
            assert!(!str_of(&d, "metadata.name").is_empty());
            (str_of(&d, "kind").to_string(), d)
        })
        .collect()
}

fn accepts(plugin_json: &str) {
    let raw = config::parse_raw(plugin_json).unwrap_or_else(|e| panic!("plugin config: {e}"));
    let env = |n: &str| Some(format!("test-value-{n}"));
    config::validate(&raw, &env).unwrap_or_else(|e| panic!("plugin config: {e}"));
}

/// The Istio WasmPlugin path is not shipped: WasmPlugin cannot set `allow_on_headers_stop_iteration`,
/// so a router deployed that way would hang every inference request (see envoy/README.md).
/// ratelimit.yaml holds plain Kubernetes objects (the global limit engine), the others Istio's.
#[test]
fn no_istio_manifest_is_a_wasmplugin() {
    let dir = repo().join("envoy/istio");
    let mut n = 0;
    for e in std::fs::read_dir(&dir).unwrap() {
        let path = e.unwrap().path();
        if path.extension().and_then(|x| x.to_str()) != Some("yaml") {
            continue;
        }
        let rel = path.strip_prefix(repo()).unwrap().to_str().unwrap().to_string();
        if rel == "envoy/istio/ratelimit.yaml" {
            for (kind, _) in k8s_objects(&rel) {
                assert!(["ConfigMap", "Service", "Deployment"].contains(&kind.as_str()), "{rel}: {kind}");
            }
            continue;
        }
        for (kind, _) in kinds(&rel) {
            assert_ne!(kind, "WasmPlugin", "{rel}: a WasmPlugin cannot carry allow_on_headers_stop_iteration");
            n += 1;
        }
    }
    assert!(n >= 4, "only {n} manifests in {}", dir.display());
}

/// Kubernetes core objects (`v1`, `apps/v1`) of a manifest, as (kind, document).
fn k8s_objects(path: &str) -> Vec<(String, Value)> {
    docs(path)
        .into_iter()
        .map(|d| {
            assert!(["v1", "apps/v1"].contains(&str_of(&d, "apiVersion")), "{path}: apiVersion {}", str_of(&d, "apiVersion"));
            assert!(!str_of(&d, "metadata.name").is_empty());
            (str_of(&d, "kind").to_string(), d)
        })
        .collect()
}

/// A YAML value as JSON (to compare with the renderer's output).
fn json_of(v: &Value) -> serde_json::Value {
    serde_json::to_value(v).unwrap()
}

/// The bootstrap `auto-ai-router render` gives for a manifest's plugin configuration.
fn rendered_for(plugin: &str) -> serde_json::Value {
    let p = auto_ai_router::prepare::prepare(plugin, None, &|n| Some(format!("test-value-{n}")), "config.yaml", "models.yaml")
        .unwrap_or_else(|e| panic!("plugin config: {e}"));
    auto_ai_router::render::render(&p, &auto_ai_router::render::RenderOptions::default())
}

fn rendered_route<'a>(b: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    b.pointer("/static_resources/listeners/0/filter_chains/0/filters/0/typed_config/route_config/virtual_hosts/0/routes")
        .and_then(|r| r.as_array())
        .and_then(|r| r.iter().find(|r| r["name"] == name))
        .unwrap_or_else(|| panic!("no rendered route {name}"))
}

/// The local-file EnvoyFilter: scoped to the router's listener, Gateway, virtual host and route;
/// its routed route, endpoint-less cluster and upstream filter are what the renderer builds for
/// the same plugin configuration (so the manifest can't drift from the tested bootstrap).
#[test]
fn envoyfilter_routes_on_filter_state_in_the_routers_virtual_host_with_retries() {
    let all = kinds("envoy/istio/envoyfilter.yaml");
    let (kind, d) = &all[0];
    assert_eq!(kind, "EnvoyFilter");
    let patches = get(d, "spec.configPatches").as_sequence().unwrap();
    let filter = patches.iter().find(|p| str_of(p, "applyTo") == "HTTP_FILTER").expect("HTTP_FILTER patch");
    assert_eq!(str_of(filter, "patch.operation"), "INSERT_BEFORE");
    // Scoped to the router's listener: the gateway listener port of the Gateway's server (80 on
    // the Service, 8080 in the pod of Istio's default ingress gateway).
    assert_eq!(str_of(filter, "match.context"), "GATEWAY");
    assert_eq!(get(filter, "match.listener.portNumber").as_u64(), Some(8080), "the filter must not go into every HCM of the gateway");
    let cfg = get(filter, "patch.value.typed_config.config");
    assert_eq!(get(cfg, "allow_on_headers_stop_iteration").as_bool(), Some(true));
    assert_eq!(str_of(cfg, "root_id"), "auto_ai_router");
    assert_eq!(str_of(cfg, "vm_config.runtime"), "envoy.wasm.runtime.v8");
    let plugin_text = str_of(cfg, "configuration.value");
    accepts(plugin_text);
    let keys: Vec<&str> =
        get(cfg, "vm_config.environment_variables.host_env_keys").as_sequence().unwrap().iter().filter_map(Value::as_str).collect();
    assert!(keys.contains(&"ROUTER_MASTER_KEY") && keys.contains(&"OPENAI_API_KEY"));
    // Every os.environ/ variable of the plugin configuration is passed to the VM.
    for var in plugin_text.split("os.environ/").skip(1).map(|s| s.split('"').next().unwrap()) {
        assert!(keys.contains(&var), "host_env_keys lacks {var}");
    }
    let plugin: serde_json::Value = serde_json::from_str(plugin_text).unwrap();
    assert_eq!(plugin.pointer("/server/max_provider_retries").and_then(|n| n.as_u64()), Some(2), "retries on");
    let rendered = rendered_for(plugin_text);

    // The credential's cluster: the aggregate over Istio's, with the renderer's upstream filter.
    let clusters: Vec<&Value> = patches.iter().filter(|p| str_of(p, "applyTo") == "CLUSTER").collect();
    let cred = clusters.iter().find(|p| str_of(p, "patch.value.name") == "openai_main").expect("the credential's cluster");
    assert_eq!(str_of(cred, "patch.value.cluster_type.name"), "envoy.clusters.aggregate");
    let up = json_of(get(cred, "patch.value.typed_extension_protocol_options"));
    let up = &up["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]["http_filters"];
    let rendered_cluster =
        rendered["static_resources"]["clusters"].as_array().unwrap().iter().find(|c| c["name"] == "openai_main").unwrap();
    let want =
        &rendered_cluster["typed_extension_protocol_options"]["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]["http_filters"];
    let mut up = up.clone();
    let mut want = want.clone();
    // The module's path and the shared VM/configuration blocks (YAML anchors) are the manifest's own.
    for v in [&mut up, &mut want] {
        let w = &mut v[0]["typed_config"]["extension_config"]["typed_config"]["config"];
        w["vm_config"] = serde_json::Value::Null;
        w["configuration"] = serde_json::Value::Null;
    }
    assert_eq!(up, want, "the upstream filter differs from the rendered one");
    let upstream_cfg = get(cred, "patch.value.typed_extension_protocol_options")
        .get("envoy.extensions.upstreams.http.v3.HttpProtocolOptions")
        .and_then(|o| o.get("http_filters"))
        .map(|f| get(&f[0], "typed_config.extension_config.typed_config.config"))
        .expect("the upstream filter's config");
    for field in ["vm_config", "configuration"] {
        assert_eq!(upstream_cfg.get(field), cfg.get(field), "the upstream filter's {field} is the downstream filter's");
    }
    assert!(clusters.iter().any(|p| str_of(p, "patch.value.name") == "auto_ai_router_no_credential"));

    // The routed route, first in the router's virtual host, is the rendered one.
    let routes: Vec<&Value> = patches.iter().filter(|p| str_of(p, "applyTo") == "HTTP_ROUTE").collect();
    let first = routes.iter().find(|p| str_of(p, "patch.operation") == "INSERT_FIRST").expect("the routed route");
    assert_eq!(str_of(first, "match.routeConfiguration.vhost.name"), "ai.example.com:80", "Istio's name for the Gateway host");
    let ours = json_of(get(first, "patch.value"));
    let want = rendered_route(&rendered, "v1_routed");
    for field in ["match", "request_body_buffer_limit", "response_headers_to_remove"] {
        assert_eq!(ours[field], want[field], "routed route: {field}");
    }
    for field in ["auto_host_rewrite", "timeout", "idle_timeout", "inline_cluster_specifier_plugin", "retry_policy"] {
        assert_eq!(ours["route"][field], want["route"][field], "routed route: route.{field}");
    }
    assert!(ours.pointer("/route/cluster_header").is_none());
    // The VirtualService's route goes to no provider (before routing) and has the body limits.
    let vs_route = routes.iter().find(|p| str_of(p, "patch.operation") == "MERGE").expect("the VirtualService route patch");
    let merged = json_of(get(vs_route, "patch.value"));
    let want = rendered_route(&rendered, "v1");
    assert_eq!(merged["route"]["cluster"], "auto_ai_router_no_credential");
    for field in ["idle_timeout", "timeout"] {
        assert_eq!(merged["route"][field], want["route"][field], "route.{field}");
    }
    assert_eq!(merged["request_body_buffer_limit"], want["request_body_buffer_limit"]);
    assert!(!serde_json::to_string(&json_of(d)).unwrap().contains("cluster_header"), "no route reads a client header");

    let route_name = str_of(vs_route, "match.routeConfiguration.vhost.route.name");
    let vs = kinds("envoy/istio/virtualservice.yaml");
    let (_, v) = vs.iter().find(|(k, _)| k == "VirtualService").expect("VirtualService");
    let hosts: Vec<&str> =
        plugin.pointer("/server/hosts").and_then(|h| h.as_array()).expect("server.hosts").iter().filter_map(|h| h.as_str()).collect();
    let vs_hosts: Vec<&str> = get(v, "spec.hosts").as_sequence().unwrap().iter().filter_map(Value::as_str).collect();
    assert_eq!(hosts, vs_hosts, "the plugin's hosts are the router's VirtualService hosts");
    assert_eq!(str_of(v, "spec.http.0.name"), route_name);
    // The route patches are for the router's own Gateway, which serves only the router's host names.
    let (_, gw) = vs.iter().find(|(k, _)| k == "Gateway").expect("Gateway");
    let gw_name = format!("{}/{}", str_of(gw, "metadata.namespace"), str_of(gw, "metadata.name"));
    for r in &routes {
        assert_eq!(str_of(r, "match.routeConfiguration.gateway"), gw_name);
    }
    assert_eq!(get(gw, "spec.servers.0.port.number").as_u64(), Some(80));
    assert_eq!(format!("{}:80", hosts[0]), str_of(first, "match.routeConfiguration.vhost.name"));
    for (what, hosts) in [("Gateway", get(gw, "spec.servers.0.hosts")), ("VirtualService", get(v, "spec.hosts"))] {
        let hosts: Vec<&str> = hosts.as_sequence().unwrap().iter().filter_map(Value::as_str).collect();
        assert!(
            !hosts.is_empty() && !hosts.iter().any(|h| h.contains('*')),
            "{what} hosts {hosts:?}: a wildcard takes /v1/ from every app"
        );
    }
}

#[test]
fn serviceentry_and_destinationrule_describe_the_https_provider() {
    let all = kinds("envoy/istio/serviceentry.yaml");
    let (_, se) = all.iter().find(|(k, _)| k == "ServiceEntry").expect("ServiceEntry");
    assert_eq!(str_of(se, "spec.hosts.0"), "api.openai.com");
    assert_eq!(str_of(se, "spec.resolution"), "DNS");
    assert_eq!(get(se, "spec.ports.0.number").as_u64(), Some(443));
    let (_, dr) = all.iter().find(|(k, _)| k == "DestinationRule").expect("DestinationRule");
    assert_eq!(str_of(dr, "spec.host"), "api.openai.com");
    assert_eq!(str_of(dr, "spec.trafficPolicy.tls.mode"), "SIMPLE");
}

/// A compose bind mount `host:container[:ro]` (host relative to envoy/).
fn bind_mounts(service: &Value) -> Vec<(String, String)> {
    get(service, "volumes")
        .as_sequence()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .map(|m| {
            let parts: Vec<&str> = m.split(':').collect();
            assert!(parts.len() >= 2 && parts.len() <= 3, "mount {m:?}: expected host:container[:ro]");
            (parts[0].to_string(), parts[1].to_string())
        })
        .collect()
}

/// The file in the repository that `service` sees at `container_path`, through its mounts.
fn mounted_file(service: &Value, container_path: &str) -> PathBuf {
    let (host, inside) = bind_mounts(service)
        .into_iter()
        .filter(|(_, c)| container_path == c || container_path.starts_with(&format!("{c}/")))
        .max_by_key(|(_, c)| c.len())
        .unwrap_or_else(|| panic!("nothing is mounted at {container_path}"));
    let mut path = repo().join("envoy").join(host.trim_start_matches("./"));
    let rest = container_path[inside.len()..].trim_start_matches('/');
    if !rest.is_empty() {
        path.push(rest);
    }
    assert!(path.exists(), "{container_path} is mounted from {}, which is not in the repository", path.display());
    path
}

fn yaml_file(path: &Path) -> Value {
    docs(path).into_iter().next().unwrap_or_else(|| panic!("{}: no YAML document", path.display()))
}

/// docker-compose also runs Prometheus, scraping the router's public /metrics, and Grafana with the
/// datasource and the dashboard provisioned from envoy/grafana/ (the files are checked, not run:
/// no Docker here).
#[test]
fn compose_runs_prometheus_on_router_metrics_and_grafana_with_the_dashboard() {
    let d = &docs("envoy/docker-compose.yml")[0];
    let services = get(d, "services");
    // Pinned images: an exact release, never `latest` (a dashboard is checked against one schema).
    for svc in ["prometheus", "grafana"] {
        let image = str_of(services, &format!("{svc}.image"));
        let (_, tag) = image.rsplit_once(':').unwrap_or_else(|| panic!("{svc}: image {image} has no tag"));
        let version = tag.trim_start_matches('v');
        assert!(
            version.split('.').count() == 3 && version.split('.').all(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_digit())),
            "{svc}: image {image} is not pinned to a release (x.y.z)"
        );
    }
    // Every bind mount of every service comes from the repository (or the wasm build output).
    for (name, svc) in services.as_mapping().unwrap() {
        if svc.get("volumes").is_none() {
            continue;
        }
        for (host, _) in bind_mounts(svc) {
            if host.starts_with("../target/") {
                continue;
            }
            assert!(host.starts_with("./"), "{name:?}: mount {host} is not a path in the repository");
            assert!(repo().join("envoy").join(&host).exists(), "{name:?} mounts {host}, which does not exist");
        }
    }

    // Prometheus: its --config.file is the mounted envoy/docker/prometheus.yml, and that scrapes the
    // router service's public port on /metrics.
    let prometheus = get(services, "prometheus");
    let args: Vec<&str> = get(prometheus, "command").as_sequence().unwrap().iter().filter_map(Value::as_str).collect();
    let config_file = args.iter().find_map(|a| a.strip_prefix("--config.file=")).expect("prometheus --config.file=");
    let prom_path = mounted_file(prometheus, config_file);
    assert!(prom_path.ends_with("envoy/docker/prometheus.yml"), "{}", prom_path.display());
    let prom = yaml_file(&prom_path);
    let router_port = {
        let cfg = yaml_file(&repo().join("envoy/docker/config.yaml"));
        get(&cfg, "server.port").as_u64().unwrap()
    };
    let jobs = get(&prom, "scrape_configs").as_sequence().unwrap();
    let scrapes = |target: &str| {
        jobs.iter().any(|job| {
            let path = job.get("metrics_path").and_then(Value::as_str).unwrap_or("/metrics");
            let targets: Vec<&str> = job
                .get("static_configs")
                .and_then(Value::as_sequence)
                .into_iter()
                .flatten()
                .filter_map(|s| s.get("targets").and_then(Value::as_sequence))
                .flatten()
                .filter_map(Value::as_str)
                .collect();
            path == "/metrics" && targets.contains(&target)
        })
    };
    // Each replica's own /metrics (through the front Envoy the series of both would mix).
    for name in ROUTERS {
        let target = format!("{name}:{router_port}");
        assert!(scrapes(&target), "envoy/docker/prometheus.yml has no job scraping {target}/metrics: {jobs:?}");
    }
    assert!(!args.iter().any(|a| a.starts_with("--web.listen-address")), "Grafana's datasource expects Prometheus on :9090");

    // Grafana: the provisioned datasource is that Prometheus; the dashboard provider loads the
    // mounted envoy/grafana/dashboards/, which holds the dashboard, and the panels use the datasource.
    let grafana = get(services, "grafana");
    let ds_dir = mounted_file(grafana, "/etc/grafana/provisioning/datasources");
    let mut datasources = Vec::new();
    for e in std::fs::read_dir(&ds_dir).unwrap() {
        datasources.extend(get(&yaml_file(&e.unwrap().path()), "datasources").as_sequence().unwrap().clone());
    }
    let ds = datasources.iter().find(|d| str_of(d, "type") == "prometheus").expect("a provisioned prometheus datasource");
    assert_eq!(str_of(ds, "url"), "http://prometheus:9090");
    let ds_uid = str_of(ds, "uid").to_string();
    let providers_dir = mounted_file(grafana, "/etc/grafana/provisioning/dashboards");
    let mut dashboard_dirs = Vec::new();
    for e in std::fs::read_dir(&providers_dir).unwrap() {
        for p in get(&yaml_file(&e.unwrap().path()), "providers").as_sequence().unwrap() {
            assert_eq!(str_of(p, "type"), "file");
            dashboard_dirs.push(mounted_file(grafana, str_of(p, "options.path")));
        }
    }
    let dashboard_path = repo().join("envoy/grafana/dashboards/auto-ai-router.json");
    assert!(dashboard_dirs.iter().any(|d| dashboard_path.starts_with(d)), "no dashboard provider loads {}", dashboard_path.display());
    let home = str_of(grafana, "environment.GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH");
    assert_eq!(mounted_file(grafana, home), dashboard_path);

    let dash: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&dashboard_path).unwrap()).unwrap();
    assert!(dash["schemaVersion"].as_u64().unwrap_or(0) >= 36, "schemaVersion {}", dash["schemaVersion"]);
    assert!(dash["uid"].as_str().is_some_and(|u| !u.is_empty()));
    let var =
        dash["templating"]["list"].as_array().unwrap().iter().find(|v| v["name"] == "DS_PROMETHEUS").expect("a DS_PROMETHEUS variable");
    assert_eq!((var["type"].as_str(), var["query"].as_str()), (Some("datasource"), Some("prometheus")));
    let mut n = 0;
    for p in dash["panels"].as_array().unwrap().iter().filter(|p| p["type"] != "row") {
        let uses = |ds: &serde_json::Value| ds["type"] == "prometheus" && (ds["uid"] == "${DS_PROMETHEUS}" || ds["uid"] == ds_uid.as_str());
        assert!(uses(&p["datasource"]), "panel {:?}: datasource {}", p["title"], p["datasource"]);
        let targets = p["targets"].as_array().unwrap_or_else(|| panic!("panel {:?} has no targets", p["title"]));
        assert!(!targets.is_empty() && targets.iter().all(|t| t["expr"].as_str().is_some_and(|e| !e.is_empty()) && uses(&t["datasource"])));
        n += 1;
    }
    assert!(n >= 10, "only {n} panels");
}

/// An image pinned to a tag that is neither `latest` nor a moving branch.
fn assert_pinned(what: &str, image: &str) {
    let (_, tag) = image.rsplit_once(':').unwrap_or_else(|| panic!("{what}: image {image} has no tag"));
    assert!(!tag.is_empty() && !tag.contains("latest") && tag != "master" && tag != "main", "{what}: image {image} is not pinned");
}

/// The `environment` of a compose service as (name, value) strings (map or `NAME=value` list).
fn compose_env(service: &Value) -> Vec<(String, String)> {
    match get(service, "environment") {
        Value::Mapping(m) => m
            .iter()
            .map(|(k, v)| {
                let v = match v {
                    Value::String(s) => s.clone(),
                    other => serde_yaml::to_string(other).unwrap().trim().to_string(),
                };
                (k.as_str().unwrap().to_string(), v)
            })
            .collect(),
        Value::Sequence(l) => {
            l.iter().filter_map(Value::as_str).filter_map(|e| e.split_once('=')).map(|(k, v)| (k.into(), v.into())).collect()
        }
        other => panic!("environment is neither a map nor a list: {other:?}"),
    }
}

fn env_of<'a>(env: &'a [(String, String)], name: &str) -> &'a str {
    env.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str()).unwrap_or_else(|| panic!("no {name} in {env:?}"))
}

/// Global limits in docker-compose (issue 14): a front Envoy round-robins over two identical router
/// replicas, which share envoyproxy/ratelimit over Redis. (Docker is not available here: the files
/// are checked, and the front bootstrap passes `envoy --mode validate`.)
#[test]
fn compose_runs_two_replicas_behind_a_front_envoy_with_ratelimit_and_redis() {
    let d = &docs("envoy/docker-compose.yml")[0];
    let services = get(d, "services");
    for svc in ["front", "router-1", "router-2", "ratelimit", "redis"] {
        assert!(services.get(svc).is_some(), "docker-compose has no {svc} service");
    }
    assert!(services.get("router").is_none(), "the single router service was replaced by router-1/router-2 behind front");
    for svc in ["ratelimit", "redis"] {
        assert_pinned(svc, str_of(services, &format!("{svc}.image")));
    }
    assert!(str_of(services, "ratelimit.image").starts_with("envoyproxy/ratelimit:"));
    assert!(str_of(services, "redis.image").starts_with("redis:"));

    // The replicas are the same service but for the name: image, module, bootstrap, environment.
    let (r1, r2) = (get(services, "router-1"), get(services, "router-2"));
    assert_eq!(r1, r2, "router-1 and router-2 differ");
    assert!(r1.get("ports").is_none(), "the replicas are reached through front, not published");
    let deps: Vec<&str> = get(r1, "depends_on").as_sequence().unwrap().iter().filter_map(Value::as_str).collect();
    assert!(deps.contains(&"ratelimit"), "{deps:?}");

    // ratelimit: Redis over TCP, the STOP flag, the config mounted where RUNTIME_ROOT/RUNTIME_SUBDIRECTORY
    // point, with the router's domain.
    let rl = get(services, "ratelimit");
    let env = compose_env(rl);
    assert_eq!(env_of(&env, "REDIS_SOCKET_TYPE"), "tcp");
    let redis_url = env_of(&env, "REDIS_URL");
    assert_eq!(redis_url.split(':').next(), Some("redis"), "REDIS_URL {redis_url} is the redis service");
    assert_eq!(env_of(&env, "STOP_CACHE_KEY_INCREMENT_WHEN_OVERLIMIT"), "true");
    assert_eq!(env_of(&env, "USE_STATSD"), "false");
    assert_eq!(env_of(&env, "RUNTIME_WATCH_ROOT"), "false");
    let grpc_port = env_of(&env, "GRPC_PORT").to_string();
    let config_path = format!("{}/{}/config/config.yaml", env_of(&env, "RUNTIME_ROOT"), env_of(&env, "RUNTIME_SUBDIRECTORY"));
    let rl_config_path = mounted_file(rl, &config_path);
    assert!(rl_config_path.ends_with("envoy/docker/ratelimit/config.yaml"), "{}", rl_config_path.display());
    let rl_config = yaml_file(&rl_config_path);
    assert_eq!(str_of(&rl_config, "domain"), "auto-ai-router");
    assert!(get(&rl_config, "descriptors").as_sequence().is_some_and(|d| d.is_empty()), "limits come from the router's overrides");

    // The routers' config points at that service and domain.
    let cfg = yaml_file(&repo().join("envoy/docker/config.yaml"));
    assert_eq!(str_of(&cfg, "global_limits.service"), format!("ratelimit:{grpc_port}"));
    assert_eq!(str_of(&cfg, "global_limits.domain"), str_of(&rl_config, "domain"));
    assert_eq!(get(&cfg, "global_limits.replicas").as_u64(), Some(ROUTERS.len() as u64));
    let router_port = get(&cfg, "server.port").as_u64().unwrap();

    // front: its own bootstrap, round robin over both replicas on the router's port, published.
    let front = get(services, "front");
    let args: Vec<&str> = get(front, "command").as_sequence().unwrap().iter().filter_map(Value::as_str).collect();
    let c_at = args.iter().position(|a| *a == "-c").expect("front: envoy -c");
    let boot_path = mounted_file(front, args[c_at + 1]);
    assert!(boot_path.ends_with("envoy/docker/front-envoy.yaml"), "{}", boot_path.display());
    let boot = yaml_file(&boot_path);
    let clusters = get(&boot, "static_resources.clusters").as_sequence().unwrap();
    assert_eq!(clusters.len(), 1);
    let cl = &clusters[0];
    assert_eq!((str_of(cl, "type"), str_of(cl, "lb_policy")), ("STRICT_DNS", "ROUND_ROBIN"));
    let endpoints: Vec<(String, u64)> = get(cl, "load_assignment.endpoints.0.lb_endpoints")
        .as_sequence()
        .unwrap()
        .iter()
        .map(|e| {
            (
                str_of(e, "endpoint.address.socket_address.address").to_string(),
                get(e, "endpoint.address.socket_address.port_value").as_u64().unwrap(),
            )
        })
        .collect();
    let want: Vec<(String, u64)> = ROUTERS.iter().map(|r| (r.to_string(), router_port)).collect();
    assert_eq!(endpoints, want);
    let listener = get(&boot, "static_resources.listeners.0");
    let front_port = get(listener, "address.socket_address.port_value").as_u64().unwrap();
    let ports: Vec<&str> = get(front, "ports").as_sequence().unwrap().iter().filter_map(Value::as_str).collect();
    assert!(ports.iter().any(|p| p.ends_with(&format!(":{front_port}"))), "front publishes {ports:?}, listens on {front_port}");
    let route = get(listener, "filter_chains.0.filters.0.typed_config.route_config.virtual_hosts.0.routes.0.route");
    assert_eq!(str_of(route, "cluster"), str_of(cl, "name"));

    let envoy = locate::find_envoy().unwrap_or_else(|e| panic!("{e}"));
    let o = Command::new(envoy).args(["--mode", "validate", "-c", boot_path.to_str().unwrap(), "-l", "warning"]).output().unwrap();
    let log = format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert!(o.status.success() && log.contains("OK"), "envoy --mode validate front-envoy.yaml:\n{log}");
}

/// Istio: the gateway's HTTP/2 cluster `auto_ai_router_rls` reaches the ratelimit Service of
/// ratelimit.yaml, which runs envoyproxy/ratelimit over Redis with the router's domain, and the
/// plugin configuration's `global_limits.service` is that address.
#[test]
fn istio_adds_the_rls_cluster_for_the_ratelimit_service() {
    let all = kinds("envoy/istio/envoyfilter.yaml");
    let patches = get(&all[0].1, "spec.configPatches").as_sequence().unwrap();
    let rls: Vec<&Value> =
        patches.iter().filter(|p| str_of(p, "applyTo") == "CLUSTER" && str_of(p, "patch.value.name") == "auto_ai_router_rls").collect();
    assert_eq!(rls.len(), 1, "one CLUSTER patch named auto_ai_router_rls (the name the filter dispatches to)");
    let p = rls[0];
    assert_eq!((str_of(p, "match.context"), str_of(p, "patch.operation")), ("GATEWAY", "ADD"));
    let c = get(p, "patch.value");
    assert_eq!(str_of(c, "type"), "STRICT_DNS");
    assert_eq!(str_of(c, "load_assignment.cluster_name"), "auto_ai_router_rls");
    let opts = get(c, "typed_extension_protocol_options")
        .get("envoy.extensions.upstreams.http.v3.HttpProtocolOptions")
        .expect("HttpProtocolOptions");
    assert_eq!(str_of(opts, "@type"), "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions");
    assert!(get(opts, "explicit_http_config.http2_protocol_options").is_mapping(), "gRPC needs HTTP/2 (else status 14 protocol error)");
    let sock = get(c, "load_assignment.endpoints.0.lb_endpoints.0.endpoint.address.socket_address");
    let target = format!("{}:{}", str_of(sock, "address"), get(sock, "port_value").as_u64().unwrap());

    // The Service and Deployment behind it.
    let objs = k8s_objects("envoy/istio/ratelimit.yaml");
    let find = |kind: &str, name: &str| -> &Value {
        &objs.iter().find(|(k, d)| k == kind && str_of(d, "metadata.name") == name).unwrap_or_else(|| panic!("no {kind} {name}")).1
    };
    let svc = find("Service", "ratelimit");
    let grpc = get(svc, "spec.ports").as_sequence().unwrap().iter().find(|p| str_of(p, "name") == "grpc-port").expect("grpc-port");
    let expect = format!("ratelimit.{}.svc.cluster.local:{}", str_of(svc, "metadata.namespace"), get(grpc, "port").as_u64().unwrap());
    assert_eq!(target, expect, "the cluster points at the ratelimit Service");
    let dep = find("Deployment", "ratelimit");
    let ctr = get(dep, "spec.template.spec.containers.0");
    assert_pinned("ratelimit Deployment", str_of(ctr, "image"));
    assert!(str_of(ctr, "image").starts_with("envoyproxy/ratelimit:"));
    let env: Vec<(String, String)> =
        get(ctr, "env").as_sequence().unwrap().iter().map(|e| (str_of(e, "name").to_string(), str_of(e, "value").to_string())).collect();
    assert_eq!(env_of(&env, "STOP_CACHE_KEY_INCREMENT_WHEN_OVERLIMIT"), "true");
    assert_eq!(env_of(&env, "REDIS_SOCKET_TYPE"), "tcp");
    assert_eq!(env_of(&env, "GRPC_PORT"), get(grpc, "targetPort").as_u64().unwrap().to_string());
    let redis_host = env_of(&env, "REDIS_URL").split(':').next().unwrap().to_string();
    let redis_dep = find("Deployment", &redis_host);
    assert_pinned("redis Deployment", str_of(redis_dep, "spec.template.spec.containers.0.image"));
    find("Service", &redis_host);
    // The ConfigMap with the domain, mounted at RUNTIME_ROOT/RUNTIME_SUBDIRECTORY/config.
    let mount_path = format!("{}/{}/config", env_of(&env, "RUNTIME_ROOT"), env_of(&env, "RUNTIME_SUBDIRECTORY"));
    let mount =
        get(ctr, "volumeMounts").as_sequence().unwrap().iter().find(|m| str_of(m, "mountPath") == mount_path).expect("config mount");
    let vol =
        get(dep, "spec.template.spec.volumes").as_sequence().unwrap().iter().find(|v| str_of(v, "name") == str_of(mount, "name")).unwrap();
    let cm = find("ConfigMap", str_of(vol, "configMap.name"));
    let rl_config: Value =
        serde_yaml::from_str(get(cm, "data").get("config.yaml").and_then(Value::as_str).expect("data.config.yaml")).unwrap();
    assert_eq!(str_of(&rl_config, "domain"), "auto-ai-router");

    // The plugin configuration names that service and domain.
    let filter = patches.iter().find(|p| str_of(p, "applyTo") == "HTTP_FILTER").unwrap();
    let plugin: serde_json::Value = serde_json::from_str(str_of(filter, "patch.value.typed_config.config.configuration.value")).unwrap();
    assert_eq!(plugin.pointer("/global_limits/service").and_then(|s| s.as_str()), Some(target.as_str()));
    assert_eq!(plugin.pointer("/global_limits/domain").and_then(|s| s.as_str()), Some("auto-ai-router"));
}
