//! Bearer tokens from an OpenID Connect provider: the provider's discovery document and key set
//! (JWKS) are fetched and cached; a token is verified with the key its `kid` names, with the
//! algorithm that key is for (never a symmetric one, so a provider's public key can never be
//! used as an HMAC secret), and with `iss`, `aud`, `exp` and `nbf` checked. A claim of the
//! token (`groups`, say) is mapped to a Capstan role.
//!
//! Keys rotate at the provider: a token with a `kid` not in the cache makes the key set be
//! fetched again, at most once per [`REFETCH_COOLDOWN`], so tokens with made-up ids cannot turn
//! the API into a load generator against the provider.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

use super::{Principal, Role};
use capstan_protocol::AuthMethod;

/// The least time between two fetches of the key set.
pub const REFETCH_COOLDOWN: Duration = Duration::from_secs(5);

/// How long a fetched key set is used before it is fetched again: a key the provider
/// withdrew stops being accepted within this time even if no token names a new one.
pub const MAX_KEY_AGE: Duration = Duration::from_secs(3600);

/// Largest discovery document or key set read.
const MAX_DOCUMENT_BYTES: usize = 1024 * 1024;

/// How long a fetch may take.
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);

/// The provider, as configured.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The issuer URL (`iss`), also where discovery starts.
    pub issuer: String,
    /// The audience tokens must name (`aud`).
    pub audience: String,
    /// The claim whose values map to roles (`groups`).
    pub role_claim: String,
    /// Claim values and the roles they grant.
    pub roles: Vec<(String, Role)>,
    /// The role of a token whose claim maps to none; `None` refuses it.
    pub default_role: Option<Role>,
}

/// Why a provider's token was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OidcError {
    /// The token is invalid: bad signature, issuer, audience, time, or an unknown key.
    #[error("the identity provider's token is invalid: {0}")]
    Invalid(String),
    /// The token is valid but its claims map to no role.
    #[error("the identity provider grants this user no Capstan role (claim `{0}`)")]
    NoRole(String),
    /// The provider's keys could not be fetched.
    #[error("the identity provider cannot be reached: {0}")]
    Unavailable(String),
    /// The configuration cannot work.
    #[error("OIDC configuration: {0}")]
    Config(String),
}

/// Where the key set is, and when it was last fetched: held by the one task fetching it.
#[derive(Default)]
struct Fetching {
    jwks_uri: Option<String>,
    fetched_at: Option<Instant>,
}

type KeySet = HashMap<String, (DecodingKey, Algorithm)>;

/// The keys, and when they were fetched.
struct Keys {
    set: KeySet,
    fetched: Option<Instant>,
}

/// A configured provider.
pub struct Provider {
    settings: Settings,
    client: Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>,
    // Verifications read the keys without waiting for a fetch in progress.
    keys: std::sync::RwLock<Keys>,
    fetching: tokio::sync::Mutex<Fetching>,
}

impl std::fmt::Debug for Provider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Provider")
            .field("issuer", &self.settings.issuer)
            .finish_non_exhaustive()
    }
}

#[derive(Deserialize)]
struct Discovery {
    issuer: String,
    jwks_uri: String,
}

/// True for URLs Capstan may fetch: `https`, or `http` to this host only.
fn fetchable(url: &str) -> bool {
    if url.starts_with("https://") {
        return true;
    }
    let Some(rest) = url.strip_prefix("http://") else {
        return false;
    };
    let host = rest.split(['/', '?']).next().unwrap_or("");
    let host = match host.rsplit_once(':') {
        Some((host, port)) if port.bytes().all(|b| b.is_ascii_digit()) => host,
        _ => host,
    };
    matches!(host, "localhost" | "127.0.0.1" | "[::1]")
}

impl Provider {
    /// A provider for `settings`; keys are fetched on the first token.
    pub fn new(settings: Settings) -> Result<Self, OidcError> {
        if !fetchable(&settings.issuer) {
            return Err(OidcError::Config(format!(
                "the issuer `{}` must be an https URL (http only on this host)",
                settings.issuer
            )));
        }
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_webpki_roots()
            .https_or_http()
            .enable_http1()
            .build();
        Ok(Self {
            settings,
            client: Client::builder(TokioExecutor::new()).build(connector),
            keys: std::sync::RwLock::new(Keys {
                set: HashMap::new(),
                fetched: None,
            }),
            fetching: tokio::sync::Mutex::new(Fetching {
                jwks_uri: None,
                fetched_at: None,
            }),
        })
    }

    /// The issuer.
    pub fn issuer(&self) -> &str {
        &self.settings.issuer
    }

