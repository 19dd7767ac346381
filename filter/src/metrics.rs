//! Metric names. Labels travel inside the stat name, Istio-style (`name.key=.=value;.;`), and
//! Envoy's `stats_config.stats_tags` regexes turn them back into Prometheus labels.

pub const REQUESTS_TOTAL: &str = "auto_ai_router_requests_total";
/// Milliseconds: proxy-wasm histograms take integers, and Envoy does not convert units.
pub const REQUEST_DURATION: &str = "auto_ai_router_requests_duration_milliseconds";
pub const CREDENTIAL_RPM_CURRENT: &str = "auto_ai_router_credential_rpm_current";
pub const CREDENTIAL_BANNED: &str = "auto_ai_router_credential_banned";
/// 1 while a provider asked us to rest the key (Retry-After and friends), else 0.
pub const CREDENTIAL_COOLDOWN: &str = "auto_ai_router_credential_cooldown";
/// Tokens the providers reported: `{credential, model, type}` with type `prompt` / `completion`.
pub const TOKENS_TOTAL: &str = "auto_ai_router_tokens_total";
/// Answers that reported no usage (a stream without `include_usage`, a provider without `usage`).
pub const USAGE_MISSING_TOTAL: &str = "auto_ai_router_usage_missing_total";
pub const CREDENTIAL_ERRORS_TOTAL: &str = "auto_ai_router_credential_errors_total";
pub const REJECTIONS_TOTAL: &str = "auto_ai_router_rejections_total";
pub const MODEL_REQUESTS_TOTAL: &str = "auto_ai_router_model_requests_total";
/// A fail2ban update that could not be written (shared-data contention or a host error): counted
/// and logged, never dropped silently.
/// A failed attempt retried on another credential: `{credential, reason}` (the status, or
/// `connect_failure`).
pub const RETRIES_TOTAL: &str = "auto_ai_router_retries_total";
/// Microseconds the router held a request before it was routed or answered (from its request
/// headers to the routing decision or the local reply; includes waiting for the body).
pub const OVERHEAD: &str = "auto_ai_router_overhead_microseconds";
/// How long requests waited for a key (`server.queue_timeout`), in milliseconds.
pub const QUEUE_WAIT: &str = "auto_ai_router_queue_wait_milliseconds";
pub const STATE_CONFLICTS_TOTAL: &str = "auto_ai_router_state_conflicts_total";
/// Calls to the rate-limit service (global limits): `{result}` = `ok`, `over_limit` or `error`.
pub const GLOBAL_CHECKS_TOTAL: &str = "auto_ai_router_global_checks_total";

/// Label keys, for the renderer's `stats_tags`.
pub const LABELS: [&str; 7] = ["credential", "endpoint", "status", "model", "reason", "type", "result"];

/// Characters that would break tag extraction are replaced.
fn push_clean(out: &mut String, value: &str) {
    // Fast path (the usual case): printable ASCII without `;` or `=` is copied as is.
    if value.bytes().all(|b| (0x20..0x7f).contains(&b) && b != b';' && b != b'=') {
        out.push_str(value);
        return;
    }
    out.extend(value.chars().map(|c| if c == ';' || c == '=' || c.is_control() { '_' } else { c }));
}

/// Appends the stat name for `base` with `labels` to `out` (the request path reuses one buffer).
pub fn write_stat_name(out: &mut String, base: &str, labels: &[(&str, &str)]) {
    out.reserve(base.len() + 48 * labels.len());
    out.push_str(base);
    for (k, v) in labels {
        out.push('.');
        out.push_str(k);
        out.push_str("=.=");
        push_clean(out, v);
        out.push_str(";.;");
    }
}

pub fn stat_name(base: &str, labels: &[(&str, &str)]) -> String {
    let mut name = String::new();
    write_stat_name(&mut name, base, labels);
    name
}

/// FxHash for the per-worker metric-id caches: keys are our own bounded label values, so a keyed
/// SipHash buys nothing and costs several times more per lookup.
pub use rustc_hash::FxBuildHasher;

/// The Envoy `stats_tags` regex that extracts label `key` from a name made by `stat_name`.
pub fn tag_regex(key: &str) -> String {
    format!(r"(\.{key}=\.=(.*?);\.;)")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_carry_labels() {
        assert_eq!(
            stat_name(REQUESTS_TOTAL, &[("credential", "a"), ("status", "200")]),
            "auto_ai_router_requests_total.credential=.=a;.;.status=.=200;.;"
        );
        assert_eq!(stat_name("x", &[("model", "we;ird=m")]), "x.model=.=we_ird_m;.;");
        assert_eq!(stat_name("x", &[("model", "a\tb\u{7f}c\u{85}é")]), "x.model=.=a_b_c_é;.;");
        let mut buf = String::from("stale");
        buf.clear();
        write_stat_name(&mut buf, REQUESTS_TOTAL, &[("credential", "a"), ("status", "200")]);
        assert_eq!(buf, stat_name(REQUESTS_TOTAL, &[("credential", "a"), ("status", "200")]));
    }
}
