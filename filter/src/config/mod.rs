//! Seed-compatible configuration (SPEC §3): serde types for the document as users write it
//! (`RawConfig`), and `validate` that compiles it once into the `Config` the request path uses.
//! The CLI uses the same functions, so both reject exactly the same documents.
//!
//! Errors name the key, the credential and the value, but never a secret: `api_key` and
//! `master_key` values are not shown (not even when they are not strings), and a `base_url` is
//! shown with its user-info and query masked.

mod global;
mod hosts;
mod url;
mod values;

pub use global::{GlobalLimits, OnUnavailable, RawGlobalLimits, RLS_CLUSTER};
pub use hosts::{host_matches, split_authority, HostMatch};
pub use url::redact_url;
pub use values::{parse_duration, MAX_DURATION};

use crate::body::MAX_MODEL_LEN;
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};
use std::fmt;
use std::time::Duration;
use values::{as_int, describe, int_in, invalid, limit_value, resolve_secret, without_values};

pub const ENV_PREFIX: &str = "os.environ/";
const DEFAULT_PORT: u16 = 8080;
const DEFAULT_MODELS_RPM: i64 = 50;
const DEFAULT_MAX_BODY_MB: u64 = 100;
/// A wasm32 VM copies the whole body into its 4 GiB address space, and its memory never shrinks.
pub const MAX_BODY_MB: i64 = 1024;
const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(300);
/// Requests waiting for a key at once per worker (`server.queue_max`).
pub const DEFAULT_QUEUE_MAX: u32 = 100;
/// How long a client may pause while sending a request body before the stream is cut.
pub const DEFAULT_BODY_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
const DEFAULT_MODELS_REFRESH: Duration = Duration::from_secs(300);
pub const DEFAULT_ERROR_CODES: [u16; 7] = [401, 403, 429, 500, 502, 503, 504];
pub const DEFAULT_MAX_PROVIDER_RETRIES: u32 = 2;
pub const MAX_PROVIDER_RETRIES: i64 = 10;
pub const DEFAULT_RETRY_ON_STATUS: [u16; 8] = [401, 402, 403, 429, 500, 502, 503, 504];
pub const DEFAULT_COOLDOWN: Duration = Duration::from_secs(5);
pub const DEFAULT_COOLDOWN_MAX: Duration = Duration::from_secs(600);

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
    /// Limits across Envoy replicas through a rate-limit service (absent = each Envoy on its own).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub global_limits: Option<RawGlobalLimits>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RawServer {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<serde_yaml::Value>,
    #[serde(default, deserialize_with = "values::master_key", skip_serializing_if = "Option::is_none")]
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
    /// A list of host names (`name`, `name:port`, `*.suffix`); absent or empty = every host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hosts: Option<serde_yaml::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_provider_retries: Option<serde_yaml::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_on_status: Option<serde_yaml::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cooldown_default: Option<serde_yaml::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cooldown_max: Option<serde_yaml::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body_idle_timeout: Option<serde_yaml::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempt_timeout: Option<serde_yaml::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_timeout: Option<serde_yaml::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_max: Option<serde_yaml::Value>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RawCredential {
    pub name: Option<String>,
    /// Accepted for compatibility with the seed (`openai`, ...); all providers speak OpenAI's API.
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    #[serde(default, deserialize_with = "values::api_key", skip_serializing_if = "Option::is_none")]
    pub api_key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_url: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rpm: Option<serde_yaml::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tpm: Option<serde_yaml::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<serde_yaml::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_concurrent: Option<serde_yaml::Value>,
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

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RawModel {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rpm: Option<serde_yaml::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tpm: Option<serde_yaml::Value>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RawModelsFile {
    #[serde(default)]
    pub models: Vec<RawModel>,
}

/// A configuration mistake, with the key, the credential and the value it concerns (never the
/// value of a secret).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigError {
    /// The document is not valid YAML/JSON, or has a key or type serde refuses.
    Syntax {
        what: String,
        message: String,
    },
    /// A key has a value we refuse: `key` is a full path like `credentials[1] (backup): rpm`.
    Invalid {
        key: String,
        value: String,
        hint: String,
    },
    Missing {
        key: String,
    },
    /// `os.environ/NAME` where NAME is not set in the environment.
    MissingEnv {
        key: String,
        var: String,
    },
    Duplicate {
        key: String,
        value: String,
    },
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigError::Syntax { what, message } => write!(f, "{what}: {message}"),
            ConfigError::Invalid { key, value, hint } => write!(f, "{key}: {value} is invalid ({hint})"),
            ConfigError::Missing { key } => write!(f, "{key} is required"),
            ConfigError::MissingEnv { key, var } => {
                write!(f, "{key}: environment variable {var} (from \"{ENV_PREFIX}{var}\") is not set or empty")
            }
            ConfigError::Duplicate { key, value } => write!(f, "{key}: duplicate name \"{value}\""),
        }
    }
}

impl std::error::Error for ConfigError {}