    /// Verifies `token` and returns its principal: `oidc:<subject>` with the mapped role.
    pub async fn verify(&self, token: &str) -> Result<Principal, OidcError> {
        let header = jsonwebtoken::decode_header(token)
            .map_err(|_| OidcError::Invalid("malformed token or algorithm not accepted".into()))?;
        let kid = header
            .kid
            .ok_or_else(|| OidcError::Invalid("the token names no key (`kid`)".into()))?;
        let (key, algorithm) = self.key(&kid).await?;
        if header.alg != algorithm {
            return Err(OidcError::Invalid(format!(
                "the token's algorithm {:?} is not its key's",
                header.alg
            )));
        }
        let mut validation = Validation::new(algorithm);
        validation.set_issuer(&[&self.settings.issuer]);
        validation.set_audience(&[&self.settings.audience]);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        validation.validate_nbf = true;
        validation.leeway = 30;
        let data = jsonwebtoken::decode::<serde_json::Value>(token, &key, &validation)
            .map_err(|e| OidcError::Invalid(super::jwt::describe(e.kind())))?;
        let claims = data.claims;
        let subject = claims
            .get("sub")
            .and_then(|s| s.as_str())
            .filter(|s| !s.is_empty() && s.len() <= 200)
            .ok_or_else(|| OidcError::Invalid("`sub` must be a non-empty string".into()))?;
        let role = self.role(&claims)?;
        Ok(Principal {
            name: format!("oidc:{subject}"),
            role,
            via: AuthMethod::Oidc,
            token: None,
            session: None,
        })
    }

    /// The greatest role the role claim's values map to.
    fn role(&self, claims: &serde_json::Value) -> Result<Role, OidcError> {
        let values: Vec<&str> = match claims.get(&self.settings.role_claim) {
            Some(serde_json::Value::String(value)) => vec![value.as_str()],
            Some(serde_json::Value::Array(values)) => {
                values.iter().filter_map(|v| v.as_str()).collect()
            }
            _ => Vec::new(),
        };
        self.settings
            .roles
            .iter()
            .filter(|(value, _)| values.contains(&value.as_str()))
            .map(|(_, role)| *role)
            .max()
            .or(self.settings.default_role)
            .ok_or_else(|| OidcError::NoRole(self.settings.role_claim.clone()))
    }

    /// The key `kid` names, fetching the key set when it is not known yet.
    async fn key(&self, kid: &str) -> Result<(DecodingKey, Algorithm), OidcError> {
        let unknown =
            || OidcError::Invalid("the token names a key the provider does not publish".into());
        if let Some((found, fresh)) = self.known(kid) {
            if fresh {
                return Ok(found);
            }
            // Old keys: one request fetches them again; the others, and this one if the
            // provider does not answer, go on with what is known.
            let Ok(mut fetching) = self.fetching.try_lock() else {
                return Ok(found);
            };
            return match self.fetch_keys(&mut fetching).await {
                Ok(()) => self.known(kid).map(|(key, _)| key).ok_or_else(unknown),
                Err(error) => {
                    tracing::warn!(error = %error, "cannot refresh the identity provider's keys");
                    Ok(found)
                }
            };
        }
        let mut fetching = self.fetching.lock().await;
        // Another task may have fetched while this one waited.
        if let Some((found, _)) = self.known(kid) {
            return Ok(found);
        }
        if fetching
            .fetched_at
            .is_some_and(|at| at.elapsed() < REFETCH_COOLDOWN)
        {
            return Err(unknown());
        }
        self.fetch_keys(&mut fetching).await?;
        self.known(kid).map(|(key, _)| key).ok_or_else(unknown)
    }

    /// Fetches the key set (and first the discovery document, once) and keeps its usable keys.
    async fn fetch_keys(&self, fetching: &mut Fetching) -> Result<(), OidcError> {
        fetching.fetched_at = Some(Instant::now());
        let jwks_uri = match &fetching.jwks_uri {
            Some(uri) => uri.clone(),
            None => {
                let discovery: Discovery = self
                    .fetch(&format!(
                        "{}/.well-known/openid-configuration",
                        self.settings.issuer.trim_end_matches('/')
                    ))
                    .await?;
                if discovery.issuer != self.settings.issuer {
                    return Err(OidcError::Unavailable(format!(
                        "the discovery document names the issuer `{}`, not `{}`",
                        discovery.issuer, self.settings.issuer
                    )));
                }
                if !fetchable(&discovery.jwks_uri) {
                    return Err(OidcError::Unavailable(
                        "the key set's URL is not https".into(),
                    ));
                }
                fetching.jwks_uri = Some(discovery.jwks_uri.clone());
                discovery.jwks_uri
            }
        };
        let set: serde_json::Value = self.fetch(&jwks_uri).await?;
        let keys = set
            .get("keys")
            .and_then(|k| k.as_array())
            .ok_or_else(|| OidcError::Unavailable("the key set has no `keys`".into()))?;
        let keys: KeySet = keys
            .iter()
            .filter_map(|value| serde_json::from_value::<Jwk>(value.clone()).ok())
            .filter_map(|jwk| usable(&jwk))
            .collect();
        tracing::info!(issuer = %self.settings.issuer, keys = keys.len(), "fetched the identity provider's keys");
        *self
            .keys
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Keys {
            set: keys,
            fetched: Some(Instant::now()),
        };
        Ok(())
    }

