//! What a worker shares between its request contexts, compiled once per configuration: the
//! config, each credential's state keys and `Bearer` header, the model index, and the metric-id
//! caches (so the request path neither builds nor hashes stat names).

use crate::balancer::{self, GlobalGate, Selection, StateKeys, Walk};
use crate::config::{Config, LogLevel};
use crate::cooldown::{self, Hints};
use crate::fail2ban::BanEvent;
use crate::global::{self, Check, Gate};
use crate::host::{Host, MetricKind};
use crate::metrics::{self, FxBuildHasher};
use crate::models_index::ModelIndex;
use std::cell::RefCell;
use std::collections::HashMap;

/// Distinct model label values per worker before the rest are counted as "other".
pub const MAX_MODEL_LABELS: usize = 512;

pub struct Runtime {
    pub cfg: Config,
    pub keys: Vec<StateKeys>,
    /// `Bearer <api_key>` per credential, built once.
    pub bearer: Vec<String>,
    pub index: RefCell<ModelIndex>,
    metric_ids: RefCell<HashMap<String, u32, FxBuildHasher>>,
    /// Scratch buffer for stat names (no allocation per metric).
    name_buf: RefCell<String>,
    hot_ids: RefCell<HashMap<HotKey, u32, FxBuildHasher>>,
    /// `auto_ai_router_model_requests_total` ids: model label → id per credential index.
    model_ids: RefCell<HashMap<String, Vec<Option<u32>>, FxBuildHasher>>,
    /// `auto_ai_router_tokens_total` ids (prompt, completion): model label → per credential index.
    token_ids: RefCell<HashMap<String, Vec<Option<TokenIds>>, FxBuildHasher>>,
    /// Source of in-flight slot ids: this VM's number in the high bits, a counter below.
    slot_seq: std::cell::Cell<u64>,
    /// Some credential has `max_concurrent` (else nothing about slots is read or written).
    pub capped: bool,
    /// Requests of this worker waiting for a key (`server.queue_timeout`).
    pub queue_len: std::cell::Cell<usize>,
}

/// The prompt and completion series of one (credential, model).
type TokenIds = [u32; 2];

