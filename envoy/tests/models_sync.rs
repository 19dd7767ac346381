//! `auto-ai-router models sync` against in-process mock providers on loopback: merging two lists
//! into a models.yaml that keeps its entries and comments, unreachable and 401 credentials reported
//! without aborting the others, exit statuses, re-runs that add nothing, `--dry-run`.

use e2e::mock::{BackgroundMock, Settings};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const CLI: &str = env!("CARGO_BIN_EXE_auto-ai-router");
const KEY_A: &str = "sk-sync-a-0123456789";
const KEY_B: &str = "sk-sync-b-0123456789";
const WRONG_KEY: &str = "sk-wrong-9876543210";

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("auto-ai-router-sync-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn mock(name: &str, key: &str, models: &[&str]) -> BackgroundMock {
    let s = Settings {
        name: name.into(),
        keys: vec![key.into()],
        models: models.iter().map(|m| m.to_string()).collect(),
        ..Settings::default()
    };
    BackgroundMock::start(s, 0).expect("start mock")
}

/// A loopback URL nothing listens on (bound, then released).
fn refused_url() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    drop(l);
    format!("http://127.0.0.1:{port}")
}

/// config.yaml with credential `a` (key from os.environ/SYNC_KEY_A) and `b` (literal key).
fn write_config(dir: &Path, a_url: &str, b_url: &str, b_key: &str, default_rpm: i64) -> PathBuf {
    let text = format!(
        "server:\n  port: 8080\n  master_key: os.environ/SYNC_TEST_MASTER_KEY_UNSET\n  default_models_rpm: {default_rpm}\n\
         credentials:\n\
         \x20 - name: a\n    type: openai\n    api_key: os.environ/SYNC_KEY_A\n    base_url: {a_url}\n    rpm: 60\n\
         \x20 - name: b\n    type: openai\n    api_key: \"{b_key}\"\n    base_url: {b_url}/v1\n    rpm: -1\n\
         fail2ban:\n  max_attempts: 3\n  ban_duration: 5m\n  error_codes: [401, 429, 500]\n"
    );
    let p = dir.join("config.yaml");
    std::fs::write(&p, text).unwrap();
    p
}

fn sync(config: &Path, extra: &[&str]) -> Output {
    let mut c = Command::new(CLI);
    c.args(["models", "sync", "--config", config.to_str().unwrap()]).args(extra);
    c.env("SYNC_KEY_A", KEY_A).env_remove("SYNC_TEST_MASTER_KEY_UNSET");
    for v in ["ALL_PROXY", "all_proxy", "HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"] {
        c.env_remove(v);
    }
    c.output().expect("run auto-ai-router")
}

fn text(o: &Output) -> (String, String) {
    (String::from_utf8_lossy(&o.stdout).into_owned(), String::from_utf8_lossy(&o.stderr).into_owned())
}

fn entries(path: &Path) -> Vec<(String, Option<i64>)> {
    filter::config::parse_models_yaml(&std::fs::read_to_string(path).unwrap())
        .unwrap()
        .into_iter()
        .map(|m| (m.name, m.rpm.and_then(|v| v.as_i64())))
        .collect()
}

fn no_secret(out: &str, err: &str) {
    for k in [KEY_A, KEY_B, WRONG_KEY] {
        assert!(!out.contains(k) && !err.contains(k), "a key leaked:\n{out}\n{err}");
    }
}

const EXISTING: &str = "\
# Limits for our gateway.
models:
  # the expensive one
  - name: gpt-4   # keep at 10
    rpm: 10
# end of list
";

