//! Carrying a workflow forward: what the API does when it creates or cancels one, and what
//! schedulers do when one of its steps' jobs changes (and periodically).
//!
//! [`reconcile`] reads the workflow, learns what its running steps' jobs became (from the
//! events that woke it, or by reading their records), reads the end of the standard output of
//! each step that just ended and has dependants, lets [`WorkflowRecord::advance`] decide, and
//! writes the result by compare-and-swap. Only then does it do what the write promised:
//! announces what moved, submits the steps that start (each under the job id the record gave
//! it, so a second submission of the same step is the same job) and cancels what must stop.
//! Any replica may do this at any time: what was decided is in the record, and every action is
//! idempotent. A step whose job was submitted and has no record after
//! [`RESUBMIT_AFTER`](crate::fanout::RESUBMIT_AFTER) is submitted again (the writer may have
//! died between its write and its submissions).

use std::collections::VecDeque;
use std::time::Duration;

use async_nats::jetstream::consumer::{DeliverPolicy, pull};
use capstan_protocol::topology::{self, FINISHED_JOB_TTL};
use capstan_protocol::workflow::{Advance, StepStatus, WorkflowEvent, WorkflowRecord};
use capstan_protocol::{JobId, JobRecord, Timestamp, headers, subjects};
use futures::StreamExt;
use tracing::Instrument;

use crate::connect::Mesh;
use crate::error::Error;
use crate::fanout::{NEVER_ACCEPTED_AFTER, RESUBMIT_AFTER};
use crate::store::{Change, Modified, Versioned};
use crate::submit::Submitter;

/// Why a step failed when its job never appeared.
const NEVER_ACCEPTED: &str = "its job was never accepted: see capstan.events.rejected.submit";

/// What a reconcile learned about the steps' jobs before deciding.
#[derive(Debug, Default)]
pub enum Seen {
    /// Only what the workflow already knows (a new workflow, a cancel asked).
    #[default]
    Nothing,
    /// These jobs' records, from the events that woke it.
    Jobs(Vec<JobRecord>),
    /// Read every running step's job record now.
    ReadAll,
}

/// Stores a new workflow (checked, with its owner and trace set), announces it and starts its
/// first steps. Returns it as it stands after that. Once stored it is accepted: if its first
/// steps cannot be started now, the schedulers' next pass starts them.
pub async fn create(mesh: &Mesh, record: &WorkflowRecord) -> Result<WorkflowRecord, Error> {
    mesh.workflows
        .create(&record.id.to_string(), record)
        .await?;
    announce(mesh, None, record).await;
    match reconcile(mesh, record.id, Seen::Nothing).await {
        Ok(Some(now)) => Ok(now),
        Ok(None) => Ok(record.clone()),
        Err(error) => {
            tracing::warn!(error = %error, workflow = %record.id, "cannot start a workflow's first steps; the schedulers will");
            Ok(record.clone())
        }
    }
}

/// Carries workflow `id` one step forward. Returns it as written (or as found, when nothing
/// changed), `None` when there is no such workflow.
pub async fn reconcile(
    mesh: &Mesh,
    id: JobId,
    seen: Seen,
) -> Result<Option<WorkflowRecord>, Error> {
    let key = id.to_string();
    let Some(current) = mesh.workflows.get(&key).await? else {
        return Ok(None);
    };
    if current.value.status.is_terminal() {
        return Ok(Some(current.value));
    }
    let span = tracing::info_span!(
        "workflow",
        workflow_id = %id,
        workflow = %current.value.spec.name
    );
    capstan_telemetry::propagation::follow_traceparent(&span, current.value.traceparent.as_deref());
    async move {
        let now = Timestamp::now();
        let (jobs, missing) = match seen {
            Seen::Nothing => (Vec::new(), Vec::new()),
            Seen::Jobs(records) => (records, Vec::new()),
            Seen::ReadAll => read_steps(mesh, &current.value, now).await?,
        };
        let ended = learn(mesh, &current.value, jobs).await;
        let never: Vec<JobId> = missing
            .iter()
            .filter(|(_, since)| now.since(*since) > NEVER_ACCEPTED_AFTER)
            .map(|(job, _)| *job)
            .collect();
        let mut plan = None;
        let modified = mesh
            .workflows
            .modify_from(&key, Some(current), |found| {
                let Some(found) = found else {
                    return Change::Stop(None);
                };
                let mut record = found.value.clone();
                for end in &ended {
                    record.observe(
                        end.job,
                        end.status,
                        end.exit_code,
                        end.output.as_deref(),
                        now,
                    );
                }
                record.never_accepted(&never, NEVER_ACCEPTED, now);
                let advance = record.advance(now, JobId::generate);
                plan = Some(advance);
                if record == found.value {
                    return Change::Stop(Some(found.value.clone()));
                }
                record.updated_at = now;
                if record.status.is_terminal() {
                    Change::WriteExpiring(record, FINISHED_JOB_TTL)
                } else {
                    Change::Write(record)
                }
            })
            .await?;
        let plan = plan.expect("decided at least once");
        let record = match modified {
            Modified::Stopped(None) => return Ok(None),
            Modified::Stopped(Some(record)) => record,
            Modified::Written { written, previous } => {
                announce(mesh, previous.as_ref().map(|p| &p.value), &written.value).await;
                if written.value.status.is_terminal() {
                    tracing::info!(status = written.value.status.as_str(), "workflow ended");
                }
                written.value
            }
        };
        carry_out(mesh, &record, &plan, &missing, now).await;
        Ok(Some(record))
    }
    .instrument(span)
    .await
}

