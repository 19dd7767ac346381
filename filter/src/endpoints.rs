//! What a request path is, for routing decisions and metric labels.

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    Health,
    /// Not ours (e.g. `/metrics`, 404s): Envoy's routes handle it.
    NotRouter,
    /// A path we refuse outright (traversal, encoded separators).
    BadPath,
    ListModels,
    GetModel(String),
    /// `GET /v1/credentials`: each credential's state, for operators.
    Credentials,
    /// JSON body with a required top-level `model`.
    Inference,
    /// Any other `/v1/*`: routed without a model.
    OtherV1,
}

/// Endpoints whose JSON body must carry `model`.
pub const INFERENCE: [&str; 6] =
    ["/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses", "/v1/images/generations", "/v1/audio/speech"];

/// Further endpoints with their own metric label; everything else is "other" (labels stay bounded).
const LABELLED: [&str; 5] = ["/v1/audio/transcriptions", "/v1/moderations", "/v1/models", "/v1/credentials", "/health"];

pub fn path_only(path: &str) -> &str {
    path.split(['?', '#']).next().unwrap_or("")
}

fn suspicious(path: &str) -> bool {
    let lower = path.to_ascii_lowercase();
    path.split('/').any(|seg| seg == ".." || seg == ".")
        || lower.contains("%2e")
        || lower.contains("%2f")
        || lower.contains("%5c")
        || path.contains('\\')
        || path.contains("//")
}

pub fn classify(method: &str, path: &str) -> Route {
    let p = path_only(path);
    if p == "/health" {
        return Route::Health;
    }
    if !(p == "/v1" || p.starts_with("/v1/")) {
        return Route::NotRouter;
    }
    if suspicious(p) {
        return Route::BadPath;
    }
    let p = p.trim_end_matches('/');
    if method == "GET" {
        if p == "/v1/models" {
            return Route::ListModels;
        }
        if p == "/v1/credentials" {
            return Route::Credentials;
        }
        if let Some(id) = p.strip_prefix("/v1/models/") {
            return Route::GetModel(id.to_string());
        }
    }
    if method == "POST" && INFERENCE.contains(&p) {
        return Route::Inference;
    }
    Route::OtherV1
}

pub fn label(path: &str) -> &'static str {
    let p = path_only(path).trim_end_matches('/');
    if p.starts_with("/v1/models/") {
        return "/v1/models";
    }
    INFERENCE.iter().chain(LABELLED.iter()).find(|l| **l == p).copied().unwrap_or("other")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classification() {
        assert_eq!(classify("GET", "/health"), Route::Health);
        assert_eq!(classify("GET", "/metrics"), Route::NotRouter);
        assert_eq!(classify("GET", "/v1x"), Route::NotRouter);
        assert_eq!(classify("POST", "/v1/chat/completions?x=1"), Route::Inference);
        assert_eq!(classify("POST", "/v1/embeddings/"), Route::Inference);
        assert_eq!(classify("GET", "/v1/chat/completions"), Route::OtherV1);
        assert_eq!(classify("GET", "/v1/models"), Route::ListModels);
        assert_eq!(classify("GET", "/v1/credentials"), Route::Credentials);
        assert_eq!(classify("POST", "/v1/credentials"), Route::OtherV1);
        assert_eq!(classify("GET", "/v1/models/gpt-4o"), Route::GetModel("gpt-4o".into()));
        assert_eq!(classify("POST", "/v1/files"), Route::OtherV1);
        for bad in ["/v1/../admin", "/v1/%2e%2e/admin", "/v1/a%2Fb", "/v1//x", "/v1/./x"] {
            assert_eq!(classify("GET", bad), Route::BadPath, "{bad}");
        }
    }

    #[test]
    fn labels_are_bounded() {
        assert_eq!(label("/v1/chat/completions?stream=1"), "/v1/chat/completions");
        assert_eq!(label("/v1/models/abc"), "/v1/models");
        assert_eq!(label("/v1/anything-else"), "other");
    }
}
