//! `/api/v1/jobs`: submit, list, read, follow, cancel, and purge jobs.

use capstan_mesh::lifecycle::{CancelError, cancel};
use capstan_protocol::concurrency::Admission;
use capstan_protocol::fanout::{FanOutRecord, FanOutStatus, TargetStatus};
use capstan_protocol::{AuditAction, JobId, JobRecord, JobStatus, SubmittedBy};
use capstan_store::JobQuery;
use poem_openapi::param::{Path, Query};
use poem_openapi::payload::{EventStream, Json};
use poem_openapi::{ApiResponse, OpenApi};

use super::{BearerAuth, Tag, job_id, page, parse_cursor, served, time_parameter, timestamp};
use crate::auth::Permission;
use crate::model::access::Purged;
use crate::model::fanout::{FanOutSummary, JobTargets, TargetView, live_status};
use crate::model::{
    Attempt, CancelAccepted, Job, JobCreated, JobEvents, JobLogs, JobPage, LogEvent, Status,
    WaitingView,
};
use crate::problem::ApiError;
use crate::submission::SubmissionBody;

/// The jobs operations, with their shared state (none in the description-only service).
pub(crate) struct JobsApi(pub Option<std::sync::Arc<crate::State>>);

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

/// Jobs removed per batch of a purge.
const PURGE_BATCH: u64 = 500;

#[OpenApi(prefix_path = "/api/v1", tag = "Tag::Jobs")]
impl JobsApi {
    /// Submit a job.
    ///
    /// Returns `202` with the new job's id once it is stored; `200` with the existing job's id
    /// when `idempotency_key` names one submitted within 24 hours. The job is attributed to the
    /// caller (`submitted_by`). Needs `jobs:submit`.
    #[oai(path = "/jobs", method = "post", operation_id = "submitJob")]
    async fn submit(&self, auth: BearerAuth, body: SubmissionBody) -> Result<Submitted, ApiError> {
        let state = served(&self.0)?;
        let caller = auth.allow(Permission::JobsSubmit, AuditAction::JobSubmit, None)?;
        // The id is chosen first: sealed secrets are bound to it.
        let id = JobId::generate();
        let spec = body.seal_and_check(id, state.secret_keys.as_ref())?;
        let submitted_by = caller.submitted_by();
        check_submission(state, &auth, &spec, &submitted_by.principal).await?;
        let created = state
            .submitter
            .submit_with_id(id, &spec, Some(&submitted_by))
            .await?;
        auth.resource(format!("job/{}", created.id));
        let location = format!("/api/v1/jobs/{}", created.id);
        let body = Json(JobCreated {
            id: created.id.to_string(),
            duplicate: created.duplicate,
        });
        Ok(if created.duplicate {
            auth.detail("the idempotency key names an existing job");
            Submitted::Existing(body, location)
        } else {
            state.metrics.submitted();
            Submitted::Accepted(body, location)
        })
    }

    /// List jobs, newest first.
    ///
    /// Filters combine. Pages follow `next_cursor`; a page is stable however many jobs are
    /// submitted meanwhile. Needs `jobs:read`.
    #[oai(path = "/jobs", method = "get", operation_id = "listJobs")]
    #[allow(clippy::too_many_arguments)]
    async fn list(
        &self,
        auth: BearerAuth,
        /// Only jobs in this status.
        status: Query<Option<Status>>,
        /// Only jobs selecting this label, as `key=value`; repeat for several.
        #[oai(default)]
        label: Query<Vec<String>>,
        /// Only jobs with this name.
        name: Query<Option<String>>,
        /// Only jobs whose current attempt is on this node.
        node: Query<Option<String>>,
        /// Only jobs submitted by this principal (a user name, `oidc:<subject>`, or `nats`).
        submitted_by: Query<Option<String>>,
        /// Only the runs of this schedule.
        schedule: Query<Option<String>>,
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
        auth.allow_read(Permission::JobsRead)?;
        let mut labels = Vec::new();
        for pair in &label.0 {
            let (key, value) = pair.split_once('=').ok_or_else(|| {
                ApiError::bad_request(format!("label `{pair}` is not key=value"), Some("label"))
            })?;
            labels.push((key.to_owned(), value.to_owned()));
        }
        let query = JobQuery {
            status: status_filter(status.0)?,
            name: name.0,
            node: node.0,
            submitted_by: submitted_by.0,
            schedule: schedule.0,
            labels,
            since: time_parameter(since.0.as_deref(), "since")?,
            until: time_parameter(until.0.as_deref(), "until")?,
            before: parse_cursor::<JobId>(cursor.0.as_deref())?,
            limit: u64::from(limit.0) + 1,
        };
        let rows = state.history.list(&query).await?;
        let (rows, next_cursor) = page(rows, limit.0, |row| row.id.clone());
        Ok(Json(JobPage {
            jobs: rows.into_iter().map(Into::into).collect(),
            next_cursor,
        }))
    }

