//! The pull loop: takes dispatches from the node's consumer while slots are free, exactly as
//! many as are free, and hands each to its attempt with the slot it holds. Claiming and running
//! the attempt is `attempt`'s.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::AckKind;
use async_nats::jetstream::consumer::PullConsumer;
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use super::Worker;

impl Worker {
    /// Pulls dispatches while slots are free, until `stop`. Each pull asks for exactly the
    /// slots free at that moment, and several pulls may be outstanding, so a slot that frees
    /// is offered to JetStream at once.
    pub async fn pull_until(self: Arc<Self>, consumer: PullConsumer, stop: CancellationToken) {
        loop {
            let first = tokio::select! {
                _ = stop.cancelled() => return,
                permit = self.slots.clone().acquire_owned() => permit.expect("never closed"),
            };
            let mut permits = vec![first];
            while permits.len() < self.capacity {
                match self.slots.clone().try_acquire_owned() {
                    Ok(permit) => permits.push(permit),
                    Err(_) => break,
                }
            }
            // NOTE: no idle heartbeat on purpose. async-nats 0.51's batch stream returns
            // `Pending` after consuming a heartbeat without re-arming its waker, so a dispatch
            // arriving after one sits unread until the batch's client-side timer ends it and
            // drops it (redelivered only after the ack wait). The server ends every pull at its
            // expiry with a 408, and the client's timer (expiry + 5 s) covers a lost 408.
            let batch = consumer
                .batch()
                .max_messages(permits.len())
                .expires(Duration::from_secs(10))
                .messages()
                .await;
            let mut batch = match batch {
                Ok(batch) => batch,
                Err(error) => {
                    drop(permits);
                    tracing::warn!(error = %error, "cannot pull dispatches, retrying");
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                    }
                }
            };
            let worker = self.clone();
            let stop = stop.clone();
            let consumer = consumer.clone();
            tokio::spawn(async move {
                while let Some(message) = batch.next().await {
                    let message = match message {
                        Ok(message) => {
                            capstan_mesh::metrics::mesh().delivered(&consumer, &message);
                            message
                        }
                        Err(error) => {
                            tracing::debug!(error = %error, "dispatch pull ended");
                            break;
                        }
                    };
                    if stop.is_cancelled() {
                        // Arrived after shutdown began: hand it back for the next instance.
                        let _ = message.ack_with(AckKind::Nak(None)).await;
                        continue;
                    }
                    let Some(permit) = permits.pop() else {
                        let _ = message.ack_with(AckKind::Nak(None)).await;
                        continue;
                    };
                    let worker = worker.clone();
                    tokio::spawn(async move { worker.handle(message, permit).await });
                }
                // Unused permits return to the pool here.
            });
        }
    }
}
