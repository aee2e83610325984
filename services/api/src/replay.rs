//! Reading what one subject of a stream holds right now, in order: a job's output from the
//! logs stream, or the events of a job that the history has not recorded yet.
//!
//! Each read is an ordered consumer, created for it and gone with it, so reads take no
//! durable state on the server and any number of API replicas may read at once.

use std::time::Duration;

use async_nats::jetstream::consumer::{DeliverPolicy, pull};
use async_nats::jetstream::stream::Stream;
use capstan_mesh::Mesh;
use futures::StreamExt;

use crate::problem::ApiError;

/// How long one message may take to arrive before a read gives up.
const PATIENCE: Duration = Duration::from_secs(10);

/// The stream named `name`.
pub(crate) async fn stream(mesh: &Mesh, name: &str) -> Result<Stream, ApiError> {
    mesh.js
        .get_stream(name)
        .await
        .map_err(|e| ApiError::unavailable(format!("stream {name}: {e}")))
}

/// An ordered consumer of `filter` on the stream `name` from `from`, and how many messages
/// it had pending when it was created (the ones stored so far).
pub(crate) async fn ordered(
    mesh: &Mesh,
    name: &str,
    filter: String,
    from: DeliverPolicy,
) -> Result<(pull::Ordered, u64), ApiError> {
    let consumer = stream(mesh, name)
        .await?
        .create_consumer(pull::OrderedConfig {
            filter_subject: filter,
            deliver_policy: from,
            ..Default::default()
        })
        .await
        .map_err(|e| ApiError::unavailable(format!("consumer on {name}: {e}")))?;
    let pending = consumer.cached_info().num_pending;
    let messages = consumer
        .messages()
        .await
        .map_err(|e| ApiError::unavailable(format!("reading {name}: {e}")))?;
    Ok((messages, pending))
}

/// Every message of `filter` on the stream `name` from `from` that was stored when the read
/// began, in order.
pub(crate) async fn stored(
    mesh: &Mesh,
    name: &str,
    filter: String,
    from: DeliverPolicy,
) -> Result<Vec<async_nats::jetstream::Message>, ApiError> {
    let (mut messages, pending) = ordered(mesh, name, filter, from).await?;
    let mut read = Vec::new();
    if pending == 0 {
        return Ok(read);
    }
    loop {
        let message = match tokio::time::timeout(PATIENCE, messages.next()).await {
            Ok(Some(Ok(message))) => message,
            Ok(Some(Err(error))) => {
                return Err(ApiError::unavailable(format!("reading {name}: {error}")));
            }
            Ok(None) | Err(_) => {
                return Err(ApiError::unavailable(format!("reading {name} timed out")));
            }
        };
        let left = message.info().map(|info| info.pending).unwrap_or(0);
        read.push(message);
        if left == 0 {
            return Ok(read);
        }
    }
}
