//! Property tests: hostile input never panics, and the RPM and fail2ban invariants hold for any
//! sequence of events.

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
        "server:", "credentials:", "fail2ban:", "models:", "  - ", "name: a", "name: b", "api_key: k",
        "base_url: http://h", "base_url: https://x/v1", "rpm: -1", "rpm: 0", "rpm: 5", "rpm: x", "master_key: m",
        "request_timeout: -1", "request_timeout: 5m", "ban_duration: 1s", "error_codes: [500]", "  ", "\n", "{", "}", "[", "]",
        ":", "\"", "os.environ/X", "max_body_size_mb: 0", "port: 70000",
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
    let list: Vec<String> = (0..creds)
        .map(|i| format!("  - {{name: c{i}, api_key: k{i}, base_url: 'http://127.0.0.1:1', rpm: {rpm}}}"))
        .collect();
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
            match balancer::select(&s, &c, &keys, Some(&model), &|_, _| true, now) {
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
            balancer::record_status(&s, &c, &keys[0], *status, now).unwrap();
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
