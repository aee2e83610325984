//! The pull loops: the node's dispatches and the shared submissions, each asking JetStream for
//! as many messages as there are free slots beyond what it has asked for already, so that a
//! slot given back is offered at once. A message takes its slot when it arrives: a dispatch
//! that finds none waits for one (it is this node's), a submission is handed on to the
//! schedulers to wait for room. Running what arrives is `attempt`'s and `take`'s.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_nats::jetstream::AckKind;
use async_nats::jetstream::consumer::PullConsumer;
use capstan_protocol::topology;
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use super::Worker;

/// Which consumer a pull loop reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The node's own dispatches.
    Dispatches,
    /// The submitted jobs, shared with the other executors and the schedulers.
    Submissions,
}

impl Worker {
    /// Pulls from `consumer` (what `source` says it is) while slots are free, until `stop`.
    /// Submissions are pulled only while the node takes new work.
    pub async fn pull_until(
        self: Arc<Self>,
        consumer: PullConsumer,
        source: Source,
        stop: CancellationToken,
    ) {
        // Messages asked for and not yet arrived.
        let asked = Arc::new(AtomicUsize::new(0));
        loop {
            let wanted = loop {
                let changed = self.slots.on_change();
                tokio::pin!(changed);
                changed.as_mut().enable();
                let free = self.slots.free();
                let pending = asked.load(Ordering::Acquire);
                let open = source == Source::Dispatches || self.takes_submissions();
                if open && free > pending {
                    break free - pending;
                }
                // A slot given back, a pull asking for less, or the node's availability
                // changing (`follow_availability`) all wake it.
                tokio::select! {
                    _ = stop.cancelled() => return,
                    () = changed => {}
                }
            };
            asked.fetch_add(wanted, Ordering::AcqRel);
            // NOTE: no idle heartbeat on purpose. async-nats 0.51's batch stream returns
            // `Pending` after consuming a heartbeat without re-arming its waker, so a message
            // arriving after one sits unread until the batch's client-side timer ends it and
            // drops it (redelivered only after the ack wait). The server ends every pull at its
            // expiry with a 408, and the client's timer (expiry + 5 s) covers a lost 408.
            let mut builder = consumer
                .batch()
                .max_messages(wanted)
                .expires(Duration::from_secs(10));
            if source == Source::Submissions {
                // The executors' priority: a scheduler is served only while none asks.
                builder = builder.group(topology::SUBMISSIONS_GROUP);
            }
            let mut batch = match builder.messages().await {
                Ok(batch) => batch,
                Err(error) => {
                    asked.fetch_sub(wanted, Ordering::AcqRel);
                    tracing::warn!(error = %error, ?source, "cannot pull, retrying");
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                    }
                }
            };
            let worker = self.clone();
            let stop = stop.clone();
            let consumer = consumer.clone();
            let asked = asked.clone();
            tokio::spawn(async move {
                let mut left = wanted;
                while let Some(message) = batch.next().await {
                    let message = match message {
                        Ok(message) => {
                            capstan_mesh::metrics::mesh().delivered(&consumer, &message);
                            message
                        }
                        Err(error) => {
                            tracing::debug!(error = %error, ?source, "pull ended");
                            break;
                        }
                    };
                    left -= 1;
                    if stop.is_cancelled() {
                        asked.fetch_sub(1, Ordering::AcqRel);
                        // Arrived after shutdown began: hand it back.
                        let _ = message.ack_with(AckKind::Nak(None)).await;
                        continue;
                    }
                    let worker = worker.clone();
                    // Counted as arrived once it holds its slot (taken just below), so that the
                    // loop never sees that slot as free and asks for it again.
                    let arrived = || asked.fetch_sub(1, Ordering::AcqRel);
                    match source {
                        Source::Dispatches => {
                            let slot = worker.slots.try_take();
                            arrived();
                            let stop = stop.clone();
                            tokio::spawn(
                                async move { worker.dispatched(message, slot, stop).await },
                            );
                        }
                        Source::Submissions => {
                            // No slot left (a dispatch took it meanwhile): handed on to wait
                            // for room with the schedulers, not back to the consumer, where
                            // each delivery counts.
                            let slot = worker.slots.try_take();
                            arrived();
                            if slot.is_none() {
                                worker.slots.changed();
                            }
                            tokio::spawn(async move { worker.take(message, slot).await });
                        }
                    }
                }
                asked.fetch_sub(left, Ordering::AcqRel);
                worker.slots.changed();
            });
        }
    }
}
