//! RPM limits across both Envoy workers under a concurrent burst.

use e2e::harness::{api_log, cred, metric_value, mock, Options, Router, MASTER};
use e2e::http::{Request, Response};
use std::sync::{Arc, Barrier};

/// Sends `models.len()` chat requests at once, each on its own connection from its own thread.
fn burst(r: &Router, models: &[&str]) -> Vec<(String, Response)> {
    let barrier = Arc::new(Barrier::new(models.len()));
    let addr = r.addr;
    let handles: Vec<_> = models
        .iter()
        .map(|m| {
            let (b, m) = (barrier.clone(), m.to_string());
            std::thread::spawn(move || {
                let req = Request::chat(MASTER, &m);
                b.wait();
                let resp = req.send(addr).unwrap_or_else(|e| panic!("burst request: {e}"));
                (m, resp)
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().expect("burst thread")).collect()
}

/// Connections each Envoy worker accepted on the public listener (admin stats).
fn per_worker_connections(r: &Router) -> Vec<u64> {
    let stats = r.admin_get("/stats?filter=worker_.*downstream_cx_total").text();
    let port = format!("_{}.", r.addr.port());
    stats
        .lines()
        .filter(|l| l.starts_with("listener.") && l.contains(&port) && l.contains(".worker_"))
        .filter_map(|l| l.rsplit_once(": ").and_then(|(_, v)| v.trim().parse().ok()))
        .collect()
}

fn check_429(resp: &Response) {
    assert_eq!(resp.error_code().as_deref(), Some("rate_limit_exceeded"), "{}", resp.describe());
    assert_eq!(resp.error_type().as_deref(), Some("rate_limit_error"));
    let ra: u64 = resp
        .header("retry-after")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("429 without a numeric Retry-After: {:?}", resp.headers));
    // The window is 61 s long (a request is counted for a full minute whichever second it came in).
    assert!((1..=61).contains(&ra), "Retry-After {ra} is not within a 61 s window");
}

#[test]
fn rpm_per_credential_holds_across_workers_under_a_burst() {
    let a = mock("a", "sk-rpm-a-00000", &["gpt-4o"]);
    let b = mock("b", "sk-rpm-b-00000", &["gpt-4o"]);
    let cfg = format!(
        "server:\n  master_key: \"{MASTER}\"\n  default_models_rpm: -1\ncredentials:\n{}{}",
        cred("cred_a", "sk-rpm-a-00000", &a.url(), 20),
        cred("cred_b", "sk-rpm-b-00000", &b.url(), 20),
    );
    let r = Router::start(&cfg);
    let results = burst(&r, &["gpt-4o"; 60]);
    let ok = results.iter().filter(|(_, x)| x.status == 200).count();
    let limited: Vec<&Response> = results.iter().filter(|(_, x)| x.status == 429).map(|(_, x)| x).collect();
    let other: Vec<String> = results.iter().filter(|(_, x)| x.status != 200 && x.status != 429).map(|(_, x)| x.describe()).collect();
    assert!(other.is_empty(), "unexpected replies: {other:?}");
    assert_eq!((ok, limited.len()), (40, 20), "rpm 20 × 2 credentials: 40 admitted, 20 refused");
    limited.iter().for_each(|x| check_429(x));
    assert_eq!((api_log(&a).len(), api_log(&b).len()), (20, 20), "each mock sees exactly its rpm");
    let workers = per_worker_connections(&r);
    assert!(workers.len() == 2 && workers.iter().all(|n| *n > 0), "both Envoy workers took part: {workers:?}");
    // One more is refused too; the metric counts the refusals.
    let resp = r.chat("gpt-4o");
    assert_eq!(resp.status, 429, "{}", resp.describe());
    check_429(&resp);
    assert_eq!(metric_value(&r.metrics(), "auto_ai_router_rejections_total", &[("reason", "rate_limited")]), Some(21.0));
    assert_eq!(api_log(&a).len() + api_log(&b).len(), 40);
}

#[test]
fn rpm_per_model_holds_across_workers_under_a_burst() {
    let a = mock("a", "sk-mrpm-a-0000", &["gpt-4o", "gpt-4o-mini"]);
    let b = mock("b", "sk-mrpm-b-0000", &["gpt-4o", "gpt-4o-mini"]);
    let cfg = format!(
        "server:\n  master_key: \"{MASTER}\"\n  default_models_rpm: -1\ncredentials:\n{}{}",
        cred("cred_a", "sk-mrpm-a-0000", &a.url(), -1),
        cred("cred_b", "sk-mrpm-b-0000", &b.url(), -1),
    );
    let opts = Options { models_yaml: Some("models:\n  - name: gpt-4o\n    rpm: 10\n".into()), ..Options::default() };
    let r = Router::start_with(&cfg, opts);
    let mut models = vec!["gpt-4o"; 40];
    models.extend(["gpt-4o-mini"; 20]);
    let results = burst(&r, &models);
    let count = |m: &str, s: u16| results.iter().filter(|(mm, x)| mm == m && x.status == s).count();
    assert_eq!((count("gpt-4o", 200), count("gpt-4o", 429)), (20, 20), "gpt-4o: rpm 10 per (credential, model) × 2");
    assert_eq!(count("gpt-4o-mini", 200), 20, "an unlimited model is not affected");
    results.iter().filter(|(_, x)| x.status == 429).for_each(|(_, x)| check_429(x));
    for m in [&a, &b] {
        let log = api_log(m);
        let n = |model: &str| log.iter().filter(|e| e.model.as_deref() == Some(model)).count();
        assert_eq!(n("gpt-4o"), 10, "each credential admits 10 gpt-4o");
        assert!(n("gpt-4o-mini") > 0, "gpt-4o-mini goes to both credentials");
    }
    let mini: usize = [&a, &b].iter().map(|m| api_log(m).iter().filter(|e| e.model.as_deref() == Some("gpt-4o-mini")).count()).sum();
    assert_eq!(mini, 20);
    let workers = per_worker_connections(&r);
    assert!(workers.len() == 2 && workers.iter().all(|n| *n > 0), "both Envoy workers took part: {workers:?}");
}
