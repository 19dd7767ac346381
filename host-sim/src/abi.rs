//! The `env` (proxy-wasm ABI 0.2.1) and `wasi_snapshot_preview1` imports, written by hand.
//! Status codes follow Envoy / proxy-wasm cpp-host (the Rust SDK panics on unexpected ones).

use crate::state::{status::*, GrpcCallRecord, HttpCallRecord, LogLevel, MetricType, SharedQueue};
use crate::vm::{GrpcResult, Phase, VmState};
use wasmtime::{Caller, Extern, Linker, Memory, Result};

type C<'a> = Caller<'a, VmState>;

fn memory(c: &mut C<'_>) -> Result<Memory> {
    if let Some(m) = c.data().memory {
        return Ok(m);
    }
    match c.get_export("memory") {
        Some(Extern::Memory(m)) => {
            c.data_mut().memory = Some(m);
            Ok(m)
        }
        _ => wasmtime::bail!("module exports no memory"),
    }
}

pub(crate) fn read(c: &mut C<'_>, ptr: i32, len: i32) -> Result<Vec<u8>> {
    if len == 0 {
        return Ok(Vec::new());
    }
    let m = memory(c)?;
    let (p, l) = (ptr as u32 as usize, len as u32 as usize);
    let data = m.data(&*c);
    match data.get(p..p + l) {
        Some(s) => Ok(s.to_vec()),
        None => wasmtime::bail!("out-of-bounds read {p}+{l}"),
    }
}

fn read_str(c: &mut C<'_>, ptr: i32, len: i32) -> Result<String> {
    Ok(String::from_utf8_lossy(&read(c, ptr, len)?).into_owned())
}

fn write(c: &mut C<'_>, ptr: i32, bytes: &[u8]) -> Result<()> {
    let m = memory(c)?;
    let p = ptr as u32 as usize;
    match m.data_mut(&mut *c).get_mut(p..p + bytes.len()) {
        Some(s) => {
            s.copy_from_slice(bytes);
            Ok(())
        }
        None => wasmtime::bail!("out-of-bounds write {p}+{}", bytes.len()),
    }
}

fn write_u32(c: &mut C<'_>, ptr: i32, v: u32) -> Result<()> {
    write(c, ptr, &v.to_le_bytes())
}

fn write_u64(c: &mut C<'_>, ptr: i32, v: u64) -> Result<()> {
    write(c, ptr, &v.to_le_bytes())
}

/// Allocates `bytes` in the module (`malloc`, else `proxy_on_memory_allocate`, as cpp-host)
/// and stores pointer and size; an empty value is a null pointer and size 0 (cpp-host's
/// `copyToPointerSize`).
fn give(c: &mut C<'_>, bytes: &[u8], ptr_ptr: i32, size_ptr: i32) -> Result<()> {
    let mut ptr = 0u32;
    if !bytes.is_empty() {
        let malloc = match c.data().malloc.clone() {
            Some(f) => f,
            None => wasmtime::bail!("module exports neither malloc nor proxy_on_memory_allocate"),
        };
        c.data_mut().stats.allocations += 1;
        ptr = malloc.call(&mut *c, bytes.len() as i32)? as u32;
        if ptr == 0 {
            wasmtime::bail!("allocation of {} bytes failed", bytes.len());
        }
        write(c, ptr as i32, bytes)?;
    }
    write_u32(c, ptr_ptr, ptr)?;
    write_u32(c, size_ptr, bytes.len() as u32)
}

pub(crate) fn encode_pairs(pairs: &[(String, String)]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&(pairs.len() as u32).to_le_bytes());
    for (k, v) in pairs {
        out.extend_from_slice(&(k.len() as u32).to_le_bytes());
        out.extend_from_slice(&(v.len() as u32).to_le_bytes());
    }
    for (k, v) in pairs {
        out.extend_from_slice(k.as_bytes());
        out.push(0);
        out.extend_from_slice(v.as_bytes());
        out.push(0);
    }
    out
}

pub(crate) fn decode_pairs(b: &[u8]) -> Option<Vec<(String, String)>> {
    if b.is_empty() {
        return Some(Vec::new());
    }
    let u32_at = |i: usize| -> Option<usize> { Some(u32::from_le_bytes(b.get(i..i + 4)?.try_into().ok()?) as usize) };
    let n = u32_at(0)?;
    let mut sizes = Vec::with_capacity(n);
    for i in 0..n {
        sizes.push((u32_at(4 + i * 8)?, u32_at(8 + i * 8)?));
    }
    let mut p = 4 + n * 8;
    let mut out = Vec::with_capacity(n);
    for (kl, vl) in sizes {
        let k = b.get(p..p + kl)?;
        p += kl + 1;
        let v = b.get(p..p + vl)?;
        p += vl + 1;
        out.push((String::from_utf8_lossy(k).into_owned(), String::from_utf8_lossy(v).into_owned()));
    }
    Some(out)
}

