//! proxy-wasm ABI 0.2.1 host on wasmtime (see issue "host-sim").
//!
//! A state-based test host in the style of proxy-wasm-go-sdk's `proxytest`: a [`Host`] owns a
//! virtual clock, one shared-data store, one metrics store, captured logs and scripted
//! `dispatch_http_call` / `dispatch_grpc_call` replies; [`Host::vm`] starts a VM (an Envoy
//! worker's copy of the plugin) from the compiled module, runs `_initialize` → root context →
//! `on_vm_start` → `on_configure`; [`Vm::http_request`] drives one HTTP stream through the
//! filter as Envoy does and returns what happened; [`Vm::respond`] plays the upstream side.
//!
//! ```no_run
//! use host_sim::*;
//! let host = Host::new();
//! let mut vm = host.vm("server: {master_key: sk-m}\ncredentials: []", &[]).unwrap();
//! let ex = vm.http_request(&[(":method", "GET"), (":path", "/health")], b"");
//! assert_eq!(ex.local_reply().unwrap().status, 503);
//! ```
//!
//! # Streams, plugins, reconfiguration, gRPC
//!
//! - **Any stream**: [`Vm::send`] takes a [`Request`] built with `Request::new(headers)` and
//!   `.body(..)` / `.chunks(..)` / `.trailers(..)` / `.root(root_id)` / `.property(path, v)`.
//!   `http_request`, `http_request_chunks` and `post` are shortcuts.
//! - **Request trailers**: [`Vm::http_request_trailers`] (or `Request::trailers`): every body
//!   chunk with end_of_stream=false, then `proxy_on_request_trailers`; the trailers are
//!   `HttpRequestTrailers` to the filter and [`Forwarded::trailers`] once released.
//! - **Several plugins in one VM**: [`VmConfig::plugin`] adds a root id with its own
//!   configuration (same `.wasm`, same memory and shared data); `Request::root(id)` picks the
//!   root context a stream is created on; [`Vm::root_context`] / [`Vm::root_contexts`].
//! - **Configuration pushes**: [`Vm::push_config`] / [`Vm::reconfigure`] do what Envoy does on
//!   an xDS / Istio push with the same vm_id and code (canary, new root context, the old one
//!   retired after its streams; see `lifecycle.rs`).
//! - **Upstream filters**: [`Vm::upstream_request`] runs one attempt of a forwarded request on
//!   an upstream-filter root (`xds.cluster_name` = the attempt's cluster, filter state shared
//!   with the downstream request, no `on_log`); `Request::upstream_of` builds one by hand.
//! - **Filter state**: `proxy_set_property(path)` writes `wasm.<path>`, the
//!   `set_envoy_filter_state` foreign function writes its key; `get_property(path)` reads
//!   `wasm.<path>` and `filter_state.<key>`. Snapshots in [`Forwarded::filter_state`] and
//!   [`Response::filter_state`], live in [`Vm::filter_state`];
//!   [`Host::route_by_filter_state`] routes on a key, [`Host::set_filter_state_keys`]
//!   restricts keys as Envoy's object factories do.
//! - **gRPC**: [`Host::script_grpc_call`] / [`Host::queue_grpc_call`] with a [`GrpcReply`]
//!   (message bytes, a status such as 14, or a timeout); [`Host::grpc_calls`] records service,
//!   method, metadata and message; [`Host::grpc_cancellations`].

mod abi;
mod exchange;
mod lifecycle;
mod load;
mod state;
mod stream;
mod vm;

pub use abi::{ENV_IMPORTS, WASI_IMPORTS};
pub use exchange::{Exchange, Forwarded, Outcome, Request, Response, UpstreamFailure};
pub use load::default_wasm_path;
pub use state::{CallReply, GrpcCallRecord, GrpcReply, HttpCallRecord, LogEntry, LogLevel, MetricType};
pub use stream::StreamKind;
pub use vm::{flags, FilterState, ROUTE_FILTER_STATE, WASM_STATE_PREFIX};

use load::Loaded;
use state::HostInner;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use vm::{Exports, VmState};
use wasmtime::Store;

/// Default root id of the router filter.
pub const ROUTER_ROOT_ID: &str = "auto_ai_router";

/// Virtual time starts here (2024-01-01T00:00:00Z) so the filter never sees a zero clock.
pub const START_EPOCH_MS: u64 = 1_704_067_200_000;

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
    /// The first plugin's root id and configuration (default root id `auto_ai_router`).
    pub root_id: String,
    pub plugin_config: Vec<u8>,
    /// More plugins of the same `.wasm` in this VM (e.g. an upstream filter's root id), each
    /// with its own root context and configuration, sharing the VM's memory and shared data.
    pub extra_roots: Vec<(String, Vec<u8>)>,
    pub vm_config: Vec<u8>,
    pub env: Vec<(String, String)>,
}

