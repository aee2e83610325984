//! The executor against a real nats-server and a real registry. The test plays the scheduler:
//! it writes job records and publishes dispatches.

use std::time::Duration;

use async_nats::jetstream;
use bytes::Bytes;
use capstan_executor::Config;
use capstan_mesh::Mesh;
use capstan_protocol::codec::{self, Encoding};
use capstan_protocol::spec::Program;
use capstan_protocol::{
    Dispatch, JobEvent, JobId, JobRecord, JobSpec, JobStatus, NodeId, NodeRecord, NodeStatus,
    Rejection, RejectionCode, Timestamp, headers, subjects,
};
use capstan_testkit::{NatsServer, wait_until};
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

struct Mesh3 {
    server: NatsServer,
    mesh: Mesh,
    node: NodeId,
    work: tempfile::TempDir,
    registry: CancellationToken,
    executor: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), capstan_executor::error::Error>>,
}

async fn start(configure: impl FnOnce(&mut Config)) -> Mesh3 {
    let server = NatsServer::start().await;
    let registry = CancellationToken::new();
    tokio::spawn(capstan_registry::run(
        capstan_registry::Config::for_url(server.url()),
        registry.clone(),
    ));
    let node = NodeId::new("exec-test").expect("valid");
    let work = tempfile::tempdir().expect("work dir");
    let mut config = Config::for_url(server.url(), node.clone());
    config.work_dir = Some(work.path().to_path_buf());
    config.heartbeat_interval = Duration::from_millis(200);
    config.kill_grace = Duration::from_millis(500);
    configure(&mut config);
    let executor = CancellationToken::new();
    let task = tokio::spawn(capstan_executor::run(config, executor.clone()));
    let mesh = Mesh::open(server.client().await).await.expect("mesh");
    let up = wait_until(
        "the executor to register",
        Duration::from_secs(20),
        || async {
            mesh.nodes
                .get(node.as_str())
                .await
                .expect("read")
                .filter(|n| n.value.status == NodeStatus::Up)
        },
    )
    .await;
    assert!(up.value.capacity >= 1);
    Mesh3 {
        server,
        mesh,
        node,
        work,
        registry,
        executor,
        task,
    }
}

impl Mesh3 {
    /// Writes `spec` as a job assigned to the executor's node and dispatches it.
    async fn dispatch(&self, spec: JobSpec) -> JobId {
        let record = JobRecord::new(JobId::generate(), spec, Timestamp::now())
            .assigned(self.node.clone(), Timestamp::now());
        let revision = self
            .mesh
            .jobs
            .create(&record.id.to_string(), &record)
            .await
            .expect("record");
        self.publish(&Dispatch {
            record: record.clone(),
            revision,
        })
        .await;
        record.id
    }

    async fn publish(&self, dispatch: &Dispatch) {
        let payload = codec::to_msgpack(dispatch).expect("encodes");
        self.mesh
            .js
            .publish(subjects::dispatch(&self.node), payload.into())
            .await
            .expect("published")
            .await
            .expect("stored");
    }

    async fn finished(&self, id: JobId) -> JobRecord {
        wait_until("the job to finish", Duration::from_secs(30), || async {
            self.mesh
                .jobs
                .get(&id.to_string())
                .await
                .expect("read")
                .map(|v| v.value)
                .filter(|r| r.status.is_terminal())
        })
        .await
    }

    /// Every log chunk of `id` as (stream, headers, bytes).
    /// The job's stdout and stderr together, as text.
    async fn output(&self, id: JobId) -> String {
        let bytes: Vec<u8> = self
            .logs(id)
            .await
            .into_iter()
            .flat_map(|(.., bytes)| bytes.to_vec())
            .collect();
        String::from_utf8_lossy(&bytes).into_owned()
    }

    async fn logs(&self, id: JobId) -> Vec<(String, async_nats::HeaderMap, Bytes)> {
        let stream = self
            .mesh
            .js
            .get_stream("CAPSTAN_LOGS")
            .await
            .expect("logs stream");
        let consumer = stream
            .create_consumer(jetstream::consumer::pull::Config {
                filter_subject: subjects::job_logs(id),
                ..Default::default()
            })
            .await
            .expect("consumer");
        let mut chunks = Vec::new();
        let mut batch = consumer
            .fetch()
            .max_messages(10_000)
            .messages()
            .await
            .expect("fetch");
        while let Some(Ok(message)) = batch.next().await {
            let map = message.headers.clone().unwrap_or_default();
            let which = map
                .get(headers::LOG_STREAM)
                .map(|v| v.to_string())
                .unwrap_or_default();
            chunks.push((which, map, message.payload.clone()));
        }
        chunks
    }

    async fn stop(self) -> Result<(), capstan_executor::error::Error> {
        self.executor.cancel();
        let result = self.task.await.expect("joins");
        self.registry.cancel();
        result
    }
}

/// The node's record as the registry keeps it.
async fn node_record(mesh: &Mesh, node: &NodeId) -> NodeRecord {
    mesh.nodes
        .get(node.as_str())
        .await
        .expect("read")
        .expect("the node is recorded")
        .value
}

fn shell(command: &str) -> JobSpec {
    JobSpec::shell(command)
}

