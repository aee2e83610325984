//! `cargo xtask bench`: measures a fresh mesh built in release mode.
//!
//! - Throughput: N `true` jobs published as fast as JetStream takes them; the clock runs from
//!   the first submit to the moment the history database holds all N as succeeded.
//! - Latency: jobs sent one at a time on an idle mesh; submit → the job's `succeeded` event.
//! - CPU: seconds of CPU each process used during the throughput run, per job.
//! - History queries (`--history-rows`): `GET /api/v1/jobs?status=…` against a database
//!   seeded with that many jobs.
//! - Recovery (`--failover`, in `failover`): kill -9 → rerun elsewhere, cancel → group gone.
//! - Authentication (`--auth`): what the guard adds to `GET /api/v1/jobs/{id}` (the
//!   `auth` bench of `capstan-api`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use capstan_protocol::{
    JobEvent, JobEventKind, JobId, JobRecord, JobSpec, JobStatus, NodeId, OutputSummary, Timestamp,
    headers, subjects,
};
use capstan_store::{History, Sequenced};
use capstan_testkit::http::HttpClient;
use capstan_testkit::{NatsOptions, NatsServer};
use futures::StreamExt;

/// Options of `bench`.
#[derive(clap::Args)]
pub struct Args {
    /// Jobs in the throughput run.
    #[arg(long, default_value_t = 20_000)]
    jobs: usize,
    /// Jobs sent one at a time for the latency run.
    #[arg(long, default_value_t = 300)]
    latency_jobs: usize,
    /// Executors.
    #[arg(long, default_value_t = 3)]
    executors: u32,
    /// Slots per executor.
    #[arg(long, default_value_t = 16)]
    slots: u32,
    /// Schedulers.
    #[arg(long, default_value_t = 1)]
    schedulers: u32,
    /// Run NATS with `sync_interval: always` (fsync every write).
    #[arg(long)]
    durable: bool,
    /// Instead of the pipeline, measure history queries on a database seeded with this many
    /// jobs.
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
    /// Rounds of kill -9 in the failover run.
    #[arg(long, default_value_t = 3)]
    kills: usize,
    /// Rounds of cancel in the failover run.
    #[arg(long, default_value_t = 20)]
    cancels: usize,
    /// Instead of the pipeline, measure what authentication adds to a request:
    /// `GET /api/v1/jobs/{id}` with an access token against the same without the guard
    /// (`cargo bench -p capstan-api --bench auth`, optimised).
    #[arg(long)]
    auth: bool,
}

pub(crate) struct Process {
    pub(crate) name: String,
    pub(crate) child: Child,
}

impl Process {
    fn cpu_seconds(&self) -> f64 {
        cpu_seconds(self.child.id())
    }
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

/// User + system CPU seconds of `pid` so far.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let rest = stat.rfind(')').map_or("", |i| &stat[i + 1..]);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15: the 12th and 13th after the parenthesis.
    let ticks: f64 = [11, 12]
        .iter()
        .filter_map(|i| fields.get(*i)?.parse::<f64>().ok())
        .sum();
    // Linux reports in USER_HZ, 100 on every common configuration.
    ticks / 100.0
}

