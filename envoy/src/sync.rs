//! `auto-ai-router models sync`: ask every credential's provider for its `GET /v1/models` list and
//! append the models `models.yaml` does not list yet, with `rpm: <default_models_rpm>`.
//!
//! The file is edited as text (existing entries, their order and their comments stay as they are),
//! the result is checked to parse to the old entries followed by the new ones, and it is written
//! atomically (a temporary file in the same directory, then a rename).

use filter::config::{self, Config, Credential, RawModel, Scheme, ENV_PREFIX};
use filter::models_index::{parse_provider_list, ModelEntry};
use std::collections::HashSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound on a provider's `/v1/models` body.
const MAX_BODY: u64 = 16 << 20;

/// Written at the top of a `models.yaml` that sync creates.
pub const HEADER: &str = "\
# Per-model limits for auto-ai-router: rpm = requests per minute for the model across all
# credentials, -1 = unlimited. Models not listed here get server.default_models_rpm.
# `auto-ai-router models sync` appends the models your providers list; edit the limits freely.
";

#[derive(Debug, Clone)]
pub struct SyncOptions {
    pub config: PathBuf,
    /// Default: `models.yaml` beside `config`.
    pub models: Option<PathBuf>,
    pub dry_run: bool,
    pub timeout: Duration,
    /// PEM roots for https providers (default: the Mozilla roots built in).
    pub ca_bundle: Option<PathBuf>,
}

/// One credential's answer.
#[derive(Debug, Clone)]
pub struct Fetch {
    pub credential: String,
    pub url: String,
    /// The listed model ids, or why there are none (never contains the key).
    pub outcome: Result<Vec<String>, String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewModel {
    pub name: String,
    pub rpm: i64,
    /// The first credential (in config order) that listed it.
    pub from: String,
}

#[derive(Debug)]
pub struct Report {
    pub models_path: PathBuf,
    /// The file did not exist (sync creates it, with `HEADER`).
    pub created: bool,
    pub fetches: Vec<Fetch>,
    pub added: Vec<NewModel>,
    /// Distinct models the providers listed.
    pub listed: usize,
    pub written: bool,
}

impl Report {
    pub fn all_failed(&self) -> bool {
        !self.fetches.is_empty() && self.fetches.iter().all(|f| f.outcome.is_err())
    }

