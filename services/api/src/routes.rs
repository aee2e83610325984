//! The REST operations. Each is a thin adapter: parse and validate the request, call the mesh,
//! the history or the logs, convert the answer; every failure is an [`ApiError`].

use std::sync::Arc;

use capstan_mesh::lifecycle::{CancelError, cancel};
use capstan_protocol::{
    CancelOutcome, JobId, NodeCommand, NodeId, NodeRecord, Timestamp, subjects,
};
use capstan_store::JobQuery;
use poem::http::StatusCode;
use poem::{Endpoint, Middleware, Request};
use poem_openapi::param::{Path, Query};
use poem_openapi::payload::{EventStream, Json, PlainText};
use poem_openapi::{ApiResponse, OpenApi, OpenApiService, Tags};
use tracing::Instrument;

use crate::State;
use crate::model::{
    Attempt, CancelAccepted, Health, Job, JobCreated, JobEvents, JobLogs, JobPage, LogEvent, Node,
    NodeList, Status,
};
use crate::problem::ApiError;
use crate::submission::SubmissionBody;

#[derive(Tags)]
enum Tag {
    /// Submit, inspect, follow and cancel jobs.
    Jobs,
    /// Executor nodes.
    Nodes,
    /// Health, readiness and metrics.
    Operations,
}

/// The operations, with their shared state (none in the description-only service).
pub(crate) struct JobsApi(Option<Arc<State>>);
pub(crate) struct NodesApi(Option<Arc<State>>);
pub(crate) struct OperationsApi(Option<Arc<State>>);

/// The state of a served API.
fn served(state: &Option<Arc<State>>) -> Result<&State, ApiError> {
    state
        .as_deref()
        .ok_or_else(|| ApiError::unavailable("this instance only describes the API"))
}

type Apis = (JobsApi, NodesApi, OperationsApi);

/// The OpenAPI service over `state`.
pub(crate) fn service(state: Arc<State>) -> OpenApiService<Apis, ()> {
    describe((
        JobsApi(Some(state.clone())),
        NodesApi(Some(state.clone())),
        OperationsApi(Some(state)),
    ))
}

/// The OpenAPI description alone (no state), for the spec file and the docs endpoints.
pub(crate) fn service_description() -> OpenApiService<Apis, ()> {
    describe((JobsApi(None), NodesApi(None), OperationsApi(None)))
}

fn describe(apis: Apis) -> OpenApiService<Apis, ()> {
    OpenApiService::new(apis, "Capstan", capstan_protocol::VERSION)
        .description(
            "Capstan runs jobs on a fleet of executor nodes and keeps their history. \
             Errors are application/problem+json.",
        )
        .server("/")
}

