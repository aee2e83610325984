//! A job's state: its status and the record kept under its id in the jobs KV bucket.
//!
//! Every change to a record is a compare-and-swap on the KV revision the writer read, so two
//! writers (two scheduler replicas, a scheduler and an executor) never both win. The
//! transition helpers here only compute the next record; the caller performs the CAS.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::auth::SubmittedBy;
use crate::ids::{InstanceId, JobId, NodeId};
use crate::retry::{self, RetryOn};
use crate::spec::JobSpec;
use crate::timestamp::Timestamp;

/// Where a job is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum JobStatus {
    /// Accepted with a start time (`run_at` or `delay`) that has not come yet.
    Scheduled,
    /// Accepted; waiting for an executor, or dispatched to one that has not started it yet.
    Pending,
    /// The process is running on an executor.
    Running,
    /// An attempt ended unsuccessfully and the retry policy grants another, which starts at
    /// `next_attempt_at`.
    Retrying,
    /// The process exited with status 0.
    Succeeded,
    /// The process exited non-zero, was killed by a signal, or could not be started.
    Failed,
    /// The process ran past its timeout and was killed.
    TimedOut,
    /// Cancelled before it finished.
    Cancelled,
    /// The last attempt's executor died, went silent or handed it back, and the retry policy
    /// grants no other.
    Lost,
    /// Set aside: its attempts kept taking executors down with them (lost too many times, or
    /// a dispatch delivered too often without being settled). `error` says why.
    Quarantined,
}

impl JobStatus {
    /// Every status, in life-cycle order.
    pub const ALL: [JobStatus; 10] = [
        Self::Scheduled,
        Self::Pending,
        Self::Running,
        Self::Retrying,
        Self::Succeeded,
        Self::Failed,
        Self::TimedOut,
        Self::Cancelled,
        Self::Lost,
        Self::Quarantined,
    ];

    /// True for the statuses a job never leaves.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            Self::Succeeded
                | Self::Failed
                | Self::TimedOut
                | Self::Cancelled
                | Self::Lost
                | Self::Quarantined
        )
    }

    /// True for the statuses of a job waiting for a timer: `scheduled` and `retrying`.
    pub fn is_waiting_for_timer(self) -> bool {
        matches!(self, Self::Scheduled | Self::Retrying)
    }

    /// The retryable ending this status is, if any.
    pub fn ending(self) -> Option<RetryOn> {
        match self {
            Self::Failed => Some(RetryOn::Failed),
            Self::TimedOut => Some(RetryOn::TimedOut),
            Self::Lost => Some(RetryOn::Lost),
            _ => None,
        }
    }

    /// The snake_case name, as on the wire and in subjects.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Scheduled => "scheduled",
            Self::Pending => "pending",
            Self::Running => "running",
            Self::Retrying => "retrying",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::TimedOut => "timed_out",
            Self::Cancelled => "cancelled",
            Self::Lost => "lost",
            Self::Quarantined => "quarantined",
        }
    }
}

impl fmt::Display for JobStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for JobStatus {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|status| status.as_str() == s)
            .ok_or_else(|| format!("`{s}` is not a job status"))
    }
}

/// How much output an attempt produced, and whether some was dropped.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct OutputSummary {
    /// Bytes the process wrote to standard output.
    pub stdout_bytes: u64,
    /// Bytes the process wrote to standard error.
    pub stderr_bytes: u64,
    /// True when the output passed the executor's cap and only part of it was kept.
    pub truncated: bool,
}

/// How an attempt ended, as the executor saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// A terminal status.
    pub status: JobStatus,
    /// The exit code, when the process exited.
    pub exit_code: Option<i32>,
    /// The signal that killed the process, when one did.
    pub signal: Option<i32>,
    /// Why the attempt failed, when the exit status alone does not say.
    pub error: Option<String>,
    /// Output sizes.
    pub output: OutputSummary,
}

impl Outcome {
    /// An attempt lost (its executor died, went silent, or handed it back) for `reason`.
    pub fn lost(reason: impl Into<String>) -> Self {
        Self {
            status: JobStatus::Lost,
            exit_code: None,
            signal: None,
            error: Some(reason.into()),
            output: OutputSummary::default(),
        }
    }
}