    /// Get a job: its spec, status, timings, who submitted it, and every attempt.
    ///
    /// A job that is still active is read from the live state and merged with its history.
    /// `env` values read `***` unless the caller submitted the job or holds `jobs:secrets`.
    /// Needs `jobs:read`.
    #[oai(path = "/jobs/:id", method = "get", operation_id = "getJob")]
    async fn get(
        &self,
        auth: BearerAuth,
        #[oai(validator(pattern = "^[0-7][0-9A-HJKMNP-TV-Za-hjkmnp-tv-z]{25}$"))] id: Path<String>,
    ) -> Result<Json<Job>, ApiError> {
        let state = served(&self.0)?;
        let caller = auth.allow_read(Permission::JobsRead)?;
        let id = job_id(&id.0)?;
        let key = id.to_string();
        let (live, row, attempts) = tokio::join!(
            state.mesh.jobs.get(&key),
            state.history.get(id),
            state.history.attempts(id),
        );
        let attempts: Vec<Attempt> = attempts?.into_iter().map(Into::into).collect();
        let job = match (live?, row?) {
            (Some(live), _) => {
                let waiting = waiting_for_slot(state, &live.value).await;
                Job {
                    waiting,
                    ..Job::from_record(live.value, attempts)
                }
            }
            (None, Some(row)) => Job::from_row(row, attempts),
            (None, None) => match state.mesh.fanouts.get(&key).await? {
                Some(parent) => {
                    let statuses: Vec<TargetStatus> = target_views(state, &parent.value)
                        .await?
                        .into_iter()
                        .map(|(status, _)| status)
                        .collect();
                    parent_job(&parent.value, &statuses)
                }
                None => match accepted(state, id).await? {
                    Some(record) => Job::from_record(record, Vec::new()),
                    None => return Err(ApiError::not_found(format!("no job {id}"))),
                },
            },
        };
        let submitter = job.submitted_by.as_ref().and_then(|s| s.to_protocol());
        if caller.can(Permission::JobsSecrets) || caller.owns(submitter.as_ref()) {
            Ok(Json(job))
        } else {
            Ok(Json(job.masked()))
        }
    }

    /// Get a job's output.
    ///
    /// Without `follow`, the output captured so far of one attempt (default: the current).
    /// With `follow=true`, server-sent events: output as it is produced, then an `end` event
    /// when the job finishes. Needs `jobs:read`.
    #[oai(path = "/jobs/:id/logs", method = "get", operation_id = "getJobLogs")]
    async fn logs(
        &self,
        auth: BearerAuth,
        #[oai(validator(pattern = "^[0-7][0-9A-HJKMNP-TV-Za-hjkmnp-tv-z]{25}$"))] id: Path<String>,
        /// The attempt (default: the current one).
        attempt: Query<Option<u32>>,
        /// Stream output as server-sent events until the job ends.
        #[oai(default)]
        follow: Query<bool>,
    ) -> Result<LogsResponse, ApiError> {
        let served = served(&self.0)?;
        auth.allow_read(Permission::JobsRead)?;
        let id = job_id(&id.0)?;
        job_logs(served, id, attempt.0, follow.0).await
    }

