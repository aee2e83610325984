//! Changes to a job's life that more than one service makes, written once: ending an attempt
//! (the executor when its process ends, the scheduler when a node is lost), arming the durable
//! timer of a job that waits, and cancellation (the API and the scheduler's NATS endpoint).
//!
//! Every change is a compare-and-swap on the record's revision followed by what it causes (a
//! timer, an event); the follow-ups are idempotent, so a writer that crashed in between
//! repeats them from the record alone ([`follow_up`]).

use std::time::Duration;

use async_nats::jetstream::message::PublishMessage;
use bytes::Bytes;
use capstan_protocol::job::Outcome;
use capstan_protocol::topology::{self, FINISHED_JOB_TTL};
use capstan_protocol::{
    CancelNotice, CancelOutcome, JobEvent, JobEventKind, JobId, JobRecord, JobStatus, Timer,
    Timestamp, codec, headers, subjects,
};

use crate::connect::Mesh;
use crate::error::Error;
use crate::wire::msgpack_headers;

/// A timer due this close to now is published as fired at once rather than scheduled.
const IMMEDIATE: Duration = Duration::from_millis(20);

/// Arms the durable timer of `record`, a `scheduled` or `retrying` job: a message scheduled
/// on the server for `next_attempt_at` (or published as fired when that is now). Setting it
/// again replaces it, so this is safe to repeat.
pub async fn arm_timer(mesh: &Mesh, record: &JobRecord) -> Result<(), Error> {
    let at = record.next_attempt_at.unwrap_or_else(Timestamp::now);
    let timer = Timer {
        job: record.id,
        attempt: record.attempt,
        at,
    };
    let mut map = msgpack_headers();
    map.insert(headers::JOB_ID, record.id.to_string().as_str());
    map.insert(headers::ATTEMPT, record.attempt.to_string().as_str());
    capstan_telemetry::propagation::inject(&mut map);
    let payload = Bytes::from(codec::to_msgpack(&timer)?);
    let immediate = at <= Timestamp::now().plus(IMMEDIATE);
    let subject = if immediate {
        subjects::timer_due(record.id)
    } else {
        let schedule = timer.schedule();
        let target = subjects::timer_due(record.id);
        map.insert(headers::SCHEDULE, schedule.as_str());
        map.insert(headers::SCHEDULE_TARGET, target.as_str());
        subjects::timer_set(record.id)
    };
    let publish = PublishMessage::build()
        .payload(payload)
        .headers(map)
        .message_id(timer.message_id());
    mesh.js
        .send_publish(subject, publish)
        .await
        .map_err(|e| Error::unavailable("timer", e))?
        .await
        .map_err(|e| Error::unavailable("timer", e))?;
    Ok(())
}

/// Removes `job`'s pending timer, if any (its job no longer waits). Best effort: a timer that
/// fires anyway finds the job not waiting and does nothing.
pub async fn disarm_timer(mesh: &Mesh, job: JobId) {
    let purged = async {
        let stream = mesh
            .js
            .get_stream_no_info(topology::TIMERS.name)
            .await
            .map_err(|e| e.to_string())?;
        stream
            .purge()
            .filter(subjects::timer_set(job))
            .await
            .map_err(|e| e.to_string())
    }
    .await;
    if let Err(error) = purged {
        tracing::debug!(job = %job, error = %error, "cannot remove timer");
    }
}

/// Does what a record that was just written causes: arms the timer of a job that now waits,
/// then announces the change with the event of its status. Idempotent (the timer replaces
/// itself, events carry deduplication ids), so it is also how a writer that crashed after the
/// write resumes.
pub async fn follow_up(mesh: &Mesh, record: &JobRecord) -> Result<(), Error> {
    if record.status.is_waiting_for_timer() {
        arm_timer(mesh, record).await?;
    }
    if let Some(kind) = JobEventKind::entering(record.status) {
        mesh.events.job(&JobEvent::new(kind, record)).await?;
    }
    Ok(())
}

/// A random number in 0..1 for backoff jitter.
pub fn jitter_sample() -> f64 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(Timestamp::now().as_millis() as u128);
    (hasher.finish() >> 11) as f64 / (1u64 << 53) as f64
}

/// Writes `next` over the record at `revision` (compare-and-swap); a finished job's record
/// gets the finished-job TTL. The one way a job's new state is written.
///
/// A write can be stored while its reply is lost (NATS went away in between). When the write
/// fails for want of NATS, the record is read back: if it is `next`, the write took effect and
/// this returns its revision, so the caller goes on to what the change causes instead of
/// retrying into a conflict with itself.
pub async fn write(mesh: &Mesh, next: &JobRecord, revision: u64) -> Result<u64, Error> {
    let key = next.id.to_string();
    let written = if next.status.is_terminal() {
        mesh.jobs
            .update_with_ttl(&key, next, revision, FINISHED_JOB_TTL)
            .await
    } else {
        mesh.jobs.update(&key, next, revision).await
    };
    if let Err(error) = &written
        && error.is_transient()
        && let Ok(Some(current)) = mesh.jobs.get(&key).await
        && &current.value == next
    {
        tracing::debug!(job = %key, "a write whose reply was lost was stored");
        return Ok(current.revision);
    }
    written
}

