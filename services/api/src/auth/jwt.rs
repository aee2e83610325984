//! Capstan's own access tokens: short-lived JWTs signed with HMAC-SHA256 under a key shared by
//! every API replica.
//!
//! One algorithm is pinned: a token whose header names any other (`none`, `RS256`, …) is
//! refused before its signature is looked at, so no key can be confused for another kind.
//! Each key has an id (`kid`) derived from the key itself, so replicas given the same key agree
//! on it without coordination; the previous keys stay valid for verification, which is how a
//! key rotates without logging anyone out.

use std::path::Path;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::secret::{Secret, hex, random_bytes};
use super::{Principal, Role};
use capstan_protocol::AuthMethod;

/// The one signing algorithm.
const ALGORITHM: Algorithm = Algorithm::HS256;

/// Clock skew tolerated on `exp` and `nbf`, in seconds.
const LEEWAY: u64 = 5;

/// [`LEEWAY`] in milliseconds.
pub const LEEWAY_MS: i64 = 5_000;

/// The shortest signing key accepted, in bytes.
pub const MIN_KEY_BYTES: usize = 32;

/// Why the signing keys could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// A key is too short to be safe.
    #[error("a JWT signing key must be at least {MIN_KEY_BYTES} bytes long ({0})")]
    TooShort(&'static str),
    /// The key file could not be read or written.
    #[error("cannot use the JWT key file {path}: {source}")]
    File {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
}

/// Why an access token was refused. The messages say what was wrong without echoing the token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    /// Not three base64 parts with a JSON header.
    #[error("the bearer token is not a well-formed JWT")]
    Malformed,
    /// The header names an algorithm other than the pinned one.
    #[error("the token's algorithm `{0}` is not accepted")]
    Algorithm(String),
    /// No key of this id.
    #[error("the token was signed with an unknown key")]
    UnknownKey,
    /// Past its expiry.
    #[error("the access token has expired")]
    Expired,
    /// Bad signature, issuer, audience, or claims.
    #[error("the access token is invalid: {0}")]
    Invalid(String),
}

/// The claims of an access token.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    /// Issuer.
    pub iss: String,
    /// Audience.
    pub aud: String,
    /// The user.
    pub sub: String,
    /// Expiry, seconds since the epoch.
    pub exp: u64,
    /// Issued at, seconds since the epoch.
    pub iat: u64,
    /// Not before, seconds since the epoch.
    pub nbf: u64,
    /// The token's id.
    pub jti: String,
    /// The role at issue time.
    pub role: String,
    /// The login session it belongs to.
    pub sid: String,
    /// Issued at, in milliseconds: compared with revocations, which are finer than seconds.
    pub iat_ms: i64,
}

struct Key {
    id: String,
    encoding: EncodingKey,
    decoding: DecodingKey,
}

/// The signing key and the keys still accepted.
pub struct Keys {
    keys: Vec<Key>,
    issuer: String,
    audience: String,
    ttl: Duration,
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keys")
            .field("ids", &self.keys.iter().map(|k| &k.id).collect::<Vec<_>>())
            .field("issuer", &self.issuer)
            .finish_non_exhaustive()
    }
}

/// A key's id: part of the SHA-256 of the key, so it names the key without revealing it.
fn key_id(secret: &[u8]) -> String {
    let mut hasher = Sha256::new();
    hasher.update(b"capstan-jwt-kid:");
    hasher.update(secret);
    hex(&hasher.finalize()[..8])
}

/// Where the signing key comes from.
pub struct KeySource<'a> {
    /// The key itself (`CAPSTAN_JWT_KEY`).
    pub key: Option<&'a Secret>,
    /// A file holding it (`CAPSTAN_JWT_KEY_FILE`).
    pub file: Option<&'a Path>,
    /// Older keys, still accepted (`CAPSTAN_JWT_PREVIOUS_KEYS`).
    pub previous: &'a [Secret],
    /// Where to keep a generated key when neither of the first two is given.
    pub generated: &'a Path,
}

