//! One client request through the router, as a plain state machine over [`Host`]:
//! headers → (body) → select → rewrite → continue | reply, then the response status is accounted.
//! The proxy-wasm layer calls these methods from its callbacks and maps [`Action`].
//!
//! A host call that fails gets this one request a 503 JSON reply (never a trap, which would
//! reload the VM and kill every stream on the worker); if even the reply fails the request stays
//! paused (fail closed: it never goes upstream unrouted).

use crate::attempt;
use crate::auth;
use crate::balancer::{self, Selection, Walk};
use crate::body;
use crate::body_scan;
use crate::config::LogLevel;
use crate::content_encoding::{self, DecodeError, Decoder, Encoding};
use crate::endpoints::{self, Route};
use crate::errors;
use crate::global::{self, Check, Gate};
use crate::host::{Action, HeaderMap, Host, HostError, HostResult};
use crate::models_index::ModelIndex;
use crate::rls;
use crate::runtime::{HotKey, Runtime};
use crate::upstream_status;
use crate::usage;

const JSON: (&str, &str) = ("content-type", "application/json");
/// Most body bytes copied into the VM at once.
const SCAN_CHUNK: usize = 64 * 1024;

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Not looked at yet.
    #[default]
    Headers,
    /// Not the router's (another host or path): every callback passes it on untouched.
    PassThrough,
    /// An inference request whose body is being buffered and scanned.
    Body,
    /// Waiting for the rate-limit service about a candidate (`pending`): body and trailer
    /// callbacks keep the request paused until the reply routes or answers it.
    Asking,
    /// Refused only by limits that free within `server.queue_timeout`: held (paused, nothing
    /// charged) until a tick finds a key or the wait ends (`wait`).
    Waiting,
    /// Sent to credential `index`.
    Routed { index: usize },
    /// Answered locally.
    Replied,
}

#[derive(Debug, Default)]
pub struct Request {
    phase: Phase,
    path: String,
    endpoint: &'static str,
    model: Option<String>,
    /// Body bytes buffered so far (Envoy reports the total) and scanned so far.
    body_size: usize,
    scanned: usize,
    /// The body is scanned for `model` chunk by chunk as it arrives: each chunk is copied, scanned
    /// and dropped, so a worker's memory does not grow to the largest body it has seen.
    scanner: Option<Box<body_scan::Scanner>>,
    /// A compressed body's decoder: the scanner reads what it decodes.
    decoder: Option<Box<Decoder>>,
    start_ms: u64,
    start_us: u64,
    /// When the request was routed (sent upstream): what a provider's answer is accounted against.
    routed_ms: u64,
    /// Its in-flight slot ids (`max_concurrent`): pick `k` holds `slot_base + k`.
    slot_base: u64,
    /// The response status was accounted (once per request).
    accounted: bool,
    /// The token usage of the answer, read chunk by chunk as it streams past (never held back).
    usage: Option<Box<usage::UsageReader>>,
    /// A stream that is not scanned (see `wants_usage`): counted as an answer without usage.
    usage_unscanned: bool,
    /// The request body mentions `include_usage` (the client asked for a stream's usage event).
    asked_usage: bool,
    probe: UsageProbe,
    /// Waiting for the rate-limit service about one candidate.
    pending: Option<Box<Pending>>,
    #[cfg(feature = "fault-injection")]
    trap_on_response: bool,
    /// Waiting for a key (`Phase::Waiting`).
    wait: Option<Box<Wait>>,
    /// The glue must put this request in its worker's wait queue.
    enqueue: bool,
}

/// A request waiting for a key.
#[derive(Debug)]
struct Wait {
    model: Option<String>,
    since_us: u64,
    deadline_ms: u64,
}

/// A selection paused on a call to the rate-limit service.
#[derive(Debug)]
struct Pending {
    token: u32,
    walk: Walk,
    index: usize,
    model: Option<String>,
    dispatch_ms: u64,
    hits: u32,
}

const INCLUDE_USAGE: &[u8] = b"include_usage";
static INCLUDE_USAGE_FINDER: std::sync::LazyLock<memchr::memmem::Finder<'static>> =
    std::sync::LazyLock::new(|| memchr::memmem::Finder::new(INCLUDE_USAGE));

/// Finds `include_usage` in a body that arrives in chunks (also across a chunk boundary),
/// keeping only the previous chunk's last bytes.
#[derive(Debug, Default)]
struct UsageProbe {
    tail: [u8; INCLUDE_USAGE.len() - 1],
    tail_len: usize,
}

