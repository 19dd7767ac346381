//! Credential selection (SPEC §5) over shared data: a round-robin cursor shared by all workers,
//! skipping credentials that are banned, don't serve the model, or whose RPM windows are full.

use crate::config::{Config, Credential, Fail2Ban, Rpm};
use crate::fail2ban::{BanEvent, BanRecord};
use crate::global::Gate;
use crate::rate_window::{RateRecord, Refused};
use crate::store::{cas_update, read, write_token, SharedStore, UpdateError};
use std::hash::{BuildHasher, Hash, Hasher};

pub const CURSOR_KEY: &str = "aar/rr";

/// The shared-data keys of one credential's state. They carry a fingerprint of what the state is
/// about, so a configuration push (Istio, xDS) that changes a credential starts it afresh:
/// - RPM windows: name + base_url + a hash of the key (a rotated key is a new provider key);
/// - the ban: that, plus the fail2ban policy (a new policy re-judges the credential).
///
/// A push that changes neither keeps both: limits hold across pushes, bans stay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateKeys {
    pub rate: String,
    /// TPM windows (the credential's and per model), charged when a response reports usage.
    pub tokens: String,
    pub ban: String,
    pub models: String,
    /// Global limits: what the rate-limit service said (full notes, leased slots); the
    /// (credential, model) full notes under `<global>/<model hash>`.
    pub global: String,
    /// `max_concurrent`: the slots of requests in flight.
    pub inflight: String,
}

fn fx(f: impl FnOnce(&mut rustc_hash::FxHasher)) -> u64 {
    let mut h = rustc_hash::FxBuildHasher.build_hasher();
    f(&mut h);
    h.finish()
}

impl StateKeys {
    pub fn new(c: &Credential, policy: &Fail2Ban) -> StateKeys {
        let id = fx(|h| (&c.name, &c.base_url, fx(|k| c.api_key.hash(k))).hash(h));
        let p = fx(|h| (policy.max_attempts, format!("{:?}", policy.ban_duration), &policy.error_codes).hash(h));
        StateKeys {
            // `3`: the record format (a new format starts its windows afresh, never refuses once).
            rate: format!("aar/rpm3/{}/{id:016x}", c.name),
            tokens: format!("aar/tpm3/{}/{id:016x}", c.name),
            ban: format!("aar/ban3/{}/{id:016x}/{p:08x}", c.name),
            models: format!("aar/models/list/{}/{id:016x}", c.name),
            // `global2`: leases per credential (the format of issue 21).
            global: format!("aar/global2/{}/{id:016x}", c.name),
            inflight: format!("aar/inflight/{}/{id:016x}", c.name),
        }
    }

    pub fn for_config(cfg: &Config) -> Vec<StateKeys> {
        cfg.credentials.iter().map(|c| StateKeys::new(c, &cfg.fail2ban)).collect()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selection {
    Chosen {
        index: usize,
        rpm_current: u32,
    },
    /// Every candidate was refused by an RPM window.
    RateLimited {
        retry_after: u64,
    },
    /// No credential serves the model.
    NoModel,
    /// Serving credentials exist, but they are banned (maybe some full too).
    Unavailable {
        banned: usize,
        serving: usize,
    },
    /// No candidate could be charged for a reason of ours, not a limit: shared-data contention,
    /// a record that was corrupt (reset now), a host error, or too many distinct models.
    Busy,
    /// Candidates were refused because the rate-limit service is down (`on_unavailable: deny`).
    GlobalUnavailable,
    /// Candidate `index` passed its local checks; only the rate-limit service can admit it
    /// (asking for `hits` slots).
    Ask {
        index: usize,
        hits: u32,
    },
}

fn decode_cursor(b: &[u8]) -> Option<u32> {
    b.try_into().ok().map(u32::from_le_bytes)
}

fn encode_cursor(c: &u32) -> Vec<u8> {
    c.to_le_bytes().to_vec()
}

/// Claims the next start position: each concurrent request gets its own. Under contention the
/// cursor is read as it is (two requests may start at the same credential: fairness, not limits).
fn claim_cursor(store: &dyn SharedStore, n: usize) -> usize {
    let claimed = cas_update(store, CURSOR_KEY, decode_cursor, encode_cursor, |c| {
        let start = *c as usize % n;
        *c = ((start + 1) % n) as u32;
        (true, start)
    });
    claimed.unwrap_or_else(|_| read(store, CURSOR_KEY, decode_cursor).ok().flatten().unwrap_or(0) as usize % n)
}

/// After skipping to `chosen`, moves the cursor past it, unless another request moved it meanwhile.
fn advance_cursor_past(store: &dyn SharedStore, claimed_next: usize, chosen: usize, n: usize) {
    let Ok((Some(bytes), cas)) = store.get(CURSOR_KEY) else { return };
    if decode_cursor(&bytes).map(|c| c as usize) == Some(claimed_next) {
        let _ = store.set(CURSOR_KEY, &encode_cursor(&(((chosen + 1) % n) as u32)), cas);
    }
}

/// The ban state now; `None` if the record can't be read.
pub fn ban_state(store: &dyn SharedStore, key: &str, now_ms: u64) -> Option<BanRecord> {
    read(store, key, BanRecord::decode).ok().flatten().map(|r| r.current(now_ms))
}

enum BanCheck {
    Free,
    Banned,
    /// A provider cooldown: skipped like a full RPM window, free again in this many seconds.
    Cooling(u64),
    /// Unreadable (host error) or corrupt (reset now): refused for this request only.
    Unreadable,
}

fn check_ban(store: &dyn SharedStore, key: &str, now_ms: u64) -> BanCheck {
    match store.get(key) {
        Err(_) => BanCheck::Unreadable,
        Ok((None, _)) => BanCheck::Free,
        Ok((Some(bytes), cas)) => match BanRecord::decode(&bytes) {
            Some(r) if r.current(now_ms).is_banned(now_ms) => BanCheck::Banned,
            Some(r) if r.in_cooldown(now_ms) => BanCheck::Cooling(r.cooldown_until_ms.saturating_sub(now_ms).div_ceil(1000).max(1)),
            Some(_) => BanCheck::Free,
            None => {
                let _ = store.set(key, &BanRecord::default().encode(), write_token(true, cas));
                BanCheck::Unreadable
            }
        },
    }
}

/// Where a selection is in its round-robin walk: kept by a request while it waits for the
/// rate-limit service about one candidate, then resumed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Walk {
    /// The claimed position in the round-robin schedule (`Config::schedule`).
    start: usize,
    /// Schedule positions looked at so far.
    k: usize,
    /// Credentials already looked at (a weighted schedule names one several times); empty while
    /// the schedule names each once.
    seen: Vec<u64>,
    /// The in-flight slot id the chosen credential is held under (`max_concurrent`).
    slot: u64,
    serving: usize,
    banned: usize,
    busy: usize,
    /// Refused because the rate-limit service is down (`on_unavailable: deny`).
    unavailable: usize,
    retry_after: Option<u64>,
}

impl Walk {
    /// A walk whose pick holds in-flight slot `slot` (`max_concurrent`).
    pub fn with_slot(slot: u64) -> Walk {
        Walk { slot, ..Walk::default() }
    }

