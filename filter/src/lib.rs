//! Auto AI Router filter. Decision logic is plain Rust (tested natively); `glue` is the thin
//! proxy-wasm layer compiled only for wasm32.

pub mod config;
