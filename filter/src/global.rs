//! Global limits (`global_limits`): a credential's RPM across Envoy replicas, decided by a
//! rate-limit service. This module keeps what the service said in shared data, so a worker calls
//! it only when it must:
//! - a **lease**: one call takes `lease` slots (`hits_addend`); the spare ones are taken by later
//!   requests of any worker until the service's window ends (its `duration_until_reset`, counted
//!   from the dispatch, so a slot never outlives the window it was counted in);
//! - a **full note** per credential and per (credential, model): refused, or admitted with 0
//!   remaining, means no call until that window ends;
//! - a **breaker**: after a failed call the service is skipped for `breaker`, and `on_unavailable`
//!   decides meanwhile.
//!
//! The local sliding windows still hold; the service's windows are its own (fixed, per minute).

use crate::config::{Config, GlobalLimits, OnUnavailable, Rpm};
use crate::rls::{self, Limit, Verdict};
use crate::store::{cas_update, read, SharedStore};

pub const BREAKER_KEY: &str = "aar/global/down";

/// What the global limit says about one candidate, before its local windows are charged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gate {
    /// Admitted (a leased slot, a service's OK, or `allow` while it is down).
    Pass,
    /// The service is down and `on_unavailable: local`: charge this replica's share only.
    Share,
    /// Over the global limit until this many seconds from now.
    Refuse(u64),
    /// The service is down and `on_unavailable: deny`.
    Unavailable,
    /// Only a call to the service can tell; ask for this many slots.
    Ask(u32),
}

/// What is kept about one credential, or one (credential, model), in shared data.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Record {
    pub full_until_ms: u64,
    pub lease_until_ms: u64,
    pub slots: u32,
    /// The service's `limit_remaining` after the last call in the window that ends at `lease_until_ms`.
    pub remaining: u32,
}

impl Record {
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(24);
        b.extend_from_slice(&self.full_until_ms.to_le_bytes());
        b.extend_from_slice(&self.lease_until_ms.to_le_bytes());
        b.extend_from_slice(&self.slots.to_le_bytes());
        b.extend_from_slice(&self.remaining.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> Option<Record> {
        let u64_at = |i: usize| b.get(i..i + 8).and_then(|s| s.try_into().ok()).map(u64::from_le_bytes);
        let u32_at = |i: usize| b.get(i..i + 4).and_then(|s| s.try_into().ok()).map(u32::from_le_bytes);
        if b.len() != 24 {
            return None;
        }
        Some(Record { full_until_ms: u64_at(0)?, lease_until_ms: u64_at(8)?, slots: u32_at(16)?, remaining: u32_at(20)? })
    }
}

/// The limits a request on credential `index` is checked against globally, with the shared-data
/// keys of their records (credential first). Empty when neither the credential nor the model has
/// an RPM limit.
pub struct Check<'a> {
    pub limits: Vec<Limit<'a>>,
    pub credential_key: &'a str,
    pub pair_key: String,
}

