//! `make bench-hostsim`: mean cost of the router's request path in host-sim (compiled module
//! reused): wall-clock µs per request and wasm instructions (fuel) per request.
//! Usage: hostsim-bench [OUTPUT.md]

use host_sim::{Host, Vm, VmConfig};
use std::io::Write;
use std::time::Instant;

const CONFIG: &str = "server: {master_key: sk-bench-master, replace_v1_models: false, default_models_rpm: -1}
credentials:
  - {name: c1, api_key: sk-bench-one-123, base_url: 'https://one.test/v1', rpm: -1}
  - {name: c2, api_key: sk-bench-two-456, base_url: 'https://two.test/v1', rpm: 100000000}
  - {name: c3, api_key: sk-bench-three-789, base_url: 'https://three.test/v1', rpm: -1}
";
const BODY: &str = r#"{"model":"gpt-4o-mini","messages":[{"role":"system","content":"You are terse."},{"role":"user","content":"Say hello in five words, please."}],"temperature":0.2}"#;

/// How the upstream answers: a tiny JSON body, a chat answer with `usage`, or an SSE stream;
/// the last two also gzip'd (`Content-Encoding: gzip`, the SSE flushed per event).
#[derive(Clone, Copy)]
enum Answer {
    Tiny,
    JsonUsage,
    Sse,
    GzipJsonUsage,
    /// SSE whose request asked for `include_usage` (so the stream is scanned), plain and gzip'd.
    SseAsked,
    GzipSseAsked,
}

const BODY_ASKED: &str = r#"{"model":"gpt-4o-mini","stream":true,"stream_options":{"include_usage":true},"messages":[{"role":"system","content":"You are terse."},{"role":"user","content":"Say hello in five words, please."}],"temperature":0.2}"#;

/// `chunks` gzip'd as one stream, flushed after each (so each stays one chunk on the wire).
fn gzip_chunks(chunks: &[Vec<u8>]) -> Vec<Vec<u8>> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    let mut out: Vec<Vec<u8>> = chunks
        .iter()
        .map(|c| {
            e.write_all(c).and_then(|_| e.flush()).expect("gzip");
            std::mem::take(e.get_mut())
        })
        .collect();
    if let Some(last) = out.last_mut() {
        last.extend(e.finish().expect("gzip"));
    }
    out
}

const JSON_USAGE: &[u8] = br#"{"id":"chatcmpl-1","object":"chat.completion","created":1,"model":"gpt-4o-mini","choices":[{"index":0,"message":{"role":"assistant","content":"Hello there, friend, how are you?"},"logprobs":null,"finish_reason":"stop"}],"usage":{"prompt_tokens":25,"completion_tokens":8,"total_tokens":33,"prompt_tokens_details":{"cached_tokens":0},"completion_tokens_details":{"reasoning_tokens":0}},"system_fingerprint":"fp_1"}"#;