fn alive(pid: i32) -> bool {
    // Signal 0 checks existence; a zombie still answers, so look at /proc as well.
    let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    !state.is_empty() && !state.contains(") Z ")
}

#[tokio::test]
async fn the_node_reports_the_attempts_it_ran_to_an_end_with_its_heartbeats() {
    let mesh = start(|_| {}).await;
    let ok = [
        mesh.dispatch(shell("true")).await,
        mesh.dispatch(shell("true")).await,
    ];
    let failed = mesh.dispatch(shell("exit 3")).await;
    for id in ok {
        assert_eq!(mesh.finished(id).await.status, JobStatus::Succeeded);
    }
    assert_eq!(mesh.finished(failed).await.status, JobStatus::Failed);
    // No event reaches the registry for these: the tally arrives with the next heartbeats.
    let record = wait_until(
        "the node's tally to count three attempts",
        Duration::from_secs(20),
        || async {
            Some(node_record(&mesh.mesh, &mesh.node).await).filter(|n| n.finished.total() >= 3)
        },
    )
    .await;
    assert_eq!(
        (
            record.finished.succeeded,
            record.finished.failed,
            record.finished.lost
        ),
        (2, 1, 0),
        "{:?}",
        record.finished
    );
    // Counted once: later heartbeats add nothing.
    let beat = record.last_heartbeat_at;
    let later = wait_until("two more heartbeats", Duration::from_secs(20), || async {
        Some(node_record(&mesh.mesh, &mesh.node).await)
            .filter(|n| n.last_heartbeat_at.since(beat) >= Duration::from_millis(400))
    })
    .await;
    assert_eq!(later.finished, record.finished);
    mesh.stop().await.expect("stops cleanly");
}

#[tokio::test]
async fn a_node_stopping_cleanly_hands_its_last_count_over_with_its_deregistration() {
    // One heartbeat at the start, none after: the count can only leave with the node.
    let mesh = start(|config| config.heartbeat_interval = Duration::from_secs(3600)).await;
    let id = mesh.dispatch(shell("true")).await;
    assert_eq!(mesh.finished(id).await.status, JobStatus::Succeeded);
    let before = node_record(&mesh.mesh, &mesh.node).await;
    assert_eq!(before.finished.total(), 0, "{:?}", before.finished);
    // Stop the executor alone: the registry and the server stay up to read the record.
    mesh.executor.cancel();
    mesh.task.await.expect("joins").expect("stops cleanly");
    let left = node_record(&mesh.mesh, &mesh.node).await;
    mesh.registry.cancel();
    assert_eq!(left.status, NodeStatus::Left);
    assert_eq!(
        (left.finished.succeeded, left.finished.last_job),
        (1, Some(id))
    );
}

#[tokio::test]
async fn a_dispatched_job_runs_and_its_output_exit_code_and_events_are_recorded() {
    // Every start announced at once, however short the attempt.
    let mesh = start(|config| config.announce_after = Duration::ZERO).await;
    let client = mesh.server.client().await;
    let mut events = client
        .subscribe(subjects::JOB_EVENTS_ALL)
        .await
        .expect("subscribe");
    let id = mesh.dispatch(shell("echo out; echo err >&2; exit 3")).await;
    let done = mesh.finished(id).await;
    assert_eq!(done.status, JobStatus::Failed);
    assert_eq!(done.exit_code, Some(3));
    assert_eq!(done.node, Some(mesh.node.clone()));
    assert!(done.started_at.is_some() && done.finished_at.is_some());
    let output = done.output.expect("output summary");
    assert_eq!(
        (output.stdout_bytes, output.stderr_bytes, output.truncated),
        (4, 4, false)
    );

    let logs = mesh.logs(id).await;
    let stdout: Vec<u8> = logs
        .iter()
        .filter(|(s, ..)| s == "stdout")
        .flat_map(|(.., bytes)| bytes.to_vec())
        .collect();
    assert_eq!(stdout, b"out\n");
    assert!(
        logs.iter()
            .any(|(s, _, b)| s == "stderr" && b.as_ref() == b"err\n")
    );

    let mut kinds = Vec::new();
    while kinds.len() < 2 {
        let message = tokio::time::timeout(Duration::from_secs(10), events.next())
            .await
            .expect("events")
            .expect("open");
        let event: JobEvent = codec::decode(Encoding::MsgPack, &message.payload).expect("decodes");
        kinds.push(event.kind.as_str().to_owned());
        if event.kind.is_terminal() {
            let map = message.headers.expect("headers");
            assert_eq!(map.get(headers::EXIT_CODE).map(|v| v.as_str()), Some("3"));
        }
    }
    assert_eq!(kinds, ["running", "failed"]);
    mesh.stop().await.expect("clean stop");
}

