//! Provider cooldowns: how long a provider asked us to leave a key alone, from its response.
//!
//! - A 429 or 503 with `Retry-After` (delta-seconds or an HTTP-date) or OpenAI's
//!   `x-ratelimit-reset-requests` cools the key down for that long.
//! - A 429 without a hint, or with a zero or past one (`Retry-After: 0`, an HTTP date gone by,
//!   `x-ratelimit-reset-requests: 0s`), cools it down for `server.cooldown_default`: a 429 always
//!   rests the key (whether it also counts for fail2ban is `fail2ban::BanRecord::on_429`'s rule).
//! - Any response with `x-ratelimit-remaining-requests: 0` cools the key down until its
//!   `x-ratelimit-reset-requests`, before the 429 comes.
//!
//! Every cooldown is capped at `server.cooldown_max`.

use std::time::{Duration, UNIX_EPOCH};

/// The response headers a cooldown decision reads (copied in the headers callback).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Hints {
    pub retry_after: Option<String>,
    pub reset_requests: Option<String>,
    pub remaining_requests: Option<String>,
}

pub const HINT_HEADERS: [&str; 3] = ["retry-after", "x-ratelimit-reset-requests", "x-ratelimit-remaining-requests"];

/// `Retry-After`: delta-seconds, or an HTTP-date (taken relative to `now_ms`).
pub fn parse_retry_after(value: &str, now_ms: u64) -> Option<Duration> {
    let v = value.trim();
    if !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()) {
        // Too many digits for a u64 is still "a very long time" (the caller caps it).
        return Some(v.parse::<u64>().map_or(Duration::MAX, Duration::from_secs));
    }
    let at = httpdate::parse_http_date(v).ok()?.duration_since(UNIX_EPOCH).ok()?;
    Some(at.saturating_sub(Duration::from_millis(now_ms)))
}

/// A Go-style duration as OpenAI sends it in `x-ratelimit-reset-*`: `1s`, `6m0s`, `59.5s`,
/// `20ms`, `1h2m3s`. A bare number is seconds.
pub fn parse_go_duration(value: &str) -> Option<Duration> {
    let v = value.trim();
    if v.is_empty() {
        return None;
    }
    if let Ok(secs) = v.parse::<f64>() {
        return secs_f64(secs);
    }
    let mut total = 0f64;
    let mut rest = v;
    while !rest.is_empty() {
        let num_len = rest.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(rest.len());
        let (num, tail) = rest.split_at(num_len);
        let n: f64 = num.parse().ok()?;
        let unit_len = tail.find(|c: char| c.is_ascii_digit() || c == '.').unwrap_or(tail.len());
        let (unit, tail) = tail.split_at(unit_len);
        let scale = match unit {
            "h" => 3600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 1e-3,
            "us" | "µs" => 1e-6,
            "ns" => 1e-9,
            _ => return None,
        };
        total += n * scale;
        rest = tail;
    }
    secs_f64(total)
}

fn secs_f64(secs: f64) -> Option<Duration> {
    (secs.is_finite() && secs >= 0.0).then(|| Duration::try_from_secs_f64(secs.min(1e9)).ok()).flatten()
}

