//! Unary gRPC over HTTP/2 (cleartext), as much of the protocol
//! (grpc/grpc `doc/PROTOCOL-HTTP2.md`) as one unary method needs: a request body of one
//! length-prefixed message (1 byte compressed flag, 4 bytes big-endian length), an answer of
//! one such message followed by the trailer `grpc-status: 0`, and errors as a Trailers-Only
//! response (`grpc-status`, percent-encoded `grpc-message` in the headers, no body).

use bytes::{BufMut, Bytes, BytesMut};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper::header::{HeaderMap, HeaderValue, CONTENT_TYPE};
use hyper::{Response, StatusCode};
use std::convert::Infallible;

/// gRPC status codes used here.
pub const OK: u32 = 0;
pub const UNKNOWN: u32 = 2;
pub const INVALID_ARGUMENT: u32 = 3;
pub const UNIMPLEMENTED: u32 = 12;
pub const INTERNAL: u32 = 13;

/// A gRPC error: a status code and its message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    pub code: u32,
    pub message: String,
}

impl Status {
    pub fn new(code: u32, message: impl Into<String>) -> Status {
        Status { code, message: message.into() }
    }
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "grpc-status {}: {}", self.code, self.message)
    }
}

/// One length-prefixed, uncompressed message.
pub fn frame(message: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(5 + message.len());
    b.put_u8(0);
    b.put_u32(message.len() as u32);
    b.put_slice(message);
    b.freeze()
}

/// The one message of a unary body.
pub fn unframe(body: &[u8]) -> Result<&[u8], Status> {
    let Some((head, rest)) = body.split_first_chunk::<5>() else {
        return Err(Status::new(INTERNAL, format!("a gRPC message needs a 5-byte prefix, got {} bytes", body.len())));
    };
    if head[0] != 0 {
        return Err(Status::new(UNIMPLEMENTED, "compressed messages are not supported (no grpc-encoding)"));
    }
    let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
    if rest.len() != len {
        return Err(Status::new(INTERNAL, format!("a unary body holds one message: prefix says {len} bytes, body has {}", rest.len())));
    }
    Ok(rest)
}

/// `grpc-message` encoding: bytes outside printable ASCII, and `%`, as `%XX`.
pub fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for &b in s.as_bytes() {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

pub fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = b.get(i + 1..i + 3).and_then(|h| std::str::from_utf8(h).ok()).and_then(|h| u8::from_str_radix(h, 16).ok());
        match (b[i], hex) {
            (b'%', Some(v)) => {
                out.push(v);
                i += 3;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The status a response carries, from its trailers or (Trailers-Only) its headers.
pub fn status_of(headers: &HeaderMap) -> Option<Status> {
    let code = headers.get("grpc-status")?.to_str().ok()?.parse().ok()?;
    let message = headers.get("grpc-message").and_then(|v| v.to_str().ok()).map(percent_decode).unwrap_or_default();
    Some(Status { code, message })
}

pub type Body = BoxBody<Bytes, Infallible>;

fn grpc_response(body: Body) -> Response<Body> {
    let mut r = Response::new(body);
    *r.status_mut() = StatusCode::OK;
    r.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    r
}

/// The answer to a unary call: the message, then `grpc-status: 0` in the trailers.
pub fn reply(message: &[u8]) -> Response<Body> {
    let mut trailers = HeaderMap::new();
    trailers.insert("grpc-status", HeaderValue::from(OK));
    grpc_response(Full::new(frame(message)).with_trailers(std::future::ready(Some(Ok(trailers)))).boxed())
}

/// A failed call, Trailers-Only: the status in the headers and no body.
pub fn error(status: &Status) -> Response<Body> {
    let mut r = grpc_response(Empty::new().boxed());
    r.headers_mut().insert("grpc-status", HeaderValue::from(status.code));
    if let Ok(v) = HeaderValue::from_str(&percent_encode(&status.message)) {
        r.headers_mut().insert("grpc-message", v);
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_bad_bodies_are_errors() {
        let f = frame(b"abc");
        assert_eq!(&f[..], &[0, 0, 0, 0, 3, b'a', b'b', b'c']);
        assert_eq!(unframe(&f), Ok(&b"abc"[..]));
        assert_eq!(unframe(&frame(b"")), Ok(&b""[..]));
        assert_eq!(unframe(&[0, 0, 0]).unwrap_err().code, INTERNAL);
        assert_eq!(unframe(&[0, 0, 0, 0, 4, 1]).unwrap_err().code, INTERNAL);
        assert_eq!(unframe(&[1, 0, 0, 0, 0]).unwrap_err().code, UNIMPLEMENTED);
    }

    #[test]
    fn messages_are_percent_encoded() {
        let m = "redis: 100% gone\nü";
        let e = percent_encode(m);
        assert_eq!(e, "redis: 100%25 gone%0A%C3%BC");
        assert_eq!(percent_decode(&e), m);
        assert_eq!(percent_decode("50%"), "50%");
    }

    #[test]
    fn errors_are_trailers_only_and_answers_end_with_status_ok() {
        let r = error(&Status::new(UNKNOWN, "rate limit domain must not be empty"));
        assert_eq!(status_of(r.headers()), Some(Status::new(UNKNOWN, "rate limit domain must not be empty")));
        assert_eq!(r.headers()[CONTENT_TYPE], "application/grpc");
        assert!(hyper::body::Body::is_end_stream(r.body()));
        let r = reply(b"xy");
        assert_eq!(status_of(r.headers()), None, "the status of an answer is in its trailers");
        assert!(!hyper::body::Body::is_end_stream(r.body()));
    }
}
