//! The status an upstream attempt counts as for fail2ban and metrics, from the response status
//! and Envoy's `response.code_details`.

/// Envoy's own replies for connect failures and timeouts count as 502 and 504 (an upstream's real
/// 503 stays 503). Local overload (circuit-breaker overflow) is not the credential's fault and
/// keeps its status.
pub fn effective_status(status: u16, code_details: &str) -> u16 {
    if status != 503 && status != 504 {
        return status;
    }
    if code_details.contains("overflow") {
        status
    } else if code_details.contains("timeout") {
        504
    } else if code_details.starts_with("upstream_reset")
        || code_details.contains("connection_failure")
        || code_details.starts_with("no_healthy_upstream")
    {
        502
    } else {
        status
    }
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
        assert_eq!(effective_status(200, ""), 200);
        assert_eq!(effective_status(503, "via_upstream"), 503, "the provider's own 503");
        assert_eq!(effective_status(503, "upstream_reset_before_response_started{connection_failure}"), 502);
        assert_eq!(effective_status(503, "upstream_reset_before_response_started{remote_reset}"), 502);
        assert_eq!(effective_status(504, "upstream_response_timeout"), 504);
        assert_eq!(effective_status(503, "no_healthy_upstream"), 502);
        assert_eq!(effective_status(503, "upstream_reset_before_response_started{overflow}"), 503, "circuit breaker: ours, not the key's");
        assert!(needs_details(503) && !needs_details(429));
    }
}
