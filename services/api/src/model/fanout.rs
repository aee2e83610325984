//! Fan-outs as the REST API shows them: the selectors a submission gives (`systems`,
//! `nodes`), a parent's outcome and tally on its job, and its targets, each with its own job.

use std::collections::BTreeMap;

use capstan_protocol::fanout::{
    FanOutRecord, FanOutStatus, NodeTargetsWire, SystemTargetsWire, Target, TargetKind,
    TargetStatus,
};
use capstan_protocol::{JobRecord, Timestamp};
use poem_openapi::{Enum, Object};

/// Remote systems to fan out over: exactly one of `names` and `labels`.
#[derive(Debug, Clone, Default, Object)]
#[oai(skip_serializing_if_is_none, deny_unknown_fields)]
pub struct SystemTargets {
    /// The systems, by name (1 to 1000, each once).
    pub names: Option<Vec<String>>,
    /// Every active system carrying all of these labels (at least one label).
    pub labels: Option<BTreeMap<String, String>>,
}

impl From<SystemTargets> for SystemTargetsWire {
    fn from(body: SystemTargets) -> Self {
        Self {
            names: body.names,
            labels: body.labels,
        }
    }
}

impl From<SystemTargetsWire> for SystemTargets {
    fn from(wire: SystemTargetsWire) -> Self {
        Self {
            names: wire.names,
            labels: wire.labels,
        }
    }
}

/// Executor nodes to fan out over.
#[derive(Debug, Clone, Default, Object)]
#[oai(skip_serializing_if_is_none, deny_unknown_fields)]
pub struct NodeTargets {
    /// Every node that is up and schedulable and carries all of these labels (none: every
    /// such node).
    pub labels: Option<BTreeMap<String, String>>,
}

impl From<NodeTargets> for NodeTargetsWire {
    fn from(body: NodeTargets) -> Self {
        Self {
            labels: body.labels,
        }
    }
}

impl From<NodeTargetsWire> for NodeTargets {
    fn from(wire: NodeTargetsWire) -> Self {
        Self {
            labels: wire.labels,
        }
    }
}

/// A fan-out's outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Enum)]
#[oai(rename_all = "snake_case")]
pub enum FanOutOutcome {
    /// Targets are waiting or running.
    Running,
    /// Every target succeeded.
    Succeeded,
    /// Some targets succeeded and others did not (the job's status is `failed`).
    Partial,
    /// No target succeeded.
    Failed,
    /// Cancelled before every target ended.
    Cancelled,
}

impl From<FanOutStatus> for FanOutOutcome {
    fn from(status: FanOutStatus) -> Self {
        match status {
            FanOutStatus::Running => Self::Running,
            FanOutStatus::Succeeded => Self::Succeeded,
            FanOutStatus::Partial => Self::Partial,
            FanOutStatus::Failed => Self::Failed,
            FanOutStatus::Cancelled => Self::Cancelled,
        }
    }
}

/// A fan-out's outcome and its targets by status, on its job.
#[derive(Debug, Clone, Object)]
#[oai(skip_serializing_if_is_none)]
pub struct FanOutSummary {
    /// The outcome: `partial` when some targets succeeded and others did not.
    pub outcome: FanOutOutcome,
    /// How many targets it has.
    pub total: u32,
    /// Targets by status (`succeeded`: 3, `failed`: 1, …).
    pub targets: BTreeMap<String, u32>,
    /// Most targets running at once, when limited.
    pub max_parallel: Option<u32>,
    /// Whether a failed target stops the others.
    pub fail_fast: bool,
}

/// What a target is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Enum)]
#[oai(rename_all = "snake_case")]
pub enum TargetKindView {
    /// A remote system.
    System,
    /// An executor node.
    Node,
}

/// Where a target stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Enum)]
#[oai(rename_all = "snake_case")]
pub enum TargetStatusView {
    /// Not started yet (`max_parallel` targets are running).
    Waiting,
    /// Never started: the fan-out was cancelled or failed fast.
    Skipped,
    /// Its job waits for its start time.
    Scheduled,
    /// Its job waits for an executor.
    Pending,
    /// Its job runs.
    Running,
    /// Its job waits for another attempt.
    Retrying,
    /// Its job succeeded.
    Succeeded,
    /// Its job failed.
    Failed,
    /// Its job timed out.
    TimedOut,
    /// Its job was cancelled.
    Cancelled,
    /// Its job's last attempt was lost.
    Lost,
    /// Its job was quarantined.
    Quarantined,
}

