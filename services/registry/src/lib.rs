//! The registry: executor nodes register with their labels and capacity, heartbeat, and are
//! marked down when they go silent for longer than the heartbeat timeout.
//!
//! Node state lives in the nodes KV bucket, which any service reads; the registry is its only
//! writer, and every write is a compare-and-swap, so several registry replicas can serve the
//! same mesh: requests are spread over them by the micro service's queue group, and each
//! replica sweeps for silent nodes, the CAS deciding which one records (and announces) a node
//! going down.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::service::Service;
use capstan_mesh::config::parse_duration;
use capstan_mesh::shutdown::Stop;
use capstan_mesh::{BucketView, Change, Error, EventPublisher, Mesh, Modified, NatsArgs, service};
use capstan_protocol::node::NodeQuery;
use capstan_protocol::spec::validate_labels;
use capstan_protocol::subjects::{self, Origin, registry::NodeCall};
use capstan_protocol::{
    Availability, ErrorCode, Heartbeat, HeartbeatReply, NodeCommand, NodeEvent, NodeEventKind,
    NodeId, NodeRecord, NodeStatus, Registration, Rejection, RejectionCode, ServiceError,
    Timestamp,
};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio_util::sync::CancellationToken;

mod metrics;
pub mod tally;

/// The registry's configuration.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "capstan-registry",
    version,
    about = "Capstan registry: executor nodes, heartbeats, liveness"
)]
pub struct Config {
    /// NATS connection.
    #[command(flatten)]
    pub nats: NatsArgs,

    /// Where to serve metrics and health.
    #[command(flatten)]
    pub metrics: capstan_mesh::MetricsArgs,

    /// How many threads run its tasks.
    #[command(flatten)]
    pub runtime: capstan_mesh::RuntimeArgs,

    /// A node that has not heartbeated for this long is marked down.
    #[arg(long, env = "CAPSTAN_HEARTBEAT_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub heartbeat_timeout: Duration,

    /// How often to look for silent nodes.
    #[arg(long, env = "CAPSTAN_SWEEP_INTERVAL", default_value = "1s", value_parser = parse_duration)]
    pub sweep_interval: Duration,
}

impl Config {
    /// Defaults, pointing at `nats_url` (for tests and tools).
    pub fn for_url(nats_url: impl Into<String>) -> Self {
        Self {
            nats: NatsArgs::for_url(nats_url),
            metrics: capstan_mesh::MetricsArgs::default(),
            runtime: capstan_mesh::RuntimeArgs::default(),
            heartbeat_timeout: Duration::from_secs(10),
            sweep_interval: Duration::from_secs(1),
        }
    }
}

/// How long a drain lets running jobs finish when the request names no deadline.
pub const DEFAULT_DRAIN_DEADLINE_SECS: u64 = 300;

/// The longest drain deadline.
pub const MAX_DRAIN_DEADLINE_SECS: u64 = 7 * 24 * 3600;

/// The most job slots a node may announce.
pub const MAX_CAPACITY: u32 = 10_000;

