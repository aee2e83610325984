//! Opaque secrets: refresh tokens and API tokens are 256 random bits with a prefix saying what
//! they are, kept only as their SHA-256 digest; [`Secret`] holds a configured secret (a key, a
//! password) so that no `Debug` or log line ever prints it.

use std::fmt;
use std::str::FromStr;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use sha2::{Digest, Sha256};

/// The prefix of an API token.
pub const API_TOKEN_PREFIX: &str = "cst_";
/// The prefix of a refresh token.
pub const REFRESH_TOKEN_PREFIX: &str = "csr_";

/// `bytes` random bytes from the operating system.
pub fn random_bytes(bytes: usize) -> Vec<u8> {
    let mut buffer = vec![0u8; bytes];
    getrandom::fill(&mut buffer).expect("the operating system provides randomness");
    buffer
}

/// A new opaque token: `prefix` then 256 random bits in URL-safe base64.
pub fn new_token(prefix: &str) -> String {
    format!("{prefix}{}", URL_SAFE_NO_PAD.encode(random_bytes(32)))
}

/// A password of 24 random URL-safe characters (144 bits), for the first administrator when
/// none is configured.
pub fn new_password() -> String {
    URL_SAFE_NO_PAD.encode(random_bytes(18))
}

/// The SHA-256 digest of a token, in hex: what the database keeps.
pub fn digest(token: &str) -> String {
    hex(&Sha256::digest(token.as_bytes()))
}

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let mut text = String::with_capacity(bytes.len() * 2);
    for byte in bytes {
        let _ = write!(text, "{byte:02x}");
    }
    text
}

/// A secret from the configuration. `Debug` and `Display` print `***`; read it with
/// [`Secret::expose`].
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps `value`.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret itself.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl FromStr for Secret {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Self(s.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_distinct_prefixed_and_digested_to_hex() {
        let a = new_token(API_TOKEN_PREFIX);
        let b = new_token(API_TOKEN_PREFIX);
        assert_ne!(a, b);
        assert!(a.starts_with("cst_") && a.len() == 4 + 43);
        let d = digest(&a);
        assert_eq!(d.len(), 64);
        assert!(d.bytes().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(d, digest(&b));
    }

    #[test]
    fn secrets_never_print_themselves() {
        let secret: Secret = "hunter2-hunter2".parse().expect("infallible");
        assert_eq!(format!("{secret:?} {secret}"), "*** ***");
        assert_eq!(secret.expose(), "hunter2-hunter2");
    }
}
