//! One upstream attempt, in the upstream filter the same `.wasm` runs in every credential's
//! cluster (`retry_contract::UPSTREAM_ROOT_ID`): inject this attempt's key → see its status →
//! account it → choose the next key when it failed.
//!
//! The downstream flow (`request`) picks and charges the first credential and writes the request's
//! [`Plan`] into filter state. Envoy's router then runs one attempt per credential: the route's
//! matcher reads `retry_contract::NEXT_FILTER_STATE` on every attempt (`refresh_cluster_on_retry`)
//! and retries when an attempt's response carries `retry_contract::RETRY_HEADER`, or on a connect
//! failure or reset before any response. Envoy never retries once response headers went
//! downstream, so a stream is never restarted.
//!
//! Header edits persist from one attempt into the next, so every attempt rebuilds
//! `authorization` and `:path` from the plan (the client's original path), never
//! from what the previous attempt left.

use crate::balancer::{self, Selection};
use crate::config::LogLevel;
use crate::cooldown::Hints;
use crate::endpoints;
use crate::host::{Action, Host, HostResult};
use crate::retry_contract::{ATTEMPTS_HEADER, NEXT_PROPERTY, NO_CREDENTIAL, PLAN_PROPERTY, RETRY_HEADER};
use crate::runtime::{HotKey, Runtime};

/// What the attempts of one request share, kept in filter state (`retry_contract::PLAN_PROPERTY`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// Credentials tried so far, in order; the last is the current attempt's (or, after a failed
    /// attempt, the next one's, picked and charged before Envoy retries).
    pub tried: Vec<u16>,
    /// How many of `tried` had an attempt start (the first always does; a retry's attempt writes
    /// it). `tried.len() > started`: the last pick was never used (Envoy did not retry).
    pub started: u8,
    /// When the last pick was charged (its RPM bucket, for taking it back if unused).
    pub picked_ms: u64,
    /// In-flight slot ids (`max_concurrent`): pick `k` of `tried` holds slot `slot_base + k`.
    pub slot_base: u64,
    pub model: Option<String>,
    /// The client's path (before any base_url prefix).
    pub path: String,
    /// When the router routed the request (its whole body had arrived): Envoy's route timeout,
    /// which bounds all attempts together, counts from about here.
    pub start_ms: u64,
}

const PLAN_VERSION: u8 = 3;

impl Plan {
    pub fn encode(&self) -> Vec<u8> {
        let model = self.model.as_deref().unwrap_or_default().as_bytes();
        let mut out = Vec::with_capacity(14 + 2 * self.tried.len() + model.len() + self.path.len());
        out.push(PLAN_VERSION);
        out.extend_from_slice(&self.start_ms.to_le_bytes());
        out.push(self.tried.len().min(255) as u8);
        for i in self.tried.iter().take(255) {
            out.extend_from_slice(&i.to_le_bytes());
        }
        out.push(self.started);
        out.extend_from_slice(&self.picked_ms.to_le_bytes());
        out.extend_from_slice(&self.slot_base.to_le_bytes());
        out.push(self.model.is_some() as u8);
        out.extend_from_slice(&(model.len().min(u16::MAX as usize) as u16).to_le_bytes());
        out.extend_from_slice(model.get(..model.len().min(u16::MAX as usize)).unwrap_or_default());
        out.extend_from_slice(self.path.as_bytes());
        out
    }

