//! `global_limits`: RPM limits that hold across Envoy replicas, checked with a rate-limit service
//! (Envoy's RLS v3 protocol, e.g. envoyproxy/ratelimit over Redis).

use super::values::{int_in, invalid};
use super::ConfigError;
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// The cluster the CLI renders for `global_limits.service` (HTTP/2, as gRPC needs).
pub const RLS_CLUSTER: &str = "auto_ai_router_rls";
pub const DEFAULT_DOMAIN: &str = "auto-ai-router";
pub const DEFAULT_TIMEOUT: Duration = Duration::from_millis(100);
pub const DEFAULT_BREAKER: Duration = Duration::from_secs(5);
pub const MAX_LEASE: i64 = 1000;

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RawGlobalLimits {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<serde_yaml::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain: Option<serde_yaml::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<serde_yaml::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease: Option<serde_yaml::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_unavailable: Option<serde_yaml::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas: Option<serde_yaml::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub breaker: Option<serde_yaml::Value>,
}

/// What a request gets while the rate-limit service can't answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnUnavailable {
    /// 503 `rate_limit_service_unavailable` (fail closed).
    Deny,
    /// Local limits only: N replicas may admit up to N× a key's RPM.
    Allow,
    /// Each replica enforces its share, `floor(rpm / replicas)`, in its local windows.
    Local,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GlobalLimits {
    /// `host:port` of the service.
    pub host: String,
    pub port: u16,
    pub domain: String,
    pub timeout: Duration,
    /// Slots one call takes (`hits_addend`); the spare ones are kept until the service's window ends.
    pub lease: u32,
    pub on_unavailable: OnUnavailable,
    pub replicas: u32,
    /// How long the service is skipped after it failed.
    pub breaker: Duration,
}

impl GlobalLimits {
    /// This replica's share of a limit when the service is down and `on_unavailable: local`.
    pub fn share(&self, limit: u32) -> u32 {
        limit / self.replicas.max(1)
    }
}

fn string<'a>(key: &str, v: &'a serde_yaml::Value, hint: &str) -> Result<&'a str, ConfigError> {
    v.as_str().map(str::trim).filter(|s| !s.is_empty()).ok_or_else(|| invalid(key, v, hint))
}

fn duration(key: &str, v: Option<&serde_yaml::Value>, default: Duration, max: Duration) -> Result<Duration, ConfigError> {
    let Some(v) = v else { return Ok(default) };
    let hint = format!("use a duration like \"100ms\" or \"1s\", at most {}", humantime::format_duration(max));
    match super::values::duration_of(v, false) {
        Ok(Some(d)) if d <= max => Ok(d),
        _ => Err(invalid(key, v, &hint)),
    }
}

