//! This node's membership in the mesh: registering with the registry, heartbeating, and
//! leaving. The registry is reached only through its NATS endpoints. Each heartbeat carries
//! the attempts this instance ran to an end since the last one the registry answered
//! ([`Finished`]), which the registry adds to the node's tally.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::consumer::PullConsumer;
use capstan_protocol::subjects::registry::NodeCall;
use capstan_protocol::{
    ErrorCode, Heartbeat, HeartbeatReply, InstanceId, JobId, JobRecord, Labels, NodeId, NodeRecord,
    NodeTally, Registration, TalliedBy,
};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio_util::sync::CancellationToken;

use crate::error::Error;

/// What this node tells the registry about itself.
#[derive(Debug, Clone)]
pub struct Identity {
    /// The node.
    pub node: NodeId,
    /// This process.
    pub instance: InstanceId,
    /// Its labels.
    pub labels: Labels,
    /// Its slots.
    pub capacity: u32,
    /// The host.
    pub hostname: String,
}

/// The attempts this instance ran to an end that the registry has not been told of yet: the
/// node's share of its tally ([`TalliedBy::Node`]), sent with the next heartbeat.
#[derive(Debug, Default)]
pub struct Finished(std::sync::Mutex<NodeTally>);

impl Finished {
    /// Counts the attempt whose outcome `record` was just written by this node, when the
    /// node is the one to count it.
    pub fn count(&self, record: &JobRecord) {
        let ended = record.attempt_status.unwrap_or(record.status);
        if TalliedBy::of(ended) != Some(TalliedBy::Node) {
            return;
        }
        let at = record.finished_at.unwrap_or(record.updated_at);
        self.lock().count(record.id, ended, at);
    }

    /// What is counted and not yet delivered. It stays counted until [`Finished::delivered`]
    /// says the registry stored it, so a heartbeat dropped at shutdown loses nothing.
    fn pending(&self) -> NodeTally {
        self.lock().clone()
    }

