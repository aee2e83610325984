//! The guard every request passes: the `Host`/`Origin` allow-list, authentication, the
//! per-principal rate limit, and the audit record of what the request did.
//!
//! Order matters and is fixed here: a request for a host that is not allowed is refused
//! before its credential is looked at; a credential is checked before any body is read; and the
//! audit record is written after the handler answered and before the answer leaves, replacing
//! a successful answer by `503` when the record cannot be stored. Only the routes of
//! [`is_public`] are reached without a credential.

use std::net::IpAddr;
use std::sync::Arc;

use capstan_protocol::{AuditAction, AuditOutcome, AuditRecord};
use poem::http::{HeaderValue, Method, StatusCode, header};
use poem::{Endpoint, IntoResponse, Middleware, Request, Response};

use crate::audit::{AuditSlot, Auditor};
use crate::auth::Principal;
use crate::auth::authenticator::{AuthError, Authenticator};
use crate::auth::limits::Limits;
use crate::problem::{self, ApiError};

/// The response header carrying the request's id (also in its audit record).
pub const REQUEST_ID: &str = "x-request-id";

/// What the guard needs.
#[derive(Debug)]
pub struct Security {
    /// Checks credentials.
    pub authenticator: Arc<Authenticator>,
    /// Rate limits.
    pub limits: Arc<Limits>,
    /// Stores audit records.
    pub auditor: Auditor,
    /// Hosts and origins allowed.
    pub hosts: Hosts,
    /// Proxies whose `X-Forwarded-For` is believed.
    pub trusted_proxies: Vec<IpAddr>,
}

/// The client's address, as the guard established it: the peer's, or behind a trusted proxy
/// the nearest address the proxies did not add. In the request's extensions.
#[derive(Debug, Clone, Copy)]
pub struct ClientAddress(pub Option<IpAddr>);

/// The client of a request from `peer` with `headers`: `peer` itself, unless it is a trusted
/// proxy, in which case `X-Forwarded-For` is read from the right, skipping trusted proxies, up
/// to the first address they did not add. Anything a client could have written itself (the
/// left part of the header) is never taken.
pub fn client_address(
    peer: Option<IpAddr>,
    headers: &poem::http::HeaderMap,
    trusted: &[IpAddr],
) -> Option<IpAddr> {
    let peer = peer?;
    if !trusted.contains(&peer) {
        return Some(peer);
    }
    let forwarded: Vec<IpAddr> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .map(|a| a.parse::<IpAddr>().ok())
        .collect::<Option<Vec<_>>>()
        .unwrap_or_default();
    Some(
        forwarded
            .into_iter()
            .rev()
            .find(|address| !trusted.contains(address))
            .unwrap_or(peer),
    )
}

/// Routes reached without a credential: health, the API's description, and the login
/// endpoints (which check a password or a refresh token themselves).
pub fn is_public(method: &Method, path: &str) -> bool {
    let path = path.trim_end_matches('/');
    matches!(path, "/healthz" | "/readyz" | "/openapi.json" | "/docs")
        || path.starts_with("/docs/")
        || (method == Method::POST
            && matches!(
                path,
                "/api/v1/auth/login" | "/api/v1/auth/refresh" | "/api/v1/auth/logout"
            ))
}

/// The hosts requests may be addressed to and the origins browsers may send them from: a
/// page on another site cannot reach a local API through DNS rebinding (its `Host` is the
/// attacker's name) nor call it cross-origin (its `Origin` is not listed).
#[derive(Debug, Clone)]
pub struct Hosts {
    any: bool,
    /// `host` (any port) or `host:port`, lower case.
    allowed: Vec<String>,
    origins: Vec<String>,
}

