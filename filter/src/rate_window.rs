//! RPM windows: at most `limit` admissions in any 60 s of real time. Admissions are counted in
//! one-second buckets, and a bucket at second `s` counts while `now - s <= 60` (61 buckets), so an
//! admission at 0.9 s still counts at 60.9 s: any real 60-second interval holds at most `limit`
//! (a slot frees up to a second later than an exact sliding window would free it).

use crate::config::Rpm;
use std::hash::BuildHasher;

/// Seconds a bucket counts for after its own: buckets `now - WINDOW_SECS ..= now`.
pub const WINDOW_SECS: u64 = 60;
/// Most buckets one window holds.
pub const MAX_BUCKETS: usize = WINDOW_SECS as usize + 1;
/// Bound on one credential's record in bytes: it is copied and rewritten on every admission.
pub const MAX_RECORD_BYTES: usize = 64 * 1024;
/// Bytes of an encoded window: a tag, then (when not empty) its newest second and 61 counts.
const WINDOW_BYTES: usize = 1 + 4 + 4 * MAX_BUCKETS;
/// Bytes a model window takes: name hash and window.
const MODEL_ENTRY_MAX: usize = 8 + WINDOW_BYTES;
/// Bytes before the model windows at most: version, the credential window, model count.
const HEAD_MAX: usize = 1 + WINDOW_BYTES + 2;
/// Distinct models one credential tracks at once (models unused for 61 s are dropped); reserving
/// each window's full size keeps the record under `MAX_RECORD_BYTES` whatever the traffic.
pub const MAX_MODEL_WINDOWS: usize = (MAX_RECORD_BYTES - HEAD_MAX) / MODEL_ENTRY_MAX;
// Room for a provider that serves many models at once.
const _: () = assert!(MAX_MODEL_WINDOWS >= 100);

/// Admissions per second over the seconds `last - 60 ..= last`, in a ring of 61 counts indexed
/// by `second % 61`: every admission reads and rewrites its record, so decoding, pruning and
/// encoding are fixed-size copies, not a list rebuilt per request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Window {
    /// The newest second counted (meaningless while every count is 0).
    last: u32,
    counts: [u32; MAX_BUCKETS],
}

impl Default for Window {
    fn default() -> Self {
        Window { last: 0, counts: [0; MAX_BUCKETS] }
    }
}

fn slot(second: u32) -> usize {
    second as usize % MAX_BUCKETS
}

