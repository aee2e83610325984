//! The REST operations. Each is a thin adapter: check the caller's permission, parse and
//! validate the request, call the mesh, the history or the logs, convert the answer; every
//! failure is an [`ApiError`].
//!
//! Every operation but the public ones (health, login) takes a [`BearerAuth`]: it declares the
//! bearer scheme in the OpenAPI document, and hands the handler the principal the guard
//! authenticated, with the request's audit note. Handlers ask it for a permission, never for a
//! role.
//!
//! Module map: `jobs`, `nodes`, `operations` (health, metrics), `auth` (login, refresh,
//! logout), `users`, `tokens`, `secrets`, `systems`, `schedules`, `workflows`, `audit`.

mod audit;
mod auth;
mod document;
mod strict;
pub(crate) use strict::StrictTypes;
mod jobs;
pub(crate) use jobs::accepted;
mod nodes;
mod operations;
mod schedules;
mod secrets;
mod systems;
mod tokens;
mod users;
mod workflows;

use std::net::IpAddr;
use std::sync::Arc;

use capstan_protocol::{AuditAction, JobId, Timestamp};
use poem::http::StatusCode;
use poem::{Endpoint, Middleware, Request};
use poem_openapi::{OpenApiService, SecurityScheme, Tags};
use tracing::Instrument;

use crate::State;
use crate::audit::AuditSlot;
use crate::auth::{Permission, Principal};
use crate::problem::ApiError;

#[derive(Tags)]
enum Tag {
    /// Submit, inspect, follow, cancel and purge jobs.
    Jobs,
    /// Executor nodes.
    Nodes,
    /// Log in, refresh tokens, log out.
    Auth,
    /// Users and their roles.
    Users,
    /// API tokens for machines.
    Tokens,
    /// Secrets stored for jobs to name.
    Secrets,
    /// Remote systems reached over SSH, and their health.
    Systems,
    /// Jobs run on a cron expression or every so often.
    Schedules,
    /// Graphs of jobs, each step starting once the steps it depends on have ended.
    Workflows,
    /// The audit trail.
    Audit,
    /// Health, readiness and metrics.
    Operations,
}

/// The state of a served API.
fn served(state: &Option<Arc<State>>) -> Result<&State, ApiError> {
    state
        .as_deref()
        .ok_or_else(|| ApiError::unavailable("this instance only describes the API"))
}

type Apis = (
    jobs::JobsApi,
    nodes::NodesApi,
    auth::AuthApi,
    users::UsersApi,
    tokens::TokensApi,
    secrets::SecretsApi,
    systems::SystemsApi,
    schedules::SchedulesApi,
    workflows::WorkflowsApi,
    audit::AuditApi,
    operations::OperationsApi,
);

fn apis(state: Option<Arc<State>>) -> Apis {
    (
        jobs::JobsApi(state.clone()),
        nodes::NodesApi(state.clone()),
        auth::AuthApi(state.clone()),
        users::UsersApi(state.clone()),
        tokens::TokensApi(state.clone()),
        secrets::SecretsApi(state.clone()),
        systems::SystemsApi(state.clone()),
        schedules::SchedulesApi(state.clone()),
        workflows::WorkflowsApi(state.clone()),
        audit::AuditApi(state.clone()),
        operations::OperationsApi(state),
    )
}

/// The OpenAPI service over `state`.
pub(crate) fn service(state: Arc<State>) -> OpenApiService<Apis, ()> {
    describe(apis(Some(state)))
}

/// The OpenAPI description alone (no state), for the spec file and the docs endpoints.
pub(crate) fn service_description() -> OpenApiService<Apis, ()> {
    describe(apis(None))
}

/// The OpenAPI document as served at `/openapi.json` and written to `schemas/`: the
/// description poem-openapi makes, with each documented reference written as the reference
/// beside its description (poem-openapi wraps it as `allOf: [{$ref}, {description}]`, which
/// client generators cannot take when the reference is an enum), and the handlers' own rules
/// written in (`document`). Built once per process: it depends on nothing but the code.
pub(crate) fn spec_json() -> String {
    serde_json::to_string_pretty(spec()).expect("a JSON value prints")
}

