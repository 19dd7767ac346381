//! Model-list fetching: one VM of all the workers is elected through a lease in shared data and
//! asks every credential's `GET /v1/models`; the lists land in shared data for every worker.

use crate::config::LogLevel;
use crate::host::Host;
use crate::models_index::{self, LEASE_KEY, VM_SEQ_KEY};
use crate::runtime::Runtime;
use crate::store::cas_update;
use std::collections::HashMap;
use std::time::Duration;

pub const FETCH_TIMEOUT: Duration = Duration::from_secs(10);
/// A round with failures is tried again this soon (before the refresh period).
pub const FETCH_RETRY_MS: u64 = 30_000;
/// The elected fetcher renews its lease on every tick; another VM takes over after this.
pub const LEASE_MS: u64 = 5_000;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Lease {
    pub owner: u32,
    pub until_ms: u64,
    pub next_fetch_ms: u64,
}

impl Lease {
    pub fn decode(b: &[u8]) -> Option<Lease> {
        let b: &[u8; 20] = b.try_into().ok()?;
        let [o0, o1, o2, o3, u0, u1, u2, u3, u4, u5, u6, u7, n @ ..] = *b;
        Some(Lease {
            owner: u32::from_le_bytes([o0, o1, o2, o3]),
            until_ms: u64::from_le_bytes([u0, u1, u2, u3, u4, u5, u6, u7]),
            next_fetch_ms: u64::from_le_bytes(n),
        })
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(20);
        v.extend_from_slice(&self.owner.to_le_bytes());
        v.extend_from_slice(&self.until_ms.to_le_bytes());
        v.extend_from_slice(&self.next_fetch_ms.to_le_bytes());
        v
    }

    /// Takes or renews the lease for `me`; true when a fetch round is due now.
    pub fn claim(&mut self, me: u32, now: u64, refresh: Option<Duration>) -> (bool, bool) {
        if self.owner != me && self.until_ms > now {
            return (false, false);
        }
        self.owner = me;
        self.until_ms = now.saturating_add(LEASE_MS);
        let due = now >= self.next_fetch_ms;
        if due {
            self.next_fetch_ms = refresh.map_or(u64::MAX, |d| now.saturating_add(u64::try_from(d.as_millis()).unwrap_or(u64::MAX)));
        }
        (true, due)
    }
}

/// A distinct number for this VM (the election's identity); 0 if shared data failed.
pub fn vm_number(host: &dyn Host) -> u32 {
    cas_update(
        host,
        VM_SEQ_KEY,
        |b| b.try_into().ok().map(u32::from_le_bytes),
        |n| n.to_le_bytes().to_vec(),
        |n| {
            *n = n.wrapping_add(1).max(1);
            (true, *n)
        },
    )
    .unwrap_or(0)
}

/// A root context's fetching state.
#[derive(Debug, Default)]
pub struct Fetcher {
    pub vm_no: u32,
    /// Callouts in flight: token → credential index.
    in_flight: HashMap<u32, usize>,
    failed: bool,
}

impl Fetcher {
    pub fn new(vm_no: u32) -> Fetcher {
        Fetcher { vm_no, ..Fetcher::default() }
    }

    /// On the tick: fetch if this VM holds (or takes) the lease and a round is due.
    pub fn tick(&mut self, rt: &Runtime, host: &dyn Host, now: u64) {
        if !rt.cfg.server.replace_v1_models || !self.in_flight.is_empty() || self.vm_no == 0 {
            return;
        }
        let (me, refresh) = (self.vm_no, rt.cfg.server.models_refresh);
        let due = cas_update(host, LEASE_KEY, Lease::decode, Lease::encode, |l| l.claim(me, now, refresh));
        if due != Ok(true) {
            return;
        }
        self.failed = false;
        for (i, c) in rt.cfg.credentials.iter().enumerate() {
            let path = format!("{}/v1/models", c.path_prefix);
            let bearer = rt.bearer.get(i).map_or("", String::as_str);
            let headers = [
                (":method", "GET"),
                (":path", path.as_str()),
                (":authority", c.authority.as_str()),
                ("authorization", bearer),
                ("accept", "application/json"),
            ];
            match host.dispatch_http_call(&c.name, &headers, FETCH_TIMEOUT) {
                Ok(token) => {
                    self.in_flight.insert(token, i);
                }
                Err(e) => {
                    self.failed = true;
                    rt.log(host, LogLevel::Error, || {
                        format!("auto-ai-router: models fetch for credential {} could not start: status {}", c.name, e.0)
                    });
                }
            }
        }
        self.after_round(rt, host, now);
    }