/// The current state of one job: the value under its id in the jobs bucket.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct JobRecord {
    /// The job's id (also its key).
    pub id: JobId,
    /// Current status.
    pub status: JobStatus,
    /// The validated spec.
    pub spec: JobSpec,
    /// The current attempt, counted from 1 once dispatched; 0 before the first dispatch.
    pub attempt: u32,
    /// The executor of the current attempt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<NodeId>,
    /// The executor process that started the current attempt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance: Option<InstanceId>,
    /// When the job was accepted.
    pub created_at: Timestamp,
    /// When the record last changed.
    pub updated_at: Timestamp,
    /// When the current attempt was dispatched.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dispatched_at: Option<Timestamp>,
    /// When the current attempt's process started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<Timestamp>,
    /// When the job reached its terminal status.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<Timestamp>,
    /// Exit code of the last finished attempt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// Signal that killed the last finished attempt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<i32>,
    /// Why the job failed, when the exit status does not say it all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Output sizes of the last finished attempt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<OutputSummary>,
    /// Sequence of the submission message in the submissions stream, when the job came
    /// through it; tells a redelivered submission from a different one reusing the id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub submission_seq: Option<u64>,
    /// W3C `traceparent` of the job's trace, so every hop joins the same trace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
    /// When cancellation of the running attempt was requested; the executor stops it and
    /// records `cancelled`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cancel_requested_at: Option<Timestamp>,
    /// When a `scheduled` or `retrying` job's next attempt may start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_attempt_at: Option<Timestamp>,
    /// How the current attempt ended, once it has; unlike `status` it stays `failed`,
    /// `timed_out` or `lost` while the job is `retrying`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempt_status: Option<JobStatus>,
    /// Attempts recorded `lost` so far; too many quarantine the job.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub lost_attempts: u32,
    /// Attempts handed back unstarted or stopped by their executor (it shut down, its node was
    /// drained or went away before taking them): they do not count against the retry policy.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub handed_back_attempts: u32,
    /// Who submitted the job, and how they authenticated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub submitted_by: Option<SubmittedBy>,
}

fn is_zero(value: &u32) -> bool {
    *value == 0
}

impl JobRecord {
    /// A newly accepted job, not yet dispatched.
    pub fn new(id: JobId, spec: JobSpec, now: Timestamp) -> Self {
        Self {
            id,
            status: JobStatus::Pending,
            spec,
            attempt: 0,
            node: None,
            instance: None,
            created_at: now,
            updated_at: now,
            dispatched_at: None,
            started_at: None,
            finished_at: None,
            exit_code: None,
            signal: None,
            error: None,
            output: None,
            submission_seq: None,
            traceparent: None,
            cancel_requested_at: None,
            next_attempt_at: None,
            attempt_status: None,
            lost_attempts: 0,
            handed_back_attempts: 0,
            submitted_by: None,
        }
    }

    /// A newly accepted job that waits until `at` before its first attempt.
    pub fn scheduled(id: JobId, spec: JobSpec, now: Timestamp, at: Timestamp) -> Self {
        Self {
            status: JobStatus::Scheduled,
            next_attempt_at: Some(at),
            ..Self::new(id, spec, now)
        }
    }

    /// True once dispatched and not yet started by the executor.
    pub fn is_dispatched(&self) -> bool {
        self.status == JobStatus::Pending && self.node.is_some()
    }

    /// True while the job waits with no node: created unplaced, or placed after waiting and
    /// not yet claimed (such a placement leaves the record as it is; see `Dispatch`).
    pub fn is_unplaced(&self) -> bool {
        self.status == JobStatus::Pending && self.node.is_none()
    }

    /// The record after placing the next attempt on `node`.
    pub fn assigned(&self, node: NodeId, now: Timestamp) -> Self {
        Self {
            status: JobStatus::Pending,
            attempt: self.attempt + 1,
            node: Some(node),
            instance: None,
            updated_at: now,
            dispatched_at: Some(now),
            started_at: None,
            next_attempt_at: None,
            attempt_status: None,
            exit_code: None,
            signal: None,
            error: None,
            output: None,
            ..self.clone()
        }
    }

    /// True when a timer naming `attempt` may start this job's next attempt now: the job
    /// still waits for it (a timer of an earlier wait, or of a cancelled job, is stale).
    pub fn awaits_timer(&self, attempt: u32) -> bool {
        self.status.is_waiting_for_timer() && self.attempt == attempt
    }

    /// The record after `instance` started the current attempt's process.
    pub fn started(&self, instance: InstanceId, now: Timestamp) -> Self {
        Self {
            status: JobStatus::Running,
            instance: Some(instance),
            updated_at: now,
            started_at: Some(now),
            ..self.clone()
        }
    }

    /// The record of a job cancelled before it ran.
    pub fn cancelled(&self, now: Timestamp) -> Self {
        let error = match self.status {
            JobStatus::Retrying => "cancelled while waiting to retry",
            _ => "cancelled before it ran",
        };
        Self {
            status: JobStatus::Cancelled,
            updated_at: now,
            finished_at: Some(now),
            error: Some(error.to_owned()),
            next_attempt_at: None,
            ..self.clone()
        }
    }

