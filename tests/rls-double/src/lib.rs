//! TEST FIXTURE standing in for envoyproxy/ratelimit (Redis backend): its fixed-window algorithm
//! copied from upstream `src/redis/fixed_cache_impl.go`, `src/limiter/base_limiter.go`,
//! `src/limiter/cache_key.go`, `src/utils/utilities.go` and `src/service/ratelimit.go`, served as
//! `envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit`. Not for production: run
//! envoyproxy/ratelimit there (envoy/README.md).

pub mod algorithm;
pub mod grpc;
pub mod limiter;
pub mod proto;
pub mod service;
pub mod stats;
