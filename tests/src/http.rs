//! A deliberately small HTTP/1.1 client over `std::net::TcpStream` for the end-to-end suite.
//!
//! Raw on purpose: hostile-request tests need bytes no well-behaved client would send (two
//! `authorization` headers, un-normalised `..` paths, 10 000 headers, chunked uploads with pauses),
//! and the streaming test needs the arrival time of every read. Every request carries
//! `Connection: close`, so a response ends at EOF; `Content-Length` and chunked bodies are decoded.

use serde_json::Value;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

/// Body reads with the time each arrived (since the request was sent).
pub type TimedReads = Vec<(Duration, Vec<u8>)>;

/// Default read/write timeout per request (a generous bound; tests never wait this long normally).
pub const IO_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    /// Header names in lower case, in arrival order.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// Time from the first byte written to the end of the response.
    pub elapsed: Duration,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers.iter().find(|(k, _)| *k == name).map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("response {} is not JSON ({e}): {:?}", self.status, self.text()))
    }

    /// The body decoded as its `Content-Encoding` says, as an HTTP client would (panics when it
    /// does not decode: the client could not read it either).
    pub fn decoded(&self) -> Vec<u8> {
        match crate::codings::Coding::parse(self.header("content-encoding")) {
            Ok(None) => self.body.clone(),
            Ok(Some(c)) => crate::codings::decode(c, &self.body).unwrap_or_else(|e| panic!("response {}: {e}", self.status)),
            Err(e) => panic!("response {}: {e}", self.status),
        }
    }

    /// `error.code` of an OpenAI-style error body (None when absent or not JSON).
    pub fn error_code(&self) -> Option<String> {
        let v: Value = serde_json::from_slice(&self.body).ok()?;
        v.pointer("/error/code").and_then(Value::as_str).map(str::to_string)
    }

    pub fn error_type(&self) -> Option<String> {
        let v: Value = serde_json::from_slice(&self.body).ok()?;
        v.pointer("/error/type").and_then(Value::as_str).map(str::to_string)
    }

    /// Short description for assertion messages.
    pub fn describe(&self) -> String {
        let body = self.text();
        let body: String = body.chars().take(400).collect();
        format!("{} {:?} {body}", self.status, self.header("content-type"))
    }
}

/// A request to build and send. Headers are sent exactly as given (order, case, duplicates).
#[derive(Debug, Clone)]
pub struct Request {
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: Option<Vec<u8>>,
    /// Add `Content-Length` for the body (default true; false with `chunked`).
    pub content_length: bool,
    /// Send the body with `Transfer-Encoding: chunked` in these pieces, pausing between them.
    pub chunked: Option<(Vec<Vec<u8>>, Duration)>,
    /// The `Host` header (default: the address the request is sent to).
    pub host: Option<String>,
}

impl Request {
    pub fn new(method: &str, path: &str) -> Request {
        Request {
            method: method.into(),
            path: path.into(),
            headers: Vec::new(),
            body: None,
            content_length: true,
            chunked: None,
            host: None,
        }
    }
    pub fn get(path: &str) -> Request {
        Request::new("GET", path)
    }
    pub fn post(path: &str) -> Request {
        Request::new("POST", path)
    }
    pub fn header(mut self, k: &str, v: &str) -> Request {
        self.headers.push((k.into(), v.into()));
        self
    }
    /// Sends `Host: host` instead of the address.
    pub fn host(mut self, host: &str) -> Request {
        self.host = Some(host.into());
        self
    }
    pub fn bearer(self, key: &str) -> Request {
        self.header("Authorization", &format!("Bearer {key}"))
    }
    pub fn body(mut self, b: impl Into<Vec<u8>>) -> Request {
        self.body = Some(b.into());
        self
    }
    pub fn json(self, v: &Value) -> Request {
        self.header("Content-Type", "application/json").body(serde_json::to_vec(v).unwrap())
    }
    /// A chat completion request for `model` with the master key.
    pub fn chat(key: &str, model: &str) -> Request {
        Request::post("/v1/chat/completions")
            .bearer(key)
            .json(&serde_json::json!({"model": model, "messages": [{"role": "user", "content": "Hello!"}]}))
    }
    pub fn chunked(mut self, pieces: Vec<Vec<u8>>, pause: Duration) -> Request {
        self.chunked = Some((pieces, pause));
        self.content_length = false;
        self
    }

    fn head_bytes(&self, addr: SocketAddr) -> Vec<u8> {
        self.head_bytes_with(addr, true)
    }

