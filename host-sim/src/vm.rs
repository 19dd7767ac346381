//! What one VM's hostcalls read and write: its root contexts, streams, pending callouts, metric
//! ids and the buffers and maps of the context that is running. The driver that moves streams
//! through their phases is in `stream.rs`; VM start, reconfiguration and timers in `lifecycle.rs`.

use crate::abi::int_property;
use crate::state::{status::*, CallReply, GrpcReply, HostInner, MetricType};
use crate::stream::{LocalSpec, Stream, StreamKind};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use wasmtime::{Instance, Memory, Store, TypedFunc};

pub type Headers = Vec<(String, String)>;

/// Filter state of one downstream request: what `proxy_set_property` (as `wasm.<path>`) and the
/// `set_envoy_filter_state` foreign function (under its own key) wrote. Shared by the request's
/// downstream stream and its upstream-filter attempts, as Envoy's `StreamInfo::filterState()`.
pub type FilterState = BTreeMap<String, Vec<u8>>;

/// Envoy's legacy response-flag bits (as the `response.flags` property returns them).
pub mod flags {
    pub const UPSTREAM_REQUEST_TIMEOUT: i64 = 0x4;
    pub const UPSTREAM_CONNECTION_FAILURE: i64 = 0x20;
}

/// The filter-state key the rendered bootstrap routes on (the filter's `auto_ai_router_next`).
pub const ROUTE_FILTER_STATE: &str = "wasm.auto_ai_router_next";

/// Envoy's `CelStateKeyPrefix`: `proxy_set_property(path)` writes filter state `wasm.<path>`.
pub const WASM_STATE_PREFIX: &str = "wasm.";

#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Phase {
    None,
    Create,
    VmStart,
    Configure,
    Tick,
    RequestHeaders,
    RequestBody,
    RequestTrailers,
    ResponseHeaders,
    ResponseBody,
    Log,
    Done,
    HttpCallResponse,
    GrpcReceive,
    GrpcClose,
    QueueReady,
}

/// One root context (one plugin: a root id with its configuration).
pub(crate) struct RootInfo {
    pub id: u32,
    pub root_id: String,
    pub config: Vec<u8>,
    /// Replaced by a newer configuration: no new streams; on_done once its streams are over.
    pub retired: bool,
    /// on_done returned false: waiting for `proxy_done`.
    pub done_pending: bool,
}

#[derive(Default, Clone, Debug)]
pub(crate) struct Stats {
    pub shared_sets: u64,
    /// Calls from wasm into the host (proxy-wasm and WASI imports).
    pub host_calls: u64,
    /// proxy-wasm callbacks the host made into the module (each one a V8 entry in Envoy).
    pub callbacks: u64,
    /// Buffers the host allocated in the module to return data (Envoy calls back into V8 for each).
    pub allocations: u64,
}

pub(crate) struct PendingCall {
    pub token: u32,
    pub ctx: u32,
    pub due_ns: u64,
    pub reply: CallReply,
}

pub(crate) struct PendingGrpc {
    pub token: u32,
    pub ctx: u32,
    pub due_ns: u64,
    pub reply: GrpcReply,
}

/// The gRPC result being delivered (GrpcReceiveBuffer, `proxy_get_status`).
pub(crate) enum GrpcResult {
    Message(Vec<u8>),
    Status(u32, String),
}

pub struct VmState {
    pub(crate) host: Arc<HostInner>,
    pub(crate) index: u32,
    pub(crate) env: Vec<(String, String)>,
    pub(crate) memory: Option<Memory>,
    pub(crate) malloc: Option<TypedFunc<i32, i32>>,
    pub(crate) roots: Vec<RootInfo>,
    pub(crate) vm_config: Vec<u8>,
    pub(crate) current: u32,
    pub(crate) effective: Option<u32>,
    pub(crate) phase: Phase,
    pub(crate) streams: HashMap<u32, Stream>,
    /// Filter state by owning (downstream) stream id.
    pub(crate) filter_states: HashMap<u32, FilterState>,
    pub(crate) ticks: HashMap<u32, (u64, u64)>,
    pub(crate) metric_ids: HashMap<u32, (MetricType, String)>,
    pub(crate) pending: Vec<PendingCall>,
    pub(crate) next_token: u32,
    pub(crate) call_resp: Option<(Headers, Vec<u8>)>,
    pub(crate) pending_grpc: Vec<PendingGrpc>,
    pub(crate) next_grpc_token: u32,
    pub(crate) grpc_result: Option<GrpcResult>,
    /// Root contexts that called `proxy_done` during the current VM call.
    pub(crate) done_called: Vec<u32>,
    pub(crate) rng: u64,
    pub(crate) stats: Stats,
    pub(crate) ctx_counter: u32,
}