/// A series by its label values (credential as an index): its id is looked up without building or
/// hashing a stat name. Model series are kept apart in `model_ids` (their labels are not static).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HotKey {
    RpmCurrent(usize),
    Banned(usize),
    Cooldown(usize),
    UsageMissing(usize),
    Errors(usize),
    StateConflicts(usize),
    /// A retry away from a credential: the failed status (0 = no response).
    Retries(usize, u16),
    Rejections(&'static str),
    /// A call to the rate-limit service, by result.
    GlobalChecks(&'static str),
    Requests(usize, &'static str, u16),
    Duration(usize, &'static str),
    Overhead,
    /// How long a request waited for a key (ms).
    QueueWait,
}

/// The global gate over shared data. A request's first pick may ask the service; a retry's pick
/// (`may_ask` false, in the upstream filter, which can't wait for a call) takes only keys it can
/// admit without one: a leased slot, no global limit, or the service down and `allow`/`local`.
struct Gatekeeper<'a> {
    rt: &'a Runtime,
    host: &'a dyn Host,
    model: Option<&'a str>,
    now_ms: u64,
    may_ask: bool,
}

impl GlobalGate for Gatekeeper<'_> {
    fn gate(&mut self, index: usize) -> Gate {
        let (Some(g), Some(key)) = (&self.rt.cfg.global, self.rt.keys.get(index)) else { return Gate::Pass };
        match Check::new(&self.rt.cfg, &key.global, index, self.model) {
            Some(check) => global::gate(self.host, g, &check, self.now_ms, self.may_ask),
            None => Gate::Pass,
        }
    }
}

impl Runtime {
    pub fn new(cfg: Config) -> Runtime {
        let keys = StateKeys::for_config(&cfg);
        let bearer = cfg.credentials.iter().map(|c| format!("Bearer {}", c.api_key)).collect();
        let capped = cfg.credentials.iter().any(|c| c.max_concurrent.is_some());
        Runtime {
            cfg,
            keys,
            bearer,
            index: RefCell::new(ModelIndex::default()),
            metric_ids: RefCell::new(HashMap::default()),
            name_buf: RefCell::new(String::new()),
            hot_ids: RefCell::new(HashMap::default()),
            model_ids: RefCell::new(HashMap::default()),
            token_ids: RefCell::new(HashMap::default()),
            slot_seq: std::cell::Cell::new(0),
            capped,
            queue_len: std::cell::Cell::new(0),
        }
    }

    /// Tells the runtime which VM it runs in (the high bits of its slot ids).
    pub fn set_vm(&self, vm_no: u32) {
        self.slot_seq.set(u64::from(vm_no) << 40);
    }

    /// A fresh base for one request's in-flight slot ids (its picks use base + 0, 1, ...: room for
    /// 256 each).
    pub fn next_slot_base(&self) -> u64 {
        let base = self.slot_seq.get().wrapping_add(256);
        self.slot_seq.set(base);
        base
    }

    /// Gives back the in-flight slot `slot` of credential `index` (a no-op without a cap).
    pub fn release_slot(&self, host: &dyn Host, index: usize, slot: u64) {
        let (Some(cred), Some(key)) = (self.cfg.credentials.get(index), self.keys.get(index)) else { return };
        if cred.max_concurrent.is_some() && crate::concurrency::release(host, &key.inflight, slot, host.now_ms()).is_err() {
            self.increment(host, HotKey::StateConflicts(index));
        }
    }

    pub fn log(&self, host: &dyn Host, level: LogLevel, message: impl FnOnce() -> String) {
        if level >= self.cfg.server.logging_level {
            host.log(level, &message());
        }
    }

    fn credential_name(&self, i: usize) -> &str {
        self.cfg.credentials.get(i).map_or("unknown", |c| c.name.as_str())
    }

    fn metric(&self, host: &dyn Host, kind: MetricKind, base: &str, labels: &[(&str, &str)]) -> Option<u32> {
        let mut name = self.name_buf.borrow_mut();
        name.clear();
        metrics::write_stat_name(&mut name, base, labels);
        if let Some(id) = self.metric_ids.borrow().get(name.as_str()) {
            return Some(*id);
        }
        let id = host.define_metric(kind, &name).ok()?;
        self.metric_ids.borrow_mut().insert(name.clone(), id);
        Some(id)
    }

    fn hot_metric(&self, host: &dyn Host, key: HotKey) -> Option<u32> {
        if let Some(id) = self.hot_ids.borrow().get(&key) {
            return Some(*id);
        }
        let cred = |i: usize| [("credential", self.credential_name(i))];
        let id = match key {
            HotKey::RpmCurrent(i) => self.metric(host, MetricKind::Gauge, metrics::CREDENTIAL_RPM_CURRENT, &cred(i)),
            HotKey::Banned(i) => self.metric(host, MetricKind::Gauge, metrics::CREDENTIAL_BANNED, &cred(i)),
            HotKey::UsageMissing(i) => self.metric(host, MetricKind::Counter, metrics::USAGE_MISSING_TOTAL, &cred(i)),
            HotKey::Cooldown(i) => self.metric(host, MetricKind::Gauge, metrics::CREDENTIAL_COOLDOWN, &cred(i)),
            HotKey::Errors(i) => self.metric(host, MetricKind::Counter, metrics::CREDENTIAL_ERRORS_TOTAL, &cred(i)),
            HotKey::StateConflicts(i) => self.metric(host, MetricKind::Counter, metrics::STATE_CONFLICTS_TOTAL, &cred(i)),
            HotKey::Retries(i, status) => {
                let reason = match status {
                    0 => "connect_failure".to_string(),
                    1 => "reset".to_string(),
                    s => s.to_string(),
                };
                let labels = [("credential", self.credential_name(i)), ("reason", reason.as_str())];
                self.metric(host, MetricKind::Counter, metrics::RETRIES_TOTAL, &labels)
            }
            HotKey::Rejections(reason) => self.metric(host, MetricKind::Counter, metrics::REJECTIONS_TOTAL, &[("reason", reason)]),
            HotKey::Requests(i, endpoint, status) => {
                let status = status.to_string();
                let labels = [("credential", self.credential_name(i)), ("endpoint", endpoint), ("status", status.as_str())];
                self.metric(host, MetricKind::Counter, metrics::REQUESTS_TOTAL, &labels)
            }
            HotKey::Overhead => self.metric(host, MetricKind::Histogram, metrics::OVERHEAD, &[]),
            HotKey::QueueWait => self.metric(host, MetricKind::Histogram, metrics::QUEUE_WAIT, &[]),
            HotKey::GlobalChecks(result) => self.metric(host, MetricKind::Counter, metrics::GLOBAL_CHECKS_TOTAL, &[("result", result)]),
            HotKey::Duration(i, endpoint) => {
                let labels = [("credential", self.credential_name(i)), ("endpoint", endpoint)];
                self.metric(host, MetricKind::Histogram, metrics::REQUEST_DURATION, &labels)
            }
        }?;
        self.hot_ids.borrow_mut().insert(key, id);
        Some(id)
    }

    pub fn increment(&self, host: &dyn Host, key: HotKey) {
        if let Some(id) = self.hot_metric(host, key) {
            host.increment_metric(id, 1);
        }
    }

    pub fn record(&self, host: &dyn Host, key: HotKey, value: u64) {
        if let Some(id) = self.hot_metric(host, key) {
            host.record_metric(id, value);
        }
    }

    /// The model label for a series: known models always get their own; other names do until
    /// MAX_MODEL_LABELS distinct ones, then count as "other" (a client can't grow the set).
    fn model_label<'a>(&self, model: &'a str) -> &'a str {
        let ids = self.model_ids.borrow();
        let allowed = ids.contains_key(model)
            || ids.len() < MAX_MODEL_LABELS
            || self.cfg.models.contains_key(model)
            || self.index.borrow().get(model).is_some();
        if allowed {
            model
        } else {
            "other"
        }
    }

    /// Counts a (credential, model) request.
    pub fn count_model(&self, host: &dyn Host, index: usize, model: &str) {
        let cached = self.model_ids.borrow().get(model).and_then(|ids| ids.get(index).copied().flatten());
        let id = match cached {
            Some(id) => id,
            None => {
                let label = self.model_label(model);
                let labels = [("credential", self.credential_name(index)), ("model", label)];
                let Some(id) = self.metric(host, MetricKind::Counter, metrics::MODEL_REQUESTS_TOTAL, &labels) else { return };
                let mut ids = self.model_ids.borrow_mut();
                let per = ids.entry(label.to_string()).or_insert_with(|| vec![None; self.cfg.credentials.len()]);
                if let Some(slot) = per.get_mut(index) {
                    *slot = Some(id);
                }
                id
            }
        };
        host.increment_metric(id, 1);
    }

    /// Adds a response's reported tokens to `tokens_total{credential, model, type}`.
    pub fn count_tokens(&self, host: &dyn Host, index: usize, model: &str, prompt: u64, completion: u64) {
        let cached = self.token_ids.borrow().get(model).and_then(|ids| ids.get(index).copied().flatten());
        let ids = match cached {
            Some(ids) => ids,
            None => {
                let label = self.model_label(model);
                let name = self.credential_name(index);
                let id = |kind: &str| {
                    self.metric(host, MetricKind::Counter, metrics::TOKENS_TOTAL, &[("credential", name), ("model", label), ("type", kind)])
                };
                let (Some(p), Some(c)) = (id("prompt"), id("completion")) else { return };
                let mut cache = self.token_ids.borrow_mut();
                let per = cache.entry(label.to_string()).or_insert_with(|| vec![None; self.cfg.credentials.len()]);
                if let Some(slot) = per.get_mut(index) {
                    *slot = Some([p, c]);
                }
                [p, c]
            }
        };
        host.increment_metric(ids[0], i64::try_from(prompt).unwrap_or(i64::MAX));
        host.increment_metric(ids[1], i64::try_from(completion).unwrap_or(i64::MAX));
    }

    /// One upstream answer of credential `index` to a request admitted (sent to it) at
    /// `admitted_ms`: its cooldown (if the provider asked for one), fail2ban, and `requests_total`.
    /// Used per request (retries off) and per attempt (retries on).
    pub fn account(&self, host: &dyn Host, index: usize, endpoint: &'static str, status: u16, hints: &Hints, admitted_ms: u64) {
        let (Some(cred), Some(key)) = (self.cfg.credentials.get(index), self.keys.get(index)) else { return };
        let now = host.now_ms();
        let server = &self.cfg.server;
        let cooldown = cooldown::decide(status, hints, now, server.cooldown_default, server.cooldown_max)
            .map(|d| now.saturating_add(u64::try_from(d.as_millis()).unwrap_or(u64::MAX)));
        match balancer::record_status(host, &self.cfg, key, status, cooldown, admitted_ms, now) {
            Ok(event) => {
                // A strike (not a 429 that only rested the key, nor an answer while banned).
                if matches!(event, BanEvent::Counted { errors: 1.. } | BanEvent::Banned { .. }) {
                    self.increment(host, HotKey::Errors(index));
                }
                if let BanEvent::Banned { until_ms } = event {
                    self.record(host, HotKey::Banned(index), 1);
                    self.log(host, LogLevel::Warn, || {
                        let until = if until_ms == u64::MAX {
                            "until restart".to_string()
                        } else {
                            format!("for {} ms", until_ms.saturating_sub(now))
                        };
                        format!(
                            "auto-ai-router: credential {} banned {until} after {} errors (last status {status})",
                            cred.name, self.cfg.fail2ban.max_attempts
                        )
                    });
                }
            }
            Err(e) => {
                self.increment(host, HotKey::StateConflicts(index));
                self.log(host, LogLevel::Error, || {
                    format!("auto-ai-router: status {status} of credential {} not recorded: {e:?}", cred.name)
                });
            }
        }
        if let Some(until) = cooldown {
            self.log(host, LogLevel::Info, || {
                format!("auto-ai-router: credential {} cools down for {} ms (status {status})", cred.name, until.saturating_sub(now))
            });
        }
        self.increment(host, HotKey::Requests(index, endpoint, status));
    }

    /// Picks a credential with this worker's model index and the global gate (`may_ask` false for
    /// a retry's pick); see [`balancer::select_with`].
    pub fn select(
        &self,
        host: &dyn Host,
        model: Option<&str>,
        exclude: &[usize],
        walk: &mut Walk,
        may_ask: bool,
        now_ms: u64,
    ) -> Selection {
        let index = self.index.borrow();
        let model_aware = self.cfg.server.replace_v1_models;
        let serves = |i: usize, m: &str| !model_aware || index.serves(i, m);
        let mut gate = Gatekeeper { rt: self, host, model, now_ms, may_ask };
        balancer::select_with(host, &self.cfg, &self.keys, model, &serves, exclude, now_ms, walk, &mut gate)
    }

    /// Goes on with a selection the rate-limit service answered for; see [`balancer::resume`].
    pub fn resume(&self, host: &dyn Host, model: Option<&str>, walk: &mut Walk, gate: Gate, now_ms: u64) -> (Selection, bool) {
        let index = self.index.borrow();
        let model_aware = self.cfg.server.replace_v1_models;
        let serves = |i: usize, m: &str| !model_aware || index.serves(i, m);
        let mut keeper = Gatekeeper { rt: self, host, model, now_ms, may_ask: true };
        balancer::resume(host, &self.cfg, &self.keys, model, &serves, now_ms, walk, gate, &mut keeper)
    }

    /// The rate-limit service answered a selection call (made at `dispatch_ms` for `hits`
    /// slots): counts it by result, logs missing limits once per configuration, records it.
    pub fn global_verdict(&self, host: &dyn Host, check: &Check<'_>, dispatch_ms: u64, hits: u32, v: &crate::rls::Verdict) -> Gate {
        let Some(g) = &self.cfg.global else { return Gate::Pass };
        let answer = global::on_verdict(host, g, check, dispatch_ms, host.now_ms(), hits, v);
        let result = match (v.over, answer.no_limit) {
            (true, _) => "over_limit",
            (false, true) => "no_limit",
            (false, false) => "ok",
        };
        self.increment(host, HotKey::GlobalChecks(result));
        if answer.first_no_limit {
            let name = check.limits.first().map_or("?", |l| l.credential);
            self.log(host, LogLevel::Warn, || {
                format!(
                    "auto-ai-router: the rate-limit service has no limit for credential {name} in domain {:?} (its answer carries no current_limit): \
                     global limits are off for it; its config must have that domain",
                    g.domain
                )
            });
        }
        answer.gate
    }

    /// Charges an answer's reported tokens to the rate-limit service (TPM across replicas): one
    /// call that adds them to the credential's (and the model's) token descriptors. Nobody waits
    /// for it and its reply is not read; skipped while the breaker is open.
    pub fn charge_global_tokens(&self, host: &dyn Host, index: usize, model: Option<&str>, tokens: u64) {
        let (Some(g), Some(key)) = (&self.cfg.global, self.keys.get(index)) else { return };
        let Some(check) = Check::tokens(&self.cfg, &key.global, index, model) else { return };
        let Some(message) = global::charge_message(g, &check, tokens) else { return };
        if global::service_down(host, host.now_ms()) {
            return;
        }
        let sent = host.dispatch_grpc_call(crate::config::RLS_CLUSTER, crate::rls::SERVICE, crate::rls::METHOD, &message, g.timeout);
        self.increment(host, HotKey::GlobalChecks(if sent.is_ok() { "charge" } else { "error" }));
        if let Err(e) = sent {
            self.log(host, LogLevel::Warn, || {
                format!("auto-ai-router: {tokens} tokens not charged to the rate-limit service (status {})", e.0)
            });
        }
    }

    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.cfg.credentials.iter().position(|c| c.name == name)
    }

    pub fn retries_on(&self) -> bool {
        self.cfg.server.max_provider_retries > 0
    }

    /// Reloads the model index if the lists changed. Runs on the 1 s tick (and right after this
    /// VM stored a list), not per request: routing sees a new list at most a second late.
    pub fn refresh_index(&self, host: &dyn Host) {
        if self.cfg.server.replace_v1_models {
            self.index.borrow_mut().refresh(host, &self.keys);
        }
    }

    pub fn update_gauges(&self, host: &dyn Host, now: u64) {
        for (i, k) in self.keys.iter().enumerate() {
            let state = balancer::ban_state(host, &k.ban, now).unwrap_or_default();
            self.record(host, HotKey::Banned(i), state.is_banned(now) as u64);
            self.record(host, HotKey::Cooldown(i), state.in_cooldown(now) as u64);
            self.record(host, HotKey::RpmCurrent(i), balancer::rpm_current(host, k, now) as u64);
        }
    }
}
