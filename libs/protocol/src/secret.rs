//! A job secret as it travels and is stored: sealed. The clear value exists only where it was
//! given (the API's request, a client that seals itself) and in the executor that runs the
//! attempt, in memory; everywhere else — the jobs bucket, events, dispatches, the history —
//! holds this form, which only a holder of the named key can open.
//!
//! The text form is `sealed:v1:<key id>:<base64url nonce and ciphertext>`; sealing and opening
//! are `capstan-secrets`'. This module only recognises the form, so that a spec carrying a
//! secret in clear is refused wherever it arrives.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A sealed secret value.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(try_from = "String", into = "String")]
pub struct SealedSecret(String);

impl SealedSecret {
    /// What every sealed value starts with.
    pub const PREFIX: &'static str = "sealed:v1:";
    /// The longest key id.
    pub const MAX_KEY_ID: usize = 32;

    /// Recognises the sealed form: the prefix, a key id of letters, digits, `-` or `_`, and a
    /// non-empty base64url payload.
    pub fn parse(text: impl Into<String>) -> Result<Self, String> {
        let text = text.into();
        let valid = text
            .strip_prefix(Self::PREFIX)
            .and_then(|rest| rest.split_once(':'))
            .is_some_and(|(key, payload)| {
                valid_key_id(key)
                    && !payload.is_empty()
                    && payload
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_'))
            });
        if valid {
            Ok(Self(text))
        } else {
            Err(format!(
                "not a sealed value (`{}<key>:<payload>`): secrets are sealed by the API, or by a \
                 client holding a secret key, before they are sent",
                Self::PREFIX
            ))
        }
    }

    /// The id of the key it was sealed with.
    pub fn key_id(&self) -> &str {
        self.parts().0
    }

    /// The base64url nonce and ciphertext.
    pub fn payload(&self) -> &str {
        self.parts().1
    }

    fn parts(&self) -> (&str, &str) {
        self.0[Self::PREFIX.len()..]
            .split_once(':')
            .expect("checked at parse")
    }

    /// The text form.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Whether `id` may name a secret key: 1 to 32 letters, digits, `-` or `_`.
pub fn valid_key_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= SealedSecret::MAX_KEY_ID
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_'))
}

impl TryFrom<String> for SealedSecret {
    type Error = String;

    fn try_from(text: String) -> Result<Self, String> {
        Self::parse(text)
    }
}

impl From<SealedSecret> for String {
    fn from(sealed: SealedSecret) -> String {
        sealed.0
    }
}

impl fmt::Debug for SealedSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SealedSecret({})", self.key_id())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_sealed_form_is_recognised() {
        let sealed = SealedSecret::parse("sealed:v1:k1:AbC-_9").expect("sealed");
        assert_eq!(sealed.key_id(), "k1");
        assert_eq!(sealed.payload(), "AbC-_9");
        for clear in [
            "hunter2",
            "sealed:v1:",
            "sealed:v1:k1:",
            "sealed:v1::abc",
            "sealed:v2:k1:abc",
            "sealed:v1:k.1:abc",
            "sealed:v1:k1:a+b/c=",
        ] {
            assert!(SealedSecret::parse(clear).is_err(), "{clear}");
        }
    }

    #[test]
    fn a_sealed_value_debug_prints_its_key_only() {
        let sealed = SealedSecret::parse("sealed:v1:k1:QUJD").expect("sealed");
        assert_eq!(format!("{sealed:?}"), "SealedSecret(k1)");
    }
}