/// Asks workflow `id` to stop: its running steps are cancelled and its waiting ones skipped,
/// but for `always` steps. `None` when there is no such workflow; otherwise the workflow as it
/// stands, and whether this asked (false: it had ended or was asked already).
pub async fn cancel(mesh: &Mesh, id: JobId) -> Result<Option<(WorkflowRecord, bool)>, Error> {
    let asked = match mesh
        .workflows
        .mark(&id.to_string(), |record| {
            record.request_cancel(Timestamp::now())
        })
        .await?
    {
        None => return Ok(None),
        Some(asked) => asked,
    };
    match reconcile(mesh, id, Seen::ReadAll).await? {
        Some(record) => Ok(Some((record, asked))),
        // Deleted meanwhile (it had ended and expired).
        None => Ok(None),
    }
}

/// Announces what moved from `before` (none: just created) to `after`.
async fn announce(mesh: &Mesh, before: Option<&WorkflowRecord>, after: &WorkflowRecord) {
    for event in WorkflowEvent::between(before, after) {
        if let Err(error) = mesh.events.workflow(&event).await {
            tracing::warn!(error = %error, workflow = %after.id, "cannot announce a workflow event");
        }
    }
}

/// What a step's job became, with the end of its output when it ended.
struct Ended {
    job: JobId,
    status: capstan_protocol::JobStatus,
    exit_code: Option<i32>,
    output: Option<String>,
}

/// What `jobs` say of `record`'s running steps; for a step that ended and has dependants, the
/// end of its standard output too (none when it cannot be read: the dependants go without).
async fn learn(mesh: &Mesh, record: &WorkflowRecord, jobs: Vec<JobRecord>) -> Vec<Ended> {
    let mut ended = Vec::new();
    for job in jobs {
        let Some(index) = record.step_of(job.id) else {
            continue;
        };
        if record.steps[index].status != StepStatus::Running {
            continue;
        }
        let name = &record.spec.steps[index].name;
        let wanted = record
            .spec
            .steps
            .iter()
            .any(|s| s.depends_on.contains(name));
        let output = if job.status.is_terminal() && wanted {
            match stdout_tail(mesh, &job).await {
                Ok(output) => output,
                Err(error) => {
                    tracing::warn!(error = %error, job = %job.id, "cannot read a step's output");
                    None
                }
            }
        } else {
            None
        };
        ended.push(Ended {
            job: job.id,
            status: job.status,
            exit_code: job.exit_code,
            output,
        });
    }
    ended
}

