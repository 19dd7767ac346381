//! `server.hosts`: the request hosts the router answers for. On a gateway shared with other apps,
//! requests for other hosts pass through untouched. Empty = every host.

use super::url::split_host_port;

/// One entry of `server.hosts`: `name`, `name:port`, `*.suffix`, `*.suffix:port`, `[v6]`,
/// `[v6]:port` or `*`. Names compare case-insensitively; an entry without a port matches any port,
/// one with a port only an authority that carries that port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostMatch {
    /// `*`: every host.
    Any,
    /// A host name or IP address, lower case, without brackets.
    Exact { host: String, port: Option<u16> },
    /// `*.example.com`, kept as `.example.com`: any name with at least one label before it.
    Suffix { suffix: String, port: Option<u16> },
}

impl HostMatch {
    /// Parses one entry; the error is a hint (the caller names the key and the value).
    pub fn parse(entry: &str) -> Result<HostMatch, &'static str> {
        let entry = entry.trim();
        if entry == "*" {
            return Ok(HostMatch::Any);
        }
        if let Some(rest) = entry.strip_prefix("*.") {
            let (suffix, port) = split_host_port(rest)?;
            if suffix.contains(':') {
                return Err("a wildcard needs a host name after *., not an address");
            }
            return Ok(HostMatch::Suffix { suffix: format!(".{}", suffix.to_ascii_lowercase()), port });
        }
        if entry.contains('*') {
            return Err("a wildcard is allowed only as a leading *. (like *.example.com) or as * alone");
        }
        let (host, port) = split_host_port(entry)?;
        Ok(HostMatch::Exact { host: host.to_ascii_lowercase(), port })
    }

    /// Whether this entry matches `host` (lower case, no port, no brackets) with `port`.
    pub fn matches(&self, host: &str, port: Option<u16>) -> bool {
        let port_ok = |want: &Option<u16>| want.is_none() || *want == port;
        match self {
            HostMatch::Any => true,
            HostMatch::Exact { host: h, port: p } => h == host && port_ok(p),
            HostMatch::Suffix { suffix, port: p } => host.len() > suffix.len() && host.ends_with(suffix.as_str()) && port_ok(p),
        }
    }
}

/// Splits a request's `:authority` (`Host`) into a lower-case host (a trailing `.` dropped) and
/// its port; `None` when it is not a valid authority.
pub fn split_authority(authority: &str) -> Option<(String, Option<u16>)> {
    let a = authority.trim();
    // `example.com.` (a fully qualified name) is the same host as `example.com`.
    let without_root_dot = || match a.strip_suffix('.') {
        Some(h) => Some(h.to_string()),
        None => a.rsplit_once(':').and_then(|(h, p)| Some(format!("{}:{p}", h.strip_suffix('.')?))),
    };
    let (host, port) = split_host_port(a).ok().or_else(|| split_host_port(&without_root_dot()?).ok())?;
    Some((host.to_ascii_lowercase(), port))
}

/// Whether a request for `authority` is the router's: `hosts` empty, or an entry matches.
pub fn host_matches(hosts: &[HostMatch], authority: &str) -> bool {
    if hosts.is_empty() {
        return true;
    }
    match split_authority(authority) {
        Some((host, port)) => hosts.iter().any(|m| m.matches(&host, port)),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(entries: &[&str]) -> Vec<HostMatch> {
        entries.iter().map(|e| HostMatch::parse(e).unwrap_or_else(|h| panic!("{e}: {h}"))).collect()
    }

    #[test]
    fn empty_list_matches_every_host() {
        assert!(host_matches(&[], "anything:1234"));
        assert!(host_matches(&[], ""));
    }

    #[test]
    fn exact_names_compare_case_insensitively_with_any_port() {
        let h = list(&["AI.Example.com"]);
        for ok in ["ai.example.com", "AI.EXAMPLE.COM", "ai.example.com:8080", "ai.example.com.", "ai.example.com.:443"] {
            assert!(host_matches(&h, ok), "{ok}");
        }
        for no in ["example.com", "x.ai.example.com", "ai.example.com.evil", "ai.example.co", "", "ai.example.com:x", "ai.example.com:0"] {
            assert!(!host_matches(&h, no), "{no}");
        }
    }

    #[test]
    fn a_port_in_the_entry_must_match() {
        let h = list(&["ai.example.com:8443"]);
        assert!(host_matches(&h, "ai.example.com:8443"));
        assert!(!host_matches(&h, "ai.example.com"));
        assert!(!host_matches(&h, "ai.example.com:443"));
    }

    #[test]
    fn wildcards_match_subdomains_only() {
        let h = list(&["*.Example.com"]);
        for ok in ["a.example.com", "a.b.example.com:80", "A.EXAMPLE.COM"] {
            assert!(host_matches(&h, ok), "{ok}");
        }
        for no in ["example.com", "aexample.com", "example.com.evil", ".example.com"] {
            assert!(!host_matches(&h, no), "{no}");
        }
        let h = list(&["*.example.com:9000"]);
        assert!(host_matches(&h, "a.example.com:9000"));
        assert!(!host_matches(&h, "a.example.com"));
        assert!(host_matches(&list(&["*"]), "whatever"));
    }

    #[test]
    fn ip_addresses() {
        let h = list(&["127.0.0.1:8080", "[::1]"]);
        assert!(host_matches(&h, "127.0.0.1:8080"));
        assert!(!host_matches(&h, "127.0.0.1:8081"));
        assert!(host_matches(&h, "[::1]:8080"));
        assert!(!host_matches(&h, "::1"));
    }

    #[test]
    fn bad_entries_are_refused() {
        for bad in ["", "a b", "*.", "*.*.x", "a.*.com", "x*", "h:0", "h:99999", "::1", "*.[::1]", "ex_ample..com", "-a.com"] {
            assert!(HostMatch::parse(bad).is_err(), "{bad:?} accepted");
        }
    }
}
