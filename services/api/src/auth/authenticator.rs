//! From a request's bearer credential to a [`Principal`]: an API token (`cst_…`, looked up by
//! its digest), a Capstan access token (a JWT of this API's issuer), or a token of the
//! configured OpenID Connect provider (a JWT of its issuer). Whatever the kind, revocations
//! known to this replica apply.
//!
//! API tokens are looked up in the database and the answer is cached for a few seconds; the
//! revocation view makes a revoked token fail at once anyway, and a changed owner (disabled,
//! demoted) drops the cached answer. Access tokens are verified once and remembered until they
//! expire (a client sends the same one many times); revocations apply to them on every request.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use capstan_protocol::{AuthMethod, RevocationKey, Timestamp};
use capstan_store::History;
use capstan_store::identity;

use super::jwt::{self, Keys};
use super::oidc::{OidcError, Provider};
use super::revocations::Revocations;
use super::secret::{API_TOKEN_PREFIX, digest};
use super::{Principal, Role, TokenRef};

/// How long a looked-up API token is trusted without asking the database again.
const TOKEN_CACHE_TTL: Duration = Duration::from_secs(10);

/// Most API tokens cached at once.
const TOKEN_CACHE_MAX: usize = 10_000;

/// Why a request has no principal.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No `Authorization: Bearer …` header.
    #[error("this request needs a credential: `Authorization: Bearer <token>`")]
    Missing,
    /// A credential that is not valid (now).
    #[error("{0}")]
    Invalid(String),
    /// A valid credential that grants nothing.
    #[error("{0}")]
    NoRole(String),
    /// The credential could not be checked now.
    #[error("{0}")]
    Unavailable(String),
}

/// An access token already verified: what its claims said that matters per request.
#[derive(Clone)]
struct Verified {
    principal: Principal,
    session: RevocationKey,
    user: RevocationKey,
    issued_at: i64,
    /// Its expiry (with the leeway), in milliseconds.
    valid_until: i64,
}

impl Verified {
    /// True while the token has not expired (at `now`, in milliseconds).
    fn usable(&self, now: i64) -> bool {
        now < self.valid_until
    }
}

/// Most verified access tokens remembered at once.
const VERIFIED_MAX: usize = 10_000;

struct CachedToken {
    principal: Principal,
    expires_at: Option<i64>,
    cached: Instant,
    cached_ms: i64,
}

/// Checks credentials.
pub struct Authenticator {
    keys: Keys,
    oidc: Option<Provider>,
    revocations: Arc<Revocations>,
    history: History,
    tokens: Mutex<HashMap<String, CachedToken>>,
    /// Access tokens verified before, by their whole text: the same bytes carry the same
    /// signature, so a token seen again skips decoding and HMAC and costs one lookup; its
    /// expiry and the revocations are still checked on every request.
    verified: Mutex<HashMap<String, Verified>>,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator")
            .field("keys", &self.keys)
            .field("oidc", &self.oidc)
            .finish_non_exhaustive()
    }
}

/// The issuer a JWT claims, read without verifying it: only to pick the verifier.
fn claimed_issuer(token: &str) -> Option<String> {
    let payload = token.split('.').nth(1)?;
    let bytes = URL_SAFE_NO_PAD.decode(payload.trim_end_matches('=')).ok()?;
    #[derive(serde::Deserialize)]
    struct Issuer {
        iss: Option<String>,
    }
    serde_json::from_slice::<Issuer>(&bytes).ok()?.iss
}

/// The bearer token of `headers`, if any.
pub fn bearer(headers: &poem::http::HeaderMap) -> Option<&str> {
    let value = headers
        .get(poem::http::header::AUTHORIZATION)?
        .to_str()
        .ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then_some(token.trim())
        .filter(|t| !t.is_empty())
}

impl Authenticator {
    /// An authenticator with Capstan's `keys`, an optional provider, the shared revocation
    /// view, and the database holding API tokens.
    pub fn new(
        keys: Keys,
        oidc: Option<Provider>,
        revocations: Arc<Revocations>,
        history: History,
    ) -> Self {
        Self {
            keys,
            oidc,
            revocations,
            history,
            tokens: Mutex::new(HashMap::new()),
            verified: Mutex::new(HashMap::new()),
        }
    }

    /// Capstan's access-token keys.
    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    /// The revocation view.
    pub fn revocations(&self) -> &Revocations {
        &self.revocations
    }

    /// The principal of a request with these headers.
    pub async fn authenticate(
        &self,
        headers: &poem::http::HeaderMap,
    ) -> Result<Principal, AuthError> {
        let token = bearer(headers).ok_or(AuthError::Missing)?;
        if token.starts_with(API_TOKEN_PREFIX) {
            return self.api_token(token).await;
        }
        // The payload is peeked at only when a provider is configured: Capstan's own tokens
        // need no routing.
        let provider = self.oidc.as_ref().filter(|provider| {
            claimed_issuer(token).is_some_and(|issuer| issuer == provider.issuer())
        });
        match provider {
            Some(provider) => provider.verify(token).await.map_err(|error| match error {
                OidcError::NoRole(_) => AuthError::NoRole(error.to_string()),
                OidcError::Unavailable(_) | OidcError::Config(_) => {
                    AuthError::Unavailable(error.to_string())
                }
                OidcError::Invalid(_) => AuthError::Invalid(error.to_string()),
            }),
            None => self.access_token(token),
        }
    }

