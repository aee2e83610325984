//! A real OpenID Connect issuer for tests, on a loopback port: it serves its discovery document
//! and its key set (JWKS) over HTTP, and signs tokens (ES256) with P-256 keys it generates.
//! Keys rotate on demand: a new key is published beside the old ones and signs from then on.

use std::sync::{Arc, Mutex};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use poem::listener::{Acceptor, Listener, TcpListener};
use poem::web::Json;
use poem::{EndpointExt, Route, Server, handler};
use ring::rand::SystemRandom;
use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair};
use serde_json::{Value, json};

struct Key {
    id: String,
    pkcs8: Vec<u8>,
    jwk: Value,
}

struct Keys {
    issuer: String,
    keys: Vec<Key>,
}

/// The issuer; it stops when dropped.
pub struct OidcIssuer {
    keys: Arc<Mutex<Keys>>,
    fetches: Arc<std::sync::atomic::AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

fn generate(id: String) -> Key {
    let random = SystemRandom::new();
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &random)
        .expect("a P-256 key");
    let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &random)
        .expect("the key just generated");
    // An uncompressed point: 0x04, then x and y, 32 bytes each.
    let point = pair.public_key().as_ref();
    let jwk = json!({
        "kty": "EC",
        "crv": "P-256",
        "use": "sig",
        "alg": "ES256",
        "kid": id,
        "x": URL_SAFE_NO_PAD.encode(&point[1..33]),
        "y": URL_SAFE_NO_PAD.encode(&point[33..65]),
    });
    Key {
        id,
        pkcs8: pkcs8.as_ref().to_vec(),
        jwk,
    }
}

impl OidcIssuer {
    /// Listens on a free loopback port with one key.
    pub async fn start() -> Self {
        let acceptor = TcpListener::bind("127.0.0.1:0")
            .into_acceptor()
            .await
            .expect("a loopback port for the issuer");
        let port = acceptor
            .local_addr()
            .first()
            .and_then(|a| a.as_socket_addr().map(|a| a.port()))
            .expect("bound");
        let issuer = format!("http://127.0.0.1:{port}/realms/capstan");
        let keys = Arc::new(Mutex::new(Keys {
            issuer: issuer.clone(),
            keys: vec![generate("key-1".into())],
        }));
        let fetches = Arc::new(std::sync::atomic::AtomicUsize::new(0));

        #[handler]
        fn discovery(keys: poem::web::Data<&Arc<Mutex<Keys>>>) -> Json<Value> {
            let issuer = keys.lock().expect("not poisoned").issuer.clone();
            Json(json!({
                "issuer": issuer,
                "jwks_uri": format!("{issuer}/protocol/openid-connect/certs"),
                "id_token_signing_alg_values_supported": ["ES256"],
            }))
        }

        #[handler]
        fn jwks(
            keys: poem::web::Data<&Arc<Mutex<Keys>>>,
            fetches: poem::web::Data<&Arc<std::sync::atomic::AtomicUsize>>,
        ) -> Json<Value> {
            fetches.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let keys = keys.lock().expect("not poisoned");
            Json(json!({"keys": keys.keys.iter().map(|k| k.jwk.clone()).collect::<Vec<_>>()}))
        }

        let app = Route::new()
            .at(
                "/realms/capstan/.well-known/openid-configuration",
                poem::get(discovery),
            )
            .at(
                "/realms/capstan/protocol/openid-connect/certs",
                poem::get(jwks),
            )
            .data(keys.clone())
            .data(fetches.clone());
        let task = tokio::spawn(async move {
            let _ = Server::new_with_acceptor(acceptor).run(app).await;
        });
        Self {
            keys,
            fetches,
            task,
        }
    }

    /// The issuer URL (`iss`), for `CAPSTAN_OIDC_ISSUER`.
    pub fn issuer(&self) -> String {
        self.keys.lock().expect("not poisoned").issuer.clone()
    }

    /// How many times the key set was fetched.
    pub fn key_fetches(&self) -> usize {
        self.fetches.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Publishes a new key, which signs from now on (the old ones stay published); its id.
    pub fn rotate(&self) -> String {
        let mut keys = self.keys.lock().expect("not poisoned");
        let id = format!("key-{}", keys.keys.len() + 1);
        keys.keys.push(generate(id.clone()));
        id
    }

    /// A token with `claims`, signed with the current key. Claims left out get defaults:
    /// `iss` this issuer, `iat`/`nbf` now, `exp` in ten minutes.
    pub fn token(&self, claims: Value) -> String {
        let keys = self.keys.lock().expect("not poisoned");
        let key = keys.keys.last().expect("at least one key");
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("after the epoch")
            .as_secs();
        let mut full = json!({"iss": keys.issuer, "iat": now, "nbf": now, "exp": now + 600});
        if let (Some(full), Some(given)) = (full.as_object_mut(), claims.as_object()) {
            for (name, value) in given {
                full.insert(name.clone(), value.clone());
            }
        }
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(key.id.clone());
        jsonwebtoken::encode(&header, &full, &EncodingKey::from_ec_der(&key.pkcs8))
            .expect("ES256 signing")
    }
}

impl Drop for OidcIssuer {
    fn drop(&mut self) {
        self.task.abort();
    }
}
