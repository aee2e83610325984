//! The dashboard's session and how it reaches the API.
//!
//! A browser holds three cookies, all `HttpOnly` and `SameSite=Strict` (and `Secure` when
//! the page was served over TLS): the session's access token, its refresh token, and a CSRF
//! token. The dashboard never decides on its own what a reader may see or do: every read and
//! every action is a request to the REST API made in-process ([`Session::call`]), with the
//! access token as its bearer credential, through the same guard — so the same permissions,
//! rate limits and audit records apply as for any other client.
//!
//! An expired access token is renewed with the refresh token, once: concurrent requests of
//! one browser (a page and its live stream, or several tabs) share the renewal instead of
//! spending the single-use refresh token twice, which would end the session.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use poem::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use poem::{Body, Request, Response};
use serde_json::Value;

use crate::auth::secret::digest;

/// The cookie holding the access token.
pub const ACCESS_COOKIE: &str = "capstan_session";
/// The cookie holding the refresh token.
pub const REFRESH_COOKIE: &str = "capstan_refresh";
/// The cookie holding the CSRF token every form must repeat.
pub const CSRF_COOKIE: &str = "capstan_csrf";

/// How long a renewal's result is handed to the requests that presented the same refresh
/// token.
const RENEWAL_KEPT: Duration = Duration::from_secs(60);

/// The API the dashboard calls in-process.
pub type Api = Arc<dyn poem::endpoint::DynEndpoint<Output = Response>>;

/// The cookie `name` of `headers`.
pub fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(key, _)| *key == name)
        .map(|(_, value)| value.trim_matches('"').to_owned())
        .filter(|value| !value.is_empty())
}

/// Whether the request reached Capstan over TLS: directly, or through a trusted proxy that
/// says so (the guard believed its `X-Forwarded-For`, so it is one of the configured proxies).
pub fn over_tls(request: &Request, trusted: &[std::net::IpAddr]) -> bool {
    if request.scheme() == &poem::http::uri::Scheme::HTTPS {
        return true;
    }
    let peer = request.remote_addr().as_socket_addr().map(|a| a.ip());
    peer.is_some_and(|peer| trusted.contains(&peer))
        && request
            .header("x-forwarded-proto")
            .is_some_and(|proto| proto.eq_ignore_ascii_case("https"))
}

/// A `Set-Cookie` value: `HttpOnly`, `SameSite=Strict`, path `/` (the dashboard adds
/// `Secure` to every cookie of an answer served over TLS); `max_age` zero removes the
/// cookie.
pub fn set_cookie(name: &str, value: &str, max_age: Duration) -> HeaderValue {
    let line = format!(
        "{name}={value}; Path=/; Max-Age={}; HttpOnly; SameSite=Strict",
        max_age.as_secs()
    );
    HeaderValue::from_str(&line).unwrap_or_else(|_| HeaderValue::from_static("invalid=; Max-Age=0"))
}

/// A new random token (a CSRF token).
pub fn random_token() -> String {
    use base64::Engine as _;
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).expect("the operating system's random source works");
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// Whether a form's `csrf` field matches the browser's CSRF cookie, compared in constant
/// time. An empty or missing value never matches.
pub fn csrf_matches(cookie: Option<&str>, field: Option<&str>) -> bool {
    match (cookie, field) {
        (Some(cookie), Some(field)) if !cookie.is_empty() && cookie.len() == field.len() => {
            cookie
                .bytes()
                .zip(field.bytes())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0
        }
        _ => false,
    }
}

/// The tokens a login or a renewal returned.
#[derive(Debug, Clone)]
pub struct Tokens {
    /// The access token (a JWT).
    pub access: String,
    /// The next refresh token.
    pub refresh: String,
}

impl Tokens {
    /// The tokens of a `TokenPair` answer.
    pub fn of(pair: &Value) -> Option<Self> {
        Some(Self {
            access: pair.get("access_token")?.as_str()?.to_owned(),
            refresh: pair.get("refresh_token")?.as_str()?.to_owned(),
        })
    }
}

