//! Fan-out: one command run once on each of several targets, remote systems or executor
//! nodes, as one parent job.
//!
//! A spec with `systems` or `nodes` ([`FanOut`]) is a parent. The scheduler that accepts it
//! resolves its targets once (names, or labels over the catalogue or the nodes that are up),
//! stores a [`FanOutRecord`] in `capstan_fanouts`, and submits one ordinary job per target, a
//! child, each with its own attempts and retries ([`JobSpec::child`]). [`FanOutRecord::step`]
//! is the whole decision of what a parent does next, given what its children have become:
//! start waiting targets while fewer than `max_parallel` run, skip and cancel the rest when
//! `fail_fast` meets a failure or the parent is cancelled, and end with the aggregate status
//! once every target has ended.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::auth::SubmittedBy;
use crate::ids::JobId;
use crate::job::JobStatus;
use crate::spec::{JobSpec, Labels, SpecError, Start, validate_labels};
use crate::timestamp::Timestamp;

/// A child's metadata entry naming its parent job.
pub const PARENT_KEY: &str = "capstan.io/fanout";
/// A child's metadata entry naming its target (a system's name or a node's id).
pub const TARGET_KEY: &str = "capstan.io/target";
/// The selector key that matches a node by its id rather than a label
/// (`"labels": {"capstan.io/node": "exec-1"}`): how a node target's child is pinned.
pub const NODE_LABEL: &str = "capstan.io/node";
/// Most targets one fan-out may have.
pub const MAX_TARGETS: usize = 1000;
/// Metadata entries a child adds to its parent's ([`PARENT_KEY`], [`TARGET_KEY`]).
pub const CHILD_METADATA: usize = 2;

/// Systems to fan out over, on the wire: exactly one of `names` and `labels`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct SystemTargetsWire {
    /// The systems, by name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub names: Option<Vec<String>>,
    /// Every active system carrying all of these labels.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<Labels>,
}

/// Executor nodes to fan out over, on the wire.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct NodeTargetsWire {
    /// Every node that is up and schedulable and carries all of these labels (none: every
    /// such node).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<Labels>,
}

/// What a parent runs on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Targets {
    /// These systems, by name, in this order.
    SystemNames(Vec<String>),
    /// The active systems carrying these labels (at least one), when the job is accepted.
    SystemLabels(Labels),
    /// The nodes up and schedulable carrying these labels, when the job is accepted.
    Nodes(Labels),
}

/// A validated fan-out: where, how many at once, and whether a failure stops the rest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FanOut {
    /// The targets.
    pub targets: Targets,
    /// Most targets running at once; all at once when absent.
    pub max_parallel: Option<u32>,
    /// A target that ends unsuccessfully cancels the running ones and skips the waiting ones.
    pub fail_fast: bool,
}

impl FanOut {
    /// The wire fields of a fan-out (`systems`, `nodes`, `max_parallel`, `fail_fast`).
    pub fn to_wire(
        &self,
    ) -> (
        Option<SystemTargetsWire>,
        Option<NodeTargetsWire>,
        Option<u32>,
        Option<bool>,
    ) {
        let (systems, nodes) = match &self.targets {
            Targets::SystemNames(names) => (
                Some(SystemTargetsWire {
                    names: Some(names.clone()),
                    labels: None,
                }),
                None,
            ),
            Targets::SystemLabels(labels) => (
                Some(SystemTargetsWire {
                    names: None,
                    labels: Some(labels.clone()),
                }),
                None,
            ),
            Targets::Nodes(labels) => (
                None,
                Some(NodeTargetsWire {
                    labels: (!labels.is_empty()).then(|| labels.clone()),
                }),
            ),
        };
        (
            systems,
            nodes,
            self.max_parallel,
            self.fail_fast.then_some(true),
        )
    }

