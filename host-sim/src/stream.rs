//! The HTTP stream driver: moves one stream through the filter's callbacks as Envoy's wasm
//! filter does (headers → body → trailers, the router's release, the upstream's answer through
//! the encoder callbacks, local replies, on_log / on_done / on_delete), for a downstream filter
//! or an upstream-filter attempt.

use crate::exchange::{describe, find, owned, Exchange, Forwarded, Outcome, Request, Response, UpstreamFailure};
use crate::vm::{flags, FilterState, Headers, Phase};
use crate::Vm;
use std::collections::HashMap;

const ACTION_CONTINUE: i32 = 0;

/// Where a stream's filter sits.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub enum StreamKind {
    /// An HCM (downstream) HTTP filter: routed by the route's cluster header.
    #[default]
    Downstream,
    /// An upstream HTTP filter in a cluster: one stream per attempt.
    Upstream,
}

#[derive(Clone, Debug)]
pub(crate) struct LocalSpec {
    pub status: u32,
    pub details: String,
    pub body: Vec<u8>,
    pub headers: Headers,
}

#[derive(Default)]
pub(crate) struct Stream {
    pub root: u32,
    pub kind: StreamKind,
    /// Whose filter state this stream reads and writes (itself, or its downstream request).
    pub fs_owner: u32,
    pub req_headers: Headers,
    pub req_trailers: Option<Headers>,
    pub resp_headers: Option<Headers>,
    pub req_buf: Vec<u8>,
    pub resp_buf: Vec<u8>,
    pub start_ns: u64,
    // decode
    pub req_eos_in: bool,
    pub req_hdrs_out: bool,
    pub req_done: bool,
    pub route: Option<Option<String>>,
    pub route_clears: u32,
    pub fwd_headers: Option<Headers>,
    pub fwd_body: Vec<u8>,
    pub fwd_trailers: Option<Headers>,
    pub cluster: Option<String>,
    // upstream attempts of this (downstream) request
    pub attempts: u32,
    /// The header map as the last upstream attempt left it (Envoy hands the same map to each).
    pub attempt_headers: Option<Headers>,
    // control (deferred until the callback returns, as Envoy's after-VM-call actions)
    pub local_reply: Option<LocalSpec>,
    pub local_sent: bool,
    pub continue_req: bool,
    pub continue_resp: bool,
    pub reset: bool,
    // encode
    pub upstream_responded: bool,
    pub resp_eos_in: bool,
    pub resp_hdrs_out: bool,
    pub client_headers: Option<Headers>,
    pub client_chunks: Vec<Vec<u8>>,
    pub resp_done: bool,
    pub resp_code: Option<i64>,
    pub code_details: Option<String>,
    pub resp_flags: i64,
    /// Properties the test set for this stream.
    pub props: HashMap<String, Vec<u8>>,
    pub finished: bool,
    pub failed: bool,
}

/// Envoy's local reply headers: `:status`, the filter's extra headers, content-length and a
/// text/plain content-type when the body is not empty and none was given.
pub(crate) fn local_reply_headers(spec: &LocalSpec) -> Headers {
    let mut h: Headers = vec![(":status".into(), spec.status.to_string())];
    for (k, v) in &spec.headers {
        h.push((k.to_ascii_lowercase(), v.clone()));
    }
    if !spec.body.is_empty() {
        h.retain(|(k, _)| k != "content-length");
        h.push(("content-length".into(), spec.body.len().to_string()));
        if !h.iter().any(|(k, _)| k == "content-type") {
            h.push(("content-type".into(), "text/plain".into()));
        }
    }
    h
}

impl Vm {
    /// Sends a request: headers, then the body in one chunk (none if empty).
    pub fn http_request(&mut self, headers: &[(&str, &str)], body: &[u8]) -> Exchange {
        self.send(Request::new(headers).body(body))
    }

    /// A JSON POST to `path` with `Authorization: Bearer <key>` (a shortcut for tests).
    pub fn post(&mut self, path: &str, key: &str, body: &str) -> Exchange {
        self.send(post_request(path, key, body))
    }

    /// Sends a request whose body arrives in these chunks.
    pub fn http_request_chunks(&mut self, headers: &[(&str, &str)], chunks: &[&[u8]]) -> Exchange {
        self.send(Request::new(headers).chunks(chunks))
    }

