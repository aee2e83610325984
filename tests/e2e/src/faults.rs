//! The fault suite's harness: a load that keeps submitting jobs (over REST, the create
//! endpoint and plain JetStream publishes) while a test injects a fault, and the [`check`]
//! that every scenario ends with.
//!
//! The check holds the mesh to what it promises whatever was killed, stopped or restarted:
//!
//! - every accepted job, and every job the jobs bucket knows of, reaches a terminal status,
//!   and the events stream holds exactly one terminal event for it, of that status and attempt;
//! - each job's command ran (counted by the side-effect file its command appends to, not by
//!   Capstan's records) at least once if it succeeded, and never more often than it had
//!   attempts: one run per attempt at most;
//! - no job process is left behind: none of the processes whose environment marks them as a
//!   job of this test's executors survives its job;
//! - the SQL history, as the API lists it, equals the jobs bucket: the same jobs, with the
//!   same status, attempt, node and exit code;
//! - every fan-out has ended, each of its targets names one job, a child of it, whose status
//!   the target shows; no other job names it as its parent (a target never runs as a second
//!   job: its reruns are attempts of its one job, each lost one recorded); and its outcome is
//!   the aggregate of its targets ([`fanout_differences`]).
//!
//! It leaves the scenarios themselves (which processes run, what is injected when) to
//! `tests/faults.rs`, and starting processes to [`Cluster`].

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use async_nats::jetstream::consumer::pull::OrderedConfig;
use capstan_mesh::Mesh;
use capstan_protocol::job_env;
use capstan_protocol::reply::Created;
use capstan_protocol::{
    JobEvent, JobEventKind, JobId, JobRecord, JobStatus, Reply, headers, subjects, topology,
};
use capstan_testkit::http::HttpClient;
use capstan_testkit::{POLL_INTERVAL, wait_until};
use futures::StreamExt;

use crate::Cluster;

/// How long the check waits for jobs to end, for their events, for leftover processes to go
/// and for the history to catch up. Generous: each wait returns as soon as its condition holds.
pub const SETTLE_TIMEOUT: Duration = Duration::from_secs(180);

/// How long job processes may outlive their jobs (the executor kills a group after its leader
/// exits, and a zombie executor kills its orphans once it runs again).
pub const LEFTOVER_GRACE: Duration = Duration::from_secs(30);

/// The environment variable that runs the long randomized soak instead of its short CI round,
/// and the full-size versions of the scenarios that have one.
pub const SOAK_ENV: &str = "CAPSTAN_SOAK";

/// True when [`SOAK_ENV`] is set to something other than `0` or empty.
pub fn soak_enabled() -> bool {
    std::env::var(SOAK_ENV).is_ok_and(|value| !value.is_empty() && value != "0")
}

/// Gives every API process started from now on one shared SQLite history, as API replicas
/// share one database in a deployment (by default [`Cluster::api`] gives each its own file,
/// and replicas sharing the `api-history` consumer would each hold only part of the history).
/// Call it before starting the APIs.
pub fn share_history(cluster: &mut Cluster) -> PathBuf {
    let path = cluster.dir().join("history.db");
    cluster.set_env(
        "CAPSTAN_DATABASE_URL",
        format!("sqlite://{}?mode=rwc", path.display()),
    );
    path
}

/// How a job is submitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Via {
    /// `POST /api/v1/jobs` on one of the load's APIs.
    Rest,
    /// A `capstan.jobs.create` request.
    Create,
    /// A JetStream publish on `capstan.jobs.submit` with a `Capstan-Job-Id` header,
    /// accepted once the stream acknowledges it.
    Publish,
}

impl Via {
    /// Every way, in the order a load cycles through them.
    pub const ALL: [Via; 3] = [Via::Rest, Via::Create, Via::Publish];
}

/// What to submit and how.
#[derive(Clone)]
pub struct LoadPlan {
    /// Jobs in all.
    pub count: usize,
    /// Submissions in flight at once.
    pub concurrency: usize,
    /// The ways jobs are submitted, cycled through job by job.
    pub vias: Vec<Via>,
    /// Base URLs of the APIs REST submissions go to, cycled through.
    pub apis: Vec<String>,
    /// The spec of job number `i`, as JSON.
    pub spec: Arc<dyn Fn(usize) -> serde_json::Value + Send + Sync>,
}

impl LoadPlan {
    /// `count` jobs running `command`, submitted every way (REST only when `apis` is not
    /// empty), 16 at a time.
    pub fn commands(count: usize, apis: &[String], command: String) -> Self {
        let vias = Via::ALL
            .into_iter()
            .filter(|via| *via != Via::Rest || !apis.is_empty())
            .collect();
        Self {
            count,
            concurrency: 16,
            vias,
            apis: apis.to_vec(),
            spec: Arc::new(move |_| serde_json::json!({ "command": command })),
        }
    }
}

