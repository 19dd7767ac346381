//! Host-wide state shared by every VM of one [`crate::Host`]: clock, shared data (cpp-host CAS
//! rules), shared queues, metrics (one store, like Envoy's stats scope), logs, scripted callouts.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// proxy-wasm status codes (ABI 0.2.1, as cpp-host's `WasmResult`).
#[allow(dead_code)]
pub mod status {
    pub const OK: i32 = 0;
    pub const NOT_FOUND: i32 = 1;
    pub const BAD_ARGUMENT: i32 = 2;
    pub const SERIALIZATION_FAILURE: i32 = 3;
    pub const PARSE_FAILURE: i32 = 4;
    pub const INVALID_MEMORY_ACCESS: i32 = 6;
    pub const EMPTY: i32 = 7;
    pub const CAS_MISMATCH: i32 = 8;
    pub const INTERNAL_FAILURE: i32 = 10;
    pub const UNIMPLEMENTED: i32 = 12;
}

/// Log levels as proxy-wasm numbers them.
#[derive(Copy, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum LogLevel {
    Trace = 0,
    Debug = 1,
    Info = 2,
    Warn = 3,
    Error = 4,
    Critical = 5,
}

impl LogLevel {
    pub fn from_i32(v: i32) -> Option<LogLevel> {
        Some(match v {
            0 => LogLevel::Trace,
            1 => LogLevel::Debug,
            2 => LogLevel::Info,
            3 => LogLevel::Warn,
            4 => LogLevel::Error,
            5 => LogLevel::Critical,
            _ => return None,
        })
    }
}

/// One captured log line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogEntry {
    /// Index of the VM that logged it (0-based, in creation order).
    pub vm: u32,
    pub level: LogLevel,
    pub message: String,
}

/// Metric kinds, numbered as proxy-wasm does.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum MetricType {
    Counter = 0,
    Gauge = 1,
    Histogram = 2,
}

#[derive(Clone, Debug, Default)]
pub(crate) struct MetricStore {
    pub counters: BTreeMap<String, u64>,
    pub gauges: BTreeMap<String, u64>,
    pub histograms: BTreeMap<String, Vec<u64>>,
}

/// What a scripted `dispatch_http_call` gets back.
#[derive(Clone, Debug)]
pub enum CallReply {
    /// A response after `delay_ms` of virtual time.
    Response { status: u16, headers: Vec<(String, String)>, body: Vec<u8>, delay_ms: u64 },
    /// Envoy's failure path: `on_http_call_response` with zero headers, right away.
    Failure,
    /// No answer: the call fails (zero headers) when its own timeout expires.
    Timeout,
}

impl CallReply {
    pub fn ok(body: impl Into<Vec<u8>>) -> CallReply {
        CallReply::response(200, &[("content-type", "application/json")], body)
    }
    pub fn response(status: u16, headers: &[(&str, &str)], body: impl Into<Vec<u8>>) -> CallReply {
        CallReply::Response {
            status,
            headers: headers.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            body: body.into(),
            delay_ms: 0,
        }
    }
    pub fn delayed(mut self, ms: u64) -> CallReply {
        if let CallReply::Response { delay_ms, .. } = &mut self {
            *delay_ms = ms;
        }
        self
    }
}

/// A `dispatch_http_call` the filter made.
#[derive(Clone, Debug)]
pub struct HttpCallRecord {
    pub vm: u32,
    pub cluster: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub timeout_ms: u32,
    pub at_ms: u64,
}

/// What a scripted unary `proxy_grpc_call` gets back.
#[derive(Clone, Debug)]
pub enum GrpcReply {
    /// Status OK with this response message (protobuf bytes) after `delay_ms`:
    /// `proxy_on_grpc_receive`, the message in `GrpcReceiveBuffer`.
    Message { bytes: Vec<u8>, delay_ms: u64 },
    /// The call fails with this gRPC status after `delay_ms`: `proxy_on_grpc_close(status)`,
    /// `proxy_get_status` gives code and message (e.g. 14 UNAVAILABLE).
    Status { code: u32, message: String, delay_ms: u64 },
    /// No answer: at the call's timeout Envoy 1.40 closes it with status 14
    /// "upstream request timeout" (not 4 DEADLINE_EXCEEDED: measured).
    Timeout,
}

