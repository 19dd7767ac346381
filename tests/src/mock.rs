//! A small, fast mock of an OpenAI-compatible provider for tests, `make run` and benchmarks.
//!
//! Endpoints: `POST /v1/chat/completions` and `POST /v1/completions` (JSON, or SSE when
//! `"stream": true`), `POST /v1/embeddings` (float or base64), `GET /v1/models[/{id}]`; any other
//! `/v1/*` request gets a small JSON echo. Every `/v1/*` request needs `Authorization: Bearer <key>`
//! with one of the keys the mock was started with (401 OpenAI-style otherwise).
//!
//! Test hooks (no auth): `GET /_stats` (counts per key, model, path and status, the last request,
//! a bounded request log), `POST /_reset` (clear the stats), `GET /_control` (current settings),
//! `POST /_control` (merge a JSON object into the settings: failure injection with chosen status and
//! headers, extra response headers, delays, models, keys),
//! `GET /health`.
//!
//! Compressed bodies: a request body with `Content-Encoding` gzip, deflate, br or zstd is decoded
//! before it is read (a body that does not decode is a loud 400 `mock_bad_body`, an unknown coding
//! 415), and with the `compress` setting every `/v1/*` answer (JSON or SSE, flushed event by event)
//! is compressed in that coding when the request's `Accept-Encoding` allows it.

use crate::codings::{Coding, Compressor};
use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use std::collections::{BTreeMap, VecDeque};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::net::TcpListener;

/// How many recent requests `/_stats` keeps in its log.
pub const LOG_CAPACITY: usize = 1000;

/// Which requests failure injection applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum FaultScope {
    /// POST requests under `/v1/` (completions, embeddings, ...), not `GET /v1/models`.
    #[default]
    Inference,
    /// Every `/v1/*` request, `GET /v1/models` included.
    All,
}

/// Everything about a mock's behaviour; `POST /_control` merges JSON into it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    /// Shown in responses (`x-mock-provider` header, `owned_by`, the reply text).
    pub name: String,
    /// Accepted API keys (`Authorization: Bearer <key>`).
    pub keys: Vec<String>,
    /// What `GET /v1/models` lists.
    pub models: Vec<String>,
    /// Refuse (404 model_not_found) models not in `models`.
    pub strict_models: bool,
    /// Content chunks in an SSE reply (before the final and `[DONE]` events).
    pub chunks: usize,
    /// Pause between SSE chunks.
    pub chunk_delay_ms: u64,
    /// Delay before any `/v1/*` reply (response headers).
    pub delay_ms: u64,
    /// Status of injected failures.
    pub fail_status: u16,
    /// Headers of injected failures; None = `retry-after: 1` on a 429 and nothing else, Some = exactly
    /// these (`{}` for a 429 without any hint), e.g. `{"retry-after": "30"}` or
    /// `{"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "2s"}`.
    pub fail_headers: Option<BTreeMap<String, String>>,
    /// Headers added to every `/v1/*` answer that is not an injected failure (e.g. OpenAI's
    /// `x-ratelimit-*` on a 200, or a header a router should ignore).
    pub response_headers: BTreeMap<String, String>,
    /// Fail every Nth request in scope (0 = off).
    pub fail_every: u64,
    /// Fail this percentage (0-100) of requests in scope.
    pub fail_percent: f64,
    /// Fail the next N requests in scope (counts down).
    pub fail_next: u64,
    /// Close the connection without a response on every Nth request in scope (0 = off).
    pub drop_every: u64,
    /// ... or on this percentage of requests in scope.
    pub drop_percent: f64,
    /// ... or on the next N requests in scope.
    pub drop_next: u64,
    /// Abort SSE streams after this many content chunks (connection reset mid-stream).
    pub abort_stream_after: Option<usize>,
    /// Which requests the failure injection applies to.
    pub fault_scope: FaultScope,
    /// Embedding vector length (when the request gives no `dimensions`).
    pub embedding_dims: usize,
    /// A base path the mock serves its API under (e.g. `/pa` for a `base_url` of `http://host/pa`):
    /// removed before routing; the log and stats keep the path as received.
    pub path_prefix: String,
    /// Compress `/v1/*` answers in this coding when the request's `Accept-Encoding` allows it.
    pub compress: Option<Coding>,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            name: "mock".into(),
            keys: vec!["sk-mock".into()],
            models: vec!["gpt-4o".into(), "gpt-4o-mini".into()],
            strict_models: false,
            chunks: 5,
            chunk_delay_ms: 10,
            delay_ms: 0,
            fail_status: 500,
            fail_headers: None,
            response_headers: BTreeMap::new(),
            fail_every: 0,
            fail_percent: 0.0,
            fail_next: 0,
            drop_every: 0,
            drop_percent: 0.0,
            drop_next: 0,
            abort_stream_after: None,
            fault_scope: FaultScope::Inference,
            embedding_dims: 8,
            path_prefix: String::new(),
            compress: None,
        }
    }
}

