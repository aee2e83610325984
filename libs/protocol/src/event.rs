//! Events: what happened to a job or a node, and why a message was rejected.
//!
//! Job events are published after the KV change they describe has been written, on
//! `capstan.events.jobs.<job>.<kind>`, with `Nats-Msg-Id` = `<job>.<attempt>.<kind>` so that a
//! writer that re-publishes after a crash does not duplicate them. They are the input of the
//! API's history projection and of the schedulers' view of who runs what.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::ids::JobId;
use crate::job::{JobRecord, JobStatus};
use crate::node::NodeRecord;
use crate::timestamp::Timestamp;

/// What happened to a job. Each kind is the last token of its event subject.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum JobEventKind {
    /// The job was accepted with a start time still to come (it carries the spec, stdin
    /// included).
    Scheduled,
    /// The job was accepted (it carries the spec, stdin included).
    Pending,
    /// An attempt was placed on an executor after the job had waited for one.
    Dispatched,
    /// The executor started the attempt's process.
    Running,
    /// Finished with exit status 0.
    Succeeded,
    /// Finished unsuccessfully.
    Failed,
    /// Killed at its timeout.
    TimedOut,
    /// Cancelled.
    Cancelled,
    /// An attempt ended unsuccessfully and another will start at `next_attempt_at`; the
    /// record's `attempt_status` says how the attempt ended.
    Retrying,
    /// The last attempt was lost with no retry left.
    Lost,
    /// Set aside after repeatedly taking executors down.
    Quarantined,
}

impl JobEventKind {
    /// Every kind.
    pub const ALL: [JobEventKind; 11] = [
        Self::Scheduled,
        Self::Pending,
        Self::Dispatched,
        Self::Running,
        Self::Retrying,
        Self::Succeeded,
        Self::Failed,
        Self::TimedOut,
        Self::Cancelled,
        Self::Lost,
        Self::Quarantined,
    ];

    /// The kinds that end a job.
    pub const TERMINAL: [JobEventKind; 6] = [
        Self::Succeeded,
        Self::Failed,
        Self::TimedOut,
        Self::Cancelled,
        Self::Lost,
        Self::Quarantined,
    ];

    /// The kinds that end an attempt: the terminal ones and `retrying`.
    pub fn attempt_ends() -> impl Iterator<Item = JobEventKind> {
        Self::ALL.into_iter().filter(|kind| kind.ends_attempt())
    }

    /// True for the kinds that end an attempt: the terminal ones and `retrying`.
    pub fn ends_attempt(self) -> bool {
        self == Self::Retrying || self.is_terminal()
    }

    /// The event of a record that just entered `status`, when it has one of its own.
    pub fn entering(status: JobStatus) -> Option<Self> {
        match status {
            JobStatus::Scheduled => Some(Self::Scheduled),
            JobStatus::Retrying => Some(Self::Retrying),
            status => Self::terminal(status),
        }
    }

    /// The snake_case name, as in subjects.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Scheduled => "scheduled",
            Self::Pending => "pending",
            Self::Dispatched => "dispatched",
            Self::Running => "running",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::TimedOut => "timed_out",
            Self::Cancelled => "cancelled",
            Self::Retrying => "retrying",
            Self::Lost => "lost",
            Self::Quarantined => "quarantined",
        }
    }

    /// The event announcing that a job entered a terminal status.
    pub fn terminal(status: JobStatus) -> Option<Self> {
        match status {
            JobStatus::Succeeded => Some(Self::Succeeded),
            JobStatus::Failed => Some(Self::Failed),
            JobStatus::TimedOut => Some(Self::TimedOut),
            JobStatus::Cancelled => Some(Self::Cancelled),
            JobStatus::Lost => Some(Self::Lost),
            JobStatus::Quarantined => Some(Self::Quarantined),
            JobStatus::Scheduled
            | JobStatus::Pending
            | JobStatus::Running
            | JobStatus::Retrying => None,
        }
    }

    /// True for the kinds that end a job.
    pub fn is_terminal(self) -> bool {
        Self::TERMINAL.contains(&self)
    }
}