impl Keys {
    /// The keys from `source`; with neither a key nor a key file, the key in `generated`,
    /// created there (readable by its owner only) on first use.
    pub fn load(
        source: KeySource<'_>,
        issuer: String,
        audience: String,
        ttl: Duration,
    ) -> Result<Self, KeyError> {
        let signing: Vec<u8> = match (source.key, source.file) {
            (Some(key), _) => key.expose().as_bytes().to_vec(),
            (None, Some(file)) => read_key_file(file)?,
            (None, None) => generated_key(source.generated)?,
        };
        if signing.len() < MIN_KEY_BYTES {
            return Err(KeyError::TooShort("the signing key"));
        }
        let mut keys = vec![Key::new(&signing)];
        for previous in source.previous {
            if previous.expose().len() < MIN_KEY_BYTES {
                return Err(KeyError::TooShort("a previous key"));
            }
            keys.push(Key::new(previous.expose().as_bytes()));
        }
        Ok(Self {
            keys,
            issuer,
            audience,
            ttl,
        })
    }

    /// The issuer tokens carry (`iss`).
    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    /// How long an access token lives.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// The id of the signing key.
    pub fn signing_key_id(&self) -> &str {
        &self.keys[0].id
    }

    /// A new access token for `user` with `role` in `session`.
    pub fn issue(&self, user: &str, role: Role, session: &str) -> String {
        let now = capstan_protocol::Timestamp::now().as_millis();
        let seconds = u64::try_from(now / 1000).unwrap_or(0);
        let claims = Claims {
            iss: self.issuer.clone(),
            aud: self.audience.clone(),
            sub: user.to_owned(),
            exp: seconds + self.ttl.as_secs(),
            iat: seconds,
            nbf: seconds,
            jti: ulid::Ulid::generate().to_string(),
            role: role.as_str().to_owned(),
            sid: session.to_owned(),
            iat_ms: now,
        };
        let key = &self.keys[0];
        let mut header = Header::new(ALGORITHM);
        header.kid = Some(key.id.clone());
        jsonwebtoken::encode(&header, &claims, &key.encoding)
            .expect("HMAC signing of serialisable claims cannot fail")
    }

    /// Verifies an access token: pinned algorithm, known key, signature, issuer, audience,
    /// expiry; returns its claims and the principal they name.
    pub fn verify(&self, token: &str) -> Result<(Claims, Principal), VerifyError> {
        let header = jsonwebtoken::decode_header(token).map_err(|error| {
            match error.kind() {
                // An algorithm name jsonwebtoken does not know (`none` among them).
                jsonwebtoken::errors::ErrorKind::Json(_) => {
                    VerifyError::Algorithm(header_alg(token).unwrap_or_else(|| "?".into()))
                }
                _ => VerifyError::Malformed,
            }
        })?;
        if header.alg != ALGORITHM {
            return Err(VerifyError::Algorithm(format!("{:?}", header.alg)));
        }
        let key = header
            .kid
            .as_deref()
            .and_then(|kid| self.keys.iter().find(|key| key.id == kid))
            .ok_or(VerifyError::UnknownKey)?;
        let mut validation = Validation::new(ALGORITHM);
        validation.set_issuer(&[&self.issuer]);
        validation.set_audience(&[&self.audience]);
        validation.set_required_spec_claims(&["exp", "iat", "nbf", "iss", "aud", "sub"]);
        validation.validate_nbf = true;
        validation.leeway = LEEWAY;
        let data =
            jsonwebtoken::decode::<Claims>(token, &key.decoding, &validation).map_err(|error| {
                match error.kind() {
                    jsonwebtoken::errors::ErrorKind::ExpiredSignature => VerifyError::Expired,
                    kind => VerifyError::Invalid(describe(kind)),
                }
            })?;
        let claims = data.claims;
        let role = claims
            .role
            .parse::<Role>()
            .map_err(|_| VerifyError::Invalid("unknown role".into()))?;
        let principal = Principal {
            name: claims.sub.clone(),
            role,
            via: AuthMethod::Password,
            token: None,
            session: Some(claims.sid.clone()),
        };
        Ok((claims, principal))
    }
}