#[derive(ApiResponse)]
enum Submitted {
    /// Accepted: the job's id; `Location` is its URL.
    #[oai(status = 202)]
    Accepted(Json<JobCreated>, #[oai(header = "Location")] String),
    /// The idempotency key names an existing job: its id.
    #[oai(status = 200)]
    Existing(Json<JobCreated>, #[oai(header = "Location")] String),
}

#[derive(ApiResponse)]
enum LogsResponse {
    /// The output captured so far.
    #[oai(status = 200)]
    Captured(Json<JobLogs>),
    /// Server-sent events: `stdout`/`stderr` messages as produced, then `end`.
    #[oai(status = 200)]
    Follow(EventStream<futures::stream::BoxStream<'static, LogEvent>>),
}

#[derive(ApiResponse)]
enum CancelResponse {
    /// Cancelled, or cancellation requested.
    #[oai(status = 202)]
    Accepted(Json<CancelAccepted>),
}

fn job_id(text: &str) -> Result<JobId, ApiError> {
    text.parse().map_err(|_| {
        ApiError::bad_request(
            format!("`{text}` is not a job id (a 26-character ULID)"),
            Some("id"),
        )
    })
}

fn timestamp(text: &str, field: &str) -> Result<Timestamp, ApiError> {
    Timestamp::parse_rfc3339(text).map_err(|e| {
        ApiError::bad_request(
            format!("`{text}` is not an RFC 3339 time: {e}"),
            Some(field),
        )
    })
}

#[OpenApi(prefix_path = "/api/v1", tag = "Tag::Jobs")]
impl JobsApi {
    /// Submit a job.
    ///
    /// Returns `202` with the new job's id once it is stored; `200` with the existing job's id
    /// when `idempotency_key` names one submitted within 24 hours.
    #[oai(path = "/jobs", method = "post")]
    async fn submit(&self, body: SubmissionBody) -> Result<Submitted, ApiError> {
        let state = served(&self.0)?;
        let spec = body.0;
        let created = state.submitter.submit(&spec).await?;
        let location = format!("/api/v1/jobs/{}", created.id);
        let body = Json(JobCreated {
            id: created.id.to_string(),
            duplicate: created.duplicate,
        });
        Ok(if created.duplicate {
            Submitted::Existing(body, location)
        } else {
            state.metrics.submitted();
            Submitted::Accepted(body, location)
        })
    }

    /// List jobs, newest first.
    ///
    /// Filters combine. Pages follow `next_cursor`; a page is stable however many jobs are
    /// submitted meanwhile.
    #[oai(path = "/jobs", method = "get")]
    #[allow(clippy::too_many_arguments)]
    async fn list(
        &self,
        /// Only jobs in this status.
        status: Query<Option<Status>>,
        /// Only jobs selecting this label, as `key=value`; repeat for several.
        label: Query<Vec<String>>,
        /// Only jobs with this name.
        name: Query<Option<String>>,
        /// Only jobs whose current attempt is on this node.
        node: Query<Option<String>>,
        /// Only jobs submitted at or after this time (RFC 3339).
        since: Query<Option<String>>,
        /// Only jobs submitted before this time (RFC 3339).
        until: Query<Option<String>>,
        /// Page size, 1 to 500.
        #[oai(
            default = "default_limit",
            validator(minimum(value = "1"), maximum(value = "500"))
        )]
        limit: Query<u32>,
        /// `next_cursor` of the previous page.
        cursor: Query<Option<String>>,
    ) -> Result<Json<JobPage>, ApiError> {
        let state = served(&self.0)?;
        let mut labels = Vec::new();
        for pair in &label.0 {
            let (key, value) = pair.split_once('=').ok_or_else(|| {
                ApiError::bad_request(format!("label `{pair}` is not key=value"), Some("label"))
            })?;
            labels.push((key.to_owned(), value.to_owned()));
        }
        let before = match &cursor.0 {
            Some(text) => Some(text.parse::<JobId>().map_err(|_| {
                ApiError::bad_request(
                    format!("`{text}` is not a cursor returned by this API"),
                    Some("cursor"),
                )
            })?),
            None => None,
        };
        let query = JobQuery {
            status: status.0.map(Into::into),
            name: name.0,
            node: node.0,
            labels,
            since: since
                .0
                .as_deref()
                .map(|t| timestamp(t, "since"))
                .transpose()?,
            until: until
                .0
                .as_deref()
                .map(|t| timestamp(t, "until"))
                .transpose()?,
            before,
            limit: u64::from(limit.0) + 1,
        };
        let mut rows = state.history.list(&query).await?;
        let next_cursor = if rows.len() > limit.0 as usize {
            rows.truncate(limit.0 as usize);
            rows.last().map(|row| row.id.clone())
        } else {
            None
        };
        Ok(Json(JobPage {
            jobs: rows.into_iter().map(Into::into).collect(),
            next_cursor,
        }))
    }

    /// Get a job: its spec, status, timings, and every attempt.
    ///
    /// A job that is still active is read from the live state and merged with its history.
    #[oai(path = "/jobs/:id", method = "get")]
    async fn get(&self, id: Path<String>) -> Result<Json<Job>, ApiError> {
        let state = served(&self.0)?;
        let id = job_id(&id.0)?;
        let key = id.to_string();
        let (live, row, attempts) = tokio::join!(
            state.mesh.jobs.get(&key),
            state.history.get(id),
            state.history.attempts(id),
        );
        let attempts: Vec<Attempt> = attempts?.into_iter().map(Into::into).collect();
        match (live?, row?) {
            (Some(live), _) => Ok(Json(Job::from_record(live.value, attempts))),
            (None, Some(row)) => Ok(Json(Job::from_row(row, attempts))),
            (None, None) => Err(ApiError::not_found(format!("no job {id}"))),
        }
    }

    /// Get a job's output.
    ///
    /// Without `follow`, the output captured so far of one attempt (default: the current).
    /// With `follow=true`, server-sent events: output as it is produced, then an `end` event
    /// when the job finishes.
    #[oai(path = "/jobs/:id/logs", method = "get")]
    async fn logs(
        &self,
        id: Path<String>,
        /// The attempt (default: the current one).
        attempt: Query<Option<u32>>,
        /// Stream output as server-sent events until the job ends.
        #[oai(default)]
        follow: Query<bool>,
    ) -> Result<LogsResponse, ApiError> {
        let served = served(&self.0)?;
        let id = job_id(&id.0)?;
        let state = crate::logs::job_state(served, id).await?;
        if follow.0 {
            let events = crate::logs::follow(served.mesh.clone(), id, state);
            let stream = EventStream::new(events)
                .keep_alive(std::time::Duration::from_secs(15))
                .to_event(|event| {
                    let kind = event.kind.clone();
                    poem::web::sse::Event::message(poem_openapi::types::ToJSON::to_json_string(
                        &event,
                    ))
                    .event_type(kind)
                });
            return Ok(LogsResponse::Follow(stream));
        }
        let logs = crate::logs::captured(&served.mesh, id, attempt.0, &state).await?;
        Ok(LogsResponse::Captured(Json(logs)))
    }

    /// Get a job's events, in the order they happened.
    #[oai(path = "/jobs/:id/events", method = "get")]
    async fn events(&self, id: Path<String>) -> Result<Json<JobEvents>, ApiError> {
        let state = served(&self.0)?;
        let id = job_id(&id.0)?;
        let events = state.history.events(id).await?;
        if events.is_empty() && crate::logs::job_state(state, id).await.is_err() {
            return Err(ApiError::not_found(format!("no job {id}")));
        }
        Ok(Json(JobEvents {
            events: events.into_iter().map(Into::into).collect(),
        }))
    }

    /// Cancel a job.
    ///
    /// A job that has not started is cancelled at once; a running one is stopped by its
    /// executor (its process group is killed) and then recorded `cancelled`. `409` when the
    /// job already finished.
    #[oai(path = "/jobs/:id/cancel", method = "post")]
    async fn cancel(&self, id: Path<String>) -> Result<CancelResponse, ApiError> {
        let state = served(&self.0)?;
        let id = job_id(&id.0)?;
        match cancel(&state.mesh, id).await {
            Ok((outcome, record)) => Ok(CancelResponse::Accepted(Json(CancelAccepted {
                outcome: match outcome {
                    CancelOutcome::Cancelled => "cancelled".into(),
                    CancelOutcome::Requested => "requested".into(),
                },
                status: record.status.into(),
            }))),
            Err(CancelError::NotFound(_)) => Err(ApiError::not_found(format!("no job {id}"))),
            Err(error @ CancelError::Finished { .. }) => Err(ApiError::conflict(error.to_string())),
            Err(CancelError::Mesh(error)) => Err(error.into()),
        }
    }
}

fn default_limit() -> u32 {
    50
}

#[OpenApi(prefix_path = "/api/v1", tag = "Tag::Nodes")]
impl NodesApi {
    /// List executor nodes.
    #[oai(path = "/nodes", method = "get")]
    async fn list(&self) -> Result<Json<NodeList>, ApiError> {
        let state = served(&self.0)?;
        let mut nodes: Vec<Node> = state
            .mesh
            .nodes
            .values()
            .await?
            .into_iter()
            .map(|node| node.value.into())
            .collect();
        nodes.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(Json(NodeList { nodes }))
    }

