//! Rebuilding the history from scratch: empty the tables, then replay every job event still in
//! the events stream through the same projection the API runs. Because applying is
//! idempotent and order-tolerant, the rebuilt tables equal the live ones (for the events the
//! stream still holds; see its retention).

use std::time::Duration;

use async_nats::jetstream::consumer::{DeliverPolicy, pull};
use capstan_mesh::{Mesh, wire};
use capstan_protocol::{JobEvent, subjects, topology};
use capstan_store::{History, Sequenced};
use futures::StreamExt;

/// What a rebuild did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Rebuilt {
    /// Events applied.
    pub events: u64,
    /// Messages that were not job events, skipped.
    pub skipped: u64,
}

/// Empties `history` and replays the events stream into it.
pub async fn rebuild(mesh: &Mesh, history: &History) -> Result<Rebuilt, String> {
    history.clear().await.map_err(|e| e.to_string())?;
    let stream = mesh
        .js
        .get_stream(topology::EVENTS.name)
        .await
        .map_err(|e| e.to_string())?;
    let consumer = stream
        .create_consumer(pull::OrderedConfig {
            filter_subject: subjects::JOB_EVENTS_ALL.to_owned(),
            deliver_policy: DeliverPolicy::All,
            ..Default::default()
        })
        .await
        .map_err(|e| e.to_string())?;
    let mut rebuilt = Rebuilt::default();
    if consumer.cached_info().num_pending == 0 {
        return Ok(rebuilt);
    }
    let mut messages = consumer.messages().await.map_err(|e| e.to_string())?;
    let mut batch = Vec::with_capacity(500);
    loop {
        let message = tokio::time::timeout(Duration::from_secs(30), messages.next())
            .await
            .map_err(|_| "the events stream stopped answering".to_owned())?
            .ok_or("the events stream ended")?
            .map_err(|e| e.to_string())?;
        let info = message.info().map_err(|e| e.to_string())?;
        let (seq, left) = (info.stream_sequence, info.pending);
        match wire::decode::<JobEvent>(message.headers.as_ref(), &message.payload) {
            Ok((event, _)) => batch.push(Sequenced { seq, event }),
            Err(_) => rebuilt.skipped += 1,
        }
        if batch.len() >= 500 || left == 0 {
            history.apply(&batch).await.map_err(|e| e.to_string())?;
            rebuilt.events += batch.len() as u64;
            batch.clear();
        }
        if left == 0 {
            return Ok(rebuilt);
        }
    }
}