impl Hosts {
    /// The allow-list: `configured` hosts, or when none, the listen address and localhost on
    /// its port; `origins` for CORS.
    pub fn new(configured: &[String], listen: &std::net::SocketAddr, origins: &[String]) -> Self {
        let mut allowed: Vec<String> = configured
            .iter()
            .map(|h| h.trim().to_ascii_lowercase())
            .filter(|h| !h.is_empty())
            .collect();
        let any = allowed.iter().any(|h| h == "*");
        if allowed.is_empty() {
            let port = listen.port();
            allowed = vec![
                listen.to_string(),
                format!("localhost:{port}"),
                format!("127.0.0.1:{port}"),
                format!("[::1]:{port}"),
            ];
            if port == 80 {
                allowed.extend(["localhost".into(), "127.0.0.1".into(), "[::1]".into()]);
            }
        }
        Self {
            any,
            allowed,
            origins: origins
                .iter()
                .map(|o| o.trim().trim_end_matches('/').to_ascii_lowercase())
                .filter(|o| !o.is_empty())
                .collect(),
        }
    }

    fn host_allowed(&self, host: &str) -> bool {
        if self.any {
            return true;
        }
        let host = host.to_ascii_lowercase();
        let bare = match host.rsplit_once(':') {
            Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
            _ => host.as_str(),
        };
        self.allowed.iter().any(|a| *a == host || *a == bare)
    }

    /// Checks a request's `Host` and `Origin`; the reason when refused. Without a `Host`
    /// header (HTTP/2), the authority of the request's URI stands for it.
    pub fn check(
        &self,
        headers: &poem::http::HeaderMap,
        authority: Option<&str>,
    ) -> Result<(), String> {
        let host = headers
            .get(header::HOST)
            .and_then(|v| v.to_str().ok())
            .or(authority)
            .unwrap_or("");
        if !self.host_allowed(host) {
            return Err(format!(
                "requests for the host `{}` are not served here (CAPSTAN_API_ALLOWED_HOSTS)",
                host.chars().take(100).collect::<String>()
            ));
        }
        if let Some(origin) = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) {
            let origin = origin.trim_end_matches('/').to_ascii_lowercase();
            let authority = origin.split_once("://").map(|(_, rest)| rest);
            let same_origin = authority == Some(host.to_ascii_lowercase().as_str());
            if !same_origin && !self.origins.contains(&origin) {
                return Err(format!(
                    "requests from the origin `{}` are not allowed (CAPSTAN_API_CORS_ORIGINS)",
                    origin.chars().take(100).collect::<String>()
                ));
            }
        }
        Ok(())
    }
}

/// The guard, as a poem middleware.
pub struct Guard(pub Arc<Security>);

impl<E: Endpoint> Middleware<E> for Guard {
    type Output = GuardEndpoint<E>;

    fn transform(&self, inner: E) -> Self::Output {
        GuardEndpoint {
            inner,
            security: self.0.clone(),
        }
    }
}

/// The guarded endpoint.
pub struct GuardEndpoint<E> {
    inner: E,
    security: Arc<Security>,
}

/// What is known of a request before it is handled, for its audit record.
struct Context {
    request_id: String,
    client: Option<IpAddr>,
    method: Method,
    path: String,
    slot: Arc<AuditSlot>,
    principal: Option<Principal>,
}

impl<E: Endpoint> Endpoint for GuardEndpoint<E> {
    type Output = Response;