#[tokio::test]
async fn a_start_is_announced_once_the_process_outlasts_the_announce_delay_and_a_shorter_attempt_only_by_its_outcome()
 {
    let delay = Duration::from_secs(1);
    let mesh = start(|config| config.announce_after = delay).await;
    let client = mesh.server.client().await;
    let mut events = client
        .subscribe(subjects::JOB_EVENTS_ALL)
        .await
        .expect("subscribe");
    let short = mesh.dispatch(shell("true")).await;
    let long = mesh.dispatch(shell("sleep 2")).await;
    // Each event with when it arrived: an event's own time is that of the change it reports.
    let mut seen: Vec<(JobEvent, Timestamp)> = Vec::new();
    while seen.iter().filter(|(e, _)| e.kind.is_terminal()).count() < 2 {
        let message = tokio::time::timeout(Duration::from_secs(30), events.next())
            .await
            .expect("events in time")
            .expect("open");
        let event: JobEvent = codec::decode(Encoding::MsgPack, &message.payload).expect("decodes");
        seen.push((event, Timestamp::now()));
    }
    let of = |job: JobId| -> Vec<&(JobEvent, Timestamp)> {
        seen.iter().filter(|(e, _)| e.record.id == job).collect()
    };

    let short_events = of(short);
    let kinds: Vec<&str> = short_events.iter().map(|(e, _)| e.kind.as_str()).collect();
    assert_eq!(kinds, ["succeeded"], "{short_events:?}");
    let outcome = &short_events[0].0.record;
    assert!(
        outcome.started_at.is_some(),
        "the outcome carries the start: {outcome:?}"
    );
    assert_eq!(outcome.node.as_ref(), Some(&mesh.node));

    let long_events = of(long);
    let kinds: Vec<&str> = long_events.iter().map(|(e, _)| e.kind.as_str()).collect();
    assert_eq!(kinds, ["running", "succeeded"], "{long_events:?}");
    let (running, arrived) = long_events[0];
    let started = running.record.started_at.expect("started");
    assert_eq!(running.at, started, "the event reports the start");
    assert!(
        arrived.since(started) >= delay - Duration::from_millis(10),
        "announced {:?} after the start",
        arrived.since(started)
    );
    let finished = long_events[1].0.record.finished_at.expect("finished");
    assert!(*arrived < finished, "announced while it ran");
    mesh.stop().await.expect("clean stop");
}

#[tokio::test]
async fn a_dispatch_made_over_the_unplaced_record_of_a_job_that_waited_is_claimed_with_its_node_and_runs_once()
 {
    let mesh = start(|_| {}).await;
    let marker = mesh.work.path().join("runs");
    // What a scheduler does for a job that waited for room: the record stays as its creation
    // wrote it (pending, no node), and the dispatch carries it assigned, over that revision.
    let waiting = JobRecord::new(
        JobId::generate(),
        shell(&format!("echo x >> {}; sleep 1.5", marker.display())),
        Timestamp::now(),
    );
    let revision = mesh
        .mesh
        .jobs
        .create(&waiting.id.to_string(), &waiting)
        .await
        .expect("record");
    mesh.publish(&Dispatch {
        record: waiting.assigned(mesh.node.clone(), Timestamp::now()),
        revision,
    })
    .await;
    let done = mesh.finished(waiting.id).await;
    assert_eq!(
        (done.status, done.attempt, done.node.as_ref()),
        (JobStatus::Succeeded, 1, Some(&mesh.node))
    );
    assert!(done.dispatched_at.is_some() && done.started_at.is_some());
    let runs = std::fs::read_to_string(&marker).expect("ran");
    assert_eq!(runs.lines().count(), 1, "ran once, through the held checks");
    mesh.stop().await.expect("clean stop");
}

#[tokio::test]
async fn stdin_env_and_cwd_reach_the_process_and_the_executors_own_environment_does_not() {
    let mesh = start(|_| {}).await;
    let mut spec = shell(
        r#"read line; echo "$line|$GREETING|$(pwd)|${CARGO_MANIFEST_DIR:-unset}|$CAPSTAN_JOB_ID""#,
    );
    spec.stdin = Some("payload\n".into());
    spec.env.insert("GREETING".into(), "hi".into());
    spec.cwd = Some("/tmp".into());
    let id = mesh.dispatch(spec).await;
    assert_eq!(mesh.finished(id).await.status, JobStatus::Succeeded);
    assert_eq!(
        mesh.output(id).await,
        format!("payload|hi|/tmp|unset|{id}\n")
    );
    mesh.stop().await.expect("clean stop");
}

#[tokio::test]
async fn argv_runs_without_a_shell_and_a_missing_program_fails_with_the_reason() {
    let mesh = start(|_| {}).await;
    let mut spec = shell("unused");
    spec.program = Program::Argv(vec!["echo".into(), "$HOME".into()]);
    let id = mesh.dispatch(spec).await;
    assert_eq!(mesh.finished(id).await.status, JobStatus::Succeeded);
    let text: Vec<u8> = mesh
        .logs(id)
        .await
        .into_iter()
        .flat_map(|(.., b)| b.to_vec())
        .collect();
    assert_eq!(text, b"$HOME\n", "no shell expanded the argument");

    let mut spec = shell("unused");
    spec.program = Program::Argv(vec!["/no/such/program".into()]);
    let id = mesh.dispatch(spec).await;
    let done = mesh.finished(id).await;
    assert_eq!(done.status, JobStatus::Failed);
    assert!(
        done.error
            .as_deref()
            .is_some_and(|e| e.contains("cannot start")),
        "{done:?}"
    );
    mesh.stop().await.expect("clean stop");
}

