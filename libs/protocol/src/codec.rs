//! Encoding and decoding of message bodies.
//!
//! Services send MessagePack with named fields. Anything a person or a foreign client
//! publishes may be JSON instead: [`Encoding::detect`] honours a `Content-Type` header and
//! otherwise sniffs the first byte, so `nats pub subject '{"command": "true"}'` (no headers)
//! just works. Decode errors name the field they are about.

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::event::RejectionCode;
use crate::spec::{JobSpec, JobSpecWire};

/// A body encoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Encoding {
    /// UTF-8 JSON.
    Json,
    /// MessagePack, maps with field names.
    MsgPack,
}

impl Encoding {
    /// `Content-Type` value of JSON bodies.
    pub const JSON_CONTENT_TYPE: &'static str = "application/json";
    /// `Content-Type` value of MessagePack bodies.
    pub const MSGPACK_CONTENT_TYPE: &'static str = "application/msgpack";

    /// The encoding of a body: from its `Content-Type` when present and known, else from its
    /// first byte. Every Capstan message is a map, and a MessagePack map or array starts with
    /// a marker byte (0x80–0x9f, 0xdc–0xdf) that no JSON text starts with; anything else is
    /// read as JSON, whose errors describe stray text best.
    pub fn detect(content_type: Option<&str>, payload: &[u8]) -> Encoding {
        if let Some(content_type) = content_type {
            let essence = content_type
                .split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase();
            match essence.as_str() {
                "application/json" | "text/json" => return Encoding::Json,
                "application/msgpack" | "application/x-msgpack" | "application/vnd.msgpack" => {
                    return Encoding::MsgPack;
                }
                _ => {}
            }
        }
        match payload.first() {
            Some(0x80..=0x9f | 0xdc..=0xdf) => Encoding::MsgPack,
            _ => Encoding::Json,
        }
    }

    /// The `Content-Type` value.
    pub fn content_type(self) -> &'static str {
        match self {
            Encoding::Json => Self::JSON_CONTENT_TYPE,
            Encoding::MsgPack => Self::MSGPACK_CONTENT_TYPE,
        }
    }
}

/// A body that could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", self.describe())]
pub struct DecodeError {
    /// The encoding it was read as.
    pub encoding: Encoding,
    /// `Malformed` when the bytes are not the encoding at all, `Invalid` when a field is wrong.
    pub code: RejectionCode,
    /// The field at fault, as a path (`timeout`, `env.FOO`, `argv[1]`).
    pub field: Option<String>,
    /// What is wrong.
    pub reason: String,
}

impl DecodeError {
    fn describe(&self) -> String {
        let encoding = match self.encoding {
            Encoding::Json => "JSON",
            Encoding::MsgPack => "MessagePack",
        };
        match (&self.code, &self.field) {
            (RejectionCode::Malformed, _) => format!("malformed {encoding}: {}", self.reason),
            (_, Some(field)) => format!("{field}: {}", self.reason),
            (_, None) => self.reason.clone(),
        }
    }
}

/// Decodes a body of the given encoding.
pub fn decode<T: DeserializeOwned>(encoding: Encoding, payload: &[u8]) -> Result<T, DecodeError> {
    match encoding {
        Encoding::Json => {
            let mut deserializer = serde_json::Deserializer::from_slice(payload);
            let value = serde_path_to_error::deserialize(&mut deserializer)
                .map_err(|e| json_error(e.path().to_string(), e.into_inner()))?;
            deserializer
                .end()
                .map_err(|e| json_error(".".to_owned(), e))?;
            Ok(value)
        }
        Encoding::MsgPack => {
            let mut deserializer = rmp_serde::Deserializer::new(std::io::Cursor::new(payload));
            let value = serde_path_to_error::deserialize(&mut deserializer)
                .map_err(|e| msgpack_error(e.path().to_string(), e.into_inner()))?;
            let consumed = usize::try_from(deserializer.position()).unwrap_or(usize::MAX);
            if consumed != payload.len() {
                return Err(DecodeError {
                    encoding,
                    code: RejectionCode::Malformed,
                    field: None,
                    reason: format!(
                        "{} trailing bytes after the message",
                        payload.len().saturating_sub(consumed)
                    ),
                });
            }
            Ok(value)
        }
    }
}

/// Decodes a body whose encoding is detected from `content_type` and the payload.
pub fn decode_detected<T: DeserializeOwned>(
    content_type: Option<&str>,
    payload: &[u8],
) -> Result<(T, Encoding), DecodeError> {
    let encoding = Encoding::detect(content_type, payload);
    decode(encoding, payload).map(|value| (value, encoding))
}

/// Decodes and validates a job spec: type errors and spec errors both name their field.
pub fn decode_spec(encoding: Encoding, payload: &[u8]) -> Result<JobSpec, DecodeError> {
    let wire: JobSpecWire = decode(encoding, payload)?;
    JobSpec::try_from(wire).map_err(|e| DecodeError {
        encoding,
        code: RejectionCode::Invalid,
        field: Some(e.field),
        reason: e.reason,
    })
}

