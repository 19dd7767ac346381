//! proxy-wasm ABI 0.2.1 host on wasmtime (see issue "host-sim").
//!
//! A state-based test host in the style of proxy-wasm-go-sdk's `proxytest`: a [`Host`] owns a
//! virtual clock, one shared-data store, one metrics store, captured logs and scripted
//! `dispatch_http_call` replies; [`Host::vm`] starts a VM (an Envoy worker's copy of the plugin)
//! from the compiled module, runs `_initialize` → root context → `on_vm_start` → `on_configure`;
//! [`Vm::http_request`] drives one HTTP stream through the filter as Envoy does and returns what
//! happened; [`Vm::respond`] plays the upstream side.
//!
//! ```no_run
//! use host_sim::*;
//! let host = Host::new();
//! let mut vm = host.vm("server: {master_key: sk-m}\ncredentials: []", &[]).unwrap();
//! let ex = vm.http_request(&[(":method", "GET"), (":path", "/health")], b"");
//! assert_eq!(ex.local_reply().unwrap().status, 503);
//! ```

mod abi;
mod state;
mod vm;

pub use abi::{ENV_IMPORTS, WASI_IMPORTS};
pub use state::{CallReply, HttpCallRecord, LogEntry, LogLevel, MetricType};
pub use vm::{flags, CLUSTER_HEADER};

use state::HostInner;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, OnceLock};
use vm::{local_reply_headers, Exports, Headers, LocalSpec, Phase, RootInfo, Stream, VmState};
use wasmtime::{Config, Engine, InstancePre, Linker, Module, Store};

/// Default root id of the router filter.
pub const ROUTER_ROOT_ID: &str = "auto_ai_router";

/// Virtual time starts here (2024-01-01T00:00:00Z) so the filter never sees a zero clock.
pub const START_EPOCH_MS: u64 = 1_704_067_200_000;

// ------------------------------------------------------------------------------------------
// Module loading (compile once per process, instantiate many).

struct Loaded {
    engine: Engine,
    pre: InstancePre<VmState>,
    fuel: bool,
}

type Cache = Mutex<HashMap<(PathBuf, bool), Arc<Loaded>>>;
static CACHE: OnceLock<Cache> = OnceLock::new();

