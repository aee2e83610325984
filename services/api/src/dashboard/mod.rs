//! The web dashboard, served by the API at `/` and `/ui/…`: server-rendered pages with a
//! little script for live updates, its styles and script embedded in the binary.
//!
//! The dashboard is a client of the REST API that lives in the same process. It holds no
//! permission of its own: each page reads, and each form acts, through an in-process request
//! to the API carrying the browser's session token ([`session::Session`]), so the guard
//! authenticates, rate-limits and audits it exactly as it would a request from outside.
//! What the dashboard adds is the browser's side: session cookies, a CSRF token on every
//! form, and pages.
//!
//! Module map: `session` (cookies, CSRF, the in-process calls), `html` (escaping, layout),
//! `pages` (each page), `automation` (the schedules' and workflows' pages), `live` (the events
//! follower and the mesh's health).

mod automation;
mod html;
mod live;
mod pages;
mod session;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use poem::http::{HeaderValue, Method, StatusCode, header};
use poem::web::sse::{Event, SSE};
use poem::{Endpoint, IntoResponse, Request, Response};
use serde_json::{Value, json};

pub use live::Live;
use pages::{AuditFilters, JobFilters, Reader};
pub use session::Api;
use session::{
    ACCESS_COOKIE, CSRF_COOKIE, REFRESH_COOKIE, Renewals, Session, Tokens, cookie, csrf_matches,
    over_tls, random_token, set_cookie,
};

use crate::guard::Security;

/// The stylesheet.
const CSS: &str = include_str!("assets/app.css");
/// The script: live updates, output streaming, local times.
const JS: &str = include_str!("assets/app.js");
/// The icon.
const ICON: &str = include_str!("assets/icon.svg");
/// The largest form the dashboard reads.
const MAX_FORM_BYTES: usize = 256 * 1024;
/// What pages may load and where they may send: only this origin, no inline script.
const CONTENT_SECURITY_POLICY: &str = "default-src 'self'; script-src 'self'; \
    style-src 'self'; img-src 'self' data:; connect-src 'self'; form-action 'self'; \
    frame-ancestors 'none'; base-uri 'none'; object-src 'none'";

/// Whether `path` is the dashboard's (with the icon browsers ask every site for).
pub fn owns(path: &str) -> bool {
    matches!(path, "/" | "/ui" | "/favicon.ico") || path.starts_with("/ui/")
}

/// The API and its dashboard on one listener: the dashboard's paths ([`owns`]) go to the
/// dashboard, which reaches the API in-process; every other path goes to the API.
pub struct Front {
    /// The guarded REST routes.
    pub api: Api,
    /// The dashboard.
    pub pages: Arc<Dashboard>,
}

impl Endpoint for Front {
    type Output = Response;

    async fn call(&self, request: Request) -> poem::Result<Response> {
        if owns(request.uri().path()) {
            self.pages.call(request).await
        } else {
            poem::endpoint::DynEndpoint::call(&*self.api, request).await
        }
    }
}

/// The dashboard endpoint.
pub struct Dashboard {
    api: Api,
    renewals: Renewals,
    live: Arc<Live>,
    security: Arc<Security>,
    metrics: Arc<crate::metrics::Metrics>,
    refresh_ttl: Duration,
}

impl Dashboard {
    /// The dashboard over `api` (the guarded REST routes) of the API whose state is `state`.
    pub fn new(api: Api, state: &crate::State) -> Self {
        Self {
            api,
            renewals: Renewals::default(),
            live: state.live.clone(),
            security: state.security.clone(),
            metrics: state.metrics.clone(),
            refresh_ttl: state.access.refresh_token_ttl,
        }
    }
}

/// What a handler answers: a page, a redirect or a stream, plus cookies to set.
struct Outcome {
    response: Response,
    cookies: Vec<HeaderValue>,
}

impl From<Response> for Outcome {
    fn from(response: Response) -> Self {
        Self {
            response,
            cookies: Vec::new(),
        }
    }
}

fn see_other(location: &str) -> Response {
    Response::builder()
        .status(StatusCode::SEE_OTHER)
        .header(header::LOCATION, location)
        .finish()
}

fn html_page(status: StatusCode, body: String) -> Response {
    Response::builder()
        .status(status)
        .content_type("text/html; charset=utf-8")
        .body(body)
}

impl Endpoint for Dashboard {
    type Output = Response;