#[tokio::test]
async fn a_job_past_its_timeout_is_killed_with_its_whole_process_group() {
    let mesh = start(|_| {}).await;
    let pid_file = mesh.work.path().join("background.pid");
    // The shell ignores SIGTERM and leaves a background child: both must die.
    let mut spec = shell(&format!(
        "trap '' TERM; sleep 300 & echo $! > {}; wait",
        pid_file.display()
    ));
    spec.timeout = Some(Duration::from_millis(500));
    let id = mesh.dispatch(spec).await;
    let done = mesh.finished(id).await;
    assert_eq!(done.status, JobStatus::TimedOut);
    assert!(
        done.error
            .as_deref()
            .is_some_and(|e| e.contains("timed out"))
    );
    let pid: i32 = std::fs::read_to_string(&pid_file)
        .expect("pid written")
        .trim()
        .parse()
        .expect("a pid");
    wait_until(
        "the background child to die",
        Duration::from_secs(10),
        || async { (!alive(pid)).then_some(()) },
    )
    .await;
    mesh.stop().await.expect("clean stop");
}

#[tokio::test]
async fn background_children_left_by_a_finished_job_are_killed() {
    let mesh = start(|_| {}).await;
    let pid_file = mesh.work.path().join("left.pid");
    let id = mesh
        .dispatch(shell(&format!(
            "sleep 300 > /dev/null 2>&1 & echo $! > {}",
            pid_file.display()
        )))
        .await;
    assert_eq!(mesh.finished(id).await.status, JobStatus::Succeeded);
    let pid: i32 = std::fs::read_to_string(&pid_file)
        .expect("pid written")
        .trim()
        .parse()
        .expect("a pid");
    wait_until(
        "the leftover child to die",
        Duration::from_secs(10),
        || async { (!alive(pid)).then_some(()) },
    )
    .await;
    mesh.stop().await.expect("clean stop");
}

#[tokio::test]
async fn output_beyond_the_cap_is_counted_truncated_and_marked() {
    let mesh = start(|config| config.max_output_bytes = 1000).await;
    let id = mesh
        .dispatch(shell("head -c 200000 /dev/zero | tr '\\0' x"))
        .await;
    let done = mesh.finished(id).await;
    assert_eq!(done.status, JobStatus::Succeeded);
    let output = done.output.expect("summary");
    assert_eq!((output.stdout_bytes, output.truncated), (200_000, true));
    let logs = mesh.logs(id).await;
    let kept: usize = logs
        .iter()
        .filter(|(_, map, _)| map.get(headers::LOG_TRUNCATED).is_none())
        .map(|(.., bytes)| bytes.len())
        .sum();
    assert_eq!(kept, 1000);
    assert!(
        logs.iter()
            .any(|(_, map, _)| map.get(headers::LOG_TRUNCATED).is_some())
    );
    mesh.stop().await.expect("clean stop");
}

#[tokio::test]
async fn malformed_and_misrouted_dispatches_are_rejected_and_the_executor_keeps_working() {
    let mesh = start(|_| {}).await;
    let client = mesh.server.client().await;
    let mut rejections = client
        .subscribe(subjects::REJECTED_ALL)
        .await
        .expect("subscribe");
    // The subscription must reach the server before the rejection is published.
    client.flush().await.expect("flushed");
    mesh.mesh
        .js
        .publish(subjects::dispatch(&mesh.node), "garbage".into())
        .await
        .expect("published")
        .await
        .expect("stored");
    let message = tokio::time::timeout(Duration::from_secs(20), rejections.next())
        .await
        .expect("a rejection")
        .expect("open");
    let rejection: Rejection = codec::decode(Encoding::MsgPack, &message.payload).expect("decodes");
    assert_eq!(rejection.code, RejectionCode::Malformed);

    let other = NodeId::new("someone-else").expect("valid");
    let record = JobRecord::new(JobId::generate(), shell("true"), Timestamp::now())
        .assigned(other, Timestamp::now());
    mesh.publish(&Dispatch {
        record,
        revision: 1,
    })
    .await;
    let message = tokio::time::timeout(Duration::from_secs(20), rejections.next())
        .await
        .expect("a rejection")
        .expect("open");
    let rejection: Rejection = codec::decode(Encoding::MsgPack, &message.payload).expect("decodes");
    assert_eq!(rejection.code, RejectionCode::Misrouted);

    let id = mesh.dispatch(shell("true")).await;
    assert_eq!(mesh.finished(id).await.status, JobStatus::Succeeded);
    mesh.stop().await.expect("clean stop");
}

#[tokio::test]
async fn a_stale_dispatch_of_a_superseded_attempt_is_dropped_without_running() {
    let mesh = start(|_| {}).await;
    let marker = mesh.work.path().join("ran");
    let spec = shell(&format!("touch {}", marker.display()));
    let first = JobRecord::new(JobId::generate(), spec, Timestamp::now())
        .assigned(mesh.node.clone(), Timestamp::now());
    let key = first.id.to_string();
    let revision = mesh.mesh.jobs.create(&key, &first).await.expect("created");
    // The scheduler moved on to attempt 2 before attempt 1 was delivered.
    let second = first.assigned(mesh.node.clone(), Timestamp::now());
    mesh.mesh
        .jobs
        .update(&key, &second, revision)
        .await
        .expect("updated");
    mesh.publish(&Dispatch {
        record: first,
        revision,
    })
    .await;
    let stream = mesh
        .mesh
        .js
        .get_stream("CAPSTAN_DISPATCH")
        .await
        .expect("stream");
    wait_until(
        "the stale dispatch to be settled",
        Duration::from_secs(20),
        || {
            let mut stream = stream.clone();
            async move { (stream.info().await.ok()?.state.messages == 0).then_some(()) }
        },
    )
    .await;
    assert!(!marker.exists(), "the stale attempt did not run");
    let current = mesh
        .mesh
        .jobs
        .get(&key)
        .await
        .expect("read")
        .expect("present");
    assert_eq!(
        (current.value.status, current.value.attempt),
        (JobStatus::Pending, 2)
    );
    mesh.stop().await.expect("clean stop");
}