impl Key {
    fn new(secret: &[u8]) -> Self {
        Self {
            id: key_id(secret),
            encoding: EncodingKey::from_secret(secret),
            decoding: DecodingKey::from_secret(secret),
        }
    }
}

/// The `alg` a header names, read leniently (for the message about a refused algorithm).
fn header_alg(token: &str) -> Option<String> {
    let header = token.split('.').next()?;
    let bytes = URL_SAFE_NO_PAD.decode(header.trim_end_matches('=')).ok()?;
    let value: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    let alg = value.get("alg")?.as_str()?;
    Some(alg.chars().take(16).collect())
}

/// What a validation failure was, in words, without the token.
pub(crate) fn describe(kind: &jsonwebtoken::errors::ErrorKind) -> String {
    use jsonwebtoken::errors::ErrorKind as K;
    match kind {
        K::InvalidSignature => "bad signature".into(),
        K::InvalidIssuer => "wrong issuer".into(),
        K::InvalidAudience => "wrong audience".into(),
        K::ImmatureSignature => "not valid yet (nbf)".into(),
        K::ExpiredSignature => "expired".into(),
        K::MissingRequiredClaim(claim) => format!("missing claim `{claim}`"),
        K::InvalidAlgorithm | K::InvalidAlgorithmName => "algorithm not accepted".into(),
        K::InvalidClaimFormat(claim) => format!("claim `{claim}` has the wrong type"),
        K::InvalidToken | K::Base64(_) | K::Json(_) | K::Utf8(_) => "malformed".into(),
        _ => "rejected".into(),
    }
}

fn read_key_file(path: &Path) -> Result<Vec<u8>, KeyError> {
    std::fs::read_to_string(path)
        .map(|text| text.trim().as_bytes().to_vec())
        .map_err(|source| KeyError::File {
            path: path.display().to_string(),
            source,
        })
}