#[test]
fn merges_two_providers_keeping_entries_and_comments_then_adds_nothing() {
    let a = mock("a", KEY_A, &["gpt-4", "gpt-3.5"]);
    let b = mock("b", KEY_B, &["gpt-4", "claude-3"]);
    let dir = scratch("merge");
    let cfg = write_config(&dir, &a.url(), &b.url(), KEY_B, 40);
    let models = dir.join("models.yaml");
    std::fs::write(&models, EXISTING).unwrap();

    let o = sync(&cfg, &[]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}\n{err}");
    no_secret(&out, &err);
    assert!(out.contains("added gpt-3.5 (rpm 40) from a"), "{out}");
    assert!(out.contains("added claude-3 (rpm 40) from b"), "{out}");
    assert!(!out.contains("added gpt-4 "), "{out}");
    assert!(out.contains("a: 2 model(s) listed") && out.contains("b: 2 model(s) listed"), "{out}");

    let written = std::fs::read_to_string(&models).unwrap();
    assert!(written.starts_with(EXISTING), "existing text kept byte for byte:\n{written}");
    assert_eq!(entries(&models), vec![("gpt-4".into(), Some(10)), ("gpt-3.5".into(), Some(40)), ("claude-3".into(), Some(40))]);
    // The key went in the Authorization header, and the path kept b's base path.
    assert_eq!(a.mock.stats().by_key.get(KEY_A), Some(&1), "{:?}", a.mock.stats().by_key);
    assert_eq!(b.mock.stats().by_path.get("/v1/models"), Some(&1), "{:?}", b.mock.stats().by_path);
    let leftovers: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(leftovers.len(), 2, "no temporary file left: {leftovers:?}");

    // Again: nothing to add, the file is untouched.
    let o = sync(&cfg, &[]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}\n{err}");
    assert!(!out.contains("added"), "{out}");
    assert!(out.contains("nothing changed"), "{out}");
    assert_eq!(std::fs::read_to_string(&models).unwrap(), written);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn an_unreachable_credential_is_reported_and_the_other_still_counts() {
    let a = mock("a", KEY_A, &["gpt-4", "gpt-3.5"]);
    let dir = scratch("down");
    let down = refused_url();
    let cfg = write_config(&dir, &a.url(), &down, KEY_B, -1);
    let models = dir.join("models.yaml");

    let o = sync(&cfg, &[]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "one credential answered → exit 0\n{out}\n{err}");
    no_secret(&out, &err);
    assert!(err.contains(&format!("credential b: GET {down}/v1/models failed")), "{err}");
    assert!(out.contains("added gpt-4 (rpm -1) from a") && out.contains("added gpt-3.5 (rpm -1) from a"), "{out}");
    // Created beside config.yaml, with the header comment.
    let written = std::fs::read_to_string(&models).unwrap();
    assert!(written.starts_with(auto_ai_router::sync::HEADER), "{written}");
    assert_eq!(entries(&models), vec![("gpt-4".into(), Some(-1)), ("gpt-3.5".into(), Some(-1))]);

    // Every credential down: exit 2, nothing written.
    let cfg = write_config(&dir, &refused_url(), &down, KEY_B, -1);
    let o = sync(&cfg, &[]);
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(2), "{out}\n{err}");
    assert!(err.contains("credential a:") && err.contains("credential b:"), "{err}");
    assert!(err.contains("no credential answered"), "{err}");
    assert_eq!(std::fs::read_to_string(&models).unwrap(), written);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_wrong_key_is_reported_without_the_key() {
    let a = mock("a", KEY_A, &["gpt-4"]);
    let b = mock("b", KEY_B, &["claude-3"]);
    let dir = scratch("401");
    let cfg = write_config(&dir, &a.url(), &b.url(), WRONG_KEY, 50);
    let models = dir.join("models.yaml");
    std::fs::write(&models, "models: []   # filled by sync\n").unwrap();

    let o = sync(&cfg, &[]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}\n{err}");
    no_secret(&out, &err);
    assert!(err.contains("credential b: GET") && err.contains("HTTP 401"), "{err}");
    assert!(out.contains("added gpt-4 (rpm 50) from a") && !out.contains("claude-3"), "{out}");
    assert_eq!(b.mock.stats().unauthorized, 1);
    assert_eq!(std::fs::read_to_string(&models).unwrap(), "models: # filled by sync\n  - name: gpt-4\n    rpm: 50\n");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_slow_provider_times_out() {
    let a = mock("a", KEY_A, &["gpt-4"]);
    let b = mock("b", KEY_B, &["claude-3"]);
    b.mock.set_settings(Settings { delay_ms: 4000, ..b.mock.settings() });
    let dir = scratch("timeout");
    let cfg = write_config(&dir, &a.url(), &b.url(), KEY_B, 50);
    let t = std::time::Instant::now();
    let o = sync(&cfg, &["--timeout", "1"]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}\n{err}");
    assert!(t.elapsed() < std::time::Duration::from_secs(4), "{:?}", t.elapsed());
    assert!(err.contains("credential b:") && err.to_lowercase().contains("timeout"), "{err}");
    assert!(out.contains("added gpt-4"), "{out}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn dry_run_and_explicit_models_path() {
    let a = mock("a", KEY_A, &["gpt-4", "o1"]);
    let b = mock("b", KEY_B, &[]);
    let dir = scratch("dry");
    let cfg = write_config(&dir, &a.url(), &b.url(), KEY_B, 50);
    let elsewhere = dir.join("limits.yaml");
    std::fs::write(&elsewhere, "models:\n- name: o1\n  rpm: 3\n").unwrap();

    let o = sync(&cfg, &["--models", elsewhere.to_str().unwrap(), "--dry-run"]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}\n{err}");
    assert!(out.contains("would add gpt-4 (rpm 50) from a") && !out.contains("o1 ("), "{out}");
    assert!(out.contains("b: 0 model(s) listed"), "{out}");
    assert_eq!(std::fs::read_to_string(&elsewhere).unwrap(), "models:\n- name: o1\n  rpm: 3\n");
    assert!(!dir.join("models.yaml").exists());

    let o = sync(&cfg, &["--models", elsewhere.to_str().unwrap()]);
    assert!(o.status.success());
    assert_eq!(std::fs::read_to_string(&elsewhere).unwrap(), "models:\n- name: o1\n  rpm: 3\n- name: gpt-4\n  rpm: 50\n");
    assert!(!dir.join("models.yaml").exists());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn config_errors_exit_1_before_any_request() {
    let a = mock("a", KEY_A, &["gpt-4"]);
    let dir = scratch("cfgerr");
    let cfg = write_config(&dir, &a.url(), &a.url(), KEY_B, 50);

    // The credential's os.environ/ variable is not set: the usual config error, naming it.
    let o = Command::new(CLI).args(["models", "sync", "--config", cfg.to_str().unwrap()]).env_remove("SYNC_KEY_A").output().unwrap();
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(1), "{out}\n{err}");
    assert!(err.contains("credentials[0] (a): api_key") && err.contains("SYNC_KEY_A"), "{err}");

    // A models.yaml that does not parse is not touched.
    let models = dir.join("models.yaml");
    std::fs::write(&models, "models:\n  - nme: typo\n").unwrap();
    let o = sync(&cfg, &[]);
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("models.yaml"), "{err}");
    assert_eq!(std::fs::read_to_string(&models).unwrap(), "models:\n  - nme: typo\n");
    assert_eq!(a.mock.stats().total, 0, "no request made");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A one-shot https provider on loopback with a certificate from a throwaway CA: serves
/// `connections` TLS connections, answering a model list, and hands back each request head.
fn tls_provider(connections: usize) -> (String, String, std::sync::mpsc::Receiver<String>) {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
    use rustls::pki_types::PrivateKeyDer;
    use std::io::{Read, Write};
    use std::sync::Arc;

    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let leaf_key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap().signed_by(&leaf_key, &*ca).unwrap();
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![leaf.der().clone()], PrivateKeyDer::Pkcs8(leaf_key.serialize_der().into()))
        .unwrap();
    let config = Arc::new(config);

    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("https://127.0.0.1:{}", listener.local_addr().unwrap().port());
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for _ in 0..connections {
            let Ok((tcp, _)) = listener.accept() else { return };
            tcp.set_read_timeout(Some(std::time::Duration::from_secs(5))).unwrap();
            let conn = rustls::ServerConnection::new(config.clone()).unwrap();
            let mut tls = rustls::StreamOwned::new(conn, tcp);
            let mut head = Vec::new();
            let mut buf = [0u8; 1024];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                match tls.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => head.extend_from_slice(&buf[..n]),
                }
            }
            if head.is_empty() {
                continue; // the client refused the handshake
            }
            let body = r#"{"object":"list","data":[{"id":"tls-model","object":"model","created":1,"owned_by":"t"}]}"#;
            let resp = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = tls.write_all(resp.as_bytes());
            tls.conn.send_close_notify();
            let _ = tls.flush();
            let _ = tx.send(String::from_utf8_lossy(&head).into_owned());
        }
    });
    (url, ca.pem(), rx)
}