/// The top-level field holding most of a body's bytes, to name in a "too large" rejection.
/// `None` when the body is not a map.
pub fn largest_field(encoding: Encoding, payload: &[u8]) -> Option<(String, usize)> {
    let value: serde_json::Value = decode(encoding, payload).ok()?;
    let map = value.as_object()?;
    map.iter()
        .map(|(key, value)| {
            let size = match value {
                serde_json::Value::String(text) => text.len(),
                other => other.to_string().len(),
            };
            (key.clone(), size)
        })
        .max_by_key(|(_, size)| *size)
}

/// Encodes a value. MessagePack uses named fields, so either side can add optional fields.
pub fn encode<T: Serialize>(encoding: Encoding, value: &T) -> Result<Vec<u8>, EncodeError> {
    match encoding {
        Encoding::Json => serde_json::to_vec(value).map_err(|e| EncodeError(e.to_string())),
        Encoding::MsgPack => rmp_serde::to_vec_named(value).map_err(|e| EncodeError(e.to_string())),
    }
}

/// Encodes a value as MessagePack, the wire format between services.
pub fn to_msgpack<T: Serialize>(value: &T) -> Result<Vec<u8>, EncodeError> {
    encode(Encoding::MsgPack, value)
}

/// A value that could not be encoded (a bug: every protocol type encodes).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot encode message: {0}")]
pub struct EncodeError(String);

/// Quoted text longer than this in an error message is replaced by its size.
const QUOTED_KEPT: usize = 16;

/// `text` with the content of every quoted span (`"…"` or `` `…` ``) longer than a few bytes
/// replaced by its size. Decoders quote the input they choke on, and a rejected message's
/// content may be large or secret: rejections and logs say where and why, never what.
pub fn redact(text: &str) -> String {
    let mut out = String::with_capacity(text.len().min(512));
    let mut rest = text;
    while let Some(open) = rest.find(['"', '`']) {
        let quote = rest[open..].chars().next().unwrap_or('"');
        out.push_str(&rest[..=open]);
        let after = &rest[open + 1..];
        match after.find(quote) {
            Some(close) => {
                let inner = &after[..close];
                if inner.len() > QUOTED_KEPT {
                    out.push_str(&format!("<{} bytes>", inner.len()));
                } else {
                    out.push_str(inner);
                }
                out.push(quote);
                rest = &after[close + 1..];
            }
            None => {
                // An unclosed quote: everything after it is input.
                out.push_str(&format!("<{} bytes>", after.len()));
                rest = "";
            }
        }
    }
    out.push_str(rest);
    out
}

fn field_of(path: String, message: &str) -> Option<String> {
    let field = if path != "." && !path.is_empty() {
        path
    } else {
        // At the root, an unknown field is still named in the message.
        let rest = message.strip_prefix("unknown field `")?;
        rest.split('`').next().unwrap_or(rest).to_owned()
    };
    // A path is made of the input's keys; an absurdly long one is cut.
    Some(if field.len() > 128 {
        let cut = (0..=128)
            .rev()
            .find(|i| field.is_char_boundary(*i))
            .unwrap_or(0);
        format!("{}…", &field[..cut])
    } else {
        field
    })
}

fn json_error(path: String, error: serde_json::Error) -> DecodeError {
    use serde_json::error::Category;
    let code = match error.classify() {
        Category::Data => RejectionCode::Invalid,
        Category::Syntax | Category::Eof | Category::Io => RejectionCode::Malformed,
    };
    // serde_json appends "at line L column C", which helps with malformed documents and only
    // clutters a field error.
    let mut reason = error.to_string();
    if code == RejectionCode::Invalid
        && let Some(at) = reason.find(" at line ")
    {
        reason.truncate(at);
    }
    let field = if code == RejectionCode::Invalid {
        field_of(path, &reason)
    } else {
        None
    };
    DecodeError {
        encoding: Encoding::Json,
        code,
        field,
        reason: redact(&reason),
    }
}

