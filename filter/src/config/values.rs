//! Scalar values as users write them: integers given as numbers or strings, limits where -1 means
//! none, Go-style durations, and secrets (resolved from the environment, never echoed).

use super::{ConfigError, Rpm, ENV_PREFIX};
use serde::de::{Deserialize, Deserializer, Error as _};
use std::time::Duration;

/// The longest duration any key accepts: longer is a typo, and millisecond counts stay far from
/// the integer widths Envoy and the filter convert them to.
pub const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);

pub(crate) fn describe(v: &serde_yaml::Value) -> String {
    match v {
        serde_yaml::Value::String(s) => format!("{s:?}"),
        serde_yaml::Value::Null => "null".into(),
        other => serde_yaml::to_string(other).map(|s| s.trim_end().to_string()).unwrap_or_else(|_| "?".into()),
    }
}

pub(crate) fn invalid(key: &str, v: &serde_yaml::Value, hint: &str) -> ConfigError {
    ConfigError::Invalid { key: key.into(), value: describe(v), hint: hint.into() }
}

/// An integer given as a number or a numeric string ("-1").
pub(crate) fn as_int(v: &serde_yaml::Value) -> Option<i64> {
    match v {
        serde_yaml::Value::Number(n) => n.as_i64(),
        serde_yaml::Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

/// A per-minute limit (`rpm`, `tpm`): a positive number, or -1 for none. 0 is refused.
pub(crate) fn limit_value(key: &str, v: &serde_yaml::Value) -> Result<Rpm, ConfigError> {
    const HINT: &str = "use a positive number or -1";
    match as_int(v) {
        Some(-1) => Ok(Rpm::Unlimited),
        Some(n) if n > 0 && n <= u32::MAX as i64 => Ok(Rpm::Limit(n as u32)),
        _ => Err(invalid(key, v, HINT)),
    }
}

/// An integer in `range`, else an error with `hint`.
pub(crate) fn int_in(key: &str, v: &serde_yaml::Value, range: std::ops::RangeInclusive<i64>, hint: &str) -> Result<i64, ConfigError> {
    match as_int(v) {
        Some(n) if range.contains(&n) => Ok(n),
        _ => Err(invalid(key, v, hint)),
    }
}

pub(crate) enum DurationError {
    Malformed,
    TooLong,
}

/// A Go-style duration ("30s", "5m", "1h30m", "250ms") or a bare number of seconds, at most
/// [`MAX_DURATION`]; `allow_off` accepts -1 (number or string) as `None`.
pub(crate) fn duration_of(v: &serde_yaml::Value, allow_off: bool) -> Result<Option<Duration>, DurationError> {
    let d = match as_int(v) {
        Some(-1) if allow_off => return Ok(None),
        // A bare number of seconds is what YAML users often mean.
        Some(n) if n > 0 => Duration::from_secs(n as u64),
        Some(_) => return Err(DurationError::Malformed),
        None => match v.as_str().map(|s| humantime::parse_duration(s.trim())) {
            Some(Ok(d)) if !d.is_zero() => d,
            _ => return Err(DurationError::Malformed),
        },
    };
    if d > MAX_DURATION {
        return Err(DurationError::TooLong);
    }
    Ok(Some(d))
}

pub(crate) const TOO_LONG: &str = "use at most 1 year (8760h)";

/// [`duration_of`] with an error that names `key` and the value.
pub fn parse_duration(key: &str, v: &serde_yaml::Value, allow_off: bool) -> Result<Option<Duration>, ConfigError> {
    duration_of(v, allow_off).map_err(|e| match e {
        DurationError::TooLong => invalid(key, v, TOO_LONG),
        DurationError::Malformed if allow_off => invalid(key, v, "use a duration like \"30s\", \"5m\", \"1h\", or -1 for none"),
        DurationError::Malformed => invalid(key, v, "use a duration like \"30s\", \"5m\", \"1h\""),
    })
}

/// serde's message without the values it quotes (`invalid type: string "sk-…"`, `integer
/// `12345678``): the document may have put a secret anywhere. Keys (`unknown field `x``) stay.
pub(crate) fn without_values(msg: &str) -> String {
    const VALUES: [(&str, char, &str); 5] = [
        ("string \"", '"', "a string"),
        ("integer `", '`', "an integer"),
        ("floating point `", '`', "a number"),
        ("boolean `", '`', "a boolean"),
        ("character `", '`', "a character"),
    ];
    let mut out = String::with_capacity(msg.len());
    let mut rest = msg;
    while let Some((at, prefix, close, shown)) =
        VALUES.iter().filter_map(|&(p, c, r)| rest.find(p).map(|i| (i, p, c, r))).min_by_key(|&(i, ..)| i)
    {
        out.push_str(&rest[..at]);
        out.push_str(shown);
        let value = &rest[at + prefix.len()..];
        // Strings are Debug-escaped: the first unescaped quote ends them.
        let mut escaped = false;
        let end = value.char_indices().find(|&(_, c)| {
            let end = !escaped && c == close;
            escaped = !escaped && c == '\\';
            end
        });
        rest = match end {
            Some((i, c)) => &value[i + c.len_utf8()..],
            None => "",
        };
    }
    out.push_str(rest);
    out
}

/// The value of a secret key: literal, or `os.environ/NAME` looked up through `env`.
pub(crate) fn resolve_secret(key: &str, value: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<String, ConfigError> {
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

/// A secret that is not a string (`api_key: 12345678`) must not reach serde's "invalid type:
/// integer `12345678`" message: it is refused without its value.
fn secret<'de, D: Deserializer<'de>>(d: D, what: &str) -> Result<Option<String>, D::Error> {
    match Option::<serde_yaml::Value>::deserialize(d)? {
        None | Some(serde_yaml::Value::Null) => Ok(None),
        Some(serde_yaml::Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(D::Error::custom(format!("{what} must be a string (put it in quotes); its value is not shown"))),
    }
}

pub(crate) fn master_key<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    secret(d, "master_key")
}

pub(crate) fn api_key<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    secret(d, "api_key")
}
