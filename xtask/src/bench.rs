//! `cargo xtask bench`: measures a fresh mesh built in release mode.
//!
//! The pipeline runs the mesh `cargo xtask up --release` runs (the same [`crate::up::Plan`]),
//! with two executors at `up`'s default slots, and a client on NATS. The client is what a
//! user's application would be: built optimised (xtask's profile in the workspace's
//! `Cargo.toml`) and run on one thread, so that its share of the cores it competes for with
//! the mesh is what publishing and reading the events cost:
//! - Throughput: N `/bin/true` jobs (`argv`, no shell) published with at most 64 awaiting
//!   JetStream's acknowledgement; the clock runs from the first publish to the last terminal
//!   event. Repeated (3 runs by default); how far the SQL history lagged is reported beside.
//! - Latency: jobs sent one at a time on an idle mesh; submit → the job's `succeeded` event.
//! - CPU: seconds of CPU every process used during the throughput runs, per job: nats-server,
//!   each service, the job processes (the executors' reaped children) and the client.
//! - Where each job's time went, by stage, from the timestamps its terminal event's record
//!   carries, and how busy the machine's cores were in each run (`/proc/stat`).
//! - Messages and stored writes per job, as nats-server counts them: these do not change with
//!   the machine's speed, so a step that removes work shows here even when the timings are
//!   noisy.
//! - The floor, in the same run: `/bin/true` spawned with what a job gets, as many at a time
//!   as the mesh has slots, by this process alone (on a runtime of two threads): through the
//!   standard library's `posix_spawn` right after each throughput run, each run read against
//!   its own; and at the end through both that and the executors' own `spawn`. The aim's
//!   1,600 jobs/s was set on a machine whose floor was about 2,300 spawns/s; each run is
//!   reported as a share of the floor beside it, against that 0.70.
//! - Celery on Redis, measured the same way in the same run (`xtask/celery/run.sh` installs it).
//! - History queries (`--history-rows`): `GET /api/v1/jobs?status=…` against a database
//!   seeded with that many jobs, then reads from concurrent clients at one API runtime thread
//!   and at one per core (in `bench_rest`).
//! - Recovery (`--failover`, in `failover`): kill -9 → rerun elsewhere, cancel → group gone.
//! - Schedules (`--schedules`, in `bench_schedules`): ticks held by one scheduler replica.
//! - Workflows (`--workflows`, in `bench_workflows`): diamonds of jobs carried by one scheduler
//!   replica, and how long a step waits once the steps before it ended.
//! - Atomic batches (`--atomic-batch`, in `bench_batch`): one state change written as one
//!   batch of record and event against two acknowledged writes, on nats-server alone.
//! - Authentication (`--auth`): what the guard adds to `GET /api/v1/jobs/{id}` (the
//!   `auth` bench of `capstan-api`).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use capstan_protocol::{
    JobEvent, JobEventKind, JobId, JobRecord, JobSpec, JobStatus, NodeId, OutputSummary, Timestamp,
    headers, subjects,
};
use capstan_store::{History, Sequenced};
use capstan_testkit::NatsServer;
use capstan_testkit::http::HttpClient;
use futures::StreamExt;

/// Options of `bench`.
#[derive(clap::Args)]
pub struct Args {
    /// Jobs in each throughput run.
    #[arg(long, default_value_t = 2_000)]
    jobs: usize,
    /// Throughput runs, each on the same mesh; each is reported, and the median.
    #[arg(long, default_value_t = 3)]
    repeat: usize,
    /// Jobs sent one at a time for the latency run.
    #[arg(long, default_value_t = 300)]
    latency_jobs: usize,
    /// Executors.
    #[arg(long, default_value_t = 2)]
    executors: u32,
    /// Slots per executor (`up`'s default).
    #[arg(long, default_value_t = crate::up::DEFAULT_SLOTS)]
    slots: u32,
    /// Schedulers.
    #[arg(long, default_value_t = 1)]
    schedulers: u32,
    /// Submissions published but not yet acknowledged by JetStream, at most.
    #[arg(long, default_value_t = 64)]
    in_flight: usize,
    /// Keep at most this many jobs unfinished (published and not yet ended) instead of
    /// publishing every job at once: a steady load, where jobs are placed as they arrive
    /// rather than waiting for room.
    #[arg(long)]
    closed_loop: Option<usize>,
    /// Run NATS with `sync_interval: always` (fsync every write).
    #[arg(long)]
    durable: bool,
    /// Connect everything to NATS over mutual TLS (a CA made for the run), as a deployment
    /// would.
    #[arg(long)]
    tls: bool,
    /// Give every NATS identity every permission (the server still admits only the mesh's
    /// identities): the peer of the default, where each may do only what it needs.
    #[arg(long)]
    unrestricted: bool,
    /// Leave out the side-by-side run of Celery on Redis.
    #[arg(long)]
    no_celery: bool,
    /// Instead of the pipeline, measure history queries on a database seeded with this many
    /// jobs, one at a time and from concurrent clients.
    #[arg(long)]
    history_rows: Option<u64>,
    /// History database for the query benchmark (default: a fresh SQLite file).
    #[arg(long)]
    database_url: Option<String>,
    /// Instead of the pipeline, measure recovery with default settings: kill -9 of an
    /// executor mid-job to the job running again elsewhere, and cancel to the job's process
    /// group gone.
    #[arg(long)]
    failover: bool,
    /// Instead of the pipeline, measure jobs on a remote system over SSH: a gateway executor
    /// and a real sshd on loopback (`--jobs` jobs one at a time, then at once over
    /// `--systems` names of the same host).
    #[arg(long)]
    ssh: bool,
    /// Names the sshd is registered under in the SSH run.
    #[arg(long, default_value_t = 50)]
    systems: usize,
    /// Rounds of kill -9 in the failover run.
    #[arg(long, default_value_t = 3)]
    kills: usize,
    /// Rounds of cancel in the failover run.
    #[arg(long, default_value_t = 20)]
    cancels: usize,
    /// Instead of the pipeline, measure schedules: for each count given (`1000,10000`), that
    /// many schedules ticking once a minute each, held by one scheduler replica.
    #[arg(long, value_delimiter = ',')]
    schedules: Vec<usize>,
    /// Seconds of ticks observed in the schedules run.
    #[arg(long, default_value_t = 120)]
    schedule_window: u64,
    /// Instead of the pipeline, measure workflows: for each count given (`100,1000`), that many
    /// workflows of four `/bin/true` steps (`a → (b, c) → d`) created at once over REST and run
    /// to their end by one scheduler replica.
    #[arg(long, value_delimiter = ',')]
    workflows: Vec<usize>,
    /// Instead of the pipeline, measure what authentication adds to a request:
    /// `GET /api/v1/jobs/{id}` with an access token against the same without the guard
    /// (`cargo bench -p capstan-api --bench auth`, optimised).
    #[arg(long)]
    auth: bool,
    /// Instead of the pipeline, measure on nats-server alone what one job state change costs
    /// written as an atomic batch (record and event) against two acknowledged writes.
    #[arg(long)]
    atomic_batch: bool,
    /// Run the release binaries in this directory instead of building the workspace's: a
    /// build kept from an earlier commit, measured beside the current one in the same session.
    #[arg(long)]
    bin_dir: Option<PathBuf>,
}