    /// The record after the current attempt ended with `outcome`, the job's retry policy
    /// deciding between another attempt (`retrying`, at `now` plus the backoff, `random` in
    /// 0..1 drawing the jitter) and the end. An attempt lost once too often quarantines the
    /// job instead.
    pub fn settled(&self, outcome: &Outcome, now: Timestamp, random: f64) -> Self {
        let lost_attempts = self.lost_attempts + u32::from(outcome.status == JobStatus::Lost);
        let ended = Self {
            lost_attempts,
            ..self.finished(outcome, now)
        };
        if outcome.status == JobStatus::Lost && lost_attempts >= retry::limits::MAX_LOST_ATTEMPTS {
            let reason = format!(
                "quarantined: lost {lost_attempts} attempts (its executors died, went silent or \
                 handed it back each time); last: {}",
                outcome.error.as_deref().unwrap_or("no detail")
            );
            return Self {
                status: JobStatus::Quarantined,
                error: Some(reason),
                ..ended
            };
        }
        let Some(ending) = outcome.status.ending() else {
            return ended;
        };
        // Hand-backs were not the job's doing: its policy counts only the attempts that ran
        // their course.
        let counted = self
            .attempt
            .saturating_sub(self.handed_back_attempts)
            .max(1);
        if !self.spec.retry.retries(ending, counted) {
            return ended;
        }
        let wait = self.spec.retry.wait_after(counted, random);
        Self {
            status: JobStatus::Retrying,
            finished_at: None,
            next_attempt_at: Some(now.plus(wait)),
            ..ended
        }
    }

    /// The record after the current attempt ended with `outcome`, as the job's end (no retry
    /// considered).
    pub fn finished(&self, outcome: &Outcome, now: Timestamp) -> Self {
        Self {
            status: outcome.status,
            updated_at: now,
            finished_at: Some(now),
            exit_code: outcome.exit_code,
            signal: outcome.signal,
            error: outcome.error.clone(),
            output: Some(outcome.output),
            attempt_status: Some(outcome.status),
            cancel_requested_at: None,
            next_attempt_at: None,
            ..self.clone()
        }
    }

    /// The record of an attempt handed back by its executor (it shut down, or its node was
    /// drained) after `outcome`: another attempt starts at once, whatever the retry policy,
    /// and the hand-back counts neither towards quarantine nor against the policy's attempts.
    pub fn handed_back(&self, outcome: &Outcome, now: Timestamp) -> Self {
        Self {
            status: JobStatus::Retrying,
            finished_at: None,
            next_attempt_at: Some(now),
            handed_back_attempts: self.handed_back_attempts + 1,
            ..self.finished(outcome, now)
        }
    }

