//! `cargo xtask bench --workflows N[,N…]`: how fast workflows move through the mesh `up` runs
//! (one registry, one scheduler, two executors, the API), and how long a step waits for the
//! steps before it.
//!
//! Every workflow is a diamond of `/bin/true` jobs, `a → (b, c) → d`, created over REST. For
//! each N, on a fresh mesh: first a few workflows one at a time, each waited for (the mesh
//! warms, and their hand-offs are those of an idle mesh); then N workflows created with 16
//! requests in flight and waited for until each has ended (its
//! `capstan.events.workflows.<id>.<status>` event, or its record when no event came). Every
//! workflow's record is then read from its bucket, and every step's job's record from the jobs
//! bucket: a step's hand-off is its job's acceptance (`created_at`) less the latest end
//! (`finished_at`) of the jobs it waited for, split at the moment the workflow's record saw
//! that last dependency end (its step's `ended_at`) and at the step's job's dispatch and start.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use async_nats::jetstream::kv::Store;
use capstan_protocol::workflow::{WorkflowRecord, WorkflowStatus};
use capstan_protocol::{JobId, JobRecord, Timestamp, subjects, topology};
use capstan_testkit::http::HttpClient;
use futures::StreamExt;
use serde_json::json;

use crate::bench::percentile;
use crate::small_mesh::SmallMesh;

/// Requests creating workflows in flight at once.
const IN_FLIGHT: usize = 16;

/// Workflows run one at a time before measuring.
const ONE_AT_A_TIME: usize = 20;

/// Steps in each workflow.
const STEPS: usize = 4;

/// How long the run waits without a workflow ending before it stops waiting.
const STALLED_AFTER: Duration = Duration::from_secs(60);

/// Runs the workflows benchmark for each count in `counts`.
pub async fn run(bin: &Path, counts: &[usize]) -> anyhow::Result<()> {
    let mut rows = Vec::new();
    for &count in counts {
        rows.push(one(bin, count).await?);
    }
    println!("## Workflows");
    println!();
    println!(
        "The default mesh, as `cargo xtask up --release` runs it (1 registry, 1 scheduler, \
         2 executors × {} slots, 1 API without its per-principal rate limit); each workflow a \
         diamond of `/bin/true` steps, a → (b, c) → d, created over REST with {IN_FLIGHT} \
         requests in flight. Hand-off: a step's job accepted (`created_at`) less the latest \
         `finished_at` of its dependencies' jobs, both from the jobs' records.",
        crate::up::DEFAULT_SLOTS
    );
    println!();
    println!(
        "| workflows | ended | succeeded | first POST → last end | workflows/s | step jobs/s | hand-off p50, p99, max | workflow p50, p99 | scheduler CPU per step | created per second (REST) |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for row in &rows {
        println!("{}", row.summary);
    }
    println!();
    println!(
        "Where the hand-off goes (p50, p99 of each part); \"idle\": {ONE_AT_A_TIME} workflows \
         run one at a time on the same mesh just before:"
    );
    println!();
    println!(
        "| workflows | dependency's job ended → the workflow's record saw it | → the step's job accepted | → placed (dispatched) | → process started | hand-off |"
    );
    println!("|---|---|---|---|---|---|");
    for row in &rows {
        println!("{}", row.idle);
        println!("{}", row.loaded);
    }
    println!();
    println!("CPU per step, by process:");
    println!();
    for row in &rows {
        println!("- {}", row.cpu);
    }
    Ok(())
}

/// One count's lines of the tables.
struct Row {
    summary: String,
    idle: String,
    loaded: String,
    cpu: String,
}

/// The diamond every workflow is.
fn diamond(name: &str) -> String {
    let job = json!({"argv": ["/bin/true"]});
    json!({
        "name": name,
        "steps": [
            {"name": "a", "job": job},
            {"name": "b", "job": job, "depends_on": ["a"]},
            {"name": "c", "job": job, "depends_on": ["a"]},
            {"name": "d", "job": job, "depends_on": ["b", "c"]},
        ],
    })
    .to_string()
}