/// Submissions running in the background. Submissions that fail (the API or NATS is down,
/// a request times out) are counted, not retried: a job is "accepted" only when its submission
/// was acknowledged, and only accepted jobs are owed a result. A failed submission may still
/// have been stored; [`check`] finds such jobs in the jobs bucket and holds them to the same
/// rules.
pub struct Load {
    accepted: Arc<AtomicUsize>,
    refused: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<Vec<JobId>>,
}

impl Load {
    /// Starts submitting `plan` on `cluster`'s server.
    pub async fn start(cluster: &Cluster, plan: LoadPlan) -> Self {
        assert!(!plan.vias.is_empty(), "a load needs a way to submit");
        assert!(
            !plan.vias.contains(&Via::Rest) || !plan.apis.is_empty(),
            "REST submissions need an API"
        );
        let submitter = Submitter::new(cluster, &plan.apis).await;
        let accepted = Arc::new(AtomicUsize::new(0));
        let refused = Arc::new(AtomicUsize::new(0));
        let next = Arc::new(AtomicUsize::new(0));
        let plan = Arc::new(plan);
        let mut workers = Vec::new();
        for _ in 0..plan.concurrency.max(1) {
            let (submitter, plan) = (submitter.clone(), plan.clone());
            let (accepted, refused, next) = (accepted.clone(), refused.clone(), next.clone());
            workers.push(tokio::spawn(async move {
                let mut ids = Vec::new();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= plan.count {
                        return ids;
                    }
                    let via = plan.vias[i % plan.vias.len()];
                    let body = (plan.spec)(i).to_string();
                    match submitter.submit(via, i, &body).await {
                        Ok(created) => {
                            ids.push(created.id);
                            accepted.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(_) => {
                            refused.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            }));
        }
        let task = tokio::spawn(async move {
            let mut ids = Vec::new();
            for worker in workers {
                ids.extend(worker.await.expect("a load worker panicked"));
            }
            ids
        });
        Self {
            accepted,
            refused,
            task,
        }
    }

    /// Submissions acknowledged so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::Relaxed)
    }

    /// Submissions that failed so far.
    pub fn refused(&self) -> usize {
        self.refused.load(Ordering::Relaxed)
    }

    /// Waits until at least `count` submissions were acknowledged.
    pub async fn wait_accepted(&self, count: usize) {
        wait_until(
            &format!("{count} submissions to be accepted"),
            SETTLE_TIMEOUT,
            || async { (self.accepted() >= count).then_some(()) },
        )
        .await;
    }

    /// Waits for every submission to be made and returns the ids of the accepted jobs.
    pub async fn finish(self) -> Vec<JobId> {
        self.task.await.expect("the load panicked")
    }
}

/// Submits single jobs every way; shared by the load and by tests that race submissions.
#[derive(Clone)]
pub struct Submitter {
    client: async_nats::Client,
    js: jetstream::Context,
    apis: Vec<HttpClient>,
}

impl Submitter {
    /// Submits to `cluster`'s server, and over REST to `apis`.
    pub async fn new(cluster: &Cluster, apis: &[String]) -> Self {
        let client = cluster.client().await;
        Self {
            js: jetstream::new(client.clone()),
            client,
            apis: apis.iter().map(|api| cluster.http(api)).collect(),
        }
    }

    /// Submits the JSON spec `body` by `via` (REST goes to API number `i` modulo the APIs) and
    /// returns what the submission was answered, or why it failed.
    pub async fn submit(&self, via: Via, i: usize, body: &str) -> Result<Created, String> {
        match via {
            Via::Rest => {
                let http = self
                    .apis
                    .get(i % self.apis.len().max(1))
                    .ok_or("no API to submit to")?;
                // The harness's client takes an `http::Method`, a crate this library does not
                // name: the type is inferred from the parameter.
                let post = "POST".parse().expect("POST is a method");
                let reply = http
                    .try_send(
                        post,
                        "/api/v1/jobs",
                        &[("content-type", "application/json")],
                        body.to_owned(),
                    )
                    .await?;
                if !reply.status.is_success() {
                    return Err(format!("{}: {}", reply.status, reply.text()));
                }
                let created: serde_json::Value =
                    serde_json::from_slice(&reply.body).map_err(|e| e.to_string())?;
                let id = created["id"]
                    .as_str()
                    .and_then(|id| id.parse::<JobId>().ok())
                    .ok_or_else(|| format!("no job id in {created}"))?;
                Ok(Created {
                    id,
                    duplicate: created["duplicate"] == true,
                })
            }
            Via::Create => {
                let reply = self
                    .client
                    .request(subjects::CREATE, body.to_owned().into())
                    .await
                    .map_err(|e| e.to_string())?;
                let reply: Reply<Created> =
                    serde_json::from_slice(&reply.payload).map_err(|e| e.to_string())?;
                reply.into_result().map_err(|e| e.to_string())
            }
            Via::Publish => {
                let id = JobId::generate();
                let mut map = async_nats::HeaderMap::new();
                map.insert(headers::JOB_ID, id.to_string().as_str());
                self.js
                    .publish_with_headers(subjects::SUBMIT, map, body.to_owned().into())
                    .await
                    .map_err(|e| e.to_string())?
                    .await
                    .map_err(|e| e.to_string())?;
                Ok(Created {
                    id,
                    duplicate: false,
                })
            }
        }
    }
}

/// What a passed check saw, for the test's output.
#[derive(Debug, Clone, Default)]
pub struct Summary {
    /// Jobs checked: the accepted ones and any other the jobs bucket held.
    pub jobs: usize,
    /// Jobs per final status.
    pub statuses: BTreeMap<String, usize>,
    /// Real runs counted in the side-effect file.
    pub runs: usize,
    /// Jobs that needed more than one attempt.
    pub retried: usize,
    /// Jobs in the bucket that no acknowledged submission named.
    pub unacknowledged: usize,
}

impl Summary {
    /// Jobs that ended in `status`.
    pub fn count(&self, status: JobStatus) -> usize {
        self.statuses.get(status.as_str()).copied().unwrap_or(0)
    }
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} jobs ({} not acknowledged to their submitter), {} runs, {} retried, by status {:?}",
            self.jobs, self.unacknowledged, self.runs, self.retried, self.statuses
        )
    }
}

