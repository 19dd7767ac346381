//! The proxy-wasm ABI 0.2.1 host calls the filter makes, declared here rather than through the
//! SDK's `hostcalls`, which panic on any status they don't expect (a trap reloads the VM and kills
//! every stream on the worker). Each returns the raw status; `WasmHost` maps it to a `Result`.
//! The SDK still provides the exports (the dispatcher and the allocator the host fills buffers
//! with: a returned buffer is owned by us and freed as a `Vec`).

use crate::config::LogLevel;
use crate::host::{serialize_map, HeaderMap, Host, HostError, HostResult, MetricKind};
use crate::store::{SharedStore, StoreError};
use std::ptr::{null, null_mut};
use std::time::Duration;

const OK: u32 = 0;
const NOT_FOUND: u32 = 1;
const CAS_MISMATCH: u32 = 8;

const REQUEST_HEADERS: u32 = 0;
const RESPONSE_HEADERS: u32 = 2;
const HTTP_CALL_RESPONSE_HEADERS: u32 = 6;
const REQUEST_BODY: u32 = 0;
const RESPONSE_BODY: u32 = 1;
const HTTP_CALL_RESPONSE_BODY: u32 = 4;
const PLUGIN_CONFIGURATION: u32 = 7;
const GRPC_RECEIVE_BUFFER: u32 = 5;
const STREAM_HTTP_REQUEST: u32 = 0;

#[link(wasm_import_module = "env")]
extern "C" {
    fn proxy_log(level: u32, data: *const u8, size: usize) -> u32;
    fn proxy_get_current_time_nanoseconds(ret: *mut u64) -> u32;
    fn proxy_set_tick_period_milliseconds(period: u32) -> u32;
    fn proxy_get_buffer_bytes(kind: u32, start: usize, max: usize, ret_data: *mut *mut u8, ret_size: *mut usize) -> u32;
    fn proxy_get_header_map_pairs(map: u32, ret_data: *mut *mut u8, ret_size: *mut usize) -> u32;
    fn proxy_get_header_map_value(map: u32, key: *const u8, key_size: usize, ret_data: *mut *mut u8, ret_size: *mut usize) -> u32;
    fn proxy_replace_header_map_value(map: u32, key: *const u8, key_size: usize, value: *const u8, value_size: usize) -> u32;
    fn proxy_remove_header_map_value(map: u32, key: *const u8, key_size: usize) -> u32;
    fn proxy_get_property(path: *const u8, path_size: usize, ret_data: *mut *mut u8, ret_size: *mut usize) -> u32;
    fn proxy_set_property(path: *const u8, path_size: usize, value: *const u8, value_size: usize) -> u32;
    fn proxy_get_shared_data(key: *const u8, key_size: usize, ret_data: *mut *mut u8, ret_size: *mut usize, ret_cas: *mut u32) -> u32;
    fn proxy_set_shared_data(key: *const u8, key_size: usize, value: *const u8, value_size: usize, cas: u32) -> u32;
    #[allow(clippy::too_many_arguments)]
    fn proxy_send_local_response(
        status: u32,
        details: *const u8,
        details_size: usize,
        body: *const u8,
        body_size: usize,
        headers: *const u8,
        headers_size: usize,
        grpc_status: i32,
    ) -> u32;
    fn proxy_call_foreign_function(
        name: *const u8,
        name_size: usize,
        args: *const u8,
        args_size: usize,
        ret_data: *mut *mut u8,
        ret_size: *mut usize,
    ) -> u32;
    fn proxy_define_metric(kind: u32, name: *const u8, name_size: usize, ret_id: *mut u32) -> u32;
    fn proxy_increment_metric(id: u32, offset: i64) -> u32;
    fn proxy_record_metric(id: u32, value: u64) -> u32;
    fn proxy_continue_stream(stream: u32) -> u32;
    fn proxy_set_effective_context(context_id: u32) -> u32;
}

fn check(status: u32) -> HostResult<()> {
    if status == OK {
        Ok(())
    } else {
        Err(HostError(status))
    }
}

/// Takes ownership of a buffer the host allocated through the SDK's allocator.
///
/// # Safety
/// `data`/`size` must come from a host call that just returned `Ok` with them.
unsafe fn owned(data: *mut u8, size: usize) -> Vec<u8> {
    if data.is_null() {
        Vec::new()
    } else {
        Vec::from_raw_parts(data, size, size)
    }
}

fn get_buffer(kind: u32, start: usize, max: usize) -> HostResult<Vec<u8>> {
    let (mut data, mut size) = (null_mut(), 0usize);
    // SAFETY: out-pointers to locals; the buffer is ours after Ok.
    unsafe {
        match proxy_get_buffer_bytes(kind, start, max, &mut data, &mut size) {
            OK => Ok(owned(data, size)),
            NOT_FOUND => Ok(Vec::new()),
            s => Err(HostError(s)),
        }
    }
}

