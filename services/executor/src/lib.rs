//! The executor: runs jobs dispatched to its node, and plain jobs it takes straight from their
//! submissions while it has a free slot; streams their output, and reports how they ended. It
//! registers with the registry, heartbeats with the jobs it holds, and serves a micro endpoint
//! listing them.
//!
//! Module map: `membership` talks to the registry; `worker` pulls dispatches and submissions
//! and carries each attempt from claim to acknowledgement (its modules: `slots`, `pull`,
//! `take`, `attempt`, `control`, `held`);
//! `runner` supervises one process, with the secrets `secrets` opens for it, or hands a job on
//! a remote system to `remote`; `orphans` finds the job processes a crashed predecessor
//! left running, so a restarted executor can kill them; `systems` checks the health of remote
//! systems when the node is a gateway (`capstan.io/ssh=true`); [`error`] says why the executor
//! stopped when it was not asked to.

pub mod error;
mod membership;
mod metrics;
pub mod orphans;
pub mod remote;
pub mod runner;
pub mod secrets;
pub mod spawn;
pub mod systems;
mod worker;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::consumer::PullConsumer;
use capstan_mesh::config::parse_duration;
use capstan_mesh::{Error, Mesh, NatsArgs, service, task};
use capstan_protocol::subjects;
use capstan_protocol::topology;
use capstan_protocol::{InstanceId, JobId, Labels, NodeId};
use tokio_util::sync::CancellationToken;

use crate::membership::{Finished, Identity, Membership};
use crate::runner::Runner;
use crate::worker::Worker;

/// The executor's configuration.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "capstan-executor",
    version,
    about = "Capstan executor: runs jobs on this node"
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

    /// This node's id: stable across restarts, unique in the mesh. Default: the host name.
    #[arg(long, env = "CAPSTAN_NODE_ID")]
    pub node_id: Option<NodeId>,

    /// A label jobs can select on, `key=value`; repeat the flag, or separate with commas.
    #[arg(long = "label", env = "CAPSTAN_LABELS", value_delimiter = ',', value_parser = parse_label)]
    pub labels: Vec<(String, String)>,

    /// Jobs run at once.
    #[arg(long, env = "CAPSTAN_SLOTS", default_value_t = DEFAULT_SLOTS)]
    pub slots: u32,

    /// Directory for per-job working directories and process records.
    /// Default: a directory named after the node under the system's temporary directory.
    #[arg(long, env = "CAPSTAN_WORK_DIR")]
    pub work_dir: Option<PathBuf>,

    /// Output kept per attempt (stdout and stderr together), in bytes; the rest is counted.
    #[arg(long, env = "CAPSTAN_MAX_OUTPUT_BYTES", default_value_t = 1024 * 1024)]
    pub max_output_bytes: u64,

    /// Time between SIGTERM and SIGKILL when a job is stopped.
    #[arg(long, env = "CAPSTAN_KILL_GRACE", default_value = "5s", value_parser = parse_duration)]
    pub kill_grace: Duration,

    /// Time between SIGTERM and SIGKILL when a job is cancelled.
    #[arg(long, env = "CAPSTAN_CANCEL_GRACE", default_value = "500ms", value_parser = parse_duration)]
    pub cancel_grace: Duration,

    /// Heartbeat period.
    #[arg(long, env = "CAPSTAN_HEARTBEAT_INTERVAL", default_value = "2s", value_parser = parse_duration)]
    pub heartbeat_interval: Duration,

    /// On SIGTERM, how long running jobs may take to finish before they are stopped.
    #[arg(long, env = "CAPSTAN_SHUTDOWN_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub shutdown_timeout: Duration,

    /// Variables of the executor's environment passed to jobs (comma separated). Nothing else
    /// of the executor's environment reaches a job.
    #[arg(
        long,
        env = "CAPSTAN_PASS_ENV",
        value_delimiter = ',',
        default_values = DEFAULT_PASS_ENV
    )]
    pub pass_env: Vec<String>,

    /// How long a dispatch may go unacknowledged before JetStream redelivers it; running jobs
    /// are kept alive with progress acks.
    #[arg(long, env = "CAPSTAN_ACK_WAIT", default_value = "30s", value_parser = parse_duration)]
    pub ack_wait: Duration,

    /// How long an attempt's process runs before its `running` event is published. An attempt
    /// that ends sooner is announced by its outcome's event alone, whose record carries when
    /// and where it started; its job record says `running` from the claim on either way.
    /// `0s` announces every start at once.
    #[arg(long, env = "CAPSTAN_ANNOUNCE_AFTER", default_value = capstan_mesh::config::ANNOUNCE_AFTER, value_parser = parse_duration)]
    pub announce_after: Duration,

    /// Run jobs as this user (a name, a uid, or `uid:gid`), with its primary group and no
    /// other, so that a job cannot read the executor's NATS credentials or its `/proc` entries.
    /// Needs the executor to run as root; an executor running as root without it runs jobs
    /// as root, and says so at start.
    #[arg(long, env = "CAPSTAN_RUN_AS")]
    pub run_as: Option<String>,

    /// The keys opening job secrets: an attempt whose secrets cannot be opened here fails
    /// before its process starts.
    #[command(flatten)]
    pub secret_keys: capstan_secrets::SecretKeyArgs,

    /// On a gateway (label `capstan.io/ssh=true`): how often each remote system is checked
    /// (connect, verify the host key, log in, run `true`). Gateways share the checks.
    #[arg(long, env = "CAPSTAN_SYSTEM_CHECK_INTERVAL", default_value = "60s", value_parser = parse_duration)]
    pub system_check_interval: Duration,

    /// How long one check of a remote system may take before it counts as unreachable.
    #[arg(long, env = "CAPSTAN_SYSTEM_CHECK_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub system_check_timeout: Duration,
}

