//! Global limits (`global_limits`): a credential's RPM and TPM across Envoy replicas, decided by a
//! rate-limit service. This module keeps what the service said in shared data, so a worker calls
//! it only when it must:
//! - a **lease** per credential: one call takes up to `lease` slots (`hits_addend`); the spare
//!   ones are taken by later requests of any worker while the service's window lasts. An Envoy
//!   holds at most `lease − 1` spare slots of a credential (across its models) and makes one lease
//!   call for it at a time, so unused slots stay within replicas × (lease − 1) per window;
//! - **window ends**: envoyproxy/ratelimit reports `duration_until_reset` in whole seconds,
//!   truncated, so the window ends between (dispatch + reported − 1 s) and (reply + reported):
//!   slots expire at the first (never after their window), full notes at the second (never
//!   before it);
//! - **full notes** per credential and per (credential, model), for requests and for tokens:
//!   refused, or admitted with nothing left, means no call until that window ends;
//! - **tokens**: every call checks the token descriptors (per-descriptor `hits_addend` 0), and
//!   the answer's usage is charged afterwards ([`charge_message`]);
//! - a **breaker**: after a failed call the service is skipped for `breaker`; then one trial
//!   call at a time (claimed with CAS) decides whether it closes, the others meanwhile act as
//!   while it is open.
//!
//! The local sliding windows still hold; the service's windows are its own (fixed, per minute).

use crate::config::{Config, GlobalLimits, OnUnavailable, Rpm};
use crate::rls::{self, Kind, Limit, Verdict};
use crate::store::{cas_update, read, SharedStore};
use std::hash::BuildHasher;

pub const BREAKER_KEY: &str = "aar/global2/breaker";
/// envoyproxy/ratelimit truncates `duration_until_reset` to whole seconds.
pub const TRUNCATION_MS: u64 = 1000;
/// Lease entries (models with spare slots) kept per credential.
pub const MAX_ENTRIES: usize = 8;

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

/// Spare slots leased for one set of descriptors of a credential: `id` is the model's
/// ([`slot_id`]) when a descriptor names the model, 0 when only the credential's are checked.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Slots {
    pub id: u64,
    pub slots: u32,
    /// The least `limit_remaining` of its request descriptors at the last call.
    pub remaining: u32,
}

const ANSWERED: u8 = 1;
const NO_LIMIT: u8 = 2;
const RECORD_VERSION: u8 = 2;
const HEADER_LEN: usize = 1 + 5 * 8 + 4 + 1 + 4 + 1;

/// What is kept about one credential (or one (credential, model): full notes only) in shared data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Its request descriptor was refused, or left at 0, until then.
    pub full_until_ms: u64,
    /// Its token descriptor was over, or at its limit, until then.
    pub tokens_full_until_ms: u64,
    /// Leased slots are good before this: the window's earliest possible end.
    pub lease_until_ms: u64,
    /// The window has surely ended after this (its latest possible end).
    pub window_end_ms: u64,
    /// A lease call (more than one slot) is in flight until then (its timeout).
    pub leasing_until_ms: u64,
    /// The credential's request descriptor's `limit_remaining` at the last call of the window.
    pub remaining: u32,
    flags: u8,
    /// The configuration whose missing limits were logged (once per configuration).
    no_limit_config: u32,
    pub entries: Vec<Slots>,
}

impl Default for Record {
    fn default() -> Record {
        Record {
            full_until_ms: 0,
            tokens_full_until_ms: 0,
            lease_until_ms: 0,
            window_end_ms: 0,
            leasing_until_ms: 0,
            remaining: u32::MAX,
            flags: 0,
            no_limit_config: 0,
            entries: Vec::new(),
        }
    }
}

impl Record {
    pub fn encode(&self) -> Vec<u8> {
        let n = self.entries.len().min(MAX_ENTRIES);
        let mut b = Vec::with_capacity(HEADER_LEN + 16 * n);
        b.push(RECORD_VERSION);
        for v in [self.full_until_ms, self.tokens_full_until_ms, self.lease_until_ms, self.window_end_ms, self.leasing_until_ms] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        b.extend_from_slice(&self.remaining.to_le_bytes());
        b.push(self.flags);
        b.extend_from_slice(&self.no_limit_config.to_le_bytes());
        b.push(n as u8);
        for e in self.entries.iter().take(n) {
            b.extend_from_slice(&e.id.to_le_bytes());
            b.extend_from_slice(&e.slots.to_le_bytes());
            b.extend_from_slice(&e.remaining.to_le_bytes());
        }
        b
    }

