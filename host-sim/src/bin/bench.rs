//! `make bench-hostsim`: mean cost of the router's request path in host-sim (compiled module
//! reused): wall-clock µs per request and wasm instructions (fuel) per request.
//! Usage: hostsim-bench [OUTPUT.md]

use host_sim::{Host, Vm};
use std::time::Instant;

const CONFIG: &str = "server: {master_key: sk-bench-master, replace_v1_models: false, default_models_rpm: -1}
credentials:
  - {name: c1, api_key: sk-bench-one-123, base_url: 'https://one.test/v1', rpm: -1}
  - {name: c2, api_key: sk-bench-two-456, base_url: 'https://two.test/v1', rpm: 100000000}
  - {name: c3, api_key: sk-bench-three-789, base_url: 'https://three.test/v1', rpm: -1}
";
const BODY: &str = r#"{"model":"gpt-4o-mini","messages":[{"role":"system","content":"You are terse."},{"role":"user","content":"Say hello in five words, please."}],"temperature":0.2}"#;

/// How the upstream answers: a tiny JSON body, a chat answer with `usage`, or an SSE stream.
#[derive(Clone, Copy)]
enum Answer {
    Tiny,
    JsonUsage,
    Sse,
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

fn one(vm: &mut Vm, answer: Answer) {
    let ex = vm.post("/v1/chat/completions", "sk-bench-master", BODY);
    assert!(ex.forwarded().is_some(), "bench request not forwarded: {:?}", ex.outcome);
    let r = match answer {
        Answer::Tiny => vm.respond(&ex, 200, &[("content-type", "application/json")], br#"{"id":"x","choices":[]}"#),
        Answer::JsonUsage => vm.respond(&ex, 200, &[("content-type", "application/json")], JSON_USAGE),
        Answer::Sse => {
            let chunks = sse_chunks();
            let refs: Vec<&[u8]> = chunks.iter().map(Vec::as_slice).collect();
            vm.respond_chunks(&ex, 200, &[("content-type", "text/event-stream")], &refs)
        }
    };
    assert_eq!(r.status, 200);
}

/// Wasm instructions per request for `answer`, on a fresh VM of a fuel-metered host.
fn fuel_per_request(fuel_host: &Host, answer: Answer) -> u64 {
    let mut fvm = fuel_host.vm(CONFIG, &[]).expect("vm");
    for _ in 0..100 {
        one(&mut fvm, answer);
    }
    let before = fvm.fuel_used().unwrap();
    let m = 2_000u64;
    for _ in 0..m {
        one(&mut fvm, answer);
    }
    (fvm.fuel_used().unwrap() - before) / m
}

fn main() {
    let out = std::env::args().nth(1);
    let path = host_sim::default_wasm_path();
    let wasm_size = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);

    let t = Instant::now();
    let host = Host::load(&path, false).unwrap_or_else(|e| panic!("{e}"));
    let compile_ms = t.elapsed().as_secs_f64() * 1e3;
    let t = Instant::now();
    let mut vm = host.vm(CONFIG, &[]).expect("vm");
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
    let instr = fuel_per_request(&fuel_host, Answer::Tiny);
    let json_usage = fuel_per_request(&fuel_host, Answer::JsonUsage);
    let sse = fuel_per_request(&fuel_host, Answer::Sse);

    let report = format!(
        "# host-sim bench: router request path\n\n\
         One POST /v1/chat/completions (auth, {} B JSON body buffered and parsed, round-robin over 3 credentials with \
         shared-data CAS, header rewrite) plus the upstream 200 response (fail2ban, metrics, on_log), on one VM, \
         module compiled once (wasmtime 48, cranelift).\n\n\
         | figure | value |\n|---|---|\n\
         | mean time per request | {us:.1} µs ({n} requests) |\n\
         | wasm instructions per request (fuel) | {instr} ({m} requests) |\n\
         | filter.wasm size | {wasm_size} bytes |\n\
         | module compile (once per process) | {compile_ms:.0} ms |\n\
         | VM start (instantiate + on_vm_start + on_configure) | {vm_start_us:.0} µs |\n\n\
         Reading the answer's token usage (the same request, other answers; instructions per request):\n\n\
         | answer | wasm instructions | over the tiny answer |\n|---|---:|---:|\n\
         | tiny JSON, no usage | {instr} | — |\n\
         | {} B chat answer with `usage` | {json_usage} | +{} |\n\
         | SSE, 20 chunks + a usage event | {sse} | +{} |\n\n\
         (In Envoy each answer chunk also costs one host call to copy it into the VM.)\n",
        BODY.len(),
        JSON_USAGE.len(),
        json_usage.saturating_sub(instr),
        sse.saturating_sub(instr)
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