pub(crate) fn spawn(
    bin: &Path,
    name: &str,
    env: &[(&str, String)],
    logs: &Path,
) -> anyhow::Result<Process> {
    let log = std::fs::File::create(logs.join(format!("{name}.log")))?;
    let child = Command::new(bin)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .env("CAPSTAN_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::from(log.try_clone()?))
        .stderr(Stdio::from(log))
        .spawn()
        .with_context(|| format!("cannot start {}", bin.display()))?;
    Ok(Process {
        name: name.to_owned(),
        child,
    })
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
    eprintln!("building release binaries");
    let status = super::cargo()
        .current_dir(&root)
        .args(["build", "--release", "--locked", "--bins"])
        .status()?;
    if !status.success() {
        bail!("build failed");
    }
    let bin = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"))
        .join("release");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    match args.history_rows {
        Some(rows) => runtime.block_on(history_queries(&bin, rows, args.database_url.clone())),
        None if args.failover => runtime.block_on(crate::failover::run(
            &bin,
            args.durable,
            args.kills,
            args.cancels,
        )),
        None => runtime.block_on(pipeline(&bin, &args)),
    }
}

async fn pipeline(bin: &Path, args: &Args) -> anyhow::Result<()> {
    let nats = NatsServer::start_with(NatsOptions {
        sync_always: args.durable,
        max_payload: None,
    })
    .await;
    let dir = tempfile::Builder::new()
        .prefix("capstan-bench-")
        .tempdir()?;
    let database = dir.path().join("history.db");
    let database_url = format!("sqlite://{}?mode=rwc", database.display());
    let api_port = capstan_testkit::server::free_port();
    let base = vec![("CAPSTAN_NATS_URL", nats.url())];
    let mut processes = Vec::new();
    processes.push(spawn(
        &bin.join("capstan-registry"),
        "registry",
        &base,
        dir.path(),
    )?);
    for n in 1..=args.schedulers {
        processes.push(spawn(
            &bin.join("capstan-scheduler"),
            &format!("scheduler-{n}"),
            &base,
            dir.path(),
        )?);
    }
    for n in 1..=args.executors {
        let mut env = base.clone();
        env.push(("CAPSTAN_NODE_ID", format!("bench-{n}")));
        env.push(("CAPSTAN_SLOTS", args.slots.to_string()));
        env.push((
            "CAPSTAN_WORK_DIR",
            dir.path().join(format!("work-{n}")).display().to_string(),
        ));
        processes.push(spawn(
            &bin.join("capstan-executor"),
            &format!("executor-{n}"),
            &env,
            dir.path(),
        )?);
    }
    let mut env = base.clone();
    env.push(("CAPSTAN_DATABASE_URL", database_url.clone()));
    env.push(("CAPSTAN_API_LISTEN", format!("127.0.0.1:{api_port}")));
    env.extend(api_credentials());
    processes.push(spawn(&bin.join("capstan-api"), "api", &env, dir.path())?);

    let http = logged_in(api_port, dir.path()).await?;
    let client = nats.client().await;
    let js = async_nats::jetstream::new(client.clone());
    let history = History::connect(&database_url).await?;
    let ready = Instant::now();
    loop {
        let up = match http.try_get("/api/v1/nodes").await {
            Ok(nodes) => {
                nodes.status.is_success()
                    && nodes.json()["nodes"].as_array().is_some_and(|n| {
                        n.iter().filter(|n| n["status"] == "up").count() == args.executors as usize
                    })
            }
            Err(_) => false,
        };
        if up {
            break;
        }
        if ready.elapsed() > Duration::from_secs(60) {
            bail!("the mesh did not come up; logs in {}", dir.path().display());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let succeeded = |history: History| async move {
        history
            .status_counts()
            .await
            .ok()
            .and_then(|c| c.into_iter().find(|(s, _)| *s == JobStatus::Succeeded))
            .map_or(0, |(_, n)| n)
    };

    // Warm-up.
    publish_all(&js, 200).await?;
    wait_count(&history, 200, Duration::from_secs(120), succeeded).await?;

    // Throughput.
    let before: HashMap<String, f64> = processes
        .iter()
        .map(|p| (p.name.clone(), p.cpu_seconds()))
        .collect();
    let nats_before = nats_cpu(&nats);
    let start = Instant::now();
    publish_all(&js, args.jobs).await?;
    let submitted = start.elapsed();
    wait_count(
        &history,
        200 + args.jobs as i64,
        Duration::from_secs(900),
        succeeded,
    )
    .await?;
    let elapsed = start.elapsed();
    let per_job: Vec<(String, f64)> = processes
        .iter()
        .map(|p| {
            (
                p.name.clone(),
                (p.cpu_seconds() - before[&p.name]) / args.jobs as f64,
            )
        })
        .chain(std::iter::once((
            "nats-server".to_owned(),
            (nats_cpu(&nats) - nats_before) / args.jobs as f64,
        )))
        .collect();

    // Latency, one job at a time on the now idle mesh.
    let mut ends = client
        .subscribe(subjects::job_events_of_kind(JobEventKind::Succeeded))
        .await?;
    client.flush().await?;
    let mut latencies = Vec::with_capacity(args.latency_jobs);
    for _ in 0..args.latency_jobs {
        let id = JobId::generate();
        let mut map = async_nats::HeaderMap::new();
        map.insert(headers::JOB_ID, id.to_string().as_str());
        let sent = Instant::now();
        js.publish_with_headers(subjects::SUBMIT, map, r#"{"command": "true"}"#.into())
            .await?
            .await?;
        loop {
            let event = tokio::time::timeout(Duration::from_secs(30), ends.next())
                .await
                .context("a job did not finish within 30 s")?
                .context("subscription closed")?;
            if subjects::parse_job_event(&event.subject).is_some_and(|(job, _)| job == id) {
                break;
            }
        }
        latencies.push(sent.elapsed());
    }
    latencies.sort();

    println!();
    println!(
        "## Pipeline: {} `true` jobs, {} executors × {} slots, {} scheduler(s), NATS {}",
        args.jobs,
        args.executors,
        args.slots,
        args.schedulers,
        if args.durable {
            "sync_interval: always"
        } else {
            "default sync"
        }
    );
    println!();
    println!("| measure | value |");
    println!("|---|---|");
    println!(
        "| end-to-end throughput (first submit → last recorded in SQL) | {:.0} jobs/s |",
        args.jobs as f64 / elapsed.as_secs_f64()
    );
    println!(
        "| submission rate (publish with JetStream ack) | {:.0} jobs/s |",
        args.jobs as f64 / submitted.as_secs_f64()
    );
    println!("| total time | {:.2} s |", elapsed.as_secs_f64());
    println!(
        "| latency submit → succeeded, one at a time, p50 | {} |",
        ms(percentile(&latencies, 0.50))
    );
    println!("| latency p99 | {} |", ms(percentile(&latencies, 0.99)));
    println!("| latency max | {} |", ms(percentile(&latencies, 1.0)));
    println!();
    println!("| process | CPU per job |");
    println!("|---|---|");
    let mut total = 0.0;
    for (name, seconds) in &per_job {
        total += seconds;
        println!("| {name} | {:.1} µs |", seconds * 1e6);
    }
    println!("| all | {:.1} µs |", total * 1e6);
    drop(processes);
    Ok(())
}

fn nats_cpu(nats: &NatsServer) -> f64 {
    nats.pid().map_or(0.0, cpu_seconds)
}

async fn publish_all(js: &async_nats::jetstream::Context, count: usize) -> anyhow::Result<()> {
    let mut acks = futures::stream::FuturesUnordered::new();
    for _ in 0..count {
        let ack = js
            .publish(subjects::SUBMIT, r#"{"command": "true"}"#.into())
            .await?;
        acks.push(std::future::IntoFuture::into_future(ack));
        while acks.len() >= 512 {
            if let Some(ack) = acks.next().await {
                ack?;
            }
        }
    }
    while let Some(ack) = acks.next().await {
        ack?;
    }
    Ok(())
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
        // Counting is a scan of the jobs table: often enough for a precise end, seldom enough
        // not to take CPU from the mesh being measured.
        tokio::time::sleep(Duration::from_millis(200)).await;
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
        ("CAPSTAN_API_LISTEN", format!("127.0.0.1:{api_port}")),
    ];
    env.extend(api_credentials());
    let _api = spawn(&bin.join("capstan-api"), "api", &env, dir.path())?;
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
    Ok(())
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
