//! `make soak` (issue 8; not in CI): 70 s by default (SOAK_SECONDS; past one 60 s window) of contention on a real Envoy with
//! `--concurrency 2`, 64 keep-alive connections, mixed models, one mock failing 5 % of requests.
//! Prints a report: requests by outcome, the most admissions the mocks saw in any 60 s window per
//! credential and per (credential, model) against the limits, bans and unbans, Envoy's memory
//! before and after. Fails if a limit was exceeded or memory grew without bound.

use e2e::harness::{api_log, control, cred, metric_value, mock, Options, Router, MASTER};
use e2e::http::{Conn, Request};
use e2e::mock::{BackgroundMock, LogEntry};
use serde_json::json;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const CONNECTIONS: usize = 64;

/// Most entries in any `span` consecutive one-second buckets of the mock's clock.
///
/// The filter guarantees at most `limit` admissions in any 60 of *its* seconds; the mock logs a
/// request a little later (Envoy's latency), so an admission charged at filter second f is seen in
/// mock second f or f+1. Any 59 mock seconds therefore hold admissions from at most 60 filter
/// seconds, which is the bound asserted; the 60-second figure is reported too, and can exceed the
/// limit by the admissions in flight across a second boundary.
fn max_in(entries: &[&LogEntry], span: u64) -> usize {
    let mut secs: Vec<u64> = entries.iter().map(|e| e.ts_ms / 1000).collect();
    secs.sort_unstable();
    let mut best = 0;
    let mut lo = 0;
    for hi in 0..secs.len() {
        while secs[hi] - secs[lo] >= span {
            lo += 1;
        }
        best = best.max(hi - lo + 1);
    }
    best
}

fn rss_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)?.parse().ok()))
        .unwrap_or(0)
}

fn admin_stat(r: &Router, name: &str) -> u64 {
    let t = r.admin_get(&format!("/stats?filter=^{name}$")).text();
    t.lines().find_map(|l| l.strip_prefix(&format!("{name}: ")).and_then(|v| v.trim().parse().ok())).unwrap_or(0)
}

