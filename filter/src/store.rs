//! Cross-worker state: the proxy-wasm shared-data contract (get with a CAS token, set that fails
//! when the token is stale) as a trait, so CAS loops are plain Rust tested natively.

use std::cell::RefCell;
use std::collections::HashMap;

/// A `set` lost a race: the key changed since it was read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CasMismatch;

pub trait SharedStore {
    /// The value and its CAS token (0 when the key is absent).
    fn get(&self, key: &str) -> (Option<Vec<u8>>, u32);
    /// Writes when `cas` is 0 or still current (Envoy's rule for a key that exists).
    fn set(&self, key: &str, value: &[u8], cas: u32) -> Result<(), CasMismatch>;
}

/// Bounded retries for a CAS loop: contention this high means something is wrong, and refusing
/// one request is better than admitting past a limit.
pub const CAS_RETRIES: usize = 64;

/// Reads `key`, applies `update` to its decoded value and writes it back with CAS, retrying lost
/// races. `update` returns `None` to leave the value unchanged (nothing is written).
/// Returns the update's result, or `None` if every retry lost its race.
pub fn cas_update<T, R>(
    store: &dyn SharedStore,
    key: &str,
    decode: impl Fn(Option<&[u8]>) -> T,
    encode: impl Fn(&T) -> Vec<u8>,
    mut update: impl FnMut(&mut T) -> (bool, R),
) -> Option<R> {
    for _ in 0..CAS_RETRIES {
        let (bytes, cas) = store.get(key);
        let mut value = decode(bytes.as_deref());
        let (changed, result) = update(&mut value);
        if !changed {
            return Some(result);
        }
        if store.set(key, &encode(&value), cas).is_ok() {
            return Some(result);
        }
    }
    None
}

/// An in-memory store with cpp-host's CAS rules, for native tests.
#[derive(Default)]
pub struct MemStore {
    inner: RefCell<(u32, HashMap<String, (Vec<u8>, u32)>)>,
    /// Test hook: make the next N sets fail as if another worker won the race.
    pub fail_next_sets: std::cell::Cell<u32>,
}

impl SharedStore for MemStore {
    fn get(&self, key: &str) -> (Option<Vec<u8>>, u32) {
        match self.inner.borrow().1.get(key) {
            Some((v, cas)) => (Some(v.clone()), *cas),
            None => (None, 0),
        }
    }

    fn set(&self, key: &str, value: &[u8], cas: u32) -> Result<(), CasMismatch> {
        if self.fail_next_sets.get() > 0 {
            self.fail_next_sets.set(self.fail_next_sets.get() - 1);
            // Simulate the competing write: bump the token.
            let mut inner = self.inner.borrow_mut();
            inner.0 += 1;
            let next = inner.0;
            if let Some(entry) = inner.1.get_mut(key) {
                entry.1 = next;
            }
            return Err(CasMismatch);
        }
        let mut inner = self.inner.borrow_mut();
        if let Some((_, current)) = inner.1.get(key) {
            if cas != 0 && cas != *current {
                return Err(CasMismatch);
            }
        }
        inner.0 += 1;
        let next = inner.0;
        inner.1.insert(key.to_string(), (value.to_vec(), next));
        Ok(())
    }
}