    pub fn decode(b: &[u8]) -> Option<Record> {
        let u64_at = |i: usize| b.get(i..i + 8).and_then(|s| s.try_into().ok()).map(u64::from_le_bytes);
        let u32_at = |i: usize| b.get(i..i + 4).and_then(|s| s.try_into().ok()).map(u32::from_le_bytes);
        if b.first() != Some(&RECORD_VERSION) {
            return None;
        }
        let n = *b.get(HEADER_LEN - 1)? as usize;
        if n > MAX_ENTRIES || b.len() != HEADER_LEN + 16 * n {
            return None;
        }
        let entries = (0..n)
            .map(|i| {
                let at = HEADER_LEN + 16 * i;
                Some(Slots { id: u64_at(at)?, slots: u32_at(at + 8)?, remaining: u32_at(at + 12)? })
            })
            .collect::<Option<Vec<_>>>()?;
        Some(Record {
            full_until_ms: u64_at(1)?,
            tokens_full_until_ms: u64_at(9)?,
            lease_until_ms: u64_at(17)?,
            window_end_ms: u64_at(25)?,
            leasing_until_ms: u64_at(33)?,
            remaining: u32_at(41)?,
            flags: *b.get(45)?,
            no_limit_config: u32_at(46)?,
            entries,
        })
    }

    fn held(&self) -> u32 {
        self.entries.iter().fold(0u32, |a, e| a.saturating_add(e.slots))
    }

    fn note(&mut self, kind: Kind, until_ms: u64) -> bool {
        let at = match kind {
            Kind::Requests => &mut self.full_until_ms,
            Kind::Tokens => &mut self.tokens_full_until_ms,
        };
        let changed = *at < until_ms;
        *at = (*at).max(until_ms);
        changed
    }
}

/// The lease entry id of a model (never 0, which stands for "no model descriptor").
pub fn slot_id(model: &str) -> u64 {
    crate::rate_window::model_id(model).max(1)
}

/// The limits a request on credential `index` is checked against globally, with the shared-data
/// keys of their records (credential first). None when neither the credential nor the model has
/// a limit (RPM or TPM).
pub struct Check<'a> {
    pub limits: Vec<Limit<'a>>,
    pub credential_key: &'a str,
    pub pair_key: String,
    /// The lease entry this request's slots come from.
    slot: u64,
}

