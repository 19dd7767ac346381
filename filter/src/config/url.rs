//! A credential's `base_url`: parsed into scheme, host, port and path prefix, strictly (it becomes
//! an Envoy cluster and the upstream `:authority` and `:path`), and shown in errors with user-info
//! and query masked, since that is where keys hide.

use super::{ConfigError, Scheme};
use std::net::{Ipv4Addr, Ipv6Addr};

#[derive(Debug)]
pub(crate) struct ParsedUrl {
    pub scheme: Scheme,
    pub host: String,
    pub port: u16,
    pub authority: String,
    pub path_prefix: String,
    pub normalized: String,
}

/// `raw` as it may appear in a message: the query and fragment become `***`, and so does
/// everything before an `@` (user-info, wherever a malformed URL put it).
pub fn redact_url(raw: &str) -> String {
    let s = raw.trim();
    let (head, tail) = match s.find(['?', '#']) {
        Some(i) => (&s[..i], format!("{}***", &s[i..i + 1])),
        None => (s, String::new()),
    };
    let head = match head.rfind('@') {
        Some(at) => {
            let start = head.find("://").map(|i| i + 3).filter(|&i| i <= at).unwrap_or(0);
            format!("{}***{}", &head[..start], &head[at..])
        }
        None => head.to_string(),
    };
    format!("{head}{tail}")
}

/// A DNS name (labels of letters, digits, `-` and `_`, as container names have) or an IPv4
/// address; IPv6 literals are checked by the caller.
pub(crate) fn valid_host_name(host: &str) -> Result<(), &'static str> {
    if host.is_empty() || host.len() > 253 {
        return Err("the host must be 1-253 characters");
    }
    if host.bytes().all(|b| b.is_ascii_digit() || b == b'.') && host.contains('.') {
        return host.parse::<Ipv4Addr>().map(|_| ()).map_err(|_| "the host is not a valid IPv4 address");
    }
    for label in host.split('.') {
        let ok = (1..=63).contains(&label.len())
            && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            && !label.starts_with('-')
            && !label.ends_with('-');
        if !ok {
            return Err("the host has characters a host name cannot have");
        }
    }
    Ok(())
}

/// `host`, `host:port`, `[v6]` or `[v6]:port` → (host without brackets, port).
pub(crate) fn split_host_port(hostport: &str) -> Result<(String, Option<u16>), &'static str> {
    let port_of = |p: &str| match p.parse::<u16>() {
        Ok(n) if n > 0 && !p.starts_with('+') => Ok(n),
        _ => Err("port must be 1-65535"),
    };
    if let Some(h) = hostport.strip_prefix('[') {
        let (inner, after) = h.split_once(']').ok_or("unclosed [ in host")?;
        inner.parse::<Ipv6Addr>().map_err(|_| "the address in [ ] is not a valid IPv6 address")?;
        let port = match after.strip_prefix(':') {
            Some(p) => Some(port_of(p)?),
            None if after.is_empty() => None,
            None => return Err("unexpected text after ]"),
        };
        return Ok((inner.to_string(), port));
    }
    let (host, port) = match hostport.rsplit_once(':') {
        Some((h, _)) if h.contains(':') => return Err("an IPv6 address needs brackets, like http://[::1]:8000"),
        Some((h, p)) => (h, Some(port_of(p)?)),
        None => (hostport, None),
    };
    valid_host_name(host)?;
    Ok((host.to_string(), port))
}

/// The path prefix is prepended to every client path: only plain RFC 3986 path characters, valid
/// `%` escapes (not of `.`, `/` or `\`, which Envoy may decode into another path), no `.`/`..`
/// or empty segments.
fn check_path(path: &str) -> Result<(), &'static str> {
    const BAD: &str = "the path may have only letters, digits, - . _ ~ ! $ & ( ) * + , ; = : and %XX escapes";
    let b = path.as_bytes();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => {
                let hex = b
                    .get(i + 1..i + 3)
                    .filter(|h| h.iter().all(u8::is_ascii_hexdigit))
                    .ok_or("the path has a % that is not a %XX escape")?;
                let v = u8::from_str_radix(std::str::from_utf8(hex).unwrap_or("00"), 16).unwrap_or(0);
                if matches!(v, b'.' | b'/' | b'\\') {
                    return Err("the path must not %-escape . / or \\");
                }
                i += 3;
                continue;
            }
            c if c.is_ascii_alphanumeric() || b"-._~!$&()*+,;=:/".contains(&c) => {}
            _ => return Err(BAD),
        }
        i += 1;
    }
    if path.split('/').skip(1).any(|seg| seg.is_empty() || seg == "." || seg == "..") {
        return Err("the path must not have empty, . or .. segments");
    }
    Ok(())
}

