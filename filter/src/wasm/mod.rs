//! The proxy-wasm layer, thin: the SDK's dispatcher calls these contexts, which hand every
//! decision to the plain modules (`request`, `models_fetch`) over `abi::WasmHost`.

mod abi;

use crate::attempt::Attempt;
use crate::config::{self, LogLevel};
use crate::host::{Action as Step, Host};
use crate::models_fetch::{self, Fetcher};
use crate::request::Request;
use crate::retry_contract::UPSTREAM_ROOT_ID;
use crate::runtime::Runtime;
use abi::WasmHost;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType};
use std::cell::RefCell;
use std::collections::VecDeque;
use std::rc::{Rc, Weak};
use std::time::Duration;

/// The root's tick: gauges, model lists (every second).
const TICK: Duration = Duration::from_secs(1);
/// The tick while requests wait for a key (`server.queue_timeout`): how soon a freed slot is seen.
const WAIT_TICK: Duration = Duration::from_millis(50);

thread_local! {
    /// This worker's requests waiting for a key, in arrival order (a VM is one thread).
    static WAITERS: RefCell<VecDeque<(u32, Weak<RefCell<Request>>)>> = const { RefCell::new(VecDeque::new()) };
}

const VERSION: &str = env!("CARGO_PKG_VERSION");
/// Set by `make wasm` (`git rev-parse --short HEAD`).
const GIT_HASH: Option<&str> = option_env!("AAR_GIT_HASH");

proxy_wasm::main! {{
    // Also installs the SDK's panic hook, so a trap (fail-closed) is logged with its message.
    proxy_wasm::set_log_level(proxy_wasm::types::LogLevel::Trace);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root::default()) });
}}

fn action(step: Step) -> Action {
    match step {
        Step::Continue => Action::Continue,
        Step::Pause => Action::Pause,
    }
}

#[derive(Default)]
struct Root {
    rt: Option<Rc<Runtime>>,
    fetcher: Fetcher,
    /// This root runs as the upstream filter in the credential clusters (one context per attempt).
    upstream: bool,
    /// When the once-a-second work last ran (the tick is faster while requests wait).
    last_second_ms: u64,
}

impl Context for Root {
    fn on_http_call_response(&mut self, token: u32, num_headers: usize, body_size: usize, _trailers: usize) {
        if let Some(rt) = self.rt.clone() {
            self.fetcher.on_response(&rt, &WasmHost, token, num_headers, body_size);
        }
    }
}

impl RootContext for Root {
    fn on_vm_start(&mut self, _size: usize) -> bool {
        let vm_no = models_fetch::vm_number(&WasmHost);
        abi::log(LogLevel::Info, &format!("auto-ai-router filter {VERSION} ({}) started, VM {vm_no}", GIT_HASH.unwrap_or("unknown build")));
        self.fetcher = Fetcher::new(vm_no);
        true
    }

    fn on_configure(&mut self, _size: usize) -> bool {
        let bytes = match abi::plugin_configuration() {
            Ok(b) => b,
            Err(e) => {
                abi::log(LogLevel::Error, &format!("auto-ai-router: plugin configuration unreadable (status {})", e.0));
                return false;
            }
        };
        let text = String::from_utf8_lossy(&bytes);
        let cfg = match config::load(&text, &|name| std::env::var(name).ok()) {
            Ok(cfg) => cfg,
            Err(e) => {
                abi::log(LogLevel::Error, &format!("auto-ai-router: invalid configuration: {e}"));
                return false;
            }
        };
        let root_id = WasmHost.property(&["plugin_root_id"]).ok().flatten().unwrap_or_default();
        self.upstream = root_id == UPSTREAM_ROOT_ID.as_bytes();
        let rt = Runtime::new(cfg);
        rt.set_vm(self.fetcher.vm_no);
        if self.upstream {
            rt.refresh_index(&WasmHost);
            self.rt = Some(Rc::new(rt));
            // Its tick only keeps the model index fresh (for the retry's next-key choice).
            let _ = abi::set_tick_period(Duration::from_secs(1));
            return true;
        }
        rt.log(&WasmHost, LogLevel::Info, || {
            let creds: Vec<String> =
                rt.cfg.credentials.iter().map(|c| format!("{} ({}, key {})", c.name, c.base_url, config::mask(&c.api_key))).collect();
            format!("auto-ai-router: configured {} credentials: {}", creds.len(), creds.join(", "))
        });
        rt.refresh_index(&WasmHost);
        self.rt = Some(Rc::new(rt));
        // Callouts of an earlier configuration would index this one's credentials.
        self.fetcher = Fetcher::new(self.fetcher.vm_no);
        if let Err(e) = abi::set_tick_period(Duration::from_secs(1)) {
            abi::log(
                LogLevel::Error,
                &format!("auto-ai-router: tick period refused (status {}); gauges and model lists won't refresh", e.0),
            );
        }
        true
    }