    async fn call(&self, mut request: Request) -> poem::Result<Response> {
        let slot = Arc::new(AuditSlot::default());
        request.extensions_mut().insert(slot.clone());
        let client = client_address(
            request.remote_addr().as_socket_addr().map(|a| a.ip()),
            request.headers(),
            &self.security.trusted_proxies,
        );
        request.extensions_mut().insert(ClientAddress(client));
        let mut context = Context {
            request_id: ulid::Ulid::generate().to_string(),
            client,
            method: request.method().clone(),
            path: request.uri().path().to_owned(),
            slot,
            principal: None,
        };

        let authority = request.uri().authority().map(|a| a.as_str().to_owned());
        if let Err(reason) = self
            .security
            .hosts
            .check(request.headers(), authority.as_deref())
        {
            context.slot.action(AuditAction::AuthHostRefused, None);
            context.slot.detail(reason.clone());
            let refused = ApiError::forbidden(reason).into_response();
            return Ok(self.finish(context, refused).await);
        }

        if !is_public(&context.method, &context.path) {
            match self
                .security
                .authenticator
                .authenticate(request.headers())
                .await
            {
                Ok(principal) => {
                    if let Err(limited) = self.security.limits.request(&principal.name) {
                        context.principal = Some(principal);
                        context.slot.detail(limited.describe());
                        let refused = ApiError::from(limited).into_response();
                        return Ok(self.finish(context, refused).await);
                    }
                    request.extensions_mut().insert(principal.clone());
                    context.principal = Some(principal);
                }
                Err(error) => {
                    context.slot.detail(error.to_string());
                    let guessing = matches!(error, AuthError::Missing | AuthError::Invalid(_));
                    if guessing
                        && let Err(limited) = self.security.limits.failed_credential(context.client)
                    {
                        context.slot.detail(limited.describe());
                        let refused = ApiError::from(limited).into_response();
                        return Ok(self.finish(context, refused).await);
                    }
                    let refused = match error {
                        AuthError::Missing | AuthError::Invalid(_) => {
                            ApiError::unauthorized(error.to_string())
                        }
                        AuthError::NoRole(_) => ApiError::forbidden(error.to_string()),
                        AuthError::Unavailable(_) => ApiError::unavailable(error.to_string()),
                    };
                    return Ok(self.finish(context, refused.into_response()).await);
                }
            }
        }

        let response = match self.inner.call(request).await {
            Ok(output) => output.into_response(),
            Err(error) => problem::render(error),
        };
        Ok(self.finish(context, response).await)
    }
}

impl<E> GuardEndpoint<E> {
    /// Audits the request if it is to be audited, then returns the response to send.
    async fn finish(&self, context: Context, mut response: Response) -> Response {
        if let Ok(value) = HeaderValue::from_str(&context.request_id) {
            response.headers_mut().insert(REQUEST_ID, value);
        }
        let status = response.status();
        let note = context.slot.note();
        let changing = !matches!(context.method, Method::GET | Method::HEAD | Method::OPTIONS);
        let refused = matches!(
            status,
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN | StatusCode::TOO_MANY_REQUESTS
        );
        if !(changing || refused || note.action.is_some()) {
            return response;
        }
        let record = record(&context, &note, status);
        if let Err(error) = self.security.auditor.record(&record).await {
            tracing::error!(error = %error, action = record.action.as_str(), "cannot store an audit record");
            if status.is_success() {
                return ApiError::unavailable(
                    "the action could not be recorded in the audit trail; it may have taken \
                     effect: check before repeating it",
                )
                .into_response();
            }
        }
        response
    }
}

/// The audit record of a request that ended with `status`. A refusal for who asked (403, 429)
/// is filed under `auth.denied` or `auth.rate_limited`, whatever it was refused for, so that
/// one filter finds them all; the action asked for is kept in the detail.
fn record(context: &Context, note: &crate::audit::AuditNote, status: StatusCode) -> AuditRecord {
    let asked = note.action;
    let (action, outcome) = match status.as_u16() {
        403 if asked != Some(AuditAction::AuthHostRefused) => {
            (AuditAction::AuthDenied, AuditOutcome::Denied)
        }
        403 => (AuditAction::AuthHostRefused, AuditOutcome::Denied),
        429 => (AuditAction::AuthRateLimited, AuditOutcome::Denied),
        401 => (
            asked.unwrap_or(AuditAction::AuthUnauthenticated),
            AuditOutcome::Failure,
        ),
        code if code >= 500 => (
            asked.unwrap_or(AuditAction::HttpRequest),
            AuditOutcome::Error,
        ),
        code if code >= 400 => (
            asked.unwrap_or(AuditAction::HttpRequest),
            AuditOutcome::Failure,
        ),
        _ => (
            asked.unwrap_or(AuditAction::HttpRequest),
            AuditOutcome::Success,
        ),
    };
    let detail = match (asked, note.detail.clone()) {
        (Some(asked), detail) if asked != action => Some(match detail {
            Some(detail) => format!("{asked}: {detail}"),
            None => asked.to_string(),
        }),
        (_, detail) => detail,
    };
    let mut record = AuditRecord::new(action, outcome);
    record.principal = context
        .principal
        .as_ref()
        .map(|p| p.name.clone())
        .or_else(|| note.claimed.clone());
    record.via = context.principal.as_ref().map(|p| p.via);
    record.token = context
        .principal
        .as_ref()
        .and_then(|p| p.token.as_ref().map(|t| t.name.clone()));
    record.resource = note
        .resource
        .clone()
        .or_else(|| Some(format!("{} {}", context.method, cut(&context.path, 200))));
    record.status = Some(status.as_u16());
    record.client = context.client.map(|ip| ip.to_string());
    record.request_id = Some(context.request_id.clone());
    record.trace_id = capstan_telemetry::propagation::trace_id();
    record.detail = detail.map(|d| cut(&d, 1000));
    record
}