fn sse_chunks() -> Vec<Vec<u8>> {
    let mut c: Vec<Vec<u8>> = (0..20)
        .map(|i| format!("data: {{\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"w{i} \"}}}}]}}\n\n").into_bytes())
        .collect();
    c.push(br#"data: {"id":"c","object":"chat.completion.chunk","choices":[],"usage":{"prompt_tokens":25,"completion_tokens":20,"total_tokens":45}}"#.to_vec());
    c.push(b"\n\ndata: [DONE]\n\n".to_vec());
    c
}

/// The same credentials with `max_provider_retries: 0` (no upstream filter), and with retries on
/// (the default), where each request also runs one attempt through the upstream filter.
fn config(retries: bool) -> String {
    if retries {
        CONFIG.to_string()
    } else {
        CONFIG.replacen("default_models_rpm: -1", "default_models_rpm: -1, max_provider_retries: 0", 1)
    }
}

fn vm_for(host: &Host, retries: bool) -> Vm {
    vm_with_config(host, config(retries))
}

fn vm_with_config(host: &Host, c: String) -> Vm {
    host.vm_with(VmConfig::new(c.clone()).plugin("auto_ai_router_upstream", c)).expect("vm")
}

/// Issue 23's features on the retries-off config: weights 1:2:3, and `max_concurrent` on every key.
fn availability_config(weights: bool, caps: bool) -> String {
    let mut c = config(false);
    for (i, name) in ["c1", "c2", "c3"].iter().enumerate() {
        let mut extra = String::new();
        if weights {
            extra.push_str(&format!(", weight: {}", i + 1));
        }
        if caps {
            extra.push_str(", max_concurrent: 1000");
        }
        c = c.replacen(&format!("{{name: {name}, "), &format!("{{name: {name}{extra}, "), 1);
    }
    c
}

/// Wall µs and wasm instructions per request (tiny answers) for a configuration.
fn cost_of(host: &Host, fuel_host: &Host, c: &str) -> (f64, u64) {
    let mut vm = vm_with_config(host, c.to_string());
    for _ in 0..500 {
        one(&mut vm, Answer::Tiny);
    }
    let n = 20_000u32;
    let t = Instant::now();
    for i in 0..n {
        if i % 100 == 0 {
            host.advance_ms(100);
        }
        one(&mut vm, Answer::Tiny);
    }
    let us = t.elapsed().as_secs_f64() * 1e6 / n as f64;
    let mut fvm = vm_with_config(fuel_host, c.to_string());
    for _ in 0..100 {
        one(&mut fvm, Answer::Tiny);
    }
    let before = fvm.fuel_used().unwrap();
    for _ in 0..2_000 {
        one(&mut fvm, Answer::Tiny);
    }
    (us, (fvm.fuel_used().unwrap() - before) / 2_000)
}

fn one(vm: &mut Vm, answer: Answer) {
    let body = if matches!(answer, Answer::SseAsked | Answer::GzipSseAsked) { BODY_ASKED } else { BODY };
    let ex = vm.post("/v1/chat/completions", "sk-bench-master", body);
    assert!(ex.forwarded().is_some(), "bench request not forwarded: {:?}", ex.outcome);
    // With retries on the upstream filter runs the attempt (Envoy's router would), and answers it.
    let retries = vm.filter_state(&ex).contains_key("wasm.auto_ai_router_plan");
    let target = if retries { vm.upstream_request(&ex, "auto_ai_router_upstream", ex.cluster().unwrap_or_default()) } else { ex };
    let ex = &target;
    let r = match answer {
        Answer::Tiny => vm.respond(ex, 200, &[("content-type", "application/json")], br#"{"id":"x","choices":[]}"#),
        Answer::JsonUsage => vm.respond(ex, 200, &[("content-type", "application/json")], JSON_USAGE),
        Answer::Sse => {
            let chunks = sse_chunks();
            let refs: Vec<&[u8]> = chunks.iter().map(Vec::as_slice).collect();
            vm.respond_chunks(ex, 200, &[("content-type", "text/event-stream")], &refs)
        }
        Answer::GzipJsonUsage => {
            let body = gzip_chunks(&[JSON_USAGE.to_vec()]).concat();
            vm.respond(ex, 200, &[("content-type", "application/json"), ("content-encoding", "gzip")], &body)
        }
        Answer::SseAsked => {
            let chunks = sse_chunks();
            let refs: Vec<&[u8]> = chunks.iter().map(Vec::as_slice).collect();
            vm.respond_chunks(ex, 200, &[("content-type", "text/event-stream")], &refs)
        }
        Answer::GzipSseAsked => {
            let chunks = gzip_chunks(&sse_chunks());
            let refs: Vec<&[u8]> = chunks.iter().map(Vec::as_slice).collect();
            vm.respond_chunks(ex, 200, &[("content-type", "text/event-stream"), ("content-encoding", "gzip")], &refs)
        }
    };
    assert_eq!(r.status, 200);
}

/// Per request for `answer`, on a fresh VM of a fuel-metered host: wasm instructions, host calls
/// (module → host) and callbacks (host → module: V8 entries in Envoy).
fn fuel_per_request(fuel_host: &Host, answer: Answer, retries: bool) -> (u64, f64, f64, f64) {
    let mut fvm = vm_for(fuel_host, retries);
    for _ in 0..100 {
        one(&mut fvm, answer);
    }
    let (before, calls, callbacks, allocs) = (fvm.fuel_used().unwrap(), fvm.host_calls(), fvm.callbacks(), fvm.allocations());
    let m = 2_000u64;
    for _ in 0..m {
        one(&mut fvm, answer);
    }
    let per = |x: u64| x as f64 / m as f64;
    (
        (fvm.fuel_used().unwrap() - before) / m,
        per(fvm.host_calls() - calls),
        per(fvm.callbacks() - callbacks),
        per(fvm.allocations() - allocs),
    )
}

fn main() {
    let out = std::env::args().nth(1);
    let path = host_sim::default_wasm_path();
    let wasm_size = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);

    let t = Instant::now();
    let host = Host::load(&path, false).unwrap_or_else(|e| panic!("{e}"));
    let compile_ms = t.elapsed().as_secs_f64() * 1e3;
    let t = Instant::now();
    let mut vm = vm_for(&host, false);
    let vm_start_us = t.elapsed().as_secs_f64() * 1e6;
    for _ in 0..500 {
        one(&mut vm, Answer::Tiny);
    }
    let n = 20_000u32;
    let t = Instant::now();
    for i in 0..n {
        if i % 100 == 0 {
            host.advance_ms(100);
        }
        one(&mut vm, Answer::Tiny);
    }
    let us = t.elapsed().as_secs_f64() * 1e6 / n as f64;

    let fuel_host = Host::load(&path, true).unwrap_or_else(|e| panic!("{e}"));
    let m = 2_000u64;
    let (instr, calls, callbacks, allocs) = fuel_per_request(&fuel_host, Answer::Tiny, false);
    let (instr_r, calls_r, callbacks_r, allocs_r) = fuel_per_request(&fuel_host, Answer::Tiny, true);
    let (json_usage, _, _, _) = fuel_per_request(&fuel_host, Answer::JsonUsage, false);
    let (sse, _, _, _) = fuel_per_request(&fuel_host, Answer::Sse, false);
    let (gz_json, _, _, _) = fuel_per_request(&fuel_host, Answer::GzipJsonUsage, false);
    let (sse_asked, _, _, _) = fuel_per_request(&fuel_host, Answer::SseAsked, false);
    let (gz_sse, _, _, _) = fuel_per_request(&fuel_host, Answer::GzipSseAsked, false);
    let gz_json_len = gzip_chunks(&[JSON_USAGE.to_vec()]).concat().len();
    // Weights and concurrency caps: each configuration measured in its own VM, interleaved twice
    // (the spread between the two base runs is the run's noise).
    let plain = availability_config(false, false);
    let (base1, base_i) = cost_of(&host, &fuel_host, &plain);
    let (w_us, w_i) = cost_of(&host, &fuel_host, &availability_config(true, false));
    let (c_us, c_i) = cost_of(&host, &fuel_host, &availability_config(false, true));
    let (base2, _) = cost_of(&host, &fuel_host, &plain);
    let base = (base1 + base2) / 2.0;

    let report = format!(
        "# host-sim bench: router request path\n\n\
         One POST /v1/chat/completions (auth, {} B JSON body buffered and parsed, round-robin over 3 credentials with \
         shared-data CAS, header rewrite) plus the upstream 200 response (fail2ban, metrics, on_log), on one VM, \
         module compiled once (wasmtime 48, cranelift).\n\n\
         | figure | value |\n|---|---|\n\
         | mean time per request (`max_provider_retries: 0`) | {us:.1} µs ({n} requests) |\n\
         | wasm instructions per request (fuel), `max_provider_retries: 0` | {instr} ({m} requests) |\n\
         | host calls / callbacks / host allocations in the module per request, `max_provider_retries: 0` | {calls:.1} / {callbacks:.1} / {allocs:.1} |\n\
         | wasm instructions per request, retries on (+ the upstream filter's attempt) | {instr_r} |\n\
         | host calls / callbacks / host allocations per request, retries on | {calls_r:.1} / {callbacks_r:.1} / {allocs_r:.1} |\n\
         | filter.wasm size | {wasm_size} bytes |\n\
         | module compile (once per process) | {compile_ms:.0} ms |\n\
         | VM start (instantiate + on_vm_start + on_configure) | {vm_start_us:.0} µs |\n\n\
         Reading the answer's token usage (the same request, other answers; instructions per request):\n\n\
         | answer | wasm instructions | over the tiny answer |\n|---|---:|---:|\n\
         | tiny JSON, no usage | {instr} | — |\n\
         | {} B chat answer with `usage` | {json_usage} | +{} |\n\
         | SSE, 20 chunks + a usage event | {sse} | +{} |\n\
         | the same chat answer gzip'd ({gz_json_len} B, `Content-Encoding: gzip`) | {gz_json} | +{} |\n\
         | SSE, the client asked for `include_usage` (scanned) | {sse_asked} | +{} |\n\
         | the same SSE gzip'd, flushed per event | {gz_sse} | +{} |\n\n\
         Weights and concurrency caps (issue 23), `max_provider_retries: 0`, tiny answers, per request \
         (base measured twice: {base1:.1} and {base2:.1} µs, the run's noise):\n\n\
         | configuration | µs | over the base | wasm instructions | over the base |\n|---|---:|---:|---:|---:|\n\
         | none (base) | {base:.1} | — | {base_i} | — |\n\
         | weights 1:2:3 | {w_us:.1} | {:+.1} | {w_i} | {:+} |\n\
         | `max_concurrent` on every key | {c_us:.1} | {:+.1} | {c_i} | {:+} |\n\n\
         (In Envoy each answer chunk also costs one host call to copy it into the VM.) Callbacks are the \
         host's calls into the module (each a V8 entry in Envoy); host allocations are the buffers a host call \
         that returns data (a header, shared data, a property, body bytes) has the module allocate first, each \
         one more entry into the module.\n",
        BODY.len(),
        JSON_USAGE.len(),
        json_usage.saturating_sub(instr),
        sse.saturating_sub(instr),
        gz_json.saturating_sub(instr),
        sse_asked.saturating_sub(instr),
        gz_sse.saturating_sub(instr),
        w_us - base,
        w_i as i64 - base_i as i64,
        c_us - base,
        c_i as i64 - base_i as i64,
    );
    print!("{report}");
    if let Some(out) = out {
        if let Some(dir) = std::path::Path::new(&out).parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        std::fs::write(&out, &report).expect("write report");
        println!("\nwritten to {out}");
    }
}