/// The document of [`spec_json`], as JSON, for the `Allow` table and the type check.
pub(crate) fn spec() -> &'static serde_json::Value {
    static SPEC: std::sync::OnceLock<serde_json::Value> = std::sync::OnceLock::new();
    SPEC.get_or_init(|| {
        let mut spec: serde_json::Value =
            serde_json::from_str(&service_description().spec()).expect("poem-openapi writes JSON");
        inline_documented_refs(&mut spec);
        document::tighten(&mut spec);
        spec
    })
}

/// The template of `paths` that `path` matches (`/users/{name}` for `/users/bob`); a path
/// matching several takes the most literal one (`/users/me` before `/users/{name}`).
pub(crate) fn template_of<'a>(paths: impl Iterator<Item = &'a str>, path: &str) -> Option<&'a str> {
    let segments: Vec<&str> = path.split('/').collect();
    paths
        .filter(|template| {
            let parts = template.split('/');
            parts.clone().count() == segments.len()
                && parts.zip(&segments).all(|(part, segment)| {
                    part == *segment || (part.starts_with('{') && !segment.is_empty())
                })
        })
        .max_by_key(|template| template.split('/').filter(|p| !p.starts_with('{')).count())
}

/// Rewrites every `{"allOf": [{"$ref": r}, {annotations}]}` under `value` as
/// `{"$ref": r, annotations}`.
fn inline_documented_refs(value: &mut serde_json::Value) {
    use serde_json::Value;
    match value {
        Value::Object(object) => {
            let rewritten = match object.get("allOf").and_then(Value::as_array) {
                Some(parts) if parts.len() == 2 => {
                    let reference = parts[0]
                        .as_object()
                        .filter(|r| r.len() == 1)
                        .and_then(|r| r.get("$ref"))
                        .cloned();
                    let annotations = parts[1].as_object().filter(|a| {
                        a.keys().all(|key| {
                            [
                                "description",
                                "default",
                                "readOnly",
                                "writeOnly",
                                "deprecated",
                            ]
                            .contains(&key.as_str())
                        })
                    });
                    reference.zip(annotations.cloned())
                }
                _ => None,
            };
            if let Some((reference, annotations)) = rewritten {
                object.remove("allOf");
                object.insert("$ref".into(), reference);
                for (key, annotation) in annotations {
                    object.entry(key).or_insert(annotation);
                }
            }
            object.values_mut().for_each(inline_documented_refs);
        }
        Value::Array(items) => items.iter_mut().for_each(inline_documented_refs),
        _ => {}
    }
}

fn describe(apis: Apis) -> OpenApiService<Apis, ()> {
    OpenApiService::new(apis, "Capstan", capstan_protocol::VERSION)
        .description(
            "Capstan runs jobs on a fleet of executor nodes and keeps their history. \
             Every operation but health and login needs `Authorization: Bearer <token>`: \
             an access token from `POST /api/v1/auth/login`, an API token (`cst_…`), or a \
             token of the configured OpenID Connect provider. Errors are \
             application/problem+json; a refused permission is named in `permission`.",
        )
        .server("/")
}

/// The caller of a protected operation: a Capstan access token, an API token, or an OpenID
/// Connect provider's token, as `Authorization: Bearer <token>`.
#[derive(SecurityScheme)]
#[oai(ty = "bearer", bearer_format = "JWT", checker = "caller")]
pub(crate) struct BearerAuth(Caller);

/// The principal the guard authenticated, and the request's audit note.
pub(crate) struct Caller {
    principal: Principal,
    slot: Arc<AuditSlot>,
}

async fn caller(request: &Request, _bearer: poem_openapi::auth::Bearer) -> Option<Caller> {
    Some(Caller {
        principal: request.extensions().get::<Principal>()?.clone(),
        slot: request.extensions().get::<Arc<AuditSlot>>()?.clone(),
    })
}

impl BearerAuth {
    /// The caller.
    pub(crate) fn principal(&self) -> &Principal {
        &self.0.principal
    }

