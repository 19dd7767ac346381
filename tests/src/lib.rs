//! End-to-end harness and the mock OpenAI provider.

pub mod codings;
pub mod http;
pub mod mock;

/// Starting a real Envoy in front of mocks (feature `e2e`; see mk/e2e.mk).
#[cfg(feature = "e2e")]
pub mod harness;

/// Redis and the rate-limit service double for the multi-replica suite (feature `e2e`).
#[cfg(feature = "e2e")]
pub mod global;

/// A stand-in for istiod applying our EnvoyFilter patches to a gateway-shaped bootstrap.
#[cfg(feature = "e2e")]
pub mod istio;