    pub fn decode(b: &[u8]) -> Option<Plan> {
        let (head, rest) = PlanHead::decode(b)?;
        let tried = head.tried.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]])).collect();
        let (&[has_model, l0, l1], rest) = rest.split_first_chunk::<3>()?;
        let (model, path) = rest.split_at_checked(u16::from_le_bytes([l0, l1]) as usize)?;
        let model = (has_model == 1).then(|| String::from_utf8(model.to_vec()).ok()).flatten();
        Some(Plan {
            tried,
            started: head.started,
            picked_ms: head.picked_ms,
            slot_base: head.slot_base,
            model,
            path: String::from_utf8(path.to_vec()).ok()?,
            start_ms: head.start_ms,
        })
    }

    /// The current attempt's credential straight from the encoded plan (the downstream response
    /// path needs only that: no model or path is decoded).
    pub fn decode_current(b: &[u8]) -> Option<usize> {
        let (head, _) = PlanHead::decode(b)?;
        let last = head.tried.get(head.tried.len().checked_sub(2)?..)?;
        Some(u16::from_le_bytes([*last.first()?, *last.get(1)?]) as usize)
    }

    /// The last pick and when it was charged, when no attempt used it (Envoy did not retry: the
    /// answer went to the client, or the client left); nothing is decoded beyond the header.
    /// Each pick's credential and in-flight slot id, from the encoded plan.
    pub fn slots(b: &[u8]) -> Vec<(usize, u64)> {
        let Some((head, _)) = PlanHead::decode(b) else { return Vec::new() };
        head.tried
            .chunks_exact(2)
            .enumerate()
            .map(|(k, c)| (u16::from_le_bytes([c[0], c[1]]) as usize, head.slot_base + k as u64))
            .collect()
    }

    pub fn unused_pick(b: &[u8]) -> Option<(usize, u64)> {
        let (head, _) = PlanHead::decode(b)?;
        let n = head.tried.len() / 2;
        (n > head.started as usize && n > 1).then(|| Plan::decode_current(b).map(|i| (i, head.picked_ms))).flatten()
    }

    pub fn current(&self) -> Option<usize> {
        self.tried.last().map(|i| *i as usize)
    }

    pub fn tried_indices(&self) -> Vec<usize> {
        self.tried.iter().map(|i| *i as usize).collect()
    }
}

/// The fixed part of an encoded plan, borrowed.
struct PlanHead<'a> {
    start_ms: u64,
    tried: &'a [u8],
    started: u8,
    picked_ms: u64,
    slot_base: u64,
}

impl<'a> PlanHead<'a> {
    fn decode(b: &'a [u8]) -> Option<(PlanHead<'a>, &'a [u8])> {
        let (&[PLAN_VERSION], rest) = b.split_first_chunk::<1>()? else { return None };
        let (start, rest) = rest.split_first_chunk::<8>()?;
        let (&[n], rest) = rest.split_first_chunk::<1>()?;
        let (tried, rest) = rest.split_at_checked(2 * n as usize)?;
        let (&[started], rest) = rest.split_first_chunk::<1>()?;
        let (picked, rest) = rest.split_first_chunk::<8>()?;
        let (slot, rest) = rest.split_first_chunk::<8>()?;
        let head = PlanHead {
            start_ms: u64::from_le_bytes(*start),
            tried,
            started,
            picked_ms: u64::from_le_bytes(*picked),
            slot_base: u64::from_le_bytes(*slot),
        };
        Some((head, rest))
    }
}

/// The request's plan from filter state (`None`: not a router request, e.g. the filter's own
/// `/v1/models` fetch through the credential's cluster).
pub fn read_plan(host: &dyn Host) -> HostResult<Option<Plan>> {
    Ok(host.property(&[PLAN_PROPERTY])?.and_then(|b| Plan::decode(&b)))
}

/// What the filters read from a response's headers, from one host call.
#[derive(Debug, Default)]
pub struct Head {
    pub status: u16,
    /// From `content-type`: how to read the body's usage (None: not read).
    pub format: Option<crate::usage::Format>,
    /// From `content-encoding`: whether (and how) the body must be decoded to read its usage.
    pub encoding: crate::content_encoding::Encoding,
    pub hints: Hints,
}

