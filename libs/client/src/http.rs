//! The REST client: one base URL, one credential, JSON in and out, problem+json turned into
//! [`Error::Api`], and server-sent events read as a stream of [`SseEvent`]s.
//!
//! A password login's access token is renewed before it expires, under the login file's lock
//! (see [`crate::config`]); an API token is sent as it is.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use tokio::sync::Mutex;

use crate::Error;
use crate::config::{Credential, Login, Store};

/// How long a request (not a followed stream) may take before the command gives up.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// How long before its expiry an access token is renewed.
const RENEW_MARGIN_SECONDS: i64 = 30;

/// A problem the API answered with (RFC 9457).
#[derive(Debug, Clone)]
pub struct Problem {
    /// The HTTP status.
    pub status: StatusCode,
    /// Its title.
    pub title: String,
    /// What went wrong, precisely.
    pub detail: String,
    /// The request field at fault, when one is.
    pub field: Option<String>,
    /// The permission that was missing, on a 403.
    pub permission: Option<String>,
}

/// One server-sent event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseEvent {
    /// Its `event:` type (`message` when none was given).
    pub event: String,
    /// Its data, lines joined with `\n`.
    pub data: String,
}

/// A client of one API.
#[derive(Clone)]
pub struct Api {
    base: String,
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    auth: Arc<Mutex<Auth>>,
}

enum Auth {
    None,
    Token(String),
    Session { login: Login, store: Arc<Store> },
}

