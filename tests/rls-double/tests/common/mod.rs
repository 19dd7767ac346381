//! Test helpers: Redis and `rls-double` processes come from the e2e harness (`e2e::global`: a real
//! `redis-server` on a free loopback port, no persistence; both killed on drop); here a gRPC
//! client (unary calls over one HTTP/2 connection) and request builders.
#![allow(dead_code)]

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http2::SendRequest;
use hyper::header::{HeaderValue, CONTENT_TYPE, TE};
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use prost::Message;
use rls_double::grpc::{self, Status};
use rls_double::proto::{
    Entry, RateLimitDescriptor, RateLimitOverride, RateLimitRequest, RateLimitResponse, UInt64Value, Unit, SHOULD_RATE_LIMIT_PATH,
};
use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

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

    pub async fn client(&self) -> Client {
        Client::connect(self.0.addr()).await
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
    }
}

pub fn req(domain: &str, descriptors: Vec<RateLimitDescriptor>, hits_addend: u32) -> RateLimitRequest {
    RateLimitRequest { domain: domain.into(), descriptors, hits_addend }
}

pub async fn call(c: &mut Client, r: RateLimitRequest) -> RateLimitResponse {
    c.should_rate_limit(&r).await.expect("ShouldRateLimit")
}

/// A gRPC client: HTTP/2 with prior knowledge, as Envoy's gRPC client connects.
#[derive(Clone)]
pub struct Client {
    addr: SocketAddr,
    send: SendRequest<Full<Bytes>>,
}

impl Client {
    pub async fn connect(addr: SocketAddr) -> Client {
        let stream = tokio::net::TcpStream::connect(addr).await.expect("connect to rls-double");
        let (send, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream)).await.expect("HTTP/2 handshake");
        tokio::spawn(conn);
        Client { addr, send }
    }

    /// One request as sent (for the tests of bad requests).
    pub async fn send(&mut self, path: &str, content_type: &str, body: Bytes) -> Response<hyper::body::Incoming> {
        let req = Request::post(format!("http://{}{path}", self.addr))
            .header(CONTENT_TYPE, HeaderValue::from_str(content_type).unwrap())
            .header(TE, "trailers")
            .body(Full::new(body))
            .unwrap();
        self.send.send_request(req).await.expect("HTTP/2 request")
    }

    /// A unary call; Err is the status of a failed call.
    pub async fn unary(&mut self, path: &str, message: &[u8]) -> Result<Bytes, Status> {
        let resp = self.send(path, "application/grpc", grpc::frame(message)).await;
        assert_eq!(resp.status(), 200, "gRPC answers are HTTP 200");
        assert_eq!(resp.headers()[CONTENT_TYPE], "application/grpc");
        if let Some(s) = grpc::status_of(resp.headers()) {
            // Trailers-Only: the call failed (an OK status always comes with a message).
            assert_ne!(s.code, grpc::OK, "Trailers-Only with OK");
            return Err(s);
        }
        let body = resp.into_body().collect().await.expect("response body");
        let status = body.trailers().and_then(grpc::status_of).expect("grpc-status trailer");
        let bytes = body.to_bytes();
        if status.code != grpc::OK {
            return Err(status);
        }
        Ok(Bytes::copy_from_slice(grpc::unframe(&bytes).expect("one message")))
    }

    pub async fn should_rate_limit(&mut self, r: &RateLimitRequest) -> Result<RateLimitResponse, Status> {
        let bytes = self.unary(SHOULD_RATE_LIMIT_PATH, &r.encode_to_vec()).await?;
        Ok(RateLimitResponse::decode(bytes).expect("a RateLimitResponse"))
    }
}