/// The jobs a node runs at once unless `--slots` says otherwise. Enough for the node to keep
/// work in flight under load, so that its messages to NATS and the server's replies travel in
/// batches: at 16, nats-server spent 13–24 % less CPU per job than at 8 and the executors a
/// few percent less (docs/BENCHMARKS.md, "Sixteen slots by default"). On an SSH gateway, the runs on one
/// system share kept connections of at most `capstan_remote::ssh::RUNS_PER_CONNECTION` each.
pub const DEFAULT_SLOTS: u32 = 16;

/// The variables of the executor's environment a job gets unless `--pass-env` says otherwise.
pub const DEFAULT_PASS_ENV: [&str; 8] = [
    "PATH", "HOME", "LANG", "LC_ALL", "TZ", "USER", "LOGNAME", "TMPDIR",
];

fn parse_label(text: &str) -> Result<(String, String), String> {
    let (key, value) = text
        .split_once('=')
        .ok_or_else(|| format!("label `{text}` is not key=value"))?;
    Ok((key.trim().to_owned(), value.trim().to_owned()))
}

impl Config {
    /// Defaults for `node`, pointing at `nats_url` (for tests and tools).
    pub fn for_url(nats_url: impl Into<String>, node: NodeId) -> Self {
        Self {
            nats: NatsArgs::for_url(nats_url),
            metrics: capstan_mesh::MetricsArgs::default(),
            runtime: capstan_mesh::RuntimeArgs::default(),
            node_id: Some(node),
            labels: Vec::new(),
            slots: DEFAULT_SLOTS,
            work_dir: None,
            max_output_bytes: 1024 * 1024,
            kill_grace: Duration::from_secs(5),
            cancel_grace: Duration::from_millis(500),
            heartbeat_interval: Duration::from_secs(2),
            shutdown_timeout: Duration::from_secs(30),
            pass_env: DEFAULT_PASS_ENV.map(str::to_owned).to_vec(),
            ack_wait: Duration::from_secs(30),
            announce_after: capstan_mesh::config::default_announce_after(),
            run_as: None,
            secret_keys: capstan_secrets::SecretKeyArgs::default(),
            system_check_interval: Duration::from_secs(60),
            system_check_timeout: Duration::from_secs(10),
        }
    }
}

/// Lets anyone pass through `dir` (search permission), without listing or writing it.
fn traversable(dir: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let mut permissions = std::fs::metadata(dir)?.permissions();
    permissions.set_mode(permissions.mode() | 0o011);
    std::fs::set_permissions(dir, permissions)
}