impl UsageProbe {
    fn mentions_include_usage(&mut self, chunk: &[u8]) -> bool {
        const K: usize = INCLUDE_USAGE.len() - 1;
        if INCLUDE_USAGE_FINDER.find(chunk).is_some() {
            return true;
        }
        if self.tail_len > 0 {
            let mut seam = [0u8; 2 * K];
            let head = chunk.len().min(K);
            seam[..self.tail_len].copy_from_slice(&self.tail[..self.tail_len]);
            seam[self.tail_len..self.tail_len + head].copy_from_slice(&chunk[..head]);
            if INCLUDE_USAGE_FINDER.find(&seam[..self.tail_len + head]).is_some() {
                return true;
            }
        }
        // Keep the last K bytes seen (of this chunk, topped up from the old tail if it is short).
        let mut joined = [0u8; 2 * K];
        let old = self.tail_len.min(K.saturating_sub(chunk.len()));
        joined[..old].copy_from_slice(&self.tail[self.tail_len - old..self.tail_len]);
        let take = chunk.len().min(K);
        joined[old..old + take].copy_from_slice(&chunk[chunk.len() - take..]);
        self.tail_len = old + take;
        self.tail[..self.tail_len].copy_from_slice(&joined[..self.tail_len]);
        false
    }
}

/// The request headers the router reads, from one host call, borrowed from its map.
#[derive(Default)]
struct Seen<'a> {
    method: &'a str,
    path: &'a str,
    authority: &'a str,
    authorization: Option<&'a [u8]>,
    /// A client's own `x-api-key` (a key it must never send upstream through the router).
    api_key: bool,
    encoding: Encoding,
    /// `trap` traps at the request headers, `trap-response` at the response headers (after the
    /// request was routed and holds its slots).
    #[cfg(feature = "fault-injection")]
    fault: Option<bool>,
}

fn seen(map: &HeaderMap) -> Seen<'_> {
    let mut s = Seen::default();
    // A pseudo-header that is not UTF-8 reads as empty: no route is ours then.
    fn text(v: &[u8]) -> &str {
        std::str::from_utf8(v).unwrap_or("")
    }
    for (name, value) in map.iter() {
        match name {
            b":method" => s.method = text(value),
            b":path" => s.path = text(value),
            b":authority" => s.authority = text(value),
            b"authorization" => s.authorization = Some(value),
            b"x-api-key" => s.api_key = true,
            b"content-encoding" => s.encoding = s.encoding.with(value),
            #[cfg(feature = "fault-injection")]
            b"x-auto-ai-router-fault" => {
                s.fault = match value {
                    b"trap" => Some(true),
                    b"trap-response" => Some(false),
                    _ => None,
                }
            }
            _ => {}
        }
    }
    s
}

/// Whether a request's host is one the router serves (`server.hosts`; empty = every host).
fn in_scope(rt: &Runtime, authority: &str) -> bool {
    rt.cfg.server.host_matches(authority)
}

impl Request {
    pub fn on_request_headers(&mut self, rt: Option<&Runtime>, host: &dyn Host, end_of_stream: bool) -> Action {
        let step = self.headers(rt, host, end_of_stream);
        self.settle(rt, host, step)
    }

    pub fn on_request_body(&mut self, rt: Option<&Runtime>, host: &dyn Host, body_size: usize, end_of_stream: bool) -> Action {
        if matches!(self.phase, Phase::Asking | Phase::Waiting) {
            // Envoy buffers the rest; the rate-limit reply (or the wait) resumes the request once.
            return Action::Pause;
        }
        if self.phase != Phase::Body {
            return Action::Continue;
        }
        let Some(rt) = rt else { return Action::Pause };
        self.body_size = body_size;
        let step = self.body(rt, host, end_of_stream);
        self.settle(Some(rt), host, step)
    }

    /// Trailers end the body (an HTTP/2 request may end with them instead of an empty data frame).
    pub fn on_request_trailers(&mut self, rt: Option<&Runtime>, host: &dyn Host) -> Action {
        if matches!(self.phase, Phase::Asking | Phase::Waiting) {
            return Action::Pause;
        }
        if self.phase != Phase::Body {
            return Action::Continue;
        }
        let Some(rt) = rt else { return Action::Pause };
        let step = self.body(rt, host, true);
        self.settle(Some(rt), host, step)
    }