    /// What the CLI prints: per-credential results and additions on `out`, failures on `err`.
    pub fn print(&self, dry_run: bool, out: &mut dyn Write, err: &mut dyn Write) -> std::io::Result<()> {
        let file = self.models_path.display();
        for f in &self.fetches {
            match &f.outcome {
                Ok(models) => writeln!(out, "{}: {} model(s) listed", f.credential, models.len())?,
                Err(e) => writeln!(err, "warning: credential {}: GET {} failed: {e}", f.credential, f.url)?,
            }
        }
        let verb = if dry_run { "would add" } else { "added" };
        for m in &self.added {
            writeln!(out, "{verb} {} (rpm {}) from {}", m.name, m.rpm, m.from)?;
        }
        let ok = self.fetches.iter().filter(|f| f.outcome.is_ok()).count();
        if self.all_failed() {
            writeln!(err, "error: no credential answered (0 of {}); {file} unchanged", self.fetches.len())?;
        } else if self.added.is_empty() {
            writeln!(
                out,
                "{file}: nothing changed ({} model(s) listed by {ok} of {} credential(s), all already there)",
                self.listed,
                self.fetches.len()
            )?;
        } else if dry_run {
            writeln!(out, "{file}: dry run, {} model(s) would be added, nothing written", self.added.len())?;
        } else {
            let how = if self.created { "created" } else { "updated" };
            writeln!(out, "{file}: {how}, {} model(s) added ({ok} of {} credential(s) answered)", self.added.len(), self.fetches.len())?;
        }
        Ok(())
    }
}

/// `--models`, else `models.yaml` beside `config.yaml` (whether or not it exists yet).
pub fn models_path(config: &Path, explicit: Option<&Path>) -> PathBuf {
    match explicit {
        Some(p) => p.to_path_buf(),
        None => {
            crate::prepare::default_models_path(config).unwrap_or_else(|| config.parent().unwrap_or(Path::new(".")).join("models.yaml"))
        }
    }
}

/// Reads and validates config.yaml and models.yaml (when it exists). The credentials' `os.environ/`
/// keys must be set here (sync uses them); the master key may stay unset (sync does not need it).
/// Returns the configuration, the models.yaml text (None = no file) and its entries.
pub fn load(
    config_path: &Path,
    models_path: &Path,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<(Config, Option<String>, Vec<RawModel>), String> {
    let text = std::fs::read_to_string(config_path).map_err(|e| format!("{}: {e}", config_path.display()))?;
    let config_name = config_path.display().to_string();
    let models_name = models_path.display().to_string();
    let models_text = match std::fs::read_to_string(models_path) {
        Ok(t) => Some(t),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(format!("{models_name}: {e}")),
    };
    let mut raw = config::parse_raw(&text).map_err(|e| format!("{config_name}: {e}"))?;
    let existing = match &models_text {
        Some(t) => config::parse_models_yaml(t).map_err(|e| format!("{models_name}: {e}"))?,
        None => Vec::new(),
    };
    raw.models.extend(existing.iter().cloned());

    // Variables the credentials' keys come from: these must be set.
    let needed: HashSet<String> = raw
        .credentials
        .iter()
        .filter_map(|c| c.get("api_key").and_then(|v| v.as_str()))
        .filter_map(|k| k.strip_prefix(ENV_PREFIX))
        .map(|v| v.trim().to_string())
        .collect();
    let lookup = |name: &str| -> Option<String> {
        match env(name) {
            Some(v) if !v.is_empty() => Some(v),
            _ if needed.contains(name) => None,
            _ => Some(format!("unset-{name}")),
        }
    };
    let cfg = config::validate(&raw, &lookup).map_err(|e| format!("{config_name}: {e}"))?;
    Ok((cfg, models_text, existing))
}

/// The HTTP client: TLS (rustls), a global timeout per request, no redirects (the key stays with
/// the host it was configured for), HTTP error statuses returned as responses.
pub fn agent(timeout: Duration, ca_bundle: Option<&Path>) -> Result<ureq::Agent, String> {
    use ureq::tls::{PemItem, RootCerts, TlsConfig};
    let mut tls = TlsConfig::builder();
    if let Some(path) = ca_bundle {
        let pem = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let mut certs = Vec::new();
        for item in ureq::tls::parse_pem(&pem) {
            match item {
                Ok(PemItem::Certificate(c)) => certs.push(c),
                Ok(_) => {}
                Err(e) => return Err(format!("{}: {e}", path.display())),
            }
        }
        if certs.is_empty() {
            return Err(format!("{}: no PEM certificate in it", path.display()));
        }
        tls = tls.root_certs(RootCerts::new_with_certs(&certs));
    }
    let cfg = ureq::Agent::config_builder()
        .timeout_global(Some(timeout))
        .http_status_as_error(false)
        .max_redirects(0)
        .user_agent(concat!("auto-ai-router/", env!("CARGO_PKG_VERSION")))
        .tls_config(tls.build())
        .build();
    Ok(cfg.into())
}

/// `{scheme}://{authority}{path_prefix}/v1/models`.
pub fn models_url(c: &Credential) -> String {
    let scheme = match c.scheme {
        Scheme::Http => "http",
        Scheme::Https => "https",
    };
    format!("{scheme}://{}{}/v1/models", c.authority, c.path_prefix)
}

/// Removes the key (should a provider or an error echo it) from a message shown to the user.
fn redact(msg: &str, key: &str) -> String {
    if key.len() >= 4 {
        msg.replace(key, &config::mask(key))
    } else {
        msg.to_string()
    }
}

fn short(s: &str, max: usize) -> String {
    let s = s.trim();
    if s.chars().count() <= max {
        s.to_string()
    } else {
        format!("{}...", s.chars().take(max).collect::<String>())
    }
}

/// "HTTP {status}: {detail}" for a non-200 answer: the OpenAI-style `error.message`, else the start
/// of the body, with the key removed. Redacted before it is shortened: a key cut at the length
/// limit would no longer match, and its first part would be shown.
fn http_error(status: u16, body: &[u8], key: &str) -> String {
    let detail = serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v.pointer("/error/message").and_then(|m| m.as_str()).map(str::to_string))
        .unwrap_or_else(|| String::from_utf8_lossy(body).into_owned());
    let detail = short(&redact(&detail, key), 200);
    if detail.is_empty() {
        format!("HTTP {status}")
    } else {
        format!("HTTP {status}: {detail}")
    }
}

/// `GET /v1/models` with the credential's key.
pub fn fetch(agent: &ureq::Agent, c: &Credential) -> Result<Vec<ModelEntry>, String> {
    let url = models_url(c);
    let result = (|| {
        let mut resp = agent
            .get(&url)
            .header("Authorization", &format!("Bearer {}", c.api_key))
            .header("Accept", "application/json")
            .call()
            .map_err(|e| e.to_string())?;
        let status = resp.status().as_u16();
        let body =
            resp.body_mut().with_config().limit(MAX_BODY).read_to_vec().map_err(|e| format!("HTTP {status}, reading the body: {e}"))?;
        if status != 200 {
            return Err(http_error(status, &body, &c.api_key));
        }
        parse_provider_list(&body)
    })();
    result.map_err(|e| redact(&e, &c.api_key))
}

/// Fetches every credential's list, in parallel, results in config order.
pub fn fetch_all(agent: &ureq::Agent, cfg: &Config) -> Vec<Fetch> {
    std::thread::scope(|s| {
        let handles: Vec<_> = cfg
            .credentials
            .iter()
            .map(|c| s.spawn(move || fetch(agent, c).map(|l| l.into_iter().map(|m| m.id).collect::<Vec<_>>())))
            .collect();
        cfg.credentials
            .iter()
            .zip(handles)
            .map(|(c, h)| Fetch {
                credential: c.name.clone(),
                url: models_url(c),
                outcome: h.join().unwrap_or_else(|_| Err("internal error (fetch thread panicked)".into())),
            })
            .collect()
    })
}

/// Models the answering credentials list that `existing` does not, first-seen order, each once.
/// Returns them and the number of distinct models listed.
pub fn plan(existing: &[RawModel], fetches: &[Fetch], rpm: i64) -> (Vec<NewModel>, usize) {
    let mut seen: HashSet<&str> = existing.iter().map(|m| m.name.as_str()).collect();
    let mut listed: HashSet<&str> = HashSet::new();
    let mut out = Vec::new();
    for f in fetches {
        let Ok(models) = &f.outcome else { continue };
        for id in models {
            listed.insert(id);
            if seen.insert(id) {
                out.push(NewModel { name: id.clone(), rpm, from: f.credential.clone() });
            }
        }
    }
    (out, listed.len())
}

/// A model name as a YAML scalar: plain when that reads back as the same string, else
/// double-quoted (a JSON string is a valid YAML double-quoted scalar).
pub fn yaml_scalar(name: &str) -> String {
    let plain_chars = !name.is_empty()
        && name.chars().next().is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || "._/-+".contains(c));
    if plain_chars && serde_yaml::from_str::<serde_yaml::Value>(name).ok() == Some(serde_yaml::Value::String(name.into())) {
        name.to_string()
    } else {
        serde_json::to_string(name).expect("a string serialises")
    }
}