    /// Names the request's `action` on `resource` for the audit trail, then checks the caller
    /// holds `permission`.
    pub(crate) fn allow(
        &self,
        permission: Permission,
        action: AuditAction,
        resource: Option<String>,
    ) -> Result<&Principal, ApiError> {
        self.note(action, resource);
        self.allow_read(permission)
    }

    /// Checks the caller holds `permission` (for reads, which are audited only when refused).
    pub(crate) fn allow_read(&self, permission: Permission) -> Result<&Principal, ApiError> {
        let principal = &self.0.principal;
        if principal.can(permission) {
            return Ok(principal);
        }
        Err(self.refuse(
            permission,
            format!(
                "this needs the permission `{permission}`, which the role `{}` does not grant",
                principal.role
            ),
        ))
    }

    /// A refusal for want of `permission`, explained by `detail` (also in the audit record).
    pub(crate) fn refuse(&self, permission: Permission, detail: impl Into<String>) -> ApiError {
        let detail = detail.into();
        self.0.slot.detail(detail.clone());
        ApiError::missing_permission(permission.as_str(), detail)
    }

    /// A refusal that is not about a permission (a rule of ownership or of roles).
    pub(crate) fn forbid(&self, detail: impl Into<String>) -> ApiError {
        let detail = detail.into();
        self.0.slot.detail(detail.clone());
        ApiError::forbidden(detail)
    }

    /// Names the request's action and resource for the audit trail.
    pub(crate) fn note(&self, action: AuditAction, resource: Option<String>) {
        self.0.slot.action(action, resource);
    }

    /// Sets the resource of the audit record, once known.
    pub(crate) fn resource(&self, resource: String) {
        self.0.slot.resource(resource);
    }

    /// Adds what the request changed to its audit record.
    pub(crate) fn detail(&self, detail: impl Into<String>) {
        self.0.slot.detail(detail);
    }
}

/// The audit note of a request the guard let through.
fn slot_of(request: &Request) -> Result<Arc<AuditSlot>, ApiError> {
    request
        .extensions()
        .get::<Arc<AuditSlot>>()
        .cloned()
        .ok_or_else(|| ApiError::unavailable("the request was not guarded"))
}

/// The client's address, as the guard established it (see `guard::client_address`).
fn client_of(request: &Request) -> Option<IpAddr> {
    request
        .extensions()
        .get::<crate::guard::ClientAddress>()
        .and_then(|client| client.0)
}

fn job_id(text: &str) -> Result<JobId, ApiError> {
    text.parse().map_err(|_| {
        ApiError::bad_request(
            format!("`{text}` is not a job id (a 26-character ULID)"),
            Some("id"),
        )
    })
}

/// A keyset cursor returned by a list: the id (a ULID of type `T`) of the last row of the
/// previous page.
fn parse_cursor<T: std::str::FromStr>(text: Option<&str>) -> Result<Option<T>, ApiError> {
    text.map(|text| {
        text.parse::<T>().map_err(|_| {
            ApiError::bad_request(
                format!("`{text}` is not a cursor returned by this API"),
                Some("cursor"),
            )
        })
    })
    .transpose()
}

/// An optional RFC 3339 query parameter named `field`.
fn time_parameter(text: Option<&str>, field: &str) -> Result<Option<Timestamp>, ApiError> {
    text.map(|text| timestamp(text, field)).transpose()
}

/// Cuts `rows`, queried with one more than `limit`, to a page, and says where the next page
/// starts (the id of its last row) when there is one.
fn page<T>(mut rows: Vec<T>, limit: u32, id: impl Fn(&T) -> String) -> (Vec<T>, Option<String>) {
    let limit = limit as usize;
    if rows.len() > limit {
        rows.truncate(limit);
        let next = rows.last().map(id);
        (rows, next)
    } else {
        (rows, None)
    }
}

fn timestamp(text: &str, field: &str) -> Result<Timestamp, ApiError> {
    Timestamp::parse_rfc3339(text).map_err(|e| {
        ApiError::bad_request(
            format!("`{text}` is not an RFC 3339 time: {e}"),
            Some(field),
        )
    })
}

/// Gives every request a server span, child of the caller's `traceparent` if it sent one.
pub(crate) struct Tracing;