/// One logged request.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LogEntry {
    pub seq: u64,
    pub method: String,
    pub path: String,
    /// The bearer key presented (empty when none).
    pub key: String,
    /// The `Host` header (HTTP/1.1) or URI authority (HTTP/2) the request came with.
    pub host: String,
    /// Bytes of request body received (before decoding a compressed one).
    pub body_len: usize,
    /// The request's `Content-Encoding`, and the CRC-32 of the body bytes as received.
    pub content_encoding: Option<String>,
    pub body_crc32: u32,
    pub model: Option<String>,
    pub stream: bool,
    /// Status sent; 0 = connection dropped.
    pub status: u16,
    pub ts_ms: u64,
}

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct Stats {
    pub total: u64,
    pub by_key: BTreeMap<String, u64>,
    pub by_model: BTreeMap<String, u64>,
    pub by_path: BTreeMap<String, u64>,
    pub by_status: BTreeMap<String, u64>,
    pub unauthorized: u64,
    pub injected_failures: u64,
    pub dropped: u64,
    /// Method, path, headers and body (JSON when it parses, else a string) of the last `/v1/*` request.
    pub last_request: Option<Value>,
    pub log: VecDeque<LogEntry>,
    /// `POST /v1/*` requests being handled now, and the most at once since the last reset.
    pub in_flight: u64,
    pub max_in_flight: u64,
}

struct Inner {
    settings: Settings,
    stats: Stats,
    /// Requests in fault scope so far (drives fail_every / drop_every).
    in_scope: u64,
    rng: u64,
}

/// A mock provider's shared state; serve it on any number of listeners.
pub struct Mock {
    inner: Mutex<Inner>,
    seq: AtomicU64,
}

enum Fault {
    None,
    Drop,
    Fail(u16),
}

/// Returned by the service to make hyper close the connection without a response.
#[derive(Debug)]
struct Dropped;
impl std::fmt::Display for Dropped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("mock: connection dropped on purpose")
    }
}
impl std::error::Error for Dropped {}

type Body = BoxBody<Bytes, std::io::Error>;

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into()).map_err(|never: Infallible| match never {}).boxed()
}

fn json_response(status: u16, name: &str, v: &Value) -> Response<Body> {
    let mut resp = Response::new(full(serde_json::to_vec(v).unwrap_or_default()));
    *resp.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let h = resp.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    if let Ok(v) = HeaderValue::from_str(name) {
        h.insert("x-mock-provider", v);
    }
    resp
}

fn openai_error(status: u16, name: &str, message: &str, kind: &str, code: &str) -> Response<Body> {
    json_response(status, name, &json!({"error": {"message": message, "type": kind, "param": null, "code": code}}))
}

/// Adds (replacing) `headers` to a response; names or values that are not valid HTTP are skipped.
fn add_headers(resp: &mut Response<Body>, headers: &BTreeMap<String, String>) {
    for (k, v) in headers {
        if let (Ok(k), Ok(v)) = (hyper::header::HeaderName::from_bytes(k.as_bytes()), HeaderValue::from_str(v)) {
            resp.headers_mut().insert(k, v);
        }
    }
}