    async fn call(&self, request: Request) -> poem::Result<Response> {
        let authority = request.uri().authority().map(|a| a.as_str().to_owned());
        if let Err(reason) = self
            .security
            .hosts
            .check(request.headers(), authority.as_deref())
        {
            let action = capstan_protocol::AuditAction::AuthHostRefused;
            self.refused(&request, action, reason.clone()).await;
            return Ok(html_page(StatusCode::FORBIDDEN, html::alert(&reason)));
        }
        let secure = over_tls(&request, &self.security.trusted_proxies);
        let Outcome {
            mut response,
            mut cookies,
        } = self.route(request).await;
        let headers = response.headers_mut();
        for value in cookies.drain(..) {
            headers.append(header::SET_COOKIE, value);
        }
        if secure {
            // Cookies are written without `Secure`; served over TLS, they gain it.
            let values: Vec<HeaderValue> = headers
                .get_all(header::SET_COOKIE)
                .iter()
                .cloned()
                .collect();
            headers.remove(header::SET_COOKIE);
            for value in values {
                let line = format!("{}; Secure", value.to_str().unwrap_or_default());
                if let Ok(value) = HeaderValue::from_str(&line) {
                    headers.append(header::SET_COOKIE, value);
                }
            }
        }
        headers.insert(
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(CONTENT_SECURITY_POLICY),
        );
        headers.insert(
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        );
        headers.insert(
            header::REFERRER_POLICY,
            HeaderValue::from_static("same-origin"),
        );
        headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
        headers
            .entry(header::CACHE_CONTROL)
            .or_insert(HeaderValue::from_static("no-store"));
        Ok(response)
    }
}

/// Where a page sits: its title, its navigation entry, and where it listens for changes.
struct Place<'a> {
    title: &'a str,
    section: &'a str,
    live: Option<String>,
}

/// A form posted to the dashboard.
type Form = HashMap<String, String>;

impl Dashboard {
    async fn route(&self, request: Request) -> Outcome {
        let method = request.method().clone();
        let path = request.uri().path().to_owned();
        let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
        match (&method, segments.as_slice()) {
            (&Method::GET, [""] | ["ui"]) => see_other("/ui/jobs").into(),
            (&Method::GET, ["ui", "assets", "app.css"]) => asset(CSS, "text/css; charset=utf-8"),
            (&Method::GET, ["favicon.ico"] | ["ui", "assets", "icon.svg"]) => {
                asset(ICON, "image/svg+xml")
            }
            (&Method::GET, ["ui", "assets", "app.js"]) => {
                asset(JS, "text/javascript; charset=utf-8")
            }
            (&Method::GET, ["ui", "login"]) => self.login_page(&request, None, StatusCode::OK),
            (&Method::POST, ["ui", "login"]) => self.login(request).await,
            (&Method::POST, ["ui", "logout"]) => self.logout(request).await,
            (&Method::GET, ["ui", "live"]) => self.live(request).await,
            (&Method::GET, ["ui", "jobs"]) => self.jobs(request, None).await,
            (&Method::POST, ["ui", "jobs"]) => self.submit(request).await,
            (&Method::GET, ["ui", "jobs", id]) => {
                let id = (*id).to_owned();
                self.job(request, &id, None).await
            }
            (&Method::GET, ["ui", "jobs", id, "output"]) => {
                let id = (*id).to_owned();
                self.output(request, &id).await
            }
            (&Method::POST, ["ui", "jobs", id, action @ ("cancel" | "resubmit")]) => {
                let (id, action) = ((*id).to_owned(), (*action).to_owned());
                self.job_action(request, &id, &action).await
            }
            (&Method::GET, ["ui", "nodes"]) => self.nodes(request, None).await,
            (
                &Method::POST,
                [
                    "ui",
                    "nodes",
                    id,
                    action @ ("cordon" | "uncordon" | "drain"),
                ],
            ) => {
                let (id, action) = ((*id).to_owned(), (*action).to_owned());
                self.node_action(request, &id, &action).await
            }
            (&Method::GET, ["ui", "systems"]) => self.systems(request).await,
            (&Method::GET, ["ui", "schedules"]) => self.schedules(request, None).await,
            (
                &Method::POST,
                [
                    "ui",
                    "schedules",
                    name,
                    action @ ("pause" | "resume" | "trigger"),
                ],
            ) => {
                let (name, action) = ((*name).to_owned(), (*action).to_owned());
                self.schedule_action(request, &name, &action).await
            }
            (&Method::GET, ["ui", "workflows"]) => self.workflows(request).await,
            (&Method::GET, ["ui", "workflows", id]) => {
                let id = (*id).to_owned();
                self.workflow(request, &id, None).await
            }
            (&Method::POST, ["ui", "workflows", id, "cancel"]) => {
                let id = (*id).to_owned();
                self.workflow_cancel(request, &id).await
            }
            (&Method::GET, ["ui", "audit"]) => self.audit(request).await,
            (_, ["ui", "assets", ..]) | (&Method::GET, _) => {
                html_page(StatusCode::NOT_FOUND, html::alert("There is no such page.")).into()
            }
            _ => Response::builder()
                .status(StatusCode::METHOD_NOT_ALLOWED)
                .header(header::ALLOW, "GET")
                .finish()
                .into(),
        }
    }

    /// The browser's session and who it is, or the redirect to the login page.
    async fn open(&self, request: &Request) -> Result<(Session<'_>, Reader), Outcome> {
        let mut session = Session::of(request, &self.api, &self.renewals);
        let reader = self.reader(&mut session, request).await?;
        Ok((session, reader))
    }