impl Api {
    /// A client of the API at `url`, trusting the public certificate authorities and those
    /// in `ca_file`, with no credential yet.
    pub fn new(url: &str, ca_file: Option<&std::path::Path>) -> Result<Self, Error> {
        let base = url.trim_end_matches('/').to_owned();
        let uri: http::Uri = base
            .parse()
            .map_err(|e| Error::Usage(format!("`{url}` is not a URL: {e}")))?;
        match uri.scheme_str() {
            Some("http" | "https") if uri.host().is_some() => {}
            _ => {
                return Err(Error::Usage(format!(
                    "`{url}` is not an http:// or https:// URL of the API"
                )));
            }
        }
        let mut roots = rustls::RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        if let Some(path) = ca_file {
            use rustls_pki_types::pem::PemObject;
            let certificates = rustls_pki_types::CertificateDer::pem_file_iter(path)
                .map_err(|e| Error::Config(format!("cannot read {}: {e}", path.display())))?;
            let mut added = 0;
            for certificate in certificates {
                let certificate = certificate.map_err(|e| {
                    Error::Config(format!("{} is not a PEM file: {e}", path.display()))
                })?;
                roots.add(certificate).map_err(|e| {
                    Error::Config(format!("a certificate in {}: {e}", path.display()))
                })?;
                added += 1;
            }
            if added == 0 {
                return Err(Error::Config(format!(
                    "{} holds no certificate",
                    path.display()
                )));
            }
        }
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Config(format!("TLS: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .build();
        Ok(Self {
            base,
            client: Client::builder(TokioExecutor::new()).build(connector),
            auth: Arc::new(Mutex::new(Auth::None)),
        })
    }

    /// The same client, sending API token `token`.
    pub fn with_token(self, token: String) -> Self {
        Self {
            auth: Arc::new(Mutex::new(Auth::Token(token))),
            ..self
        }
    }

    /// The same client, using (and renewing) the session of `login`, stored in `store`.
    pub fn with_session(self, login: Login, store: Arc<Store>) -> Self {
        Self {
            auth: Arc::new(Mutex::new(Auth::Session { login, store })),
            ..self
        }
    }

    /// The base URL.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// `GET path`, decoded.
    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, Error> {
        self.call(Method::GET, path, None::<&()>).await
    }

    /// `POST path` with a JSON `body` (or none), decoded.
    pub async fn post<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: Option<&B>,
    ) -> Result<T, Error> {
        self.call(Method::POST, path, body).await
    }

    /// `method path` with an optional JSON body; the answer decoded (`null` when empty).
    pub async fn call<B: Serialize, T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<T, Error> {
        let bearer = self.bearer().await?;
        self.call_as(bearer, method, path, body).await
    }

    /// [`Api::call`] with `bearer` as the credential (renewing a session calls this one, with
    /// none, so that a renewal never asks for a renewal).
    async fn call_as<B: Serialize, T: DeserializeOwned>(
        &self,
        bearer: Option<String>,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<T, Error> {
        let body = body.map(|body| {
            Bytes::from(serde_json::to_vec(body).expect("request bodies always serialize"))
        });
        let request = self.request(bearer, method, path, body, "application/json")?;
        let response = tokio::time::timeout(REQUEST_TIMEOUT, self.client.request(request))
            .await
            .map_err(|_| self.unreachable("no answer within a minute"))?
            .map_err(|e| self.unreachable(error_chain(&e)))?;
        let status = response.status();
        let bytes = tokio::time::timeout(REQUEST_TIMEOUT, response.into_body().collect())
            .await
            .map_err(|_| self.unreachable("the answer did not arrive within a minute"))?
            .map_err(|e| self.unreachable(error_chain(&e)))?
            .to_bytes();
        if !status.is_success() {
            return Err(Error::Api(problem_of(status, &bytes)));
        }
        let bytes = if bytes.is_empty() {
            Bytes::from_static(b"null")
        } else {
            bytes
        };
        serde_json::from_slice(&bytes).map_err(|e| Error::Decode {
            path: path.to_owned(),
            reason: e.to_string(),
        })
    }

    /// `GET path` as server-sent events.
    pub async fn events(&self, path: &str) -> Result<SseStream, Error> {
        let bearer = self.bearer().await?;
        let request = self.request(bearer, Method::GET, path, None, "text/event-stream")?;
        let response = tokio::time::timeout(REQUEST_TIMEOUT, self.client.request(request))
            .await
            .map_err(|_| self.unreachable("no answer within a minute"))?
            .map_err(|e| self.unreachable(error_chain(&e)))?;
        let status = response.status();
        if !status.is_success() {
            let bytes = response
                .into_body()
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            return Err(Error::Api(problem_of(status, &bytes)));
        }
        Ok(SseStream {
            body: response.into_body(),
            buffer: Vec::new(),
            url: self.base.clone(),
        })
    }

    fn request(
        &self,
        bearer: Option<String>,
        method: Method,
        path: &str,
        body: Option<Bytes>,
        accept: &str,
    ) -> Result<Request<Full<Bytes>>, Error> {
        let mut builder = Request::builder()
            .method(method)
            .uri(format!("{}{}", self.base, path))
            .header(header::ACCEPT, accept)
            .header(
                header::USER_AGENT,
                concat!("capstan/", env!("CARGO_PKG_VERSION")),
            );
        if let Some(token) = bearer {
            builder = builder.header(header::AUTHORIZATION, format!("Bearer {token}"));
        }
        if body.is_some() {
            builder = builder.header(header::CONTENT_TYPE, "application/json");
        }
        builder
            .body(Full::new(body.unwrap_or_default()))
            .map_err(|e| Error::Usage(format!("cannot build a request for `{path}`: {e}")))
    }

    /// The bearer token to send, renewing a session's access token that is about to expire.
    async fn bearer(&self) -> Result<Option<String>, Error> {
        let mut auth = self.auth.lock().await;
        match &mut *auth {
            Auth::None => Ok(None),
            Auth::Token(token) => Ok(Some(token.clone())),
            Auth::Session { login, store } => {
                if let Credential::Session {
                    access_token,
                    expires_at,
                    ..
                } = &login.credential
                    && *expires_at - RENEW_MARGIN_SECONDS > now()
                {
                    return Ok(Some(access_token.clone()));
                }
                let renewed = store
                    .update(|stored| async move { renew(self, stored).await })
                    .await?;
                *login = renewed;
                match &login.credential {
                    Credential::Session { access_token, .. } => Ok(Some(access_token.clone())),
                    Credential::Token { token } => Ok(Some(token.clone())),
                }
            }
        }
    }

    /// The same API without a credential (for logging in and renewing).
    pub fn anonymous(&self) -> Self {
        Self {
            auth: Arc::new(Mutex::new(Auth::None)),
            ..self.clone()
        }
    }

    fn unreachable(&self, reason: impl Into<String>) -> Error {
        Error::Unreachable {
            url: self.base.clone(),
            reason: reason.into(),
        }
    }
}

/// Renews the session in `stored` unless another command already did (its access token is
/// then fresh): the exchange of a single-use refresh token happens once.
async fn renew(api: &Api, stored: Login) -> Result<Login, Error> {
    let Credential::Session {
        username,
        expires_at,
        refresh_token,
        ..
    } = &stored.credential
    else {
        return Ok(stored);
    };
    if *expires_at - RENEW_MARGIN_SECONDS > now() {
        return Ok(stored);
    }
    let pair: TokenPair = api
        .call_as(
            None,
            Method::POST,
            "/api/v1/auth/refresh",
            Some(&serde_json::json!({ "refresh_token": refresh_token })),
        )
        .await
        .map_err(|error| match error {
            Error::Api(problem) if problem.status == StatusCode::UNAUTHORIZED => {
                Error::SessionEnded(problem.detail)
            }
            other => other,
        })?;
    Ok(Login {
        credential: pair.into_credential(username.clone()),
        ..stored
    })
}

/// The API's answer to a login or a refresh.
#[derive(serde::Deserialize)]
pub struct TokenPair {
    access_token: String,
    refresh_token: String,
    expires_in: i64,
}

impl TokenPair {
    /// The session credential these tokens make, for `username`.
    pub fn into_credential(self, username: String) -> Credential {
        Credential::Session {
            username,
            access_token: self.access_token,
            expires_at: now() + self.expires_in,
            refresh_token: self.refresh_token,
        }
    }
}

/// The current Unix time in seconds.
pub fn now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// The problem in an error answer; a body that is not problem+json keeps its status and text.
fn problem_of(status: StatusCode, body: &[u8]) -> Problem {
    let parsed: Option<Value> = serde_json::from_slice(body).ok();
    let text = |key: &str| {
        parsed
            .as_ref()
            .and_then(|v| v.get(key))
            .and_then(Value::as_str)
            .map(str::to_owned)
    };
    Problem {
        status,
        title: text("title").unwrap_or_else(|| {
            status
                .canonical_reason()
                .unwrap_or("error")
                .to_ascii_lowercase()
        }),
        detail: text("detail").unwrap_or_else(|| {
            String::from_utf8_lossy(body)
                .trim()
                .chars()
                .take(300)
                .collect()
        }),
        field: text("field"),
        permission: text("permission"),
    }
}

/// Server-sent events as they arrive.
pub struct SseStream {
    body: hyper::body::Incoming,
    buffer: Vec<u8>,
    url: String,
}

impl SseStream {
    /// The next event; `None` once the server closed the stream.
    pub async fn next(&mut self) -> Result<Option<SseEvent>, Error> {
        loop {
            if let Some(event) = take_event(&mut self.buffer) {
                if event.data.is_empty() && event.event == "message" {
                    continue; // a keep-alive
                }
                return Ok(Some(event));
            }
            match self.body.frame().await {
                None => return Ok(None),
                Some(Err(error)) => {
                    return Err(Error::Unreachable {
                        url: self.url.clone(),
                        reason: format!("the stream broke: {}", error_chain(&error)),
                    });
                }
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        self.buffer.extend_from_slice(&data);
                    }
                }
            }
        }
    }
}