    /// Sends a request whose body (in these chunks, each with end_of_stream=false) ends with
    /// HTTP/2 trailers (`proxy_on_request_trailers`).
    pub fn http_request_trailers(&mut self, headers: &[(&str, &str)], chunks: &[&[u8]], trailers: &[(&str, &str)]) -> Exchange {
        self.send(Request::new(headers).chunks(chunks).trailers(trailers))
    }

    /// Runs one upstream-filter attempt of `downstream` (which must have been forwarded) on the
    /// root context `root_id`, for `cluster`: request headers as the router sends them (the
    /// previous attempt's edits included, as Envoy reuses the header map), the body (attempt 1:
    /// the body then an empty end-of-stream chunk; later attempts: the buffered body at once,
    /// as Envoy 1.40 does), `xds.cluster_name` = `cluster`. Answer it with [`Vm::respond`]; what
    /// that returns is what the router gets back for this attempt.
    pub fn upstream_request(&mut self, downstream: &Exchange, root_id: &str, cluster: &str) -> Exchange {
        let Some(d) = self.store.data_mut().streams.get_mut(&downstream.ctx).filter(|s| s.fwd_headers.is_some()) else {
            panic!("upstream_request() on a request that was not forwarded (outcome: {})", describe(&downstream.outcome))
        };
        d.attempts += 1;
        let headers = d.attempt_headers.clone().or_else(|| d.fwd_headers.clone()).unwrap_or_default();
        let body = d.fwd_body.clone();
        let mut chunks = if body.is_empty() { vec![] } else { vec![body] };
        if d.attempts == 1 && !chunks.is_empty() {
            chunks.push(Vec::new());
        }
        let trailers = d.fwd_trailers.clone();
        let req = Request { headers, chunks, trailers, ..Default::default() };
        self.send(req.root(root_id).upstream_of(downstream, cluster))
    }

    /// Sends `req` through the filter; returns what had happened when the filter stopped.
    pub fn send(&mut self, req: Request) -> Exchange {
        self.run_due();
        let root = match &req.root_id {
            None => self.store.data().roots.iter().find(|r| !r.retired).map(|r| r.id).unwrap_or(1),
            Some(id) => self.root_context(id).unwrap_or_else(|| panic!("no live root context {id:?} in vm{}", self.index())),
        };
        let now = self.host.inner.now_ns();
        let st = self.store.data_mut();
        let ctx = st.next_ctx();
        let mut s = Stream { root, fs_owner: ctx, req_headers: req.headers, start_ns: now, ..Default::default() };
        match req.upstream {
            Some((downstream, cluster)) => {
                s.kind = StreamKind::Upstream;
                s.fs_owner = downstream;
                s.route = Some(Some(cluster.clone()));
                s.cluster = Some(cluster.clone());
                s.props.insert("xds.cluster_name".into(), cluster.into_bytes());
            }
            // Nothing in filter state yet: no cluster until the filter routes (and clears the cache).
            None => s.route = Some(None),
        }
        s.props.extend(req.properties);
        st.streams.insert(ctx, s);
        if self.failed.is_some() {
            self.fail_stream(ctx);
            return self.exchange(ctx);
        }
        let f = self.ex.on_context_create.clone();
        if self.call(f, ctx, Phase::Create, (ctx as i32, root as i32)).is_err() {
            self.fail_stream(ctx);
            return self.exchange(ctx);
        }
        let trailers = req.trailers;
        let chunks = req.chunks;
        let eos = chunks.is_empty() && trailers.is_none();
        self.stream(ctx).req_eos_in = eos;
        let n = self.stream(ctx).req_headers.len() as i32;
        let f = self.ex.on_request_headers.clone();
        match self.call(f, ctx, Phase::RequestHeaders, (ctx as i32, n, eos as i32)) {
            Err(_) => self.fail_stream(ctx),
            Ok(action) => {
                if action.unwrap_or(0) == ACTION_CONTINUE {
                    self.stream(ctx).continue_req = true;
                }
                self.settle(ctx);
            }
        }
        let total = chunks.len();
        for (i, chunk) in chunks.into_iter().enumerate() {
            if self.ended(ctx) {
                break;
            }
            let eos = i + 1 == total && trailers.is_none();
            let s = self.stream(ctx);
            s.req_eos_in = eos;
            s.req_buf.extend_from_slice(&chunk);
            let size = s.req_buf.len() as i32;
            let f = self.ex.on_request_body.clone();
            match self.call(f, ctx, Phase::RequestBody, (ctx as i32, size, eos as i32)) {
                Err(_) => self.fail_stream(ctx),
                Ok(action) => {
                    if action.unwrap_or(0) == ACTION_CONTINUE {
                        self.stream(ctx).continue_req = true;
                    } else {
                        self.apply_buffer_limit(ctx);
                    }
                    self.settle(ctx);
                }
            }
        }
        if let Some(t) = trailers {
            if !self.ended(ctx) {
                let s = self.stream(ctx);
                s.req_eos_in = true;
                let n = t.len() as i32;
                s.req_trailers = Some(t);
                let f = self.ex.on_request_trailers.clone();
                match self.call(f, ctx, Phase::RequestTrailers, (ctx as i32, n)) {
                    Err(_) => self.fail_stream(ctx),
                    Ok(action) => {
                        // Envoy: 0 Continue, 1 StopIteration (resume with continue_request).
                        if action.unwrap_or(0) == ACTION_CONTINUE {
                            self.stream(ctx).continue_req = true;
                        }
                        self.settle(ctx);
                    }
                }
            }
        }
        self.run_due();
        self.exchange(ctx)
    }

