//! `DoLimit` of envoyproxy/ratelimit's `src/redis/fixed_cache_impl.go`, on one Redis:
//!
//! 1. With STOP_CACHE_KEY_INCREMENT_WHEN_OVERLIMIT: one pipeline of `GET` for every limited key;
//!    a key "would go over" when its value plus its hits is above its limit. This read is not
//!    atomic with step 2, as upstream.
//! 2. One pipeline of `INCRBY key n` + `EXPIRE key divider+jitter` per limited key, where n is
//!    [`algorithm::increment`] (the hits, or 0 for a spared key). The pipeline is sent as
//!    MULTI/EXEC (upstream pipelines without MULTI; INCRBY is atomic either way).
//! 3. Each descriptor's status from its post-INCRBY value: OVER_LIMIT iff it is above the limit.

use crate::algorithm::{self, Limit};
use crate::proto::{Code, RateLimitRequest, RateLimitResponse};
use redis::aio::MultiplexedConnection;
use std::hash::{BuildHasher, Hasher};
use std::time::{SystemTime, UNIX_EPOCH};

#[derive(Debug, Clone)]
pub struct Settings {
    /// `CACHE_KEY_PREFIX` (default empty).
    pub prefix: String,
    /// `STOP_CACHE_KEY_INCREMENT_WHEN_OVERLIMIT`.
    pub stop_when_overlimit: bool,
    /// `EXPIRATION_JITTER_MAX_SECONDS` (upstream default 300): EXPIRE gets divider + [0, this).
    pub expiration_jitter_max_seconds: i64,
}

/// Why a call failed; both become a gRPC error (upstream: a plain Go error, code UNKNOWN).
#[derive(Debug)]
pub enum Error {
    /// A request upstream rejects (`serviceError`), or an override with an unknown unit.
    Invalid(String),
    Redis(redis::RedisError),
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::Invalid(m) => f.write_str(m),
            Error::Redis(e) => write!(f, "redis: {e}"),
        }
    }
}

impl From<redis::RedisError> for Error {
    fn from(e: redis::RedisError) -> Self {
        Error::Redis(e)
    }
}

pub fn unix_now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

fn jitter(max: i64) -> i64 {
    if max <= 0 {
        return 0;
    }
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0));
    (h.finish() % max as u64) as i64
}

/// One `ShouldRateLimit`, as `shouldRateLimitWorker` + `DoLimit`.
pub async fn should_rate_limit(conn: &mut MultiplexedConnection, s: &Settings, req: &RateLimitRequest) -> Result<RateLimitResponse, Error> {
    if req.domain.is_empty() {
        return Err(Error::Invalid("rate limit domain must not be empty".into()));
    }
    if req.descriptors.is_empty() {
        return Err(Error::Invalid("rate limit descriptor list must not be empty".into()));
    }
    let limits: Vec<Option<Limit>> = req.descriptors.iter().map(algorithm::limit_of).collect::<Result<_, _>>().map_err(Error::Invalid)?;
    let hits = algorithm::hits_addends(req);
    let now = unix_now();
    let keys: Vec<Option<String>> = req
        .descriptors
        .iter()
        .zip(&limits)
        .map(|(d, l)| l.as_ref().map(|l| algorithm::cache_key(&s.prefix, &req.domain, d, l.divider, now)))
        .collect();
    let limited: Vec<usize> = (0..keys.len()).filter(|&i| keys[i].is_some()).collect();

    // Step 1: which keys would go over (only with the STOP flag).
    let mut near = vec![false; keys.len()];
    if s.stop_when_overlimit && !limited.is_empty() {
        let mut p = redis::pipe();
        for &i in &limited {
            p.cmd("GET").arg(keys[i].as_deref());
        }
        let current: Vec<Option<u64>> = p.query_async(conn).await?;
        for (&i, c) in limited.iter().zip(current) {
            if let Some(l) = &limits[i] {
                near[i] = algorithm::over(l, c.unwrap_or(0).saturating_add(hits[i]));
            }
        }
    }
    let any_near = near.iter().any(|&n| n);

    // Step 2: increment (MULTI/EXEC), reading back the post-increment values.
    let mut after = vec![0u64; keys.len()];
    if !limited.is_empty() {
        let mut p = redis::pipe();
        p.atomic();
        for &i in &limited {
            let (Some(key), Some(l)) = (&keys[i], &limits[i]) else { continue };
            let n = algorithm::increment(s.stop_when_overlimit, hits[i], any_near, near[i]);
            p.cmd("INCRBY").arg(key).arg(n);
            p.cmd("EXPIRE").arg(key).arg(l.divider + jitter(s.expiration_jitter_max_seconds)).ignore();
        }
        let values: Vec<u64> = p.query_async(conn).await?;
        for (&i, v) in limited.iter().zip(values) {
            after[i] = v;
        }
    }

    // Step 3: statuses and the overall code.
    let statuses: Vec<_> = (0..keys.len()).map(|i| algorithm::status(limits[i].as_ref(), after[i], now)).collect();
    let overall: Code = algorithm::overall(&statuses);
    Ok(RateLimitResponse { overall_code: overall as i32, statuses })
}
