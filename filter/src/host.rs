//! The host calls the request flows need, as a trait: the proxy-wasm layer implements it over the
//! raw ABI (every status mapped to a `Result`, nothing panics), and native tests implement it in
//! memory (`testing::MemHost`), so the request state machine is tested without a VM.

use crate::config::LogLevel;
use crate::store::SharedStore;
use std::time::Duration;

/// A host call that did not succeed: the proxy-wasm status code it returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostError(pub u32);

pub type HostResult<T> = Result<T, HostError>;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MetricKind {
    Counter,
    Gauge,
    Histogram,
}

/// What a callback tells the host to do with the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Continue,
    Pause,
}

pub trait Host: SharedStore {
    fn now_ms(&self) -> u64;
    fn now_us(&self) -> u64 {
        self.now_ms().saturating_mul(1000)
    }
    fn log(&self, level: LogLevel, message: &str);

    /// All request headers in one call (one host crossing instead of one per header), read in
    /// place (no allocation per header).
    fn request_headers(&self) -> HostResult<HeaderMap>;
    /// Sets (`Some`) or removes (`None`) a request header.
    fn set_request_header(&self, name: &str, value: Option<&[u8]>) -> HostResult<()>;
    /// `len` bytes of the buffered request body from `start`.
    fn request_body(&self, start: usize, len: usize) -> HostResult<Vec<u8>>;
    /// All response headers in one call, read in place.
    fn response_headers(&self) -> HostResult<HeaderMap>;
    /// `len` bytes of the response body chunk at hand (the filter never buffers responses).
    fn response_body(&self, start: usize, len: usize) -> HostResult<Vec<u8>>;
    /// Sets (`Some`) or removes (`None`) a response header.
    fn set_response_header(&self, name: &str, value: Option<&[u8]>) -> HostResult<()>;
    fn property(&self, path: &[&str]) -> HostResult<Option<Vec<u8>>>;
    /// Writes a property; Envoy keeps `name` as filter state `wasm.<name>`, seen by the upstream
    /// filter and the route's matcher.
    fn set_property(&self, name: &str, value: &[u8]) -> HostResult<()>;
    /// A local reply; the stream stops here.
    fn send_reply(&self, status: u16, headers: &[(&str, &str)], body: &[u8]) -> HostResult<()>;
    /// Makes Envoy pick the route (and cluster) again after a routing header changed.
    fn clear_route_cache(&self) -> HostResult<()>;

    fn define_metric(&self, kind: MetricKind, name: &str) -> HostResult<u32>;
    fn increment_metric(&self, id: u32, by: i64);
    fn record_metric(&self, id: u32, value: u64);

    /// An HTTP callout to `cluster`; the reply arrives on the root context with the token.
    fn dispatch_http_call(&self, cluster: &str, headers: &[(&str, &str)], timeout: Duration) -> HostResult<u32>;
    fn http_call_response_header(&self, name: &str) -> HostResult<Option<Vec<u8>>>;
    fn http_call_response_body(&self, start: usize, len: usize) -> HostResult<Vec<u8>>;

    /// A unary gRPC call from this stream's context; the reply comes back to it with the token.
    fn dispatch_grpc_call(&self, cluster: &str, service: &str, method: &str, message: &[u8], timeout: Duration) -> HostResult<u32>;
    /// The reply message of the gRPC call at hand (`size` bytes).
    fn grpc_response(&self, size: usize) -> HostResult<Vec<u8>>;
    /// Lets a paused request go on (after a callout decided it).
    fn resume_request(&self) -> HostResult<()>;
}

/// A header map in the ABI's layout: count, (key, value) sizes, then NUL-terminated keys and values.
pub fn serialize_map(map: &[(&str, &str)]) -> Vec<u8> {
    let size = 4 + map.iter().map(|(k, v)| k.len() + v.len() + 10).sum::<usize>();
    let mut out = Vec::with_capacity(size);
    out.extend_from_slice(&(map.len() as u32).to_le_bytes());
    for (k, v) in map {
        out.extend_from_slice(&(k.len() as u32).to_le_bytes());
        out.extend_from_slice(&(v.len() as u32).to_le_bytes());
    }
    for (k, v) in map {
        out.extend_from_slice(k.as_bytes());
        out.push(0);
        out.extend_from_slice(v.as_bytes());
        out.push(0);
    }
    out
}

/// A header map as the host serialized it, validated once and read in place.
#[derive(Debug, Default)]
pub struct HeaderMap {
    bytes: Vec<u8>,
    n: usize,
}