/// Where the filter is built: `$HOSTSIM_WASM`, else `<target>/wasm32-wasip1/release/filter.wasm`.
pub fn default_wasm_path() -> PathBuf {
    if let Some(p) = std::env::var_os("HOSTSIM_WASM") {
        return PathBuf::from(p);
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    target.join("wasm32-wasip1/release/filter.wasm")
}

fn load(path: &Path, fuel: bool) -> Result<Arc<Loaded>, String> {
    let cache = CACHE.get_or_init(Default::default);
    let key = (path.to_path_buf(), fuel);
    // Held across the compile so parallel tests compile the module once, not once each.
    let mut map = cache.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(l) = map.get(&key) {
        return Ok(l.clone());
    }
    let bytes = std::fs::read(path).map_err(|e| {
        format!("cannot read {}: {e}\nbuild the filter first with `make wasm`", path.display())
    })?;
    let loaded = Arc::new(compile(&bytes, fuel)?);
    map.insert(key, loaded.clone());
    Ok(loaded)
}

fn compile(bytes: &[u8], fuel: bool) -> Result<Loaded, String> {
    let mut config = Config::new();
    config.consume_fuel(fuel);
    let engine = Engine::new(&config).map_err(|e| format!("wasmtime engine: {e:?}"))?;
    let module = Module::new(&engine, bytes).map_err(|e| format!("compiling the module: {e:?}"))?;
    let mut unknown = Vec::new();
    for imp in module.imports() {
        let known = match imp.module() {
            "env" => ENV_IMPORTS.contains(&imp.name()),
            "wasi_snapshot_preview1" => WASI_IMPORTS.contains(&imp.name()),
            _ => false,
        };
        if !known {
            unknown.push(format!("{}.{}", imp.module(), imp.name()));
        }
    }
    if !unknown.is_empty() {
        return Err(format!("the module imports functions host-sim does not provide: {}", unknown.join(", ")));
    }
    let mut linker = Linker::new(&engine);
    abi::link(&mut linker).map_err(|e| format!("linking host functions: {e:?}"))?;
    let pre = linker.instantiate_pre(&module).map_err(|e| format!("linking the module: {e:?}"))?;
    Ok(Loaded { engine, pre, fuel })
}

// ------------------------------------------------------------------------------------------
// Host

/// One simulated Envoy process: clock, shared data, metrics, logs, callout scripts.
#[derive(Clone)]
pub struct Host {
    inner: Arc<HostInner>,
    loaded: Arc<Loaded>,
}

/// Why a VM did not start.
#[derive(Debug, Clone)]
pub enum VmError {
    /// Loading, linking or instantiating the module failed.
    Load(String),
    /// `proxy_on_vm_start` returned false.
    VmStartFailed,
    /// `proxy_on_configure` returned false (Envoy rejects the listener). Carries the VM's logs.
    ConfigureFailed(Vec<LogEntry>),
    /// The module trapped (panicked) during startup.
    Trap(String),
}

impl VmError {
    /// Every log message of the failed VM joined with newlines (for `contains` checks).
    pub fn messages(&self) -> String {
        match self {
            VmError::ConfigureFailed(logs) => logs.iter().map(|l| l.message.as_str()).collect::<Vec<_>>().join("\n"),
            VmError::Load(m) | VmError::Trap(m) => m.clone(),
            VmError::VmStartFailed => "on_vm_start returned false".into(),
        }
    }
}

/// What a VM is started with.
#[derive(Clone, Debug)]
pub struct VmConfig {
    pub root_id: String,
    pub plugin_config: Vec<u8>,
    pub vm_config: Vec<u8>,
    pub env: Vec<(String, String)>,
}

impl VmConfig {
    pub fn new(plugin_config: impl Into<Vec<u8>>) -> VmConfig {
        VmConfig { root_id: ROUTER_ROOT_ID.into(), plugin_config: plugin_config.into(), vm_config: Vec::new(), env: Vec::new() }
    }
    pub fn root_id(mut self, id: &str) -> Self {
        self.root_id = id.into();
        self
    }
    pub fn env(mut self, env: &[(&str, &str)]) -> Self {
        self.env = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        self
    }
    pub fn vm_config(mut self, c: impl Into<Vec<u8>>) -> Self {
        self.vm_config = c.into();
        self
    }
}

impl Default for Host {
    fn default() -> Self {
        Host::new()
    }
}

impl Host {
    /// A host for the default `filter.wasm`; panics with a `make wasm` hint if it is missing.
    pub fn new() -> Host {
        Host::load(&default_wasm_path(), false).unwrap_or_else(|e| panic!("{e}"))
    }

    /// A host for `path`; `fuel` counts wasm instructions (slower; for the bench).
    pub fn load(path: &Path, fuel: bool) -> Result<Host, String> {
        let loaded = load(path, fuel)?;
        Ok(Host { inner: Arc::new(HostInner::new(START_EPOCH_MS * 1_000_000)), loaded })
    }

    // ---- clock
    /// Virtual time in ms since the Unix epoch.
    pub fn now_ms(&self) -> u64 {
        self.inner.now_ns() / 1_000_000
    }
    /// Milliseconds since the host started.
    pub fn elapsed_ms(&self) -> u64 {
        self.now_ms() - START_EPOCH_MS
    }
    /// Moves the virtual clock. Timers and callouts fire on each VM's next call (or `run_due`).
    pub fn advance_ms(&self, ms: u64) {
        self.inner.clock_ns.fetch_add(ms * 1_000_000, Ordering::SeqCst);
    }

    // ---- settings
    /// Envoy's buffer limit: a request body buffered past this gets Envoy's own 413.
    pub fn set_buffer_limit(&self, bytes: Option<usize>) {
        *self.inner.buffer_limit.lock().unwrap() = bytes;
    }
    /// What `proxy_get_log_level` answers (default Trace: every log is captured).
    pub fn set_log_level(&self, level: LogLevel) {
        *self.inner.log_level.lock().unwrap() = level;
    }
    /// A property every context can read (e.g. `("node.id", b"x")`); dotted path.
    pub fn set_property(&self, path: &str, value: impl Into<Vec<u8>>) {
        self.inner.properties.lock().unwrap().insert(path.into(), value.into());
    }

    /// Runs `hook` right after every successful `proxy_get_shared_data` of any VM (between a
    /// filter's read and its compare-and-swap), with the hook disabled while it runs. Use it to
    /// run another VM's request in that window, as a concurrent Envoy worker would.
    pub fn set_preempt(&self, hook: Option<Box<dyn FnMut() + Send>>) {
        *self.inner.preempt.lock().unwrap() = hook;
    }

    // ---- callouts
    /// Every call to `cluster` gets `reply` (unless a one-shot reply is queued).
    pub fn script_http_call(&self, cluster: &str, reply: CallReply) {
        self.inner.scripts.lock().unwrap().always.insert(cluster.into(), reply);
    }
    /// The next call to `cluster` gets `reply`.
    pub fn queue_http_call(&self, cluster: &str, reply: CallReply) {
        self.inner.scripts.lock().unwrap().once.entry(cluster.into()).or_default().push_back(reply);
    }
    /// `cluster` exists; unscripted calls to it fail (zero headers). Unknown clusters are
    /// `BadArgument`, as in Envoy.
    pub fn add_cluster(&self, cluster: &str) {
        self.inner.scripts.lock().unwrap().known.push(cluster.into());
    }
    /// Every `dispatch_http_call` made so far.
    pub fn http_calls(&self) -> Vec<HttpCallRecord> {
        self.inner.calls.lock().unwrap().clone()
    }

    // ---- observations
    pub fn logs(&self) -> Vec<LogEntry> {
        self.inner.logs.lock().unwrap().clone()
    }
    /// Log messages at `level` or above.
    pub fn log_messages(&self, level: LogLevel) -> Vec<String> {
        self.logs().into_iter().filter(|l| l.level >= level).map(|l| l.message).collect()
    }
    pub fn clear_logs(&self) {
        self.inner.logs.lock().unwrap().clear();
    }
    /// Counter or gauge value by name (as given to `define_metric`).
    pub fn metric(&self, name: &str) -> Option<u64> {
        let m = self.inner.metrics.lock().unwrap();
        m.counters.get(name).or_else(|| m.gauges.get(name)).copied()
    }
    /// Histogram samples by name.
    pub fn histogram(&self, name: &str) -> Option<Vec<u64>> {
        self.inner.metrics.lock().unwrap().histograms.get(name).cloned()
    }
    /// Every metric: (type, name, value); histograms report their sample count.
    pub fn metrics(&self) -> Vec<(MetricType, String, u64)> {
        let m = self.inner.metrics.lock().unwrap();
        let mut v: Vec<_> = m.counters.iter().map(|(k, x)| (MetricType::Counter, k.clone(), *x)).collect();
        v.extend(m.gauges.iter().map(|(k, x)| (MetricType::Gauge, k.clone(), *x)));
        v.extend(m.histograms.iter().map(|(k, x)| (MetricType::Histogram, k.clone(), x.len() as u64)));
        v
    }
    /// Shared data value and CAS.
    pub fn shared_data(&self, key: &str) -> Option<(Vec<u8>, u32)> {
        self.inner.shared.lock().unwrap().map.get(key).cloned()
    }
    pub fn shared_data_keys(&self) -> Vec<String> {
        let mut k: Vec<_> = self.inner.shared.lock().unwrap().map.keys().cloned().collect();
        k.sort();
        k
    }
    /// Traps (filter panics) seen by any VM.
    pub fn traps(&self) -> Vec<String> {
        self.inner.traps.lock().unwrap().clone()
    }

    // ---- VMs
    /// Starts a router VM (root id `auto_ai_router`) with this plugin configuration and these
    /// VM environment variables.
    pub fn vm(&self, plugin_config: impl Into<Vec<u8>>, env: &[(&str, &str)]) -> Result<Vm, VmError> {
        self.vm_with(VmConfig::new(plugin_config).env(env))
    }

    /// `n` VMs with the same configuration, as Envoy's workers.
    pub fn vms(&self, n: usize, plugin_config: &str, env: &[(&str, &str)]) -> Result<Vec<Vm>, VmError> {
        (0..n).map(|_| self.vm(plugin_config, env)).collect()
    }

    pub fn vm_with(&self, cfg: VmConfig) -> Result<Vm, VmError> {
        let index = self.inner.next_vm.fetch_add(1, Ordering::SeqCst) as u32;
        let mut state = VmState::new(self.inner.clone(), index, cfg.env.clone());
        state.vm_config = cfg.vm_config.clone();
        state.roots.push(RootInfo { id: 1, root_id: cfg.root_id.clone(), config: cfg.plugin_config.clone() });
        let mut store = Store::new(&self.loaded.engine, state);
        if self.loaded.fuel {
            store.set_fuel(u64::MAX / 2).map_err(|e| VmError::Load(format!("{e:?}")))?;
        }
        let inst = self.loaded.pre.instantiate(&mut store).map_err(|e| VmError::Load(format!("instantiate: {e:?}")))?;
        let malloc = inst
            .get_typed_func::<i32, i32>(&mut store, "malloc")
            .or_else(|_| inst.get_typed_func::<i32, i32>(&mut store, "proxy_on_memory_allocate"))
            .ok();
        store.data_mut().malloc = malloc;
        let ex = Exports::get(&mut store, &inst);
        let mut vm = Vm { store, ex, host: self.clone(), failed: None };
        let init = inst
            .get_typed_func::<(), ()>(&mut vm.store, "_initialize")
            .or_else(|_| inst.get_typed_func::<(), ()>(&mut vm.store, "_start"))
            .ok();
        if let Some(init) = init {
            init.call(&mut vm.store, ()).map_err(|e| VmError::Trap(format!("_initialize: {e:?}")))?;
        }
        let logs_before = self.inner.logs.lock().unwrap().len();
        let f = vm.ex.on_context_create.clone();
        vm.call(f, 1, Phase::Create, (1, 0)).map_err(VmError::Trap)?;
        let f = vm.ex.on_vm_start.clone();
        let n = cfg.vm_config.len() as i32;
        if vm.call(f, 1, Phase::VmStart, (1, n)).map_err(VmError::Trap)?.unwrap_or(1) == 0 {
            return Err(VmError::VmStartFailed);
        }
        let f = vm.ex.on_configure.clone();
        let n = cfg.plugin_config.len() as i32;
        if vm.call(f, 1, Phase::Configure, (1, n)).map_err(VmError::Trap)?.unwrap_or(1) == 0 {
            let logs = self.inner.logs.lock().unwrap()[logs_before..].iter().filter(|l| l.vm == index).cloned().collect();
            return Err(VmError::ConfigureFailed(logs));
        }
        Ok(vm)
    }
}

// ------------------------------------------------------------------------------------------
// Results

/// A response as the client receives it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// Body chunks in the order the filter let them through (SSE: one per upstream chunk).
    pub chunks: Vec<Vec<u8>>,
    /// `response.code_details` (the filter's details for its own local replies).
    pub details: String,
    /// False if the filter is still holding part of the response.
    pub complete: bool,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        find(&self.headers, name)
    }
    pub fn body_str(&self) -> &str {
        std::str::from_utf8(&self.body).unwrap_or("<non-utf8>")
    }
}

