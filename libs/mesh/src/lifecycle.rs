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
use crate::store::{Change, Modified, Versioned};
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
    let due = Due {
        at,
        set: subjects::timer_set(record.id),
        fired: subjects::timer_due(record.id),
        message_id: timer.message_id(),
    };
    publish_due(mesh, due, map, payload, "timer").await
}

/// Where and when a durable timer fires.
pub(crate) struct Due {
    /// When.
    pub(crate) at: Timestamp,
    /// The subject its schedule is set on (one per timer: setting it again replaces it).
    pub(crate) set: String,
    /// The subject the server fires it onto.
    pub(crate) fired: String,
    /// Its deduplication id.
    pub(crate) message_id: String,
}

/// Publishes a durable timer: scheduled on the server for `due.at`, or published as fired
/// when that is now; waits until it is stored.
pub(crate) async fn publish_due(
    mesh: &Mesh,
    due: Due,
    mut map: async_nats::HeaderMap,
    payload: Bytes,
    what: &'static str,
) -> Result<(), Error> {
    let subject = if due.at <= Timestamp::now().plus(IMMEDIATE) {
        due.fired
    } else {
        let schedule = capstan_protocol::timer::at_schedule(due.at);
        map.insert(headers::SCHEDULE, schedule.as_str());
        map.insert(headers::SCHEDULE_TARGET, due.fired.as_str());
        due.set
    };
    let publish = PublishMessage::build()
        .payload(payload)
        .headers(map)
        .message_id(due.message_id);
    mesh.js
        .send_publish(subject, publish)
        .await
        .map_err(|e| Error::unavailable(what, e))?
        .await
        .map_err(|e| Error::unavailable(what, e))?;
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
/// gets the finished-job TTL. The one way a job's new state is written ([`modify`], for a
/// change decided on what it reads, writes the same way).
///
/// A write can be stored while its reply is lost (NATS went away in between). When the write
/// fails for want of NATS, the record is read back: if it is `next`, the write took effect and
/// this returns its revision, so the caller goes on to what the change causes instead of
/// retrying into a conflict with itself.
pub async fn write(mesh: &Mesh, next: &JobRecord, revision: u64) -> Result<u64, Error> {
    let key = next.id.to_string();
    let written = match expiry(next) {
        Some(ttl) => mesh.jobs.update_with_ttl(&key, next, revision, ttl).await,
        None => mesh.jobs.update(&key, next, revision).await,
    };
    if let Err(error) = &written
        && error.is_transient()
        && let Some(revision) = stored(mesh, next).await
    {
        return Ok(revision);
    }
    written
}

/// Changes job `id`'s record as [`Bucket::modify`](crate::store::Bucket::modify) does (read,
/// let `decide` choose, compare-and-swap, decide again after a lost race), writing as
/// [`write`] does: a finished record gets the finished-job TTL, and a write that failed for
/// want of NATS is read back and, when the record holds it, counts as written.
///
/// `known` is the record as the caller already holds it (the one its last write stored): the first
/// decision is made on it and its write costs no read; `None` reads first. What the change
/// causes (a timer, an event) is the caller's to do afterwards ([`follow_up`]).
pub async fn modify<S>(
    mesh: &Mesh,
    id: JobId,
    known: Option<Versioned<JobRecord>>,
    mut decide: impl FnMut(Option<&Versioned<JobRecord>>) -> Change<JobRecord, S>,
) -> Result<Modified<JobRecord, S>, Error> {
    let key = id.to_string();
    // The last write decided, and the record it was decided from: if NATS failed under it,
    // it may have been stored all the same. (After a write that lost its race, a failed read
    // costs one read back, which cannot find a write that lost.)
    let mut tried: Option<(JobRecord, Option<Versioned<JobRecord>>)> = None;
    let decide = |current: Option<&Versioned<JobRecord>>| {
        let change = match decide(current) {
            Change::Write(next) => match expiry(&next) {
                Some(ttl) => Change::WriteExpiring(next, ttl),
                None => Change::Write(next),
            },
            change => change,
        };
        tried = match &change {
            Change::Write(next) | Change::WriteExpiring(next, _) => {
                Some((next.clone(), current.cloned()))
            }
            Change::Stop(_) => None,
        };
        change
    };
    let modified = match known {
        Some(known) => mesh.jobs.modify_from(&key, Some(known), decide).await,
        None => mesh.jobs.modify(&key, decide).await,
    };
    match modified {
        Err(error @ Error::Unavailable { .. }) => {
            let Some((next, previous)) = tried else {
                return Err(error);
            };
            match stored(mesh, &next).await {
                Some(revision) => Ok(Modified::Written {
                    written: Versioned {
                        value: next,
                        revision,
                    },
                    previous,
                }),
                None => Err(error),
            }
        }
        modified => modified,
    }
}

/// How long `record` is kept once written: a finished job's record expires.
fn expiry(record: &JobRecord) -> Option<Duration> {
    record.status.is_terminal().then_some(FINISHED_JOB_TTL)
}

/// Reads back the record `written` was meant to replace after its write failed for want of
/// NATS: its revision when the record is `written` (stored, only the reply was lost).
async fn stored(mesh: &Mesh, written: &JobRecord) -> Option<u64> {
    match mesh.jobs.get(&written.id.to_string()).await {
        Ok(Some(current)) if &current.value == written => {
            tracing::debug!(job = %written.id, "a write whose reply was lost was stored");
            Some(current.revision)
        }
        _ => None,
    }
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

/// The job `id` as its stored submission gives it, when a scheduler would accept it as that
/// job ([`crate::intake::claimed`]) and it is no fan-out (whose parent is another record).
async fn submitted_job(mesh: &Mesh, id: JobId) -> Result<Option<JobRecord>, Error> {
    Ok(crate::intake::claimed(mesh, id)
        .await?
        .filter(|submission| submission.spec.fanout.is_none())
        .map(|submission| submission.record()))
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

/// Cancels `id`. A job that has not started (pending, scheduled, or retrying) is cancelled at
/// once (by compare-and-swap, so an executor claiming it at the same moment either wins and the
/// job is treated as running, or loses and drops its dispatch). A running job is marked for
/// cancellation and its executor is told; the executor stops the process group and records
/// `cancelled`. Asking again is harmless.
///
/// A job accepted but not yet created (its submission stored, no record yet: a cancel right
/// after the create's reply) is cancelled from its submission: its record is created
/// `cancelled`, and whoever takes the submission finds the job ended. Creating is a
/// compare-and-swap too, so a scheduler or executor that creates the record first wins, and
/// the cancel then applies to the job as it was created.
pub async fn cancel(mesh: &Mesh, id: JobId) -> Result<(CancelOutcome, JobRecord), CancelError> {
    /// What the record showed when nothing was to be written.
    enum Unchanged {
        Missing,
        Finished(JobRecord),
        Marked(JobRecord),
    }
    // The job as its stored submission gives it, once the record was found missing.
    let mut submitted: Option<JobRecord> = None;
    let modified = loop {
        let modified = modify(mesh, id, None, |current| {
            let Some(current) = current else {
                return match &submitted {
                    Some(record) => Change::Write(record.cancelled(Timestamp::now())),
                    None => Change::Stop(Unchanged::Missing),
                };
            };
            let record = &current.value;
            let now = Timestamp::now();
            match record.status {
                status if status.is_terminal() => Change::Stop(Unchanged::Finished(record.clone())),
                JobStatus::Pending | JobStatus::Scheduled | JobStatus::Retrying => {
                    Change::Write(record.cancelled(now))
                }
                // Running: mark it (once), then tell its node.
                _ if record.cancel_requested_at.is_some() => {
                    Change::Stop(Unchanged::Marked(record.clone()))
                }
                _ => Change::Write(JobRecord {
                    cancel_requested_at: Some(now),
                    updated_at: now,
                    ..record.clone()
                }),
            }
        })
        .await?;
        if matches!(modified, Modified::Stopped(Unchanged::Missing)) && submitted.is_none() {
            submitted = submitted_job(mesh, id).await?;
            if submitted.is_some() {
                continue;
            }
        }
        break modified;
    };
    let marked = match modified {
        Modified::Stopped(Unchanged::Missing) => return Err(CancelError::NotFound(id)),
        Modified::Stopped(Unchanged::Finished(record)) => {
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
        Modified::Stopped(Unchanged::Marked(record)) => record,
        Modified::Written { written, previous } if written.value.status == JobStatus::Cancelled => {
            let cancelled = written.value;
            mesh.events
                .job(&JobEvent::new(JobEventKind::Cancelled, &cancelled))
                .await?;
            if previous.is_some_and(|previous| previous.value.status.is_waiting_for_timer()) {
                disarm_timer(mesh, id).await;
            }
            tracing::info!(job = %id, "cancelled before it ran");
            return Ok((CancelOutcome::Cancelled, cancelled));
        }
        Modified::Written { written, .. } => written.value,
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
    Ok((CancelOutcome::Requested, marked))
}