    /// Checks the wire fields. `None` when the spec is no fan-out.
    pub fn from_wire(
        systems: Option<SystemTargetsWire>,
        nodes: Option<NodeTargetsWire>,
        max_parallel: Option<u32>,
        fail_fast: Option<bool>,
    ) -> Result<Option<Self>, SpecError> {
        let targets = match (systems, nodes) {
            (Some(_), Some(_)) => {
                return Err(SpecError::new(
                    "systems",
                    "give at most one of `systems` and `nodes`",
                ));
            }
            (Some(systems), None) => match (systems.names, systems.labels) {
                (Some(_), Some(_)) | (None, None) => {
                    return Err(SpecError::new(
                        "systems",
                        "give exactly one of `names` (a list) and `labels` (a selector)",
                    ));
                }
                (Some(names), None) => {
                    if names.is_empty() || names.len() > MAX_TARGETS {
                        return Err(SpecError::new(
                            "systems.names",
                            format!("give 1 to {MAX_TARGETS} system names"),
                        ));
                    }
                    for (index, name) in names.iter().enumerate() {
                        let field = format!("systems.names[{index}]");
                        if !crate::system::valid_system_name(name) {
                            return Err(SpecError::new(field, crate::system::SYSTEM_NAME_RULE));
                        }
                        if names[..index].contains(name) {
                            return Err(SpecError::new(field, format!("`{name}` is listed twice")));
                        }
                    }
                    Targets::SystemNames(names)
                }
                (None, Some(labels)) => {
                    validate_labels("systems.labels", &labels)?;
                    if labels.is_empty() {
                        return Err(SpecError::new(
                            "systems.labels",
                            "give at least one label (to run on every system, list their names)",
                        ));
                    }
                    Targets::SystemLabels(labels)
                }
            },
            (None, Some(nodes)) => {
                let labels = nodes.labels.unwrap_or_default();
                validate_labels("nodes.labels", &labels)?;
                Targets::Nodes(labels)
            }
            (None, None) => {
                if max_parallel.is_some() {
                    return Err(SpecError::new(
                        "max_parallel",
                        "only for a fan-out: give `systems` or `nodes`",
                    ));
                }
                if fail_fast.is_some() {
                    return Err(SpecError::new(
                        "fail_fast",
                        "only for a fan-out: give `systems` or `nodes`",
                    ));
                }
                return Ok(None);
            }
        };
        if let Some(most) = max_parallel
            && (most == 0 || most as usize > MAX_TARGETS)
        {
            return Err(SpecError::new(
                "max_parallel",
                format!("must be 1 to {MAX_TARGETS}, got {most}"),
            ));
        }
        Ok(Some(Self {
            targets,
            max_parallel,
            fail_fast: fail_fast.unwrap_or(false),
        }))
    }

    /// Whether the targets are remote systems (rather than nodes).
    pub fn on_systems(&self) -> bool {
        !matches!(self.targets, Targets::Nodes(_))
    }
}

/// What kind of thing a target is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum TargetKind {
    /// A remote system, by name.
    System,
    /// An executor node, by id.
    Node,
}

/// Where a target stands: not started, skipped, or its child job's status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum TargetStatus {
    /// Not started yet (`max_parallel` targets are running).
    Waiting,
    /// Never started: the fan-out was cancelled, or `fail_fast` met a failure.
    Skipped,
    /// Its job waits for its start time.
    Scheduled,
    /// Its job is submitted and waits for an executor.
    Pending,
    /// Its job runs.
    Running,
    /// Its job waits for another attempt.
    Retrying,
    /// Its job succeeded.
    Succeeded,
    /// Its job failed (or was never accepted: `error` says why).
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

impl From<JobStatus> for TargetStatus {
    fn from(status: JobStatus) -> Self {
        match status {
            JobStatus::Scheduled => Self::Scheduled,
            JobStatus::Pending => Self::Pending,
            JobStatus::Running => Self::Running,
            JobStatus::Retrying => Self::Retrying,
            JobStatus::Succeeded => Self::Succeeded,
            JobStatus::Failed => Self::Failed,
            JobStatus::TimedOut => Self::TimedOut,
            JobStatus::Cancelled => Self::Cancelled,
            JobStatus::Lost => Self::Lost,
            JobStatus::Quarantined => Self::Quarantined,
        }
    }
}

impl TargetStatus {
    /// The status as its wire text.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Waiting => "waiting",
            Self::Skipped => "skipped",
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