/// The request as the router forwards it upstream.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Forwarded {
    /// Request headers when they were released to the router (later changes do not count).
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// The cluster the route picked: the `x-auto-ai-router-cluster` value when the route was
    /// (re)computed — at stream start, or at release if the filter cleared the route cache.
    pub cluster: Option<String>,
    /// How many times the filter cleared the route cache.
    pub route_cache_clears: u32,
    /// The whole body reached the upstream.
    pub complete: bool,
}

impl Forwarded {
    pub fn header(&self, name: &str) -> Option<&str> {
        find(&self.headers, name)
    }
    pub fn header_all(&self, name: &str) -> Vec<&str> {
        self.headers.iter().filter(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str()).collect()
    }
}

/// What became of a request.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    /// A local reply (from the filter, or Envoy's own 413 / fail-closed 503), as the client got it.
    LocalReply(Response),
    /// Sent upstream; answer it with [`Vm::respond`].
    Forwarded(Forwarded),
    /// The filter is still holding the request (e.g. waiting for a callout).
    Paused,
    /// The filter closed the stream.
    Reset,
}

/// Handle of one HTTP stream plus what had happened when the call returned.
#[derive(Clone, Debug)]
pub struct Exchange {
    pub ctx: u32,
    pub outcome: Outcome,
}