/// Runs the registry until `shutdown` is cancelled.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), Error> {
    let mesh = Mesh::connect(
        &config.nats,
        &capstan_protocol::access::Identity::Registry,
        &shutdown,
    )
    .await?;
    // The tally's consumer failing for good stops the registry, loudly.
    let stop = Stop::new(&shutdown);
    let shutdown = stop.token().clone();
    let view = BucketView::start(mesh.nodes.clone(), shutdown.clone()).await?;
    let metrics_listener = match &config.metrics.metrics_listen {
        Some(listen) => {
            let exporter = Arc::new(metrics::exporter(&mesh, view.clone()));
            Some(exporter.serve(listen, shutdown.clone()).await?.1)
        }
        None => None,
    };
    let registry = Arc::new(Registry {
        mesh: mesh.clone(),
        view,
        config: config.clone(),
        started: Instant::now(),
    });

    let micro = service::start(
        &mesh.client,
        capstan_protocol::access::REGISTRY_SERVICE,
        "Executor nodes: registration, heartbeats, liveness",
        HashMap::from([(
            "heartbeat_timeout_ms".to_owned(),
            config.heartbeat_timeout.as_millis().to_string(),
        )]),
    )
    .await?;
    let endpoints = Endpoints {
        micro: &micro,
        registry: registry.clone(),
        shutdown: shutdown.clone(),
        rejections: (mesh.events.clone(), Origin::Registry),
    };
    let register = endpoints
        .serve_node(NodeCall::Register, 64, Registry::register)
        .await?;
    let heartbeat = endpoints
        .serve_node(NodeCall::Heartbeat, 64, Registry::heartbeat)
        .await?;
    let deregister = endpoints
        .serve_node(NodeCall::Deregister, 16, Registry::deregister)
        .await?;
    let list = endpoints
        .serve(
            "nodes-list",
            subjects::registry::NODES_LIST,
            16,
            |r, _: service::NoArgs| r.list(),
        )
        .await?;
    let get = endpoints
        .serve(
            "nodes-get",
            subjects::registry::NODES_GET,
            16,
            Registry::get,
        )
        .await?;
    let cordon = endpoints
        .serve(
            "nodes-cordon",
            subjects::registry::NODES_CORDON,
            16,
            |r, command| r.set_availability(command, Availability::Cordoned),
        )
        .await?;
    let uncordon = endpoints
        .serve(
            "nodes-uncordon",
            subjects::registry::NODES_UNCORDON,
            16,
            |r, command| r.set_availability(command, Availability::Active),
        )
        .await?;
    let drain = endpoints
        .serve(
            "nodes-drain",
            subjects::registry::NODES_DRAIN,
            16,
            |r, command| r.set_availability(command, Availability::Draining),
        )
        .await?;
    tracing::info!(heartbeat_timeout = ?config.heartbeat_timeout, "registry ready");

    tokio::join!(
        register,
        heartbeat,
        deregister,
        list,
        get,
        cordon,
        uncordon,
        drain,
        registry.sweep_until(shutdown.clone()),
        stop.watch(tally::run(mesh.clone(), shutdown.clone())),
    );
    if let Err(error) = micro.stop().await {
        tracing::debug!(error = %error, "stopping the micro service");
    }
    if let Some(listener) = metrics_listener {
        capstan_mesh::task::joined(listener.await);
    }
    tracing::info!("registry stopped");
    stop.outcome()
}

/// The registry's micro-service endpoints, each added and served by one [`Endpoints::serve`].
struct Endpoints<'a> {
    micro: &'a Service,
    registry: Arc<Registry>,
    shutdown: CancellationToken,
    rejections: (EventPublisher, Origin),
}

impl Endpoints<'_> {
    /// Adds the endpoint `name` on `subject` and returns its serving, which runs until
    /// shutdown: each request, decoded, goes to `handle` with the registry, up to
    /// `concurrency` at once (see [`service::serve`]).
    async fn serve<Req, Res, Fut>(
        &self,
        name: &str,
        subject: &str,
        concurrency: usize,
        handle: impl Fn(Arc<Registry>, Req) -> Fut + Send + Sync,
    ) -> Result<impl Future<Output = ()>, Error>
    where
        Req: DeserializeOwned + Send + 'static,
        Res: Serialize + Send + 'static,
        Fut: Future<Output = Result<Res, ServiceError>> + Send,
    {
        let endpoint = service::endpoint(self.micro, name, subject).await?;
        let registry = self.registry.clone();
        Ok(service::serve(
            endpoint,
            self.shutdown.clone(),
            concurrency,
            self.rejections.clone(),
            move |request| handle(registry.clone(), request),
        ))
    }

    /// Adds the endpoint of a node's `call` about itself, on the call's subject for every
    /// node, and returns its serving. A request whose body names another node than its
    /// subject does (which the server's permissions let only that node's identity publish
    /// to) is refused as forged and published as a rejection; the named node is untouched.
    async fn serve_node<Req, Res, Fut>(
        &self,
        call: NodeCall,
        concurrency: usize,
        handle: impl Fn(Arc<Registry>, Req) -> Fut + Send + Sync,
    ) -> Result<impl Future<Output = ()>, Error>
    where
        Req: DeserializeOwned + ForNode + Send + 'static,
        Res: Serialize + Send + 'static,
        Fut: Future<Output = Result<Res, ServiceError>> + Send,
    {
        let endpoint = service::endpoint(self.micro, call.as_str(), &call.subject_all()).await?;
        let registry = self.registry.clone();
        let handle = Arc::new(handle);
        let events = self.rejections.0.clone();
        Ok(service::serve_on(
            endpoint,
            self.shutdown.clone(),
            concurrency,
            self.rejections.clone(),
            move |request: Req, subject| {
                let (registry, events, handle) = (registry.clone(), events.clone(), handle.clone());
                async move {
                    let caller = call.node_of(&subject);
                    if caller.as_ref() != Some(request.node()) {
                        let reason = format!(
                            "a {} for node {} made on {subject}: a node may act only for itself",
                            call.as_str(),
                            request.node()
                        );
                        tracing::warn!(subject, node = %request.node(), "forged node call refused");
                        let rejection = Rejection::new(
                            subject.clone(),
                            0,
                            RejectionCode::Forged,
                            Some("node".to_owned()),
                            reason,
                        );
                        events.rejection(Origin::Registry, &rejection).await;
                        return Err(ServiceError::from(&rejection));
                    }
                    handle(registry, request).await
                }
            },
        ))
    }
}

