//! Retry on another credential (issue 12) on a real Envoy: the route follows the filter's
//! per-attempt choice (filter state + matcher cluster specifier, `refresh_cluster_on_retry`) and the
//! upstream filter in every credential cluster injects each attempt's own key, accounts each
//! attempt and picks the next key when one fails.

use auto_ai_router::render::retry_contract::{ATTEMPTS_HEADER, RETRY_HEADER};
use e2e::harness::{api_log, closed_port, control, cred, metric_value, mock, wait_for, Router, MASTER};
use e2e::http::Request;
use e2e::mock::LogEntry;
use serde_json::json;
use std::time::{Duration, Instant};

const KEY_A: &str = "sk-retry-a-0000000";
const KEY_B: &str = "sk-retry-b-0000000";
const KEY_C: &str = "sk-retry-c-0000000";

fn config(server_extra: &str, creds: &[String]) -> String {
    format!("server:\n  master_key: \"{MASTER}\"\n{server_extra}credentials:\n{}", creds.concat())
}

/// Sends `req` until mock `m` has received one more API request than before (at most `tries`
/// requests: round-robin reaches every credential within that many); returns the response of the
/// request that reached it and how many requests it took.
fn until_it_reaches(r: &Router, m: &e2e::mock::BackgroundMock, req: &Request, tries: usize) -> (e2e::http::Response, usize) {
    let before = api_log(m).len();
    for i in 1..=tries {
        let resp = r.send(req);
        if api_log(m).len() > before {
            return (resp, i);
        }
        assert_eq!(resp.status, 200, "request {i} did not reach the credential under test and still failed: {}", resp.describe());
    }
    panic!("{tries} requests and none reached {}", m.mock.settings().name);
}

fn keys(log: &[LogEntry]) -> Vec<&str> {
    log.iter().map(|e| e.key.as_str()).collect()
}

#[test]
fn a_429_is_retried_on_the_next_key_and_retry_after_rests_the_first() {
    let a = mock("a", KEY_A, &["gpt-4o"]);
    let b = mock("b", KEY_B, &["gpt-4o"]);
    control(&a, json!({"fail_every": 1, "fail_status": 429, "fail_headers": {"retry-after": "30"}}));
    let r = Router::start(&config("", &[cred("cred_a", KEY_A, &a.url(), -1), cred("cred_b", KEY_B, &b.url(), -1)]));
    let (resp, n) = until_it_reaches(&r, &a, &Request::chat(MASTER, "gpt-4o"), 3);
    assert_eq!((resp.status, resp.header("x-mock-provider")), (200, Some("b")), "the 429 was not retried on b: {}", resp.describe());
    assert_eq!(resp.header(ATTEMPTS_HEADER), Some("2"), "{}", resp.describe());
    assert_eq!(resp.header(RETRY_HEADER), None, "the retry flag reached the client");
    assert_eq!(resp.json()["choices"][0]["message"]["content"].as_str().map(|t| t.contains("b answering")), Some(true));
    // Each attempt carried its own credential's key, never the master key.
    assert_eq!(keys(&api_log(&a)), [KEY_A]);
    assert_eq!(keys(&api_log(&b)), vec![KEY_B; n]);
    let m = r.metrics();
    assert_eq!(metric_value(&m, "auto_ai_router_requests_total", &[("credential", "cred_a"), ("status", "429")]), Some(1.0), "per attempt");
    assert_eq!(metric_value(&m, "auto_ai_router_requests_total", &[("credential", "cred_b"), ("status", "200")]), Some(n as f64));
    assert_eq!(metric_value(&m, "auto_ai_router_retries_total", &[]), Some(1.0), "one retry");

    // Retry-After: 30 rests a: the next requests all go straight to b.
    for _ in 0..6 {
        let resp = r.chat("gpt-4o");
        assert_eq!((resp.status, resp.header("x-mock-provider")), (200, Some("b")), "{}", resp.describe());
        assert_eq!(resp.header(ATTEMPTS_HEADER), Some("1"), "a cooling-down key was tried again: {}", resp.describe());
    }
    assert_eq!(api_log(&a).len(), 1, "a got traffic during its Retry-After");
    let (_, h) = r.health();
    assert_eq!(h["credentials_banned"], 0, "a 429 with a cooldown is not a ban: {h}");
}

