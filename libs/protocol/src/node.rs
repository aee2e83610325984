//! Executor nodes: how they register and heartbeat, and the record the registry keeps for each
//! in the nodes KV bucket.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::ids::{InstanceId, JobId, NodeId};
use crate::spec::Labels;
use crate::timestamp::Timestamp;

/// Whether a node can take work.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum NodeStatus {
    /// Heartbeating within the timeout.
    Up,
    /// Missed heartbeats for longer than the timeout.
    Down,
    /// Deregistered on a clean shutdown.
    Left,
}

impl NodeStatus {
    /// The snake_case name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Up => "up",
            Self::Down => "down",
            Self::Left => "left",
        }
    }
}

impl fmt::Display for NodeStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An executor announcing itself to the registry (`capstan.registry.register`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct Registration {
    /// The node's stable name.
    pub node: NodeId,
    /// This process's instance id.
    pub instance: InstanceId,
    /// Labels jobs select on.
    #[serde(default)]
    pub labels: Labels,
    /// How many jobs it runs at once.
    pub capacity: u32,
    /// The executor's version.
    pub version: String,
    /// The host it runs on.
    #[serde(default)]
    pub hostname: String,
}

/// An executor's periodic liveness report (`capstan.registry.heartbeat`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct Heartbeat {
    /// The node.
    pub node: NodeId,
    /// The process sending it.
    pub instance: InstanceId,
    /// Jobs the executor holds right now (running, or fetched and starting).
    #[serde(default)]
    pub jobs: Vec<JobId>,
    /// Dispatches waiting on the node's subject that it has not fetched yet.
    #[serde(default)]
    pub queued: u64,
    /// The attempts this instance ran to an end since its last heartbeat the registry
    /// answered (see [`NodeTally`] for who counts what); the registry adds them to the node's
    /// record in the heartbeat's own write.
    #[serde(default, skip_serializing_if = "NodeTally::is_empty")]
    pub finished: NodeTally,
}

/// The registry's answer to a heartbeat.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum HeartbeatReply {
    /// Recorded.
    Ok,
    /// The registry has no record of this node: register again.
    UnknownNode,
    /// Another instance registered under this node id since; this one must stop taking work.
    Superseded,
}

/// A query for one node (`capstan.registry.nodes.get`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct NodeQuery {
    /// The node's id.
    pub node: NodeId,
}

/// A node as the registry knows it: the value under its id in the nodes bucket.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct NodeRecord {
    /// The node's id.
    pub id: NodeId,
    /// The instance that last registered.
    pub instance: InstanceId,
    /// Its labels.
    pub labels: Labels,
    /// Job slots.
    pub capacity: u32,
    /// Executor version.
    pub version: String,
    /// Host name.
    pub hostname: String,
    /// Liveness.
    pub status: NodeStatus,
    /// When the current instance registered.
    pub registered_at: Timestamp,
    /// When the registry last heard from it (the registry's clock).
    pub last_heartbeat_at: Timestamp,
    /// Jobs it reported holding at its last heartbeat.
    #[serde(default)]
    pub jobs: Vec<JobId>,
    /// Dispatches it reported waiting for it at its last heartbeat.
    #[serde(default)]
    pub queued: u64,
    /// How the jobs it ran ended, across its instances.
    #[serde(default)]
    pub finished: NodeTally,
    /// Whether schedulers may place new work on it (an operator's choice, kept across the
    /// node's restarts).
    #[serde(default)]
    pub availability: Availability,
    /// While draining: when attempts still running are stopped and handed back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drain_deadline: Option<Timestamp>,
}

/// Whether a node takes new work, as operators set it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum Availability {
    /// Takes new work.
    #[default]
    Active,
    /// Takes no new work; what it runs finishes normally.
    Cordoned,
    /// Takes no new work, and hands back what it still runs at the drain deadline.
    Draining,
    /// Drained: it holds nothing and takes no new work until uncordoned.
    Drained,
}

impl Availability {
    /// The snake_case name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::Cordoned => "cordoned",
            Self::Draining => "draining",
            Self::Drained => "drained",
        }
    }
}

/// An operator's change to a node's availability (`capstan.registry.nodes.cordon`,
/// `.uncordon`, `.drain`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct NodeCommand {
    /// The node.
    pub node: NodeId,
    /// For a drain: seconds the running jobs may take before they are handed back
    /// (default 300).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline_secs: Option<u64>,
}

/// How the jobs a node ran ended.
///
/// Two counters feed it, each for the endings only it sees for sure ([`TalliedBy`]): the node
/// itself counts the attempts whose process it ran to an end and reports them with its
/// heartbeats; the registry counts the attempts lost or quarantined, whoever ended them, from
/// the job events. A job whose process ran to its end thus costs the tally no message of its
/// own.
///
/// Counts are at least once: a heartbeat whose reply was lost after the registry stored it is
/// counted again with the next one, and an event redelivered after a registry crashed between
/// counting it and acknowledging it is counted again.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(default)]
pub struct NodeTally {
    /// Jobs that exited 0.
    pub succeeded: u64,
    /// Jobs that exited unsuccessfully.
    pub failed: u64,
    /// Jobs killed at their timeout.
    pub timed_out: u64,
    /// Attempts the node stopped because their job was cancelled (a job cancelled before its
    /// process started is not counted).
    pub cancelled: u64,
    /// Attempts lost on the node (it died, went silent or handed them back).
    pub lost: u64,
    /// The job that ended last.
    pub last_job: Option<JobId>,
    /// When it ended.
    pub last_finished_at: Option<Timestamp>,
}

