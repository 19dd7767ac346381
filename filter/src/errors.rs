//! OpenAI-style error bodies for the replies the router itself produces.

/// `{"error":{"message","type","param":null,"code"}}`, type chosen by status.
pub fn body(status: u16, message: &str, code: Option<&str>) -> String {
    body_typed(status_type(status), message, code)
}

/// OpenAI's answer for a model nobody serves: 404 with `invalid_request_error`, as OpenAI sends it.
pub fn model_not_found(model: &str) -> String {
    body_typed(
        "invalid_request_error",
        &format!("The model '{model}' does not exist or you do not have access to it."),
        Some("model_not_found"),
    )
}

pub fn status_type(status: u16) -> &'static str {
    match status {
        400 | 413 | 415 => "invalid_request_error",
        401 => "authentication_error",
        403 => "permission_error",
        404 => "not_found_error",
        429 => "rate_limit_error",
        503 => "service_unavailable_error",
        _ => "api_error",
    }
}

pub fn body_typed(kind: &str, message: &str, code: Option<&str>) -> String {
    let code = code.map_or("null".to_string(), json_string);
    format!("{{\"error\":{{\"message\":{},\"type\":\"{kind}\",\"param\":null,\"code\":{code}}}}}", json_string(message))
}

pub fn json_string(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shape_and_types() {
        let v: serde_json::Value = serde_json::from_str(&body(401, "bad \"key\"", Some("invalid_api_key"))).unwrap();
        assert_eq!(v["error"]["type"], "authentication_error");
        assert_eq!(v["error"]["message"], "bad \"key\"");
        assert_eq!(v["error"]["code"], "invalid_api_key");
        assert!(v["error"]["param"].is_null());
        for (s, t) in [
            (400, "invalid_request_error"),
            (413, "invalid_request_error"),
            (404, "not_found_error"),
            (429, "rate_limit_error"),
            (503, "service_unavailable_error"),
        ] {
            let v: serde_json::Value = serde_json::from_str(&body(s, "m", None)).unwrap();
            assert_eq!(v["error"]["type"], t);
            assert!(v["error"]["code"].is_null());
        }
    }
}
