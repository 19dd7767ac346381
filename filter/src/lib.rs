//! Auto AI Router filter. Decision logic and the request flows are plain Rust over the `host`
//! trait (tested natively with `testing::MemHost`); `wasm` is the thin proxy-wasm layer compiled
//! only for wasm32.
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used, clippy::panic))]

/// The request header the Envoy route's `cluster_header` reads: the filter sets it to the chosen
/// credential's cluster; client-sent copies are removed.
pub const CLUSTER_HEADER: &str = "x-auto-ai-router-cluster";

pub mod auth;
pub mod balancer;
pub mod body;
pub mod body_scan;
pub mod config;
pub mod endpoints;
pub mod errors;
pub mod fail2ban;
pub mod host;
pub mod metrics;
pub mod models_fetch;
pub mod models_index;
pub mod rate_window;
pub mod request;
pub mod runtime;
pub mod store;
pub mod testing;
pub mod upstream_status;

#[cfg(target_arch = "wasm32")]
mod wasm;
