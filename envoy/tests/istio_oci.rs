//! envoy/istio/oci/: the router installed from the OCI image `make oci` builds. The manifests
//! parse, the ECDS extension config pulls `oci://…/auto-ai-router:<workspace version>` (the tag
//! `make oci` writes) with `allow_on_headers_stop_iteration: true` and the same filter config as
//! envoy/istio/envoyfilter.yaml except the code source, and the plugin configuration passes the
//! filter's own validation. (Istio is not available here: this is the manifests' shape only.)

use filter::config;
use serde_yaml::Value;

const WASM_TYPE: &str = "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm";

mod common;
use common::{docs, get, repo, str_of};

fn envoyfilter(rel: &str) -> Value {
    let all = docs(rel);
    assert_eq!(all.len(), 1, "{rel}: one document");
    assert_eq!(str_of(&all[0], "kind"), "EnvoyFilter", "{rel}");
    all.into_iter().next().unwrap()
}

fn patch<'a>(ef: &'a Value, apply_to: &str) -> (usize, &'a Value) {
    let patches = get(ef, "spec.configPatches").as_sequence().unwrap();
    let mut found = patches.iter().enumerate().filter(|(_, p)| str_of(p, "applyTo") == apply_to);
    let one = found.next().unwrap_or_else(|| panic!("no {apply_to} patch"));
    assert!(found.next().is_none(), "two {apply_to} patches");
    one
}

/// Every patch of one kind, in order (CLUSTER: the credentials' and auto_ai_router_rls).
fn patches<'a>(ef: &'a Value, apply_to: &str) -> Vec<&'a Value> {
    get(ef, "spec.configPatches").as_sequence().unwrap().iter().filter(|p| str_of(p, "applyTo") == apply_to).collect()
}

/// The Wasm PluginConfig without its code source and with retries off, which is all that may
/// differ (retries need the upstream filter, which can't come over ECDS: see the manifest).
fn without_code(cfg: &Value) -> Value {
    let mut c = cfg.clone();
    c.get_mut("vm_config").and_then(Value::as_mapping_mut).expect("vm_config").remove("code").expect("vm_config.code");
    let plugin = str_of(&c, "configuration.value").to_string();
    let mut json: serde_json::Value = serde_json::from_str(&plugin).expect("plugin configuration JSON");
    json["server"]["max_provider_retries"] = serde_json::json!(0);
    c["configuration"]["value"] = Value::String(json.to_string());
    c
}

/// The reference's cluster and route patches without what only retries need.
fn without_retries(patches: Vec<&Value>) -> Vec<Value> {
    patches
        .into_iter()
        .map(|p| {
            let mut p = p.clone();
            if let Some(v) = p.get_mut("patch").and_then(|x| x.get_mut("value")).and_then(Value::as_mapping_mut) {
                v.remove("response_headers_to_remove");
                let aggregate =
                    v.get("cluster_type").and_then(|c| c.get("name")).and_then(Value::as_str) == Some("envoy.clusters.aggregate");
                if aggregate {
                    v.remove("typed_extension_protocol_options");
                    v.remove("circuit_breakers");
                }
                if let Some(r) = v.get_mut("route").and_then(Value::as_mapping_mut) {
                    r.remove("retry_policy");
                }
            }
            p
        })
        .collect()
}

#[test]
fn oci_manifests_parse_and_none_is_a_wasmplugin() {
    let dir = repo().join("envoy/istio/oci");
    let mut n = 0;
    for e in std::fs::read_dir(&dir).unwrap() {
        let path = e.unwrap().path();
        if path.extension().and_then(|x| x.to_str()) != Some("yaml") {
            continue;
        }
        for d in docs(&path) {
            assert!(str_of(&d, "apiVersion").contains("istio.io/"), "{}", path.display());
            assert!(!str_of(&d, "metadata.name").is_empty());
            assert_ne!(str_of(&d, "kind"), "WasmPlugin", "{}: a WasmPlugin cannot carry allow_on_headers_stop_iteration", path.display());
            n += 1;
        }
    }
    assert!(n >= 1, "no manifests in {}", dir.display());
}

