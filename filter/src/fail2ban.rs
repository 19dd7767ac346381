//! fail2ban per credential: consecutive error responses ban it for a while (or until restart).
//! The same record holds the credential's provider cooldown (see `cooldown`), so selection reads
//! one record per credential.

use crate::config::{BanDuration, Fail2Ban};

/// `banned_until_ms`: 0 = not banned, `u64::MAX` = permanent. `cooldown_until_ms`: a provider
/// asked us to leave the key alone until then (0 = no cooldown). `rested_until_ms`: when the
/// latest rest since the key's last success ended (kept after it ended, 0 after a 2xx): a 429 for
/// a request admitted after it is the key failing after its rest (see [`BanRecord::on_429`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BanRecord {
    pub errors: u32,
    pub banned_until_ms: u64,
    pub cooldown_until_ms: u64,
    pub rested_until_ms: u64,
}

const PERMANENT: u64 = u64::MAX;
const VERSION: u8 = 3;
const LEN: usize = 29;

/// What a response did to the credential.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BanEvent {
    Unchanged,
    /// The error count moved (up, or back to 0).
    Counted {
        errors: u32,
    },
    Banned {
        until_ms: u64,
    },
    /// The response arrived while the credential was banned.
    Ignored,
}

impl BanRecord {
    pub fn is_banned(&self, now_ms: u64) -> bool {
        self.banned_until_ms > now_ms
    }

    pub fn in_cooldown(&self, now_ms: u64) -> bool {
        self.cooldown_until_ms > now_ms
    }

    /// Extends the cooldown to `until_ms` (never shortens it); true if it changed.
    pub fn cool_down(&mut self, until_ms: u64) -> bool {
        let changed = until_ms > self.cooldown_until_ms;
        self.cooldown_until_ms = self.cooldown_until_ms.max(until_ms);
        self.rested_until_ms = self.rested_until_ms.max(until_ms);
        changed
    }

    /// A provider 429 (its cooldown already applied by the caller with [`BanRecord::cool_down`],
    /// `rested_before` = `rested_until_ms` before that). The rule: a 429 rests the key and is no
    /// fail2ban strike, unless 429 is in `error_codes` and the request it answers was admitted
    /// after an earlier rest had ended (`rested_before <= admitted_ms`, with no success between):
    /// the key keeps failing after its cooldowns. Concurrent requests admitted before the first
    /// rest never count, however many 429s come back together.
    pub fn on_429(&mut self, rested_before: u64, admitted_ms: u64, now_ms: u64, policy: &Fail2Ban) -> BanEvent {
        if rested_before != 0 && rested_before <= admitted_ms {
            self.on_status(429, now_ms, policy)
        } else {
            BanEvent::Unchanged
        }
    }

    /// The record as it stands at `now_ms`: an expired ban has lifted and its count is reset; an
    /// expired cooldown is gone.
    pub fn current(self, now_ms: u64) -> BanRecord {
        let mut r = self;
        if r.banned_until_ms != 0 && r.banned_until_ms <= now_ms {
            r.errors = 0;
            r.banned_until_ms = 0;
        }
        if r.cooldown_until_ms <= now_ms {
            r.cooldown_until_ms = 0;
        }
        r
    }

    /// Applies one upstream response status.
    pub fn on_status(&mut self, status: u16, now_ms: u64, policy: &Fail2Ban) -> BanEvent {
        *self = self.current(now_ms);
        if self.is_banned(now_ms) {
            return BanEvent::Ignored;
        }
        if policy.error_codes.contains(&status) {
            self.errors = self.errors.saturating_add(1);
            if self.errors >= policy.max_attempts {
                self.banned_until_ms = match policy.ban_duration {
                    BanDuration::Permanent => PERMANENT,
                    BanDuration::For(d) => now_ms.saturating_add(u64::try_from(d.as_millis()).unwrap_or(u64::MAX)).min(PERMANENT - 1),
                };
                return BanEvent::Banned { until_ms: self.banned_until_ms };
            }
            return BanEvent::Counted { errors: self.errors };
        }
        if (200..300).contains(&status) {
            self.rested_until_ms = 0;
            if self.errors != 0 {
                self.errors = 0;
                return BanEvent::Counted { errors: 0 };
            }
        }
        BanEvent::Unchanged
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(LEN);
        out.push(VERSION);
        out.extend_from_slice(&self.errors.to_le_bytes());
        out.extend_from_slice(&self.banned_until_ms.to_le_bytes());
        out.extend_from_slice(&self.cooldown_until_ms.to_le_bytes());
        out.extend_from_slice(&self.rested_until_ms.to_le_bytes());
        out
    }

