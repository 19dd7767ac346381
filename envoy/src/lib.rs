//! The `auto-ai-router` CLI as a library: load and validate a seed-format `config.yaml` (with the
//! filter crate's own validation), render a complete Envoy v3 bootstrap, find and run Envoy.

pub mod locate;
pub mod prepare;
pub mod render;
pub mod run;