/// Renewals made recently, by the digest of the refresh token they spent.
#[derive(Default)]
pub struct Renewals(Mutex<HashMap<String, (Instant, Renewal)>>);

/// One renewal: made by the first request that needs it, awaited by the others.
type Renewal = Arc<tokio::sync::OnceCell<Option<Tokens>>>;

impl Renewals {
    /// The one renewal of `refresh` (made now, or shared with a request that made it).
    fn cell(&self, refresh: &str) -> Renewal {
        let mut map = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        map.retain(|_, (at, _)| at.elapsed() < RENEWAL_KEPT);
        map.entry(digest(refresh))
            .or_insert_with(|| (Instant::now(), Arc::default()))
            .1
            .clone()
    }
}

/// An answer of the API, read.
#[derive(Debug)]
pub struct Answer {
    /// Its status.
    pub status: StatusCode,
    /// Its body as JSON (`Null` when empty or not JSON).
    pub body: Value,
}

impl Answer {
    /// The problem's `detail`, or a line naming the status.
    pub fn problem(&self) -> String {
        self.body.get("detail").and_then(Value::as_str).map_or_else(
            || format!("the API answered {}", self.status),
            str::to_owned,
        )
    }
}

/// One browser request's view of the API: its tokens and what it needs to forward.
pub struct Session<'a> {
    api: &'a Api,
    renewals: &'a Renewals,
    /// The original request's headers the API's guard looks at.
    forwarded: HeaderMap,
    remote: poem::web::RemoteAddr,
    /// The access token in use.
    pub access: Option<String>,
    refresh: Option<String>,
    /// Tokens renewed during this request, to be set as cookies on the answer.
    pub renewed: Option<Tokens>,
}

impl<'a> Session<'a> {
    /// The session of `request`, from its cookies.
    pub fn of(request: &Request, api: &'a Api, renewals: &'a Renewals) -> Self {
        let mut forwarded = HeaderMap::new();
        for name in [
            header::HOST,
            header::ORIGIN,
            header::USER_AGENT,
            poem::http::HeaderName::from_static("x-forwarded-for"),
            poem::http::HeaderName::from_static("traceparent"),
        ] {
            for value in request.headers().get_all(&name) {
                forwarded.append(name.clone(), value.clone());
            }
        }
        Self {
            api,
            renewals,
            forwarded,
            remote: request.remote_addr().clone(),
            access: cookie(request.headers(), ACCESS_COOKIE),
            refresh: cookie(request.headers(), REFRESH_COOKIE),
            renewed: None,
        }
    }

    /// Whether the browser has a session at all.
    pub fn present(&self) -> bool {
        self.access.is_some() || self.refresh.is_some()
    }

    /// The refresh token, for logging out.
    pub fn refresh_token(&self) -> Option<&str> {
        self.refresh.as_deref()
    }

    /// Calls the API: `method` on `path_and_query` with an optional JSON body, renewing the
    /// access token once when it has expired.
    pub async fn call(&mut self, method: Method, path: &str, body: Option<&Value>) -> Answer {
        let response = self.send(method.clone(), path, body, true).await;
        if response.status() == StatusCode::UNAUTHORIZED && self.renew().await {
            let response = self.send(method, path, body, true).await;
            return read(response).await;
        }
        read(response).await
    }

    /// Calls the API and hands back its response as it is (a stream, say), after the same
    /// renewal as [`Session::call`].
    pub async fn stream(&mut self, path: &str, accept: &'static str) -> Response {
        let mut response = self.send_accepting(path, accept).await;
        if response.status() == StatusCode::UNAUTHORIZED && self.renew().await {
            response = self.send_accepting(path, accept).await;
        }
        response
    }

    /// Calls a public endpoint (login, logout) without a credential.
    pub async fn call_public(&mut self, path: &str, body: &Value) -> Answer {
        read(self.send(Method::POST, path, Some(body), false).await).await
    }

