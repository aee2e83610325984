//! Connecting to NATS and opening the mesh: topology ensured, typed stores opened.

use std::time::Duration;

use async_nats::jetstream;
use capstan_protocol::topology;
use capstan_protocol::{JobRecord, NodeRecord, Revocation};
use tokio_util::sync::CancellationToken;

use crate::error::Error;
use crate::events::EventPublisher;
use crate::store::Bucket;
use crate::submit::Idempotency;

/// Connects to NATS as `name`, retrying with backoff until it succeeds or `shutdown` fires.
/// Once connected, the client reconnects by itself for as long as the process lives.
pub async fn connect(
    url: &str,
    name: &str,
    shutdown: &CancellationToken,
) -> Result<async_nats::Client, Error> {
    let mut delay = Duration::from_millis(100);
    loop {
        let options = async_nats::ConnectOptions::new()
            .name(name)
            .connection_timeout(Duration::from_secs(5))
            .max_reconnects(None)
            .event_callback(|event| async move {
                match event {
                    async_nats::Event::Connected => tracing::info!("connected to NATS"),
                    async_nats::Event::Disconnected => tracing::warn!("disconnected from NATS"),
                    other => tracing::debug!(event = %other, "NATS client event"),
                }
            });
        match options.connect(url).await {
            Ok(client) => return Ok(client),
            Err(error) => {
                tracing::warn!(url, error = %error, retry_in_ms = delay.as_millis() as u64, "cannot connect to NATS");
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return Err(Error::ShuttingDown),
            _ = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(Duration::from_secs(5));
    }
}

/// A connected mesh: the client, JetStream, and the typed buckets.
#[derive(Clone, Debug)]
pub struct Mesh {
    /// The core client.
    pub client: async_nats::Client,
    /// JetStream.
    pub js: jetstream::Context,
    /// Job records by job id.
    pub jobs: Bucket<JobRecord>,
    /// Node records by node id.
    pub nodes: Bucket<NodeRecord>,
    /// Idempotency reservations.
    pub idempotency: Idempotency,
    /// Revoked users, sessions and API tokens (written and watched by the API).
    pub revocations: Bucket<Revocation>,
    /// Event and audit publishing.
    pub events: EventPublisher,
}

impl Mesh {
    /// Ensures the topology on `client`'s server and opens the buckets.
    pub async fn open(client: async_nats::Client) -> Result<Self, Error> {
        let js = jetstream::new(client.clone());
        let buckets = crate::topology::ensure(&js).await?;
        let jobs = Bucket::new(buckets.jobs, js.clone(), topology::JOBS.name);
        let nodes = Bucket::new(buckets.nodes, js.clone(), topology::NODES.name);
        let idempotency = Idempotency::new(
            Bucket::new(buckets.idempotency, js.clone(), topology::IDEMPOTENCY.name),
            jobs.clone(),
        );
        let revocations = Bucket::new(buckets.revocations, js.clone(), topology::REVOCATIONS.name);
        Ok(Self {
            client,
            events: EventPublisher::new(js.clone()),
            revocations,
            js,
            jobs,
            nodes,
            idempotency,
        })
    }

    /// Connects (retrying until `shutdown`) and opens the mesh.
    pub async fn connect(
        url: &str,
        name: &str,
        shutdown: &CancellationToken,
    ) -> Result<Self, Error> {
        let client = connect(url, name, shutdown).await?;
        Self::open(client).await
    }
}