    /// StopIterationAndBuffer: Envoy's buffer limit applies (its own 413).
    fn apply_buffer_limit(&mut self, ctx: u32) {
        let limit = *self.host.inner.buffer_limit.lock().unwrap();
        let s = self.stream(ctx);
        if let Some(limit) = limit {
            if s.req_buf.len() > limit && s.local_reply.is_none() && !s.continue_req {
                s.local_reply = Some(LocalSpec {
                    status: 413,
                    details: "request_payload_too_large".into(),
                    body: b"Payload Too Large".to_vec(),
                    headers: Vec::new(),
                });
            }
        }
    }

    pub(crate) fn stream(&mut self, ctx: u32) -> &mut Stream {
        self.store.data_mut().streams.get_mut(&ctx).expect("unknown stream")
    }

    fn ended(&self, ctx: u32) -> bool {
        match self.store.data().streams.get(&ctx) {
            None => true,
            Some(s) => s.finished || s.local_sent || s.reset || s.failed,
        }
    }

    /// The route's cluster when it is (re)computed.
    fn route_cluster(&self, s: &Stream) -> Option<String> {
        let key = self.host.inner.route_filter_state_key.lock().unwrap().clone();
        let v = key.and_then(|k| self.store.data().filter_states.get(&s.fs_owner)?.get(&k).cloned())?;
        Some(String::from_utf8_lossy(&v).into_owned())
    }

    /// Applies what the filter asked for during its last callback (Envoy runs these after the
    /// VM call returns): local reply, reset, continue.
    pub(crate) fn settle(&mut self, ctx: u32) {
        let recompute = match self.store.data().streams.get(&ctx) {
            Some(s) if s.continue_req && !s.req_hdrs_out && s.route.is_none() => Some(self.route_cluster(s)),
            _ => None,
        };
        let Some(s) = self.store.data_mut().streams.get_mut(&ctx) else { return };
        if s.finished {
            return;
        }
        if let Some(spec) = s.local_reply.take() {
            s.local_sent = true;
            s.continue_req = false;
            s.continue_resp = false;
            self.local_reply(ctx, spec);
            return;
        }
        if s.reset {
            self.finish(ctx);
            return;
        }
        if s.continue_req {
            s.continue_req = false;
            if !s.req_hdrs_out {
                s.req_hdrs_out = true;
                s.fwd_headers = Some(s.req_headers.clone());
                s.cluster = match &s.route {
                    Some(cached) => cached.clone(),
                    None => recompute.flatten(),
                };
            }
            let b = std::mem::take(&mut s.req_buf);
            s.fwd_body.extend(b);
            if s.req_eos_in {
                s.req_done = true;
                s.fwd_trailers = s.req_trailers.clone();
            }
            if s.kind == StreamKind::Upstream {
                self.save_attempt_headers(ctx);
            }
        }
        let Some(s) = self.store.data_mut().streams.get_mut(&ctx) else { return };
        if s.continue_resp {
            s.continue_resp = false;
            if s.resp_headers.is_some() && !s.resp_hdrs_out {
                s.resp_hdrs_out = true;
                s.client_headers = s.resp_headers.clone();
            }
            if s.resp_hdrs_out {
                let b = std::mem::take(&mut s.resp_buf);
                if !b.is_empty() {
                    s.client_chunks.push(b);
                }
                if s.resp_eos_in {
                    s.resp_done = true;
                    self.finish(ctx);
                }
            }
        }
    }

