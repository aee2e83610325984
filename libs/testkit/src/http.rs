//! A plain HTTP/1 client for tests that talk to the API over a real socket.

use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

/// A response, fully read.
#[derive(Debug)]
pub struct Reply {
    /// Status.
    pub status: StatusCode,
    /// Headers.
    pub headers: HeaderMap,
    /// Body.
    pub body: Bytes,
}

impl Reply {
    /// The body as JSON.
    pub fn json(&self) -> serde_json_value::Value {
        serde_json_value::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }

    /// The `Content-Type` header.
    pub fn content_type(&self) -> &str {
        self.headers
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }

    /// The body as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// Asserts a problem+json reply of `status`, naming `field` when one is given.
    pub fn assert_problem(&self, status: StatusCode, field: Option<&str>) {
        assert_eq!(self.status, status, "{}", self.text());
        assert!(
            self.content_type().starts_with("application/problem+json"),
            "{}",
            self.content_type()
        );
        if let Some(field) = field {
            assert_eq!(self.json()["field"], field, "{}", self.text());
        }
    }
}

/// The password [`HttpClient::new_user`] gives the users it makes.
pub const TEST_USER_PASSWORD: &str = "a long enough password";

/// JSON values, re-exported so tests need no extra dependency.
pub mod serde_json_value {
    pub use serde_json::{Value, from_slice, json};
}

/// A client for one base URL (`http://127.0.0.1:port`), optionally sending a bearer token
/// with every request.
#[derive(Clone)]
pub struct HttpClient {
    base: String,
    client: Client<HttpConnector, Full<Bytes>>,
    bearer: Option<String>,
}

impl HttpClient {
    /// A client for `base`.
    pub fn new(base: impl Into<String>) -> Self {
        Self {
            base: base.into(),
            client: Client::builder(TokioExecutor::new()).build_http(),
            bearer: None,
        }
    }

    /// The same client, sending `Authorization: Bearer <token>` with every request.
    pub fn with_bearer(&self, token: impl Into<String>) -> Self {
        Self {
            bearer: Some(token.into()),
            ..self.clone()
        }
    }

    /// The same client without a bearer token.
    pub fn anonymous(&self) -> Self {
        Self {
            bearer: None,
            ..self.clone()
        }
    }

    /// The bearer token sent, if any.
    pub fn bearer(&self) -> Option<&str> {
        self.bearer.as_deref()
    }

    /// Logs in as `username` with `password` (`POST /api/v1/auth/login`) and returns a client
    /// sending the access token; panics if the login is refused.
    pub async fn login(&self, username: &str, password: &str) -> Self {
        let body = serde_json::json!({"username": username, "password": password}).to_string();
        let reply = self
            .anonymous()
            .post_json("/api/v1/auth/login", &body)
            .await;
        assert!(
            reply.status.is_success(),
            "login as {username} refused: {} {}",
            reply.status,
            reply.text()
        );
        let token = reply.json()["access_token"]
            .as_str()
            .expect("an access token")
            .to_owned();
        self.with_bearer(token)
    }

    /// As an administrator: makes a user `name` of `role` (password [`TEST_USER_PASSWORD`])
    /// and returns a client logged in as them; panics if either is refused.
    pub async fn new_user(&self, name: &str, role: &str) -> Self {
        let body = serde_json::json!({"name": name, "password": TEST_USER_PASSWORD, "role": role});
        let made = self.post_json("/api/v1/users", &body.to_string()).await;
        assert_eq!(made.status, StatusCode::CREATED, "{}", made.text());
        self.anonymous().login(name, TEST_USER_PASSWORD).await
    }

    /// As an auditor: the newest 100 audit records of `action`.
    pub async fn audit(&self, action: &str) -> Vec<serde_json_value::Value> {
        let trail = self
            .get(&format!("/api/v1/audit?action={action}&limit=100"))
            .await
            .json();
        trail["records"].as_array().cloned().unwrap_or_default()
    }

    /// The base URL.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// Sends a request and reads the whole response; panics if the server cannot be reached.
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: impl Into<Bytes>,
    ) -> Reply {
        self.try_send(method, path, headers, body)
            .await
            .unwrap_or_else(|e| panic!("request to {path} failed: {e}"))
    }

    /// GET, or the reason the server could not be reached (for polling until it is up).
    pub async fn try_get(&self, path: &str) -> Result<Reply, String> {
        self.try_send(Method::GET, path, &[], Bytes::new()).await
    }

    /// Sends a request and reads the whole response.
    pub async fn try_send(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: impl Into<Bytes>,
    ) -> Result<Reply, String> {
        let mut builder = Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base));
        if let Some(token) = &self.bearer
            && !headers
                .iter()
                .any(|(name, _)| name.eq_ignore_ascii_case("authorization"))
        {
            builder = builder.header("authorization", format!("Bearer {token}"));
        }
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        let request = builder
            .body(Full::new(body.into()))
            .expect("a valid request");
        let response = self
            .client
            .request(request)
            .await
            .map_err(|e| e.to_string())?;
        let (parts, body) = response.into_parts();
        let body = body.collect().await.map_err(|e| e.to_string())?.to_bytes();
        Ok(Reply {
            status: parts.status,
            headers: parts.headers,
            body,
        })
    }

    /// GET.
    pub async fn get(&self, path: &str) -> Reply {
        self.send(Method::GET, path, &[], Bytes::new()).await
    }

    /// POST with a JSON body.
    pub async fn post_json(&self, path: &str, body: &str) -> Reply {
        self.send(
            Method::POST,
            path,
            &[("content-type", "application/json")],
            body.to_owned(),
        )
        .await
    }

    /// PATCH with a JSON body.
    pub async fn patch_json(&self, path: &str, body: &str) -> Reply {
        self.send(
            Method::PATCH,
            path,
            &[("content-type", "application/json")],
            body.to_owned(),
        )
        .await
    }

    /// GET a streaming response and read it until `until` returns true for the text so far
    /// (or the stream ends); returns the text. Panics if that takes longer than 60 seconds.
    pub async fn read_stream(
        &self,
        path: &str,
        until: impl Fn(&str) -> bool,
    ) -> (StatusCode, String) {
        self.read_stream_with(path, &[], until).await
    }

    /// [`HttpClient::read_stream`] with more request headers (a cookie, say).
    pub async fn read_stream_with(
        &self,
        path: &str,
        headers: &[(&str, &str)],
        until: impl Fn(&str) -> bool,
    ) -> (StatusCode, String) {
        tokio::time::timeout(
            std::time::Duration::from_secs(60),
            self.read_stream_unbounded(path, headers, until),
        )
        .await
        .unwrap_or_else(|_| panic!("reading the stream of {path} took over 60 seconds"))
    }

    async fn read_stream_unbounded(
        &self,
        path: &str,
        headers: &[(&str, &str)],
        until: impl Fn(&str) -> bool,
    ) -> (StatusCode, String) {
        let mut builder = Request::builder().uri(format!("{}{path}", self.base));
        if let Some(token) = &self.bearer {
            builder = builder.header("authorization", format!("Bearer {token}"));
        }
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        let request = builder
            .body(Full::new(Bytes::new()))
            .expect("a valid request");
        let response = self.client.request(request).await.expect("request sent");
        let status = response.status();
        let mut body = response.into_body();
        let mut text = String::new();
        while let Some(frame) = body.frame().await {
            let Ok(frame) = frame else { break };
            if let Some(data) = frame.data_ref() {
                text.push_str(&String::from_utf8_lossy(data));
                if until(&text) {
                    break;
                }
            }
        }
        (status, text)
    }
}