/// The key kept in `path`, generated there on first use.
fn generated_key(path: &Path) -> Result<Vec<u8>, KeyError> {
    if let Ok(text) = std::fs::read_to_string(path) {
        return Ok(text.trim().as_bytes().to_vec());
    }
    let failed = |source| KeyError::File {
        path: path.display().to_string(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(failed)?;
    }
    let key = URL_SAFE_NO_PAD.encode(random_bytes(48));
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    // Created exclusively: of two replicas starting together, one writes and both read it.
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
    {
        Ok(mut file) => {
            file.write_all(key.as_bytes()).map_err(failed)?;
            tracing::warn!(
                path = %path.display(),
                "no CAPSTAN_JWT_KEY or CAPSTAN_JWT_KEY_FILE: generated a signing key in the \
                 data directory; API replicas on other hosts must be given the same key"
            );
            Ok(key.into_bytes())
        }
        Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => read_key_file(path),
        Err(error) => Err(failed(error)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(key: &str, previous: &[&str]) -> Keys {
        let key = Secret::new(key);
        let previous: Vec<Secret> = previous.iter().map(|p| Secret::new(*p)).collect();
        Keys::load(
            KeySource {
                key: Some(&key),
                file: None,
                previous: &previous,
                generated: Path::new("/nonexistent"),
            },
            "capstan".into(),
            "capstan-api".into(),
            Duration::from_secs(900),
        )
        .expect("valid keys")
    }

    const KEY_A: &str = "an-example-signing-key-of-enough-length-A";
    const KEY_B: &str = "an-example-signing-key-of-enough-length-B";

    fn forge(header: serde_json::Value, claims: serde_json::Value, signature: &str) -> String {
        format!(
            "{}.{}.{signature}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        )
    }

    fn claims_now() -> serde_json::Value {
        let now = capstan_protocol::Timestamp::now().as_millis() / 1000;
        serde_json::json!({
            "iss": "capstan", "aud": "capstan-api", "sub": "mallory", "exp": now + 600,
            "iat": now, "nbf": now, "jti": "x", "role": "admin", "sid": "s", "iat_ms": now * 1000,
        })
    }

    #[test]
    fn a_token_verifies_with_its_key_and_names_its_user_role_and_session() {
        let keys = keys(KEY_A, &[]);
        let token = keys.issue("alice", Role::Operator, "session-1");
        let (claims, principal) = keys.verify(&token).expect("valid");
        assert_eq!(principal.name, "alice");
        assert_eq!(principal.role, Role::Operator);
        assert_eq!(principal.session.as_deref(), Some("session-1"));
        assert_eq!(claims.exp - claims.iat, 900);
    }

    #[test]
    fn a_rotated_key_still_verifies_tokens_of_the_previous_one_and_a_foreign_key_does_not() {
        let old = keys(KEY_A, &[]);
        let token = old.issue("alice", Role::Admin, "s");
        let rotated = keys(KEY_B, &[KEY_A]);
        assert!(rotated.verify(&token).is_ok());
        assert_ne!(rotated.signing_key_id(), old.signing_key_id());
        let other = keys(KEY_B, &[]);
        assert_eq!(other.verify(&token).err(), Some(VerifyError::UnknownKey));
    }

    #[test]
    fn alg_none_and_other_algorithms_are_refused() {
        let keys = keys(KEY_A, &[]);
        let none = forge(
            serde_json::json!({"alg": "none", "typ": "JWT"}),
            claims_now(),
            "",
        );
        assert!(matches!(keys.verify(&none), Err(VerifyError::Algorithm(alg)) if alg == "none"));
        // Key confusion: a token claiming RS256, "signed" with the HMAC key as if it were a
        // public key, never reaches a verifier.
        let rs = forge(
            serde_json::json!({"alg": "RS256", "kid": keys.signing_key_id()}),
            claims_now(),
            "c2lnbmF0dXJl",
        );
        assert!(matches!(keys.verify(&rs), Err(VerifyError::Algorithm(_))));
    }

    #[test]
    fn a_token_with_a_bad_signature_audience_or_expiry_is_refused() {
        let keys = keys(KEY_A, &[]);
        let token = keys.issue("alice", Role::Admin, "s");
        let mut tampered = token.clone();
        tampered.pop();
        tampered.push(if token.ends_with('A') { 'B' } else { 'A' });
        assert!(keys.verify(&tampered).is_err());

        let sign = |claims: serde_json::Value| {
            let mut header = Header::new(ALGORITHM);
            header.kid = Some(keys.signing_key_id().to_owned());
            jsonwebtoken::encode(
                &header,
                &claims,
                &EncodingKey::from_secret(KEY_A.as_bytes()),
            )
            .expect("signs")
        };
        let mut wrong_audience = claims_now();
        wrong_audience["aud"] = "someone-else".into();
        assert_eq!(
            keys.verify(&sign(wrong_audience)).err(),
            Some(VerifyError::Invalid("wrong audience".into()))
        );
        let mut expired = claims_now();
        expired["exp"] = (capstan_protocol::Timestamp::now().as_millis() / 1000 - 60).into();
        assert_eq!(
            keys.verify(&sign(expired)).err(),
            Some(VerifyError::Expired)
        );
        // A claim of the wrong type is not taken as absent.
        let mut odd_nbf = claims_now();
        odd_nbf["nbf"] = "99999999999".into();
        assert!(keys.verify(&sign(odd_nbf)).is_err());
        assert_eq!(keys.verify("not-a-jwt").err(), Some(VerifyError::Malformed));
    }

    #[test]
    fn short_keys_are_refused() {
        let short = Secret::new("short");
        let error = Keys::load(
            KeySource {
                key: Some(&short),
                file: None,
                previous: &[],
                generated: Path::new("/nonexistent"),
            },
            "capstan".into(),
            "capstan-api".into(),
            Duration::from_secs(60),
        )
        .expect_err("too short");
        assert!(matches!(error, KeyError::TooShort(_)));
    }

    #[test]
    fn a_generated_key_is_kept_private_and_reused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("jwt.key");
        let load = || {
            Keys::load(
                KeySource {
                    key: None,
                    file: None,
                    previous: &[],
                    generated: &path,
                },
                "capstan".into(),
                "capstan-api".into(),
                Duration::from_secs(60),
            )
            .expect("generated")
        };
        let first = load();
        let mode = std::fs::metadata(&path)
            .expect("written")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(load().signing_key_id(), first.signing_key_id());
    }
}