    /// The reader of `session`, or the redirect to the login page.
    async fn reader(
        &self,
        session: &mut Session<'_>,
        request: &Request,
    ) -> Result<Reader, Outcome> {
        let back_to_login = || {
            let next = request
                .uri()
                .path_and_query()
                .map_or("/ui/jobs", |p| p.as_str())
                .to_owned();
            let query = serde_urlencoded::to_string([("next", next)]).unwrap_or_default();
            Outcome {
                response: see_other(&format!("/ui/login?{query}")),
                cookies: Vec::new(),
            }
        };
        if !session.present() {
            return Err(back_to_login());
        }
        let me = session.call(Method::GET, "/api/v1/users/me", None).await;
        match me.status {
            status if status.is_success() => Ok(Reader::of(&me.body)),
            StatusCode::UNAUTHORIZED => {
                let mut outcome = back_to_login();
                outcome.cookies = self.clearing();
                Err(outcome)
            }
            _ => Err(self.failure(&me.problem(), me.status)),
        }
    }

    fn failure(&self, message: &str, status: StatusCode) -> Outcome {
        let frame = html::Frame {
            title: "Something went wrong",
            section: "",
            user: None,
            audit: false,
            csrf: "",
            mesh: "",
            live: None,
        };
        html_page(
            status,
            html::page(
                &frame,
                &format!(
                    "{}<p><a href=\"/ui/jobs\">Back to the jobs</a></p>",
                    html::alert(message)
                ),
            ),
        )
        .into()
    }

    /// Cookies that end the browser's session.
    fn clearing(&self) -> Vec<HeaderValue> {
        [ACCESS_COOKIE, REFRESH_COOKIE]
            .iter()
            .map(|name| set_cookie(name, "", Duration::ZERO))
            .collect()
    }

    /// Cookies carrying renewed tokens.
    fn session_cookies(&self, tokens: &Tokens) -> Vec<HeaderValue> {
        vec![
            set_cookie(ACCESS_COOKIE, &tokens.access, self.refresh_ttl),
            set_cookie(REFRESH_COOKIE, &tokens.refresh, self.refresh_ttl),
        ]
    }

    /// A full page for `reader`, with the session's renewed cookies.
    async fn render(
        &self,
        session: &Session<'_>,
        reader: &Reader,
        csrf: &str,
        place: Place<'_>,
        body: &str,
    ) -> Outcome {
        let Place {
            title,
            section,
            live,
        } = place;
        let mesh = pages::mesh(&*self.live.health().await);
        let frame = html::Frame {
            title,
            section,
            user: Some((&reader.name, &reader.role)),
            audit: reader.can("audit:read"),
            csrf,
            mesh: &mesh,
            live,
        };
        Outcome {
            response: html_page(StatusCode::OK, html::page(&frame, body)),
            cookies: session
                .renewed
                .as_ref()
                .map(|t| self.session_cookies(t))
                .unwrap_or_default(),
        }
    }

    fn login_page(&self, request: &Request, error: Option<&str>, status: StatusCode) -> Outcome {
        let (csrf, cookies) = match cookie(request.headers(), CSRF_COOKIE) {
            Some(token) => (token, Vec::new()),
            None => {
                let token = random_token();
                let set = set_cookie(CSRF_COOKIE, &token, self.refresh_ttl);
                (token, vec![set])
            }
        };
        let next = query_of::<HashMap<String, String>>(request)
            .remove("next")
            .unwrap_or_default();
        let frame = html::Frame {
            title: "Log in",
            section: "",
            user: None,
            audit: false,
            csrf: &csrf,
            mesh: "",
            live: None,
        };
        Outcome {
            response: html_page(
                status,
                html::page(&frame, &pages::login(&csrf, &next, error)),
            ),
            cookies,
        }
    }

    /// Reads a posted form and checks its CSRF token against the cookie.
    async fn form(&self, request: &mut Request) -> Result<Form, Outcome> {
        let body = request.take_body().into_bytes_limit(MAX_FORM_BYTES).await;
        let form: Form = body
            .ok()
            .and_then(|bytes| serde_urlencoded::from_bytes(&bytes).ok())
            .ok_or_else(|| self.failure("the form could not be read", StatusCode::BAD_REQUEST))?;
        let expected = cookie(request.headers(), CSRF_COOKIE);
        if !csrf_matches(expected.as_deref(), form.get("csrf").map(String::as_str)) {
            self.refused(
                request,
                capstan_protocol::AuditAction::AuthDenied,
                "a dashboard form without this browser's CSRF token".into(),
            )
            .await;
            return Err(self.failure(
                "This form was refused: its CSRF token is missing or does not match this \
                 browser's session. Reload the page and try again.",
                StatusCode::FORBIDDEN,
            ));
        }
        Ok(form)
    }

