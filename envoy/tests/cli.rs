//! CLI tests: rendered bootstraps pass `envoy --mode validate`, hold no secret, and `validate`
//! rejects bad configs with messages that name the key, the credential and the value.
//!
//! Needs Envoy (`make venv`, or ENVOY_BIN) and `filter.wasm` (`make wasm`): Envoy's validate mode
//! loads the module and the filter checks its configuration there too.

use auto_ai_router::locate;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const CLI: &str = env!("CARGO_BIN_EXE_auto-ai-router");

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

fn examples() -> PathBuf {
    repo().join("envoy/examples")
}

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("auto-ai-router-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn envoy() -> PathBuf {
    locate::find_envoy().unwrap_or_else(|e| panic!("{e}"))
}

fn wasm() -> PathBuf {
    let w = locate::find_wasm(None).unwrap_or_else(|e| panic!("{e}"));
    assert!(w.is_file(), "{} missing: run `make wasm`", w.display());
    w
}

fn cli(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut c = Command::new(CLI);
    c.args(args);
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().expect("run auto-ai-router")
}

fn text(o: &Output) -> (String, String) {
    (String::from_utf8_lossy(&o.stdout).into_owned(), String::from_utf8_lossy(&o.stderr).into_owned())
}

/// Renders `config` into `dir/envoy.yaml` (and `dir/secrets.env`) with the real filter.wasm.
fn render(config: &Path, dir: &Path, extra: &[&str], env: &[(&str, &str)]) -> (String, String) {
    let out = dir.join("envoy.yaml");
    let env_file = dir.join("secrets.env");
    let w = wasm();
    let mut args = vec![
        "render",
        "--config",
        config.to_str().unwrap(),
        "--wasm",
        w.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--env-file",
        env_file.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let o = cli(&args, env);
    let (_, err) = text(&o);
    assert!(o.status.success(), "render {} failed: {err}", config.display());
    (std::fs::read_to_string(&out).unwrap(), err)
}

/// `envoy --mode validate` with the given environment (the filter's on_configure runs too).
fn envoy_validate(bootstrap: &Path, env: &[(&str, &str)]) -> (bool, String) {
    let mut c = Command::new(envoy());
    c.args(["--mode", "validate", "-c", bootstrap.to_str().unwrap(), "--disable-hot-restart", "-l", "warning"]);
    c.env_clear();
    for (k, v) in env {
        c.env(k, v);
    }
    let o = c.output().expect("run envoy");
    let (out, err) = text(&o);
    (o.status.success() && out.contains("OK"), format!("{out}{err}"))
}

/// The rendered bootstrap as data (its `#` header lines are YAML comments).
fn data(yaml: &str) -> serde_json::Value {
    serde_yaml::from_str(yaml).unwrap_or_else(|e| panic!("the bootstrap is not YAML: {e}"))
}

fn at<'a>(v: &'a serde_json::Value, pointer: &str) -> &'a serde_json::Value {
    v.pointer(pointer).unwrap_or_else(|| panic!("no {pointer} in the bootstrap"))
}

const HCM: &str = "/static_resources/listeners/0/filter_chains/0/filters/0/typed_config";

/// The route named `name` of the router's listener.
fn route<'a>(b: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    at(b, &format!("{HCM}/route_config/virtual_hosts/0/routes"))
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == name)
        .unwrap_or_else(|| panic!("no route {name}"))
}

/// Clusters by name.
fn cluster<'a>(b: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    at(b, "/static_resources/clusters")
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no cluster {name}"))
}

const EXAMPLE_SECRETS: [(&str, &str); 3] = [
    ("AUTO_AI_ROUTER_MASTER_KEY", "sk-your-secret-key"),
    ("AUTO_AI_ROUTER_MOCK_A_API_KEY", "sk-mock-a-key"),
    ("AUTO_AI_ROUTER_MOCK_B_API_KEY", "sk-mock-b-key"),
];