impl GrpcReply {
    pub fn ok(bytes: impl Into<Vec<u8>>) -> GrpcReply {
        GrpcReply::Message { bytes: bytes.into(), delay_ms: 0 }
    }
    pub fn status(code: u32, message: &str) -> GrpcReply {
        GrpcReply::Status { code, message: message.into(), delay_ms: 0 }
    }
    /// 14 UNAVAILABLE with the message Envoy gives for a refused connection.
    pub fn unavailable() -> GrpcReply {
        GrpcReply::status(14, "upstream connect error or disconnect/reset before headers. reset reason: remote connection failure")
    }
    pub fn delayed(mut self, ms: u64) -> GrpcReply {
        if let GrpcReply::Message { delay_ms, .. } | GrpcReply::Status { delay_ms, .. } = &mut self {
            *delay_ms = ms;
        }
        self
    }
}

/// A unary `proxy_grpc_call` the filter made.
#[derive(Clone, Debug)]
pub struct GrpcCallRecord {
    pub vm: u32,
    /// The call's token (match it against [`crate::Host::grpc_cancellations`]).
    pub token: u32,
    pub cluster: String,
    /// e.g. `envoy.service.ratelimit.v3.RateLimitService`.
    pub service: String,
    /// e.g. `ShouldRateLimit`.
    pub method: String,
    pub initial_metadata: Vec<(String, Vec<u8>)>,
    /// The request message (protobuf bytes, without gRPC framing).
    pub message: Vec<u8>,
    pub timeout_ms: u32,
    pub at_ms: u64,
}

#[derive(Default)]
pub(crate) struct Scripts {
    /// One-shot replies, used first.
    pub once: HashMap<String, VecDeque<CallReply>>,
    /// Sticky replies.
    pub always: HashMap<String, CallReply>,
    /// Clusters that exist without a script (calls to them fail like a connect failure).
    pub known: Vec<String>,
    /// gRPC: one-shot replies by cluster, used first.
    pub grpc_once: HashMap<String, VecDeque<GrpcReply>>,
    /// gRPC: sticky replies by cluster.
    pub grpc_always: HashMap<String, GrpcReply>,
}

impl Scripts {
    /// The reply for an HTTP call to `cluster`; None: no such cluster.
    pub fn http(&mut self, cluster: &str) -> Option<CallReply> {
        if let Some(r) = self.once.get_mut(cluster).and_then(|q| q.pop_front()) {
            return Some(r);
        }
        if let Some(r) = self.always.get(cluster) {
            return Some(r.clone());
        }
        self.known.iter().any(|k| k == cluster).then_some(CallReply::Failure)
    }

    /// The reply for a gRPC call to `cluster`; a known cluster without a script refuses the
    /// connection (14); None: no such cluster.
    pub fn grpc(&mut self, cluster: &str) -> Option<GrpcReply> {
        if let Some(r) = self.grpc_once.get_mut(cluster).and_then(|q| q.pop_front()) {
            return Some(r);
        }
        if let Some(r) = self.grpc_always.get(cluster) {
            return Some(r.clone());
        }
        let known = self.known.iter().any(|k| k == cluster) || self.once.contains_key(cluster) || self.always.contains_key(cluster);
        known.then(GrpcReply::unavailable)
    }
}

pub(crate) struct SharedQueue {
    pub owner_vm: u32,
    pub owner_ctx: u32,
    pub items: VecDeque<Vec<u8>>,
}