/// A node's request about itself.
trait ForNode {
    /// The node it is about.
    fn node(&self) -> &NodeId;
}

impl ForNode for Registration {
    fn node(&self) -> &NodeId {
        &self.node
    }
}

impl ForNode for Heartbeat {
    fn node(&self) -> &NodeId {
        &self.node
    }
}

struct Registry {
    mesh: Mesh,
    view: BucketView<NodeRecord>,
    config: Config,
    started: Instant,
}

fn unavailable(error: Error) -> ServiceError {
    ServiceError::new(ErrorCode::Unavailable, error.to_string())
}

/// The answer to a change of a node's record that failed: `kept_changing` when it lost every
/// compare-and-swap, unavailable otherwise.
fn not_changed(error: Error, kept_changing: &str) -> ServiceError {
    match error {
        Error::KeptChanging { .. } => ServiceError::new(ErrorCode::Conflict, kept_changing),
        error => unavailable(error),
    }
}

/// What a failed change of a node's record answers when it lost every compare-and-swap.
const KEPT_CHANGING: &str = "the node's record kept changing";

fn bad_request(field: &str, message: impl Into<String>) -> ServiceError {
    ServiceError {
        code: ErrorCode::BadRequest,
        message: message.into(),
        field: Some(field.to_owned()),
    }
}

impl Registry {
    async fn register(
        self: Arc<Self>,
        registration: Registration,
    ) -> Result<NodeRecord, ServiceError> {
        if registration.capacity == 0 || registration.capacity > MAX_CAPACITY {
            return Err(bad_request(
                "capacity",
                format!("must be between 1 and {MAX_CAPACITY}"),
            ));
        }
        validate_labels("labels", &registration.labels)
            .map_err(|e| bad_request(&e.field, e.reason))?;
        if registration.version.len() > 64 || registration.hostname.len() > 255 {
            return Err(bad_request("version", "version or hostname too long"));
        }
        let key = registration.node.to_string();
        let registered = self
            .mesh
            .nodes
            .modify(&key, |current| {
                let now = Timestamp::now();
                Change::<_, Infallible>::Write(NodeRecord {
                    id: registration.node.clone(),
                    instance: registration.instance,
                    labels: registration.labels.clone(),
                    capacity: registration.capacity,
                    version: registration.version.clone(),
                    hostname: registration.hostname.clone(),
                    status: NodeStatus::Up,
                    registered_at: now,
                    last_heartbeat_at: now,
                    jobs: Vec::new(),
                    queued: 0,
                    // The node's tally and the operator's availability outlive its instances.
                    finished: current
                        .map(|c| c.value.finished.clone())
                        .unwrap_or_default(),
                    availability: current.map(|c| c.value.availability).unwrap_or_default(),
                    drain_deadline: current.and_then(|c| c.value.drain_deadline),
                })
            })
            .await
            .map_err(|e| not_changed(e, "the node's record kept changing; register again"))?;
        let (record, previous) = match registered {
            Modified::Written { written, previous } => (written.value, previous),
            Modified::Stopped(never) => match never {},
        };
        if let Some(previous) = previous.filter(|p| p.value.instance != record.instance) {
            tracing::info!(
                node = %record.id,
                instance = %record.instance,
                previous = %previous.value.instance,
                "node registered by a new instance"
            );
        } else {
            tracing::info!(node = %record.id, instance = %record.instance, capacity = record.capacity, "node registered");
        }
        self.announce(NodeEventKind::Registered, &record).await;
        Ok(record)
    }