/// How long to cool the key down after a response, if at all.
pub fn decide(status: u16, h: &Hints, now_ms: u64, default: Duration, max: Duration) -> Option<Duration> {
    let reset = h.reset_requests.as_deref().and_then(parse_go_duration);
    let hinted = || h.retry_after.as_deref().and_then(|v| parse_retry_after(v, now_ms)).or(reset);
    let d = match status {
        // Zero, or a date gone by: the provider said "now", and still refused: the default rest.
        429 => Some(hinted().filter(|d| !d.is_zero()).unwrap_or(default)),
        503 => hinted(),
        _ if h.remaining_requests.as_deref().map(str::trim) == Some("0") => reset,
        _ => None,
    }?;
    (!d.is_zero()).then_some(d.min(max))
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: Duration = Duration::from_secs(5);
    const MAX: Duration = Duration::from_secs(600);

    fn hints(ra: Option<&str>, reset: Option<&str>, remaining: Option<&str>) -> Hints {
        Hints { retry_after: ra.map(Into::into), reset_requests: reset.map(Into::into), remaining_requests: remaining.map(Into::into) }
    }

    #[test]
    fn retry_after_forms() {
        assert_eq!(parse_retry_after("30", 0), Some(Duration::from_secs(30)));
        assert_eq!(parse_retry_after(" 0 ", 0), Some(Duration::ZERO));
        // Sun, 06 Nov 1994 08:49:37 GMT = 784111777 s
        assert_eq!(parse_retry_after("Sun, 06 Nov 1994 08:49:37 GMT", 784_111_767_000), Some(Duration::from_secs(10)));
        assert_eq!(parse_retry_after("Sun, 06 Nov 1994 08:49:37 GMT", 784_111_800_000), Some(Duration::ZERO), "a date in the past");
        assert_eq!(parse_retry_after("soon", 0), None);
        assert_eq!(parse_retry_after("-5", 0), None);
        assert_eq!(parse_retry_after("99999999999999999999999", 0), Some(Duration::MAX));
    }

    #[test]
    fn go_durations() {
        assert_eq!(parse_go_duration("1s"), Some(Duration::from_secs(1)));
        assert_eq!(parse_go_duration("6m0s"), Some(Duration::from_secs(360)));
        assert_eq!(parse_go_duration("59.5s"), Some(Duration::from_millis(59_500)));
        assert_eq!(parse_go_duration("20ms"), Some(Duration::from_millis(20)));
        assert_eq!(parse_go_duration("1h2m3s"), Some(Duration::from_secs(3723)));
        assert_eq!(parse_go_duration("2"), Some(Duration::from_secs(2)));
        for bad in ["", "s", "1x", "1..2s", "-1s", "1e400"] {
            assert_eq!(parse_go_duration(bad), None, "{bad}");
        }
    }

    #[test]
    fn decisions() {
        assert_eq!(decide(429, &hints(Some("30"), None, None), 0, D, MAX), Some(Duration::from_secs(30)));
        assert_eq!(decide(429, &hints(None, None, None), 0, D, MAX), Some(D), "a 429 without a hint");
        assert_eq!(decide(429, &hints(None, Some("1.5s"), None), 0, D, MAX), Some(Duration::from_millis(1500)));
        assert_eq!(decide(429, &hints(Some("99999"), None, None), 0, D, MAX), Some(MAX), "capped");
        assert_eq!(decide(503, &hints(Some("7"), None, None), 0, D, MAX), Some(Duration::from_secs(7)));
        assert_eq!(decide(503, &hints(None, None, None), 0, D, MAX), None, "a plain 503 is fail2ban's business");
        assert_eq!(decide(200, &hints(None, Some("2s"), Some("0")), 0, D, MAX), Some(Duration::from_secs(2)), "before the 429 comes");
        assert_eq!(decide(200, &hints(None, Some("2s"), Some("3")), 0, D, MAX), None);
        assert_eq!(decide(500, &hints(Some("30"), None, None), 0, D, MAX), None);
        assert_eq!(decide(429, &hints(Some("0"), None, None), 0, D, MAX), Some(D), "zero: the default rest");
        assert_eq!(decide(429, &hints(Some("Sun, 06 Nov 1994 08:49:37 GMT"), None, None), 784_111_800_000, D, MAX), Some(D), "a past date");
        assert_eq!(decide(429, &hints(None, Some("0s"), None), 0, D, MAX), Some(D), "reset 0s");
        assert_eq!(decide(429, &hints(Some("99999999999999999999999"), None, None), 0, D, MAX), Some(MAX), "past u64: the cap");
        assert_eq!(decide(503, &hints(Some("0"), None, None), 0, D, MAX), None, "a 503 saying now is fail2ban's");
    }
}
