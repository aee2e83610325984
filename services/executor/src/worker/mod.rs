//! Taking dispatches for this node and carrying each attempt through: claim it on the job's
//! record, run it, record the outcome, announce it, and only then acknowledge the dispatch.
//!
//! The executor pulls only as many dispatches as it has free slots; a slot is the process, given
//! back as soon as it ends, before the outcome is recorded. While an attempt runs its
//! dispatch stays unacknowledged, kept alive with progress acks; if the executor dies, the
//! dispatch is redelivered to the node's next instance, which finds the record claimed by its
//! predecessor and settles it instead of running the job twice.
//!
//! Beside its dispatches, a node with a free slot takes submissions from the consumer it
//! shares with the other executors and the schedulers, and runs a plain job at once (`take`).
//!
//! One concern per module: `slots` counts the free slots; `pull` offers them to the node's
//! dispatches and to the shared submissions; `take` runs a plain job at once or hands a
//! submission on for placement; `attempt` carries one
//! attempt from its claim (what a changed record means is the protocol's `claim::decide`) to
//! its acknowledged outcome; `control` follows cancel notices, checks the held attempts'
//! records once a second and follows drains; `held` keeps the attempts this instance holds
//! and decides what a held attempt's record means for it (`held_check`).

mod attempt;
mod control;
mod held;
mod pull;
mod slots;
mod take;

pub use pull::Source;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use capstan_mesh::Mesh;
use capstan_protocol::{InstanceId, JobId, Labels, NodeId};

use crate::membership::Finished;
use crate::runner::Runner;
use held::HeldAttempts;
use slots::Slots;

/// Pulls and runs dispatches for one node.
pub struct Worker {
    mesh: Mesh,
    node: NodeId,
    instance: InstanceId,
    runner: Runner,
    /// The node's labels: a submission asking for others is handed on.
    labels: Labels,
    /// The largest submission body taken.
    max_job_bytes: usize,
    /// One per process that may run at once.
    slots: Slots,
    ack_wait: Duration,
    /// How long an attempt runs before its start is announced (see [`Config::announce_after`]).
    ///
    /// [`Config::announce_after`]: crate::Config::announce_after
    announce_after: Duration,
    /// Attempts this instance holds.
    held: Arc<HeldAttempts>,
    /// Set while the node is draining: new dispatches are handed back, not run.
    draining: AtomicBool,
    /// Set while the node takes new work (active, neither cordoned nor draining): only then
    /// does it take submissions.
    accepting: AtomicBool,
    /// The submissions consumer's ack wait, once bound.
    submissions_ack_wait: std::sync::OnceLock<Duration>,
    /// The attempts it ran to an end, for the heartbeats.
    finished: Arc<Finished>,
}

/// What a worker is: its node, instance, labels and slots.
pub struct Shape {
    /// The node.
    pub node: NodeId,
    /// This instance.
    pub instance: InstanceId,
    /// The node's labels.
    pub labels: Labels,
    /// How many attempts run at once.
    pub capacity: usize,
    /// The largest submission body taken.
    pub max_job_bytes: usize,
    /// Where the attempts it runs to an end are counted, for the heartbeats to report.
    pub finished: Arc<Finished>,
}

impl Worker {
    /// A worker of `shape` running attempts with `runner`; `ack_wait` is the consumers', which
    /// its progress acks beat; an attempt's start is announced once it has run for
    /// `announce_after`.
    pub fn new(
        mesh: Mesh,
        shape: Shape,
        runner: Runner,
        ack_wait: Duration,
        announce_after: Duration,
    ) -> Self {
        Self {
            mesh,
            node: shape.node,
            instance: shape.instance,
            runner,
            labels: shape.labels,
            max_job_bytes: shape.max_job_bytes,
            slots: Slots::new(shape.capacity),
            ack_wait,
            announce_after,
            held: Arc::new(HeldAttempts::default()),
            draining: AtomicBool::new(false),
            accepting: AtomicBool::new(false),
            submissions_ack_wait: std::sync::OnceLock::new(),
            finished: shape.finished,
        }
    }

    /// How many SSH connections the gateway keeps open, on a gateway.
    pub fn pooled_connections(&self) -> Option<std::sync::Arc<dyn Fn() -> usize + Send + Sync>> {
        let remote = self.runner.remote.clone()?;
        Some(std::sync::Arc::new(move || remote.connector.pooled()))
    }

    /// The jobs this instance holds.
    pub fn held_jobs(&self) -> Vec<JobId> {
        self.held.jobs()
    }

    /// Stops every held attempt (the shutdown deadline passed).
    pub fn stop_all(&self) {
        self.held.stop_all();
    }

    /// Waits until no attempt is held, or `timeout` passes; true if none is.
    pub async fn wait_idle(&self, timeout: Duration) -> bool {
        self.held.wait_idle(timeout).await
    }

    /// True while this node is being drained: dispatches are handed back, not run.
    fn draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// Notes the ack wait of the submissions consumer, as bound.
    pub fn bound_submissions(&self, ack_wait: Duration) {
        let _ = self.submissions_ack_wait.set(ack_wait);
    }

    /// How often a taken submission needs a progress ack, times three: the consumer's ack
    /// wait, and never more than the topology's default (a scheduler may shorten it later).
    fn submission_ack_wait(&self) -> Duration {
        self.submissions_ack_wait
            .get()
            .copied()
            .unwrap_or(capstan_protocol::topology::SUBMISSION_ACK_WAIT)
            .min(capstan_protocol::topology::SUBMISSION_ACK_WAIT)
    }

    /// True while the node takes new work, and so submissions.
    fn takes_submissions(&self) -> bool {
        self.accepting.load(Ordering::Relaxed)
    }
}