    /// Get a fan-out's targets.
    ///
    /// A job submitted with `systems` or `nodes` runs once per target, each target a job of
    /// its own with its own attempts and retries: this lists them in the order they start,
    /// with each one's status, exit code and output sizes (its output is at
    /// `/api/v1/jobs/{job}/logs`), and the fan-out's outcome. The list is empty until a
    /// scheduler has resolved the targets (a moment after the submission). `404` for a job
    /// that is not a fan-out. Needs `jobs:read`.
    #[oai(
        path = "/jobs/:id/targets",
        method = "get",
        operation_id = "listJobTargets"
    )]
    async fn targets(
        &self,
        auth: BearerAuth,
        #[oai(validator(pattern = "^[0-7][0-9A-HJKMNP-TV-Za-hjkmnp-tv-z]{25}$"))] id: Path<String>,
    ) -> Result<Json<JobTargets>, ApiError> {
        let state = served(&self.0)?;
        auth.allow_read(Permission::JobsRead)?;
        let id = job_id(&id.0)?;
        let Some(parent) = state.mesh.fanouts.get(&id.to_string()).await? else {
            // Accepted, and no scheduler has resolved its targets yet.
            if let Some(record) = accepted(state, id).await?
                && record.spec.fanout.is_some()
            {
                return Ok(Json(JobTargets {
                    job: id.to_string(),
                    outcome: FanOutStatus::Running.into(),
                    targets: Vec::new(),
                }));
            }
            return Err(ApiError::not_found(format!(
                "no fan-out {id} (a job has targets only when submitted with `systems` or \
                 `nodes`; a fan-out is kept 7 days after it ends)"
            )));
        };
        let targets = target_views(state, &parent.value).await?;
        Ok(Json(JobTargets {
            job: id.to_string(),
            outcome: parent.value.status.into(),
            targets: targets.into_iter().map(|(_, view)| view).collect(),
        }))
    }

    /// Get the output of one target of a fan-out: its job's, as
    /// `/api/v1/jobs/{job}/logs` gives it (with `attempt` and `follow` alike). `404` when the
    /// fan-out has no such target, or the target has not started. Needs `jobs:read`.
    #[oai(
        path = "/jobs/:id/targets/:target/logs",
        method = "get",
        operation_id = "getJobTargetLogs"
    )]
    async fn target_logs(
        &self,
        auth: BearerAuth,
        #[oai(validator(pattern = "^[0-7][0-9A-HJKMNP-TV-Za-hjkmnp-tv-z]{25}$"))] id: Path<String>,
        /// The system's name or the node's id.
        target: Path<String>,
        /// The attempt (default: the current one).
        attempt: Query<Option<u32>>,
        /// Stream output as server-sent events until the target's job ends.
        #[oai(default)]
        follow: Query<bool>,
    ) -> Result<LogsResponse, ApiError> {
        let served = served(&self.0)?;
        auth.allow_read(Permission::JobsRead)?;
        let id = job_id(&id.0)?;
        let Some(parent) = served.mesh.fanouts.get(&id.to_string()).await? else {
            return Err(ApiError::not_found(format!("no fan-out {id}")));
        };
        let Some(found) = parent.value.targets.iter().find(|t| t.name == target.0) else {
            return Err(ApiError::not_found(format!(
                "fan-out {id} has no target `{}`",
                target.0
            )));
        };
        let Some(job) = found.job else {
            return Err(ApiError::not_found(format!(
                "target `{}` of fan-out {id} has not started ({})",
                found.name,
                found.status.as_str()
            )));
        };
        job_logs(served, job, attempt.0, follow.0).await
    }

    /// Get a job's events, in the order they happened.
    ///
    /// A job seen ended shows its end here too: events the history has not recorded yet are
    /// read from the events stream. Needs `jobs:read`.
    #[oai(
        path = "/jobs/:id/events",
        method = "get",
        operation_id = "listJobEvents"
    )]
    async fn events(
        &self,
        auth: BearerAuth,
        #[oai(validator(pattern = "^[0-7][0-9A-HJKMNP-TV-Za-hjkmnp-tv-z]{25}$"))] id: Path<String>,
    ) -> Result<Json<JobEvents>, ApiError> {
        let state = served(&self.0)?;
        auth.allow_read(Permission::JobsRead)?;
        let id = job_id(&id.0)?;
        let key = id.to_string();
        let (recorded, live) = tokio::join!(state.history.events(id), state.mesh.jobs.get(&key));
        let recorded = recorded?;
        // The live record only adds to what the history answers: if NATS cannot be read, the
        // history's events are the answer.
        let events = match live {
            Ok(Some(live)) => with_unrecorded(state, id, recorded, &live.value).await,
            Ok(None) => recorded,
            Err(error) => {
                tracing::debug!(job = %id, error = %error, "cannot read the job's live record");
                recorded
            }
        };
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
    /// job already finished. Needs `jobs:cancel:any`, or `jobs:cancel:own` for a job the
    /// caller submitted.
    #[oai(path = "/jobs/:id/cancel", method = "post", operation_id = "cancelJob")]
    async fn cancel(
        &self,
        auth: BearerAuth,
        #[oai(validator(pattern = "^[0-7][0-9A-HJKMNP-TV-Za-hjkmnp-tv-z]{25}$"))] id: Path<String>,
    ) -> Result<CancelResponse, ApiError> {
        let state = served(&self.0)?;
        let id = job_id(&id.0)?;
        let caller = auth.allow(
            Permission::JobsCancelOwn,
            AuditAction::JobCancel,
            Some(format!("job/{id}")),
        )?;
        if !caller.can(Permission::JobsCancelAny) {
            let submitter = submitter_of(state, id).await?;
            if !caller.owns(submitter.as_ref()) {
                return Err(auth.refuse(
                    Permission::JobsCancelAny,
                    format!(
                        "job {id} was submitted by `{}`; cancelling another's job needs `{}`",
                        submitter.map_or_else(|| "someone else".to_owned(), |s| s.principal),
                        Permission::JobsCancelAny
                    ),
                ));
            }
        }
        match cancel(&state.mesh, id).await {
            Ok((outcome, record)) => Ok(CancelResponse::Accepted(Json(CancelAccepted {
                outcome: outcome.into(),
                status: record.status.into(),
            }))),
            Err(CancelError::NotFound(_)) => {
                match capstan_mesh::fanout::cancel(&state.mesh, id).await? {
                    Some((record, true)) => Ok(CancelResponse::Accepted(Json(CancelAccepted {
                        outcome: capstan_protocol::CancelOutcome::Requested.into(),
                        status: record.status.job_status().into(),
                    }))),
                    Some((record, false)) => Err(ApiError::conflict(format!(
                        "fan-out {id} was cancelled already or has ended: {}",
                        record.status.as_str()
                    ))),
                    None => Err(ApiError::not_found(format!("no job {id}"))),
                }
            }
            Err(error @ CancelError::Finished { .. }) => Err(ApiError::conflict(error.to_string())),
            Err(CancelError::Mesh(error)) => Err(error.into()),
        }
    }

    /// Purge finished jobs.
    ///
    /// Removes jobs that ended before `finished_before` (and, if given, in `status`) from the
    /// history, the jobs bucket, and the events and logs streams, in batches of 500, at most
    /// `limit` per request; `more` says whether others remain. Needs `jobs:purge`.
    #[oai(path = "/jobs", method = "delete", operation_id = "purgeJobs")]
    async fn purge(
        &self,
        auth: BearerAuth,
        /// Only jobs that ended before this time (RFC 3339).
        finished_before: Query<String>,
        /// Only jobs in this final status (`succeeded`, `failed`, `timed_out`, `cancelled`,
        /// `lost`, `quarantined`); default: all of them.
        status: Query<Option<Status>>,
        /// The most jobs removed by this request, 1 to 100000.
        #[oai(
            default = "default_purge_limit",
            validator(minimum(value = "1"), maximum(value = "100000"))
        )]
        limit: Query<u64>,
    ) -> Result<Json<Purged>, ApiError> {
        let state = served(&self.0)?;
        auth.allow(Permission::JobsPurge, AuditAction::JobPurge, None)?;
        let before = timestamp(&finished_before.0, "finished_before")?;
        let status = status_filter(status.0)?;
        let statuses: Vec<JobStatus> = match status {
            Some(status) => {
                if !status.is_terminal() {
                    return Err(ApiError::bad_request(
                        format!("`{status}` is not a final status: only finished jobs are purged"),
                        Some("status"),
                    ));
                }
                vec![status]
            }
            None => JobStatus::ALL
                .into_iter()
                .filter(|s| s.is_terminal())
                .collect(),
        };
        auth.resource(format!(
            "jobs?finished_before={}{}",
            before.to_rfc3339(),
            status.map_or(String::new(), |s| format!("&status={s}"))
        ));
        let report = crate::purge::purge(state, &statuses, before, limit.0, PURGE_BATCH).await?;
        auth.detail(format!(
            "purged {} jobs, skipped {}",
            report.purged, report.skipped
        ));
        Ok(Json(report))
    }
}