/// Workflows ended so far, as their events announce them.
struct Ends {
    events: async_nats::Subscriber,
    ended: HashSet<String>,
}

impl Ends {
    async fn subscribe(client: &async_nats::Client) -> anyhow::Result<Self> {
        let events = client.subscribe(subjects::WORKFLOW_RUN_EVENTS_ALL).await?;
        client.flush().await?;
        Ok(Self {
            events,
            ended: HashSet::new(),
        })
    }

    /// Waits until every one of `ids` has ended, reading the records of those not heard of
    /// after a quiet spell (an event may be missed). Returns how many ended; stops waiting
    /// after [`STALLED_AFTER`] without one ending.
    async fn wait(&mut self, kv: &Store, ids: &[String]) -> usize {
        let wanted: HashSet<&str> = ids.iter().map(String::as_str).collect();
        let count = |ended: &HashSet<String>| {
            ended
                .iter()
                .filter(|id| wanted.contains(id.as_str()))
                .count()
        };
        let mut progress = Instant::now();
        let mut done = count(&self.ended);
        while done < ids.len() && progress.elapsed() < STALLED_AFTER {
            match tokio::time::timeout(Duration::from_secs(3), self.events.next()).await {
                Ok(Some(message)) => {
                    let mut tokens = message.subject.split('.').skip(3);
                    if let (Some(id), Some(status)) = (tokens.next(), tokens.next())
                        && status != WorkflowStatus::Running.as_str()
                    {
                        self.ended.insert(id.to_owned());
                    }
                }
                Ok(None) => break,
                Err(_) => {
                    // Quiet: read what the events did not say.
                    let unheard: Vec<&String> =
                        ids.iter().filter(|id| !self.ended.contains(*id)).collect();
                    for id in unheard {
                        if let Some(record) = workflow(kv, id).await
                            && record.status.is_terminal()
                        {
                            self.ended.insert(id.clone());
                        }
                    }
                }
            }
            let now = count(&self.ended);
            if now > done {
                done = now;
                progress = Instant::now();
            }
        }
        done
    }
}

/// Workflow `id`'s record, if it can be read.
async fn workflow(kv: &Store, id: &str) -> Option<WorkflowRecord> {
    let value = kv.get(id).await.ok()??;
    serde_json::from_slice(&value).ok()
}

/// Job `id`'s record, if it can be read.
async fn job(kv: &Store, id: JobId) -> Option<JobRecord> {
    let value = kv.get(id.to_string()).await.ok()??;
    serde_json::from_slice(&value).ok()
}

/// Creates `count` workflows named `<prefix>-<i>`, [`IN_FLIGHT`] requests at a time. Returns
/// their ids.
async fn create(http: &HttpClient, prefix: &str, count: usize) -> anyhow::Result<Vec<String>> {
    let created: Vec<anyhow::Result<String>> = futures::stream::iter(0..count)
        .map(|i| {
            let http = http.clone();
            async move {
                let name = format!("{prefix}-{i}");
                let reply = http.post_json("/api/v1/workflows", &diamond(&name)).await;
                if reply.status.as_u16() != 201 {
                    bail!("cannot create workflow {name}: {}", reply.text());
                }
                reply.json()["id"]
                    .as_str()
                    .map(str::to_owned)
                    .with_context(|| format!("workflow {name} came back without an id"))
            }
        })
        .buffer_unordered(IN_FLIGHT)
        .collect()
        .await;
    created.into_iter().collect()
}

/// The records of workflows `ids` that can be read, and of their steps' jobs.
async fn records(
    workflows: &Store,
    jobs: &Store,
    ids: &[String],
) -> (Vec<WorkflowRecord>, HashMap<JobId, JobRecord>) {
    let records: Vec<WorkflowRecord> = futures::stream::iter(ids)
        .map(|id| workflow(workflows, id))
        .buffer_unordered(32)
        .filter_map(|record| async move { record })
        .collect()
        .await;
    let step_jobs: Vec<JobId> = records
        .iter()
        .flat_map(|r| r.steps.iter().filter_map(|s| s.job))
        .collect();
    let job_records = futures::stream::iter(step_jobs)
        .map(|id| job(jobs, id))
        .buffer_unordered(32)
        .filter_map(|record| async move { record })
        .map(|record| (record.id, record))
        .collect()
        .await;
    (records, job_records)
}