    /// Marks credential `i` looked at; false if it already was (its turn came up again).
    fn first_look(&mut self, i: usize, weighted: bool) -> bool {
        if !weighted {
            return true;
        }
        let (word, bit) = (i / 64, 1u64 << (i % 64));
        if self.seen.len() <= word {
            self.seen.resize(word + 1, 0);
        }
        let fresh = self.seen[word] & bit == 0;
        self.seen[word] |= bit;
        fresh
    }

    fn refused_for(&mut self, r: u64) {
        self.retry_after = Some(self.retry_after.map_or(r, |x| x.min(r)));
    }
}

/// The global limit's say on candidate `index` (see `global::gate`); `NoGlobal` ignores it.
pub trait GlobalGate {
    fn gate(&mut self, index: usize) -> Gate;
}

/// No global limits (or none for this pick).
pub struct NoGlobal;

impl GlobalGate for NoGlobal {
    fn gate(&mut self, _: usize) -> Gate {
        Gate::Pass
    }
}

/// Picks a credential for a request and charges its RPM windows.
/// `serves(i, model)` says whether credential `i` serves the model (true if its list is unknown);
/// credentials in `exclude` (already tried for this request) are never picked.
pub fn select(
    store: &dyn SharedStore,
    cfg: &Config,
    keys: &[StateKeys],
    model: Option<&str>,
    serves: &dyn Fn(usize, &str) -> bool,
    exclude: &[usize],
    now_ms: u64,
) -> Selection {
    let mut walk = Walk::default();
    select_with(store, cfg, keys, model, serves, exclude, now_ms, &mut walk, &mut NoGlobal)
}

/// [`select`] with a global gate for credentials that have an RPM limit. When the gate says
/// `Ask`, returns [`Selection::Ask`] with `walk` at that candidate: the caller asks the service
/// and goes on with [`resume`].
#[allow(clippy::too_many_arguments)]
pub fn select_with(
    store: &dyn SharedStore,
    cfg: &Config,
    keys: &[StateKeys],
    model: Option<&str>,
    serves: &dyn Fn(usize, &str) -> bool,
    exclude: &[usize],
    now_ms: u64,
    walk: &mut Walk,
    global: &mut dyn GlobalGate,
) -> Selection {
    let n = cfg.credentials.len().min(keys.len());
    let w = cfg.schedule.len();
    if n == 0 || w == 0 {
        return Selection::Busy;
    }
    let weighted = w != n;
    if walk.k == 0 {
        walk.start = claim_cursor(store, w);
    }
    let now_s = now_ms / 1000;
    let model_tpm = model.map(|m| (m, cfg.model_tpm(m)));
    let model_limit = model.map(|m| (m, cfg.model_rpm(m)));
    let mut tpm_share = TpmShare::default();
    while walk.k < w {
        let pos = (walk.start + walk.k) % w;
        let i = cfg.schedule.get(pos).map_or(usize::MAX, |i| *i as usize);
        let (Some(cred), Some(key)) = (cfg.credentials.get(i), keys.get(i)) else {
            walk.k += 1;
            continue;
        };
        if !walk.first_look(i, weighted) || exclude.contains(&i) || model.is_some_and(|m| !serves(i, m)) {
            walk.k += 1;
            continue;
        }
        walk.serving += 1;
        if let Err(skip) = local_checks(store, cfg, cred, key, model_tpm, &mut tpm_share, now_ms) {
            walk.skip(skip);
            walk.k += 1;
            continue;
        }
        let tokens_global = cfg.global.is_some() && (cred.tpm != Rpm::Unlimited || model_tpm.is_some_and(|(_, l)| l != Rpm::Unlimited));
        if cred.rpm == Rpm::Unlimited && model_limit.is_none_or(|(_, l)| l == Rpm::Unlimited) && !tokens_global {
            match take_slot(store, cfg, cred, key, walk.slot, None, now_ms) {
                Ok(()) => return chosen(store, walk, w, i, 0),
                Err(skip) => {
                    walk.skip(skip);
                    walk.k += 1;
                    continue;
                }
            }
        }
        // No call to the service for a key whose local window is full anyway.
        let gate = match &cfg.global {
            None => Ok(Gate::Pass),
            Some(_) => peek(store, key, cred.rpm, model_limit, now_s).map(|()| global.gate(i)),
        };
        match gate {
            Ok(Gate::Ask(hits)) => {
                walk.serving -= 1;
                return Selection::Ask { index: i, hits };
            }
            Ok(gate) => match admit(store, cfg, cred, key, model_limit, gate, now_s)
                .and_then(|rpm| take_slot(store, cfg, cred, key, walk.slot, model_limit, now_ms).map(|()| rpm))
            {
                Ok(rpm_current) => return chosen(store, walk, w, i, rpm_current),
                Err(skip) => walk.skip(skip),
            },
            Err(skip) => walk.skip(skip),
        }
        walk.k += 1;
    }
    finish(walk, exclude)
}

/// `max_concurrent`: takes an in-flight slot for the chosen credential. At its cap (raced full
/// since the check in `local_checks`) the RPM admission just charged (`charged`: its model
/// limit) is taken back and the key is skipped like a full window.
fn take_slot(
    store: &dyn SharedStore,
    cfg: &Config,
    cred: &Credential,
    key: &StateKeys,
    slot: u64,
    charged: Option<(&str, Rpm)>,
    now_ms: u64,
) -> Result<(), Skip> {
    let Some(cap) = cred.max_concurrent else { return Ok(()) };
    let hold = cfg.server.request_timeout.map_or(SLOT_WITHOUT_TIMEOUT_MS, |t| u64::try_from(t.as_millis()).unwrap_or(u64::MAX));
    match crate::concurrency::acquire(store, &key.inflight, cap, slot, now_ms, now_ms.saturating_add(hold)) {
        Ok(true) => Ok(()),
        outcome => {
            if cred.rpm != Rpm::Unlimited || charged.is_some_and(|(_, l)| l != Rpm::Unlimited) {
                let index = cfg.credentials.iter().position(|c| c.name == cred.name).unwrap_or(usize::MAX);
                let _ = refund(store, cfg, key, index, charged.map(|(m, _)| m), now_ms);
            }
            Err(if outcome.is_ok() { Skip::Wait(1) } else { Skip::Busy })
        }
    }
}

/// How long an in-flight slot lasts without `request_timeout` (a request can't be longer then
/// anyway than what a provider keeps a connection for).
const SLOT_WITHOUT_TIMEOUT_MS: u64 = 3_600_000;

/// Whether this replica enforces its share of the TPM limits (`on_unavailable: local` while the
/// rate-limit service is skipped), read once per selection when a TPM limit needs it.
#[derive(Default)]
struct TpmShare(Option<bool>);

impl TpmShare {
    fn get<'c>(&mut self, store: &dyn SharedStore, cfg: &'c Config, now_ms: u64) -> Option<&'c crate::config::GlobalLimits> {
        let g = cfg.global.as_ref().filter(|g| g.on_unavailable == crate::config::OnUnavailable::Local)?;
        let down = *self.0.get_or_insert_with(|| crate::global::service_down(store, now_ms));
        down.then_some(g)
    }
}