/// The checks of a job spec that need the mesh, made before it is submitted as `submitter`:
/// the stored secrets it names exist and are for `submitter`'s jobs, and the systems it runs on
/// exist and are active. A schedule's job is checked by this too, so that a job `POST /jobs`
/// refuses is refused as a schedule's.
pub(crate) async fn check_submission(
    state: &crate::State,
    auth: &BearerAuth,
    spec: &capstan_protocol::JobSpec,
    submitter: &str,
) -> Result<(), ApiError> {
    super::secrets::check_refs(state, auth, spec, submitter).await?;
    super::systems::check_system(state, spec).await
}

/// A `status` parameter as the job status to filter on; `unknown`, which only marks history
/// rows a newer version wrote, is refused.
fn status_filter(status: Option<Status>) -> Result<Option<JobStatus>, ApiError> {
    status
        .map(JobStatus::try_from)
        .transpose()
        .map_err(|error| ApiError::bad_request(error.to_string(), Some("status")))
}

fn default_limit() -> u32 {
    50
}

fn default_purge_limit() -> u64 {
    10_000
}

/// Who submitted job `id`: from its live record, or from its history once that has expired.
async fn submitter_of(state: &crate::State, id: JobId) -> Result<Option<SubmittedBy>, ApiError> {
    if let Some(live) = state.mesh.jobs.get(&id.to_string()).await? {
        return Ok(live.value.submitted_by);
    }
    if let Some(parent) = state.mesh.fanouts.get(&id.to_string()).await? {
        return Ok(parent.value.submitted_by);
    }
    match state.history.get(id).await? {
        Some(row) => Ok(Job::from_row(row, Vec::new())
            .submitted_by
            .and_then(|s| s.to_protocol())),
        None => Err(ApiError::not_found(format!("no job {id}"))),
    }
}

