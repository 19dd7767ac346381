//! Property tests: hostile input never panics, and the RPM and fail2ban invariants hold for any
//! sequence of events.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use filter::auth;
use filter::balancer::{self, Selection};
use filter::body;
use filter::config::{self, Config};
use filter::endpoints;
use filter::fail2ban::BanRecord;
use filter::rate_window::RateRecord;
use filter::store::MemStore;
use proptest::prelude::*;

fn no_env(_: &str) -> Option<String> {
    None
}

/// YAML-ish text built from config words, so the parser gets past syntax into validation.
fn configish() -> impl Strategy<Value = String> {
    let word = prop::sample::select(vec![
        "server:",
        "credentials:",
        "fail2ban:",
        "models:",
        "  - ",
        "name: a",
        "name: b",
        "api_key: k",
        "base_url: http://h",
        "base_url: https://x/v1",
        "rpm: -1",
        "rpm: 0",
        "rpm: 5",
        "rpm: x",
        "master_key: m",
        "request_timeout: -1",
        "request_timeout: 5m",
        "ban_duration: 1s",
        "error_codes: [500]",
        "  ",
        "\n",
        "{",
        "}",
        "[",
        "]",
        ":",
        "\"",
        "os.environ/X",
        "max_body_size_mb: 0",
        "port: 70000",
    ]);
    prop::collection::vec(word, 0..40).prop_map(|w| w.join(""))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn config_any_text_is_ok_or_error(text in any::<String>()) {
        let _ = config::load(&text, &no_env);
    }

    #[test]
    fn config_wordy_text_is_ok_or_error(text in configish()) {
        if let Err(e) = config::load(&text, &no_env) {
            prop_assert!(!e.to_string().is_empty());
        }
    }

    #[test]
    fn model_extractor_any_bytes(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = body::extract_model(&bytes);
    }

    #[test]
    fn model_extractor_finds_any_string_model(model in "[^\"\\\\]{1,100}", other in "[a-z]{0,20}") {
        let body = format!("{{\"{other}x\":[1,{{\"model\":\"inner\"}}],\"model\":{}}}", serde_json::to_string(&model).unwrap());
        prop_assert_eq!(body::extract_model(body.as_bytes()), Ok(model));
    }

    #[test]
    fn auth_any_header(header in any::<String>()) {
        let ok = auth::check(Some(header.as_bytes()), "sk-master").is_ok();
        let expected = header.len() == 16
            && header.get(..7).is_some_and(|s| s.eq_ignore_ascii_case("bearer "))
            && header.get(7..) == Some("sk-master");
        prop_assert_eq!(ok, expected);
    }

    #[test]
    fn paths_never_panic(method in "[A-Z]{0,7}", path in any::<String>()) {
        let _ = endpoints::classify(&method, &path);
        let _ = endpoints::label(&path);
    }

    #[test]
    fn corrupt_records_decode_as_empty_or_valid(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
        // Whatever decodes must re-encode to something that decodes to the same record.
        if let Some(r) = RateRecord::decode(&bytes) {
            prop_assert_eq!(RateRecord::decode(&r.encode()), Some(r));
        }
        if let Some(b) = BanRecord::decode(&bytes) {
            prop_assert_eq!(BanRecord::decode(&b.encode()), Some(b));
        }
    }
}

