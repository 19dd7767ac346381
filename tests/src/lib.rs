//! End-to-end harness and the mock OpenAI provider.

pub mod mock;