/// Merges `patch` (a JSON object) into `settings`; unknown keys are an error.
pub fn merge_settings(settings: &Settings, patch: &Value) -> Result<Settings, String> {
    let patch = patch.as_object().ok_or("expected a JSON object")?;
    let mut current = serde_json::to_value(settings).map_err(|e| e.to_string())?;
    let obj = current.as_object_mut().ok_or("settings are not an object")?;
    for (k, v) in patch {
        if k == "reset" {
            continue;
        }
        if !obj.contains_key(k) {
            return Err(format!("unknown setting {k:?}"));
        }
        obj.insert(k.clone(), v.clone());
    }
    serde_json::from_value(current).map_err(|e| e.to_string())
}

fn word_count(v: &Value) -> u64 {
    match v {
        Value::String(s) => s.split_whitespace().count() as u64,
        Value::Array(a) => a.iter().map(word_count).sum(),
        Value::Object(o) => o.get("content").map(word_count).unwrap_or(0),
        _ => 0,
    }
}

fn base64(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for c in data.chunks(3) {
        let b = [c[0], *c.get(1).unwrap_or(&0), *c.get(2).unwrap_or(&0)];
        let n = (b[0] as u32) << 16 | (b[1] as u32) << 8 | b[2] as u32;
        out.push(T[(n >> 18) as usize & 63] as char);
        out.push(T[(n >> 12) as usize & 63] as char);
        out.push(if c.len() > 1 { T[(n >> 6) as usize & 63] as char } else { '=' });
        out.push(if c.len() > 2 { T[n as usize & 63] as char } else { '=' });
    }
    out
}

/// Counts a request in `Stats::in_flight` while it is handled (until its response head is sent).
struct InFlight(Arc<Mock>);

impl InFlight {
    fn enter(m: &Arc<Mock>) -> InFlight {
        let mut g = m.inner.lock().unwrap();
        g.stats.in_flight += 1;
        g.stats.max_in_flight = g.stats.max_in_flight.max(g.stats.in_flight);
        InFlight(m.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if let Ok(mut g) = self.0.inner.lock() {
            g.stats.in_flight = g.stats.in_flight.saturating_sub(1);
        }
    }
}

impl Mock {
    pub fn new(settings: Settings) -> Arc<Mock> {
        let seed = now_ms() ^ (std::process::id() as u64) << 32 | 1;
        Arc::new(Mock { inner: Mutex::new(Inner { settings, stats: Stats::default(), in_scope: 0, rng: seed }), seq: AtomicU64::new(0) })
    }

    pub fn settings(&self) -> Settings {
        self.inner.lock().unwrap().settings.clone()
    }

    pub fn set_settings(&self, s: Settings) {
        self.inner.lock().unwrap().settings = s;
    }

    pub fn stats(&self) -> Stats {
        self.inner.lock().unwrap().stats.clone()
    }

    pub fn reset_stats(&self) {
        let mut g = self.inner.lock().unwrap();
        g.stats = Stats::default();
        g.in_scope = 0;
    }