pub(crate) struct Process {
    pub(crate) name: String,
    pub(crate) child: Child,
}

impl Drop for Process {
    fn drop(&mut self) {
        if let Ok(pid) = i32::try_from(self.child.id()) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// CPU seconds `pid` used so far, its reaped children's included.
pub(crate) fn cpu_seconds(pid: u32) -> f64 {
    let (own, children) = cpu_times(pid);
    own + children
}

/// CPU seconds (user + system) of `pid` so far: its own, and its reaped children's.
fn cpu_times(pid: u32) -> (f64, f64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let rest = stat.rfind(')').map_or("", |i| &stat[i + 1..]);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime, stime, cutime and cstime are fields 14 to 17: the 12th to 15th after the
    // parenthesis. Linux reports them in USER_HZ, 100 on every common configuration.
    let ticks = |range: &[usize]| -> f64 {
        range
            .iter()
            .filter_map(|i| fields.get(*i)?.parse::<f64>().ok())
            .sum::<f64>()
            / 100.0
    };
    (ticks(&[11, 12]), ticks(&[13, 14]))
}

/// Starts `command` as `name`, its output in `<logs>/<name>.log`, at its default log level.
pub(crate) fn start(name: &str, mut command: Command, logs: &Path) -> anyhow::Result<Process> {
    let log = std::fs::File::create(logs.join(format!("{name}.log")))?;
    let child = command
        .stdin(Stdio::null())
        .stdout(Stdio::from(log.try_clone()?))
        .stderr(Stdio::from(log))
        .spawn()
        .with_context(|| format!("cannot start {name}"))?;
    Ok(Process {
        name: name.to_owned(),
        child,
    })
}

pub(crate) fn spawn(
    bin: &Path,
    name: &str,
    env: &[(&str, String)],
    logs: &Path,
) -> anyhow::Result<Process> {
    let mut command = Command::new(bin);
    command
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .env("CAPSTAN_LOG", "warn");
    start(name, command, logs)
}

pub(crate) fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

pub(crate) fn ms(duration: Duration) -> String {
    format!("{:.2} ms", duration.as_secs_f64() * 1000.0)
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let root = capstan_testkit::workspace_root();
    if args.auth {
        let nats = capstan_testkit::natsbin::ensure().map_err(anyhow::Error::msg)?;
        let status = super::cargo()
            .current_dir(&root)
            .args(["bench", "--locked", "-p", "capstan-api", "--bench", "auth"])
            .env("CAPSTAN_NATS_SERVER", nats)
            .status()?;
        if !status.success() {
            bail!("the authentication benchmark failed");
        }
        return Ok(());
    }
    if args.atomic_batch {
        return two_threads()?.block_on(crate::bench_batch::run());
    }
    let bin = match &args.bin_dir {
        Some(dir) => {
            eprintln!("running the release binaries in {}", dir.display());
            dir.clone()
        }
        None => {
            eprintln!("building release binaries");
            let status = super::cargo()
                .current_dir(&root)
                .args(["build", "--release", "--locked", "--bins"])
                .status()?;
            if !status.success() {
                bail!("build failed");
            }
            std::env::var_os("CARGO_TARGET_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| root.join("target"))
                .join("release")
        }
    };
    match args.history_rows {
        Some(rows) => {
            two_threads()?.block_on(history_queries(&bin, rows, args.database_url.clone()))
        }
        None if args.failover => two_threads()?.block_on(crate::failover::run(
            &bin,
            args.durable,
            args.kills,
            args.cancels,
        )),
        None if args.ssh => {
            two_threads()?.block_on(crate::bench_ssh::run(&bin, args.jobs, args.systems))
        }
        None if !args.schedules.is_empty() => two_threads()?.block_on(crate::bench_schedules::run(
            &bin,
            &args.schedules,
            Duration::from_secs(args.schedule_window),
        )),
        None if !args.workflows.is_empty() => {
            two_threads()?.block_on(crate::bench_workflows::run(&bin, &args.workflows))
        }
        None => {
            // The pipeline's client is a user's application, not part of the mesh: it runs
            // on one thread, as a lean client would, so that its share of the two cores is
            // what publishing and reading the events cost, not a second worker's wake-ups.
            // (The floor gets a runtime of its own: `floor_beside`.)
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?
                .block_on(pipeline(&bin, &args))
        }
    }
}

/// The job every pipeline run submits: `/bin/true`, run without a shell.
const TRUE_JOB: &str = r#"{"argv": ["/bin/true"]}"#;

/// Jobs run before measuring, so connections, caches and the history's file are warm.
const WARM_UP: usize = 200;

async fn pipeline(bin: &Path, args: &Args) -> anyhow::Result<()> {
    let dir = tempfile::Builder::new()
        .prefix("capstan-bench-")
        .tempdir()?;
    let logs = dir.path();
    let data = dir.path().join("data");
    std::fs::create_dir_all(data.join("nats"))?;
    let nats_binary = capstan_testkit::natsbin::ensure().map_err(anyhow::Error::msg)?;
    let nats_port = capstan_testkit::server::free_port();
    let monitor_port = capstan_testkit::server::free_port();
    let api_port = capstan_testkit::server::free_port();
    let nats_url = format!("nats://127.0.0.1:{nats_port}");
    let grants = if args.unrestricted {
        capstan_mesh::identities::Grants::All
    } else {
        capstan_mesh::identities::Grants::Least
    };
    let identities =
        crate::up::identities_with(&dir.path().join("identities"), args.executors, grants)?;
    let ca = args.tls.then(capstan_testkit::TestCa::generate);
    let tls = ca.as_ref().map(|ca| ca.files.clone());
    let mut nats_command = crate::up::nats_command(
        &nats_binary,
        nats_port,
        &data.join("nats"),
        args.durable,
        &identities.accounts,
        tls.as_ref(),
    )?;
    // Its monitoring endpoint, for the message counts.
    nats_command.args(["-m", &monitor_port.to_string()]);
    let nats = start("nats-server", nats_command, logs)?;
    let plan = crate::up::Plan {
        bin_dir: bin.to_owned(),
        nats_url: nats_url.clone(),
        data: data.clone(),
        registries: 1,
        schedulers: args.schedulers,
        executors: args.executors,
        slots: args.slots,
        api_listen: format!("127.0.0.1:{api_port}"),
        admin_password: capstan_api::TEST_ADMIN_PASSWORD.to_owned(),
        secret_keys: crate::up::secret_keys(&dir.path().join("secret-keys"))?,
        identities: identities.clone(),
        tls: tls.clone(),
    };
    // The administrator: the benchmark reads stream states besides submitting.
    let seed =
        std::fs::read_to_string(identities.seed_file(&capstan_mesh::identities::Identity::Admin))?;
    let client = connect(&nats_url, seed.trim(), tls.as_ref()).await?;
    let mut processes = vec![nats];
    plan.apply_topology()?;
    for (name, command) in plan.services() {
        processes.push(start(&name, command, logs)?);
    }
    eprintln!(
        "the mesh `cargo xtask up --release` runs, with its settings: nats-server (JetStream, {}{}), \
         1 registry, {} scheduler(s), {} executors × {} slots, 1 API with its SQLite history",
        if args.durable {
            "sync_interval: always"
        } else {
            "default sync"
        },
        if args.tls { ", mutual TLS" } else { "" },
        args.schedulers,
        args.executors,
        args.slots
    );
    eprintln!(
        "each service connects as its own NATS identity, {}",
        if args.unrestricted {
            "every one allowed everything (--unrestricted)"
        } else {
            "allowed only what it needs, as `capstan nats init` writes"
        }
    );
    let http = logged_in(api_port, logs).await?;
    wait_nodes_up(&http, args.executors as usize, logs).await?;
    let js = async_nats::jetstream::new(client.clone());
    let history = History::connect(&format!(
        "sqlite://{}?mode=ro",
        data.join("history.db").display()
    ))
    .await?;
    let mut ends = Ends::subscribe(&client).await?;

    publish_and_wait(&js, &mut ends, WARM_UP, args.in_flight, args.closed_loop).await?;
    ends.stages();
    let mut throughput_stages = Stages::default();
    let mut runs = Vec::new();
    let slots = (args.executors * args.slots) as usize;
    let mut traffic_before = Traffic::now(&js, monitor_port).await?;
    let mut traffic_total = Traffic::default();
    let mut cpu_before = cpu_of(&processes);
    let mut cpu_total: Vec<(String, f64)> = Vec::new();
    for run in 1..=args.repeat {
        let machine_before = MachineCpu::now();
        let started = Instant::now();
        publish_and_wait(&js, &mut ends, args.jobs, args.in_flight, args.closed_loop).await?;
        let elapsed = started.elapsed();
        let (busy, stolen) = MachineCpu::now().shares_since(&machine_before);
        let cpu_after = cpu_of(&processes);
        let traffic = Traffic::now(&js, monitor_port)
            .await?
            .since(&traffic_before);
        traffic_total = traffic_total.plus(&traffic);
        let used: Vec<(String, f64)> = cpu_after
            .iter()
            .zip(&cpu_before)
            .map(|((name, after), (_, before))| (name.clone(), after - before))
            .collect();
        if cpu_total.is_empty() {
            cpu_total = used.clone();
        } else {
            for ((_, total), (_, more)) in cpu_total.iter_mut().zip(&used) {
                *total += more;
            }
        }
        let stages = ends.stages();
        // The history is off the measured path; say how far behind it was.
        let total = (WARM_UP + run * args.jobs) as i64;
        let lag = Instant::now();
        wait_count(&history, total, Duration::from_secs(600), succeeded).await?;
        let rate = args.jobs as f64 / elapsed.as_secs_f64();
        let cpu_ms = used.iter().map(|(_, s)| s).sum::<f64>() * 1000.0 / args.jobs as f64;
        eprintln!(
            "run {run}: {rate:.0} jobs/s, {cpu_ms:.2} ms CPU per job ({}); {:.1} messages and {:.1} stored writes per job through nats-server; the SQL history held them all {} ms later; the machine's cores were {:.0}% busy ({:.0}% stolen by the host); mean stages {}",
            used.iter()
                .map(|(name, seconds)| format!("{name} {:.0} µs", seconds * 1e6 / args.jobs as f64))
                .collect::<Vec<_>>()
                .join(", "),
            traffic.messages as f64 / args.jobs as f64,
            traffic.stored() as f64 / args.jobs as f64,
            lag.elapsed().as_millis(),
            busy * 100.0,
            stolen * 100.0,
            stages
                .summary()
                .iter()
                .map(|(name, mean, _)| format!(
                    "{:.1} ms ({})",
                    mean,
                    name.split(" (").next().unwrap_or(name)
                ))
                .collect::<Vec<_>>()
                .join(", "),
        );
        throughput_stages.extend(stages);
        // The peer beside this run: the standard library's spawn on the now idle mesh, as many
        // at a time as the mesh has slots. The machine's speed moves within minutes, so each
        // run is read against its own floor.
        let floor = on_two_threads(|runtime| {
            runtime.block_on(spawn_floor(args.jobs, slots, spawn_standard))
        })?;
        eprintln!(
            "run {run}: the floor beside it, {:.0} spawns/s: the run is {:.2} of it",
            floor.rate,
            rate / floor.rate
        );
        runs.push(Run {
            rate,
            floor: floor.rate,
        });
        // The history check and the floor above are not part of the next run's CPU or
        // traffic, nor is the reading of the counts.
        traffic_before = Traffic::now(&js, monitor_port).await?;
        cpu_before = cpu_of(&processes);
    }
    let measured = (args.jobs * args.repeat) as f64;

    // Latency, one job at a time on the now idle mesh.
    let mut latencies = Vec::with_capacity(args.latency_jobs);
    for _ in 0..args.latency_jobs {
        let id = JobId::generate();
        let mut map = async_nats::HeaderMap::new();
        map.insert(headers::JOB_ID, id.to_string().as_str());
        let sent = Instant::now();
        js.publish_with_headers(subjects::SUBMIT, map, TRUE_JOB.into())
            .await?
            .await?;
        ends.wait_for(id).await?;
        latencies.push(sent.elapsed());
    }
    latencies.sort();
    let latency_stages = ends.stages();
    drop(processes);
    let floor = floor_beside(args.jobs, slots)?;

    let celery = if args.no_celery {
        None
    } else {
        match celery(args) {
            Ok(celery) => Some(celery),
            Err(error) => {
                eprintln!("no side-by-side with Celery: {error:#}");
                None
            }
        }
    };

    let mut rates: Vec<f64> = runs.iter().map(|run| run.rate).collect();
    rates.sort_by(f64::total_cmp);
    let median = rates[rates.len() / 2];
    let p50 = percentile(&latencies, 0.50);
    let p99 = percentile(&latencies, 0.99);
    let cpu_per_job: Vec<(String, f64)> = cpu_total
        .iter()
        .map(|(name, seconds)| (name.clone(), seconds / measured))
        .collect();
    let cpu_all: f64 = cpu_per_job.iter().map(|(_, s)| s).sum();

    println!();
    println!(
        "## Pipeline: `/bin/true` jobs, the mesh of `cargo xtask up --release` ({} executors × {} slots, {} scheduler(s), 1 registry, 1 API on SQLite), NATS {}{}",
        args.executors,
        args.slots,
        args.schedulers,
        if args.durable {
            "`sync_interval: always`"
        } else {
            "default sync"
        },
        if args.tls { " over mutual TLS" } else { "" }
    );
    println!(
        "NATS permissions: {}.",
        if args.unrestricted {
            "every identity allowed everything"
        } else {
            "each identity only what it needs"
        }
    );
    println!();
    println!(
        "{} runs of {} jobs, published with at most {} unacknowledged{}, each run timed from its first \
         publish to its last terminal event; {} jobs one at a time for latency.",
        args.repeat,
        args.jobs,
        args.in_flight,
        args.closed_loop.map_or(String::new(), |unfinished| format!(
            " and at most {unfinished} unfinished (a closed loop)"
        )),
        args.latency_jobs
    );
    println!();
    println!(
        "| measure | Capstan | {} | aim |",
        celery.as_ref().map_or("—", |c| c.system.as_str())
    );
    println!("|---|---|---|---|");
    let runs_text = rates
        .iter()
        .map(|r| format!("{r:.0}"))
        .collect::<Vec<_>>()
        .join(" / ");
    println!(
        "| jobs/s end to end (median; runs) | {median:.0} ({runs_text}) | {} | ≥ {} |",
        celery.as_ref().map_or("—".to_owned(), |c| format!(
            "{:.0} ({})",
            c.median,
            c.runs
                .iter()
                .map(|r| format!("{r:.0}"))
                .collect::<Vec<_>>()
                .join(" / ")
        )),
        if args.durable { "800" } else { "1,600" }
    );
    // The durable mode waits on the disk's syncs, not on spawns: the floor is no peer of it.
    let (aim, aim_floor) = ISSUE_AIM;
    let against_floor = if args.durable {
        "—".to_owned()
    } else {
        format!(
            "≥ {:.2} ({aim:.0} ÷ {aim_floor:.0}, the aim on the machine that set it)",
            aim / aim_floor
        )
    };
    println!(
        "| jobs/s ÷ the floor measured right after each run (runs in order) | {} | — | {against_floor} |",
        runs.iter()
            .map(|run| format!(
                "{:.2} ({:.0} ÷ {:.0})",
                run.rate / run.floor,
                run.rate,
                run.floor
            ))
            .collect::<Vec<_>>()
            .join(" / "),
    );
    println!(
        "| latency submit → terminal event, p50 | {} | {} | ≤ 3 ms |",
        ms(p50),
        celery
            .as_ref()
            .map_or("—".to_owned(), |c| format!("{:.2} ms", c.p50_ms))
    );
    println!(
        "| latency p99 | {} | {} | ≤ 8 ms |",
        ms(p99),
        celery
            .as_ref()
            .map_or("—".to_owned(), |c| format!("{:.2} ms", c.p99_ms))
    );
    println!(
        "| CPU per job, every process (job processes and client included) | {:.2} ms | {} | ≤ 1.5 ms |",
        cpu_all * 1000.0,
        celery
            .as_ref()
            .map_or("—".to_owned(), |c| format!("{:.2} ms", c.cpu_us / 1000.0))
    );
    println!(
        "| messages through nats-server per job (in + out) | {:.1} | — | |",
        traffic_total.messages as f64 / measured
    );
    println!(
        "| stored writes per job (every stream and bucket) | {:.1} ({}) | — | |",
        traffic_total.stored() as f64 / measured,
        traffic_total
            .stored
            .iter()
            .filter(|(_, writes)| **writes > 0)
            .map(|(name, writes)| format!("{name} {:.1}", *writes as f64 / measured))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!();
    println!("| connection | messages sent per job | messages received per job |");
    println!("|---|---|---|");
    for (name, (sent, received)) in &traffic_total.by_connection {
        if sent + received > 0 {
            println!(
                "| {name} | {:.2} | {:.2} |",
                *sent as f64 / measured,
                *received as f64 / measured
            );
        }
    }
    println!();
    println!(
        "The floor, same run: `/bin/true` spawned with what a job gets (no shell, its own \
         process group, output piped), {} at a time, by this benchmark's process alone: \
         through the standard library's `posix_spawn`, **{:.0} spawns/s**, {:.2} ms CPU per \
         spawn ({:.2} ms of it the child's); through the executors' own spawn, **{:.0} \
         spawns/s**, {:.2} ms CPU per spawn ({:.2} ms of it the child's).",
        floor.concurrency,
        floor.standard.rate,
        floor.standard.cpu_ms,
        floor.standard.child_cpu_ms,
        floor.ours.rate,
        floor.ours.cpu_ms,
        floor.ours.child_cpu_ms
    );
    println!();
    println!(
        "Where a job's time went, from the timestamps of its terminal event's record (mean, \
         median; the records keep milliseconds; the first stage starts when JetStream stored the \
         submission in the throughput runs, when the client published it one at a time):"
    );
    println!();
    println!("| stage | throughput runs: mean | median | one at a time: mean | median |");
    println!("|---|---|---|---|---|");
    for ((name, mean, median), (_, one_mean, one_median)) in throughput_stages
        .summary()
        .into_iter()
        .zip(latency_stages.summary())
    {
        println!("| {name} | {mean:.2} ms | {median} ms | {one_mean:.2} ms | {one_median} ms |");
    }
    println!();
    println!("| process | CPU per job |");
    println!("|---|---|");
    for (name, seconds) in &cpu_per_job {
        println!("| {name} | {:.0} µs |", seconds * 1e6);
    }
    println!("| all | {:.0} µs |", cpu_all * 1e6);
    if let Some(celery) = &celery {
        println!();
        println!("| {} process | CPU per job |", celery.system);
        println!("|---|---|");
        for (name, us) in &celery.cpu {
            println!("| {name} | {us:.0} µs |");
        }
        println!();
        println!("Celery: {}", celery.notes);
    }
    Ok(())
}

/// What nats-server has carried and stored: messages in and out as its monitoring endpoint
/// counts them (every client's publishes, requests, replies, acknowledgements and deliveries),
/// and writes to every stream and bucket (the sum of their last sequences).
#[derive(Default)]
struct Traffic {
    messages: u64,
    /// Writes by stream (a bucket is its `KV_` stream).
    stored: std::collections::BTreeMap<String, u64>,
    /// Messages by client connection name: what it sent to nats-server, and what it was sent
    /// (connections of one name summed; a connection closed in between is not counted).
    by_connection: std::collections::BTreeMap<String, (u64, u64)>,
}

impl Traffic {
    async fn now(js: &async_nats::jetstream::Context, monitor_port: u16) -> anyhow::Result<Self> {
        let varz = http_get_json(monitor_port, "/varz").await?;
        let count = |field: &str| varz.get(field).and_then(serde_json::Value::as_u64);
        let (Some(inbound), Some(outbound)) = (count("in_msgs"), count("out_msgs")) else {
            bail!("nats-server's /varz has no message counts");
        };
        let mut stored = std::collections::BTreeMap::new();
        let mut streams = js.streams();
        while let Some(info) = streams.next().await {
            let info = info?;
            stored.insert(info.config.name, info.state.last_sequence);
        }
        let connz = http_get_json(monitor_port, "/connz?limit=4096").await?;
        let by_connection = connection_counts(&connz);
        Ok(Self {
            messages: inbound + outbound,
            stored,
            by_connection,
        })
    }

    fn stored(&self) -> u64 {
        self.stored.values().sum()
    }

    fn since(&self, earlier: &Self) -> Self {
        Self {
            messages: self.messages.saturating_sub(earlier.messages),
            stored: self
                .stored
                .iter()
                .map(|(name, last)| {
                    let before = earlier.stored.get(name).copied().unwrap_or(0);
                    (name.clone(), last.saturating_sub(before))
                })
                .collect(),
            by_connection: self
                .by_connection
                .iter()
                .map(|(name, (sent, received))| {
                    let (sent_before, received_before) =
                        earlier.by_connection.get(name).copied().unwrap_or((0, 0));
                    (
                        name.clone(),
                        (
                            sent.saturating_sub(sent_before),
                            received.saturating_sub(received_before),
                        ),
                    )
                })
                .collect(),
        }
    }

    fn plus(&self, more: &Self) -> Self {
        let mut stored = self.stored.clone();
        for (name, writes) in &more.stored {
            *stored.entry(name.clone()).or_default() += writes;
        }
        let mut by_connection = self.by_connection.clone();
        for (name, (sent, received)) in &more.by_connection {
            let counts = by_connection.entry(name.clone()).or_default();
            counts.0 += sent;
            counts.1 += received;
        }
        Self {
            messages: self.messages + more.messages,
            stored,
            by_connection,
        }
    }
}

/// The messages of each client connection in nats-server's `/connz` document, by connection
/// name: what the client sent the server (`in_msgs`) and what the server sent it (`out_msgs`),
/// connections of one name summed.
fn connection_counts(connz: &serde_json::Value) -> std::collections::BTreeMap<String, (u64, u64)> {
    let mut counts = std::collections::BTreeMap::<String, (u64, u64)>::new();
    for connection in connz
        .get("connections")
        .and_then(serde_json::Value::as_array)
        .into_iter()
        .flatten()
    {
        let field = |name: &str| connection.get(name).and_then(serde_json::Value::as_u64);
        let name = connection
            .get("name")
            .and_then(serde_json::Value::as_str)
            .filter(|name| !name.is_empty())
            .unwrap_or("(unnamed)");
        let entry = counts.entry(name.to_owned()).or_default();
        entry.0 += field("in_msgs").unwrap_or(0);
        entry.1 += field("out_msgs").unwrap_or(0);
    }
    counts
}

/// GETs a JSON document from nats-server's monitoring endpoint on this host.
async fn http_get_json(port: u16, path: &str) -> anyhow::Result<serde_json::Value> {
    let reply = capstan_testkit::http::HttpClient::new(format!("http://127.0.0.1:{port}"))
        .try_get(path)
        .await
        .map_err(anyhow::Error::msg)?;
    anyhow::ensure!(
        reply.status.is_success(),
        "nats-server's {path} answered {}",
        reply.status
    );
    Ok(serde_json::from_slice(&reply.body)?)
}

/// The throughput aim in jobs/s, and the floor in spawns/s on the machine where the aim was
/// set: it measured about 2,300 spawns of `/bin/true` a second. Machines differ by half again,
/// so a run is also read against the floor measured beside it.
const ISSUE_AIM: (f64, f64) = (1_600.0, 2_300.0);

/// One throughput run: its rate, and the standard library's floor measured right after it.
struct Run {
    rate: f64,
    floor: f64,
}

/// What spawning `/bin/true` alone costs on this machine now.
struct Floor {
    concurrency: usize,
    /// Through the standard library's `posix_spawn`.
    standard: Spawns,
    /// Through the executors' own spawn, measured right after.
    ours: Spawns,
}

/// One way of spawning, measured.
struct Spawns {
    rate: f64,
    cpu_ms: f64,
    child_cpu_ms: f64,
}

/// The runtime of every benchmark but the pipeline's client, and of the floor: two worker
/// threads.
fn two_threads() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
}

/// Both floors, [`spawn_floor`] through the standard library and through the executors' own
/// spawn.
fn floor_beside(count: usize, concurrency: usize) -> anyhow::Result<Floor> {
    on_two_threads(|runtime| {
        let standard = runtime.block_on(spawn_floor(count, concurrency, spawn_standard))?;
        let ours = runtime.block_on(spawn_floor(count, concurrency, spawn_ours))?;
        Ok(Floor {
            concurrency,
            standard,
            ours,
        })
    })
}

/// Runs `work` on a runtime of two worker threads, as the floor was always measured, so that
/// floors compare across the record. A thread of its own: the pipeline's runtime, which calls
/// it, cannot start another on its thread.
fn on_two_threads<T: Send>(
    work: impl FnOnce(&tokio::runtime::Runtime) -> anyhow::Result<T> + Send,
) -> anyhow::Result<T> {
    std::thread::scope(|scope| {
        scope
            .spawn(|| work(&two_threads()?))
            .join()
            .map_err(|_| anyhow::anyhow!("the floor's thread panicked"))?
    })
}

/// `/bin/true` spawned with what a job gets (no shell, its own process group, a small
/// environment, stdin closed, stdout and stderr piped and read to their end) through the
/// standard library's `posix_spawn`.
async fn spawn_standard() -> anyhow::Result<()> {
    let output = tokio::process::Command::new("/bin/true")
        // Not this process's environment: `cargo` adds search paths the dynamic loader
        // would try first, and a job's environment is small.
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .output()
        .await?;
    anyhow::ensure!(
        output.status.success(),
        "/bin/true failed: {}",
        output.status
    );
    Ok(())
}

/// The same through the executors' own spawn (`capstan_executor::spawn`), in the temporary
/// directory.
async fn spawn_ours() -> anyhow::Result<()> {
    use tokio::io::AsyncReadExt;
    let mut launch = capstan_executor::spawn::Launch::new(
        Path::new("/bin/true"),
        "/bin/true",
        &[],
        &std::env::temp_dir(),
    )?;
    launch.env("PATH", "/usr/bin:/bin");
    let mut process = launch.spawn()?;
    let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
    if let (Some(out), Some(err)) = (process.stdout.as_mut(), process.stderr.as_mut()) {
        let (read_out, read_err) =
            tokio::join!(out.read_to_end(&mut stdout), err.read_to_end(&mut stderr));
        read_out?;
        read_err?;
    }
    let status = process.wait().await?;
    anyhow::ensure!(status.success(), "/bin/true failed: {status}");
    Ok(())
}

/// Spawns `/bin/true` `count` times with `spawn_one`, `concurrency` at a time, and measures the
/// rate and the CPU of this process and of the children.
async fn spawn_floor<F, Fut>(
    count: usize,
    concurrency: usize,
    spawn_one: F,
) -> anyhow::Result<Spawns>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    // Warm the binary's pages and the runtime's process driver first.
    for _ in 0..20 {
        spawn_one().await?;
    }
    let (own_before, children_before) = cpu_times(std::process::id());
    let started = Instant::now();
    let results: Vec<anyhow::Result<()>> = futures::stream::iter(0..count)
        .map(|_| spawn_one())
        .buffer_unordered(concurrency.max(1))
        .collect()
        .await;
    let elapsed = started.elapsed();
    results.into_iter().collect::<anyhow::Result<Vec<()>>>()?;
    let (own_after, children_after) = cpu_times(std::process::id());
    let child = children_after - children_before;
    Ok(Spawns {
        rate: count as f64 / elapsed.as_secs_f64(),
        cpu_ms: (own_after - own_before + child) * 1000.0 / count as f64,
        child_cpu_ms: child * 1000.0 / count as f64,
    })
}

/// Connects the benchmark's client as the NKEY user `seed`, over mutual TLS with `tls`.
pub(crate) async fn connect(
    url: &str,
    seed: &str,
    tls: Option<&capstan_testkit::TlsFiles>,
) -> anyhow::Result<async_nats::Client> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let mut options = async_nats::ConnectOptions::new()
            .nkey(seed.to_owned())
            .name("capstan-bench-client");
        if let Some(tls) = tls {
            options = options
                .require_tls(true)
                .add_root_certificates(tls.ca.clone())
                .add_client_certificate(tls.client_cert.clone(), tls.client_key.clone());
        }
        match options.connect(url).await {
            Ok(client) => return Ok(client),
            Err(error) if Instant::now() > deadline => bail!("cannot reach nats-server: {error}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// Waits until the API lists `count` nodes up.
pub(crate) async fn wait_nodes_up(
    http: &HttpClient,
    count: usize,
    logs: &Path,
) -> anyhow::Result<()> {
    let ready = Instant::now();
    loop {
        let up = match http.try_get("/api/v1/nodes").await {
            Ok(nodes) => {
                nodes.status.is_success()
                    && nodes.json()["nodes"]
                        .as_array()
                        .is_some_and(|n| n.iter().filter(|n| n["status"] == "up").count() == count)
            }
            Err(_) => false,
        };
        if up {
            return Ok(());
        }
        if ready.elapsed() > Duration::from_secs(60) {
            bail!("the mesh did not come up; logs in {}", logs.display());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// How many jobs the history holds as succeeded.
async fn succeeded(history: History) -> i64 {
    history
        .status_counts()
        .await
        .ok()
        .map_or(0, |counts| counts.of(JobStatus::Succeeded))
}

/// The whole machine's CPU time so far, in clock ticks from `/proc/stat`: busy, stolen by the
/// host (a virtual machine's steal time), and in all.
struct MachineCpu {
    busy: f64,
    steal: f64,
    total: f64,
}

impl MachineCpu {
    fn now() -> Self {
        let text = std::fs::read_to_string("/proc/stat").unwrap_or_default();
        let fields: Vec<f64> = text
            .lines()
            .next()
            .unwrap_or_default()
            .split_whitespace()
            .skip(1)
            .filter_map(|field| field.parse().ok())
            .collect();
        let at = |i: usize| fields.get(i).copied().unwrap_or(0.0);
        // user nice system idle iowait irq softirq steal
        let idle = at(3) + at(4);
        let steal = at(7);
        let total: f64 = fields.iter().take(8).sum();
        Self {
            busy: total - idle - steal,
            steal,
            total,
        }
    }

    /// The shares of the time since `earlier` that the cores were busy, and stolen.
    fn shares_since(&self, earlier: &Self) -> (f64, f64) {
        let total = (self.total - earlier.total).max(1.0);
        (
            (self.busy - earlier.busy) / total,
            (self.steal - earlier.steal) / total,
        )
    }
}

/// The terminal events of every job, as they are published (a core subscription per terminal
/// kind: what a client waiting for its jobs would read).
pub(crate) struct Ends {
    events: futures::stream::SelectAll<async_nats::Subscriber>,
    /// Jobs whose end was seen (live events are at least once).
    seen: std::collections::HashSet<String>,
    /// Where the time of the jobs seen since the last [`Ends::stages`] went.
    stages: Stages,
}

/// Where each job's time went, from the timestamps its terminal event's record carries (the
/// job id holds the instant JetStream stored the submission) and the instant the event
/// arrived here. Milliseconds, as the records keep them: a single job's stage is ±1 ms, the
/// mean over many is finer.
#[derive(Default)]
struct Stages {
    /// Stored submission → record created (the scheduler's intake).
    intake: Vec<i64>,
    /// Record created → placed on a node (waiting for a free slot).
    waiting: Vec<i64>,
    /// Placed → claimed and started by the executor (the dispatch's trip and the claim).
    start: Vec<i64>,
    /// Started → the process ended and its outcome was decided.
    run: Vec<i64>,
    /// Ended → the terminal event reached the client (the outcome's write and the event).
    report: Vec<i64>,
}

impl Stages {
    fn add(&mut self, id: JobId, record: &JobRecord, received: Timestamp) {
        let (Some(placed), Some(started), Some(finished)) =
            (record.dispatched_at, record.started_at, record.finished_at)
        else {
            return;
        };
        let stored = i64::try_from(id.timestamp_ms()).unwrap_or(i64::MAX);
        let created = record.created_at.as_millis();
        self.intake.push(created - stored);
        self.waiting.push(placed.as_millis() - created);
        self.start.push(started.as_millis() - placed.as_millis());
        self.run.push(finished.as_millis() - started.as_millis());
        self.report
            .push(received.as_millis() - finished.as_millis());
    }

    fn extend(&mut self, more: Self) {
        self.intake.extend(more.intake);
        self.waiting.extend(more.waiting);
        self.start.extend(more.start);
        self.run.extend(more.run);
        self.report.extend(more.report);
    }

    /// Each stage's name, mean and median, in milliseconds.
    fn summary(&self) -> Vec<(&'static str, f64, i64)> {
        let stages = [
            ("submission → record created (intake)", &self.intake),
            (
                "created → placed on a node (waiting for room)",
                &self.waiting,
            ),
            (
                "placed → started by the executor (dispatch, claim)",
                &self.start,
            ),
            ("started → process ended", &self.run),
            (
                "ended → terminal event at the client (outcome, event)",
                &self.report,
            ),
        ];
        stages
            .iter()
            .map(|(name, values)| {
                let mut sorted = (*values).clone();
                sorted.sort_unstable();
                let mean = sorted.iter().sum::<i64>() as f64 / sorted.len().max(1) as f64;
                let median = sorted.get(sorted.len() / 2).copied().unwrap_or(0);
                (*name, mean, median)
            })
            .collect()
    }
}

impl Ends {
    pub(crate) async fn subscribe(client: &async_nats::Client) -> anyhow::Result<Self> {
        let mut events = futures::stream::SelectAll::new();
        for kind in JobEventKind::TERMINAL {
            events.push(client.subscribe(subjects::job_events_of_kind(kind)).await?);
        }
        client.flush().await?;
        Ok(Self {
            events,
            seen: std::collections::HashSet::new(),
            stages: Stages::default(),
        })
    }

    /// Where the time of the jobs ended since the last call went.
    fn stages(&mut self) -> Stages {
        std::mem::take(&mut self.stages)
    }

    /// The next job to end (a repeated event is skipped); a job that did not succeed is an
    /// error.
    pub(crate) async fn next(&mut self) -> anyhow::Result<JobId> {
        loop {
            let event = tokio::time::timeout(Duration::from_secs(60), self.events.next())
                .await
                .context("no job ended for 60 s")?
                .context("subscription closed")?;
            let Some((job, kind)) = subjects::parse_job_event(&event.subject) else {
                continue;
            };
            if !self.seen.insert(job.to_string()) {
                continue;
            }
            if kind != JobEventKind::Succeeded.as_str() {
                bail!("job {job} ended {kind}");
            }
            let received = Timestamp::now();
            if let Ok(event) = capstan_protocol::codec::decode::<JobEvent>(
                capstan_protocol::Encoding::MsgPack,
                &event.payload,
            ) {
                self.stages.add(job, &event.record, received);
            }
            return Ok(job);
        }
    }

    pub(crate) async fn wait_for(&mut self, id: JobId) -> anyhow::Result<()> {
        while self.next().await? != id {}
        Ok(())
    }
}

/// Publishes `count` jobs, at most `in_flight` awaiting JetStream's acknowledgement (and, with
/// `unfinished`, at most that many published and not yet ended), and waits until each has
/// ended.
async fn publish_and_wait(
    js: &async_nats::jetstream::Context,
    ends: &mut Ends,
    count: usize,
    in_flight: usize,
    unfinished: Option<usize>,
) -> anyhow::Result<()> {
    let js = js.clone();
    let room = std::sync::Arc::new(tokio::sync::Semaphore::new(
        unfinished.unwrap_or(count).max(1),
    ));
    let publisher_room = room.clone();
    let publisher = tokio::spawn(async move {
        let mut acks = futures::stream::FuturesUnordered::new();
        for _ in 0..count {
            publisher_room.acquire().await?.forget();
            let ack = js.publish(subjects::SUBMIT, TRUE_JOB.into()).await?;
            acks.push(std::future::IntoFuture::into_future(ack));
            while acks.len() >= in_flight.max(1) {
                if let Some(ack) = acks.next().await {
                    ack?;
                }
            }
        }
        while let Some(ack) = acks.next().await {
            ack?;
        }
        anyhow::Ok(())
    });
    for _ in 0..count {
        ends.next().await?;
        room.add_permits(1);
    }
    publisher.await??;
    Ok(())
}

/// CPU seconds used so far by each process — its own and that of the children it reaped (the
/// job processes, for executors) — and by this benchmark's client.
fn cpu_of(processes: &[Process]) -> Vec<(String, f64)> {
    let mut used = Vec::new();
    for process in processes {
        let (own, children) = cpu_times(process.child.id());
        used.push((process.name.clone(), own));
        if process.name.starts_with("exec-") {
            used.push((format!("{}'s job processes", process.name), children));
        }
    }
    used.push((
        "client (this benchmark)".to_owned(),
        cpu_times(std::process::id()).0,
    ));
    used
}

/// What `xtask/celery/run.sh` reports.
struct Celery {
    system: String,
    runs: Vec<f64>,
    median: f64,
    p50_ms: f64,
    p99_ms: f64,
    cpu_us: f64,
    cpu: Vec<(String, f64)>,
    notes: String,
}

/// Runs Celery on Redis the same way (its own script installs both), with as many worker
/// processes as the mesh has slots.
fn celery(args: &Args) -> anyhow::Result<Celery> {
    let script = capstan_testkit::workspace_root().join("xtask/celery/run.sh");
    eprintln!(
        "measuring Celery on Redis the same way ({})",
        script.display()
    );
    let output = Command::new(&script)
        .args([
            "--jobs",
            &args.jobs.to_string(),
            "--repeat",
            &args.repeat.to_string(),
            "--latency-jobs",
            &args.latency_jobs.to_string(),
            "--concurrency",
            &(args.executors * args.slots).to_string(),
        ])
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("cannot run {}", script.display()))?;
    if !output.status.success() {
        bail!("the Celery benchmark failed ({})", output.status);
    }
    let text = String::from_utf8_lossy(&output.stdout);
    let last = text.lines().last().unwrap_or_default();
    let value: serde_json::Value =
        serde_json::from_str(last).context("the Celery benchmark's last line is not JSON")?;
    let number = |key: &str| value[key].as_f64().unwrap_or(f64::NAN);
    Ok(Celery {
        system: value["system"].as_str().unwrap_or("Celery").to_owned(),
        runs: value["throughput_runs"]
            .as_array()
            .map(|runs| runs.iter().filter_map(serde_json::Value::as_f64).collect())
            .unwrap_or_default(),
        median: number("throughput_median"),
        p50_ms: number("latency_p50_ms"),
        p99_ms: number("latency_p99_ms"),
        cpu_us: number("cpu_us_per_job_total"),
        cpu: value["cpu_us_per_job"]
            .as_object()
            .map(|cpu| {
                cpu.iter()
                    .map(|(name, us)| (name.clone(), us.as_f64().unwrap_or(f64::NAN)))
                    .collect()
            })
            .unwrap_or_default(),
        notes: value["notes"].as_str().unwrap_or_default().to_owned(),
    })
}

async fn wait_count<F, Fut>(
    history: &History,
    target: i64,
    timeout: Duration,
    count: F,
) -> anyhow::Result<()>
where
    F: Fn(History) -> Fut,
    Fut: std::future::Future<Output = i64>,
{
    let deadline = Instant::now() + timeout;
    loop {
        let now = count(history.clone()).await;
        if now >= target {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("only {now} of {target} jobs recorded after {timeout:?}");
        }
        // Counting is a scan of the jobs table, outside the measured CPU.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Seeds a history with `rows` finished jobs and measures list queries through the API.
async fn history_queries(
    bin: &Path,
    rows: u64,
    database_url: Option<String>,
) -> anyhow::Result<()> {
    let dir = tempfile::Builder::new()
        .prefix("capstan-bench-history-")
        .tempdir()?;
    let database_url = database_url.unwrap_or_else(|| {
        format!(
            "sqlite://{}?mode=rwc",
            dir.path().join("history.db").display()
        )
    });
    let history = History::connect(&database_url).await?;
    eprintln!(
        "seeding {rows} jobs into {}",
        capstan_store::redact(&database_url)
    );
    let seeding = Instant::now();
    let node = NodeId::new("bench-1").expect("valid");
    let base_ms: u64 = 1_750_000_000_000;
    let mut batch = Vec::with_capacity(1000);
    for n in 0..rows {
        let status = match n % 20 {
            0 => JobStatus::Failed,
            1 => JobStatus::TimedOut,
            2 => JobStatus::Cancelled,
            _ => JobStatus::Succeeded,
        };
        let id = JobId::from(ulid::Ulid::from_parts(base_ms + n, u128::from(n)));
        let mut spec = JobSpec::shell("true");
        spec.name = Some(format!("job-{}", n % 100));
        spec.labels.insert(
            "zone".into(),
            if n % 2 == 0 { "eu".into() } else { "us".into() },
        );
        let at = Timestamp::from_millis(i64::try_from(base_ms + n).unwrap_or(0));
        let record = JobRecord::new(id, spec, at)
            .assigned(node.clone(), at)
            .started(capstan_protocol::InstanceId::generate(), at)
            .finished(
                &capstan_protocol::job::Outcome {
                    status,
                    exit_code: Some(i32::from(status != JobStatus::Succeeded)),
                    signal: None,
                    error: None,
                    output: OutputSummary::default(),
                },
                at,
            );
        let kind = JobEventKind::terminal(status).expect("terminal");
        batch.push(Sequenced {
            seq: n + 1,
            event: JobEvent::new(kind, &record),
        });
        if batch.len() == 1000 {
            history.apply(&batch).await?;
            batch.clear();
        }
    }
    history.apply(&batch).await?;
    eprintln!("seeded in {:.1} s", seeding.elapsed().as_secs_f64());

    let nats = NatsServer::start().await;
    let api_port = capstan_testkit::server::free_port();
    let mut env = vec![
        ("CAPSTAN_NATS_URL", nats.url()),
        ("CAPSTAN_DATABASE_URL", database_url.clone()),
    ];
    env.extend(api_credentials());
    let mut listening = env.clone();
    listening.push(("CAPSTAN_API_LISTEN", format!("127.0.0.1:{api_port}")));
    let api = spawn(&bin.join("capstan-api"), "api", &listening, dir.path())?;
    let http = logged_in(api_port, dir.path()).await?;

    println!();
    println!(
        "## History queries: {rows} jobs in {}",
        if database_url.starts_with("sqlite") {
            "SQLite"
        } else {
            "PostgreSQL"
        }
    );
    println!();
    println!("| query | p50 | p99 | max |");
    println!("|---|---|---|---|");
    for (label, path) in [
        (
            "status=failed, first page of 50",
            "/api/v1/jobs?status=failed&limit=50",
        ),
        (
            "status=succeeded, first page of 50",
            "/api/v1/jobs?status=succeeded&limit=50",
        ),
        (
            "status=failed & label zone=eu (every failed job is in eu)",
            "/api/v1/jobs?status=failed&label=zone%3Deu&limit=50",
        ),
        (
            "status=timed_out & label zone=eu (matches none: worst case)",
            "/api/v1/jobs?status=timed_out&label=zone%3Deu&limit=50",
        ),
        (
            "label zone=mars alone (matches none)",
            "/api/v1/jobs?label=zone%3Dmars&limit=50",
        ),
        ("no filter, first page of 50", "/api/v1/jobs?limit=50"),
    ] {
        let mut times = Vec::new();
        let mut next: Option<String> = None;
        for n in 0..200 {
            // Alternate first pages and deeper pages reached by the cursor.
            let url = match (&next, n % 4) {
                (Some(cursor), 1..=3) => format!("{path}&cursor={cursor}"),
                _ => path.to_owned(),
            };
            let sent = Instant::now();
            let reply = http.get(&url).await;
            times.push(sent.elapsed());
            if !reply.status.is_success() {
                bail!("{url}: {}", reply.text());
            }
            next = reply.json()["next_cursor"].as_str().map(str::to_owned);
        }
        times.sort();
        println!(
            "| {label} | {} | {} | {} |",
            ms(percentile(&times, 0.5)),
            ms(percentile(&times, 0.99)),
            ms(percentile(&times, 1.0))
        );
    }
    drop(api);
    // Every 97th seeded job, so that the reads by id spread over the whole history.
    let ids = (0..rows)
        .step_by(97)
        .map(|n| JobId::from(ulid::Ulid::from_parts(base_ms + n, u128::from(n))))
        .collect();
    crate::bench_rest::concurrent_reads(bin, &env, dir.path(), std::sync::Arc::new(ids)).await
}

/// The signing key and first administrator's password the benchmarked API is started with.
pub(crate) fn api_credentials() -> Vec<(&'static str, String)> {
    vec![
        ("CAPSTAN_JWT_KEY", capstan_api::TEST_JWT_KEY.to_owned()),
        (
            "CAPSTAN_ADMIN_PASSWORD",
            capstan_api::TEST_ADMIN_PASSWORD.to_owned(),
        ),
        ("CAPSTAN_RATE_LIMIT", "0".to_owned()),
    ]
}

/// Waits until the API on `port` is ready and logs in as its first administrator.
pub(crate) async fn logged_in(port: u16, logs: &Path) -> anyhow::Result<HttpClient> {
    let http = HttpClient::new(format!("http://127.0.0.1:{port}"));
    let started = Instant::now();
    while !http
        .try_get("/readyz")
        .await
        .is_ok_and(|r| r.status.is_success())
    {
        if started.elapsed() > Duration::from_secs(60) {
            bail!("the API did not become ready; logs in {}", logs.display());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(http.login("admin", capstan_api::TEST_ADMIN_PASSWORD).await)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_of_one_name_are_summed_and_a_nameless_one_is_named_unnamed() {
        let connz = serde_json::json!({
            "connections": [
                {"name": "capstan-executor-exec-1", "in_msgs": 10, "out_msgs": 7},
                {"name": "capstan-executor-exec-1", "in_msgs": 5, "out_msgs": 1},
                {"name": "", "in_msgs": 2, "out_msgs": 3},
                {"in_msgs": 1},
            ]
        });
        let counts = connection_counts(&connz);
        assert_eq!(counts.get("capstan-executor-exec-1"), Some(&(15, 8)));
        assert_eq!(counts.get("(unnamed)"), Some(&(3, 3)));
        assert_eq!(counts.len(), 2);
    }

    #[test]
    fn a_connz_document_without_connections_counts_nothing() {
        assert!(connection_counts(&serde_json::json!({"num_connections": 0})).is_empty());
    }
}
