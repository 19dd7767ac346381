//! A VM's life outside its streams: start, root contexts (plugins), configuration pushes, the
//! virtual-clock events (callout replies, gRPC replies, queue notifications, ticks) and the one
//! place wasm is called.
//!
//! Configuration pushes follow proxy-wasm cpp-host as Envoy uses it (`src/wasm.cc`):
//! - A plugin is keyed by `sha256(root_id || configuration || ...)`; each worker keeps one
//!   PluginHandle per key (`getOrCreateThreadLocalPlugin`). A push with the same `vm_id` and
//!   code reuses the worker's VM (`getOrCreateThreadLocalWasm`, keyed by the VM key), so memory
//!   and shared data stay; a new configuration is a new key, so `WasmBase::start` creates a
//!   **new root context** (`proxy_on_context_create(new_id, 0)`, then `proxy_on_vm_start`, as
//!   `ContextBase::onStart` does for every root) and `configure` calls `proxy_on_configure`.
//!   The same configuration again finds the existing handle: nothing is called.
//! - Before that, `WasmHandleBase::canary` runs start + configure on a throwaway clone of the
//!   VM; if `proxy_on_configure` returns false the push is rejected and the worker never sees
//!   it (the old root context keeps serving).
//! - The old root context is not touched by the push. Each stream context holds the
//!   PluginHandle it was created with (`ContextBase(wasm, parent_id, plugin_handle)`), and the
//!   old filter config holds one too. When the last holder goes, `~PluginHandleBase` calls
//!   `WasmBase::startShutdown(plugin_key)`: `proxy_on_done(old_root)`; if it returns true,
//!   `proxy_on_delete(old_root)`, else it waits in `pending_done_` until the module calls
//!   `proxy_done`. host-sim retires the old root when its last stream ends (immediately if it
//!   has none): that is ECDS's in-place update; with an LDS listener update Envoy keeps the
//!   old filter chain until its connections drain, which only delays the same calls.

use crate::state::{CallReply, GrpcReply, LogLevel};
use crate::vm::{Exports, GrpcResult, Headers, Phase, RootInfo, VmState};
use crate::{Host, Vm, VmConfig, VmError};
use wasmtime::Store;

impl Vm {
    pub(crate) fn start(host: &Host, cfg: VmConfig) -> Result<Vm, VmError> {
        let index = host.inner.next_vm.fetch_add(1, std::sync::atomic::Ordering::SeqCst) as u32;
        let mut state = VmState::new(host.inner.clone(), index, cfg.env.clone());
        state.vm_config = cfg.vm_config.clone();
        let mut store = Store::new(&host.loaded.engine, state);
        if host.loaded.fuel {
            store.set_fuel(u64::MAX / 2).map_err(|e| VmError::Load(format!("{e:?}")))?;
        }
        store.call_hook(|mut ctx, hook| {
            if matches!(hook, wasmtime::CallHook::CallingHost) {
                ctx.data_mut().stats.host_calls += 1;
            }
            Ok(())
        });
        let inst = host.loaded.pre.instantiate(&mut store).map_err(|e| VmError::Load(format!("instantiate: {e:?}")))?;
        let malloc = inst
            .get_typed_func::<i32, i32>(&mut store, "malloc")
            .or_else(|_| inst.get_typed_func::<i32, i32>(&mut store, "proxy_on_memory_allocate"))
            .ok();
        store.data_mut().malloc = malloc;
        let ex = Exports::get(&mut store, &inst);
        let mut vm = Vm { store, ex, host: host.clone(), failed: None, vm_config: cfg.clone() };
        let init = inst
            .get_typed_func::<(), ()>(&mut vm.store, "_initialize")
            .or_else(|_| inst.get_typed_func::<(), ()>(&mut vm.store, "_start"))
            .ok();
        if let Some(init) = init {
            init.call(&mut vm.store, ()).map_err(|e| VmError::Trap(format!("_initialize: {e:?}")))?;
        }
        vm.start_root(&cfg.root_id, cfg.plugin_config.clone())?;
        for (root_id, config) in &cfg.extra_roots {
            vm.start_root(root_id, config.clone())?;
        }
        Ok(vm)
    }

    /// `WasmBase::start` + `configure` for one plugin: a new root context.
    fn start_root(&mut self, root_id: &str, config: Vec<u8>) -> Result<u32, VmError> {
        let st = self.store.data_mut();
        let id = st.next_ctx();
        let n = config.len() as i32;
        st.roots.push(RootInfo { id, root_id: root_id.into(), config, retired: false, done_pending: false });
        let index = self.index();
        let logs_before = self.host.inner.logs.lock().unwrap().len();
        let r = (|| {
            let f = self.ex.on_context_create.clone();
            self.call(f, id, Phase::Create, (id as i32, 0)).map_err(VmError::Trap)?;
            let f = self.ex.on_vm_start.clone();
            let vn = self.store.data().vm_config.len() as i32;
            if self.call(f, id, Phase::VmStart, (id as i32, vn)).map_err(VmError::Trap)?.unwrap_or(1) == 0 {
                return Err(VmError::VmStartFailed);
            }
            let f = self.ex.on_configure.clone();
            if self.call(f, id, Phase::Configure, (id as i32, n)).map_err(VmError::Trap)?.unwrap_or(1) == 0 {
                let logs = self.host.inner.logs.lock().unwrap()[logs_before..].iter().filter(|l| l.vm == index).cloned().collect();
                return Err(VmError::ConfigureFailed(logs));
            }
            Ok(id)
        })();
        if r.is_err() {
            self.store.data_mut().roots.retain(|r| r.id != id);
            self.store.data_mut().ticks.remove(&id);
        }
        r
    }