/// Pairs with byte values (gRPC initial metadata), same layout as [`decode_pairs`].
fn decode_pairs_bytes(b: &[u8]) -> Option<Vec<(String, Vec<u8>)>> {
    if b.is_empty() {
        return Some(Vec::new());
    }
    let u32_at = |i: usize| -> Option<usize> { Some(u32::from_le_bytes(b.get(i..i + 4)?.try_into().ok()?) as usize) };
    let n = u32_at(0)?;
    let mut p = 4 + n * 8;
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let (kl, vl) = (u32_at(4 + i * 8)?, u32_at(8 + i * 8)?);
        let k = b.get(p..p + kl)?;
        p += kl + 1;
        let v = b.get(p..p + vl)?;
        p += vl + 1;
        out.push((String::from_utf8_lossy(k).into_owned(), v.to_vec()));
    }
    Some(out)
}

/// `envoy.source.extensions.common.wasm.SetEnvoyFilterStateArguments` (path = 1, value = 2,
/// span = 3): (path, value); the life span is accepted and ignored.
pub(crate) fn decode_filter_state_args(b: &[u8]) -> Option<(String, Vec<u8>)> {
    fn varint(b: &[u8], p: &mut usize) -> Option<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = *b.get(*p)?;
            *p += 1;
            v |= ((byte & 0x7f) as u64) << shift;
            if byte & 0x80 == 0 {
                return Some(v);
            }
        }
        None
    }
    let (mut path, mut value, mut p) = (String::new(), Vec::new(), 0);
    while p < b.len() {
        let tag = varint(b, &mut p)?;
        match (tag >> 3, tag & 7) {
            (f, 2) => {
                let n = varint(b, &mut p)? as usize;
                let bytes = b.get(p..p.checked_add(n)?)?;
                p += n;
                match f {
                    1 => path = String::from_utf8(bytes.to_vec()).ok()?,
                    2 => value = bytes.to_vec(),
                    _ => {}
                }
            }
            (_, 0) => {
                varint(b, &mut p)?;
            }
            (_, 5) => p += 4,
            (_, 1) => p += 8,
            _ => return None,
        }
    }
    Some((path, value))
}

/// Every `env` import this host provides (an import outside this list and the WASI list is
/// rejected at load).
pub const ENV_IMPORTS: &[&str] = &[
    "proxy_log",
    "proxy_get_log_level",
    "proxy_get_current_time_nanoseconds",
    "proxy_set_tick_period_milliseconds",
    "proxy_get_buffer_bytes",
    "proxy_set_buffer_bytes",
    "proxy_get_buffer_status",
    "proxy_get_header_map_pairs",
    "proxy_set_header_map_pairs",
    "proxy_get_header_map_value",
    "proxy_remove_header_map_value",
    "proxy_replace_header_map_value",
    "proxy_add_header_map_value",
    "proxy_get_header_map_size",
    "proxy_get_property",
    "proxy_set_property",
    "proxy_get_shared_data",
    "proxy_set_shared_data",
    "proxy_register_shared_queue",
    "proxy_resolve_shared_queue",
    "proxy_dequeue_shared_queue",
    "proxy_enqueue_shared_queue",
    "proxy_continue_stream",
    "proxy_close_stream",
    "proxy_continue_request",
    "proxy_continue_response",
    "proxy_clear_route_cache",
    "proxy_send_local_response",
    "proxy_http_call",
    "proxy_grpc_call",
    "proxy_grpc_stream",
    "proxy_grpc_send",
    "proxy_grpc_cancel",
    "proxy_grpc_close",
    "proxy_get_status",
    "proxy_set_effective_context",
    "proxy_call_foreign_function",
    "proxy_done",
    "proxy_define_metric",
    "proxy_get_metric",
    "proxy_record_metric",
    "proxy_increment_metric",
];

pub const WASI_IMPORTS: &[&str] = &[
    "fd_write",
    "environ_get",
    "environ_sizes_get",
    "proc_exit",
    "clock_time_get",
    "random_get",
    "args_get",
    "args_sizes_get",
    "sched_yield",
    "fd_close",
    "fd_fdstat_get",
    "fd_seek",
];