#[test]
fn ecds_config_pulls_the_oci_image_with_the_reference_filter_config() {
    let ef = envoyfilter("envoy/istio/oci/envoyfilter.yaml");
    let reference = envoyfilter("envoy/istio/envoyfilter.yaml");
    // Same name and namespace: applying one replaces the other, never both filters at once.
    for key in ["metadata", "spec.workloadSelector"] {
        assert_eq!(get(&ef, key), get(&reference, key), "{key} differs from envoy/istio/envoyfilter.yaml");
    }

    let (ext_at, ext) = patch(&ef, "EXTENSION_CONFIG");
    assert_eq!(str_of(ext, "patch.operation"), "ADD");
    assert_eq!(str_of(ext, "match.context"), "GATEWAY");
    assert_eq!(str_of(ext, "patch.value.typed_config.@type"), WASM_TYPE);
    let cfg = get(ext, "patch.value.typed_config.config");
    assert_eq!(get(cfg, "allow_on_headers_stop_iteration").as_bool(), Some(true), "the router pauses request headers to read the body");
    let code = get(cfg, "vm_config.code").as_mapping().unwrap();
    assert!(code.get("local").is_none(), "the module comes from the image, not a file");
    let remote = get(cfg, "vm_config.code.remote");
    let url = format!("oci://registry.example.com/auto-ai-router:{}", env!("CARGO_PKG_VERSION"));
    assert_eq!(str_of(remote, "http_uri.uri"), url, "the image and tag `make oci` writes (tools/oci-image: IMAGE_NAME, DEFAULT_TAG)");
    assert!(
        !str_of(remote, "http_uri.cluster").is_empty() && !str_of(remote, "http_uri.timeout").is_empty(),
        "Envoy's HttpUri requires both"
    );
    let sha = str_of(remote, "sha256");
    assert!(
        sha == "nil" || (sha.len() == 64 && sha.bytes().all(|c| c.is_ascii_hexdigit())),
        "sha256 {sha:?}: Istio's `nil` or a manifest digest"
    );

    // Everything but the code source is the reference filter's config: the same plugin
    // configuration, env keys, root id, runtime and failure policy.
    let (_, ref_filter) = patch(&reference, "HTTP_FILTER");
    let ref_cfg = get(ref_filter, "patch.value.typed_config.config");
    assert_eq!(without_code(cfg), without_code(ref_cfg), "the ECDS config drifted from envoy/istio/envoyfilter.yaml");
    let plugin = str_of(cfg, "configuration.value");
    let raw = config::parse_raw(plugin).unwrap_or_else(|e| panic!("plugin config: {e}"));
    config::validate(&raw, &|n: &str| Some(format!("test-value-{n}"))).unwrap_or_else(|e| panic!("plugin config: {e}"));
    let keys: Vec<&str> =
        get(cfg, "vm_config.environment_variables.host_env_keys").as_sequence().unwrap().iter().filter_map(Value::as_str).collect();
    for var in plugin.split("os.environ/").skip(1).map(|s| s.split('"').next().unwrap()) {
        assert!(keys.contains(&var), "host_env_keys lacks {var}");
    }

    // The HTTP filter takes that resource by name over ADS, at the reference filter's place.
    let (filter_at, filter) = patch(&ef, "HTTP_FILTER");
    assert!(ext_at < filter_at, "the EXTENSION_CONFIG patch must come before the HTTP_FILTER that uses it");
    assert_eq!(str_of(filter, "patch.operation"), "INSERT_BEFORE");
    assert_eq!(get(filter, "match"), get(ref_filter, "match"), "same listener (port 8080) and position as the reference");
    assert_eq!(str_of(filter, "patch.value.name"), str_of(ext, "patch.value.name"), "config_discovery names the ECDS resource");
    assert!(get(filter, "patch.value").get("typed_config").is_none(), "the config comes from ECDS only");
    let discovery = get(filter, "patch.value.config_discovery");
    assert!(get(discovery, "config_source.ads").is_mapping());
    assert_eq!(str_of(discovery, "config_source.initial_fetch_timeout"), "0s", "wait for the pulled module rather than serve without it");
    let types: Vec<&str> = get(discovery, "type_urls").as_sequence().unwrap().iter().filter_map(Value::as_str).collect();
    assert_eq!(types, [WASM_TYPE]);

    // Clusters and routes are the reference's, without what retries need.
    for apply_to in ["CLUSTER", "HTTP_ROUTE"] {
        let ours: Vec<Value> = patches(&ef, apply_to).into_iter().cloned().collect();
        assert_eq!(ours, without_retries(patches(&reference, apply_to)), "{apply_to} patches differ from envoy/istio/envoyfilter.yaml");
    }
    assert_eq!(patches(&ef, "CLUSTER").len(), 3, "openai_main, auto_ai_router_no_credential and auto_ai_router_rls");
    assert_eq!(get(&ef, "spec.configPatches").as_sequence().unwrap().len(), 7);
    let text = std::fs::read_to_string(repo().join("envoy/istio/oci/envoyfilter.yaml")).unwrap();
    assert!(!text.contains("upstream_codec") && !text.contains("retry_policy"), "retries are off in the OCI variant");
}

#[test]
fn readme_walks_through_make_oci_to_the_manifest() {
    let readme = std::fs::read_to_string(repo().join("envoy/README.md")).unwrap();
    for needle in ["make oci", "envoy/istio/oci/envoyfilter.yaml", "application/vnd.oci.image.layer.v1.tar+gzip", "make test-oci"] {
        assert!(readme.contains(needle), "envoy/README.md does not mention {needle:?}");
    }
}