impl NodeTally {
    /// Counts one job that ended with `status` at `at`.
    pub fn count(&mut self, job: JobId, status: crate::job::JobStatus, at: Timestamp) {
        use crate::job::JobStatus;
        match status {
            JobStatus::Succeeded => self.succeeded += 1,
            JobStatus::Failed => self.failed += 1,
            JobStatus::TimedOut => self.timed_out += 1,
            JobStatus::Cancelled => self.cancelled += 1,
            JobStatus::Lost | JobStatus::Quarantined => self.lost += 1,
            JobStatus::Scheduled
            | JobStatus::Pending
            | JobStatus::Running
            | JobStatus::Retrying => return,
        }
        if self.last_finished_at.is_none_or(|last| last <= at) {
            self.last_job = Some(job);
            self.last_finished_at = Some(at);
        }
    }

    /// Adds `other`'s counts, keeping the later last job.
    pub fn merge(&mut self, other: &NodeTally) {
        self.succeeded += other.succeeded;
        self.failed += other.failed;
        self.timed_out += other.timed_out;
        self.cancelled += other.cancelled;
        self.lost += other.lost;
        if let Some(at) = other.last_finished_at
            && self.last_finished_at.is_none_or(|last| last <= at)
        {
            self.last_job = other.last_job;
            self.last_finished_at = Some(at);
        }
    }

    /// Every job counted.
    pub fn total(&self) -> u64 {
        self.succeeded + self.failed + self.timed_out + self.cancelled + self.lost
    }

    /// True when nothing was counted.
    pub fn is_empty(&self) -> bool {
        self.total() == 0 && self.last_finished_at.is_none()
    }
}

/// Who counts an attempt's ending in its node's [`NodeTally`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TalliedBy {
    /// The node, in its heartbeats: its process ran to an end there (succeeded, failed, timed
    /// out, cancelled), and only the node's own outcome write says so.
    Node,
    /// The registry, from the job events: the attempt was lost or quarantined, which a
    /// scheduler, the node's next instance or the node itself may decide.
    Registry,
}

impl TalliedBy {
    /// Who counts an attempt that ended `status` (the record's `attempt_status` when it is
    /// retried); `None` for a status that ends no attempt.
    pub fn of(status: crate::job::JobStatus) -> Option<Self> {
        use crate::job::JobStatus;
        match status {
            JobStatus::Succeeded
            | JobStatus::Failed
            | JobStatus::TimedOut
            | JobStatus::Cancelled => Some(Self::Node),
            JobStatus::Lost | JobStatus::Quarantined => Some(Self::Registry),
            JobStatus::Scheduled
            | JobStatus::Pending
            | JobStatus::Running
            | JobStatus::Retrying => None,
        }
    }
}

impl NodeRecord {
    /// True when the node may be given new work.
    pub fn is_schedulable(&self) -> bool {
        self.status == NodeStatus::Up && self.availability == Availability::Active
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::JobStatus;

    #[test]
    fn a_node_counts_what_its_processes_ended_and_the_registry_what_was_lost() {
        for status in [
            JobStatus::Succeeded,
            JobStatus::Failed,
            JobStatus::TimedOut,
            JobStatus::Cancelled,
        ] {
            assert_eq!(TalliedBy::of(status), Some(TalliedBy::Node), "{status:?}");
        }
        for status in [JobStatus::Lost, JobStatus::Quarantined] {
            assert_eq!(
                TalliedBy::of(status),
                Some(TalliedBy::Registry),
                "{status:?}"
            );
        }
        for status in [
            JobStatus::Scheduled,
            JobStatus::Pending,
            JobStatus::Running,
            JobStatus::Retrying,
        ] {
            assert_eq!(TalliedBy::of(status), None, "{status:?}");
        }
    }

    #[test]
    fn an_empty_tally_is_left_out_of_a_heartbeat_and_a_counted_one_travels() {
        let beat = Heartbeat {
            node: NodeId::new("n-1").expect("valid"),
            instance: InstanceId::generate(),
            jobs: vec![],
            queued: 0,
            finished: NodeTally::default(),
        };
        let json = serde_json::to_value(&beat).expect("encodes");
        assert!(json.get("finished").is_none(), "{json}");
        let mut counted = beat.clone();
        counted.finished.count(
            JobId::generate(),
            JobStatus::Failed,
            crate::Timestamp::now(),
        );
        assert!(!counted.finished.is_empty());
        let bytes = crate::codec::to_msgpack(&counted).expect("encodes");
        let back: Heartbeat =
            crate::codec::decode(crate::Encoding::MsgPack, &bytes).expect("decodes");
        assert_eq!(back, counted);
    }
}