impl VmConfig {
    pub fn new(plugin_config: impl Into<Vec<u8>>) -> VmConfig {
        VmConfig {
            root_id: ROUTER_ROOT_ID.into(),
            plugin_config: plugin_config.into(),
            extra_roots: Vec::new(),
            vm_config: Vec::new(),
            env: Vec::new(),
        }
    }
    pub fn root_id(mut self, id: &str) -> Self {
        self.root_id = id.into();
        self
    }
    /// Adds a plugin (root context) for `root_id` with its own configuration.
    pub fn plugin(mut self, root_id: &str, config: impl Into<Vec<u8>>) -> Self {
        self.extra_roots.push((root_id.into(), config.into()));
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
        let loaded = load::load(path, fuel)?;
        Ok(Host { inner: Arc::new(HostInner::new(START_EPOCH_MS * 1_000_000)), loaded })
    }

    /// A host for a module given as bytes (compiled for this host only, not cached): for
    /// small hand-written test modules.
    pub fn from_wasm(bytes: &[u8]) -> Result<Host, String> {
        let loaded = Arc::new(load::compile(bytes, false)?);
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

    /// Filter-state keys Envoy has an object factory for: `set_envoy_filter_state` on any
    /// other key is NotFound, as in Envoy. None (the default): every key is accepted.
    pub fn set_filter_state_keys(&self, keys: Option<&[&str]>) {
        *self.inner.filter_state_keys.lock().unwrap() = keys.map(|k| k.iter().map(|s| s.to_string()).collect());
    }
    /// Route by filter state (a matcher cluster specifier on `key`): when the route is
    /// (re)computed and the request's filter state has `key`, its value is the cluster; otherwise
    /// there is none. The default is [`ROUTE_FILTER_STATE`], as the rendered bootstrap routes.
    pub fn route_by_filter_state(&self, key: Option<&str>) {
        *self.inner.route_filter_state_key.lock().unwrap() = key.map(str::to_string);
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
    /// Every unary gRPC call to `cluster` gets `reply` (unless a one-shot reply is queued).
    /// A cluster known only from [`Host::add_cluster`] or an HTTP script refuses gRPC
    /// connections (14 UNAVAILABLE); an unknown cluster is `ParseFailure`, as in Envoy.
    pub fn script_grpc_call(&self, cluster: &str, reply: GrpcReply) {
        self.inner.scripts.lock().unwrap().grpc_always.insert(cluster.into(), reply);
    }
    /// The next unary gRPC call to `cluster` gets `reply`.
    pub fn queue_grpc_call(&self, cluster: &str, reply: GrpcReply) {
        self.inner.scripts.lock().unwrap().grpc_once.entry(cluster.into()).or_default().push_back(reply);
    }
    /// Every `proxy_grpc_call` made so far.
    pub fn grpc_calls(&self) -> Vec<GrpcCallRecord> {
        self.inner.grpc_calls.lock().unwrap().clone()
    }
    /// (vm, token) of every gRPC call the filter cancelled (`proxy_grpc_cancel` / `_close`).
    pub fn grpc_cancellations(&self) -> Vec<(u32, u32)> {
        self.inner.grpc_cancels.lock().unwrap().clone()
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

    /// Starts a VM with this configuration (root contexts in order: `root_id`, then
    /// `extra_roots`).
    pub fn vm_with(&self, cfg: VmConfig) -> Result<Vm, VmError> {
        Vm::start(self, cfg)
    }
}

// ------------------------------------------------------------------------------------------
// Vm

/// One VM: an Envoy worker's copy of the plugin. Streams: `stream.rs`; start, plugins,
/// configuration pushes and timers: `lifecycle.rs`.
pub struct Vm {
    store: Store<VmState>,
    ex: Exports,
    host: Host,
    failed: Option<String>,
    /// What it was started with (a configuration push's canary is started from it).
    vm_config: VmConfig,
}

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
    /// Calls from the module into the host (proxy-wasm and WASI imports) so far on this VM.
    pub fn host_calls(&self) -> u64 {
        self.store.data().stats.host_calls
    }
    /// proxy-wasm callbacks made into the module so far on this VM (in Envoy each is a V8 entry).
    pub fn callbacks(&self) -> u64 {
        self.store.data().stats.callbacks
    }
    /// Buffers the host allocated in the module to hand it data (in Envoy each re-enters V8).
    pub fn allocations(&self) -> u64 {
        self.store.data().stats.allocations
    }
    /// `proxy_set_shared_data` calls that succeeded on this VM.
    pub fn shared_sets(&self) -> u64 {
        self.store.data().stats.shared_sets
    }
    /// The module's linear memory in bytes: its high-water mark, since wasm memory never shrinks
    /// (0 before the host first touched it).
    pub fn memory_bytes(&self) -> usize {
        self.store.data().memory.map_or(0, |m| m.data_size(&self.store))
    }
}