impl Exchange {
    pub fn local_reply(&self) -> Option<&Response> {
        match &self.outcome {
            Outcome::LocalReply(r) => Some(r),
            _ => None,
        }
    }
    pub fn forwarded(&self) -> Option<&Forwarded> {
        match &self.outcome {
            Outcome::Forwarded(f) => Some(f),
            _ => None,
        }
    }
    /// The forwarded request; panics with the outcome if the request was not forwarded.
    pub fn expect_forwarded(&self) -> &Forwarded {
        self.forwarded().unwrap_or_else(|| panic!("expected the request to be forwarded, got {}", describe(&self.outcome)))
    }
    /// The local reply; panics with the outcome otherwise.
    pub fn expect_local(&self) -> &Response {
        self.local_reply().unwrap_or_else(|| panic!("expected a local reply, got {}", describe(&self.outcome)))
    }
    /// Chosen cluster (None for local replies).
    pub fn cluster(&self) -> Option<&str> {
        self.forwarded().and_then(|f| f.cluster.as_deref())
    }
    /// Status the client sees before the upstream answers: local reply status, else None.
    pub fn status(&self) -> Option<u16> {
        self.local_reply().map(|r| r.status)
    }
}

fn describe(o: &Outcome) -> String {
    match o {
        Outcome::LocalReply(r) => format!("local reply {} {:?} body {}", r.status, r.details, r.body_str()),
        Outcome::Forwarded(f) => format!("forwarded to cluster {:?}", f.cluster),
        Outcome::Paused => "paused".into(),
        Outcome::Reset => "reset".into(),
    }
}

fn find<'a>(h: &'a [(String, String)], name: &str) -> Option<&'a str> {
    h.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
}

fn owned(h: &[(&str, &str)]) -> Headers {
    h.iter().map(|(k, v)| (k.to_ascii_lowercase(), v.to_string())).collect()
}

/// How an upstream attempt ends without a response, as Envoy's router reports it.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum UpstreamFailure {
    /// 503, `upstream_reset_before_response_started{connection_failure}`, flag UF.
    ConnectFailure,
    /// 504, `upstream_response_timeout`, flag UT.
    Timeout,
}

// ------------------------------------------------------------------------------------------
// Vm

/// One VM: an Envoy worker's copy of the plugin.
pub struct Vm {
    store: Store<VmState>,
    ex: Exports,
    host: Host,
    failed: Option<String>,
}

const ACTION_CONTINUE: i32 = 0;

impl Vm {
    pub fn host(&self) -> &Host {
        &self.host
    }
    /// Index of this VM (0-based, in creation order within the host).
    pub fn index(&self) -> u32 {
        self.store.data().index
    }
    /// The trap that killed this VM, if any.
    pub fn failure(&self) -> Option<&str> {
        self.failed.as_deref()
    }
    /// Wasm instructions (fuel) used so far; None unless the host was loaded with fuel.
    pub fn fuel_used(&self) -> Option<u64> {
        if !self.host.loaded.fuel {
            return None;
        }
        self.store.get_fuel().ok().map(|left| u64::MAX / 2 - left)
    }
    /// `proxy_set_shared_data` calls that succeeded on this VM.
    pub fn shared_sets(&self) -> u64 {
        self.store.data().stats.shared_sets
    }