#[test]
fn https_provider_is_verified_against_the_ca_bundle() {
    let (url, ca_pem, heads) = tls_provider(2);
    let b = mock("b", KEY_B, &[]);
    let dir = scratch("tls");
    let cfg = write_config(&dir, &url, &b.url(), KEY_B, 50);
    let ca = dir.join("ca.pem");
    std::fs::write(&ca, ca_pem).unwrap();

    // Unknown issuer without the bundle (the built-in roots do not know our CA).
    let o = sync(&cfg, &["--timeout", "5"]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}\n{err}");
    assert!(err.contains(&format!("credential a: GET {url}/v1/models failed")), "{err}");
    assert!(!out.contains("tls-model"), "{out}");

    let o = sync(&cfg, &["--timeout", "5", "--ca-bundle", ca.to_str().unwrap()]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}\n{err}");
    assert!(out.contains("added tls-model (rpm 50) from a"), "{out}\n{err}");
    let head = heads.recv_timeout(std::time::Duration::from_secs(5)).expect("the request reached the TLS server");
    assert!(head.starts_with("GET /v1/models HTTP/1.1\r\n"), "{head}");
    assert!(head.to_ascii_lowercase().contains(&format!("authorization: bearer {}", KEY_A.to_ascii_lowercase())), "{head}");
    assert_eq!(entries(&dir.join("models.yaml")), vec![("tls-model".into(), Some(50))]);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A provider that answers one request with a 401 whose message echoes the whole key after a long
/// prefix (the key straddles the 200-character cut of the shown message).
fn echoing_provider(key: &'static str) -> (String, std::thread::JoinHandle<()>) {
    use std::io::{Read, Write};
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    let t = std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        s.set_read_timeout(Some(std::time::Duration::from_secs(10))).unwrap();
        let mut req = Vec::new();
        let mut buf = [0u8; 4096];
        while !req.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = s.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            req.extend_from_slice(&buf[..n]);
        }
        let msg = format!("{} Incorrect API key provided: {key}.", "The provider says: no.".repeat(7));
        let body = serde_json::json!({"error": {"message": msg, "type": "invalid_request_error"}}).to_string();
        let resp = format!(
            "HTTP/1.1 401 Unauthorized\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
        s.write_all(resp.as_bytes()).unwrap();
    });
    (url, t)
}

#[test]
fn a_long_key_echoed_after_a_long_message_is_redacted_before_the_message_is_cut() {
    const LONG_KEY: &str = "sk-proj-Zq8vT1mN4bR7kL2pX9cW5hJ3yF6gD0sA8eU1iO4tQ7wE2rY5uI9oP3aS6dF0gH";
    let (url, provider) = echoing_provider(LONG_KEY);
    let dir = scratch("echo");
    let cfg = dir.join("config.yaml");
    std::fs::write(
        &cfg,
        format!("server: {{master_key: k}}\ncredentials:\n  - name: echo\n    api_key: \"{LONG_KEY}\"\n    base_url: {url}\n"),
    )
    .unwrap();
    let o = sync(&cfg, &["--dry-run"]);
    provider.join().unwrap();
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(2), "no credential answered\n{out}\n{err}");
    let shown = format!("{out}{err}");
    assert!(shown.contains("HTTP 401: The provider says"), "{shown}");
    // Nothing of the key beyond the mask's first 7 characters.
    for w in LONG_KEY.as_bytes().windows(8) {
        let part = std::str::from_utf8(w).unwrap();
        assert!(!shown.contains(part), "{part:?} of the key is shown:\n{shown}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
