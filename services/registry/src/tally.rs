//! Per-node lost attempts: the registry replicas share one durable consumer on the job events
//! that may end an attempt `lost` or `quarantined` (`lost`, `quarantined`, `retrying`) and add
//! each such ending to its node's record, whoever decided it (a scheduler settling a down
//! node, the node's next instance, the node handing work back). The attempts a node ran to an
//! end it counts itself and reports with its heartbeats (`Registry::heartbeat`); the rule of
//! who counts what is the protocol's `TalliedBy`.
//!
//! A batch's events are summed per node and written with one compare-and-swap per node; they
//! are acknowledged after the write, so a crash in between counts them again (at least once).

use std::collections::BTreeMap;
use std::time::Duration;

use async_nats::jetstream::{self, AckKind};
use capstan_mesh::{Change, Error, Mesh, Modified, consume, wire};
use capstan_protocol::subjects::Origin;
use capstan_protocol::{JobEvent, NodeId, NodeTally, TalliedBy, topology};
use tokio_util::sync::CancellationToken;

/// Events summed per batch, at most.
const BATCH: usize = 512;

/// How long a batch waits for more events after its first.
const LINGER: Duration = Duration::from_millis(20);

/// Tallies lost attempts until `shutdown`; fails when its consumer cannot be created.
pub async fn run(mesh: Mesh, shutdown: CancellationToken) -> Result<(), Error> {
    let consumer = consume::durable(&mesh.js, &topology::registry_consumer(), &shutdown).await?;
    consume::batches(&consumer, BATCH, LINGER, &shutdown, |messages| {
        tally(&mesh, messages)
    })
    .await;
    Ok(())
}

async fn tally(mesh: &Mesh, messages: Vec<jetstream::Message>) {
    let mut per_node: BTreeMap<NodeId, NodeTally> = BTreeMap::new();
    let mut counted = Vec::with_capacity(messages.len());
    let mut spans = Vec::with_capacity(messages.len());
    for message in messages {
        match wire::decode::<JobEvent>(message.headers.as_ref(), &message.payload) {
            Ok((event, _)) => {
                let record = &event.record;
                // A retried attempt counts as how it ended, not as `retrying`.
                let ended = record.attempt_status.unwrap_or(record.status);
                if let Some(node) = &record.node
                    && TalliedBy::of(ended) == Some(TalliedBy::Registry)
                {
                    let span = tracing::info_span!(
                        "tally lost attempt",
                        otel.kind = "consumer",
                        job_id = %record.id,
                        node = %node,
                        status = record.status.as_str(),
                    );
                    capstan_telemetry::propagation::follow(&span, message.headers.as_ref());
                    spans.push(span);
                    per_node.entry(node.clone()).or_default().count(
                        record.id,
                        ended,
                        record.finished_at.unwrap_or(event.at),
                    );
                }
                counted.push(message);
            }
            Err(error) => {
                mesh.events
                    .reject_job_event(Origin::Registry, &message, &error)
                    .await;
            }
        }
    }
    let mut failed = false;
    for (node, tally) in &per_node {
        if let Err(error) = add(mesh, node, tally).await {
            tracing::warn!(node = %node, error = %error, "cannot record lost attempts yet; they will be redelivered");
            failed = true;
            break;
        }
    }
    for message in counted {
        let ack = if failed {
            message
                .ack_with(AckKind::Nak(Some(Duration::from_secs(1))))
                .await
        } else {
            message.ack().await
        };
        if let Err(error) = ack {
            tracing::debug!(error = %error, "cannot acknowledge a job outcome");
        }
    }
    drop(spans);
}

/// Adds `tally` to the node's record by compare-and-swap; a node the registry does not know
/// (it never registered, or its record expired) is skipped. A heartbeat writing in between
/// makes it read and add again.
async fn add(mesh: &Mesh, node: &NodeId, tally: &NodeTally) -> Result<(), Error> {
    let added = mesh
        .nodes
        .modify(node.as_str(), |current| {
            let Some(current) = current else {
                return Change::Stop(());
            };
            let mut record = current.value.clone();
            record.finished.merge(tally);
            Change::Write(record)
        })
        .await?;
    if let Modified::Stopped(()) = added {
        tracing::debug!(node = %node, "lost attempts of an unknown node are not tallied");
    }
    Ok(())
}
