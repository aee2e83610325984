//! Carrying a fan-out parent forward: what schedulers do when one of its targets' jobs
//! changes (and periodically), and what a cancel of the parent does.
//!
//! [`reconcile`] reads the parent, learns what its children became (from the event that woke
//! it, or by reading their records), lets [`FanOutRecord::step`] decide, writes the result by
//! compare-and-swap, and only then does what the write promised: submits the new targets'
//! jobs (each under the id the record gave it, so a second submission of the same target is
//! the same job), cancels what must stop, and announces the parent's end. Any replica may do
//! this at any time: what was decided is in the record, and every action is idempotent.

use std::time::Duration;

use capstan_protocol::fanout::{ChildState, FanOutEvent, FanOutRecord, Step};
use capstan_protocol::topology::FINISHED_JOB_TTL;
use capstan_protocol::{JobId, JobRecord, Timestamp};
use tracing::Instrument;

use crate::connect::Mesh;
use crate::error::Error;
use crate::store::{Change, Modified, Versioned};
use crate::submit::Submitter;

/// A target whose job was submitted this long ago and has no record yet is submitted again
/// (the same job: a duplicate is dropped).
pub const RESUBMIT_AFTER: Duration = Duration::from_secs(10);
/// A target whose job still has no record this long after its submission was refused by the
/// scheduler (its rejection is on `capstan.events.rejected.submit`): it ends `failed`.
pub const NEVER_ACCEPTED_AFTER: Duration = Duration::from_secs(120);

/// What a reconcile learned about the children before deciding.
#[derive(Debug, Default)]
pub enum Seen {
    /// Only what the parent already knows (a new parent, a cancel).
    #[default]
    Nothing,
    /// These children's records, from the events that woke it.
    Children(Vec<JobRecord>),
    /// Read every active target's job record now.
    ReadAll,
}

/// Carries parent `id` one step forward. Returns the parent as written (or as found, when
/// nothing changed), `None` when there is no such parent.
pub async fn reconcile(mesh: &Mesh, id: JobId, seen: Seen) -> Result<Option<FanOutRecord>, Error> {
    let key = id.to_string();
    let Some(current) = mesh.fanouts.get(&key).await? else {
        return Ok(None);
    };
    if current.value.status.is_terminal() {
        return Ok(Some(current.value));
    }
    let span = tracing::info_span!("fan out", job_id = %id);
    capstan_telemetry::propagation::follow_traceparent(&span, current.value.traceparent.as_deref());
    async move {
        let now = Timestamp::now();
        let (children, missing) = match seen {
            Seen::Nothing => (Vec::new(), Vec::new()),
            Seen::Children(records) => (
                records
                    .iter()
                    .map(|record| ChildState {
                        job: record.id,
                        status: record.status,
                        exit_code: record.exit_code,
                    })
                    .collect(),
                Vec::new(),
            ),
            Seen::ReadAll => read_children(mesh, &current.value, now).await?,
        };
        let never = missing
            .iter()
            .filter(|(_, since)| now.since(*since) > NEVER_ACCEPTED_AFTER)
            .map(|(job, _)| *job)
            .collect::<Vec<_>>();
        let mut plan = None;
        let modified = mesh
            .fanouts
            .modify_from(&key, Some(current), |found| {
                let Some(found) = found else {
                    return Change::Stop(None);
                };
                let mut record = found.value.clone();
                let mut changed = record.observe(&children);
                changed |= record.never_accepted(
                    &never,
                    "its job was never accepted: see capstan.events.rejected.submit",
                );
                let step = record.step(changed, now, JobId::generate);
                plan = Some(step.clone());
                match step.next {
                    None => Change::Stop(Some(found.value.clone())),
                    Some(next) if next.status.is_terminal() => {
                        Change::WriteExpiring(next, FINISHED_JOB_TTL)
                    }
                    Some(next) => Change::Write(next),
                }
            })
            .await?;
        let plan = plan.expect("decided at least once");
        let (record, previous) = match modified {
            Modified::Stopped(None) => return Ok(None),
            Modified::Stopped(Some(record)) => (record, None),
            Modified::Written { written, previous } => (written.value, previous),
        };
        carry_out(mesh, &record, &plan, &missing, now).await;
        if record.status.is_terminal()
            && previous.is_some_and(|previous| !previous.value.status.is_terminal())
        {
            announce(mesh, &record).await;
            tracing::info!(status = record.status.as_str(), "fan-out ended");
        }
        Ok(Some(record))
    }
    .instrument(span)
    .await
}