impl std::str::FromStr for JobEventKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|kind| kind.as_str() == s)
            .ok_or_else(|| format!("`{s}` is not a job event kind"))
    }
}

impl fmt::Display for JobEventKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A job event: its kind, when, and the job's record right after the change.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct JobEvent {
    /// What happened.
    pub kind: JobEventKind,
    /// When it happened.
    pub at: Timestamp,
    /// The record after the change. Only the first event (`pending` or `scheduled`) carries `spec.stdin`: the spec
    /// never changes, and a payload can be large.
    pub record: JobRecord,
}

impl JobEvent {
    /// Checks that the event's subject names the job and kind it carries: an event published
    /// on one job's subject with another job's record, or as another kind, is not believed.
    /// The error says what disagrees.
    pub fn agrees_with(&self, subject: &str) -> Result<(), String> {
        match crate::subjects::parse_job_event(subject) {
            Some((job, kind)) if job == self.record.id && kind == self.kind.as_str() => Ok(()),
            Some((job, kind)) => Err(format!(
                "the subject names job {job} ({kind}), the event carries job {} ({})",
                self.record.id,
                self.kind.as_str()
            )),
            None => Err(format!("{subject} is not a job event subject")),
        }
    }

    /// The event of `kind` for `record`, dropping stdin unless this is the job's first event.
    pub fn new(kind: JobEventKind, record: &JobRecord) -> Self {
        let mut record = record.clone();
        if !matches!(kind, JobEventKind::Pending | JobEventKind::Scheduled) {
            record.spec.stdin = None;
        }
        Self {
            kind,
            at: record.updated_at,
            record,
        }
    }

    /// The deduplication id of this event: `<job>.<attempt>.<kind>`.
    pub fn message_id(&self) -> String {
        format!("{}.{}.{}", self.record.id, self.record.attempt, self.kind)
    }

    /// The job this event is about.
    pub fn job(&self) -> JobId {
        self.record.id
    }
}

/// What happened to an executor node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum NodeEventKind {
    /// A node registered (first time, or a new instance after a restart).
    Registered,
    /// A node that was down heartbeats again.
    Up,
    /// A node missed heartbeats for longer than the heartbeat timeout.
    Down,
    /// A node left cleanly.
    Deregistered,
    /// An operator cordoned the node: no new work.
    Cordoned,
    /// An operator made the node take work again.
    Uncordoned,
    /// An operator started draining the node.
    Draining,
    /// A draining node holds nothing any more.
    Drained,
}

impl NodeEventKind {
    /// The snake_case name, as in subjects.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Registered => "registered",
            Self::Up => "up",
            Self::Down => "down",
            Self::Deregistered => "deregistered",
            Self::Cordoned => "cordoned",
            Self::Uncordoned => "uncordoned",
            Self::Draining => "draining",
            Self::Drained => "drained",
        }
    }
}

impl fmt::Display for NodeEventKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A node event and the node's record right after it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct NodeEvent {
    /// What happened.
    pub kind: NodeEventKind,
    /// When.
    pub at: Timestamp,
    /// The node's record after the change.
    pub node: NodeRecord,
}

/// Why a message was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum RejectionCode {
    /// Not parseable as JSON or MessagePack at all.
    Malformed,
    /// Parsed, but a field is missing, unknown, of the wrong type, or out of range.
    Invalid,
    /// Larger than the configured limit.
    TooLarge,
    /// Refers to a job id already used by a different submission.
    Conflict,
    /// Its idempotency key names an existing job; no new job was created.
    Duplicate,
    /// Delivered to a consumer it was not meant for.
    Misrouted,
    /// Claims to come from someone other than its sender: a node calling the registry about
    /// another node.
    Forged,
}

impl RejectionCode {
    /// The snake_case name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Malformed => "malformed",
            Self::Invalid => "invalid",
            Self::TooLarge => "too_large",
            Self::Conflict => "conflict",
            Self::Duplicate => "duplicate",
            Self::Misrouted => "misrouted",
            Self::Forged => "forged",
        }
    }
}

