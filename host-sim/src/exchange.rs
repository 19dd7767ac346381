//! What a test sends ([`Request`]) and what it gets back ([`Exchange`], [`Outcome`],
//! [`Forwarded`], [`Response`]).

use crate::vm::{FilterState, Headers};

/// One HTTP stream to send with [`crate::Vm::send`]: headers, body chunks, optional trailers,
/// the root context (plugin) it runs on and properties the test sets for it.
#[derive(Clone, Debug, Default)]
pub struct Request {
    pub(crate) root_id: Option<String>,
    pub(crate) headers: Headers,
    pub(crate) chunks: Vec<Vec<u8>>,
    pub(crate) trailers: Option<Headers>,
    pub(crate) properties: Vec<(String, Vec<u8>)>,
    pub(crate) upstream: Option<(u32, String)>,
}

impl Request {
    pub fn new(headers: &[(&str, &str)]) -> Request {
        Request { headers: owned(headers), ..Default::default() }
    }
    /// The body in one chunk (none if empty).
    pub fn body(mut self, body: impl Into<Vec<u8>>) -> Request {
        let b = body.into();
        self.chunks = if b.is_empty() { vec![] } else { vec![b] };
        self
    }
    /// The body in these chunks (one `proxy_on_request_body` each).
    pub fn chunks(mut self, chunks: &[&[u8]]) -> Request {
        self.chunks = chunks.iter().map(|c| c.to_vec()).collect();
        self
    }
    /// The request ends with HTTP/2 trailers: every body chunk arrives with end_of_stream=false,
    /// then `proxy_on_request_trailers`. The filter sees the trailers as `HttpRequestTrailers`.
    pub fn trailers(mut self, trailers: &[(&str, &str)]) -> Request {
        self.trailers = Some(owned(trailers));
        self
    }
    /// Runs on the live root context of this root id (default: the VM's first one).
    pub fn root(mut self, root_id: &str) -> Request {
        self.root_id = Some(root_id.into());
        self
    }
    /// A property `proxy_get_property` answers for this stream only (dotted path, e.g.
    /// `xds.cluster_name`); it wins over filter state, host properties and built-ins.
    pub fn property(mut self, path: &str, value: impl Into<Vec<u8>>) -> Request {
        self.properties.push((path.into(), value.into()));
        self
    }
    /// Makes this stream an upstream-filter attempt of `downstream` on `cluster`: it shares the
    /// downstream request's filter state, `xds.cluster_name` is `cluster`, it is never routed
    /// (its forwarded cluster is `cluster`), gets no `on_log`, cannot write request headers in
    /// the response phase and cannot read response headers in body callbacks (Envoy 1.40).
    pub fn upstream_of(mut self, downstream: &Exchange, cluster: &str) -> Request {
        self.upstream = Some((downstream.ctx, cluster.into()));
        self
    }
}

/// A response as the client receives it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// Body chunks in the order the filter let them through (SSE: one per upstream chunk).
    pub chunks: Vec<Vec<u8>>,
    /// `response.code_details` (the filter's details for its own local replies).
    pub details: String,
    /// False if the filter is still holding part of the response.
    pub complete: bool,
    /// The request's filter state when the call returned (see [`crate::vm::FilterState`]).
    pub filter_state: FilterState,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        find(&self.headers, name)
    }
    pub fn body_str(&self) -> &str {
        std::str::from_utf8(&self.body).unwrap_or("<non-utf8>")
    }
}

/// The request as the router forwards it upstream.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Forwarded {
    /// Request headers when they were released to the router (later changes do not count).
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// Request trailers as released (None: the request had none).
    pub trailers: Option<Vec<(String, String)>>,
    /// The cluster the route picked: the value of the filter-state key of
    /// [`crate::Host::route_by_filter_state`] when the route was (re)computed —
    /// at stream start, or at release if the filter cleared the route cache. For an upstream
    /// attempt: its cluster.
    pub cluster: Option<String>,
    /// How many times the filter cleared the route cache.
    pub route_cache_clears: u32,
    /// The whole body reached the upstream.
    pub complete: bool,
    /// The request's filter state when the call returned.
    pub filter_state: FilterState,
}

impl Forwarded {
    pub fn header(&self, name: &str) -> Option<&str> {
        find(&self.headers, name)
    }
    pub fn header_all(&self, name: &str) -> Vec<&str> {
        self.headers.iter().filter(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str()).collect()
    }
}

/// What became of a request.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    /// A local reply (from the filter, or Envoy's own 413 / fail-closed 503), as the client got it.
    LocalReply(Response),
    /// Sent upstream; answer it with [`crate::Vm::respond`].
    Forwarded(Forwarded),
    /// The filter is still holding the request (e.g. waiting for a callout).
    Paused,
    /// The filter closed the stream.
    Reset,
}

/// Handle of one HTTP stream plus what had happened when the call returned.
#[derive(Clone, Debug)]
pub struct Exchange {
    pub ctx: u32,
    pub outcome: Outcome,
}

impl Exchange {
    pub fn local_reply(&self) -> Option<&Response> {
        match &self.outcome {
            Outcome::LocalReply(r) => Some(r),
            _ => None,
        }
    }
    pub fn forwarded(&self) -> Option<&Forwarded> {
        match &self.outcome {
            Outcome::Forwarded(f) => Some(f),
            _ => None,
        }
    }
    /// The forwarded request; panics with the outcome if the request was not forwarded.
    pub fn expect_forwarded(&self) -> &Forwarded {
        self.forwarded().unwrap_or_else(|| panic!("expected the request to be forwarded, got {}", describe(&self.outcome)))
    }
    /// The local reply; panics with the outcome otherwise.
    pub fn expect_local(&self) -> &Response {
        self.local_reply().unwrap_or_else(|| panic!("expected a local reply, got {}", describe(&self.outcome)))
    }
    /// Chosen cluster (None for local replies).
    pub fn cluster(&self) -> Option<&str> {
        self.forwarded().and_then(|f| f.cluster.as_deref())
    }
    /// Status the client sees before the upstream answers: local reply status, else None.
    pub fn status(&self) -> Option<u16> {
        self.local_reply().map(|r| r.status)
    }
}

pub(crate) fn describe(o: &Outcome) -> String {
    match o {
        Outcome::LocalReply(r) => format!("local reply {} {:?} body {}", r.status, r.details, r.body_str()),
        Outcome::Forwarded(f) => format!("forwarded to cluster {:?}", f.cluster),
        Outcome::Paused => "paused".into(),
        Outcome::Reset => "reset".into(),
    }
}

pub(crate) fn find<'a>(h: &'a [(String, String)], name: &str) -> Option<&'a str> {
    h.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
}

pub(crate) fn owned(h: &[(&str, &str)]) -> Headers {
    h.iter().map(|(k, v)| (k.to_ascii_lowercase(), v.to_string())).collect()
}

/// How an upstream attempt ends without a response, as Envoy's router reports it.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum UpstreamFailure {
    /// 503, `upstream_reset_before_response_started{connection_failure}`, flag UF.
    ConnectFailure,
    /// 504, `upstream_response_timeout`, flag UT.
    Timeout,
}