    pub fn on_response_headers(&mut self, rt: Option<&Runtime>, host: &dyn Host) -> Action {
        #[cfg(feature = "fault-injection")]
        #[allow(clippy::panic)]
        if self.trap_on_response {
            panic!("fault injection: trap at the response requested");
        }
        let (Some(rt), Phase::Routed { index }) = (rt, self.phase) else { return Action::Continue };
        if std::mem::replace(&mut self.accounted, true) {
            return Action::Continue;
        }
        let head = attempt::read_head(host);
        let status = head.status;
        let counted = if upstream_status::needs_details(status) {
            let details = host.property(&["response", "code_details"]).ok().flatten().unwrap_or_default();
            upstream_status::effective_status(status, &String::from_utf8_lossy(&details))
        } else {
            Some(status)
        };
        if rt.retries_on() {
            // The upstream filter accounted every attempt; the answer is the last credential's.
            let plan = host.property(&[crate::retry_contract::PLAN_PROPERTY]).ok().flatten();
            if let Some(plan) = plan {
                self.refund_unused_pick(rt, host, &plan);
                if let Some(last) = attempt::Plan::decode_current(&plan) {
                    self.phase = Phase::Routed { index: last };
                    if let Some(model) = &self.model {
                        rt.count_model(host, last, model);
                    }
                }
            }
        }
        if (200..300).contains(&status) && self.model.is_some() {
            match (head.format, head.encoding) {
                // A coding the router can't read: counted as an answer without usage, not copied.
                (Some(_), Encoding::Unsupported) => self.usage_unscanned = true,
                (Some(f), encoding) if self.wants_usage(rt, f) => {
                    let coding = if let Encoding::Coded(c) = encoding { Some(c) } else { None };
                    self.usage = Some(Box::new(usage::UsageReader::decoding(f, coding)));
                }
                (Some(_), _) => self.usage_unscanned = true,
                (None, _) => {}
            }
        }
        if rt.retries_on() {
            return Action::Continue;
        }
        match counted {
            Some(status) => rt.account(host, index, self.endpoint, status, &head.hints, self.routed_ms),
            None => {
                rt.increment(host, HotKey::Rejections("upstream_overflow"));
                rt.log(host, LogLevel::Warn, || {
                    format!(
                        "auto-ai-router: {} overflowed a circuit breaker of its credential's cluster (Envoy's 503, not the provider's)",
                        self.endpoint
                    )
                });
            }
        }
        if let Some(model) = &self.model {
            rt.count_model(host, index, model);
        }
        Action::Continue
    }

    /// Each response chunk is copied and scanned for `usage`, then passed on at once.
    pub fn on_response_body(&mut self, rt: Option<&Runtime>, host: &dyn Host, body_size: usize, end_of_stream: bool) -> Action {
        let Some(reader) = self.usage.as_mut() else { return Action::Continue };
        if body_size > 0 {
            match host.response_body(0, body_size) {
                Ok(chunk) => reader.feed(&chunk),
                Err(_) => {
                    // Unreadable: this answer's usage is unknown.
                    self.usage = None;
                    if let (Some(rt), Phase::Routed { index }) = (rt, self.phase) {
                        rt.increment(host, HotKey::UsageMissing(index));
                    }
                    return Action::Continue;
                }
            }
        }
        if end_of_stream {
            self.finish_usage(rt, host);
        }
        Action::Continue
    }

    /// Whether to scan this answer for usage. A JSON answer always (it carries `usage`); a stream
    /// when it can carry a usage event — the client asked for `include_usage`, or it is the
    /// Responses API — or when a TPM limit needs it. Other streams pass unscanned (no copy per
    /// chunk) and count as answers without usage.
    fn wants_usage(&self, rt: &Runtime, format: usage::Format) -> bool {
        let Phase::Routed { index } = self.phase else { return false };
        let limited = |m: &str| {
            rt.cfg.credentials.get(index).is_some_and(|c| c.tpm != crate::config::Rpm::Unlimited)
                || rt.cfg.model_tpm(m) != crate::config::Rpm::Unlimited
        };
        matches!(format, usage::Format::Json)
            || self.asked_usage
            || self.endpoint == "/v1/responses"
            || self.model.as_deref().is_some_and(limited)
    }

    /// Charges the reported tokens to the answering credential (TPM, metrics), or counts the
    /// answer as one without usage.
    fn finish_usage(&mut self, rt: Option<&Runtime>, host: &dyn Host) {
        if std::mem::take(&mut self.usage_unscanned) {
            if let (Some(rt), Phase::Routed { index }) = (rt, self.phase) {
                rt.increment(host, HotKey::UsageMissing(index));
            }
            return;
        }
        let (Some(reader), Some(rt), Phase::Routed { index }) = (self.usage.take(), rt, self.phase) else { return };
        let model = self.model.as_deref().unwrap_or_default();
        match reader.finish() {
            Some(u) => {
                rt.count_tokens(host, index, model, u.prompt, u.completion);
                if let Some(key) = rt.keys.get(index) {
                    if let Err(e) = balancer::charge_tokens(host, &rt.cfg, index, key, Some(model), u.total, host.now_ms()) {
                        rt.increment(host, HotKey::StateConflicts(index));
                        rt.log(host, LogLevel::Error, || format!("auto-ai-router: {} tokens not charged: {e:?}", u.total));
                    }
                }
                rt.charge_global_tokens(host, index, Some(model), u.total);
            }
            None => rt.increment(host, HotKey::UsageMissing(index)),
        }
    }