impl From<TargetStatus> for TargetStatusView {
    fn from(status: TargetStatus) -> Self {
        match status {
            TargetStatus::Waiting => Self::Waiting,
            TargetStatus::Skipped => Self::Skipped,
            TargetStatus::Scheduled => Self::Scheduled,
            TargetStatus::Pending => Self::Pending,
            TargetStatus::Running => Self::Running,
            TargetStatus::Retrying => Self::Retrying,
            TargetStatus::Succeeded => Self::Succeeded,
            TargetStatus::Failed => Self::Failed,
            TargetStatus::TimedOut => Self::TimedOut,
            TargetStatus::Cancelled => Self::Cancelled,
            TargetStatus::Lost => Self::Lost,
            TargetStatus::Quarantined => Self::Quarantined,
        }
    }
}

/// One target of a fan-out and its job.
#[derive(Debug, Clone, Object)]
#[oai(skip_serializing_if_is_none)]
pub struct TargetView {
    /// The system's name or the node's id.
    pub target: String,
    /// `system` or `node`.
    pub kind: TargetKindView,
    /// Where it stands.
    pub status: TargetStatusView,
    /// Its job (`GET /api/v1/jobs/{job}`, and its output at `…/logs`), once started.
    pub job: Option<String>,
    /// The attempt its job is on.
    pub attempt: Option<u32>,
    /// The executor running (or that ran) its current attempt.
    pub node: Option<String>,
    /// When its current attempt started.
    pub started_at: Option<String>,
    /// When its job ended.
    pub finished_at: Option<String>,
    /// Its job's exit code.
    pub exit_code: Option<i32>,
    /// Why it failed.
    pub error: Option<String>,
    /// Bytes of standard output its current attempt wrote.
    pub stdout_bytes: Option<u64>,
    /// Bytes of standard error its current attempt wrote.
    pub stderr_bytes: Option<u64>,
}

/// Where `target` stands: its job's live status while its parent has not seen it end.
pub fn live_status(target: &Target, record: Option<&JobRecord>) -> TargetStatus {
    match record {
        Some(record) if !target.status.is_terminal() => record.status.into(),
        _ => target.status,
    }
}

impl TargetView {
    /// `target` as its parent knows it, brought up to date by its job's live `record`.
    pub fn of(target: &Target, record: Option<&JobRecord>) -> Self {
        let mut view = TargetView {
            target: target.name.clone(),
            kind: match target.kind {
                TargetKind::System => TargetKindView::System,
                TargetKind::Node => TargetKindView::Node,
            },
            status: live_status(target, record).into(),
            job: target.job.map(|job| job.to_string()),
            attempt: None,
            node: None,
            started_at: None,
            finished_at: None,
            exit_code: target.exit_code,
            error: target.error.clone(),
            stdout_bytes: None,
            stderr_bytes: None,
        };
        if let Some(record) = record {
            view.attempt = Some(record.attempt);
            view.node = record.node.as_ref().map(ToString::to_string);
            view.started_at = record.started_at.map(Timestamp::to_rfc3339);
            view.finished_at = record.finished_at.map(Timestamp::to_rfc3339);
            view.exit_code = record.exit_code.or(view.exit_code);
            view.error = record.error.clone().or(view.error);
            view.stdout_bytes = record.output.as_ref().map(|o| o.stdout_bytes);
            view.stderr_bytes = record.output.as_ref().map(|o| o.stderr_bytes);
        }
        view
    }
}

/// A fan-out's targets.
#[derive(Debug, Clone, Object)]
#[oai(skip_serializing_if_is_none)]
pub struct JobTargets {
    /// The parent job.
    pub job: String,
    /// Its outcome.
    pub outcome: FanOutOutcome,
    /// Its targets, in the order they start.
    pub targets: Vec<TargetView>,
}

impl FanOutSummary {
    /// The summary of `record`, its targets counted by their live `statuses`.
    pub fn of(record: &FanOutRecord, statuses: &[TargetStatus]) -> Self {
        let mut counts = BTreeMap::new();
        for status in statuses {
            *counts.entry(status.as_str().to_owned()).or_insert(0) += 1;
        }
        let fanout = record.fanout();
        FanOutSummary {
            outcome: record.status.into(),
            total: u32::try_from(statuses.len()).unwrap_or(u32::MAX),
            targets: counts,
            max_parallel: fanout.and_then(|f| f.max_parallel),
            fail_fast: fanout.is_some_and(|f| f.fail_fast),
        }
    }
}