    async fn heartbeat(self: Arc<Self>, beat: Heartbeat) -> Result<HeartbeatReply, ServiceError> {
        metrics::registry().heartbeat();
        let key = beat.node.to_string();
        let beaten = self
            .mesh
            .nodes
            .modify(&key, |current| {
                let Some(current) = current else {
                    return Change::Stop(HeartbeatReply::UnknownNode);
                };
                if current.value.instance != beat.instance {
                    return Change::Stop(HeartbeatReply::Superseded);
                }
                if current.value.status == NodeStatus::Left {
                    return Change::Stop(HeartbeatReply::UnknownNode);
                }
                let mut record = NodeRecord {
                    status: NodeStatus::Up,
                    last_heartbeat_at: Timestamp::now(),
                    jobs: beat.jobs.clone(),
                    queued: beat.queued,
                    ..current.value.clone()
                };
                record.finished.merge(&beat.finished);
                // A draining node that holds nothing and has nothing queued is drained.
                if current.value.availability == Availability::Draining
                    && beat.jobs.is_empty()
                    && beat.queued == 0
                {
                    record.availability = Availability::Drained;
                    record.drain_deadline = None;
                }
                Change::Write(record)
            })
            .await
            .map_err(|e| not_changed(e, KEPT_CHANGING))?;
        let (record, previous) = match beaten {
            Modified::Stopped(reply) => return Ok(reply),
            Modified::Written { written, previous } => (written.value, previous.map(|p| p.value)),
        };
        if previous
            .as_ref()
            .is_some_and(|p| p.status == NodeStatus::Down)
        {
            tracing::info!(node = %record.id, "node is heartbeating again");
            self.announce(NodeEventKind::Up, &record).await;
        }
        if record.availability == Availability::Drained
            && previous
                .as_ref()
                .is_some_and(|p| p.availability == Availability::Draining)
        {
            tracing::info!(node = %record.id, "node drained");
            self.announce(NodeEventKind::Drained, &record).await;
        }
        Ok(HeartbeatReply::Ok)
    }

    async fn deregister(self: Arc<Self>, beat: Heartbeat) -> Result<NodeRecord, ServiceError> {
        let key = beat.node.to_string();
        let left = self
            .mesh
            .nodes
            .modify(&key, |current| {
                let Some(current) = current else {
                    return Change::Stop(not_found(&key));
                };
                if current.value.instance != beat.instance {
                    return Change::Stop(ServiceError::new(
                        ErrorCode::Conflict,
                        format!("node {key} is registered by another instance"),
                    ));
                }
                let mut record = NodeRecord {
                    status: NodeStatus::Left,
                    last_heartbeat_at: Timestamp::now(),
                    jobs: Vec::new(),
                    queued: 0,
                    ..current.value.clone()
                };
                record.finished.merge(&beat.finished);
                Change::Write(record)
            })
            .await
            .map_err(|e| not_changed(e, KEPT_CHANGING))?;
        match left {
            Modified::Written { written, .. } => {
                let record = written.value;
                tracing::info!(node = %record.id, "node deregistered");
                self.announce(NodeEventKind::Deregistered, &record).await;
                Ok(record)
            }
            Modified::Stopped(error) => Err(error),
        }
    }