/// A whole header map in one call, read in place.
fn get_map_pairs(map: u32) -> HostResult<HeaderMap> {
    let (mut data, mut size) = (null_mut(), 0usize);
    // SAFETY: as in get_buffer.
    let bytes = unsafe {
        check(proxy_get_header_map_pairs(map, &mut data, &mut size))?;
        owned(data, size)
    };
    HeaderMap::parse(bytes)
}

fn get_map_value(map: u32, key: &str) -> HostResult<Option<Vec<u8>>> {
    let (mut data, mut size) = (null_mut(), 0usize);
    // SAFETY: as in get_buffer.
    unsafe {
        match proxy_get_header_map_value(map, key.as_ptr(), key.len(), &mut data, &mut size) {
            OK => Ok(Some(owned(data, size))),
            NOT_FOUND => Ok(None),
            s => Err(HostError(s)),
        }
    }
}

pub fn plugin_configuration() -> HostResult<Vec<u8>> {
    get_buffer(PLUGIN_CONFIGURATION, 0, usize::MAX)
}

pub fn set_tick_period(period: Duration) -> HostResult<()> {
    // SAFETY: plain value call.
    check(unsafe { proxy_set_tick_period_milliseconds(u32::try_from(period.as_millis()).unwrap_or(u32::MAX)) })
}

/// Makes `context_id` the context the following host calls act on (a root callback working on a
/// request, e.g. resuming one that waited for a key).
pub fn set_effective_context(context_id: u32) -> HostResult<()> {
    // SAFETY: plain value call.
    check(unsafe { proxy_set_effective_context(context_id) })
}

pub fn log(level: LogLevel, message: &str) {
    let level = match level {
        LogLevel::Debug => 1,
        LogLevel::Info => 2,
        LogLevel::Warn => 3,
        LogLevel::Error => 4,
    };
    // SAFETY: pointer and length of a live str.
    let _ = unsafe { proxy_log(level, message.as_ptr(), message.len()) };
}

pub fn now_ns() -> u64 {
    let mut ns = 0u64;
    // SAFETY: out-pointer to a local.
    match unsafe { proxy_get_current_time_nanoseconds(&mut ns) } {
        OK => ns,
        _ => 0,
    }
}

pub fn now_ms() -> u64 {
    now_ns() / 1_000_000
}

/// The host for every context: stateless, each call acts on the current context.
#[derive(Debug, Default, Clone, Copy)]
pub struct WasmHost;

impl SharedStore for WasmHost {
    fn get(&self, key: &str) -> Result<(Option<Vec<u8>>, u32), StoreError> {
        let (mut data, mut size, mut cas) = (null_mut(), 0usize, 0u32);
        // SAFETY: as in get_buffer.
        unsafe {
            match proxy_get_shared_data(key.as_ptr(), key.len(), &mut data, &mut size, &mut cas) {
                OK if data.is_null() => Ok((None, cas)),
                OK => Ok((Some(owned(data, size)), cas)),
                NOT_FOUND => Ok((None, 0)),
                s => Err(StoreError::Host(s)),
            }
        }
    }

    fn set(&self, key: &str, value: &[u8], cas: u32) -> Result<(), StoreError> {
        // SAFETY: pointers and lengths of live slices.
        match unsafe { proxy_set_shared_data(key.as_ptr(), key.len(), value.as_ptr(), value.len(), cas) } {
            OK => Ok(()),
            CAS_MISMATCH => Err(StoreError::CasMismatch),
            s => Err(StoreError::Host(s)),
        }
    }
}

impl Host for WasmHost {
    fn now_ms(&self) -> u64 {
        now_ms()
    }

    fn now_us(&self) -> u64 {
        now_ns() / 1000
    }

    fn log(&self, level: LogLevel, message: &str) {
        log(level, message)
    }

    fn request_headers(&self) -> HostResult<HeaderMap> {
        get_map_pairs(REQUEST_HEADERS)
    }

    fn set_request_header(&self, name: &str, value: Option<&[u8]>) -> HostResult<()> {
        // SAFETY: pointers and lengths of live slices.
        check(unsafe {
            match value {
                Some(v) => proxy_replace_header_map_value(REQUEST_HEADERS, name.as_ptr(), name.len(), v.as_ptr(), v.len()),
                None => proxy_remove_header_map_value(REQUEST_HEADERS, name.as_ptr(), name.len()),
            }
        })
    }

    fn request_body(&self, start: usize, len: usize) -> HostResult<Vec<u8>> {
        get_buffer(REQUEST_BODY, start, len)
    }

    fn response_headers(&self) -> HostResult<HeaderMap> {
        get_map_pairs(RESPONSE_HEADERS)
    }

    fn response_body(&self, start: usize, len: usize) -> HostResult<Vec<u8>> {
        get_buffer(RESPONSE_BODY, start, len)
    }