/// The response's status, body format and cooldown hints (only those that can matter for the
/// status), in one pass over the map; a map the host can't give is status 0 (nothing to account).
pub fn read_head(host: &dyn Host) -> Head {
    let Ok(map) = host.response_headers() else { return Head::default() };
    let (mut head, mut retry_after, mut reset, mut remaining) = (Head::default(), None, None, None);
    for (name, value) in map.iter() {
        match name {
            b":status" => head.status = std::str::from_utf8(value).ok().and_then(|s| s.parse().ok()).unwrap_or(0),
            b"content-type" if head.format.is_none() => {
                head.format = std::str::from_utf8(value).ok().and_then(crate::usage::Format::from_content_type)
            }
            b"content-encoding" => head.encoding = head.encoding.with(value),
            // The first of repeated headers, as Envoy's map lookup gives it.
            b"retry-after" => retry_after = retry_after.or(Some(value)),
            b"x-ratelimit-reset-requests" => reset = reset.or(Some(value)),
            b"x-ratelimit-remaining-requests" => remaining = remaining.or(Some(value)),
            _ => {}
        }
    }
    let text = |v: Option<&[u8]>| v.map(|v| String::from_utf8_lossy(v).into_owned());
    head.hints = if head.status == 429 || head.status == 503 {
        Hints { retry_after: text(retry_after), reset_requests: text(reset), remaining_requests: None }
    } else {
        let exhausted = remaining.is_some_and(|r| r.trim_ascii() == b"0");
        Hints { retry_after: None, reset_requests: if exhausted { text(reset) } else { None }, remaining_requests: text(remaining) }
    };
    head
}

pub fn write_plan(host: &dyn Host, plan: &Plan, next: &str) -> HostResult<()> {
    host.set_property(PLAN_PROPERTY, &plan.encode())?;
    host.set_property(NEXT_PROPERTY, next.as_bytes())
}

#[derive(Debug, Default)]
pub struct Attempt {
    plan: Option<Plan>,
    /// This attempt's credential (from the cluster it runs in).
    index: Option<usize>,
    endpoint: &'static str,
    responded: bool,
    /// When this attempt was sent upstream.
    sent_ms: u64,
    /// This attempt's in-flight slot id (`max_concurrent`).
    slot: u64,
}

impl Attempt {
    pub fn on_request_headers(&mut self, rt: Option<&Runtime>, host: &dyn Host) -> Action {
        match self.inject(rt, host) {
            Ok(action) => action,
            Err(e) => {
                if let Some(rt) = rt {
                    rt.log(host, LogLevel::Error, || {
                        format!("auto-ai-router: upstream attempt: host call failed with status {}; answering 503", e.0)
                    });
                }
                self.refuse(host)
            }
        }
    }

    /// Never lets a router request go upstream without its own credential's key.
    fn refuse(&mut self, host: &dyn Host) -> Action {
        self.plan = None;
        let body = crate::errors::body(503, "The router could not prepare the upstream request.", Some("router_error"));
        let _ = host.send_reply(503, &[("content-type", "application/json")], body.as_bytes());
        Action::Pause
    }

    fn inject(&mut self, rt: Option<&Runtime>, host: &dyn Host) -> HostResult<Action> {
        let Some(plan) = read_plan(host)? else { return Ok(Action::Continue) };
        let Some(rt) = rt else { return Ok(self.refuse(host)) };
        let cluster = host.property(&["xds", "cluster_name"])?.unwrap_or_default();
        let index = std::str::from_utf8(&cluster).ok().and_then(|c| rt.index_of(c));
        let (Some(i), Some(cred), Some(bearer)) =
            (index, index.and_then(|i| rt.cfg.credentials.get(i)), index.and_then(|i| rt.bearer.get(i)))
        else {
            rt.log(host, LogLevel::Error, || {
                format!("auto-ai-router: upstream attempt in unknown cluster {:?}", String::from_utf8_lossy(&cluster))
            });
            return Ok(self.refuse(host));
        };
        host.set_request_header("authorization", Some(bearer.as_bytes()))?;
        // `:authority` comes from the attempt's endpoint (the route's `auto_host_rewrite`).
        let path = format!("{}{}", cred.path_prefix, plan.path);
        host.set_request_header(":path", Some(path.as_bytes()))?;
        self.endpoint = endpoints::label(&plan.path);
        self.sent_ms = host.now_ms();
        self.slot = plan.slot_base + plan.tried.len().saturating_sub(1) as u64;
        self.index = Some(i);
        let mut plan = plan;
        if plan.tried.len() > plan.started as usize {
            // A retry's attempt: its pick is used (only retries pay this write).
            plan.started = plan.tried.len().min(255) as u8;
            host.set_property(PLAN_PROPERTY, &plan.encode())?;
        }
        self.plan = Some(plan);
        Ok(Action::Continue)
    }

