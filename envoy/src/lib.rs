//! The `auto-ai-router` CLI as a library: load and validate a seed-format `config.yaml` (with the
//! filter crate's own validation), render a complete Envoy v3 bootstrap, find and run Envoy, and
//! sync `models.yaml` with the providers' model lists.

pub mod locate;
pub mod prepare;
pub mod private;
pub mod render;
pub mod run;
pub mod sync;

/// The filter crate, whose configuration types the prepared config is made of.
pub use filter;