    /// Files a request the dashboard refused itself in the audit trail: a form without its
    /// CSRF token (what a forged cross-site post looks like), a foreign host or origin.
    async fn refused(
        &self,
        request: &Request,
        action: capstan_protocol::AuditAction,
        detail: String,
    ) {
        let client = crate::guard::client_address(
            request.remote_addr().as_socket_addr().map(|a| a.ip()),
            request.headers(),
            &self.security.trusted_proxies,
        );
        let mut record =
            capstan_protocol::AuditRecord::new(action, capstan_protocol::AuditOutcome::Denied);
        let path: String = request.uri().path().chars().take(200).collect();
        record.resource = Some(format!("{} {path}", request.method()));
        record.status = Some(StatusCode::FORBIDDEN.as_u16());
        record.client = client.map(|ip| ip.to_string());
        record.trace_id = capstan_telemetry::propagation::trace_id();
        record.detail = Some(detail.chars().take(1000).collect());
        if let Err(error) = self.security.auditor.record(&record).await {
            tracing::error!(error = %error, "cannot store an audit record");
        }
    }

    async fn login(&self, mut request: Request) -> Outcome {
        let form = match self.form(&mut request).await {
            Ok(form) => form,
            Err(refused) => return refused,
        };
        let mut session = Session::of(&request, &self.api, &self.renewals);
        let body = json!({
            "username": form.get("username").map(String::as_str).unwrap_or(""),
            "password": form.get("password").map(String::as_str).unwrap_or(""),
        });
        let answer = session.call_public("/api/v1/auth/login", &body).await;
        let tokens = answer
            .status
            .is_success()
            .then(|| Tokens::of(&answer.body))
            .flatten();
        let Some(tokens) = tokens else {
            let status = if answer.status.is_client_error() {
                StatusCode::UNAUTHORIZED
            } else {
                answer.status
            };
            return self.login_page(&request, Some(&answer.problem()), status);
        };
        let next = form
            .get("next")
            .filter(|next| next.starts_with("/ui/") && !next.starts_with("//"))
            .map_or("/ui/jobs", String::as_str);
        let mut cookies = self.session_cookies(&tokens);
        // A new CSRF token for the new session.
        cookies.push(set_cookie(CSRF_COOKIE, &random_token(), self.refresh_ttl));
        Outcome {
            response: see_other(next),
            cookies,
        }
    }

    async fn logout(&self, mut request: Request) -> Outcome {
        if let Err(refused) = self.form(&mut request).await {
            return refused;
        }
        let mut session = Session::of(&request, &self.api, &self.renewals);
        if let Some(refresh) = session.refresh_token().map(str::to_owned) {
            let answer = session
                .call_public("/api/v1/auth/logout", &json!({ "refresh_token": refresh }))
                .await;
            if answer.status.is_server_error() {
                return self.failure(&answer.problem(), answer.status);
            }
        }
        Outcome {
            response: see_other("/ui/login"),
            cookies: self.clearing(),
        }
    }

    async fn jobs(&self, request: Request, notice: Option<&str>) -> Outcome {
        let (mut session, reader) = match self.open(&request).await {
            Ok(opened) => opened,
            Err(outcome) => return outcome,
        };
        let filters: JobFilters = query_of(&request);
        let mut query: Vec<(&str, String)> = vec![("limit", "50".into())];
        for (key, value) in [
            ("status", &filters.status),
            ("label", &filters.label),
            ("name", &filters.name),
            ("node", &filters.node),
            ("submitted_by", &filters.submitted_by),
            ("cursor", &filters.cursor),
        ] {
            if !value.trim().is_empty() {
                query.push((key, value.trim().to_owned()));
            }
        }
        if let Some((_, _, seconds)) = pages::RANGES
            .iter()
            .find(|(key, _, _)| *key == filters.range)
        {
            let since = capstan_protocol::Timestamp::now().as_millis() - seconds * 1000;
            query.push((
                "since",
                capstan_protocol::Timestamp::from_millis(since).to_rfc3339(),
            ));
        }
        let path = format!(
            "/api/v1/jobs?{}",
            serde_urlencoded::to_string(&query).unwrap_or_default()
        );
        let answer = session.call(Method::GET, &path, None).await;
        let (page, notice) = if answer.status.is_success() {
            (answer.body, notice.map(str::to_owned))
        } else {
            (json!({"jobs": []}), Some(answer.problem()))
        };
        let csrf = cookie(request.headers(), CSRF_COOKIE).unwrap_or_default();
        let body = pages::jobs(&reader, &csrf, &filters, &page, notice.as_deref());
        self.render(
            &session,
            &reader,
            &csrf,
            Place {
                title: "Jobs",
                section: "jobs",
                live: Some("/ui/live".into()),
            },
            &body,
        )
        .await
    }