    /// Whether the target has ended (skipped, or its job has).
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            Self::Skipped
                | Self::Succeeded
                | Self::Failed
                | Self::TimedOut
                | Self::Cancelled
                | Self::Lost
                | Self::Quarantined
        )
    }

    /// Whether its job has been submitted and has not ended.
    pub fn is_active(self) -> bool {
        !self.is_terminal() && self != Self::Waiting
    }

    /// Whether it ended without success (skipping is not a failure of its own).
    pub fn is_unsuccessful(self) -> bool {
        self.is_terminal() && !matches!(self, Self::Succeeded | Self::Skipped)
    }
}

/// One target of a fan-out and its child job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct Target {
    /// The system's name or the node's id.
    pub name: String,
    /// System or node.
    pub kind: TargetKind,
    /// Where it stands, as last seen by the parent.
    pub status: TargetStatus,
    /// Its job, once started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<JobId>,
    /// When its job was submitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub submitted_at: Option<Timestamp>,
    /// Its job's exit code, once it ended with one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// Why it ended unsuccessfully, when its job could not say.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Target {
    /// A target not started yet.
    pub fn waiting(name: impl Into<String>, kind: TargetKind) -> Self {
        Self {
            name: name.into(),
            kind,
            status: TargetStatus::Waiting,
            job: None,
            submitted_at: None,
            exit_code: None,
            error: None,
        }
    }
}

/// A parent's status: running until every target has ended, then the aggregate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum FanOutStatus {
    /// Targets are waiting or running.
    Running,
    /// Every target succeeded.
    Succeeded,
    /// Some targets succeeded, others did not (or were skipped).
    Partial,
    /// No target succeeded.
    Failed,
    /// Cancelled before every target ended.
    Cancelled,
}

impl FanOutStatus {
    /// The status as its wire text.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Succeeded => "succeeded",
            Self::Partial => "partial",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
        }
    }

    /// Whether the parent has ended.
    pub fn is_terminal(self) -> bool {
        self != Self::Running
    }

    /// The closest job status (`partial` is a failure of the whole).
    pub fn job_status(self) -> JobStatus {
        match self {
            Self::Running => JobStatus::Running,
            Self::Succeeded => JobStatus::Succeeded,
            Self::Partial | Self::Failed => JobStatus::Failed,
            Self::Cancelled => JobStatus::Cancelled,
        }
    }
}

/// A fan-out parent started or ended (`capstan.events.fanouts.<job>.<status>`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct FanOutEvent {
    /// The parent.
    pub job: JobId,
    /// Its status: `running` when it starts, then how it ended.
    pub status: FanOutStatus,
    /// When.
    pub at: Timestamp,
    /// Its targets by status (`succeeded`: 3, `failed`: 1, …).
    pub targets: BTreeMap<String, usize>,
}

impl FanOutEvent {
    /// The event of `record` as it stands now.
    pub fn of(record: &FanOutRecord) -> Self {
        Self {
            job: record.id,
            status: record.status,
            at: record.updated_at,
            targets: record
                .tally()
                .into_iter()
                .map(|(status, count)| (status.to_owned(), count))
                .collect(),
        }
    }

    /// Its deduplication id: one per parent and status.
    pub fn message_id(&self) -> String {
        format!("fanout.{}.{}", self.job, self.status.as_str())
    }
}

/// A parent job: its spec, its targets and where each stands. Stored in `capstan_fanouts` by
/// the parent's id (JSON), written by compare-and-swap by schedulers and the API.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct FanOutRecord {
    /// The parent's id.
    pub id: JobId,
    /// Its status.
    pub status: FanOutStatus,
    /// The spec as submitted (with `systems` or `nodes`).
    pub spec: JobSpec,
    /// Its targets, in the order they start.
    pub targets: Vec<Target>,
    /// Who submitted it; its children are submitted as the same.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub submitted_by: Option<SubmittedBy>,
    /// The stream sequence of its submission.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub submission_seq: Option<u64>,
    /// Its trace; every child joins it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
    /// When its targets may start (`run_at` or `delay`, resolved at submission).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_at: Option<Timestamp>,
    /// When it was created.
    pub created_at: Timestamp,
    /// When it last changed.
    pub updated_at: Timestamp,
    /// When it ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<Timestamp>,
    /// When a cancel was asked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cancel_requested_at: Option<Timestamp>,
}

