//! The gRPC side: `envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit` over the
//! limiter, with the counters and the delay the stats port exposes.

use crate::limiter::{self, Settings};
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::Code;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_server::RateLimitService;
use envoy_types::pb::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use redis::aio::MultiplexedConnection;
use serde::Serialize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tonic::{Request, Response, Status};

/// What the double has served, for `GET /stats`.
#[derive(Debug, Default)]
pub struct Counters {
    /// ShouldRateLimit calls received (counted on arrival, before any delay).
    pub calls: AtomicU64,
    /// Sum of each call's request-level hits (`hits_addend`, 0 counted as 1).
    pub hits: AtomicU64,
    /// Sum over every descriptor of its effective hits (per-descriptor `hits_addend` first).
    pub descriptor_hits: AtomicU64,
    pub ok: AtomicU64,
    pub over_limit: AtomicU64,
    /// Calls answered with a gRPC error (invalid request, Redis failure).
    pub errors: AtomicU64,
    /// Every call sleeps this long before it is handled (`POST /control {"delay_ms":N}`).
    pub delay_ms: AtomicU64,
}

#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct Snapshot {
    pub calls: u64,
    pub hits: u64,
    pub descriptor_hits: u64,
    pub ok: u64,
    pub over_limit: u64,
    pub errors: u64,
    pub delay_ms: u64,
}

impl Counters {
    pub fn snapshot(&self) -> Snapshot {
        let g = |a: &AtomicU64| a.load(Ordering::SeqCst);
        Snapshot {
            calls: g(&self.calls),
            hits: g(&self.hits),
            descriptor_hits: g(&self.descriptor_hits),
            ok: g(&self.ok),
            over_limit: g(&self.over_limit),
            errors: g(&self.errors),
            delay_ms: g(&self.delay_ms),
        }
    }
}

pub struct Service {
    pub conn: MultiplexedConnection,
    pub settings: Settings,
    pub counters: Arc<Counters>,
}

#[tonic::async_trait]
impl RateLimitService for Service {
    async fn should_rate_limit(&self, request: Request<RateLimitRequest>) -> Result<Response<RateLimitResponse>, Status> {
        let req = request.into_inner();
        let c = &self.counters;
        c.calls.fetch_add(1, Ordering::SeqCst);
        c.hits.fetch_add(u64::from(req.hits_addend).max(1), Ordering::SeqCst);
        let dh = crate::algorithm::hits_addends(&req).iter().fold(0u64, |a, h| a.saturating_add(*h));
        c.descriptor_hits.fetch_add(dh, Ordering::SeqCst);
        let delay = c.delay_ms.load(Ordering::SeqCst);
        if delay > 0 {
            tokio::time::sleep(Duration::from_millis(delay)).await;
        }
        let mut conn = self.conn.clone();
        match limiter::should_rate_limit(&mut conn, &self.settings, &req).await {
            Ok(resp) => {
                let counter = if resp.overall_code == Code::OverLimit as i32 { &c.over_limit } else { &c.ok };
                counter.fetch_add(1, Ordering::SeqCst);
                Ok(Response::new(resp))
            }
            Err(e) => {
                c.errors.fetch_add(1, Ordering::SeqCst);
                Err(Status::unknown(e.to_string()))
            }
        }
    }
}
