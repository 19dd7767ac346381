//! Cross-worker state: the proxy-wasm shared-data contract (get with a CAS token, set that fails
//! when the token is stale) as a trait, so CAS loops are plain Rust tested natively.
//!
//! Envoy's shared data accepts any CAS token for a key that does not exist yet, and token 0 means
//! "unconditional". Nothing here ever writes with token 0: a key seen absent is created with
//! [`CREATE_CAS`], a token no live record holds in practice (Envoy hands tokens out from one
//! process-wide counter), so a creator that lost the race to another gets `CasMismatch` and
//! re-reads instead of overwriting the winner's record.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;

/// Why a shared-data call did not do what was asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreError {
    /// A `set` lost a race: the key changed since it was read.
    CasMismatch,
    /// The host answered with an unexpected status (its code).
    Host(u32),
}

pub trait SharedStore {
    /// The value and its CAS token (`(None, 0)` when the key is absent).
    fn get(&self, key: &str) -> Result<(Option<Vec<u8>>, u32), StoreError>;
    /// Writes when `cas` is still the key's token, or the key does not exist (Envoy's rule).
    fn set(&self, key: &str, value: &[u8], cas: u32) -> Result<(), StoreError>;
}

/// The token used to create a key that was read as absent (see the module doc).
pub const CREATE_CAS: u32 = u32::MAX;

/// Bounded retries for a CAS loop: contention this high means something is wrong, and refusing
/// one request is better than admitting past a limit.
pub const CAS_RETRIES: usize = 64;

/// Why [`cas_update`] gave up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpdateError {
    /// Every retry lost its race.
    Contention,
    /// The stored bytes did not decode: they were reset to the empty record (this call changed
    /// nothing else), so the caller refuses once and the next call starts clean.
    Corrupt,
    /// The host refused a shared-data call.
    Host(u32),
}

/// The token to write a value read as (`bytes`, `cas`) back with.
pub fn write_token(present: bool, cas: u32) -> u32 {
    if present && cas != 0 {
        cas
    } else {
        CREATE_CAS
    }
}

/// Reads `key`, applies `update` to its decoded value and writes it back with CAS, retrying lost
/// races. An absent key decodes as `T::default()`. `update` returns `(changed, result)`; nothing
/// is written when `changed` is false.
pub fn cas_update<T: Default, R>(
    store: &dyn SharedStore,
    key: &str,
    decode: impl Fn(&[u8]) -> Option<T>,
    encode: impl Fn(&T) -> Vec<u8>,
    mut update: impl FnMut(&mut T) -> (bool, R),
) -> Result<R, UpdateError> {
    for _ in 0..CAS_RETRIES {
        let (bytes, cas) = store.get(key).map_err(host_error)?;
        let token = write_token(bytes.is_some(), cas);
        let mut value = match bytes.as_deref() {
            None => T::default(),
            Some(b) => match decode(b) {
                Some(v) => v,
                None => {
                    // Refuse once and rewrite: a limiter must not fail open on a bad record.
                    return match store.set(key, &encode(&T::default()), token) {
                        Ok(()) | Err(StoreError::CasMismatch) => Err(UpdateError::Corrupt),
                        Err(StoreError::Host(s)) => Err(UpdateError::Host(s)),
                    };
                }
            },
        };
        let (changed, result) = update(&mut value);
        if !changed {
            return Ok(result);
        }
        match store.set(key, &encode(&value), token) {
            Ok(()) => return Ok(result),
            Err(StoreError::CasMismatch) => continue,
            Err(StoreError::Host(s)) => return Err(UpdateError::Host(s)),
        }
    }
    Err(UpdateError::Contention)
}

fn host_error(e: StoreError) -> UpdateError {
    match e {
        StoreError::CasMismatch => UpdateError::Contention,
        StoreError::Host(s) => UpdateError::Host(s),
    }
}

/// Reads and decodes `key` without writing; absent reads as default, corrupt as `None`.
pub fn read<T: Default>(store: &dyn SharedStore, key: &str, decode: impl Fn(&[u8]) -> Option<T>) -> Result<Option<T>, StoreError> {
    let (bytes, _) = store.get(key)?;
    Ok(match bytes {
        None => Some(T::default()),
        Some(b) => decode(&b),
    })
}

/// Runs between a `get` and the next `set` of a [`MemStore`]: the native stand-in for another
/// worker preempting this one (host-sim has the same hook on the real module).
pub type Preempt = Box<dyn Fn(&MemStore)>;

/// The last token handed out, and each key's value and token.
type Entries = (u32, HashMap<String, (Vec<u8>, u32)>);

/// An in-memory store with cpp-host's CAS rules, for native tests.
#[derive(Default)]
pub struct MemStore {
    inner: RefCell<Entries>,
    /// Test hook: make the next N sets fail as if another worker won the race.
    pub fail_next_sets: Cell<u32>,
    /// Test hook: the next N gets fail with a host error.
    pub fail_next_gets: Cell<u32>,
    /// Test hook: runs once after each `get` (while it is set), writing as another worker would.
    preempt: RefCell<Option<Preempt>>,
    in_preempt: Cell<bool>,
}