    /// An upstream attempt's header edits persist into the next attempt.
    fn save_attempt_headers(&mut self, ctx: u32) {
        let st = self.store.data_mut();
        let Some(s) = st.streams.get(&ctx) else { return };
        let (owner, h) = (s.fs_owner, s.req_headers.clone());
        if let Some(d) = st.streams.get_mut(&owner) {
            d.attempt_headers = Some(h);
        }
    }

    /// Envoy fail-closed: a trap in the filter ends the stream with a 503.
    pub(crate) fn fail_stream(&mut self, ctx: u32) {
        let Some(s) = self.store.data_mut().streams.get_mut(&ctx) else { return };
        s.failed = true;
        s.local_sent = true;
        let spec = LocalSpec { status: 503, details: "wasm_fail_stream".into(), body: Vec::new(), headers: Vec::new() };
        let h = local_reply_headers(&spec);
        s.resp_code = Some(503);
        s.code_details = Some(spec.details.clone());
        s.resp_headers = Some(h.clone());
        s.client_headers = Some(h);
        s.client_chunks.clear();
        s.resp_done = true;
        s.finished = true;
    }

    fn local_reply(&mut self, ctx: u32, spec: LocalSpec) {
        let h = local_reply_headers(&spec);
        let s = self.stream(ctx);
        s.resp_code = Some(spec.status as i64);
        s.code_details = Some(spec.details.clone());
        s.resp_flags = 0;
        if s.upstream_responded {
            // Sent while encoding an upstream response: it replaces that response.
            s.client_headers = Some(h.clone());
            s.resp_headers = Some(h);
            s.client_chunks = if spec.body.is_empty() { vec![] } else { vec![spec.body] };
            s.resp_buf.clear();
            s.resp_done = true;
            self.finish(ctx);
            return;
        }
        // Sent while decoding: it goes through this filter's encoder path like any response.
        s.resp_headers = Some(h);
        self.encode(ctx, vec![spec.body]);
    }

    /// Runs the response through the filter's encoder callbacks.
    fn encode(&mut self, ctx: u32, chunks: Vec<Vec<u8>>) {
        let chunks: Vec<Vec<u8>> = chunks.into_iter().filter(|c| !c.is_empty()).collect();
        let eos = chunks.is_empty();
        let s = self.stream(ctx);
        s.resp_eos_in = eos;
        let n = s.resp_headers.as_ref().map_or(0, |h| h.len()) as i32;
        let f = self.ex.on_response_headers.clone();
        match self.call(f, ctx, Phase::ResponseHeaders, (ctx as i32, n, eos as i32)) {
            Err(_) => return self.fail_stream(ctx),
            Ok(a) => {
                if a.unwrap_or(0) == ACTION_CONTINUE {
                    self.stream(ctx).continue_resp = true;
                }
                self.settle_encode(ctx);
            }
        }
        let total = chunks.len();
        for (i, c) in chunks.into_iter().enumerate() {
            if self.store.data().streams.get(&ctx).is_none_or(|s| s.finished) {
                return;
            }
            let eos = i + 1 == total;
            let s = self.stream(ctx);
            s.resp_eos_in = eos;
            s.resp_buf.extend(c);
            let size = s.resp_buf.len() as i32;
            let f = self.ex.on_response_body.clone();
            match self.call(f, ctx, Phase::ResponseBody, (ctx as i32, size, eos as i32)) {
                Err(_) => return self.fail_stream(ctx),
                Ok(a) => {
                    if a.unwrap_or(0) == ACTION_CONTINUE {
                        self.stream(ctx).continue_resp = true;
                    }
                    self.settle_encode(ctx);
                }
            }
        }
    }