/// Asks parent `id` to stop: its waiting targets are skipped and its running ones cancelled.
/// `None` when there is no such parent; otherwise the parent, and whether this asked (false:
/// it had ended or was asked already).
///
/// A parent accepted but not yet created (its submission stored, no record) is created from
/// its submission with no targets and the cancel asked, so it ends `cancelled` before any
/// target is chosen; the scheduler that takes the submission then finds it ended. Creating is
/// a compare-and-swap: a scheduler that created the parent first wins, and it is asked as
/// any parent.
pub async fn cancel(mesh: &Mesh, id: JobId) -> Result<Option<(FanOutRecord, bool)>, Error> {
    let key = id.to_string();
    let ask = || {
        mesh.fanouts
            .mark(&key, |record| record.request_cancel(Timestamp::now()))
    };
    let asked = match ask().await? {
        Some(asked) => asked,
        None => {
            let Some(parent) = submitted_parent(mesh, id).await? else {
                return Ok(None);
            };
            match mesh.fanouts.create(&key, &parent).await {
                Ok(_) => true,
                Err(Error::AlreadyExists { .. }) => match ask().await? {
                    Some(asked) => asked,
                    None => return Ok(None),
                },
                Err(error) => return Err(error),
            }
        }
    };
    let record = reconcile(mesh, id, Seen::ReadAll)
        .await?
        .expect("the parent was just read");
    Ok(Some((record, asked)))
}

/// Parent `id` as its stored fan-out submission gives it, when a scheduler would accept it
/// ([`crate::intake::claimed`]): no targets chosen yet, and its cancel asked.
async fn submitted_parent(mesh: &Mesh, id: JobId) -> Result<Option<FanOutRecord>, Error> {
    let Some(submission) = crate::intake::claimed(mesh, id).await? else {
        return Ok(None);
    };
    if submission.spec.fanout.is_none() {
        return Ok(None);
    }
    let submitted = submission.submitted_at();
    let start_at = submission.spec.start.map(|start| start.due(submitted));
    let mut parent = FanOutRecord::new(id, submission.spec, Vec::new(), start_at, submitted);
    parent.submitted_by = Some(submission.submitted_by);
    parent.submission_seq = Some(submission.seq);
    parent.request_cancel(Timestamp::now());
    Ok(Some(parent))
}

/// Announces a parent as it stands: its start, or how it ended.
pub async fn announce(mesh: &Mesh, record: &FanOutRecord) {
    if let Err(error) = mesh.events.fanout(&FanOutEvent::of(record)).await {
        tracing::warn!(error = %error, job = %record.id, "cannot announce a fan-out");
    }
}

/// Submits, cancels and resubmits what `plan` (decided on `record`) asks.
async fn carry_out(
    mesh: &Mesh,
    record: &FanOutRecord,
    plan: &Step,
    missing: &[(JobId, Timestamp)],
    now: Timestamp,
) {
    let submitter = Submitter::new(mesh.js.clone(), mesh.idempotency.clone());
    let mut submit: Vec<usize> = plan.submit.clone();
    // Targets whose job was submitted a while ago and has not appeared: submit it again.
    for (job, since) in missing {
        if now.since(*since) > RESUBMIT_AFTER
            && let Some(index) = record.targets.iter().position(|t| t.job == Some(*job))
            && record.targets[index].status.is_active()
        {
            submit.push(index);
        }
    }
    for index in submit {
        let target = &record.targets[index];
        let Some(job) = target.job else { continue };
        let spec = record.spec.child(record.id, target, record.start_at);
        match submitter
            .submit_with_id(job, &spec, record.submitted_by.as_ref())
            .await
        {
            Ok(_) => tracing::debug!(target = %target.name, job = %job, "target submitted"),
            // The next pass submits it again.
            Err(error) => {
                tracing::warn!(error = %error, target = %target.name, "cannot submit a target")
            }
        }
    }
    for job in &plan.cancel {
        match crate::lifecycle::cancel(mesh, *job).await {
            Ok(_)
            | Err(crate::lifecycle::CancelError::Finished { .. })
            | Err(crate::lifecycle::CancelError::NotFound(_)) => {}
            Err(error) => tracing::warn!(error = %error, job = %job, "cannot cancel a target"),
        }
    }
}

/// The states of `record`'s active targets' jobs, and the jobs without a record yet (with
/// when they were submitted).
async fn read_children(
    mesh: &Mesh,
    record: &FanOutRecord,
    now: Timestamp,
) -> Result<(Vec<ChildState>, Vec<(JobId, Timestamp)>), Error> {
    let mut children = Vec::new();
    let mut missing = Vec::new();
    for target in record.targets.iter().filter(|t| t.status.is_active()) {
        let Some(job) = target.job else { continue };
        match mesh.jobs.get(&job.to_string()).await? {
            Some(Versioned { value, .. }) => children.push(ChildState {
                job,
                status: value.status,
                exit_code: value.exit_code,
            }),
            None => missing.push((job, target.submitted_at.unwrap_or(now))),
        }
    }
    Ok((children, missing))
}
