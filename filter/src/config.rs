//! Seed-compatible configuration (SPEC §3): serde types for the document as users write it
//! (`RawConfig`), and `validate` that compiles it once into the `Config` the request path uses.
//! The CLI uses the same functions, so both reject exactly the same documents.

use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};
use std::fmt;
use std::time::Duration;

pub const ENV_PREFIX: &str = "os.environ/";
const DEFAULT_PORT: u16 = 8080;
const DEFAULT_MODELS_RPM: i64 = 50;
const DEFAULT_MAX_BODY_MB: u64 = 100;
const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(300);
const DEFAULT_MODELS_REFRESH: Duration = Duration::from_secs(300);
pub const DEFAULT_ERROR_CODES: [u16; 7] = [401, 403, 429, 500, 502, 503, 504];

/// The configuration document: `config.yaml` plus `models:` from `models.yaml`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    #[serde(default)]
    pub server: RawServer,
    #[serde(default)]
    pub credentials: Vec<serde_yaml::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fail2ban: Option<RawFail2Ban>,
    /// Accepted for compatibility with the Go router's config; metrics come from Envoy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub monitoring: Option<serde_yaml::Value>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub models: Vec<RawModel>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RawServer {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<serde_yaml::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub master_key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logging_level: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replace_v1_models: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_timeout: Option<serde_yaml::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_models_rpm: Option<serde_yaml::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_body_size_mb: Option<serde_yaml::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub models_refresh: Option<serde_yaml::Value>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RawCredential {
    pub name: Option<String>,
    /// Accepted for compatibility with the seed (`openai`, ...); all providers speak OpenAI's API.
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_url: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rpm: Option<serde_yaml::Value>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RawFail2Ban {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_attempts: Option<serde_yaml::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ban_duration: Option<serde_yaml::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_codes: Option<Vec<serde_yaml::Value>>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RawModel {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rpm: Option<serde_yaml::Value>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RawModelsFile {
    #[serde(default)]
    pub models: Vec<RawModel>,
}

/// A configuration mistake, with the key, the credential and the value it concerns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigError {
    /// The document is not valid YAML/JSON, or has a key or type serde refuses.
    Syntax { what: String, message: String },
    /// A key has a value we refuse: `key` is a full path like `credentials[1] (backup): rpm`.
    Invalid { key: String, value: String, hint: String },
    Missing { key: String },
    /// `os.environ/NAME` where NAME is not set in the environment.
    MissingEnv { key: String, var: String },
    Duplicate { key: String, value: String },
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigError::Syntax { what, message } => write!(f, "{what}: {message}"),
            ConfigError::Invalid { key, value, hint } => write!(f, "{key}: {value} is invalid ({hint})"),
            ConfigError::Missing { key } => write!(f, "{key} is required"),
            ConfigError::MissingEnv { key, var } => write!(
                f,
                "{key}: environment variable {var} (from \"{ENV_PREFIX}{var}\") is not set or empty"
            ),
            ConfigError::Duplicate { key, value } => write!(f, "{key}: duplicate name \"{value}\""),
        }
    }
}

impl std::error::Error for ConfigError {}

/// A limit where -1 means none.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rpm {
    Unlimited,
    Limit(u32),
}

