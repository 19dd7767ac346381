//! An in-memory [`Host`] for native tests of the request flows: headers, body, properties and
//! shared data as plain maps, every call recorded, any call made to fail on demand.

use crate::config::LogLevel;
use crate::host::{serialize_map, HeaderMap, Host, HostError, HostResult, MetricKind};
use crate::store::{MemStore, SharedStore, StoreError};
use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashMap};
use std::rc::Rc;
use std::time::Duration;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

/// A gRPC call a stream made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrpcCall {
    pub cluster: String,
    pub service: String,
    pub method: String,
    pub message: Vec<u8>,
}

/// One stream's host, over a store that several hosts (workers) may share.
#[derive(Default)]
pub struct MemHost {
    pub store: Rc<MemStore>,
    pub now_ms: Cell<u64>,
    pub request_headers: RefCell<Vec<(String, Vec<u8>)>>,
    pub request_body: RefCell<Vec<u8>>,
    pub response_headers: RefCell<Vec<(String, Vec<u8>)>>,
    /// The response body chunk the next `on_response_body` sees.
    pub response_chunk: RefCell<Vec<u8>>,
    pub properties: RefCell<HashMap<String, Vec<u8>>>,
    pub reply: RefCell<Option<Reply>>,
    pub route_cache_cleared: Cell<u32>,
    pub logs: RefCell<Vec<(LogLevel, String)>>,
    /// Metric name → (kind, value).
    pub metrics: RefCell<BTreeMap<String, (MetricKind, i64)>>,
    metric_names: RefCell<Vec<String>>,
    /// Host calls (by name, e.g. "set_request_header") that fail with status 10 from now on.
    pub failing: RefCell<Vec<&'static str>>,
    /// Number of host calls made, by name.
    pub calls: RefCell<BTreeMap<&'static str, u32>>,
    /// Body bytes copied out, and the largest single copy.
    pub body_bytes_read: Cell<usize>,
    pub largest_body_read: Cell<usize>,
    pub grpc_calls: RefCell<Vec<GrpcCall>>,
    /// The reply message `grpc_response` returns.
    pub grpc_reply: RefCell<Vec<u8>>,
    pub resumed: Cell<u32>,
}

impl MemHost {
    pub fn new(store: Rc<MemStore>) -> MemHost {
        MemHost { store, ..MemHost::default() }
    }

    pub fn with_request(self, headers: &[(&str, &str)], body: &[u8]) -> MemHost {
        *self.request_headers.borrow_mut() = headers.iter().map(|(k, v)| (k.to_string(), v.as_bytes().to_vec())).collect();
        *self.request_body.borrow_mut() = body.to_vec();
        self
    }

    fn call(&self, name: &'static str) -> HostResult<()> {
        *self.calls.borrow_mut().entry(name).or_default() += 1;
        if self.failing.borrow().contains(&name) {
            return Err(HostError(10));
        }
        Ok(())
    }

    pub fn header(&self, name: &str) -> Option<String> {
        self.request_headers.borrow().iter().find(|(k, _)| k == name).map(|(_, v)| String::from_utf8_lossy(v).into_owned())
    }

    /// The credential the filter routed the request to (the filter state the route reads).
    pub fn routed_to(&self) -> Option<String> {
        self.properties.borrow().get(crate::retry_contract::NEXT_PROPERTY).map(|v| String::from_utf8_lossy(v).into_owned())
    }

    pub fn metric(&self, name: &str) -> i64 {
        self.metrics.borrow().get(name).map_or(0, |(_, v)| *v)
    }
}

/// Replaces (`Some`) or removes (`None`) every `name` header, as Envoy's header maps do.
fn set_header(headers: &mut Vec<(String, Vec<u8>)>, name: &str, value: Option<&[u8]>) {
    headers.retain(|(k, _)| k != name);
    if let Some(v) = value {
        headers.push((name.to_string(), v.to_vec()));
    }
}

/// Headers as the host hands them over (the ABI's serialized map).
fn as_map(headers: &[(String, Vec<u8>)]) -> HostResult<HeaderMap> {
    let map: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (k.as_str(), std::str::from_utf8(v).unwrap_or("\u{fffd}"))).collect();
    HeaderMap::parse(serialize_map(&map))
}

impl SharedStore for MemHost {
    fn get(&self, key: &str) -> Result<(Option<Vec<u8>>, u32), StoreError> {
        self.call("get_shared_data").map_err(|e| StoreError::Host(e.0))?;
        self.store.get(key)
    }

    fn set(&self, key: &str, value: &[u8], cas: u32) -> Result<(), StoreError> {
        self.call("set_shared_data").map_err(|e| StoreError::Host(e.0))?;
        self.store.set(key, value, cas)
    }
}

impl Host for MemHost {
    fn now_ms(&self) -> u64 {
        self.now_ms.get()
    }

    fn log(&self, level: LogLevel, message: &str) {
        self.logs.borrow_mut().push((level, message.to_string()));
    }