    async fn submit(&self, mut request: Request) -> Outcome {
        let form = match self.form(&mut request).await {
            Ok(form) => form,
            Err(refused) => return refused,
        };
        let mut session = Session::of(&request, &self.api, &self.renewals);
        let body = match submission(&form) {
            Ok(body) => body,
            Err(problem) => return self.jobs(request, Some(&problem)).await,
        };
        let answer = session
            .call(Method::POST, "/api/v1/jobs", Some(&body))
            .await;
        if answer.status == StatusCode::UNAUTHORIZED {
            return Outcome {
                response: see_other("/ui/login"),
                cookies: self.clearing(),
            };
        }
        match answer.body.get("id").and_then(Value::as_str) {
            Some(id) if answer.status.is_success() => Outcome {
                response: see_other(&format!("/ui/jobs/{id}")),
                cookies: renewed(&session, self),
            },
            _ => self.jobs(request, Some(&answer.problem())).await,
        }
    }

    async fn job(&self, request: Request, id: &str, notice: Option<&str>) -> Outcome {
        let (mut session, reader) = match self.open(&request).await {
            Ok(opened) => opened,
            Err(outcome) => return outcome,
        };
        let id = path_part(id);
        let answer = session
            .call(Method::GET, &format!("/api/v1/jobs/{id}"), None)
            .await;
        if !answer.status.is_success() {
            return self.failure(&answer.problem(), answer.status);
        }
        let events = session
            .call(Method::GET, &format!("/api/v1/jobs/{id}/events"), None)
            .await;
        let csrf = cookie(request.headers(), CSRF_COOKIE).unwrap_or_default();
        let body = pages::job(&reader, &csrf, &answer.body, &events.body, notice);
        let title = match html::field(&answer.body, "id") {
            "" => "Job".to_owned(),
            id => format!("Job {id}"),
        };
        self.render(
            &session,
            &reader,
            &csrf,
            Place {
                title: &title,
                section: "jobs",
                live: Some(format!("/ui/live?job={id}")),
            },
            &body,
        )
        .await
    }

    async fn job_action(&self, mut request: Request, id: &str, action: &str) -> Outcome {
        if let Err(refused) = self.form(&mut request).await {
            return refused;
        }
        let mut session = Session::of(&request, &self.api, &self.renewals);
        let id = path_part(id);
        let answer = match action {
            "cancel" => {
                session
                    .call(
                        Method::POST,
                        &format!("/api/v1/jobs/{id}/cancel"),
                        Some(&json!({})),
                    )
                    .await
            }
            _ => {
                let job = session
                    .call(Method::GET, &format!("/api/v1/jobs/{id}"), None)
                    .await;
                if !job.status.is_success() {
                    return self.job(request, &id, Some(&job.problem())).await;
                }
                let body = match resubmission(job.body.get("spec").unwrap_or(&Value::Null)) {
                    Ok(body) => body,
                    Err(problem) => return self.job(request, &id, Some(&problem)).await,
                };
                let answer = session
                    .call(Method::POST, "/api/v1/jobs", Some(&body))
                    .await;
                if let Some(new) = answer
                    .body
                    .get("id")
                    .and_then(Value::as_str)
                    .filter(|_| answer.status.is_success())
                {
                    return Outcome {
                        response: see_other(&format!("/ui/jobs/{new}")),
                        cookies: renewed(&session, self),
                    };
                }
                answer
            }
        };
        if answer.status.is_success() {
            Outcome {
                response: see_other(&format!("/ui/jobs/{id}")),
                cookies: renewed(&session, self),
            }
        } else {
            self.job(request, &id, Some(&answer.problem())).await
        }
    }

    async fn output(&self, request: Request, id: &str) -> Outcome {
        let mut session = Session::of(&request, &self.api, &self.renewals);
        let id = path_part(id);
        let response = session
            .stream(
                &format!("/api/v1/jobs/{id}/logs?follow=true"),
                "text/event-stream",
            )
            .await;
        Outcome {
            response,
            cookies: renewed(&session, self),
        }
    }

    async fn live(&self, request: Request) -> Outcome {
        let mut session = Session::of(&request, &self.api, &self.renewals);
        let reader = match self.reader(&mut session, &request).await {
            Ok(reader) => reader,
            Err(_) => {
                return Response::builder()
                    .status(StatusCode::UNAUTHORIZED)
                    .body("log in again")
                    .into();
            }
        };
        let only = query_of::<HashMap<String, String>>(&request).remove("job");
        let (jobs, nodes) = (reader.can("jobs:read"), reader.can("nodes:read"));
        let counted = self.metrics.live_page();
        let hints = tokio_stream_of(self.live.subscribe());
        let stream = hints
            .filter(move |hint| {
                let keep = match hint {
                    None => true,
                    Some(hint) => match (hint.topic, &only) {
                        ("job", Some(only)) => jobs && hint.id == *only,
                        ("job", None) => jobs,
                        ("node", None) => nodes,
                        _ => false,
                    },
                };
                futures::future::ready(keep)
            })
            .map(|hint| match hint {
                Some(hint) => Event::message(serde_json::to_string(&hint).unwrap_or_default())
                    .event_type("change"),
                // Some hints were missed: the page refreshes everything.
                None => Event::message("{}").event_type("resync"),
            })
            .take_until(tokio::time::sleep(live::STREAM_LIFETIME))
            // The stream holds its count: it ends when the page lets the stream go.
            .map(move |event| {
                let _held = &counted;
                event
            });
        Outcome {
            response: SSE::new(stream)
                .keep_alive(Duration::from_secs(5))
                .into_response(),
            cookies: renewed(&session, self),
        }
    }