    /// Sets a node's availability, as an operator asked.
    async fn set_availability(
        self: Arc<Self>,
        command: NodeCommand,
        availability: Availability,
    ) -> Result<NodeRecord, ServiceError> {
        let key = command.node.to_string();
        let deadline = match availability {
            Availability::Draining => {
                let secs = command.deadline_secs.unwrap_or(DEFAULT_DRAIN_DEADLINE_SECS);
                if secs > MAX_DRAIN_DEADLINE_SECS {
                    return Err(bad_request(
                        "deadline_secs",
                        format!("must be at most {MAX_DRAIN_DEADLINE_SECS} seconds"),
                    ));
                }
                Some(Timestamp::now().plus(Duration::from_secs(secs)))
            }
            _ => None,
        };
        let set = self
            .mesh
            .nodes
            .modify(&key, |current| {
                let Some(current) = current else {
                    return Change::Stop(Err(not_found(&key)));
                };
                let target = match (availability, current.value.availability) {
                    // Draining a drained node leaves it drained.
                    (Availability::Draining, Availability::Drained) => Availability::Drained,
                    (target, _) => target,
                };
                if current.value.availability == target && target != Availability::Draining {
                    return Change::Stop(Ok(current.value.clone()));
                }
                Change::Write(NodeRecord {
                    availability: target,
                    drain_deadline: if target == Availability::Draining {
                        deadline
                    } else {
                        None
                    },
                    ..current.value.clone()
                })
            })
            .await
            .map_err(|e| not_changed(e, KEPT_CHANGING))?;
        let record = match set {
            Modified::Written { written, .. } => written.value,
            Modified::Stopped(unchanged) => return unchanged,
        };
        let kind = match record.availability {
            Availability::Active => NodeEventKind::Uncordoned,
            Availability::Cordoned => NodeEventKind::Cordoned,
            Availability::Draining => NodeEventKind::Draining,
            Availability::Drained => NodeEventKind::Drained,
        };
        tracing::info!(node = %record.id, availability = record.availability.as_str(), "node availability set");
        self.announce(kind, &record).await;
        Ok(record)
    }

    async fn list(self: Arc<Self>) -> Result<Vec<NodeRecord>, ServiceError> {
        let mut nodes: Vec<NodeRecord> = self
            .mesh
            .nodes
            .values()
            .await
            .map_err(unavailable)?
            .into_iter()
            .map(|versioned| versioned.value)
            .collect();
        nodes.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(nodes)
    }

    async fn get(self: Arc<Self>, query: NodeQuery) -> Result<NodeRecord, ServiceError> {
        let key = query.node.to_string();
        match self.mesh.nodes.get(&key).await.map_err(unavailable)? {
            Some(versioned) => Ok(versioned.value),
            None => Err(not_found(&key)),
        }
    }

    async fn sweep_until(&self, shutdown: CancellationToken) {
        let mut ticker = tokio::time::interval(self.config.sweep_interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = ticker.tick() => {}
            }
            // Heartbeats sent while no registry ran were lost: give every node one full timeout
            // after start before judging it.
            if self.started.elapsed() < self.config.heartbeat_timeout {
                continue;
            }
            self.sweep().await;
        }
    }

    /// Marks down every up node silent for longer than the timeout. Replicas sweep
    /// concurrently; the CAS lets one of them record and announce each change.
    async fn sweep(&self) {
        let now = Timestamp::now();
        let silent: Vec<_> = self
            .view
            .values()
            .into_iter()
            .filter(|node| {
                node.value.status == NodeStatus::Up
                    && now.since(node.value.last_heartbeat_at) > self.config.heartbeat_timeout
            })
            .collect();
        for node in silent {
            let key = node.value.id.to_string();
            let record = NodeRecord {
                status: NodeStatus::Down,
                ..node.value
            };
            match self.mesh.nodes.update(&key, &record, node.revision).await {
                Ok(_) => {
                    tracing::warn!(
                        node = %record.id,
                        silent_for_ms = now.since(record.last_heartbeat_at).as_millis() as u64,
                        "node missed its heartbeats: marked down"
                    );
                    self.announce(NodeEventKind::Down, &record).await;
                }
                // A heartbeat or another replica got there first.
                Err(Error::Conflict { .. }) => {}
                Err(error) => tracing::warn!(node = %key, error = %error, "cannot mark node down"),
            }
        }
    }

    async fn announce(&self, kind: NodeEventKind, record: &NodeRecord) {
        metrics::registry().event(kind.as_str());
        let event = NodeEvent {
            kind,
            at: Timestamp::now(),
            node: record.clone(),
        };
        if let Err(error) = self.mesh.events.node(&event).await {
            tracing::warn!(node = %record.id, kind = %kind, error = %error, "cannot publish node event");
        }
    }
}

fn not_found(key: &str) -> ServiceError {
    ServiceError {
        code: ErrorCode::NotFound,
        message: format!("no node `{key}`"),
        field: Some("node".into()),
    }
}
