//! The scheduler: accepts job submissions, places each job on an executor whose labels match
//! and who has room, and dispatches it.
//!
//! Replicas share one durable consumer on the submissions stream, so each submission is
//! handled by one replica at a time; everything a replica does with it is keyed by the job id
//! and guarded by compare-and-swap on the job's KV record, so a submission redelivered after a
//! crash resumes where the crash left it instead of creating or dispatching twice.
//!
//! Module map: [`cluster`] knows the nodes and their load and makes the placement decision;
//! [`waiting`] holds jobs that found no room; `intake` consumes submissions; `timers` wakes
//! delayed and retried jobs when their durable timer fires; `lost` settles the attempts of
//! nodes that went down or restarted; `placer` places waiting jobs as room appears and follows
//! job events; `create` serves the request/reply endpoint; `fanouts` accepts fan-out parents
//! and carries them forward as their targets' jobs end; `schedules` runs the ticks of
//! schedules; `slots` admits jobs under their concurrency limits; `workflows` carries
//! workflows forward as their steps' jobs end.

pub mod cluster;
mod create;
mod fanouts;
mod intake;
mod lost;
mod metrics;
mod placer;
mod schedules;
mod slots;
mod timers;
pub mod waiting;
mod workflows;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use capstan_mesh::config::parse_duration;
use capstan_mesh::shutdown::Stop;
use capstan_mesh::{BucketView, Error, Mesh, NatsArgs, Submitter, service, task};
use capstan_protocol::reply::Cancelled;
use capstan_protocol::subjects::ClientCall;
use capstan_protocol::{
    AuditAction, AuditOutcome, ErrorCode, JobId, JobRef, ServiceError, SubmittedBy, subjects,
};
use tokio::sync::{Notify, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::cluster::Cluster;
use crate::waiting::Waiting;

/// The scheduler's configuration.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "capstan-scheduler",
    version,
    about = "Capstan scheduler: accepts jobs and places them on executors"
)]
pub struct Config {
    /// NATS connection and submission limits.
    #[command(flatten)]
    pub nats: NatsArgs,

    /// Where to serve metrics and health.
    #[command(flatten)]
    pub metrics: capstan_mesh::MetricsArgs,

    /// How many threads run its tasks.
    #[command(flatten)]
    pub runtime: capstan_mesh::RuntimeArgs,

    /// Submissions processed at once by this replica.
    #[arg(long, env = "CAPSTAN_SCHEDULER_CONCURRENCY", default_value_t = 256)]
    pub concurrency: usize,

    /// Most jobs this replica holds while they wait for an executor with room; beyond it,
    /// submissions wait in the stream.
    #[arg(long, env = "CAPSTAN_MAX_WAITING", default_value_t = 10_000)]
    pub max_waiting: usize,

    /// Jobs given to a node at once, as a multiple of its slots (running plus queued at the
    /// node, so it starts the next job without waiting for the scheduler).
    #[arg(long, env = "CAPSTAN_DISPATCH_DEPTH", default_value_t = 2.0)]
    pub dispatch_depth: f64,

    /// How long a delivered submission may go unacknowledged before JetStream gives it to
    /// another replica. Held submissions are kept alive with progress acks.
    #[arg(long, env = "CAPSTAN_ACK_WAIT", default_value = "30s", value_parser = parse_duration)]
    pub ack_wait: Duration,

    /// The same, on the consumer of the submitted subjects that executors share: a job an
    /// executor took from its submission and died with, after the heartbeat that last listed
    /// it, is found when its submission comes back after this long. Executors keep the
    /// submissions they run alive with progress acks at a third of it.
    #[arg(long, env = "CAPSTAN_SUBMISSION_ACK_WAIT", default_value = "10s", value_parser = parse_duration)]
    pub submission_ack_wait: Duration,

    /// How long an assignment may be missing from its node's heartbeats before it stops
    /// counting against the node.
    #[arg(long, env = "CAPSTAN_ASSIGNMENT_GRACE", default_value = "10s", value_parser = parse_duration)]
    pub assignment_grace: Duration,

    /// How long a placed job may go without ending before its placement is announced: the
    /// `dispatched` event of a job placed after waiting (for room, or for its timer), and,
    /// after half as long, the `pending` event of one placed as it is created (so that it
    /// comes before the executor's `running`). A job that ends sooner is announced by its
    /// outcome's event, whose record names its node; a job that waits for room is announced
    /// at once. `0s` announces every placement at once.
    #[arg(long, env = "CAPSTAN_ANNOUNCE_AFTER", default_value = capstan_mesh::config::ANNOUNCE_AFTER, value_parser = parse_duration)]
    pub announce_after: Duration,
}