    async fn nodes(&self, request: Request, notice: Option<&str>) -> Outcome {
        let place = Place {
            title: "Nodes",
            section: "nodes",
            live: Some("/ui/live".into()),
        };
        self.listing(request, "/api/v1/nodes", notice, place, pages::nodes)
            .await
    }

    async fn node_action(&self, mut request: Request, id: &str, action: &str) -> Outcome {
        let form = match self.form(&mut request).await {
            Ok(form) => form,
            Err(refused) => return refused,
        };
        let mut session = Session::of(&request, &self.api, &self.renewals);
        let id = path_part(id);
        let mut path = format!("/api/v1/nodes/{id}/{action}");
        if action == "drain" {
            let deadline = form.get("deadline").map(|d| d.trim()).unwrap_or("");
            let deadline = deadline.trim_end_matches('s').trim();
            if !deadline.is_empty() {
                match deadline.parse::<u64>() {
                    Ok(seconds) => path.push_str(&format!("?deadline_seconds={seconds}")),
                    Err(_) => {
                        return self
                            .nodes(
                                request,
                                Some("the drain deadline is a whole number of seconds"),
                            )
                            .await;
                    }
                }
            }
        }
        let answer = session.call(Method::POST, &path, None).await;
        if answer.status.is_success() {
            Outcome {
                response: see_other("/ui/nodes"),
                cookies: renewed(&session, self),
            }
        } else {
            self.nodes(request, Some(&answer.problem())).await
        }
    }

    async fn systems(&self, request: Request) -> Outcome {
        let place = Place {
            title: "Remote systems",
            section: "systems",
            live: Some("/ui/live".into()),
        };
        self.listing(
            request,
            "/api/v1/systems",
            None,
            place,
            |_, _, list, notice| with_notice(notice, pages::systems(list)),
        )
        .await
    }

    /// A page of the API's answer at `path`, rendered by `page` from the reader, the CSRF
    /// token, the answer (`null` when it is a problem) and the notice to show (the problem,
    /// or `notice`).
    async fn listing(
        &self,
        request: Request,
        path: &str,
        notice: Option<&str>,
        place: Place<'_>,
        page: impl FnOnce(&Reader, &str, &Value, Option<&str>) -> String,
    ) -> Outcome {
        let (mut session, reader) = match self.open(&request).await {
            Ok(opened) => opened,
            Err(outcome) => return outcome,
        };
        let answer = session.call(Method::GET, path, None).await;
        let (list, notice) = if answer.status.is_success() {
            (answer.body, notice.map(str::to_owned))
        } else {
            (Value::Null, Some(answer.problem()))
        };
        let csrf = cookie(request.headers(), CSRF_COOKIE).unwrap_or_default();
        let body = page(&reader, &csrf, &list, notice.as_deref());
        self.render(&session, &reader, &csrf, place, &body).await
    }

    async fn schedules(&self, request: Request, notice: Option<&str>) -> Outcome {
        let place = Place {
            title: "Schedules",
            section: "schedules",
            live: Some("/ui/live".into()),
        };
        self.listing(
            request,
            "/api/v1/schedules",
            notice,
            place,
            automation::schedules,
        )
        .await
    }

    /// Pauses, resumes or runs now (`action`) the schedule `name`; a run now leads to its job.
    async fn schedule_action(&self, mut request: Request, name: &str, action: &str) -> Outcome {
        if let Err(refused) = self.form(&mut request).await {
            return refused;
        }
        let mut session = Session::of(&request, &self.api, &self.renewals);
        let path = format!("/api/v1/schedules/{}/{action}", path_part(name));
        let answer = session.call(Method::POST, &path, None).await;
        if !answer.status.is_success() {
            return self.schedules(request, Some(&answer.problem())).await;
        }
        let next = match answer.body.get("id").and_then(Value::as_str) {
            Some(job) if action == "trigger" => format!("/ui/jobs/{}", path_part(job)),
            _ => "/ui/schedules".to_owned(),
        };
        Outcome {
            response: see_other(&next),
            cookies: renewed(&session, self),
        }
    }

    async fn workflows(&self, request: Request) -> Outcome {
        let place = Place {
            title: "Workflows",
            section: "workflows",
            live: Some("/ui/live".into()),
        };
        self.listing(
            request,
            "/api/v1/workflows",
            None,
            place,
            |_, _, list, notice| with_notice(notice, automation::workflows(list)),
        )
        .await
    }