    /// A callout's reply (`num_headers` 0: no response).
    pub fn on_response(&mut self, rt: &Runtime, host: &dyn Host, token: u32, num_headers: usize, body_size: usize) {
        let Some(i) = self.in_flight.remove(&token) else { return };
        let (Some(c), Some(key)) = (rt.cfg.credentials.get(i), rt.keys.get(i)) else { return };
        let result = if num_headers == 0 {
            Err("no response (connection failure or timeout)".to_string())
        } else {
            let status = host.http_call_response_header(":status").ok().flatten().unwrap_or_default();
            if status != b"200" {
                Err(format!("HTTP status {}", String::from_utf8_lossy(&status)))
            } else {
                host.http_call_response_body(0, body_size)
                    .map_err(|e| format!("body unreadable (status {})", e.0))
                    .and_then(|body| models_index::parse_provider_list(&body))
            }
        };
        let name = &c.name;
        match result.and_then(|list| {
            models_index::store_list(host, &key.models, &list)
                .map(|changed| (list.len(), changed))
                .map_err(|e| format!("shared data: {e:?}"))
        }) {
            Ok((n, changed)) => {
                if changed {
                    rt.refresh_index(host);
                }
                rt.log(host, LogLevel::Info, || {
                    format!("auto-ai-router: credential {name} serves {n} models{}", if changed { " (updated)" } else { "" })
                });
            }
            Err(e) => {
                self.failed = true;
                rt.log(host, LogLevel::Error, || {
                    format!("auto-ai-router: models fetch for credential {name} failed: {e}; keeping the last good list")
                });
            }
        }
        self.after_round(rt, host, host.now_ms());
    }

    /// When a round ends with failures, try again sooner than the refresh period.
    fn after_round(&mut self, rt: &Runtime, host: &dyn Host, now: u64) {
        if !self.in_flight.is_empty() || !self.failed {
            return;
        }
        let me = self.vm_no;
        let retry = now.saturating_add(FETCH_RETRY_MS);
        let _ = cas_update(host, LEASE_KEY, Lease::decode, Lease::encode, |l| {
            let sooner = l.owner == me && l.next_fetch_ms > retry;
            if sooner {
                l.next_fetch_ms = retry;
            }
            (sooner, ())
        });
        rt.log(host, LogLevel::Info, || "auto-ai-router: some model lists failed; retrying in 30s".into());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{MemStore, SharedStore, CREATE_CAS};

    #[test]
    fn lease_codec_and_claim() {
        let l = Lease { owner: 3, until_ms: 9, next_fetch_ms: u64::MAX };
        assert_eq!(Lease::decode(&l.encode()), Some(l));
        assert_eq!(Lease::decode(&[0; 19]), None);
        let mut l = Lease::default();
        assert_eq!(l.claim(1, 100, Some(Duration::from_secs(60))), (true, true));
        assert_eq!(l.claim(2, 101, None), (false, false), "held by 1");
        assert_eq!(l.claim(1, 200, None), (true, false), "renewed, not due");
        assert_eq!(l.claim(2, 200 + LEASE_MS, None), (true, false), "expired: 2 takes over");
        assert_eq!(l.claim(2, 60_100, None), (true, true), "due after the refresh period");
    }

    #[test]
    fn two_vms_racing_at_start_elect_one() {
        // Both read the lease key as absent; the second creator must lose, not overwrite.
        let s = MemStore::default();
        let claim = |me: u32| cas_update(&s, LEASE_KEY, Lease::decode, Lease::encode, |l| l.claim(me, 0, None));
        s.set_preempt(Some(Box::new(|s: &MemStore| {
            if s.get(LEASE_KEY).map(|(v, _)| v.is_none()).unwrap_or(false) {
                let mut l = Lease::default();
                let _ = l.claim(7, 0, None);
                s.set(LEASE_KEY, &l.encode(), CREATE_CAS).unwrap();
            }
        })));
        assert_eq!(claim(1), Ok(false), "VM 7 created the lease first and fetches; VM 1 does not");
    }
}