#[test]
fn a_refused_connection_moves_to_the_next_key_and_counts_as_502() {
    let b = mock("b", KEY_B, &["gpt-4o"]);
    let dead = format!("http://127.0.0.1:{}", closed_port());
    let r = Router::start(&config(
        "",
        &[cred("dead", KEY_A, &dead, -1), cred("cred_b", KEY_B, &b.url(), -1), "fail2ban:\n  max_attempts: 2\n".into()],
    ));
    let mut retried = 0;
    for _ in 0..4 {
        let resp = r.chat("gpt-4o");
        assert_eq!((resp.status, resp.header("x-mock-provider")), (200, Some("b")), "{}", resp.describe());
        if resp.header(ATTEMPTS_HEADER) == Some("2") {
            retried += 1;
        }
    }
    assert!(retried >= 1, "no request was sent to the dead credential first");
    assert_eq!(keys(&api_log(&b)), vec![KEY_B; 4], "b served every request once");
    let m = r.metrics();
    assert_eq!(metric_value(&m, "auto_ai_router_requests_total", &[("credential", "dead"), ("status", "502")]), Some(retried as f64));
    assert_eq!(
        metric_value(&m, "auto_ai_router_credential_errors_total", &[("credential", "dead")]),
        Some(retried as f64),
        "fail2ban strikes"
    );
}

#[test]
fn a_reset_before_the_response_moves_to_the_next_key() {
    let a = mock("a", KEY_A, &["gpt-4o"]);
    let b = mock("b", KEY_B, &["gpt-4o"]);
    // The connection closes after the request was read, before any response byte.
    control(&a, json!({"drop_every": 1}));
    let r = Router::start(&config("", &[cred("cred_a", KEY_A, &a.url(), -1), cred("cred_b", KEY_B, &b.url(), -1)]));
    let (resp, _) = until_it_reaches(&r, &a, &Request::chat(MASTER, "gpt-4o"), 3);
    assert_eq!((resp.status, resp.header("x-mock-provider")), (200, Some("b")), "{}", resp.describe());
    assert_eq!(resp.header(ATTEMPTS_HEADER), Some("2"));
}

#[test]
fn a_refused_connection_with_no_key_left_is_a_json_503() {
    let dead = format!("http://127.0.0.1:{}", closed_port());
    let r = Router::start(&config("", &[cred("dead", KEY_A, &dead, -1)]));
    let resp = r.chat("gpt-4o");
    assert_eq!(resp.status, 503, "{}", resp.describe());
    assert_eq!(resp.error_type().as_deref(), Some("service_unavailable_error"), "Envoy's reply is OpenAI JSON: {}", resp.describe());
    assert_eq!(resp.error_code().as_deref(), Some("no_credential_available"), "{}", resp.describe());
    assert!(resp.elapsed < Duration::from_secs(3), "{:?}", resp.elapsed);
    assert_eq!(
        metric_value(&r.metrics(), "auto_ai_router_requests_total", &[("credential", "dead"), ("status", "502")]),
        Some(1.0),
        "one attempt"
    );
}

#[test]
fn all_keys_failing_with_one_retry_make_two_attempts_and_return_the_last_answer() {
    let mocks = [mock("a", KEY_A, &["gpt-4o"]), mock("b", KEY_B, &["gpt-4o"]), mock("c", KEY_C, &["gpt-4o"])];
    for m in &mocks {
        control(m, json!({"fail_every": 1, "fail_status": 500}));
    }
    let creds: Vec<String> =
        mocks.iter().zip([KEY_A, KEY_B, KEY_C]).map(|(m, k)| cred(&format!("cred_{}", m.mock.settings().name), k, &m.url(), -1)).collect();
    let r = Router::start(&config("  max_provider_retries: 1\n", &creds));
    let resp = r.chat("gpt-4o");
    assert_eq!(resp.status, 500, "{}", resp.describe());
    let hit: Vec<String> = mocks.iter().filter(|m| !api_log(m).is_empty()).map(|m| m.mock.settings().name).collect();
    let attempts: usize = mocks.iter().map(|m| api_log(m).len()).sum();
    assert_eq!(attempts, 2, "max_provider_retries: 1 allows exactly two attempts (hit: {hit:?})");
    assert_eq!(hit.len(), 2, "the retry went to another key: {hit:?}");
    // The client gets the last provider's answer as it sent it.
    let last = resp.header("x-mock-provider").expect("the provider's own response").to_string();
    assert!(hit.contains(&last), "{last} {hit:?}");
    let message = resp.json()["error"]["message"].as_str().unwrap_or_default().to_string();
    assert_eq!(message, format!("{last}: injected failure (status 500)"));
    assert_eq!(resp.header(ATTEMPTS_HEADER), Some("2"));
    let m = r.metrics();
    assert_eq!(metric_value(&m, "auto_ai_router_requests_total", &[("status", "500")]), Some(2.0), "one count per attempt");
}