/// Resolves `--run-as` to the user and group jobs run as: a name looked up in the user
/// database, a uid (with the group of that uid's entry, or the uid itself), or `uid:gid`.
/// Refused unless the executor runs as root.
fn job_user(run_as: Option<&str>) -> Result<Option<runner::JobUser>, error::Error> {
    let root = nix::unistd::geteuid().is_root();
    let Some(text) = run_as.map(str::trim).filter(|t| !t.is_empty()) else {
        if root {
            tracing::warn!(
                "the executor runs as root and so do its jobs, which can read its NATS \
                 credentials: set CAPSTAN_RUN_AS to run them as another user"
            );
        }
        return Ok(None);
    };
    let refuse = |reason: &str| error::Error::RunAs {
        user: text.to_owned(),
        reason: reason.to_owned(),
    };
    if !root {
        return Err(refuse(
            "only an executor running as root can run jobs as another user",
        ));
    }
    let user = if let Some((uid, gid)) = text.split_once(':') {
        let uid = uid.parse().map_err(|_| refuse("not uid:gid"))?;
        let gid = gid.parse().map_err(|_| refuse("not uid:gid"))?;
        runner::JobUser { uid, gid }
    } else if let Ok(uid) = text.parse::<u32>() {
        let entry = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
            .map_err(|e| refuse(&e.to_string()))?;
        runner::JobUser {
            uid,
            gid: entry.map_or(uid, |user| user.gid.as_raw()),
        }
    } else {
        let entry = nix::unistd::User::from_name(text)
            .map_err(|e| refuse(&e.to_string()))?
            .ok_or_else(|| refuse("no such user"))?;
        runner::JobUser {
            uid: entry.uid.as_raw(),
            gid: entry.gid.as_raw(),
        }
    };
    if user.uid == 0 {
        return Err(refuse("that is root"));
    }
    if user.uid == u32::MAX || user.gid == u32::MAX {
        // To the kernel, -1 means "leave it as it is".
        return Err(refuse("-1 names no user or group"));
    }
    Ok(Some(user))
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|name| name.trim().to_owned())
        .ok()
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "localhost".to_owned())
}