    async fn workflow(&self, request: Request, id: &str, notice: Option<&str>) -> Outcome {
        let (mut session, reader) = match self.open(&request).await {
            Ok(opened) => opened,
            Err(outcome) => return outcome,
        };
        let id = path_part(id);
        let answer = session
            .call(Method::GET, &format!("/api/v1/workflows/{id}"), None)
            .await;
        if !answer.status.is_success() {
            return self.failure(&answer.problem(), answer.status);
        }
        let title = format!("Workflow {}", html::field(&answer.body, "name"));
        let csrf = cookie(request.headers(), CSRF_COOKIE).unwrap_or_default();
        let body = automation::workflow(&reader, &csrf, &answer.body, notice);
        self.render(
            &session,
            &reader,
            &csrf,
            Place {
                title: &title,
                section: "workflows",
                live: Some("/ui/live".into()),
            },
            &body,
        )
        .await
    }

    async fn workflow_cancel(&self, mut request: Request, id: &str) -> Outcome {
        if let Err(refused) = self.form(&mut request).await {
            return refused;
        }
        let mut session = Session::of(&request, &self.api, &self.renewals);
        let id = path_part(id);
        let answer = session
            .call(
                Method::POST,
                &format!("/api/v1/workflows/{id}/cancel"),
                None,
            )
            .await;
        if answer.status.is_success() {
            Outcome {
                response: see_other(&format!("/ui/workflows/{id}")),
                cookies: renewed(&session, self),
            }
        } else {
            self.workflow(request, &id, Some(&answer.problem())).await
        }
    }

    async fn audit(&self, request: Request) -> Outcome {
        let (mut session, reader) = match self.open(&request).await {
            Ok(opened) => opened,
            Err(outcome) => return outcome,
        };
        let filters: AuditFilters = query_of(&request);
        let mut query: Vec<(&str, &str)> = vec![("limit", "100")];
        for (key, value) in [
            ("principal", filters.principal.trim()),
            ("action", filters.action.trim()),
            ("outcome", filters.outcome.trim()),
            ("cursor", filters.cursor.trim()),
        ] {
            if !value.is_empty() {
                query.push((key, value));
            }
        }
        let path = format!(
            "/api/v1/audit?{}",
            serde_urlencoded::to_string(&query).unwrap_or_default()
        );
        let answer = session.call(Method::GET, &path, None).await;
        let mut body = String::new();
        if !answer.status.is_success() {
            body.push_str(&html::alert(&answer.problem()));
        }
        body.push_str(&pages::audit(&filters, &answer.body));
        let csrf = cookie(request.headers(), CSRF_COOKIE).unwrap_or_default();
        self.render(
            &session,
            &reader,
            &csrf,
            Place {
                title: "Audit trail",
                section: "audit",
                live: None,
            },
            &body,
        )
        .await
    }
}

/// The query string of `request` read as `T`; `T`'s default when it does not read.
fn query_of<T: serde::de::DeserializeOwned + Default>(request: &Request) -> T {
    request
        .uri()
        .query()
        .and_then(|q| serde_urlencoded::from_str(q).ok())
        .unwrap_or_default()
}

fn renewed(session: &Session<'_>, dashboard: &Dashboard) -> Vec<HeaderValue> {
    session
        .renewed
        .as_ref()
        .map(|t| dashboard.session_cookies(t))
        .unwrap_or_default()
}

fn asset(body: &'static str, content_type: &'static str) -> Outcome {
    Response::builder()
        .content_type(content_type)
        .header(header::CACHE_CONTROL, "public, max-age=300")
        .body(body)
        .into()
}

/// A path segment as it may be put into an API path: anything else than the characters ids
/// and names use is percent-encoded (the API then refuses it as it would from outside).
fn path_part(part: &str) -> String {
    let mut out = String::with_capacity(part.len());
    for byte in part.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_') {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// `page` under the alert of `notice`, if there is one.
fn with_notice(notice: Option<&str>, page: String) -> String {
    match notice {
        Some(notice) => html::alert(notice) + &page,
        None => page,
    }
}

/// Hints as a stream; `None` stands for hints that were missed.
fn tokio_stream_of(
    receiver: tokio::sync::broadcast::Receiver<live::Hint>,
) -> impl futures::Stream<Item = Option<live::Hint>> + Send + 'static {
    futures::stream::unfold(receiver, |mut receiver| async move {
        match receiver.recv().await {
            Ok(hint) => Some((Some(hint), receiver)),
            Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => Some((None, receiver)),
            Err(tokio::sync::broadcast::error::RecvError::Closed) => None,
        }
    })
}