fn cfg(rpm: i64, model_rpm: i64, creds: usize) -> Config {
    let list: Vec<String> =
        (0..creds).map(|i| format!("  - {{name: c{i}, api_key: k{i}, base_url: 'http://127.0.0.1:1', rpm: {rpm}}}")).collect();
    let text = format!(
        "server: {{master_key: mk, default_models_rpm: {model_rpm}}}\ncredentials:\n{}\nfail2ban: {{max_attempts: 3, ban_duration: 5s}}",
        list.join("\n")
    );
    config::load(&text, &no_env).unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// For any arrival times (in milliseconds), no credential and no (credential, model) pair is
    /// admitted more than its limit in any 60 s of real time: every window [t, t + 60 s) that starts
    /// at an admission (the windows that can hold the most).
    #[test]
    fn limits_hold_in_every_window(
        gaps in prop::collection::vec(0u64..4000, 1..400),
        models in prop::collection::vec(0usize..3, 1..400),
        rpm in 1i64..20,
        model_rpm in 1i64..20,
    ) {
        let c = cfg(rpm, model_rpm, 2);
        let s = MemStore::default();
        let keys = balancer::StateKeys::for_config(&c);
        let mut now = 1_000_000u64;
        let mut admitted: Vec<(u64, usize, usize)> = Vec::new();
        for (gap, m) in gaps.iter().zip(models.iter().cycle()) {
            now += gap;
            let model = format!("m{m}");
            match balancer::select(&s, &c, &keys, Some(&model), &|_, _| true, &[], now) {
                Selection::Chosen { index, .. } => admitted.push((now, index, *m)),
                Selection::RateLimited { retry_after } => prop_assert!((1..=61).contains(&retry_after)),
                other => prop_assert!(false, "nothing is banned or busy: {:?}", other),
            }
        }
        for &(t, _, _) in &admitted {
            for cred in 0..2 {
                let in_window = |&&(u, i, _): &&(u64, usize, usize)| i == cred && u >= t && u < t + 60_000;
                prop_assert!(admitted.iter().filter(in_window).count() as i64 <= rpm);
                for m in 0..3 {
                    let n = admitted.iter().filter(|&&(u, i, mm)| i == cred && mm == m && u >= t && u < t + 60_000).count();
                    prop_assert!(n as i64 <= model_rpm);
                }
            }
        }
    }

    /// fail2ban: the record always equals a straightforward replay of the statuses.
    #[test]
    fn fail2ban_matches_a_replay(statuses in prop::collection::vec(prop::sample::select(vec![200u16, 201, 404, 401, 500, 503]), 0..60)) {
        let c = cfg(-1, -1, 2);
        let s = MemStore::default();
        let keys = balancer::StateKeys::for_config(&c);
        let (mut errors, mut banned_at) = (0u32, None::<u64>);
        for (k, status) in statuses.iter().enumerate() {
            let now = k as u64 * 1000;
            if banned_at.is_some_and(|b| now >= b + 5000) {
                errors = 0;
                banned_at = None;
            }
            balancer::record_status(&s, &c, &keys[0], *status, None, now, now).unwrap();
            if banned_at.is_none() {
                if c.fail2ban.error_codes.contains(status) {
                    errors += 1;
                    if errors >= 3 {
                        banned_at = Some(now);
                    }
                } else if (200..300).contains(status) {
                    errors = 0;
                }
            }
            let now_state = balancer::ban_state(&s, &keys[0].ban, now).unwrap();
            prop_assert_eq!(now_state.is_banned(now), banned_at.is_some());
            if banned_at.is_none() {
                prop_assert_eq!(now_state.errors, errors);
            }
            prop_assert_eq!(balancer::ban_state(&s, &keys[1].ban, now), Some(BanRecord::default()));
        }
    }
}

/// A configuration slot: its text (empty = the key is left out) and whether it makes the
/// document wrong.
type Slot = (String, bool);

fn master_key_slots(s: &str, n: &str) -> Vec<Slot> {
    vec![
        (format!("master_key: \"{s}\""), false),
        ("master_key: os.environ/MK".into(), false),
        (format!("master_key: {n}"), true),
        (format!("master_key: {n}.5"), true),
        (format!("master_key: [\"{s}\"]"), true),
        (format!("master_key: {{v: \"{s}\"}}"), true),
        (format!("master_key: !secret {s}"), true),
        (String::new(), true),
    ]
}

fn api_key_slots(i: usize, s: &str, n: &str) -> Vec<Slot> {
    vec![
        (format!("api_key: \"{s}\""), false),
        (format!("api_key: os.environ/K{i}"), false),
        (format!("api_key: {n}"), true),
        (format!("api_key: -{n}"), true),
        (format!("api_key: [{s}]"), true),
        (format!("api_key: {{key: {s}}}"), true),
        ("api_key: os.environ/UNSET".into(), true),
        (String::new(), true),
    ]
}

/// base_urls, most with a secret where keys hide: user-info, query, fragment.
fn base_url_slots(s: &str) -> Vec<Slot> {
    let mut v: Vec<Slot> = ["https://api.example.com/v1", "http://127.0.0.1:9000/openai/v1/", "http://[::1]:8000"]
        .iter()
        .map(|u| (format!("base_url: '{u}'"), false))
        .collect();
    for u in [
        "https://user:{s}@api.example.com/v1",
        "https://{s}@api.example.com",
        "https://api.example.com/v1?api-key={s}",
        "https://api.example.com/v1?a=1&key={s}#x",
        "https://api.example.com/#{s}",
        "https:/u:{s}@api.example.com",
        "{s}@api.example.com",
        "http://u:{s}@::1/v1",
        "http://u:{s}@h:99999",
        "ftp://u:{s}@h",
        "https://a b/?k={s}",
        "https://h/a%zz?k={s}",
        "http://[::1]:8000/x?{s}",
        "http://::1/?{s}",
        "https://h/v1/../x#{s}",
    ] {
        v.push((format!("base_url: '{}'", u.replace("{s}", s)), true));
    }
    v
}

