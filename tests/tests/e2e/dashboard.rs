//! The Grafana dashboard (`envoy/grafana/dashboards/auto-ai-router.json`) against a real Envoy:
//! every metric its PromQL uses is on `/metrics` after traffic that makes each family appear, with
//! the labels the queries match, group and name legends by, and of the type the query assumes
//! (`rate` over counters and histogram series, `histogram_quantile` over `_bucket`, gauges as they
//! are). And the other way round: every family the router exposes, and every metric name declared in
//! `filter/src/metrics.rs`, has a panel. So the dashboard can't silently drift from the code.

use e2e::harness::{control, cred, metric_value, mock, repo_root, wait_for, Router, MASTER};
use e2e::http::Request;
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

const DASHBOARD: &str = "envoy/grafana/dashboards/auto-ai-router.json";

/// Families that only appear when something rare happens which traffic can't force (a fail2ban or
/// cooldown update lost to shared-data contention), or with a feature this router doesn't
/// configure (global limits: `make test-global` checks that family). They are checked against
/// `filter/src/metrics.rs`.
const ONLY_UNDER_CONTENTION: [&str; 2] = ["auto_ai_router_state_conflicts_total", "auto_ai_router_global_checks_total"];

/// Labels Prometheus adds to every scraped series (target labels), not in Envoy's output.
const TARGET_LABELS: [&str; 2] = ["instance", "job"];

/// One metric a query reads: the name as written and the functions around it, outermost first.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Use {
    name: String,
    calls: Vec<String>,
}

/// What one PromQL expression reads.
#[derive(Debug, Default, PartialEq, Eq)]
struct Reads {
    metrics: Vec<Use>,
    /// Label names in matchers and in by / without / on / ignoring / group_left / group_right.
    labels: BTreeSet<String>,
}

const AGGREGATIONS: [&str; 14] = [
    "sum",
    "min",
    "max",
    "avg",
    "group",
    "stddev",
    "stdvar",
    "count",
    "count_values",
    "bottomk",
    "topk",
    "quantile",
    "limitk",
    "limit_ratio",
];
const GROUPING: [&str; 6] = ["by", "without", "on", "ignoring", "group_left", "group_right"];
const OPERATORS: [&str; 6] = ["bool", "and", "or", "unless", "offset", "atan2"];
const RATES: [&str; 4] = ["rate", "irate", "increase", "delta"];

fn is_ident_start(c: u8) -> bool {
    c.is_ascii_alphabetic() || c == b'_' || c == b':'
}

fn is_ident(c: u8) -> bool {
    is_ident_start(c) || c.is_ascii_digit()
}

fn skip_space(b: &[u8], mut i: usize) -> usize {
    while i < b.len() && b[i].is_ascii_whitespace() {
        i += 1;
    }
    i
}

fn ident(b: &[u8], start: usize) -> usize {
    let mut i = start;
    while i < b.len() && is_ident(b[i]) {
        i += 1;
    }
    i
}

/// The end (exclusive) of the string literal starting at `i`, and its content.
fn string_at(s: &str, i: usize) -> (usize, String) {
    let b = s.as_bytes();
    let quote = b[i];
    let mut j = i + 1;
    while j < b.len() && b[j] != quote {
        j += if b[j] == b'\\' && quote != b'`' { 2 } else { 1 };
    }
    assert!(j < b.len(), "unterminated string in {s:?}");
    (j + 1, s[i + 1..j].to_string())
}

/// Parses the label names of a `{...}` block at `i`; returns its end and a `__name__="..."` if any.
fn matchers(s: &str, i: usize, labels: &mut BTreeSet<String>) -> (usize, Option<String>) {
    let b = s.as_bytes();
    let mut j = i + 1;
    let mut name = None;
    loop {
        j = skip_space(b, j);
        assert!(j < b.len(), "unterminated {{...}} in {s:?}");
        match b[j] {
            b'}' => return (j + 1, name),
            b',' => j += 1,
            c if is_ident_start(c) => {
                let end = ident(b, j);
                let label = &s[j..end];
                j = skip_space(b, end);
                let op_end = j + s[j..].chars().take_while(|c| matches!(c, '=' | '!' | '~')).count();
                let op = &s[j..op_end];
                assert!(matches!(op, "=" | "!=" | "=~" | "!~"), "matcher {label} without an operator in {s:?}");
                j = skip_space(b, op_end);
                assert!(j < b.len() && matches!(b[j], b'"' | b'\'' | b'`'), "matcher {label} without a string in {s:?}");
                let (end, value) = string_at(s, j);
                j = end;
                if label == "__name__" {
                    assert_eq!(op, "=", "{s:?}: select metrics by their plain name, not a {{__name__{op}...}} pattern");
                    name = Some(value);
                } else {
                    labels.insert(label.to_string());
                }
            }
            _ => panic!("unexpected {:?} in the matchers of {s:?}", b[j] as char),
        }
    }
}