/// What a parent does after [`FanOutRecord::step`]: the record to write (if it changed), the
/// targets whose jobs to submit, the jobs to cancel.
#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    /// The record as it should be written; `None`: nothing changed.
    pub next: Option<FanOutRecord>,
    /// Indices of the targets whose jobs are to be submitted now.
    pub submit: Vec<usize>,
    /// Jobs of active targets to cancel.
    pub cancel: Vec<JobId>,
}

/// How a parent learned what one of its children became.
#[derive(Debug, Clone, PartialEq)]
pub struct ChildState {
    /// The child job.
    pub job: JobId,
    /// Its status.
    pub status: JobStatus,
    /// Its exit code.
    pub exit_code: Option<i32>,
}

impl FanOutRecord {
    /// A new parent over `targets` (each waiting).
    pub fn new(
        id: JobId,
        spec: JobSpec,
        targets: Vec<Target>,
        start_at: Option<Timestamp>,
        now: Timestamp,
    ) -> Self {
        Self {
            id,
            status: FanOutStatus::Running,
            spec,
            targets,
            submitted_by: None,
            submission_seq: None,
            traceparent: None,
            start_at,
            created_at: now,
            updated_at: now,
            finished_at: None,
            cancel_requested_at: None,
        }
    }

    /// The fan-out's settings.
    pub fn fanout(&self) -> Option<&FanOut> {
        self.spec.fanout.as_ref()
    }

    /// Records what children became; a child no target names is ignored (a forged link).
    /// Returns whether anything changed.
    pub fn observe(&mut self, children: &[ChildState]) -> bool {
        let mut changed = false;
        for child in children {
            let Some(target) = self
                .targets
                .iter_mut()
                .find(|target| target.job == Some(child.job))
            else {
                continue;
            };
            let status = TargetStatus::from(child.status);
            // A target that ended stays ended (a late event of an earlier attempt).
            if target.status.is_terminal() || target.status == TargetStatus::Waiting {
                continue;
            }
            if target.status != status || target.exit_code != child.exit_code {
                target.status = status;
                target.exit_code = child.exit_code;
                changed = true;
            }
        }
        changed
    }

    /// Ends targets whose job never appeared: `error` says why. Returns whether any changed.
    pub fn never_accepted(&mut self, jobs: &[JobId], error: &str) -> bool {
        let mut changed = false;
        for target in &mut self.targets {
            if target.job.is_some_and(|job| jobs.contains(&job)) && target.status.is_active() {
                target.status = TargetStatus::Failed;
                target.error = Some(error.to_owned());
                changed = true;
            }
        }
        changed
    }

    /// Asks for a cancel. Returns whether the record changed (false once asked or ended).
    pub fn request_cancel(&mut self, now: Timestamp) -> bool {
        if self.status.is_terminal() || self.cancel_requested_at.is_some() {
            return false;
        }
        self.cancel_requested_at = Some(now);
        true
    }