    /// `None` for a corrupt or other-version record (the caller resets it).
    pub fn decode(b: &[u8]) -> Option<BanRecord> {
        let b: &[u8; LEN] = b.try_into().ok()?;
        let (&[VERSION], rest) = b.split_first_chunk::<1>()? else { return None };
        let (e, rest) = rest.split_first_chunk::<4>()?;
        let (u, rest) = rest.split_first_chunk::<8>()?;
        let (c, rest) = rest.split_first_chunk::<8>()?;
        let (r, _) = rest.split_first_chunk::<8>()?;
        Some(BanRecord {
            errors: u32::from_le_bytes(*e),
            banned_until_ms: u64::from_le_bytes(*u),
            cooldown_until_ms: u64::from_le_bytes(*c),
            rested_until_ms: u64::from_le_bytes(*r),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn policy(ban: BanDuration) -> Fail2Ban {
        Fail2Ban { max_attempts: 3, ban_duration: ban, error_codes: vec![401, 403, 429, 500, 502, 503, 504] }
    }

    #[test]
    fn three_listed_errors_ban() {
        let p = policy(BanDuration::Permanent);
        let mut r = BanRecord::default();
        assert_eq!(r.on_status(401, 0, &p), BanEvent::Counted { errors: 1 });
        assert_eq!(r.on_status(403, 1, &p), BanEvent::Counted { errors: 2 });
        assert_eq!(r.on_status(500, 2, &p), BanEvent::Banned { until_ms: u64::MAX });
        assert!(r.is_banned(u64::MAX - 1));
    }

    #[test]
    fn success_resets_and_untracked_changes_nothing() {
        let p = policy(BanDuration::Permanent);
        let mut r = BanRecord::default();
        r.on_status(500, 0, &p);
        r.on_status(500, 0, &p);
        assert_eq!(r.on_status(200, 0, &p), BanEvent::Counted { errors: 0 });
        assert_eq!(r.errors, 0);
        r.on_status(500, 0, &p);
        assert_eq!(r.on_status(404, 0, &p), BanEvent::Unchanged);
        assert_eq!(r.errors, 1);
    }

    #[test]
    fn responses_while_banned_are_ignored() {
        let p = policy(BanDuration::Permanent);
        let mut r = BanRecord::default();
        for _ in 0..3 {
            r.on_status(500, 0, &p);
        }
        let banned = r;
        assert_eq!(r.on_status(200, 5, &p), BanEvent::Ignored);
        assert_eq!(r.on_status(500, 5, &p), BanEvent::Ignored);
        assert_eq!(r, banned);
    }

    #[test]
    fn timed_ban_lifts_and_resets_count() {
        let p = policy(BanDuration::For(Duration::from_millis(100)));
        let mut r = BanRecord::default();
        for _ in 0..3 {
            r.on_status(502, 0, &p);
        }
        assert!(r.is_banned(50));
        assert!(!r.current(150).is_banned(150));
        assert_eq!(r.current(150), BanRecord::default());
        let mut c = BanRecord::default();
        assert!(c.cool_down(500) && !c.cool_down(400), "a cooldown is never shortened");
        assert!(c.in_cooldown(499) && !c.current(500).in_cooldown(500));
        assert_eq!(c.current(500), BanRecord { rested_until_ms: 500, ..BanRecord::default() }, "the rest is remembered");
        assert_eq!(r.on_status(500, 150, &p), BanEvent::Counted { errors: 1 }, "count restarts after the ban");
    }

    #[test]
    fn codec() {
        let r = BanRecord { errors: 2, banned_until_ms: 12345, cooldown_until_ms: 99, rested_until_ms: 77 };
        assert_eq!(BanRecord::decode(&r.encode()), Some(r));
        assert_eq!(BanRecord::decode(&[1, 2, 3]), None);
        let mut other = r.encode();
        other[0] = 7;
        assert_eq!(BanRecord::decode(&other), None);
    }
}
