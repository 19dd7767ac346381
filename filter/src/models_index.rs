//! Which credential serves which model: each credential's last good `GET /v1/models` list, kept
//! in shared data by the fetching VM and read (without writes) by every worker.

use crate::balancer::StateKeys;
use crate::store::{cas_update, write_token, SharedStore, StoreError};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashSet};

/// Bumped (any write changes its CAS token) after a list changes; readers reload when it moves.
pub const GEN_KEY: &str = "aar/models/gen";
/// Fetcher election: `{owner, lease_until_ms, next_fetch_ms}`.
pub const LEASE_KEY: &str = "aar/models/lease";
/// Hands every VM a distinct number for the election.
pub const VM_SEQ_KEY: &str = "aar/vm_seq";
/// Bound on one provider's list (entries past it are ignored and logged).
pub const MAX_MODELS_PER_CREDENTIAL: usize = 4096;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelEntry {
    pub id: String,
    #[serde(default)]
    pub created: i64,
    #[serde(default)]
    pub owned_by: String,
}

#[derive(Deserialize)]
struct ProviderList {
    data: Vec<ProviderModel>,
}

#[derive(Deserialize)]
struct ProviderModel {
    id: String,
    #[serde(default)]
    created: Option<serde_json::Value>,
    #[serde(default)]
    owned_by: Option<String>,
}

/// Parses a provider's `{"object":"list","data":[{"id",...}]}`.
pub fn parse_provider_list(body: &[u8]) -> Result<Vec<ModelEntry>, String> {
    let list: ProviderList = serde_json::from_slice(body).map_err(|e| format!("invalid model list: {e}"))?;
    let mut out = Vec::with_capacity(list.data.len().min(MAX_MODELS_PER_CREDENTIAL));
    for m in list.data.into_iter().take(MAX_MODELS_PER_CREDENTIAL) {
        if m.id.is_empty() || m.id.len() > crate::body::MAX_MODEL_LEN {
            continue;
        }
        let created = m.created.and_then(|c| c.as_i64()).unwrap_or(0);
        out.push(ModelEntry { id: m.id, created, owned_by: m.owned_by.unwrap_or_default() });
    }
    Ok(out)
}

pub fn encode_list(entries: &[ModelEntry]) -> Vec<u8> {
    serde_json::to_vec(entries).unwrap_or_default()
}

pub fn decode_list(bytes: &[u8]) -> Option<Vec<ModelEntry>> {
    serde_json::from_slice(bytes).ok()
}

/// Stores a credential's fresh list (under its `StateKeys::models` key) and bumps the generation
/// when it changed. Returns whether it changed.
pub fn store_list(store: &dyn SharedStore, key: &str, entries: &[ModelEntry]) -> Result<bool, StoreError> {
    let bytes = encode_list(entries);
    let (current, cas) = store.get(key)?;
    if current.as_deref() == Some(bytes.as_slice()) {
        return Ok(false);
    }
    // One writer (the elected fetcher); a takeover mid-write loses to the newer list.
    store.set(key, &bytes, write_token(current.is_some(), cas))?;
    let _ = cas_update(
        store,
        GEN_KEY,
        |b| b.try_into().ok().map(u64::from_le_bytes),
        |g| g.to_le_bytes().to_vec(),
        |g| {
            *g = g.wrapping_add(1);
            (true, ())
        },
    );
    Ok(true)
}

/// A worker's view of the index, reloaded only when the generation moves.
#[derive(Debug, Default)]
pub struct ModelIndex {
    version: Option<u32>,
    /// Per credential (config order): None = never fetched (serves every model).
    per_credential: Vec<Option<HashSet<String>>>,
    merged: Vec<ModelEntry>,
}