    /// Decides what the parent does next from what it knows of its targets: `new_job` names
    /// the job of each target started now. `changed` says whether the record already differs
    /// from the stored one (after [`FanOutRecord::observe`] or a cancel).
    pub fn step(&self, changed: bool, now: Timestamp, mut new_job: impl FnMut() -> JobId) -> Step {
        if self.status.is_terminal() {
            return Step {
                next: None,
                submit: Vec::new(),
                cancel: Vec::new(),
            };
        }
        let mut next = self.clone();
        let mut changed = changed;
        let mut submit = Vec::new();
        let mut cancel = Vec::new();
        let fail_fast = self.fanout().is_some_and(|fanout| fanout.fail_fast);
        let stopping = self.cancel_requested_at.is_some()
            || (fail_fast && self.targets.iter().any(|t| t.status.is_unsuccessful()));
        if stopping {
            for target in &mut next.targets {
                if target.status == TargetStatus::Waiting {
                    target.status = TargetStatus::Skipped;
                    changed = true;
                } else if target.status.is_active()
                    && let Some(job) = target.job
                {
                    cancel.push(job);
                }
            }
        } else {
            let most = self
                .fanout()
                .and_then(|fanout| fanout.max_parallel)
                .map_or(usize::MAX, |most| most as usize);
            let active = next.targets.iter().filter(|t| t.status.is_active()).count();
            let room = most.saturating_sub(active);
            for (index, target) in next
                .targets
                .iter_mut()
                .enumerate()
                .filter(|(_, target)| target.status == TargetStatus::Waiting)
                .take(room)
            {
                target.status = TargetStatus::Pending;
                target.job = Some(new_job());
                target.submitted_at = Some(now);
                submit.push(index);
                changed = true;
            }
        }
        if next.targets.iter().all(|t| t.status.is_terminal()) {
            let succeeded = next
                .targets
                .iter()
                .filter(|t| t.status == TargetStatus::Succeeded)
                .count();
            next.status = if self.cancel_requested_at.is_some() {
                FanOutStatus::Cancelled
            } else if succeeded == next.targets.len() {
                FanOutStatus::Succeeded
            } else if succeeded == 0 {
                FanOutStatus::Failed
            } else {
                FanOutStatus::Partial
            };
            next.finished_at = Some(now);
            changed = true;
        }
        if changed {
            next.updated_at = now;
        }
        Step {
            next: changed.then_some(next),
            submit,
            cancel,
        }
    }

    /// Counts of targets by status.
    pub fn tally(&self) -> BTreeMap<&'static str, usize> {
        let mut counts = BTreeMap::new();
        for target in &self.targets {
            *counts.entry(target.status.as_str()).or_insert(0) += 1;
        }
        counts
    }
}

impl JobSpec {
    /// The spec of `target`'s job in the fan-out `parent` whose spec this is: the same
    /// program, environment, input, timeout and retry policy, on that system or pinned to that
    /// node, starting no earlier than `start_at`, linked to its parent by metadata.
    pub fn child(&self, parent: JobId, target: &Target, start_at: Option<Timestamp>) -> JobSpec {
        let mut child = self.clone();
        child.fanout = None;
        child.idempotency_key = None;
        child.start = start_at.map(Start::At);
        match target.kind {
            TargetKind::System => child.system = Some(target.name.clone()),
            TargetKind::Node => {
                if let Some(FanOut {
                    targets: Targets::Nodes(labels),
                    ..
                }) = &self.fanout
                {
                    child.labels.extend(labels.clone());
                }
                child.labels.insert(NODE_LABEL.into(), target.name.clone());
            }
        }
        child.metadata.insert(PARENT_KEY.into(), parent.to_string());
        child
            .metadata
            .insert(TARGET_KEY.into(), target.name.clone());
        child.name = self.name.as_ref().map(|name| {
            let suffix = format!(" [{}]", target.name);
            let keep = crate::spec::limits::MAX_NAME_LEN.saturating_sub(suffix.chars().count());
            name.chars().take(keep).collect::<String>() + &suffix
        });
        child
    }