/// Ban, provider cooldown, TPM and `max_concurrent`: the checks that need no charge.
fn local_checks(
    store: &dyn SharedStore,
    cfg: &Config,
    cred: &Credential,
    key: &StateKeys,
    model_tpm: Option<(&str, Rpm)>,
    tpm_share: &mut TpmShare,
    now_ms: u64,
) -> Result<(), Skip> {
    match check_ban(store, &key.ban, now_ms) {
        BanCheck::Free => {}
        BanCheck::Banned => return Err(Skip::Banned),
        BanCheck::Unreadable => return Err(Skip::Busy),
        BanCheck::Cooling(r) => return Err(Skip::Wait(r)),
    }
    if cred.tpm != Rpm::Unlimited || model_tpm.is_some_and(|(_, l)| l != Rpm::Unlimited) {
        let now_s = now_ms / 1000;
        let share = tpm_share.get(store, cfg, now_ms);
        let (tpm, model_tpm) = (share_of(cred.tpm, share), model_tpm.map(|(m, l)| (m, share_of(l, share))));
        match store.get(&key.tokens) {
            Ok((None, _)) => {}
            Ok((Some(bytes), cas)) => match RateRecord::decode(&bytes) {
                Some(mut r) => {
                    r.prune(now_s);
                    r.check_tokens(now_s, tpm, model_tpm).map_err(Skip::Wait)?;
                }
                None => {
                    // Corrupt: reset now (as a corrupt RPM record is), refused this once.
                    let _ = store.set(&key.tokens, &RateRecord::default().encode(), write_token(true, cas));
                    return Err(Skip::Busy);
                }
            },
            Err(_) => return Err(Skip::Busy),
        }
    }
    if let Some(cap) = cred.max_concurrent {
        if !crate::concurrency::has_room(store, &key.inflight, cap, now_ms) {
            // Free again when a request on it ends: soon, but nobody knows when.
            return Err(Skip::Wait(1));
        }
    }
    Ok(())
}

/// Admits a candidate the global gate let through: charges its local windows (this replica's
/// share of the limits while the service is down and `on_unavailable: local`).
fn admit(
    store: &dyn SharedStore,
    cfg: &Config,
    cred: &Credential,
    key: &StateKeys,
    model_limit: Option<(&str, Rpm)>,
    gate: Gate,
    now_s: u64,
) -> Result<u32, Skip> {
    let share = match gate {
        Gate::Pass => None,
        Gate::Share => cfg.global.as_ref(),
        Gate::Refuse(r) => return Err(Skip::Wait(r)),
        Gate::Unavailable => return Err(Skip::Unavailable),
        Gate::Ask(_) => return Err(Skip::Busy),
    };
    // A key checked globally for its tokens only keeps no request window.
    if cred.rpm == Rpm::Unlimited && model_limit.is_none_or(|(_, l)| l == Rpm::Unlimited) {
        return Ok(0);
    }
    charge(store, cred, key, model_limit, share, now_s)
}

/// Goes on after the service answered about the candidate [`Selection::Ask`] named: `gate` is
/// `Pass`/`Share` (charge its local windows), or a refusal (try the next one). The `bool` says
/// a slot the service admitted went unused (the local window refused it meanwhile).
#[allow(clippy::too_many_arguments)]
pub fn resume(
    store: &dyn SharedStore,
    cfg: &Config,
    keys: &[StateKeys],
    model: Option<&str>,
    serves: &dyn Fn(usize, &str) -> bool,
    now_ms: u64,
    walk: &mut Walk,
    gate: Gate,
    global: &mut dyn GlobalGate,
) -> (Selection, bool) {
    let w = cfg.schedule.len();
    let i = cfg.schedule.get((walk.start + walk.k) % w.max(1)).map_or(usize::MAX, |i| *i as usize);
    walk.serving += 1;
    let mut unused = false;
    if let (Some(cred), Some(key)) = (cfg.credentials.get(i), keys.get(i)) {
        let model_limit = model.map(|m| (m, cfg.model_rpm(m)));
        match admit(store, cfg, cred, key, model_limit, gate, now_ms / 1000)
            .and_then(|rpm| take_slot(store, cfg, cred, key, walk.slot, model_limit, now_ms).map(|()| rpm))
        {
            Ok(rpm_current) => return (chosen(store, walk, w, i, rpm_current), false),
            Err(skip) => {
                // Admitted by the service, refused by the local window meanwhile.
                unused = gate == Gate::Pass;
                walk.skip(skip);
            }
        }
    }
    walk.k += 1;
    (select_with(store, cfg, keys, model, serves, &[], now_ms, walk, global), unused)
}

/// Why a candidate was passed over.
enum Skip {
    Banned,
    /// Contention, a host error, a corrupt record, too many models: ours, not a limit.
    Busy,
    /// A limit or a provider cooldown: free again in this many seconds.
    Wait(u64),
    /// The rate-limit service is down (`on_unavailable: deny`).
    Unavailable,
}

impl Walk {
    fn skip(&mut self, s: Skip) {
        match s {
            Skip::Banned => self.banned += 1,
            Skip::Busy => self.busy += 1,
            Skip::Wait(r) => self.refused_for(r),
            Skip::Unavailable => self.unavailable += 1,
        }
    }
}