    fn call<P: wasmtime::WasmParams, R: wasmtime::WasmResults>(
        &mut self,
        f: Option<wasmtime::TypedFunc<P, R>>,
        ctx: u32,
        phase: Phase,
        params: P,
    ) -> Result<Option<R>, String> {
        if let Some(msg) = &self.failed {
            return Err(msg.clone());
        }
        let Some(f) = f else { return Ok(None) };
        let st = self.store.data_mut();
        let (prev_cur, prev_eff, prev_phase) = (st.current, st.effective, st.phase);
        st.current = ctx;
        st.effective = None;
        st.phase = phase;
        let r = f.call(&mut self.store, params);
        let st = self.store.data_mut();
        st.current = prev_cur;
        st.effective = prev_eff;
        st.phase = prev_phase;
        match r {
            Ok(v) => Ok(Some(v)),
            Err(e) => {
                let last = self
                    .host
                    .logs()
                    .into_iter()
                    .rev()
                    .find(|l| l.vm == self.index() && l.level == LogLevel::Critical)
                    .map(|l| format!(" (last critical log: {})", l.message))
                    .unwrap_or_default();
                let msg = format!("vm{} trapped in {phase:?}: {e:?}{last}", self.index());
                self.host.inner.log(self.index(), LogLevel::Critical, format!("host-sim: {msg}"));
                self.host.inner.traps.lock().unwrap().push(msg.clone());
                self.failed = Some(msg.clone());
                Err(msg)
            }
        }
    }

    fn stream(&mut self, ctx: u32) -> &mut Stream {
        self.store.data_mut().streams.get_mut(&ctx).expect("unknown stream")
    }

    /// Fires what is due on the virtual clock: callout responses, queue notifications, ticks.
    pub fn run_due(&mut self) {
        for _ in 0..100_000 {
            if self.failed.is_some() {
                return;
            }
            let now = self.host.inner.now_ns();
            // callouts, earliest first
            let st = self.store.data_mut();
            let next = st.pending.iter().enumerate().filter(|(_, p)| p.due_ns <= now).min_by_key(|(_, p)| (p.due_ns, p.token)).map(|(i, _)| i);
            if let Some(i) = next {
                let p = st.pending.remove(i);
                let (headers, body) = match p.reply {
                    CallReply::Response { status, headers, body, .. } => {
                        let mut h: Headers = vec![(":status".into(), status.to_string())];
                        h.extend(headers.into_iter().map(|(k, v)| (k.to_ascii_lowercase(), v)));
                        (h, body)
                    }
                    CallReply::Failure | CallReply::Timeout => (Vec::new(), Vec::new()),
                };
                let is_stream = st.streams.contains_key(&p.ctx);
                let is_root = st.roots.iter().any(|r| r.id == p.ctx);
                if !is_stream && !is_root {
                    continue; // its context is gone (Envoy cancels the call)
                }
                let (nh, nb) = (headers.len() as i32, body.len() as i32);
                st.call_resp = Some((headers, body));
                let f = self.ex.on_http_call_response.clone();
                let r = self.call(f, p.ctx, Phase::HttpCallResponse, (p.ctx as i32, p.token as i32, nh, nb, 0));
                self.store.data_mut().call_resp = None;
                if is_stream {
                    if r.is_err() {
                        self.fail_stream(p.ctx);
                    } else {
                        self.settle(p.ctx);
                    }
                }
                continue;
            }
            // shared queue notifications for this VM
            let idx = self.index();
            let ready = {
                let mut q = self.host.inner.queues.lock().unwrap();
                q.ready.iter().position(|(vm, _, _)| *vm == idx).map(|i| q.ready.remove(i))
            };
            if let Some((_, ctx, token)) = ready {
                let f = self.ex.on_queue_ready.clone();
                let _ = self.call(f, ctx, Phase::QueueReady, (ctx as i32, token as i32));
                continue;
            }
            // ticks
            let due = self.store.data().ticks.iter().find(|(_, (_, d))| *d <= now).map(|(c, _)| *c);
            if let Some(root) = due {
                let f = self.ex.on_tick.clone();
                let _ = self.call(f, root, Phase::Tick, root as i32);
                if let Some(e) = self.store.data_mut().ticks.get_mut(&root) {
                    if e.1 <= now {
                        e.1 = now + e.0 * 1_000_000;
                    }
                }
                continue;
            }
            return;
        }
        panic!("host-sim: run_due did not settle (a callout or tick loop?)");
    }

    /// Runs `on_tick` now if a tick period is set (regardless of when it is due).
    pub fn tick(&mut self) {
        self.run_due();
        let roots: Vec<u32> = self.store.data().ticks.keys().copied().collect();
        for root in roots {
            let f = self.ex.on_tick.clone();
            let _ = self.call(f, root, Phase::Tick, root as i32);
        }
        self.run_due();
    }