#[tokio::test]
async fn a_claim_stored_without_its_reply_reaching_the_executor_runs_on_redelivery_once() {
    let mesh = start(|_| {}).await;
    let instance = mesh
        .mesh
        .nodes
        .get(mesh.node.as_str())
        .await
        .expect("read")
        .expect("registered")
        .value
        .instance;
    let runs = mesh.work.path().join("runs");
    let spec = shell(&format!("echo run >> {}", runs.display()));
    let assigned = JobRecord::new(JobId::generate(), spec, Timestamp::now())
        .assigned(mesh.node.clone(), Timestamp::now());
    let key = assigned.id.to_string();
    let revision = mesh
        .mesh
        .jobs
        .create(&key, &assigned)
        .await
        .expect("created");
    // The executor's claim was stored, then NATS went away before the reply came back: the
    // record says this instance runs the attempt, yet nothing runs, and the dispatch (nak'ed)
    // comes again as it was first delivered.
    let claimed = assigned.started(instance, Timestamp::now());
    mesh.mesh
        .jobs
        .update(&key, &claimed, revision)
        .await
        .expect("claimed");
    mesh.publish(&Dispatch {
        record: assigned.clone(),
        revision,
    })
    .await;
    let done = mesh.finished(assigned.id).await;
    assert_eq!(
        (done.status, done.attempt, done.exit_code),
        (JobStatus::Succeeded, 1, Some(0))
    );
    let ran = std::fs::read_to_string(&runs).expect("the job ran");
    assert_eq!(ran.lines().count(), 1, "{ran}");
    mesh.stop().await.expect("clean stop");
}

#[tokio::test]
async fn the_executor_runs_no_more_jobs_at_once_than_its_slots_and_reports_them_in_heartbeats() {
    let mesh = start(|config| config.slots = 2).await;
    let ids: Vec<JobId> = {
        let mut ids = Vec::new();
        for _ in 0..5 {
            ids.push(mesh.dispatch(shell("sleep 1.5")).await);
        }
        ids
    };
    // Sampling five records one after another is not a snapshot (a job can end and the next
    // start between two reads), so the overlap is counted afterwards from the records' own
    // start and finish times; the claim of a queued job is written only after a slot is free.
    let mut seen_in_heartbeat = false;
    let records = loop {
        let mut records = Vec::new();
        for id in &ids {
            let record = mesh
                .mesh
                .jobs
                .get(&id.to_string())
                .await
                .expect("read")
                .expect("present")
                .value;
            records.push(record);
        }
        let node: NodeRecord = mesh
            .mesh
            .nodes
            .get(mesh.node.as_str())
            .await
            .expect("read")
            .expect("present")
            .value;
        seen_in_heartbeat |= !node.jobs.is_empty();
        if records.iter().all(|r| r.status.is_terminal()) {
            break records;
        }
        tokio::time::sleep(capstan_testkit::POLL_INTERVAL).await;
    };
    let mut edges = Vec::new();
    for record in &records {
        assert_eq!(record.status, JobStatus::Succeeded, "{record:?}");
        let started = record.started_at.expect("started");
        let finished = record.finished_at.expect("finished");
        // At the same instant an end sorts before a start.
        edges.push((started, 1i32));
        edges.push((finished, -1i32));
    }
    edges.sort();
    let mut at_once = 0;
    let mut most = 0;
    for (_, step) in edges {
        at_once += step;
        most = most.max(at_once);
    }
    assert!(most <= 2, "{most} ran at once on 2 slots");
    assert_eq!(most, 2, "both slots were used");
    assert!(seen_in_heartbeat, "heartbeats listed the running jobs");
    mesh.stop().await.expect("clean stop");
}

#[tokio::test]
async fn on_shutdown_running_jobs_finish_before_the_executor_leaves() {
    let mesh = start(|_| {}).await;
    let id = mesh.dispatch(shell("sleep 1; echo done")).await;
    wait_until("the job to start", Duration::from_secs(20), || async {
        mesh.mesh
            .jobs
            .get(&id.to_string())
            .await
            .expect("read")
            .filter(|r| r.value.status == JobStatus::Running)
    })
    .await;
    let node = mesh.node.clone();
    let jobs = mesh.mesh.jobs.clone();
    let nodes = mesh.mesh.nodes.clone();
    mesh.executor.cancel();
    let result = mesh.task.await.expect("joins");
    result.expect("clean exit");
    let done = jobs
        .get(&id.to_string())
        .await
        .expect("read")
        .expect("present")
        .value;
    assert_eq!(done.status, JobStatus::Succeeded, "finished, not killed");
    let left = nodes
        .get(node.as_str())
        .await
        .expect("read")
        .expect("present")
        .value;
    assert_eq!(left.status, NodeStatus::Left);
    mesh.registry.cancel();
}