#[test]
fn a_single_key_429_goes_to_the_client_after_one_attempt() {
    let a = mock("a", KEY_A, &["gpt-4o"]);
    control(&a, json!({"fail_every": 1, "fail_status": 429, "fail_headers": {"retry-after": "7"}}));
    let r = Router::start(&config("", &[cred("cred_a", KEY_A, &a.url(), -1)]));
    let resp = r.chat("gpt-4o");
    assert_eq!((resp.status, resp.header("x-mock-provider")), (429, Some("a")), "{}", resp.describe());
    assert_eq!(resp.header("retry-after"), Some("7"), "the provider's answer as it sent it");
    assert_eq!(api_log(&a).len(), 1, "no other key: no second attempt");
}

#[test]
fn an_sse_stream_cut_mid_way_is_not_retried() {
    let a = mock("a", KEY_A, &["gpt-4o"]);
    let b = mock("b", KEY_B, &["gpt-4o"]);
    control(&a, json!({"abort_stream_after": 1, "chunk_delay_ms": 200}));
    let r = Router::start(&config("", &[cred("cred_a", KEY_A, &a.url(), -1), cred("cred_b", KEY_B, &b.url(), -1)]));
    let req = Request::post("/v1/chat/completions")
        .bearer(MASTER)
        .json(&json!({"model": "gpt-4o", "stream": true, "messages": [{"role": "user", "content": "Hello!"}]}));
    for _ in 0..3 {
        let (b0, a0) = (api_log(&b).len(), api_log(&a).len());
        let resp = r.send(&req);
        if api_log(&a).len() == a0 {
            continue; // b served it: try again, round-robin reaches a next
        }
        assert_eq!(resp.status, 200, "{}", resp.describe());
        let text = resp.text();
        assert!(text.contains("chat.completion.chunk"), "the first event reached the client: {text}");
        assert!(!text.contains("[DONE]"), "the stream was restarted or completed: {text}");
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(api_log(&b).len(), b0, "a stream whose headers went out was retried on b");
        return;
    }
    panic!("three streams and none went to a");
}

#[test]
fn a_10_mb_body_is_retried_intact() {
    let a = mock("a", KEY_A, &["gpt-4o"]);
    let b = mock("b", KEY_B, &["gpt-4o"]);
    control(&a, json!({"fail_every": 1, "fail_status": 503, "fail_headers": {}}));
    let r = Router::start(&config("  max_body_size_mb: 16\n", &[cred("cred_a", KEY_A, &a.url(), -1), cred("cred_b", KEY_B, &b.url(), -1)]));
    let body = serde_json::to_vec(&json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "q".repeat(10 << 20)}]})).unwrap();
    let req = Request::post("/v1/chat/completions").bearer(MASTER).header("Content-Type", "application/json").body(body.clone());
    let (resp, _) = until_it_reaches(&r, &a, &req, 3);
    assert_eq!((resp.status, resp.header("x-mock-provider")), (200, Some("b")), "{}", resp.describe());
    assert_eq!(api_log(&a).last().unwrap().body_len, body.len());
    assert_eq!(api_log(&b).last().unwrap().body_len, body.len(), "the retried attempt's body is not the client's");
    assert_eq!(b.mock.stats().last_request.unwrap()["body"]["model"], "gpt-4o");
}

#[test]
fn max_provider_retries_0_renders_no_retry_and_a_429_goes_to_the_client() {
    let a = mock("a", KEY_A, &["gpt-4o"]);
    let b = mock("b", KEY_B, &["gpt-4o"]);
    control(&a, json!({"fail_every": 1, "fail_status": 429}));
    let r =
        Router::start(&config("  max_provider_retries: 0\n", &[cred("cred_a", KEY_A, &a.url(), -1), cred("cred_b", KEY_B, &b.url(), -1)]));
    let bootstrap = std::fs::read_to_string(&r.bootstrap).unwrap();
    for needle in ["retry_policy", "upstream_codec", RETRY_HEADER, "cluster_header"] {
        assert!(!bootstrap.contains(needle), "{needle} in a bootstrap with max_provider_retries: 0");
    }
    let before_b = api_log(&b).len();
    let (resp, n) = until_it_reaches(&r, &a, &Request::chat(MASTER, "gpt-4o"), 3);
    assert_eq!((resp.status, resp.header("x-mock-provider")), (429, Some("a")), "{}", resp.describe());
    assert_eq!(api_log(&b).len(), before_b + n - 1, "the 429 was retried on b");
    assert_eq!(keys(&api_log(&a)), [KEY_A]);
}