    /// The tick period the filter asked for, in ms.
    pub fn tick_period_ms(&self) -> Option<u64> {
        self.store.data().ticks.values().next().map(|(p, _)| *p)
    }

    /// Sends a request: headers, then the body in one chunk (none if empty).
    pub fn http_request(&mut self, headers: &[(&str, &str)], body: &[u8]) -> Exchange {
        let chunks: Vec<&[u8]> = if body.is_empty() { vec![] } else { vec![body] };
        self.http_request_chunks(headers, &chunks)
    }

    /// A JSON POST to `path` with `Authorization: Bearer <key>` (a shortcut for tests).
    pub fn post(&mut self, path: &str, key: &str, body: &str) -> Exchange {
        let auth = format!("Bearer {key}");
        let len = body.len().to_string();
        self.http_request(
            &[
                (":method", "POST"),
                (":path", path),
                (":authority", "router.local"),
                (":scheme", "http"),
                ("authorization", &auth),
                ("content-type", "application/json"),
                ("content-length", &len),
            ],
            body.as_bytes(),
        )
    }

    /// Sends a request whose body arrives in these chunks.
    pub fn http_request_chunks(&mut self, headers: &[(&str, &str)], chunks: &[&[u8]]) -> Exchange {
        self.run_due();
        let st = self.store.data_mut();
        let ctx = st.ctx_counter;
        st.ctx_counter += 1;
        let req_headers = owned(headers);
        let initial_cluster = find(&req_headers, CLUSTER_HEADER).map(str::to_string);
        st.streams.insert(
            ctx,
            Stream { req_headers, start_ns: self.host.inner.now_ns(), route: Some(initial_cluster), ..Default::default() },
        );
        if self.failed.is_some() {
            self.fail_stream(ctx);
            return self.exchange(ctx);
        }
        let f = self.ex.on_context_create.clone();
        if self.call(f, ctx, Phase::Create, (ctx as i32, 1)).is_err() {
            self.fail_stream(ctx);
            return self.exchange(ctx);
        }
        let eos = chunks.is_empty();
        self.stream(ctx).req_eos_in = eos;
        let n = self.stream(ctx).req_headers.len() as i32;
        let f = self.ex.on_request_headers.clone();
        match self.call(f, ctx, Phase::RequestHeaders, (ctx as i32, n, eos as i32)) {
            Err(_) => self.fail_stream(ctx),
            Ok(action) => {
                if action.unwrap_or(0) == ACTION_CONTINUE {
                    self.stream(ctx).continue_req = true;
                }
                self.settle(ctx);
            }
        }
        for (i, chunk) in chunks.iter().enumerate() {
            if self.ended(ctx) {
                break;
            }
            let eos = i + 1 == chunks.len();
            let s = self.stream(ctx);
            s.req_eos_in = eos;
            s.req_buf.extend_from_slice(chunk);
            let size = s.req_buf.len() as i32;
            let f = self.ex.on_request_body.clone();
            match self.call(f, ctx, Phase::RequestBody, (ctx as i32, size, eos as i32)) {
                Err(_) => self.fail_stream(ctx),
                Ok(action) => {
                    if action.unwrap_or(0) == ACTION_CONTINUE {
                        self.stream(ctx).continue_req = true;
                    } else {
                        // StopIterationAndBuffer: Envoy's buffer limit applies.
                        let limit = *self.host.inner.buffer_limit.lock().unwrap();
                        let s = self.stream(ctx);
                        if let Some(limit) = limit {
                            if s.req_buf.len() > limit && s.local_reply.is_none() && !s.continue_req {
                                s.local_reply = Some(LocalSpec {
                                    status: 413,
                                    details: "request_payload_too_large".into(),
                                    body: b"Payload Too Large".to_vec(),
                                    headers: Vec::new(),
                                });
                            }
                        }
                    }
                    self.settle(ctx);
                }
            }
        }
        self.run_due();
        self.exchange(ctx)
    }

    fn ended(&self, ctx: u32) -> bool {
        match self.store.data().streams.get(&ctx) {
            None => true,
            Some(s) => s.finished || s.local_sent || s.reset || s.failed,
        }
    }

    /// Applies what the filter asked for during its last callback (Envoy runs these after the
    /// VM call returns): local reply, reset, continue.
    fn settle(&mut self, ctx: u32) {
        let Some(s) = self.store.data_mut().streams.get_mut(&ctx) else { return };
        if s.finished {
            return;
        }
        if let Some(spec) = s.local_reply.take() {
            s.local_sent = true;
            s.continue_req = false;
            s.continue_resp = false;
            self.local_reply(ctx, spec);
            return;
        }
        if s.reset {
            self.finish(ctx);
            return;
        }
        if s.continue_req {
            s.continue_req = false;
            if !s.req_hdrs_out {
                s.req_hdrs_out = true;
                s.fwd_headers = Some(s.req_headers.clone());
                let cluster = match &s.route {
                    Some(cached) => cached.clone(),
                    None => find(&s.req_headers, CLUSTER_HEADER).map(str::to_string),
                };
                s.cluster = cluster;
            }
            let b = std::mem::take(&mut s.req_buf);
            s.fwd_body.extend(b);
            if s.req_eos_in {
                s.req_done = true;
            }
        }
        if s.continue_resp {
            s.continue_resp = false;
            if s.resp_headers.is_some() && !s.resp_hdrs_out {
                s.resp_hdrs_out = true;
                s.client_headers = s.resp_headers.clone();
            }
            if s.resp_hdrs_out {
                let b = std::mem::take(&mut s.resp_buf);
                if !b.is_empty() {
                    s.client_chunks.push(b);
                }
                if s.resp_eos_in {
                    s.resp_done = true;
                    self.finish(ctx);
                }
            }
        }
    }