    /// Pushes a configuration for `root_id` to this running VM as Envoy does on an xDS / Istio
    /// push with the same `vm_id` and code (see the module doc): the canary first (a
    /// rejected configuration is `Err` and changes nothing here), then a new root context with
    /// `proxy_on_context_create` / `proxy_on_vm_start` / `proxy_on_configure`. Streams sent
    /// afterwards run on it; the previous root context of `root_id` (if any) gets `proxy_on_done`
    /// / `proxy_on_delete` once its last stream is over. A root id the VM does not have yet
    /// adds a plugin. The same configuration again is a no-op. Returns the root context id.
    /// The canary is a VM of its own: it takes the next VM index (its logs carry it) and its
    /// `on_vm_start` / `on_configure` touch shared data, as Envoy's canary does.
    pub fn push_config(&mut self, root_id: &str, config: impl Into<Vec<u8>>) -> Result<u32, VmError> {
        let config = config.into();
        let old = self.root_context(root_id);
        if let Some(id) = old {
            if self.store.data().roots.iter().any(|r| r.id == id && r.config == config) {
                return Ok(id);
            }
        }
        let canary = VmConfig { root_id: root_id.into(), plugin_config: config.clone(), extra_roots: Vec::new(), ..self.vm_config.clone() };
        drop(Vm::start(&self.host, canary)?);
        let id = self.start_root(root_id, config)?;
        if let Some(old) = old {
            if let Some(r) = self.store.data_mut().roots.iter_mut().find(|r| r.id == old) {
                r.retired = true;
            }
            self.reap_roots();
        }
        Ok(id)
    }

    /// [`Vm::push_config`] for the VM's first root id (the router's).
    pub fn reconfigure(&mut self, config: impl Into<Vec<u8>>) -> Result<u32, VmError> {
        let root_id = self.vm_config.root_id.clone();
        self.push_config(&root_id, config)
    }

    /// The live root context id for `root_id` (the one new streams on it use).
    pub fn root_context(&self, root_id: &str) -> Option<u32> {
        self.store.data().live_root(root_id)
    }

    /// Every root context still alive: (context id, root id, retired). A retired one is waiting
    /// for its streams to end (or for `proxy_done`).
    pub fn root_contexts(&self) -> Vec<(u32, String, bool)> {
        self.store.data().roots.iter().map(|r| (r.id, r.root_id.clone(), r.retired)).collect()
    }

    /// `startShutdown` for retired roots whose streams are over.
    pub(crate) fn reap_roots(&mut self) {
        loop {
            let st = self.store.data();
            let next = st.roots.iter().find(|r| r.retired && !r.done_pending && !st.streams.values().any(|s| s.root == r.id)).map(|r| r.id);
            let Some(id) = next else { return };
            let f = self.ex.on_done.clone();
            let done = self.call(f, id, Phase::Done, id as i32).ok().flatten().unwrap_or(1) != 0;
            if done {
                self.delete_root(id);
            } else if let Some(r) = self.store.data_mut().roots.iter_mut().find(|r| r.id == id) {
                r.done_pending = true;
            }
        }
    }

    fn delete_root(&mut self, id: u32) {
        let f = self.ex.on_delete.clone();
        let _ = self.call(f, id, Phase::Done, id as i32);
        let st = self.store.data_mut();
        st.roots.retain(|r| r.id != id);
        st.ticks.remove(&id);
    }