impl VmState {
    pub(crate) fn new(host: Arc<HostInner>, index: u32, env: Vec<(String, String)>) -> VmState {
        VmState {
            host,
            index,
            env,
            memory: None,
            malloc: None,
            roots: Vec::new(),
            vm_config: Vec::new(),
            current: 0,
            effective: None,
            phase: Phase::None,
            streams: HashMap::new(),
            filter_states: HashMap::new(),
            ticks: HashMap::new(),
            metric_ids: HashMap::new(),
            pending: Vec::new(),
            next_token: 1,
            call_resp: None,
            pending_grpc: Vec::new(),
            // Envoy: unary gRPC call tokens are odd, stream tokens even.
            next_grpc_token: 1,
            grpc_result: None,
            done_called: Vec::new(),
            rng: 0x9E3779B97F4A7C15 ^ (index as u64 + 1),
            stats: Stats::default(),
            ctx_counter: 1,
        }
    }

    /// A fresh context id (root and stream contexts share one sequence, as cpp-host's).
    pub(crate) fn next_ctx(&mut self) -> u32 {
        let id = self.ctx_counter;
        self.ctx_counter += 1;
        id
    }

    pub(crate) fn effective_ctx(&self) -> u32 {
        self.effective.unwrap_or(self.current)
    }

    pub(crate) fn is_root(&self, ctx: u32) -> bool {
        self.roots.iter().any(|r| r.id == ctx)
    }

    /// The root context of `ctx` (itself for a root).
    pub(crate) fn root_of(&self, ctx: u32) -> u32 {
        if self.is_root(ctx) {
            return ctx;
        }
        if let Some(s) = self.streams.get(&ctx) {
            return s.root;
        }
        self.roots.first().map(|r| r.id).unwrap_or(ctx)
    }

    /// The live (not retired) root context for `root_id`.
    pub(crate) fn live_root(&self, root_id: &str) -> Option<u32> {
        self.roots.iter().rev().find(|r| r.root_id == root_id && !r.retired).map(|r| r.id)
    }

    fn stream(&self) -> Option<&Stream> {
        self.streams.get(&self.effective_ctx())
    }

    fn stream_mut(&mut self) -> Option<&mut Stream> {
        let ctx = self.effective_ctx();
        self.streams.get_mut(&ctx)
    }

    pub(crate) fn env_block(&self) -> Vec<String> {
        self.env.iter().map(|(k, v)| format!("{k}={v}")).collect()
    }

    pub(crate) fn buffer(&self, ty: i32) -> Option<Vec<u8>> {
        match ty {
            0 => self.stream().map(|s| s.req_buf.clone()),
            1 => self.stream().map(|s| s.resp_buf.clone()),
            4 => self.call_resp.as_ref().map(|(_, b)| b.clone()),
            5 => match &self.grpc_result {
                Some(GrpcResult::Message(b)) if self.phase == Phase::GrpcReceive => Some(b.clone()),
                _ => None,
            },
            6 => Some(self.vm_config.clone()),
            7 if self.phase == Phase::Configure => {
                let root = self.root_of(self.effective_ctx());
                self.roots.iter().find(|r| r.id == root).map(|r| r.config.clone())
            }
            _ => None,
        }
    }

    /// Envoy's `Buffer::copyFrom`: start 0 replaces the first `len` bytes (prepend), start at or
    /// past the end appends, anything else is BadArgument.
    pub(crate) fn set_buffer(&mut self, ty: i32, start: usize, len: usize, data: &[u8]) -> i32 {
        let buf = match ty {
            0 => self.stream_mut().map(|s| &mut s.req_buf),
            1 => self.stream_mut().map(|s| &mut s.resp_buf),
            4..=7 => return BAD_ARGUMENT,
            _ => None,
        };
        let Some(buf) = buf else { return NOT_FOUND };
        if start == 0 {
            let n = len.min(buf.len());
            buf.drain(..n);
            buf.splice(0..0, data.iter().copied());
            OK
        } else if start >= buf.len() {
            buf.extend_from_slice(data);
            OK
        } else {
            BAD_ARGUMENT
        }
    }