const PROVIDER_SECRETS: [(&str, &str); 4] = [
    ("ROUTER_MASTER_KEY", "sk-router-secret-master-0001"),
    ("OPENAI_API_KEY", "sk-proj-secret-openai-0002"),
    ("OPENAI_BACKUP_API_KEY", "sk-proj-secret-backup-0003"),
    ("VLLM_API_KEY", "vllm-secret-0004"),
];

#[test]
fn example_config_renders_a_bootstrap_envoy_accepts() {
    let dir = scratch("example");
    let (yaml, err) = render(&examples().join("config.yaml"), &dir, &[], &[]);
    // Literal keys in config.yaml are moved to variables, named (never shown) on stderr.
    for (name, value) in EXAMPLE_SECRETS {
        assert!(err.contains(name), "stderr should name {name}: {err}");
        assert!(!err.contains(value), "stderr shows a secret: {err}");
        assert!(!yaml.contains(value), "the bootstrap contains the secret {value}");
        assert!(yaml.contains(&format!("os.environ/{name}")), "plugin config should reference {name}");
    }
    // The env file has them, private.
    let env_file = std::fs::read_to_string(dir.join("secrets.env")).unwrap();
    assert!(env_file.contains("AUTO_AI_ROUTER_MASTER_KEY=sk-your-secret-key"));
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(dir.join("secrets.env")).unwrap().permissions().mode() & 0o777, 0o600);
    let b = data(&yaml);
    let wasm = at(&b, &format!("{HCM}/http_filters/0/typed_config/config"));
    assert_eq!(wasm["allow_on_headers_stop_iteration"], true);
    assert_eq!(wasm["failure_policy"], "FAIL_RELOAD");
    assert_eq!(wasm["root_id"], "auto_ai_router");
    assert_eq!(at(wasm, "/vm_config/vm_id"), "auto_ai_router");
    assert_eq!(at(wasm, "/vm_config/runtime"), "envoy.wasm.runtime.v8");
    assert_eq!(at(wasm, "/configuration/@type"), "type.googleapis.com/google.protobuf.StringValue");
    // models.yaml beside config.yaml was merged into the plugin configuration.
    let plugin: serde_json::Value = serde_json::from_str(at(wasm, "/configuration/value").as_str().unwrap()).unwrap();
    let models = plugin["models"].as_array().expect("plugin models");
    assert!(models.contains(&serde_json::json!({"name": "text-embedding-3-small", "rpm": -1})), "{models:?}");
    // The routed route's own timeout: the example's request_timeout (5m); SSE streams have no idle
    // limit once routed, a stalled upload has the body idle limit, the listener keeps its 300 s.
    assert_eq!(route(&b, "v1_routed")["route"]["timeout"], "300s");
    assert_eq!(route(&b, "v1_routed")["route"]["idle_timeout"], "0s");
    assert_eq!(route(&b, "v1")["route"]["idle_timeout"], "60s");
    // The default max_provider_retries (2): the route follows the filter's per-attempt choice.
    assert_eq!(at(route(&b, "v1_routed"), "/route/retry_policy/num_retries"), 2);
    assert_eq!(route(&b, "metrics")["route"]["prefix_rewrite"], "/stats/prometheus");
    assert_eq!(at(&b, &format!("{HCM}/stream_idle_timeout")), "300s");
    assert_eq!(at(&b, &format!("{HCM}/request_headers_timeout")), "10s");
    assert_eq!(at(&b, "/static_resources/listeners/0/enable_reuse_port"), false);
    assert!(at(&b, "/stats_config/stats_tags").as_array().unwrap().iter().any(|t| t["tag_name"] == "credential"));
    for c in ["mock_a", "mock_b"] {
        assert_eq!(cluster(&b, c)["type"], "STATIC");
    }
    let env: Vec<(&str, &str)> = EXAMPLE_SECRETS.to_vec();
    let (ok, log) = envoy_validate(&dir.join("envoy.yaml"), &env);
    assert!(ok, "envoy --mode validate rejected the example bootstrap:\n{log}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Both retry layouts pass `envoy --mode validate` with the real filter: retries on (the default:
/// retry policy on the routed route, the upstream filter in every credential cluster) and
/// `max_provider_retries: 0` (nothing retry-related); both route on the filter state.
#[test]
fn retry_on_and_off_bootstraps_are_accepted_by_envoy() {
    let example = std::fs::read_to_string(examples().join("config.yaml")).unwrap();
    assert!(!example.contains("max_provider_retries"), "the example relies on the default");
    let env: Vec<(&str, &str)> = EXAMPLE_SECRETS.to_vec();
    for (name, extra) in [("retries-on", "  max_provider_retries: 3\n"), ("retries-off", "  max_provider_retries: 0\n")] {
        let dir = scratch(name);
        let cfg = dir.join("config.yaml");
        std::fs::write(&cfg, example.replacen("server:\n", &format!("server:\n{extra}"), 1)).unwrap();
        let (yaml, _) = render(&cfg, &dir, &[], &[]);
        let b = data(&yaml);
        let v1 = route(&b, "v1");
        let routed = route(&b, "v1_routed");
        let clusters = at(&b, "/static_resources/clusters").as_array().unwrap();
        let upstream_filters = clusters
            .iter()
            .filter(|c| {
                c.pointer("/typed_extension_protocol_options/envoy.extensions.upstreams.http.v3.HttpProtocolOptions/http_filters").is_some()
            })
            .count();
        assert!(at(routed, "/route/inline_cluster_specifier_plugin").is_object());
        assert_eq!(at(v1, "/route/cluster"), "auto_ai_router_no_credential", "unrouted /v1/ reaches no provider");
        assert!(clusters.iter().any(|c| c["name"] == "auto_ai_router_no_credential"));
        assert!(!yaml.contains("cluster_header"));
        if name == "retries-on" {
            assert_eq!(at(routed, "/route/retry_policy/num_retries"), 3);
            assert_eq!(upstream_filters, 2, "mock_a and mock_b run the upstream filter");
        } else {
            assert!(routed.pointer("/route/retry_policy").is_none());
            assert_eq!(upstream_filters, 0);
            assert!(!yaml.contains("upstream_codec") && !yaml.contains("retry_policy"));
        }
        let (ok, log) = envoy_validate(&dir.join("envoy.yaml"), &env);
        assert!(ok, "envoy --mode validate rejected the {name} bootstrap:\n{log}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}

#[test]
fn https_providers_with_env_keys_render_tls_clusters_envoy_accepts() {
    let dir = scratch("providers");
    let env: Vec<(&str, &str)> = PROVIDER_SECRETS.to_vec();
    // Even with the variables set where the CLI runs, their values never reach the file.
    let (yaml, err) = render(&examples().join("providers/config.yaml"), &dir, &["--listen", "127.0.0.1:18999"], &env);
    for (name, value) in PROVIDER_SECRETS {
        assert!(!yaml.contains(value), "bootstrap contains {name}'s value");
        assert!(!err.contains(value), "stderr shows {name}'s value");
        assert!(yaml.contains(&format!("- {name}\n")), "host_env_keys lacks {name}");
    }
    let b = data(&yaml);
    // request_timeout: -1 → no route timeout ("0s" on the route itself).
    assert_eq!(route(&b, "v1")["route"]["timeout"], "0s");
    assert_eq!(
        at(&b, "/static_resources/listeners/0/address/socket_address"),
        &serde_json::json!({"address": "127.0.0.1", "port_value": 18999})
    );
    let tls_clusters: Vec<&serde_json::Value> =
        at(&b, "/static_resources/clusters").as_array().unwrap().iter().filter(|c| c.get("transport_socket").is_some()).collect();
    let snis: Vec<&str> = tls_clusters.iter().map(|c| at(c, "/transport_socket/typed_config/sni").as_str().unwrap()).collect();
    assert!(snis.contains(&"api.openai.com") && snis.contains(&"api.another.com"), "{snis:?}");
    for c in &tls_clusters {
        assert_eq!(c["type"], "LOGICAL_DNS");
        assert_eq!(at(c, "/transport_socket/name"), "envoy.transport_sockets.tls");
        assert!(c
            .pointer("/typed_extension_protocol_options/envoy.extensions.upstreams.http.v3.HttpProtocolOptions/auto_config")
            .is_some());
    }
    // The IP-addressed http credential gets a STATIC cluster without TLS.
    let vllm = cluster(&b, "local-vllm");
    assert_eq!(vllm["type"], "STATIC");
    assert!(vllm.get("transport_socket").is_none());
    assert_eq!(at(vllm, "/load_assignment/endpoints/0/lb_endpoints/0/endpoint/address/socket_address/port_value"), 8000);
    let (ok, log) = envoy_validate(&dir.join("envoy.yaml"), &env);
    assert!(ok, "envoy --mode validate rejected the providers bootstrap:\n{log}");
    // Without the variables the filter refuses its configuration, so Envoy does too.
    let (ok, _) = envoy_validate(&dir.join("envoy.yaml"), &[]);
    assert!(!ok, "Envoy accepted a bootstrap whose key variables are unset");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn validate_accepts_examples() {
    for cfg in ["config.yaml", "providers/config.yaml"] {
        let p = examples().join(cfg);
        let o = cli(&["validate", "--config", p.to_str().unwrap()], &[]);
        let (out, err) = text(&o);
        assert!(o.status.success(), "{cfg}: {err}");
        assert!(out.contains("OK"), "{out}");
    }
    // --strict-env needs the os.environ/ variables.
    let p = examples().join("providers/config.yaml");
    let o = cli(&["validate", "--strict-env", "--config", p.to_str().unwrap()], &[]);
    let (_, err) = text(&o);
    assert!(!o.status.success());
    assert!(err.contains("ROUTER_MASTER_KEY"), "{err}");
    let env: Vec<(&str, &str)> = PROVIDER_SECRETS.to_vec();
    assert!(cli(&["validate", "--strict-env", "--config", p.to_str().unwrap()], &env).status.success());
}

/// Each file in tests/bad/ starts with `# expect: <substring of the error>`.
#[test]
fn validate_rejects_bad_configs_with_the_right_message() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/bad");
    let mut n = 0;
    let mut entries: Vec<_> = std::fs::read_dir(&dir).unwrap().flatten().map(|e| e.path()).collect();
    entries.sort();
    for path in entries {
        if path.extension().and_then(|e| e.to_str()) != Some("yaml") || path.file_name().unwrap().to_str().unwrap().starts_with("models") {
            continue;
        }
        let body = std::fs::read_to_string(&path).unwrap();
        let expect: Vec<&str> = body.lines().filter_map(|l| l.strip_prefix("# expect: ")).collect();
        assert!(!expect.is_empty(), "{} has no `# expect:` line", path.display());
        let mut args = vec!["validate", "--config", path.to_str().unwrap()];
        let models_arg;
        if let Some(m) = body.lines().find_map(|l| l.strip_prefix("# models: ")) {
            models_arg = dir.join(m).display().to_string();
            args.extend(["--models", models_arg.as_str()]);
        }
        let o = cli(&args, &[]);
        let (_, err) = text(&o);
        assert_eq!(o.status.code(), Some(1), "{} should fail validation, stderr: {err}", path.display());
        for e in expect {
            assert!(err.contains(e), "{}: expected {e:?} in: {err}", path.display());
        }
        assert!(!err.contains("sk-secret-do-not-show"), "{}: error shows a key: {err}", path.display());
        n += 1;
    }
    assert!(n >= 8, "only {n} bad configs");
}

#[test]
fn models_yaml_is_found_beside_config_or_given() {
    let dir = scratch("models");
    std::fs::copy(examples().join("config.yaml"), dir.join("config.yaml")).unwrap();
    std::fs::write(dir.join("models.yaml"), "models:\n  - name: m1\n    rpm: 0\n  - name: m1\n").unwrap();
    let cfg = dir.join("config.yaml");
    let o = cli(&["validate", "--config", cfg.to_str().unwrap()], &[]);
    let (_, err) = text(&o);
    assert!(!o.status.success() && err.contains("duplicate name \"m1\""), "beside: {err}");
    std::fs::write(dir.join("other.yaml"), "models:\n  - name: m1\n    rpm: 7\n").unwrap();
    let other = dir.join("other.yaml");
    let o = cli(&["validate", "--config", cfg.to_str().unwrap(), "--models", other.to_str().unwrap()], &[]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert!(out.contains("1 model limit(s)"), "{out}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn run_explains_missing_envoy_and_missing_variables() {
    let p = examples().join("providers/config.yaml");
    let o = cli(&["run", "--config", p.to_str().unwrap()], &[]);
    let (_, err) = text(&o);
    assert!(!o.status.success());
    assert!(err.contains("ROUTER_MASTER_KEY") && err.contains("not set"), "{err}");

    let p = examples().join("config.yaml");
    let w = wasm();
    let o = cli(&["run", "--config", p.to_str().unwrap(), "--wasm", w.to_str().unwrap()], &[("ENVOY_BIN", "/nonexistent/envoy")]);
    let (_, err) = text(&o);
    assert!(!o.status.success());
    assert!(err.contains("ENVOY_BIN=/nonexistent/envoy does not exist"), "{err}");
}

#[test]
fn logging_level_becomes_envoy_component_log_level() {
    let dir = scratch("loglevel");
    let cfg = dir.join("config.yaml");
    std::fs::write(
        &cfg,
        "server: {master_key: k, logging_level: debug}\ncredentials: [{name: a, api_key: x, base_url: 'http://127.0.0.1:1'}]\n",
    )
    .unwrap();
    let (yaml, err) = render(&cfg, &dir, &[], &[]);
    assert!(err.contains("--component-log-level wasm:debug"), "{err}");
    assert!(yaml.contains("--component-log-level wasm:debug"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn render_env_file_is_private_even_when_it_existed() {
    use std::os::unix::fs::PermissionsExt;
    let dir = scratch("envfile");
    let env_file = dir.join("secrets.env");
    std::fs::write(&env_file, "OLD=readable-by-all\n").unwrap();
    std::fs::set_permissions(&env_file, std::fs::Permissions::from_mode(0o644)).unwrap();
    render(&examples().join("config.yaml"), &dir, &[], &[]);
    assert_eq!(std::fs::metadata(&env_file).unwrap().permissions().mode() & 0o777, 0o600, "an existing env file kept its mode");
    let body = std::fs::read_to_string(&env_file).unwrap();
    assert!(body.contains("AUTO_AI_ROUTER_MASTER_KEY=sk-your-secret-key") && !body.contains("OLD="), "{body}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// `run` renders into a fresh private directory: a stand-in Envoy (ENVOY_BIN) records where its
/// bootstrap is and that directory's mode.
#[test]
fn run_uses_a_private_unpredictable_directory_and_removes_it() {
    use std::os::unix::fs::PermissionsExt;
    let dir = scratch("rundir");
    let tmp = dir.join("tmp");
    std::fs::create_dir(&tmp).unwrap();
    let record = dir.join("record");
    let fake = dir.join("envoy");
    std::fs::write(
        &fake,
        format!(
            "#!/bin/sh\n# -c BOOTSTRAP ...\nd=$(dirname \"$2\")\n{{ echo \"$d\"; stat -c %a \"$d\"; ls \"$d\"; }} > '{}'\n",
            record.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
    let cfg = examples().join("config.yaml");
    let mut c = Command::new(CLI);
    // Any existing file does as the module: the stand-in does not load it.
    c.args(["run", "--config", cfg.to_str().unwrap(), "--wasm", cfg.to_str().unwrap()]).env("ENVOY_BIN", &fake).env("TMPDIR", &tmp);
    let child = c.stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped()).spawn().unwrap();
    let pid = child.id();
    let o = child.wait_with_output().unwrap();
    let (_, err) = text(&o);
    assert!(o.status.success(), "{err}");
    let rec = std::fs::read_to_string(&record).unwrap_or_else(|e| panic!("the stand-in Envoy did not run ({e}): {err}"));
    let lines: Vec<&str> = rec.lines().collect();
    let used = Path::new(lines[0]);
    assert!(used.starts_with(&tmp), "{rec}");
    assert_ne!(used, tmp.join(format!("auto-ai-router-{pid}")), "a guessable directory name");
    let name = used.file_name().unwrap().to_str().unwrap();
    assert!(name.starts_with("auto-ai-router-") && name.len() == "auto-ai-router-".len() + 6, "{name}");
    assert_eq!(lines[1], "700", "the run directory is not private: {rec}");
    assert!(lines[2..].contains(&"envoy.yaml"), "{rec}");
    assert!(!used.exists(), "{} is left behind", used.display());
    let _ = std::fs::remove_dir_all(&dir);
}

/// The start command `render --env-file` prints works as printed: a POSIX shell runs it, and the
/// Envoy it starts (a stand-in here) gets the bootstrap and every variable the bootstrap names.
#[test]
fn render_prints_a_start_command_that_works_as_printed() {
    use std::os::unix::fs::PermissionsExt;
    let dir = scratch("start-command");
    let secret = "sk-literal-start-cmd-'quoted $x'";
    let cfg = dir.join("config.yaml");
    std::fs::write(
        &cfg,
        format!("server:\n  master_key: \"mk-start-0123456789\"\ncredentials:\n  - name: a\n    api_key: \"{secret}\"\n    base_url: \"http://127.0.0.1:9\"\n"),
    )
    .unwrap();
    let (out, env_file) = (dir.join("envoy.yaml"), dir.join("secrets.env"));
    let o = cli(
        &[
            "render",
            "--config",
            cfg.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--env-file",
            env_file.to_str().unwrap(),
            "--wasm",
            wasm().to_str().unwrap(),
        ],
        &[],
    );
    let (_, err) = text(&o);
    assert!(o.status.success(), "{err}");
    let start = err.lines().find_map(|l| l.strip_prefix("Start: ")).unwrap_or_else(|| panic!("no start command: {err}"));
    assert!(start.contains(env_file.to_str().unwrap()), "names the env file: {start}");
    // A stand-in `envoy` first on PATH records its arguments and environment.
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let record = dir.join("record");
    std::fs::write(bin.join("envoy"), format!("#!/bin/sh\necho \"ARGS $*\" > '{}'\nenv >> '{}'\n", record.display(), record.display()))
        .unwrap();
    std::fs::set_permissions(bin.join("envoy"), std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap_or_default());
    let ran = Command::new("sh").arg("-c").arg(start).current_dir("/").env("PATH", path).output().unwrap();
    assert!(ran.status.success(), "{}", String::from_utf8_lossy(&ran.stderr));
    let rec = std::fs::read_to_string(&record).unwrap();
    assert!(rec.contains(&format!("ARGS -c {}", out.display())), "{rec}");
    let bootstrap = std::fs::read_to_string(&out).unwrap();
    for var in bootstrap.split("os.environ/").skip(1).map(|s| s.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).next().unwrap()) {
        let line = rec.lines().find(|l| l.starts_with(&format!("{var}="))).unwrap_or_else(|| panic!("{var} not in Envoy's environment"));
        assert!(!line.ends_with('='), "{var} is empty");
    }
    assert!(rec.contains(&format!("={secret}")), "the literal key arrives intact, quotes and $ included");
    // Without --env-file, render names what Envoy will need before it starts.
    let o = cli(&["render", "--config", cfg.to_str().unwrap(), "--out", out.to_str().unwrap(), "--wasm", wasm().to_str().unwrap()], &[]);
    let (_, err) = text(&o);
    assert!(err.contains("Envoy's environment must have") && err.contains("AUTO_AI_ROUTER_"), "{err}");
    assert!(err.contains("render --env-file"), "{err}");
    assert!(!err.contains(secret), "never the value");
}
