//! The pure parts of envoyproxy/ratelimit's Redis fixed-window cache, copied as behaviour (not
//! code) from upstream:
//!
//! - `src/utils/utilities.go`: `UnitToDivider`, `CalculateReset`, `GetHitsAddends`.
//! - `src/limiter/cache_key.go`: `GenerateCacheKey` (prefix + domain + `_` + `key_value_` per
//!   entry + the window start `(now / divider) * divider`).
//! - `src/redis/fixed_cache_impl.go`: `getHitsAddend` (what STOP_CACHE_KEY_INCREMENT_WHEN_OVERLIMIT
//!   increments) and the near-limit pre-check.
//! - `src/limiter/base_limiter.go`: `IsOverLimitThresholdReached`, `GetResponseDescriptorStatus`.
//! - `src/config/config_impl.go` `GetLimit`: a descriptor's `limit` override is the limit. The
//!   double has no config file, so a descriptor without an override has no limit (upstream would
//!   look it up in its config; the router always sends overrides).

use crate::proto::{Code, DescriptorStatus, Duration, RateLimit, RateLimitDescriptor, RateLimitRequest, Unit};

/// Seconds per window for an RLS unit (`UnitToDivider`); None for UNKNOWN or an unknown value
/// (upstream panics there).
pub fn unit_to_divider(unit: i32) -> Option<i64> {
    Some(match Unit::try_from(unit).ok()? {
        Unit::Second => 1,
        Unit::Minute => 60,
        Unit::Hour => 60 * 60,
        Unit::Day => 60 * 60 * 24,
        Unit::Week => 60 * 60 * 24 * 7,
        Unit::Month => 60 * 60 * 24 * 30,
        Unit::Year => 60 * 60 * 24 * 365,
        Unit::Unknown => return None,
    })
}

/// `CalculateReset`: seconds until the current aligned window ends (1..=divider).
pub fn duration_until_reset(divider: i64, now: i64) -> i64 {
    divider - now % divider
}

/// The limit that applies to one descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limit {
    pub requests_per_unit: u32,
    /// The RLS unit (`RateLimitResponse.RateLimit.Unit` numbering, the same as the override's).
    pub unit: i32,
    pub divider: i64,
}

impl Limit {
    pub fn as_rate_limit(&self) -> RateLimit {
        RateLimit { name: String::new(), requests_per_unit: self.requests_per_unit, unit: self.unit }
    }
}

/// The descriptor's limit override (`GetLimit` with an override); Ok(None) without one.
pub fn limit_of(d: &RateLimitDescriptor) -> Result<Option<Limit>, String> {
    let Some(o) = d.limit else { return Ok(None) };
    let divider = unit_to_divider(o.unit).ok_or_else(|| format!("descriptor limit override has an unknown unit {}", o.unit))?;
    Ok(Some(Limit { requests_per_unit: o.requests_per_unit, unit: o.unit, divider }))
}

/// `GetHitsAddends`: the per-descriptor `hits_addend` if set (0 = check only, no increment),
/// else the request's `hits_addend`, where 0 means 1.
pub fn hits_addends(req: &RateLimitRequest) -> Vec<u64> {
    req.descriptors.iter().map(|d| d.hits_addend.map(|v| v.value).unwrap_or_else(|| u64::from(req.hits_addend).max(1))).collect()
}

/// `GenerateCacheKey`: `prefix + domain + "_" + (key + "_" + value + "_")* + window start`.
pub fn cache_key(prefix: &str, domain: &str, d: &RateLimitDescriptor, divider: i64, now: i64) -> String {
    let mut k = String::with_capacity(64);
    k.push_str(prefix);
    k.push_str(domain);
    k.push('_');
    for e in &d.entries {
        k.push_str(&e.key);
        k.push('_');
        k.push_str(&e.value);
        k.push('_');
    }
    k.push_str(&((now / divider) * divider).to_string());
    k
}

/// `IsOverLimitThresholdReached`: the count after adding the hits is above the limit.
pub fn over(limit: &Limit, after: u64) -> bool {
    after > u64::from(limit.requests_per_unit)
}

/// `getHitsAddend`: what one key is incremented by. Without the STOP flag, always its hits. With
/// it, when some key of the request would go over (`any_near`), only the keys that would go over
/// themselves (`this_near`) are incremented and the request's other keys are spared (0). (The
/// upstream local-cache branch, `LOCAL_CACHE_SIZE_IN_BYTES`, is off by default and not copied.)
pub fn increment(stop_when_overlimit: bool, hits: u64, any_near: bool, this_near: bool) -> u64 {
    if !stop_when_overlimit || !any_near || this_near {
        hits
    } else {
        0
    }
}

