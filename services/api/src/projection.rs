//! Keeping the history tables current: the API replicas share one durable consumer on the job
//! events, and each applies what it receives in batches, one transaction per batch.
//!
//! Applying is idempotent and ignores events older than a row's newest (see
//! `capstan_store::projection`), so replicas working side by side, redeliveries after a crash,
//! and a NATS restart neither duplicate nor lose rows. Events are acknowledged only after
//! their batch is committed.
//!
//! An event is believed only if its subject names the job and kind it carries, and, for a
//! retry's attempt, if the job's record has come that far: the events stream takes attempt
//! events from any executor node, so a forged `succeeded` for attempt 999 is refused here.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, AckKind};
use capstan_mesh::{Mesh, consume, wire};
use capstan_protocol::subjects::Origin;
use capstan_protocol::{JobEvent, RejectionCode, topology};
use capstan_store::{History, Sequenced};
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;

/// Events applied per transaction, at most.
const BATCH: usize = 256;

/// How long a batch waits for more events after its first: a few milliseconds of history lag
/// buy transactions of hundreds of events instead of one each. 30 ms rather than 10 took a
/// quarter off the history's CPU per job under a flood (docs/BENCHMARKS.md); a job's own
/// events meanwhile are read from the stream (`replay`).
const LINGER: Duration = Duration::from_millis(30);

/// Projects events until `shutdown`; fails when its consumer cannot be created.
pub async fn run(
    mesh: Mesh,
    history: History,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) -> Result<(), capstan_mesh::Error> {
    let consumer = consume::durable(&mesh.js, &topology::history_consumer(), &shutdown).await?;
    consume::batches(&consumer, BATCH, LINGER, &shutdown, |messages| {
        project(&mesh, &history, &metrics, messages)
    })
    .await;
    Ok(())
}

async fn project(
    mesh: &Mesh,
    history: &History,
    metrics: &Metrics,
    messages: Vec<jetstream::Message>,
) {
    let mut batch = Vec::with_capacity(messages.len());
    let mut accepted = Vec::with_capacity(messages.len());
    let mut spans = Vec::with_capacity(messages.len());
    for message in messages {
        let seq = message.info().map(|info| info.stream_sequence).ok();
        match (
            seq,
            wire::decode::<JobEvent>(message.headers.as_ref(), &message.payload),
        ) {
            (Some(seq), Ok((event, _))) => {
                match believe(mesh, &message.subject, &event).await {
                    Belief::Believed => {}
                    Belief::Forged(reason) => {
                        tracing::warn!(job = %event.record.id, subject = %message.subject, reason, "forged job event ignored");
                        mesh.events
                            .reject_stored(
                                Origin::History,
                                &message,
                                Some(event.record.id),
                                RejectionCode::Forged,
                                Some("record".to_owned()),
                                reason,
                            )
                            .await;
                        continue;
                    }
                    Belief::Unsure => {
                        let _ = message
                            .ack_with(AckKind::Nak(Some(Duration::from_secs(1))))
                            .await;
                        continue;
                    }
                }
                let span = tracing::info_span!(
                    "record job event",
                    otel.kind = "consumer",
                    job_id = %event.record.id,
                    kind = event.kind.as_str(),
                );
                capstan_telemetry::propagation::follow(&span, message.headers.as_ref());
                spans.push(span);
                batch.push(Sequenced { seq, event });
                accepted.push(message);
            }
            (_, Err(error)) => {
                mesh.events
                    .reject_job_event(Origin::History, &message, &error)
                    .await;
            }
            (None, Ok(_)) => {
                let _ = message.ack_with(AckKind::Term).await;
            }
        }
    }
    if batch.is_empty() {
        return;
    }
    match history.apply(&batch).await {
        Ok(()) => {
            for item in &batch {
                metrics.recorded(&item.event);
            }
            for message in accepted {
                if let Err(error) = message.ack().await {
                    tracing::debug!(error = %error, "cannot acknowledge event; it will be applied again");
                }
            }
        }
        Err(error) => {
            tracing::warn!(events = batch.len(), error = %error, "cannot record events yet; they will be redelivered");
            for message in accepted {
                let _ = message
                    .ack_with(AckKind::Nak(Some(Duration::from_secs(1))))
                    .await;
            }
        }
    }
    // The spans end here: when the events are durably recorded (or handed back).
    drop(spans);
}

/// What the projection makes of an event before recording it.
enum Belief {
    Believed,
    /// Not what it claims to be: rejected, never recorded.
    Forged(String),
    /// The job's record could not be read to check it: handed back for later.
    Unsure,
}

/// Whether `event`, read on `subject`, is believed. The first attempt's events need no
/// lookup (a job's history starts there); a later attempt's are checked against the job's
/// record (see [`credible`]).
async fn believe(mesh: &Mesh, subject: &str, event: &JobEvent) -> Belief {
    let reached = if event.record.attempt <= 1 {
        None
    } else {
        match mesh.jobs.get(&event.record.id.to_string()).await {
            Ok(current) => current.map(|c| c.value.attempt),
            Err(error) => {
                tracing::debug!(error = %error, "cannot read a job's record to check its event");
                return Belief::Unsure;
            }
        }
    };
    match credible(subject, event, reached) {
        Ok(()) => Belief::Believed,
        Err(reason) => Belief::Forged(reason),
    }
}

/// Whether `event`, read on `subject`, is what it claims to be, for a job whose record has
/// reached attempt `reached` (`None`: no record). The subject must name the event's job and
/// kind; an attempt after the first must be one the record has reached, since every service
/// writes the record before announcing, so a legitimate event never names a later attempt.
pub(crate) fn credible(
    subject: &str,
    event: &JobEvent,
    reached: Option<u32>,
) -> Result<(), String> {
    event.agrees_with(subject)?;
    let attempt = event.record.attempt;
    match reached {
        _ if attempt <= 1 => Ok(()),
        Some(reached) if reached >= attempt => Ok(()),
        Some(reached) => Err(format!(
            "attempt {attempt} of a job whose record is at attempt {reached}"
        )),
        None => Err(format!("attempt {attempt} of a job with no record")),
    }
}
