//! Compressed bodies on the real `filter.wasm` (issues 26 and 21): a compressed request is routed
//! on its decoded model and forwarded byte for byte, a bomb is refused without growing the VM's
//! memory, and a compressed answer passes chunk by chunk while its usage is counted.

use host_sim::*;
use std::io::Write;

const MASTER: &str = "sk-master-0123456789";
const CHAT: &str = "/v1/chat/completions";

fn cfg() -> String {
    format!(
        "server: {{master_key: {MASTER}, default_models_rpm: -1, replace_v1_models: false, max_provider_retries: 0, max_body_size_mb: 4}}\ncredentials:\n\
         \x20 - {{name: a, api_key: sk-a-secret-key, base_url: 'https://a.test', tpm: 100}}\n"
    )
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

fn post(vm: &mut Vm, encoding: &str, body: &[u8]) -> Exchange {
    let auth = format!("Bearer {MASTER}");
    let headers =
        [(":method", "POST"), (":path", CHAT), (":authority", "r"), ("authorization", auth.as_str()), ("content-encoding", encoding)];
    let chunks: Vec<&[u8]> = body.chunks(16 * 1024).collect();
    vm.http_request_chunks(&headers, &chunks)
}

fn metric(host: &Host, name: &str) -> Option<u64> {
    host.metrics().into_iter().find(|(_, n, _)| n == name).map(|(_, _, v)| v)
}

#[test]
fn compressed_requests_route_on_the_decoded_model_and_go_on_byte_for_byte() {
    let host = Host::new();
    let mut vm = host.vm(cfg(), &[]).unwrap();
    let body = format!(r#"{{"messages":[{{"role":"user","content":"{}"}}],"model":"m"}}"#, "long prompt ".repeat(20_000));
    let br = {
        let mut out = Vec::new();
        brotli::CompressorWriter::new(&mut out, 4096, 5, 22).write_all(body.as_bytes()).unwrap();
        out
    };
    for (encoding, enc) in [("gzip", gzip(body.as_bytes())), ("br", br), ("zstd", zstd::encode_all(body.as_bytes(), 3).unwrap())] {
        let ex = post(&mut vm, encoding, &enc);
        assert_eq!(ex.cluster(), Some("a"), "{encoding}: {:?}", ex.outcome);
        let f = ex.forwarded().unwrap();
        assert_eq!(f.body, enc, "{encoding}: the provider gets the client's bytes");
        assert!(f.headers.iter().any(|(k, v)| k == "content-encoding" && v == encoding));
        vm.respond(&ex, 200, &[("content-type", "application/json")], b"{}");
    }
    let r = post(&mut vm, "gzip", b"\x1f\x8b\x08\x00garbage").expect_local().clone();
    assert_eq!(r.status, 400);
    let r = post(&mut vm, "compress", b"x").expect_local().clone();
    assert_eq!(r.status, 415);
}

#[test]
fn an_inflation_bomb_is_413_and_does_not_grow_the_vm() {
    let host = Host::new();
    let mut vm = host.vm(cfg(), &[]).unwrap();
    let ex = vm.post(CHAT, MASTER, r#"{"model":"m"}"#);
    vm.respond(&ex, 200, &[("content-type", "application/json")], b"{}");
    let before = vm.memory_bytes();
    // 512 MiB of spaces in a JSON string: about 0.5 MB of gzip.
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    e.write_all(br#"{"model":"m","pad":""#).unwrap();
    let spaces = vec![b' '; 1 << 20];
    for _ in 0..512 {
        e.write_all(&spaces).unwrap();
    }
    let bomb = e.finish().unwrap();
    let r = post(&mut vm, "gzip", &bomb).expect_local().clone();
    assert_eq!(r.status, 413, "{}", String::from_utf8_lossy(&r.body));
    assert!(String::from_utf8_lossy(&r.body).contains("decoded"));
    let after = vm.memory_bytes();
    assert!(before > 0 && after <= before + (2 << 20), "the VM grew from {before} to {after} bytes");
}

#[test]
fn a_compressed_sse_answer_passes_chunk_by_chunk_and_its_usage_counts() {
    let host = Host::new();
    let mut vm = host.vm(cfg(), &[]).unwrap();
    let ex = vm.post(CHAT, MASTER, r#"{"model":"m","stream":true,"stream_options":{"include_usage":true}}"#);
    // A gzip stream flushed per event, as providers send it.
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    let mut chunks = vec![];
    for ev in [
        &b"data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\n"[..],
        b"data: {\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":4,\"total_tokens\":7}}\n\n",
        b"data: [DONE]\n\n",
    ] {
        e.write_all(ev).unwrap();
        e.flush().unwrap();
        chunks.push(std::mem::take(e.get_mut()));
    }
    chunks.push(e.finish().unwrap());
    let refs: Vec<&[u8]> = chunks.iter().map(Vec::as_slice).collect();
    let r = vm.respond_chunks(&ex, 200, &[("content-type", "text/event-stream"), ("content-encoding", "gzip")], &refs);
    assert_eq!(r.chunks, chunks, "every compressed chunk passed unchanged, none held back");
    assert_eq!(metric(&host, "auto_ai_router_tokens_total.credential=.=a;.;.model=.=m;.;.type=.=completion;.;"), Some(4));
    assert_eq!(metric(&host, "auto_ai_router_usage_missing_total.credential=.=a;.;"), None);
}
