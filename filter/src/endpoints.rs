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

/// Traversal and encoded separators: a `.` or `..` segment, `%2e`/`%2f`/`%5c` in any case, a
/// backslash or `//`. One pass over the bytes, no allocation (every router request runs it).
fn suspicious(path: &str) -> bool {
    let b = path.as_bytes();
    let mut seg_start = 0;
    for (i, &c) in b.iter().enumerate() {
        match c {
            b'\\' => return true,
            b'%' => {
                let pair = (b.get(i + 1).map(u8::to_ascii_lowercase), b.get(i + 2).map(u8::to_ascii_lowercase));
                if matches!(pair, (Some(b'2'), Some(b'e' | b'f')) | (Some(b'5'), Some(b'c'))) {
                    return true;
                }
            }
            b'/' => {
                if matches!(&b[seg_start..i], b"." | b"..") || (i > 0 && b[i - 1] == b'/') {
                    return true;
                }
                seg_start = i + 1;
            }
            _ => {}
        }
    }
    matches!(&b[seg_start..], b"." | b"..")
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
        for bad in
            ["/v1/../admin", "/v1/%2e%2e/admin", "/v1/a%2Fb", "/v1//x", "/v1/./x", "/v1/..", "/v1/.", "/v1/a%5Cb", "/v1/a\\b", "/v1/%2E"]
        {
            assert_eq!(classify("GET", bad), Route::BadPath, "{bad}");
        }
        for good in ["/v1/a.b", "/v1/...", "/v1/a%20b", "/v1/x.", "/v1/%2", "/v1/%"] {
            assert_ne!(classify("GET", good), Route::BadPath, "{good}");
        }
    }

    /// The allocating version this replaced, as the reference.
    fn suspicious_reference(path: &str) -> bool {
        let lower = path.to_ascii_lowercase();
        path.split('/').any(|seg| seg == ".." || seg == ".")
            || lower.contains("%2e")
            || lower.contains("%2f")
            || lower.contains("%5c")
            || path.contains('\\')
            || path.contains("//")
    }

    proptest::proptest! {
        #[test]
        fn suspicious_matches_the_reference(path in "[/.%25eEfFcCa\\\\x]{0,12}") {
            proptest::prop_assert_eq!(suspicious(&path), suspicious_reference(&path), "{:?}", path);
        }
    }

    #[test]
    fn labels_are_bounded() {
        assert_eq!(label("/v1/chat/completions?stream=1"), "/v1/chat/completions");
        assert_eq!(label("/v1/models/abc"), "/v1/models");
        assert_eq!(label("/v1/anything-else"), "other");
    }
}