    fn on_tick(&mut self) {
        let Some(rt) = self.rt.clone() else { return };
        let now = abi::now_ms();
        if !self.upstream && wake_waiters(&rt) {
            let _ = abi::set_tick_period(TICK);
        }
        if now.saturating_sub(self.last_second_ms) + 5 < TICK.as_millis() as u64 {
            return;
        }
        self.last_second_ms = now;
        rt.refresh_index(&WasmHost);
        if self.upstream {
            return;
        }
        rt.update_gauges(&WasmHost, now);
        self.fetcher.tick(&rt, &WasmHost, now);
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        if self.upstream {
            return Some(Box::new(Upstream { rt: self.rt.clone(), attempt: Attempt::default() }));
        }
        Some(Box::new(Http { rt: self.rt.clone(), request: Rc::new(RefCell::new(Request::default())), context_id }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

/// Gives each waiting request of this worker, oldest first, another selection; drops the ones
/// that left (routed, answered, or gone). True when none waits any more.
fn wake_waiters(rt: &Runtime) -> bool {
    WAITERS.with(|w| {
        let waiting: Vec<(u32, Weak<RefCell<Request>>)> = w.borrow_mut().drain(..).collect();
        let mut still = VecDeque::new();
        for (ctx, weak) in waiting {
            let Some(req) = weak.upgrade() else { continue };
            if abi::set_effective_context(ctx).is_err() {
                continue;
            }
            let Ok(mut r) = req.try_borrow_mut() else {
                still.push_back((ctx, weak));
                continue;
            };
            if r.on_wait_tick(Some(rt), &WasmHost) {
                still.push_back((ctx, weak));
            }
        }
        let empty = still.is_empty();
        w.borrow_mut().extend(still);
        empty
    })
}

struct Http {
    /// None when the configuration was refused: the router's routes fail closed.
    rt: Option<Rc<Runtime>>,
    /// Shared with this worker's wait queue while the request waits for a key.
    request: Rc<RefCell<Request>>,
    context_id: u32,
}

impl Http {
    /// Runs one callback on the request, then queues it if it now waits for a key.
    fn with(&mut self, f: impl FnOnce(&mut Request, Option<&Runtime>) -> Step) -> Action {
        let step = f(&mut self.request.borrow_mut(), self.rt.as_deref());
        if self.request.borrow_mut().take_enqueue() {
            WAITERS.with(|w| w.borrow_mut().push_back((self.context_id, Rc::downgrade(&self.request))));
            let _ = abi::set_tick_period(WAIT_TICK);
        }
        action(step)
    }
}

impl Context for Http {
    fn on_grpc_call_response(&mut self, token_id: u32, status_code: u32, response_size: usize) {
        let _ = self.with(|r, rt| {
            r.on_grpc_reply(rt, &WasmHost, token_id, status_code, response_size);
            Step::Continue
        });
    }
}

impl HttpContext for Http {
    fn on_http_request_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        self.with(|r, rt| r.on_request_headers(rt, &WasmHost, end_of_stream))
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        self.with(|r, rt| r.on_request_body(rt, &WasmHost, body_size, end_of_stream))
    }

    fn on_http_request_trailers(&mut self, _num_trailers: usize) -> Action {
        self.with(|r, rt| r.on_request_trailers(rt, &WasmHost))
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        self.with(|r, rt| r.on_response_headers(rt, &WasmHost))
    }

    fn on_http_response_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        self.with(|r, rt| r.on_response_body(rt, &WasmHost, body_size, end_of_stream))
    }

    fn on_log(&mut self) {
        self.request.borrow_mut().on_log(self.rt.as_deref(), &WasmHost);
    }
}

/// One upstream attempt (the upstream filter in a credential's cluster).
struct Upstream {
    rt: Option<Rc<Runtime>>,
    attempt: Attempt,
}

impl Context for Upstream {
    fn on_done(&mut self) -> bool {
        self.attempt.on_done(self.rt.as_deref(), &WasmHost);
        true
    }
}

impl HttpContext for Upstream {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        action(self.attempt.on_request_headers(self.rt.as_deref(), &WasmHost))
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        action(self.attempt.on_response_headers(self.rt.as_deref(), &WasmHost))
    }
}