/// The job the submit form describes, as the API takes it. The API checks it again; this
/// only turns the form's text into the JSON shape and names a field that is not a number.
fn submission(form: &Form) -> Result<Value, String> {
    let text = |name: &str| form.get(name).map(|v| v.trim()).filter(|v| !v.is_empty());
    let mut job = serde_json::Map::new();
    let command = text("command").ok_or("the command is empty: write what to run")?;
    job.insert("command".into(), json!(command));
    if let Some(name) = text("name") {
        job.insert("name".into(), json!(name));
    }
    if let Some(labels) = text("labels") {
        let mut map = serde_json::Map::new();
        for pair in labels.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (key, value) = pair
                .split_once('=')
                .ok_or_else(|| format!("the label `{pair}` is not written key=value"))?;
            map.insert(key.trim().to_owned(), json!(value.trim()));
        }
        job.insert("labels".into(), Value::Object(map));
    }
    if let Some(timeout) = text("timeout") {
        let seconds: u64 = timeout
            .parse()
            .map_err(|_| "the timeout is a whole number of seconds".to_owned())?;
        job.insert("timeout".into(), json!(seconds));
    }
    if let Some(attempts) = text("attempts") {
        let attempts: u32 = attempts
            .parse()
            .map_err(|_| "the number of attempts is a whole number".to_owned())?;
        job.insert("retry".into(), json!({ "max_attempts": attempts }));
    }
    Ok(Value::Object(job))
}

/// A new submission with the spec of a job shown by the API. Refused when the spec holds
/// what the reader was not shown (masked environment values) or what the view leaves out
/// (standard input), rather than running a different job.
fn resubmission(spec: &Value) -> Result<Value, String> {
    let mut job = serde_json::Map::new();
    let Some(spec) = spec.as_object() else {
        return Err("the job's specification could not be read".into());
    };
    if spec
        .get("env")
        .and_then(Value::as_object)
        .is_some_and(|env| env.values().any(|v| v == "***"))
    {
        return Err(
            "this job's environment values are hidden from you, so it cannot be run again \
             from here: submit it from its original specification"
                .into(),
        );
    }
    if spec
        .get("secrets")
        .and_then(Value::as_object)
        .is_some_and(|s| !s.is_empty())
    {
        return Err(
            "this job carried sealed secrets, which are not shown: submit it again from its \
             original specification"
                .into(),
        );
    }
    for key in [
        "command",
        "argv",
        "cwd",
        "env",
        "labels",
        "metadata",
        "name",
        "nodes",
        "retry",
        "secret_refs",
        "system",
        "systems",
        "timeout",
        "fail_fast",
        "max_parallel",
    ] {
        match spec.get(key) {
            None | Some(Value::Null) => {}
            Some(Value::Object(map)) if map.is_empty() => {}
            Some(value) => {
                job.insert(key.to_owned(), value.clone());
            }
        }
    }
    Ok(Value::Object(job))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn form(pairs: &[(&str, &str)]) -> Form {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn the_submit_form_becomes_the_apis_job() {
        let job = submission(&form(&[
            ("command", " echo hi "),
            ("labels", "zone=eu, disk = ssd"),
            ("timeout", "30"),
            ("attempts", "2"),
            ("name", ""),
        ]))
        .expect("valid");
        assert_eq!(
            job,
            json!({"command": "echo hi", "labels": {"zone": "eu", "disk": "ssd"}, "timeout": 30, "retry": {"max_attempts": 2}})
        );
    }

    #[test]
    fn a_form_with_a_bad_number_or_label_names_the_field() {
        let error =
            submission(&form(&[("command", "true"), ("timeout", "soon")])).expect_err("bad");
        assert!(error.contains("timeout"), "{error}");
        let error = submission(&form(&[("command", "true"), ("labels", "zone")])).expect_err("bad");
        assert!(error.contains("zone"), "{error}");
        assert!(submission(&form(&[("command", "  ")])).is_err());
    }

    #[test]
    fn a_job_whose_environment_was_masked_is_not_run_again_with_the_mask() {
        let spec = json!({"command": "env", "env": {"TOKEN": "***"}, "labels": {}, "secrets": {}});
        assert!(resubmission(&spec).is_err());
        let spec = json!({"command": "env", "env": {"A": "1"}, "labels": {}, "secrets": {}, "secret_refs": {}});
        assert_eq!(
            resubmission(&spec).expect("allowed"),
            json!({"command": "env", "env": {"A": "1"}})
        );
    }

    #[test]
    fn path_parts_cannot_climb_out_of_the_api_path() {
        assert_eq!(path_part("../users"), "%2E%2E%2Fusers");
        assert_eq!(path_part("exec-1"), "exec-1");
        assert_eq!(path_part("a?b=c#d"), "a%3Fb%3Dc%23d");
    }

    #[test]
    fn the_dashboard_owns_the_root_and_ui_paths_only() {
        assert!(owns("/") && owns("/ui") && owns("/ui/jobs") && owns("/favicon.ico"));
        assert!(!owns("/uix") && !owns("/api/v1/jobs") && !owns("/healthz"));
    }
}