    fn set_response_header(&self, name: &str, value: Option<&[u8]>) -> HostResult<()> {
        // SAFETY: pointers and lengths of live slices.
        check(unsafe {
            match value {
                Some(v) => proxy_replace_header_map_value(RESPONSE_HEADERS, name.as_ptr(), name.len(), v.as_ptr(), v.len()),
                None => proxy_remove_header_map_value(RESPONSE_HEADERS, name.as_ptr(), name.len()),
            }
        })
    }

    fn set_property(&self, name: &str, value: &[u8]) -> HostResult<()> {
        // SAFETY: pointers and lengths of live slices.
        check(unsafe { proxy_set_property(name.as_ptr(), name.len(), value.as_ptr(), value.len()) })
    }

    fn property(&self, path: &[&str]) -> HostResult<Option<Vec<u8>>> {
        let serialized = path.join("\0");
        let (mut data, mut size) = (null_mut(), 0usize);
        // SAFETY: as in get_buffer.
        unsafe {
            match proxy_get_property(serialized.as_ptr(), serialized.len(), &mut data, &mut size) {
                OK if data.is_null() => Ok(None),
                OK => Ok(Some(owned(data, size))),
                NOT_FOUND => Ok(None),
                s => Err(HostError(s)),
            }
        }
    }

    fn send_reply(&self, status: u16, headers: &[(&str, &str)], body: &[u8]) -> HostResult<()> {
        let headers = serialize_map(headers);
        // SAFETY: pointers and lengths of live buffers.
        check(unsafe {
            proxy_send_local_response(status as u32, null(), 0, body.as_ptr(), body.len(), headers.as_ptr(), headers.len(), -1)
        })
    }

    fn clear_route_cache(&self) -> HostResult<()> {
        let name = "clear_route_cache";
        let (mut data, mut size) = (null_mut(), 0usize);
        // SAFETY: as in get_buffer; any returned buffer is freed.
        unsafe {
            let status = proxy_call_foreign_function(name.as_ptr(), name.len(), null(), 0, &mut data, &mut size);
            if status == OK {
                drop(owned(data, size));
            }
            check(status)
        }
    }

    fn define_metric(&self, kind: MetricKind, name: &str) -> HostResult<u32> {
        let kind = match kind {
            MetricKind::Counter => 0,
            MetricKind::Gauge => 1,
            MetricKind::Histogram => 2,
        };
        let mut id = 0u32;
        // SAFETY: pointer and length of a live str; out-pointer to a local.
        check(unsafe { proxy_define_metric(kind, name.as_ptr(), name.len(), &mut id) })?;
        Ok(id)
    }

    fn increment_metric(&self, id: u32, by: i64) {
        // SAFETY: plain value call.
        let _ = unsafe { proxy_increment_metric(id, by) };
    }

    fn record_metric(&self, id: u32, value: u64) {
        // SAFETY: plain value call.
        let _ = unsafe { proxy_record_metric(id, value) };
    }

    /// Through the SDK: its dispatcher must learn the token to route the reply to our context.
    /// (Its `hostcalls::dispatch_http_call` maps the statuses Envoy returns for a callout —
    /// `BadArgument` for an unknown cluster, `InternalFailure` — to errors.)
    fn dispatch_http_call(&self, cluster: &str, headers: &[(&str, &str)], timeout: Duration) -> HostResult<u32> {
        proxy_wasm::hostcalls::dispatch_http_call(cluster, headers.to_vec(), None, vec![], timeout).map_err(|s| HostError(s as u32))
    }

    fn http_call_response_header(&self, name: &str) -> HostResult<Option<Vec<u8>>> {
        get_map_value(HTTP_CALL_RESPONSE_HEADERS, name)
    }

    fn http_call_response_body(&self, start: usize, len: usize) -> HostResult<Vec<u8>> {
        get_buffer(HTTP_CALL_RESPONSE_BODY, start, len)
    }

    /// Through the SDK, like `dispatch_http_call`: it routes the reply to the calling context.
    /// (Envoy returns `ParseFailure` for an unknown cluster, `InternalFailure` otherwise.)
    fn dispatch_grpc_call(&self, cluster: &str, service: &str, method: &str, message: &[u8], timeout: Duration) -> HostResult<u32> {
        proxy_wasm::hostcalls::dispatch_grpc_call(cluster, service, method, vec![], Some(message), timeout).map_err(|s| HostError(s as u32))
    }

    fn grpc_response(&self, size: usize) -> HostResult<Vec<u8>> {
        get_buffer(GRPC_RECEIVE_BUFFER, 0, size)
    }

    fn resume_request(&self) -> HostResult<()> {
        // SAFETY: plain value call.
        check(unsafe { proxy_continue_stream(STREAM_HTTP_REQUEST) })
    }
}