    pub(crate) fn map(&self, ty: i32) -> Result<&Headers, i32> {
        static EMPTY_MAP: Headers = Vec::new();
        let log_phase = self.phase == Phase::Log;
        match ty {
            0 => self.stream().map(|s| &s.req_headers).ok_or(BAD_ARGUMENT),
            1 => match self.stream() {
                Some(Stream { req_trailers: Some(t), .. }) => Ok(t),
                _ if log_phase => Err(NOT_FOUND),
                _ => Err(BAD_ARGUMENT),
            },
            2 => match self.stream() {
                // Envoy 1.40, upstream filter: response headers are gone in body callbacks.
                Some(s) if s.kind == StreamKind::Upstream && self.phase == Phase::ResponseBody => Err(BAD_ARGUMENT),
                Some(Stream { resp_headers: Some(h), .. }) => Ok(h),
                Some(_) if log_phase => Err(NOT_FOUND),
                _ => Err(BAD_ARGUMENT),
            },
            3 => {
                if log_phase {
                    Err(NOT_FOUND)
                } else {
                    Err(BAD_ARGUMENT)
                }
            }
            6 => self.call_resp.as_ref().map(|(h, _)| h).ok_or(BAD_ARGUMENT),
            7 => self.call_resp.as_ref().map(|_| &EMPTY_MAP).ok_or(BAD_ARGUMENT),
            _ => Err(BAD_ARGUMENT),
        }
    }

    pub(crate) fn with_map(&mut self, ty: i32, f: impl FnOnce(&mut Headers)) -> i32 {
        let phase = self.phase;
        let log_phase = phase == Phase::Log;
        match ty {
            0 => match self.stream_mut() {
                // Envoy 1.40, upstream filter: request headers are read-only once the response started.
                Some(s) if s.kind == StreamKind::Upstream && matches!(phase, Phase::ResponseHeaders | Phase::ResponseBody) => BAD_ARGUMENT,
                Some(s) => {
                    f(&mut s.req_headers);
                    OK
                }
                None => BAD_ARGUMENT,
            },
            1 => match self.stream_mut() {
                Some(Stream { req_trailers: Some(t), .. }) => {
                    f(t);
                    OK
                }
                _ => BAD_ARGUMENT,
            },
            2 => match self.stream_mut() {
                Some(Stream { resp_headers: Some(h), .. }) => {
                    f(h);
                    OK
                }
                Some(_) if log_phase => NOT_FOUND,
                _ => BAD_ARGUMENT,
            },
            6 => match self.call_resp.as_mut() {
                Some((h, _)) => {
                    f(h);
                    OK
                }
                None => BAD_ARGUMENT,
            },
            _ => BAD_ARGUMENT,
        }
    }

    /// The filter state the running stream reads and writes (its downstream request's).
    pub(crate) fn filter_state_mut(&mut self) -> Option<&mut FilterState> {
        let owner = self.stream()?.fs_owner;
        Some(self.filter_states.entry(owner).or_default())
    }