/// Collects every logged API request of a mock (its own log is bounded), polling until stopped.
fn collector(m: Arc<BackgroundMock>, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<Vec<LogEntry>> {
    std::thread::spawn(move || {
        let mut seen: BTreeMap<u64, LogEntry> = BTreeMap::new();
        loop {
            let done = stop.load(Ordering::SeqCst);
            for e in api_log(&m) {
                seen.entry(e.seq).or_insert(e);
            }
            if done {
                return seen.into_values().collect();
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    })
}

#[test]
#[ignore = "soak: run with `make soak`"]
fn soak() {
    let secs: u64 = std::env::var("SOAK_SECONDS").ok().and_then(|v| v.parse().ok()).unwrap_or(70);
    let mocks: Vec<Arc<BackgroundMock>> = vec![
        Arc::new(mock("a", "sk-soak-a-000000", &["gpt-4o", "gpt-4o-mini"])),
        Arc::new(mock("b", "sk-soak-b-000000", &["gpt-4o", "gpt-4o-mini", "claude-3"])),
        Arc::new(mock("c", "sk-soak-c-000000", &["claude-3"])),
    ];
    control(&mocks[1], json!({"fail_percent": 5.0, "fail_status": 500}));
    let cred_rpm = [("cred_a", 300u64), ("cred_b", 240), ("cred_c", 180)];
    let model_rpm: BTreeMap<&str, u64> = [("gpt-4o", 150u64), ("claude-3", 120), ("gpt-4o-mini", 200)].into();
    let cfg = format!(
        "server:\n  master_key: \"{MASTER}\"\n  replace_v1_models: true\n  models_refresh: 10s\n  default_models_rpm: 200\n  logging_level: error\n\
         credentials:\n{}{}{}fail2ban:\n  max_attempts: 2\n  ban_duration: 3s\n  error_codes: [500]\n",
        cred("cred_a", "sk-soak-a-000000", &mocks[0].url(), 300),
        cred("cred_b", "sk-soak-b-000000", &mocks[1].url(), 240),
        cred("cred_c", "sk-soak-c-000000", &mocks[2].url(), 180),
    );
    let models_yaml = "models:\n  - name: gpt-4o\n    rpm: 150\n  - name: claude-3\n    rpm: 120\n".to_string();
    let r = Router::start_with(&cfg, Options { models_yaml: Some(models_yaml), ..Options::default() });
    // Wait for the model lists (model-aware routing) before loading.
    let deadline = Instant::now() + Duration::from_secs(20);
    while r.send(&Request::get("/v1/models").bearer(MASTER)).json()["data"].as_array().map(Vec::len) != Some(3) {
        assert!(Instant::now() < deadline, "model lists not fetched");
        std::thread::sleep(Duration::from_millis(100));
    }
    let rss_before = rss_kb(r.pid());
    let alloc_before = admin_stat(&r, "server.memory_allocated");

    let stop = Arc::new(AtomicBool::new(false));
    let collectors: Vec<_> = mocks.iter().map(|m| collector(m.clone(), stop.clone())).collect();
    // Bans and unbans, from /health transitions (polled) and the filter's ban counter.
    let health_log = Arc::new(Mutex::new(Vec::<(u64, u64)>::new()));
    let hl = health_log.clone();
    let (addr, hstop) = (r.addr, stop.clone());
    let t0 = Instant::now();
    let health_thread = std::thread::spawn(move || {
        while !hstop.load(Ordering::SeqCst) {
            if let Ok(x) = Request::get("/health").send(addr) {
                if let Some(b) = serde_json::from_slice::<serde_json::Value>(&x.body).ok().and_then(|v| v["credentials_banned"].as_u64()) {
                    hl.lock().unwrap().push((t0.elapsed().as_millis() as u64, b));
                }
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    });

    let end = Instant::now() + Duration::from_secs(secs);
    let models = ["gpt-4o", "gpt-4o-mini", "claude-3", "gpt-4o-mini", "gpt-4o"];
    let workers: Vec<_> = (0..CONNECTIONS)
        .map(|i| {
            std::thread::spawn(move || {
                let mut conn = Conn::new(addr);
                let mut by_status: BTreeMap<String, u64> = BTreeMap::new();
                let mut n = i;
                while Instant::now() < end {
                    let req = Request::chat(MASTER, models[n % models.len()]);
                    n += 1;
                    let k = match conn.send(&req) {
                        Ok(x) => x.status.to_string(),
                        Err(_) => "error".into(),
                    };
                    *by_status.entry(k).or_default() += 1;
                }
                by_status
            })
        })
        .collect();
    let mut totals: BTreeMap<String, u64> = BTreeMap::new();
    for w in workers {
        for (k, v) in w.join().unwrap() {
            *totals.entry(k).or_default() += v;
        }
    }
    let elapsed = t0.elapsed();
    stop.store(true, Ordering::SeqCst);
    health_thread.join().unwrap();
    let logs: Vec<Vec<LogEntry>> = collectors.into_iter().map(|c| c.join().unwrap()).collect();
    std::thread::sleep(Duration::from_millis(1500));
    let rss_after = rss_kb(r.pid());
    let alloc_after = admin_stat(&r, "server.memory_allocated");

    let mut report = vec![format!(
        "soak: {:.0} s, Envoy --concurrency 2, {CONNECTIONS} keep-alive connections, models {models:?}, mock b failing 5 % (500)",
        elapsed.as_secs_f64()
    )];
    let total: u64 = totals.values().sum();
    report.push(format!("requests: {total} ({:.0}/s) by status: {totals:?}", total as f64 / elapsed.as_secs_f64()));
    let mut exceeded = Vec::new();
    for (i, (name, limit)) in cred_rpm.iter().enumerate() {
        let all: Vec<&LogEntry> = logs[i].iter().collect();
        let (max, max60) = (max_in(&all, 59), max_in(&all, 60));
        report.push(format!(
            "{name}: {} admissions at the mock, max {max} in any 59 s window, {max60} in any 60 s window (limit {limit})",
            all.len()
        ));
        if max as u64 > *limit {
            exceeded.push(format!("{name}: {max} > {limit}"));
        }
        let mut per_model: BTreeMap<String, Vec<&LogEntry>> = BTreeMap::new();
        for e in &logs[i] {
            per_model.entry(e.model.clone().unwrap_or_default()).or_default().push(e);
        }
        for (m, es) in per_model {
            let limit = model_rpm.get(m.as_str()).copied().unwrap_or(200);
            let (max, max60) = (max_in(&es, 59), max_in(&es, 60));
            report.push(format!(
                "  ({name}, {m}): {} admissions, max {max} in any 59 s window, {max60} in any 60 s window (limit {limit})",
                es.len()
            ));
            if max as u64 > limit {
                exceeded.push(format!("({name}, {m}): {max} > {limit}"));
            }
        }
    }
    let hl = health_log.lock().unwrap();
    let (mut bans, mut unbans) = (0, 0);
    for w in hl.windows(2) {
        if w[1].1 > w[0].1 {
            bans += w[1].1 - w[0].1;
        }
        if w[1].1 < w[0].1 {
            unbans += w[0].1 - w[1].1;
        }
    }
    let errors = metric_value(&r.metrics(), "auto_ai_router_credential_errors_total", &[("credential", "cred_b")]).unwrap_or(0.0);
    let ban_lines = r.log().lines().filter(|l| l.contains(" banned ")).count();
    report.push(format!(
        "bans: {ban_lines} logged by the filter; /health (polled every 100 ms) saw {bans} ban and {unbans} unban transitions; cred_b errors counted: {errors}; mock b injected {} failures",
        mocks[1].mock.stats().injected_failures
    ));
    report.push(format!(
        "Envoy memory: RSS {} MiB → {} MiB; server.memory_allocated {} MiB → {} MiB (Envoy has no per-VM wasm memory stat; V8 heaps are in RSS)",
        rss_before / 1024,
        rss_after / 1024,
        alloc_before >> 20,
        alloc_after >> 20
    ));
    println!("\n{}\n", report.join("\n"));
    assert!(exceeded.is_empty(), "limits exceeded: {exceeded:?}");
    assert!(totals.get("error").copied().unwrap_or(0) * 100 <= total, "more than 1 % transport errors: {totals:?}");
    assert!(rss_after < rss_before + 256 * 1024, "Envoy RSS grew by {} MiB", (rss_after - rss_before) / 1024);
}