#[test]
fn a_provider_sent_retry_flag_on_a_200_is_ignored() {
    let a = mock("a", KEY_A, &["gpt-4o"]);
    let b = mock("b", KEY_B, &["gpt-4o"]);
    control(&a, json!({"response_headers": {RETRY_HEADER: "1"}}));
    let r = Router::start(&config("", &[cred("cred_a", KEY_A, &a.url(), -1), cred("cred_b", KEY_B, &b.url(), -1)]));
    let before_b = api_log(&b).len();
    let (resp, n) = until_it_reaches(&r, &a, &Request::chat(MASTER, "gpt-4o"), 3);
    assert_eq!((resp.status, resp.header("x-mock-provider")), (200, Some("a")), "{}", resp.describe());
    assert_eq!(api_log(&b).len(), before_b + n - 1, "a provider's copy of the retry flag made Envoy retry");
    assert_eq!(resp.header(RETRY_HEADER), None);
    assert_eq!(api_log(&a).len(), 1);
}

#[test]
fn the_retried_attempt_gets_its_own_base_path_and_authority() {
    let a = mock("a", KEY_A, &["gpt-4o"]);
    let b = mock("b", KEY_B, &["gpt-4o"]);
    control(&a, json!({"path_prefix": "/pa", "fail_every": 1, "fail_status": 429}));
    control(&b, json!({"path_prefix": "/pb/x"}));
    let r = Router::start(&config(
        "",
        &[cred("cred_a", KEY_A, &format!("{}/pa", a.url()), -1), cred("cred_b", KEY_B, &format!("{}/pb/x", b.url()), -1)],
    ));
    let req = Request::post("/v1/chat/completions?trace=1")
        .bearer(MASTER)
        .json(&json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "Hello!"}]}));
    let (resp, _) = until_it_reaches(&r, &a, &req, 3);
    assert_eq!((resp.status, resp.header("x-mock-provider")), (200, Some("b")), "{}", resp.describe());
    let (la, lb) = (api_log(&a), api_log(&b));
    assert_eq!((la[0].path.as_str(), la[0].host.clone()), ("/pa/v1/chat/completions", a.addr.to_string()));
    let last_b = lb.last().unwrap();
    assert_eq!(
        (last_b.path.as_str(), last_b.host.clone()),
        ("/pb/x/v1/chat/completions", b.addr.to_string()),
        "prefix + client path, exactly"
    );
    assert_eq!(last_b.key, KEY_B);
}

