//! `credentials[].max_concurrent`: requests in flight per credential, across the Envoy's workers.
//!
//! One shared-data record per credential lists the slots held: (slot id, expiry). A request takes
//! a slot when the credential is chosen and gives it back when its attempt ends; a slot whose
//! holder never gave it back (a VM that trapped loses its contexts, so nothing runs for them)
//! expires after `request_timeout`, the longest a request can hold one. The record never holds
//! more than `max_concurrent` slots.

use crate::store::{cas_update, SharedStore, UpdateError};

/// Slots of one credential, oldest first.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Slots(pub Vec<(u64, u64)>);

const VERSION: u8 = 1;

impl Slots {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(1 + 16 * self.0.len());
        out.push(VERSION);
        for (id, until) in &self.0 {
            out.extend_from_slice(&id.to_le_bytes());
            out.extend_from_slice(&until.to_le_bytes());
        }
        out
    }

    /// `None` for a corrupt record (the caller resets it).
    pub fn decode(b: &[u8]) -> Option<Slots> {
        let (&[VERSION], rest) = b.split_first_chunk::<1>()? else { return None };
        if rest.len() % 16 != 0 {
            return None;
        }
        let slots = rest
            .chunks_exact(16)
            .map(|c| {
                let (id, until) = c.split_at(8);
                Some((u64::from_le_bytes(id.try_into().ok()?), u64::from_le_bytes(until.try_into().ok()?)))
            })
            .collect::<Option<Vec<_>>>()?;
        Some(Slots(slots))
    }

    /// Slots still held at `now_ms`.
    pub fn live(&self, now_ms: u64) -> usize {
        self.0.iter().filter(|(_, until)| *until > now_ms).count()
    }
}

/// Whether the credential has a free slot now (no write: a candidate at its cap is skipped before
/// any charge).
pub fn has_room(store: &dyn SharedStore, key: &str, cap: u32, now_ms: u64) -> bool {
    match store.get(key) {
        Ok((None, _)) => true,
        Ok((Some(b), _)) => Slots::decode(&b).is_none_or(|s| s.live(now_ms) < cap as usize),
        Err(_) => false,
    }
}

/// Takes a slot for `id` until `until_ms`; false when `cap` are held (or the record can't be
/// written: never more than the cap).
pub fn acquire(store: &dyn SharedStore, key: &str, cap: u32, id: u64, now_ms: u64, until_ms: u64) -> Result<bool, UpdateError> {
    cas_update(store, key, Slots::decode, Slots::encode, |s| {
        s.0.retain(|(_, until)| *until > now_ms);
        if s.0.len() >= cap as usize {
            return (true, false);
        }
        s.0.push((id, until_ms));
        (true, true)
    })
}

/// Gives `id`'s slot back (nothing if it holds none: releasing twice is harmless).
pub fn release(store: &dyn SharedStore, key: &str, id: u64, now_ms: u64) -> Result<(), UpdateError> {
    cas_update(store, key, Slots::decode, Slots::encode, |s| {
        let before = s.0.len();
        s.0.retain(|(held, until)| *held != id && *until > now_ms);
        (s.0.len() != before, ())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MemStore;

    #[test]
    fn the_cap_holds_slots_come_back_and_expire() {
        let s = MemStore::default();
        assert!(acquire(&s, "k", 2, 1, 0, 100).unwrap());
        assert!(acquire(&s, "k", 2, 2, 0, 100).unwrap());
        assert!(!acquire(&s, "k", 2, 3, 0, 100).unwrap(), "a third is refused");
        assert!(!has_room(&s, "k", 2, 10));
        release(&s, "k", 1, 10).unwrap();
        release(&s, "k", 1, 10).unwrap();
        assert!(has_room(&s, "k", 2, 10), "released once, twice harmless");
        assert!(acquire(&s, "k", 2, 3, 10, 100).unwrap());
        // A holder that never comes back (its VM trapped): the slot expires.
        assert!(!has_room(&s, "k", 2, 99));
        assert!(has_room(&s, "k", 2, 100));
        assert!(acquire(&s, "k", 2, 4, 100, 200).unwrap());
        assert!(acquire(&s, "k", 2, 5, 100, 200).unwrap());
    }

    #[test]
    fn codec() {
        let s = Slots(vec![(1, 2), (u64::MAX, 7)]);
        assert_eq!(Slots::decode(&s.encode()), Some(s));
        assert_eq!(Slots::decode(&[VERSION, 1, 2]), None);
        assert_eq!(Slots::decode(&[]), None);
    }
}