/// The output of job `id`: captured so far (of `attempt`, default the current), or followed
/// as server-sent events until it ends.
async fn job_logs(
    served: &crate::State,
    id: JobId,
    attempt: Option<u32>,
    follow: bool,
) -> Result<LogsResponse, ApiError> {
    let state = crate::logs::job_state(served, id).await?;
    if follow {
        let events = crate::logs::follow(served.mesh.clone(), id, state);
        let stream = EventStream::new(events)
            .keep_alive(std::time::Duration::from_secs(15))
            .to_event(|event| {
                poem::web::sse::Event::message(poem_openapi::types::ToJSON::to_json_string(&event))
                    .event_type(event.kind.as_str())
            });
        return Ok(LogsResponse::Follow(stream));
    }
    let logs = crate::logs::captured(&served.mesh, id, attempt, &state).await?;
    Ok(LogsResponse::Captured(Json(logs)))
}

/// The targets of fan-out `parent`, each brought up to date from its job's live record (read
/// a few at a time), with the live status of each.
async fn target_views(
    state: &crate::State,
    parent: &FanOutRecord,
) -> Result<Vec<(TargetStatus, TargetView)>, ApiError> {
    use futures::{StreamExt, TryStreamExt};
    let reads: Vec<_> = parent
        .targets
        .iter()
        .map(|target| target_view(state, target))
        .collect();
    futures::stream::iter(reads)
        .buffered(16)
        .try_collect()
        .await
}

/// `target`'s live status and view, from its job's record.
async fn target_view(
    state: &crate::State,
    target: &capstan_protocol::Target,
) -> Result<(TargetStatus, TargetView), ApiError> {
    let record = match target.job {
        Some(job) => state.mesh.jobs.get(&job.to_string()).await?,
        None => None,
    };
    let record = record.as_ref().map(|r| &r.value);
    Ok((live_status(target, record), TargetView::of(target, record)))
}

/// A fan-out parent as a job: its outcome as a job status (`partial` is `failed`, with the
/// count in `error`), no attempt of its own, and the summary of its targets.
fn parent_job(parent: &FanOutRecord, statuses: &[TargetStatus]) -> Job {
    let mut record = JobRecord::new(parent.id, parent.spec.clone(), parent.created_at);
    record.status = parent.status.job_status();
    record.updated_at = parent.updated_at;
    record.finished_at = parent.finished_at;
    record.cancel_requested_at = parent.cancel_requested_at;
    record.submitted_by = parent.submitted_by.clone();
    if matches!(parent.status, FanOutStatus::Partial | FanOutStatus::Failed) {
        let succeeded = parent
            .targets
            .iter()
            .filter(|t| t.status == TargetStatus::Succeeded)
            .count();
        record.error = Some(format!(
            "{}: {succeeded} of {} targets succeeded",
            parent.status.as_str(),
            parent.targets.len()
        ));
    }
    let mut job = Job::from_record(record, Vec::new());
    job.fanout = Some(FanOutSummary::of(parent, statuses));
    job
}