    pub(crate) fn property(&self, key: &str) -> Option<Vec<u8>> {
        let ctx = self.effective_ctx();
        let root = self.roots.iter().find(|r| r.id == self.root_of(ctx));
        match key {
            "plugin_root_id" | "plugin_name" => return root.map(|r| r.root_id.clone().into_bytes()),
            "plugin_vm_id" => return Some(Vec::new()),
            _ => {}
        }
        let s = self.streams.get(&ctx);
        // Set by the test for this stream (e.g. an upstream attempt's `xds.cluster_name`).
        if let Some(v) = s.and_then(|s| s.props.get(key)) {
            return Some(v.clone());
        }
        if let Some(fs) = s.and_then(|s| self.filter_states.get(&s.fs_owner)) {
            if let Some(k) = key.strip_prefix("filter_state.") {
                if let Some(v) = fs.get(k) {
                    return Some(v.clone());
                }
            }
            if let Some(v) = fs.get(&format!("{WASM_STATE_PREFIX}{key}")) {
                return Some(v.clone());
            }
        }
        if let Some(v) = self.host.properties.lock().unwrap().get(key) {
            return Some(v.clone());
        }
        let s = s?;
        let hdr = |name: &str| s.req_headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone().into_bytes());
        match key {
            "request.path" => hdr(":path"),
            "request.url_path" => hdr(":path").map(|p| p.split(|b| *b == b'?').next().unwrap_or(&[]).to_vec()),
            "request.method" => hdr(":method"),
            "request.host" => hdr(":authority"),
            "request.scheme" => hdr(":scheme"),
            "request.id" => hdr("x-request-id"),
            "request.protocol" => Some(b"HTTP/1.1".to_vec()),
            "request.time" => Some(int_property(s.start_ns as i64)),
            "request.duration" => Some(int_property((self.host.now_ns() - s.start_ns) as i64)),
            "response.code" => s.resp_code.map(int_property),
            "response.code_details" => s.code_details.clone().map(String::into_bytes),
            "response.flags" => s.resp_headers.as_ref().map(|_| int_property(s.resp_flags)),
            "cluster_name" | "xds.cluster_name" => s.cluster.clone().map(String::into_bytes),
            "source.address" => Some(b"127.0.0.1:40000".to_vec()),
            "destination.address" => Some(b"127.0.0.1:8080".to_vec()),
            _ => None,
        }
    }

    /// `proxy_set_property`: Envoy stores it as filter state `wasm.<path>`; no stream, NotFound.
    pub(crate) fn set_property(&mut self, key: String, value: Vec<u8>) -> i32 {
        match self.filter_state_mut() {
            None => NOT_FOUND,
            Some(fs) => {
                fs.insert(format!("{WASM_STATE_PREFIX}{key}"), value);
                OK
            }
        }
    }

    /// The `set_envoy_filter_state` foreign function (Envoy's `Context::setEnvoyFilterState`):
    /// NotFound when no object factory is registered for the key or outside a stream.
    pub(crate) fn set_envoy_filter_state(&mut self, key: String, value: Vec<u8>) -> i32 {
        let known = self.host.filter_state_keys.lock().unwrap().as_ref().is_none_or(|k| k.contains(&key));
        if !known || key.is_empty() {
            return NOT_FOUND;
        }
        match self.filter_state_mut() {
            None => NOT_FOUND,
            Some(fs) => {
                fs.insert(key, value);
                OK
            }
        }
    }

    pub(crate) fn continue_stream(&mut self, ty: i32) -> i32 {
        let Some(s) = self.stream_mut() else { return NOT_FOUND };
        match ty {
            0 => s.continue_req = true,
            1 => s.continue_resp = true,
            _ => return BAD_ARGUMENT,
        }
        OK
    }

    pub(crate) fn close_stream(&mut self, ty: i32) -> i32 {
        if !(0..=3).contains(&ty) {
            return BAD_ARGUMENT;
        }
        let Some(s) = self.stream_mut() else { return NOT_FOUND };
        s.reset = true;
        OK
    }

    pub(crate) fn clear_route_cache(&mut self) {
        if let Some(s) = self.stream_mut() {
            s.route_clears += 1;
            // An upstream filter's attempt already has its cluster: nothing to recompute.
            if !s.req_hdrs_out && s.kind == StreamKind::Downstream {
                s.route = None;
            }
        }
    }

    pub(crate) fn send_local_response(&mut self, code: u32, details: String, body: Vec<u8>, headers: Headers, _grpc: i32) -> i32 {
        let Some(s) = self.stream_mut() else { return NOT_FOUND };
        if s.local_reply.is_some() || s.local_sent {
            return BAD_ARGUMENT;
        }
        s.local_reply = Some(LocalSpec { status: code, details, body, headers });
        OK
    }

    pub(crate) fn add_http_call(&mut self, reply: CallReply, timeout_ms: u32) -> u32 {
        let token = self.next_token;
        self.next_token += 1;
        let now = self.host.now_ns();
        let due_ns = match &reply {
            CallReply::Response { delay_ms, .. } => now + delay_ms * 1_000_000,
            CallReply::Failure => now,
            CallReply::Timeout => now + timeout_ms as u64 * 1_000_000,
        };
        // A response slower than the call's timeout is a timeout.
        let (reply, due_ns) = match reply {
            CallReply::Response { delay_ms, .. } if timeout_ms > 0 && delay_ms > timeout_ms as u64 => {
                (CallReply::Timeout, now + timeout_ms as u64 * 1_000_000)
            }
            r => (r, due_ns),
        };
        let ctx = self.effective_ctx();
        self.pending.push(PendingCall { token, ctx, due_ns, reply });
        token
    }

    /// Queues a unary gRPC call's scripted result; a reply slower than the call's timeout (or
    /// `GrpcReply::Timeout`) becomes what Envoy 1.40 delivers then: status 14 "upstream request
    /// timeout" at the deadline (measured, see shared/notes/global-limits.md).
    pub(crate) fn add_grpc_call(&mut self, reply: GrpcReply, timeout_ms: u32) -> u32 {
        let token = self.next_grpc_token;
        self.next_grpc_token = self.next_grpc_token.wrapping_add(2).max(1);
        let now = self.host.now_ns();
        let timeout_ns = timeout_ms as u64 * 1_000_000;
        let delay_ns = match &reply {
            GrpcReply::Message { delay_ms, .. } | GrpcReply::Status { delay_ms, .. } => Some(delay_ms * 1_000_000),
            GrpcReply::Timeout => None,
        };
        let (reply, due_ns) = match delay_ns {
            Some(d) if timeout_ms == 0 || d <= timeout_ns => (reply, now + d),
            _ => (GrpcReply::status(14, "upstream request timeout"), now + timeout_ns),
        };
        let ctx = self.effective_ctx();
        self.pending_grpc.push(PendingGrpc { token, ctx, due_ns, reply });
        token
    }

    /// `proxy_grpc_cancel` / `proxy_grpc_close` on a unary call: Envoy cancels it (no callback)
    /// if this context owns it, else NotFound.
    pub(crate) fn cancel_grpc(&mut self, token: u32) -> i32 {
        let ctx = self.effective_ctx();
        match self.pending_grpc.iter().position(|p| p.token == token && p.ctx == ctx) {
            None => NOT_FOUND,
            Some(i) => {
                self.pending_grpc.remove(i);
                let vm = self.index;
                self.host.grpc_cancels.lock().unwrap().push((vm, token));
                OK
            }
        }
    }
}