/// A per-minute limit where -1 means none (`rpm`, and `tpm` through [`Tpm`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rpm {
    Unlimited,
    Limit(u32),
}

/// Tokens per minute: the same kind of limit as [`Rpm`] (positive, or -1 / absent for none).
pub type Tpm = Rpm;

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
    /// Absent = unlimited.
    pub tpm: Tpm,
    /// Share of traffic relative to the other credentials (1-1000, default 1).
    pub weight: u32,
    /// Requests in flight at once (None = unlimited).
    pub max_concurrent: Option<u32>,
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
    /// The request hosts the router answers for; empty = every host.
    pub hosts: Vec<HostMatch>,
    /// How many other credentials a failed request may be retried on (0-10).
    pub max_provider_retries: u32,
    /// Provider statuses (400-599) that make the router try another credential.
    pub retry_on_status: Vec<u16>,
    /// How long a credential rests after a provider 429 that gives no hint.
    pub cooldown_default: Duration,
    /// The longest rest a provider's hint can ask for.
    pub cooldown_max: Duration,
    /// The longest pause between body bytes before the request is routed (None = no limit).
    pub body_idle_timeout: Option<Duration>,
    /// An attempt with no response headers by then is abandoned for another key (None = off).
    pub attempt_timeout: Option<Duration>,
    /// How long a request refused only by limits may wait for a key (None = off: 429 at once).
    pub queue_timeout: Option<Duration>,
    /// Requests waiting at once per worker.
    pub queue_max: u32,
}

impl Server {
    /// Whether a request for `authority` (`host` or `host:port`) is the router's.
    pub fn host_matches(&self, authority: &str) -> bool {
        host_matches(&self.hosts, authority)
    }
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
    /// Token limits of the models.yaml entries that have `tpm`.
    pub model_tpms: HashMap<String, Tpm>,
    pub global: Option<GlobalLimits>,
    /// The round-robin order over credential indices: each once with equal weights, else a
    /// smooth weighted schedule (see [`weighted_schedule`]).
    pub schedule: Vec<u16>,
}

impl Config {
    /// The limit for a model: its models.yaml entry, else `default_models_rpm`.
    pub fn model_rpm(&self, model: &str) -> Rpm {
        self.models.get(model).copied().unwrap_or(self.server.default_models_rpm)
    }

    /// The token limit for a model: its models.yaml `tpm`, else unlimited.
    pub fn model_tpm(&self, model: &str) -> Tpm {
        self.model_tpms.get(model).copied().unwrap_or(Rpm::Unlimited)
    }

    /// Whether a request for `authority` is the router's (see [`Server::host_matches`]).
    pub fn host_matches(&self, authority: &str) -> bool {
        self.server.host_matches(authority)
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
    serde_yaml::from_str(text).map_err(|e| ConfigError::Syntax { what: "configuration".into(), message: without_values(&e.to_string()) })
}

/// Parses `models.yaml` (`models: [{name, rpm, tpm}]`).
pub fn parse_models_yaml(text: &str) -> Result<Vec<RawModel>, ConfigError> {
    if text.trim().is_empty() {
        return Ok(Vec::new());
    }
    let file: RawModelsFile = serde_yaml::from_str(text)
        .map_err(|e| ConfigError::Syntax { what: "models.yaml".into(), message: without_values(&e.to_string()) })?;
    Ok(file.models)
}

/// Parses and validates in one step, resolving `os.environ/` through `env`.
pub fn load(text: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
    validate(&parse_raw(text)?, env)
}

/// A credential name becomes an Envoy cluster name, a header value and a metric label.
fn valid_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= 64 && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.')
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

/// A key that must hold a list.
fn list<'a>(key: &str, v: &'a serde_yaml::Value, hint: &str) -> Result<&'a [serde_yaml::Value], ConfigError> {
    match v {
        serde_yaml::Value::Sequence(s) => Ok(s),
        serde_yaml::Value::Null => Ok(&[]),
        other => Err(invalid(key, other, hint)),
    }
}

/// A duration key that has a default and no "off".
fn duration_or(key: &str, v: Option<&serde_yaml::Value>, default: Duration) -> Result<Duration, ConfigError> {
    match v {
        None => Ok(default),
        Some(v) => Ok(parse_duration(key, v, false)?.unwrap_or(default)),
    }
}

/// Compiles the document into the runtime configuration, or names the first mistake.
pub fn validate(raw: &RawConfig, env: &dyn Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
    let server = validate_server(&raw.server, env)?;
    let credentials = validate_credentials(&raw.credentials, env)?;
    let fail2ban = validate_fail2ban(raw.fail2ban.as_ref())?;
    let (models, model_tpms) = validate_models(&raw.models, server.default_models_rpm)?;
    let global = raw.global_limits.as_ref().map(global::validate).transpose()?;
    let schedule = weighted_schedule(&credentials.iter().map(|c| c.weight).collect::<Vec<_>>());
    Ok(Config { server, credentials, fail2ban, models, model_tpms, global, schedule })
}

