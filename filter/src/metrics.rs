//! Metric names. Labels travel inside the stat name, Istio-style (`name.key=.=value;.;`), and
//! Envoy's `stats_config.stats_tags` regexes turn them back into Prometheus labels.

pub const REQUESTS_TOTAL: &str = "auto_ai_router_requests_total";
/// Milliseconds: proxy-wasm histograms take integers, and Envoy does not convert units.
pub const REQUEST_DURATION: &str = "auto_ai_router_requests_duration_milliseconds";
pub const CREDENTIAL_RPM_CURRENT: &str = "auto_ai_router_credential_rpm_current";
pub const CREDENTIAL_BANNED: &str = "auto_ai_router_credential_banned";
pub const CREDENTIAL_ERRORS_TOTAL: &str = "auto_ai_router_credential_errors_total";
pub const REJECTIONS_TOTAL: &str = "auto_ai_router_rejections_total";
pub const MODEL_REQUESTS_TOTAL: &str = "auto_ai_router_model_requests_total";

/// Label keys, for the renderer's `stats_tags`.
pub const LABELS: [&str; 5] = ["credential", "endpoint", "status", "model", "reason"];

/// Characters that would break tag extraction are replaced.
fn clean(value: &str) -> String {
    value.chars().map(|c| if c == ';' || c == '=' || c.is_control() { '_' } else { c }).collect()
}

pub fn stat_name(base: &str, labels: &[(&str, &str)]) -> String {
    let mut name = String::with_capacity(base.len() + 48 * labels.len());
    name.push_str(base);
    for (k, v) in labels {
        name.push('.');
        name.push_str(k);
        name.push_str("=.=");
        name.push_str(&clean(v));
        name.push_str(";.;");
    }
    name
}

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
    }
}
