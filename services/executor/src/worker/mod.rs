//! Taking dispatches for this node and carrying each attempt through: claim it on the job's
//! record, run it, record the outcome, announce it, and only then acknowledge the dispatch.
//!
//! The executor pulls only as many dispatches as it has free slots; a slot is the process, given
//! back as soon as it ends, before the outcome is recorded. While an attempt runs its
//! dispatch stays unacknowledged, kept alive with progress acks; if the executor dies, the
//! dispatch is redelivered to the node's next instance, which finds the record claimed by its
//! predecessor and settles it instead of running the job twice.
//!
//! One concern per module: `pull` takes dispatches while slots are free; `attempt` carries one
//! attempt from its claim (what a changed record means is the protocol's `claim::decide`) to
//! its acknowledged outcome; `control` follows cancel notices, checks the held attempts'
//! records once a second and follows drains; `held` keeps the attempts this instance holds
//! and decides what a held attempt's record means for it (`held_check`).

mod attempt;
mod control;
mod held;
mod pull;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use capstan_mesh::Mesh;
use capstan_protocol::{InstanceId, JobId, NodeId};
use tokio::sync::Semaphore;

use crate::runner::Runner;
use held::HeldAttempts;

/// Pulls and runs dispatches for one node.
pub struct Worker {
    mesh: Mesh,
    node: NodeId,
    instance: InstanceId,
    runner: Runner,
    /// One permit per process that may run at once.
    slots: Arc<Semaphore>,
    capacity: usize,
    ack_wait: Duration,
    /// How long an attempt runs before its start is announced (see [`Config::announce_after`]).
    ///
    /// [`Config::announce_after`]: crate::Config::announce_after
    announce_after: Duration,
    /// Attempts this instance holds.
    held: HeldAttempts,
    /// Set while the node is draining: new dispatches are handed back, not run.
    draining: AtomicBool,
}

impl Worker {
    /// A worker for `node` as `instance`, running up to `capacity` attempts at once with
    /// `runner`; `ack_wait` is the dispatch consumer's, which its progress acks beat; an attempt's
    /// start is announced once it has run for `announce_after`.
    pub fn new(
        mesh: Mesh,
        node: NodeId,
        instance: InstanceId,
        runner: Runner,
        capacity: usize,
        ack_wait: Duration,
        announce_after: Duration,
    ) -> Self {
        Self {
            mesh,
            node,
            instance,
            runner,
            slots: Arc::new(Semaphore::new(capacity)),
            capacity,
            ack_wait,
            announce_after,
            held: HeldAttempts::default(),
            draining: AtomicBool::new(false),
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
}