    /// Get an executor node.
    #[oai(path = "/nodes/:id", method = "get")]
    async fn get(&self, id: Path<String>) -> Result<Json<Node>, ApiError> {
        let state = served(&self.0)?;
        let node = NodeId::new(id.0.clone())
            .map_err(|e| ApiError::bad_request(e.to_string(), Some("id")))?;
        match state.mesh.nodes.get(node.as_str()).await? {
            Some(record) => Ok(Json(record.value.into())),
            None => Err(ApiError::not_found(format!("no node {node}"))),
        }
    }

    /// Cordon a node: no new jobs are placed on it; what it runs finishes normally.
    #[oai(path = "/nodes/:id/cordon", method = "post")]
    async fn cordon(&self, id: Path<String>) -> Result<Json<Node>, ApiError> {
        self.set_availability(&id.0, subjects::registry::NODES_CORDON, None)
            .await
    }

    /// Uncordon a node: it takes new jobs again (also ends a drain).
    #[oai(path = "/nodes/:id/uncordon", method = "post")]
    async fn uncordon(&self, id: Path<String>) -> Result<Json<Node>, ApiError> {
        self.set_availability(&id.0, subjects::registry::NODES_UNCORDON, None)
            .await
    }

    /// Drain a node.
    ///
    /// No new jobs are placed on it; dispatches queued for it are handed back at once and
    /// placed elsewhere; running jobs may finish until the deadline, when they are stopped
    /// and handed back for another attempt elsewhere. The node reports `drained` once it holds
    /// nothing.
    #[oai(path = "/nodes/:id/drain", method = "post")]
    async fn drain(
        &self,
        id: Path<String>,
        /// Seconds running jobs may take before they are stopped and handed back (default
        /// 300).
        deadline_seconds: Query<Option<u64>>,
    ) -> Result<Json<Node>, ApiError> {
        self.set_availability(&id.0, subjects::registry::NODES_DRAIN, deadline_seconds.0)
            .await
    }
}

impl NodesApi {
    /// Asks the registry to change `id`'s availability.
    async fn set_availability(
        &self,
        id: &str,
        subject: &str,
        deadline_secs: Option<u64>,
    ) -> Result<Json<Node>, ApiError> {
        let state = served(&self.0)?;
        let node = NodeId::new(id.to_owned())
            .map_err(|e| ApiError::bad_request(e.to_string(), Some("id")))?;
        let command = NodeCommand {
            node,
            deadline_secs,
        };
        let answer = capstan_mesh::service::call::<_, NodeRecord>(
            &state.mesh.client,
            subject,
            &command,
            std::time::Duration::from_secs(5),
        )
        .await?;
        match answer {
            Ok(record) => Ok(Json(record.into())),
            Err(error) => Err(ApiError::from_service(error)),
        }
    }
}

#[OpenApi(tag = "Tag::Operations")]
impl OperationsApi {
    /// Liveness: the process is up.
    #[oai(path = "/healthz", method = "get")]
    async fn healthz(&self) -> Json<Health> {
        Json(Health {
            status: "ok".into(),
            checks: Default::default(),
        })
    }

    /// Readiness: NATS and the history database are reachable.
    #[oai(path = "/readyz", method = "get")]
    async fn readyz(&self) -> Result<Json<Health>, ApiError> {
        let state = served(&self.0)?;
        let nats = state.mesh.client.connection_state();
        if nats != async_nats::connection::State::Connected {
            return Err(ApiError::unavailable(format!("NATS is {nats}")));
        }
        state
            .history
            .ping()
            .await
            .map_err(|_| ApiError::unavailable("the history database does not answer"))?;
        Ok(Json(Health {
            status: "ok".into(),
            checks: [
                ("nats".to_owned(), "ok".to_owned()),
                ("database".to_owned(), "ok".to_owned()),
            ]
            .into(),
        }))
    }

    /// Prometheus metrics: jobs by status, queue depths, latencies.
    #[oai(path = "/metrics", method = "get")]
    async fn metrics(&self) -> Result<PlainText<String>, ApiError> {
        let state = served(&self.0)?;
        Ok(PlainText(crate::metrics::render(state).await))
    }
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
