//! The status an upstream attempt counts as for fail2ban and metrics, from the response status
//! and Envoy's `response.code_details`.

/// Envoy's own replies for connect failures and timeouts count as 502 and 504 (an upstream's real
/// 503 stays 503). None: Envoy's own overload (a circuit breaker of the credential's cluster
/// overflowed, `UO`): load on our side, no provider answered, so nothing the credential is
/// accounted for.
pub fn effective_status(status: u16, code_details: &str) -> Option<u16> {
    if status != 503 && status != 504 {
        return Some(status);
    }
    Some(if code_details.contains("overflow") {
        return None;
    } else if code_details.contains("timeout") {
        504
    } else if code_details.starts_with("upstream_reset")
        || code_details.contains("connection_failure")
        || code_details.starts_with("no_healthy_upstream")
    {
        502
    } else {
        status
    })
}

/// Whether `effective_status` needs the code details (saves a property read on most responses).
pub fn needs_details(status: u16) -> bool {
    status == 503 || status == 504
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envoy_local_failures_map_to_502_504() {
        assert_eq!(effective_status(200, ""), Some(200));
        assert_eq!(effective_status(503, "via_upstream"), Some(503), "the provider's own 503");
        assert_eq!(effective_status(503, "upstream_reset_before_response_started{connection_failure}"), Some(502));
        assert_eq!(effective_status(503, "upstream_reset_before_response_started{remote_reset}"), Some(502));
        assert_eq!(effective_status(504, "upstream_response_timeout"), Some(504));
        assert_eq!(effective_status(503, "no_healthy_upstream"), Some(502));
        assert_eq!(effective_status(503, "upstream_reset_before_response_started{overflow}"), None, "circuit breaker: ours, not the key's");
        assert!(needs_details(503) && !needs_details(429));
    }
}