    pub(crate) fn call<P: wasmtime::WasmParams, R: wasmtime::WasmResults>(
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
        st.stats.callbacks += 1;
        let (prev_cur, prev_eff, prev_phase) = (st.current, st.effective, st.phase);
        st.current = ctx;
        st.effective = None;
        st.phase = phase;
        let r = f.call(&mut self.store, params);
        let st = self.store.data_mut();
        st.current = prev_cur;
        st.effective = prev_eff;
        st.phase = prev_phase;
        // proxy_done from a root waiting in pending_done: onDelete after the VM call.
        let done: Vec<u32> = std::mem::take(&mut st.done_called);
        for id in done {
            if self.store.data().roots.iter().any(|r| r.id == id && r.done_pending) {
                self.delete_root(id);
            }
        }
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

    /// Fires what is due on the virtual clock: callout and gRPC replies, queue notifications,
    /// ticks.
    pub fn run_due(&mut self) {
        for _ in 0..100_000 {
            if self.failed.is_some() {
                return;
            }
            let now = self.host.inner.now_ns();
            let st = self.store.data();
            let http = st.pending.iter().enumerate().filter(|(_, p)| p.due_ns <= now).min_by_key(|(_, p)| (p.due_ns, p.token));
            let grpc = st.pending_grpc.iter().enumerate().filter(|(_, p)| p.due_ns <= now).min_by_key(|(_, p)| (p.due_ns, p.token));
            match (http.map(|(i, p)| (i, p.due_ns)), grpc.map(|(i, p)| (i, p.due_ns))) {
                (Some((i, hd)), g) if g.is_none_or(|(_, gd)| hd <= gd) => {
                    self.deliver_http(i);
                    continue;
                }
                (_, Some((i, _))) => {
                    self.deliver_grpc(i);
                    continue;
                }
                _ => {}
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
            let due = self.store.data().ticks.iter().filter(|(_, (_, d))| *d <= now).map(|(c, _)| *c).min();
            if let Some(root) = due {
                let f = self.ex.on_tick.clone();
                let _ = self.call(f, root, Phase::Tick, root as i32);
                self.settle_all();
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

    fn context_alive(&self, ctx: u32) -> (bool, bool) {
        let st = self.store.data();
        (st.streams.contains_key(&ctx), st.is_root(ctx))
    }

    fn deliver_http(&mut self, i: usize) {
        let p = self.store.data_mut().pending.remove(i);
        let (headers, body) = match p.reply {
            CallReply::Response { status, headers, body, .. } => {
                let mut h: Headers = vec![(":status".into(), status.to_string())];
                h.extend(headers.into_iter().map(|(k, v)| (k.to_ascii_lowercase(), v)));
                (h, body)
            }
            CallReply::Failure | CallReply::Timeout => (Vec::new(), Vec::new()),
        };
        let (is_stream, is_root) = self.context_alive(p.ctx);
        if !is_stream && !is_root {
            return; // its context is gone (Envoy cancels the call)
        }
        let (nh, nb) = (headers.len() as i32, body.len() as i32);
        self.store.data_mut().call_resp = Some((headers, body));
        let f = self.ex.on_http_call_response.clone();
        let r = self.call(f, p.ctx, Phase::HttpCallResponse, (p.ctx as i32, p.token as i32, nh, nb, 0));
        self.store.data_mut().call_resp = None;
        self.after_callback(p.ctx, is_stream, r.is_err());
    }

    /// Envoy's unary gRPC callbacks: success is `proxy_on_grpc_receive(token, size)` only (the
    /// message in GrpcReceiveBuffer), failure `proxy_on_grpc_close(token, status)` only.
    fn deliver_grpc(&mut self, i: usize) {
        let p = self.store.data_mut().pending_grpc.remove(i);
        let (is_stream, is_root) = self.context_alive(p.ctx);
        if !is_stream && !is_root {
            return;
        }
        let (ctx, token) = (p.ctx as i32, p.token as i32);
        let r = match p.reply {
            GrpcReply::Message { bytes, .. } => {
                let n = bytes.len() as i32;
                self.store.data_mut().grpc_result = Some(GrpcResult::Message(bytes));
                let f = self.ex.on_grpc_receive.clone();
                self.call(f, p.ctx, Phase::GrpcReceive, (ctx, token, n)).map(|_| ())
            }
            GrpcReply::Status { code, message, .. } => {
                self.store.data_mut().grpc_result = Some(GrpcResult::Status(code, message));
                let f = self.ex.on_grpc_close.clone();
                self.call(f, p.ctx, Phase::GrpcClose, (ctx, token, code as i32)).map(|_| ())
            }
            GrpcReply::Timeout => unreachable!("timeouts become status 14 when queued"),
        };
        self.store.data_mut().grpc_result = None;
        self.after_callback(p.ctx, is_stream, r.is_err());
    }

    fn after_callback(&mut self, ctx: u32, is_stream: bool, trapped: bool) {
        if is_stream {
            if trapped {
                self.fail_stream(ctx);
            } else {
                self.settle(ctx);
            }
        }
    }

    /// Runs `on_tick` now if a tick period is set (regardless of when it is due).
    pub fn tick(&mut self) {
        self.run_due();
        let mut roots: Vec<u32> = self.store.data().ticks.keys().copied().collect();
        roots.sort_unstable();
        for root in roots {
            let f = self.ex.on_tick.clone();
            let _ = self.call(f, root, Phase::Tick, root as i32);
            self.settle_all();
        }
        self.run_due();
    }

    /// Applies what a root callback asked of streams (through the effective context: a local
    /// reply, a resumed request), as Envoy does after the VM call returns.
    fn settle_all(&mut self) {
        let mut ctxs: Vec<u32> = self.store.data().streams.keys().copied().collect();
        ctxs.sort_unstable();
        for ctx in ctxs {
            self.settle(ctx);
        }
    }

    /// The tick period the first live root context asked for, in ms.
    pub fn tick_period_ms(&self) -> Option<u64> {
        let st = self.store.data();
        let mut roots: Vec<u32> = st.roots.iter().filter(|r| !r.retired).map(|r| r.id).collect();
        roots.sort_unstable();
        roots.iter().find_map(|id| st.ticks.get(id)).map(|(p, _)| *p)
    }
}