/// Credential `index`, at schedule position `start + k` of `w`, is chosen: the cursor moves past
/// that position when candidates were skipped to reach it.
fn chosen(store: &dyn SharedStore, walk: &Walk, w: usize, index: usize, rpm_current: u32) -> Selection {
    if walk.k != 0 {
        advance_cursor_past(store, (walk.start + 1) % w, (walk.start + walk.k) % w, w);
    }
    Selection::Chosen { index, rpm_current }
}

fn share_of(limit: Rpm, share: Option<&crate::config::GlobalLimits>) -> Rpm {
    match (limit, share) {
        (Rpm::Limit(l), Some(g)) => Rpm::Limit(g.share(l)),
        (l, _) => l,
    }
}

/// Whether the local windows would admit now, without charging them.
fn peek(store: &dyn SharedStore, key: &StateKeys, rpm: Rpm, model_limit: Option<(&str, Rpm)>, now_s: u64) -> Result<(), Skip> {
    match read(store, &key.rate, RateRecord::decode) {
        Ok(r) => {
            let mut r = r.unwrap_or_default();
            r.prune(now_s);
            match r.try_admit(now_s, rpm, model_limit) {
                Ok(()) => Ok(()),
                Err(Refused::Full { retry_after }) => Err(Skip::Wait(retry_after)),
                Err(Refused::TooManyModels) => Err(Skip::Busy),
            }
        }
        Err(_) => Err(Skip::Busy),
    }
}

/// Takes back the local admission of a pick that was never used (a retry's next credential when
/// Envoy did not retry), charged at `at_ms`. Without global limits' local share: a pick made
/// while the service was down and `local` was charged to the shared window too, so taking one
/// back there is right as well.
pub fn refund(
    store: &dyn SharedStore,
    cfg: &Config,
    key: &StateKeys,
    index: usize,
    model: Option<&str>,
    at_ms: u64,
) -> Result<(), UpdateError> {
    let Some(cred) = cfg.credentials.get(index) else { return Ok(()) };
    let model_limit = model.map(|m| (m, cfg.model_rpm(m)));
    if cred.rpm == Rpm::Unlimited && !matches!(model_limit, Some((_, Rpm::Limit(_)))) {
        return Ok(());
    }
    cas_update(store, &key.rate, RateRecord::decode, RateRecord::encode, |r| {
        let before = r.clone();
        r.refund(at_ms / 1000, cred.rpm, model_limit);
        (*r != before, ())
    })
}

/// Charges the local windows (with this replica's share of the limits while the service is down
/// and `on_unavailable: local`).
fn charge(
    store: &dyn SharedStore,
    cred: &Credential,
    key: &StateKeys,
    model_limit: Option<(&str, Rpm)>,
    share: Option<&crate::config::GlobalLimits>,
    now_s: u64,
) -> Result<u32, Skip> {
    let rpm = share_of(cred.rpm, share);
    let model_limit = model_limit.map(|(m, l)| (m, share_of(l, share)));
    let outcome = cas_update(store, &key.rate, RateRecord::decode, RateRecord::encode, |r| {
        r.prune(now_s);
        match r.try_admit(now_s, rpm, model_limit) {
            Ok(()) => (true, Ok(r.credential.count())),
            Err(e) => (false, Err(e)),
        }
    });
    match outcome {
        Ok(Ok(rpm_current)) => Ok(rpm_current),
        Ok(Err(Refused::Full { retry_after })) => Err(Skip::Wait(retry_after)),
        // Refuse rather than risk over-admitting.
        Ok(Err(Refused::TooManyModels)) | Err(_) => Err(Skip::Busy),
    }
}

fn finish(walk: &Walk, exclude: &[usize]) -> Selection {
    let (serving, banned, busy) = (walk.serving, walk.banned, walk.busy);
    match walk.retry_after {
        _ if serving == 0 && exclude.is_empty() => Selection::NoModel,
        _ if serving == 0 => Selection::Unavailable { banned, serving },
        _ if walk.unavailable > 0 => Selection::GlobalUnavailable,
        Some(r) if banned == 0 && busy == 0 => Selection::RateLimited { retry_after: r },
        _ if busy > 0 => Selection::Busy,
        _ => Selection::Unavailable { banned, serving },
    }
}

/// Feeds one upstream response status into the credential's record: fail2ban, and the provider's
/// cooldown if it asked for one. A 429 that puts the key in cooldown does not also count toward a
/// ban (the provider told us when to come back; the key is not broken).
pub fn record_status(
    store: &dyn SharedStore,
    cfg: &Config,
    key: &StateKeys,
    status: u16,
    cooldown_until_ms: Option<u64>,
    admitted_ms: u64,
    now_ms: u64,
) -> Result<BanEvent, UpdateError> {
    cas_update(store, &key.ban, BanRecord::decode, BanRecord::encode, |r| {
        let before = *r;
        *r = r.current(now_ms);
        let rested_before = r.rested_until_ms;
        if let Some(until) = cooldown_until_ms {
            r.cool_down(until);
        }
        let event = if status == 429 {
            if r.is_banned(now_ms) {
                BanEvent::Ignored
            } else {
                r.on_429(rested_before, admitted_ms, now_ms, &cfg.fail2ban)
            }
        } else {
            r.on_status(status, now_ms, &cfg.fail2ban)
        };
        (*r != before, event)
    })
}

/// Charges the tokens a response reported to the credential's TPM windows (its own when it has a
/// `tpm`, the model's when the model has one). Nothing is written for unlimited ones.
pub fn charge_tokens(
    store: &dyn SharedStore,
    cfg: &Config,
    index: usize,
    key: &StateKeys,
    model: Option<&str>,
    tokens: u64,
    now_ms: u64,
) -> Result<(), UpdateError> {
    let Some(cred) = cfg.credentials.get(index) else { return Ok(()) };
    let credential_limited = cred.tpm != Rpm::Unlimited;
    let model = model.filter(|m| cfg.model_tpm(m) != Rpm::Unlimited);
    if !credential_limited && model.is_none() || tokens == 0 {
        return Ok(());
    }
    let n = u32::try_from(tokens).unwrap_or(u32::MAX);
    cas_update(store, &key.tokens, RateRecord::decode, RateRecord::encode, |r| {
        r.prune(now_ms / 1000);
        r.charge_tokens(now_ms / 1000, n, credential_limited, model);
        (true, ())
    })
}

/// Tokens in the credential's current TPM window (0 when it keeps none).
pub fn tpm_current(store: &dyn SharedStore, key: &StateKeys, now_ms: u64) -> u32 {
    let Ok((Some(bytes), _)) = store.get(&key.tokens) else { return 0 };
    let Some(mut w) = RateRecord::decode_credential(&bytes) else { return 0 };
    w.prune(now_ms / 1000);
    w.count()
}