pub(crate) fn link(linker: &mut Linker<VmState>) -> Result<()> {
    let env = "env";

    // ---- logging, time, tick
    linker.func_wrap(env, "proxy_log", |mut c: C<'_>, level: i32, p: i32, l: i32| -> Result<i32> {
        let msg = read_str(&mut c, p, l)?;
        let Some(level) = LogLevel::from_i32(level) else { return Ok(BAD_ARGUMENT) };
        let vm = c.data().index;
        c.data().host.log(vm, level, msg);
        Ok(OK)
    })?;
    linker.func_wrap(env, "proxy_get_log_level", |mut c: C<'_>, ret: i32| -> Result<i32> {
        let lvl = *c.data().host.log_level.lock().unwrap() as u32;
        write_u32(&mut c, ret, lvl)?;
        Ok(OK)
    })?;
    linker.func_wrap(env, "proxy_get_current_time_nanoseconds", |mut c: C<'_>, ret: i32| -> Result<i32> {
        let now = c.data().host.now_ns();
        write_u64(&mut c, ret, now)?;
        Ok(OK)
    })?;
    linker.func_wrap(env, "proxy_set_tick_period_milliseconds", |mut c: C<'_>, period: i32| -> Result<i32> {
        let st = c.data_mut();
        let ctx = st.effective_ctx();
        let root = st.root_of(ctx);
        let now = st.host.now_ns();
        let period = period as u32 as u64;
        if period == 0 {
            st.ticks.remove(&root);
        } else {
            st.ticks.insert(root, (period, now + period * 1_000_000));
        }
        Ok(OK)
    })?;

    // ---- buffers
    linker.func_wrap(env, "proxy_get_buffer_bytes", |mut c: C<'_>, ty: i32, start: i32, max: i32, pp: i32, sp: i32| -> Result<i32> {
        let Some(buf) = c.data().buffer(ty) else { return Ok(NOT_FOUND) };
        let (start, mut len) = (start as u32 as usize, max as u32 as usize);
        if start.checked_add(len).is_none() {
            return Ok(BAD_ARGUMENT);
        }
        if start > buf.len() {
            return Ok(BAD_ARGUMENT);
        }
        if start + len > buf.len() {
            len = buf.len() - start;
        }
        if len > 0 {
            let slice = buf[start..start + len].to_vec();
            give(&mut c, &slice, pp, sp)?;
        }
        Ok(OK)
    })?;
    linker.func_wrap(env, "proxy_set_buffer_bytes", |mut c: C<'_>, ty: i32, start: i32, len: i32, dp: i32, dl: i32| -> Result<i32> {
        let data = read(&mut c, dp, dl)?;
        Ok(c.data_mut().set_buffer(ty, start as u32 as usize, len as u32 as usize, &data))
    })?;
    linker.func_wrap(env, "proxy_get_buffer_status", |mut c: C<'_>, ty: i32, lp: i32, fp: i32| -> Result<i32> {
        let Some(buf) = c.data().buffer(ty) else { return Ok(NOT_FOUND) };
        let n = buf.len() as u32;
        write_u32(&mut c, lp, n)?;
        write_u32(&mut c, fp, 0)?;
        Ok(OK)
    })?;

    // ---- header maps
    linker.func_wrap(env, "proxy_get_header_map_pairs", |mut c: C<'_>, ty: i32, pp: i32, sp: i32| -> Result<i32> {
        let bytes = match c.data().map(ty) {
            Ok(m) => encode_pairs(m),
            Err(s) => return Ok(s),
        };
        give(&mut c, &bytes, pp, sp)?;
        Ok(OK)
    })?;
    linker.func_wrap(env, "proxy_set_header_map_pairs", |mut c: C<'_>, ty: i32, p: i32, l: i32| -> Result<i32> {
        let bytes = read(&mut c, p, l)?;
        let Some(pairs) = decode_pairs(&bytes) else { return Ok(BAD_ARGUMENT) };
        Ok(c.data_mut().with_map(ty, |m| {
            m.clear();
            for (k, v) in pairs {
                m.push((k.to_ascii_lowercase(), v));
            }
        }))
    })?;
    linker.func_wrap(env, "proxy_get_header_map_value", |mut c: C<'_>, ty: i32, kp: i32, kl: i32, vp: i32, vl: i32| -> Result<i32> {
        let key = read_str(&mut c, kp, kl)?.to_ascii_lowercase();
        let value = match c.data().map(ty) {
            Ok(m) => m.iter().find(|(k, _)| *k == key).map(|(_, v)| v.clone()),
            Err(s) => return Ok(s),
        };
        match value {
            None => Ok(NOT_FOUND),
            Some(v) => {
                give(&mut c, v.as_bytes(), vp, vl)?;
                Ok(OK)
            }
        }
    })?;
    linker.func_wrap(env, "proxy_remove_header_map_value", |mut c: C<'_>, ty: i32, kp: i32, kl: i32| -> Result<i32> {
        let key = read_str(&mut c, kp, kl)?.to_ascii_lowercase();
        Ok(c.data_mut().with_map(ty, |m| m.retain(|(k, _)| *k != key)))
    })?;
    linker.func_wrap(
        env,
        "proxy_replace_header_map_value",
        |mut c: C<'_>, ty: i32, kp: i32, kl: i32, vp: i32, vl: i32| -> Result<i32> {
            let key = read_str(&mut c, kp, kl)?.to_ascii_lowercase();
            let value = read_str(&mut c, vp, vl)?;
            Ok(c.data_mut().with_map(ty, |m| {
                // Envoy's setCopy: replace the first entry, drop the others; add if absent.
                if let Some(i) = m.iter().position(|(k, _)| *k == key) {
                    m[i].1 = value;
                    let mut seen = false;
                    m.retain(|(k, _)| {
                        if *k != key {
                            return true;
                        }
                        let keep = !seen;
                        seen = true;
                        keep
                    });
                } else {
                    m.push((key, value));
                }
            }))
        },
    )?;
    linker.func_wrap(env, "proxy_add_header_map_value", |mut c: C<'_>, ty: i32, kp: i32, kl: i32, vp: i32, vl: i32| -> Result<i32> {
        let key = read_str(&mut c, kp, kl)?.to_ascii_lowercase();
        let value = read_str(&mut c, vp, vl)?;
        Ok(c.data_mut().with_map(ty, |m| m.push((key, value))))
    })?;
    linker.func_wrap(env, "proxy_get_header_map_size", |mut c: C<'_>, ty: i32, sp: i32| -> Result<i32> {
        let size = match c.data().map(ty) {
            Ok(m) => m.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>(),
            Err(s) => return Ok(s),
        };
        write_u32(&mut c, sp, size as u32)?;
        Ok(OK)
    })?;

    // ---- properties
    linker.func_wrap(env, "proxy_get_property", |mut c: C<'_>, pp: i32, pl: i32, vp: i32, vl: i32| -> Result<i32> {
        let path = read(&mut c, pp, pl)?;
        let key = path_key(&path);
        match c.data().property(&key) {
            None => Ok(NOT_FOUND),
            Some(v) => {
                give(&mut c, &v, vp, vl)?;
                Ok(OK)
            }
        }
    })?;
    linker.func_wrap(env, "proxy_set_property", |mut c: C<'_>, pp: i32, pl: i32, vp: i32, vl: i32| -> Result<i32> {
        let path = read(&mut c, pp, pl)?;
        let value = read(&mut c, vp, vl)?;
        let key = path_key(&path);
        Ok(c.data_mut().set_property(key, value))
    })?;

    // ---- shared data (cpp-host SharedData: one mutex, global CAS counter)
    linker.func_wrap(env, "proxy_get_shared_data", |mut c: C<'_>, kp: i32, kl: i32, vp: i32, vl: i32, casp: i32| -> Result<i32> {
        let key = read_str(&mut c, kp, kl)?;
        let host = c.data().host.clone();
        let found = host.shared.lock().unwrap().map.get(&key).cloned();
        // A point where another worker may run (see Host::set_preempt): after any read, also
        // of a key not created yet (two workers may both see it absent).
        let Some((value, cas)) = found else {
            host.preempt();
            return Ok(NOT_FOUND);
        };
        give(&mut c, &value, vp, vl)?;
        write_u32(&mut c, casp, cas)?;
        host.preempt();
        Ok(OK)
    })?;
    linker.func_wrap(env, "proxy_set_shared_data", |mut c: C<'_>, kp: i32, kl: i32, vp: i32, vl: i32, cas: i32| -> Result<i32> {
        let key = read_str(&mut c, kp, kl)?;
        let value = read(&mut c, vp, vl)?;
        let host = c.data().host.clone();
        let mut sd = host.shared.lock().unwrap();
        let cas = cas as u32;
        if let Some((_, cur)) = sd.map.get(&key) {
            if cas != 0 && cas != *cur {
                return Ok(CAS_MISMATCH);
            }
        }
        let next = sd.next_cas();
        sd.map.insert(key, (value, next));
        drop(sd);
        c.data_mut().stats.shared_sets += 1;
        Ok(OK)
    })?;

    // ---- shared queues
    linker.func_wrap(env, "proxy_register_shared_queue", |mut c: C<'_>, np: i32, nl: i32, rp: i32| -> Result<i32> {
        let name = read_str(&mut c, np, nl)?;
        let (vm, ctx, host) = (c.data().index, c.data().effective_ctx(), c.data().host.clone());
        let token = {
            let mut q = host.queues.lock().unwrap();
            let key = (String::new(), name);
            if let Some(t) = q.by_name.get(&key).copied() {
                let e = q.queues.get_mut(&t).unwrap();
                e.owner_vm = vm;
                e.owner_ctx = ctx;
                t
            } else {
                let t = q.next_token;
                q.next_token += 1;
                q.by_name.insert(key, t);
                q.queues.insert(t, SharedQueue { owner_vm: vm, owner_ctx: ctx, items: Default::default() });
                t
            }
        };
        write_u32(&mut c, rp, token)?;
        Ok(OK)
    })?;
    linker.func_wrap(env, "proxy_resolve_shared_queue", |mut c: C<'_>, _vp: i32, _vl: i32, np: i32, nl: i32, rp: i32| -> Result<i32> {
        // One vm_id per host: the vm_id argument is accepted and ignored.
        let name = read_str(&mut c, np, nl)?;
        let t = c.data().host.queues.lock().unwrap().by_name.get(&(String::new(), name)).copied();
        match t {
            None => Ok(NOT_FOUND),
            Some(t) => {
                write_u32(&mut c, rp, t)?;
                Ok(OK)
            }
        }
    })?;
    linker.func_wrap(env, "proxy_dequeue_shared_queue", |mut c: C<'_>, token: i32, vp: i32, vl: i32| -> Result<i32> {
        let item = {
            let host = c.data().host.clone();
            let mut q = host.queues.lock().unwrap();
            match q.queues.get_mut(&(token as u32)) {
                None => return Ok(NOT_FOUND),
                Some(e) => e.items.pop_front(),
            }
        };
        match item {
            None => Ok(EMPTY),
            Some(v) => {
                give(&mut c, &v, vp, vl)?;
                Ok(OK)
            }
        }
    })?;
    linker.func_wrap(env, "proxy_enqueue_shared_queue", |mut c: C<'_>, token: i32, vp: i32, vl: i32| -> Result<i32> {
        let v = read(&mut c, vp, vl)?;
        let host = c.data().host.clone();
        let mut q = host.queues.lock().unwrap();
        let Some(e) = q.queues.get_mut(&(token as u32)) else { return Ok(NOT_FOUND) };
        e.items.push_back(v);
        let n = (e.owner_vm, e.owner_ctx, token as u32);
        q.ready.push(n);
        Ok(OK)
    })?;

    // ---- stream control
    linker.func_wrap(env, "proxy_continue_stream", |mut c: C<'_>, ty: i32| -> Result<i32> { Ok(c.data_mut().continue_stream(ty)) })?;
    linker.func_wrap(env, "proxy_close_stream", |mut c: C<'_>, ty: i32| -> Result<i32> { Ok(c.data_mut().close_stream(ty)) })?;
    linker.func_wrap(env, "proxy_continue_request", |mut c: C<'_>| -> Result<i32> { Ok(c.data_mut().continue_stream(0)) })?;
    linker.func_wrap(env, "proxy_continue_response", |mut c: C<'_>| -> Result<i32> { Ok(c.data_mut().continue_stream(1)) })?;
    linker.func_wrap(env, "proxy_clear_route_cache", |mut c: C<'_>| -> Result<i32> {
        c.data_mut().clear_route_cache();
        Ok(OK)
    })?;
    linker.func_wrap(
        env,
        "proxy_send_local_response",
        |mut c: C<'_>, code: i32, dp: i32, dl: i32, bp: i32, bl: i32, hp: i32, hl: i32, grpc: i32| -> Result<i32> {
            let details = read_str(&mut c, dp, dl)?;
            let body = read(&mut c, bp, bl)?;
            let hdrs = read(&mut c, hp, hl)?;
            let Some(headers) = decode_pairs(&hdrs) else { return Ok(BAD_ARGUMENT) };
            Ok(c.data_mut().send_local_response(code as u32, details, body, headers, grpc))
        },
    )?;

    // ---- HTTP callouts
    linker.func_wrap(
        env,
        "proxy_http_call",
        |mut c: C<'_>, up: i32, ul: i32, hp: i32, hl: i32, bp: i32, bl: i32, _tp: i32, _tl: i32, timeout: i32, rp: i32| -> Result<i32> {
            let cluster = read_str(&mut c, up, ul)?;
            let hbytes = read(&mut c, hp, hl)?;
            let body = read(&mut c, bp, bl)?;
            let Some(headers) = decode_pairs(&hbytes) else { return Ok(BAD_ARGUMENT) };
            let host = c.data().host.clone();
            let reply = host.scripts.lock().unwrap().http(&cluster);
            // Envoy: an unknown cluster is BadArgument; so is a call missing :method/:path/:authority.
            let Some(reply) = reply else {
                host.log(c.data().index, LogLevel::Warn, format!("host-sim: http_call to unknown cluster {cluster:?}"));
                return Ok(BAD_ARGUMENT);
            };
            let has = |n: &str| headers.iter().any(|(k, _)| k.eq_ignore_ascii_case(n));
            if !has(":method") || !has(":path") || !(has(":authority") || has("host")) {
                return Ok(BAD_ARGUMENT);
            }
            let now = host.now_ns();
            host.calls.lock().unwrap().push(HttpCallRecord {
                vm: c.data().index,
                cluster,
                headers,
                body,
                timeout_ms: timeout as u32,
                at_ms: now / 1_000_000,
            });
            let token = c.data_mut().add_http_call(reply, timeout as u32);
            write_u32(&mut c, rp, token)?;
            Ok(OK)
        },
    )?;
    // ---- gRPC (unary calls scripted per cluster; streams are not simulated)
    linker.func_wrap(
        env,
        "proxy_grpc_call",
        |mut c: C<'_>,
         up: i32,
         ul: i32,
         sp: i32,
         sl: i32,
         mp: i32,
         ml: i32,
         hp: i32,
         hl: i32,
         bp: i32,
         bl: i32,
         timeout: i32,
         rp: i32|
         -> Result<i32> {
            // Envoy parses `upstream` as a GrpcService proto, else takes it as a cluster name.
            let cluster = read_str(&mut c, up, ul)?;
            let service = read_str(&mut c, sp, sl)?;
            let method = read_str(&mut c, mp, ml)?;
            let meta = read(&mut c, hp, hl)?;
            let message = read(&mut c, bp, bl)?;
            let Some(initial_metadata) = decode_pairs_bytes(&meta) else { return Ok(BAD_ARGUMENT) };
            let host = c.data().host.clone();
            let reply = host.scripts.lock().unwrap().grpc(&cluster);
            // Envoy: no such cluster is ParseFailure (kept for ABI 0.1 callers).
            let Some(reply) = reply else {
                host.log(c.data().index, LogLevel::Warn, format!("host-sim: grpc_call to unknown cluster {cluster:?}"));
                return Ok(PARSE_FAILURE);
            };
            let token = c.data_mut().add_grpc_call(reply, timeout as u32);
            let now = host.now_ns();
            host.grpc_calls.lock().unwrap().push(GrpcCallRecord {
                vm: c.data().index,
                token,
                cluster,
                service,
                method,
                initial_metadata,
                message,
                timeout_ms: timeout as u32,
                at_ms: now / 1_000_000,
            });
            write_u32(&mut c, rp, token)?;
            Ok(OK)
        },
    )?;
    // gRPC streams are not simulated: InternalFailure (the SDK returns it as an error).
    linker.func_wrap(
        env,
        "proxy_grpc_stream",
        |c: C<'_>, _a: i32, _b: i32, _d: i32, _e: i32, _f: i32, _g: i32, _h: i32, _i: i32, _j: i32| -> Result<i32> {
            c.data().host.log(c.data().index, LogLevel::Warn, "host-sim: gRPC streams are not simulated".into());
            Ok(INTERNAL_FAILURE)
        },
    )?;
    linker.func_wrap(env, "proxy_grpc_send", |_c: C<'_>, t: i32, _p: i32, _l: i32, _e: i32| -> Result<i32> {
        // Envoy: sending on a unary call token is BadArgument; no streams exist here.
        Ok(if t & 1 == 1 { BAD_ARGUMENT } else { NOT_FOUND })
    })?;
    linker.func_wrap(env, "proxy_grpc_cancel", |mut c: C<'_>, t: i32| -> Result<i32> { Ok(c.data_mut().cancel_grpc(t as u32)) })?;
    linker.func_wrap(env, "proxy_grpc_close", |mut c: C<'_>, t: i32| -> Result<i32> { Ok(c.data_mut().cancel_grpc(t as u32)) })?;
    linker.func_wrap(env, "proxy_get_status", |mut c: C<'_>, cp: i32, mp: i32, ml: i32| -> Result<i32> {
        let (code, msg) = match (&c.data().grpc_result, c.data().phase) {
            (Some(GrpcResult::Status(code, msg)), Phase::GrpcClose) => (*code, msg.clone().into_bytes()),
            _ => (0, Vec::new()),
        };
        write_u32(&mut c, cp, code)?;
        give(&mut c, &msg, mp, ml)?;
        Ok(OK)
    })?;
    linker.func_wrap(env, "proxy_set_effective_context", |mut c: C<'_>, ctx: i32| -> Result<i32> {
        let st = c.data_mut();
        let ctx = ctx as u32;
        if st.roots.iter().any(|r| r.id == ctx) || st.streams.contains_key(&ctx) {
            st.effective = Some(ctx);
            Ok(OK)
        } else {
            Ok(BAD_ARGUMENT)
        }
    })?;
    linker.func_wrap(
        env,
        "proxy_call_foreign_function",
        |mut c: C<'_>, np: i32, nl: i32, ap: i32, al: i32, rp: i32, rl: i32| -> Result<i32> {
            let name = read_str(&mut c, np, nl)?;
            let args = read(&mut c, ap, al)?;
            // Envoy's source/extensions/common/wasm/foreign.cc
            let status = match name.as_str() {
                "clear_route_cache" => {
                    c.data_mut().clear_route_cache();
                    OK
                }
                "set_envoy_filter_state" => match decode_filter_state_args(&args) {
                    None => BAD_ARGUMENT,
                    Some((key, value)) => c.data_mut().set_envoy_filter_state(key, value),
                },
                _ => return Ok(NOT_FOUND),
            };
            if status == OK {
                give(&mut c, &[], rp, rl)?;
            }
            Ok(status)
        },
    )?;
    // cpp-host `WasmBase::done`: a root context waiting after on_done returned false is
    // deleted after this VM call; any other context: NotFound.
    linker.func_wrap(env, "proxy_done", |mut c: C<'_>| -> Result<i32> {
        let st = c.data_mut();
        let root = st.effective_ctx();
        if st.roots.iter().any(|r| r.id == root && r.done_pending) {
            st.done_called.push(root);
            Ok(OK)
        } else {
            Ok(NOT_FOUND)
        }
    })?;

    // ---- metrics (Envoy: one stat per name in the scope; ids are per VM)
    linker.func_wrap(env, "proxy_define_metric", |mut c: C<'_>, ty: i32, np: i32, nl: i32, rp: i32| -> Result<i32> {
        let name = read_str(&mut c, np, nl)?;
        let ty = match ty {
            0 => MetricType::Counter,
            1 => MetricType::Gauge,
            2 => MetricType::Histogram,
            _ => return Ok(BAD_ARGUMENT),
        };
        let host = c.data().host.clone();
        {
            let mut m = host.metrics.lock().unwrap();
            match ty {
                MetricType::Counter => {
                    m.counters.entry(name.clone()).or_insert(0);
                }
                MetricType::Gauge => {
                    m.gauges.entry(name.clone()).or_insert(0);
                }
                MetricType::Histogram => {
                    m.histograms.entry(name.clone()).or_default();
                }
            }
        }
        let st = c.data_mut();
        let id = (st.metric_ids.len() as u32 + 1) << 2 | ty as u32;
        st.metric_ids.insert(id, (ty, name));
        write_u32(&mut c, rp, id)?;
        Ok(OK)
    })?;
    linker.func_wrap(env, "proxy_increment_metric", |c: C<'_>, id: i32, offset: i64| -> Result<i32> {
        let Some((ty, name)) = c.data().metric_ids.get(&(id as u32)).cloned() else { return Ok(NOT_FOUND) };
        let mut m = c.data().host.metrics.lock().unwrap();
        match ty {
            MetricType::Counter => {
                if offset <= 0 {
                    return Ok(BAD_ARGUMENT);
                }
                *m.counters.get_mut(&name).unwrap() += offset as u64;
            }
            MetricType::Gauge => {
                let g = m.gauges.get_mut(&name).unwrap();
                *g = if offset >= 0 { g.wrapping_add(offset as u64) } else { g.wrapping_sub(offset.unsigned_abs()) };
            }
            MetricType::Histogram => return Ok(BAD_ARGUMENT),
        }
        Ok(OK)
    })?;
    linker.func_wrap(env, "proxy_record_metric", |c: C<'_>, id: i32, value: i64| -> Result<i32> {
        let Some((ty, name)) = c.data().metric_ids.get(&(id as u32)).cloned() else { return Ok(NOT_FOUND) };
        let mut m = c.data().host.metrics.lock().unwrap();
        let value = value as u64;
        match ty {
            MetricType::Counter => *m.counters.get_mut(&name).unwrap() += value,
            MetricType::Gauge => *m.gauges.get_mut(&name).unwrap() = value,
            MetricType::Histogram => m.histograms.get_mut(&name).unwrap().push(value),
        }
        Ok(OK)
    })?;
    linker.func_wrap(env, "proxy_get_metric", |mut c: C<'_>, id: i32, rp: i32| -> Result<i32> {
        let Some((ty, name)) = c.data().metric_ids.get(&(id as u32)).cloned() else { return Ok(NOT_FOUND) };
        let v = {
            let m = c.data().host.metrics.lock().unwrap();
            match ty {
                MetricType::Counter => m.counters[&name],
                MetricType::Gauge => m.gauges[&name],
                MetricType::Histogram => return Ok(BAD_ARGUMENT),
            }
        };
        write_u64(&mut c, rp, v)?;
        Ok(OK)
    })?;

    // ---- WASI (errno 0 = success)
    let wasi = "wasi_snapshot_preview1";
    linker.func_wrap(wasi, "fd_write", |mut c: C<'_>, fd: i32, iovs: i32, n: i32, written: i32| -> Result<i32> {
        let mut out = Vec::new();
        for i in 0..n {
            let iov = read(&mut c, iovs + i * 8, 8)?;
            let p = u32::from_le_bytes(iov[0..4].try_into().unwrap()) as i32;
            let l = u32::from_le_bytes(iov[4..8].try_into().unwrap()) as i32;
            out.extend(read(&mut c, p, l)?);
        }
        let len = out.len() as u32;
        if fd == 1 || fd == 2 {
            let vm = c.data().index;
            let text = String::from_utf8_lossy(&out).trim_end().to_string();
            if !text.is_empty() {
                let level = if fd == 2 { LogLevel::Error } else { LogLevel::Info };
                c.data().host.log(vm, level, format!("[fd{fd}] {text}"));
            }
        } else {
            return Ok(8); // EBADF
        }
        write_u32(&mut c, written, len)?;
        Ok(0)
    })?;
    linker.func_wrap(wasi, "environ_sizes_get", |mut c: C<'_>, np: i32, sp: i32| -> Result<i32> {
        let env = c.data().env_block();
        let n = env.len() as u32;
        let size = env.iter().map(|e| e.len() + 1).sum::<usize>() as u32;
        write_u32(&mut c, np, n)?;
        write_u32(&mut c, sp, size)?;
        Ok(0)
    })?;
    linker.func_wrap(wasi, "environ_get", |mut c: C<'_>, ptrs: i32, buf: i32| -> Result<i32> {
        let env = c.data().env_block();
        let mut off = buf;
        for (i, e) in env.iter().enumerate() {
            write_u32(&mut c, ptrs + 4 * i as i32, off as u32)?;
            let mut b = e.clone().into_bytes();
            b.push(0);
            write(&mut c, off, &b)?;
            off += b.len() as i32;
        }
        Ok(0)
    })?;
    linker.func_wrap(wasi, "args_sizes_get", |mut c: C<'_>, np: i32, sp: i32| -> Result<i32> {
        write_u32(&mut c, np, 0)?;
        write_u32(&mut c, sp, 0)?;
        Ok(0)
    })?;
    linker.func_wrap(wasi, "args_get", |_c: C<'_>, _a: i32, _b: i32| -> Result<i32> { Ok(0) })?;
    linker.func_wrap(wasi, "proc_exit", |_c: C<'_>, code: i32| -> Result<()> { wasmtime::bail!("proc_exit({code})") })?;
    linker.func_wrap(wasi, "clock_time_get", |mut c: C<'_>, _id: i32, _prec: i64, rp: i32| -> Result<i32> {
        let now = c.data().host.now_ns();
        write_u64(&mut c, rp, now)?;
        Ok(0)
    })?;
    linker.func_wrap(wasi, "random_get", |mut c: C<'_>, p: i32, l: i32| -> Result<i32> {
        let mut bytes = vec![0u8; l as u32 as usize];
        let st = c.data_mut();
        for b in bytes.iter_mut() {
            // xorshift64*: deterministic per VM.
            st.rng ^= st.rng >> 12;
            st.rng ^= st.rng << 25;
            st.rng ^= st.rng >> 27;
            *b = (st.rng.wrapping_mul(0x2545F4914F6CDD1D) >> 56) as u8;
        }
        write(&mut c, p, &bytes)?;
        Ok(0)
    })?;
    linker.func_wrap(wasi, "sched_yield", |_c: C<'_>| -> Result<i32> { Ok(0) })?;
    linker.func_wrap(wasi, "fd_close", |_c: C<'_>, _fd: i32| -> Result<i32> { Ok(8) })?;
    linker.func_wrap(wasi, "fd_fdstat_get", |_c: C<'_>, _fd: i32, _p: i32| -> Result<i32> { Ok(8) })?;
    linker.func_wrap(wasi, "fd_seek", |_c: C<'_>, _fd: i32, _o: i64, _w: i32, _r: i32| -> Result<i32> { Ok(8) })?;
    Ok(())
}

/// A property path (tokens separated by NUL) as a dotted key: `request\0path` → `request.path`.
fn path_key(path: &[u8]) -> String {
    let s = String::from_utf8_lossy(path);
    s.trim_end_matches('\0').replace('\0', ".")
}

/// Properties are serialised as Envoy does: strings raw, integers as 8-byte little-endian.
pub fn int_property(v: i64) -> Vec<u8> {
    v.to_le_bytes().to_vec()
}