impl Window {
    /// The counted seconds, oldest first, with their counts (> 0).
    fn buckets(&self) -> impl Iterator<Item = (u32, u32)> + '_ {
        let first = self.last.saturating_sub(WINDOW_SECS as u32);
        (first..=self.last).map(|s| (s, self.counts[slot(s)])).filter(|(_, c)| *c > 0)
    }

    /// Forgets admissions that left the window. Buckets more than a window ahead of `now` (the
    /// clock stepped back) are forgotten too.
    pub fn prune(&mut self, now_s: u64) {
        if self.is_empty() {
            return;
        }
        let last = self.last as u64;
        if last + WINDOW_SECS < now_s || now_s + WINDOW_SECS < last.saturating_sub(WINDOW_SECS) {
            *self = Window::default();
            return;
        }
        // Seconds older than `now - 60` (only when time moved past `last`).
        let first = last.saturating_sub(WINDOW_SECS);
        for s in first..now_s.saturating_sub(WINDOW_SECS).min(last + 1) {
            self.counts[slot(s as u32)] = 0;
        }
        // Seconds after `now + 60` (the clock stepped back by more than a minute).
        if last > now_s + WINDOW_SECS {
            for s in (now_s + WINDOW_SECS + 1)..=last {
                self.counts[slot(s as u32)] = 0;
            }
            // The newest second still counted (the charge of a stepped-back clock goes there).
            let kept = (last.saturating_sub(WINDOW_SECS)..=now_s + WINDOW_SECS).rev().find(|s| self.counts[slot(*s as u32)] > 0);
            match kept {
                Some(s) => self.last = s as u32,
                None => *self = Window::default(),
            }
        }
        if self.is_empty() {
            *self = Window::default();
        }
    }

    pub fn count(&self) -> u32 {
        self.counts.iter().fold(0u32, |n, c| n.saturating_add(*c))
    }

    pub fn is_empty(&self) -> bool {
        self.counts.iter().all(|c| *c == 0)
    }

    /// Seconds until one more admission fits (call on a pruned, full window).
    fn retry_after(&self, now_s: u64, limit: u32) -> u64 {
        let must_expire = self.count().saturating_add(1).saturating_sub(limit);
        let mut freed = 0u32;
        for (s, c) in self.buckets() {
            freed = c.saturating_add(freed);
            if freed >= must_expire {
                return ((s as u64) + WINDOW_SECS + 1).saturating_sub(now_s).max(1);
            }
        }
        1
    }

    /// `Ok` if one more admission fits under `limit`, else `Err(retry_after_secs)`.
    pub fn check(&self, now_s: u64, limit: Rpm) -> Result<(), u64> {
        match limit {
            Rpm::Unlimited => Ok(()),
            Rpm::Limit(n) if self.count() < n => Ok(()),
            Rpm::Limit(n) => Err(self.retry_after(now_s, n)),
        }
    }

    pub fn charge(&mut self, now_s: u64) {
        self.charge_n(now_s, 1);
    }

    /// Adds `n` (tokens, for TPM windows) at `now_s`; when the clock stepped back, to the newest
    /// second counted, so seconds stay in order.
    pub fn charge_n(&mut self, now_s: u64, n: u32) {
        if n == 0 {
            return;
        }
        let s = now_s as u32;
        if self.is_empty() {
            *self = Window::default();
            self.last = s;
        } else if s > self.last {
            // The ring moves on: the slots of the new seconds held seconds a window ago.
            if s - self.last > WINDOW_SECS as u32 {
                self.counts = [0; MAX_BUCKETS];
            } else {
                for t in self.last + 1..=s {
                    self.counts[slot(t)] = 0;
                }
            }
            self.last = s;
        }
        let c = &mut self.counts[slot(self.last)];
        *c = c.saturating_add(n);
    }

    /// Takes back one admission charged at `at_s`, if its bucket still counts (a pick that was
    /// never used); true if one was taken back.
    pub fn uncharge(&mut self, at_s: u64) -> bool {
        let s = at_s as u32;
        if self.is_empty() || s > self.last || s + (WINDOW_SECS as u32) < self.last {
            return false;
        }
        let c = &mut self.counts[slot(s)];
        if *c == 0 {
            return false;
        }
        *c -= 1;
        true
    }

    fn encoded_len(&self) -> usize {
        if self.is_empty() {
            1
        } else {
            WINDOW_BYTES
        }
    }

    fn encode(&self, out: &mut Vec<u8>) {
        if self.is_empty() {
            out.push(0);
            return;
        }
        out.push(1);
        out.extend_from_slice(&self.last.to_le_bytes());
        for c in &self.counts {
            out.extend_from_slice(&c.to_le_bytes());
        }
    }

    fn decode(input: &mut &[u8]) -> Option<Window> {
        match *take(input, 1)?.first()? {
            0 => Some(Window::default()),
            1 => {
                let raw = take(input, WINDOW_BYTES - 1)?;
                let mut w = Window { last: u32::from_le_bytes(raw.get(..4)?.try_into().ok()?), counts: [0; MAX_BUCKETS] };
                for (c, b) in w.counts.iter_mut().zip(raw.get(4..)?.chunks_exact(4)) {
                    *c = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                }
                Some(w)
            }
            _ => None,
        }
    }
}

fn take<'a>(input: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
    if input.len() < n {
        return None;
    }
    let (head, rest) = input.split_at(n);
    *input = rest;
    Some(head)
}

/// A model's key in a record: a 64-bit hash of its name (fixed size, so the record's bound does
/// not depend on name lengths; a collision would only make two models share one window).
pub fn model_id(model: &str) -> u64 {
    rustc_hash::FxBuildHasher.hash_one(model)
}

/// One credential's windows: its own and one per (credential, model). Kept in one shared-data
/// record so that both slots are charged by a single CAS: together or not at all. The credential
/// window comes first, so the gauge reads it without decoding the model windows.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RateRecord {
    pub credential: Window,
    pub models: Vec<(u64, Window)>,
}

const VERSION: u8 = 3;

/// Why an admission was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// Seconds until a slot frees.
    Full { retry_after: u64 },
    /// Too many distinct models in the last minute to track another.
    TooManyModels,
}

impl RateRecord {
    pub fn prune(&mut self, now_s: u64) {
        self.credential.prune(now_s);
        self.models.retain_mut(|(_, w)| {
            w.prune(now_s);
            !w.is_empty()
        });
    }