    fn head_bytes_with(&self, addr: SocketAddr, close: bool) -> Vec<u8> {
        let connection = if close { "Connection: close\r\n" } else { "" };
        let host = self.host.clone().unwrap_or_else(|| addr.to_string());
        let mut out = format!("{} {} HTTP/1.1\r\nHost: {host}\r\n{connection}", self.method, self.path).into_bytes();
        for (k, v) in &self.headers {
            out.extend_from_slice(k.as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(v.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        if self.chunked.is_some() {
            out.extend_from_slice(b"Transfer-Encoding: chunked\r\n");
        } else if let (Some(b), true) = (&self.body, self.content_length) {
            out.extend_from_slice(format!("Content-Length: {}\r\n", b.len()).as_bytes());
        }
        out.extend_from_slice(b"\r\n");
        out
    }

    /// Sends the request and reads the whole response.
    pub fn send(&self, addr: SocketAddr) -> std::io::Result<Response> {
        let start = Instant::now();
        let mut s = connect(addr)?;
        let mut head = self.head_bytes(addr);
        if let (Some(b), None) = (&self.body, &self.chunked) {
            head.extend_from_slice(b);
        }
        // A server may answer and close before it read everything (e.g. a limit reply): keep
        // the response even when the rest of the write fails.
        let write_result = s.write_all(&head);
        if write_result.is_ok() {
            if let Some((pieces, pause)) = &self.chunked {
                for p in pieces {
                    std::thread::sleep(*pause);
                    s.write_all(format!("{:x}\r\n", p.len()).as_bytes())?;
                    s.write_all(p)?;
                    s.write_all(b"\r\n")?;
                }
                s.write_all(b"0\r\n\r\n")?;
            }
        }
        let (raw, read_result) = read_response(&mut s);
        if raw.is_empty() {
            write_result?;
            read_result?;
            return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "no response"));
        }
        let mut r = parse_response(&raw)?;
        r.elapsed = start.elapsed();
        Ok(r)
    }

    /// Sends and panics with a message on a transport error.
    pub fn send_ok(&self, addr: SocketAddr) -> Response {
        self.send(addr).unwrap_or_else(|e| panic!("{} {} to {addr}: {e}", self.method, self.path))
    }

    /// Sends and returns the raw bytes of every read with its arrival time (for streaming).
    pub fn send_timed(&self, addr: SocketAddr) -> std::io::Result<(Response, TimedReads)> {
        let start = Instant::now();
        let mut s = connect(addr)?;
        let mut head = self.head_bytes(addr);
        if let Some(b) = &self.body {
            head.extend_from_slice(b);
        }
        s.write_all(&head)?;
        let mut reads = Vec::new();
        let mut raw = Vec::new();
        let mut buf = [0u8; 16384];
        loop {
            let n = s.read(&mut buf)?;
            if n == 0 {
                break;
            }
            reads.push((start.elapsed(), buf[..n].to_vec()));
            raw.extend_from_slice(&buf[..n]);
            if complete(&raw) {
                break;
            }
        }
        let mut r = parse_response(&raw)?;
        r.elapsed = start.elapsed();
        Ok((r, reads))
    }
}

/// A keep-alive connection for load tests: requests go one after another on one TCP connection,
/// reconnecting when the server closed it.
pub struct Conn {
    addr: SocketAddr,
    stream: Option<TcpStream>,
}

impl Conn {
    pub fn new(addr: SocketAddr) -> Conn {
        Conn { addr, stream: None }
    }

    /// Sends `req` (without `Connection: close`; chunked uploads not supported) and reads one response.
    pub fn send(&mut self, req: &Request) -> std::io::Result<Response> {
        let start = Instant::now();
        if self.stream.is_none() {
            self.stream = Some(connect(self.addr)?);
        }
        let s = self.stream.as_mut().unwrap();
        let mut bytes = req.head_bytes_with(self.addr, false);
        if let Some(b) = &req.body {
            bytes.extend_from_slice(b);
        }
        let result = s.write_all(&bytes).and_then(|_| {
            let (raw, rr) = read_response(s);
            if !complete(&raw) {
                rr?;
                return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "connection closed mid-response"));
            }
            parse_response(&raw)
        });
        match result {
            Ok(mut r) => {
                if r.header("connection").is_some_and(|v| v.eq_ignore_ascii_case("close")) {
                    self.stream = None;
                }
                r.elapsed = start.elapsed();
                Ok(r)
            }
            Err(e) => {
                self.stream = None;
                Err(e)
            }
        }
    }
}

fn connect(addr: SocketAddr) -> std::io::Result<TcpStream> {
    let s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    s.set_nodelay(true)?;
    Ok(s)
}

/// Sends raw bytes as they are and reads the response (for requests the builder can't express).
pub fn send_raw(addr: SocketAddr, bytes: &[u8]) -> std::io::Result<Response> {
    let start = Instant::now();
    let mut s = connect(addr)?;
    let w = s.write_all(bytes);
    let (raw, rr) = read_response(&mut s);
    if raw.is_empty() {
        w?;
        rr?;
        return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "no response"));
    }
    let mut r = parse_response(&raw)?;
    r.elapsed = start.elapsed();
    Ok(r)
}