impl<'a> Check<'a> {
    /// Request and token descriptors: what selection asks about.
    pub fn new(cfg: &'a Config, global_key: &'a str, index: usize, model: Option<&'a str>) -> Option<Check<'a>> {
        Check::build(cfg, global_key, index, model, true)
    }

    /// Token descriptors only: what an answer's usage is charged to.
    pub fn tokens(cfg: &'a Config, global_key: &'a str, index: usize, model: Option<&'a str>) -> Option<Check<'a>> {
        Check::build(cfg, global_key, index, model, false)
    }

    fn build(cfg: &'a Config, global_key: &'a str, index: usize, model: Option<&'a str>, requests: bool) -> Option<Check<'a>> {
        let cred = cfg.credentials.get(index)?;
        let mut limits = Vec::with_capacity(4);
        let mut push = |model: Option<&'a str>, kind: Kind, limit: Rpm| {
            if let Rpm::Limit(per_minute) = limit {
                limits.push(Limit { credential: &cred.name, model, kind, per_minute });
            }
        };
        if requests {
            push(None, Kind::Requests, cred.rpm);
            if let Some(m) = model {
                push(Some(m), Kind::Requests, cfg.model_rpm(m));
            }
        }
        push(None, Kind::Tokens, cred.tpm);
        if let Some(m) = model {
            push(Some(m), Kind::Tokens, cfg.model_tpm(m));
        }
        if limits.is_empty() {
            return None;
        }
        let pair_key = match model {
            Some(m) => format!("{global_key}/{:016x}", crate::rate_window::model_id(m)),
            None => format!("{global_key}/-"),
        };
        let slot = match model {
            Some(m) if limits.iter().any(|l| l.model.is_some()) => slot_id(m),
            _ => 0,
        };
        Some(Check { limits, credential_key: global_key, pair_key, slot })
    }

    /// Which record each descriptor's answer goes to: the credential's when it is its own limit.
    fn key_of(&self, i: usize) -> &str {
        match self.limits.get(i) {
            Some(l) if l.model.is_none() => self.credential_key,
            _ => &self.pair_key,
        }
    }

    fn has_pair(&self) -> bool {
        self.limits.iter().any(|l| l.model.is_some())
    }

    /// Identifies this configuration of the credential's limits (the "log once" key).
    fn fingerprint(&self, domain: &str) -> u32 {
        let h = rustc_hash::FxBuildHasher
            .hash_one((domain, self.limits.iter().map(|l| (l.model, l.per_minute, l.kind == Kind::Tokens)).collect::<Vec<_>>()));
        (h as u32).max(1)
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

/// The breaker in shared data: open until `open_until_ms`; then half-open, with a trial call in
/// flight until `trial_until_ms`. Closed when `open_until_ms` is 0.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Breaker {
    open_until_ms: u64,
    trial_until_ms: u64,
}

impl Breaker {
    fn decode(b: &[u8]) -> Option<Breaker> {
        let u64_at = |i: usize| b.get(i..i + 8).and_then(|s| s.try_into().ok()).map(u64::from_le_bytes);
        (b.len() == 16).then_some(())?;
        Some(Breaker { open_until_ms: u64_at(0)?, trial_until_ms: u64_at(8)? })
    }

    fn encode(&self) -> Vec<u8> {
        let mut b = self.open_until_ms.to_le_bytes().to_vec();
        b.extend_from_slice(&self.trial_until_ms.to_le_bytes());
        b
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    Closed,
    /// Within the breaker period, or a trial call is in flight.
    Open,
    /// The period is over and no trial call is in flight: the next call is the trial.
    Trial,
}

pub fn breaker_state(store: &dyn SharedStore, now_ms: u64) -> BreakerState {
    // Unreadable: as closed (the service decides; a failure opens it again).
    let b = read(store, BREAKER_KEY, Breaker::decode).ok().flatten().unwrap_or_default();
    match b {
        Breaker { open_until_ms: 0, .. } => BreakerState::Closed,
        b if b.open_until_ms > now_ms || b.trial_until_ms > now_ms => BreakerState::Open,
        _ => BreakerState::Trial,
    }
}

/// Whether the service is being skipped (open, or only a trial may call it).
pub fn service_down(store: &dyn SharedStore, now_ms: u64) -> bool {
    breaker_state(store, now_ms) != BreakerState::Closed
}

/// Claims the trial call (true), unless another request did (false); a breaker that closed
/// meanwhile needs no claim.
fn claim_trial(store: &dyn SharedStore, g: &GlobalLimits, now_ms: u64) -> bool {
    let until = now_ms + g.timeout.as_millis() as u64;
    cas_update(store, BREAKER_KEY, Breaker::decode, Breaker::encode, |b| match *b {
        Breaker { open_until_ms: 0, .. } => (false, true),
        b2 if b2.open_until_ms > now_ms || b2.trial_until_ms > now_ms => (false, false),
        _ => {
            b.trial_until_ms = until;
            (true, true)
        }
    })
    .unwrap_or(false)
}

/// How many slots a call for `slot` should ask for (see the module doc).
fn wanted(r: &Record, g: &GlobalLimits, slot: u64, now_ms: u64) -> u32 {
    if g.lease <= 1 || r.leasing_until_ms > now_ms {
        return 1;
    }
    let running = r.lease_until_ms > now_ms;
    if !running {
        // Between the window's earliest and latest end it may still be running: slots leased now
        // could die unused in it.
        return if now_ms < r.window_end_ms { 1 } else { g.lease };
    }
    let entry = r.entries.iter().find(|e| e.id == slot);
    if entry.is_none() && r.entries.iter().filter(|e| e.slots > 0).count() >= MAX_ENTRIES {
        return 1;
    }
    let spare = (g.lease - 1).saturating_sub(r.held());
    // No more than the service said were left (fewer refusals burn quota, fewer slots go unused).
    (1 + spare).min(r.remaining).min(entry.map_or(u32::MAX, |e| e.remaining)).max(1)
}

enum Taken {
    Slot,
    Refused(u64),
    /// (the credential's full note, the slots to ask for)
    Nothing(u64, u32),
}

/// Decides what it can without the service: token full notes, a leased slot (taken here; slots
/// stay good while their window lasts, whatever happened since), request full notes, the
/// breaker (claiming the trial call when it may). `may_ask` false (a retry's pick, which can't
/// wait for a call) claims nothing and refuses where a call would be needed.
pub fn gate(store: &dyn SharedStore, g: &GlobalLimits, check: &Check<'_>, now_ms: u64, may_ask: bool) -> Gate {
    let pair = if check.has_pair() { read(store, &check.pair_key, Record::decode).ok().flatten() } else { None };
    let (pair_full, pair_tokens) = pair.as_ref().map_or((0, 0), |p| (p.full_until_ms, p.tokens_full_until_ms));
    let taken = cas_update(store, check.credential_key, Record::decode, Record::encode, |r| {
        let tokens_until = r.tokens_full_until_ms.max(pair_tokens);
        if tokens_until > now_ms {
            return (false, Taken::Refused(tokens_until));
        }
        if r.lease_until_ms > now_ms {
            if let Some(e) = r.entries.iter_mut().find(|e| e.id == check.slot && e.slots > 0) {
                e.slots -= 1;
                return (true, Taken::Slot);
            }
        }
        (false, Taken::Nothing(r.full_until_ms, wanted(r, g, check.slot, now_ms)))
    });
    let (full_until, hits) = match taken {
        Ok(Taken::Slot) => return Gate::Pass,
        Ok(Taken::Refused(until)) => return Gate::Refuse(secs(until - now_ms)),
        Ok(Taken::Nothing(full, hits)) => (full.max(pair_full), hits),
        // Unreadable (or corrupt, reset now): the service decides, without a lease.
        Err(_) => (pair_full, 1),
    };
    if full_until > now_ms {
        return Gate::Refuse(secs(full_until - now_ms));
    }
    match breaker_state(store, now_ms) {
        BreakerState::Closed => {}
        BreakerState::Trial if may_ask && claim_trial(store, g, now_ms) => {}
        _ => return down_verdict(g),
    }
    if !may_ask {
        return Gate::Refuse(1);
    }
    if hits > 1 {
        return Gate::Ask(claim_lease(store, g, check, now_ms));
    }
    Gate::Ask(1)
}

/// Marks a lease call in flight for the credential and says how many slots it asks for (1 when
/// another one is in flight).
fn claim_lease(store: &dyn SharedStore, g: &GlobalLimits, check: &Check<'_>, now_ms: u64) -> u32 {
    let until = now_ms + g.timeout.as_millis() as u64;
    cas_update(store, check.credential_key, Record::decode, Record::encode, |r| {
        let hits = wanted(r, g, check.slot, now_ms);
        if hits > 1 {
            r.leasing_until_ms = until;
        }
        (hits > 1, hits)
    })
    .unwrap_or(1)
}

/// What the service's answer means for the request, and whether it lacked limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Answer {
    pub gate: Gate,
    /// A descriptor came back without `current_limit`: the service does not limit it.
    pub no_limit: bool,
    /// ... and this is the first time for this configuration on this Envoy (log it).
    pub first_no_limit: bool,
}

/// How a reply's window relates to the one the credential's record holds.
enum Window {
    Same,
    New,
    /// A reply from a window that already ended (it came back late).
    Stale,
    Unknown,
}

/// Records the service's answer to a call made at `dispatch_ms` for `hits` slots (it arrived at
/// `now_ms`), and says whether the request is admitted. One slot is the request's own; the rest
/// become the lease.
pub fn on_verdict(
    store: &dyn SharedStore,
    g: &GlobalLimits,
    check: &Check<'_>,
    dispatch_ms: u64,
    now_ms: u64,
    hits: u32,
    v: &Verdict,
) -> Answer {
    let answered: Vec<(usize, &Limit<'_>, &rls::Status)> =
        check.limits.iter().zip(&v.statuses).enumerate().map(|(i, (l, s))| (i, l, s)).collect();
    let no_limit = answered.iter().any(|(_, _, s)| !s.limited);
    // Full: refused, or nothing left (the next request would be refused, or the tokens are at
    // the limit), until the latest the window can end.
    let full: Vec<(usize, Kind, u64)> = answered
        .iter()
        .filter(|(_, _, s)| s.limited && (s.over || s.remaining == 0))
        .map(|(i, l, s)| (*i, l.kind, now_ms + s.reset_ms.unwrap_or(1000)))
        .collect();
    let tokens_at_limit = full.iter().any(|(_, k, _)| *k == Kind::Tokens);
    let admitted = !v.over && !tokens_at_limit;
    let reset = answered.iter().filter(|(_, _, s)| s.limited).filter_map(|(_, _, s)| s.reset_ms).min();
    let remaining = |cred_only: bool| {
        answered
            .iter()
            .filter(|(_, l, s)| s.limited && l.kind == Kind::Requests && (!cred_only || l.model.is_none()))
            .map(|(_, _, s)| s.remaining)
            .min()
    };
    let (entry_remaining, cred_remaining) = (remaining(false).unwrap_or(u32::MAX), remaining(true).unwrap_or(u32::MAX));
    let fingerprint = check.fingerprint(&g.domain);
    let first_no_limit = cas_update(store, check.credential_key, Record::decode, Record::encode, |r| {
        let before = r.clone();
        if hits > 1 {
            r.leasing_until_ms = 0;
        }
        for (i, kind, until) in &full {
            if check.key_of(*i) == check.credential_key {
                r.note(*kind, *until);
            }
        }
        let window = match reset {
            None => Window::Unknown,
            Some(reset) => {
                let early = (dispatch_ms + reset).saturating_sub(TRUNCATION_MS);
                let late = now_ms + reset;
                let window = if r.lease_until_ms > now_ms && r.lease_until_ms.abs_diff(early) < 30_000 {
                    Window::Same
                } else if r.lease_until_ms <= now_ms || early > r.lease_until_ms {
                    Window::New
                } else {
                    Window::Stale
                };
                match window {
                    Window::Same => {
                        // Slots of two calls in one window: all good until the earlier end.
                        r.lease_until_ms = r.lease_until_ms.min(early);
                        r.window_end_ms = r.window_end_ms.max(late);
                    }
                    Window::New => {
                        // Spare slots of an older window are gone.
                        r.lease_until_ms = early;
                        r.window_end_ms = late;
                        r.entries.clear();
                        r.remaining = u32::MAX;
                    }
                    Window::Stale | Window::Unknown => {}
                }
                window
            }
        };
        if matches!(window, Window::Same | Window::New) && r.lease_until_ms > now_ms {
            r.remaining = r.remaining.min(cred_remaining);
            let spare = if admitted { (hits.saturating_sub(1)).min((g.lease.saturating_sub(1)).saturating_sub(r.held())) } else { 0 };
            add_slots(r, check.slot, spare, entry_remaining);
        }
        r.flags |= ANSWERED;
        let mut first = false;
        if no_limit {
            r.flags |= NO_LIMIT;
            first = r.no_limit_config != fingerprint;
            r.no_limit_config = fingerprint;
        } else {
            r.flags &= !NO_LIMIT;
        }
        (*r != before, first)
    })
    .unwrap_or(false);
    if full.iter().any(|(i, _, _)| check.key_of(*i) != check.credential_key) {
        let _ = cas_update(store, &check.pair_key, Record::decode, Record::encode, |r| {
            let mut changed = false;
            for (i, kind, until) in &full {
                if check.key_of(*i) != check.credential_key {
                    changed |= r.note(*kind, *until);
                }
            }
            (changed, ())
        });
    }
    close_breaker(store);
    let gate = if admitted {
        Gate::Pass
    } else {
        // A service that sends no statuses: refuse this request, note nothing.
        let until = full.iter().map(|(_, _, u)| *u).min().unwrap_or(now_ms + 1000);
        Gate::Refuse(secs(until.saturating_sub(now_ms)))
    };
    Answer { gate, no_limit, first_no_limit }
}

fn add_slots(r: &mut Record, id: u64, spare: u32, remaining: u32) {
    if let Some(e) = r.entries.iter_mut().find(|e| e.id == id) {
        e.slots = e.slots.saturating_add(spare);
        e.remaining = e.remaining.min(remaining);
        return;
    }
    if spare == 0 {
        return;
    }
    if r.entries.len() >= MAX_ENTRIES {
        // Room only where no slot is left.
        match r.entries.iter().position(|e| e.slots == 0) {
            Some(i) => {
                r.entries.remove(i);
            }
            None => return,
        }
    }
    r.entries.push(Slots { id, slots: spare, remaining });
}

/// A successful answer closes the breaker (a no-op read while it is closed).
fn close_breaker(store: &dyn SharedStore) {
    let _ = cas_update(store, BREAKER_KEY, Breaker::decode, Breaker::encode, |b| {
        let open = b.open_until_ms != 0;
        *b = Breaker::default();
        (open, ())
    });
}

/// A slot that was admitted globally but not used (the local window refused it meanwhile): back
/// to the lease, while its window lasts and within `lease − 1` spare slots.
pub fn give_back(store: &dyn SharedStore, g: &GlobalLimits, check: &Check<'_>, now_ms: u64) {
    let _ = cas_update(store, check.credential_key, Record::decode, Record::encode, |r| {
        if r.lease_until_ms <= now_ms || r.held() >= g.lease.saturating_sub(1) {
            return (false, ());
        }
        let remaining = r.entries.iter().find(|e| e.id == check.slot).map_or(u32::MAX, |e| e.remaining);
        add_slots(r, check.slot, 1, remaining);
        (true, ())
    });
}

/// The service failed (an error status, a timeout, an undecodable reply, a trial call that
/// failed): open the breaker for its period; a lease call (`hits` > 1) is no longer in flight.
pub fn on_failure(store: &dyn SharedStore, g: &GlobalLimits, check: &Check<'_>, hits: u32, now_ms: u64) -> Gate {
    let until = now_ms + g.breaker.as_millis() as u64;
    let _ = cas_update(store, BREAKER_KEY, Breaker::decode, Breaker::encode, |b| {
        let before = *b;
        *b = Breaker { open_until_ms: b.open_until_ms.max(until), trial_until_ms: 0 };
        (*b != before, ())
    });
    if hits > 1 {
        let _ = cas_update(store, check.credential_key, Record::decode, Record::encode, |r| {
            let changed = r.leasing_until_ms != 0;
            r.leasing_until_ms = 0;
            (changed, ())
        });
    }
    down_verdict(g)
}

/// The request a call sends.
pub fn request(g: &GlobalLimits, check: &Check<'_>, hits: u32) -> Vec<u8> {
    rls::encode_request(&g.domain, &check.limits, hits)
}

/// The message that charges an answer's `tokens` to `check`'s token descriptors (a
/// [`Check::tokens`]); None when there is nothing to charge.
pub fn charge_message(g: &GlobalLimits, check: &Check<'_>, tokens: u64) -> Option<Vec<u8>> {
    (tokens > 0 && check.limits.iter().any(|l| l.kind == Kind::Tokens)).then(|| rls::encode_charge(&g.domain, &check.limits, tokens))
}

/// What `GET /v1/credentials` says about a credential's global limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum View {
    /// Not asked about yet (on this Envoy).
    Unchecked,
    /// The last answer had a limit for every descriptor.
    Enforced,
    /// The last answer lacked a limit (`current_limit`) for a descriptor the router sent one for.
    Missing,
}

impl View {
    pub fn as_str(self) -> &'static str {
        match self {
            View::Unchecked => "unchecked",
            View::Enforced => "enforced",
            View::Missing => "missing",
        }
    }
}

pub fn view(store: &dyn SharedStore, credential_key: &str) -> View {
    match read(store, credential_key, Record::decode).ok().flatten() {
        Some(r) if r.flags & NO_LIMIT != 0 => View::Missing,
        Some(r) if r.flags & ANSWERED != 0 => View::Enforced,
        _ => View::Unchecked,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::load;
    use crate::rls::Status;
    use crate::store::MemStore;

    fn cfg(global: &str, models: &str) -> Config {
        let text = format!(
            "server: {{master_key: mk, default_models_rpm: -1}}\ncredentials:\n  - {{name: a, api_key: k, base_url: 'http://a.test', rpm: 100}}\nglobal_limits: {{service: 'r:1'{global}}}\n{models}"
        );
        load(&text, &|_| None).unwrap()
    }

    fn ok(reset_s: u64, remaining: u32) -> Status {
        Status { over: false, limited: true, remaining, reset_ms: Some(reset_s * 1000) }
    }

    #[test]
    fn records_round_trip_and_bad_ones_do_not_decode() {
        let r = Record {
            full_until_ms: 1,
            tokens_full_until_ms: 2,
            lease_until_ms: 3,
            window_end_ms: 4,
            leasing_until_ms: 5,
            remaining: 6,
            flags: NO_LIMIT,
            no_limit_config: 7,
            entries: vec![Slots { id: 8, slots: 9, remaining: 10 }, Slots { id: 11, slots: 0, remaining: 12 }],
        };
        let b = r.encode();
        assert_eq!(Record::decode(&b), Some(r.clone()));
        for cut in 0..b.len() {
            assert_eq!(Record::decode(&b[..cut]), None, "{cut}");
        }
        assert_eq!(Record::decode(&[0u8; 24]), None, "the format before leases per credential");
        assert_eq!(Record::decode(&Record::default().encode()), Some(Record::default()));
    }

    /// envoyproxy/ratelimit: `duration_until_reset = 60 − floor(t) % 60` at the time t it handles
    /// the call. For every fraction of a second and any latency, a leased slot expires before
    /// the window ends and a full note only after it.
    #[test]
    fn slots_never_outlive_the_window_and_full_notes_never_end_before_it() {
        let c = cfg(", lease: 5", "");
        let g = c.global.as_ref().unwrap();
        let check = Check::new(&c, "aar/global2/a/x", 0, None).unwrap();
        let minute = 1_800_000_000_000u64; // a minute boundary
        for offset in (0..60_000).step_by(137) {
            for latency in [0u64, 1, 40, 999] {
                let s = MemStore::default();
                let dispatch = minute + offset;
                let handled = dispatch + latency / 2;
                let reply = dispatch + latency;
                // The window the service counted the call in.
                let window_end = (handled / 60_000 + 1) * 60_000;
                let reported = 60 - (handled / 1000) % 60;
                let v = Verdict { over: false, statuses: vec![ok(reported, 50)] };
                assert_eq!(on_verdict(&s, g, &check, dispatch, reply, 5, &v).gate, Gate::Pass);
                let r = read(&s, check.credential_key, Record::decode).unwrap().unwrap();
                assert!(
                    r.lease_until_ms <= window_end,
                    "offset {offset} latency {latency}: slots until {} > {window_end}",
                    r.lease_until_ms
                );
                assert!(r.window_end_ms >= window_end, "offset {offset} latency {latency}");
                assert!(window_end - r.lease_until_ms <= 1000 + latency, "slots die at most 1 s + latency early");
                if r.lease_until_ms > reply {
                    assert_eq!(r.held(), 4, "offset {offset}");
                }
                // At the window's end no slot is taken: the request asks the service.
                assert!(matches!(gate(&s, g, &check, window_end, true), Gate::Ask(_)));
                // Exactly full: noted until no earlier than the window's end.
                let s = MemStore::default();
                let v = Verdict { over: false, statuses: vec![ok(reported, 0)] };
                on_verdict(&s, g, &check, dispatch, reply, 1, &v);
                let r = read(&s, check.credential_key, Record::decode).unwrap().unwrap();
                assert!(r.full_until_ms >= window_end && r.full_until_ms <= window_end + 1000 + latency);
            }
        }
    }

    #[test]
    fn spare_slots_of_a_credential_stay_within_lease_minus_one_across_models() {
        let models = "models: [{name: m1, rpm: 50}, {name: m2, rpm: 50}, {name: m3, rpm: 50}]";
        let c = cfg(", lease: 5", models);
        let g = c.global.as_ref().unwrap();
        let s = MemStore::default();
        let t = 1_800_000_010_000;
        let mut asked = vec![];
        for (i, m) in ["m1", "m2", "m3", "m1"].iter().enumerate() {
            let check = Check::new(&c, "k", 0, Some(m)).unwrap();
            let now = t + i as u64;
            match gate(&s, g, &check, now, true) {
                Gate::Ask(hits) => {
                    asked.push(hits);
                    let v = Verdict { over: false, statuses: vec![ok(50, 90), ok(50, 45)] };
                    assert_eq!(on_verdict(&s, g, &check, now, now, hits, &v).gate, Gate::Pass);
                }
                Gate::Pass => asked.push(0),
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(asked, [5, 1, 1, 0], "m1 leases 5; m2 and m3 find the credential's 4 spare slots taken; m1 uses one");
        let r = read(&s, "k", Record::decode).unwrap().unwrap();
        assert_eq!(r.held(), 3);
    }

    #[test]
    fn one_lease_call_at_a_time_and_none_while_the_window_may_be_ending() {
        let c = cfg(", lease: 5", "");
        let g = c.global.as_ref().unwrap();
        let s = MemStore::default();
        let check = Check::new(&c, "k", 0, None).unwrap();
        let t = 1_800_000_010_000;
        assert_eq!(gate(&s, g, &check, t, true), Gate::Ask(5));
        assert_eq!(gate(&s, g, &check, t + 1, true), Gate::Ask(1), "a lease call is in flight");
        assert_eq!(gate(&s, g, &check, t + 1, false), Gate::Refuse(1), "a retry's pick claims nothing");
        let v = Verdict { over: false, statuses: vec![ok(50, 90)] };
        on_verdict(&s, g, &check, t, t + 5, 5, &v);
        for i in 0..4 {
            assert_eq!(gate(&s, g, &check, t + 10 + i, true), Gate::Pass);
        }
        assert_eq!(gate(&s, g, &check, t + 20, true), Gate::Ask(5), "the lease was used up: the next one");
        // The window's end is known to within a second: there, a call asks for its own slot only.
        let early = t + 49_000;
        assert_eq!(gate(&s, g, &check, early, true), Gate::Ask(1));
    }

    #[test]
    fn a_timeout_after_the_breaker_period_is_tried_by_one_call_at_a_time() {
        let c = cfg(", lease: 1, breaker: 5s, on_unavailable: allow, timeout: 100ms", "");
        let g = c.global.as_ref().unwrap();
        let s = MemStore::default();
        let check = Check::new(&c, "k", 0, None).unwrap();
        let t = 1_800_000_010_000;
        assert_eq!(gate(&s, g, &check, t, true), Gate::Ask(1));
        assert_eq!(on_failure(&s, g, &check, 1, t + 100), Gate::Pass, "allow");
        assert_eq!(gate(&s, g, &check, t + 5_099, true), Gate::Pass, "open: no call");
        assert_eq!(gate(&s, g, &check, t + 5_100, true), Gate::Ask(1), "the trial call");
        assert_eq!(gate(&s, g, &check, t + 5_101, true), Gate::Pass, "while it is in flight: as open");
        assert_eq!(gate(&s, g, &check, t + 5_150, false), Gate::Pass, "a retry's pick never claims it");
        on_failure(&s, g, &check, 1, t + 5_200);
        assert_eq!(gate(&s, g, &check, t + 10_199, true), Gate::Pass, "failed: open for another period");
        assert_eq!(gate(&s, g, &check, t + 10_200, true), Gate::Ask(1));
        // A trial whose reply never came (the request went away): another may try after its timeout.
        assert_eq!(gate(&s, g, &check, t + 10_299, true), Gate::Pass);
        assert_eq!(gate(&s, g, &check, t + 10_300, true), Gate::Ask(1));
        let v = Verdict { over: false, statuses: vec![ok(30, 90)] };
        on_verdict(&s, g, &check, t + 10_300, t + 10_301, 1, &v);
        assert_eq!(breaker_state(&s, t + 10_302), BreakerState::Closed, "a successful reply closes it");
        assert_eq!(gate(&s, g, &check, t + 10_302, true), Gate::Ask(1));
        assert_eq!(gate(&s, g, &check, t + 10_303, true), Gate::Ask(1), "closed: every request may call");
    }

    #[test]
    fn token_descriptors_over_or_at_their_limit_mark_the_key_full() {
        let c = load(
            "server: {master_key: mk, default_models_rpm: -1}\ncredentials:\n  - {name: a, api_key: k, base_url: 'http://a.test', tpm: 1000}\nglobal_limits: {service: 'r:1'}\nmodels: [{name: m, tpm: 300}]\n",
            &|_| None,
        )
        .unwrap();
        let g = c.global.as_ref().unwrap();
        let s = MemStore::default();
        let check = Check::new(&c, "k", 0, Some("m")).unwrap();
        assert_eq!(check.limits.iter().map(|l| (l.kind, l.model)).collect::<Vec<_>>(), [(Kind::Tokens, None), (Kind::Tokens, Some("m"))]);
        let t = 1_800_000_010_000;
        let v = Verdict { over: false, statuses: vec![ok(50, 400), ok(50, 0)] };
        assert_eq!(on_verdict(&s, g, &check, t, t, 1, &v).gate, Gate::Refuse(50), "the model's tokens are at their limit");
        assert_eq!(gate(&s, g, &check, t + 1000, true), Gate::Refuse(49), "no call for a key known full");
        let other = Check::new(&c, "k", 0, Some("other")).unwrap();
        assert_eq!(gate(&s, g, &other, t + 1000, true), Gate::Ask(1), "another model of the key is not full");
        let charge = Check::tokens(&c, "k", 0, Some("m")).unwrap();
        assert!(charge_message(g, &charge, 120).is_some());
        assert_eq!(charge_message(g, &charge, 0), None);
        assert!(Check::tokens(&cfg("", ""), "k", 0, Some("m")).is_none(), "RPM only: nothing to charge");
    }

    #[test]
    fn a_reply_without_limits_is_flagged_once_per_configuration() {
        let c = cfg("", "");
        let g = c.global.as_ref().unwrap();
        let s = MemStore::default();
        let check = Check::new(&c, "k", 0, None).unwrap();
        assert_eq!(view(&s, "k"), View::Unchecked);
        let none = Verdict { over: false, statuses: vec![Status { over: false, limited: false, remaining: 0, reset_ms: None }] };
        let a = on_verdict(&s, g, &check, 1, 1, 1, &none);
        assert_eq!((a.gate, a.no_limit, a.first_no_limit), (Gate::Pass, true, true), "admitted: the service limits nothing");
        assert_eq!(view(&s, "k"), View::Missing);
        assert!(!on_verdict(&s, g, &check, 2, 2, 1, &none).first_no_limit, "logged once");
        let limited = Verdict { over: false, statuses: vec![ok(30, 50)] };
        assert!(!on_verdict(&s, g, &check, 3, 3, 1, &limited).no_limit);
        assert_eq!(view(&s, "k"), View::Enforced);
        assert!(!on_verdict(&s, g, &check, 4, 4, 1, &none).first_no_limit, "the same configuration again");
        let other = cfg(", domain: other", "");
        let check = Check::new(&other, "k", 0, None).unwrap();
        assert!(on_verdict(&s, other.global.as_ref().unwrap(), &check, 5, 5, 1, &none).first_no_limit, "a new configuration logs again");
    }
}