impl Config {
    /// Defaults, pointing at `nats_url` (for tests and tools).
    pub fn for_url(nats_url: impl Into<String>) -> Self {
        Self {
            nats: NatsArgs::for_url(nats_url),
            metrics: capstan_mesh::MetricsArgs::default(),
            runtime: capstan_mesh::RuntimeArgs::default(),
            concurrency: 256,
            max_waiting: 10_000,
            dispatch_depth: 2.0,
            ack_wait: Duration::from_secs(30),
            submission_ack_wait: capstan_protocol::topology::SUBMISSION_ACK_WAIT,
            assignment_grace: Duration::from_secs(10),
            announce_after: capstan_mesh::config::default_announce_after(),
        }
    }
}

/// Shared state of one scheduler replica.
pub(crate) struct Scheduler {
    mesh: Mesh,
    config: Config,
    cluster: Cluster,
    waiting: Waiting,
    /// Wakes the placer: a job ended, a node changed, a placement failed.
    wake: Notify,
    /// Wakes the admission of jobs waiting for a concurrency slot.
    gate: Notify,
    /// Bounds submissions handled at once.
    permits: Arc<Semaphore>,
    /// The fan-out parents this replica carries forward.
    fanouts: fanouts::FanOuts,
    /// What this replica heard of the workflows' steps.
    workflows: workflows::Workflows,
    /// The remote systems' catalogue (for the zone a job on a system prefers).
    systems: BucketView<capstan_protocol::System>,
}

impl Scheduler {
    /// The labels `spec` prefers its node to carry: for a job on a remote system whose
    /// catalogue entry has a zone label, gateways in that zone.
    pub(crate) fn preferred(&self, spec: &capstan_protocol::JobSpec) -> capstan_protocol::Labels {
        spec.system
            .as_deref()
            .and_then(|name| self.systems.get(name))
            .map(|system| system.value.zone_preference())
            .unwrap_or_default()
    }
}

/// Runs a scheduler replica until `shutdown` is cancelled. On shutdown it stops taking
/// submissions, finishes the ones in hand, and hands back the jobs still waiting for room.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), Error> {
    let mesh = Mesh::connect(
        &config.nats,
        &capstan_protocol::access::Identity::Scheduler,
        &shutdown,
    )
    .await?;
    // A consumer that cannot be created stops the whole replica, loudly.
    let stop = Stop::new(&shutdown);
    let shutdown = stop.token().clone();
    // Background tasks stop with `tasks`, after the intake has drained.
    let tasks = CancellationToken::new();
    let nodes = BucketView::start(mesh.nodes.clone(), tasks.clone()).await?;
    let systems = BucketView::start(mesh.systems.clone(), tasks.clone()).await?;
    let slots = BucketView::start(mesh.concurrency.clone(), tasks.clone()).await?;
    if !nodes.wait_ready(Duration::from_secs(5)).await {
        tracing::warn!("node view incomplete after 5s; placing with what is known");
    }
    let scheduler = Arc::new(Scheduler {
        cluster: Cluster::new(
            nodes.clone(),
            config.dispatch_depth,
            config.assignment_grace,
        ),
        waiting: Waiting::default(),
        wake: Notify::new(),
        gate: Notify::new(),
        permits: Arc::new(Semaphore::new(config.concurrency.max(1))),
        fanouts: fanouts::FanOuts::default(),
        workflows: workflows::Workflows::default(),
        systems,
        mesh: mesh.clone(),
        config: config.clone(),
    });

    let micro = service::start(
        &mesh.client,
        capstan_protocol::access::SCHEDULER_SERVICE,
        "Accepts jobs and places them on executors",
        HashMap::new(),
    )
    .await?;
    let create = service::endpoint(&micro, "create", subjects::CREATE).await?;
    let cancel = service::endpoint(&micro, "cancel", subjects::CANCEL).await?;
    // The clients' calls, each on a subject naming the client (see `ClientCall`).
    let create_from =
        service::endpoint(&micro, "create-from", &ClientCall::Create.from_all()).await?;
    let cancel_from =
        service::endpoint(&micro, "cancel-from", &ClientCall::Cancel.from_all()).await?;
    let submitter = Submitter::new(mesh.js.clone(), mesh.idempotency.clone());

    let events = tokio::spawn(scheduler.clone().follow_events(tasks.clone()));
    let placer = tokio::spawn(scheduler.clone().place_waiting(nodes, tasks.clone()));
    let fanouts = tokio::spawn(scheduler.clone().carry_fanouts(tasks.clone()));
    let workflows = tokio::spawn(scheduler.clone().carry_workflows(tasks.clone()));
    let timers = tokio::spawn({
        let stop = stop.clone();
        let timers = scheduler.clone().consume_timers(shutdown.clone());
        async move { stop.watch(timers).await }
    });
    let lost = tokio::spawn({
        let stop = stop.clone();
        let lost = scheduler.clone().consume_node_events(shutdown.clone());
        async move { stop.watch(lost).await }
    });
    let ticks = tokio::spawn({
        let stop = stop.clone();
        let ticks = scheduler
            .clone()
            .consume_ticks(submitter.clone(), shutdown.clone());
        async move { stop.watch(ticks).await }
    });
    let sweep = tokio::spawn(scheduler.clone().sweep_schedules(tasks.clone()));
    let gate = tokio::spawn(scheduler.clone().admit_gated(slots, tasks.clone()));
    let create = tokio::spawn({
        let (submitter, events, shutdown) =
            (submitter.clone(), mesh.events.clone(), shutdown.clone());
        let max = config.nats.max_job_bytes;
        async move {
            tokio::join!(
                create::serve(create, &submitter, &events, max, shutdown.clone()),
                create::serve(create_from, &submitter, &events, max, shutdown),
            );
        }
    });
    let cancel = tokio::spawn({
        let (mesh, shutdown) = (mesh.clone(), shutdown.clone());
        async move {
            let serve = |endpoint| {
                service::serve_on(
                    endpoint,
                    shutdown.clone(),
                    64,
                    (mesh.events.clone(), subjects::Origin::Create),
                    |job: JobRef, subject: String| {
                        let mesh = mesh.clone();
                        async move { cancel_job(&mesh, job, &subject).await }
                    },
                )
            };
            tokio::join!(serve(cancel), serve(cancel_from));
        }
    });
    let metrics_listener = match &config.metrics.metrics_listen {
        Some(listen) => {
            let waiting: Arc<dyn Fn() -> usize + Send + Sync> = {
                let scheduler = scheduler.clone();
                Arc::new(move || scheduler.waiting.len())
            };
            let exporter = Arc::new(metrics::exporter(&mesh, waiting));
            Some(exporter.serve(listen, tasks.clone()).await?.1)
        }
        None => None,
    };
    tracing::info!("scheduler ready");

    stop.watch(scheduler.clone().consume(shutdown.clone()))
        .await;
    let (create, cancel, timers, lost, ticks) = tokio::join!(create, cancel, timers, lost, ticks);
    scheduler.hand_back_waiting().await;
    tasks.cancel();
    let (events, placer, fanouts, workflows, sweep, gate) =
        tokio::join!(events, placer, fanouts, workflows, sweep, gate);
    if let Some(listener) = metrics_listener {
        task::joined(listener.await);
    }
    if let Err(error) = micro.stop().await {
        tracing::debug!(error = %error, "stopping the micro service");
    }
    // Every task has been waited for and the waiting jobs handed back; a task that panicked
    // raises its panic now rather than passing for a clean stop.
    for result in [
        create, cancel, timers, lost, ticks, events, placer, fanouts, workflows, sweep, gate,
    ] {
        task::joined(result);
    }
    tracing::info!("scheduler stopped");
    stop.outcome()
}

