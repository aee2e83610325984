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

use crate::timestamp::Timestamp;

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

/// What a stored secret's name may be.
pub const SECRET_NAME_RULE: &str = "a stored secret's name is 1 to 64 letters, digits, `-` or `_`";

/// Whether `name` may name a stored secret (it is also its key in the secrets bucket).
pub fn valid_secret_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_'))
}

/// Who may use a stored secret: in [`StoredSecret::usable_by`], every submitter.
pub const EVERY_SUBMITTER: &str = "*";

/// A secret an administrator stored, by name, in the secrets bucket. Its value is sealed to its
/// name (not to a job) and never leaves the bucket in clear: the executor running an attempt
/// whose spec names it in `secret_refs` opens it, if the job's submitter is one it may serve.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct StoredSecret {
    /// Its name, and key in the bucket.
    pub name: String,
    /// The value, sealed.
    pub sealed: SealedSecret,
    /// The submitters whose jobs may use it, as jobs record them (`submitted_by`: a user's
    /// name, `oidc:<subject>`, `nats:<client>`), or `*` for every one.
    pub usable_by: Vec<String>,
    /// What it is for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// When it was first stored.
    pub created_at: Timestamp,
    /// When its value or its users last changed.
    pub updated_at: Timestamp,
    /// Who stored it last.
    pub updated_by: String,
}

impl StoredSecret {
    /// Whether a job submitted by `submitter` (`None`: unattributed) may use it.
    pub fn usable_by(&self, submitter: Option<&str>) -> bool {
        self.usable_by
            .iter()
            .any(|who| who == EVERY_SUBMITTER || Some(who.as_str()) == submitter)
    }
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
    fn a_stored_secret_serves_the_submitters_it_names_or_everyone_with_a_star() {
        let mut stored = StoredSecret {
            name: "db".into(),
            sealed: SealedSecret::parse("sealed:v1:k1:QUJD").expect("sealed"),
            usable_by: vec!["alice".into(), "nats:ci".into()],
            description: None,
            created_at: Timestamp::from_millis(1),
            updated_at: Timestamp::from_millis(1),
            updated_by: "admin".into(),
        };
        assert!(stored.usable_by(Some("alice")));
        assert!(stored.usable_by(Some("nats:ci")));
        assert!(!stored.usable_by(Some("bob")));
        assert!(!stored.usable_by(None));
        stored.usable_by = vec![EVERY_SUBMITTER.into()];
        assert!(stored.usable_by(None));
        assert!(valid_secret_name("db-main_2"));
        assert!(!valid_secret_name("db.main"));
        assert!(!valid_secret_name(""));
        assert!(!valid_secret_name(&"x".repeat(65)));
    }

    #[test]
    fn a_sealed_value_debug_prints_its_key_only() {
        let sealed = SealedSecret::parse("sealed:v1:k1:QUJD").expect("sealed");
        assert_eq!(format!("{sealed:?}"), "SealedSecret(k1)");
    }
}