    fn settle_encode(&mut self, ctx: u32) {
        let Some(s) = self.store.data_mut().streams.get_mut(&ctx) else { return };
        if s.local_sent && s.local_reply.is_some() {
            // a second local reply while encoding the first one: Envoy ignores it
            s.local_reply = None;
        }
        if !s.upstream_responded {
            // encoding our own local reply: only continue / reset matter
            s.continue_req = false;
        }
        self.settle(ctx);
    }

    /// on_log (not for upstream filters: Envoy 1.40 never calls it there), on_done, on_delete
    /// (Envoy's end of stream), once.
    pub(crate) fn finish(&mut self, ctx: u32) {
        let Some(s) = self.store.data_mut().streams.get_mut(&ctx) else { return };
        if s.finished {
            return;
        }
        s.finished = true;
        let upstream = s.kind == StreamKind::Upstream;
        if upstream {
            self.save_attempt_headers(ctx);
        } else {
            let f = self.ex.on_log.clone();
            let _ = self.call(f, ctx, Phase::Log, ctx as i32);
        }
        let f = self.ex.on_done.clone();
        let _ = self.call(f, ctx, Phase::Done, ctx as i32);
        let f = self.ex.on_delete.clone();
        let _ = self.call(f, ctx, Phase::Done, ctx as i32);
    }

    fn snapshot_fs(&self, s: &Stream) -> FilterState {
        self.store.data().filter_states.get(&s.fs_owner).cloned().unwrap_or_default()
    }

    fn client_response(&self, s: &Stream) -> Response {
        let headers = s.client_headers.clone().unwrap_or_default();
        let status = find(&headers, ":status").and_then(|v| v.parse().ok()).unwrap_or(0);
        Response {
            status,
            body: s.client_chunks.concat(),
            chunks: s.client_chunks.clone(),
            headers,
            details: s.code_details.clone().unwrap_or_default(),
            complete: s.resp_done,
            filter_state: self.snapshot_fs(s),
        }
    }

    fn outcome(&self, ctx: u32) -> Outcome {
        let Some(s) = self.store.data().streams.get(&ctx) else { return Outcome::Reset };
        if s.local_sent || s.failed {
            return Outcome::LocalReply(self.client_response(s));
        }
        if s.reset {
            return Outcome::Reset;
        }
        if let Some(h) = &s.fwd_headers {
            return Outcome::Forwarded(Forwarded {
                headers: h.clone(),
                body: s.fwd_body.clone(),
                trailers: s.fwd_trailers.clone(),
                cluster: s.cluster.clone(),
                route_cache_clears: s.route_clears,
                complete: s.req_done,
                filter_state: self.snapshot_fs(s),
            });
        }
        Outcome::Paused
    }

    /// Drops a finished stream (so long runs do not grow memory), its filter state when no
    /// other stream shares it, and retires root contexts that were waiting for it.
    fn drop_if_finished(&mut self, ctx: u32) {
        let st = self.store.data_mut();
        if !st.streams.get(&ctx).is_some_and(|s| s.finished) {
            return;
        }
        let Some(s) = st.streams.remove(&ctx) else { return };
        if !st.streams.values().any(|o| o.fs_owner == s.fs_owner) && !st.streams.contains_key(&s.fs_owner) {
            st.filter_states.remove(&s.fs_owner);
        }
        self.reap_roots();
    }

    pub(crate) fn exchange(&mut self, ctx: u32) -> Exchange {
        let outcome = self.outcome(ctx);
        self.drop_if_finished(ctx);
        Exchange { ctx, outcome }
    }

    /// Re-reads a stream after time passed (a paused request may have moved on).
    pub fn poll(&mut self, ex: &Exchange) -> Exchange {
        self.run_due();
        if !self.store.data().streams.contains_key(&ex.ctx) {
            return ex.clone();
        }
        self.exchange(ex.ctx)
    }