type HttpCallResponseFn = TypedFunc<(i32, i32, i32, i32, i32), ()>;

pub(crate) struct Exports {
    pub on_context_create: Option<TypedFunc<(i32, i32), ()>>,
    pub on_vm_start: Option<TypedFunc<(i32, i32), i32>>,
    pub on_configure: Option<TypedFunc<(i32, i32), i32>>,
    pub on_tick: Option<TypedFunc<i32, ()>>,
    pub on_request_headers: Option<TypedFunc<(i32, i32, i32), i32>>,
    pub on_request_body: Option<TypedFunc<(i32, i32, i32), i32>>,
    pub on_request_trailers: Option<TypedFunc<(i32, i32), i32>>,
    pub on_response_headers: Option<TypedFunc<(i32, i32, i32), i32>>,
    pub on_response_body: Option<TypedFunc<(i32, i32, i32), i32>>,
    pub on_log: Option<TypedFunc<i32, ()>>,
    pub on_done: Option<TypedFunc<i32, i32>>,
    pub on_delete: Option<TypedFunc<i32, ()>>,
    pub on_http_call_response: Option<HttpCallResponseFn>,
    pub on_grpc_receive: Option<TypedFunc<(i32, i32, i32), ()>>,
    pub on_grpc_close: Option<TypedFunc<(i32, i32, i32), ()>>,
    pub on_queue_ready: Option<TypedFunc<(i32, i32), ()>>,
}

impl Exports {
    pub(crate) fn get(store: &mut Store<VmState>, inst: &Instance) -> Exports {
        macro_rules! f {
            ($name:literal) => {
                inst.get_typed_func(&mut *store, $name).ok()
            };
        }
        Exports {
            on_context_create: f!("proxy_on_context_create"),
            on_vm_start: f!("proxy_on_vm_start"),
            on_configure: f!("proxy_on_configure"),
            on_tick: f!("proxy_on_tick"),
            on_request_headers: f!("proxy_on_request_headers"),
            on_request_body: f!("proxy_on_request_body"),
            on_request_trailers: f!("proxy_on_request_trailers"),
            on_response_headers: f!("proxy_on_response_headers"),
            on_response_body: f!("proxy_on_response_body"),
            on_log: f!("proxy_on_log"),
            on_done: f!("proxy_on_done"),
            on_delete: f!("proxy_on_delete"),
            on_http_call_response: f!("proxy_on_http_call_response"),
            on_grpc_receive: f!("proxy_on_grpc_receive"),
            on_grpc_close: f!("proxy_on_grpc_close"),
            on_queue_ready: f!("proxy_on_queue_ready"),
        }
    }
}