/// One credential as operators see it (`GET /v1/credentials`): never its key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CredentialState {
    pub name: String,
    pub banned_until_ms: u64,
    pub cooldown_until_ms: u64,
    pub consecutive_errors: u32,
    pub rpm_used: u32,
    pub rpm_limit: Rpm,
    pub tpm_used: u32,
    pub tpm_limit: Rpm,
    /// With global limits: whether the rate-limit service enforces them.
    pub global: Option<crate::global::View>,
}

impl CredentialState {
    pub fn status(&self, now_ms: u64) -> &'static str {
        if self.banned_until_ms > now_ms {
            "banned"
        } else if self.cooldown_until_ms > now_ms {
            "cooldown"
        } else {
            "available"
        }
    }
}

pub fn credential_states(store: &dyn SharedStore, cfg: &Config, keys: &[StateKeys], now_ms: u64) -> Vec<CredentialState> {
    cfg.credentials
        .iter()
        .zip(keys)
        .map(|(c, k)| {
            let r = ban_state(store, &k.ban, now_ms).unwrap_or_default();
            CredentialState {
                name: c.name.clone(),
                banned_until_ms: r.banned_until_ms,
                cooldown_until_ms: r.cooldown_until_ms,
                consecutive_errors: r.errors,
                rpm_used: rpm_current(store, k, now_ms),
                rpm_limit: c.rpm,
                tpm_used: tpm_current(store, k, now_ms),
                tpm_limit: c.tpm,
                global: cfg.global.as_ref().map(|_| crate::global::view(store, &k.global)),
            }
        })
        .collect()
}

/// `{"object":"list","data":[{"name","status","banned_until","cooldown_until","consecutive_errors","rpm":{"used","limit"},"tpm":{"used","limit"},"global_limit"}]}`;
/// times are Unix seconds (null when not set; a permanent ban is "permanent"); `global_limit`
/// is null without global limits, else `unchecked`, `enforced` or `missing`.
pub fn credential_states_json(states: &[CredentialState], now_ms: u64) -> String {
    let time = |ms: u64| match ms {
        0 => "null".to_string(),
        u64::MAX => "\"permanent\"".to_string(),
        ms if ms <= now_ms => "null".to_string(),
        ms => ms.div_ceil(1000).to_string(),
    };
    let items: Vec<String> = states
        .iter()
        .map(|s| {
            format!(
                "{{\"name\":{},\"status\":\"{}\",\"banned_until\":{},\"cooldown_until\":{},\"consecutive_errors\":{},\"rpm\":{{\"used\":{},\"limit\":{}}},\"tpm\":{{\"used\":{},\"limit\":{}}},\"global_limit\":{}}}",
                crate::errors::json_string(&s.name),
                s.status(now_ms),
                time(s.banned_until_ms),
                time(s.cooldown_until_ms),
                s.consecutive_errors,
                s.rpm_used,
                s.rpm_limit.as_i64(),
                s.tpm_used,
                s.tpm_limit.as_i64(),
                s.global.map_or("null".to_string(), |v| format!("\"{}\"", v.as_str()))
            )
        })
        .collect();
    format!("{{\"object\":\"list\",\"data\":[{}]}}", items.join(","))
}