    fn access_token(&self, token: &str) -> Result<Principal, AuthError> {
        let now = Timestamp::now().as_millis();
        let known = self
            .verified
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(token)
            .filter(|verified| verified.usable(now))
            .cloned();
        let verified = match known {
            Some(verified) => verified,
            None => {
                let (claims, principal) = self
                    .keys
                    .verify(token)
                    .map_err(|e| AuthError::Invalid(e.to_string()))?;
                let verified = Verified {
                    principal,
                    session: RevocationKey::Session(claims.sid),
                    user: RevocationKey::User(claims.sub),
                    issued_at: claims.iat_ms,
                    valid_until: i64::try_from(claims.exp)
                        .unwrap_or(i64::MAX)
                        .saturating_mul(1000)
                        .saturating_add(jwt::LEEWAY_MS),
                };
                let mut cache = self
                    .verified
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                if cache.len() >= VERIFIED_MAX {
                    cache.retain(|_, v| v.usable(now));
                    if cache.len() >= VERIFIED_MAX {
                        cache.clear();
                    }
                }
                cache.insert(token.to_owned(), verified.clone());
                verified
            }
        };
        if self.revocations.revoked_at(&verified.session).is_some() {
            return Err(AuthError::Invalid("the session has ended".into()));
        }
        if self
            .revocations
            .revoked_since(&verified.user, verified.issued_at)
        {
            return Err(AuthError::Invalid(
                "the user changed since this token was issued: log in or refresh".into(),
            ));
        }
        Ok(verified.principal)
    }

    async fn api_token(&self, token: &str) -> Result<Principal, AuthError> {
        let hash = digest(token);
        let now = Timestamp::now().as_millis();
        if let Some(principal) = self.cached(&hash, now)? {
            return Ok(principal);
        }
        let found = identity::token_by_secret(self.history.identity(), &hash)
            .await
            .map_err(|_| AuthError::Unavailable("the token store is unavailable".into()))?;
        let Some((row, owner)) = found else {
            return Err(AuthError::Invalid("unknown API token".into()));
        };
        if row.revoked_at.is_some() {
            return Err(AuthError::Invalid("the API token was revoked".into()));
        }
        if row.expires_at.is_some_and(|at| at <= now) {
            return Err(AuthError::Invalid("the API token has expired".into()));
        }
        let Some(owner) = owner.filter(|owner| !owner.disabled) else {
            return Err(AuthError::Invalid(
                "the API token's owner is disabled or deleted".into(),
            ));
        };
        let (Ok(role), Ok(owner_role)) = (row.role.parse::<Role>(), owner.role.parse::<Role>())
        else {
            return Err(AuthError::Invalid(
                "the API token's role no longer exists".into(),
            ));
        };
        let principal = Principal {
            name: owner.name.clone(),
            role: role.at_most(owner_role),
            via: AuthMethod::Token,
            token: Some(TokenRef {
                id: row.id.clone(),
                name: row.name.clone(),
            }),
            session: None,
        };
        let mut tokens = self
            .tokens
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if tokens.len() >= TOKEN_CACHE_MAX {
            tokens.clear();
        }
        tokens.insert(
            hash,
            CachedToken {
                principal: principal.clone(),
                expires_at: row.expires_at,
                cached: Instant::now(),
                cached_ms: now,
            },
        );
        Ok(principal)
    }

    /// The cached principal of the token with digest `hash`, if still trustworthy; a revoked
    /// one fails here without the database.
    fn cached(&self, hash: &str, now: i64) -> Result<Option<Principal>, AuthError> {
        let mut tokens = self
            .tokens
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let Some(entry) = tokens.get(hash) else {
            return Ok(None);
        };
        let token = entry.principal.token.as_ref().map(|t| t.id.clone());
        if token.is_some_and(|id| {
            self.revocations
                .revoked_at(&RevocationKey::Token(id))
                .is_some()
        }) {
            tokens.remove(hash);
            return Err(AuthError::Invalid("the API token was revoked".into()));
        }
        let stale = entry.cached.elapsed() > TOKEN_CACHE_TTL
            || entry.expires_at.is_some_and(|at| at <= now)
            || self.revocations.revoked_since(
                &RevocationKey::User(entry.principal.name.clone()),
                entry.cached_ms,
            );
        if stale {
            tokens.remove(hash);
            return Ok(None);
        }
        Ok(Some(entry.principal.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bearer_scheme_is_case_insensitive_and_other_schemes_are_not_bearers() {
        let mut headers = poem::http::HeaderMap::new();
        headers.insert("authorization", "bearer abc".parse().expect("valid"));
        assert_eq!(bearer(&headers), Some("abc"));
        headers.insert(
            "authorization",
            "Basic YWxpY2U6cHc=".parse().expect("valid"),
        );
        assert_eq!(bearer(&headers), None);
        headers.insert("authorization", "Bearer ".parse().expect("valid"));
        assert_eq!(bearer(&headers), None);
    }

    #[test]
    fn a_remembered_access_token_is_refused_once_it_expires() {
        let verified = Verified {
            principal: Principal {
                name: "alice".into(),
                role: Role::Viewer,
                via: AuthMethod::Password,
                token: None,
                session: Some("s".into()),
            },
            session: RevocationKey::Session("s".into()),
            user: RevocationKey::User("alice".into()),
            issued_at: 0,
            valid_until: 10_000,
        };
        assert!(verified.usable(9_999));
        assert!(!verified.usable(10_000));
    }

    #[test]
    fn the_claimed_issuer_is_read_from_the_payload() {
        let payload = URL_SAFE_NO_PAD.encode(r#"{"iss":"https://id.example.com","sub":"x"}"#);
        assert_eq!(
            claimed_issuer(&format!("e30.{payload}.sig")).as_deref(),
            Some("https://id.example.com")
        );
        assert_eq!(claimed_issuer("garbage"), None);
    }
}
