//! The proxy-wasm glue: one root context per plugin (configuration, gauges, model-list fetching)
//! and one HTTP context per request. Decisions are made by the plain-Rust modules.

use crate::auth;
use crate::balancer::{self, Selection};
use crate::body;
use crate::config::{self, Config, LogLevel as CfgLevel};
use crate::endpoints::{self, Route};
use crate::errors;
use crate::fail2ban::BanEvent;
use crate::metrics::{self, FxBuildHasher};
use crate::models_index::{self, ModelIndex};
use crate::store::{cas_update, CasMismatch, SharedStore};
use crate::CLUSTER_HEADER;
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel, MetricType};
use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::time::{Duration, UNIX_EPOCH};

const JSON: (&str, &str) = ("content-type", "application/json");
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);
const FETCH_RETRY_MS: u64 = 30_000;
const LEASE_MS: u64 = 5_000;
/// Distinct model label values per worker before the rest are counted as "other".
const MAX_MODEL_LABELS: usize = 512;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Trace);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root::default()) });
}}

struct HostStore;

impl SharedStore for HostStore {
    fn get(&self, key: &str) -> (Option<Vec<u8>>, u32) {
        match hostcalls::get_shared_data(key) {
            Ok((value, cas)) => (value, cas.unwrap_or(0)),
            Err(_) => (None, 0),
        }
    }

    fn set(&self, key: &str, value: &[u8], cas: u32) -> Result<(), CasMismatch> {
        let cas = (cas != 0).then_some(cas);
        hostcalls::set_shared_data(key, Some(value), cas).map_err(|_| CasMismatch)
    }
}

fn now_ms() -> u64 {
    hostcalls::get_current_time()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_millis() as u64)
}

fn log_at(configured: CfgLevel, level: CfgLevel, message: impl FnOnce() -> String) {
    if level >= configured {
        let l = match level {
            CfgLevel::Debug => LogLevel::Debug,
            CfgLevel::Info => LogLevel::Info,
            CfgLevel::Warn => LogLevel::Warn,
            CfgLevel::Error => LogLevel::Error,
        };
        let _ = hostcalls::log(l, &message());
    }
}

/// Everything a worker shares between its contexts, compiled once in `on_configure`.
struct Runtime {
    cfg: Config,
    index: RefCell<ModelIndex>,
    metric_ids: RefCell<HashMap<String, u32, FxBuildHasher>>,
    /// Scratch buffer for stat names (no allocation per metric).
    name_buf: RefCell<String>,
    /// Ids of the per-request series by their label values, so the request path neither builds
    /// nor hashes stat names (their values are the ids `metric` returns for those names).
    hot_ids: RefCell<HashMap<HotKey, u32, FxBuildHasher>>,
    /// `auto_ai_router_model_requests_total` ids: model label → id per credential index.
    model_ids: RefCell<HashMap<String, Vec<Option<u32>>, FxBuildHasher>>,
    /// `Bearer <api_key>` per credential, built once.
    bearer: Vec<String>,
}