/// The metrics and label names a PromQL expression uses (a small lexer: enough for dashboards).
fn promql(s: &str) -> Reads {
    let b = s.as_bytes();
    let mut out = Reads::default();
    let mut calls: Vec<String> = Vec::new();
    let mut pending: Option<String> = None;
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'"' | b'\'' | b'`' => i = string_at(s, i).0,
            // Ranges and subqueries: `[5m]`, `[$__rate_interval]`, `[1h:1m]`.
            b'[' => i += s[i..].find(']').unwrap_or_else(|| panic!("unterminated [ in {s:?}")) + 1,
            b'{' => {
                let (end, name) = matchers(s, i, &mut out.labels);
                if let Some(name) = name {
                    out.metrics.push(Use { name, calls: calls.clone() });
                }
                i = end;
            }
            b'(' => {
                calls.push(pending.take().unwrap_or_default());
                i += 1;
            }
            b')' => {
                calls.pop();
                i += 1;
            }
            // Grafana variables outside matchers and ranges.
            b'$' => {
                i += 1;
                if b.get(i) == Some(&b'{') {
                    i += s[i..].find('}').unwrap_or(0) + 1;
                } else {
                    i = ident(b, i);
                }
            }
            // Numbers and durations (`0.99`, `5m`, `1e3`).
            c if c.is_ascii_digit() || c == b'.' => {
                while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'.') {
                    i += 1;
                }
            }
            c if is_ident_start(c) => {
                let end = ident(b, i);
                let word = &s[i..end];
                let next = skip_space(b, end);
                i = end;
                if GROUPING.contains(&word) {
                    if b.get(next) == Some(&b'(') {
                        let close = next + s[next..].find(')').unwrap_or_else(|| panic!("unterminated {word}( in {s:?}"));
                        out.labels.extend(s[next + 1..close].split(',').map(str::trim).filter(|l| !l.is_empty()).map(String::from));
                        i = close + 1;
                    }
                } else if b.get(next) == Some(&b'(') || AGGREGATIONS.contains(&word) {
                    pending = Some(word.to_string());
                } else if !OPERATORS.contains(&word) {
                    out.metrics.push(Use { name: word.to_string(), calls: calls.clone() });
                }
            }
            _ => i += 1,
        }
    }
    out
}

/// A Grafana variable query: `label_values(selector, label)` or plain PromQL.
fn variable_query(q: &str) -> Reads {
    let q = q.trim();
    match q.strip_prefix("label_values(").and_then(|r| r.strip_suffix(')')) {
        Some(inner) => {
            let (selector, label) = inner.rsplit_once(',').unwrap_or(("", inner));
            let mut reads = promql(selector);
            reads.labels.insert(label.trim().to_string());
            reads
        }
        None => promql(q),
    }
}

/// One query of the dashboard: where it is, what it reads, and the labels its legend names.
struct Query {
    at: String,
    expr: String,
    reads: Reads,
    /// A panel query (its functions must suit the metric types); variables only list label values.
    panel: bool,
}

fn dashboard_queries(dash: &Value) -> Vec<Query> {
    let mut out = Vec::new();
    let mut panels: Vec<&Value> = dash["panels"].as_array().expect("panels").iter().collect();
    // Collapsed rows keep their panels inside.
    let nested: Vec<&Value> = panels.iter().filter_map(|p| p["panels"].as_array()).flatten().collect();
    panels.extend(nested);
    for p in panels {
        for t in p["targets"].as_array().into_iter().flatten() {
            let expr = t["expr"].as_str().unwrap_or_else(|| panic!("panel {}: a target without expr", p["title"])).to_string();
            let mut reads = promql(&expr);
            let legend = t["legendFormat"].as_str().unwrap_or("");
            for part in legend.split("{{").skip(1) {
                reads.labels.insert(part.split("}}").next().unwrap_or("").trim().to_string());
            }
            out.push(Query { at: format!("panel {}", p["title"]), expr, reads, panel: true });
        }
    }
    for v in dash["templating"]["list"].as_array().into_iter().flatten().filter(|v| v["type"] == "query") {
        let q = v["query"]["query"].as_str().or(v["query"].as_str()).unwrap_or_else(|| panic!("variable {}: no query", v["name"]));
        out.push(Query { at: format!("variable {}", v["name"]), expr: q.to_string(), reads: variable_query(q), panel: false });
    }
    out
}

