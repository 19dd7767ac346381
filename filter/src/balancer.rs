//! Credential selection (SPEC §5) over shared data: a round-robin cursor shared by all workers,
//! skipping credentials that are banned, don't serve the model, or whose RPM windows are full.

use crate::config::{Config, Rpm};
use crate::fail2ban::{BanEvent, BanRecord};
use crate::rate_window::{RateRecord, Refused};
use crate::store::{cas_update, SharedStore};

pub const CURSOR_KEY: &str = "aar/rr";

pub fn rate_key(credential: &str) -> String {
    format!("aar/rpm/{credential}")
}

pub fn ban_key(credential: &str) -> String {
    format!("aar/ban/{credential}")
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selection {
    Chosen { index: usize, rpm_current: u32 },
    /// Every candidate was refused by an RPM window.
    RateLimited { retry_after: u64 },
    /// No candidate: none serves the model, or the candidates are banned (maybe some full too).
    Unavailable { banned: usize, serving: usize },
}

/// Creates the records this config needs, so that no key is first written on the hot path
/// (Envoy's CAS can't guard the creation of a key).
pub fn init_keys(store: &dyn SharedStore, cfg: &Config) {
    if store.get(CURSOR_KEY).0.is_none() {
        let _ = store.set(CURSOR_KEY, &0u32.to_le_bytes(), 0);
    }
    for c in &cfg.credentials {
        for (key, empty) in [(rate_key(&c.name), RateRecord::default().encode()), (ban_key(&c.name), BanRecord::default().encode())] {
            if store.get(&key).0.is_none() {
                let _ = store.set(&key, &empty, 0);
            }
        }
    }
}

fn decode_cursor(bytes: Option<&[u8]>) -> u32 {
    bytes.and_then(|b| b.try_into().ok()).map(u32::from_le_bytes).unwrap_or(0)
}

/// Claims the next start position: each concurrent request gets its own.
fn claim_cursor(store: &dyn SharedStore, n: usize) -> usize {
    let mut start = 0;
    let claimed = cas_update(
        store,
        CURSOR_KEY,
        decode_cursor,
        |c| c.to_le_bytes().to_vec(),
        |c| {
            start = *c as usize % n;
            *c = ((start + 1) % n) as u32;
            (true, ())
        },
    );
    if claimed.is_none() {
        start = decode_cursor(store.get(CURSOR_KEY).0.as_deref()) as usize % n;
    }
    start
}

/// After skipping to `chosen`, moves the cursor past it, unless another request moved it meanwhile.
fn advance_cursor_past(store: &dyn SharedStore, claimed_next: usize, chosen: usize, n: usize) {
    let (bytes, cas) = store.get(CURSOR_KEY);
    if decode_cursor(bytes.as_deref()) as usize == claimed_next {
        let _ = store.set(CURSOR_KEY, &(((chosen + 1) % n) as u32).to_le_bytes(), cas);
    }
}

pub fn ban_state(store: &dyn SharedStore, credential: &str, now_ms: u64) -> BanRecord {
    BanRecord::decode(store.get(&ban_key(credential)).0.as_deref()).current(now_ms)
}

/// Picks a credential for a request and charges its RPM windows.
/// `serves(i, model)` says whether credential `i` serves the model (true if its list is unknown).
pub fn select(
    store: &dyn SharedStore,
    cfg: &Config,
    model: Option<&str>,
    serves: &dyn Fn(usize, &str) -> bool,
    now_ms: u64,
) -> Selection {
    let n = cfg.credentials.len();
    let now_s = now_ms / 1000;
    let start = claim_cursor(store, n);
    let model_limit = model.map(|m| (m, cfg.model_rpm(m)));
    let (mut serving, mut banned, mut other_refusals) = (0, 0, 0);
    let mut retry_after: Option<u64> = None;
    let chosen = |index: usize, rpm_current: u32| {
        if index != start {
            advance_cursor_past(store, (start + 1) % n, index, n);
        }
        Selection::Chosen { index, rpm_current }
    };
    for k in 0..n {
        let i = (start + k) % n;
        let cred = &cfg.credentials[i];
        if let Some(m) = model {
            if !serves(i, m) {
                continue;
            }
        }
        serving += 1;
        if ban_state(store, &cred.name, now_ms).is_banned(now_ms) {
            banned += 1;
            continue;
        }
        if cred.rpm == Rpm::Unlimited && model_limit.is_none_or(|(_, l)| l == Rpm::Unlimited) {
            return chosen(i, 0);
        }
        let outcome = cas_update(
            store,
            &rate_key(&cred.name),
            RateRecord::decode,
            RateRecord::encode,
            |r| {
                r.prune(now_s);
                match r.try_admit(now_s, cred.rpm, model_limit) {
                    Ok(()) => (true, Ok(r.credential.count())),
                    Err(e) => (false, Err(e)),
                }
            },
        );
        match outcome {
            Some(Ok(rpm_current)) => return chosen(i, rpm_current),
            Some(Err(Refused::Full { retry_after: r })) => {
                retry_after = Some(retry_after.map_or(r, |x| x.min(r)));
            }
            // Too many models, or every CAS retry lost: refuse rather than risk over-admitting.
            Some(Err(Refused::TooManyModels)) | None => other_refusals += 1,
        }
    }
    match retry_after {
        Some(r) if banned == 0 && other_refusals == 0 => Selection::RateLimited { retry_after: r },
        _ if other_refusals > 0 && banned == 0 && serving > 0 => Selection::RateLimited { retry_after: 1 },
        _ => Selection::Unavailable { banned, serving },
    }
}

/// Feeds one upstream response status into the credential's fail2ban record.
pub fn record_status(store: &dyn SharedStore, cfg: &Config, index: usize, status: u16, now_ms: u64) -> BanEvent {
    let name = &cfg.credentials[index].name;
    cas_update(store, &ban_key(name), BanRecord::decode, BanRecord::encode, |r| {
        let before = *r;
        let event = r.on_status(status, now_ms, &cfg.fail2ban);
        (*r != before, event)
    })
    .unwrap_or(BanEvent::Unchanged)
}

/// Admissions in the current window, for the `credential_rpm_current` gauge.
pub fn rpm_current(store: &dyn SharedStore, credential: &str, now_ms: u64) -> u32 {
    let mut r = RateRecord::decode(store.get(&rate_key(credential)).0.as_deref());
    r.credential.prune(now_ms / 1000);
    r.credential.count()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Health {
    pub total: usize,
    pub banned: usize,
}

impl Health {
    pub fn available(&self) -> usize {
        self.total - self.banned
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

pub fn health(store: &dyn SharedStore, cfg: &Config, now_ms: u64) -> Health {
    let banned = cfg.credentials.iter().filter(|c| ban_state(store, &c.name, now_ms).is_banned(now_ms)).count();
    Health { total: cfg.credentials.len(), banned }
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
        select(store, cfg, model, &all, now_ms)
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
            record_status(store, cfg, i, 500, 0);
        }
    }

    #[test]
    fn round_robin_in_config_order() {
        let c = cfg(&[("c1", -1), ("c2", -1), ("c3", -1)], "");
        let s = MemStore::default();
        init_keys(&s, &c);
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
        assert_eq!(health(&s, &c, 0).to_json(), r#"{"credentials_available":0,"credentials_banned":2,"status":"unhealthy","total_credentials":2}"#);
    }

    #[test]
    fn all_full_is_rate_limited_with_retry_after() {
        let c = cfg(&[("c1", 1), ("c2", 1)], "");
        let s = MemStore::default();
        assert!(matches!(pick(&s, &c, None, 0), Selection::Chosen { index: 0, rpm_current: 1 }));
        assert!(matches!(pick(&s, &c, None, 10_000), Selection::Chosen { index: 1, .. }));
        assert_eq!(pick(&s, &c, None, 20_000), Selection::RateLimited { retry_after: 40 });
    }

    #[test]
    fn model_served_by_one_credential_goes_there() {
        let c = cfg(&[("c1", -1), ("c2", -1)], "");
        let s = MemStore::default();
        let only_c1 = |i: usize, m: &str| m != "special" || i == 0;
        for _ in 0..3 {
            assert!(matches!(select(&s, &c, Some("special"), &only_c1, 0), Selection::Chosen { index: 0, .. }));
        }
        let nobody = |_: usize, _: &str| false;
        assert_eq!(select(&s, &c, Some("ghost"), &nobody, 0), Selection::Unavailable { banned: 0, serving: 0 });
    }

    #[test]
    fn model_rpm_limits_even_when_another_credential_is_free() {
        let c = cfg(&[("c1", -1), ("c2", -1)], "models: [{name: gpt-4o, rpm: 1}]");
        let s = MemStore::default();
        let only_c1 = |i: usize, _: &str| i == 0;
        assert!(matches!(select(&s, &c, Some("gpt-4o"), &only_c1, 0), Selection::Chosen { index: 0, .. }));
        assert_eq!(select(&s, &c, Some("gpt-4o"), &only_c1, 1000), Selection::RateLimited { retry_after: 59 });
        assert!(matches!(select(&s, &c, Some("other"), &all, 1000), Selection::Chosen { .. }), "c2 itself is free");
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
        record_status(&s, &c, 0, 500, 0);
        record_status(&s, &c, 0, 500, 0);
        assert_eq!(ban_state(&s, "c1", 0).errors, 2);
        assert_eq!(ban_state(&s, "c2", 0), BanRecord::default());
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
        assert!(matches!(pick(&s, &c, None, 59_999), Selection::RateLimited { retry_after: 1 }));
        assert!(matches!(pick(&s, &c, None, 60_000), Selection::Chosen { .. }), "the admission at 0 s has left");
        assert_eq!(rpm_current(&s, "c1", 60_000), 2);
    }

    #[test]
    fn lost_cas_races_are_retried_not_double_charged() {
        let c = cfg(&[("c1", 5)], "");
        let s = MemStore::default();
        init_keys(&s, &c);
        s.fail_next_sets.set(3);
        assert!(matches!(pick(&s, &c, None, 0), Selection::Chosen { index: 0, rpm_current: 1 }));
        assert_eq!(rpm_current(&s, "c1", 0), 1);
        s.fail_next_sets.set(CAS_RETRIES as u32 * 4);
        assert!(matches!(pick(&s, &c, None, 0), Selection::RateLimited { .. }), "contention beyond the retry budget refuses");
        assert_eq!(rpm_current(&s, "c1", 0), 1);
    }

    #[test]
    fn fail2ban_through_the_store_with_timed_ban() {
        let c = cfg(&[("c1", -1), ("c2", -1)], "fail2ban: {max_attempts: 3, ban_duration: 100ms}");
        let s = MemStore::default();
        assert_eq!(record_status(&s, &c, 0, 401, 0), BanEvent::Counted { errors: 1 });
        record_status(&s, &c, 0, 403, 0);
        assert_eq!(record_status(&s, &c, 0, 500, 0), BanEvent::Banned { until_ms: 100 });
        assert_eq!(health(&s, &c, 50).banned, 1);
        assert_eq!(record_status(&s, &c, 0, 200, 60), BanEvent::Ignored);
        assert_eq!(health(&s, &c, 150).banned, 0);
        assert_eq!(ban_state(&s, "c1", 150).errors, 0);
    }

    #[test]
    fn corrupt_records_read_as_empty_and_are_rewritten() {
        let c = cfg(&[("c1", 1)], "");
        let s = MemStore::default();
        s.set(&rate_key("c1"), b"\xffgarbage", 0).unwrap();
        s.set(&ban_key("c1"), b"\x01", 0).unwrap();
        s.set(CURSOR_KEY, b"xyz", 0).unwrap();
        assert!(matches!(pick(&s, &c, None, 0), Selection::Chosen { index: 0, rpm_current: 1 }));
        assert_eq!(rpm_current(&s, "c1", 0), 1);
    }
}