    /// The record of a job set aside without another attempt, for `reason`.
    pub fn quarantined(&self, reason: String, now: Timestamp) -> Self {
        Self {
            status: JobStatus::Quarantined,
            updated_at: now,
            finished_at: Some(now),
            error: Some(format!("quarantined: {reason}")),
            attempt_status: Some(JobStatus::Quarantined),
            next_attempt_at: None,
            ..self.clone()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_parse_from_their_wire_names() {
        for status in JobStatus::ALL {
            assert_eq!(status.as_str().parse::<JobStatus>(), Ok(status));
            let json = serde_json::to_string(&status).expect("encodes");
            assert_eq!(json, format!("\"{status}\""));
        }
        assert!("done".parse::<JobStatus>().is_err());
    }

    #[test]
    fn assignment_starts_the_next_attempt_and_clears_the_previous_start() {
        let now = Timestamp::from_millis(1_000);
        let record = JobRecord::new(JobId::generate(), JobSpec::shell("true"), now);
        let node = NodeId::new("n1").expect("valid");
        let assigned = record.assigned(node.clone(), Timestamp::from_millis(2_000));
        assert_eq!(assigned.attempt, 1);
        assert!(assigned.is_dispatched());
        let started = assigned.started(InstanceId::generate(), Timestamp::from_millis(3_000));
        assert_eq!(started.status, JobStatus::Running);
        let again = started.assigned(node, Timestamp::from_millis(4_000));
        assert_eq!((again.attempt, again.started_at), (2, None));
    }

    fn outcome(status: JobStatus) -> Outcome {
        Outcome {
            status,
            exit_code: (status == JobStatus::Failed).then_some(1),
            signal: None,
            error: None,
            output: OutputSummary::default(),
        }
    }

    fn running(spec: JobSpec, attempt: u32) -> JobRecord {
        let node = NodeId::new("n1").expect("valid");
        let mut record = JobRecord::new(JobId::generate(), spec, Timestamp::from_millis(0));
        for _ in 0..attempt {
            record = record.assigned(node.clone(), Timestamp::from_millis(0));
        }
        record.started(InstanceId::generate(), Timestamp::from_millis(0))
    }

    #[test]
    fn a_failure_the_policy_retries_waits_for_its_backoff() {
        let mut spec = JobSpec::shell("false");
        spec.retry = crate::retry::RetryPolicy::try_from(crate::retry::RetryPolicyWire {
            max_attempts: Some(3),
            jitter: Some(0.0),
            ..Default::default()
        })
        .expect("valid");
        let now = Timestamp::from_millis(10_000);
        let retrying = running(spec.clone(), 2).settled(&outcome(JobStatus::Failed), now, 0.0);
        assert_eq!(retrying.status, JobStatus::Retrying);
        assert_eq!(retrying.attempt_status, Some(JobStatus::Failed));
        assert_eq!(
            retrying.next_attempt_at,
            Some(Timestamp::from_millis(12_000))
        );
        assert!(retrying.awaits_timer(2) && !retrying.awaits_timer(1));
        let last = running(spec, 3).settled(&outcome(JobStatus::Failed), now, 0.0);
        assert_eq!(
            (last.status, last.next_attempt_at),
            (JobStatus::Failed, None)
        );
    }

    #[test]
    fn hand_backs_do_not_use_up_the_attempts_a_policy_grants() {
        let now = Timestamp::from_millis(5_000);
        // Attempts 1 and 2 were handed back unstarted; attempt 3 is the first to run.
        let mut record = running(JobSpec::shell("true"), 1);
        for attempt in 1..=2 {
            record.attempt = attempt;
            record = record.handed_back(&outcome(JobStatus::Lost), now);
        }
        assert_eq!(record.handed_back_attempts, 2);
        assert_eq!(record.lost_attempts, 0, "hand-backs are not losses");
        record.attempt = 3;
        record.status = JobStatus::Running;
        let lost = record.settled(&outcome(JobStatus::Lost), now, 0.5);
        assert_eq!(
            lost.status,
            JobStatus::Retrying,
            "the first loss of a job handed back twice is retried"
        );
    }

    #[test]
    fn without_a_policy_only_lost_attempts_are_retried() {
        let now = Timestamp::from_millis(5_000);
        let failed =
            running(JobSpec::shell("false"), 1).settled(&outcome(JobStatus::Failed), now, 0.5);
        assert_eq!(failed.status, JobStatus::Failed);
        let lost =
            running(JobSpec::shell("sleep 9"), 1).settled(&outcome(JobStatus::Lost), now, 0.5);
        assert_eq!(lost.status, JobStatus::Retrying);
        assert_eq!(lost.next_attempt_at, Some(now));
        assert_eq!(lost.lost_attempts, 1);
    }

    #[test]
    fn an_attempt_lost_too_often_quarantines_the_job() {
        let mut spec = JobSpec::shell("crash-the-executor");
        spec.retry.max_attempts = 10;
        let mut record = running(spec, 1);
        for attempt in 1..=crate::retry::limits::MAX_LOST_ATTEMPTS {
            record = record.settled(&outcome(JobStatus::Lost), Timestamp::from_millis(1), 0.0);
            if attempt < crate::retry::limits::MAX_LOST_ATTEMPTS {
                assert_eq!(record.status, JobStatus::Retrying);
                record = record
                    .assigned(NodeId::new("n2").expect("valid"), Timestamp::from_millis(2))
                    .started(InstanceId::generate(), Timestamp::from_millis(3));
            }
        }
        assert_eq!(record.status, JobStatus::Quarantined);
        assert!(
            record
                .error
                .as_deref()
                .unwrap_or("")
                .contains("lost 3 attempts")
        );
        assert!(record.status.is_terminal());
    }

    #[test]
    fn records_round_trip_through_json_and_msgpack() {
        let mut record = JobRecord::new(
            JobId::generate(),
            JobSpec::shell("echo hi"),
            Timestamp::now(),
        );
        record.output = Some(OutputSummary {
            stdout_bytes: 3,
            stderr_bytes: 0,
            truncated: false,
        });
        let json = serde_json::to_vec(&record).expect("encodes");
        assert_eq!(
            serde_json::from_slice::<JobRecord>(&json).expect("decodes"),
            record
        );
        let packed = rmp_serde::to_vec_named(&record).expect("encodes");
        assert_eq!(
            rmp_serde::from_slice::<JobRecord>(&packed).expect("decodes"),
            record
        );
    }
}
