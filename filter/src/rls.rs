//! The messages of Envoy's rate-limit service protocol (RLS v3, `ShouldRateLimit`) that global
//! limits use, declared by hand with prost's derive (field numbers from
//! `envoy/service/ratelimit/v3/rls.proto` and `envoy/extensions/common/ratelimit/v3/ratelimit.proto`;
//! unknown fields of a reply are skipped). The e2e suite talks to tests/rls-double, whose own
//! declarations are pinned byte for byte to the generated protos' encoding, which pins these.

use prost::Message;

pub const SERVICE: &str = "envoy.service.ratelimit.v3.RateLimitService";
pub const METHOD: &str = "ShouldRateLimit";
/// `envoy.type.v3.RateLimitUnit.MINUTE`.
const UNIT_MINUTE: i32 = 2;
const CODE_OK: i32 = 1;
const CODE_OVER_LIMIT: i32 = 2;

#[derive(Clone, PartialEq, Message)]
pub struct RateLimitRequest {
    #[prost(string, tag = "1")]
    pub domain: String,
    #[prost(message, repeated, tag = "2")]
    pub descriptors: Vec<RateLimitDescriptor>,
    #[prost(uint32, tag = "3")]
    pub hits_addend: u32,
}

#[derive(Clone, PartialEq, Message)]
pub struct RateLimitDescriptor {
    #[prost(message, repeated, tag = "1")]
    pub entries: Vec<Entry>,
    #[prost(message, optional, tag = "2")]
    pub limit: Option<RateLimitOverride>,
    /// Per-descriptor hits (`google.protobuf.UInt64Value`); 0 = check only, no increment.
    #[prost(message, optional, tag = "3")]
    pub hits_addend: Option<UInt64Value>,
}

#[derive(Clone, PartialEq, Message)]
pub struct UInt64Value {
    #[prost(uint64, tag = "1")]
    pub value: u64,
}

#[derive(Clone, PartialEq, Message)]
pub struct Entry {
    #[prost(string, tag = "1")]
    pub key: String,
    #[prost(string, tag = "2")]
    pub value: String,
}

#[derive(Clone, PartialEq, Message)]
pub struct RateLimitOverride {
    #[prost(uint32, tag = "1")]
    pub requests_per_unit: u32,
    #[prost(int32, tag = "2")]
    pub unit: i32,
}

#[derive(Clone, PartialEq, Message)]
pub struct RateLimitResponse {
    #[prost(int32, tag = "1")]
    pub overall_code: i32,
    #[prost(message, repeated, tag = "2")]
    pub statuses: Vec<DescriptorStatus>,
}

#[derive(Clone, PartialEq, Message)]
pub struct DescriptorStatus {
    #[prost(int32, tag = "1")]
    pub code: i32,
    /// The limit the service applied; absent when it has none for the descriptor (an unknown
    /// `domain`, or no entry in its config): the descriptor is then not limited at all.
    #[prost(message, optional, tag = "2")]
    pub current_limit: Option<CurrentLimit>,
    #[prost(uint32, tag = "3")]
    pub limit_remaining: u32,
    #[prost(message, optional, tag = "4")]
    pub duration_until_reset: Option<ProtoDuration>,
}

/// `RateLimitResponse.RateLimit`.
#[derive(Clone, PartialEq, Message)]
pub struct CurrentLimit {
    #[prost(uint32, tag = "1")]
    pub requests_per_unit: u32,
    #[prost(int32, tag = "2")]
    pub unit: i32,
    #[prost(string, tag = "3")]
    pub name: String,
}

#[derive(Clone, PartialEq, Message)]
pub struct ProtoDuration {
    #[prost(int64, tag = "1")]
    pub seconds: i64,
    #[prost(int32, tag = "2")]
    pub nanos: i32,
}

/// What a descriptor counts: admitted requests, or tokens (charged after the answer).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Requests,
    Tokens,
}

/// The entry that makes a descriptor a token one: `[{credential}, ({model}), {tokens: total}]`.
pub const TOKENS_ENTRY: (&str, &str) = ("tokens", "total");

/// One limit to check: a credential's (`model` None) or a (credential, model) pair's, per minute.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limit<'a> {
    pub credential: &'a str,
    pub model: Option<&'a str>,
    pub kind: Kind,
    pub per_minute: u32,
}

fn descriptor(l: &Limit<'_>, hits: Option<u64>) -> RateLimitDescriptor {
    let mut entries = vec![Entry { key: "credential".into(), value: l.credential.into() }];
    if let Some(m) = l.model {
        entries.push(Entry { key: "model".into(), value: m.into() });
    }
    if l.kind == Kind::Tokens {
        entries.push(Entry { key: TOKENS_ENTRY.0.into(), value: TOKENS_ENTRY.1.into() });
    }
    RateLimitDescriptor {
        entries,
        limit: Some(RateLimitOverride { requests_per_unit: l.per_minute, unit: UNIT_MINUTE }),
        hits_addend: hits.map(|value| UInt64Value { value }),
    }
}