impl<'a> Check<'a> {
    pub fn new(cfg: &'a Config, global_key: &'a str, index: usize, model: Option<&'a str>) -> Option<Check<'a>> {
        let cred = cfg.credentials.get(index)?;
        let mut limits = Vec::with_capacity(2);
        if let Rpm::Limit(rpm) = cred.rpm {
            limits.push(Limit { credential: &cred.name, model: None, rpm });
        }
        if let Some(m) = model {
            if let Rpm::Limit(rpm) = cfg.model_rpm(m) {
                limits.push(Limit { credential: &cred.name, model: Some(m), rpm });
            }
        }
        if limits.is_empty() {
            return None;
        }
        let pair_key = match model {
            Some(m) => format!("{global_key}/{:016x}", crate::rate_window::model_id(m)),
            None => format!("{global_key}/-"),
        };
        Some(Check { limits, credential_key: global_key, pair_key })
    }

    /// Which record each descriptor's answer goes to: the credential's when it is its own limit.
    fn key_of(&self, i: usize) -> &str {
        match self.limits.get(i) {
            Some(l) if l.model.is_none() => self.credential_key,
            _ => &self.pair_key,
        }
    }
}

fn secs(ms: u64) -> u64 {
    ms.div_ceil(1000).max(1)
}

fn down_verdict(g: &GlobalLimits) -> Gate {
    match g.on_unavailable {
        OnUnavailable::Deny => Gate::Unavailable,
        OnUnavailable::Allow => Gate::Pass,
        OnUnavailable::Local => Gate::Share,
    }
}

/// Whether the breaker is open (the service failed less than `breaker` ago).
pub fn service_down(store: &dyn SharedStore, now_ms: u64) -> bool {
    let until = read(store, BREAKER_KEY, |b| b.try_into().ok().map(u64::from_le_bytes)).ok().flatten();
    until.is_some_and(|u| u > now_ms)
}

/// Decides what it can without the service: a leased slot (taken here; slots stay good while
/// their window lasts, whatever happened since), the breaker, the full notes.
pub fn gate(store: &dyn SharedStore, g: &GlobalLimits, check: &Check<'_>, now_ms: u64) -> Gate {
    let pair = if g.lease > 1 {
        let taken = cas_update(store, &check.pair_key, Record::decode, Record::encode, |r| {
            let took = r.lease_until_ms > now_ms && r.slots > 0;
            if took {
                r.slots -= 1;
            }
            (took, (took, *r))
        });
        match taken {
            Ok((true, _)) => return Gate::Pass,
            Ok((false, r)) => Some(r),
            Err(_) => None,
        }
    } else {
        read(store, &check.pair_key, Record::decode).ok().flatten()
    };
    if service_down(store, now_ms) {
        return down_verdict(g);
    }
    let credential = read(store, check.credential_key, Record::decode).ok().flatten();
    let full_until = pair.iter().chain(credential.iter()).map(|r| r.full_until_ms).max().unwrap_or(0);
    if full_until > now_ms {
        return Gate::Refuse(secs(full_until - now_ms));
    }
    // The lease, but no more than the service said were left in this window (fewer refusals
    // burn quota, fewer spare slots go unused). Unreadable records: ask, the service decides.
    match pair {
        Some(r) if g.lease > 1 && r.lease_until_ms > now_ms => Gate::Ask(g.lease.min(r.remaining).max(1)),
        _ => Gate::Ask(g.lease),
    }
}

/// Records the service's answer to a call made at `dispatch_ms` for `hits` slots, and says
/// whether the request is admitted. One slot is the request's own; the rest become the lease.
pub fn on_verdict(store: &dyn SharedStore, check: &Check<'_>, dispatch_ms: u64, hits: u32, v: &Verdict) -> Gate {
    let reset = v.statuses.iter().filter_map(|s| s.reset_ms).min();
    if v.over {
        let mut retry = None::<u64>;
        for (i, s) in v.statuses.iter().enumerate() {
            if s.over {
                let until = dispatch_ms + s.reset_ms.unwrap_or(1000);
                note_full(store, check.key_of(i), until);
                retry = Some(retry.map_or(until, |r| r.min(until)));
            }
        }
        // A service that sends no statuses: refuse this request, note nothing.
        let until = retry.unwrap_or(dispatch_ms + 1000);
        return Gate::Refuse(secs(until.saturating_sub(dispatch_ms)));
    }
    for (i, s) in v.statuses.iter().enumerate() {
        // Exactly full: the next call would be refused until the window ends.
        if s.remaining == 0 && i < check.limits.len() {
            if let Some(r) = s.reset_ms {
                note_full(store, check.key_of(i), dispatch_ms + r);
            }
        }
    }
    let remaining = v.statuses.iter().map(|s| s.remaining).min().unwrap_or(0);
    let until = reset.map_or(dispatch_ms, |r| dispatch_ms + r);
    let spare = hits.saturating_sub(1);
    let _ = cas_update(store, &check.pair_key, Record::decode, Record::encode, |r| {
        if same_window(r, until, dispatch_ms) {
            // Slots of two calls in one window: both good until the earlier end.
            r.lease_until_ms = r.lease_until_ms.min(until);
            r.slots = r.slots.saturating_add(spare);
            r.remaining = r.remaining.min(remaining);
        } else {
            // A new window (or the first call): spare slots of an older one are gone.
            *r = Record { full_until_ms: r.full_until_ms, lease_until_ms: until, slots: spare, remaining };
        }
        (true, ())
    });
    Gate::Pass
}

/// Whether a lease still running ends in the same service window as one ending at `until`: their
/// ends differ by the calls' dispatch times and delays (milliseconds), windows by a minute.
fn same_window(r: &Record, until: u64, now_ms: u64) -> bool {
    r.lease_until_ms > now_ms && r.lease_until_ms.abs_diff(until) < 30_000
}

fn note_full(store: &dyn SharedStore, key: &str, until_ms: u64) {
    let _ = cas_update(store, key, Record::decode, Record::encode, |r| {
        let changed = r.full_until_ms < until_ms;
        r.full_until_ms = r.full_until_ms.max(until_ms);
        (changed, ())
    });
}

/// A slot that was admitted globally but not used (the local window refused it meanwhile): back
/// to the lease, while its window lasts.
pub fn give_back(store: &dyn SharedStore, check: &Check<'_>, now_ms: u64) {
    let _ = cas_update(store, &check.pair_key, Record::decode, Record::encode, |r| {
        if r.lease_until_ms > now_ms {
            r.slots = r.slots.saturating_add(1);
            return (true, ());
        }
        (false, ())
    });
}

/// The service failed (an error status, a timeout, an undecodable reply): open the breaker.
pub fn on_failure(store: &dyn SharedStore, g: &GlobalLimits, now_ms: u64) -> Gate {
    let until = now_ms + g.breaker.as_millis() as u64;
    let _ = cas_update(
        store,
        BREAKER_KEY,
        |b| b.try_into().ok().map(u64::from_le_bytes),
        |u: &u64| u.to_le_bytes().to_vec(),
        |u| {
            let changed = *u < until;
            *u = (*u).max(until);
            (changed, ())
        },
    );
    down_verdict(g)
}

/// The request a call sends.
pub fn request(g: &GlobalLimits, check: &Check<'_>, hits: u32) -> Vec<u8> {
    rls::encode_request(&g.domain, &check.limits, hits)
}
