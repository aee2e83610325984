//! A job's state: its status and the record kept under its id in the jobs KV bucket.
//!
//! Every change to a record is a compare-and-swap on the KV revision the writer read, so two
//! writers (two scheduler replicas, a scheduler and an executor) never both win. The
//! transition helpers here only compute the next record; the caller performs the CAS.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::ids::{InstanceId, JobId, NodeId};
use crate::spec::JobSpec;
use crate::timestamp::Timestamp;

/// Where a job is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum JobStatus {
    /// Accepted; waiting for an executor, or dispatched to one that has not started it yet.
    Pending,
    /// The process is running on an executor.
    Running,
    /// The process exited with status 0.
    Succeeded,
    /// The process exited non-zero, was killed by a signal, or could not be started.
    Failed,
    /// The process ran past its timeout and was killed.
    TimedOut,
    /// Cancelled before it finished.
    Cancelled,
}

impl JobStatus {
    /// Every status, in life-cycle order.
    pub const ALL: [JobStatus; 6] = [
        Self::Pending,
        Self::Running,
        Self::Succeeded,
        Self::Failed,
        Self::TimedOut,
        Self::Cancelled,
    ];

    /// True for the statuses a job never leaves.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            Self::Succeeded | Self::Failed | Self::TimedOut | Self::Cancelled
        )
    }

    /// The snake_case name, as on the wire and in subjects.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Running => "running",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::TimedOut => "timed_out",
            Self::Cancelled => "cancelled",
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
        }
    }

    /// True once dispatched and not yet started by the executor.
    pub fn is_dispatched(&self) -> bool {
        self.status == JobStatus::Pending && self.node.is_some()
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
            ..self.clone()
        }
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
        Self {
            status: JobStatus::Cancelled,
            updated_at: now,
            finished_at: Some(now),
            error: Some("cancelled before it ran".to_owned()),
            ..self.clone()
        }
    }

    /// The record after the current attempt ended with `outcome`.
    pub fn finished(&self, outcome: &Outcome, now: Timestamp) -> Self {
        Self {
            status: outcome.status,
            updated_at: now,
            finished_at: Some(now),
            exit_code: outcome.exit_code,
            signal: outcome.signal,
            error: outcome.error.clone(),
            output: Some(outcome.output),
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