#[derive(Default)]
pub(crate) struct Queues {
    pub by_name: HashMap<(String, String), u32>,
    pub queues: HashMap<u32, SharedQueue>,
    pub next_token: u32,
    /// (vm index, context id, token) notifications waiting to be delivered.
    pub ready: Vec<(u32, u32, u32)>,
}

pub(crate) struct SharedData {
    pub map: HashMap<String, (Vec<u8>, u32)>,
    pub cas: u32,
}

impl SharedData {
    /// cpp-host's `nextCas`: a global counter that skips 0.
    pub fn next_cas(&mut self) -> u32 {
        let r = self.cas;
        self.cas = self.cas.wrapping_add(1);
        if self.cas == 0 {
            self.cas = 1;
        }
        r
    }
}

pub(crate) type PreemptHook = Box<dyn FnMut() + Send>;

pub(crate) struct HostInner {
    pub clock_ns: AtomicU64,
    pub shared: Mutex<SharedData>,
    pub queues: Mutex<Queues>,
    pub metrics: Mutex<MetricStore>,
    pub logs: Mutex<Vec<LogEntry>>,
    pub scripts: Mutex<Scripts>,
    pub calls: Mutex<Vec<HttpCallRecord>>,
    pub grpc_calls: Mutex<Vec<GrpcCallRecord>>,
    /// (vm, token) of every unary gRPC call the filter cancelled.
    pub grpc_cancels: Mutex<Vec<(u32, u32)>>,
    /// Filter-state keys that have an object factory (None: every key does).
    pub filter_state_keys: Mutex<Option<Vec<String>>>,
    /// The route's cluster comes from this filter-state key when present (a matcher cluster
    /// specifier on filter state), else from the cluster header.
    pub route_filter_state_key: Mutex<Option<String>>,
    pub properties: Mutex<HashMap<String, Vec<u8>>>,
    pub log_level: Mutex<LogLevel>,
    pub buffer_limit: Mutex<Option<usize>>,
    pub next_vm: AtomicU64,
    pub traps: Mutex<Vec<String>>,
    pub preempt: Mutex<Option<PreemptHook>>,
    pub echo_logs: bool,
}

impl HostInner {
    pub fn new(start_ns: u64) -> HostInner {
        HostInner {
            clock_ns: AtomicU64::new(start_ns),
            shared: Mutex::new(SharedData { map: HashMap::new(), cas: 1 }),
            queues: Mutex::new(Queues { next_token: 1, ..Default::default() }),
            metrics: Mutex::new(MetricStore::default()),
            logs: Mutex::new(Vec::new()),
            scripts: Mutex::new(Scripts::default()),
            calls: Mutex::new(Vec::new()),
            grpc_calls: Mutex::new(Vec::new()),
            grpc_cancels: Mutex::new(Vec::new()),
            filter_state_keys: Mutex::new(None),
            route_filter_state_key: Mutex::new(Some(crate::vm::ROUTE_FILTER_STATE.to_string())),
            properties: Mutex::new(HashMap::new()),
            log_level: Mutex::new(LogLevel::Trace),
            buffer_limit: Mutex::new(None),
            next_vm: AtomicU64::new(0),
            traps: Mutex::new(Vec::new()),
            preempt: Mutex::new(None),
            echo_logs: std::env::var_os("HOSTSIM_LOG").is_some(),
        }
    }

    pub fn now_ns(&self) -> u64 {
        self.clock_ns.load(Ordering::SeqCst)
    }

    pub fn log(&self, vm: u32, level: LogLevel, message: String) {
        if self.echo_logs {
            eprintln!("[vm{vm} {level:?}] {message}");
        }
        self.logs.lock().unwrap().push(LogEntry { vm, level, message });
    }

    /// Runs the test's preemption hook (if any) once; nested calls see no hook.
    pub fn preempt(&self) {
        let hook = self.preempt.lock().unwrap().take();
        if let Some(mut hook) = hook {
            hook();
            let mut slot = self.preempt.lock().unwrap();
            if slot.is_none() {
                *slot = Some(hook);
            }
        }
    }
}