impl Rpm {
    pub fn as_i64(self) -> i64 {
        match self {
            Rpm::Unlimited => -1,
            Rpm::Limit(n) => n as i64,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum LogLevel {
    Debug,
    Info,
    Warn,
    Error,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BanDuration {
    Permanent,
    For(Duration),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scheme {
    Http,
    Https,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credential {
    pub name: String,
    pub api_key: String,
    pub base_url: String,
    pub scheme: Scheme,
    /// Host name or IP, without port or brackets.
    pub host: String,
    pub port: u16,
    /// `host` or `host:port` when the port is not the scheme's default: the upstream `:authority`.
    pub authority: String,
    /// Base path without a trailing `/` or `/v1`; prepended to the client's path.
    pub path_prefix: String,
    pub rpm: Rpm,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Server {
    pub port: u16,
    pub master_key: String,
    pub logging_level: LogLevel,
    pub replace_v1_models: bool,
    /// None = no timeout.
    pub request_timeout: Option<Duration>,
    pub default_models_rpm: Rpm,
    pub max_body_size_bytes: u64,
    /// None = fetch model lists only at start.
    pub models_refresh: Option<Duration>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fail2Ban {
    pub max_attempts: u32,
    pub ban_duration: BanDuration,
    pub error_codes: Vec<u16>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub server: Server,
    pub credentials: Vec<Credential>,
    pub fail2ban: Fail2Ban,
    /// Model limits from models.yaml (looked up on every request).
    pub models: HashMap<String, Rpm>,
}

impl Config {
    /// The limit for a model: its models.yaml entry, else `default_models_rpm`.
    pub fn model_rpm(&self, model: &str) -> Rpm {
        self.models.get(model).copied().unwrap_or(self.server.default_models_rpm)
    }
}

/// Parses the configuration document (YAML, or the JSON Istio's `pluginConfig` produces).
pub fn parse_raw(text: &str) -> Result<RawConfig, ConfigError> {
    if text.trim().is_empty() {
        return Err(ConfigError::Syntax {
            what: "configuration".into(),
            message: "is empty (expected server, credentials, fail2ban)".into(),
        });
    }
    serde_yaml::from_str(text).map_err(|e| ConfigError::Syntax {
        what: "configuration".into(),
        message: e.to_string(),
    })
}

/// Parses `models.yaml` (`models: [{name, rpm}]`).
pub fn parse_models_yaml(text: &str) -> Result<Vec<RawModel>, ConfigError> {
    if text.trim().is_empty() {
        return Ok(Vec::new());
    }
    let file: RawModelsFile = serde_yaml::from_str(text).map_err(|e| ConfigError::Syntax {
        what: "models.yaml".into(),
        message: e.to_string(),
    })?;
    Ok(file.models)
}

/// Parses and validates in one step, resolving `os.environ/` through `env`.
pub fn load(text: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
    validate(&parse_raw(text)?, env)
}

fn describe(v: &serde_yaml::Value) -> String {
    match v {
        serde_yaml::Value::String(s) => format!("\"{s}\""),
        serde_yaml::Value::Null => "null".into(),
        other => serde_yaml::to_string(other)
            .map(|s| s.trim_end().to_string())
            .unwrap_or_else(|_| "?".into()),
    }
}

fn invalid(key: &str, v: &serde_yaml::Value, hint: &str) -> ConfigError {
    ConfigError::Invalid { key: key.into(), value: describe(v), hint: hint.into() }
}

/// An integer given as a number or a numeric string ("-1").
fn as_int(v: &serde_yaml::Value) -> Option<i64> {
    match v {
        serde_yaml::Value::Number(n) => n.as_i64(),
        serde_yaml::Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

fn rpm_value(key: &str, v: &serde_yaml::Value) -> Result<Rpm, ConfigError> {
    const HINT: &str = "use a positive number or -1";
    match as_int(v) {
        Some(-1) => Ok(Rpm::Unlimited),
        Some(n) if n > 0 && n <= u32::MAX as i64 => Ok(Rpm::Limit(n as u32)),
        _ => Err(invalid(key, v, HINT)),
    }
}

/// A Go-style duration ("30s", "5m", "1h30m", "250ms"); `allow_off` accepts -1 (number or string).
pub fn parse_duration(key: &str, v: &serde_yaml::Value, allow_off: bool) -> Result<Option<Duration>, ConfigError> {
    let hint = if allow_off {
        "use a duration like \"30s\", \"5m\", \"1h\", or -1 for none"
    } else {
        "use a duration like \"30s\", \"5m\", \"1h\""
    };
    if let Some(n) = as_int(v) {
        return match n {
            -1 if allow_off => Ok(None),
            // A bare number of seconds is what YAML users often mean.
            n if n > 0 => Ok(Some(Duration::from_secs(n as u64))),
            _ => Err(invalid(key, v, hint)),
        };
    }
    let s = v.as_str().ok_or_else(|| invalid(key, v, hint))?;
    match humantime::parse_duration(s.trim()) {
        Ok(d) if !d.is_zero() => Ok(Some(d)),
        _ => Err(invalid(key, v, hint)),
    }
}

fn resolve_secret(
    key: &str,
    value: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<String, ConfigError> {
    match value.strip_prefix(ENV_PREFIX) {
        Some(var) => {
            let var = var.trim();
            if var.is_empty() {
                return Err(ConfigError::Invalid {
                    key: key.into(),
                    value: format!("\"{ENV_PREFIX}\""),
                    hint: "name the environment variable after os.environ/".into(),
                });
            }
            match env(var) {
                Some(v) if !v.is_empty() => Ok(v),
                _ => Err(ConfigError::MissingEnv { key: key.into(), var: var.into() }),
            }
        }
        None if value.is_empty() => Err(ConfigError::Missing { key: key.into() }),
        None => Ok(value.to_string()),
    }
}

/// A credential name becomes an Envoy cluster name, a header value and a metric label.
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.')
}

struct ParsedUrl {
    scheme: Scheme,
    host: String,
    port: u16,
    authority: String,
    path_prefix: String,
    normalized: String,
}

fn parse_base_url(key: &str, raw: &str) -> Result<ParsedUrl, ConfigError> {
    let bad = |hint: &str| ConfigError::Invalid { key: key.into(), value: format!("\"{raw}\""), hint: hint.into() };
    let url = raw.trim();
    let (scheme, rest) = if let Some(r) = url.strip_prefix("https://") {
        (Scheme::Https, r)
    } else if let Some(r) = url.strip_prefix("http://") {
        (Scheme::Http, r)
    } else {
        return Err(bad("use an http:// or https:// URL"));
    };
    if rest.contains(['?', '#', '@']) {
        return Err(bad("no query, fragment or user info allowed"));
    }
    let (hostport, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, ""),
    };
    let default_port = if scheme == Scheme::Https { 443 } else { 80 };
    let (host, port) = if let Some(h) = hostport.strip_prefix('[') {
        // IPv6 literal.
        let end = h.find(']').ok_or_else(|| bad("unclosed [ in host"))?;
        let after = &h[end + 1..];
        let port = match after.strip_prefix(':') {
            Some(p) => p.parse::<u16>().map_err(|_| bad("port must be 1-65535"))?,
            None if after.is_empty() => default_port,
            None => return Err(bad("unexpected text after ]")),
        };
        (h[..end].to_string(), port)
    } else {
        match hostport.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), p.parse::<u16>().map_err(|_| bad("port must be 1-65535"))?),
            None => (hostport.to_string(), default_port),
        }
    };
    if host.is_empty() || port == 0 {
        return Err(bad("the URL needs a host (and a port 1-65535)"));
    }
    if !host.bytes().all(|b| b.is_ascii_alphanumeric() || b"-._:".contains(&b)) {
        return Err(bad("the host has characters a host name cannot have"));
    }
    let mut path = path.trim_end_matches('/').to_string();
    if path.ends_with("/v1") {
        path.truncate(path.len() - 3);
        path = path.trim_end_matches('/').to_string();
    }
    let host_in_url = if host.contains(':') { format!("[{host}]") } else { host.clone() };
    let authority = if port == default_port { host_in_url.clone() } else { format!("{host_in_url}:{port}") };
    let scheme_str = if scheme == Scheme::Https { "https" } else { "http" };
    let normalized = format!("{scheme_str}://{authority}{path}");
    Ok(ParsedUrl { scheme, host, port, authority, path_prefix: path, normalized })
}

fn log_level(v: &str) -> Option<LogLevel> {
    match v.trim().to_ascii_lowercase().as_str() {
        "debug" | "trace" => Some(LogLevel::Debug),
        "info" | "" => Some(LogLevel::Info),
        "warn" | "warning" => Some(LogLevel::Warn),
        "error" => Some(LogLevel::Error),
        _ => None,
    }
}

/// Compiles the document into the runtime configuration, or names the first mistake.
pub fn validate(raw: &RawConfig, env: &dyn Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
    let s = &raw.server;
    let port = match &s.port {
        None => DEFAULT_PORT,
        Some(v) => match as_int(v) {
            Some(p) if (1..=65535).contains(&p) => p as u16,
            _ => return Err(invalid("server.port", v, "use a port number 1-65535")),
        },
    };
    let master_key = match &s.master_key {
        None => return Err(ConfigError::Missing { key: "server.master_key".into() }),
        Some(k) => resolve_secret("server.master_key", k, env)?,
    };
    let logging_level = match &s.logging_level {
        None => LogLevel::Info,
        Some(l) => log_level(l).ok_or_else(|| ConfigError::Invalid {
            key: "server.logging_level".into(),
            value: format!("\"{l}\""),
            hint: "use debug, info, warn or error".into(),
        })?,
    };
    let request_timeout = match &s.request_timeout {
        None => Some(DEFAULT_REQUEST_TIMEOUT),
        Some(v) => parse_duration("server.request_timeout", v, true)?,
    };
    let default_models_rpm = match &s.default_models_rpm {
        None => Rpm::Limit(DEFAULT_MODELS_RPM as u32),
        Some(v) => match as_int(v) {
            Some(0) => Rpm::Limit(DEFAULT_MODELS_RPM as u32),
            _ => rpm_value("server.default_models_rpm", v)?,
        },
    };
    let max_body_size_bytes = match &s.max_body_size_mb {
        None => DEFAULT_MAX_BODY_MB << 20,
        Some(v) => match as_int(v) {
            Some(n) if (1..=4096).contains(&n) => (n as u64) << 20,
            _ => return Err(invalid("server.max_body_size_mb", v, "use a number of megabytes from 1 to 4096")),
        },
    };
    let models_refresh = match &s.models_refresh {
        None => Some(DEFAULT_MODELS_REFRESH),
        Some(v) if as_int(v) == Some(0) => None,
        Some(v) => match parse_duration("server.models_refresh", v, false)? {
            Some(d) if d < Duration::from_secs(1) => {
                return Err(invalid("server.models_refresh", v, "use at least 1s, or 0 to fetch only at start"))
            }
            d => d,
        },
    };

    if raw.credentials.is_empty() {
        return Err(ConfigError::Missing { key: "credentials (at least one)".into() });
    }
    let mut names = HashSet::new();
    let mut credentials = Vec::with_capacity(raw.credentials.len());
    for (i, value) in raw.credentials.iter().enumerate() {
        let name_hint = value
            .get("name")
            .and_then(|n| n.as_str())
            .map(|n| format!(" ({n})"))
            .unwrap_or_default();
        let at = format!("credentials[{i}]{name_hint}");
        let c: RawCredential = serde_yaml::from_value(value.clone())
            .map_err(|e| ConfigError::Syntax { what: at.clone(), message: e.to_string() })?;
        let name = c.name.clone().ok_or_else(|| ConfigError::Missing { key: format!("{at}: name") })?;
        if !valid_name(&name) {
            return Err(ConfigError::Invalid {
                key: format!("{at}: name"),
                value: format!("\"{name}\""),
                hint: "use 1-64 characters from A-Z a-z 0-9 _ - .".into(),
            });
        }
        if !names.insert(name.clone()) {
            return Err(ConfigError::Duplicate { key: format!("{at}: name"), value: name });
        }
        let api_key = match &c.api_key {
            None => return Err(ConfigError::Missing { key: format!("{at}: api_key") }),
            Some(k) => resolve_secret(&format!("{at}: api_key"), k, env)?,
        };
        let base_url = c.base_url.as_deref().ok_or_else(|| ConfigError::Missing { key: format!("{at}: base_url") })?;
        let url = parse_base_url(&format!("{at}: base_url"), base_url)?;
        let rpm = match &c.rpm {
            None => Rpm::Unlimited,
            Some(v) => rpm_value(&format!("{at}: rpm"), v)?,
        };
        credentials.push(Credential {
            name,
            api_key,
            base_url: url.normalized,
            scheme: url.scheme,
            host: url.host,
            port: url.port,
            authority: url.authority,
            path_prefix: url.path_prefix,
            rpm,
        });
    }

    let f = raw.fail2ban.clone().unwrap_or_default();
    let max_attempts = match &f.max_attempts {
        None => 3,
        Some(v) => match as_int(v) {
            Some(n) if (1..=1_000_000).contains(&n) => n as u32,
            _ => return Err(invalid("fail2ban.max_attempts", v, "use a positive number")),
        },
    };
    let ban_duration = match &f.ban_duration {
        None => BanDuration::Permanent,
        Some(v) if v.as_str().map(|s| s.trim().eq_ignore_ascii_case("permanent")) == Some(true) => BanDuration::Permanent,
        Some(v) => match parse_duration("fail2ban.ban_duration", v, false) {
            Ok(Some(d)) => BanDuration::For(d),
            _ => return Err(invalid("fail2ban.ban_duration", v, "use \"permanent\" or a duration like \"30s\", \"5m\", \"1h\"")),
        },
    };
    let error_codes = match &f.error_codes {
        None => DEFAULT_ERROR_CODES.to_vec(),
        Some(list) => {
            let mut codes = Vec::with_capacity(list.len());
            for (i, v) in list.iter().enumerate() {
                match as_int(v) {
                    Some(n) if (100..=599).contains(&n) => codes.push(n as u16),
                    _ => return Err(invalid(&format!("fail2ban.error_codes[{i}]"), v, "use an HTTP status from 100 to 599")),
                }
            }
            codes
        }
    };

    let mut models = HashMap::with_capacity(raw.models.len());
    for (i, m) in raw.models.iter().enumerate() {
        let at = format!("models[{i}] ({})", m.name);
        if m.name.trim().is_empty() {
            return Err(ConfigError::Missing { key: format!("models[{i}]: name") });
        }
        if models.contains_key(&m.name) {
            return Err(ConfigError::Duplicate { key: format!("models[{i}]: name"), value: m.name.clone() });
        }
        let rpm = match &m.rpm {
            None => default_models_rpm,
            Some(v) => match as_int(v) {
                Some(0) => default_models_rpm,
                _ => rpm_value(&format!("{at}: rpm"), v)?,
            },
        };
        models.insert(m.name.clone(), rpm);
    }

    Ok(Config {
        server: Server {
            port,
            master_key,
            logging_level,
            replace_v1_models: s.replace_v1_models.unwrap_or(false),
            request_timeout,
            default_models_rpm,
            max_body_size_bytes,
            models_refresh,
        },
        credentials,
        fail2ban: Fail2Ban { max_attempts, ban_duration, error_codes },
        models,
    })
}

/// The first 7 characters of a secret and `...`, for logs.
pub fn mask(secret: &str) -> String {
    let head: String = secret.chars().take(7).collect();
    format!("{head}...")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    const SEED: &str = r#"
server:
  port: 8080
  master_key: "sk-your-secret-key"
  logging_level: info
  replace_v1_models: true
  request_timeout: 5m
  default_models_rpm: 50
credentials:
  - name: "openai_main"
    api_key: "sk-proj-main"
    base_url: "https://api.openai.com"
    rpm: 60
  - name: "openai_backup"
    type: openai
    api_key: "sk-proj-backup"
    base_url: "https://api.another.com/v1/"
    rpm: -1
fail2ban:
  max_attempts: 3
  ban_duration: permanent
  error_codes: [401, 403, 429, 500, 502, 503, 504]
monitoring:
  prometheus_enabled: true
"#;

    fn err(text: &str) -> String {
        load(text, &no_env).unwrap_err().to_string()
    }

    fn with_cred(extra: &str) -> String {
        format!("server: {{master_key: k}}\ncredentials:\n  - {{name: a, api_key: x, base_url: 'http://h', {extra}}}\n")
    }

    #[test]
    fn seed_config_parses_with_defaults() {
        let c = load(SEED, &no_env).unwrap();
        assert_eq!(c.server.port, 8080);
        assert_eq!(c.server.request_timeout, Some(Duration::from_secs(300)));
        assert_eq!(c.server.max_body_size_bytes, 100 << 20);
        assert!(c.server.replace_v1_models);
        assert_eq!(c.credentials.len(), 2);
        assert_eq!(c.credentials[0].rpm, Rpm::Limit(60));
        assert_eq!(c.credentials[1].rpm, Rpm::Unlimited);
        assert_eq!(c.credentials[1].base_url, "https://api.another.com");
        assert_eq!(c.credentials[1].path_prefix, "");
        assert_eq!(c.credentials[0].port, 443);
        assert_eq!(c.fail2ban.ban_duration, BanDuration::Permanent);
        assert_eq!(c.fail2ban.error_codes, DEFAULT_ERROR_CODES.to_vec());
    }

    #[test]
    fn json_document_parses_like_yaml() {
        let json = r#"{"server":{"master_key":"k","request_timeout":-1},"credentials":[{"name":"a","api_key":"x","base_url":"http://127.0.0.1:9000/openai/v1","rpm":"-1"}],"models":[{"name":"gpt-4o","rpm":5}]}"#;
        let c = load(json, &no_env).unwrap();
        assert_eq!(c.server.request_timeout, None);
        assert_eq!(c.credentials[0].authority, "127.0.0.1:9000");
        assert_eq!(c.credentials[0].path_prefix, "/openai");
        assert_eq!(c.model_rpm("gpt-4o"), Rpm::Limit(5));
        assert_eq!(c.model_rpm("other"), Rpm::Limit(50));
    }

    #[test]
    fn request_timeout_minus_one_as_number_and_string() {
        for v in ["-1", "\"-1\""] {
            let c = load(&format!("server: {{master_key: k, request_timeout: {v}}}\ncredentials: [{{name: a, api_key: x, base_url: 'http://h'}}]"), &no_env).unwrap();
            assert_eq!(c.server.request_timeout, None, "{v}");
        }
        for (v, secs) in [("30s", 30), ("1h", 3600), ("1m30s", 90), ("90", 90)] {
            let c = load(&format!("server: {{master_key: k, request_timeout: {v}}}\ncredentials: [{{name: a, api_key: x, base_url: 'http://h'}}]"), &no_env).unwrap();
            assert_eq!(c.server.request_timeout, Some(Duration::from_secs(secs)), "{v}");
        }
    }

    #[test]
    fn credential_rpm_zero_names_credential_key_and_value() {
        let text = SEED.replace("rpm: -1", "rpm: 0");
        assert_eq!(err(&text), "credentials[1] (openai_backup): rpm: 0 is invalid (use a positive number or -1)");
    }

    #[test]
    fn bad_values_are_named() {
        assert!(err(&with_cred("rpm: -5")).contains("credentials[0] (a): rpm: -5 is invalid"));
        assert!(err(&with_cred("rpm: lots")).contains("rpm: \"lots\" is invalid"));
        let e = err("server: {master_key: k, request_timeout: soon}\ncredentials: [{name: a, api_key: x, base_url: 'http://h'}]");
        assert!(e.starts_with("server.request_timeout: \"soon\" is invalid"), "{e}");
        let e = err("server: {master_key: k}\ncredentials: [{name: a, api_key: x, base_url: 'ftp://h'}]");
        assert!(e.contains("credentials[0] (a): base_url: \"ftp://h\" is invalid"), "{e}");
        let e = err("server: {master_key: k}\ncredentials: [{name: a, api_key: x, base_url: 'http://h'}]\nfail2ban: {ban_duration: forever}");
        assert!(e.starts_with("fail2ban.ban_duration: \"forever\" is invalid"), "{e}");
        let e = err("server: {master_key: k}\ncredentials: [{name: a, api_key: x, base_url: 'http://h'}]\nfail2ban: {error_codes: [500, 9000]}");
        assert!(e.starts_with("fail2ban.error_codes[1]: 9000 is invalid"), "{e}");
        let e = err("server: {master_key: k, logging_level: loud}\ncredentials: [{name: a, api_key: x, base_url: 'http://h'}]");
        assert!(e.starts_with("server.logging_level: \"loud\""), "{e}");
    }

    #[test]
    fn unknown_keys_are_errors() {
        let e = err(&with_cred("color: red"));
        assert!(e.starts_with("credentials[0] (a): unknown field `color`"), "{e}");
        let e = err("server: {master_key: k, prot: 1}\ncredentials: [{name: a, api_key: x, base_url: 'http://h'}]");
        assert!(e.contains("unknown field `prot`"), "{e}");
        let e = err("servers: {}\n");
        assert!(e.contains("unknown field `servers`"), "{e}");
    }

    #[test]
    fn duplicate_names_and_missing_keys() {
        let e = err("server: {master_key: k}\ncredentials: [{name: a, api_key: x, base_url: 'http://h'}, {name: a, api_key: y, base_url: 'http://g'}]");
        assert_eq!(e, "credentials[1] (a): name: duplicate name \"a\"");
        let e = err("server: {}\ncredentials: [{name: a, api_key: x, base_url: 'http://h'}]");
        assert_eq!(e, "server.master_key is required");
        let e = err("server: {master_key: k}\ncredentials: [{name: a, base_url: 'http://h'}]");
        assert_eq!(e, "credentials[0] (a): api_key is required");
        let e = err("server: {master_key: k}\ncredentials: []");
        assert!(e.contains("credentials"), "{e}");
        assert!(err("").contains("empty"));
        assert!(err(":\n  - [").starts_with("configuration:"));
    }

    #[test]
    fn environment_secrets() {
        let env = |n: &str| match n {
            "MASTER" => Some("sk-master-from-env".to_string()),
            "EMPTY" => Some(String::new()),
            _ => None,
        };
        let c = load("server: {master_key: os.environ/MASTER}\ncredentials: [{name: a, api_key: x, base_url: 'http://h'}]", &env).unwrap();
        assert_eq!(c.server.master_key, "sk-master-from-env");
        let e = load("server: {master_key: k}\ncredentials: [{name: a, api_key: os.environ/OPENAI_KEY, base_url: 'http://h'}]", &env).unwrap_err();
        assert_eq!(e, ConfigError::MissingEnv { key: "credentials[0] (a): api_key".into(), var: "OPENAI_KEY".into() });
        assert!(e.to_string().contains("OPENAI_KEY"));
        let e = load("server: {master_key: os.environ/EMPTY}\ncredentials: [{name: a, api_key: x, base_url: 'http://h'}]", &env).unwrap_err();
        assert!(matches!(e, ConfigError::MissingEnv { .. }));
    }

    #[test]
    fn base_url_normalisation() {
        let cases = [
            ("https://api.openai.com/", "api.openai.com", 443, "api.openai.com", ""),
            ("https://api.openai.com/v1", "api.openai.com", 443, "api.openai.com", ""),
            ("http://127.0.0.1:8001/v1/", "127.0.0.1", 8001, "127.0.0.1:8001", ""),
            ("https://x.azure.com/openai/deployments/v1", "x.azure.com", 443, "x.azure.com", "/openai/deployments"),
            ("http://[::1]:9000", "::1", 9000, "[::1]:9000", ""),
            ("http://host:80/api", "host", 80, "host", "/api"),
        ];
        for (url, host, port, authority, prefix) in cases {
            let p = parse_base_url("k", url).unwrap();
            assert_eq!((p.host.as_str(), p.port, p.authority.as_str(), p.path_prefix.as_str()), (host, port, authority, prefix), "{url}");
        }
        for bad in ["api.openai.com", "https://", "http://h:0", "http://h:99999", "http://u@h", "http://h?x=1", "http://h h"] {
            assert!(parse_base_url("k", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn models_yaml_and_defaults() {
        let models = parse_models_yaml("models:\n  - name: gpt-4o\n    rpm: 50\n  - name: gpt-3.5-turbo\n    rpm: -1\n  - name: m0\n").unwrap();
        let mut raw = parse_raw("server: {master_key: k, default_models_rpm: -1}\ncredentials: [{name: a, api_key: x, base_url: 'http://h'}]").unwrap();
        raw.models = models;
        let c = validate(&raw, &no_env).unwrap();
        assert_eq!(c.model_rpm("gpt-4o"), Rpm::Limit(50));
        assert_eq!(c.model_rpm("gpt-3.5-turbo"), Rpm::Unlimited);
        assert_eq!(c.model_rpm("m0"), Rpm::Unlimited);
        assert_eq!(c.model_rpm("unknown"), Rpm::Unlimited);
        assert!(parse_models_yaml("models: [{name: a, rpn: 1}]").unwrap_err().to_string().contains("rpn"));
        raw.models = parse_models_yaml("models: [{name: a, rpm: 0}, {name: a}]").unwrap();
        assert!(validate(&raw, &no_env).unwrap_err().to_string().contains("duplicate"));
    }

    #[test]
    fn raw_config_round_trips_for_the_renderer() {
        let raw = parse_raw(SEED).unwrap();
        let json = serde_json::to_string(&raw).unwrap();
        let again = parse_raw(&json).unwrap();
        assert_eq!(raw, again);
        assert_eq!(validate(&again, &no_env).unwrap(), validate(&raw, &no_env).unwrap());
    }

    #[test]
    fn masks_secrets() {
        assert_eq!(mask("sk-proj-abcdefgh"), "sk-proj...");
        assert_eq!(mask("abc"), "abc...");
    }
}
