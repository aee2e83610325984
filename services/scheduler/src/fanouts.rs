//! Fan-out parents: accepting one (resolving its targets once, storing the parent) and
//! carrying every open parent forward as its targets' jobs change.
//!
//! A target's job events carry their parent in a header (`Capstan-Fanout`), so following the
//! job events costs nothing more for ordinary jobs; what they say of a child is queued per
//! parent and handled by one task, a parent at a time. Because those events come over core
//! NATS and may be missed, every open parent is also read in full every
//! [`SWEEP_INTERVAL`], and on start the replica finds the parents still open in the bucket.
//! Replicas do all of this side by side: each step is a compare-and-swap on the parent.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use capstan_mesh::fanout::{self, Seen};
use capstan_mesh::{Claim, Error};
use capstan_protocol::fanout::{FanOut, FanOutRecord, Target, TargetKind, Targets};
use capstan_protocol::{JobId, JobRecord, JobSpec, SubmittedBy, Timestamp};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::Scheduler;
use crate::intake::Accepted;

/// How often every open parent is read in full.
pub const SWEEP_INTERVAL: Duration = Duration::from_secs(5);

/// The parents this replica carries forward, and what it heard of their children.
#[derive(Default)]
pub(crate) struct FanOuts {
    /// Parents not known to have ended.
    open: Mutex<BTreeSet<JobId>>,
    /// Children's records from their events, by parent, not yet handled.
    heard: Mutex<HashMap<JobId, Vec<JobRecord>>>,
    wake: Notify,
}

impl FanOuts {
    /// Queues what a child's event said of it.
    pub(crate) fn heard(&self, parent: JobId, child: JobRecord) {
        lock(&self.heard).entry(parent).or_default().push(child);
        lock(&self.open).insert(parent);
        self.wake.notify_one();
    }