fn cut(text: &str, max: usize) -> String {
    text.chars().take(max).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> poem::http::HeaderMap {
        let mut map = poem::http::HeaderMap::new();
        for (name, value) in pairs {
            map.insert(*name, value.parse().expect("valid"));
        }
        map
    }

    #[test]
    fn only_a_trusted_proxy_names_the_client_and_only_from_the_right() {
        let proxy: IpAddr = "10.0.0.2".parse().expect("an address");
        let forwarded = |value: &str| headers(&[("x-forwarded-for", value)]);
        let client = "203.0.113.7".parse().ok();
        // From a trusted proxy: the nearest address it did not add.
        assert_eq!(
            client_address(
                Some(proxy),
                &forwarded("198.51.100.1, 203.0.113.7"),
                &[proxy]
            ),
            client
        );
        // The header of anyone else is ignored.
        let stranger = "192.0.2.9".parse().ok();
        assert_eq!(
            client_address(stranger, &forwarded("203.0.113.7"), &[proxy]),
            stranger
        );
        // A garbled header is not trusted at all.
        assert_eq!(
            client_address(Some(proxy), &forwarded("not-an-address"), &[proxy]),
            Some(proxy)
        );
    }

    #[test]
    fn only_health_docs_and_login_endpoints_are_public() {
        assert!(is_public(&Method::GET, "/healthz"));
        assert!(is_public(&Method::GET, "/docs/index.html"));
        assert!(is_public(&Method::POST, "/api/v1/auth/login"));
        assert!(!is_public(&Method::GET, "/api/v1/auth/login"));
        assert!(!is_public(&Method::GET, "/metrics"));
        assert!(!is_public(&Method::GET, "/api/v1/jobs"));
        assert!(!is_public(&Method::GET, "/docsx"));
    }

    #[test]
    fn by_default_only_the_listen_address_and_localhost_are_served() {
        let listen: std::net::SocketAddr = "127.0.0.1:8080".parse().expect("valid");
        let hosts = Hosts::new(&[], &listen, &[]);
        assert!(
            hosts
                .check(&headers(&[("host", "127.0.0.1:8080")]), None)
                .is_ok()
        );
        assert!(
            hosts
                .check(&headers(&[("host", "LOCALHOST:8080")]), None)
                .is_ok()
        );
        assert!(
            hosts
                .check(&headers(&[("host", "rebind.attacker.example:8080")]), None)
                .is_err()
        );
        assert!(hosts.check(&headers(&[]), None).is_err());
        assert!(hosts.check(&headers(&[]), Some("127.0.0.1:8080")).is_ok());
    }

    #[test]
    fn cross_origin_requests_need_a_listed_origin() {
        let listen: std::net::SocketAddr = "0.0.0.0:8080".parse().expect("valid");
        let hosts = Hosts::new(
            &["api.example.com".into()],
            &listen,
            &["https://ops.example.com".into()],
        );
        let same = headers(&[
            ("host", "api.example.com"),
            ("origin", "http://api.example.com"),
        ]);
        assert!(hosts.check(&same, None).is_ok());
        let listed = headers(&[
            ("host", "api.example.com:443"),
            ("origin", "https://ops.example.com"),
        ]);
        assert!(hosts.check(&listed, None).is_ok());
        let other = headers(&[
            ("host", "api.example.com"),
            ("origin", "https://evil.example"),
        ]);
        assert!(hosts.check(&other, None).is_err());
        let any = Hosts::new(&["*".into()], &listen, &[]);
        assert!(any.check(&headers(&[("host", "whatever:1")]), None).is_ok());
    }
}
