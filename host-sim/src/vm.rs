//! One VM (= one Envoy worker's copy of the plugin) and the HTTP stream state machine that
//! drives it as Envoy's wasm filter does.

use crate::abi::int_property;
use crate::state::{status::*, CallReply, HostInner, MetricType};
use std::collections::HashMap;
use std::sync::Arc;
use wasmtime::{Instance, Memory, Store, TypedFunc};

pub type Headers = Vec<(String, String)>;

/// Envoy's legacy response-flag bits (as the `response.flags` property returns them).
pub mod flags {
    pub const UPSTREAM_REQUEST_TIMEOUT: i64 = 0x4;
    pub const UPSTREAM_CONNECTION_FAILURE: i64 = 0x20;
}

/// The request header the router's `cluster_header` route reads.
pub const CLUSTER_HEADER: &str = "x-auto-ai-router-cluster";

#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Phase {
    None,
    Create,
    VmStart,
    Configure,
    Tick,
    RequestHeaders,
    RequestBody,
    ResponseHeaders,
    ResponseBody,
    Log,
    Done,
    HttpCallResponse,
    QueueReady,
}

pub(crate) struct RootInfo {
    pub id: u32,
    pub root_id: String,
    pub config: Vec<u8>,
}

#[derive(Default, Clone, Debug)]
pub(crate) struct Stats {
    pub shared_sets: u64,
}

pub(crate) struct PendingCall {
    pub token: u32,
    pub ctx: u32,
    pub due_ns: u64,
    pub reply: CallReply,
}

#[derive(Clone, Debug)]
pub(crate) struct LocalSpec {
    pub status: u32,
    pub details: String,
    pub body: Vec<u8>,
    pub headers: Headers,
}

#[derive(Default)]
pub(crate) struct Stream {
    pub req_headers: Headers,
    pub resp_headers: Option<Headers>,
    pub req_buf: Vec<u8>,
    pub resp_buf: Vec<u8>,
    pub start_ns: u64,
    // decode
    pub req_eos_in: bool,
    pub req_hdrs_out: bool,
    pub req_done: bool,
    pub route: Option<Option<String>>,
    pub route_clears: u32,
    pub fwd_headers: Option<Headers>,
    pub fwd_body: Vec<u8>,
    pub cluster: Option<String>,
    // control (deferred until the callback returns, as Envoy's after-VM-call actions)
    pub local_reply: Option<LocalSpec>,
    pub local_sent: bool,
    pub continue_req: bool,
    pub continue_resp: bool,
    pub reset: bool,
    // encode
    pub upstream_responded: bool,
    pub resp_eos_in: bool,
    pub resp_hdrs_out: bool,
    pub client_headers: Option<Headers>,
    pub client_chunks: Vec<Vec<u8>>,
    pub resp_done: bool,
    pub resp_code: Option<i64>,
    pub code_details: Option<String>,
    pub resp_flags: i64,
    pub props: HashMap<String, Vec<u8>>,
    pub finished: bool,
    pub failed: bool,
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
    pub(crate) ticks: HashMap<u32, (u64, u64)>,
    pub(crate) metric_ids: HashMap<u32, (MetricType, String)>,
    pub(crate) pending: Vec<PendingCall>,
    pub(crate) next_token: u32,
    pub(crate) call_resp: Option<(Headers, Vec<u8>)>,
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
            ticks: HashMap::new(),
            metric_ids: HashMap::new(),
            pending: Vec::new(),
            next_token: 1,
            call_resp: None,
            rng: 0x9E3779B97F4A7C15 ^ (index as u64 + 1),
            stats: Stats::default(),
            ctx_counter: 2,
        }
    }

    pub(crate) fn effective_ctx(&self) -> u32 {
        self.effective.unwrap_or(self.current)
    }

    pub(crate) fn root_of(&self, ctx: u32) -> u32 {
        if self.roots.iter().any(|r| r.id == ctx) {
            ctx
        } else {
            self.roots.first().map(|r| r.id).unwrap_or(ctx)
        }
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
            4 | 6 | 7 => return BAD_ARGUMENT,
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
            2 => match self.stream() {
                Some(Stream { resp_headers: Some(h), .. }) => Ok(h),
                Some(_) if log_phase => Err(NOT_FOUND),
                _ => Err(BAD_ARGUMENT),
            },
            1 | 3 => {
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
        let log_phase = self.phase == Phase::Log;
        match ty {
            0 => match self.stream_mut() {
                Some(s) => {
                    f(&mut s.req_headers);
                    OK
                }
                None => BAD_ARGUMENT,
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

    pub(crate) fn property(&self, key: &str) -> Option<Vec<u8>> {
        let ctx = self.effective_ctx();
        let root = self.roots.iter().find(|r| r.id == self.root_of(ctx));
        match key {
            "plugin_root_id" | "plugin_name" => return root.map(|r| r.root_id.clone().into_bytes()),
            "plugin_vm_id" => return Some(Vec::new()),
            _ => {}
        }
        let s = self.streams.get(&ctx);
        if let Some(v) = s.and_then(|s| s.props.get(key)) {
            return Some(v.clone());
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
            if !s.req_hdrs_out {
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
}

/// Envoy's local reply headers: `:status`, the filter's extra headers, content-length and a
/// text/plain content-type when the body is not empty and none was given.
pub(crate) fn local_reply_headers(spec: &LocalSpec) -> Headers {
    let mut h: Headers = vec![(":status".into(), spec.status.to_string())];
    for (k, v) in &spec.headers {
        h.push((k.to_ascii_lowercase(), v.clone()));
    }
    if !spec.body.is_empty() {
        h.retain(|(k, _)| k != "content-length");
        h.push(("content-length".into(), spec.body.len().to_string()));
        if !h.iter().any(|(k, _)| k == "content-type") {
            h.push(("content-type".into(), "text/plain".into()));
        }
    }
    h
}

pub(crate) struct Exports {
    pub on_context_create: Option<TypedFunc<(i32, i32), ()>>,
    pub on_vm_start: Option<TypedFunc<(i32, i32), i32>>,
    pub on_configure: Option<TypedFunc<(i32, i32), i32>>,
    pub on_tick: Option<TypedFunc<i32, ()>>,
    pub on_request_headers: Option<TypedFunc<(i32, i32, i32), i32>>,
    pub on_request_body: Option<TypedFunc<(i32, i32, i32), i32>>,
    pub on_response_headers: Option<TypedFunc<(i32, i32, i32), i32>>,
    pub on_response_body: Option<TypedFunc<(i32, i32, i32), i32>>,
    pub on_log: Option<TypedFunc<i32, ()>>,
    pub on_done: Option<TypedFunc<i32, i32>>,
    pub on_delete: Option<TypedFunc<i32, ()>>,
    pub on_http_call_response: Option<TypedFunc<(i32, i32, i32, i32, i32), ()>>,
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
            on_response_headers: f!("proxy_on_response_headers"),
            on_response_body: f!("proxy_on_response_body"),
            on_log: f!("proxy_on_log"),
            on_done: f!("proxy_on_done"),
            on_delete: f!("proxy_on_delete"),
            on_http_call_response: f!("proxy_on_http_call_response"),
            on_queue_ready: f!("proxy_on_queue_ready"),
        }
    }
}

