//! Waking jobs whose timer fired: a delayed job's start time came, or a retried job's backoff
//! passed. The schedulers share one durable consumer on the fired timers, so each timer wakes
//! its job once across replicas; a job that still waits with the timer's attempt number joins
//! the queue of jobs waiting for room, holding the timer message (unacknowledged, kept alive)
//! until it is placed, so a replica that dies with it hands it to another.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use capstan_mesh::{Error, consume};
use capstan_protocol::subjects::Origin;
use capstan_protocol::{Timer, topology};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::Scheduler;

impl Scheduler {
    /// Consumes fired timers until `shutdown`; fails when its consumer cannot be created.
    pub(crate) async fn consume_timers(
        self: Arc<Self>,
        shutdown: CancellationToken,
    ) -> Result<(), Error> {
        let spec = topology::ConsumerSpec {
            ack_wait: self.config.ack_wait,
            max_ack_pending: i64::try_from(self.config.max_waiting).unwrap_or(i64::MAX),
            ..topology::timers_consumer()
        };
        let consumer = consume::durable(&self.mesh.js, &spec, &shutdown).await?;
        consume::batches(
            &consumer,
            256,
            Duration::from_millis(5),
            &shutdown,
            |batch| {
                let scheduler = self.clone();
                async move {
                    let woken = batch.into_iter().map(|message| {
                        let scheduler = scheduler.clone();
                        async move { scheduler.wake(message).await }
                    });
                    futures::future::join_all(woken).await;
                }
            },
        )
        .await;
        Ok(())
    }

    async fn wake(&self, message: jetstream::Message) {
        crate::metrics::scheduler().timer();
        let Some(timer) = self
            .mesh
            .events
            .decode_stored::<Timer>(Origin::Timer, &message)
            .await
        else {
            return;
        };
        let span = tracing::info_span!(
            "wake job",
            otel.kind = "consumer",
            job_id = %timer.job,
            attempt = timer.attempt,
        );
        capstan_telemetry::propagation::follow(&span, message.headers.as_ref());
        async {
            match self.mesh.jobs.get(&timer.job.to_string()).await {
                Ok(Some(current)) if current.value.awaits_timer(timer.attempt) => {
                    tracing::debug!(job = %timer.job, "timer fired; placing the job");
                    let preferred = self.preferred(&current.value.spec);
                    self.waiting
                        .push(message, current, Some(timer.attempt), preferred, None);
                    self.wake.notify_one();
                    self.gate.notify_one();
                }
                Ok(Some(current))
                    if current.value.is_dispatched()
                        && current.value.attempt == timer.attempt + 1 =>
                {
                    // Placed by a replica that died before its dispatch was stored, or whose
                    // publish failed: dispatch again (deduplicated), then the timer is done.
                    let record = current.value;
                    match self.dispatch(&record, current.revision).await {
                        Ok(()) => {
                            if let Some(node) = &record.node {
                                self.cluster.observe_assigned(
                                    node.clone(),
                                    record.id,
                                    Some(record.attempt),
                                );
                            }
                            let _ = message.ack().await;
                        }
                        Err(error) => {
                            tracing::warn!(job = %timer.job, error = %error, "cannot dispatch a woken job; retrying");
                            let _ = message
                                .ack_with(jetstream::AckKind::Nak(Some(Duration::from_secs(1))))
                                .await;
                        }
                    }
                }
                Ok(Some(_)) | Ok(None) => {
                    // Cancelled, already woken, or expired: nothing waits for this timer.
                    let _ = message.ack().await;
                }
                Err(error) => {
                    tracing::warn!(job = %timer.job, error = %error, "cannot read a woken job; retrying");
                    let _ = message
                        .ack_with(jetstream::AckKind::Nak(Some(Duration::from_secs(1))))
                        .await;
                }
            }
        }
        .instrument(span)
        .await;
    }
}