    fn request_headers(&self) -> HostResult<HeaderMap> {
        self.call("request_headers")?;
        as_map(&self.request_headers.borrow())
    }

    fn set_request_header(&self, name: &str, value: Option<&[u8]>) -> HostResult<()> {
        self.call("set_request_header")?;
        set_header(&mut self.request_headers.borrow_mut(), name, value);
        Ok(())
    }

    fn request_body(&self, start: usize, len: usize) -> HostResult<Vec<u8>> {
        self.call("request_body")?;
        let b = self.request_body.borrow();
        let end = start.saturating_add(len).min(b.len());
        let out = b.get(start.min(end)..end).unwrap_or_default().to_vec();
        self.body_bytes_read.set(self.body_bytes_read.get() + out.len());
        self.largest_body_read.set(self.largest_body_read.get().max(out.len()));
        Ok(out)
    }

    fn response_headers(&self) -> HostResult<HeaderMap> {
        self.call("response_headers")?;
        as_map(&self.response_headers.borrow())
    }

    fn response_body(&self, start: usize, len: usize) -> HostResult<Vec<u8>> {
        self.call("response_body")?;
        let b = self.response_chunk.borrow();
        let end = start.saturating_add(len).min(b.len());
        Ok(b.get(start.min(end)..end).unwrap_or_default().to_vec())
    }

    fn set_response_header(&self, name: &str, value: Option<&[u8]>) -> HostResult<()> {
        self.call("set_response_header")?;
        set_header(&mut self.response_headers.borrow_mut(), name, value);
        Ok(())
    }

    fn set_property(&self, name: &str, value: &[u8]) -> HostResult<()> {
        self.call("set_property")?;
        self.properties.borrow_mut().insert(name.to_string(), value.to_vec());
        Ok(())
    }

    fn property(&self, path: &[&str]) -> HostResult<Option<Vec<u8>>> {
        self.call("property")?;
        Ok(self.properties.borrow().get(&path.join(".")).cloned())
    }

    fn send_reply(&self, status: u16, headers: &[(&str, &str)], body: &[u8]) -> HostResult<()> {
        self.call("send_reply")?;
        let headers = headers.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        *self.reply.borrow_mut() = Some(Reply { status, headers, body: String::from_utf8_lossy(body).into_owned() });
        Ok(())
    }

    fn clear_route_cache(&self) -> HostResult<()> {
        self.call("clear_route_cache")?;
        self.route_cache_cleared.set(self.route_cache_cleared.get() + 1);
        Ok(())
    }

    fn define_metric(&self, kind: MetricKind, name: &str) -> HostResult<u32> {
        self.call("define_metric")?;
        let mut names = self.metric_names.borrow_mut();
        let id = names.iter().position(|n| n == name).unwrap_or_else(|| {
            names.push(name.to_string());
            names.len() - 1
        });
        self.metrics.borrow_mut().entry(name.to_string()).or_insert((kind, 0));
        Ok(id as u32)
    }

    fn increment_metric(&self, id: u32, by: i64) {
        if let Some(name) = self.metric_names.borrow().get(id as usize) {
            if let Some((_, v)) = self.metrics.borrow_mut().get_mut(name) {
                *v += by;
            }
        }
    }

    fn record_metric(&self, id: u32, value: u64) {
        if let Some(name) = self.metric_names.borrow().get(id as usize) {
            if let Some((_, v)) = self.metrics.borrow_mut().get_mut(name) {
                *v = value as i64;
            }
        }
    }

    fn dispatch_http_call(&self, _cluster: &str, _headers: &[(&str, &str)], _timeout: Duration) -> HostResult<u32> {
        self.call("dispatch_http_call")?;
        Ok(1)
    }

    fn http_call_response_header(&self, _name: &str) -> HostResult<Option<Vec<u8>>> {
        self.call("http_call_response_header")?;
        Ok(None)
    }

    fn http_call_response_body(&self, _start: usize, _len: usize) -> HostResult<Vec<u8>> {
        self.call("http_call_response_body")?;
        Ok(vec![])
    }

    fn dispatch_grpc_call(&self, cluster: &str, service: &str, method: &str, message: &[u8], _timeout: Duration) -> HostResult<u32> {
        self.call("dispatch_grpc_call")?;
        let mut calls = self.grpc_calls.borrow_mut();
        calls.push(GrpcCall { cluster: cluster.into(), service: service.into(), method: method.into(), message: message.to_vec() });
        Ok(calls.len() as u32)
    }

    fn grpc_response(&self, size: usize) -> HostResult<Vec<u8>> {
        self.call("grpc_response")?;
        let b = self.grpc_reply.borrow();
        Ok(b.get(..size.min(b.len())).unwrap_or_default().to_vec())
    }

    fn resume_request(&self) -> HostResult<()> {
        self.call("resume_request")?;
        self.resumed.set(self.resumed.get() + 1);
        Ok(())
    }
}
