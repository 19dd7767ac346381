//! Master-key check: `Authorization: Bearer <master_key>`, compared in constant time.

use subtle::ConstantTimeEq;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthError {
    Missing,
    /// Not `Bearer <token>`.
    Malformed,
    WrongKey,
}

impl AuthError {
    pub fn message(self) -> &'static str {
        match self {
            AuthError::Missing => "Missing Authorization header. Send 'Authorization: Bearer <master key>'.",
            AuthError::Malformed => "Malformed Authorization header. Expected 'Bearer <master key>'.",
            AuthError::WrongKey => "Invalid API key provided.",
        }
    }

    pub fn code(self) -> &'static str {
        match self {
            AuthError::Missing => "missing_api_key",
            AuthError::Malformed => "invalid_authorization_header",
            AuthError::WrongKey => "invalid_api_key",
        }
    }
}

/// The auth scheme is case-insensitive (RFC 9110 §11.1); exactly one space separates the token,
/// which must not be empty. Anything else in the token is compared as given.
pub fn check(header: Option<&str>, master_key: &str) -> Result<(), AuthError> {
    let value = match header {
        None => return Err(AuthError::Missing),
        Some(v) if v.trim().is_empty() => return Err(AuthError::Missing),
        Some(v) => v,
    };
    let (scheme, token) = value.split_once(' ').ok_or(AuthError::Malformed)?;
    if !scheme.eq_ignore_ascii_case("bearer") || token.trim().is_empty() {
        return Err(AuthError::Malformed);
    }
    if bool::from(token.as_bytes().ct_eq(master_key.as_bytes())) {
        Ok(())
    } else {
        Err(AuthError::WrongKey)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn three_distinct_failures() {
        let k = "sk-master";
        assert_eq!(check(None, k), Err(AuthError::Missing));
        assert_eq!(check(Some(""), k), Err(AuthError::Missing));
        assert_eq!(check(Some("Basic c2s="), k), Err(AuthError::Malformed));
        assert_eq!(check(Some("sk-master"), k), Err(AuthError::Malformed));
        assert_eq!(check(Some("Bearer "), k), Err(AuthError::Malformed));
        assert_eq!(check(Some("Bearer sk-other"), k), Err(AuthError::WrongKey));
        assert_eq!(check(Some("Bearer sk-maste"), k), Err(AuthError::WrongKey), "a prefix is not the key");
        assert_eq!(check(Some("Bearer sk-master2"), k), Err(AuthError::WrongKey));
        assert_eq!(check(Some("Bearer  sk-master"), k), Err(AuthError::WrongKey), "two spaces: the token starts with one");
        assert_eq!(check(Some("Bearer sk-master"), k), Ok(()));
        assert_eq!(check(Some("bearer sk-master"), k), Ok(()));
        let messages = [AuthError::Missing, AuthError::Malformed, AuthError::WrongKey].map(AuthError::message);
        assert!(messages[0] != messages[1] && messages[1] != messages[2]);
        assert!(!messages.iter().any(|m| m.contains(k)));
    }
}
