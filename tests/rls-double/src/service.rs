//! The gRPC side: `envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit` over the
//! limiter, with the counters and the delay the stats port exposes, served over HTTP/2 by
//! [`serve`].

use crate::grpc::{self, Status};
use crate::limiter::{self, Settings};
use crate::proto::{Code, RateLimitRequest, RateLimitResponse, SHOULD_RATE_LIMIT_PATH};
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use prost::Message;
use redis::aio::MultiplexedConnection;
use serde::Serialize;
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;

/// gRPC's default largest message a server accepts.
const MAX_BODY: usize = 4 << 20;

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

impl Service {
    /// One `ShouldRateLimit` (the counters count it on arrival, before the delay).
    pub async fn should_rate_limit(&self, req: &RateLimitRequest) -> Result<RateLimitResponse, Status> {
        let c = &self.counters;
        c.calls.fetch_add(1, Ordering::SeqCst);
        c.hits.fetch_add(u64::from(req.hits_addend).max(1), Ordering::SeqCst);
        let dh = crate::algorithm::hits_addends(req).iter().fold(0u64, |a, h| a.saturating_add(*h));
        c.descriptor_hits.fetch_add(dh, Ordering::SeqCst);
        let delay = c.delay_ms.load(Ordering::SeqCst);
        if delay > 0 {
            tokio::time::sleep(Duration::from_millis(delay)).await;
        }
        let mut conn = self.conn.clone();
        match limiter::should_rate_limit(&mut conn, &self.settings, req).await {
            Ok(resp) => {
                let counter = if resp.overall_code == Code::OverLimit as i32 { &c.over_limit } else { &c.ok };
                counter.fetch_add(1, Ordering::SeqCst);
                Ok(resp)
            }
            Err(e) => {
                c.errors.fetch_add(1, Ordering::SeqCst);
                // Go's plain errors reach the client as UNKNOWN.
                Err(Status::new(grpc::UNKNOWN, e.to_string()))
            }
        }
    }
}

async fn handle(req: Request<Incoming>, svc: Arc<Service>) -> Result<Response<grpc::Body>, Infallible> {
    let grpc_type =
        req.headers().get(hyper::header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).is_some_and(|v| v.starts_with("application/grpc"));
    if !grpc_type {
        let mut r = Response::new(Full::new(Bytes::from_static(b"gRPC only: content-type application/grpc")).boxed());
        *r.status_mut() = StatusCode::UNSUPPORTED_MEDIA_TYPE;
        return Ok(r);
    }
    if req.method() != Method::POST || req.uri().path() != SHOULD_RATE_LIMIT_PATH {
        return Ok(grpc::error(&Status::new(grpc::UNIMPLEMENTED, format!("unknown method {}", req.uri().path()))));
    }
    let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => return Ok(grpc::error(&Status::new(grpc::INTERNAL, format!("reading the request: {e}")))),
    };
    let decoded = grpc::unframe(&body)
        .and_then(|m| RateLimitRequest::decode(m).map_err(|e| Status::new(grpc::INTERNAL, format!("decoding RateLimitRequest: {e}"))));
    let answer = match decoded {
        Ok(req) => svc.should_rate_limit(&req).await,
        Err(s) => Err(s),
    };
    Ok(match answer {
        Ok(resp) => grpc::reply(&resp.encode_to_vec()),
        Err(s) => grpc::error(&s),
    })
}

/// Serves gRPC (HTTP/2 cleartext, prior knowledge, as Envoy's gRPC clients speak it) until the
/// process ends.
pub async fn serve(listener: TcpListener, svc: Arc<Service>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else { continue };
        let _ = stream.set_nodelay(true);
        let svc = svc.clone();
        tokio::spawn(async move {
            let handler = hyper::service::service_fn(move |req| handle(req, svc.clone()));
            let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new()).serve_connection(TokioIo::new(stream), handler).await;
        });
    }
}