/// Envoy's Prometheus text: family types and the label names seen per sample name.
struct Scrape {
    types: BTreeMap<String, String>,
    samples: BTreeMap<String, BTreeSet<String>>,
}

impl Scrape {
    fn parse(text: &str) -> Scrape {
        let mut s = Scrape { types: BTreeMap::new(), samples: BTreeMap::new() };
        for line in text.lines() {
            if let Some(t) = line.strip_prefix("# TYPE ") {
                let (name, kind) = t.split_once(' ').unwrap_or((t, ""));
                s.types.insert(name.to_string(), kind.trim().to_string());
                continue;
            }
            if line.starts_with('#') || line.trim().is_empty() {
                continue;
            }
            let end = ident(line.as_bytes(), 0);
            let labels = s.samples.entry(line[..end].to_string()).or_default();
            if line[end..].starts_with('{') {
                matchers_of_sample(&line[end..], labels);
            }
        }
        s
    }

    /// The family (and its type) a sample name belongs to: itself, or a histogram's series.
    fn family<'a>(&'a self, name: &'a str) -> Option<(&'a str, &'a str)> {
        if let Some(t) = self.types.get(name) {
            return Some((name, t));
        }
        ["_bucket", "_sum", "_count"].iter().find_map(|suffix| {
            let base = name.strip_suffix(suffix)?;
            let t = self.types.get(base)?;
            matches!(t.as_str(), "histogram" | "summary").then_some((base, t.as_str()))
        })
    }

    /// Label names on any series of `family`.
    fn labels_of(&self, family: &str) -> BTreeSet<String> {
        self.samples.iter().filter(|(n, _)| self.family(n).map(|(f, _)| f) == Some(family)).flat_map(|(_, l)| l.iter().cloned()).collect()
    }
}

/// Label names of `{k="v",...}` in a sample line (values may hold any character, escaped).
fn matchers_of_sample(s: &str, labels: &mut BTreeSet<String>) {
    let b = s.as_bytes();
    let mut j = 1;
    while j < b.len() && b[j] != b'}' {
        let end = ident(b, j);
        labels.insert(s[j..end].to_string());
        assert_eq!(b.get(end), Some(&b'='), "bad sample {s:?}");
        j = string_at(s, end + 1).0;
        if b.get(j) == Some(&b',') {
            j += 1;
        }
    }
}

/// The metric names `filter/src/metrics.rs` declares (`pub const X: &str = "auto_ai_router_...";`).
fn declared_metrics() -> BTreeSet<String> {
    let src = std::fs::read_to_string(repo_root().join("filter/src/metrics.rs")).expect("filter/src/metrics.rs");
    src.lines()
        .filter(|l| l.trim_start().starts_with("pub const ") && l.contains(": &str = \"auto_ai_router_"))
        .filter_map(|l| l.split('"').nth(1).map(String::from))
        .collect()
}

/// What is wrong between the dashboard's queries and a scrape (empty = they agree).
fn problems(queries: &[Query], scrape: &Scrape, declared: &BTreeSet<String>) -> Vec<String> {
    let mut bad = Vec::new();
    let mut used = BTreeSet::new();
    for q in queries {
        let mut families = Vec::new();
        if q.reads.metrics.is_empty() {
            bad.push(format!("{}: reads no metric: {}", q.at, q.expr));
        }
        for m in &q.reads.metrics {
            let Some((family, kind)) = scrape.family(&m.name) else {
                let base = ["_bucket", "_sum", "_count"].iter().find_map(|s| m.name.strip_suffix(s)).unwrap_or(&m.name);
                used.insert(base.to_string());
                if !(ONLY_UNDER_CONTENTION.contains(&base) && declared.contains(base)) {
                    bad.push(format!("{}: {} is not on /metrics: {}", q.at, m.name, q.expr));
                }
                continue;
            };
            used.insert(family.to_string());
            families.push(family);
            if !scrape.samples.contains_key(&m.name) {
                bad.push(format!("{}: {family} has no {} series on /metrics", q.at, m.name));
            }
            let innermost = m.calls.iter().rev().find(|c| !c.is_empty()).map(String::as_str).unwrap_or("");
            let rated = RATES.contains(&innermost);
            let cumulative = kind == "counter" || m.name != family;
            if q.panel && rated != cumulative {
                bad.push(format!(
                    "{}: {} is a {kind}{}, read as {innermost}(...): {}",
                    q.at,
                    m.name,
                    if m.name != family { " series" } else { "" },
                    q.expr
                ));
            }
            if m.calls.iter().any(|c| c == "histogram_quantile") && !(kind == "histogram" && m.name.ends_with("_bucket")) {
                bad.push(format!("{}: histogram_quantile over {} (not a histogram's _bucket): {}", q.at, m.name, q.expr));
            }
        }
        let have: BTreeSet<String> = families.iter().flat_map(|f| scrape.labels_of(f)).collect();
        for l in &q.reads.labels {
            if !families.is_empty() && !have.contains(l) && !TARGET_LABELS.contains(&l.as_str()) {
                bad.push(format!("{}: label {l:?} is on none of {families:?} (they have {have:?}): {}", q.at, q.expr));
            }
        }
    }
    let exposed: BTreeSet<String> =
        scrape.types.keys().filter(|n| n.starts_with("auto_ai_router_")).cloned().chain(declared.iter().cloned()).collect();
    for f in exposed.difference(&used) {
        bad.push(format!("{f} (on /metrics or declared in filter/src/metrics.rs) has no panel in {DASHBOARD}"));
    }
    bad
}