    pub fn on_response_headers(&mut self, rt: Option<&Runtime>, host: &dyn Host) -> Action {
        let (Some(rt), Some(index), Some(_)) = (rt, self.index, self.plan.as_ref()) else { return Action::Continue };
        self.responded = true;
        // A provider can't ask for a retry by sending our flag itself.
        let _ = host.set_response_header(RETRY_HEADER, None);
        let head = read_head(host);
        self.finish_attempt(rt, host, index, Outcome::Response(head.status), &head.hints);
        Action::Continue
    }

    /// The attempt is over (Envoy calls this before it retries). No response headers: a connect
    /// failure, a timeout, an upstream reset before the first byte — or the client gave up.
    pub fn on_done(&mut self, rt: Option<&Runtime>, host: &dyn Host) {
        if let (Some(rt), Some(index)) = (rt, self.index) {
            // The attempt is over: its key has one request fewer in flight.
            rt.release_slot(host, index, self.slot);
        }
        let (Some(rt), Some(index), Some(plan), false) = (rt, self.index, self.plan.as_ref(), self.responded) else { return };
        self.responded = true;
        let transport = host.property(&["upstream", "transport_failure_reason"]).ok().flatten().filter(|r| !r.is_empty());
        let now = host.now_ms();
        let spent = |since: u64, limit: Option<std::time::Duration>| {
            limit.is_some_and(|t| now.saturating_sub(since).saturating_add(TIMEOUT_SLACK_MS) >= t.as_millis() as u64)
        };
        // The route timeout bounds all attempts together (from when the request was routed); an
        // attempt that ends without a response when it is spent timed out, with nothing left to
        // retry in. `attempt_timeout` (Envoy's per-try timeout) bounds one attempt: it is retried.
        let outcome = if transport.is_some() {
            Outcome::NoResponse(502)
        } else if spent(plan.start_ms, rt.cfg.server.request_timeout) {
            Outcome::TimedOut
        } else if spent(self.sent_ms, rt.cfg.server.attempt_timeout) {
            Outcome::AttemptTimedOut
        } else {
            // A reset before any response, from the provider's side or the client's: not the key's
            // fault for sure, so no strike; the next attempt (if Envoy makes one) goes elsewhere.
            Outcome::Reset
        };
        self.finish_attempt(rt, host, index, outcome, &Hints::default());
    }