/// Runs the executor until `shutdown`. On shutdown it stops pulling, lets running jobs finish
/// for `shutdown_timeout`, stops the rest (recording them as interrupted), and deregisters.
/// It stops by itself, with an error, when another instance takes its node over
/// ([`error::Error::Superseded`]) or the registry refuses it; a panic in one of its tasks is
/// raised again once the others have stopped.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), error::Error> {
    let hostname = hostname();
    let node = config
        .node_id
        .clone()
        .unwrap_or_else(|| NodeId::from_hostname(&hostname));
    let labels: Labels = config.labels.iter().cloned().collect();
    let gateway = systems::is_gateway(&labels);
    let run_as = job_user(config.run_as.as_deref())?;
    let secret_keys = config.secret_keys.load()?;
    let work_dir = config.work_dir.clone().unwrap_or_else(|| {
        std::env::temp_dir()
            .join("capstan-executor")
            .join(node.as_str())
    });
    std::fs::create_dir_all(&work_dir).map_err(|source| error::Error::WorkDir {
        path: work_dir.clone(),
        source,
    })?;
    if run_as.is_some() {
        // Jobs running as another user must reach their own directory below these.
        traversable(&work_dir).map_err(|source| error::Error::WorkDir {
            path: work_dir.clone(),
            source,
        })?;
    }
    let killed = orphans::reap(node.as_str(), &work_dir.join("jobs"));
    // Job directories a previous instance left behind (its processes are gone now).
    let _ = std::fs::remove_dir_all(work_dir.join("jobs"));
    if killed > 0 {
        tracing::warn!(
            killed,
            "killed processes left by this node's previous instance"
        );
    }

    let mesh = Mesh::connect(
        &config.nats,
        // A gateway's identity may read the systems' catalogue; a plain executor's may not.
        &capstan_protocol::access::Identity::executor(node.clone(), gateway),
        &shutdown,
    )
    .await?;
    let consumer = dispatch_consumer(&mesh, &node, &config, &shutdown).await?;
    let consumer_name = consumer.cached_info().name.clone();
    let instance = InstanceId::generate();
    let finished = Arc::new(Finished::default());
    let membership = Membership::new(
        mesh.client.clone(),
        Identity {
            node: node.clone(),
            instance,
            labels: labels.clone(),
            capacity: config.slots.max(1),
            hostname,
        },
        finished.clone(),
    );
    membership.register(&shutdown).await?;

    let capacity = usize::try_from(config.slots.max(1)).unwrap_or(1);
    let checker = gateway.then(|| systems::Checker {
        systems: mesh.systems.clone(),
        status: mesh.system_status.clone(),
        events: mesh.events.clone(),
        keys: secret_keys.clone(),
        node: node.clone(),
        interval: config.system_check_interval,
        timeout: config.system_check_timeout,
    });
    let remote = checker.clone().map(|checker| {
        Arc::new(remote::Remote {
            connector: capstan_remote::SshConnector::default()
                .connect_timeout(config.system_check_timeout)
                .observe(Arc::new(|connected| metrics::executor().ssh(connected))),
            checker,
        })
    });
    let worker = Arc::new(Worker::new(
        mesh.clone(),
        worker::Shape {
            node: node.clone(),
            instance,
            labels,
            capacity,
            max_job_bytes: config.nats.max_job_bytes,
            finished,
        },
        Runner {
            node: node.clone(),
            work_dir: work_dir.clone(),
            pass_env: config.pass_env.clone(),
            max_output_bytes: config.max_output_bytes,
            kill_grace: config.kill_grace,
            cancel_grace: config.cancel_grace,
            js: mesh.js.clone(),
            directories: Default::default(),
            run_as,
            secrets: crate::secrets::Secrets {
                keys: secret_keys.clone(),
                stored: mesh.secrets.clone(),
                events: mesh.events.clone(),
                node: node.clone(),
            },
            remote,
        },
        config.ack_wait,
        config.announce_after,
    ));

    let micro = service::start(
        &mesh.client,
        capstan_protocol::access::EXECUTOR_SERVICE,
        "Runs jobs on one node",
        HashMap::from([
            ("node".to_owned(), node.to_string()),
            ("instance".to_owned(), instance.to_string()),
            ("slots".to_owned(), config.slots.to_string()),
        ]),
    )
    .await?;
    let jobs_endpoint = service::endpoint(&micro, "jobs", &subjects::executor::jobs(&node)).await?;

    // `stop_pulling` ends the intake; `background` ends heartbeats and endpoints last.
    let stop_pulling = CancellationToken::new();
    let background = CancellationToken::new();
    let pulling = tokio::spawn(worker.clone().pull_until(
        consumer.clone(),
        worker::Source::Dispatches,
        stop_pulling.clone(),
    ));
    let taking = tokio::spawn({
        let (worker, mesh, stop) = (worker.clone(), mesh.clone(), stop_pulling.clone());
        async move {
            if let Some(submissions) = submissions_consumer(&mesh, &stop).await {
                worker.bound_submissions(submissions.cached_info().config.ack_wait);
                worker
                    .pull_until(submissions, worker::Source::Submissions, stop)
                    .await;
            }
        }
    });
    let availability = tokio::spawn(worker.clone().watch_availability(background.clone()));
    let cancellations = tokio::spawn(worker.clone().follow_cancellations(background.clone()));
    let checks = checker.map(|checker| tokio::spawn(checker.run(background.clone())));
    let endpoint = tokio::spawn({
        let worker = worker.clone();
        let rejections = (mesh.events.clone(), subjects::Origin::Dispatch);
        service::serve(
            jobs_endpoint,
            background.clone(),
            4,
            rejections,
            move |_: service::NoArgs| {
                let jobs: Vec<JobId> = worker.held_jobs();
                async move { Ok(jobs) }
            },
        )
    });
    let heartbeats = {
        let worker = worker.clone();
        let held: Arc<dyn Fn() -> Vec<JobId> + Send + Sync> = Arc::new(move || worker.held_jobs());
        membership.heartbeat_until(
            config.heartbeat_interval,
            held,
            consumer,
            background.clone(),
        )
    };
    let metrics_listener = match &config.metrics.metrics_listen {
        Some(listen) => {
            let busy: Arc<dyn Fn() -> usize + Send + Sync> = {
                let worker = worker.clone();
                Arc::new(move || worker.held_jobs().len())
            };
            let pooled = worker.pooled_connections();
            let exporter = metrics::exporter(&mesh, consumer_name, config.slots, busy, pooled);
            Some(
                Arc::new(exporter)
                    .serve(listen, background.clone())
                    .await?
                    .1,
            )
        }
        None => None,
    };
    tracing::info!(node = %node, instance = %instance, slots = config.slots, gateway, work_dir = %work_dir.display(), "executor ready");

    // Before shutdown, heartbeats end only with an error (the node taken over, or registering
    // again refused).
    let ended = tokio::select! {
        _ = shutdown.cancelled() => None,
        result = heartbeats => result.err(),
    };
    let superseded = matches!(ended, Some(error::Error::Superseded(_)));
    stop_pulling.cancel();
    let (pulled, took) = tokio::join!(pulling, taking);
    if let Some(error) = &ended {
        tracing::error!(error = %error, "stopping");
    }
    if superseded {
        // Another instance owns this node now: its jobs are not ours to finish.
        worker.stop_all();
    } else if !worker.wait_idle(config.shutdown_timeout).await {
        tracing::warn!(
            jobs = worker.held_jobs().len(),
            "shutdown timeout passed; stopping running jobs"
        );
        worker.stop_all();
    }
    worker
        .wait_idle(config.kill_grace + Duration::from_secs(10))
        .await;
    if !superseded {
        membership.deregister().await;
    }
    background.cancel();
    let (endpoint, cancellations, availability) =
        tokio::join!(endpoint, cancellations, availability);
    if let Some(listener) = metrics_listener {
        task::joined(listener.await);
    }
    if let Some(checks) = checks {
        task::joined(checks.await);
    }
    if let Err(error) = micro.stop().await {
        tracing::debug!(error = %error, "stopping the micro service");
    }
    // Pulls still open on the server would take dispatches for an instance that is gone (and
    // hand them back, each time counting a delivery); draining the connection ends them.
    if let Err(error) = mesh.client.drain().await {
        tracing::debug!(error = %error, "draining the connection");
    }
    // The attempts are settled and the node left; a task that panicked raises its panic now
    // rather than passing for a clean stop.
    for result in [pulled, took, endpoint, cancellations, availability] {
        task::joined(result);
    }
    match ended {
        Some(error) => Err(error),
        None => {
            tracing::info!("executor stopped");
            Ok(())
        }
    }
}