impl<E: Endpoint> Middleware<E> for Tracing {
    type Output = TracingEndpoint<E>;

    fn transform(&self, inner: E) -> Self::Output {
        TracingEndpoint(inner)
    }
}

pub(crate) struct TracingEndpoint<E>(E);

impl<E: Endpoint> Endpoint for TracingEndpoint<E> {
    type Output = E::Output;

    async fn call(&self, request: Request) -> poem::Result<Self::Output> {
        let span = tracing::info_span!(
            "http request",
            otel.kind = "server",
            otel.name = %format!("{} {}", request.method(), request.uri().path()),
            http.method = %request.method(),
            http.target = %request.uri().path(),
        );
        capstan_telemetry::propagation::follow_http(&span, request.headers());
        self.0.call(request).instrument(span).await
    }
}

/// The largest declared body read (and dropped) before it is refused with `413`.
const DRAINED_BODY_BYTES: usize = 16 * 1024 * 1024;

/// Refuses bodies over the limit with `413`, whether or not they declare a length.
pub(crate) struct BodyLimit(pub usize);

impl<E: Endpoint> Middleware<E> for BodyLimit {
    type Output = BodyLimitEndpoint<E>;

    fn transform(&self, inner: E) -> Self::Output {
        BodyLimitEndpoint {
            inner,
            limit: self.0,
        }
    }
}

pub(crate) struct BodyLimitEndpoint<E> {
    inner: E,
    limit: usize,
}

impl<E: Endpoint> Endpoint for BodyLimitEndpoint<E> {
    type Output = E::Output;

    async fn call(&self, mut request: Request) -> poem::Result<Self::Output> {
        let declared = request
            .headers()
            .get(poem::http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<usize>().ok());
        match declared {
            Some(length) if length > self.limit => {
                // A client still sending its body misses an answer given before it finished
                // (the connection is closed under it): a body of moderate size is read and
                // dropped first, so the client gets its 413. Larger ones are cut off at once.
                if length <= DRAINED_BODY_BYTES {
                    use tokio::io::AsyncReadExt;
                    let _ = tokio::io::copy(
                        &mut request
                            .take_body()
                            .into_async_read()
                            .take(DRAINED_BODY_BYTES as u64),
                        &mut tokio::io::sink(),
                    )
                    .await;
                }
                return Err(poem::Error::from_status(StatusCode::PAYLOAD_TOO_LARGE));
            }
            Some(_) => {}
            None if request.method() != poem::http::Method::GET => {
                // No declared length (chunked): read at most one byte past the limit.
                use tokio::io::AsyncReadExt;
                let mut body = Vec::new();
                request
                    .take_body()
                    .into_async_read()
                    .take(self.limit as u64 + 1)
                    .read_to_end(&mut body)
                    .await
                    .map_err(|_| poem::Error::from_status(StatusCode::BAD_REQUEST))?;
                if body.len() > self.limit {
                    return Err(poem::Error::from_status(StatusCode::PAYLOAD_TOO_LARGE));
                }
                request.set_body(body);
            }
            None => {}
        }
        self.inner.call(request).await
    }
}

/// The methods each documented path takes, from the OpenAPI description: what a `405`
/// lists in its `Allow` header.
pub(crate) struct PathMethods(Vec<(String, String)>);

impl PathMethods {
    /// The table of the served description.
    pub(crate) fn of_description() -> Self {
        let mut table = Vec::new();
        if let Some(paths) = spec()["paths"].as_object() {
            for (path, operations) in paths {
                let methods: Vec<String> = operations
                    .as_object()
                    .map(|operations| {
                        operations
                            .keys()
                            .map(|method| method.to_ascii_uppercase())
                            .collect()
                    })
                    .unwrap_or_default();
                table.push((path.clone(), methods.join(", ")));
            }
        }
        Self(table)
    }

    /// The methods `path` takes, comma separated; `None` for a path not described.
    pub(crate) fn allowed(&self, path: &str) -> Option<String> {
        let template = template_of(self.0.iter().map(|(t, _)| t.as_str()), path)?;
        self.0
            .iter()
            .find(|(t, _)| t == template)
            .map(|(_, methods)| methods.clone())
    }
}