/// Runs the checks described in the module documentation on `cluster`, with `api` (a base
/// URL) as the reader of the SQL history, for the jobs in `accepted` and every other job in
/// the jobs bucket. Panics listing every violation found.
pub async fn check(cluster: &mut Cluster, api: &str, accepted: &[JobId]) -> Summary {
    // A fresh connection: the cluster's cached one may have lived through a server restart.
    let mesh = Mesh::open(cluster.client().await)
        .await
        .expect("the mesh opens for the check");
    let records = wait_all_terminal(cluster, &mesh, accepted).await;
    let mut violations = Vec::new();

    // (a) Exactly one terminal event per job, matching its record.
    let events = terminal_events(&mesh.js, &records).await;
    violations.extend(events.violations);
    for (id, record) in &records {
        let ends = events.by_job.get(id).map(Vec::as_slice).unwrap_or(&[]);
        match ends {
            [] => violations.push(format!("{id}: no terminal event ({})", describe(record))),
            [end] => {
                if JobEventKind::terminal(record.status) != Some(end.kind)
                    || end.attempt != record.attempt
                {
                    violations.push(format!(
                        "{id}: terminal event {} of attempt {} does not match the record ({})",
                        end.kind,
                        end.attempt,
                        describe(record)
                    ));
                }
            }
            more => violations.push(format!(
                "{id}: {} terminal events ({}) for one job ({})",
                more.len(),
                more.iter()
                    .map(|end| format!("{} of attempt {}", end.kind, end.attempt))
                    .collect::<Vec<_>>()
                    .join(", "),
                describe(record)
            )),
        }
    }

    // (b) Real runs, counted by the side-effect file: at least one for a success, never more
    // than one per attempt.
    let runs = cluster.runs();
    for (line, count) in &runs {
        match line.parse::<JobId>() {
            Ok(id) if records.contains_key(&id) => {}
            _ => violations.push(format!(
                "the runs file names `{line}` ({count} runs), which is no job of this test"
            )),
        }
    }
    let mut summary = Summary {
        jobs: records.len(),
        runs: runs.values().sum(),
        ..Summary::default()
    };
    let accepted_set: HashSet<JobId> = accepted.iter().copied().collect();
    for (id, record) in &records {
        let ran = runs.get(&id.to_string()).copied().unwrap_or(0);
        if record.status == JobStatus::Succeeded && ran == 0 {
            violations.push(format!(
                "{id}: succeeded without running ({})",
                describe(record)
            ));
        }
        if ran > record.attempt as usize {
            violations.push(format!(
                "{id}: ran {ran} times in {} attempts ({})",
                record.attempt,
                describe(record)
            ));
        }
        *summary
            .statuses
            .entry(record.status.as_str().to_owned())
            .or_default() += 1;
        summary.retried += usize::from(record.attempt > 1);
        summary.unacknowledged += usize::from(!accepted_set.contains(id));
    }

    // (c) No job process outlives its job.
    let work = work_root(cluster);
    let deadline = Instant::now() + LEFTOVER_GRACE;
    let leftovers = loop {
        let leftovers = job_processes(&work);
        if leftovers.is_empty() || Instant::now() >= deadline {
            break leftovers;
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    };
    for process in &leftovers {
        violations.push(format!("left behind after {LEFTOVER_GRACE:?}: {process}"));
    }

    // (d) The SQL history equals the jobs bucket.
    violations.extend(history_differences(&cluster.http(api), &records).await);

    // (e) Fan-outs agree with their targets' jobs.
    violations.extend(fanout_differences(&mesh, &records).await);

    if !violations.is_empty() {
        let shown = violations.len().min(40);
        panic!(
            "the fault check found {} violations (first {shown}):\n{}\n(checked: {summary})",
            violations.len(),
            violations[..shown].join("\n")
        );
    }
    summary
}

/// What is wrong with the fan-outs in the bucket, given every job's final record: waits (up
/// to [`SETTLE_TIMEOUT`]) for every parent to end, then checks each against its targets' jobs.
pub async fn fanout_differences(mesh: &Mesh, records: &HashMap<JobId, JobRecord>) -> Vec<String> {
    use capstan_protocol::fanout::{FanOutStatus, TargetStatus};
    let deadline = Instant::now() + SETTLE_TIMEOUT;
    let parents = loop {
        match mesh.fanouts.values().await {
            Ok(parents) if parents.iter().all(|p| p.value.status.is_terminal()) => break parents,
            Ok(parents) if Instant::now() >= deadline => {
                return parents
                    .iter()
                    .filter(|p| !p.value.status.is_terminal())
                    .map(|p| {
                        format!(
                            "fan-out {}: still running: {:?}",
                            p.value.id,
                            p.value.tally()
                        )
                    })
                    .collect();
            }
            Err(error) if Instant::now() >= deadline => {
                return vec![format!("cannot read the fan-outs: {error}")];
            }
            _ => tokio::time::sleep(POLL_INTERVAL).await,
        }
    };
    let mut violations = Vec::new();
    let mut named = HashSet::new();
    for parent in parents.iter().map(|p| &p.value) {
        let id = parent.id;
        let mut succeeded = 0;
        for target in &parent.targets {
            succeeded += usize::from(target.status == TargetStatus::Succeeded);
            let Some(job) = target.job else {
                if target.status != TargetStatus::Skipped {
                    violations.push(format!(
                        "fan-out {id}: target {} has no job but is {}",
                        target.name,
                        target.status.as_str()
                    ));
                }
                continue;
            };
            named.insert(job);
            match records.get(&job) {
                None if target.error.is_some() => {}
                None => violations.push(format!(
                    "fan-out {id}: target {}'s job {job} is in no record",
                    target.name
                )),
                Some(record) => {
                    if record.spec.fanout_parent() != Some(id) {
                        violations.push(format!(
                            "fan-out {id}: target {}'s job {job} names another parent",
                            target.name
                        ));
                    }
                    if TargetStatus::from(record.status) != target.status {
                        violations.push(format!(
                            "fan-out {id}: target {} shows {} but its job {job} is {}",
                            target.name,
                            target.status.as_str(),
                            record.status
                        ));
                    }
                }
            }
        }
        let expected = if parent.cancel_requested_at.is_some() {
            FanOutStatus::Cancelled
        } else if succeeded == parent.targets.len() {
            FanOutStatus::Succeeded
        } else if succeeded == 0 {
            FanOutStatus::Failed
        } else {
            FanOutStatus::Partial
        };
        if parent.status != expected {
            violations.push(format!(
                "fan-out {id}: ended {} but its targets make it {} ({:?})",
                parent.status.as_str(),
                expected.as_str(),
                parent.tally()
            ));
        }
    }
    for (job, record) in records {
        if let Some(parent) = record.spec.fanout_parent()
            && !named.contains(job)
        {
            violations.push(format!(
                "job {job} names fan-out {parent} as its parent, but no target of it names the job"
            ));
        }
    }
    violations
}

fn describe(record: &JobRecord) -> String {
    format!(
        "{} attempt {} on {} exit {:?} error {:?}",
        record.status,
        record.attempt,
        record.node.as_ref().map_or("no node", |n| n.as_str()),
        record.exit_code,
        record.error
    )
}

/// Every record in the jobs bucket, read in one pass (a watch delivers the last value of every
/// key, then says it has nothing more).
pub async fn job_records(mesh: &Mesh) -> Result<HashMap<JobId, JobRecord>, String> {
    let js = &mesh.js;
    let stored = js
        .get_stream(format!("KV_{}", topology::JOBS.name))
        .await
        .map_err(|e| e.to_string())?
        .info()
        .await
        .map_err(|e| e.to_string())?
        .state
        .messages;
    let mut records = HashMap::new();
    if stored == 0 {
        return Ok(records);
    }
    // `watch_all` starts at new entries; with history it starts at every key's last value.
    let mut watch = mesh
        .jobs
        .kv()
        .watch_with_history(">")
        .await
        .map_err(|e| e.to_string())?;
    loop {
        let entry = match tokio::time::timeout(Duration::from_secs(5), watch.next()).await {
            Ok(Some(Ok(entry))) => entry,
            Ok(Some(Err(error))) => return Err(error.to_string()),
            Ok(None) => return Err("the jobs watch ended".into()),
            // Every entry left was deleted or expired between the count and the watch.
            Err(_) if records.is_empty() => return Ok(records),
            Err(_) => return Err("the jobs watch went quiet before the last entry".into()),
        };
        if entry.operation == async_nats::jetstream::kv::Operation::Put
            && let Ok(id) = entry.key.parse::<JobId>()
        {
            let record = mesh
                .jobs
                .decode(&entry.key, &entry.value)
                .map_err(|e| e.to_string())?;
            records.insert(id, record);
        } else {
            records.retain(|id, _| id.to_string() != entry.key);
        }
        if entry.delta == 0 {
            return Ok(records);
        }
    }
}

/// Waits until every job in `accepted` and in the bucket is terminal; returns their records.
async fn wait_all_terminal(
    cluster: &Cluster,
    mesh: &Mesh,
    accepted: &[JobId],
) -> HashMap<JobId, JobRecord> {
    let deadline = Instant::now() + SETTLE_TIMEOUT;
    let mut last = HashMap::new();
    loop {
        if let Ok(records) = job_records(mesh).await {
            let missing: Vec<JobId> = accepted
                .iter()
                .filter(|id| !records.contains_key(id))
                .copied()
                .collect();
            let unfinished: Vec<&JobRecord> = records
                .values()
                .filter(|record| !record.status.is_terminal())
                .collect();
            if missing.is_empty() && unfinished.is_empty() {
                return records;
            }
            if Instant::now() >= deadline {
                let mut report: Vec<String> = missing
                    .iter()
                    .take(10)
                    .map(|id| format!("{id}: accepted, but not in the jobs bucket"))
                    .collect();
                report.extend(
                    unfinished
                        .iter()
                        .take(10)
                        .map(|record| format!("{}: {}", record.id, describe(record))),
                );
                report.push(cluster.dispatch_state().await);
                panic!(
                    "after {SETTLE_TIMEOUT:?}, {} accepted jobs were never created and {} of {} \
                     jobs are not terminal:\n{}",
                    missing.len(),
                    unfinished.len(),
                    records.len(),
                    report.join("\n")
                );
            }
            last = records;
        } else if Instant::now() >= deadline {
            panic!(
                "the jobs bucket could not be read for {SETTLE_TIMEOUT:?} ({} records last seen)",
                last.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// An event that ended a job, as stored.
#[derive(Debug, Clone, Copy)]
struct End {
    kind: JobEventKind,
    attempt: u32,
}

struct Ends {
    by_job: HashMap<JobId, Vec<End>>,
    violations: Vec<String>,
}

/// Reads the job events in the events stream until every job in `records` has a terminal
/// event and the stream has nothing newer, collecting the terminal events per job.
async fn terminal_events(js: &jetstream::Context, records: &HashMap<JobId, JobRecord>) -> Ends {
    let mut ends = Ends {
        by_job: HashMap::new(),
        violations: Vec::new(),
    };
    let stream = js
        .get_stream(topology::EVENTS.name)
        .await
        .expect("the events stream exists");
    let consumer = stream
        .create_consumer(OrderedConfig {
            filter_subject: subjects::JOB_EVENTS_ALL.to_owned(),
            ..Default::default()
        })
        .await
        .expect("an ordered consumer on the events stream");
    let mut messages = consumer.messages().await.expect("events flow");
    let deadline = Instant::now() + SETTLE_TIMEOUT;
    let mut caught_up = false;
    loop {
        match tokio::time::timeout(Duration::from_millis(500), messages.next()).await {
            Ok(Some(Ok(message))) => {
                caught_up = message.info().is_ok_and(|info| info.pending == 0);
                let Some((job, kind)) = subjects::parse_job_event(&message.subject) else {
                    continue;
                };
                if !records.contains_key(&job) {
                    continue; // e.g. the fault tests' malformed events about no real job
                }
                let Some(kind) = JobEventKind::ALL.into_iter().find(|k| k.as_str() == kind) else {
                    ends.violations
                        .push(format!("{job}: an event of unknown kind `{kind}`"));
                    continue;
                };
                if !kind.is_terminal() {
                    continue;
                }
                match capstan_mesh::wire::decode::<JobEvent>(
                    message.headers.as_ref(),
                    &message.payload,
                ) {
                    Ok((event, _)) => ends.by_job.entry(job).or_default().push(End {
                        kind,
                        attempt: event.record.attempt,
                    }),
                    Err(error) => ends
                        .violations
                        .push(format!("{job}: an undecodable {kind} event: {error}")),
                }
            }
            Ok(Some(Err(error))) => {
                // The ordered consumer recreates itself after a gap; note it and read on.
                eprintln!("[faults] reading the events stream: {error}");
            }
            Ok(None) => panic!("the events stream's consumer ended"),
            Err(_) => caught_up = true, // nothing newer for half a second
        }
        if caught_up && records.keys().all(|id| ends.by_job.contains_key(id)) {
            return ends;
        }
        if Instant::now() >= deadline {
            let missing: Vec<String> = records
                .keys()
                .filter(|id| !ends.by_job.contains_key(id))
                .take(10)
                .map(ToString::to_string)
                .collect();
            ends.violations.push(format!(
                "after {SETTLE_TIMEOUT:?} some jobs still have no terminal event, e.g. {missing:?}"
            ));
            return ends;
        }
    }
}

/// The root under which this test's executors give jobs their directories (see
/// [`Cluster::executor`]).
pub fn work_root(cluster: &Cluster) -> PathBuf {
    cluster.dir().join("work")
}

/// A live process of a job.
#[derive(Debug, Clone)]
pub struct JobProcess {
    /// Its pid.
    pub pid: u32,
    /// `CAPSTAN_JOB_ID`.
    pub job: String,
    /// `CAPSTAN_ATTEMPT`.
    pub attempt: Option<u32>,
    /// `CAPSTAN_NODE_ID`.
    pub node: String,
    /// Its command line.
    pub command: String,
}

impl fmt::Display for JobProcess {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "pid {} of job {} attempt {:?} on {}: {}",
            self.pid, self.job, self.attempt, self.node, self.command
        )
    }
}

/// The live (not zombie) processes whose environment marks them as jobs run under `work_root`:
/// `CAPSTAN_JOB_ID` set and `CAPSTAN_WORK_DIR` below `work_root`. Executors set both for a job
/// and its children inherit them (the same marks a restarted executor looks for).
pub fn job_processes(work_root: &Path) -> Vec<JobProcess> {
    let prefix = format!("{}/", work_root.display());
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let own = std::process::id();
    let mut found = Vec::new();
    for pid in entries
        .filter_map(Result::ok)
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| *pid != own)
    {
        let dir = PathBuf::from(format!("/proc/{pid}"));
        let Ok(environ) = std::fs::read(dir.join("environ")) else {
            continue;
        };
        let text = |name: &str| {
            job_env::lookup(&environ, name).map(|value| String::from_utf8_lossy(value).into_owned())
        };
        let job = text(job_env::JOB_ID);
        let attempt = text(job_env::ATTEMPT).and_then(|value| value.parse().ok());
        let node = text(job_env::NODE_ID).unwrap_or_default();
        let under = text(job_env::WORK_DIR).is_some_and(|dir| dir.starts_with(&prefix));
        let (Some(job), true) = (job, under) else {
            continue;
        };
        let stat = std::fs::read_to_string(dir.join("stat")).unwrap_or_default();
        let state = stat
            .rfind(')')
            .and_then(|end| stat[end + 1..].split_whitespace().next());
        if matches!(state, None | Some("Z") | Some("X")) {
            continue; // exited: a zombie holds nothing
        }
        let command = std::fs::read(dir.join("cmdline"))
            .map(|raw| {
                String::from_utf8_lossy(&raw)
                    .split('\0')
                    .filter(|part| !part.is_empty())
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .unwrap_or_default();
        found.push(JobProcess {
            pid,
            job,
            attempt,
            node,
            command,
        });
    }
    found
}

/// Waits until no process of a superseded or finished attempt runs: one whose job's record has
/// moved to a later attempt, or ended. Returns how many such processes were seen at first.
pub async fn wait_stale_attempts_gone(cluster: &mut Cluster, timeout: Duration) -> usize {
    let mesh = cluster.mesh().await;
    let work = work_root(cluster);
    let mut first = None;
    let deadline = Instant::now() + timeout;
    loop {
        let mut stale = Vec::new();
        for process in job_processes(&work) {
            let Ok(id) = process.job.parse::<JobId>() else {
                continue;
            };
            let Ok(Some(record)) = mesh.jobs.get(&id.to_string()).await else {
                continue;
            };
            let superseded = process
                .attempt
                .is_some_and(|attempt| attempt < record.value.attempt);
            if superseded || record.value.status.is_terminal() {
                stale.push(format!("{process} (record: {})", describe(&record.value)));
            }
        }
        let count = *first.get_or_insert(stale.len());
        if stale.is_empty() {
            return count;
        }
        if Instant::now() >= deadline {
            panic!(
                "after {timeout:?}, processes of superseded or finished attempts still run:\n{}",
                stale.join("\n")
            );
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// Compares the SQL history (every page of `GET /api/v1/jobs`, which is read from SQL alone)
/// with `records` until they agree or [`SETTLE_TIMEOUT`] passes; returns the differences left.
async fn history_differences(
    http: &HttpClient,
    records: &HashMap<JobId, JobRecord>,
) -> Vec<String> {
    let deadline = Instant::now() + SETTLE_TIMEOUT;
    loop {
        let differences = match history_rows(http).await {
            Ok(rows) => compare_history(&rows, records),
            Err(error) => vec![format!("the history cannot be listed: {error}")],
        };
        if differences.is_empty() {
            return differences;
        }
        if Instant::now() >= deadline {
            let mut shown: Vec<String> = differences
                .iter()
                .take(20)
                .map(|d| format!("SQL ≠ KV after {SETTLE_TIMEOUT:?}: {d}"))
                .collect();
            if differences.len() > shown.len() {
                shown.push(format!("… {} differences in all", differences.len()));
            }
            return shown;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Every job row of the history, by id.
async fn history_rows(http: &HttpClient) -> Result<HashMap<String, serde_json::Value>, String> {
    let mut rows = HashMap::new();
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(cursor) => format!("/api/v1/jobs?limit=500&cursor={cursor}"),
            None => "/api/v1/jobs?limit=500".to_owned(),
        };
        let reply = http.try_get(&path).await?;
        if !reply.status.is_success() {
            return Err(format!("{path}: {} {}", reply.status, reply.text()));
        }
        let page: serde_json::Value =
            serde_json::from_slice(&reply.body).map_err(|e| e.to_string())?;
        for job in page["jobs"].as_array().ok_or("a page without jobs")? {
            let id = job["id"].as_str().ok_or("a job row without id")?.to_owned();
            rows.insert(id, job.clone());
        }
        match page["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => return Ok(rows),
        }
    }
}

fn compare_history(
    rows: &HashMap<String, serde_json::Value>,
    records: &HashMap<JobId, JobRecord>,
) -> Vec<String> {
    let mut differences = Vec::new();
    for (id, record) in records {
        let Some(row) = rows.get(&id.to_string()) else {
            differences.push(format!("{id}: in KV ({}), not in SQL", describe(record)));
            continue;
        };
        let expected = serde_json::json!({
            "status": record.status.as_str(),
            "attempt": record.attempt,
            "node": record.node.as_ref().map(|n| n.as_str()),
            "exit_code": record.exit_code,
        });
        let actual = serde_json::json!({
            "status": row["status"],
            "attempt": row["attempt"],
            "node": row["node"],
            "exit_code": row["exit_code"],
        });
        if expected != actual {
            differences.push(format!("{id}: KV {expected} but SQL {actual}"));
        }
    }
    for id in rows.keys() {
        if !id
            .parse::<JobId>()
            .is_ok_and(|job| records.contains_key(&job))
        {
            differences.push(format!("{id}: in SQL, not in KV"));
        }
    }
    differences
}

/// Waits until `node` runs at least one job (a `running` record on it) and returns the jobs it
/// runs.
pub async fn wait_running_on(cluster: &mut Cluster, node: &str) -> Vec<JobId> {
    let mesh = cluster.mesh().await;
    wait_until(
        &format!("a job to run on {node}"),
        SETTLE_TIMEOUT,
        || async {
            let records = job_records(&mesh).await.ok()?;
            let running: Vec<JobId> = records
                .values()
                .filter(|r| {
                    r.status == JobStatus::Running
                        && r.node.as_ref().is_some_and(|n| n.as_str() == node)
                })
                .map(|r| r.id)
                .collect();
            (!running.is_empty()).then_some(running)
        },
    )
    .await
}

/// Waits until every stored submission has been handled (nothing pending or unacknowledged
/// on the consumer executors and schedulers share, nor on the schedulers' consumer of the
/// submissions handed on for placement).
pub async fn wait_submissions_handled(cluster: &Cluster) {
    let js = jetstream::new(cluster.client().await);
    wait_until("every submission to be handled", SETTLE_TIMEOUT, || async {
        let stream = js.get_stream(topology::SUBMISSIONS.name).await.ok()?;
        for name in [topology::SCHEDULER_CONSUMER, topology::PLACE_CONSUMER] {
            let mut consumer = stream
                .get_consumer::<async_nats::jetstream::consumer::pull::Config>(name)
                .await
                .ok()?;
            let info = consumer.info().await.ok()?;
            if info.num_pending != 0 || info.num_ack_pending != 0 {
                return None;
            }
        }
        Some(())
    })
    .await;
}

/// A small, seeded pseudo-random generator (SplitMix64): enough to pick faults and moments
/// reproducibly from a printed seed, without a dependency.
#[derive(Debug, Clone)]
pub struct Prng(u64);

impl Prng {
    /// A generator from `seed`.
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// A seed from `CAPSTAN_SOAK_SEED` when set, else from the clock.
    pub fn seed_from_env() -> u64 {
        std::env::var("CAPSTAN_SOAK_SEED")
            .ok()
            .and_then(|seed| seed.trim().parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos() as u64)
                    .unwrap_or(0x5eed)
            })
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `range` (`start..end`, end excluded).
    pub fn below(&mut self, range: std::ops::Range<usize>) -> usize {
        let span = (range.end - range.start).max(1) as u64;
        range.start + (self.next_u64() % span) as usize
    }
}

/// Waits until a scheduler serves `capstan.jobs.create` (a scheduler registers its endpoint a
/// moment after it starts), so that the first submissions of a load are not refused.
pub async fn wait_create_answers(cluster: &Cluster) {
    let client = cluster.client().await;
    wait_until(
        "a scheduler to answer create",
        Duration::from_secs(60),
        || {
            let client = client.clone();
            async move {
                // An invalid spec: answered with an error, creates nothing.
                client
                    .request(subjects::CREATE, r#"{"timeout": -1}"#.into())
                    .await
                    .ok()
            }
        },
    )
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_generator_repeats_itself_from_the_same_seed() {
        let (mut a, mut b) = (Prng::new(42), Prng::new(42));
        let drawn: Vec<usize> = (0..20).map(|_| a.below(1..6)).collect();
        assert_eq!(drawn, (0..20).map(|_| b.below(1..6)).collect::<Vec<_>>());
        assert!(drawn.iter().all(|n| (1..6).contains(n)));
    }

    #[test]
    fn the_history_differs_from_the_bucket_by_a_missing_row_a_stale_status_or_an_extra_job() {
        let now = capstan_protocol::Timestamp::now();
        let spec = capstan_protocol::JobSpec::shell("true");
        let mut done = JobRecord::new(JobId::generate(), spec.clone(), now);
        done.status = JobStatus::Succeeded;
        done.attempt = 1;
        done.node = Some(capstan_protocol::NodeId::new("exec-1").expect("valid"));
        done.exit_code = Some(0);
        let other = JobRecord::new(JobId::generate(), spec, now);
        let records = HashMap::from([(done.id, done.clone())]);
        let row = |status: &str| {
            serde_json::json!({
                "id": done.id.to_string(), "status": status, "attempt": 1, "node": "exec-1",
                "exit_code": 0, "name": null,
            })
        };
        let same = HashMap::from([(done.id.to_string(), row("succeeded"))]);
        assert!(compare_history(&same, &records).is_empty());
        let stale = HashMap::from([(done.id.to_string(), row("running"))]);
        assert_eq!(compare_history(&stale, &records).len(), 1);
        assert_eq!(compare_history(&HashMap::new(), &records).len(), 1);
        let mut extra = same.clone();
        extra.insert(other.id.to_string(), row("pending"));
        assert_eq!(compare_history(&extra, &records).len(), 1);
    }

    #[test]
    fn a_job_process_is_recognised_by_its_environment_under_the_work_root() {
        let work = tempfile::tempdir().expect("a work root");
        let job_dir = work.path().join("exec-1").join("jobs").join("1-0");
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .env("CAPSTAN_JOB_ID", "01JDTEST")
            .env("CAPSTAN_ATTEMPT", "2")
            .env("CAPSTAN_NODE_ID", "exec-1")
            .env("CAPSTAN_WORK_DIR", &job_dir)
            .spawn()
            .expect("sleep starts");
        // Until the child has exec'd, /proc shows the test's own environment: wait for it.
        let deadline = Instant::now() + Duration::from_secs(10);
        let found = loop {
            let found = job_processes(work.path());
            if found.iter().any(|p| p.pid == child.id()) || Instant::now() >= deadline {
                break found;
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let other = tempfile::tempdir().expect("another root");
        let elsewhere = job_processes(other.path());
        child.kill().expect("killed");
        child.wait().expect("reaped");
        let ours: Vec<&JobProcess> = found.iter().filter(|p| p.pid == child.id()).collect();
        assert_eq!(ours.len(), 1, "{found:?}");
        assert_eq!(ours[0].attempt, Some(2));
        assert_eq!(ours[0].node, "exec-1");
        assert!(elsewhere.iter().all(|p| p.pid != child.id()));
        assert!(
            job_processes(work.path())
                .iter()
                .all(|p| p.pid != child.id())
        );
    }
}