fn load_dashboard() -> Value {
    let text = std::fs::read_to_string(repo_root().join(DASHBOARD)).unwrap_or_else(|e| panic!("{DASHBOARD}: {e}"));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{DASHBOARD}: {e}"))
}

#[test]
fn dashboard_promql_lexer_reads_metrics_labels_and_calls() {
    let r = promql(
        r#"histogram_quantile(0.99, sum by (credential, le) (rate(a_bucket{credential=~"$credential",x!="}"}[$__rate_interval]))) / on(instance) group_left b offset 5m"#,
    );
    let names: Vec<(&str, Vec<&str>)> = r.metrics.iter().map(|m| (m.name.as_str(), m.calls.iter().map(String::as_str).collect())).collect();
    assert_eq!(names, vec![("a_bucket", vec!["histogram_quantile", "sum", "rate"]), ("b", vec![])]);
    assert_eq!(r.labels, ["credential", "instance", "le", "x"].into_iter().map(String::from).collect());
    let r = promql(r#"sum(rate({__name__="c_total"}[1m])) without (status) > bool 0.5"#);
    assert_eq!(r.metrics, vec![Use { name: "c_total".into(), calls: vec!["sum".into(), "rate".into()] }]);
    assert_eq!(r.labels, ["status"].into_iter().map(String::from).collect());
    let v = variable_query("label_values(auto_ai_router_requests_total, credential)");
    assert_eq!(
        (v.metrics[0].name.as_str(), v.labels.iter().next().map(String::as_str)),
        ("auto_ai_router_requests_total", Some("credential"))
    );

    // The checks fail on a drifted dashboard: a renamed metric, a wrong label, a gauge under rate().
    let scrape = Scrape::parse(
        "# TYPE auto_ai_router_requests_total counter\nauto_ai_router_requests_total{credential=\"a\",status=\"200\"} 1\n\
         # TYPE auto_ai_router_credential_banned gauge\nauto_ai_router_credential_banned{credential=\"a\"} 0\n\
         # TYPE auto_ai_router_requests_duration_milliseconds histogram\n\
         auto_ai_router_requests_duration_milliseconds_bucket{credential=\"a\",le=\"5\"} 1\n",
    );
    let q = |expr: &str| vec![Query { at: "t".into(), expr: expr.into(), reads: promql(expr), panel: true }];
    let none = BTreeSet::new();
    let ok = |expr: &str| {
        let mut p = problems(&q(expr), &scrape, &none);
        p.retain(|m| !m.contains("has no panel"));
        p
    };
    assert!(ok("sum by (status) (rate(auto_ai_router_requests_total[5m]))").is_empty());
    assert!(ok("histogram_quantile(0.5, sum by (le) (rate(auto_ai_router_requests_duration_milliseconds_bucket[5m])))").is_empty());
    assert!(ok("sum by (status) (rate(auto_ai_router_request_total[5m]))")[0].contains("not on /metrics"));
    assert!(ok("sum by (model) (rate(auto_ai_router_requests_total[5m]))")[0].contains("label \"model\""));
    assert!(ok("rate(auto_ai_router_credential_banned[5m])")[0].contains("is a gauge"));
    assert!(ok("auto_ai_router_requests_total")[0].contains("is a counter"));
    assert!(ok("sum(rate(auto_ai_router_requests_duration_milliseconds_sum[5m]))")[0]
        .contains("no auto_ai_router_requests_duration_milliseconds_sum series"));
    assert!(problems(&q("rate(auto_ai_router_requests_total[1m])"), &scrape, &none)
        .iter()
        .any(|m| m.contains("credential_banned") && m.contains("no panel")));
}

#[test]
fn dashboard_matches_the_metrics_a_real_router_exposes() {
    let dash = load_dashboard();
    let queries = dashboard_queries(&dash);
    assert!(queries.len() >= 20, "only {} queries in {DASHBOARD}", queries.len());

    let a = mock("a", "sk-dash-a-00000", &["gpt-4o"]);
    let b = mock("b", "sk-dash-b-00000", &["gpt-4o"]);
    // fail2ban counts only 500s here: a provider 429 puts a key in cooldown, it is no strike.
    let cfg = format!(
        "server:\n  master_key: \"{MASTER}\"\n  default_models_rpm: -1\n  queue_timeout: 2s\ncredentials:\n{}{}fail2ban:\n  max_attempts: 2\n  error_codes: [500]\n",
        cred("cred_a", "sk-dash-a-00000", &a.url(), 1000),
        cred("cred_b", "sk-dash-b-00000", &b.url(), 1000),
    );
    let r = Router::start(&cfg);
    let chat = |extra: Value| {
        let mut body = json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "Hello dashboard"}]});
        body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        r.send(&Request::post("/v1/chat/completions").bearer(MASTER).json(&body))
    };

    // 200s with usage (both credentials), a stream with usage, a stream without (usage_missing).
    for _ in 0..2 {
        let resp = chat(json!({}));
        assert_eq!(resp.status, 200, "{}", resp.describe());
    }
    let resp = chat(json!({"stream": true, "stream_options": {"include_usage": true}}));
    assert!(resp.status == 200 && resp.text().contains("\"usage\""), "{}", resp.describe());
    let resp = chat(json!({"stream": true}));
    assert!(resp.status == 200 && resp.text().contains("[DONE]"), "{}", resp.describe());
    // A 401 (rejections).
    assert_eq!(r.send(&Request::chat("sk-wrong-key", "gpt-4o")).status, 401);
    // A provider 429 with Retry-After on both: a retry and a cooldown; the client gets the 429.
    control(&a, json!({"fail_status": 429, "fail_next": 1}));
    control(&b, json!({"fail_status": 429, "fail_next": 1}));
    let resp = chat(json!({}));
    assert_eq!(resp.status, 429, "{}", resp.describe());
    // With queue_timeout the next request waits for a key to come back (queue wait histogram).
    wait_for("the cooldowns (Retry-After: 1) to end", Duration::from_secs(5), || (chat(json!({})).status == 200).then_some(()));
    // 500s until fail2ban bans both credentials (errors, retries on 500, bans, no_credential).
    control(&a, json!({"fail_status": 500, "fail_next": 10}));
    control(&b, json!({"fail_status": 500, "fail_next": 10}));
    let mut last = 0;
    for _ in 0..8 {
        last = chat(json!({})).status;
        if last == 503 {
            break;
        }
        assert_eq!(last, 500);
    }
    assert_eq!(
        last,
        503,
        "both credentials banned after their strikes:\n{}",
        r.metrics().lines().filter(|l| l.starts_with("auto_ai_router")).collect::<Vec<_>>().join("\n")
    );

    // Histograms get their samples with Envoy's stats flush (5 s), gauges with the filter's 1 s tick.
    // Beyond the names, the traffic made the series the panels show.
    let declared = declared_metrics();
    let shown: [(&str, &[(&str, &str)]); 9] = [
        ("auto_ai_router_credential_banned", &[("credential", "cred_a")]),
        ("auto_ai_router_credential_errors_total", &[("credential", "cred_b")]),
        ("auto_ai_router_rejections_total", &[("reason", "auth")]),
        ("auto_ai_router_tokens_total", &[("type", "completion")]),
        ("auto_ai_router_usage_missing_total", &[]),
        ("auto_ai_router_retries_total", &[("reason", "429")]),
        ("auto_ai_router_retries_total", &[("reason", "500")]),
        ("auto_ai_router_overhead_microseconds_count", &[]),
        ("auto_ai_router_requests_duration_milliseconds_count", &[("credential", "cred_a")]),
    ];
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let text = r.metrics();
        let mut bad = problems(&queries, &Scrape::parse(&text), &declared);
        for (name, labels) in shown {
            if metric_value(&text, name, labels).unwrap_or(0.0) <= 0.0 {
                bad.push(format!("the traffic left {name}{labels:?} at zero"));
            }
        }
        if bad.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "{DASHBOARD} and a real router's /metrics disagree:\n{}", bad.join("\n"));
        std::thread::sleep(Duration::from_millis(250));
    }
}