/// Every dependant step's hand-off, whole and in parts, sorted.
#[derive(Default)]
struct HandOffs {
    /// The dependency's job ended → the step's job accepted.
    whole: Vec<Duration>,
    /// The dependency's job ended → the workflow's record saw it.
    heard: Vec<Duration>,
    /// → the step's job accepted.
    accepted: Vec<Duration>,
    /// → the step's job dispatched.
    placed: Vec<Duration>,
    /// → its process started.
    started: Vec<Duration>,
    /// Dependant steps whose jobs, or their dependencies' jobs, had no record.
    missing: usize,
}

impl HandOffs {
    fn of(records: &[WorkflowRecord], jobs: &HashMap<JobId, JobRecord>) -> Self {
        let mut hand_offs = Self::default();
        for record in records.iter().filter(|r| r.status.is_terminal()) {
            let index = record.spec.step_indices();
            for (i, step) in record.spec.steps.iter().enumerate() {
                if step.depends_on.is_empty() {
                    continue;
                }
                let this = record.steps[i].job.and_then(|j| jobs.get(&j));
                // The dependency whose job ended last, with when the workflow's record saw
                // its step end.
                let last = step
                    .depends_on
                    .iter()
                    .map(|name| {
                        let state = &record.steps[index[name.as_str()]];
                        let finished = state
                            .job
                            .and_then(|j| jobs.get(&j))
                            .and_then(|r| r.finished_at)?;
                        Some((finished, state.ended_at?))
                    })
                    .collect::<Option<Vec<_>>>()
                    .and_then(|ends| ends.into_iter().max_by_key(|(finished, _)| *finished));
                let (Some(this), Some((finished, seen))) = (this, last) else {
                    hand_offs.missing += 1;
                    continue;
                };
                hand_offs.whole.push(this.created_at.since(finished));
                hand_offs.heard.push(seen.since(finished));
                hand_offs.accepted.push(this.created_at.since(seen));
                if let Some(dispatched) = this.dispatched_at {
                    hand_offs.placed.push(dispatched.since(this.created_at));
                    if let Some(process) = this.started_at {
                        hand_offs.started.push(process.since(dispatched));
                    }
                }
            }
        }
        for list in [
            &mut hand_offs.whole,
            &mut hand_offs.heard,
            &mut hand_offs.accepted,
            &mut hand_offs.placed,
            &mut hand_offs.started,
        ] {
            list.sort();
        }
        hand_offs
    }

    /// A line of the parts table.
    fn line(&self, label: &str) -> String {
        format!(
            "| {label} | {} | {} | {} | {} | {} |",
            pair(&self.heard),
            pair(&self.accepted),
            pair(&self.placed),
            pair(&self.started),
            pair(&self.whole),
        )
    }
}

/// Whole milliseconds (the records' timestamps are).
fn millis(duration: Duration) -> u128 {
    duration.as_millis()
}

/// p50 and p99 of `sorted`.
fn pair(sorted: &[Duration]) -> String {
    format!(
        "{}, {} ms",
        millis(percentile(sorted, 0.50)),
        millis(percentile(sorted, 0.99))
    )
}

