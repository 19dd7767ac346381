//! `make bench`'s floor: the least a pause-and-route proxy-wasm filter can do in Envoy, to measure
//! the router against (issue 13). Not the router, and not for production.
//!
//! On the request headers of a `POST /v1/...` it pauses (unless the request has no body); at the
//! end of the body it writes one fixed credential into the filter state the rendered bootstrap
//! routes on ([`NEXT_PROPERTY`], as the router does), overwrites `authorization` with that
//! cluster's bearer (and `:authority` when configured), clears the route cache and continues.
//! Nothing else: no body parse, no credential selection, no shared data, no metrics, no response
//! side. Per request that is 2 header reads, 1 or 2 header writes, 1 property write and 1 foreign
//! call (`clear_route_cache`).
//!
//! Plugin configuration (JSON, written by bench/bench.py):
//! `{"cluster": "bench_a", "authorization": "Bearer sk-...", "authority": "127.0.0.1:PORT"}`
//! (`authority` may be empty: then `:authority` is left as the client sent it; the router's
//! bootstrap sets the provider's per attempt with `auto_host_rewrite`).

/// The property the router writes for the bootstrap's routed route (the same name as
/// `filter::retry_contract::NEXT_PROPERTY`; a native test checks it).
pub const NEXT_PROPERTY: &str = "auto_ai_router_next";

/// The floor's plugin configuration.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Config {
    /// The credential (cluster) name written to [`NEXT_PROPERTY`].
    pub cluster: String,
    /// Value for `authorization` (`Bearer <key>`).
    pub authorization: String,
    /// Value for `:authority`; empty leaves it alone.
    pub authority: String,
}

impl Config {
    pub fn parse(bytes: &[u8]) -> Result<Config, String> {
        let v: serde_json::Value = serde_json::from_slice(bytes).map_err(|e| format!("bench-floor configuration: {e}"))?;
        let field = |name: &str, required: bool| match v.get(name) {
            Some(serde_json::Value::String(s)) if !(required && s.is_empty()) => Ok(s.clone()),
            None if !required => Ok(String::new()),
            _ => Err(format!("bench-floor configuration: `{name}` must be a{} string", if required { " non-empty" } else { "" })),
        };
        Ok(Config { cluster: field("cluster", true)?, authorization: field("authorization", true)?, authority: field("authority", false)? })
    }
}

/// Requests the floor routes: `POST /v1/...` (what the router routes by body; the bench sends
/// only `POST /v1/chat/completions`).
pub fn routes(method: &[u8], path: &[u8]) -> bool {
    method == b"POST" && path.starts_with(b"/v1/")
}

#[cfg(target_arch = "wasm32")]
mod wasm {
    use super::{routes, Config, NEXT_PROPERTY};
    use proxy_wasm::traits::{Context, HttpContext, RootContext};
    use proxy_wasm::types::{Action, ContextType, LogLevel};
    use std::rc::Rc;

    proxy_wasm::main! {{
        proxy_wasm::set_log_level(LogLevel::Warn);
        proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root::default()) });
    }}

    #[derive(Default)]
    struct Root {
        cfg: Rc<Config>,
    }

    impl Context for Root {}

    impl RootContext for Root {
        fn on_configure(&mut self, _size: usize) -> bool {
            match Config::parse(&self.get_plugin_configuration().unwrap_or_default()) {
                Ok(cfg) => {
                    self.cfg = Rc::new(cfg);
                    true
                }
                Err(e) => {
                    // Envoy rejects the filter configuration: the bench fails at start, not later.
                    let _ = proxy_wasm::hostcalls::log(LogLevel::Error, &e);
                    false
                }
            }
        }

        fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
            Some(Box::new(Floor { cfg: Rc::clone(&self.cfg), routing: false }))
        }

        fn get_type(&self) -> Option<ContextType> {
            Some(ContextType::HttpContext)
        }
    }

    struct Floor {
        cfg: Rc<Config>,
        /// A `POST /v1/...` whose body is still coming.
        routing: bool,
    }

    impl Floor {
        fn route(&self) {
            let c = &self.cfg;
            self.set_property(vec![NEXT_PROPERTY], Some(c.cluster.as_bytes()));
            self.set_http_request_header("authorization", Some(&c.authorization));
            if !c.authority.is_empty() {
                self.set_http_request_header(":authority", Some(&c.authority));
            }
            // Envoy re-matches the route, now on the filter state (as the router does).
            let _ = proxy_wasm::hostcalls::call_foreign_function("clear_route_cache", None);
        }
    }

    impl Context for Floor {}

    impl HttpContext for Floor {
        fn on_http_request_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
            let method = self.get_http_request_header_bytes(":method").unwrap_or_default();
            let path = self.get_http_request_header_bytes(":path").unwrap_or_default();
            if !routes(&method, &path) {
                return Action::Continue;
            }
            if end_of_stream {
                self.route();
                return Action::Continue;
            }
            self.routing = true;
            Action::Pause
        }

        fn on_http_request_body(&mut self, _body_size: usize, end_of_stream: bool) -> Action {
            if !self.routing {
                return Action::Continue;
            }
            if !end_of_stream {
                // Envoy buffers the body until its end, as for the router.
                return Action::Pause;
            }
            self.routing = false;
            self.route();
            Action::Continue
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_routing_property_is_the_routers() {
        assert_eq!(NEXT_PROPERTY, filter::retry_contract::NEXT_PROPERTY);
    }

    #[test]
    fn parses_the_bench_configuration() {
        let c = Config::parse(br#"{"cluster":"bench_a","authorization":"Bearer sk-a","authority":"127.0.0.1:1"}"#);
        assert_eq!(c, Ok(Config { cluster: "bench_a".into(), authorization: "Bearer sk-a".into(), authority: "127.0.0.1:1".into() }));
        let c = Config::parse(br#"{"cluster":"bench_a","authorization":"Bearer sk-a"}"#);
        assert_eq!(c.map(|c| c.authority), Ok(String::new()));
    }

    #[test]
    fn rejects_bad_configurations() {
        for bad in
            [&b""[..], b"[]", br#"{"cluster":"","authorization":"x"}"#, br#"{"cluster":"a"}"#, br#"{"cluster":"a","authorization":1}"#]
        {
            assert!(Config::parse(bad).is_err(), "{}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn routes_post_v1_only() {
        assert!(routes(b"POST", b"/v1/chat/completions"));
        assert!(!routes(b"GET", b"/v1/models"));
        assert!(!routes(b"POST", b"/health"));
        assert!(!routes(b"POST", b"/v1"));
    }
}