    pub fn model_window(&self, model: &str) -> Option<&Window> {
        let id = model_id(model);
        self.models.iter().find(|(m, _)| *m == id).map(|(_, w)| w)
    }

    /// Charges the credential slot and, when `model` has a limit, the (credential, model) slot:
    /// both or neither. The record must be pruned first.
    pub fn try_admit(&mut self, now_s: u64, credential_rpm: Rpm, model: Option<(&str, Rpm)>) -> Result<(), Refused> {
        let cred = self.credential.check(now_s, credential_rpm);
        let model = match model {
            Some((name, limit @ Rpm::Limit(_))) => Some((model_id(name), limit)),
            _ => None,
        };
        let model_idx = model.and_then(|(id, _)| self.models.iter().position(|(m, _)| *m == id));
        let model_check = match (model, model_idx.and_then(|i| self.models.get(i))) {
            (Some((_, limit)), Some((_, w))) => w.check(now_s, limit),
            (Some(_), None) if self.models.len() >= MAX_MODEL_WINDOWS => return Err(Refused::TooManyModels),
            _ => Ok(()),
        };
        match (cred, model_check) {
            (Ok(()), Ok(())) => {}
            (Err(a), Err(b)) => return Err(Refused::Full { retry_after: a.max(b) }),
            (Err(a), _) | (_, Err(a)) => return Err(Refused::Full { retry_after: a }),
        }
        if credential_rpm != Rpm::Unlimited {
            self.credential.charge(now_s);
        }
        if let Some((id, _)) = model {
            match model_idx.and_then(|i| self.models.get_mut(i)) {
                Some((_, w)) => w.charge(now_s),
                None => {
                    let mut w = Window::default();
                    w.charge(now_s);
                    self.models.push((id, w));
                }
            }
        }
        Ok(())
    }

    /// Takes back an admission [`RateRecord::try_admit`] charged at `at_s` with the same limits
    /// (a retry's pick Envoy never used).
    pub fn refund(&mut self, at_s: u64, credential_rpm: Rpm, model: Option<(&str, Rpm)>) {
        if credential_rpm != Rpm::Unlimited {
            self.credential.uncharge(at_s);
        }
        if let Some((name, Rpm::Limit(_))) = model {
            let id = model_id(name);
            if let Some((_, w)) = self.models.iter_mut().find(|(m, _)| *m == id) {
                w.uncharge(at_s);
            }
        }
    }

    /// TPM: `Ok` while the credential's tokens in the window, and the (credential, model)'s, are
    /// below their limits; else the seconds until they are. Read-only (tokens are charged when
    /// the response reports them). The record must be pruned first.
    pub fn check_tokens(&self, now_s: u64, credential_tpm: Rpm, model: Option<(&str, Rpm)>) -> Result<(), u64> {
        let cred = self.credential.check(now_s, credential_tpm);
        let model = match model {
            Some((name, limit @ Rpm::Limit(_))) => self.model_window(name).map_or(Ok(()), |w| w.check(now_s, limit)),
            _ => Ok(()),
        };
        match (cred, model) {
            (Err(a), Err(b)) => Err(a.max(b)),
            (Err(a), _) | (_, Err(a)) => Err(a),
            _ => Ok(()),
        }
    }

    /// TPM: charges `tokens` to the credential window (when it has a limit) and to the
    /// (credential, model) window (when given). A model that can't get a window (too many in the
    /// last minute) is charged to the credential only.
    pub fn charge_tokens(&mut self, now_s: u64, tokens: u32, credential_limited: bool, model: Option<&str>) {
        if credential_limited {
            self.credential.charge_n(now_s, tokens);
        }
        let Some(name) = model else { return };
        let id = model_id(name);
        let full = self.models.len() >= MAX_MODEL_WINDOWS;
        match self.models.iter_mut().find(|(m, _)| *m == id) {
            Some((_, w)) => w.charge_n(now_s, tokens),
            None if !full => {
                let mut w = Window::default();
                w.charge_n(now_s, tokens);
                self.models.push((id, w));
            }
            None => {}
        }
    }