#[tokio::test]
async fn a_dispatch_arriving_after_the_executor_sat_idle_starts_at_once() {
    let mesh = start(|_| {}).await;
    // The scenario is an idle executor: its pull requests have been open for several seconds
    // (past the point where a heartbeat would arrive) when the dispatch comes.
    let idle_until = tokio::time::Instant::now() + Duration::from_millis(6500);
    tokio::time::sleep_until(idle_until).await;
    let dispatched = tokio::time::Instant::now();
    let id = mesh.dispatch(shell("true")).await;
    wait_until(
        "the idle executor to start the job",
        Duration::from_secs(5),
        || async {
            mesh.mesh
                .jobs
                .get(&id.to_string())
                .await
                .expect("read")
                .filter(|r| r.value.started_at.is_some())
        },
    )
    .await;
    assert!(dispatched.elapsed() < Duration::from_secs(5));
    mesh.stop().await.expect("clean stop");
}

#[tokio::test]
async fn a_cancelled_running_job_loses_its_whole_process_group_within_a_second() {
    let mesh = start(|_| {}).await;
    let pid_file = mesh.work.path().join("child.pid");
    // A shell that ignores SIGTERM, with a child: the whole group must still go.
    let id = mesh
        .dispatch(shell(&format!(
            "trap '' TERM; sleep 300 & echo $! > {}; wait",
            pid_file.display()
        )))
        .await;
    let child: i32 = wait_until(
        "the job to start its child",
        Duration::from_secs(20),
        || async { std::fs::read_to_string(&pid_file).ok()?.trim().parse().ok() },
    )
    .await;
    let asked = std::time::Instant::now();
    let (outcome, _) = capstan_mesh::lifecycle::cancel(&mesh.mesh, id)
        .await
        .expect("cancellable");
    assert_eq!(outcome, capstan_protocol::CancelOutcome::Requested);
    wait_until(
        "the process group to be gone",
        Duration::from_secs(5),
        || async { (!alive(child)).then_some(()) },
    )
    .await;
    let gone_after = asked.elapsed();
    assert!(gone_after < Duration::from_secs(1), "took {gone_after:?}");
    let done = mesh.finished(id).await;
    assert_eq!(done.status, JobStatus::Cancelled);
    assert!(matches!(
        capstan_mesh::lifecycle::cancel(&mesh.mesh, id).await,
        Err(capstan_mesh::lifecycle::CancelError::Finished { .. })
    ));
    mesh.stop().await.expect("clean stop");
}

#[tokio::test]
async fn a_job_cancelled_before_its_dispatch_is_taken_never_runs() {
    let mesh = start(|_| {}).await;
    let marker = mesh.work.path().join("ran");
    let record = JobRecord::new(
        JobId::generate(),
        shell(&format!("touch {}", marker.display())),
        Timestamp::now(),
    )
    .assigned(mesh.node.clone(), Timestamp::now());
    let revision = mesh
        .mesh
        .jobs
        .create(&record.id.to_string(), &record)
        .await
        .expect("created");
    let (outcome, cancelled) = capstan_mesh::lifecycle::cancel(&mesh.mesh, record.id)
        .await
        .expect("cancellable");
    assert_eq!(
        (outcome, cancelled.status),
        (
            capstan_protocol::CancelOutcome::Cancelled,
            JobStatus::Cancelled
        )
    );
    // The dispatch still arrives; the executor must drop it.
    mesh.publish(&Dispatch { record, revision }).await;
    let stream = mesh
        .mesh
        .js
        .get_stream("CAPSTAN_DISPATCH")
        .await
        .expect("stream");
    wait_until(
        "the dispatch to be settled",
        Duration::from_secs(20),
        || {
            let mut stream = stream.clone();
            async move { (stream.info().await.ok()?.state.messages == 0).then_some(()) }
        },
    )
    .await;
    assert!(!marker.exists(), "a cancelled job ran");
    mesh.stop().await.expect("clean stop");
}

#[tokio::test]
async fn a_dispatch_delivered_too_often_without_being_settled_quarantines_its_job_unrun() {
    let mut mesh = start(|_| {}).await;
    mesh.executor.cancel();
    (&mut mesh.task).await.expect("joins").expect("clean stop");

    let marker = mesh.work.path().join("ran");
    let id = mesh
        .dispatch(shell(&format!("touch {}", marker.display())))
        .await;
    // Executor instances that took the dispatch and vanished, played by pulls that never ack.
    let consumer: jetstream::consumer::PullConsumer = mesh
        .mesh
        .js
        .get_stream("CAPSTAN_DISPATCH")
        .await
        .expect("stream")
        .get_consumer(&format!("executor-{}", mesh.node))
        .await
        .expect("the node's consumer");
    let limit = capstan_protocol::retry::limits::MAX_DISPATCH_DELIVERIES;
    for delivery in 1..=limit {
        let mut batch = consumer
            .fetch()
            .max_messages(1)
            .expires(Duration::from_secs(5))
            .messages()
            .await
            .expect("fetch");
        let message = batch.next().await.expect("a delivery").expect("a message");
        assert_eq!(message.info().expect("info").delivered, delivery);
        message
            .ack_with(jetstream::AckKind::Nak(None))
            .await
            .expect("nak");
    }

    let mut config = Config::for_url(mesh.server.url(), mesh.node.clone());
    config.work_dir = Some(mesh.work.path().join("again"));
    let again = CancellationToken::new();
    let task = tokio::spawn(capstan_executor::run(config, again.clone()));
    let done = mesh.finished(id).await;
    assert_eq!(done.status, JobStatus::Quarantined, "{done:?}");
    assert!(
        done.error
            .as_deref()
            .is_some_and(|e| e.contains(&format!("delivered {} times", limit + 1))),
        "{done:?}"
    );
    assert!(!marker.exists(), "a quarantined job never runs");
    again.cancel();
    task.await.expect("joins").expect("clean stop");
    mesh.registry.cancel();
}