impl ModelIndex {
    /// Cheap when nothing changed: one small shared-data read. A read that fails keeps the
    /// index as it was.
    pub fn refresh(&mut self, store: &dyn SharedStore, keys: &[StateKeys]) {
        let Ok((_, cas)) = store.get(GEN_KEY) else { return };
        if self.version == Some(cas) && self.per_credential.len() == keys.len() {
            return;
        }
        self.version = Some(cas);
        let mut merged: BTreeMap<String, ModelEntry> = BTreeMap::new();
        self.per_credential = keys
            .iter()
            .map(|k| {
                let list = store.get(&k.models).ok()?.0.and_then(|b| decode_list(&b))?;
                for e in &list {
                    merged.entry(e.id.clone()).or_insert_with(|| e.clone());
                }
                Some(list.into_iter().map(|e| e.id).collect())
            })
            .collect();
        self.merged = merged.into_values().collect();
    }

    pub fn serves(&self, index: usize, model: &str) -> bool {
        match self.per_credential.get(index) {
            Some(Some(set)) => set.contains(model),
            _ => true,
        }
    }

    pub fn get(&self, id: &str) -> Option<&ModelEntry> {
        self.merged.binary_search_by(|e| e.id.as_str().cmp(id)).ok().and_then(|i| self.merged.get(i))
    }

    pub fn entry_json(e: &ModelEntry) -> String {
        format!(
            "{{\"id\":{},\"object\":\"model\",\"created\":{},\"owned_by\":{}}}",
            crate::errors::json_string(&e.id),
            e.created,
            crate::errors::json_string(&e.owned_by)
        )
    }

    /// `{"object":"list","data":[...]}`, de-duplicated and sorted by id.
    pub fn list_json(&self) -> String {
        let items: Vec<String> = self.merged.iter().map(Self::entry_json).collect();
        format!("{{\"object\":\"list\",\"data\":[{}]}}", items.join(","))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{load, Config};
    use crate::store::MemStore;

    fn cfg() -> Config {
        load("server: {master_key: k}\ncredentials: [{name: a, api_key: x, base_url: 'http://h'}, {name: b, api_key: y, base_url: 'http://g'}]", &|_| None).unwrap()
    }

    #[test]
    fn merges_dedups_and_sorts() {
        let s = MemStore::default();
        let c = StateKeys::for_config(&cfg());
        let mut idx = ModelIndex::default();
        idx.refresh(&s, &c);
        assert!(idx.serves(0, "anything"), "never fetched serves every model");
        let a = parse_provider_list(
            br#"{"object":"list","data":[{"id":"gpt-4","created":1,"owned_by":"openai"},{"id":"gpt-3.5","object":"model"}]}"#,
        )
        .unwrap();
        let b = parse_provider_list(br#"{"data":[{"id":"gpt-4","created":2,"owned_by":"other"},{"id":"claude-3"}]}"#).unwrap();
        assert_eq!(store_list(&s, &c[0].models, &a), Ok(true));
        assert_eq!(store_list(&s, &c[1].models, &b), Ok(true));
        assert_eq!(store_list(&s, &c[1].models, &b), Ok(false), "unchanged list is not rewritten");
        idx.refresh(&s, &c);
        assert!(idx.serves(0, "gpt-3.5") && !idx.serves(1, "gpt-3.5"));
        assert!(idx.serves(1, "claude-3") && !idx.serves(0, "claude-3"));
        let v: serde_json::Value = serde_json::from_str(&idx.list_json()).unwrap();
        let ids: Vec<&str> = v["data"].as_array().unwrap().iter().map(|e| e["id"].as_str().unwrap()).collect();
        assert_eq!(ids, ["claude-3", "gpt-3.5", "gpt-4"]);
        assert_eq!(v["data"][2]["owned_by"], "openai", "first credential's entry wins");
        assert_eq!(v["data"][2]["object"], "model");
        assert_eq!(idx.get("gpt-4").unwrap().created, 1);
        assert!(idx.get("nope").is_none());
    }

    #[test]
    fn bad_provider_lists() {
        assert!(parse_provider_list(b"<html>").is_err());
        assert!(parse_provider_list(br#"{"data":"x"}"#).is_err());
        assert_eq!(parse_provider_list(br#"{"data":[{"id":""}]}"#).unwrap(), vec![]);
    }
}