pub(crate) fn validate(g: &RawGlobalLimits) -> Result<GlobalLimits, ConfigError> {
    const SERVICE_HINT: &str = "use host:port of the rate-limit service, like \"ratelimit:8081\"";
    let service = match &g.service {
        None => return Err(ConfigError::Missing { key: "global_limits.service".into() }),
        Some(v) => string("global_limits.service", v, SERVICE_HINT)?,
    };
    let (host, port) = match service.rsplit_once(':') {
        Some((h, p)) if !h.is_empty() && !h.contains('/') && !h.contains(' ') => match p.parse::<u16>() {
            Ok(port) if port > 0 => (h.trim_start_matches('[').trim_end_matches(']').to_string(), port),
            _ => return Err(invalid("global_limits.service", g.service.as_ref().unwrap_or(&serde_yaml::Value::Null), SERVICE_HINT)),
        },
        _ => return Err(invalid("global_limits.service", g.service.as_ref().unwrap_or(&serde_yaml::Value::Null), SERVICE_HINT)),
    };
    let domain = match &g.domain {
        None => DEFAULT_DOMAIN.to_string(),
        Some(v) => string("global_limits.domain", v, "use the domain of the service's config, like \"auto-ai-router\"")?.to_string(),
    };
    let timeout = duration("global_limits.timeout", g.timeout.as_ref(), DEFAULT_TIMEOUT, Duration::from_secs(10))?;
    let breaker = duration("global_limits.breaker", g.breaker.as_ref(), DEFAULT_BREAKER, Duration::from_secs(600))?;
    let lease = match &g.lease {
        None => 1,
        Some(v) => int_in("global_limits.lease", v, 1..=MAX_LEASE, "use a number of slots per call from 1 to 1000")? as u32,
    };
    let on_unavailable = match &g.on_unavailable {
        None => OnUnavailable::Deny,
        Some(v) => match v.as_str().map(|s| s.trim().to_ascii_lowercase()).as_deref() {
            Some("deny") => OnUnavailable::Deny,
            Some("allow") => OnUnavailable::Allow,
            Some("local") => OnUnavailable::Local,
            _ => return Err(invalid("global_limits.on_unavailable", v, "use deny, allow or local")),
        },
    };
    let replicas = match &g.replicas {
        None if on_unavailable == OnUnavailable::Local => {
            return Err(ConfigError::Invalid {
                key: "global_limits.replicas".into(),
                value: "(not set)".into(),
                hint: "on_unavailable: local needs the number of Envoy replicas, like replicas: 3".into(),
            })
        }
        None => 1,
        Some(v) => int_in("global_limits.replicas", v, 1..=10_000, "use the number of Envoy replicas, 1 or more")? as u32,
    };
    Ok(GlobalLimits { host, port, domain, timeout, lease, on_unavailable, replicas, breaker })
}

#[cfg(test)]
mod tests {
    use crate::config::{load, OnUnavailable};
    use std::time::Duration;

    fn with(global: &str) -> Result<crate::config::Config, String> {
        let text = format!(
            "server: {{master_key: mk}}\ncredentials:\n  - {{name: a, api_key: k, base_url: 'http://a.test', rpm: 60}}\nglobal_limits: {global}\n"
        );
        load(&text, &|_| None).map_err(|e| e.to_string())
    }

    #[test]
    fn defaults_and_every_key() {
        let g = with("{service: 'ratelimit:8081'}").unwrap().global.unwrap();
        assert_eq!((g.host.as_str(), g.port, g.domain.as_str()), ("ratelimit", 8081, "auto-ai-router"));
        assert_eq!(
            (g.timeout, g.lease, g.on_unavailable, g.breaker),
            (Duration::from_millis(100), 1, OnUnavailable::Deny, Duration::from_secs(5))
        );
        let g = with("{service: '127.0.0.1:9', domain: d, timeout: 20ms, lease: 10, on_unavailable: local, replicas: 3, breaker: 2s}")
            .unwrap()
            .global
            .unwrap();
        assert_eq!((g.lease, g.replicas, g.on_unavailable, g.share(100)), (10, 3, OnUnavailable::Local, 33));
        assert!(with("{service: 'r:1'}").is_ok());
        let none = "server: {master_key: mk}\ncredentials:\n  - {name: a, api_key: k, base_url: 'http://a.test'}\n";
        assert_eq!(load(none, &|_| None).unwrap().global, None);
    }

    #[test]
    fn mistakes_name_the_key_and_value() {
        for (doc, needle) in [
            ("{}", "global_limits.service is required"),
            ("{service: ratelimit}", "global_limits.service: \"ratelimit\" is invalid"),
            ("{service: 'r:0'}", "global_limits.service"),
            ("{service: 'r:1', lease: 0}", "global_limits.lease: 0 is invalid"),
            ("{service: 'r:1', on_unavailable: open}", "global_limits.on_unavailable: \"open\" is invalid (use deny, allow or local)"),
            ("{service: 'r:1', on_unavailable: local}", "global_limits.replicas"),
            ("{service: 'r:1', timeout: 1h}", "global_limits.timeout"),
            ("{service: 'r:1', replicas: 0}", "global_limits.replicas: 0 is invalid"),
            ("{service: 'r:1', extra: 1}", "unknown field `extra`"),
        ] {
            let e = with(doc).unwrap_err();
            assert!(e.contains(needle), "{doc}: {e}");
        }
    }
}