/// Largest `credentials[].weight`.
pub const MAX_WEIGHT: u32 = 1000;
/// Largest `credentials[].max_concurrent`.
pub const MAX_CONCURRENT: u32 = 10_000;

/// Smooth weighted round-robin (nginx's): over one cycle of `sum(weights) / gcd` picks each index
/// appears `weight / gcd` times, spread out (weights 5:1:1 give a a b a c a a, never a burst of
/// five). Equal weights give `0, 1, ..., n-1`, today's plain round-robin.
pub fn weighted_schedule(weights: &[u32]) -> Vec<u16> {
    fn gcd(a: u32, b: u32) -> u32 {
        if b == 0 {
            a
        } else {
            gcd(b, a % b)
        }
    }
    let g = weights.iter().copied().fold(0, gcd).max(1);
    let w: Vec<i64> = weights.iter().map(|x| i64::from(x / g)).collect();
    let total: i64 = w.iter().sum();
    let mut current = vec![0i64; w.len()];
    let mut out = Vec::with_capacity(total.max(0) as usize);
    for _ in 0..total {
        let mut best = 0;
        for (i, wi) in w.iter().enumerate() {
            current[i] += wi;
            if current[i] > current[best] {
                best = i;
            }
        }
        current[best] -= total;
        out.push(best as u16);
    }
    out
}

