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
use std::rc::Rc;
use std::time::Duration;

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
        rt.refresh_index(&WasmHost);
        if self.upstream {
            return;
        }
        let now = abi::now_ms();
        rt.update_gauges(&WasmHost, now);
        self.fetcher.tick(&rt, &WasmHost, now);
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        if self.upstream {
            return Some(Box::new(Upstream { rt: self.rt.clone(), attempt: Attempt::default() }));
        }
        Some(Box::new(Http { rt: self.rt.clone(), request: Request::default() }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Http {
    /// None when the configuration was refused: the router's routes fail closed.
    rt: Option<Rc<Runtime>>,
    request: Request,
}

impl Context for Http {
    fn on_grpc_call_response(&mut self, token_id: u32, status_code: u32, response_size: usize) {
        self.request.on_grpc_reply(self.rt.as_deref(), &WasmHost, token_id, status_code, response_size);
    }
}

impl HttpContext for Http {
    fn on_http_request_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        action(self.request.on_request_headers(self.rt.as_deref(), &WasmHost, end_of_stream))
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        action(self.request.on_request_body(self.rt.as_deref(), &WasmHost, body_size, end_of_stream))
    }

    fn on_http_request_trailers(&mut self, _num_trailers: usize) -> Action {
        action(self.request.on_request_trailers(self.rt.as_deref(), &WasmHost))
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        action(self.request.on_response_headers(self.rt.as_deref(), &WasmHost))
    }

    fn on_http_response_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        action(self.request.on_response_body(self.rt.as_deref(), &WasmHost, body_size, end_of_stream))
    }

    fn on_log(&mut self) {
        self.request.on_log(self.rt.as_deref(), &WasmHost);
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