/// Admissions in the current window, for the `credential_rpm_current` gauge (0 if unreadable).
pub fn rpm_current(store: &dyn SharedStore, key: &StateKeys, now_ms: u64) -> u32 {
    let Ok((Some(bytes), _)) = store.get(&key.rate) else { return 0 };
    let Some(mut w) = RateRecord::decode_credential(&bytes) else { return 0 };
    w.prune(now_ms / 1000);
    w.count()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Health {
    pub total: usize,
    pub banned: usize,
}

impl Health {
    pub fn available(&self) -> usize {
        self.total.saturating_sub(self.banned)
    }

    pub fn to_json(self) -> String {
        format!(
            "{{\"credentials_available\":{},\"credentials_banned\":{},\"status\":\"{}\",\"total_credentials\":{}}}",
            self.available(),
            self.banned,
            if self.available() > 0 { "healthy" } else { "unhealthy" },
            self.total
        )
    }
}

pub fn health(store: &dyn SharedStore, keys: &[StateKeys], now_ms: u64) -> Health {
    let banned = keys.iter().filter(|k| ban_state(store, &k.ban, now_ms).is_some_and(|r| r.is_banned(now_ms))).count();
    Health { total: keys.len(), banned }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::load;
    use crate::store::{MemStore, CAS_RETRIES};

    fn cfg(creds: &[(&str, i64)], extra: &str) -> Config {
        let list: Vec<String> = creds
            .iter()
            .map(|(n, rpm)| format!("  - {{name: {n}, api_key: key-{n}, base_url: 'http://127.0.0.1:1', rpm: {rpm}}}"))
            .collect();
        let text = format!("server: {{master_key: mk, default_models_rpm: -1}}\ncredentials:\n{}\n{extra}", list.join("\n"));
        load(&text, &|_| None).unwrap()
    }

    fn all(_: usize, _: &str) -> bool {
        true
    }

    fn pick(store: &MemStore, cfg: &Config, model: Option<&str>, now_ms: u64) -> Selection {
        select(store, cfg, &StateKeys::for_config(cfg), model, &all, &[], now_ms)
    }

    fn sel(store: &MemStore, cfg: &Config, model: Option<&str>, serves: &dyn Fn(usize, &str) -> bool, now_ms: u64) -> Selection {
        select(store, cfg, &StateKeys::for_config(cfg), model, serves, &[], now_ms)
    }

    fn status(store: &MemStore, cfg: &Config, i: usize, status: u16, now_ms: u64) -> BanEvent {
        record_status(store, cfg, &StateKeys::for_config(cfg)[i], status, None, now_ms, now_ms).unwrap()
    }

    fn banned_errors(store: &MemStore, cfg: &Config, i: usize) -> u32 {
        ban_state(store, &StateKeys::for_config(cfg)[i].ban, 0).unwrap().errors
    }

    fn rpm(store: &MemStore, cfg: &Config, i: usize, now_ms: u64) -> u32 {
        rpm_current(store, &StateKeys::for_config(cfg)[i], now_ms)
    }

    fn names(store: &MemStore, cfg: &Config, count: usize, now_ms: u64) -> Vec<String> {
        (0..count)
            .map(|_| match pick(store, cfg, Some("m"), now_ms) {
                Selection::Chosen { index, .. } => cfg.credentials[index].name.clone(),
                other => format!("{other:?}"),
            })
            .collect()
    }

    fn ban(store: &MemStore, cfg: &Config, i: usize) {
        for _ in 0..cfg.fail2ban.max_attempts {
            status(store, cfg, i, 500, 0);
        }
    }

    #[test]
    fn round_robin_in_config_order() {
        let c = cfg(&[("c1", -1), ("c2", -1), ("c3", -1)], "");
        let s = MemStore::default();
        assert_eq!(names(&s, &c, 4, 0), ["c1", "c2", "c3", "c1"]);
    }

    #[test]
    fn banned_credential_is_skipped() {
        let c = cfg(&[("c1", -1), ("c2", -1), ("c3", -1)], "");
        let s = MemStore::default();
        ban(&s, &c, 1);
        assert_eq!(names(&s, &c, 3, 0), ["c1", "c3", "c1"]);
    }

    #[test]
    fn rate_limited_credential_is_skipped() {
        let c = cfg(&[("c1", 2), ("c2", -1), ("c3", -1)], "");
        let s = MemStore::default();
        assert_eq!(names(&s, &c, 5, 0), ["c1", "c2", "c3", "c1", "c2"]);
        assert_eq!(names(&s, &c, 2, 1000), ["c3", "c2"], "c1 is full: its turn goes to c2");
    }

    #[test]
    fn all_banned_is_unavailable() {
        let c = cfg(&[("c1", -1), ("c2", -1)], "");
        let s = MemStore::default();
        ban(&s, &c, 0);
        ban(&s, &c, 1);
        assert_eq!(pick(&s, &c, Some("m"), 0), Selection::Unavailable { banned: 2, serving: 2 });
        assert_eq!(
            health(&s, &StateKeys::for_config(&c), 0).to_json(),
            r#"{"credentials_available":0,"credentials_banned":2,"status":"unhealthy","total_credentials":2}"#
        );
    }

    #[test]
    fn all_full_is_rate_limited_with_retry_after() {
        let c = cfg(&[("c1", 1), ("c2", 1)], "");
        let s = MemStore::default();
        assert!(matches!(pick(&s, &c, None, 0), Selection::Chosen { index: 0, rpm_current: 1 }));
        assert!(matches!(pick(&s, &c, None, 10_000), Selection::Chosen { index: 1, .. }));
        assert_eq!(pick(&s, &c, None, 20_000), Selection::RateLimited { retry_after: 41 });
    }

    #[test]
    fn model_served_by_one_credential_goes_there() {
        let c = cfg(&[("c1", -1), ("c2", -1)], "");
        let s = MemStore::default();
        let only_c1 = |i: usize, m: &str| m != "special" || i == 0;
        for _ in 0..3 {
            assert!(matches!(sel(&s, &c, Some("special"), &only_c1, 0), Selection::Chosen { index: 0, .. }));
        }
        let nobody = |_: usize, _: &str| false;
        assert_eq!(sel(&s, &c, Some("ghost"), &nobody, 0), Selection::NoModel);
    }

    #[test]
    fn model_rpm_limits_even_when_another_credential_is_free() {
        let c = cfg(&[("c1", -1), ("c2", -1)], "models: [{name: gpt-4o, rpm: 1}]");
        let s = MemStore::default();
        let only_c1 = |i: usize, _: &str| i == 0;
        assert!(matches!(sel(&s, &c, Some("gpt-4o"), &only_c1, 0), Selection::Chosen { index: 0, .. }));
        assert_eq!(sel(&s, &c, Some("gpt-4o"), &only_c1, 1000), Selection::RateLimited { retry_after: 60 });
        assert!(matches!(sel(&s, &c, Some("other"), &all, 1000), Selection::Chosen { .. }), "c2 itself is free");
    }

    #[test]
    fn banned_plus_rate_limited_is_unavailable() {
        let c = cfg(&[("c1", 1), ("c2", -1)], "");
        let s = MemStore::default();
        assert!(matches!(pick(&s, &c, None, 0), Selection::Chosen { index: 0, .. }));
        ban(&s, &c, 1);
        assert_eq!(pick(&s, &c, None, 0), Selection::Unavailable { banned: 1, serving: 2 });
    }

    #[test]
    fn errors_on_one_credential_never_touch_another() {
        let c = cfg(&[("c1", -1), ("c2", -1)], "");
        let s = MemStore::default();
        status(&s, &c, 0, 500, 0);
        status(&s, &c, 0, 500, 0);
        assert_eq!(banned_errors(&s, &c, 0), 2);
        assert_eq!(banned_errors(&s, &c, 1), 0);
    }

    #[test]
    fn unlimited_admits_a_thousand() {
        let c = cfg(&[("c1", -1)], "");
        let s = MemStore::default();
        for _ in 0..1000 {
            assert!(matches!(pick(&s, &c, Some("m"), 0), Selection::Chosen { index: 0, .. }));
        }
    }

    #[test]
    fn window_slides_over_time() {
        let c = cfg(&[("c1", 2)], "");
        let s = MemStore::default();
        pick(&s, &c, None, 0);
        pick(&s, &c, None, 30_000);
        assert!(matches!(pick(&s, &c, None, 60_999), Selection::RateLimited { retry_after: 1 }));
        assert!(matches!(pick(&s, &c, None, 61_000), Selection::Chosen { .. }), "the admission in second 0 has left");
        assert_eq!(rpm(&s, &c, 0, 61_000), 2);
    }

    #[test]
    fn lost_cas_races_are_retried_not_double_charged() {
        let c = cfg(&[("c1", 5)], "");
        let s = MemStore::default();
        s.fail_next_sets.set(3);
        assert!(matches!(pick(&s, &c, None, 0), Selection::Chosen { index: 0, rpm_current: 1 }));
        assert_eq!(rpm(&s, &c, 0, 0), 1);
        s.fail_next_sets.set(CAS_RETRIES as u32 * 4);
        assert_eq!(pick(&s, &c, None, 0), Selection::Busy, "contention beyond the retry budget refuses, and is not a rate limit");
        assert_eq!(rpm(&s, &c, 0, 0), 1);
    }

    #[test]
    fn fail2ban_through_the_store_with_timed_ban() {
        let c = cfg(&[("c1", -1), ("c2", -1)], "fail2ban: {max_attempts: 3, ban_duration: 100ms}");
        let s = MemStore::default();
        let k = StateKeys::for_config(&c);
        assert_eq!(status(&s, &c, 0, 401, 0), BanEvent::Counted { errors: 1 });
        status(&s, &c, 0, 403, 0);
        assert_eq!(status(&s, &c, 0, 500, 0), BanEvent::Banned { until_ms: 100 });
        assert_eq!(health(&s, &k, 50).banned, 1);
        assert_eq!(status(&s, &c, 0, 200, 60), BanEvent::Ignored);
        assert_eq!(health(&s, &k, 150).banned, 0);
        assert_eq!(ban_state(&s, &k[0].ban, 150).unwrap().errors, 0);
    }

    #[test]
    fn corrupt_records_refuse_once_then_are_rewritten() {
        let c = cfg(&[("c1", 1)], "");
        let k = StateKeys::for_config(&c);
        let s = MemStore::default();
        s.set(&k[0].rate, b"\xffgarbage", 0).unwrap();
        assert_eq!(pick(&s, &c, None, 0), Selection::Busy, "a limiter never fails open on a bad record");
        assert!(matches!(pick(&s, &c, None, 0), Selection::Chosen { index: 0, rpm_current: 1 }));
        s.set(&k[0].ban, b"\x01", 0).unwrap();
        assert_eq!(pick(&s, &c, None, 1000), Selection::Busy);
        assert_eq!(
            pick(&s, &c, None, 2000),
            Selection::RateLimited { retry_after: 59 },
            "the ban record is clean again; the window is full"
        );
        s.set(CURSOR_KEY, b"xyz", 0).unwrap();
        assert_eq!(
            pick(&s, &c, None, 3000),
            Selection::RateLimited { retry_after: 58 },
            "a corrupt cursor is fairness only: selection goes on"
        );
        assert_eq!(read(&s, CURSOR_KEY, decode_cursor).unwrap(), Some(0), "and it was reset");
    }

    #[test]
    fn a_corrupt_tpm_record_refuses_once_then_is_reset() {
        let text =
            "server: {master_key: mk, default_models_rpm: -1}\ncredentials:\n  - {name: c1, api_key: k1, base_url: 'http://h', tpm: 100}\n";
        let c = load(text, &|_| None).unwrap();
        let k = StateKeys::for_config(&c);
        let s = MemStore::default();
        s.set(&k[0].tokens, b"\xffgarbage", 0).unwrap();
        assert_eq!(pick(&s, &c, Some("m"), 0), Selection::Busy, "a limiter never fails open on a bad record");
        assert!(matches!(pick(&s, &c, Some("m"), 0), Selection::Chosen { index: 0, .. }), "reset at once, not at the next charge");
        assert_eq!(read(&s, &k[0].tokens, RateRecord::decode).unwrap(), Some(RateRecord::default()));
    }

    #[test]
    fn lost_fail2ban_updates_are_reported_not_dropped() {
        let c = cfg(&[("c1", -1)], "");
        let k = StateKeys::for_config(&c);
        let s = MemStore::default();
        s.fail_next_sets.set(CAS_RETRIES as u32);
        assert_eq!(record_status(&s, &c, &k[0], 500, None, 0, 0), Err(UpdateError::Contention));
    }

    #[test]
    fn state_follows_the_credential_identity_across_a_config_push() {
        let before = cfg(&[("c1", 1), ("c2", -1)], "fail2ban: {max_attempts: 1, ban_duration: permanent}");
        let s = MemStore::default();
        assert!(matches!(pick(&s, &before, None, 0), Selection::Chosen { index: 0, .. }));
        status(&s, &before, 1, 500, 0);
        // The same credentials pushed again (a no-op push): c1's window and c2's ban stay.
        let same = cfg(&[("c1", 1), ("c2", -1)], "fail2ban: {max_attempts: 1, ban_duration: permanent}");
        assert_eq!(pick(&s, &same, None, 1000), Selection::Unavailable { banned: 1, serving: 2 });
        // c2's key rotated: a new provider key, not banned; c1 unchanged keeps its full window.
        let rotated = load(
            "server: {master_key: mk, default_models_rpm: -1}\ncredentials:\n  - {name: c1, api_key: key-c1, base_url: 'http://127.0.0.1:1', rpm: 1}\n  - {name: c2, api_key: new-key, base_url: 'http://127.0.0.1:1', rpm: -1}\nfail2ban: {max_attempts: 1, ban_duration: permanent}",
            &|_| None,
        )
        .unwrap();
        assert!(matches!(pick(&s, &rotated, None, 2000), Selection::Chosen { index: 1, .. }));
        assert!(matches!(pick(&s, &rotated, None, 2000), Selection::Chosen { index: 1, .. }), "c1 is still full");
        // A new fail2ban policy re-judges: c2 with its old key is no longer banned.
        let policy = cfg(&[("c1", 1), ("c2", -1)], "fail2ban: {max_attempts: 5, ban_duration: 1m}");
        assert_eq!(health(&s, &StateKeys::for_config(&policy), 3000).banned, 0);
        let k1 = StateKeys::for_config(&before);
        assert_eq!(k1[0].rate, StateKeys::for_config(&policy)[0].rate, "windows don't depend on the fail2ban policy");
        assert!(!k1[0].rate.contains("key-c1"), "no secret in a key name");
    }

    #[test]
    fn a_cooling_key_is_skipped_like_a_full_window_and_its_429_is_not_a_strike() {
        let c = cfg(&[("c1", -1), ("c2", 1)], "fail2ban: {max_attempts: 1, ban_duration: permanent, error_codes: [429]}");
        let k = StateKeys::for_config(&c);
        let s = MemStore::default();
        assert_eq!(record_status(&s, &c, &k[0], 429, Some(30_000), 0, 0), Ok(BanEvent::Unchanged), "cooldown, not a ban");
        assert!(matches!(pick(&s, &c, None, 1000), Selection::Chosen { index: 1, .. }), "c1 cools down; c2 serves");
        assert_eq!(pick(&s, &c, None, 2000), Selection::RateLimited { retry_after: 28 }, "c1 cooling (28 s), c2 full (59 s)");
        assert!(matches!(pick(&s, &c, None, 30_000), Selection::Chosen { index: 0, .. }), "c1 is back");
        let st = credential_states(&s, &c, &k, 2000);
        assert_eq!((st[0].status(2000), st[0].cooldown_until_ms, st[1].rpm_used), ("cooldown", 30_000, 1));
        let v: serde_json::Value = serde_json::from_str(&credential_states_json(&st, 2000)).unwrap();
        assert_eq!(v["data"][0]["cooldown_until"], 30);
        assert_eq!(v["data"][1]["rpm"]["limit"], 1);
        assert!(!credential_states_json(&st, 2000).contains("key-c1"), "never the key");
        // A 429 for a request admitted before the rest ended is no strike (it was in flight)...
        assert_eq!(record_status(&s, &c, &k[0], 429, Some(35_000), 29_000, 31_000), Ok(BanEvent::Unchanged));
        // ...one admitted after it ended is the key failing after its rest: with 429 listed, a strike.
        assert!(matches!(record_status(&s, &c, &k[0], 429, Some(45_000), 36_000, 40_000), Ok(BanEvent::Banned { .. })));
        // Not listed: never.
        let c2 = cfg(&[("c1", -1)], "fail2ban: {max_attempts: 1, ban_duration: permanent, error_codes: [500]}");
        let k2 = StateKeys::for_config(&c2);
        for i in 0..5u64 {
            assert_eq!(record_status(&s, &c2, &k2[0], 429, Some(1000 * (i + 1)), 1000 * i + 500, 1000 * i + 600), Ok(BanEvent::Unchanged));
        }
        // A success forgets the rest: the next 429 is a first one again.
        let c3 = cfg(&[("c9", -1)], "fail2ban: {max_attempts: 1, ban_duration: permanent}");
        let k3 = StateKeys::new(&c3.credentials[0], &c3.fail2ban);
        record_status(&s, &c3, &k3, 429, Some(1_000), 0, 0).unwrap();
        record_status(&s, &c3, &k3, 200, None, 2_000, 2_000).unwrap();
        assert_eq!(record_status(&s, &c3, &k3, 429, Some(4_000), 3_000, 3_000), Ok(BanEvent::Unchanged), "after a success");
    }

    #[test]
    fn tried_credentials_are_never_picked_again() {
        let c = cfg(&[("c1", -1), ("c2", -1), ("c3", -1)], "");
        let s = MemStore::default();
        let k = StateKeys::for_config(&c);
        assert!(matches!(select(&s, &c, &k, None, &all, &[0, 1], 0), Selection::Chosen { index: 2, .. }));
        assert_eq!(
            select(&s, &c, &k, Some("m"), &all, &[0, 1, 2], 0),
            Selection::Unavailable { banned: 0, serving: 0 },
            "no key left is not a model error"
        );
    }

    #[test]
    fn tpm_is_checked_before_selection_and_charged_after() {
        let text = "server: {master_key: mk, default_models_rpm: -1}\ncredentials:\n  - {name: c1, api_key: k1, base_url: 'http://h', tpm: 100}\n  - {name: c2, api_key: k2, base_url: 'http://h', tpm: 100}\n";
        let c = load(text, &|_| None).unwrap();
        let k = StateKeys::for_config(&c);
        let s = MemStore::default();
        let mut served = vec![];
        for t in 0..5u64 {
            match pick(&s, &c, Some("m"), t * 1000) {
                Selection::Chosen { index, .. } => {
                    charge_tokens(&s, &c, index, &k[index], Some("m"), 60, t * 1000).unwrap();
                    served.push(index);
                }
                Selection::RateLimited { retry_after } => {
                    assert_eq!((t, retry_after), (4, 57), "c1's 60 tokens of second 0 leave at 61 s");
                    served.push(9);
                }
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(served, [0, 1, 0, 1, 9], "60 + 60 on each key reaches 100: the fifth is refused");
        assert_eq!(tpm_current(&s, &k[0], 4000), 120);
        let v: serde_json::Value = serde_json::from_str(&credential_states_json(&credential_states(&s, &c, &k, 4000), 4000)).unwrap();
        assert_eq!((v["data"][0]["tpm"]["used"].as_u64(), v["data"][0]["tpm"]["limit"].as_i64()), (Some(120), Some(100)));
        let unlimited = cfg(&[("u", -1)], "");
        charge_tokens(&s, &unlimited, 0, &StateKeys::for_config(&unlimited)[0], None, 500, 0).unwrap();
        assert!(s.get(&StateKeys::for_config(&unlimited)[0].tokens).unwrap().0.is_none(), "no window for an unlimited key");
    }

    fn weighted(weights: &[(u32, i64)]) -> Config {
        let list: Vec<String> = weights
            .iter()
            .enumerate()
            .map(|(i, (w, rpm))| format!("  - {{name: c{i}, api_key: key-{i}, base_url: 'http://127.0.0.1:1', rpm: {rpm}, weight: {w}}}"))
            .collect();
        load(&format!("server: {{master_key: mk, default_models_rpm: -1}}\ncredentials:\n{}\n", list.join("\n")), &|_| None).unwrap()
    }

    fn counts(store: &MemStore, c: &Config, n: usize, now_ms: u64) -> Vec<usize> {
        let mut seen = vec![0; c.credentials.len()];
        for _ in 0..n {
            match pick(store, c, None, now_ms) {
                Selection::Chosen { index, .. } => seen[index] += 1,
                other => panic!("{other:?}"),
            }
        }
        seen
    }

    #[test]
    fn weights_give_exact_smooth_shares() {
        assert_eq!(crate::config::weighted_schedule(&[1, 1, 1]), [0, 1, 2], "equal weights: plain round-robin");
        assert_eq!(crate::config::weighted_schedule(&[5, 1, 1]), [0, 0, 1, 0, 2, 0, 0], "nginx's smooth order");
        assert_eq!(crate::config::weighted_schedule(&[2, 4, 6]), crate::config::weighted_schedule(&[1, 2, 3]), "reduced by the gcd");
        let s = MemStore::default();
        let c = weighted(&[(1, -1), (2, -1), (3, -1)]);
        assert_eq!(counts(&s, &c, 600, 0), [100, 200, 300]);
        // Smooth: the heaviest key never takes more than two picks in a row.
        let order: Vec<usize> = (0..12)
            .map(|_| match pick(&s, &c, None, 0) {
                Selection::Chosen { index, .. } => index,
                o => panic!("{o:?}"),
            })
            .collect();
        assert!(order.windows(3).all(|w| !(w[0] == w[1] && w[1] == w[2])), "{order:?}");
    }

    #[test]
    fn weights_share_among_the_keys_that_pass() {
        // c2 (weight 3) is full after one admission: c0 and c1 then split 1:2.
        let s = MemStore::default();
        let c = weighted(&[(1, -1), (2, -1), (3, 1)]);
        let seen = counts(&s, &c, 301, 0);
        assert_eq!(seen[2], 1);
        assert!((99..=101).contains(&seen[0]) && (199..=201).contains(&seen[1]), "{seen:?}");
        // Equal weights walk exactly as before: a refused key's turn goes to the next one.
        let c = weighted(&[(1, -1), (1, -1), (1, -1)]);
        assert_eq!(counts(&MemStore::default(), &c, 6, 0), [2, 2, 2]);
    }
}