fn validate_server(s: &RawServer, env: &dyn Fn(&str) -> Option<String>) -> Result<Server, ConfigError> {
    let port = match &s.port {
        None => DEFAULT_PORT,
        Some(v) => int_in("server.port", v, 1..=65535, "use a port number 1-65535")? as u16,
    };
    let master_key = match &s.master_key {
        None => return Err(ConfigError::Missing { key: "server.master_key".into() }),
        Some(k) => resolve_secret("server.master_key", k, env)?,
    };
    let logging_level = match &s.logging_level {
        None => LogLevel::Info,
        Some(l) => log_level(l).ok_or_else(|| ConfigError::Invalid {
            key: "server.logging_level".into(),
            value: format!("{l:?}"),
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
            _ => limit_value("server.default_models_rpm", v)?,
        },
    };
    let max_body_size_bytes = match &s.max_body_size_mb {
        None => DEFAULT_MAX_BODY_MB << 20,
        Some(v) => {
            let hint = format!("use a number of megabytes from 1 to {MAX_BODY_MB}: the filter holds the whole body in a wasm32 VM");
            (int_in("server.max_body_size_mb", v, 1..=MAX_BODY_MB, &hint)? as u64) << 20
        }
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
    let hosts = match &s.hosts {
        None => Vec::new(),
        Some(v) => validate_hosts(v)?,
    };
    let max_provider_retries = match &s.max_provider_retries {
        None => DEFAULT_MAX_PROVIDER_RETRIES,
        Some(v) => int_in("server.max_provider_retries", v, 0..=MAX_PROVIDER_RETRIES, "use a number from 0 to 10")? as u32,
    };
    let retry_on_status = match &s.retry_on_status {
        None => DEFAULT_RETRY_ON_STATUS.to_vec(),
        Some(v) => {
            let mut codes = Vec::new();
            for (i, c) in list("server.retry_on_status", v, "use a list of HTTP statuses like [429, 503]")?.iter().enumerate() {
                let code = int_in(&format!("server.retry_on_status[{i}]"), c, 400..=599, "use an HTTP status from 400 to 599")? as u16;
                if !codes.contains(&code) {
                    codes.push(code);
                }
            }
            codes
        }
    };
    let cooldown_default = duration_or("server.cooldown_default", s.cooldown_default.as_ref(), DEFAULT_COOLDOWN)?;
    let cooldown_max = duration_or("server.cooldown_max", s.cooldown_max.as_ref(), DEFAULT_COOLDOWN_MAX)?;
    if cooldown_default > cooldown_max {
        let (key, v) = match (&s.cooldown_default, &s.cooldown_max) {
            (Some(v), _) => ("server.cooldown_default", describe(v)),
            (None, Some(v)) => ("server.cooldown_max", describe(v)),
            (None, None) => ("server.cooldown_default", humantime::format_duration(cooldown_default).to_string()),
        };
        return Err(ConfigError::Invalid {
            key: key.into(),
            value: v,
            hint: format!(
                "server.cooldown_default ({}) must not be longer than server.cooldown_max ({})",
                humantime::format_duration(cooldown_default),
                humantime::format_duration(cooldown_max)
            ),
        });
    }
    let body_idle_timeout = match &s.body_idle_timeout {
        None => Some(DEFAULT_BODY_IDLE_TIMEOUT),
        Some(v) => match parse_duration("server.body_idle_timeout", v, true)? {
            Some(d) if d < Duration::from_millis(100) => {
                return Err(invalid("server.body_idle_timeout", v, "use at least 100ms, or -1 for no limit"))
            }
            d => d,
        },
    };
    let attempt_timeout = match &s.attempt_timeout {
        None => None,
        Some(v) => match parse_duration("server.attempt_timeout", v, false)? {
            Some(d) if d < Duration::from_millis(100) => return Err(invalid("server.attempt_timeout", v, "use at least 100ms")),
            Some(_) if max_provider_retries == 0 => {
                return Err(invalid(
                    "server.attempt_timeout",
                    v,
                    "it abandons a silent attempt for another key: set server.max_provider_retries above 0, or remove it",
                ))
            }
            Some(d) if request_timeout.is_some_and(|r| d >= r) => {
                return Err(invalid(
                    "server.attempt_timeout",
                    v,
                    "it must be shorter than server.request_timeout, which bounds every attempt together",
                ))
            }
            d => d,
        },
    };
    let queue_timeout = match &s.queue_timeout {
        None => None,
        Some(v) if as_int(v) == Some(0) => None,
        Some(v) => match parse_duration("server.queue_timeout", v, false)? {
            Some(d) if d < Duration::from_millis(10) => {
                return Err(invalid("server.queue_timeout", v, "use at least 10ms, or 0 for no waiting"))
            }
            Some(d) if body_idle_timeout.is_some_and(|b| d >= b) => {
                return Err(invalid(
                    "server.queue_timeout",
                    v,
                    "a waiting request is cut by server.body_idle_timeout: make the queue timeout shorter than it",
                ))
            }
            d => d,
        },
    };
    let queue_max = match &s.queue_max {
        None => DEFAULT_QUEUE_MAX,
        Some(v) => int_in("server.queue_max", v, 1..=10_000, "use a number from 1 to 10000")? as u32,
    };
    Ok(Server {
        port,
        master_key,
        logging_level,
        replace_v1_models: s.replace_v1_models.unwrap_or(false),
        request_timeout,
        default_models_rpm,
        max_body_size_bytes,
        models_refresh,
        hosts,
        max_provider_retries,
        retry_on_status,
        cooldown_default,
        cooldown_max,
        body_idle_timeout,
        attempt_timeout,
        queue_timeout,
        queue_max,
    })
}

fn validate_hosts(v: &serde_yaml::Value) -> Result<Vec<HostMatch>, ConfigError> {
    const HINT: &str = "use a list of host names like [ai.example.com, \"*.example.com\", \"localhost:8080\"]";
    let mut hosts = Vec::new();
    for (i, h) in list("server.hosts", v, HINT)?.iter().enumerate() {
        let key = format!("server.hosts[{i}]");
        let entry = h.as_str().ok_or_else(|| invalid(&key, h, "use a host name, host:port or *.suffix"))?;
        let m = HostMatch::parse(entry).map_err(|hint| invalid(&key, h, hint))?;
        if hosts.contains(&m) {
            return Err(ConfigError::Duplicate { key, value: entry.trim().to_string() });
        }
        hosts.push(m);
    }
    Ok(hosts)
}

fn validate_credentials(list: &[serde_yaml::Value], env: &dyn Fn(&str) -> Option<String>) -> Result<Vec<Credential>, ConfigError> {
    if list.is_empty() {
        return Err(ConfigError::Missing { key: "credentials (at least one)".into() });
    }
    let mut names = HashSet::new();
    let mut credentials = Vec::with_capacity(list.len());
    for (i, value) in list.iter().enumerate() {
        let name_hint = value.get("name").and_then(|n| n.as_str()).map(|n| format!(" ({n})")).unwrap_or_default();
        let at = format!("credentials[{i}]{name_hint}");
        let c: RawCredential = serde_yaml::from_value(value.clone())
            .map_err(|e| ConfigError::Syntax { what: at.clone(), message: without_values(&e.to_string()) })?;
        let name = c.name.clone().ok_or_else(|| ConfigError::Missing { key: format!("{at}: name") })?;
        if !valid_name(&name) {
            return Err(ConfigError::Invalid {
                key: format!("{at}: name"),
                value: format!("{name:?}"),
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
        let url = url::parse_base_url(&format!("{at}: base_url"), base_url)?;
        let rpm = match &c.rpm {
            None => Rpm::Unlimited,
            Some(v) => limit_value(&format!("{at}: rpm"), v)?,
        };
        let tpm = match &c.tpm {
            None => Rpm::Unlimited,
            Some(v) => limit_value(&format!("{at}: tpm"), v)?,
        };
        let weight = match &c.weight {
            None => 1,
            Some(v) => int_in(&format!("{at}: weight"), v, 1..=MAX_WEIGHT as i64, "use a number from 1 to 1000")? as u32,
        };
        let max_concurrent = match &c.max_concurrent {
            None => None,
            Some(v) => Some(int_in(&format!("{at}: max_concurrent"), v, 1..=MAX_CONCURRENT as i64, "use a number from 1 to 10000")? as u32),
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
            tpm,
            weight,
            max_concurrent,
        });
    }
    Ok(credentials)
}

fn validate_fail2ban(f: Option<&RawFail2Ban>) -> Result<Fail2Ban, ConfigError> {
    let f = f.cloned().unwrap_or_default();
    let max_attempts = match &f.max_attempts {
        None => 3,
        Some(v) => int_in("fail2ban.max_attempts", v, 1..=1_000_000, "use a positive number")? as u32,
    };
    let ban_duration = match &f.ban_duration {
        None => BanDuration::Permanent,
        Some(v) if v.as_str().map(|s| s.trim().eq_ignore_ascii_case("permanent")) == Some(true) => BanDuration::Permanent,
        Some(v) => match values::duration_of(v, false) {
            Ok(Some(d)) => BanDuration::For(d),
            Err(values::DurationError::TooLong) => {
                return Err(invalid("fail2ban.ban_duration", v, "use \"permanent\" or at most 1 year (8760h)"))
            }
            _ => return Err(invalid("fail2ban.ban_duration", v, "use \"permanent\" or a duration like \"30s\", \"5m\", \"1h\"")),
        },
    };
    let error_codes = match &f.error_codes {
        None => DEFAULT_ERROR_CODES.to_vec(),
        Some(list) => {
            let mut codes = Vec::with_capacity(list.len());
            for (i, v) in list.iter().enumerate() {
                codes.push(int_in(&format!("fail2ban.error_codes[{i}]"), v, 100..=599, "use an HTTP status from 100 to 599")? as u16);
            }
            codes
        }
    };
    Ok(Fail2Ban { max_attempts, ban_duration, error_codes })
}

/// A model name as shown in keys: long ones are cut, so one bad entry can't flood the message.
fn shown_name(name: &str) -> String {
    const SHOWN: usize = 40;
    if name.chars().count() <= SHOWN {
        name.to_string()
    } else {
        format!("{}...", name.chars().take(SHOWN).collect::<String>())
    }
}

type ModelLimits = (HashMap<String, Rpm>, HashMap<String, Tpm>);

fn validate_models(list: &[RawModel], default_models_rpm: Rpm) -> Result<ModelLimits, ConfigError> {
    let mut models = HashMap::with_capacity(list.len());
    let mut tpms = HashMap::new();
    for (i, m) in list.iter().enumerate() {
        let at = format!("models[{i}] ({})", shown_name(&m.name));
        if m.name.trim().is_empty() {
            return Err(ConfigError::Missing { key: format!("models[{i}]: name") });
        }
        if m.name.len() > MAX_MODEL_LEN {
            return Err(ConfigError::Invalid {
                key: format!("{at}: name"),
                value: format!("a name of {} bytes", m.name.len()),
                hint: format!("use at most {MAX_MODEL_LEN} bytes: a request's model can be no longer, so this entry could never match"),
            });
        }
        if models.contains_key(&m.name) {
            return Err(ConfigError::Duplicate { key: format!("models[{i}]: name"), value: m.name.clone() });
        }
        let rpm = match &m.rpm {
            None => default_models_rpm,
            Some(v) => match as_int(v) {
                Some(0) => default_models_rpm,
                _ => limit_value(&format!("{at}: rpm"), v)?,
            },
        };
        if let Some(v) = &m.tpm {
            tpms.insert(m.name.clone(), limit_value(&format!("{at}: tpm"), v)?);
        }
        models.insert(m.name.clone(), rpm);
    }
    Ok((models, tpms))
}

/// A short prefix of a secret and `...`, for logs: at most 7 characters, and at most a quarter of
/// the secret, so short keys keep most of their entropy hidden.
pub fn mask(secret: &str) -> String {
    let keep = (secret.chars().count() / 4).min(7);
    let head: String = secret.chars().take(keep).collect();
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
            let c = load(
                &format!("server: {{master_key: k, request_timeout: {v}}}\ncredentials: [{{name: a, api_key: x, base_url: 'http://h'}}]"),
                &no_env,
            )
            .unwrap();
            assert_eq!(c.server.request_timeout, None, "{v}");
        }
        for (v, secs) in [("30s", 30), ("1h", 3600), ("1m30s", 90), ("90", 90)] {
            let c = load(
                &format!("server: {{master_key: k, request_timeout: {v}}}\ncredentials: [{{name: a, api_key: x, base_url: 'http://h'}}]"),
                &no_env,
            )
            .unwrap();
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
        let e =
            err("server: {master_key: k}\ncredentials: [{name: a, api_key: x, base_url: 'http://h'}]\nfail2ban: {ban_duration: forever}");
        assert!(e.starts_with("fail2ban.ban_duration: \"forever\" is invalid"), "{e}");
        let e = err(
            "server: {master_key: k}\ncredentials: [{name: a, api_key: x, base_url: 'http://h'}]\nfail2ban: {error_codes: [500, 9000]}",
        );
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
        let e = load("server: {master_key: k}\ncredentials: [{name: a, api_key: os.environ/OPENAI_KEY, base_url: 'http://h'}]", &env)
            .unwrap_err();
        assert_eq!(e, ConfigError::MissingEnv { key: "credentials[0] (a): api_key".into(), var: "OPENAI_KEY".into() });
        assert!(e.to_string().contains("OPENAI_KEY"));
        let e =
            load("server: {master_key: os.environ/EMPTY}\ncredentials: [{name: a, api_key: x, base_url: 'http://h'}]", &env).unwrap_err();
        assert!(matches!(e, ConfigError::MissingEnv { .. }));
    }

    #[test]
    fn models_yaml_and_defaults() {
        let models =
            parse_models_yaml("models:\n  - name: gpt-4o\n    rpm: 50\n  - name: gpt-3.5-turbo\n    rpm: -1\n  - name: m0\n").unwrap();
        let mut raw =
            parse_raw("server: {master_key: k, default_models_rpm: -1}\ncredentials: [{name: a, api_key: x, base_url: 'http://h'}]")
                .unwrap();
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

    fn server(extra: &str) -> Result<Config, ConfigError> {
        load(&format!("server: {{master_key: k, {extra}}}\ncredentials: [{{name: a, api_key: x, base_url: 'http://h'}}]"), &no_env)
    }

    #[test]
    fn non_string_secrets_are_named_without_their_value() {
        let e = err("server: {master_key: k}\ncredentials: [{name: a, api_key: 12345678, base_url: 'http://h'}]");
        assert!(e.starts_with("credentials[0] (a): api_key must be a string"), "{e}");
        assert!(!e.contains("12345678"), "{e}");
        for v in ["87654321", "true", "1.23456789", "[sk-in-a-list]", "{k: sk-in-a-map}"] {
            let e = err(&format!("server: {{master_key: {v}}}\ncredentials: [{{name: a, api_key: x, base_url: 'http://h'}}]"));
            assert!(e.starts_with("configuration: server: master_key must be a string"), "{e}");
            for secret in ["87654321", "1.23456789", "sk-in-a-list", "sk-in-a-map"] {
                assert!(!e.contains(secret), "{e}");
            }
        }
        // null is the same as absent.
        assert_eq!(
            err("server: {master_key: null}\ncredentials: [{name: a, api_key: x, base_url: 'http://h'}]"),
            "server.master_key is required"
        );
    }

    #[test]
    fn serde_messages_do_not_quote_values() {
        let cases = [
            (
                "server: {master_key: k}\ncredentials: [\"sk-a-whole-key\"]",
                "credentials[0]: invalid type: a string, expected struct RawCredential",
            ),
            ("server: {master_key: k}\ncredentials: \"sk-a-whole-key\"", "credentials: invalid type: a string, expected a sequence"),
            (
                "server: {master_key: k, replace_v1_models: \"sk-a-\\\"whole\\\"-key\"}\ncredentials: []",
                "server.replace_v1_models: invalid type: a string, expected a boolean",
            ),
            (
                "server: {master_key: k}\ncredentials: [{name: a, api_key: x, base_url: 31415926535}]",
                "credentials[0] (a): invalid type: an integer, expected a string",
            ),
            (
                "server: {master_key: k, replace_v1_models: 2.718281828}\ncredentials: []",
                "server.replace_v1_models: invalid type: a number, expected a boolean",
            ),
        ];
        for (text, want) in cases {
            let e = err(text);
            assert!(e.contains(want), "{e}");
            for secret in ["sk-a-whole-key", "whole", "31415926535", "2.718281828"] {
                assert!(!e.contains(secret), "{e}");
            }
        }
        // Keys are still named.
        assert!(err(&with_cred("colour: red")).contains("unknown field `colour`, expected one of `name`"));
        assert_eq!(
            values::without_values(r#"integer `12` and string "a\\\" b" then boolean `true`"#),
            "an integer and a string then a boolean"
        );
        assert_eq!(values::without_values("cut string \"abc"), "cut a string");
    }

    #[test]
    fn base_url_errors_mask_user_info_and_query() {
        let e = err("server: {master_key: k}\ncredentials: [{name: a, api_key: x, base_url: 'https://u:sk-userinfo-secret@h/v1?api-key=sk-query-secret'}]");
        assert!(e.starts_with("credentials[0] (a): base_url: \"https://***@h/v1?***\" is invalid"), "{e}");
        assert!(!e.contains("sk-userinfo-secret") && !e.contains("sk-query-secret"), "{e}");
    }

    #[test]
    fn body_size_is_capped_at_what_a_wasm_vm_holds() {
        assert_eq!(server("max_body_size_mb: 1024").unwrap().server.max_body_size_bytes, 1024 << 20);
        for v in ["1025", "4096", "0", "-1", "big"] {
            let e = server(&format!("max_body_size_mb: {v}")).unwrap_err().to_string();
            assert!(e.starts_with(&format!("server.max_body_size_mb: {}", if v == "big" { "\"big\"" } else { v })), "{e}");
            assert!(e.contains("1 to 1024"), "{e}");
        }
    }

    #[test]
    fn durations_are_capped_at_a_year() {
        assert_eq!(server("request_timeout: 8760h").unwrap().server.request_timeout, Some(MAX_DURATION));
        assert_eq!(server("request_timeout: 1500ms").unwrap().server.request_timeout, Some(Duration::from_millis(1500)));
        for v in ["8761h", "31536001", "9223372036854775807", "500000000y", "18446744073709551615s"] {
            for key in ["request_timeout", "models_refresh", "cooldown_max"] {
                let e = server(&format!("{key}: {v}")).unwrap_err().to_string();
                assert!(e.starts_with(&format!("server.{key}: ")), "{e}");
                assert!(e.contains("is invalid"), "{e}");
            }
        }
        let e = server("request_timeout: 8761h").unwrap_err().to_string();
        assert_eq!(e, "server.request_timeout: \"8761h\" is invalid (use at most 1 year (8760h))");
        let e = err("server: {master_key: k}\ncredentials: [{name: a, api_key: x, base_url: 'http://h'}]\nfail2ban: {ban_duration: 9000h}");
        assert_eq!(e, "fail2ban.ban_duration: \"9000h\" is invalid (use \"permanent\" or at most 1 year (8760h))");
    }

    #[test]
    fn model_names_longer_than_a_request_can_carry_are_refused() {
        let mut raw = parse_raw("server: {master_key: k}\ncredentials: [{name: a, api_key: x, base_url: 'http://h'}]").unwrap();
        raw.models = vec![RawModel { name: "m".repeat(crate::body::MAX_MODEL_LEN), ..RawModel::default() }];
        assert!(validate(&raw, &no_env).is_ok());
        raw.models.push(RawModel { name: "x".repeat(crate::body::MAX_MODEL_LEN + 1), ..RawModel::default() });
        let e = validate(&raw, &no_env).unwrap_err().to_string();
        assert!(
            e.starts_with(&format!("models[1] ({}...): name: a name of 257 bytes is invalid (use at most 256 bytes", "x".repeat(40))),
            "{e}"
        );
    }

    #[test]
    fn new_server_keys_have_defaults() {
        let s = server("port: 8080").unwrap().server;
        assert!(s.hosts.is_empty());
        assert!(s.host_matches("anything.example:1"));
        assert_eq!(s.max_provider_retries, 2);
        assert_eq!(s.retry_on_status, vec![401, 402, 403, 429, 500, 502, 503, 504]);
        assert_eq!(s.cooldown_default, Duration::from_secs(5));
        assert_eq!(s.cooldown_max, Duration::from_secs(600));
    }

    #[test]
    fn new_server_keys_parse_and_are_validated() {
        let c = server("hosts: [AI.example.com, '*.corp.example:8443', '[::1]'], max_provider_retries: 0, retry_on_status: [429, '503', 429], cooldown_default: 2s, cooldown_max: 1h").unwrap();
        assert_eq!(
            c.server.hosts,
            vec![
                HostMatch::Exact { host: "ai.example.com".into(), port: None },
                HostMatch::Suffix { suffix: ".corp.example".into(), port: Some(8443) },
                HostMatch::Exact { host: "::1".into(), port: None },
            ]
        );
        assert!(c.host_matches("ai.EXAMPLE.com:8080"));
        assert!(c.host_matches("x.corp.example:8443"));
        assert!(!c.host_matches("x.corp.example"));
        assert!(!c.host_matches("other.example.com"));
        assert_eq!(c.server.max_provider_retries, 0);
        assert_eq!(c.server.retry_on_status, vec![429, 503]);
        assert_eq!((c.server.cooldown_default, c.server.cooldown_max), (Duration::from_secs(2), Duration::from_secs(3600)));
        assert!(server("hosts: []").unwrap().server.hosts.is_empty());
        assert_eq!(server("max_provider_retries: 10").unwrap().server.max_provider_retries, 10);
        assert!(server("retry_on_status: []").unwrap().server.retry_on_status.is_empty());

        let cases = [
            ("hosts: ai.example.com", "server.hosts: \"ai.example.com\" is invalid (use a list of host names"),
            ("hosts: ['a b']", "server.hosts[0]: \"a b\" is invalid (the host has characters"),
            ("hosts: [ok.example, 'x.*.example']", "server.hosts[1]: \"x.*.example\" is invalid (a wildcard is allowed only"),
            ("hosts: [5]", "server.hosts[0]: 5 is invalid"),
            ("hosts: ['h:0']", "server.hosts[0]: \"h:0\" is invalid (port must be 1-65535)"),
            ("hosts: ['::1']", "server.hosts[0]: \"::1\" is invalid (an IPv6 address needs brackets"),
            ("hosts: [a.example, A.Example]", "server.hosts[1]: duplicate name \"A.Example\""),
            ("max_provider_retries: 11", "server.max_provider_retries: 11 is invalid (use a number from 0 to 10)"),
            ("max_provider_retries: -1", "server.max_provider_retries: -1 is invalid"),
            ("max_provider_retries: many", "server.max_provider_retries: \"many\" is invalid"),
            ("retry_on_status: [429, 399]", "server.retry_on_status[1]: 399 is invalid (use an HTTP status from 400 to 599)"),
            ("retry_on_status: [600]", "server.retry_on_status[0]: 600 is invalid"),
            ("retry_on_status: 429", "server.retry_on_status: 429 is invalid (use a list of HTTP statuses"),
            ("cooldown_default: 0s", "server.cooldown_default: \"0s\" is invalid (use a duration"),
            ("cooldown_default: -1", "server.cooldown_default: -1 is invalid"),
            ("cooldown_max: soon", "server.cooldown_max: \"soon\" is invalid"),
            ("cooldown_default: 20m", "server.cooldown_default: \"20m\" is invalid (server.cooldown_default (20m) must not be longer than server.cooldown_max (10m))"),
            ("cooldown_max: 1s", "server.cooldown_max: \"1s\" is invalid (server.cooldown_default (5s) must not be longer than server.cooldown_max (1s))"),
            ("retry_statuses: [500]", "unknown field `retry_statuses`"),
            ("attempt_timeout: 10ms", "server.attempt_timeout: \"10ms\" is invalid (use at least 100ms)"),
            ("attempt_timeout: 30s, max_provider_retries: 0", "server.attempt_timeout: \"30s\" is invalid (it abandons a silent attempt for another key"),
            ("attempt_timeout: 10m", "server.attempt_timeout: \"10m\" is invalid (it must be shorter than server.request_timeout"),
            ("attempt_timeout: -1", "server.attempt_timeout: -1 is invalid"),
            ("body_idle_timeout: 5ms", "server.body_idle_timeout: \"5ms\" is invalid (use at least 100ms"),
            ("queue_timeout: 2m", "server.queue_timeout: \"2m\" is invalid (a waiting request is cut by server.body_idle_timeout"),
            ("queue_max: 0", "server.queue_max: 0 is invalid (use a number from 1 to 10000)"),
        ];
        for (extra, want) in cases {
            let e = server(extra).unwrap_err().to_string();
            assert!(e.contains(want), "{extra}: {e}");
        }
    }

    #[test]
    fn tpm_on_credentials_and_models() {
        let c = load(&with_cred("tpm: 90000"), &no_env).unwrap();
        assert_eq!(c.credentials[0].tpm, Tpm::Limit(90000));
        assert_eq!(c.credentials[0].rpm, Rpm::Unlimited);
        assert_eq!(load(&with_cred("tpm: -1"), &no_env).unwrap().credentials[0].tpm, Rpm::Unlimited);
        assert_eq!(load(&with_cred("rpm: 5"), &no_env).unwrap().credentials[0].tpm, Rpm::Unlimited);
        assert_eq!(err(&with_cred("tpm: 0")), "credentials[0] (a): tpm: 0 is invalid (use a positive number or -1)");
        assert!(err(&with_cred("tpm: -2")).contains("credentials[0] (a): tpm: -2 is invalid"));

        let mut raw = parse_raw("server: {master_key: k}\ncredentials: [{name: a, api_key: x, base_url: 'http://h'}]").unwrap();
        raw.models =
            parse_models_yaml("models:\n  - {name: big, rpm: 5, tpm: 100000}\n  - {name: free, tpm: -1}\n  - {name: plain}\n").unwrap();
        let c = validate(&raw, &no_env).unwrap();
        assert_eq!(c.model_tpm("big"), Tpm::Limit(100000));
        assert_eq!(c.model_rpm("big"), Rpm::Limit(5));
        assert_eq!(c.model_tpm("free"), Tpm::Unlimited);
        assert_eq!(c.model_rpm("free"), Rpm::Limit(50));
        assert_eq!(c.model_tpm("plain"), Tpm::Unlimited);
        assert_eq!(c.model_tpm("unknown"), Tpm::Unlimited);
        raw.models = parse_models_yaml("models: [{name: m, tpm: 0}]").unwrap();
        assert_eq!(validate(&raw, &no_env).unwrap_err().to_string(), "models[0] (m): tpm: 0 is invalid (use a positive number or -1)");
        // The plugin document (JSON) carries the new keys through.
        let raw = parse_raw(&format!("{}\nmodels: [{{name: m, tpm: 7}}]", with_cred("tpm: 9"))).unwrap();
        let again = parse_raw(&serde_json::to_string(&raw).unwrap()).unwrap();
        assert_eq!(validate(&again, &no_env).unwrap(), validate(&raw, &no_env).unwrap());
    }

    #[test]
    fn masks_secrets() {
        assert_eq!(mask("sk-proj-abcdefghijklmnopqrstuvwxyz012345"), "sk-proj...");
        assert_eq!(mask("sk-proj-abcdefgh"), "sk-p...");
        assert_eq!(mask("abcdefgh"), "ab...");
        assert_eq!(mask("abc"), "...");
        assert_eq!(mask(""), "...");
    }
}