/// Submits and cancels what `plan` (decided on `record`) asks, and submits again the steps
/// whose jobs went missing.
async fn carry_out(
    mesh: &Mesh,
    record: &WorkflowRecord,
    plan: &Advance,
    missing: &[(JobId, Timestamp)],
    now: Timestamp,
) {
    let submitter = Submitter::new(mesh.js.clone(), mesh.idempotency.clone());
    let mut submit = plan.start.clone();
    for (job, since) in missing {
        if now.since(*since) > RESUBMIT_AFTER
            && let Some(index) = record.step_of(*job)
            && record.steps[index].status == StepStatus::Running
        {
            submit.push(index);
        }
    }
    for index in submit {
        let Some(job) = record.steps[index].job else {
            continue;
        };
        let step = &record.spec.steps[index].name;
        let spec = record.step_job(index);
        match submitter
            .submit_with_id(job, &spec, record.submitted_by.as_ref())
            .await
        {
            Ok(_) => tracing::debug!(step = %step, job = %job, "step submitted"),
            // The next pass submits it again.
            Err(error) => tracing::warn!(error = %error, step = %step, "cannot submit a step"),
        }
    }
    for job in &plan.cancel {
        match crate::lifecycle::cancel(mesh, *job).await {
            Ok(_)
            | Err(crate::lifecycle::CancelError::Finished { .. })
            | Err(crate::lifecycle::CancelError::NotFound(_)) => {}
            Err(error) => tracing::warn!(error = %error, job = %job, "cannot cancel a step"),
        }
    }
}

/// The records of `record`'s running steps' jobs, and the jobs without a record yet (with
/// when they were submitted).
async fn read_steps(
    mesh: &Mesh,
    record: &WorkflowRecord,
    now: Timestamp,
) -> Result<(Vec<JobRecord>, Vec<(JobId, Timestamp)>), Error> {
    let mut jobs = Vec::new();
    let mut missing = Vec::new();
    for step in record
        .steps
        .iter()
        .filter(|s| s.status == StepStatus::Running)
    {
        let Some(job) = step.job else { continue };
        match mesh.jobs.get(&job.to_string()).await? {
            Some(Versioned { value, .. }) => jobs.push(value),
            None => missing.push((job, step.started_at.unwrap_or(now))),
        }
    }
    Ok((jobs, missing))
}

/// The end of the standard output of `job`'s last attempt (at most
/// [`OUTPUT_TAIL_BYTES`](capstan_protocol::workflow::OUTPUT_TAIL_BYTES)), read from the logs
/// stream. Only what the attempt's own node stored counts: the subject names the node, and a
/// node may publish only under its own name. `None` when no node ran the job.
pub async fn stdout_tail(mesh: &Mesh, job: &JobRecord) -> Result<Option<String>, Error> {
    const MAX: usize = capstan_protocol::workflow::OUTPUT_TAIL_BYTES;
    let Some(node) = &job.node else {
        return Ok(None);
    };
    let stream = mesh
        .js
        .get_stream(topology::LOGS.name)
        .await
        .map_err(|e| Error::unavailable("logs stream", e))?;
    let consumer = stream
        .create_consumer(pull::OrderedConfig {
            filter_subject: subjects::logs(job.id, node),
            deliver_policy: DeliverPolicy::All,
            ..Default::default()
        })
        .await
        .map_err(|e| Error::unavailable("logs consumer", e))?;
    let mut left = consumer.cached_info().num_pending;
    let mut messages = consumer
        .messages()
        .await
        .map_err(|e| Error::unavailable("logs read", e))?;
    let attempt = job.attempt.to_string();
    let mut chunks: VecDeque<bytes::Bytes> = VecDeque::new();
    let mut kept = 0usize;
    while left > 0 {
        let message = match tokio::time::timeout(Duration::from_secs(10), messages.next()).await {
            Ok(Some(Ok(message))) => message,
            Ok(Some(Err(error))) => return Err(Error::unavailable("logs read", error)),
            Ok(None) | Err(_) => {
                return Err(Error::unavailable("logs read", "reading output timed out"));
            }
        };
        left = message.info().map(|info| info.pending).unwrap_or(0);
        let map = message.headers.as_ref();
        let stdout = crate::wire::header(map, headers::LOG_STREAM) != Some("stderr");
        if stdout && crate::wire::header(map, headers::ATTEMPT) == Some(attempt.as_str()) {
            kept += message.payload.len();
            chunks.push_back(message.payload.clone());
            while chunks.front().is_some_and(|c| kept - c.len() >= MAX) {
                kept -= chunks.pop_front().map_or(0, |c| c.len());
            }
        }
    }
    let bytes: Vec<u8> = chunks.iter().flat_map(|c| c.iter().copied()).collect();
    let text = String::from_utf8_lossy(&bytes);
    Ok(Some(
        capstan_protocol::workflow::tail(&text, MAX).to_owned(),
    ))
}