    /// Serves connections from `listener` until the task is dropped.
    pub async fn serve(self: Arc<Self>, listener: TcpListener) {
        loop {
            let (stream, _) = match listener.accept().await {
                Ok(s) => s,
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            let mock = self.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| {
                    let mock = mock.clone();
                    async move { mock.handle(req).await }
                });
                let io = hyper_util::rt::TokioIo::new(stream);
                let _ = hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new()).serve_connection(io, svc).await;
            });
        }
    }

    fn decide_fault(&self, in_scope: bool) -> Fault {
        if !in_scope {
            return Fault::None;
        }
        let mut g = self.inner.lock().unwrap();
        g.in_scope += 1;
        let n = g.in_scope;
        // xorshift64*
        let mut roll = || {
            g.rng ^= g.rng >> 12;
            g.rng ^= g.rng << 25;
            g.rng ^= g.rng >> 27;
            (g.rng.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 / (1u64 << 53) as f64 * 100.0
        };
        let (drop_roll, fail_roll) = (roll(), roll());
        let s = &mut g.settings;
        if s.drop_next > 0 {
            s.drop_next -= 1;
            return Fault::Drop;
        }
        if (s.drop_every > 0 && n.is_multiple_of(s.drop_every)) || drop_roll < s.drop_percent {
            return Fault::Drop;
        }
        if s.fail_next > 0 {
            s.fail_next -= 1;
            return Fault::Fail(s.fail_status);
        }
        if (s.fail_every > 0 && n.is_multiple_of(s.fail_every)) || fail_roll < s.fail_percent {
            return Fault::Fail(s.fail_status);
        }
        Fault::None
    }

    fn record(&self, entry: LogEntry, last: Option<Value>, unauthorized: bool, injected: bool) {
        let mut g = self.inner.lock().unwrap();
        let st = &mut g.stats;
        st.total += 1;
        *st.by_key.entry(entry.key.clone()).or_default() += 1;
        if let Some(m) = &entry.model {
            *st.by_model.entry(m.clone()).or_default() += 1;
        }
        *st.by_path.entry(entry.path.clone()).or_default() += 1;
        *st.by_status.entry(entry.status.to_string()).or_default() += 1;
        if unauthorized {
            st.unauthorized += 1;
        }
        if injected {
            st.injected_failures += 1;
        }
        if entry.status == 0 {
            st.dropped += 1;
        }
        if last.is_some() {
            st.last_request = last;
        }
        if st.log.len() >= LOG_CAPACITY {
            st.log.pop_front();
        }
        st.log.push_back(entry);
    }

    async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Result<Response<Body>, Dropped> {
        let _in_flight = (req.method() == Method::POST && req.uri().path().contains("/v1/")).then(|| InFlight::enter(&self));
        let method = req.method().clone();
        let path = req.uri().path().to_string();
        let name = self.settings().name;
        match (method.clone(), path.as_str()) {
            (Method::GET, "/health") => return Ok(json_response(200, &name, &json!({"status": "ok"}))),
            (Method::GET, "/_stats") => {
                let stats = serde_json::to_value(self.stats()).unwrap_or(Value::Null);
                return Ok(json_response(200, &name, &stats));
            }
            (Method::POST, "/_reset") => {
                self.reset_stats();
                return Ok(json_response(200, &name, &json!({"reset": true})));
            }
            (Method::GET, "/_control") => return Ok(json_response(200, &name, &serde_json::to_value(self.settings()).unwrap_or_default())),
            (Method::POST, "/_control") => {
                let body = req.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                let patch: Value = match serde_json::from_slice(&body) {
                    Ok(v) => v,
                    Err(e) => return Ok(openai_error(400, &name, &format!("bad JSON: {e}"), "invalid_request_error", "bad_control")),
                };
                return Ok(match merge_settings(&self.settings(), &patch) {
                    Ok(s) => {
                        if patch.get("reset").and_then(Value::as_bool) == Some(true) {
                            self.reset_stats();
                        }
                        self.set_settings(s.clone());
                        json_response(200, &s.name.clone(), &serde_json::to_value(s).unwrap_or_default())
                    }
                    Err(e) => openai_error(400, &name, &e, "invalid_request_error", "bad_control"),
                });
            }
            _ => {}
        }
        let prefix = self.settings().path_prefix;
        let api_path = match path.strip_prefix(prefix.as_str()) {
            Some(rest) if !prefix.is_empty() && rest.starts_with('/') => rest.to_string(),
            _ => path.clone(),
        };
        if !api_path.starts_with("/v1/") {
            return Ok(openai_error(404, &name, &format!("mock: no route for {path}"), "not_found_error", "not_found"));
        }

        // Everything below is an API request: read it, log it, maybe inject a fault, answer.
        let seq = self.seq.fetch_add(1, Ordering::Relaxed) + 1;
        let headers: Map<String, Value> = req
            .headers()
            .iter()
            .map(|(k, v)| (k.as_str().to_string(), Value::String(String::from_utf8_lossy(v.as_bytes()).into_owned())))
            .collect();
        let authority = req.uri().authority().map(|a| a.to_string());
        let host = authority
            .clone()
            .or_else(|| req.headers().get(hyper::header::HOST).and_then(|v| v.to_str().ok()).map(str::to_string))
            .unwrap_or_default();
        let key = req
            .headers()
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("")
            .to_string();
        let content_encoding =
            req.headers().get(hyper::header::CONTENT_ENCODING).map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
        let accept_encoding = req.headers().get(hyper::header::ACCEPT_ENCODING).and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
        let body = match req.into_body().collect().await {
            Ok(b) => b.to_bytes(),
            Err(_) => return Err(Dropped),
        };
        let mut crc = flate2::Crc::new();
        crc.update(&body);
        // A compressed body must decode: a router that garbles it is caught here, loudly.
        let decoded = match Coding::parse(content_encoding.as_deref()) {
            Ok(None) => Ok(body.clone()),
            Ok(Some(c)) => crate::codings::decode(c, &body).map(Bytes::from).map_err(|e| (400, "mock_bad_body", e)),
            Err(e) => Err((415, "mock_unsupported_encoding", e)),
        };
        let decoded = match decoded {
            Ok(d) => d,
            Err((status, code, e)) => {
                let entry = LogEntry {
                    seq,
                    method: method.to_string(),
                    path: path.clone(),
                    key,
                    host,
                    body_len: body.len(),
                    content_encoding,
                    body_crc32: crc.sum(),
                    model: None,
                    stream: false,
                    status,
                    ts_ms: now_ms(),
                };
                self.record(entry, None, false, false);
                return Ok(openai_error(status, &name, &format!("mock: {e}"), "invalid_request_error", code));
            }
        };
        let parsed: Option<Value> = serde_json::from_slice(&decoded).ok();
        let model = parsed.as_ref().and_then(|v| v.get("model")).and_then(Value::as_str).map(str::to_string);
        let stream = parsed.as_ref().and_then(|v| v.get("stream")).and_then(Value::as_bool) == Some(true);
        let last = json!({
            "method": method.as_str(),
            "path": path,
            "authority": authority,
            "headers": headers,
            "body_len": body.len(),
            "body": parsed.clone().unwrap_or_else(|| Value::String(String::from_utf8_lossy(&decoded[..decoded.len().min(4096)]).into_owned())),
        });
        let settings = self.settings();
        let mut entry = LogEntry {
            seq,
            method: method.to_string(),
            path: path.clone(),
            key: key.clone(),
            host,
            body_len: body.len(),
            content_encoding,
            body_crc32: crc.sum(),
            model: model.clone(),
            stream,
            status: 0,
            ts_ms: now_ms(),
        };

        let in_scope = match settings.fault_scope {
            FaultScope::All => true,
            FaultScope::Inference => method == Method::POST,
        };
        if settings.delay_ms > 0 {
            tokio::time::sleep(Duration::from_millis(settings.delay_ms)).await;
        }
        let fault = self.decide_fault(in_scope);
        if let Fault::Drop = fault {
            self.record(entry, Some(last), false, true);
            return Err(Dropped);
        }
        if let Fault::Fail(status) = fault {
            entry.status = status;
            self.record(entry, Some(last), false, true);
            let mut resp = openai_error(
                status,
                &name,
                &format!("{name}: injected failure (status {status})"),
                if status == 429 { "rate_limit_error" } else { "server_error" },
                "mock_injected",
            );
            match &settings.fail_headers {
                None if status == 429 => {
                    resp.headers_mut().insert("retry-after", HeaderValue::from_static("1"));
                }
                None => {}
                Some(h) => add_headers(&mut resp, h),
            }
            return Ok(resp);
        }
        if key.is_empty() || !settings.keys.iter().any(|k| k == &key) {
            entry.status = 401;
            self.record(entry, Some(last), true, false);
            let shown: String = key.chars().take(7).collect();
            return Ok(openai_error(
                401,
                &name,
                &format!("Incorrect API key provided: {shown}... ({name})"),
                "invalid_request_error",
                "invalid_api_key",
            ));
        }

        let mut resp = self.answer(&settings, &method, &api_path, parsed.as_ref(), &decoded, seq);
        add_headers(&mut resp, &settings.response_headers);
        entry.status = resp.status().as_u16();
        self.record(entry, Some(last), false, false);
        match settings.compress {
            Some(c) if c.accepted_by(&accept_encoding) => Ok(compress_response(resp, c)),
            _ => Ok(resp),
        }
    }

    fn answer(&self, s: &Settings, method: &Method, path: &str, body: Option<&Value>, raw: &Bytes, seq: u64) -> Response<Body> {
        let name = &s.name;
        let created = now_ms() / 1000;
        if *method == Method::GET && path == "/v1/models" {
            let data: Vec<Value> =
                s.models.iter().map(|m| json!({"id": m, "object": "model", "created": 1_700_000_000u64, "owned_by": name})).collect();
            return json_response(200, name, &json!({"object": "list", "data": data}));
        }
        if *method == Method::GET {
            if let Some(id) = path.strip_prefix("/v1/models/") {
                return if s.models.iter().any(|m| m == id) {
                    json_response(200, name, &json!({"id": id, "object": "model", "created": 1_700_000_000u64, "owned_by": name}))
                } else {
                    openai_error(404, name, &format!("The model `{id}` does not exist"), "invalid_request_error", "model_not_found")
                };
            }
        }
        let is_inference = *method == Method::POST && matches!(path, "/v1/chat/completions" | "/v1/completions" | "/v1/embeddings");
        if !is_inference {
            return json_response(
                200,
                name,
                &json!({"object": "mock.echo", "provider": name, "method": method.as_str(), "path": path,
                        "model": body.and_then(|b| b.get("model")), "body_len": raw.len()}),
            );
        }
        let Some(body) = body.filter(|b| b.is_object()) else {
            return openai_error(400, name, "mock: the body is not a JSON object", "invalid_request_error", "invalid_json");
        };
        let Some(model) = body.get("model").and_then(Value::as_str) else {
            return openai_error(400, name, "you must provide a model parameter", "invalid_request_error", "missing_model");
        };
        if s.strict_models && !s.models.iter().any(|m| m == model) {
            return openai_error(
                404,
                name,
                &format!("The model `{model}` does not exist or you do not have access to it."),
                "invalid_request_error",
                "model_not_found",
            );
        }
        let stream = body.get("stream").and_then(Value::as_bool) == Some(true);
        match path {
            "/v1/embeddings" => self.embeddings(s, model, body),
            "/v1/completions" => {
                let prompt_tokens = body.get("prompt").map(word_count).unwrap_or(0);
                let text = format!("This is {name} completing with {model}.");
                let id = format!("cmpl-{name}-{seq}");
                if stream {
                    let include_usage = body.pointer("/stream_options/include_usage").and_then(Value::as_bool) == Some(true);
                    return self.sse(s, &text, move |piece, finish| {
                        let mut c = json!({"id": id, "object": "text_completion", "created": created, "model": model,
                                           "choices": [{"text": piece, "index": 0, "logprobs": null, "finish_reason": finish}]});
                        if finish.is_some() && include_usage {
                            c["usage"] = json!({"prompt_tokens": prompt_tokens, "completion_tokens": 8, "total_tokens": prompt_tokens + 8});
                        }
                        c
                    });
                }
                let completion_tokens = text.split_whitespace().count() as u64;
                json_response(
                    200,
                    name,
                    &json!({
                        "id": id, "object": "text_completion", "created": created, "model": model,
                        "choices": [{"text": text, "index": 0, "logprobs": null, "finish_reason": "stop"}],
                        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens}
                    }),
                )
            }
            _ => {
                let prompt_tokens = body.get("messages").map(word_count).unwrap_or(0);
                let text = format!("Hello! This is {name} answering with {model}.");
                let id = format!("chatcmpl-{name}-{seq}");
                let completion_tokens = text.split_whitespace().count() as u64;
                let usage = json!({"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens});
                if stream {
                    let include_usage = body.pointer("/stream_options/include_usage").and_then(Value::as_bool) == Some(true);
                    let mut first = true;
                    return self.sse(s, &text, move |piece, finish| {
                        let delta = if finish.is_some() {
                            json!({})
                        } else if first {
                            first = false;
                            json!({"role": "assistant", "content": piece})
                        } else {
                            json!({"content": piece})
                        };
                        let mut c = json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": model,
                                           "system_fingerprint": null,
                                           "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}]});
                        if finish.is_some() && include_usage {
                            c["usage"] = usage.clone();
                        }
                        c
                    });
                }
                json_response(
                    200,
                    name,
                    &json!({
                        "id": id, "object": "chat.completion", "created": created, "model": model, "system_fingerprint": null,
                        "choices": [{"index": 0, "message": {"role": "assistant", "content": text, "refusal": null},
                                     "logprobs": null, "finish_reason": "stop"}],
                        "usage": usage
                    }),
                )
            }
        }
    }

    fn embeddings(&self, s: &Settings, model: &str, body: &Value) -> Response<Body> {
        let inputs = match body.get("input") {
            Some(Value::Array(a)) if a.first().is_some_and(Value::is_number) => 1,
            Some(Value::Array(a)) => a.len().max(1),
            Some(_) => 1,
            None => return openai_error(400, &s.name, "you must provide an input", "invalid_request_error", "missing_input"),
        };
        let dims = body.get("dimensions").and_then(Value::as_u64).map(|d| d.clamp(1, 4096) as usize).unwrap_or(s.embedding_dims);
        let base64_format = body.get("encoding_format").and_then(Value::as_str) == Some("base64");
        let prompt_tokens = body.get("input").map(word_count).unwrap_or(0);
        let data: Vec<Value> = (0..inputs)
            .map(|i| {
                let v: Vec<f32> = (0..dims).map(|d| (((i * 31 + d * 7) % 100) as f32 - 50.0) / 100.0).collect();
                let embedding = if base64_format {
                    let bytes: Vec<u8> = v.iter().flat_map(|f| f.to_le_bytes()).collect();
                    Value::String(base64(&bytes))
                } else {
                    json!(v)
                };
                json!({"object": "embedding", "index": i, "embedding": embedding})
            })
            .collect();
        json_response(
            200,
            &s.name,
            &json!({"object": "list", "data": data, "model": model,
                                             "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}}),
        )
    }

    /// An SSE reply: `chunks` content events carrying `text` split into pieces, a final event with
    /// `finish_reason: "stop"`, then `data: [DONE]`. `event(piece, finish)` builds each JSON payload.
    fn sse(&self, s: &Settings, text: &str, mut event: impl FnMut(&str, Option<&str>) -> Value) -> Response<Body> {
        let words: Vec<&str> = text.split_inclusive(' ').collect();
        let n = s.chunks.max(1);
        let mut pieces: Vec<String> = Vec::with_capacity(n);
        for i in 0..n {
            // Spread the words over n chunks; chunks past the text carry an empty string.
            let (a, b) = (i * words.len() / n, (i + 1) * words.len() / n);
            pieces.push(words[a..b].concat());
        }
        let mut events: Vec<Bytes> = pieces.iter().map(|p| Bytes::from(format!("data: {}\n\n", event(p, None)))).collect();
        events.push(Bytes::from(format!("data: {}\n\n", event("", Some("stop")))));
        events.push(Bytes::from_static(b"data: [DONE]\n\n"));
        let delay = Duration::from_millis(s.chunk_delay_ms);
        let abort_after = s.abort_stream_after;
        let stream = futures_util::stream::unfold((events.into_iter(), 0usize, false), move |(mut it, i, done)| async move {
            if done {
                return None;
            }
            let abort = abort_after.is_some_and(|a| i >= a);
            let ev = if abort { None } else { Some(it.next()?) };
            // The pause comes before an abort too, so the events before it reach the client first.
            if i > 0 && !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            let Some(ev) = ev else {
                // An error frame makes hyper reset the connection: the client sees a cut stream.
                return Some((Err(std::io::Error::other("mock: stream aborted on purpose")), (it, i, true)));
            };
            Some((Ok(Frame::data(ev)), (it, i + 1, false)))
        });
        let mut resp = Response::new(BodyExt::boxed(StreamBody::new(stream)));
        let h = resp.headers_mut();
        h.insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
        h.insert("cache-control", HeaderValue::from_static("no-cache"));
        if let Ok(v) = HeaderValue::from_str(&s.name) {
            h.insert("x-mock-provider", v);
        }
        resp
    }
}

/// The answer's body compressed in `coding` as it streams (each frame flushed: SSE events still
/// arrive one by one), with `Content-Encoding` set and `Content-Length` dropped.
fn compress_response(resp: Response<Body>, coding: Coding) -> Response<Body> {
    let (mut parts, body) = resp.into_parts();
    parts.headers.insert(hyper::header::CONTENT_ENCODING, HeaderValue::from_static(coding.name()));
    parts.headers.insert(hyper::header::VARY, HeaderValue::from_static("accept-encoding"));
    parts.headers.remove(hyper::header::CONTENT_LENGTH);
    let stream = futures_util::stream::unfold((body, Some(Compressor::new(coding))), |(mut body, enc)| async move {
        let mut enc = enc?;
        loop {
            match body.frame().await {
                Some(Ok(frame)) => {
                    let Ok(data) = frame.into_data() else { continue };
                    let out = enc.push(&data);
                    if !out.is_empty() {
                        return Some((Ok(Frame::data(Bytes::from(out))), (body, Some(enc))));
                    }
                }
                Some(Err(e)) => return Some((Err(e), (body, None))),
                None => return Some((Ok(Frame::data(Bytes::from(enc.finish()))), (body, None))),
            }
        }
    });
    Response::from_parts(parts, BodyExt::boxed(StreamBody::new(stream)))
}

/// A mock served on its own thread and runtime; stops when dropped. For synchronous tests.
pub struct BackgroundMock {
    pub mock: Arc<Mock>,
    pub addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl BackgroundMock {
    /// Binds `127.0.0.1:port` (0 = any free port) and serves `settings` there.
    pub fn start(settings: Settings, port: u16) -> std::io::Result<BackgroundMock> {
        let std_listener = std::net::TcpListener::bind(("127.0.0.1", port))?;
        std_listener.set_nonblocking(true)?;
        let addr = std_listener.local_addr()?;
        let mock = Mock::new(settings);
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let m = mock.clone();
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
        let thread = std::thread::spawn(move || {
            rt.block_on(async move {
                let listener = TcpListener::from_std(std_listener).expect("listener");
                tokio::select! {
                    _ = m.serve(listener) => {}
                    _ = rx => {}
                }
            });
            rt.shutdown_timeout(Duration::from_millis(100));
        });
        Ok(BackgroundMock { mock, addr, stop: Some(tx), thread: Some(thread) })
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for BackgroundMock {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc4648() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"foobar"), "Zm9vYmFy");
    }

    #[test]
    fn merge_rejects_unknown_and_keeps_the_rest() {
        let s = Settings::default();
        let m = merge_settings(&s, &json!({"fail_every": 3, "models": ["a"]})).unwrap();
        assert_eq!(m.fail_every, 3);
        assert_eq!(m.models, vec!["a".to_string()]);
        assert_eq!(m.keys, s.keys);
        assert!(merge_settings(&s, &json!({"nope": 1})).is_err());
        let m = merge_settings(&s, &json!({"fail_headers": {"retry-after": "30"}, "response_headers": {"x-a": "1"}, "path_prefix": "/pa"}))
            .unwrap();
        assert_eq!(m.fail_headers.unwrap()["retry-after"], "30");
        assert_eq!(m.response_headers["x-a"], "1");
        assert_eq!(merge_settings(&m_none(), &json!({"fail_headers": null})).unwrap().fail_headers, None);
    }

    fn m_none() -> Settings {
        Settings { fail_headers: Some(BTreeMap::new()), ..Settings::default() }
    }
}
