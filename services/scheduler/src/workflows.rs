//! Workflows: carrying every running workflow forward as its steps' jobs end.
//!
//! The API creates a workflow and starts its first steps; from then on, schedulers carry it.
//! A step's job events carry its workflow in a header (`Capstan-Workflow`), so the end of a
//! step is heard by every replica at once and queued per workflow; one task takes the queue
//! and carries up to [`CARRIED_AT_ONCE`] workflows side by side, never one workflow twice at
//! once. Because those events come over core NATS and may be missed, every
//! running workflow in a live view of the bucket is also read in full every
//! [`SWEEP_INTERVAL`]: that is also how a replica started after every other one died picks up
//! the workflows they left. Replicas do all of this side by side: each step is a
//! compare-and-swap on the workflow (`capstan_mesh::workflow`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use capstan_mesh::BucketView;
use capstan_mesh::workflow::{self, Seen};
use capstan_protocol::{JobId, JobRecord};
use futures::StreamExt;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::Scheduler;

/// How often every running workflow is read in full.
pub const SWEEP_INTERVAL: Duration = Duration::from_secs(5);

/// How many workflows one replica carries forward at once: a reconcile mostly waits on NATS
/// (reads, a compare-and-swap, a submission), so carrying one at a time would queue every
/// step's hand-off behind every other workflow's.
pub const CARRIED_AT_ONCE: usize = 16;

/// What this replica heard of the workflows' steps and has not handled yet.
#[derive(Default)]
pub(crate) struct Workflows {
    /// Step jobs' records from their events, by workflow.
    heard: Mutex<HashMap<JobId, Vec<JobRecord>>>,
    wake: Notify,
}

impl Workflows {
    /// Queues what a step's job event said of it.
    pub(crate) fn heard(&self, workflow: JobId, job: JobRecord) {
        self.heard
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .entry(workflow)
            .or_default()
            .push(job);
        self.wake.notify_one();
    }

    fn take(&self) -> HashMap<JobId, Vec<JobRecord>> {
        std::mem::take(
            &mut *self
                .heard
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
    }
}

impl Scheduler {
    /// Carries every running workflow forward until `shutdown`: at once when a step's event
    /// was heard, and in full every [`SWEEP_INTERVAL`].
    pub(crate) async fn carry_workflows(self: Arc<Self>, shutdown: CancellationToken) {
        let view = match BucketView::start(self.mesh.workflows.clone(), shutdown.clone()).await {
            Ok(view) => view,
            Err(error) => {
                tracing::error!(error = %error, "cannot watch the workflows; carrying only what is heard");
                return self.carry_heard_only(shutdown).await;
            }
        };
        let mut sweep = tokio::time::interval(SWEEP_INTERVAL);
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let full = tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = self.workflows.wake.notified() => false,
                _ = sweep.tick() => true,
            };
            self.carry_heard().await;
            if full {
                let running: Vec<JobId> = view
                    .values()
                    .into_iter()
                    .filter(|found| !found.value.status.is_terminal())
                    .map(|found| found.value.id)
                    .collect();
                let swept = self.carry_all(running.into_iter().map(|id| (id, Seen::ReadAll)));
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = swept => {}
                }
            }
        }
    }

    /// Without a view of the bucket: only what the events say.
    async fn carry_heard_only(&self, shutdown: CancellationToken) {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = self.workflows.wake.notified() => self.carry_heard().await,
            }
        }
    }

    async fn carry_heard(&self) {
        let heard = self.workflows.take();
        self.carry_all(heard.into_iter().map(|(id, jobs)| (id, Seen::Jobs(jobs))))
            .await;
    }

    /// Carries each of `workflows` (distinct ids), [`CARRIED_AT_ONCE`] at a time.
    async fn carry_all(&self, workflows: impl Iterator<Item = (JobId, Seen)>) {
        futures::stream::iter(workflows)
            .for_each_concurrent(CARRIED_AT_ONCE, |(id, seen)| self.carry_workflow(id, seen))
            .await;
    }

    async fn carry_workflow(&self, id: JobId, seen: Seen) {
        if let Err(error) = workflow::reconcile(&self.mesh, id, seen).await {
            tracing::warn!(error = %error, workflow = %id, "cannot carry a workflow forward");
        }
    }
}
