//! Auto AI Router filter. Decision logic is plain Rust (tested natively); `glue` is the thin
//! proxy-wasm layer compiled only for wasm32.

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
pub mod metrics;
pub mod models_index;
pub mod rate_window;
pub mod store;

#[cfg(target_arch = "wasm32")]
mod glue;