/// Cancels `job`, asked on `subject`; a client's cancel is audited under its name.
async fn cancel_job(mesh: &Mesh, job: JobRef, subject: &str) -> Result<Cancelled, ServiceError> {
    let cancelled = cancel_job_now(mesh, job.id).await;
    if let Some(client) = ClientCall::Cancel.client_of(subject) {
        let outcome = match &cancelled {
            Ok(_) => AuditOutcome::Success,
            Err(error) if error.code == ErrorCode::Unavailable => AuditOutcome::Error,
            Err(_) => AuditOutcome::Failure,
        };
        // The cancel has happened: it is answered even if its record could not be stored
        // (the failure is logged).
        let _ = mesh
            .events
            .audit_client(
                AuditAction::JobCancel,
                &SubmittedBy::nats_client(client),
                job.id,
                outcome,
                None,
            )
            .await;
    }
    cancelled
}

async fn cancel_job_now(mesh: &Mesh, job: JobId) -> Result<Cancelled, ServiceError> {
    use capstan_mesh::lifecycle::{CancelError, cancel};
    match cancel(mesh, job).await {
        // Not a job: perhaps a fan-out parent.
        Err(CancelError::NotFound(_)) => match capstan_mesh::fanout::cancel(mesh, job).await {
            Ok(Some((record, true))) => Ok(Cancelled {
                outcome: capstan_protocol::CancelOutcome::Requested,
                status: record.status.job_status(),
            }),
            Ok(Some((record, false))) => Err(ServiceError::new(
                ErrorCode::Conflict,
                format!(
                    "fan-out {job} was cancelled already or has ended: {}",
                    record.status.as_str()
                ),
            )),
            Ok(None) => Err(ServiceError {
                code: ErrorCode::NotFound,
                message: CancelError::NotFound(job).to_string(),
                field: Some("id".into()),
            }),
            Err(error) => Err(ServiceError::new(ErrorCode::Unavailable, error.to_string())),
        },
        Ok((outcome, record)) => Ok(Cancelled {
            outcome,
            status: record.status,
        }),
        Err(error @ CancelError::Finished { .. }) => {
            Err(ServiceError::new(ErrorCode::Conflict, error.to_string()))
        }
        Err(CancelError::Mesh(error)) => {
            Err(ServiceError::new(ErrorCode::Unavailable, error.to_string()))
        }
    }
}