/// Takes one complete event (ended by a blank line) off the front of `buffer`.
fn take_event(buffer: &mut Vec<u8>) -> Option<SseEvent> {
    let normalized_end = find_blank_line(buffer)?;
    let (end, skip) = normalized_end;
    let block: Vec<u8> = buffer.drain(..end + skip).take(end).collect();
    let text = String::from_utf8_lossy(&block);
    let mut event = String::from("message");
    let mut data: Vec<&str> = Vec::new();
    for line in text.split('\n').map(|l| l.strip_suffix('\r').unwrap_or(l)) {
        if line.starts_with(':') || line.is_empty() {
            continue;
        }
        let (field, value) = line.split_once(':').unwrap_or((line, ""));
        let value = value.strip_prefix(' ').unwrap_or(value);
        match field {
            "event" => event = value.to_owned(),
            "data" => data.push(value),
            _ => {}
        }
    }
    Some(SseEvent {
        event,
        data: data.join("\n"),
    })
}

/// Where the first blank line is: the block's length and the separator's.
fn find_blank_line(buffer: &[u8]) -> Option<(usize, usize)> {
    let mut index = 0;
    while index < buffer.len() {
        for separator in [&b"\r\n\r\n"[..], b"\n\n", b"\r\r"] {
            if buffer[index..].starts_with(separator) {
                return Some((index, separator.len()));
            }
        }
        index += 1;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_split_on_blank_lines_with_their_type_and_multi_line_data() {
        let mut buffer = b"event: stdout\ndata: {\"a\":1}\n\n: keep-alive\n\nevent: end\ndata: x\ndata: y\n\nevent: std"
            .to_vec();
        assert_eq!(
            take_event(&mut buffer),
            Some(SseEvent {
                event: "stdout".into(),
                data: "{\"a\":1}".into()
            })
        );
        let keep_alive = take_event(&mut buffer).expect("a block");
        assert_eq!(keep_alive.data, "");
        assert_eq!(
            take_event(&mut buffer),
            Some(SseEvent {
                event: "end".into(),
                data: "x\ny".into()
            })
        );
        assert_eq!(take_event(&mut buffer), None, "an incomplete event waits");
        assert_eq!(buffer, b"event: std");
    }

    #[test]
    fn an_error_answer_that_is_not_problem_json_keeps_its_status_and_text() {
        let problem = problem_of(StatusCode::BAD_GATEWAY, b"upstream down");
        assert_eq!(problem.status, StatusCode::BAD_GATEWAY);
        assert_eq!(problem.title, "bad gateway");
        assert_eq!(problem.detail, "upstream down");
        let problem = problem_of(
            StatusCode::UNPROCESSABLE_ENTITY,
            br#"{"type":"about:blank","title":"invalid","status":422,"detail":"bad cron","field":"cron"}"#,
        );
        assert_eq!(problem.field.as_deref(), Some("cron"));
        assert_eq!(problem.detail, "bad cron");
    }

    #[test]
    fn a_private_certificate_authority_is_trusted_from_its_pem_file_and_a_file_without_one_is_refused()
     {
        let ca = capstan_testkit::tls::TestCa::generate();
        assert!(Api::new("https://127.0.0.1:8443", Some(&ca.files.ca)).is_ok());
        let dir = tempfile::tempdir().expect("temp dir");
        let empty = dir.path().join("not-a-ca.pem");
        std::fs::write(&empty, "not a certificate\n").expect("written");
        match Api::new("https://127.0.0.1:8443", Some(&empty)) {
            Err(Error::Config(reason)) => {
                assert!(reason.contains("holds no certificate"), "{reason}")
            }
            Err(other) => panic!("refused for another reason: {other}"),
            Ok(_) => panic!("a file without a certificate was accepted"),
        }
        let missing = dir.path().join("missing.pem");
        assert!(matches!(
            Api::new("https://127.0.0.1:8443", Some(&missing)),
            Err(Error::Config(_))
        ));
    }

    #[test]
    fn a_url_that_is_not_http_is_refused_before_anything_is_sent() {
        assert!(matches!(Api::new("ftp://x", None), Err(Error::Usage(_))));
        assert!(matches!(Api::new("not a url", None), Err(Error::Usage(_))));
        assert!(Api::new("http://127.0.0.1:8080/", None).is_ok());
    }
}