impl MemStore {
    pub fn set_preempt(&self, hook: Option<Preempt>) {
        *self.preempt.borrow_mut() = hook;
    }

    /// Every key and value (tests inspect what was written).
    pub fn keys(&self) -> Vec<String> {
        let mut k: Vec<String> = self.inner.borrow().1.keys().cloned().collect();
        k.sort();
        k
    }
}

impl SharedStore for MemStore {
    fn get(&self, key: &str) -> Result<(Option<Vec<u8>>, u32), StoreError> {
        if self.fail_next_gets.get() > 0 {
            self.fail_next_gets.set(self.fail_next_gets.get() - 1);
            return Err(StoreError::Host(10));
        }
        let out = match self.inner.borrow().1.get(key) {
            Some((v, cas)) => (Some(v.clone()), *cas),
            None => (None, 0),
        };
        if !self.in_preempt.get() {
            let hook = self.preempt.borrow_mut().take();
            if let Some(hook) = hook {
                self.in_preempt.set(true);
                hook(self);
                self.in_preempt.set(false);
                let mut slot = self.preempt.borrow_mut();
                if slot.is_none() {
                    *slot = Some(hook);
                }
            }
        }
        Ok(out)
    }

    fn set(&self, key: &str, value: &[u8], cas: u32) -> Result<(), StoreError> {
        if self.fail_next_sets.get() > 0 {
            self.fail_next_sets.set(self.fail_next_sets.get() - 1);
            // Simulate the competing write: bump the token.
            let mut inner = self.inner.borrow_mut();
            inner.0 += 1;
            let next = inner.0;
            if let Some(entry) = inner.1.get_mut(key) {
                entry.1 = next;
            }
            return Err(StoreError::CasMismatch);
        }
        let mut inner = self.inner.borrow_mut();
        if let Some((_, current)) = inner.1.get(key) {
            if cas != 0 && cas != *current {
                return Err(StoreError::CasMismatch);
            }
        }
        inner.0 += 1;
        let next = inner.0;
        inner.1.insert(key.to_string(), (value.to_vec(), next));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dec(b: &[u8]) -> Option<u32> {
        b.try_into().ok().map(u32::from_le_bytes)
    }

    fn enc(v: &u32) -> Vec<u8> {
        v.to_le_bytes().to_vec()
    }

    fn incr(s: &MemStore, key: &str) -> Result<u32, UpdateError> {
        cas_update(s, key, dec, enc, |v| {
            *v += 1;
            (true, *v)
        })
    }

    #[test]
    fn a_racing_creator_is_never_overwritten() {
        let s = MemStore::default();
        // Between our read (absent) and our create, another worker creates and charges the key.
        s.set_preempt(Some(Box::new(|s: &MemStore| {
            if !s.inner.borrow().1.contains_key("k") {
                s.set("k", &enc(&5), CREATE_CAS).unwrap();
            }
        })));
        assert_eq!(incr(&s, "k"), Ok(6), "the other worker's 5 is kept and ours added");
        s.set_preempt(None);
        assert_eq!(read(&s, "k", dec).unwrap(), Some(6));
    }

    #[test]
    fn preempting_writers_never_lose_updates() {
        let s = MemStore::default();
        let calls = Cell::new(0u32);
        s.set_preempt(Some(Box::new(move |s: &MemStore| {
            calls.set(calls.get() + 1);
            if calls.get().is_multiple_of(2) {
                return;
            }
            let (v, cas) = s.get("k").unwrap();
            let n = v.as_deref().and_then(dec).unwrap_or(0);
            let _ = s.set("k", &enc(&(n + 100)), write_token(v.is_some(), cas));
        })));
        for _ in 0..10 {
            incr(&s, "k").unwrap();
        }
        s.set_preempt(None);
        let total = read(&s, "k", dec).unwrap().unwrap();
        assert_eq!(total % 100, 10, "all 10 of ours landed beside the other writer's ({total})");
    }

    #[test]
    fn corrupt_record_refuses_once_then_starts_clean() {
        let s = MemStore::default();
        s.set("k", b"\x01\x02", CREATE_CAS).unwrap();
        assert_eq!(incr(&s, "k"), Err(UpdateError::Corrupt));
        assert_eq!(read(&s, "k", dec).unwrap(), Some(0), "rewritten as the empty record");
        assert_eq!(incr(&s, "k"), Ok(1));
    }

    #[test]
    fn contention_and_host_errors_are_reported() {
        let s = MemStore::default();
        s.fail_next_sets.set(CAS_RETRIES as u32);
        assert_eq!(incr(&s, "k"), Err(UpdateError::Contention));
        s.fail_next_gets.set(1);
        assert_eq!(incr(&s, "k"), Err(UpdateError::Host(10)));
        assert_eq!(incr(&s, "k"), Ok(1));
    }
}