    /// The key `kid` names, if known, and whether the keys are recent enough to use without
    /// fetching them again.
    fn known(&self, kid: &str) -> Option<((DecodingKey, Algorithm), bool)> {
        let keys = self
            .keys
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let fresh = keys.fetched.is_some_and(|at| at.elapsed() < MAX_KEY_AGE);
        keys.set.get(kid).cloned().map(|key| (key, fresh))
    }

    async fn fetch<T: serde::de::DeserializeOwned>(&self, url: &str) -> Result<T, OidcError> {
        let failed = |e: String| OidcError::Unavailable(format!("{url}: {e}"));
        let request = hyper::Request::get(url)
            .header("accept", "application/json")
            .body(Full::new(Bytes::new()))
            .map_err(|e| failed(e.to_string()))?;
        let response = tokio::time::timeout(FETCH_TIMEOUT, self.client.request(request))
            .await
            .map_err(|_| failed("timed out".into()))?
            .map_err(|e| failed(e.to_string()))?;
        if !response.status().is_success() {
            return Err(failed(format!("HTTP {}", response.status())));
        }
        let body = tokio::time::timeout(
            FETCH_TIMEOUT,
            Limited::new(response.into_body(), MAX_DOCUMENT_BYTES).collect(),
        )
        .await
        .map_err(|_| failed("timed out".into()))?
        .map_err(|e| failed(e.to_string()))?
        .to_bytes();
        serde_json::from_slice(&body).map_err(|e| failed(e.to_string()))
    }
}

/// A signing key of the set and its algorithm; `None` for keys Capstan never accepts
/// (symmetric, encryption, unknown curves, unnamed).
fn usable(jwk: &Jwk) -> Option<(String, (DecodingKey, Algorithm))> {
    let kid = jwk.common.key_id.clone()?;
    if matches!(jwk.common.public_key_use, Some(ref u) if *u != PublicKeyUse::Signature) {
        return None;
    }
    let inferred = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => Algorithm::RS256,
        AlgorithmParameters::EllipticCurve(ec) => match ec.curve {
            EllipticCurve::P256 => Algorithm::ES256,
            EllipticCurve::P384 => Algorithm::ES384,
            _ => return None,
        },
        AlgorithmParameters::OctetKeyPair(_) => Algorithm::EdDSA,
        AlgorithmParameters::OctetKey(_) => return None,
    };
    let algorithm = match jwk.common.key_algorithm {
        Some(named) => named.to_string().parse::<Algorithm>().ok()?,
        None => inferred,
    };
    let asymmetric = !matches!(
        algorithm,
        Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512
    );
    let same_family = algorithm.family() == inferred.family();
    if !(asymmetric && same_family) {
        return None;
    }
    let key = DecodingKey::from_jwk(jwk).ok()?;
    Some((kid, (key, algorithm)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_https_or_local_http_issuers_are_fetched() {
        assert!(fetchable("https://id.example.com/realms/x"));
        assert!(fetchable("http://127.0.0.1:8081/issuer"));
        assert!(fetchable("http://localhost/issuer"));
        assert!(!fetchable("http://id.example.com"));
        assert!(!fetchable("http://127.0.0.1.example.com/"));
        assert!(!fetchable("file:///etc/passwd"));
    }

    #[test]
    fn symmetric_keys_in_a_key_set_are_never_used() {
        let jwk: Jwk = serde_json::from_value(serde_json::json!({
            "kty": "oct", "kid": "k1", "alg": "HS256", "k": "c2VjcmV0LXNlY3JldC1zZWNyZXQ"
        }))
        .expect("parses");
        assert!(usable(&jwk).is_none());
    }

    #[test]
    fn the_greatest_mapped_role_wins_and_unmapped_users_get_the_default_or_nothing() {
        let settings = Settings {
            issuer: "https://id.example.com".into(),
            audience: "capstan".into(),
            role_claim: "groups".into(),
            roles: vec![
                ("ops".into(), Role::Operator),
                ("admins".into(), Role::Admin),
            ],
            default_role: None,
        };
        let provider = Provider::new(settings.clone()).expect("valid");
        let claims = serde_json::json!({"groups": ["ops", "admins", "other"]});
        assert_eq!(provider.role(&claims), Ok(Role::Admin));
        assert_eq!(
            provider.role(&serde_json::json!({"groups": "ops"})),
            Ok(Role::Operator)
        );
        assert!(matches!(
            provider.role(&serde_json::json!({"groups": ["other"]})),
            Err(OidcError::NoRole(_))
        ));
        let lenient = Provider::new(Settings {
            default_role: Some(Role::Viewer),
            ..settings
        })
        .expect("valid");
        assert_eq!(lenient.role(&serde_json::json!({})), Ok(Role::Viewer));
    }
}