fn msgpack_error(path: String, error: rmp_serde::decode::Error) -> DecodeError {
    use rmp_serde::decode::Error as E;
    let code = match &error {
        E::Syntax(_) | E::TypeMismatch(_) | E::OutOfRange => RejectionCode::Invalid,
        _ => RejectionCode::Malformed,
    };
    let reason = error.to_string();
    let field = if code == RejectionCode::Invalid {
        field_of(path, &reason)
    } else {
        None
    };
    DecodeError {
        encoding: Encoding::MsgPack,
        code,
        field,
        reason: redact(&reason),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::RejectionCode;

    #[test]
    fn decode_errors_never_repeat_long_input() {
        let secret = "s3cr3t-".repeat(20);
        let json = format!(r#"{{"command": "true", "timeout": "{secret}"}}"#);
        let error = decode_spec(Encoding::Json, json.as_bytes()).expect_err("rejected");
        assert_eq!(error.field.as_deref(), Some("timeout"));
        assert!(!error.reason.contains("s3cr3t"), "{}", error.reason);
        assert!(error.reason.contains("bytes>"), "{}", error.reason);
        let packed = rmp_serde::to_vec_named(&serde_json::json!({"command": 5, "name": secret}))
            .expect("encodes");
        let error = decode_spec(Encoding::MsgPack, &packed).expect_err("rejected");
        assert!(!error.to_string().contains("s3cr3t"), "{error}");
        assert_eq!(redact("invalid value `a.b`"), "invalid value `a.b`");
        assert_eq!(
            redact("open \"abcdefghijklmnopqrstuvwxyz"),
            "open \"<26 bytes>"
        );
    }
    use crate::spec::Program;

    fn spec_error(payload: &[u8]) -> DecodeError {
        let encoding = Encoding::detect(None, payload);
        decode_spec(encoding, payload).expect_err("must be rejected")
    }

    #[test]
    fn json_is_detected_without_headers_as_the_nats_cli_sends_it() {
        assert_eq!(Encoding::detect(None, b"  {\"a\":1}"), Encoding::Json);
        let packed = to_msgpack(&JobSpec::shell("true")).expect("encodes");
        assert_eq!(Encoding::detect(None, &packed), Encoding::MsgPack);
        assert_eq!(
            Encoding::detect(Some("application/json; charset=utf-8"), &packed),
            Encoding::Json
        );
    }

    #[test]
    fn the_same_spec_decodes_from_json_and_msgpack() {
        let json = br#"{"command": "echo hello", "labels": {"zone": "eu"}}"#;
        let from_json = decode_spec(Encoding::Json, json).expect("valid");
        let packed = to_msgpack(&from_json).expect("encodes");
        let from_msgpack = decode_spec(Encoding::MsgPack, &packed).expect("valid");
        assert_eq!(from_json, from_msgpack);
        assert_eq!(from_json.program, Program::Shell("echo hello".into()));
    }

    #[test]
    fn unknown_fields_are_rejected_naming_the_field() {
        let err = spec_error(br#"{"command": "true", "comand": "x"}"#);
        assert_eq!(err.code, RejectionCode::Invalid);
        assert_eq!(err.field.as_deref(), Some("comand"));
    }

    #[test]
    fn wrong_types_are_rejected_naming_the_field() {
        let err = spec_error(br#"{"command": "true", "timeout": "ten"}"#);
        assert_eq!(err.field.as_deref(), Some("timeout"));
        let err = spec_error(br#"{"argv": ["a", 3]}"#);
        assert_eq!(err.field.as_deref(), Some("argv[1]"));
        let err = spec_error(br#"{"command": "true", "env": {"A": 1}}"#);
        assert_eq!(err.field.as_deref(), Some("env.A"));
    }

    #[test]
    fn negative_timeouts_are_rejected_in_either_encoding() {
        let err = spec_error(br#"{"command": "true", "timeout": -5}"#);
        assert_eq!(
            (err.code, err.field.as_deref()),
            (RejectionCode::Invalid, Some("timeout"))
        );
        let wire = JobSpecWire {
            command: Some("true".into()),
            timeout: Some(-5.0),
            ..JobSpecWire::default()
        };
        let packed = to_msgpack(&wire).expect("encodes");
        let err = spec_error(&packed);
        assert_eq!(err.field.as_deref(), Some("timeout"));
    }

    #[test]
    fn malformed_and_truncated_bodies_are_malformed_not_invalid() {
        for payload in [
            &b"{\"command\": "[..],
            b"not json at all",
            b"",
            b"{} trailing",
        ] {
            let err = spec_error(payload);
            assert_eq!(err.code, RejectionCode::Malformed, "{payload:?}: {err}");
        }
        let packed = to_msgpack(&JobSpec::shell("echo hello")).expect("encodes");
        let err = spec_error(&packed[..packed.len() - 3]);
        assert_eq!(err.code, RejectionCode::Malformed, "{err}");
    }

    #[test]
    fn a_msgpack_value_of_the_wrong_shape_is_invalid() {
        let packed = to_msgpack(&vec![1, 2, 3]).expect("encodes");
        let err = spec_error(&packed);
        assert_eq!(err.code, RejectionCode::Invalid, "{err}");
    }

    #[test]
    fn trailing_bytes_after_msgpack_are_rejected() {
        let mut packed = to_msgpack(&JobSpec::shell("true")).expect("encodes");
        packed.push(0xc0);
        let err = spec_error(&packed);
        assert_eq!(err.code, RejectionCode::Malformed, "{err}");
    }

    #[test]
    fn the_largest_field_of_a_body_is_named() {
        let mut spec = JobSpec::shell("cat");
        spec.stdin = Some("x".repeat(1000));
        let packed = to_msgpack(&spec).expect("encodes");
        assert_eq!(
            largest_field(Encoding::MsgPack, &packed),
            Some(("stdin".to_owned(), 1000))
        );
        assert_eq!(largest_field(Encoding::Json, b"[1]"), None);
    }

    #[test]
    fn error_messages_lead_with_the_field() {
        let err = spec_error(br#"{"command": "true", "timeout": -1}"#);
        assert!(err.to_string().starts_with("timeout: "), "{err}");
    }
}