    /// The parent a fan-out child names in its metadata, if any.
    pub fn fanout_parent(&self) -> Option<JobId> {
        self.metadata.get(PARENT_KEY)?.parse().ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(json: &str) -> Result<JobSpec, SpecError> {
        let wire: crate::spec::JobSpecWire = serde_json::from_str(json).expect("parses");
        JobSpec::try_from(wire)
    }

    fn parent(names: &[&str], max_parallel: Option<u32>, fail_fast: bool) -> FanOutRecord {
        let mut spec = JobSpec::shell("uptime");
        spec.fanout = Some(FanOut {
            targets: Targets::SystemNames(names.iter().map(|n| n.to_string()).collect()),
            max_parallel,
            fail_fast,
        });
        let targets = names
            .iter()
            .map(|name| Target::waiting(*name, TargetKind::System))
            .collect();
        FanOutRecord::new(
            JobId::generate(),
            spec,
            targets,
            None,
            Timestamp::from_millis(1),
        )
    }

    fn apply(record: &mut FanOutRecord, step: Step) {
        if let Some(next) = step.next {
            *record = next;
        }
    }

    fn end(record: &mut FanOutRecord, index: usize, status: JobStatus) {
        let job = record.targets[index].job.expect("started");
        record.observe(&[ChildState {
            job,
            status,
            exit_code: Some(i32::from(status != JobStatus::Succeeded)),
        }]);
    }

    #[test]
    fn a_fan_out_is_read_from_systems_or_nodes_and_refused_when_it_is_ambiguous() {
        let ok = spec(r#"{"command": "df", "systems": {"names": ["a", "b"]}, "max_parallel": 1}"#)
            .expect("valid");
        assert_eq!(
            ok.fanout.expect("fan-out").targets,
            Targets::SystemNames(vec!["a".into(), "b".into()])
        );
        let nodes = spec(r#"{"command": "df", "nodes": {}}"#).expect("valid");
        assert_eq!(
            nodes.fanout.expect("fan-out").targets,
            Targets::Nodes(Labels::new())
        );
        let refused = |json: &str| spec(json).expect_err("refused").field;
        assert_eq!(
            refused(r#"{"command": "df", "systems": {"names": ["a"]}, "nodes": {}}"#),
            "systems"
        );
        assert_eq!(
            refused(r#"{"command": "df", "systems": {"names": ["a", "a"]}}"#),
            "systems.names[1]"
        );
        assert_eq!(refused(r#"{"command": "df", "systems": {}}"#), "systems");
        assert_eq!(
            refused(r#"{"command": "df", "systems": {"labels": {}}}"#),
            "systems.labels"
        );
        assert_eq!(
            refused(r#"{"command": "df", "max_parallel": 2}"#),
            "max_parallel"
        );
        assert_eq!(
            refused(r#"{"command": "df", "nodes": {}, "max_parallel": 0}"#),
            "max_parallel"
        );
        assert_eq!(
            refused(r#"{"command": "df", "system": "a", "systems": {"names": ["b"]}}"#),
            "system"
        );
        assert_eq!(
            refused(r#"{"command": "df", "nodes": {}, "labels": {"a": "b"}}"#),
            "labels"
        );
        assert_eq!(
            refused(r#"{"command": "df", "systems": {"names": ["a"]}, "cwd": "/tmp"}"#),
            "cwd"
        );
    }

    #[test]
    fn a_fan_out_spec_survives_the_wire_both_ways() {
        let original = spec(
            r#"{"command": "df", "systems": {"labels": {"role": "web"}}, "max_parallel": 3, "fail_fast": true}"#,
        )
        .expect("valid");
        let wire = crate::spec::JobSpecWire::from(original.clone());
        assert_eq!(JobSpec::try_from(wire).expect("valid again"), original);
    }

    #[test]
    fn at_most_max_parallel_targets_run_and_each_end_starts_the_next() {
        let mut record = parent(&["a", "b", "c"], Some(2), false);
        let step = record.step(false, Timestamp::from_millis(2), JobId::generate);
        assert_eq!(step.submit, vec![0, 1]);
        apply(&mut record, step);
        assert_eq!(record.targets[2].status, TargetStatus::Waiting);
        let idle = record.step(false, Timestamp::from_millis(3), JobId::generate);
        assert!(idle.next.is_none() && idle.submit.is_empty(), "{idle:?}");
        end(&mut record, 0, JobStatus::Succeeded);
        let step = record.step(true, Timestamp::from_millis(4), JobId::generate);
        assert_eq!(step.submit, vec![2]);
        apply(&mut record, step);
        end(&mut record, 1, JobStatus::Succeeded);
        end(&mut record, 2, JobStatus::Succeeded);
        let step = record.step(true, Timestamp::from_millis(5), JobId::generate);
        apply(&mut record, step);
        assert_eq!(record.status, FanOutStatus::Succeeded);
        assert_eq!(record.finished_at, Some(Timestamp::from_millis(5)));
    }

    #[test]
    fn one_failed_target_makes_the_outcome_partial_and_does_not_stop_the_others() {
        let mut record = parent(&["a", "b"], None, false);
        let step = record.step(false, Timestamp::from_millis(2), JobId::generate);
        apply(&mut record, step);
        end(&mut record, 0, JobStatus::Failed);
        let step = record.step(true, Timestamp::from_millis(3), JobId::generate);
        assert!(step.cancel.is_empty());
        apply(&mut record, step);
        assert_eq!(record.status, FanOutStatus::Running);
        end(&mut record, 1, JobStatus::Succeeded);
        let step = record.step(true, Timestamp::from_millis(4), JobId::generate);
        apply(&mut record, step);
        assert_eq!(record.status, FanOutStatus::Partial);
        assert_eq!(record.status.job_status(), JobStatus::Failed);
    }

    #[test]
    fn fail_fast_skips_the_waiting_targets_and_cancels_the_running_ones() {
        let mut record = parent(&["a", "b", "c"], Some(2), true);
        let step = record.step(false, Timestamp::from_millis(2), JobId::generate);
        apply(&mut record, step);
        end(&mut record, 0, JobStatus::TimedOut);
        let step = record.step(true, Timestamp::from_millis(3), JobId::generate);
        assert_eq!(step.cancel, vec![record.targets[1].job.expect("started")]);
        assert!(step.submit.is_empty());
        apply(&mut record, step);
        assert_eq!(record.targets[2].status, TargetStatus::Skipped);
        assert_eq!(record.status, FanOutStatus::Running, "b still runs");
        end(&mut record, 1, JobStatus::Cancelled);
        let step = record.step(true, Timestamp::from_millis(4), JobId::generate);
        apply(&mut record, step);
        assert_eq!(record.status, FanOutStatus::Failed);
    }

    #[test]
    fn a_cancelled_parent_ends_cancelled_once_its_running_targets_have_ended() {
        let mut record = parent(&["a", "b"], Some(1), false);
        let step = record.step(false, Timestamp::from_millis(2), JobId::generate);
        apply(&mut record, step);
        assert!(record.request_cancel(Timestamp::from_millis(3)));
        assert!(
            !record.request_cancel(Timestamp::from_millis(3)),
            "asked once"
        );
        let step = record.step(true, Timestamp::from_millis(3), JobId::generate);
        assert_eq!(step.cancel.len(), 1);
        apply(&mut record, step);
        assert_eq!(record.status, FanOutStatus::Running);
        end(&mut record, 0, JobStatus::Cancelled);
        let step = record.step(true, Timestamp::from_millis(4), JobId::generate);
        apply(&mut record, step);
        assert_eq!(record.status, FanOutStatus::Cancelled);
        assert_eq!(record.targets[1].status, TargetStatus::Skipped);
    }

    #[test]
    fn a_child_no_target_names_changes_nothing() {
        let mut record = parent(&["a"], None, false);
        let step = record.step(false, Timestamp::from_millis(2), JobId::generate);
        apply(&mut record, step);
        let forged = ChildState {
            job: JobId::generate(),
            status: JobStatus::Failed,
            exit_code: Some(1),
        };
        assert!(!record.observe(&[forged]));
        assert_eq!(record.targets[0].status, TargetStatus::Pending);
    }

    #[test]
    fn a_child_is_pinned_to_its_target_and_names_its_parent() {
        let mut parent_spec = spec(
            r#"{"command": "uptime", "name": "check", "nodes": {"labels": {"zone": "eu"}}, "idempotency_key": "k"}"#,
        )
        .expect("valid");
        parent_spec.metadata.insert("team".into(), "ops".into());
        let id = JobId::generate();
        let child = parent_spec.child(id, &Target::waiting("exec-1", TargetKind::Node), None);
        assert_eq!(
            child.labels.get(NODE_LABEL).map(String::as_str),
            Some("exec-1")
        );
        assert_eq!(child.labels.get("zone").map(String::as_str), Some("eu"));
        assert_eq!(child.fanout, None);
        assert_eq!(child.idempotency_key, None);
        assert_eq!(child.fanout_parent(), Some(id));
        assert_eq!(child.name.as_deref(), Some("check [exec-1]"));
        // What a child carries is a valid spec on the wire, as its scheduler will check.
        let wire = crate::spec::JobSpecWire::from(child.clone());
        assert_eq!(JobSpec::try_from(wire).expect("valid"), child);
    }
}
