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
/// which must not be empty. The token is compared byte for byte (a non-UTF-8 token is a wrong key).
pub fn check(header: Option<&[u8]>, master_key: &str) -> Result<(), AuthError> {
    let value = match header {
        None => return Err(AuthError::Missing),
        Some(v) if v.trim_ascii().is_empty() => return Err(AuthError::Missing),
        Some(v) => v,
    };
    let space = value.iter().position(|b| *b == b' ').ok_or(AuthError::Malformed)?;
    let (scheme, token) = (&value[..space], &value[space + 1..]);
    if !scheme.eq_ignore_ascii_case(b"bearer") || token.trim_ascii().is_empty() {
        return Err(AuthError::Malformed);
    }
    if bool::from(token.ct_eq(master_key.as_bytes())) {
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
        assert_eq!(check(Some("".as_bytes()), k), Err(AuthError::Missing));
        assert_eq!(check(Some("Basic c2s=".as_bytes()), k), Err(AuthError::Malformed));
        assert_eq!(check(Some("sk-master".as_bytes()), k), Err(AuthError::Malformed));
        assert_eq!(check(Some("Bearer ".as_bytes()), k), Err(AuthError::Malformed));
        assert_eq!(check(Some("Bearer sk-other".as_bytes()), k), Err(AuthError::WrongKey));
        assert_eq!(check(Some("Bearer sk-maste".as_bytes()), k), Err(AuthError::WrongKey), "a prefix is not the key");
        assert_eq!(check(Some("Bearer sk-master2".as_bytes()), k), Err(AuthError::WrongKey));
        assert_eq!(check(Some("Bearer  sk-master".as_bytes()), k), Err(AuthError::WrongKey), "two spaces: the token starts with one");
        assert_eq!(check(Some("Bearer sk-master".as_bytes()), k), Ok(()));
        assert_eq!(check(Some("bearer sk-master".as_bytes()), k), Ok(()));
        assert_eq!(check(Some(b"Bearer sk-mas\xfftr"), k), Err(AuthError::WrongKey), "non-UTF-8 is a wrong key");
        let messages = [AuthError::Missing, AuthError::Malformed, AuthError::WrongKey].map(AuthError::message);
        assert!(messages[0] != messages[1] && messages[1] != messages[2]);
        assert!(!messages.iter().any(|m| m.contains(k)));
    }
}