impl HeaderMap {
    /// Checks the layout (count, sizes, NUL-terminated fields that fit); malformed is an error.
    pub fn parse(bytes: Vec<u8>) -> HostResult<HeaderMap> {
        if bytes.is_empty() {
            return Ok(HeaderMap::default());
        }
        let n = u32_at(&bytes, 0)?;
        let mut p = n.checked_mul(8).and_then(|x| x.checked_add(4)).ok_or(BAD_MAP)?;
        for i in 0..n {
            for size in [u32_at(&bytes, 4 + i * 8)?, u32_at(&bytes, 8 + i * 8)?] {
                p = p.checked_add(size).filter(|end| *end < bytes.len()).ok_or(BAD_MAP)? + 1;
            }
        }
        Ok(HeaderMap { bytes, n })
    }

    /// (name, value) pairs in order.
    pub fn iter(&self) -> impl Iterator<Item = (&[u8], &[u8])> + '_ {
        let b = &self.bytes;
        let mut p = 4 + self.n * 8;
        (0..self.n).map(move |i| {
            // parse() checked every size and offset.
            let ks = u32_at(b, 4 + i * 8).unwrap_or(0);
            let vs = u32_at(b, 8 + i * 8).unwrap_or(0);
            let key = b.get(p..p + ks).unwrap_or_default();
            p += ks + 1;
            let value = b.get(p..p + vs).unwrap_or_default();
            p += vs + 1;
            (key, value)
        })
    }
}

const BAD_MAP: HostError = HostError(3);

fn u32_at(bytes: &[u8], at: usize) -> HostResult<usize> {
    let b: [u8; 4] = bytes.get(at..at.saturating_add(4)).and_then(|b| b.try_into().ok()).ok_or(BAD_MAP)?;
    Ok(u32::from_le_bytes(b) as usize)
}

/// The inverse of `serialize_map`; a malformed map from the host is an error, not a trap.
pub fn deserialize_map(bytes: &[u8]) -> HostResult<Vec<(String, Vec<u8>)>> {
    const BAD: HostError = HostError(3);
    if bytes.is_empty() {
        return Ok(Vec::new());
    }
    let u32_at = |at: usize| -> HostResult<usize> {
        let b: [u8; 4] = bytes.get(at..at.saturating_add(4)).and_then(|b| b.try_into().ok()).ok_or(BAD)?;
        Ok(u32::from_le_bytes(b) as usize)
    };
    let n = u32_at(0)?;
    let mut p = n.checked_mul(8).and_then(|x| x.checked_add(4)).ok_or(BAD)?;
    let mut map = Vec::with_capacity(n.min(bytes.len() / 10));
    let field = |p: &mut usize, len: usize| -> HostResult<Vec<u8>> {
        let end = p.checked_add(len).ok_or(BAD)?;
        let v = bytes.get(*p..end).ok_or(BAD)?.to_vec();
        *p = end.saturating_add(1);
        Ok(v)
    };
    for i in 0..n {
        let (ks, vs) = (u32_at(4 + i * 8)?, u32_at(8 + i * 8)?);
        let key = field(&mut p, ks)?;
        let value = field(&mut p, vs)?;
        map.push((String::from_utf8_lossy(&key).into_owned(), value));
    }
    Ok(map)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_maps_round_trip_and_malformed_ones_are_errors() {
        let m = [(":path", "/v1/x"), ("a", ""), ("x-k", "v\u{e9}")];
        let bytes = serialize_map(&m);
        let back = deserialize_map(&bytes).unwrap();
        assert_eq!(back.len(), 3);
        assert_eq!(back[2], ("x-k".to_string(), "v\u{e9}".as_bytes().to_vec()));
        for cut in 1..bytes.len() - 1 {
            assert!(deserialize_map(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        assert!(deserialize_map(&[255, 255, 255, 255]).is_err());
        assert_eq!(deserialize_map(&[]).unwrap(), vec![]);
        let map = HeaderMap::parse(bytes.clone()).unwrap();
        let pairs: Vec<(&[u8], &[u8])> = map.iter().collect();
        assert_eq!(pairs, vec![(&b":path"[..], &b"/v1/x"[..]), (b"a", b""), (b"x-k", "v\u{e9}".as_bytes())]);
        for cut in 1..bytes.len() - 1 {
            assert!(HeaderMap::parse(bytes[..cut].to_vec()).is_err(), "cut at {cut}");
        }
        assert!(HeaderMap::parse(vec![255, 255, 255, 255]).is_err());
        assert_eq!(HeaderMap::parse(vec![]).unwrap().iter().count(), 0);
    }
}