async fn one(bin: &Path, count: usize) -> anyhow::Result<Row> {
    // One administrator creates every workflow: the API's per-principal rate limit is off
    // for that, as in the schedules run.
    let mesh = SmallMesh::start(bin, "capstan-bench-workflows-", 2, 0, |name, command| {
        if name.starts_with("api") {
            command.env("CAPSTAN_RATE_LIMIT", "0");
        }
    })
    .await?;
    eprintln!(
        "the default mesh, as `cargo xtask up --release` runs it (1 registry, 1 scheduler, \
         2 executors × {} slots, 1 API without its per-principal rate limit); {count} \
         workflows of {STEPS} steps",
        crate::up::DEFAULT_SLOTS
    );
    let js = async_nats::jetstream::new(mesh.client.clone());
    let workflows = js.get_key_value(topology::WORKFLOWS.name).await?;
    let jobs = js.get_key_value(topology::JOBS.name).await?;
    let mut ends = Ends::subscribe(&mesh.client).await?;

    // One at a time: the mesh warms, and the hand-offs are an idle mesh's.
    let mut singles = Vec::new();
    for i in 0..ONE_AT_A_TIME {
        let id = create(&mesh.http, &format!("idle-{i}"), 1).await?;
        if ends.wait(&workflows, &id).await < 1 {
            bail!("workflow idle-{i} did not end");
        }
        singles.extend(id);
    }
    let (idle_records, idle_jobs) = records(&workflows, &jobs, &singles).await;
    let idle = HandOffs::of(&idle_records, &idle_jobs);

    let cpu_of = |mesh: &SmallMesh| -> Vec<(String, f64)> {
        mesh.processes
            .iter()
            .map(|p| (p.name.clone(), crate::bench::cpu_seconds(p.child.id())))
            .collect()
    };
    let cpu_before = cpu_of(&mesh);
    let first_post = Timestamp::now();
    let creating = Instant::now();
    let ids = create(&mesh.http, "bench", count).await?;
    let create_rate = count as f64 / creating.elapsed().as_secs_f64();
    let ended = ends.wait(&workflows, &ids).await;
    let cpu_after = cpu_of(&mesh);
    let (records, job_records) = records(&workflows, &jobs, &ids).await;
    drop(mesh);

    let steps = STEPS * count;
    let used: Vec<(String, f64)> = cpu_after
        .iter()
        .zip(&cpu_before)
        .map(|((name, after), (_, before))| (name.clone(), after - before))
        .collect();
    let per_step = |seconds: f64| seconds * 1e6 / steps as f64;
    let scheduler_cpu = used
        .iter()
        .find(|(name, _)| name == "scheduler-1")
        .map_or(0.0, |(_, seconds)| per_step(*seconds));
    let terminal: Vec<&WorkflowRecord> =
        records.iter().filter(|r| r.status.is_terminal()).collect();
    let succeeded = terminal
        .iter()
        .filter(|r| r.status == WorkflowStatus::Succeeded)
        .count();
    let last_end = terminal.iter().filter_map(|r| r.finished_at).max();
    let wall = last_end.map_or(Duration::ZERO, |end| end.since(first_post));
    let mut latency: Vec<Duration> = terminal
        .iter()
        .filter_map(|r| Some(r.finished_at?.since(r.created_at)))
        .collect();
    latency.sort();
    let loaded = HandOffs::of(&records, &job_records);
    if ended < count {
        eprintln!(
            "{} workflows had not ended {} s after the last one did",
            count - ended,
            STALLED_AFTER.as_secs()
        );
    }
    if idle.missing + loaded.missing > 0 {
        eprintln!(
            "{} dependant steps left out: their jobs' records were gone",
            idle.missing + loaded.missing
        );
    }
    let seconds = wall.as_secs_f64().max(f64::EPSILON);
    Ok(Row {
        summary: format!(
            "| {count} | {} | {succeeded} | {:.2} s | {:.0} | {:.0} | {}, {}, {} ms | {}, {} ms | {scheduler_cpu:.0} µs | {create_rate:.0} |",
            terminal.len(),
            wall.as_secs_f64(),
            count as f64 / seconds,
            steps as f64 / seconds,
            millis(percentile(&loaded.whole, 0.50)),
            millis(percentile(&loaded.whole, 0.99)),
            millis(loaded.whole.last().copied().unwrap_or_default()),
            millis(percentile(&latency, 0.50)),
            millis(percentile(&latency, 0.99)),
        ),
        idle: idle.line(&format!("idle (before {count})")),
        loaded: loaded.line(&count.to_string()),
        cpu: format!(
            "{count} workflows: {}",
            used.iter()
                .map(|(name, seconds)| format!("{name} {:.0} µs", per_step(*seconds)))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    })
}