/// A live job's events: the history's, and, when the record shows an attempt ended that the
/// history has not recorded yet, the events stored after the history's newest, read from the
/// events stream. Whoever saw the job end then finds its end among its events. An event from
/// the stream is kept only if the projection would believe it now; events the projection
/// already judged (up to the history's newest) are not read again. If the stream cannot be
/// read, the history's events are the answer.
async fn with_unrecorded(
    state: &crate::State,
    id: JobId,
    recorded: Vec<capstan_store::entity::event::Model>,
    record: &JobRecord,
) -> Vec<capstan_store::entity::event::Model> {
    use async_nats::jetstream::consumer::DeliverPolicy;
    // An active attempt's events are announced as it goes (some only once it has lasted), so
    // only an end, or a retry's wait, is looked for.
    let ended = record.status.is_terminal() || record.status == JobStatus::Retrying;
    let shown = recorded.iter().any(|row| {
        row.status == record.status.as_str() && u32::try_from(row.attempt) == Ok(record.attempt)
    });
    if !ended || shown {
        return recorded;
    }
    let from = match recorded.iter().map(|row| row.seq).max() {
        Some(newest) => DeliverPolicy::ByStartSequence {
            start_sequence: u64::try_from(newest).unwrap_or(0) + 1,
        },
        None => DeliverPolicy::All,
    };
    let stored = match crate::replay::stored(
        &state.mesh,
        capstan_protocol::topology::EVENTS.name,
        capstan_protocol::subjects::job_events(id),
        from,
    )
    .await
    {
        Ok(stored) => stored,
        Err(error) => {
            tracing::debug!(job = %id, error = ?error, "cannot read the job's unrecorded events");
            return recorded;
        }
    };
    let mut events: std::collections::BTreeMap<i64, _> =
        recorded.into_iter().map(|row| (row.seq, row)).collect();
    for message in stored {
        let Ok(seq) = message.info().map(|info| info.stream_sequence) else {
            continue;
        };
        let Ok((event, _)) = capstan_mesh::wire::decode::<capstan_protocol::JobEvent>(
            message.headers.as_ref(),
            &message.payload,
        ) else {
            continue;
        };
        if crate::projection::credible(&message.subject, &event, Some(record.attempt)).is_ok() {
            let row = capstan_store::Sequenced { seq, event }.event_model();
            events.entry(row.seq).or_insert(row);
        }
    }
    events.into_values().collect()
}

/// A job accepted but not yet created by a scheduler, from its stored submission read as the
/// schedulers read it (`capstan_mesh::intake::find`): pending (or scheduled), no attempt yet.
/// A scheduler creates the record before it removes the submission, so when neither is found
/// the record is read once more, in case it came between the two reads.
pub(crate) async fn accepted(
    state: &crate::State,
    id: capstan_protocol::JobId,
) -> Result<Option<capstan_protocol::JobRecord>, ApiError> {
    match capstan_mesh::intake::find(&state.mesh.js, id).await? {
        Some(submission) => Ok(Some(submission.record())),
        None => Ok(state.mesh.jobs.get(&id.to_string()).await?.map(|v| v.value)),
    }
}

/// Why `record`, a job under a concurrency limit, waits, if it does: its place in its key's
/// line. Best effort: a bucket that cannot be read leaves it unsaid.
async fn waiting_for_slot(state: &crate::State, record: &JobRecord) -> Option<WaitingView> {
    let concurrency = record.spec.concurrency.as_ref()?;
    if record.status != JobStatus::Pending || record.node.is_some() {
        return None;
    }
    let slots = state
        .mesh
        .concurrency
        .get(&concurrency.key)
        .await
        .ok()
        .flatten();
    let (running, ahead) = match slots.and_then(|slots| slots.value.standing(record.id)) {
        Some(Admission::Admitted) => return None,
        Some(Admission::Waiting { ahead, running }) => (running, ahead),
        // Not in line yet: the scheduler that took it has not asked for a slot.
        None => (0, 0),
    };
    Some(WaitingView {
        concurrency_key: concurrency.key.clone(),
        limit: concurrency.limit,
        running: u32::try_from(running).unwrap_or(u32::MAX),
        ahead: u32::try_from(ahead).unwrap_or(u32::MAX),
    })
}