    /// The live filter state of `ex`'s request (empty once the request is over; use the
    /// snapshots in [`Forwarded`] and [`Response`] then).
    pub fn filter_state(&self, ex: &Exchange) -> FilterState {
        match self.store.data().streams.get(&ex.ctx) {
            Some(s) => self.snapshot_fs(s),
            None => FilterState::new(),
        }
    }

    /// The upstream answers a forwarded request; returns what the client gets.
    pub fn respond(&mut self, ex: &Exchange, status: u16, headers: &[(&str, &str)], body: &[u8]) -> Response {
        let chunks: Vec<&[u8]> = if body.is_empty() { vec![] } else { vec![body] };
        self.respond_chunks(ex, status, headers, &chunks)
    }

    /// The upstream answers with a body in these chunks (e.g. SSE events).
    pub fn respond_chunks(&mut self, ex: &Exchange, status: u16, headers: &[(&str, &str)], chunks: &[&[u8]]) -> Response {
        let mut h: Headers = vec![(":status".into(), status.to_string())];
        h.extend(owned(headers));
        self.upstream(ex, h, chunks.iter().map(|c| c.to_vec()).collect(), status, "via_upstream", 0)
    }

    /// The upstream attempt fails as Envoy's router reports it (local reply 503/504 with
    /// `response.code_details` and `response.flags` set).
    pub fn respond_failure(&mut self, ex: &Exchange, failure: UpstreamFailure) -> Response {
        let (status, details, body, fl) = match failure {
            UpstreamFailure::ConnectFailure => (
                503,
                "upstream_reset_before_response_started{connection_failure}",
                "upstream connect error or disconnect/reset before headers. reset reason: connection failure",
                flags::UPSTREAM_CONNECTION_FAILURE,
            ),
            UpstreamFailure::Timeout => (504, "upstream_response_timeout", "upstream request timeout", flags::UPSTREAM_REQUEST_TIMEOUT),
        };
        let h = vec![
            (":status".to_string(), status.to_string()),
            ("content-length".to_string(), body.len().to_string()),
            ("content-type".to_string(), "text/plain".to_string()),
        ];
        self.upstream(ex, h, vec![body.as_bytes().to_vec()], status, details, fl)
    }

    fn upstream(&mut self, ex: &Exchange, headers: Headers, chunks: Vec<Vec<u8>>, status: u16, details: &str, fl: i64) -> Response {
        self.run_due();
        let ctx = ex.ctx;
        let ok = self.store.data().streams.get(&ctx).is_some_and(|s| s.fwd_headers.is_some() && !s.finished && !s.local_sent);
        if !ok {
            panic!("respond() on a request that was not forwarded (outcome: {})", describe(&self.outcome(ctx)));
        }
        let s = self.stream(ctx);
        s.upstream_responded = true;
        s.resp_headers = Some(headers);
        s.resp_code = Some(status as i64);
        s.code_details = Some(details.into());
        s.resp_flags = fl;
        self.encode(ctx, chunks);
        self.run_due();
        let r = match self.store.data().streams.get(&ctx) {
            Some(s) => self.client_response(s),
            None => Response::default(),
        };
        self.drop_if_finished(ctx);
        r
    }

    /// Sets a property of a live stream (e.g. `upstream.transport_failure_reason` before an
    /// upstream attempt ends without a response).
    pub fn set_stream_property(&mut self, ex: &Exchange, path: &str, value: impl Into<Vec<u8>>) {
        if let Some(s) = self.store.data_mut().streams.get_mut(&ex.ctx) {
            s.props.insert(path.into(), value.into());
        }
    }

    /// The client goes away before the stream ends: on_log / on_done / on_delete run.
    pub fn abort(&mut self, ex: &Exchange) {
        if self.store.data().streams.contains_key(&ex.ctx) {
            self.finish(ex.ctx);
            self.drop_if_finished(ex.ctx);
        }
    }
}

pub(crate) fn post_request(path: &str, key: &str, body: &str) -> Request {
    let auth = format!("Bearer {key}");
    let len = body.len().to_string();
    Request::new(&[
        (":method", "POST"),
        (":path", path),
        (":authority", "router.local"),
        (":scheme", "http"),
        ("authorization", &auth),
        ("content-type", "application/json"),
        ("content-length", &len),
    ])
    .body(body.as_bytes())
}