/// Reads until the response is complete (by length or chunk terminator) or EOF. Not waiting for
/// EOF matters: after a local reply Envoy waits up to its `delayed_close_timeout` (1 s) for the
/// client to close first.
fn read_response(s: &mut TcpStream) -> (Vec<u8>, std::io::Result<()>) {
    let mut raw = Vec::new();
    let mut buf = [0u8; 65536];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return (raw, Ok(())),
            Ok(n) => {
                raw.extend_from_slice(&buf[..n]);
                if complete(&raw) {
                    return (raw, Ok(()));
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return (raw, Err(e)),
        }
    }
}

/// Whether `raw` holds a whole response: head plus Content-Length bytes, or a chunked body with
/// its last chunk. Responses framed by EOF are never complete here.
fn complete(raw: &[u8]) -> bool {
    let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") else { return false };
    let head = String::from_utf8_lossy(&raw[..end]).to_ascii_lowercase();
    let body = &raw[end + 4..];
    if head.lines().next().is_some_and(|l| l.contains(" 204 ") || l.contains(" 304 ")) {
        return true;
    }
    for line in head.lines() {
        if let Some(v) = line.strip_prefix("content-length:") {
            return v.trim().parse::<usize>().is_ok_and(|n| body.len() >= n);
        }
        if line.starts_with("transfer-encoding:") && line.contains("chunked") {
            return chunked_done(body);
        }
    }
    false
}

fn chunked_done(mut rest: &[u8]) -> bool {
    loop {
        let Some(nl) = rest.windows(2).position(|w| w == b"\r\n") else { return false };
        let size_text = String::from_utf8_lossy(&rest[..nl]);
        let Ok(size) = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16) else { return false };
        rest = &rest[nl + 2..];
        if size == 0 {
            return rest.windows(2).any(|w| w == b"\r\n");
        }
        if rest.len() < size + 2 {
            return false;
        }
        rest = &rest[size + 2..];
    }
}

fn bad(msg: impl Into<String>) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, msg.into())
}

/// Parses a complete HTTP/1.1 response (status line, headers, body by length, chunks or EOF).
pub fn parse_response(raw: &[u8]) -> std::io::Result<Response> {
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| bad(format!("incomplete response head: {:?}", String::from_utf8_lossy(&raw[..raw.len().min(300)]))))?;
    let head = String::from_utf8_lossy(&raw[..end]).into_owned();
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status: u16 = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad(format!("bad status line {status_line:?}")))?;
    let headers: Vec<(String, String)> =
        lines.filter_map(|l| l.split_once(':')).map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string())).collect();
    let rest = &raw[end + 4..];
    let chunked = headers.iter().any(|(k, v)| k == "transfer-encoding" && v.to_ascii_lowercase().contains("chunked"));
    let body = if chunked {
        decode_chunked(rest)?
    } else if let Some(len) = headers.iter().find(|(k, _)| k == "content-length").and_then(|(_, v)| v.parse::<usize>().ok()) {
        rest[..len.min(rest.len())].to_vec()
    } else {
        rest.to_vec()
    };
    Ok(Response { status, headers, body, elapsed: Duration::ZERO })
}

fn decode_chunked(mut rest: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let Some(nl) = rest.windows(2).position(|w| w == b"\r\n") else { return Ok(out) };
        let size_text = String::from_utf8_lossy(&rest[..nl]);
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
            .map_err(|_| bad(format!("bad chunk size {size_text:?}")))?;
        rest = &rest[nl + 2..];
        if size == 0 {
            return Ok(out);
        }
        let take = size.min(rest.len());
        out.extend_from_slice(&rest[..take]);
        rest = &rest[take..];
        if rest.starts_with(b"\r\n") {
            rest = &rest[2..];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_length_chunked_and_eof_bodies() {
        let r = parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-A: b\r\n\r\nhiXX").unwrap();
        assert_eq!((r.status, r.body.as_slice(), r.header("x-a")), (200, &b"hi"[..], Some("b")));
        let r = parse_response(b"HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n").unwrap();
        assert_eq!((r.status, r.body.as_slice()), (201, &b"abcde"[..]));
        let r = parse_response(b"HTTP/1.1 404 Not Found\r\n\r\nall of it").unwrap();
        assert_eq!(r.body, b"all of it");
        assert!(parse_response(b"HTTP/1.1 200 OK\r\n").is_err());
        assert!(complete(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi"));
        assert!(!complete(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nhi"));
        assert!(complete(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n"));
        assert!(!complete(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n"));
        assert!(!complete(b"HTTP/1.1 200 OK\r\n\r\nuntil EOF"));
    }
}
