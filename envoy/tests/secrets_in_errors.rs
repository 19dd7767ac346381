//! The CLI's error messages never show a configured secret: bad configurations that hold secrets
//! (master_key, api_key literal or not a string, keys in a base_url's user-info or query) are
//! refused by `validate`, `render` and `models sync` with an exit status that is not 0 and no
//! secret, not even 8 characters of one, on stdout or stderr.
//!
//! Needs neither Envoy nor filter.wasm: every configuration here fails before they are used. All
//! URLs point at 127.0.0.1, so even a configuration that wrongly passed would not leave the host.

use std::path::{Path, PathBuf};
use std::process::Command;

const CLI: &str = env!("CARGO_BIN_EXE_auto-ai-router");

const MASTER: &str = "sk-Qz81mWv0PpLx3Rt7";
const KEY: &str = "sk-Hn4cJ0yTb9EeKd2V";
const USERINFO: &str = "Uf6sAq0ZlM3wXo8Nj";
const QUERY: &str = "Yp2rGk7vDc5hTs1Bw";
const NUMBER: &str = "98765432109876";
const ENV_KEY: &str = "sk-Env5tRw2Lm9cVb7Qa";
const SECRETS: [&str; 6] = [MASTER, KEY, USERINFO, QUERY, NUMBER, ENV_KEY];

struct Scratch(PathBuf);

impl Scratch {
    fn new(test: &str) -> Scratch {
        let d = std::env::temp_dir().join(format!("auto-ai-router-secrets-{}-{test}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        Scratch(d)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn config(server: &str, credential: &str) -> String {
    format!(
        "server: {{{server}}}\ncredentials:\n  - {{name: good, api_key: \"{KEY}\", base_url: 'http://127.0.0.1:1/v1'}}\n  - {{name: bad, {credential}}}\n"
    )
}

/// Each case: a name, config.yaml, models.yaml (if any), and a piece of the expected message.
fn cases() -> Vec<(&'static str, String, Option<String>, &'static str)> {
    let master = format!("master_key: \"{MASTER}\"");
    let key = format!("api_key: \"{KEY}\"");
    vec![
        (
            "user-info",
            config(&master, &format!("{key}, base_url: 'http://user:{USERINFO}@127.0.0.1:1/v1'")),
            None,
            "credentials[1] (bad): base_url: \"http://***@127.0.0.1:1/v1\"",
        ),
        (
            "query",
            config(&master, &format!("{key}, base_url: 'http://127.0.0.1:1/v1?api-key={QUERY}'")),
            None,
            "credentials[1] (bad): base_url: \"http://127.0.0.1:1/v1?***\"",
        ),
        (
            "user-info-and-fragment-on-a-bad-host",
            config(&master, &format!("{key}, base_url: 'http://u:{USERINFO}@::1/#{QUERY}'")),
            None,
            "credentials[1] (bad): base_url",
        ),
        (
            "integer-api-key",
            config(&master, &format!("api_key: {NUMBER}, base_url: 'http://127.0.0.1:1'")),
            None,
            "api_key must be a string",
        ),
        ("list-api-key", config(&master, &format!("api_key: [{KEY}], base_url: 'http://127.0.0.1:1'")), None, "api_key must be a string"),
        (
            "integer-master-key",
            config(&format!("master_key: {NUMBER}"), &format!("{key}, base_url: 'http://127.0.0.1:1'")),
            None,
            "master_key must be a string",
        ),
        (
            "bad-rpm-beside-literal-secrets",
            config(&master, &format!("{key}, base_url: 'http://127.0.0.1:1', rpm: 0")),
            None,
            "credentials[1] (bad): rpm: 0 is invalid",
        ),
        (
            "body-cap-beside-literal-secrets",
            config(&format!("{master}, max_body_size_mb: 4096"), &format!("{key}, base_url: 'http://127.0.0.1:1'")),
            None,
            "server.max_body_size_mb: 4096 is invalid",
        ),
        (
            "models-yaml-name-too-long",
            config(&master, &format!("{key}, base_url: 'http://127.0.0.1:1'")),
            Some(format!("models:\n  - name: {}\n", "m".repeat(300))),
            "a name of 300 bytes is invalid",
        ),
    ]
}

fn assert_no_secret(what: &str, out: &str) {
    for s in SECRETS {
        for w in s.as_bytes().windows(8) {
            let w = std::str::from_utf8(w).unwrap();
            assert!(!out.contains(w), "{what}: {w:?} (of a secret) in the output:\n{out}");
        }
    }
}

fn run(args: &[&str], env: &[(&str, &str)]) -> (bool, String) {
    let mut c = Command::new(CLI);
    c.args(args).env_remove("SECRETS_TEST_UNSET");
    for (k, v) in env {
        c.env(k, v);
    }
    let o = c.output().expect("run auto-ai-router");
    let text = format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    (o.status.success(), text)
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p.display().to_string()
}

#[test]
fn bad_configs_are_refused_without_showing_a_secret() {
    let scratch = Scratch::new("bad");
    for (name, cfg, models, expect) in cases() {
        let dir = scratch.0.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let config = write(&dir, "config.yaml", &cfg);
        let models = models.map(|m| write(&dir, "models.yaml", &m));
        let mut source = vec!["--config", config.as_str()];
        if let Some(m) = &models {
            source.extend(["--models", m.as_str()]);
        }
        let out = dir.join("envoy.yaml").display().to_string();
        let cat = |head: &[&str], tail: &[&str]| -> Vec<String> { head.iter().chain(&source).chain(tail).map(|s| s.to_string()).collect() };
        let commands = [
            cat(&["validate"], &[]),
            cat(&["validate", "--strict-env"], &[]),
            cat(&["render"], &["--wasm", "/nonexistent/filter.wasm", "--out", &out]),
            cat(&["models", "sync", "--dry-run", "--timeout", "1"], &[]),
        ];
        for args in commands {
            let what = format!("{name}: {}", args.join(" "));
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let (ok, text) = run(&args, &[]);
            assert!(!ok, "{what}: exit status 0:\n{text}");
            assert!(text.contains(expect), "{what}: expected {expect:?} in:\n{text}");
            assert_no_secret(&what, &text);
        }
        assert!(!dir.join("envoy.yaml").exists(), "{name}: render wrote a bootstrap");
    }
}

/// `--strict-env` names the unset variable; the literal secrets and the environment's values
/// beside it stay out of the message.
#[test]
fn strict_env_names_the_variable_not_the_secrets() {
    let scratch = Scratch::new("strict");
    let dir = scratch.0.join("strict-env");
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = format!(
        "server: {{master_key: \"{MASTER}\"}}\ncredentials:\n  - {{name: a, api_key: os.environ/SECRETS_TEST_SET, base_url: 'http://127.0.0.1:1'}}\n  - {{name: b, api_key: os.environ/SECRETS_TEST_UNSET, base_url: 'http://127.0.0.1:1'}}\n"
    );
    let config = write(&dir, "config.yaml", &cfg);
    let (ok, text) = run(&["validate", "--strict-env", "--config", &config], &[("SECRETS_TEST_SET", ENV_KEY)]);
    assert!(!ok, "exit status 0:\n{text}");
    assert!(text.contains("credentials[1] (b): api_key: environment variable SECRETS_TEST_UNSET"), "{text}");
    assert_no_secret("validate --strict-env", &text);
    // Without --strict-env the same file validates, and its summary shows no secret either.
    let (ok, text) = run(&["validate", "--config", &config], &[("SECRETS_TEST_SET", ENV_KEY)]);
    assert!(ok, "{text}");
    assert_no_secret("validate", &text);
}