#[test]
fn remaining_requests_0_on_a_200_rests_the_key_until_its_reset() {
    let a = mock("a", KEY_A, &["gpt-4o"]);
    let b = mock("b", KEY_B, &["gpt-4o"]);
    control(&a, json!({"response_headers": {"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "2s"}}));
    let r = Router::start(&config("", &[cred("cred_a", KEY_A, &a.url(), -1), cred("cred_b", KEY_B, &b.url(), -1)]));
    let (resp, _) = until_it_reaches(&r, &a, &Request::chat(MASTER, "gpt-4o"), 3);
    let rested_at = Instant::now();
    assert_eq!((resp.status, resp.header("x-mock-provider")), (200, Some("a")), "{}", resp.describe());
    // Within its reset a is not picked, before any 429 came.
    while rested_at.elapsed() < Duration::from_millis(1200) {
        let resp = r.chat("gpt-4o");
        assert_eq!((resp.status, resp.header("x-mock-provider")), (200, Some("b")), "a was used before its reset: {}", resp.describe());
        std::thread::sleep(Duration::from_millis(100));
    }
    // After it, a serves again.
    wait_for("a back in the rotation after its 2 s reset", Duration::from_secs(8), || {
        (r.chat("gpt-4o").header("x-mock-provider") == Some("a")).then_some(())
    });
    assert!(rested_at.elapsed() >= Duration::from_millis(1500), "a came back after {:?}", rested_at.elapsed());
}

#[test]
fn an_upstream_timeout_counts_as_504_for_its_key() {
    let slow = mock("slow", KEY_A, &["gpt-4o"]);
    control(&slow, json!({"delay_ms": 4000}));
    let r = Router::start(&config("  request_timeout: 1s\n", &[cred("slow", KEY_A, &slow.url(), -1)]));
    let resp = r.chat("gpt-4o");
    assert_eq!((resp.status, resp.error_code().as_deref()), (504, Some("upstream_timeout")), "{}", resp.describe());
    let m = r.metrics();
    // One attempt (the route timeout bounds all attempts together), counted as the timeout it was.
    assert_eq!(metric_value(&m, "auto_ai_router_requests_total", &[("credential", "slow")]), Some(1.0), "{}", grep(&m));
    assert_eq!(metric_value(&m, "auto_ai_router_requests_total", &[("credential", "slow"), ("status", "504")]), Some(1.0), "{}", grep(&m));
}

fn grep(m: &str) -> String {
    m.lines().filter(|l| l.contains("auto_ai_router_requests_total")).collect::<Vec<_>>().join("\n")
}

#[test]
fn a_client_that_hangs_up_is_not_a_provider_failure() {
    use std::io::Write;
    let slow = mock("slow", KEY_A, &["gpt-4o"]);
    control(&slow, json!({"delay_ms": 1500}));
    let r = Router::start(&config("", &[cred("slow", KEY_A, &slow.url(), -1), "fail2ban:\n  max_attempts: 3\n".into()]));
    let body = serde_json::to_vec(&json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "Hello!"}]})).unwrap();
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {MASTER}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        r.addr,
        body.len()
    );
    // Three clients give up while the provider is still thinking (a "stop" button, a client timeout).
    for _ in 0..3 {
        let mut s = std::net::TcpStream::connect(r.addr).unwrap();
        s.write_all(head.as_bytes()).unwrap();
        s.write_all(&body).unwrap();
        std::thread::sleep(Duration::from_millis(300));
        drop(s);
    }
    std::thread::sleep(Duration::from_millis(300));
    let (_, h) = r.health();
    assert_eq!(h["credentials_banned"], 0, "cancelled requests banned the key: {h}");
    let m = r.metrics();
    assert_eq!(metric_value(&m, "auto_ai_router_credential_errors_total", &[("credential", "slow")]).unwrap_or(0.0), 0.0, "{}", grep(&m));
    control(&slow, json!({"delay_ms": 0}));
    let resp = r.chat("gpt-4o");
    assert_eq!(resp.status, 200, "{}", resp.describe());
}

/// `server.attempt_timeout`: a key that accepts and never answers is abandoned after it and the
/// request is retried on another key, well within `request_timeout`; the silent key takes a 504
/// strike.
#[test]
fn a_silent_key_is_abandoned_after_attempt_timeout_and_retried_elsewhere() {
    let a = mock("a", KEY_A, &["gpt-4o"]);
    let b = mock("b", KEY_B, &["gpt-4o"]);
    control(&a, json!({"delay_ms": 8000}));
    let r = Router::start(&config(
        "  attempt_timeout: 1s\n  request_timeout: 20s\n",
        &[cred("cred_a", KEY_A, &a.url(), -1), cred("cred_b", KEY_B, &b.url(), -1)],
    ));
    // A fresh router's cursor starts at cred_a.
    let start = Instant::now();
    let resp = r.send(&Request::chat(MASTER, "gpt-4o"));
    let took = start.elapsed();
    assert_eq!((resp.status, resp.header("x-mock-provider")), (200, Some("b")), "{}", resp.describe());
    assert_eq!(resp.header(ATTEMPTS_HEADER), Some("2"));
    assert!(took >= Duration::from_millis(900) && took < Duration::from_secs(4), "{took:?}: not retried at the attempt timeout");
    let creds = Request::get("/v1/credentials").bearer(MASTER).send(r.addr).unwrap().json();
    let a_state = creds["data"].as_array().unwrap().iter().find(|c| c["name"] == "cred_a").unwrap().clone();
    assert_eq!(a_state["consecutive_errors"], 1, "a 504 strike for the silent key: {a_state}");
    assert_eq!(r.metric("auto_ai_router_retries_total", &[("credential", "cred_a"), ("reason", "504")]), Some(1.0));
}
