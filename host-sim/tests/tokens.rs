//! Token usage (issue 15) on the real `filter.wasm`: tokens read from the answer as it streams,
//! counted per credential and model, and TPM windows shared by every VM (Envoy worker).

use host_sim::*;

const MASTER: &str = "sk-master-0123456789";
const CHAT: &str = "/v1/chat/completions";

fn cfg() -> String {
    format!(
        "server: {{master_key: {MASTER}, default_models_rpm: -1, replace_v1_models: false, max_provider_retries: 0}}\ncredentials:\n\
         \x20 - {{name: a, api_key: sk-a-secret-key, base_url: 'https://a.test', tpm: 100}}\n"
    )
}

const JSON_60: &[u8] = br#"{"id":"1","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":"hi"}}],"usage":{"prompt_tokens":10,"completion_tokens":50,"total_tokens":60}}"#;

fn ask(vm: &mut Vm) -> Option<u16> {
    let ex = vm.post(CHAT, MASTER, r#"{"model":"m"}"#);
    if ex.cluster().is_none() {
        return ex.status();
    }
    let (head, tail) = JSON_60.split_at(70);
    Some(vm.respond_chunks(&ex, 200, &[("content-type", "application/json")], &[head, tail]).status)
}

fn metric(host: &Host, name: &str) -> Option<u64> {
    host.metrics().into_iter().find(|(_, n, _)| n == name).map(|(_, _, v)| v)
}

#[test]
fn tpm_windows_are_shared_by_all_vms() {
    let host = Host::new();
    let mut vms = host.vms(2, &cfg(), &[]).unwrap();
    assert_eq!(ask(&mut vms[0]), Some(200));
    assert_eq!(ask(&mut vms[1]), Some(200), "60 < 100 when it was checked");
    let ex = vms[0].post(CHAT, MASTER, r#"{"model":"m"}"#);
    let r = ex.expect_local();
    assert_eq!(r.status, 429, "120 tokens in the window, charged by two workers");
    assert!(r.header("retry-after").is_some());
    assert_eq!(metric(&host, "auto_ai_router_tokens_total.credential=.=a;.;.model=.=m;.;.type=.=prompt;.;"), Some(20));
    assert_eq!(metric(&host, "auto_ai_router_tokens_total.credential=.=a;.;.model=.=m;.;.type=.=completion;.;"), Some(100));
    host.advance_ms(61_000);
    assert_eq!(ask(&mut vms[1]), Some(200), "the tokens left the window");
}

#[test]
fn an_sse_answer_passes_chunk_by_chunk_and_its_usage_event_is_counted() {
    let host = Host::new();
    let mut vm = host.vm(cfg(), &[]).unwrap();
    let ex = vm.post(CHAT, MASTER, r#"{"model":"m","stream":true,"stream_options":{"include_usage":true}}"#);
    let chunks: [&[u8]; 4] = [
        b"data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\n",
        b"data: {\"choices\":[],\"usage\":{\"prompt_tokens\":3,",
        b"\"completion_tokens\":4,\"total_tokens\":7}}\n\n",
        b"data: [DONE]\n\n",
    ];
    let r = vm.respond_chunks(&ex, 200, &[("content-type", "text/event-stream")], &chunks);
    assert_eq!(r.chunks.len(), 4, "no chunk held back or merged");
    assert_eq!(metric(&host, "auto_ai_router_tokens_total.credential=.=a;.;.model=.=m;.;.type=.=completion;.;"), Some(4));
    let ex = vm.post(CHAT, MASTER, r#"{"model":"m","stream":true}"#);
    vm.respond_chunks(&ex, 200, &[("content-type", "text/event-stream")], &[b"data: {\"choices\":[]}\n\n", b"data: [DONE]\n\n"]);
    assert_eq!(metric(&host, "auto_ai_router_usage_missing_total.credential=.=a;.;"), Some(1));
}