#[tokio::test]
async fn jobs_run_as_the_configured_user_cannot_read_the_executors_credentials_or_its_proc_entries()
{
    if !nix::unistd::geteuid().is_root() {
        // Only root can run jobs as another user: anyone else is refused at start.
        let server = NatsServer::start().await;
        let mut config = Config::for_url(server.url(), NodeId::new("exec-runas").expect("valid"));
        config.run_as = Some("nobody".into());
        let error = capstan_executor::run(config, CancellationToken::new())
            .await
            .expect_err("refused without root");
        assert!(
            matches!(error, capstan_executor::error::Error::RunAs { .. }),
            "{error}"
        );
        return;
    }
    // A file only the executor's user may read, as its NATS credentials are.
    let secrets = tempfile::tempdir().expect("dir");
    let credentials = secrets.path().join("executor.nk");
    std::fs::write(&credentials, "CANARY-SEED\n").expect("written");
    std::fs::set_permissions(
        &credentials,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .expect("private");
    let nobody = nix::unistd::User::from_name("nobody")
        .expect("the user database")
        .expect("a `nobody` user");
    let mesh = start(|config| config.run_as = Some("nobody".into())).await;
    let executor = std::process::id();
    let id = mesh
        .dispatch(shell(&format!(
            "id -u; id -G; cat {} 2>/dev/null || echo no-credentials; \
             cat /proc/{executor}/environ 2>/dev/null || echo no-environ; \
             touch here && echo can-write",
            credentials.display()
        )))
        .await;
    assert_eq!(mesh.finished(id).await.status, JobStatus::Succeeded);
    let text = mesh.output(id).await;
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines,
        [
            nobody.uid.to_string().as_str(),
            nobody.gid.to_string().as_str(),
            "no-credentials",
            "no-environ",
            "can-write"
        ],
        "{text}"
    );
    assert!(!text.contains("CANARY"));
    mesh.stop().await.expect("clean stop");
}

impl Mesh3 {
    /// Creates the submissions consumer, as a scheduler or the mesh's setup does.
    async fn open_submissions(&self) {
        capstan_mesh::consume::durable(
            &self.mesh.js,
            &capstan_protocol::topology::scheduler_consumer(),
            &CancellationToken::new(),
        )
        .await
        .expect("the submissions consumer");
    }

    /// What stream `name` holds now.
    async fn stream_state(&self, name: &str) -> jetstream::stream::State {
        self.mesh
            .js
            .get_stream(name)
            .await
            .expect("stream")
            .info()
            .await
            .expect("info")
            .state
            .clone()
    }

    /// Publishes `body` as job `id`'s submission; returns its stream sequence.
    async fn submit(&self, id: JobId, body: &str) -> u64 {
        let mut map = async_nats::HeaderMap::new();
        map.insert(headers::JOB_ID, id.to_string().as_str());
        self.mesh
            .js
            .publish_with_headers(subjects::SUBMIT, map, body.to_owned().into())
            .await
            .expect("published")
            .await
            .expect("stored")
            .sequence
    }

    /// Waits until the submissions consumer holds nothing: every submission acknowledged.
    async fn submissions_settled(&self) {
        let consumer: jetstream::consumer::PullConsumer = self
            .mesh
            .js
            .get_stream(capstan_protocol::topology::SUBMISSIONS.name)
            .await
            .expect("stream")
            .get_consumer(capstan_protocol::topology::SCHEDULER_CONSUMER)
            .await
            .expect("consumer");
        wait_until(
            "every submission acknowledged",
            Duration::from_secs(20),
            || {
                let mut consumer = consumer.clone();
                async move {
                    let info = consumer.info().await.ok()?;
                    (info.num_pending == 0 && info.num_ack_pending == 0).then_some(())
                }
            },
        )
        .await;
    }

    /// The submission handed on for placement of job `id`, once stored.
    async fn handed_on(&self, id: JobId) -> async_nats::jetstream::message::StreamMessage {
        let stream = self
            .mesh
            .js
            .get_stream(capstan_protocol::topology::SUBMISSIONS.name)
            .await
            .expect("stream");
        wait_until(
            "the submission handed on",
            Duration::from_secs(20),
            || async {
                stream
                    .get_last_raw_message_by_subject(&subjects::place_job(id))
                    .await
                    .ok()
            },
        )
        .await
    }
}