    /// Whether a request refused only by limits (free again in `retry_after` s) may wait: waiting
    /// is on, the limits free within what is left of its wait, and the worker's queue has room.
    fn may_wait(&self, rt: &Runtime, retry_after: u64, now_ms: u64) -> bool {
        let Some(q) = rt.cfg.server.queue_timeout else { return false };
        let left_ms = match &self.wait {
            Some(w) => w.deadline_ms.saturating_sub(now_ms),
            None if rt.queue_len.get() >= rt.cfg.server.queue_max as usize => return false,
            None => q.as_millis() as u64,
        };
        // `retry_after` is rounded up to whole seconds: a slot may free sooner.
        left_ms > 0 && retry_after.saturating_sub(1).saturating_mul(1000) < left_ms
    }

    /// The glue's question after each callback: put this request in the wait queue?
    pub fn take_enqueue(&mut self) -> bool {
        std::mem::take(&mut self.enqueue)
    }

    /// The worker's tick for a waiting request: selects again; routed → resumed, still refused
    /// → waits on (or, past its deadline, today's 429). Returns whether it still waits.
    pub fn on_wait_tick(&mut self, rt: Option<&Runtime>, host: &dyn Host) -> bool {
        let (Some(rt), Phase::Waiting) = (rt, self.phase) else { return false };
        let Some(model) = self.wait.as_ref().map(|w| w.model.clone()) else { return false };
        let step = self.route_to(rt, host, model);
        let action = self.settle(Some(rt), host, step);
        if self.phase == Phase::Waiting {
            return true;
        }
        self.leave_queue(rt, host);
        if action == Action::Continue && self.pending.is_none() {
            if let Err(e) = host.resume_request() {
                rt.log(host, LogLevel::Error, || format!("auto-ai-router: resuming a waiting request failed with status {}", e.0));
            }
        }
        false
    }

    /// Out of the wait queue (routed, answered, or gone): its wait is measured.
    fn leave_queue(&mut self, rt: &Runtime, host: &dyn Host) {
        if let Some(w) = self.wait.take() {
            rt.queue_len.set(rt.queue_len.get().saturating_sub(1));
            rt.record(host, HotKey::QueueWait, host.now_us().saturating_sub(w.since_us) / 1000);
        }
    }

    /// A retry's next credential was picked and charged after a failed attempt, but Envoy did not
    /// retry (the answer went to the client, or the client left): its slot goes back.
    fn refund_unused_pick(&self, rt: &Runtime, host: &dyn Host, plan: &[u8]) {
        let Some((index, at_ms)) = attempt::Plan::unused_pick(plan) else { return };
        let Some(key) = rt.keys.get(index) else { return };
        if balancer::refund(host, &rt.cfg, key, index, self.model.as_deref(), at_ms).is_err() {
            rt.increment(host, HotKey::StateConflicts(index));
        }
    }

    pub fn on_log(&mut self, rt: Option<&Runtime>, host: &dyn Host) {
        // A client that hung up while the rate-limit service was asked: a late reply routes
        // nothing and charges nothing.
        self.pending = None;
        // A client that hung up while waiting for a key: nothing was charged.
        if let Some(rt) = rt {
            self.leave_queue(rt, host);
        }
        // Routed with retries, and no answer reached the response path (the client left, or
        // Envoy gave up): a next credential picked meanwhile was never used.
        if let (Some(rt), Phase::Routed { .. }, false) = (rt, self.phase, self.accounted) {
            if rt.retries_on() {
                if let Some(plan) = host.property(&[crate::retry_contract::PLAN_PROPERTY]).ok().flatten() {
                    self.refund_unused_pick(rt, host, &plan);
                }
            }
        }
        // In-flight slots: every pick's goes back (the attempts gave theirs back already when
        // they ran; a pick never sent, or an attempt cut short, gives it back here).
        if let (Some(rt), Phase::Routed { index }) = (rt, self.phase) {
            if rt.capped {
                if rt.retries_on() {
                    let plan = host.property(&[crate::retry_contract::PLAN_PROPERTY]).ok().flatten().unwrap_or_default();
                    for (i, slot) in attempt::Plan::slots(&plan) {
                        rt.release_slot(host, i, slot);
                    }
                } else {
                    rt.release_slot(host, index, self.slot_base);
                }
            }
        }
        // A stream that ended without its last chunk (reset, client gone).
        self.finish_usage(rt, host);
        if let (Some(rt), Phase::Routed { index }, true) = (rt, self.phase, self.accounted) {
            let elapsed = host.now_ms().saturating_sub(self.start_ms);
            rt.record(host, HotKey::Duration(index, self.endpoint), elapsed);
        }
    }

