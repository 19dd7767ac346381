//! rls-double against a real Redis: pins the envoyproxy/ratelimit behaviour it copies.

mod common;

use common::*;
use redis::Commands;
use rls_double::grpc;
use rls_double::proto::{Code, RateLimitDescriptor, Unit, SHOULD_RATE_LIMIT_PATH};
use std::time::{Duration, Instant};

const OK: i32 = Code::Ok as i32;
const OVER: i32 = Code::OverLimit as i32;
const HOUR: i64 = 3600;

fn cred(c: &str, limit: u32) -> Vec<RateLimitDescriptor> {
    vec![desc(&[("credential", c)], Some((limit, Unit::Hour)), None)]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limit_admits_exactly_l_then_over_limit() {
    let redis = Redis::start();
    let d = Double::start(&redis, &[]);
    let mut c = d.client().await;
    ensure_window_room(HOUR, 10);
    for i in 0..5u32 {
        let r = call(&mut c, req("dom", cred("a", 5), 0)).await;
        assert_eq!(r.overall_code, OK, "call {i}: {r:?}");
        let s = &r.statuses[0];
        assert_eq!((s.code, s.limit_remaining), (OK, 4 - i));
        let l = s.current_limit.as_ref().expect("current_limit");
        assert_eq!((l.requests_per_unit, l.unit), (5, Unit::Hour as i32));
    }
    for _ in 0..3 {
        let r = call(&mut c, req("dom", cred("a", 5), 0)).await;
        assert_eq!((r.overall_code, r.statuses[0].code, r.statuses[0].limit_remaining), (OVER, OVER, 0));
    }
    // Another key has its own counter.
    assert_eq!(call(&mut c, req("dom", cred("b", 5), 0)).await.overall_code, OK);
    let s = d.stats();
    assert_eq!((s["calls"].as_u64(), s["hits"].as_u64(), s["ok"].as_u64(), s["over_limit"].as_u64()), (Some(9), Some(9), Some(6), Some(3)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_hits_addend_takes_k_slots_and_the_overflowing_key_still_counts() {
    let redis = Redis::start();
    let d = Double::start(&redis, &["--prefix", "p:"]);
    let mut c = d.client().await;
    ensure_window_room(HOUR, 10);
    for rem in [7, 4, 1] {
        let r = call(&mut c, req("dom", cred("a", 10), 3)).await;
        assert_eq!((r.overall_code, r.statuses[0].limit_remaining), (OK, rem));
    }
    let r = call(&mut c, req("dom", cred("a", 10), 3)).await;
    assert_eq!(r.overall_code, OVER, "9 + 3 > 10");
    // STOP_CACHE_KEY_INCREMENT_WHEN_OVERLIMIT still increments the descriptor that overflows.
    let key = format!("p:dom_credential_a_{}", (now() / HOUR) * HOUR);
    let v: u64 = conn(&redis).get(&key).unwrap();
    assert_eq!(v, 12);
    assert_eq!(d.stats()["hits"].as_u64(), Some(12));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn descriptor_hits_addend_overrides_the_request_and_zero_only_checks() {
    let redis = Redis::start();
    let d = Double::start(&redis, &[]);
    let mut c = d.client().await;
    ensure_window_room(HOUR, 10);
    let key = format!("dom_credential_a_{}", (now() / HOUR) * HOUR);
    let check = || vec![desc(&[("credential", "a")], Some((4, Unit::Hour)), Some(0))];
    let r = call(&mut c, req("dom", check(), 5)).await;
    assert_eq!((r.overall_code, r.statuses[0].limit_remaining), (OK, 4), "check only: {r:?}");
    assert_eq!(conn(&redis).get::<_, Option<u64>>(&key).unwrap().unwrap_or(0), 0);
    // The per-descriptor value beats the request's hits_addend (2).
    let take3 = vec![desc(&[("credential", "a")], Some((4, Unit::Hour)), Some(3))];
    assert_eq!(call(&mut c, req("dom", take3, 2)).await.statuses[0].limit_remaining, 1);
    let take1 = vec![desc(&[("credential", "a")], Some((4, Unit::Hour)), Some(1))];
    assert_eq!(call(&mut c, req("dom", take1, 2)).await.statuses[0].limit_remaining, 0);
    // Full (4 of 4): a check-only call is still OK with 0 left (upstream: OVER iff count > limit).
    let r = call(&mut c, req("dom", check(), 0)).await;
    assert_eq!((r.overall_code, r.statuses[0].limit_remaining), (OK, 0));
    assert_eq!(conn(&redis).get::<_, u64>(&key).unwrap(), 4);
    let s = d.stats();
    assert_eq!((s["calls"].as_u64(), s["hits"].as_u64(), s["descriptor_hits"].as_u64()), (Some(4), Some(10), Some(4)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn windows_are_fixed_and_aligned() {
    let redis = Redis::start();
    let d = Double::start(&redis, &["--prefix", "t:", "--expiration-jitter-max-seconds", "0"]);
    let mut c = d.client().await;
    ensure_window_room(60, 3);
    let before = now();
    let r = call(&mut c, req("dom", vec![desc(&[("credential", "a"), ("model", "m")], Some((9, Unit::Minute)), None)], 0)).await;
    let after = now();
    let reset = r.statuses[0].duration_until_reset.expect("duration_until_reset").seconds;
    assert!((60 - after % 60..=60 - before % 60).contains(&reset), "reset {reset} vs now%60 in {}..={}", before % 60, after % 60);
    let key = format!("t:dom_credential_a_model_m_{}", (before / 60) * 60);
    let mut conn = conn(&redis);
    assert_eq!(conn.get::<_, u64>(&key).unwrap(), 1, "key {key}");
    let ttl: i64 = conn.ttl(&key).unwrap();
    assert!((1..=60).contains(&ttl), "EXPIRE = the unit (no jitter): {ttl}");
    // A SECOND limit: the key carries the second itself.
    let r = call(&mut c, req("dom", vec![desc(&[("k", "v")], Some((9, Unit::Second)), None)], 0)).await;
    assert_eq!(r.statuses[0].duration_until_reset.map(|d| d.seconds), Some(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_flag_spares_the_other_keys_of_a_refused_request() {
    let redis = Redis::start();
    let on = Double::start(&redis, &["--prefix", "on:"]);
    let off = Double::start(&redis, &["--prefix", "off:", "--stop-cache-key-increment-when-overlimit", "false"]);
    ensure_window_room(HOUR, 10);
    let w = (now() / HOUR) * HOUR;
    let two = || {
        vec![
            desc(&[("credential", "c")], Some((100, Unit::Hour)), None),
            desc(&[("credential", "c"), ("model", "m")], Some((1, Unit::Hour)), None),
            desc(&[("nolimit", "x")], None, None),
        ]
    };
    for (d, prefix, cred_after) in [(&on, "on:", 1u64), (&off, "off:", 2u64)] {
        let mut c = d.client().await;
        let r = call(&mut c, req("dom", two(), 0)).await;
        assert_eq!(r.overall_code, OK, "{prefix} first: {r:?}");
        let nolimit = &r.statuses[2];
        assert_eq!((nolimit.code, nolimit.current_limit.is_some(), nolimit.duration_until_reset.is_some()), (OK, false, false));
        let r = call(&mut c, req("dom", two(), 0)).await;
        assert_eq!((r.overall_code, r.statuses[0].code, r.statuses[1].code), (OVER, OK, OVER), "{prefix} second: {r:?}");
        let mut conn = conn(&redis);
        assert_eq!(conn.get::<_, u64>(format!("{prefix}dom_credential_c_{w}")).unwrap(), cred_after, "{prefix} credential key");
        assert_eq!(conn.get::<_, u64>(format!("{prefix}dom_credential_c_model_m_{w}")).unwrap(), 2, "{prefix} model key still counts");
        assert_eq!(r.statuses[0].limit_remaining as u64, 100 - cred_after);
        // No key for the descriptor without a limit.
        let keys: Vec<String> = conn.keys(format!("{prefix}dom_nolimit*")).unwrap();
        assert!(keys.is_empty(), "{keys:?}");
    }
}

async fn hammer(doubles: &[&Double], tasks: usize, per_task: usize, limit: u32, hits: u32) -> usize {
    let mut clients = Vec::new();
    for d in doubles {
        clients.push(d.client().await);
    }
    let mut set = tokio::task::JoinSet::new();
    for t in 0..tasks {
        let mut c = clients[t % clients.len()].clone();
        set.spawn(async move {
            let mut ok = 0;
            for _ in 0..per_task {
                let two = vec![
                    desc(&[("credential", "c")], Some((limit, Unit::Hour)), None),
                    desc(&[("credential", "c"), ("model", "m")], Some((limit * 2, Unit::Hour)), None),
                ];
                if call(&mut c, req("dom", two, hits)).await.overall_code == OK {
                    ok += 1;
                }
            }
            ok
        });
    }
    let mut ok = 0;
    while let Some(r) = set.join_next().await {
        ok += r.expect("task");
    }
    ok
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_calls_never_admit_more_than_the_limit() {
    let redis = Redis::start();
    for flag in ["true", "false"] {
        let d = Double::start(&redis, &["--prefix", flag, "--stop-cache-key-increment-when-overlimit", flag]);
        ensure_window_room(HOUR, 20);
        let ok = hammer(&[&d], 32, 8, 60, 0).await;
        assert_eq!(ok, 60, "stop flag {flag}: 256 calls for a limit of 60");
        let ok = {
            let d2 = Double::start(&redis, &["--prefix", &format!("{flag}k"), "--stop-cache-key-increment-when-overlimit", flag]);
            hammer(&[&d2], 16, 8, 60, 5).await
        };
        assert!(ok <= 12, "stop flag {flag}: leases of 5 for a limit of 60 admitted {ok}");
        assert_eq!(ok, 12, "stop flag {flag}: 60 / 5");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_doubles_over_one_redis_admit_the_limit_in_total() {
    let redis = Redis::start();
    let a = Double::start(&redis, &[]);
    let b = Double::start(&redis, &[]);
    ensure_window_room(HOUR, 20);
    let ok = hammer(&[&a, &b], 24, 10, 50, 0).await;
    assert_eq!(ok, 50, "240 calls over two replicas of the service, limit 50");
    let (ca, cb) = (a.stats()["calls"].as_u64().unwrap(), b.stats()["calls"].as_u64().unwrap());
    assert_eq!((ca + cb, ca, cb), (240, 120, 120));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delay_stalls_calls_and_errors_are_grpc_errors() {
    let mut redis = Redis::start();
    let d = Double::start(&redis, &["--delay-ms", "0"]);
    let mut c = d.client().await;
    d.set_delay(Duration::from_millis(400));
    assert_eq!(d.stats()["delay_ms"].as_u64(), Some(400));
    let t = Instant::now();
    let late = tokio::time::timeout(Duration::from_millis(100), c.should_rate_limit(&req("dom", cred("a", 5), 0))).await;
    assert!(late.is_err(), "a stalled call outlives a 100 ms deadline: {late:?}");
    assert!(t.elapsed() < Duration::from_millis(350), "{:?}", t.elapsed());
    let t = Instant::now();
    assert_eq!(call(&mut c, req("dom", cred("a", 5), 0)).await.overall_code, OK);
    assert!(t.elapsed() >= Duration::from_millis(400));
    d.set_delay(Duration::ZERO);

    // Requests upstream rejects.
    let e = c.should_rate_limit(&req("", cred("a", 5), 0)).await.expect_err("empty domain");
    assert_eq!((e.code, e.message.as_str()), (grpc::UNKNOWN, "rate limit domain must not be empty"));
    let e = c.should_rate_limit(&req("dom", vec![], 0)).await.expect_err("no descriptors");
    assert_eq!(e.message, "rate limit descriptor list must not be empty");
    // Redis gone: a gRPC error, not an answer.
    redis.stop();
    let e = c.should_rate_limit(&req("dom", cred("a", 5), 0)).await.expect_err("redis down");
    assert_eq!(e.code, grpc::UNKNOWN, "{e:?}");
    assert!(e.message.starts_with("redis:"), "{e:?}");
    assert_eq!(d.stats()["errors"].as_u64(), Some(3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_grpc_requests_get_grpc_errors_and_the_connection_stays_usable() {
    let redis = Redis::start();
    let d = Double::start(&redis, &[]);
    let mut c = d.client().await;
    let e = c.unary("/envoy.service.ratelimit.v3.RateLimitService/Other", b"").await.expect_err("unknown method");
    assert_eq!(e.code, grpc::UNIMPLEMENTED, "{e:?}");
    let e = c.unary(SHOULD_RATE_LIMIT_PATH, &[0xff, 0xff]).await.expect_err("not a RateLimitRequest");
    assert_eq!(e.code, grpc::INTERNAL, "{e:?}");
    assert!(e.message.starts_with("decoding RateLimitRequest"), "{e:?}");
    let r = c.send(SHOULD_RATE_LIMIT_PATH, "application/json", bytes::Bytes::from_static(b"{}")).await;
    assert_eq!(r.status(), 415);
    // None of these counted as a call; a good one on the same connection still works.
    assert_eq!(d.stats()["calls"].as_u64(), Some(0));
    assert_eq!(call(&mut c, req("dom", cred("a", 5), 0)).await.overall_code, OK);
    assert_eq!(d.stats()["calls"].as_u64(), Some(1));
}