fn extra_slots(section: &str) -> Vec<Slot> {
    let (good, bad): (&[&str], &[&str]) = match section {
        "server" => (
            &["", "hosts: [ai.example.com, '*.example.org:8443']", "max_provider_retries: 3", "cooldown_max: 1h", "max_body_size_mb: 1024"],
            &[
                "max_body_size_mb: 2048",
                "hosts: ['a b']",
                "retry_on_status: [200]",
                "request_timeout: 9000h",
                "colour: red",
                "cooldown_max: 1s",
                "max_provider_retries: 11",
            ],
        ),
        _ => (&["", "rpm: 5", "tpm: 1000", "rpm: -1, tpm: -1"], &["rpm: 0", "tpm: 0", "colour: red", "rpm: lots"]),
    };
    good.iter().map(|t| (t.to_string(), false)).chain(bad.iter().map(|t| (t.to_string(), true))).collect()
}

/// One of the slots that are wrong (`bad`) or right, chosen by `i`.
fn pick(slots: Vec<Slot>, (bad, i): (bool, prop::sample::Index)) -> Slot {
    let mut of_kind: Vec<Slot> = slots.into_iter().filter(|s| s.1 == bad).collect();
    let k = i.index(of_kind.len());
    of_kind.swap_remove(k)
}

fn flow(parts: &[&str]) -> String {
    parts.iter().filter(|p| !p.is_empty()).copied().collect::<Vec<_>>().join(", ")
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    /// No configuration error shows a configured secret (master_key, api_key, resolved from the
    /// environment or literal, string or not, and keys in a base_url's user-info or query), not even
    /// 8 characters of one; and the documents without a mistake load.
    #[test]
    fn config_errors_never_show_a_secret(
        secrets in prop::collection::vec("[A-Za-z0-9]{16,28}", 6),
        numbers in prop::collection::vec("[1-9][0-9]{11,15}", 3),
        // Each slot is wrong with probability 0.2, so that the first mistake (the one reported) is
        // often a late one too.
        slots in prop::collection::vec((prop::bool::weighted(0.2), any::<prop::sample::Index>()), 8),
        duplicate in prop::bool::weighted(0.1),
        bare_key in prop::bool::weighted(0.1),
    ) {
        let (mk, k0, k1, u0, u1, env_mk) = (&secrets[0], &secrets[1], &secrets[2], &secrets[3], &secrets[4], &secrets[5]);
        let master = pick(master_key_slots(mk, &numbers[0]), slots[0]);
        let server_extra = pick(extra_slots("server"), slots[1]);
        let api0 = pick(api_key_slots(0, k0, &numbers[1]), slots[2]);
        let url0 = pick(base_url_slots(u0), slots[3]);
        let extra0 = pick(extra_slots("credential"), slots[4]);
        let api1 = pick(api_key_slots(1, k1, &numbers[2]), slots[5]);
        let url1 = pick(base_url_slots(u1), slots[6]);
        let extra1 = pick(extra_slots("credential"), slots[7]);
        let name1 = if duplicate { "a" } else { "b" };
        // The second credential may be just its key, where a mapping belongs.
        let second = if bare_key { format!("\"{k1}\"") } else { format!("{{{}}}", flow(&[&format!("name: {name1}"), &api1.0, &url1.0, &extra1.0])) };
        let text = format!(
            "server: {{{}}}\ncredentials:\n  - {{{}}}\n  - {second}\n",
            flow(&[&master.0, &server_extra.0]),
            flow(&["name: a", &api0.0, &url0.0, &extra0.0]),
        );
        let env = |n: &str| match n {
            "MK" => Some(env_mk.clone()),
            "K0" => Some(format!("env-{k0}")),
            "K1" => Some(format!("env-{k1}")),
            _ => None,
        };
        let bad = duplicate || bare_key || [&master, &server_extra, &api0, &url0, &extra0, &api1, &url1, &extra1].iter().any(|s| s.1);
        match config::load(&text, &env) {
            Ok(_) => prop_assert!(!bad, "accepted a wrong document:\n{}", text),
            Err(e) => {
                prop_assert!(bad, "refused a good document:\n{}\n{}", text, e);
                let msg = e.to_string();
                for secret in secrets.iter().chain(numbers.iter()) {
                    for w in secret.as_bytes().windows(8) {
                        let w = std::str::from_utf8(w).unwrap_or_default();
                        prop_assert!(!msg.contains(w), "{:?} of a secret in: {}\n{}", w, msg, text);
                    }
                }
            }
        }
    }
}