/// A rejected message, published on `capstan.events.rejected.<origin>` after the message was
/// terminated. It never carries the payload itself, which may hold secrets.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct Rejection {
    /// The subject the message arrived on.
    pub subject: String,
    /// The kind of problem.
    pub code: RejectionCode,
    /// The offending field, when one is to blame.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    /// What is wrong, for a person.
    pub reason: String,
    /// The job the message was about, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<JobId>,
    /// Size of the rejected payload in bytes.
    pub size: usize,
    /// Stream sequence of the rejected message, when it came from a stream.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream_seq: Option<u64>,
    /// When it was rejected.
    pub at: Timestamp,
}

impl Rejection {
    /// The rejection, now, of a `size`-byte message on `subject` (about no job in particular,
    /// and not from a stream, until [`Rejection::of_job`] and [`Rejection::at_seq`] say so).
    pub fn new(
        subject: impl Into<String>,
        size: usize,
        code: RejectionCode,
        field: Option<String>,
        reason: impl Into<String>,
    ) -> Self {
        Self {
            subject: subject.into(),
            code,
            field,
            reason: crate::codec::redact(&reason.into()),
            job: None,
            size,
            stream_seq: None,
            at: Timestamp::now(),
        }
    }

    /// The same, about `job`.
    pub fn of_job(self, job: Option<JobId>) -> Self {
        Self { job, ..self }
    }

    /// The same, for the message stored at `seq`.
    pub fn at_seq(self, seq: Option<u64>) -> Self {
        Self {
            stream_seq: seq,
            ..self
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::JobSpec;

    #[test]
    fn only_the_first_event_of_a_job_carries_its_payload() {
        let mut spec = JobSpec::shell("cat");
        spec.stdin = Some("payload".into());
        let record = JobRecord::new(JobId::generate(), spec, Timestamp::now());
        assert!(
            JobEvent::new(JobEventKind::Pending, &record)
                .record
                .spec
                .stdin
                .is_some()
        );
        assert!(
            JobEvent::new(JobEventKind::Running, &record)
                .record
                .spec
                .stdin
                .is_none()
        );
    }

    #[test]
    fn an_event_agrees_with_its_subject_only_when_both_name_the_same_job_and_kind() {
        let record = JobRecord::new(JobId::generate(), JobSpec::shell("true"), Timestamp::now());
        let event = JobEvent::new(JobEventKind::Succeeded, &record);
        let own = crate::subjects::job_event(record.id, JobEventKind::Succeeded);
        assert_eq!(event.agrees_with(&own), Ok(()));
        let other_job = crate::subjects::job_event(JobId::generate(), JobEventKind::Succeeded);
        assert!(event.agrees_with(&other_job).is_err());
        let other_kind = crate::subjects::job_event(record.id, JobEventKind::Failed);
        assert!(event.agrees_with(&other_kind).is_err());
        assert!(event.agrees_with("capstan.events.nodes.n1.down").is_err());
    }

    #[test]
    fn event_ids_distinguish_kind_and_attempt() {
        let record = JobRecord::new(JobId::generate(), JobSpec::shell("true"), Timestamp::now());
        let pending = JobEvent::new(JobEventKind::Pending, &record);
        let running = JobEvent::new(JobEventKind::Running, &record);
        assert_ne!(pending.message_id(), running.message_id());
        assert!(pending.message_id().ends_with(".0.pending"));
    }

    #[test]
    fn job_events_round_trip_through_msgpack() {
        let record = JobRecord::new(JobId::generate(), JobSpec::shell("true"), Timestamp::now());
        let event = JobEvent::new(JobEventKind::Pending, &record);
        let packed = rmp_serde::to_vec_named(&event).expect("encodes");
        assert_eq!(
            rmp_serde::from_slice::<JobEvent>(&packed).expect("decodes"),
            event
        );
    }
}