/// `GetResponseDescriptorStatus` for a descriptor whose key now holds `after`.
pub fn status(limit: Option<&Limit>, after: u64, now: i64) -> DescriptorStatus {
    let Some(l) = limit else {
        // No limit: OK, no current_limit, no reset.
        return DescriptorStatus { code: Code::Ok as i32, ..Default::default() };
    };
    let (code, remaining) = if over(l, after) {
        (Code::OverLimit, 0)
    } else {
        // after <= requests_per_unit, so this fits.
        (Code::Ok, (u64::from(l.requests_per_unit) - after) as u32)
    };
    DescriptorStatus {
        code: code as i32,
        current_limit: Some(l.as_rate_limit()),
        limit_remaining: remaining,
        duration_until_reset: Some(Duration { seconds: duration_until_reset(l.divider, now), nanos: 0 }),
    }
}

/// The overall code: OVER_LIMIT iff some descriptor is over (no quota or shadow mode here).
pub fn overall(statuses: &[DescriptorStatus]) -> Code {
    if statuses.iter().any(|s| s.code == Code::OverLimit as i32) {
        Code::OverLimit
    } else {
        Code::Ok
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{Entry, RateLimitOverride, UInt64Value};

    fn desc(entries: &[(&str, &str)], limit: Option<(u32, Unit)>, hits: Option<u64>) -> RateLimitDescriptor {
        RateLimitDescriptor {
            entries: entries.iter().map(|(k, v)| Entry { key: k.to_string(), value: v.to_string() }).collect(),
            limit: limit.map(|(n, u)| RateLimitOverride { requests_per_unit: n, unit: u as i32 }),
            hits_addend: hits.map(|value| UInt64Value { value }),
        }
    }

    #[test]
    fn key_is_prefix_domain_entries_and_aligned_window() {
        let d = desc(&[("credential", "c1"), ("model", "gpt-4o")], Some((5, Unit::Minute)), None);
        assert_eq!(cache_key("p:", "dom", &d, 60, 1_700_000_059), "p:dom_credential_c1_model_gpt-4o_1700000040");
        assert_eq!(cache_key("", "dom", &d, 60, 1_700_000_039), "dom_credential_c1_model_gpt-4o_1699999980");
        assert_eq!(cache_key("", "dom", &desc(&[], None, None), 1, 7), "dom_7");
    }

    #[test]
    fn reset_and_dividers() {
        assert_eq!(duration_until_reset(60, 120), 60);
        assert_eq!(duration_until_reset(60, 179), 1);
        assert_eq!(unit_to_divider(Unit::Week as i32), Some(604_800));
        assert_eq!(unit_to_divider(Unit::Month as i32), Some(2_592_000));
        assert_eq!(unit_to_divider(0), None);
        assert_eq!(unit_to_divider(42), None);
    }

    #[test]
    fn hits_prefer_the_descriptor_then_the_request_then_one() {
        let req = RateLimitRequest {
            domain: "d".into(),
            descriptors: vec![desc(&[], None, Some(0)), desc(&[], None, None), desc(&[], None, Some(7))],
            hits_addend: 0,
        };
        assert_eq!(hits_addends(&req), vec![0, 1, 7]);
        assert_eq!(hits_addends(&RateLimitRequest { hits_addend: 3, ..req }), vec![0, 3, 7]);
    }

    #[test]
    fn stop_flag_spares_only_the_keys_that_would_not_overflow() {
        assert_eq!(increment(false, 4, true, false), 4);
        assert_eq!(increment(true, 4, false, false), 4);
        assert_eq!(increment(true, 4, true, true), 4);
        assert_eq!(increment(true, 4, true, false), 0);
    }

    #[test]
    fn statuses() {
        let l = Limit { requests_per_unit: 3, unit: Unit::Minute as i32, divider: 60 };
        let s = status(Some(&l), 3, 130);
        assert_eq!((s.code, s.limit_remaining, s.duration_until_reset.map(|d| d.seconds)), (Code::Ok as i32, 0, Some(50)));
        let s = status(Some(&l), 4, 130);
        assert_eq!((s.code, s.limit_remaining), (Code::OverLimit as i32, 0));
        let s = status(None, 99, 130);
        assert_eq!((s.code, s.current_limit, s.duration_until_reset), (Code::Ok as i32, None, None));
        assert_eq!(overall(&[status(None, 0, 0), status(Some(&l), 4, 0)]), Code::OverLimit);
    }
}