    /// Takes out what the registry stored (`sent`); what was counted meanwhile stays.
    fn delivered(&self, sent: &NodeTally) {
        let mut counted = self.lock();
        counted.succeeded = counted.succeeded.saturating_sub(sent.succeeded);
        counted.failed = counted.failed.saturating_sub(sent.failed);
        counted.timed_out = counted.timed_out.saturating_sub(sent.timed_out);
        counted.cancelled = counted.cancelled.saturating_sub(sent.cancelled);
        counted.lost = counted.lost.saturating_sub(sent.lost);
        if counted.last_finished_at == sent.last_finished_at {
            counted.last_job = None;
            counted.last_finished_at = None;
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, NodeTally> {
        // A poisoned counter still counts: the tally is at least once anyway.
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Talks to the registry for this node.
pub struct Membership {
    client: async_nats::Client,
    identity: Identity,
    finished: Arc<Finished>,
}

impl Membership {
    /// Membership of `identity` over `client`; its heartbeats report what `finished` counts.
    pub fn new(client: async_nats::Client, identity: Identity, finished: Arc<Finished>) -> Self {
        Self {
            client,
            identity,
            finished,
        }
    }

    /// Registers, retrying while no registry answers, until it succeeds or `shutdown` fires.
    /// Returns [`Error::Refused`] when the registry refuses the node itself, and the mesh's
    /// `ShuttingDown` when `shutdown` came first.
    pub async fn register(&self, shutdown: &CancellationToken) -> Result<NodeRecord, Error> {
        let registration = Registration {
            node: self.identity.node.clone(),
            instance: self.identity.instance,
            labels: self.identity.labels.clone(),
            capacity: self.identity.capacity,
            version: capstan_protocol::VERSION.to_owned(),
            hostname: self.identity.hostname.clone(),
        };
        let mut delay = Duration::from_millis(200);
        loop {
            match self
                .request::<_, NodeRecord>(
                    &NodeCall::Register.subject(&registration.node),
                    &registration,
                )
                .await
            {
                Ok(Ok(record)) => {
                    tracing::info!(node = %record.id, instance = %record.instance, "registered");
                    return Ok(record);
                }
                Ok(Err(refusal)) if refusal.code == ErrorCode::BadRequest => {
                    return Err(Error::Refused(refusal));
                }
                Ok(Err(error)) => tracing::warn!(error = %error, "registration failed, retrying"),
                Err(error) => tracing::warn!(error = %error, "no registry answered, retrying"),
            }
            tokio::select! {
                _ = shutdown.cancelled() => return Err(capstan_mesh::Error::ShuttingDown.into()),
                _ = tokio::time::sleep(delay) => {}
            }
            delay = (delay * 2).min(Duration::from_secs(5));
        }
    }

    /// Heartbeats every `interval` until `shutdown`, reporting the jobs `held` returns and the
    /// dispatches waiting on `consumer`. Re-registers when the registry has forgotten this
    /// node (returning the refusal if that fails); returns [`Error::Superseded`] when another
    /// instance took it over.
    pub async fn heartbeat_until(
        &self,
        interval: Duration,
        held: Arc<dyn Fn() -> Vec<JobId> + Send + Sync>,
        mut consumer: PullConsumer,
        shutdown: CancellationToken,
    ) -> Result<(), Error> {
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                _ = ticker.tick() => {}
            }
            let queued = match consumer.info().await {
                Ok(info) => info.num_pending,
                Err(_) => 0,
            };
            let beat = Heartbeat {
                node: self.identity.node.clone(),
                instance: self.identity.instance,
                jobs: held(),
                queued,
                finished: self.finished.pending(),
            };
            let reply = self
                .request::<_, HeartbeatReply>(&NodeCall::Heartbeat.subject(&beat.node), &beat)
                .await;
            // Anything else, and the count goes again with the next heartbeat.
            if matches!(reply, Ok(Ok(HeartbeatReply::Ok))) {
                self.finished.delivered(&beat.finished);
            }
            match reply {
                Ok(Ok(HeartbeatReply::Ok)) => {}
                Ok(Ok(HeartbeatReply::UnknownNode)) => {
                    tracing::warn!("the registry does not know this node; registering again");
                    match self.register(&shutdown).await {
                        Ok(_) => {}
                        Err(Error::Mesh(capstan_mesh::Error::ShuttingDown)) => return Ok(()),
                        Err(error) => return Err(error),
                    }
                }
                Ok(Ok(HeartbeatReply::Superseded)) => {
                    return Err(Error::Superseded(self.identity.node.clone()));
                }
                Ok(Err(error)) => tracing::warn!(error = %error, "heartbeat refused"),
                Err(error) => tracing::warn!(error = %error, "heartbeat not answered"),
            }
        }
    }

    /// Tells the registry this node is leaving, with the last of its count. Best effort: a
    /// deregistration that goes unanswered loses that count.
    pub async fn deregister(&self) {
        let beat = Heartbeat {
            node: self.identity.node.clone(),
            instance: self.identity.instance,
            jobs: Vec::new(),
            queued: 0,
            finished: self.finished.pending(),
        };
        match self
            .request::<_, NodeRecord>(&NodeCall::Deregister.subject(&beat.node), &beat)
            .await
        {
            Ok(Ok(_)) => {
                self.finished.delivered(&beat.finished);
                tracing::info!("deregistered");
            }
            Ok(Err(error)) => tracing::warn!(error = %error, "deregistration refused"),
            Err(error) => tracing::warn!(error = %error, "deregistration not answered"),
        }
    }

    async fn request<T: Serialize, R: DeserializeOwned>(
        &self,
        subject: &str,
        body: &T,
    ) -> Result<Result<R, capstan_protocol::ServiceError>, String> {
        capstan_mesh::service::call(&self.client, subject, body, Duration::from_secs(5))
            .await
            .map_err(|e| e.to_string())
    }
}
