//! The request body: a JSON object whose top-level `model` is a string.

use serde::de::{Deserializer, IgnoredAny};

// Unknown keys are skipped by serde's derive (validated, never built into values).
use serde::Deserialize;

/// Longest model name we accept; real ones are short, and names become metric labels and keys.
pub const MAX_MODEL_LEN: usize = 256;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BodyError {
    NotJson(String),
    NotObject,
    MissingModel,
    ModelNotString,
    DuplicateModel,
    ModelTooLong,
}

impl BodyError {
    pub fn message(&self) -> String {
        match self {
            BodyError::NotJson(e) => format!("The request body is not valid JSON: {e}"),
            BodyError::NotObject => "The request body must be a JSON object.".into(),
            BodyError::MissingModel => "You must provide a model parameter.".into(),
            BodyError::ModelNotString => "The model parameter must be a string.".into(),
            BodyError::DuplicateModel => "The request body has more than one model key.".into(),
            BodyError::ModelTooLong => format!("The model parameter is longer than {MAX_MODEL_LEN} bytes."),
        }
    }

    /// The OpenAI-style error code.
    pub fn code(&self) -> &'static str {
        match self {
            BodyError::NotJson(_) | BodyError::NotObject => "invalid_json",
            BodyError::MissingModel => "missing_model",
            BodyError::ModelNotString | BodyError::DuplicateModel | BodyError::ModelTooLong => "invalid_model",
        }
    }
}

#[derive(Deserialize)]
struct OnlyModel {
    #[serde(default, deserialize_with = "present")]
    model: Option<serde_json::Value>,
}

/// `Some(Null)` for `"model": null`, `None` when the key is absent.
fn present<'de, D: Deserializer<'de>>(d: D) -> Result<Option<serde_json::Value>, D::Error> {
    serde_json::Value::deserialize(d).map(Some)
}

/// Extracts the model. Duplicate `model` keys are refused: which one a provider would honour is
/// not defined, and routing on one while the provider bills the other is a bypass.
pub fn extract_model(body: &[u8]) -> Result<String, BodyError> {
    let first = body.iter().find(|b| !b.is_ascii_whitespace());
    if first.is_some_and(|b| *b != b'{') {
        return match serde_json::from_slice::<IgnoredAny>(body) {
            Ok(_) => Err(BodyError::NotObject),
            Err(e) => Err(BodyError::NotJson(e.to_string())),
        };
    }
    let parsed: OnlyModel = serde_json::from_slice(body).map_err(|e| {
        let msg = e.to_string();
        if msg.starts_with("duplicate field `model`") {
            BodyError::DuplicateModel
        } else {
            BodyError::NotJson(msg)
        }
    })?;
    match parsed.model {
        None | Some(serde_json::Value::Null) => Err(BodyError::MissingModel),
        Some(serde_json::Value::String(s)) if s.is_empty() => Err(BodyError::MissingModel),
        Some(serde_json::Value::String(s)) if s.len() > MAX_MODEL_LEN => Err(BodyError::ModelTooLong),
        Some(serde_json::Value::String(s)) => Ok(s),
        Some(_) => Err(BodyError::ModelNotString),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extracts_top_level_model_only() {
        let b = br#"{"messages":[{"role":"user","content":"hi","model":"inner"}],"model":"gpt-4o","stream":true}"#;
        assert_eq!(extract_model(b), Ok("gpt-4o".into()));
        assert_eq!(extract_model(br#"  {"model":"a\u00e9"}"#), Ok("aé".into()));
    }

    #[test]
    fn refusals() {
        assert!(matches!(extract_model(b"not json"), Err(BodyError::NotJson(_))));
        assert!(matches!(extract_model(b""), Err(BodyError::NotJson(_))));
        assert!(matches!(extract_model(br#"{"model":"x""#), Err(BodyError::NotJson(_))));
        assert!(matches!(extract_model(b"{\"model\":\"\xff\"}"), Err(BodyError::NotJson(_))));
        assert_eq!(extract_model(b"[1,2]"), Err(BodyError::NotObject));
        assert_eq!(extract_model(b"\"s\""), Err(BodyError::NotObject));
        assert_eq!(extract_model(b"{}"), Err(BodyError::MissingModel));
        assert_eq!(extract_model(br#"{"model":null}"#), Err(BodyError::MissingModel));
        assert_eq!(extract_model(br#"{"model":""}"#), Err(BodyError::MissingModel));
        assert_eq!(extract_model(br#"{"model":4}"#), Err(BodyError::ModelNotString));
        assert_eq!(extract_model(br#"{"model":["a"]}"#), Err(BodyError::ModelNotString));
        assert_eq!(extract_model(br#"{"model":"a","model":"b"}"#), Err(BodyError::DuplicateModel));
        let long = format!("{{\"model\":\"{}\"}}", "x".repeat(MAX_MODEL_LEN + 1));
        assert_eq!(extract_model(long.as_bytes()), Err(BodyError::ModelTooLong));
        let deep = format!("{{\"model\":\"m\",\"x\":{}{}}}", "[".repeat(10_000), "]".repeat(10_000));
        // Skipped values are scanned without recursion: deep nesting elsewhere neither crashes nor refuses.
        assert_eq!(extract_model(deep.as_bytes()), Ok("m".into()));
        let deep_model = format!("{{\"model\":{}{}}}", "[".repeat(10_000), "]".repeat(10_000));
        assert!(matches!(extract_model(deep_model.as_bytes()), Err(BodyError::NotJson(_))), "recursion limit where a value is built");
    }
}
