//! Issue 8's hostile-request table: each request with its expected status and JSON error code,
//! and whether it may reach a provider. Every case runs; the table is printed, then asserted.

use e2e::harness::{api_log, control, cred, mock, Router, MASTER};
use e2e::http::{send_raw, Request, Response};

#[derive(Clone, Copy, Debug)]
enum Want {
    Status(u16),
    /// Envoy's own limit reply or a closed connection: anything but 2xx.
    NotOk,
}

enum Send {
    Req(Request),
    Raw(Vec<u8>),
}

struct Case {
    name: &'static str,
    send: Send,
    want: Want,
    code: Option<&'static str>,
    reaches_provider: bool,
}

const CHAT: &str = r#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}]}"#;

fn chat_with_auth(value: &str) -> Request {
    Request::post("/v1/chat/completions").header("Authorization", value).header("Content-Type", "application/json").body(CHAT)
}

fn body(b: impl Into<Vec<u8>>) -> Request {
    Request::post("/v1/chat/completions").bearer(MASTER).header("Content-Type", "application/json").body(b)
}

/// A raw request with the given extra header lines (bytes as they are) and body.
fn raw(method: &str, path: &str, headers: &[&[u8]], body: &[u8]) -> Vec<u8> {
    let mut out = format!("{method} {path} HTTP/1.1\r\nHost: router\r\nConnection: close\r\n").into_bytes();
    for h in headers {
        out.extend_from_slice(h);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(format!("Content-Length: {}\r\n\r\n", body.len()).as_bytes());
    out.extend_from_slice(body);
    out
}

fn crc32(data: &[u8]) -> u32 {
    let mut c = 0xFFFF_FFFFu32;
    for &b in data {
        c ^= b as u32;
        for _ in 0..8 {
            c = if c & 1 != 0 { 0xEDB8_8320 ^ (c >> 1) } else { c >> 1 };
        }
    }
    !c
}

/// A valid gzip member holding `data` in one stored (uncompressed) deflate block.
fn gzip_stored(data: &[u8]) -> Vec<u8> {
    let mut out = vec![0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 0xff];
    let len = data.len() as u16;
    out.push(1);
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&(!len).to_le_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(&crc32(data).to_le_bytes());
    out.extend_from_slice(&(data.len() as u32).to_le_bytes());
    out
}

fn cases() -> Vec<Case> {
    let master_prefix = &MASTER[..MASTER.len() - 1];
    let mut many = Request::post("/v1/chat/completions").bearer(MASTER).header("Content-Type", "application/json").body(CHAT);
    for i in 0..10_000 {
        many = many.header(&format!("x-h{i}"), "v");
    }
    let long_value = "a".repeat(40_000);
    let huge_value = "b".repeat(100_000);
    let c = |name, send, want, code, reaches_provider| Case { name, send, want, code, reaches_provider };
    use Want::*;
    vec![
        c(
            "Authorization with an empty value",
            Send::Raw(raw("POST", "/v1/chat/completions", &[b"Authorization:"], CHAT.as_bytes())),
            Status(401),
            Some("missing_api_key"),
            false,
        ),
        c("empty bearer (`Bearer `)", Send::Req(chat_with_auth("Bearer ")), Status(401), Some("invalid_authorization_header"), false),
        c(
            "`Bearer` with two spaces before the key",
            Send::Req(chat_with_auth(&format!("Bearer  {MASTER}"))),
            Status(401),
            Some("invalid_api_key"),
            false,
        ),
        c("lowercase `bearer` (accepted, RFC 9110)", Send::Req(chat_with_auth(&format!("bearer {MASTER}"))), Status(200), None, true),
        c("uppercase `BEARER` (accepted)", Send::Req(chat_with_auth(&format!("BEARER {MASTER}"))), Status(200), None, true),
        c(
            "`Basic` scheme with the key",
            Send::Req(chat_with_auth(&format!("Basic {MASTER}"))),
            Status(401),
            Some("invalid_authorization_header"),
            false,
        ),
        c(
            "key in the query string (?api_key=)",
            Send::Req(Request::post(&format!("/v1/chat/completions?api_key={MASTER}")).body(CHAT)),
            Status(401),
            Some("missing_api_key"),
            false,
        ),
        c(
            "key in the query string (?key=) plus a wrong header",
            Send::Req(Request::post(&format!("/v1/chat/completions?key={MASTER}")).bearer("sk-wrong").body(CHAT)),
            Status(401),
            Some("invalid_api_key"),
            false,
        ),
        c(
            "key in x-api-key instead of Authorization",
            Send::Req(Request::post("/v1/chat/completions").header("x-api-key", MASTER).body(CHAT)),
            Status(401),
            Some("missing_api_key"),
            false,
        ),
        c(
            "master key minus its last character",
            Send::Req(chat_with_auth(&format!("Bearer {master_prefix}"))),
            Status(401),
            Some("invalid_api_key"),
            false,
        ),
        c(
            "master key plus one character",
            Send::Req(chat_with_auth(&format!("Bearer {MASTER}0"))),
            Status(401),
            Some("invalid_api_key"),
            false,
        ),
        c("10 000 headers", Send::Req(many), NotOk, None, false),
        c("1-byte body `{`", Send::Req(body("{")), Status(400), Some("invalid_json"), false),
        c("1-byte body `1`", Send::Req(body("1")), Status(400), Some("invalid_json"), false),
        c("model as a number", Send::Req(body(r#"{"model":42,"messages":[]}"#)), Status(400), Some("invalid_model"), false),
        c("model as an array", Send::Req(body(r#"{"model":["gpt-4o"],"messages":[]}"#)), Status(400), Some("invalid_model"), false),
        c("model as null", Send::Req(body(r#"{"model":null,"messages":[]}"#)), Status(400), Some("missing_model"), false),
        c(
            "two model keys (README: refused)",
            Send::Req(body(r#"{"model":"gpt-4o","model":"gpt-4o-mini"}"#)),
            Status(400),
            Some("invalid_model"),
            false,
        ),
        c("valid JSON but an array", Send::Req(body(format!("[{CHAT}]"))), Status(400), Some("invalid_json"), false),
        c(
            "Content-Encoding: gzip body (decoded, routed on its model)",
            Send::Req(body(gzip_stored(CHAT.as_bytes())).header("Content-Encoding", "gzip")),
            Status(200),
            None,
            true,
        ),
        c(
            "Content-Encoding: gzip on a plain body",
            Send::Req(body(CHAT.as_bytes().to_vec()).header("Content-Encoding", "gzip")),
            Status(400),
            Some("invalid_body"),
            false,
        ),
        c(
            "Content-Encoding: compress (unsupported)",
            Send::Req(body(gzip_stored(CHAT.as_bytes())).header("Content-Encoding", "compress")),
            Status(415),
            Some("unsupported_content_encoding"),
            false,
        ),
        c(
            "path traversal /v1/../admin",
            Send::Raw(raw("GET", "/v1/../admin", &[format!("Authorization: Bearer {MASTER}").as_bytes()], b"")),
            Status(404),
            Some("not_found"),
            false,
        ),
        c(
            "path traversal /v1/%2e%2e/admin",
            Send::Raw(raw("GET", "/v1/%2e%2e/admin", &[format!("Authorization: Bearer {MASTER}").as_bytes()], b"")),
            Status(404),
            Some("not_found"),
            false,
        ),
        c(
            "path traversal /v1/..%2f..%2fconfig_dump",
            Send::Raw(raw("GET", "/v1/..%2f..%2fconfig_dump", &[format!("Authorization: Bearer {MASTER}").as_bytes()], b"")),
            Status(404),
            Some("not_found"),
            false,
        ),
        c(
            "path traversal POST /v1/chat/../../config_dump",
            Send::Raw(raw("POST", "/v1/chat/../../config_dump", &[format!("Authorization: Bearer {MASTER}").as_bytes()], CHAT.as_bytes())),
            Status(404),
            Some("not_found"),
            false,
        ),
        c("/../config_dump", Send::Raw(raw("GET", "/../config_dump", &[], b"")), Status(404), Some("not_found"), false),
        c("GET /stats on the public port", Send::Req(Request::get("/stats")), Status(404), Some("not_found"), false),
        c("GET /config_dump on the public port", Send::Req(Request::get("/config_dump")), Status(404), Some("not_found"), false),
        c(
            "POST /quitquitquit on the public port",
            Send::Req(Request::post("/quitquitquit").body("")),
            Status(404),
            Some("not_found"),
            false,
        ),
        c("GET /stats/prometheus on the public port", Send::Req(Request::get("/stats/prometheus")), Status(404), Some("not_found"), false),
        c(
            "POST /logging?level=trace on the public port",
            Send::Req(Request::post("/logging?level=trace").body("")),
            Status(404),
            Some("not_found"),
            false,
        ),
        c(
            "upper-case /V1/chat/completions",
            Send::Req(Request::chat(MASTER, "gpt-4o").clone_with_path("/V1/chat/completions")),
            Status(404),
            Some("not_found"),
            false,
        ),
        c(
            "non-ASCII header value (UTF-8) on a valid request",
            Send::Raw(raw(
                "POST",
                "/v1/chat/completions",
                &[format!("Authorization: Bearer {MASTER}").as_bytes(), "X-Note: héllo wörld ✓".as_bytes()],
                CHAT.as_bytes(),
            )),
            Status(200),
            None,
            true,
        ),
        c(
            "non-ASCII key in Authorization",
            Send::Raw(raw("POST", "/v1/chat/completions", &["Authorization: Bearer sk-é-ключ".as_bytes()], CHAT.as_bytes())),
            Status(401),
            Some("invalid_api_key"),
            false,
        ),
        c(
            "non-UTF-8 bytes in Authorization",
            Send::Raw(raw("POST", "/v1/chat/completions", &[b"Authorization: Bearer sk-\xff\xfe\x80"], CHAT.as_bytes())),
            Status(401),
            Some("invalid_api_key"),
            false,
        ),
        c(
            "40 000-byte header value on a valid request",
            Send::Req(Request::chat(MASTER, "gpt-4o").header("X-Long", &long_value)),
            Status(200),
            None,
            true,
        ),
        c(
            "40 000-byte Authorization value",
            Send::Req(chat_with_auth(&format!("Bearer {long_value}"))),
            Status(401),
            Some("invalid_api_key"),
            false,
        ),
        c(
            "100 000-byte header value (over Envoy's 60 KiB)",
            Send::Req(Request::chat(MASTER, "gpt-4o").header("X-Huge", &huge_value)),
            NotOk,
            None,
            false,
        ),
        c(
            "two Authorization headers (master, wrong)",
            Send::Req(chat_with_auth(&format!("Bearer {MASTER}")).header("Authorization", "Bearer sk-wrong")),
            Status(401),
            None,
            false,
        ),
        c(
            "two Authorization headers (wrong, master)",
            Send::Req(chat_with_auth("Bearer sk-wrong").header("Authorization", &format!("Bearer {MASTER}"))),
            Status(401),
            None,
            false,
        ),
        c(
            "two Authorization headers (master, master)",
            Send::Req(chat_with_auth(&format!("Bearer {MASTER}")).header("Authorization", &format!("Bearer {MASTER}"))),
            Status(401),
            None,
            false,
        ),
        c(
            "fault header on the release build (compiled out)",
            Send::Req(Request::chat(MASTER, "gpt-4o").header("x-auto-ai-router-fault", "trap")),
            Status(200),
            None,
            true,
        ),
    ]
}

trait WithPath {
    fn clone_with_path(&self, p: &str) -> Request;
}
impl WithPath for Request {
    fn clone_with_path(&self, p: &str) -> Request {
        let mut r = self.clone();
        r.path = p.into();
        r
    }
}

fn outcome(r: &std::io::Result<Response>) -> String {
    match r {
        Ok(x) => format!("{} {}", x.status, x.error_code().unwrap_or_else(|| "-".into())),
        Err(e) => format!("connection error ({})", e.kind()),
    }
}

#[test]
fn hostile_request_table() {
    let a = mock("a", "sk-hostile-a-0000", &["gpt-4o"]);
    let cfg = format!("server:\n  master_key: \"{MASTER}\"\ncredentials:\n{}", cred("cred_a", "sk-hostile-a-0000", &a.url(), -1));
    let r = Router::start(&cfg);
    let mut table = vec![format!("{:<58} | {:<34} | {}", "case", "expected", "got")];
    let mut failures = Vec::new();
    for case in cases() {
        a.mock.reset_stats();
        let got = match &case.send {
            Send::Req(q) => q.send(r.addr),
            Send::Raw(b) => send_raw(r.addr, b),
        };
        let reached = api_log(&a).len();
        let mut ok = match (&got, case.want) {
            (Ok(x), Want::Status(s)) => x.status == s && (case.code.is_none() || x.error_code().as_deref() == case.code),
            (Err(_), Want::Status(_)) => false,
            (Ok(x), Want::NotOk) => !(200..300).contains(&x.status),
            (Err(_), Want::NotOk) => true,
        };
        if let Ok(x) = &got {
            // Our own errors are JSON; nothing from the admin interface ever shows.
            if x.status >= 400 && case.code.is_some() && x.error_type().is_none() {
                ok = false;
            }
            let t = x.text();
            if t.contains("\"configs\"")
                || t.contains("cluster_manager")
                || t.contains("OK\n") && x.status == 200 && case.name.contains("public port")
            {
                ok = false;
            }
            if x.status == 200 {
                if let Some(last) = a.mock.stats().last_request {
                    if last.to_string().contains(MASTER) {
                        ok = false;
                    }
                }
            }
        }
        ok &= (reached > 0) == case.reaches_provider;
        let want = match case.want {
            Want::Status(s) => format!("{s} {}", case.code.unwrap_or("-")),
            Want::NotOk => "not 2xx (Envoy limit)".into(),
        };
        let want = format!("{want}{}", if case.reaches_provider { ", provider" } else { ", no provider" });
        let got_s = format!("{}{}", outcome(&got), if reached > 0 { ", provider" } else { ", no provider" });
        table.push(format!("{:<58} | {:<34} | {}{}", case.name, want, got_s, if ok { "" } else { "   <-- FAIL" }));
        if !ok {
            failures.push(format!(
                "{}: expected {want}, got {got_s} ({})",
                case.name,
                got.as_ref().map(|x| x.describe()).unwrap_or_default()
            ));
        }
    }
    // Envoy is still up and serving after all of it; the admin was never reached.
    assert_eq!(r.health().0, 200, "Envoy went down (quitquitquit?)");
    assert_eq!(r.chat("gpt-4o").status, 200);
    eprintln!("hostile requests:\n{}", table.join("\n"));
    assert!(failures.is_empty(), "hostile cases failed:\n{}\n\n{}", failures.join("\n"), table.join("\n"));
}

/// A client can't make Envoy retry (multiplying provider traffic past the RPM admission) or cut the
/// upstream timeout: with `use_remote_address` its `x-envoy-*` control headers are ignored.
#[test]
fn client_envoy_control_headers_have_no_effect() {
    let a = mock("a", "sk-hostile-a-0000", &["gpt-4o"]);
    let cfg = format!("server:\n  master_key: \"{MASTER}\"\ncredentials:\n{}", cred("cred_a", "sk-hostile-a-0000", &a.url(), -1));
    let r = Router::start(&cfg);
    control(&a, serde_json::json!({"fail_next": 5, "fail_status": 500, "delay_ms": 300}));
    a.mock.reset_stats();
    let resp = Request::chat(MASTER, "gpt-4o")
        .header("x-envoy-retry-on", "5xx,connect-failure")
        .header("x-envoy-max-retries", "4")
        .header("x-envoy-upstream-rq-timeout-ms", "1")
        .send(r.addr)
        .expect("response");
    assert_eq!(resp.status, 500, "the provider's own 500, not a retry or a forced 504: {}", resp.describe());
    assert_eq!(api_log(&a).len(), 1, "exactly one upstream attempt");
}
