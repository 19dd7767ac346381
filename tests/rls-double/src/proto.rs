//! The RLS v3 messages the double reads and writes, declared with prost's derive from upstream's
//! protos (envoyproxy/envoy `api/envoy/service/ratelimit/v3/rls.proto`,
//! `api/envoy/extensions/common/ratelimit/v3/ratelimit.proto`, `api/envoy/type/v3/ratelimit_unit.proto`,
//! and google/protobuf `duration.proto`, `wrappers.proto`). Fields the double never reads or sets
//! (`is_negative_hits`, quota, headers, metadata, raw body) are left out: prost skips unknown fields
//! on decode and an absent field encodes to nothing, so the wire format is the same.
//!
//! Declared separately from the filter's (filter/src/rls.rs) on purpose, with the fields the filter
//! does not use (`hits_addend` per descriptor, `current_limit`). The tests in this file pin the
//! encoding byte for byte to what the generated protos (the `envoy-types` crate, prost-build over
//! upstream's .proto files) produced for the same messages.

/// gRPC path of the one method served.
pub const SHOULD_RATE_LIMIT_PATH: &str = "/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit";

#[derive(Clone, PartialEq, prost::Message)]
pub struct RateLimitRequest {
    #[prost(string, tag = "1")]
    pub domain: String,
    #[prost(message, repeated, tag = "2")]
    pub descriptors: Vec<RateLimitDescriptor>,
    #[prost(uint32, tag = "3")]
    pub hits_addend: u32,
}

/// `envoy.extensions.common.ratelimit.v3.RateLimitDescriptor`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct RateLimitDescriptor {
    #[prost(message, repeated, tag = "1")]
    pub entries: Vec<Entry>,
    #[prost(message, optional, tag = "2")]
    pub limit: Option<RateLimitOverride>,
    /// `google.protobuf.UInt64Value`: unset and 0 differ (0 = check only).
    #[prost(message, optional, tag = "3")]
    pub hits_addend: Option<UInt64Value>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Entry {
    #[prost(string, tag = "1")]
    pub key: String,
    #[prost(string, tag = "2")]
    pub value: String,
}

#[derive(Clone, Copy, PartialEq, prost::Message)]
pub struct RateLimitOverride {
    #[prost(uint32, tag = "1")]
    pub requests_per_unit: u32,
    /// `envoy.type.v3.RateLimitUnit`, numbered as [`Unit`].
    #[prost(enumeration = "Unit", tag = "2")]
    pub unit: i32,
}

#[derive(Clone, Copy, PartialEq, prost::Message)]
pub struct UInt64Value {
    #[prost(uint64, tag = "1")]
    pub value: u64,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct RateLimitResponse {
    #[prost(enumeration = "Code", tag = "1")]
    pub overall_code: i32,
    #[prost(message, repeated, tag = "2")]
    pub statuses: Vec<DescriptorStatus>,
}

/// `RateLimitResponse.DescriptorStatus`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct DescriptorStatus {
    #[prost(enumeration = "Code", tag = "1")]
    pub code: i32,
    #[prost(message, optional, tag = "2")]
    pub current_limit: Option<RateLimit>,
    #[prost(uint32, tag = "3")]
    pub limit_remaining: u32,
    #[prost(message, optional, tag = "4")]
    pub duration_until_reset: Option<Duration>,
}

/// `RateLimitResponse.RateLimit`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct RateLimit {
    #[prost(string, tag = "3")]
    pub name: String,
    #[prost(uint32, tag = "1")]
    pub requests_per_unit: u32,
    #[prost(enumeration = "Unit", tag = "2")]
    pub unit: i32,
}

/// `google.protobuf.Duration`.
#[derive(Clone, Copy, PartialEq, prost::Message)]
pub struct Duration {
    #[prost(int64, tag = "1")]
    pub seconds: i64,
    #[prost(int32, tag = "2")]
    pub nanos: i32,
}

/// `RateLimitResponse.Code`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, prost::Enumeration)]
#[repr(i32)]
pub enum Code {
    Unknown = 0,
    Ok = 1,
    OverLimit = 2,
}