    /// Envoy fail-closed: a trap in the filter ends the stream with a 503.
    fn fail_stream(&mut self, ctx: u32) {
        let Some(s) = self.store.data_mut().streams.get_mut(&ctx) else { return };
        s.failed = true;
        s.local_sent = true;
        let spec = LocalSpec { status: 503, details: "wasm_fail_stream".into(), body: Vec::new(), headers: Vec::new() };
        let h = local_reply_headers(&spec);
        s.resp_code = Some(503);
        s.code_details = Some(spec.details.clone());
        s.resp_headers = Some(h.clone());
        s.client_headers = Some(h);
        s.client_chunks.clear();
        s.resp_done = true;
        s.finished = true;
    }

    fn local_reply(&mut self, ctx: u32, spec: LocalSpec) {
        let h = local_reply_headers(&spec);
        let s = self.stream(ctx);
        s.resp_code = Some(spec.status as i64);
        s.code_details = Some(spec.details.clone());
        s.resp_flags = 0;
        if s.upstream_responded {
            // Sent while encoding an upstream response: it replaces that response.
            s.client_headers = Some(h.clone());
            s.resp_headers = Some(h);
            s.client_chunks = if spec.body.is_empty() { vec![] } else { vec![spec.body] };
            s.resp_buf.clear();
            s.resp_done = true;
            self.finish(ctx);
            return;
        }
        // Sent while decoding: it goes through this filter's encoder path like any response.
        s.resp_headers = Some(h);
        self.encode(ctx, vec![spec.body]);
    }

    /// Runs the response through the filter's encoder callbacks.
    fn encode(&mut self, ctx: u32, chunks: Vec<Vec<u8>>) {
        let chunks: Vec<Vec<u8>> = chunks.into_iter().filter(|c| !c.is_empty()).collect();
        let eos = chunks.is_empty();
        let s = self.stream(ctx);
        s.resp_eos_in = eos;
        let n = s.resp_headers.as_ref().map_or(0, |h| h.len()) as i32;
        let f = self.ex.on_response_headers.clone();
        match self.call(f, ctx, Phase::ResponseHeaders, (ctx as i32, n, eos as i32)) {
            Err(_) => return self.fail_stream(ctx),
            Ok(a) => {
                if a.unwrap_or(0) == ACTION_CONTINUE {
                    self.stream(ctx).continue_resp = true;
                }
                self.settle_encode(ctx);
            }
        }
        let total = chunks.len();
        for (i, c) in chunks.into_iter().enumerate() {
            if self.store.data().streams.get(&ctx).is_none_or(|s| s.finished) {
                return;
            }
            let eos = i + 1 == total;
            let s = self.stream(ctx);
            s.resp_eos_in = eos;
            s.resp_buf.extend(c);
            let size = s.resp_buf.len() as i32;
            let f = self.ex.on_response_body.clone();
            match self.call(f, ctx, Phase::ResponseBody, (ctx as i32, size, eos as i32)) {
                Err(_) => return self.fail_stream(ctx),
                Ok(a) => {
                    if a.unwrap_or(0) == ACTION_CONTINUE {
                        self.stream(ctx).continue_resp = true;
                    }
                    self.settle_encode(ctx);
                }
            }
        }
    }

    fn settle_encode(&mut self, ctx: u32) {
        let Some(s) = self.store.data_mut().streams.get_mut(&ctx) else { return };
        if s.local_sent && s.local_reply.is_some() {
            // a second local reply while encoding the first one: Envoy ignores it
            s.local_reply = None;
        }
        if !s.upstream_responded {
            // encoding our own local reply: only continue / reset matter
            s.continue_req = false;
        }
        self.settle(ctx);
    }

    /// on_log, on_done, on_delete (Envoy's end of stream), once.
    fn finish(&mut self, ctx: u32) {
        let Some(s) = self.store.data_mut().streams.get_mut(&ctx) else { return };
        if s.finished {
            return;
        }
        s.finished = true;
        let f = self.ex.on_log.clone();
        let _ = self.call(f, ctx, Phase::Log, ctx as i32);
        let f = self.ex.on_done.clone();
        let _ = self.call(f, ctx, Phase::Done, ctx as i32);
        let f = self.ex.on_delete.clone();
        let _ = self.call(f, ctx, Phase::Done, ctx as i32);
    }