    fn finish_attempt(&mut self, rt: &Runtime, host: &dyn Host, index: usize, outcome: Outcome, hints: &Hints) {
        let server = &rt.cfg.server;
        let status = outcome.status();
        if !matches!(outcome, Outcome::Reset) {
            rt.account(host, index, self.endpoint, status, hints, self.sent_ms);
        }
        let Some(plan) = self.plan.as_mut() else { return };
        let attempts = plan.tried.len();
        if let Outcome::Response(_) = outcome {
            let _ = host.set_response_header(ATTEMPTS_HEADER, Some(attempts.to_string().as_bytes()));
        }
        let failed = matches!(outcome, Outcome::NoResponse(_) | Outcome::Reset | Outcome::AttemptTimedOut)
            || server.retry_on_status.contains(&status);
        if !failed || matches!(outcome, Outcome::TimedOut) || attempts > server.max_provider_retries as usize {
            return;
        }
        // A retry's pick can't wait for the rate-limit service (`may_ask` false).
        let mut walk = balancer::Walk::with_slot(plan.slot_base + plan.tried.len() as u64);
        let selection = rt.select(host, plan.model.as_deref(), &plan.tried_indices(), &mut walk, false, host.now_ms());
        let next = match selection {
            Selection::Chosen { index: next, .. } => rt.cfg.credentials.get(next).map(|c| (next, c.name.as_str())),
            _ => None,
        };
        let Some((next, name)) = next else {
            // No key left: the client gets this answer as the provider sent it (after a connect
            // failure Envoy's own 503: the matcher finds no cluster for NO_CREDENTIAL).
            let _ = host.set_property(NEXT_PROPERTY, NO_CREDENTIAL.as_bytes());
            return;
        };
        plan.tried.push(next as u16);
        plan.picked_ms = host.now_ms();
        if write_plan(host, plan, name).is_err() {
            return;
        }
        // After a response, Envoy retries on our header; without one, on its own retry_on.
        if let Outcome::Response(_) = outcome {
            if host.set_response_header(RETRY_HEADER, Some(b"1")).is_err() {
                return;
            }
        }
        let reason = match outcome {
            Outcome::Response(s) => s,
            Outcome::NoResponse(_) | Outcome::TimedOut => 0,
            Outcome::Reset => 1,
            Outcome::AttemptTimedOut => 504,
        };
        rt.increment(host, HotKey::Retries(index, reason));
        rt.log(host, LogLevel::Debug, || format!("auto-ai-router: attempt {attempts} got {status}; retrying on credential {name}"));
    }
}

/// An attempt that ends without a response this close to the route timeout timed out.
const TIMEOUT_SLACK_MS: u64 = 50;

#[derive(Debug, Clone, Copy)]
enum Outcome {
    /// The provider answered with this status.
    Response(u16),
    /// No connection (a transport failure): counted as 502.
    NoResponse(u16),
    /// The route timeout ended it: counted as 504, never retried (the time is spent).
    TimedOut,
    /// `server.attempt_timeout` ended it (no response headers in time): 504, retried elsewhere.
    AttemptTimedOut,
    /// Reset before any response, by either side: no strike.
    Reset,
}

impl Outcome {
    fn status(self) -> u16 {
        match self {
            Outcome::Response(s) | Outcome::NoResponse(s) => s,
            Outcome::TimedOut | Outcome::AttemptTimedOut => 504,
            Outcome::Reset => 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_codec() {
        let p = Plan {
            tried: vec![0, 3],
            started: 1,
            picked_ms: 99,
            slot_base: 1 << 40,
            model: Some("gpt-4o".into()),
            path: "/v1/chat/completions?x=é".into(),
            start_ms: 77,
        };
        assert_eq!(Plan::decode(&p.encode()), Some(p.clone()));
        assert_eq!(Plan::unused_pick(&p.encode()), Some((3, 99)), "picked after attempt 1, never started");
        assert_eq!(Plan::unused_pick(&Plan { started: 2, ..p.clone() }.encode()), None, "used");
        let none = Plan { tried: vec![1], started: 1, model: None, path: "/v1/files".into(), ..Plan::default() };
        assert_eq!(Plan::unused_pick(&none.encode()), None, "the first pick is the request's own");
        assert_eq!(Plan::decode(&none.encode()), Some(none.clone()));
        let bytes = p.encode();
        for cut in 0..24 {
            assert_eq!(Plan::decode(&bytes[..cut]), None, "{cut}");
        }
        assert_eq!(Plan::decode(b""), None);
        assert_eq!(p.current(), Some(3));
        for q in [&p, &none] {
            assert_eq!(Plan::decode_current(&q.encode()), q.current());
        }
        assert_eq!(Plan::decode_current(&Plan { tried: vec![], ..none.clone() }.encode()), None);
        for cut in 0..12 {
            assert_eq!(Plan::decode_current(&bytes[..cut]), None, "{cut}");
        }
    }
}
