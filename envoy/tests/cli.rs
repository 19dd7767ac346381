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
    // models.yaml beside config.yaml was merged in.
    assert!(yaml.contains(r#"{\"name\":\"text-embedding-3-small\",\"rpm\":-1}"#) || yaml.contains(r#""name":"text-embedding-3-small","rpm":-1"#), "{yaml}");
    for needle in [
        "allow_on_headers_stop_iteration: true",
        "failure_policy: FAIL_RELOAD",
        "runtime: envoy.wasm.runtime.v8",
        "type.googleapis.com/google.protobuf.StringValue",
        "cluster_header: x-auto-ai-router-cluster",
        "prefix_rewrite: /stats/prometheus",
        "root_id: auto_ai_router",
        "vm_id: auto_ai_router",
        "timeout: 300s",
        "stream_idle_timeout: 0s",
        "tag_name: credential",
        "name: mock_a",
        "name: mock_b",
    ] {
        assert!(yaml.contains(needle), "bootstrap lacks {needle:?}");
    }
    let env: Vec<(&str, &str)> = EXAMPLE_SECRETS.to_vec();
    let (ok, log) = envoy_validate(&dir.join("envoy.yaml"), &env);
    assert!(ok, "envoy --mode validate rejected the example bootstrap:\n{log}");
    let _ = std::fs::remove_dir_all(&dir);
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
    for needle in [
        "envoy.transport_sockets.tls",
        "sni: api.openai.com",
        "sni: api.another.com",
        "type: LOGICAL_DNS",
        "auto_config:",
        "timeout: 0s", // request_timeout: -1
        "port_value: 18999",
        "address: 127.0.0.1",
    ] {
        assert!(yaml.contains(needle), "bootstrap lacks {needle:?}");
    }
    // The IP-addressed http credential gets a STATIC cluster without TLS.
    assert!(yaml.contains("type: STATIC"));
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
    let o = cli(
        &["run", "--config", p.to_str().unwrap(), "--wasm", w.to_str().unwrap()],
        &[("ENVOY_BIN", "/nonexistent/envoy")],
    );
    let (_, err) = text(&o);
    assert!(!o.status.success());
    assert!(err.contains("ENVOY_BIN=/nonexistent/envoy does not exist"), "{err}");
}

#[test]
fn logging_level_becomes_envoy_component_log_level() {
    let dir = scratch("loglevel");
    let cfg = dir.join("config.yaml");
    std::fs::write(&cfg, "server: {master_key: k, logging_level: debug}\ncredentials: [{name: a, api_key: x, base_url: 'http://127.0.0.1:1'}]\n").unwrap();
    let (yaml, err) = render(&cfg, &dir, &[], &[]);
    assert!(err.contains("--component-log-level wasm:debug"), "{err}");
    assert!(yaml.contains("--component-log-level wasm:debug"));
    let _ = std::fs::remove_dir_all(&dir);
}