    async fn send_accepting(&self, path: &str, accept: &'static str) -> Response {
        let mut request = self.request(Method::GET, path, None, true);
        request
            .headers_mut()
            .insert(header::ACCEPT, HeaderValue::from_static(accept));
        self.dispatch(request).await
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
        credential: bool,
    ) -> Response {
        let request = self.request(method, path, body, credential);
        self.dispatch(request).await
    }

    fn request(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
        credential: bool,
    ) -> Request {
        let mut builder = poem::http::Request::builder().method(method).uri(path);
        if let Some(headers) = builder.headers_mut() {
            headers.extend(self.forwarded.clone());
            if credential
                && let Some(token) = &self.access
                && let Ok(value) = HeaderValue::from_str(&format!("Bearer {token}"))
            {
                headers.insert(header::AUTHORIZATION, value);
            }
            headers.insert(header::ACCEPT, HeaderValue::from_static("application/json"));
            if body.is_some() {
                headers.insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                );
            }
        }
        let (parts, ()) = builder
            .body(())
            .unwrap_or_else(|_| poem::http::Request::new(()))
            .into_parts();
        let parts = poem::RequestParts::from((
            parts,
            poem::web::LocalAddr::default(),
            self.remote.clone(),
            poem::http::uri::Scheme::HTTP,
        ));
        let body = body.map_or_else(Body::empty, |b| {
            Body::from_vec(serde_json::to_vec(b).unwrap_or_default())
        });
        Request::from_parts(parts, body)
    }

    async fn dispatch(&self, request: Request) -> Response {
        match poem::endpoint::DynEndpoint::call(&**self.api, request).await {
            Ok(response) => response,
            Err(error) => crate::problem::render(error),
        }
    }

    /// Renews the access token with the refresh token; whether it worked.
    async fn renew(&mut self) -> bool {
        let Some(refresh) = self.refresh.clone() else {
            return false;
        };
        let cell = self.renewals.cell(&refresh);
        let tokens = cell
            .get_or_init(|| async {
                let body = serde_json::json!({ "refresh_token": refresh });
                let answer = read(
                    self.send(Method::POST, "/api/v1/auth/refresh", Some(&body), false)
                        .await,
                )
                .await;
                answer
                    .status
                    .is_success()
                    .then(|| Tokens::of(&answer.body))
                    .flatten()
            })
            .await
            .clone();
        match tokens {
            Some(tokens) => {
                self.access = Some(tokens.access.clone());
                self.refresh = Some(tokens.refresh.clone());
                self.renewed = Some(tokens);
                true
            }
            None => false,
        }
    }
}

async fn read(response: Response) -> Answer {
    let status = response.status();
    let bytes = response.into_body().into_bytes().await.unwrap_or_default();
    Answer {
        status,
        body: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cookie_is_found_among_others_by_its_exact_name() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::COOKIE,
            HeaderValue::from_static("capstan_sessionx=no; capstan_session=yes; other=1"),
        );
        assert_eq!(cookie(&headers, ACCESS_COOKIE).as_deref(), Some("yes"));
        assert_eq!(cookie(&headers, CSRF_COOKIE), None);
    }

    #[test]
    fn the_csrf_check_needs_the_same_non_empty_value() {
        assert!(csrf_matches(Some("abc"), Some("abc")));
        assert!(!csrf_matches(Some("abc"), Some("abd")));
        assert!(!csrf_matches(Some("abc"), Some("ab")));
        assert!(!csrf_matches(Some("abc"), None));
        assert!(!csrf_matches(None, None));
        assert!(!csrf_matches(Some(""), Some("")));
    }

    #[test]
    fn session_cookies_are_http_only_and_same_site_strict() {
        let line = set_cookie(ACCESS_COOKIE, "t", Duration::from_secs(60));
        let line = line.to_str().expect("ascii");
        assert!(
            line.contains("HttpOnly") && line.contains("SameSite=Strict"),
            "{line}"
        );
        assert!(
            line.contains("Max-Age=60") && line.contains("Path=/"),
            "{line}"
        );
    }
}