    /// Turns a host failure into this request's 503 (the worker lives on).
    fn settle(&mut self, rt: Option<&Runtime>, host: &dyn Host, step: HostResult<Action>) -> Action {
        match step {
            Ok(action) => action,
            Err(e) => {
                if let Some(rt) = rt {
                    rt.log(host, LogLevel::Error, || {
                        format!("auto-ai-router: host call failed with status {} on {}; answering 503", e.0, self.endpoint)
                    });
                }
                self.reply(rt, host, 503, "The router could not process the request.", Some("router_error"), "internal", &[])
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn reply(
        &mut self,
        rt: Option<&Runtime>,
        host: &dyn Host,
        status: u16,
        message: &str,
        code: Option<&str>,
        reason: &'static str,
        extra: &[(&str, &str)],
    ) -> Action {
        self.reply_body(rt, host, status, &errors::body(status, message, code), reason, extra)
    }

    fn reply_body(
        &mut self,
        rt: Option<&Runtime>,
        host: &dyn Host,
        status: u16,
        body: &str,
        reason: &'static str,
        extra: &[(&str, &str)],
    ) -> Action {
        self.phase = Phase::Replied;
        if let Some(rt) = rt {
            self.record_overhead(rt, host);
            rt.increment(host, HotKey::Rejections(reason));
            rt.log(host, LogLevel::Debug, || format!("auto-ai-router: {status} for {} ({reason})", self.endpoint));
        }
        let mut headers = vec![JSON];
        headers.extend_from_slice(extra);
        if let Err(e) = host.send_reply(status, &headers, body.as_bytes()) {
            if let Some(rt) = rt {
                rt.log(host, LogLevel::Error, || {
                    format!("auto-ai-router: local reply failed with status {}; the request stays paused", e.0)
                });
            }
        }
        Action::Pause
    }

    fn record_overhead(&self, rt: &Runtime, host: &dyn Host) {
        if self.start_us > 0 {
            rt.record(host, HotKey::Overhead, host.now_us().saturating_sub(self.start_us));
        }
    }

    fn ok_json(&mut self, host: &dyn Host, status: u16, body: &str) -> HostResult<Action> {
        self.phase = Phase::Replied;
        host.send_reply(status, &[JSON], body.as_bytes())?;
        Ok(Action::Pause)
    }

    fn headers(&mut self, rt: Option<&Runtime>, host: &dyn Host, end_of_stream: bool) -> HostResult<Action> {
        let map = host.request_headers()?;
        let seen = seen(&map);
        #[cfg(feature = "fault-injection")]
        #[allow(clippy::panic)]
        if seen.fault == Some(true) {
            panic!("fault injection: trap requested");
        }
        #[cfg(feature = "fault-injection")]
        {
            self.trap_on_response = seen.fault == Some(false);
        }
        if rt.is_some_and(|rt| !in_scope(rt, seen.authority)) {
            self.phase = Phase::PassThrough;
            return Ok(Action::Continue);
        }
        let route = endpoints::classify(seen.method, seen.path);
        if route == Route::NotRouter {
            self.phase = Phase::PassThrough;
            return Ok(Action::Continue);
        }
        self.endpoint = endpoints::label(seen.path);
        self.path = seen.path.to_string();
        // On the router's own routes a client must never send a key upstream.
        if seen.api_key {
            host.set_request_header("x-api-key", None)?;
        }
        let Some(rt) = rt else {
            return Ok(self.reply(
                None,
                host,
                503,
                "The router is not configured; see Envoy's log.",
                Some("router_not_configured"),
                "no_credential",
                &[],
            ));
        };
        self.start_us = host.now_us();
        self.start_ms = self.start_us / 1000;
        match route {
            Route::Health => {
                let h = balancer::health(host, &rt.keys, self.start_ms);
                let status = if h.available() > 0 { 200 } else { 503 };
                return self.ok_json(host, status, &h.to_json());
            }
            Route::BadPath => return Ok(self.reply(Some(rt), host, 404, "Not found.", Some("not_found"), "bad_request", &[])),
            _ => {}
        }
        if let Err(e) = auth::check(seen.authorization, &rt.cfg.server.master_key) {
            return Ok(self.reply(Some(rt), host, 401, e.message(), Some(e.code()), "auth", &[]));
        }
        match route {
            Route::ListModels if rt.cfg.server.replace_v1_models => {
                // The listing endpoints reload the index themselves (they are not the hot path),
                // so every worker answers the same lists; routing reloads it on the tick.
                rt.refresh_index(host);
                let body = rt.index.borrow().list_json();
                self.ok_json(host, 200, &body)
            }
            Route::Credentials => {
                let now = host.now_ms();
                let states = balancer::credential_states(host, &rt.cfg, &rt.keys, now);
                self.ok_json(host, 200, &balancer::credential_states_json(&states, now))
            }
            Route::GetModel(id) if rt.cfg.server.replace_v1_models => {
                rt.refresh_index(host);
                let entry = rt.index.borrow().get(&id).map(ModelIndex::entry_json);
                match entry {
                    Some(body) => self.ok_json(host, 200, &body),
                    None => Ok(self.reply_body(Some(rt), host, 404, &errors::model_not_found(&id), "bad_request", &[])),
                }
            }
            Route::Inference if end_of_stream => {
                let e = body::BodyError::MissingModel;
                Ok(self.reply(Some(rt), host, 400, &e.message(), Some(e.code()), "bad_request", &[]))
            }
            Route::Inference => match seen.encoding {
                Encoding::Unsupported => {
                    let msg = content_encoding::UNSUPPORTED_MESSAGE;
                    Ok(self.reply(Some(rt), host, 415, msg, Some("unsupported_content_encoding"), "unsupported_encoding", &[]))
                }
                encoding => {
                    if let Encoding::Coded(c) = encoding {
                        self.decoder = Some(Box::new(Decoder::new(c, rt.cfg.server.max_body_size_bytes)));
                    }
                    self.phase = Phase::Body;
                    Ok(Action::Pause)
                }
            },
            _ => self.route_to(rt, host, None),
        }
    }

    fn body(&mut self, rt: &Runtime, host: &dyn Host, end_of_stream: bool) -> HostResult<Action> {
        if self.body_size as u64 > rt.cfg.server.max_body_size_bytes {
            let msg = format!("The request body is larger than the limit of {} MB.", rt.cfg.server.max_body_size_bytes >> 20);
            return Ok(self.reply(Some(rt), host, 413, &msg, Some("request_too_large"), "too_large", &[]));
        }
        let scanner = self.scanner.get_or_insert_with(Default::default);
        let mut result = Ok(());
        while self.scanned < self.body_size && result.is_ok() {
            let len = (self.body_size - self.scanned).min(SCAN_CHUNK);
            let chunk = host.request_body(self.scanned, len)?;
            if chunk.is_empty() {
                break;
            }
            self.scanned += chunk.len();
            result = feed_body(self.decoder.as_deref_mut(), &chunk, scanner, &mut self.probe, &mut self.asked_usage);
        }
        let model = match result {
            Err(e) => Err(e),
            Ok(()) if !end_of_stream => return Ok(Action::Pause),
            Ok(()) => match self.decoder.take().map(|mut d| d.finish()) {
                Some(Err(e)) => Err(Refusal::Decode(e)),
                _ => self.scanner.take().map_or(Err(body::BodyError::MissingModel), |s| s.finish()).map_err(Refusal::Body),
            },
        };
        match model {
            Ok(model) => self.route_to(rt, host, Some(model)),
            Err(Refusal::Body(e)) => Ok(self.reply(Some(rt), host, 400, &e.message(), Some(e.code()), "bad_request", &[])),
            Err(Refusal::Decode(e)) => {
                let msg = e.message(rt.cfg.server.max_body_size_bytes >> 20);
                Ok(self.reply(Some(rt), host, e.status(), &msg, Some(e.code()), e.reason(), &[]))
            }
        }
    }

    fn route_to(&mut self, rt: &Runtime, host: &dyn Host, model: Option<String>) -> HostResult<Action> {
        let now = host.now_ms();
        if rt.capped {
            self.slot_base = rt.next_slot_base();
        }
        let mut walk = Walk::with_slot(self.slot_base);
        let selection = rt.select(host, model.as_deref(), &[], &mut walk, true, now);
        self.drive(rt, host, model, selection, walk)
    }

    /// Goes on with a selection: asks the rate-limit service when it must (and pauses), else
    /// routes or answers.
    fn drive(
        &mut self,
        rt: &Runtime,
        host: &dyn Host,
        model: Option<String>,
        mut selection: Selection,
        mut walk: Walk,
    ) -> HostResult<Action> {
        loop {
            let Selection::Ask { index, hits } = selection else { return self.finish_selection(rt, host, model, selection) };
            let (Some(g), Some(key)) = (&rt.cfg.global, rt.keys.get(index)) else { return Err(HostError(0)) };
            let Some(check) = Check::new(&rt.cfg, &key.global, index, model.as_deref()) else { return Err(HostError(0)) };
            let now = host.now_ms();
            let message = global::request(g, &check, hits);
            match host.dispatch_grpc_call(crate::config::RLS_CLUSTER, rls::SERVICE, rls::METHOD, &message, g.timeout) {
                Ok(token) => {
                    self.pending = Some(Box::new(Pending { token, walk, index, model, dispatch_ms: now, hits }));
                    self.phase = Phase::Asking;
                    return Ok(Action::Pause);
                }
                Err(e) => {
                    rt.log(host, LogLevel::Warn, || format!("auto-ai-router: rate-limit service call refused by Envoy (status {})", e.0));
                    rt.increment(host, HotKey::GlobalChecks("error"));
                    let gate = global::on_failure(host, g, &check, hits, now);
                    selection = resume_walk(rt, host, model.as_deref(), &mut walk, gate, &check, now);
                }
            }
        }
    }
}

/// Why a request body is refused: its JSON, or its `Content-Encoding` payload.
enum Refusal {
    Body(body::BodyError),
    Decode(DecodeError),
}

/// One chunk of the request body (decoded first when it is compressed) into the model scanner
/// and the `include_usage` probe; the first refusal stops it.
fn feed_body(
    decoder: Option<&mut Decoder>,
    chunk: &[u8],
    scanner: &mut body_scan::Scanner,
    probe: &mut UsageProbe,
    asked: &mut bool,
) -> Result<(), Refusal> {
    let mut take = |bytes: &[u8]| {
        if !*asked {
            *asked = probe.mentions_include_usage(bytes);
        }
        scanner.feed(bytes)
    };
    let Some(d) = decoder else { return take(chunk).map_err(Refusal::Body) };
    let mut refused = None;
    d.feed(chunk, |piece| match take(piece) {
        Ok(()) => true,
        Err(e) => {
            refused = Some(e);
            false
        }
    })
    .map_err(Refusal::Decode)?;
    refused.map_or(Ok(()), |e| Err(Refusal::Body(e)))
}

fn resume_walk(rt: &Runtime, host: &dyn Host, model: Option<&str>, walk: &mut Walk, gate: Gate, check: &Check<'_>, now: u64) -> Selection {
    let (selection, unused) = rt.resume(host, model, walk, gate, now);
    if let (true, Some(g)) = (unused, &rt.cfg.global) {
        global::give_back(host, g, check, now);
    }
    selection
}

impl Request {
    /// The rate-limit service answered (`status` 0 and a message) or failed (a gRPC status).
    pub fn on_grpc_reply(&mut self, rt: Option<&Runtime>, host: &dyn Host, token: u32, status: u32, size: usize) {
        let Some(rt) = rt else { return };
        if self.pending.as_ref().is_none_or(|p| p.token != token) {
            return;
        }
        let Some(p) = self.pending.take() else { return };
        let step = self.global_reply(rt, host, *p, status, size);
        // A paused request goes on only when it was routed; a local reply ended it.
        if self.settle(Some(rt), host, step) == Action::Continue && self.pending.is_none() {
            if let Err(e) = host.resume_request() {
                rt.log(host, LogLevel::Error, || format!("auto-ai-router: resuming the request failed with status {}", e.0));
            }
        }
    }

    /// The service's answer (or failure) for `p`'s candidate, then the rest of the selection.
    fn global_reply(&mut self, rt: &Runtime, host: &dyn Host, p: Pending, status: u32, size: usize) -> HostResult<Action> {
        let Pending { mut walk, index, model, dispatch_ms, hits, .. } = p;
        let (Some(g), Some(key)) = (&rt.cfg.global, rt.keys.get(index)) else { return Err(HostError(0)) };
        let Some(check) = Check::new(&rt.cfg, &key.global, index, model.as_deref()) else { return Err(HostError(0)) };
        let now = host.now_ms();
        let verdict = if status == 0 { host.grpc_response(size).ok().map(|b| rls::decode_reply(&b)) } else { None };
        let gate = match verdict {
            Some(Ok(v)) => rt.global_verdict(host, &check, dispatch_ms, hits, &v),
            failed => {
                rt.increment(host, HotKey::GlobalChecks("error"));
                rt.log(host, LogLevel::Warn, || match failed {
                    Some(Err(e)) => format!("auto-ai-router: the rate-limit service's reply is unusable ({e:?}); skipping it for a while"),
                    _ => format!("auto-ai-router: the rate-limit service failed (gRPC status {status}); skipping it for a while"),
                });
                global::on_failure(host, g, &check, hits, now)
            }
        };
        let selection = resume_walk(rt, host, model.as_deref(), &mut walk, gate, &check, now);
        self.drive(rt, host, model, selection, walk)
    }

    fn finish_selection(&mut self, rt: &Runtime, host: &dyn Host, model: Option<String>, selection: Selection) -> HostResult<Action> {
        match selection {
            // The RPM gauge is refreshed on the 1 s tick from shared data (not per request).
            Selection::Chosen { index, .. } => {
                let (Some(cred), Some(bearer)) = (rt.cfg.credentials.get(index), rt.bearer.get(index)) else { return Err(HostError(0)) };
                self.routed_ms = host.now_ms();
                // `:authority` stays the client's: the route is re-picked after the cache is cleared,
                // and on a gateway with a virtual host per host name the provider's name would pick
                // another app's (Envoy sets the provider's authority per attempt, from the endpoint).
                if rt.retries_on() {
                    // The upstream filter sets each attempt's key and path; here the master key
                    // only has to go (so it can't leave Envoy whatever the bootstrap).
                    host.set_request_header("authorization", None)?;
                    // Envoy's route timeout starts about now (the router gets the whole request), not at
                    // the request headers: an upload or a rate-limit wait is not attempt time.
                    let plan = attempt::Plan {
                        tried: vec![index as u16],
                        started: 1,
                        picked_ms: 0,
                        slot_base: self.slot_base,
                        model: model.clone(),
                        path: self.path.clone(),
                        start_ms: self.routed_ms,
                    };
                    attempt::write_plan(host, &plan, &cred.name)?;
                } else {
                    host.set_request_header("authorization", Some(bearer.as_bytes()))?;
                    if !cred.path_prefix.is_empty() {
                        let path = format!("{}{}", cred.path_prefix, self.path);
                        host.set_request_header(":path", Some(path.as_bytes()))?;
                    }
                    // The routed route matches on it (any path) and its cluster specifier reads it.
                    host.set_property(crate::retry_contract::NEXT_PROPERTY, cred.name.as_bytes())?;
                }
                host.clear_route_cache()?;
                rt.log(host, LogLevel::Debug, || {
                    format!("auto-ai-router: {} model={} -> {}", self.endpoint, model.as_deref().unwrap_or("-"), cred.name)
                });
                self.phase = Phase::Routed { index };
                self.model = model;
                self.record_overhead(rt, host);
                Ok(Action::Continue)
            }
            Selection::RateLimited { retry_after } if self.may_wait(rt, retry_after, host.now_ms()) => {
                let now_us = host.now_us();
                let since_us = self.wait.as_ref().map_or(now_us, |w| w.since_us);
                let deadline_ms = self.wait.as_ref().map_or_else(
                    || (now_us / 1000).saturating_add(rt.cfg.server.queue_timeout.map_or(0, |d| d.as_millis() as u64)),
                    |w| w.deadline_ms,
                );
                self.enqueue = self.wait.is_none();
                if self.enqueue {
                    rt.queue_len.set(rt.queue_len.get() + 1);
                }
                self.wait = Some(Box::new(Wait { model, since_us, deadline_ms }));
                self.phase = Phase::Waiting;
                Ok(Action::Pause)
            }
            Selection::RateLimited { retry_after } => {
                let msg = match &model {
                    Some(m) => format!("Rate limit reached for model '{m}' on every credential. Retry after {retry_after} s."),
                    None => format!("Rate limit reached on every credential. Retry after {retry_after} s."),
                };
                let ra = retry_after.to_string();
                Ok(self.reply(Some(rt), host, 429, &msg, Some("rate_limit_exceeded"), "rate_limited", &[("retry-after", &ra)]))
            }
            Selection::NoModel => {
                let m = model.as_deref().unwrap_or_default();
                Ok(self.reply_body(Some(rt), host, 404, &errors::model_not_found(m), "model_not_found", &[]))
            }
            Selection::Unavailable { .. } => {
                let msg = "No credential is available: all that serve this request are banned.";
                Ok(self.reply(Some(rt), host, 503, msg, Some("no_credential_available"), "no_credential", &[]))
            }
            Selection::Busy => {
                let msg = "The router's shared state is busy; retry the request.";
                Ok(self.reply(Some(rt), host, 503, msg, Some("router_busy"), "contention", &[("retry-after", "1")]))
            }
            Selection::GlobalUnavailable => {
                let msg = "The rate-limit service that enforces the credentials' global limits is unavailable.";
                Ok(self.reply(
                    Some(rt),
                    host,
                    503,
                    msg,
                    Some("rate_limit_service_unavailable"),
                    "global_unavailable",
                    &[("retry-after", "1")],
                ))
            }
            // `drive` handles it; never reached.
            Selection::Ask { .. } => Err(HostError(0)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::UsageProbe;

    #[test]
    fn include_usage_is_found_at_any_split_and_byte_by_byte() {
        let body = br#"{"model":"m","stream":true,"stream_options":{"include_usage":true}}"#;
        for split in 0..body.len() {
            let mut p = UsageProbe::default();
            let found = p.mentions_include_usage(&body[..split]) | p.mentions_include_usage(&body[split..]);
            assert!(found, "split at {split}");
        }
        let mut p = UsageProbe::default();
        assert!(body.iter().any(|b| p.mentions_include_usage(std::slice::from_ref(b))), "byte by byte");
        let mut p = UsageProbe::default();
        let other = br#"{"model":"m","stream":true,"include":1,"usage":2}"#;
        assert!(!other.chunks(3).any(|c| p.mentions_include_usage(c)));
    }
}
