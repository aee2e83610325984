//! Consuming a durable pull consumer: creating it from its
//! [`ConsumerSpec`](capstan_protocol::topology::ConsumerSpec), pulling with re-subscription
//! after interruptions (a NATS restart, an expired pull) until shutdown, and the two ways the
//! services handle what arrives: in batches ([`batches`]: a batch starts with the first
//! message to arrive and lingers a few milliseconds for more, so a busy stream is handled
//! hundreds of messages at a time and an idle one with no added delay beyond the linger), or
//! one message at a time ([`Pull::next`]).
//!
//! The handler acknowledges; this module only pulls.

use std::future::Future;
use std::time::Duration;

use async_nats::jetstream::ErrorCode;
use async_nats::jetstream::stream::ConsumerErrorKind;
use async_nats::jetstream::{Message, consumer::PullConsumer, consumer::pull};
use capstan_protocol::topology::ConsumerSpec;
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use crate::error::{BoxError, Error};

/// How many times in a row the server may refuse a consumer's configuration before the
/// refusal is taken as final: a few, because a refusal can come from a passing state (a
/// replica racing to create the same consumer, a stream being updated).
const REFUSALS: u32 = 3;

/// Creates (or updates) the durable consumer `spec`, retrying every second while NATS cannot
/// answer. Fails with [`Error::Setup`] when the server keeps refusing the configuration (an
/// existing consumer of that name that cannot become this one), and with
/// [`Error::ShuttingDown`] when `shutdown` comes first: a service cannot do its work without
/// its consumers, so either way it should stop.
pub async fn durable(
    js: &async_nats::jetstream::Context,
    spec: &ConsumerSpec,
    shutdown: &CancellationToken,
) -> Result<PullConsumer, Error> {
    let config = crate::topology::consumer_config(spec);
    let mut refusals = 0;
    loop {
        let created = async {
            let stream = js.get_stream(spec.stream).await.map_err(|e| {
                let refused = matches!(
                    e.kind(),
                    async_nats::jetstream::context::GetStreamErrorKind::JetStream(_)
                );
                (refused, BoxError::from(e))
            })?;
            stream.create_consumer(config.clone()).await.map_err(|e| {
                let refused = match e.kind() {
                    ConsumerErrorKind::JetStream(error) => !passing(error.error_code()),
                    ConsumerErrorKind::InvalidConsumerType | ConsumerErrorKind::InvalidName => true,
                    _ => false,
                };
                (refused, BoxError::from(e))
            })
        }
        .await;
        match created {
            Ok(consumer) => return Ok(consumer),
            Err((refused, reason)) => {
                refusals = if refused { refusals + 1 } else { 0 };
                if refusals >= REFUSALS {
                    return Err(Error::setup(
                        format!("consumer {} on {}", spec.name, spec.stream),
                        reason,
                    ));
                }
                tracing::warn!(
                    consumer = %spec.name,
                    error = %reason,
                    "cannot create a consumer, retrying"
                );
                tokio::select! {
                    _ = shutdown.cancelled() => return Err(Error::ShuttingDown),
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        }
    }
}

/// Whether a JetStream API error is the server's passing state rather than its judgement of
/// the configuration.
fn passing(code: ErrorCode) -> bool {
    [
        ErrorCode::CLUSTER_NOT_ACTIVE,
        ErrorCode::CLUSTER_NOT_ASSIGNED,
        ErrorCode::CLUSTER_NOT_AVAILABLE,
        ErrorCode::CLUSTER_NOT_LEADER,
        ErrorCode::CONSUMER_OFFLINE,
        ErrorCode::INSUFFICIENT_RESOURCES,
    ]
    .contains(&code)
}

/// A pull subscription that survives interruptions: it subscribes again after an expired
/// pull, a server restart or a pull error, until shutdown.
pub struct Pull<'a> {
    consumer: &'a PullConsumer,
    max: usize,
    shutdown: &'a CancellationToken,
    messages: Option<pull::Stream>,
    /// The priority group and the priority the pulls name, on a consumer that has one.
    group: Option<(&'static str, usize)>,
}

impl<'a> Pull<'a> {
    /// Pulls from `consumer`, asking for at most `max` messages at a time.
    pub fn new(consumer: &'a PullConsumer, max: usize, shutdown: &'a CancellationToken) -> Self {
        Self {
            consumer,
            max: max.max(1),
            shutdown,
            messages: None,
            group: None,
        }
    }

    /// Pulls in priority group `group` at `priority` (the server serves the lowest priority
    /// asking first).
    pub fn in_group(mut self, group: &'static str, priority: usize) -> Self {
        self.group = Some((group, priority));
        self
    }

    /// The next message; `None` once `shutdown` is cancelled.
    pub async fn next(&mut self) -> Option<Message> {
        loop {
            if self.shutdown.is_cancelled() {
                return None;
            }
            let messages = match &mut self.messages {
                Some(messages) => messages,
                None => {
                    let mut builder = self
                        .consumer
                        .stream()
                        .max_messages_per_batch(self.max)
                        .heartbeat(Duration::from_secs(5))
                        .expires(Duration::from_secs(30));
                    if let Some((group, priority)) = self.group {
                        builder = builder.group(group).priority(priority);
                    }
                    let subscribed = builder.messages().await;
                    match subscribed {
                        Ok(messages) => self.messages.insert(messages),
                        Err(error) => {
                            tracing::warn!(error = %error, "cannot pull, retrying");
                            tokio::select! {
                                _ = self.shutdown.cancelled() => return None,
                                _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                            }
                        }
                    }
                }
            };
            let next = tokio::select! {
                _ = self.shutdown.cancelled() => return None,
                next = messages.next() => next,
            };
            match next {
                Some(Ok(message)) => {
                    crate::metrics::mesh().delivered(self.consumer, &message);
                    return Some(message);
                }
                Some(Err(error)) => {
                    tracing::debug!(error = %error, "pull interrupted, subscribing again");
                    self.messages = None;
                }
                None => self.messages = None,
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
    let mut pull = Pull::new(consumer, max, shutdown);
    while let Some(first) = pull.next().await {
        let mut received = Vec::with_capacity(max);
        received.push(first);
        let deadline = tokio::time::Instant::now() + linger;
        while received.len() < max {
            match tokio::time::timeout_at(deadline, pull.next()).await {
                Ok(Some(message)) => received.push(message),
                // Shutting down: handle what arrived, then stop.
                Ok(None) | Err(_) => break,
            }
        }
        handle(received).await;
    }
}