/// Ends the current attempt of `current` (read at `revision`) with `outcome`: writes the
/// record the job's retry policy gives (the job's end, or `retrying`), then arms the timer and
/// announces. Fails with [`Error::Conflict`] when the record changed since it was read; the
/// caller re-reads and decides again.
pub async fn end_attempt(
    mesh: &Mesh,
    current: &JobRecord,
    revision: u64,
    outcome: &Outcome,
) -> Result<JobRecord, Error> {
    let next = current.settled(outcome, Timestamp::now(), jitter_sample());
    write(mesh, &next, revision).await?;
    follow_up(mesh, &next).await?;
    Ok(next)
}

/// Hands the current attempt of `current` (read at `revision`) back for another attempt at
/// once (see [`JobRecord::handed_back`]), and arms its timer.
pub async fn hand_back(
    mesh: &Mesh,
    current: &JobRecord,
    revision: u64,
    outcome: &Outcome,
) -> Result<JobRecord, Error> {
    let next = current.handed_back(outcome, Timestamp::now());
    write(mesh, &next, revision).await?;
    follow_up(mesh, &next).await?;
    Ok(next)
}

/// Quarantines `current` (read at `revision`) for `reason`, and announces it.
pub async fn quarantine(
    mesh: &Mesh,
    current: &JobRecord,
    revision: u64,
    reason: String,
) -> Result<JobRecord, Error> {
    let next = current.quarantined(reason, Timestamp::now());
    write(mesh, &next, revision).await?;
    follow_up(mesh, &next).await?;
    Ok(next)
}

/// Why a job cannot be cancelled.
#[derive(Debug, thiserror::Error)]
pub enum CancelError {
    /// No such job (or its record expired).
    #[error("no job {0}")]
    NotFound(JobId),
    /// The job already ended.
    #[error("job {id} already finished: {status}")]
    Finished {
        /// The job.
        id: JobId,
        /// How it ended.
        status: JobStatus,
    },
    /// NATS failed; retry.
    #[error(transparent)]
    Mesh(#[from] Error),
}

/// Cancels `id`. A job that has not started (pending, scheduled, or retrying) is cancelled at once (by compare-and-swap, so an
/// executor claiming it at the same moment either wins and the job is treated as running, or
/// loses and drops its dispatch). A running job is marked for cancellation and its executor is
/// told; the executor stops the process group and records `cancelled`. Asking again is
/// harmless.
pub async fn cancel(mesh: &Mesh, id: JobId) -> Result<(CancelOutcome, JobRecord), CancelError> {
    let key = id.to_string();
    for _ in 0..8 {
        let Some(current) = mesh.jobs.get(&key).await? else {
            return Err(CancelError::NotFound(id));
        };
        let record = current.value;
        if record.status.is_terminal() {
            if record.status == JobStatus::Cancelled
                && Timestamp::now().since(record.updated_at) < topology::EVENTS.duplicate_window / 2
            {
                // The cancel that ended it may have been stored with its reply lost, before it
                // was announced (a client asks again after a 503). Announcing again is harmless
                // inside the events stream's deduplication window.
                if let Err(error) = mesh
                    .events
                    .job(&JobEvent::new(JobEventKind::Cancelled, &record))
                    .await
                {
                    tracing::debug!(job = %id, error = %error, "cannot announce the cancel again");
                }
            }
            return Err(CancelError::Finished {
                id,
                status: record.status,
            });
        }
        let now = Timestamp::now();
        if matches!(
            record.status,
            JobStatus::Pending | JobStatus::Scheduled | JobStatus::Retrying
        ) {
            let waited_for_timer = record.status.is_waiting_for_timer();
            let cancelled = record.cancelled(now);
            match write(mesh, &cancelled, current.revision).await {
                Ok(_) => {
                    mesh.events
                        .job(&JobEvent::new(JobEventKind::Cancelled, &cancelled))
                        .await?;
                    if waited_for_timer {
                        disarm_timer(mesh, id).await;
                    }
                    tracing::info!(job = %id, "cancelled before it ran");
                    return Ok((CancelOutcome::Cancelled, cancelled));
                }
                Err(Error::Conflict { .. }) => continue,
                Err(error) => return Err(error.into()),
            }
        }
        // Running: mark it (once), then tell its node.
        let marked = if record.cancel_requested_at.is_some() {
            record
        } else {
            let marked = JobRecord {
                cancel_requested_at: Some(now),
                updated_at: now,
                ..record
            };
            match mesh.jobs.update(&key, &marked, current.revision).await {
                Ok(_) => marked,
                Err(Error::Conflict { .. }) => continue,
                Err(error) => return Err(error.into()),
            }
        };
        if let Some(node) = &marked.node {
            let notice = CancelNotice {
                job: id,
                attempt: marked.attempt,
            };
            let payload = Bytes::from(codec::to_msgpack(&notice).map_err(Error::from)?);
            mesh.client
                .publish_with_headers(
                    subjects::control(node, "cancel"),
                    msgpack_headers(),
                    payload,
                )
                .await
                .map_err(|e| Error::unavailable("cancel notice", e))?;
        }
        tracing::info!(job = %id, "cancellation requested");
        return Ok((CancelOutcome::Requested, marked));
    }
    Err(CancelError::Mesh(Error::unavailable(
        "cancel",
        "the job's record kept changing",
    )))
}