    fn client_response(s: &Stream) -> Response {
        let headers = s.client_headers.clone().unwrap_or_default();
        let status = find(&headers, ":status").and_then(|v| v.parse().ok()).unwrap_or(0);
        Response {
            status,
            body: s.client_chunks.concat(),
            chunks: s.client_chunks.clone(),
            headers,
            details: s.code_details.clone().unwrap_or_default(),
            complete: s.resp_done,
        }
    }

    fn outcome(&self, ctx: u32) -> Outcome {
        let Some(s) = self.store.data().streams.get(&ctx) else { return Outcome::Reset };
        if s.local_sent || s.failed {
            return Outcome::LocalReply(Self::client_response(s));
        }
        if s.reset {
            return Outcome::Reset;
        }
        if let Some(h) = &s.fwd_headers {
            return Outcome::Forwarded(Forwarded {
                headers: h.clone(),
                body: s.fwd_body.clone(),
                cluster: s.cluster.clone(),
                route_cache_clears: s.route_clears,
                complete: s.req_done,
            });
        }
        Outcome::Paused
    }

    fn exchange(&mut self, ctx: u32) -> Exchange {
        let outcome = self.outcome(ctx);
        // Streams that are over are dropped so long runs do not grow memory.
        if self.store.data().streams.get(&ctx).is_some_and(|s| s.finished) {
            self.store.data_mut().streams.remove(&ctx);
        }
        Exchange { ctx, outcome }
    }

    /// Re-reads a stream after time passed (a paused request may have moved on).
    pub fn poll(&mut self, ex: &Exchange) -> Exchange {
        self.run_due();
        if !self.store.data().streams.contains_key(&ex.ctx) {
            return ex.clone();
        }
        self.exchange(ex.ctx)
    }

    /// The upstream answers a forwarded request; returns what the client gets.
    pub fn respond(&mut self, ex: &Exchange, status: u16, headers: &[(&str, &str)], body: &[u8]) -> Response {
        let chunks: Vec<&[u8]> = if body.is_empty() { vec![] } else { vec![body] };
        self.respond_chunks(ex, status, headers, &chunks)
    }

    /// The upstream answers with a body in these chunks (e.g. SSE events).
    pub fn respond_chunks(&mut self, ex: &Exchange, status: u16, headers: &[(&str, &str)], chunks: &[&[u8]]) -> Response {
        let mut h: Headers = vec![(":status".into(), status.to_string())];
        h.extend(owned(headers));
        self.upstream(ex, h, chunks.iter().map(|c| c.to_vec()).collect(), status, "via_upstream", 0)
    }

    /// The upstream attempt fails as Envoy's router reports it (local reply 503/504 with
    /// `response.code_details` and `response.flags` set).
    pub fn respond_failure(&mut self, ex: &Exchange, failure: UpstreamFailure) -> Response {
        let (status, details, body, fl) = match failure {
            UpstreamFailure::ConnectFailure => (
                503,
                "upstream_reset_before_response_started{connection_failure}",
                "upstream connect error or disconnect/reset before headers. reset reason: connection failure",
                flags::UPSTREAM_CONNECTION_FAILURE,
            ),
            UpstreamFailure::Timeout => (504, "upstream_response_timeout", "upstream request timeout", flags::UPSTREAM_REQUEST_TIMEOUT),
        };
        let h = vec![
            (":status".to_string(), status.to_string()),
            ("content-length".to_string(), body.len().to_string()),
            ("content-type".to_string(), "text/plain".to_string()),
        ];
        self.upstream(ex, h, vec![body.as_bytes().to_vec()], status, details, fl)
    }

    fn upstream(&mut self, ex: &Exchange, headers: Headers, chunks: Vec<Vec<u8>>, status: u16, details: &str, fl: i64) -> Response {
        self.run_due();
        let ctx = ex.ctx;
        let ok = self.store.data().streams.get(&ctx).is_some_and(|s| s.fwd_headers.is_some() && !s.finished && !s.local_sent);
        if !ok {
            panic!("respond() on a request that was not forwarded (outcome: {})", describe(&self.outcome(ctx)));
        }
        let s = self.stream(ctx);
        s.upstream_responded = true;
        s.resp_headers = Some(headers);
        s.resp_code = Some(status as i64);
        s.code_details = Some(details.into());
        s.resp_flags = fl;
        self.encode(ctx, chunks);
        self.run_due();
        let r = self.store.data().streams.get(&ctx).map(Self::client_response).unwrap_or_default();
        if self.store.data().streams.get(&ctx).is_some_and(|s| s.finished) {
            self.store.data_mut().streams.remove(&ctx);
        }
        r
    }

    /// The client goes away before the stream ends: on_log / on_done / on_delete run.
    pub fn abort(&mut self, ex: &Exchange) {
        if self.store.data().streams.contains_key(&ex.ctx) {
            self.finish(ex.ctx);
            self.store.data_mut().streams.remove(&ex.ctx);
        }
    }
}