#[tokio::test]
async fn a_plain_submission_runs_at_once_on_an_idle_executor_with_no_scheduler_in_one_write() {
    let mesh = start(|_| {}).await;
    mesh.open_submissions().await;
    let id = JobId::generate();
    let seq = mesh
        .submit(id, r#"{"argv": ["sh", "-c", "echo taken"]}"#)
        .await;
    let done = mesh.finished(id).await;
    assert_eq!(done.status, JobStatus::Succeeded, "{done:?}");
    assert_eq!(done.attempt, 1);
    assert_eq!(done.node.as_ref(), Some(&mesh.node));
    assert_eq!(
        done.submission_seq,
        Some(seq),
        "the record names its submission"
    );
    assert_eq!(
        done.submitted_by,
        Some(capstan_protocol::SubmittedBy::nats())
    );
    assert_eq!(mesh.output(id).await, "taken\n");
    mesh.submissions_settled().await;
    // Nothing was dispatched: the executor ran it from its submission.
    let dispatches = mesh
        .stream_state(capstan_protocol::topology::DISPATCH.name)
        .await
        .messages;
    assert_eq!(dispatches, 0);
    // Two writes to the jobs bucket, which holds only this job: its record created running,
    // then its outcome.
    let writes = mesh
        .stream_state(&capstan_protocol::access::kv_stream(
            &capstan_protocol::topology::JOBS,
        ))
        .await
        .last_sequence;
    assert_eq!(writes, 2);
    mesh.stop().await.expect("clean stop");
}

#[tokio::test]
async fn a_submission_that_needs_placement_is_handed_on_naming_its_original_and_runs_nothing_here()
{
    let mesh = start(|_| {}).await;
    mesh.open_submissions().await;
    let delayed = JobId::generate();
    let seq = mesh
        .submit(delayed, r#"{"argv": ["true"], "delay": 60}"#)
        .await;
    let elsewhere = JobId::generate();
    mesh.submit(elsewhere, r#"{"argv": ["true"], "labels": {"gpu": "yes"}}"#)
        .await;
    let handed = mesh.handed_on(delayed).await;
    assert_eq!(
        handed
            .headers
            .get(headers::SUBMISSION_SEQ)
            .map(|v| v.to_string()),
        Some(seq.to_string())
    );
    assert_eq!(
        handed.headers.get(headers::JOB_ID).map(|v| v.to_string()),
        Some(delayed.to_string())
    );
    mesh.handed_on(elsewhere).await;
    mesh.submissions_settled().await;
    for job in [delayed, elsewhere] {
        assert!(
            mesh.mesh
                .jobs
                .get(&job.to_string())
                .await
                .expect("read")
                .is_none(),
            "no record: the schedulers create it"
        );
    }
    mesh.stop().await.expect("clean stop");
}

#[tokio::test]
async fn a_malformed_submission_taken_by_an_executor_is_rejected_and_the_next_one_runs() {
    let mesh = start(|_| {}).await;
    mesh.open_submissions().await;
    let client = mesh.server.client().await;
    let mut rejections = client
        .subscribe(subjects::rejected(subjects::Origin::Submit))
        .await
        .expect("subscribe");
    client.flush().await.expect("flushed");
    let bad = JobId::generate();
    mesh.submit(bad, "{not json").await;
    let message = tokio::time::timeout(Duration::from_secs(20), rejections.next())
        .await
        .expect("a rejection")
        .expect("open");
    let rejection: Rejection = codec::decode(Encoding::MsgPack, &message.payload).expect("decodes");
    assert_eq!(rejection.code, RejectionCode::Malformed);
    assert_eq!(rejection.job, Some(bad));
    let id = JobId::generate();
    mesh.submit(id, r#"{"argv": ["true"]}"#).await;
    assert_eq!(mesh.finished(id).await.status, JobStatus::Succeeded);
    mesh.stop().await.expect("clean stop");
}

#[tokio::test]
async fn a_submission_come_back_after_a_predecessor_took_it_ends_that_attempt_lost_unrun() {
    let mesh = start(|_| {}).await;
    mesh.open_submissions().await;
    // A predecessor of this node took the job and died with it: its record says so, under the
    // submission about to come back.
    let id = JobId::generate();
    let marker = mesh.work.path().join("ran");
    let spec = shell(&format!("touch {}", marker.display()));
    let next = mesh
        .stream_state(capstan_protocol::topology::SUBMISSIONS.name)
        .await
        .last_sequence
        + 1;
    let now = Timestamp::now();
    let mut taken = JobRecord::new(id, spec, now)
        .assigned(mesh.node.clone(), now)
        .started(capstan_protocol::InstanceId::generate(), now);
    taken.submission_seq = Some(next);
    mesh.mesh
        .jobs
        .create(&id.to_string(), &taken)
        .await
        .expect("created");
    let seq = mesh
        .submit(
            id,
            &format!(r#"{{"command": "touch {}"}}"#, marker.display()),
        )
        .await;
    assert_eq!(seq, next);
    let lost = wait_until("the attempt lost", Duration::from_secs(20), || async {
        mesh.mesh
            .jobs
            .get(&id.to_string())
            .await
            .expect("read")
            .map(|v| v.value)
            .filter(|r| r.lost_attempts == 1)
    })
    .await;
    assert_eq!(lost.status, JobStatus::Retrying, "{lost:?}");
    mesh.submissions_settled().await;
    assert!(!marker.exists(), "not run again under the same attempt");
    mesh.stop().await.expect("clean stop");
}
