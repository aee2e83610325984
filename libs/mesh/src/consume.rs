//! Consuming a durable pull consumer in batches: a batch starts with the first message to
//! arrive and lingers a few milliseconds for more, so a busy stream is handled hundreds of
//! messages at a time and an idle one with no added delay beyond the linger.
//!
//! The handler acknowledges; this loop only pulls, and re-subscribes after interruptions
//! (a NATS restart, an expired pull) until `shutdown`.

use std::future::Future;
use std::time::Duration;

use async_nats::jetstream::{Message, consumer::PullConsumer, consumer::pull, stream::Stream};
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

/// Creates (or updates) the durable consumer `config` on `stream`, retrying every second while
/// NATS cannot; `None` when `shutdown` comes first.
pub async fn durable(
    js: &async_nats::jetstream::Context,
    stream: &str,
    config: pull::Config,
    shutdown: &CancellationToken,
) -> Option<PullConsumer> {
    loop {
        let created = async {
            let stream: Stream = js.get_stream(stream).await.map_err(|e| e.to_string())?;
            stream
                .create_consumer(config.clone())
                .await
                .map_err(|e| e.to_string())
        }
        .await;
        match created {
            Ok(consumer) => return Some(consumer),
            Err(error) => {
                tracing::warn!(
                    consumer = config.durable_name.as_deref().unwrap_or(""),
                    error = %error,
                    "cannot create a consumer, retrying"
                );
                tokio::select! {
                    _ = shutdown.cancelled() => return None,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        }
    }
}

/// Pulls from `consumer` until `shutdown`, handing `handle` batches of at most `max` messages,
/// each gathered for at most `linger` after its first message.
pub async fn batches<F, Fut>(
    consumer: &PullConsumer,
    max: usize,
    linger: Duration,
    shutdown: &CancellationToken,
    mut handle: F,
) where
    F: FnMut(Vec<Message>) -> Fut,
    Fut: Future<Output = ()>,
{
    while !shutdown.is_cancelled() {
        let messages = consumer
            .stream()
            .max_messages_per_batch(max)
            .heartbeat(Duration::from_secs(5))
            .expires(Duration::from_secs(30))
            .messages()
            .await;
        let mut messages = match messages {
            Ok(messages) => messages,
            Err(error) => {
                tracing::warn!(error = %error, "cannot pull, retrying");
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                }
            }
        };
        loop {
            let first = tokio::select! {
                _ = shutdown.cancelled() => return,
                first = messages.next() => first,
            };
            let mut received = Vec::with_capacity(max);
            match first {
                Some(Ok(message)) => received.push(message),
                Some(Err(error)) => {
                    tracing::debug!(error = %error, "pull interrupted");
                    continue;
                }
                None => break,
            }
            let mut ended = false;
            let deadline = tokio::time::Instant::now() + linger;
            while received.len() < max {
                match tokio::time::timeout_at(deadline, messages.next()).await {
                    Ok(Some(Ok(message))) => received.push(message),
                    Ok(Some(Err(error))) => tracing::debug!(error = %error, "pull interrupted"),
                    Ok(None) => {
                        ended = true;
                        break;
                    }
                    Err(_) => break,
                }
            }
            handle(received).await;
            if ended {
                break;
            }
        }
    }
}
