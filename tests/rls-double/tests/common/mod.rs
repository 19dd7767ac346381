//! Test helpers: Redis and `rls-double` processes come from the e2e harness (`e2e::global`: a real
//! `redis-server` on a free loopback port, no persistence; both killed on drop); here a gRPC
//! client and request builders.
#![allow(dead_code)]

use envoy_types::pb::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::{Entry, RateLimitOverride};
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::rate_limit::Unit;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient;
use envoy_types::pb::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use envoy_types::pb::google::protobuf::UInt64Value;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tonic::transport::Channel;

pub use e2e::global::Redis;
use e2e::global::RlsDouble;

/// A connection to the test Redis, to read the keys the double wrote.
pub fn conn(redis: &Redis) -> redis::Connection {
    redis::Client::open(redis.url()).and_then(|c| c.get_connection()).expect("connect to the test Redis")
}

/// One `rls-double` process (the e2e harness's, from this package's build), with a gRPC client.
pub struct Double(RlsDouble);

impl Double {
    pub fn start(redis: &Redis, extra: &[&str]) -> Double {
        Double(RlsDouble::start_with(redis, extra))
    }

    pub async fn client(&self) -> RateLimitServiceClient<Channel> {
        RateLimitServiceClient::connect(format!("http://{}", self.0.addr())).await.expect("connect to rls-double")
    }

    pub fn stats(&self) -> serde_json::Value {
        self.0.stats_json()
    }

    pub fn set_delay(&self, d: Duration) {
        self.0.set_delay(d)
    }
}

pub fn now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() as i64
}

/// Sleeps past the next `divider` boundary when fewer than `need` seconds are left in the
/// current window, so a test's calls all land in one window.
pub fn ensure_window_room(divider: i64, need: i64) {
    let left = divider - now() % divider;
    if left < need {
        std::thread::sleep(Duration::from_millis(left as u64 * 1000 + 100));
    }
}

pub fn desc(entries: &[(&str, &str)], limit: Option<(u32, Unit)>, hits: Option<u64>) -> RateLimitDescriptor {
    RateLimitDescriptor {
        entries: entries.iter().map(|(k, v)| Entry { key: k.to_string(), value: v.to_string() }).collect(),
        limit: limit.map(|(n, u)| RateLimitOverride { requests_per_unit: n, unit: u as i32 }),
        hits_addend: hits.map(|value| UInt64Value { value }),
        ..Default::default()
    }
}

pub fn req(domain: &str, descriptors: Vec<RateLimitDescriptor>, hits_addend: u32) -> RateLimitRequest {
    RateLimitRequest { domain: domain.into(), descriptors, hits_addend }
}

pub async fn call(c: &mut RateLimitServiceClient<Channel>, r: RateLimitRequest) -> RateLimitResponse {
    c.should_rate_limit(r).await.expect("ShouldRateLimit").into_inner()
}