pub(crate) fn parse_base_url(key: &str, raw: &str) -> Result<ParsedUrl, ConfigError> {
    let bad = |hint: &str| ConfigError::Invalid { key: key.into(), value: format!("{:?}", redact_url(raw)), hint: hint.into() };
    let url = raw.trim();
    let (scheme, rest) = if let Some(r) = url.strip_prefix("https://") {
        (Scheme::Https, r)
    } else if let Some(r) = url.strip_prefix("http://") {
        (Scheme::Http, r)
    } else {
        return Err(bad("use an http:// or https:// URL"));
    };
    if rest.contains('@') {
        return Err(bad("no user info allowed: put the key in api_key"));
    }
    if rest.contains(['?', '#']) {
        return Err(bad("no query or fragment allowed"));
    }
    let (hostport, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, ""),
    };
    if hostport.is_empty() {
        return Err(bad("the URL needs a host"));
    }
    let default_port = if scheme == Scheme::Https { 443 } else { 80 };
    let (host, port) = split_host_port(hostport).map_err(bad)?;
    let port = port.unwrap_or(default_port);
    let mut path = path.trim_end_matches('/').to_string();
    if path.ends_with("/v1") {
        path.truncate(path.len() - 3);
        path = path.trim_end_matches('/').to_string();
    }
    check_path(&path).map_err(bad)?;
    let host_in_url = if host.contains(':') { format!("[{host}]") } else { host.clone() };
    let authority = if port == default_port { host_in_url.clone() } else { format!("{host_in_url}:{port}") };
    let scheme_str = if scheme == Scheme::Https { "https" } else { "http" };
    let normalized = format!("{scheme_str}://{authority}{path}");
    Ok(ParsedUrl { scheme, host, port, authority, path_prefix: path, normalized })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_url_normalisation() {
        let cases = [
            ("https://api.openai.com/", "api.openai.com", 443, "api.openai.com", ""),
            ("https://api.openai.com/v1", "api.openai.com", 443, "api.openai.com", ""),
            ("http://127.0.0.1:8001/v1/", "127.0.0.1", 8001, "127.0.0.1:8001", ""),
            ("https://x.azure.com/openai/deployments/v1", "x.azure.com", 443, "x.azure.com", "/openai/deployments"),
            ("http://[::1]:9000", "::1", 9000, "[::1]:9000", ""),
            ("http://host:80/api", "host", 80, "host", "/api"),
            ("http://mock_provider:8000/a-b/c~d/%41", "mock_provider", 8000, "mock_provider:8000", "/a-b/c~d/%41"),
        ];
        for (url, host, port, authority, prefix) in cases {
            let p = parse_base_url("k", url).unwrap_or_else(|e| panic!("{url}: {e}"));
            assert_eq!((p.host.as_str(), p.port, p.authority.as_str(), p.path_prefix.as_str()), (host, port, authority, prefix), "{url}");
        }
        for bad in ["api.openai.com", "https://", "http://h:0", "http://h:99999", "http://h:", "http://u@h", "http://h?x=1", "http://h h"] {
            assert!(parse_base_url("k", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn bad_hosts_are_refused() {
        for bad in [
            "http://::1",
            "http://::1:8000",
            "http://[::1",
            "http://[nothex]:80",
            "http://[::1]x",
            "http://h..x",
            "http://-h",
            "http://h-.x",
            "http://999.1.1.1",
            "http://1.2.3",
            "http://h:+80",
            "http://h:80:80",
            "http://ho\"st",
        ] {
            let e = parse_base_url("k", bad).err().unwrap_or_else(|| panic!("{bad} accepted"));
            assert!(e.to_string().starts_with("k: "), "{e}");
        }
        let e = parse_base_url("k", "http://::1").unwrap_err().to_string();
        assert!(e.contains("needs brackets"), "{e}");
    }

    #[test]
    fn bad_paths_are_refused() {
        for bad in [
            "http://h/a b",
            "http://h/a\"b",
            "http://h/a'b",
            "http://h/a%2",
            "http://h/a%zz",
            "http://h/a%2Fb",
            "http://h/a%2e%2e/b",
            "http://h/a/../b",
            "http://h/./b",
            "http://h//b",
            "http://h/a\\b",
            "http://h/a<b>",
            "http://h/\u{e9}",
        ] {
            let e = parse_base_url("k", bad).err().unwrap_or_else(|| panic!("{bad} accepted"));
            assert!(e.to_string().contains("path"), "{bad}: {e}");
        }
    }

    #[test]
    fn redaction_masks_user_info_and_query() {
        let cases = [
            ("https://user:sk-secret@host/p", "https://***@host/p"),
            ("https://host/p?key=sk-secret&x=1", "https://host/p?***"),
            ("https://u:sk-secret@host/p?api-key=sk-other#frag", "https://***@host/p?***"),
            ("https://host/p#sk-secret", "https://host/p#***"),
            ("https:/u:sk-secret@host", "***@host"),
            ("u:sk-secret@host", "***@host"),
            ("ftp://h", "ftp://h"),
            ("https://host/a@b", "https://***@b"),
        ];
        for (raw, shown) in cases {
            assert_eq!(redact_url(raw), shown, "{raw}");
        }
        let e = parse_base_url("credentials[0] (a): base_url", "https://me:sk-secret@api.x.com/v1?key=sk-query").unwrap_err().to_string();
        assert_eq!(
            e,
            "credentials[0] (a): base_url: \"https://***@api.x.com/v1?***\" is invalid (no user info allowed: put the key in api_key)"
        );
        let e = parse_base_url("k", "https://api.x.com/v1?key=sk-query").unwrap_err().to_string();
        assert!(e.contains("\"https://api.x.com/v1?***\"") && !e.contains("sk-query"), "{e}");
    }
}