/// Where a `#` comment starts in a line (at the start, or after whitespace), ignoring quotes.
fn comment_start(line: &str) -> Option<usize> {
    let b = line.as_bytes();
    (0..b.len()).find(|&i| b[i] == b'#' && (i == 0 || b[i - 1] == b' ' || b[i - 1] == b'\t'))
}

/// Is this line the top-level `models:` key? Returns what follows the colon.
fn models_key(line: &str) -> Option<&str> {
    for key in ["models", "\"models\"", "'models'"] {
        if let Some(rest) = line.strip_prefix(key) {
            if let Some(rest) = rest.trim_start_matches([' ', '\t']).strip_prefix(':') {
                if rest.is_empty() || rest.starts_with([' ', '\t']) {
                    return Some(rest);
                }
            }
        }
    }
    None
}

/// Appends `add` to the `models:` sequence of a models.yaml text (`None`: the file does not exist).
/// Existing lines are kept byte for byte, except a flow-style `models: [...]` line, which gains the
/// new entries. Fails (and the caller writes nothing) when the layout is one it cannot extend.
pub fn append_models(text: Option<&str>, add: &[NewModel]) -> Result<String, String> {
    let text = text.unwrap_or("");
    if add.is_empty() {
        return Ok(text.to_string());
    }
    let nl = if text.contains("\r\n") { "\r\n" } else { "\n" };
    let block = |indent: usize, key_col: usize| -> String {
        let mut s = String::new();
        for m in add {
            // `-` then spaces up to the key column, as the file's own entries have it.
            s.push_str(&format!(
                "{}-{}name: {}{nl}{}rpm: {}{nl}",
                " ".repeat(indent),
                " ".repeat(key_col.saturating_sub(indent + 1).max(1)),
                yaml_scalar(&m.name),
                " ".repeat(key_col),
                m.rpm
            ));
        }
        s
    };
    let with_newline = |t: &str| -> String {
        let mut t = t.to_string();
        if !t.is_empty() && !t.ends_with('\n') {
            t.push_str(nl);
        }
        t
    };

    if text.trim().is_empty() {
        return Ok(format!("{}models:{nl}{}", HEADER.replace('\n', nl), block(2, 4)));
    }

    // Lines with their byte offsets; the key must be at column 0 (a top-level mapping key).
    let mut lines = Vec::new();
    let mut at = 0;
    for l in text.split_inclusive('\n') {
        lines.push((at, l));
        at += l.len();
    }
    let Some(idx) = lines.iter().position(|(_, l)| models_key(l.trim_end_matches(['\n', '\r'])).is_some()) else {
        if lines.iter().any(|(_, l)| {
            let t = l.trim();
            !t.is_empty() && !t.starts_with('#') && t != "---"
        }) {
            return Err("it has content but no top-level `models:` key; add `models:` by hand and run again".into());
        }
        // Only comments: add the key at the end.
        return Ok(format!("{}models:{nl}{}", with_newline(text), block(2, 4)));
    };
    let (start, raw_line) = lines[idx];
    let line = raw_line.trim_end_matches(['\n', '\r']);
    let rest = models_key(line).unwrap();
    let comment = comment_start(rest);
    let value = comment.map_or(rest, |c| &rest[..c]).trim();

    if value.is_empty() {
        // Block style (or no entries yet): append at the end with the entries' indentation.
        let mut indent = 2;
        let mut key_col = 4;
        for (_, l) in &lines[idx + 1..] {
            let l = l.trim_end_matches(['\n', '\r']);
            let trimmed = l.trim_start_matches(' ');
            if trimmed.is_empty() || trimmed.starts_with('#') {
                continue;
            }
            if trimmed == "-" || trimmed.starts_with("- ") {
                indent = l.len() - trimmed.len();
                let after = trimmed[1..].trim_start_matches(' ');
                key_col =
                    if after.is_empty() || after.starts_with(['{', '#']) { indent + 2 } else { indent + (trimmed.len() - after.len()) };
            }
            break;
        }
        return Ok(format!("{}{}", with_newline(text), block(indent, key_col)));
    }

    if value.starts_with('[') {
        if !value.ends_with(']') {
            return Err("its `models:` is a flow sequence over several lines; write it in block style \
                        (`- name: ...` lines) and run again"
                .into());
        }
        let inner = value[1..value.len() - 1].trim();
        let key_end = line.len() - rest.len(); // just after the colon
        let tail = comment.map(|c| format!(" {}", &rest[c..])).unwrap_or_default();
        let new_line = if inner.is_empty() {
            // `models: []` becomes `models:` followed by block entries.
            format!("{}{tail}{nl}{}", &line[..key_end], block(2, 4))
        } else {
            let items: Vec<String> = add.iter().map(|m| format!("{{name: {}, rpm: {}}}", yaml_scalar(&m.name), m.rpm)).collect();
            let inner = inner.trim_end_matches(',').trim_end();
            format!("{} [{inner}, {}]{tail}{nl}", &line[..key_end], items.join(", "))
        };
        let end = start + raw_line.len();
        return Ok(format!("{}{new_line}{}", &text[..start], &text[end..]));
    }

    Err(format!("its `models:` value ({}) is neither a block nor a `[...]` sequence; edit it by hand", short(value, 40)))
}

