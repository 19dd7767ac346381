//! Auto AI Router filter. Decision logic and the request flows are plain Rust over the `host`
//! trait (tested natively with `testing::MemHost`); `wasm` is the thin proxy-wasm layer compiled
//! only for wasm32.
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used, clippy::panic))]

/// Routing and retries on another credential: the contract between the filter and the rendered
/// bootstrap.
pub mod retry_contract {
    /// Root id of the same `.wasm` running as an upstream HTTP filter in every credential cluster.
    pub const UPSTREAM_ROOT_ID: &str = "auto_ai_router_upstream";
    /// `set_property` path of the credential the next attempt goes to; Envoy keeps it as filter
    /// state under [`NEXT_FILTER_STATE`], which the routed route matches on and its matcher
    /// cluster specifier reads (with retries, `refresh_cluster_on_retry`: on every attempt).
    pub const NEXT_PROPERTY: &str = "auto_ai_router_next";
    pub const NEXT_FILTER_STATE: &str = "wasm.auto_ai_router_next";
    /// The value written when no credential is left: matches no cluster (Envoy answers 503).
    pub const NO_CREDENTIAL: &str = "-";
    /// `set_property` path of the request's plan (client path, model, credentials tried).
    pub const PLAN_PROPERTY: &str = "auto_ai_router_plan";
    /// Response header the upstream filter sets on a failed attempt it wants retried; the route
    /// retries on it (`retriable_headers`) and removes it before the client.
    pub const RETRY_HEADER: &str = "x-auto-ai-router-retry";
    /// Response header telling the client how many attempts the answer took.
    pub const ATTEMPTS_HEADER: &str = "x-auto-ai-router-attempts";
}

pub mod attempt;
pub mod auth;
pub mod balancer;
pub mod body;
pub mod body_scan;
pub mod concurrency;
pub mod config;
pub mod content_encoding;
pub mod cooldown;
pub mod endpoints;
pub mod errors;
pub mod fail2ban;
pub mod global;
pub mod host;
pub mod metrics;
pub mod models_fetch;
pub mod models_index;
pub mod rate_window;
pub mod request;
pub mod rls;
pub mod runtime;
pub mod store;
pub mod testing;
pub mod upstream_status;
pub mod usage;

#[cfg(target_arch = "wasm32")]
mod wasm;