/// `ShouldRateLimit` for `limits`, taking `hits` slots on each request descriptor; token
/// descriptors are only checked (per-descriptor `hits_addend` 0: their count is not changed).
pub fn encode_request(domain: &str, limits: &[Limit<'_>], hits: u32) -> Vec<u8> {
    let descriptors = limits.iter().map(|l| descriptor(l, (l.kind == Kind::Tokens).then_some(0))).collect();
    RateLimitRequest { domain: domain.into(), descriptors, hits_addend: hits.max(1) }.encode_to_vec()
}

/// `ShouldRateLimit` that adds `tokens` to the token descriptors among `limits` (the others are
/// left out): what an answer reported, charged after it.
pub fn encode_charge(domain: &str, limits: &[Limit<'_>], tokens: u64) -> Vec<u8> {
    let descriptors = limits.iter().filter(|l| l.kind == Kind::Tokens).map(|l| descriptor(l, Some(tokens))).collect();
    let hits_addend = u32::try_from(tokens).unwrap_or(u32::MAX).max(1);
    RateLimitRequest { domain: domain.into(), descriptors, hits_addend }.encode_to_vec()
}

/// One descriptor's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Status {
    pub over: bool,
    /// The service applied a limit (`current_limit` present).
    pub limited: bool,
    pub remaining: u32,
    /// Until the service's window ends (None when the service does not say).
    pub reset_ms: Option<u64>,
}

/// The service's answer, in the order of the request's descriptors.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub over: bool,
    pub statuses: Vec<Status>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplyError {
    Undecodable,
    /// `overall_code` UNKNOWN (or a code we don't know): the service could not decide.
    Unknown(i32),
}

pub fn decode_reply(bytes: &[u8]) -> Result<Verdict, ReplyError> {
    let r = RateLimitResponse::decode(bytes).map_err(|_| ReplyError::Undecodable)?;
    let over = match r.overall_code {
        CODE_OK => false,
        CODE_OVER_LIMIT => true,
        other => return Err(ReplyError::Unknown(other)),
    };
    let statuses = r
        .statuses
        .iter()
        .map(|s| Status {
            over: s.code == CODE_OVER_LIMIT,
            limited: s.current_limit.is_some(),
            remaining: s.limit_remaining,
            reset_ms: s
                .duration_until_reset
                .as_ref()
                .map(|d| (d.seconds.clamp(0, 86_400 * 366) as u64) * 1000 + (d.nanos.clamp(0, 999_999_999) as u64) / 1_000_000),
        })
        .collect();
    Ok(Verdict { over, statuses })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_round_trips_with_overrides_per_descriptor() {
        let limits = [
            Limit { credential: "a", model: None, kind: Kind::Requests, per_minute: 60 },
            Limit { credential: "a", model: Some("gpt-4o"), kind: Kind::Requests, per_minute: 10 },
            Limit { credential: "a", model: None, kind: Kind::Tokens, per_minute: 5000 },
        ];
        let bytes = encode_request("auto-ai-router", &limits, 5);
        let r = RateLimitRequest::decode(bytes.as_slice()).unwrap();
        assert_eq!(r.domain, "auto-ai-router");
        assert_eq!(r.hits_addend, 5);
        assert_eq!(r.descriptors.len(), 3);
        assert_eq!(r.descriptors[1].entries[1], Entry { key: "model".into(), value: "gpt-4o".into() });
        assert_eq!(r.descriptors[0].limit, Some(RateLimitOverride { requests_per_unit: 60, unit: UNIT_MINUTE }));
        assert_eq!((r.descriptors[0].hits_addend.as_ref(), r.descriptors[1].hits_addend.as_ref()), (None, None), "the request's hits");
        assert_eq!(r.descriptors[2].entries[1], Entry { key: "tokens".into(), value: "total".into() });
        assert_eq!(r.descriptors[2].hits_addend, Some(UInt64Value { value: 0 }), "tokens are only checked");
        assert_eq!(RateLimitRequest::decode(encode_request("d", &limits[..1], 0).as_slice()).unwrap().hits_addend, 1);
        let charge = RateLimitRequest::decode(encode_charge("d", &limits, 7_000_000_000).as_slice()).unwrap();
        assert_eq!(charge.descriptors.len(), 1, "only token descriptors are charged");
        assert_eq!(charge.descriptors[0].hits_addend, Some(UInt64Value { value: 7_000_000_000 }));
        assert_eq!(charge.hits_addend, u32::MAX);
    }

    #[test]
    fn replies_decode_and_bad_ones_are_errors() {
        let reply = RateLimitResponse {
            overall_code: CODE_OVER_LIMIT,
            statuses: vec![
                DescriptorStatus {
                    code: CODE_OK,
                    current_limit: Some(CurrentLimit { requests_per_unit: 5, unit: UNIT_MINUTE, name: String::new() }),
                    limit_remaining: 3,
                    duration_until_reset: Some(ProtoDuration { seconds: 12, nanos: 500_000_000 }),
                },
                DescriptorStatus { code: CODE_OVER_LIMIT, current_limit: None, limit_remaining: 0, duration_until_reset: None },
            ],
        };
        let v = decode_reply(&reply.encode_to_vec()).unwrap();
        assert!(v.over);
        assert_eq!(v.statuses[0], Status { over: false, limited: true, remaining: 3, reset_ms: Some(12_500) });
        assert_eq!(v.statuses[1], Status { over: true, limited: false, remaining: 0, reset_ms: None });
        assert_eq!(decode_reply(&RateLimitResponse { overall_code: 0, statuses: vec![] }.encode_to_vec()), Err(ReplyError::Unknown(0)));
        assert_eq!(decode_reply(&[0xff, 0xff, 0xff]), Err(ReplyError::Undecodable));
        // An empty message is overall_code 0 (UNKNOWN): the service did not decide.
        assert!(decode_reply(&[]).is_err());
    }
}