    fn open(&self, parent: JobId) {
        lock(&self.open).insert(parent);
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Why a fan-out's targets could not be resolved.
pub(crate) enum Unresolved {
    /// The spec names what does not exist or matches nothing: the field, and why.
    Refused(&'static str, String),
    /// The catalogue could not be read now.
    Unavailable(Error),
}

impl Scheduler {
    /// The targets of `fanout`, as the catalogue and the nodes stand now.
    pub(crate) async fn resolve_targets(&self, fanout: &FanOut) -> Result<Vec<Target>, Unresolved> {
        let system = |name: &str| Target::waiting(name, TargetKind::System);
        match &fanout.targets {
            Targets::SystemNames(names) => {
                let mut targets = Vec::with_capacity(names.len());
                for name in names {
                    match self.mesh.systems.get(name).await {
                        Ok(Some(found)) if found.value.active => targets.push(system(name)),
                        Ok(Some(_)) => {
                            return Err(Unresolved::Refused(
                                "systems.names",
                                format!("system `{name}` is inactive"),
                            ));
                        }
                        Ok(None) => {
                            return Err(Unresolved::Refused(
                                "systems.names",
                                format!("no system `{name}` in the catalogue"),
                            ));
                        }
                        Err(error) => return Err(Unresolved::Unavailable(error)),
                    }
                }
                Ok(targets)
            }
            Targets::SystemLabels(labels) => {
                let mut all = self
                    .mesh
                    .systems
                    .values()
                    .await
                    .map_err(Unresolved::Unavailable)?;
                all.retain(|found| {
                    found.value.active
                        && capstan_protocol::spec::selects(labels, &found.value.labels)
                });
                all.sort_by(|a, b| a.value.name.cmp(&b.value.name));
                if all.is_empty() {
                    return Err(Unresolved::Refused(
                        "systems.labels",
                        "no active system carries these labels".into(),
                    ));
                }
                Ok(all.iter().map(|found| system(&found.value.name)).collect())
            }
            Targets::Nodes(labels) => {
                let nodes = self.cluster.schedulable_matching(labels);
                if nodes.is_empty() {
                    return Err(Unresolved::Refused(
                        "nodes.labels",
                        "no node that is up and schedulable carries these labels".into(),
                    ));
                }
                Ok(nodes
                    .into_iter()
                    .map(|node| Target::waiting(node.as_str(), TargetKind::Node))
                    .collect())
            }
        }
    }

    /// Claims the parent's idempotency key, stores the parent `id` over `targets` (or finds it
    /// stored by an earlier delivery of the same submission) and starts its first targets.
    pub(crate) async fn accept_fanout(
        &self,
        id: JobId,
        spec: JobSpec,
        targets: Vec<Target>,
        submitted_by: SubmittedBy,
        seq: u64,
        submitted: Timestamp,
    ) -> Result<Accepted, Error> {
        if let Some(key) = &spec.idempotency_key
            && let Claim::Existing(existing) = self.mesh.idempotency.claim(key, id).await?
        {
            return Ok(Accepted::Duplicate(existing));
        }
        let now = Timestamp::now();
        let start_at = spec.start.map(|start| start.due(submitted));
        let mut record = FanOutRecord::new(id, spec, targets, start_at, now);
        record.submitted_by = Some(submitted_by);
        record.submission_seq = Some(seq);
        record.traceparent = capstan_telemetry::propagation::traceparent();
        match self.mesh.fanouts.create(&id.to_string(), &record).await {
            Ok(_) => fanout::announce(&self.mesh, &record).await,
            Err(Error::AlreadyExists { .. }) => {
                let Some(stored) = self.mesh.fanouts.get(&id.to_string()).await? else {
                    // Created, ended and expired: nothing left to do.
                    return Ok(Accepted::Done);
                };
                if stored.value.submission_seq != Some(seq) && stored.value.spec != record.spec {
                    return Ok(Accepted::Conflict(format!(
                        "job id {id} belongs to another submission"
                    )));
                }
            }
            Err(error) => return Err(error),
        }
        self.fanouts.open(id);
        fanout::reconcile(&self.mesh, id, Seen::Nothing).await?;
        Ok(Accepted::Done)
    }

    /// Carries every open parent forward until `shutdown`: at once when a child's event was
    /// heard, and in full every [`SWEEP_INTERVAL`].
    pub(crate) async fn carry_fanouts(self: Arc<Self>, shutdown: CancellationToken) {
        self.find_open_fanouts().await;
        let mut sweep = tokio::time::interval(SWEEP_INTERVAL);
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let full = tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = self.fanouts.wake.notified() => false,
                _ = sweep.tick() => true,
            };
            let heard = std::mem::take(&mut *lock(&self.fanouts.heard));
            for (parent, children) in heard {
                self.carry(parent, Seen::Children(children)).await;
            }
            if full {
                let open: Vec<JobId> = lock(&self.fanouts.open).iter().copied().collect();
                for parent in open {
                    if shutdown.is_cancelled() {
                        return;
                    }
                    self.carry(parent, Seen::ReadAll).await;
                }
            }
        }
    }

    async fn carry(&self, parent: JobId, seen: Seen) {
        match fanout::reconcile(&self.mesh, parent, seen).await {
            Ok(Some(record)) if !record.status.is_terminal() => {}
            Ok(_) => {
                lock(&self.fanouts.open).remove(&parent);
            }
            Err(error) => {
                tracing::warn!(error = %error, job = %parent, "cannot carry a fan-out forward");
            }
        }
    }

    /// Adds the parents the bucket holds open (after a restart, or those another replica
    /// accepted).
    async fn find_open_fanouts(&self) {
        let keys = match self.mesh.fanouts.keys().await {
            Ok(keys) => keys,
            Err(error) => {
                tracing::warn!(error = %error, "cannot list the fan-outs; following events only");
                return;
            }
        };
        for key in keys {
            let Ok(id) = key.parse::<JobId>() else {
                continue;
            };
            if let Ok(Some(found)) = self.mesh.fanouts.get(&key).await
                && !found.value.status.is_terminal()
            {
                self.fanouts.open(id);
            }
        }
    }
}