/// A series by its label values (credential as an index): its id is looked up without building or
/// hashing a stat name. Model series are kept apart in `model_ids` (their labels are not static).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum HotKey {
    RpmCurrent(usize),
    Banned(usize),
    Errors(usize),
    Rejections(&'static str),
    Requests(usize, &'static str, u16),
    Duration(usize, &'static str),
}

impl Runtime {
    fn log(&self, level: CfgLevel, message: impl FnOnce() -> String) {
        log_at(self.cfg.server.logging_level, level, message);
    }

    fn metric(&self, kind: MetricType, base: &str, labels: &[(&str, &str)]) -> Option<u32> {
        let mut name = self.name_buf.borrow_mut();
        name.clear();
        metrics::write_stat_name(&mut name, base, labels);
        if let Some(id) = self.metric_ids.borrow().get(name.as_str()) {
            return Some(*id);
        }
        let id = hostcalls::define_metric(kind, &name).ok()?;
        self.metric_ids.borrow_mut().insert(name.clone(), id);
        Some(id)
    }

    /// The id of a series: from `hot_ids`, else defined through `metric`.
    fn hot_metric(&self, key: HotKey) -> Option<u32> {
        if let Some(id) = self.hot_ids.borrow().get(&key) {
            return Some(*id);
        }
        let name = |i: usize| self.cfg.credentials[i].name.as_str();
        let id = match key {
            HotKey::RpmCurrent(i) => self.metric(MetricType::Gauge, metrics::CREDENTIAL_RPM_CURRENT, &[("credential", name(i))]),
            HotKey::Banned(i) => self.metric(MetricType::Gauge, metrics::CREDENTIAL_BANNED, &[("credential", name(i))]),
            HotKey::Errors(i) => self.metric(MetricType::Counter, metrics::CREDENTIAL_ERRORS_TOTAL, &[("credential", name(i))]),
            HotKey::Rejections(reason) => self.metric(MetricType::Counter, metrics::REJECTIONS_TOTAL, &[("reason", reason)]),
            HotKey::Requests(i, endpoint, status) => {
                let status = status.to_string();
                let labels = [("credential", name(i)), ("endpoint", endpoint), ("status", status.as_str())];
                self.metric(MetricType::Counter, metrics::REQUESTS_TOTAL, &labels)
            }
            HotKey::Duration(i, endpoint) => {
                self.metric(MetricType::Histogram, metrics::REQUEST_DURATION, &[("credential", name(i)), ("endpoint", endpoint)])
            }
        }?;
        self.hot_ids.borrow_mut().insert(key, id);
        Some(id)
    }

    fn increment(&self, key: HotKey) {
        if let Some(id) = self.hot_metric(key) {
            let _ = hostcalls::increment_metric(id, 1);
        }
    }

    fn record(&self, key: HotKey, value: u64) {
        if let Some(id) = self.hot_metric(key) {
            let _ = hostcalls::record_metric(id, value);
        }
    }

    /// Counts a (credential, model) request. Known models always get their own label; other names
    /// do until MAX_MODEL_LABELS distinct ones, then count as "other" (a client can't grow the set).
    fn count_model(&self, index: usize, model: &str) {
        let cached = self.model_ids.borrow().get(model).and_then(|ids| ids.get(index).copied().flatten());
        let id = match cached {
            Some(id) => id,
            None => {
                let label = {
                    let ids = self.model_ids.borrow();
                    let allowed = ids.contains_key(model)
                        || ids.len() < MAX_MODEL_LABELS
                        || self.cfg.models.contains_key(model)
                        || self.index.borrow().get(model).is_some();
                    if allowed { model } else { "other" }
                };
                if label != model {
                    return self.count_model(index, label);
                }
                let labels = [("credential", self.cfg.credentials[index].name.as_str()), ("model", model)];
                let Some(id) = self.metric(MetricType::Counter, metrics::MODEL_REQUESTS_TOTAL, &labels) else { return };
                let mut ids = self.model_ids.borrow_mut();
                let per = ids.entry(model.to_string()).or_insert_with(|| vec![None; self.cfg.credentials.len()]);
                if let Some(slot) = per.get_mut(index) {
                    *slot = Some(id);
                }
                id
            }
        };
        let _ = hostcalls::increment_metric(id, 1);
    }

    fn refresh_index(&self) {
        if self.cfg.server.replace_v1_models {
            self.index.borrow_mut().refresh(&HostStore, &self.cfg);
        }
    }

    fn update_gauges(&self, now: u64) {
        for (i, c) in self.cfg.credentials.iter().enumerate() {
            let banned = balancer::ban_state(&HostStore, &c.name, now).is_banned(now);
            self.record(HotKey::Banned(i), banned as u64);
            self.record(HotKey::RpmCurrent(i), balancer::rpm_current(&HostStore, &c.name, now) as u64);
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Lease {
    owner: u32,
    until_ms: u64,
    next_fetch_ms: u64,
}

impl Lease {
    fn decode(b: Option<&[u8]>) -> Lease {
        match b {
            Some(b) if b.len() == 20 => Lease {
                owner: u32::from_le_bytes(b[0..4].try_into().unwrap_or_default()),
                until_ms: u64::from_le_bytes(b[4..12].try_into().unwrap_or_default()),
                next_fetch_ms: u64::from_le_bytes(b[12..20].try_into().unwrap_or_default()),
            },
            _ => Lease::default(),
        }
    }

    fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(20);
        v.extend_from_slice(&self.owner.to_le_bytes());
        v.extend_from_slice(&self.until_ms.to_le_bytes());
        v.extend_from_slice(&self.next_fetch_ms.to_le_bytes());
        v
    }
}

#[derive(Default)]
struct Root {
    rt: Option<Rc<Runtime>>,
    /// This VM's number, for the fetcher election.
    vm_no: u32,
    /// Model-list callouts in flight: token → credential index.
    fetches: HashMap<u32, usize>,
    fetch_failed: bool,
}

impl Root {
    fn maybe_fetch_models(&mut self, rt: &Runtime, now: u64) {
        if !rt.cfg.server.replace_v1_models || !self.fetches.is_empty() {
            return;
        }
        let me = self.vm_no;
        let refresh = rt.cfg.server.models_refresh;
        let due = cas_update(&HostStore, models_index::LEASE_KEY, Lease::decode, Lease::encode, |l| {
            if l.owner != me && l.until_ms > now {
                return (false, false);
            }
            l.owner = me;
            l.until_ms = now + LEASE_MS;
            let due = now >= l.next_fetch_ms;
            if due {
                l.next_fetch_ms = refresh.map_or(u64::MAX, |d| now + d.as_millis() as u64);
            }
            (true, due)
        });
        if due != Some(true) {
            return;
        }
        self.fetch_failed = false;
        for (i, c) in rt.cfg.credentials.iter().enumerate() {
            let path = format!("{}/v1/models", c.path_prefix);
            let bearer = format!("Bearer {}", c.api_key);
            let headers = vec![
                (":method", "GET"),
                (":path", path.as_str()),
                (":authority", c.authority.as_str()),
                ("authorization", bearer.as_str()),
                ("accept", "application/json"),
            ];
            match hostcalls::dispatch_http_call(&c.name, headers, None, vec![], FETCH_TIMEOUT) {
                Ok(token) => {
                    self.fetches.insert(token, i);
                }
                Err(status) => {
                    self.fetch_failed = true;
                    rt.log(CfgLevel::Error, || format!("auto-ai-router: models fetch for credential {} could not start: {status:?}", c.name));
                }
            }
        }
        self.after_fetch_round(rt, now);
    }

    /// When a round ends with failures, retry those sooner than the refresh period.
    fn after_fetch_round(&mut self, rt: &Runtime, now: u64) {
        if !self.fetches.is_empty() || !self.fetch_failed {
            return;
        }
        let me = self.vm_no;
        let _ = cas_update(&HostStore, models_index::LEASE_KEY, Lease::decode, Lease::encode, |l| {
            let retry = now + FETCH_RETRY_MS;
            if l.owner == me && l.next_fetch_ms > retry {
                l.next_fetch_ms = retry;
                return (true, ());
            }
            (false, ())
        });
        rt.log(CfgLevel::Info, || "auto-ai-router: some model lists failed; retrying in 30s".into());
    }
}

impl Context for Root {
    fn on_http_call_response(&mut self, token: u32, num_headers: usize, body_size: usize, _trailers: usize) {
        let Some(i) = self.fetches.remove(&token) else { return };
        let Some(rt) = self.rt.clone() else { return };
        let name = rt.cfg.credentials[i].name.clone();
        let result = if num_headers == 0 {
            Err("no response (connection failure or timeout)".to_string())
        } else {
            let status = self.get_http_call_response_header(":status").unwrap_or_default();
            if status != "200" {
                Err(format!("HTTP status {status}"))
            } else {
                let body = self.get_http_call_response_body(0, body_size).unwrap_or_default();
                models_index::parse_provider_list(&body)
            }
        };
        match result {
            Ok(list) => {
                let n = list.len();
                let changed = models_index::store_list(&HostStore, &name, &list);
                rt.log(CfgLevel::Info, || format!("auto-ai-router: credential {name} serves {n} models{}", if changed { " (updated)" } else { "" }));
            }
            Err(e) => {
                self.fetch_failed = true;
                rt.log(CfgLevel::Error, || format!("auto-ai-router: models fetch for credential {name} failed: {e}; keeping the last good list"));
            }
        }
        self.after_fetch_round(&rt, now_ms());
    }
}

impl RootContext for Root {
    fn on_vm_start(&mut self, _size: usize) -> bool {
        self.vm_no = cas_update(&HostStore, models_index::VM_SEQ_KEY, |b| b.and_then(|b| b.try_into().ok()).map_or(0, u32::from_le_bytes), |n| n.to_le_bytes().to_vec(), |n| {
            *n = n.wrapping_add(1);
            (true, *n)
        })
        .unwrap_or(1);
        true
    }

    fn on_configure(&mut self, _size: usize) -> bool {
        let bytes = self.get_plugin_configuration().unwrap_or_default();
        let text = String::from_utf8_lossy(&bytes);
        let cfg = match config::load(&text, &|name| std::env::var(name).ok()) {
            Ok(cfg) => cfg,
            Err(e) => {
                let _ = hostcalls::log(LogLevel::Error, &format!("auto-ai-router: invalid configuration: {e}"));
                return false;
            }
        };
        balancer::init_keys(&HostStore, &cfg);
        log_at(cfg.server.logging_level, CfgLevel::Info, || {
            let creds: Vec<String> = cfg.credentials.iter().map(|c| format!("{} ({}, key {})", c.name, c.base_url, config::mask(&c.api_key))).collect();
            format!("auto-ai-router: configured {} credentials: {}", creds.len(), creds.join(", "))
        });
        let bearer = cfg.credentials.iter().map(|c| format!("Bearer {}", c.api_key)).collect();
        self.rt = Some(Rc::new(Runtime {
            cfg,
            index: RefCell::new(ModelIndex::default()),
            metric_ids: RefCell::new(HashMap::default()),
            name_buf: RefCell::new(String::new()),
            hot_ids: RefCell::new(HashMap::default()),
            model_ids: RefCell::new(HashMap::default()),
            bearer,
        }));
        self.set_tick_period(Duration::from_secs(1));
        true
    }

    fn on_tick(&mut self) {
        let Some(rt) = self.rt.clone() else { return };
        let now = now_ms();
        rt.update_gauges(now);
        self.maybe_fetch_models(&rt, now);
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Http { rt: self.rt.clone(), ..Http::default() }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

#[derive(Default)]
struct Http {
    /// None when the configuration was refused: every request fails closed.
    rt: Option<Rc<Runtime>>,
    path: String,
    endpoint: &'static str,
    awaiting_body: bool,
    chosen: Option<usize>,
    model: Option<String>,
    start_ms: u64,
    responded: bool,
}

impl Context for Http {}

impl Http {
    fn header(&self, name: &str) -> Option<String> {
        self.get_http_request_header_bytes(name).map(|b| String::from_utf8_lossy(&b).into_owned())
    }

    fn reply(&mut self, status: u16, message: &str, code: Option<&str>, reason: &'static str, extra: &[(&str, &str)]) -> Action {
        if let Some(rt) = &self.rt {
            rt.increment(HotKey::Rejections(reason));
            rt.log(CfgLevel::Debug, || format!("auto-ai-router: {status} for {} ({reason})", self.endpoint));
        }
        let mut headers = vec![JSON];
        headers.extend_from_slice(extra);
        self.send_http_response(status as u32, headers, Some(errors::body(status, message, code).as_bytes()));
        Action::Pause
    }

    fn ok_json(&mut self, body: &str) -> Action {
        self.send_http_response(200, vec![JSON], Some(body.as_bytes()));
        Action::Pause
    }

    fn route_to(&mut self, rt: &Runtime, model: Option<String>) -> Action {
        rt.refresh_index();
        let now = now_ms();
        let selection = {
            let index = rt.index.borrow();
            let model_aware = rt.cfg.server.replace_v1_models;
            let serves = |i: usize, m: &str| !model_aware || index.serves(i, m);
            balancer::select(&HostStore, &rt.cfg, model.as_deref(), &serves, now)
        };
        match selection {
            Selection::Chosen { index, rpm_current } => {
                let cred = &rt.cfg.credentials[index];
                self.set_http_request_header("authorization", Some(&rt.bearer[index]));
                self.set_http_request_header(":authority", Some(&cred.authority));
                if !cred.path_prefix.is_empty() {
                    let path = format!("{}{}", cred.path_prefix, self.path);
                    self.set_http_request_header(":path", Some(&path));
                }
                self.set_http_request_header(CLUSTER_HEADER, Some(&cred.name));
                let _ = hostcalls::call_foreign_function("clear_route_cache", None);
                if rpm_current > 0 {
                    rt.record(HotKey::RpmCurrent(index), rpm_current as u64);
                }
                rt.log(CfgLevel::Debug, || format!("auto-ai-router: {} model={} -> {}", self.endpoint, model.as_deref().unwrap_or("-"), cred.name));
                self.chosen = Some(index);
                self.model = model;
                Action::Continue
            }
            Selection::RateLimited { retry_after } => {
                let msg = match &model {
                    Some(m) => format!("Rate limit reached for model '{m}' on every credential. Retry after {retry_after} s."),
                    None => format!("Rate limit reached on every credential. Retry after {retry_after} s."),
                };
                let ra = retry_after.to_string();
                self.reply(429, &msg, Some("rate_limit_exceeded"), "rate_limited", &[("retry-after", &ra)])
            }
            Selection::Unavailable { serving, .. } => {
                let msg = match (&model, serving) {
                    (Some(m), 0) => format!("No credential serves model '{m}'."),
                    _ => "No credential is available: all are banned or over their limits.".to_string(),
                };
                self.reply(503, &msg, Some("no_credential_available"), "no_credential", &[])
            }
        }
    }

    /// The status to count for fail2ban: Envoy's own replies for connect failures and timeouts
    /// become 502 and 504 (an upstream's real 503 stays 503).
    fn effective_status(&self, status: u16) -> u16 {
        if status != 503 && status != 504 {
            return status;
        }
        let details = self
            .get_property(vec!["response", "code_details"])
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default();
        if details.contains("timeout") {
            504
        } else if details.starts_with("upstream_reset") || details.contains("connection_failure") || details.starts_with("no_healthy_upstream") {
            502
        } else {
            status
        }
    }
}

impl HttpContext for Http {
    fn on_http_request_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        #[cfg(feature = "fault-injection")]
        if self.get_http_request_header("x-auto-ai-router-fault").as_deref() == Some("trap") {
            panic!("fault injection: trap requested");
        }
        // A client must never pick the cluster, nor send a key of its own upstream.
        self.set_http_request_header(CLUSTER_HEADER, None);
        self.set_http_request_header("x-api-key", None);
        self.path = self.header(":path").unwrap_or_default();
        self.endpoint = endpoints::label(&self.path);
        let Some(rt) = self.rt.clone() else {
            return self.reply(503, "The router is not configured; see Envoy's log.", Some("router_not_configured"), "no_credential", &[]);
        };
        self.start_ms = now_ms();
        let method = self.header(":method").unwrap_or_default();
        let route = endpoints::classify(&method, &self.path);
        match route {
            Route::NotRouter => return Action::Continue,
            Route::Health => {
                let h = balancer::health(&HostStore, &rt.cfg, self.start_ms);
                let status = if h.available() > 0 { 200 } else { 503 };
                self.send_http_response(status, vec![JSON], Some(h.to_json().as_bytes()));
                return Action::Pause;
            }
            Route::BadPath => return self.reply(404, "Not found.", Some("not_found"), "bad_request", &[]),
            _ => {}
        }
        let authorization = self.get_http_request_header_bytes("authorization");
        if let Err(e) = auth::check(authorization.as_deref(), &rt.cfg.server.master_key) {
            return self.reply(401, e.message(), Some(e.code()), "auth", &[]);
        }
        match route {
            Route::ListModels if rt.cfg.server.replace_v1_models => {
                rt.refresh_index();
                let body = rt.index.borrow().list_json();
                self.ok_json(&body)
            }
            Route::GetModel(id) if rt.cfg.server.replace_v1_models => {
                rt.refresh_index();
                let entry = rt.index.borrow().get(&id).map(ModelIndex::entry_json);
                match entry {
                    Some(body) => self.ok_json(&body),
                    None => self.reply(404, &format!("The model '{id}' does not exist."), Some("model_not_found"), "bad_request", &[]),
                }
            }
            Route::Inference if end_of_stream => {
                let e = body::BodyError::MissingModel;
                self.reply(400, &e.message(), Some(e.code()), "bad_request", &[])
            }
            Route::Inference => {
                self.awaiting_body = true;
                Action::Pause
            }
            _ => self.route_to(&rt, None),
        }
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        if !self.awaiting_body {
            return Action::Continue;
        }
        let Some(rt) = self.rt.clone() else { return Action::Pause };
        if body_size as u64 > rt.cfg.server.max_body_size_bytes {
            self.awaiting_body = false;
            let msg = format!("The request body is larger than the limit of {} MB.", rt.cfg.server.max_body_size_bytes >> 20);
            return self.reply(413, &msg, Some("request_too_large"), "too_large", &[]);
        }
        if !end_of_stream {
            return Action::Pause;
        }
        self.awaiting_body = false;
        let body = self.get_http_request_body(0, body_size).unwrap_or_default();
        match body::extract_model(&body) {
            Ok(model) => self.route_to(&rt, Some(model)),
            Err(e) => self.reply(400, &e.message(), Some(e.code()), "bad_request", &[]),
        }
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let (Some(rt), Some(index)) = (self.rt.clone(), self.chosen) else { return Action::Continue };
        if self.responded {
            return Action::Continue;
        }
        self.responded = true;
        let status: u16 = self.get_http_response_header(":status").and_then(|s| s.parse().ok()).unwrap_or(0);
        let counted = self.effective_status(status);
        let now = now_ms();
        let cred = &rt.cfg.credentials[index];
        let event = balancer::record_status(&HostStore, &rt.cfg, index, counted, now);
        if rt.cfg.fail2ban.error_codes.contains(&counted) && event != BanEvent::Ignored {
            rt.increment(HotKey::Errors(index));
        }
        if let BanEvent::Banned { until_ms } = event {
            rt.record(HotKey::Banned(index), 1);
            rt.log(CfgLevel::Warn, || {
                let until = if until_ms == u64::MAX { "until restart".to_string() } else { format!("for {} ms", until_ms.saturating_sub(now)) };
                format!("auto-ai-router: credential {} banned {until} after {} errors (last status {counted})", cred.name, rt.cfg.fail2ban.max_attempts)
            });
        }
        rt.increment(HotKey::Requests(index, self.endpoint, counted));
        if let Some(model) = &self.model {
            rt.count_model(index, model);
        }
        Action::Continue
    }

    fn on_log(&mut self) {
        if let (Some(rt), Some(index), true) = (&self.rt, self.chosen, self.responded) {
            let elapsed = now_ms().saturating_sub(self.start_ms);
            rt.record(HotKey::Duration(index, self.endpoint), elapsed);
        }
    }
}