/// The edited text must parse to the old entries followed by the new ones, nothing else.
pub fn check_edit(old: &[RawModel], new_text: &str, add: &[NewModel]) -> Result<(), String> {
    let got = config::parse_models_yaml(new_text).map_err(|e| e.to_string())?;
    let mut want = old.to_vec();
    want.extend(add.iter().map(|m| RawModel { name: m.name.clone(), rpm: Some(serde_yaml::Value::from(m.rpm)), tpm: None }));
    if got != want {
        return Err(format!("the edited file would list {} model(s) where {} were expected", got.len(), want.len()));
    }
    Ok(())
}

/// Writes `text` to `path` through a temporary file in the same directory and a rename, keeping the
/// file's permissions (and writing through a symlink to its target).
pub fn write_atomic(path: &Path, text: &str) -> std::io::Result<()> {
    let target = match std::fs::canonicalize(path) {
        Ok(p) => p,
        Err(_) => path.to_path_buf(),
    };
    let dir = match target.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let file_name = target.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "models.yaml".into());
    let tmp = dir.join(format!(".{file_name}.sync-{}.tmp", std::process::id()));
    let result = (|| {
        let mut f = std::fs::OpenOptions::new().write(true).create_new(true).open(&tmp)?;
        if let Ok(meta) = std::fs::metadata(&target) {
            f.set_permissions(meta.permissions())?;
        }
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, &target)?;
        if let Ok(d) = std::fs::File::open(&dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// The whole command. `Err` is a configuration or file error (nothing written); a report whose
/// `all_failed()` is true means no credential answered.
pub fn sync(opts: &SyncOptions, env: &dyn Fn(&str) -> Option<String>) -> Result<Report, String> {
    let models_path = models_path(&opts.config, opts.models.as_deref());
    let (cfg, text, existing) = load(&opts.config, &models_path, env)?;
    let agent = agent(opts.timeout, opts.ca_bundle.as_deref())?;
    let fetches = fetch_all(&agent, &cfg);
    let (added, listed) = plan(&existing, &fetches, cfg.server.default_models_rpm.as_i64());
    let mut report = Report { models_path: models_path.clone(), created: text.is_none(), fetches, added, listed, written: false };
    if report.added.is_empty() {
        return Ok(report);
    }
    let file = models_path.display();
    let new_text = append_models(text.as_deref(), &report.added).map_err(|e| format!("{file}: {e}"))?;
    check_edit(&existing, &new_text, &report.added).map_err(|e| format!("{file}: cannot extend it safely ({e}); nothing written"))?;
    if !opts.dry_run {
        write_atomic(&models_path, &new_text).map_err(|e| format!("{file}: {e}"))?;
        report.written = true;
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nm(names: &[&str], rpm: i64) -> Vec<NewModel> {
        names.iter().map(|n| NewModel { name: n.to_string(), rpm, from: "a".into() }).collect()
    }

    fn names(text: &str) -> Vec<(String, Option<i64>)> {
        config::parse_models_yaml(text).unwrap().into_iter().map(|m| (m.name, m.rpm.and_then(|v| v.as_i64()))).collect()
    }

    fn edit(old: Option<&str>, add: &[NewModel]) -> String {
        let new = append_models(old, add).unwrap();
        let before = old.map(|t| config::parse_models_yaml(t).unwrap()).unwrap_or_default();
        check_edit(&before, &new, add).unwrap_or_else(|e| panic!("{e}\n---\n{new}"));
        new
    }

    #[test]
    fn creates_a_file_with_a_header() {
        let t = edit(None, &nm(&["gpt-4", "claude-3"], 50));
        assert!(t.starts_with(HEADER), "{t}");
        assert!(t.ends_with("models:\n  - name: gpt-4\n    rpm: 50\n  - name: claude-3\n    rpm: 50\n"), "{t}");
        assert_eq!(edit(Some(""), &nm(&["x"], -1)), edit(None, &nm(&["x"], -1)));
        assert_eq!(names(&edit(Some("  \n"), &nm(&["x"], -1))), vec![("x".into(), Some(-1))]);
    }

    #[test]
    fn keeps_existing_entries_and_comments() {
        let old = "# limits\nmodels:\n  # the big one\n  - name: gpt-4   # pricey\n    rpm: 10\n\n  - name: gpt-3.5\n    rpm: -1\n# end\n";
        let t = edit(Some(old), &nm(&["claude-3"], 50));
        assert!(t.starts_with(old), "{t}");
        assert_eq!(&t[old.len()..], "  - name: claude-3\n    rpm: 50\n");
        assert_eq!(names(&t), vec![("gpt-4".into(), Some(10)), ("gpt-3.5".into(), Some(-1)), ("claude-3".into(), Some(50))]);
    }

    #[test]
    fn follows_the_file_indentation() {
        let old = "models:\n- name: a\n  rpm: 1";
        let t = edit(Some(old), &nm(&["b"], 5));
        assert_eq!(t, "models:\n- name: a\n  rpm: 1\n- name: b\n  rpm: 5\n");
        let old = "models:\n    -   name: a\n        rpm: 1\n";
        let t = edit(Some(old), &nm(&["b"], 5));
        assert_eq!(&t[old.len()..], "    -   name: b\n        rpm: 5\n");
        let old = "models:\n  - {name: a, rpm: 1}\n";
        let t = edit(Some(old), &nm(&["b"], 5));
        assert_eq!(&t[old.len()..], "  - name: b\n    rpm: 5\n");
        let old = "models:\n  - rpm: 1\n    name: a\n";
        edit(Some(old), &nm(&["b"], 5));
    }

    #[test]
    fn file_without_models_key() {
        let t = edit(Some("# just a comment"), &nm(&["a"], 50));
        assert_eq!(t, "# just a comment\nmodels:\n  - name: a\n    rpm: 50\n");
        let t = edit(Some("---\n# c\n"), &nm(&["a"], 50));
        assert_eq!(names(&t), vec![("a".into(), Some(50))]);
        assert!(append_models(Some("{}\n"), &nm(&["a"], 50)).is_err());
    }

    #[test]
    fn models_key_without_entries() {
        let t = edit(Some("models:\n# none yet\n"), &nm(&["a"], 50));
        assert_eq!(t, "models:\n# none yet\n  - name: a\n    rpm: 50\n");
    }

    #[test]
    fn empty_flow_sequence_becomes_a_block() {
        let old = "# top\nmodels: []   # nothing yet\n# bottom\n";
        let t = edit(Some(old), &nm(&["a", "b"], 7));
        assert_eq!(t, "# top\nmodels: # nothing yet\n  - name: a\n    rpm: 7\n  - name: b\n    rpm: 7\n# bottom\n");
        let t = edit(Some("models: []"), &nm(&["a"], 7));
        assert_eq!(t, "models:\n  - name: a\n    rpm: 7\n");
    }

    #[test]
    fn non_empty_flow_sequence_is_extended_on_its_line() {
        let old = "models: [{name: a, rpm: 1}]  # keep\n";
        let t = edit(Some(old), &nm(&["b"], 2));
        assert_eq!(t, "models: [{name: a, rpm: 1}, {name: b, rpm: 2}] # keep\n");
        let err = append_models(Some("models: [\n  {name: a},\n]\n"), &nm(&["b"], 2)).unwrap_err();
        assert!(err.contains("block style"), "{err}");
    }

    #[test]
    fn odd_names_are_quoted() {
        assert_eq!(yaml_scalar("gpt-4o"), "gpt-4o");
        assert_eq!(yaml_scalar("models/gemini-1.5-pro"), "models/gemini-1.5-pro");
        assert_eq!(yaml_scalar("1.5"), "\"1.5\"");
        assert_eq!(yaml_scalar("true"), "\"true\"");
        assert_eq!(yaml_scalar("null"), "\"null\"");
        assert_eq!(yaml_scalar("llama3:8b"), "\"llama3:8b\"");
        assert_eq!(yaml_scalar("a #b"), "\"a #b\"");
        let odd = ["1.5", "yes", "null", "a: b", "[x]", "x, y", "-x", "é\"\\", "#x", "~", "a\tb"];
        let t = edit(Some("models: []\n"), &nm(&odd, 1));
        let got: Vec<String> = names(&t).into_iter().map(|(n, _)| n).collect();
        assert_eq!(got, odd);
        let t = edit(Some("models: [{name: a}]\n"), &nm(&odd, 1));
        assert_eq!(names(&t).len(), odd.len() + 1);
    }

    #[test]
    fn crlf_files_stay_crlf() {
        let old = "models:\r\n  - name: a\r\n    rpm: 1\r\n";
        let t = edit(Some(old), &nm(&["b"], 2));
        assert_eq!(t, "models:\r\n  - name: a\r\n    rpm: 1\r\n  - name: b\r\n    rpm: 2\r\n");
    }

    #[test]
    fn nothing_to_add_changes_nothing() {
        let old = "models:\n  - name: a\n";
        assert_eq!(append_models(Some(old), &[]).unwrap(), old);
    }

    #[test]
    fn check_edit_catches_a_wrong_result() {
        let old = config::parse_models_yaml("models:\n  - name: a\n").unwrap();
        assert!(check_edit(&old, "models:\n  - name: b\n", &nm(&["b"], 1)).is_err());
        assert!(check_edit(&old, "models:\n  - name: a\n  - name: b\n    rpm: 1\n", &nm(&["b"], 1)).is_ok());
    }

    #[test]
    fn plan_first_seen_once_skipping_failures_and_existing() {
        let f = |c: &str, o: Result<&[&str], &str>| Fetch {
            credential: c.into(),
            url: String::new(),
            outcome: o.map(|l| l.iter().map(|s| s.to_string()).collect()).map_err(str::to_string),
        };
        let fetches =
            vec![f("one", Ok(&["gpt-4", "gpt-3.5", "gpt-4"])), f("down", Err("refused")), f("two", Ok(&["gpt-4", "claude-3", "kept"]))];
        let existing = config::parse_models_yaml("models:\n  - name: kept\n    rpm: 3\n").unwrap();
        let (add, listed) = plan(&existing, &fetches, 50);
        assert_eq!(listed, 4);
        let got: Vec<(&str, &str)> = add.iter().map(|m| (m.name.as_str(), m.from.as_str())).collect();
        assert_eq!(got, vec![("gpt-4", "one"), ("gpt-3.5", "one"), ("claude-3", "two")]);
    }

    #[test]
    fn redacts_the_key() {
        assert_eq!(redact("bad key sk-secret-123456", "sk-secret-123456"), "bad key sk-s...");
    }

    #[test]
    fn a_key_across_the_length_limit_is_redacted_not_cut() {
        let key = format!("sk-proj-{}", "k7Qz".repeat(16));
        let prefix = "x".repeat(150);
        for body in [
            format!("{prefix} {key} trailing"),
            serde_json::json!({"error": {"message": format!("{prefix} Incorrect API key provided: {key}")}}).to_string(),
        ] {
            let e = http_error(401, body.as_bytes(), &key);
            assert!(e.starts_with("HTTP 401: xxx"), "{e}");
            // No run of the key longer than the mask's 7 characters survives.
            for w in key.as_bytes().windows(8) {
                assert!(!e.contains(std::str::from_utf8(w).unwrap()), "{e} shows part of the key");
            }
        }
        assert_eq!(http_error(500, b"", &key), "HTTP 500");
    }

    #[test]
    fn atomic_write_replaces_and_keeps_mode() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("aar-sync-unit-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("models.yaml");
        std::fs::write(&p, "old").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o640)).unwrap();
        write_atomic(&p, "new").unwrap();
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "new");
        assert_eq!(std::fs::metadata(&p).unwrap().permissions().mode() & 0o777, 0o640);
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1, "no temporary file left");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