/// `RateLimitResponse.RateLimit.Unit` and `envoy.type.v3.RateLimitUnit` (the same numbers; WEEK
/// was added last).
#[derive(Clone, Copy, Debug, PartialEq, Eq, prost::Enumeration)]
#[repr(i32)]
pub enum Unit {
    Unknown = 0,
    Second = 1,
    Minute = 2,
    Hour = 3,
    Day = 4,
    Month = 5,
    Year = 6,
    Week = 7,
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    // Produced once by envoy-types 0.7.7's generated messages (prost-build over upstream's protos)
    // for exactly the values built below.
    const GOLDEN_REQUEST: &str = "0a0e6175746f2d61692d726f75746572121a0a100a0a63726564656e7469616c120263311204083c10021a00122e0a100a0a63726564656e7469616c120263310a0f0a056d6f64656c12066770742d346f120508ac0210071a02080712080a060a016b1201761803";
    const GOLDEN_RESPONSE: &str = "0802121408011207083c10021a016e183b2205082a10f403120f0802120508ac021007220408fff42412020801";

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    fn unhex(s: &str) -> Vec<u8> {
        (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
    }

    fn entry(k: &str, v: &str) -> Entry {
        Entry { key: k.into(), value: v.into() }
    }

    #[test]
    fn request_matches_the_generated_protos_byte_for_byte() {
        let req = RateLimitRequest {
            domain: "auto-ai-router".into(),
            descriptors: vec![
                RateLimitDescriptor {
                    entries: vec![entry("credential", "c1")],
                    limit: Some(RateLimitOverride { requests_per_unit: 60, unit: Unit::Minute as i32 }),
                    hits_addend: Some(UInt64Value { value: 0 }),
                },
                RateLimitDescriptor {
                    entries: vec![entry("credential", "c1"), entry("model", "gpt-4o")],
                    limit: Some(RateLimitOverride { requests_per_unit: 300, unit: Unit::Week as i32 }),
                    hits_addend: Some(UInt64Value { value: 7 }),
                },
                RateLimitDescriptor { entries: vec![entry("k", "v")], limit: None, hits_addend: None },
            ],
            hits_addend: 3,
        };
        assert_eq!(hex(&req.encode_to_vec()), GOLDEN_REQUEST);
        assert_eq!(RateLimitRequest::decode(unhex(GOLDEN_REQUEST).as_slice()).unwrap(), req);
    }

    #[test]
    fn response_matches_the_generated_protos_byte_for_byte() {
        let resp = RateLimitResponse {
            overall_code: Code::OverLimit as i32,
            statuses: vec![
                DescriptorStatus {
                    code: Code::Ok as i32,
                    current_limit: Some(RateLimit { name: "n".into(), requests_per_unit: 60, unit: Unit::Minute as i32 }),
                    limit_remaining: 59,
                    duration_until_reset: Some(Duration { seconds: 42, nanos: 500 }),
                },
                DescriptorStatus {
                    code: Code::OverLimit as i32,
                    current_limit: Some(RateLimit { name: String::new(), requests_per_unit: 300, unit: Unit::Week as i32 }),
                    limit_remaining: 0,
                    duration_until_reset: Some(Duration { seconds: 604_799, nanos: 0 }),
                },
                DescriptorStatus { code: Code::Ok as i32, current_limit: None, limit_remaining: 0, duration_until_reset: None },
            ],
        };
        assert_eq!(hex(&resp.encode_to_vec()), GOLDEN_RESPONSE);
        assert_eq!(RateLimitResponse::decode(unhex(GOLDEN_RESPONSE).as_slice()).unwrap(), resp);
    }

    #[test]
    fn fields_the_double_ignores_are_skipped() {
        // RateLimitDescriptor.is_negative_hits (4, bool) is not declared: it decodes as absent.
        let mut bytes = unhex(GOLDEN_REQUEST);
        bytes.extend_from_slice(&[0x12, 0x02, 0x20, 0x01]); // one more descriptor: is_negative_hits = true
        let r = RateLimitRequest::decode(bytes.as_slice()).unwrap();
        assert_eq!(r.descriptors.len(), 4);
        assert_eq!(r.descriptors[3], RateLimitDescriptor::default());
    }
}
