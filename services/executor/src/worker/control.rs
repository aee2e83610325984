//! The worker's control plane: cancel notices on the node's control subject, the
//! once-a-second re-reading of the held attempts' records (a cancel missed while
//! disconnected, an attempt taken from this node), and the node's drain. It only stops
//! attempts; recording how they ended is `attempt`'s.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use capstan_protocol::subjects::Origin;
use capstan_protocol::{Availability, CancelNotice, JobId, Rejection, Timestamp};
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use super::Worker;
use super::held::{HeldCheck, held_check};

impl Worker {
    /// Follows cancel commands for this node until `stop`, and every second re-reads the records
    /// of the held attempts, so a command missed while disconnected only delays the stop.
    pub async fn follow_cancellations(self: Arc<Self>, stop: CancellationToken) {
        let commands = self
            .mesh
            .client
            .subscribe(capstan_protocol::subjects::control_all(&self.node))
            .await;
        let mut commands = match commands {
            Ok(commands) => Some(commands),
            Err(error) => {
                tracing::warn!(error = %error, "cannot follow control commands; polling only");
                None
            }
        };
        let mut poll = tokio::time::interval(Duration::from_secs(1));
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                command = async {
                    match commands.as_mut() {
                        Some(commands) => commands.next().await,
                        None => std::future::pending().await,
                    }
                } => {
                    let Some(command) = command else {
                        commands = None;
                        continue;
                    };
                    match capstan_mesh::wire::decode::<CancelNotice>(
                        command.headers.as_ref(),
                        &command.payload,
                    ) {
                        Ok((notice, _)) => {
                            if self.held.cancel(notice.job, notice.attempt) {
                                tracing::info!(job = %notice.job, attempt = notice.attempt, "cancelling");
                            }
                        }
                        Err(error) => {
                            tracing::warn!(subject = %command.subject, error = %error, "unreadable command");
                            let reason = error.to_string();
                            let rejection = Rejection::new(
                                command.subject.as_str(),
                                command.payload.len(),
                                error.code,
                                error.field,
                                reason,
                            );
                            self.mesh.events.rejection(Origin::Control, &rejection).await;
                        }
                    }
                }
                _ = poll.tick() => {
                    self.check_held().await;
                    self.check_drain().await;
                }
            }
        }
    }

    /// Re-reads the records of the held attempts: stops those whose cancellation was asked,
    /// and those taken from this node (found lost while it was silent, or superseded), whose
    /// results could no longer be recorded anyway.
    async fn check_held(&self) {
        let held: Vec<(JobId, u32)> = self.held.running();
        for (job, attempt) in held {
            let Ok(Some(current)) = self.mesh.jobs.get(&job.to_string()).await else {
                continue;
            };
            let record = &current.value;
            // Finishing since the list was made: the record may hold its own outcome.
            let Some(stops) = self.held.stops_while_running(job, attempt) else {
                continue;
            };
            match held_check(record, attempt, &self.node, self.instance) {
                HeldCheck::Carry => {}
                HeldCheck::Cancel => {
                    stops.cancel.cancel();
                }
                HeldCheck::Taken if !stops.shutdown.is_cancelled() => {
                    tracing::warn!(
                        job = %job,
                        attempt,
                        status = %record.status,
                        "this attempt was taken from the node; stopping its process"
                    );
                    stops.shutdown.cancel();
                }
                HeldCheck::Taken => {}
            }
        }
    }

    /// Takes submissions only while the node is active.
    fn follow_availability(&self, availability: Availability) {
        let accepting = availability == Availability::Active;
        if self.accepting.swap(accepting, Ordering::Relaxed) != accepting {
            tracing::info!(accepting, "taking submissions");
            self.slots.changed();
        }
    }

    /// Follows the node's record as operators change it (a cordon, a drain), so that a node
    /// cordoned stops taking submissions at once rather than at the next once-a-second check:
    /// each write to the record is also delivered to a plain subscription on its subject.
    /// Ends at `stop`; without the subscription it is left to that check.
    pub async fn watch_availability(self: Arc<Self>, stop: CancellationToken) {
        let subject = capstan_protocol::subjects::kv_key(
            capstan_protocol::topology::NODES.name,
            self.node.as_str(),
        );
        let mut writes = match self.mesh.client.subscribe(subject).await {
            Ok(writes) => writes,
            Err(error) => {
                tracing::debug!(error = %error, "cannot follow the node's record");
                return;
            }
        };
        loop {
            let write = tokio::select! {
                _ = stop.cancelled() => return,
                write = writes.next() => write,
            };
            let Some(write) = write else { return };
            if write.payload.is_empty() {
                // A delete or purge marker: the record is not there to say anything.
                continue;
            }
            if let Ok(node) = self.mesh.nodes.decode(self.node.as_str(), &write.payload) {
                self.follow_availability(node.availability);
            }
        }
    }

    /// Follows the node's availability: while draining, dispatches are handed back, and at the
    /// drain deadline the attempts still running are stopped and handed back.
    async fn check_drain(&self) {
        let Ok(Some(node)) = self.mesh.nodes.get(self.node.as_str()).await else {
            return;
        };
        self.follow_availability(node.value.availability);
        let draining = matches!(
            node.value.availability,
            Availability::Draining | Availability::Drained
        );
        let was = self.draining.swap(draining, Ordering::Relaxed);
        if draining != was {
            tracing::info!(draining, "node availability changed");
        }
        if node.value.availability == Availability::Draining
            && node
                .value
                .drain_deadline
                .is_some_and(|deadline| deadline <= Timestamp::now())
            && !self.held.is_empty()
        {
            tracing::warn!(
                jobs = self.held.len(),
                "drain deadline passed; handing running jobs back"
            );
            self.stop_all();
        }
    }
}