async fn dispatch_consumer(
    mesh: &Mesh,
    node: &NodeId,
    config: &Config,
    shutdown: &CancellationToken,
) -> Result<PullConsumer, Error> {
    let spec = topology::ConsumerSpec {
        ack_wait: config.ack_wait,
        ..topology::executor_consumer_spec(node, config.slots)
    };
    capstan_mesh::consume::durable(&mesh.js, &spec, shutdown).await
}

/// The submissions consumer the executors share with the schedulers, once a scheduler (or
/// the mesh's setup) has created it: executors read it as it is and never reconfigure it.
/// `None` at `stop`.
async fn submissions_consumer(mesh: &Mesh, stop: &CancellationToken) -> Option<PullConsumer> {
    let spec = topology::scheduler_consumer();
    let mut told = false;
    loop {
        let bound = async {
            let stream = mesh
                .js
                .get_stream_no_info(spec.stream)
                .await
                .map_err(|e| e.to_string())?;
            stream
                .get_consumer::<async_nats::jetstream::consumer::pull::Config>(&spec.name)
                .await
                .map_err(|e| e.to_string())
        }
        .await;
        match bound {
            Ok(consumer) => {
                tracing::debug!("taking submissions");
                return Some(consumer);
            }
            Err(error) => {
                if !told {
                    tracing::info!(error = %error, "no submissions consumer yet: running dispatched jobs only until a scheduler creates it");
                    told = true;
                }
                tokio::select! {
                    _ = stop.cancelled() => return None,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_and_the_library_give_an_executor_the_same_defaults() {
        // The defaults the command line declares, whatever the environment running the test
        // sets.
        let command = <Config as clap::CommandFactory>::command();
        let default_of = |id: &str| -> Vec<String> {
            command
                .get_arguments()
                .find(|arg| arg.get_id() == id)
                .unwrap_or_else(|| panic!("no argument {id}"))
                .get_default_values()
                .iter()
                .map(|value| value.to_string_lossy().into_owned())
                .collect()
        };
        let built = Config::for_url(
            "nats://127.0.0.1:4222",
            "node-1".parse().expect("a node id"),
        );
        assert_eq!(default_of("slots"), [DEFAULT_SLOTS.to_string()]);
        assert_eq!(built.slots, DEFAULT_SLOTS);
        assert_eq!(default_of("pass_env"), built.pass_env);
    }

    #[test]
    fn run_as_refuses_an_id_of_minus_one_which_the_kernel_reads_as_unchanged() {
        for text in ["4294967295:100", "100:4294967295"] {
            let refused = job_user(Some(text)).expect_err("-1 is no id");
            let error::Error::RunAs { reason, .. } = refused else {
                panic!("not a run-as refusal: {refused}");
            };
            // Anyone but root is refused before the ids are read.
            if nix::unistd::geteuid().is_root() {
                assert_eq!(reason, "-1 names no user or group", "{text}");
            }
        }
        if nix::unistd::geteuid().is_root() {
            assert_eq!(
                job_user(Some("100:100")).expect("a plain id"),
                Some(runner::JobUser { uid: 100, gid: 100 })
            );
        }
    }
}
