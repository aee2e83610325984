//! What keeps open pages current: one follower of the events stream per API replica, whose
//! hints (a job or a node changed) reach every open page over server-sent events, and the
//! mesh's health shown in every page's header.
//!
//! A hint carries only what changed and its kind, read from the event's subject; the page
//! then asks the dashboard again for the parts it shows, through the API and its
//! permissions. A forged event can at worst make a page reload a fragment.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use capstan_mesh::Mesh;
use capstan_protocol::{access, subjects, topology};
use futures::StreamExt;
use serde::Serialize;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

/// How many hints wait for a slow page before it is told to catch up as a whole.
const HINTS_BUFFERED: usize = 1024;
/// How long a page's stream stays open before the browser reconnects (and so is
/// authenticated again): a revoked session stops receiving within this time.
pub const STREAM_LIFETIME: Duration = Duration::from_secs(600);
/// How long the mesh's health is reused before the services are counted again.
const HEALTH_KEPT: Duration = Duration::from_secs(5);
/// How long the services are given to answer a count.
const PING_WINDOW: Duration = Duration::from_millis(250);

/// Something changed.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Hint {
    /// `job` or `node`.
    pub topic: &'static str,
    /// The job's or node's id.
    pub id: String,
    /// The event's kind (`running`, `succeeded`, `down`, …).
    pub kind: String,
}

impl Hint {
    /// The hint of an event stored on `subject`, if it is a job's or a node's.
    pub fn of(subject: &str) -> Option<Self> {
        if let Some((job, kind)) = subjects::parse_job_event(subject) {
            return Some(Self {
                topic: "job",
                id: job.to_string(),
                kind: kind.to_owned(),
            });
        }
        subjects::parse_node_event(subject).map(|(node, kind)| Self {
            topic: "node",
            id: node.to_owned(),
            kind: kind.to_owned(),
        })
    }
}

/// The replica's follower of the events stream, started by the first page that listens.
pub struct Live {
    mesh: Mesh,
    shutdown: CancellationToken,
    sender: broadcast::Sender<Hint>,
    started: std::sync::Once,
    health: Mutex<Option<(Instant, Arc<Health>)>>,
    counting: AtomicBool,
}

impl Live {
    /// A follower for `mesh`, stopping with `shutdown`.
    pub fn new(mesh: Mesh, shutdown: CancellationToken) -> Self {
        Self {
            mesh,
            shutdown,
            sender: broadcast::channel(HINTS_BUFFERED).0,
            started: std::sync::Once::new(),
            health: Mutex::new(None),
            counting: AtomicBool::new(false),
        }
    }

    /// The hints from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Hint> {
        self.started.call_once(|| {
            let (mesh, sender, shutdown) = (
                self.mesh.clone(),
                self.sender.clone(),
                self.shutdown.clone(),
            );
            tokio::spawn(async move {
                tokio::select! {
                    () = follow(mesh, sender) => {}
                    () = shutdown.cancelled() => {}
                }
            });
        });
        self.sender.subscribe()
    }

    /// The mesh's health: NATS, and how many replicas of each service answer. Counting takes
    /// a quarter of a second, so a page is never kept waiting for it but the first: once
    /// the last count is older than a few seconds, it is shown while a new one is made in
    /// the background.
    pub async fn health(self: &Arc<Self>) -> Arc<Health> {
        let known = self
            .health
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        match known {
            Some((at, health)) => {
                if at.elapsed() >= HEALTH_KEPT && !self.counting.swap(true, Ordering::AcqRel) {
                    let live = self.clone();
                    tokio::spawn(async move {
                        live.count().await;
                        live.counting.store(false, Ordering::Release);
                    });
                }
                health
            }
            None => self.count().await,
        }
    }

    /// Counts the services now.
    async fn count(&self) -> Arc<Health> {
        let client = &self.mesh.client;
        let connected = client.connection_state() == async_nats::connection::State::Connected;
        let names = [
            ("registry", access::REGISTRY_SERVICE),
            ("scheduler", access::SCHEDULER_SERVICE),
            ("executor", access::EXECUTOR_SERVICE),
            ("api", access::API_SERVICE),
        ];
        let counts = futures::future::join_all(names.iter().map(|(_, service)| {
            capstan_mesh::service::count_instances(client, service, PING_WINDOW)
        }))
        .await;
        let health = Arc::new(Health {
            nats: connected,
            services: names
                .iter()
                .zip(counts)
                .map(|((label, _), count)| (*label, count.ok()))
                .collect(),
        });
        *self
            .health
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) =
            Some((Instant::now(), health.clone()));
        health
    }
}

/// The mesh as the header shows it.
#[derive(Debug)]
pub struct Health {
    /// Whether this replica is connected to NATS.
    pub nats: bool,
    /// Each service's replicas that answered; `None` when they could not be counted.
    pub services: Vec<(&'static str, Option<usize>)>,
}

/// Follows the events stream from its end, forever: an ordered consumer, created again after
/// a failure with a growing pause.
async fn follow(mesh: Mesh, sender: broadcast::Sender<Hint>) {
    use async_nats::jetstream::consumer::{DeliverPolicy, pull};
    let mut pause = Duration::from_millis(200);
    loop {
        let messages = async {
            let stream = mesh
                .js
                .get_stream(topology::EVENTS.name)
                .await
                .map_err(|e| e.to_string())?;
            let consumer = stream
                .create_consumer(pull::OrderedConfig {
                    filter_subject: subjects::EVENTS_ALL.to_owned(),
                    deliver_policy: DeliverPolicy::New,
                    ..Default::default()
                })
                .await
                .map_err(|e| e.to_string())?;
            consumer.messages().await.map_err(|e| e.to_string())
        }
        .await;
        match messages {
            Ok(mut messages) => {
                pause = Duration::from_millis(200);
                while let Some(message) = messages.next().await {
                    let Ok(message) = message else { break };
                    if let Some(hint) = Hint::of(&message.subject) {
                        // No page listening is not an error.
                        let _ = sender.send(hint);
                    }
                }
            }
            Err(error) => {
                tracing::warn!(error = %error, "the dashboard cannot follow the events stream; retrying");
            }
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs(10));
    }
}

#[cfg(test)]
mod tests {
    use capstan_protocol::{JobEventKind, JobId, NodeEventKind, NodeId};

    use super::*;

    #[test]
    fn a_hint_names_the_job_or_node_and_the_kind_from_the_subject() {
        let job = JobId::generate();
        let hint = Hint::of(&subjects::job_event(job, JobEventKind::Succeeded)).expect("a job's");
        assert_eq!((hint.topic, hint.kind.as_str()), ("job", "succeeded"));
        assert_eq!(hint.id, job.to_string());
        let node = NodeId::new("exec-1").expect("valid");
        let hint = Hint::of(&subjects::node_event(&node, NodeEventKind::Down)).expect("a node's");
        assert_eq!((hint.topic, hint.id.as_str()), ("node", "exec-1"));
        let system =
            subjects::system_event("db-1", capstan_protocol::system::SystemHealth::Healthy);
        assert_eq!(Hint::of(&system), None);
    }
}