    pub fn encoded_len(&self) -> usize {
        1 + self.credential.encoded_len() + 2 + self.models.iter().map(|(_, w)| 8 + w.encoded_len()).sum::<usize>()
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.encoded_len());
        out.push(VERSION);
        self.credential.encode(&mut out);
        out.extend_from_slice(&(self.models.len() as u16).to_le_bytes());
        for (id, w) in &self.models {
            out.extend_from_slice(&id.to_le_bytes());
            w.encode(&mut out);
        }
        out
    }

    /// `None` for a corrupt or other-version record (the caller resets it).
    pub fn decode(mut input: &[u8]) -> Option<RateRecord> {
        let credential = Self::decode_head(&mut input)?;
        let n = u16::from_le_bytes(take(&mut input, 2)?.try_into().ok()?) as usize;
        if n > MAX_MODEL_WINDOWS {
            return None;
        }
        let mut models = Vec::with_capacity(n);
        for _ in 0..n {
            let id = u64::from_le_bytes(take(&mut input, 8)?.try_into().ok()?);
            models.push((id, Window::decode(&mut input)?));
        }
        input.is_empty().then_some(RateRecord { credential, models })
    }

    fn decode_head(input: &mut &[u8]) -> Option<Window> {
        if take(input, 1)? != [VERSION] {
            return None;
        }
        Window::decode(input)
    }

    /// Only the credential window (the 1 s gauge needs nothing else).
    pub fn decode_credential(mut input: &[u8]) -> Option<Window> {
        Self::decode_head(&mut input)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admits_up_to_limit_then_refuses_with_retry_after() {
        let mut r = RateRecord::default();
        assert!(r.try_admit(100, Rpm::Limit(2), None).is_ok());
        assert!(r.try_admit(110, Rpm::Limit(2), None).is_ok());
        assert_eq!(r.try_admit(120, Rpm::Limit(2), None), Err(Refused::Full { retry_after: 41 }));
        assert_eq!(r.credential.count(), 2);
    }

    #[test]
    fn window_slides() {
        let mut r = RateRecord::default();
        for t in 0..3 {
            r.try_admit(1000 + t, Rpm::Limit(3), None).unwrap();
        }
        r.prune(1060);
        assert!(r.try_admit(1060, Rpm::Limit(3), None).is_err(), "an admission in second 1000 may have been at 1000.9");
        r.prune(1061);
        assert_eq!(r.credential.count(), 2, "the admission at 1000 left the window at 1061");
        assert!(r.try_admit(1061, Rpm::Limit(3), None).is_ok());
        r.prune(1200);
        assert_eq!(r.credential.count(), 0);
    }

    #[test]
    fn unlimited_admits_without_recording() {
        let mut r = RateRecord::default();
        for _ in 0..1000 {
            r.try_admit(5, Rpm::Unlimited, Some(("m", Rpm::Unlimited))).unwrap();
        }
        assert_eq!(r, RateRecord::default());
    }

    #[test]
    fn credential_and_model_charged_together_or_not_at_all() {
        let mut r = RateRecord::default();
        r.try_admit(0, Rpm::Limit(10), Some(("gpt", Rpm::Limit(1)))).unwrap();
        let before = r.clone();
        assert_eq!(r.try_admit(1, Rpm::Limit(10), Some(("gpt", Rpm::Limit(1)))), Err(Refused::Full { retry_after: 60 }));
        assert_eq!(r, before, "a refused model slot must not charge the credential");
        r.try_admit(1, Rpm::Limit(10), Some(("other", Rpm::Limit(1)))).unwrap();
        assert_eq!(r.credential.count(), 2);
        let mut full = RateRecord::default();
        full.try_admit(0, Rpm::Limit(1), None).unwrap();
        let before = full.clone();
        assert!(full.try_admit(0, Rpm::Limit(1), Some(("gpt", Rpm::Limit(5)))).is_err());
        assert_eq!(full, before, "a refused credential slot must not charge the model");
    }

    #[test]
    fn retry_after_counts_the_buckets_that_must_expire() {
        let mut r = RateRecord::default();
        r.try_admit(10, Rpm::Limit(3), None).unwrap();
        r.try_admit(20, Rpm::Limit(3), None).unwrap();
        r.try_admit(30, Rpm::Limit(3), None).unwrap();
        assert_eq!(r.try_admit(45, Rpm::Limit(3), None), Err(Refused::Full { retry_after: 26 }));
        // Lowering the limit to 2 needs two admissions to expire: the one at 20 frees at 81.
        assert_eq!(r.try_admit(45, Rpm::Limit(2), None), Err(Refused::Full { retry_after: 36 }));
    }

    #[test]
    fn codec_round_trips_and_rejects_garbage() {
        let mut r = RateRecord::default();
        r.try_admit(7, Rpm::Limit(5), Some(("gpt-4o", Rpm::Limit(5)))).unwrap();
        r.try_admit(8, Rpm::Limit(5), Some(("m", Rpm::Limit(5)))).unwrap();
        let bytes = r.encode();
        assert_eq!(RateRecord::decode(&bytes), Some(r.clone()));
        assert_eq!(RateRecord::decode_credential(&bytes), Some(r.credential.clone()));
        for cut in 0..bytes.len() {
            assert_eq!(RateRecord::decode(&bytes[..cut]), None, "truncated at {cut}");
        }
        let mut other_version = bytes.clone();
        other_version[0] = 9;
        assert_eq!(RateRecord::decode(&other_version), None);
        let mut trailing = bytes;
        trailing.push(0);
        assert_eq!(RateRecord::decode(&trailing), None);
    }

    #[test]
    fn clock_stepping_back_keeps_the_record_valid() {
        let mut r = RateRecord::default();
        r.try_admit(1000, Rpm::Limit(3), None).unwrap();
        r.prune(990);
        r.try_admit(990, Rpm::Limit(3), None).unwrap();
        assert_eq!(RateRecord::decode(&r.encode()), Some(r.clone()), "buckets stay ascending");
        assert_eq!(r.credential.count(), 2);
        r.prune(500);
        assert_eq!(r.credential.count(), 0, "a bucket far in the future is forgotten");
    }

    /// The list-of-buckets window this ring replaced, as the reference.
    #[derive(Default)]
    struct ListWindow(Vec<(u32, u32)>);

    impl ListWindow {
        fn prune(&mut self, now_s: u64) {
            self.0.retain(|(s, _)| (*s as u64) + WINDOW_SECS >= now_s && (*s as u64) <= now_s + WINDOW_SECS);
        }
        fn count(&self) -> u32 {
            self.0.iter().fold(0u32, |n, (_, c)| n.saturating_add(*c))
        }
        fn charge_n(&mut self, now_s: u64, n: u32) {
            if n == 0 {
                return;
            }
            match self.0.last_mut() {
                Some((last, c)) if *last >= now_s as u32 => *c = c.saturating_add(n),
                _ => self.0.push((now_s as u32, n)),
            }
        }
        fn retry_after(&self, now_s: u64, limit: u32) -> u64 {
            let must_expire = self.count().saturating_add(1).saturating_sub(limit);
            let mut freed = 0u32;
            for (s, c) in &self.0 {
                freed = c.saturating_add(freed);
                if freed >= must_expire {
                    return ((*s as u64) + WINDOW_SECS + 1).saturating_sub(now_s).max(1);
                }
            }
            1
        }
    }

    proptest::proptest! {
        /// Random charges and prunes, with time going forward, standing still and stepping back:
        /// the ring counts, refuses and computes Retry-After exactly as the list did.
        #[test]
        fn the_ring_matches_the_list_it_replaced(steps in proptest::collection::vec((0i64..200, 0u32..4, proptest::bool::ANY), 1..80)) {
            let (mut ring, mut list) = (Window::default(), ListWindow::default());
            let mut now: u64 = 10_000;
            for (dt, n, prune) in steps {
                now = (now as i64 + dt - 70).max(0) as u64;
                if prune {
                    ring.prune(now);
                    list.prune(now);
                }
                ring.charge_n(now, n);
                list.charge_n(now, n);
                ring.prune(now);
                list.prune(now);
                proptest::prop_assert_eq!(ring.count(), list.count());
                let buckets: Vec<(u32, u32)> = ring.buckets().collect();
                proptest::prop_assert_eq!(&buckets, &list.0);
                for limit in [1, 2, 5] {
                    if ring.count() >= limit {
                        proptest::prop_assert_eq!(ring.retry_after(now, limit), list.retry_after(now, limit));
                    }
                }
                let mut bytes = Vec::new();
                ring.encode(&mut bytes);
                proptest::prop_assert_eq!(Window::decode(&mut bytes.as_slice()), Some(ring.clone()));
            }
        }
    }

    #[test]
    fn huge_counts_from_a_corrupt_record_saturate() {
        // A credential window whose newest second is 1024 with u32::MAX in it, no model windows.
        let mut bytes = vec![VERSION, 1];
        bytes.extend_from_slice(&1024u32.to_le_bytes());
        for s in 0..MAX_BUCKETS as u32 {
            bytes.extend_from_slice(&(if s == 1024 % MAX_BUCKETS as u32 { u32::MAX } else { 0 }).to_le_bytes());
        }
        bytes.extend_from_slice(&[0, 0]);
        let mut r = RateRecord::decode(&bytes).unwrap();
        r.prune(1024);
        assert_eq!(r.try_admit(1024, Rpm::Limit(5), None), Err(Refused::Full { retry_after: 61 }));
        r.credential.charge(1024);
        assert_eq!(r.credential.count(), u32::MAX);
    }

    #[test]
    fn idle_models_are_dropped() {
        let mut r = RateRecord::default();
        r.try_admit(0, Rpm::Unlimited, Some(("a", Rpm::Limit(5)))).unwrap();
        r.try_admit(30, Rpm::Unlimited, Some(("b", Rpm::Limit(5)))).unwrap();
        r.prune(62);
        assert_eq!(r.models.len(), 1);
        assert!(r.model_window("b").is_some());
    }

    #[test]
    fn model_windows_are_bounded() {
        let mut r = RateRecord::default();
        for i in 0..MAX_MODEL_WINDOWS {
            r.try_admit(0, Rpm::Unlimited, Some((&format!("m{i}"), Rpm::Limit(5)))).unwrap();
        }
        assert_eq!(r.try_admit(0, Rpm::Unlimited, Some(("one-more", Rpm::Limit(5)))), Err(Refused::TooManyModels));
        assert!(r.try_admit(0, Rpm::Unlimited, Some(("m3", Rpm::Limit(5)))).is_ok());
    }

    #[test]
    fn record_bytes_are_bounded_whatever_the_traffic() {
        // Every model window full (one admission in each of 61 seconds), as many as allowed.
        let mut r = RateRecord::default();
        for s in 0..MAX_BUCKETS as u64 {
            for i in 0..MAX_MODEL_WINDOWS {
                r.try_admit(s, Rpm::Limit(u32::MAX), Some((&format!("model-with-a-long-name-{i:0>200}"), Rpm::Limit(u32::MAX)))).unwrap();
            }
        }
        assert_eq!(r.models.len(), MAX_MODEL_WINDOWS);
        let len = r.encode().len();
        assert_eq!(len, r.encoded_len());
        assert!(len <= MAX_RECORD_BYTES, "{len} bytes");
    }

    #[test]
    fn any_real_sixty_seconds_hold_at_most_the_limit() {
        // The case that 60 one-second buckets got wrong: a burst at 0.9 s and another at 60.0 s.
        let limit = 5;
        let mut r = RateRecord::default();
        let mut admitted_ms = vec![];
        for t_ms in [900u64, 900, 900, 900, 900, 60_000, 60_000, 60_500, 60_950, 61_000, 61_000] {
            r.prune(t_ms / 1000);
            if r.try_admit(t_ms / 1000, Rpm::Limit(limit), None).is_ok() {
                admitted_ms.push(t_ms);
            }
        }
        for &start in &admitted_ms {
            let n = admitted_ms.iter().filter(|&&a| a >= start && a < start + 60_000).count();
            assert!(n <= limit as usize, "{n} admissions in the 60 s from {start} ms: {admitted_ms:?}");
        }
        assert_eq!(admitted_ms.iter().filter(|&&a| a >= 61_000).count(), 2, "the slots free at 61 s");
    }

    #[test]
    fn token_windows_check_before_and_charge_after() {
        let mut r = RateRecord::default();
        assert_eq!(r.check_tokens(0, Rpm::Limit(100), None), Ok(()));
        r.charge_tokens(0, 60, true, Some("m"));
        assert_eq!(r.check_tokens(1, Rpm::Limit(100), None), Ok(()), "60 < 100: still a candidate");
        r.charge_tokens(1, 60, true, Some("m"));
        assert_eq!(r.check_tokens(2, Rpm::Limit(100), None), Err(59), "120 >= 100 until the 60 of second 0 leave at 61");
        assert_eq!(r.check_tokens(2, Rpm::Unlimited, Some(("m", Rpm::Limit(200)))), Ok(()));
        assert_eq!(r.check_tokens(2, Rpm::Unlimited, Some(("m", Rpm::Limit(120)))), Err(59));
        r.prune(61);
        assert_eq!(r.check_tokens(61, Rpm::Limit(100), None), Ok(()), "the first 60 left");
        r.charge_tokens(61, 0, true, None);
        assert_eq!(r.credential.count(), 60);
    }
}
