//! A job's life when things go wrong, with every service a separate process: retries with
//! backoff, delayed starts on durable timers, cancellation while waiting, executors that die
//! or freeze, a job that takes down every executor it lands on, and draining a node.

use std::time::{Duration, Instant};

use async_nats::jetstream;
use capstan_e2e::Cluster;
use capstan_protocol::codec::{self, Encoding};
use capstan_protocol::reply::Created;
use capstan_protocol::{
    JobEvent, JobEventKind, JobId, JobRecord, JobStatus, Reply, Timestamp, subjects, topology,
};
use capstan_testkit::wait_until;
use nix::sys::signal::Signal;
use serde_json::json;

/// Creates a job over `capstan.jobs.create` and returns its id.
async fn create(client: &async_nats::Client, body: serde_json::Value) -> JobId {
    let reply = wait_until(
        "a scheduler to answer create",
        Duration::from_secs(60),
        || {
            let body = body.to_string();
            async move {
                let reply = tokio::time::timeout(
                    Duration::from_secs(5),
                    client.request(subjects::CREATE, body.into()),
                )
                .await
                .ok()?
                .ok()?;
                Some(reply)
            }
        },
    )
    .await;
    let reply: Reply<Created> = codec::decode(Encoding::Json, &reply.payload).expect("a reply");
    match reply {
        Reply::Ok(created) => created.id,
        Reply::Error(error) => panic!("create refused: {error:?}"),
    }
}

/// Every event of `job` stored so far, in order.
async fn events_of(client: &async_nats::Client, job: JobId) -> Vec<JobEvent> {
    let js = jetstream::new(client.clone());
    let stream = js.get_stream(topology::EVENTS.name).await.expect("stream");
    let mut events = Vec::new();
    let mut next = 1;
    loop {
        let stored = stream
            .raw_message_builder()
            .sequence(next)
            .next_by_subject(subjects::job_events(job))
            .send()
            .await;
        let Ok(stored) = stored else { break };
        next = stored.sequence + 1;
        let event: JobEvent =
            codec::decode(Encoding::MsgPack, &stored.payload).expect("a job event");
        events.push(event);
    }
    events
}

/// Waits until `job`'s record satisfies `check`, and returns it.
async fn wait_record(
    cluster: &mut Cluster,
    job: JobId,
    what: &str,
    timeout: Duration,
    check: impl Fn(&JobRecord) -> bool,
) -> JobRecord {
    let mesh = cluster.mesh().await;
    wait_until(what, timeout, || async {
        mesh.jobs
            .get(&job.to_string())
            .await
            .ok()
            .flatten()
            .map(|v| v.value)
            .filter(&check)
    })
    .await
}

/// A command that records its run, and on its first run only writes its pid to `pid_file` and
/// sleeps for `first_run_secs`; later runs exit 0 at once.
fn first_run_hangs(cluster: &Cluster, pid_file: &std::path::Path, first_run_secs: u32) -> String {
    let marker = pid_file.with_extension("ran");
    cluster.recording(&format!(
        "if [ -e {marker} ]; then exit 0; fi; touch {marker}; echo $$ > {pid}; sleep {first_run_secs}",
        marker = marker.display(),
        pid = pid_file.display()
    ))
}

async fn pid_in(file: &std::path::Path) -> i32 {
    wait_until(
        "the job to write its pid",
        Duration::from_secs(60),
        || async { std::fs::read_to_string(file).ok()?.trim().parse().ok() },
    )
    .await
}

fn process_gone(pid: i32) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    stat.is_empty() || stat.contains(") Z ")
}

/// A registry, `schedulers` schedulers and the executors `(node, slots)`, all up.
async fn mesh(schedulers: usize, executors: &[(&str, u32)]) -> (Cluster, async_nats::Client) {
    let mut cluster = Cluster::start().await;
    cluster.registry("registry-1");
    for n in 1..=schedulers {
        cluster.scheduler(&format!("scheduler-{n}"));
    }
    for (node, slots) in executors {
        cluster.executor(node, *slots, &[]);
    }
    let nodes: Vec<&str> = executors.iter().map(|(node, _)| *node).collect();
    cluster.wait_nodes_up(&nodes).await;
    let client = cluster.client().await;
    (cluster, client)
}

/// A mesh whose one executor, `exec-1`, runs a job that hangs on its first run (see
/// [`first_run_hangs`]); returns it with the job and the pid of that first run.
async fn job_hanging_on_exec_1() -> (Cluster, async_nats::Client, JobId, i32) {
    let (cluster, client) = mesh(1, &[("exec-1", 2)]).await;
    let pid_file = cluster.dir().join("first-run.pid");
    let id = create(
        &client,
        json!({"command": first_run_hangs(&cluster, &pid_file, 300)}),
    )
    .await;
    let pid = pid_in(&pid_file).await;
    (cluster, client, id, pid)
}

#[tokio::test]
async fn a_failing_job_is_retried_with_growing_waits_and_fails_after_its_last_attempt() {
    let (mut cluster, client) = mesh(1, &[("exec-1", 2)]).await;
    let id = create(
        &client,
        json!({
            "command": cluster.recording("exit 3"),
            "retry": {"max_attempts": 3, "backoff": {"initial": 1, "multiplier": 2},
                      "jitter": 0, "retry_on": ["failed"]}
        }),
    )
    .await;

    let retrying = wait_record(
        &mut cluster,
        id,
        "the job to wait for its retry",
        Duration::from_secs(60),
        |r| r.status == JobStatus::Retrying,
    )
    .await;
    assert_eq!(retrying.attempt_status, Some(JobStatus::Failed));
    assert_eq!(retrying.exit_code, Some(3));
    assert!(retrying.next_attempt_at.is_some(), "{retrying:?}");

    let done = cluster.wait_terminal(&[id], Duration::from_secs(60)).await;
    assert_eq!((done[0].status, done[0].attempt), (JobStatus::Failed, 3));
    assert_eq!(cluster.runs().get(&id.to_string()), Some(&3));

    // Each wait is at least the backoff: 1 s, then 2 s.
    let events = events_of(&client, id).await;
    let at = |kind: JobEventKind, attempt: u32| {
        events
            .iter()
            .find(|e| e.kind == kind && e.record.attempt == attempt)
            .map(|e| e.at)
            .unwrap_or_else(|| panic!("no {kind} event of attempt {attempt}: {events:?}"))
    };
    // A start is read from the record of the event that ended the attempt: an attempt as short
    // as this one has no `running` event of its own.
    let started = |kind: JobEventKind, attempt: u32| {
        events
            .iter()
            .find(|e| e.kind == kind && e.record.attempt == attempt)
            .and_then(|e| e.record.started_at)
            .unwrap_or_else(|| {
                panic!("no start in the {kind} event of attempt {attempt}: {events:?}")
            })
    };
    let first_wait = started(JobEventKind::Retrying, 2).since(at(JobEventKind::Retrying, 1));
    let second_wait = started(JobEventKind::Failed, 3).since(at(JobEventKind::Retrying, 2));
    assert!(first_wait >= Duration::from_millis(950), "{first_wait:?}");
    assert!(
        second_wait >= Duration::from_millis(1950),
        "{second_wait:?}"
    );
    let terminal: Vec<_> = events.iter().filter(|e| e.kind.is_terminal()).collect();
    assert_eq!(terminal.len(), 1, "one terminal event: {events:?}");
}

#[tokio::test]
async fn a_delayed_job_waits_scheduled_and_its_timer_survives_every_scheduler_being_killed() {
    let (mut cluster, client) = mesh(2, &[("exec-1", 4)]).await;
    let delayed = create(
        &client,
        json!({"command": cluster.recording("true"), "delay": 3}),
    )
    .await;
    let at = Timestamp::now().plus(Duration::from_secs(4));
    let at_job = create(
        &client,
        json!({"command": cluster.recording("true"), "run_at": at.to_rfc3339()}),
    )
    .await;
    // `create` answers once the submission is stored; a scheduler then creates the record.
    for id in [delayed, at_job] {
        let record = wait_record(
            &mut cluster,
            id,
            "the delayed job to be created",
            Duration::from_secs(30),
            |r| r.status != JobStatus::Pending,
        )
        .await;
        assert_eq!(record.status, JobStatus::Scheduled, "{record:?}");
        assert!(record.next_attempt_at.is_some());
    }
    // The record is written first, then its timer is armed: kill only once both are armed
    // (or, for a short wait, already fired).
    let js = jetstream::new(client.clone());
    let timers = js.get_stream(topology::TIMERS.name).await.expect("stream");
    for id in [delayed, at_job] {
        wait_until("the timer to be armed", Duration::from_secs(30), || async {
            for subject in [subjects::timer_set(id), subjects::timer_due(id)] {
                if timers
                    .get_last_raw_message_by_subject(&subject)
                    .await
                    .is_ok()
                {
                    return Some(());
                }
            }
            None
        })
        .await;
    }

    cluster.kill9("scheduler-1");
    cluster.kill9("scheduler-2");
    // The server fires the timers on its own; they wait in the stream for a scheduler.
    wait_until(
        "both timers to fire with no scheduler running",
        Duration::from_secs(30),
        || async {
            let stream = js.get_stream(topology::TIMERS.name).await.ok()?;
            let mut fired = 0;
            for id in [delayed, at_job] {
                if stream
                    .get_last_raw_message_by_subject(&subjects::timer_due(id))
                    .await
                    .is_ok()
                {
                    fired += 1;
                }
            }
            (fired == 2).then_some(())
        },
    )
    .await;
    assert!(
        cluster.runs().is_empty(),
        "nothing ran while no scheduler ran"
    );

    cluster.scheduler("scheduler-3");
    let done = cluster
        .wait_terminal(&[delayed, at_job], Duration::from_secs(60))
        .await;
    for record in &done {
        assert_eq!(record.status, JobStatus::Succeeded, "{record:?}");
        assert_eq!(cluster.runs().get(&record.id.to_string()), Some(&1));
    }
    let started = done[1].started_at.expect("started");
    assert!(started >= at, "started {started} before its run_at {at}");
}

#[tokio::test]
async fn delayed_jobs_fire_once_each_across_two_schedulers() {
    let (mut cluster, client) = mesh(2, &[("exec-1", 8), ("exec-2", 8)]).await;
    let mut ids = Vec::new();
    for index in 0..30 {
        let delay = 1.0 + f64::from(index % 5) * 0.2;
        ids.push(
            create(
                &client,
                json!({"command": cluster.recording("true"), "delay": delay}),
            )
            .await,
        );
    }
    let done = cluster.wait_terminal(&ids, Duration::from_secs(90)).await;
    let runs = cluster.runs();
    for record in done {
        assert_eq!(record.status, JobStatus::Succeeded, "{record:?}");
        assert_eq!(record.attempt, 1);
        assert_eq!(runs.get(&record.id.to_string()), Some(&1), "{}", record.id);
    }
}

#[tokio::test]
async fn cancelling_a_scheduled_or_retrying_job_ends_it_and_removes_its_timer() {
    let (mut cluster, client) = mesh(1, &[("exec-1", 2)]).await;
    let scheduled = create(
        &client,
        json!({"command": cluster.recording("true"), "delay": 600}),
    )
    .await;
    let retrying = create(
        &client,
        json!({"command": cluster.recording("false"),
               "retry": {"max_attempts": 5, "backoff": {"initial": 600}}}),
    )
    .await;
    wait_record(
        &mut cluster,
        scheduled,
        "the delayed job to be scheduled",
        Duration::from_secs(30),
        |r| r.status == JobStatus::Scheduled,
    )
    .await;
    wait_record(
        &mut cluster,
        retrying,
        "the failing job to wait for its retry",
        Duration::from_secs(60),
        |r| r.status == JobStatus::Retrying,
    )
    .await;

    let js = jetstream::new(client.clone());
    let stream = js.get_stream(topology::TIMERS.name).await.expect("stream");
    for id in [scheduled, retrying] {
        // The record is written first, then its timer is armed.
        wait_until("its timer to be armed", Duration::from_secs(30), || async {
            stream
                .get_last_raw_message_by_subject(&subjects::timer_set(id))
                .await
                .ok()
        })
        .await;
        let reply = client
            .request(
                subjects::CANCEL,
                json!({"id": id.to_string()}).to_string().into(),
            )
            .await
            .expect("cancel answered");
        let text = String::from_utf8_lossy(&reply.payload).to_string();
        assert!(text.contains("cancelled"), "{text}");
        let record = cluster.job(id).await.expect("exists");
        assert_eq!(record.status, JobStatus::Cancelled);
        assert!(
            stream
                .get_last_raw_message_by_subject(&subjects::timer_set(id))
                .await
                .is_err(),
            "{id}'s timer is removed"
        );
    }
    assert_eq!(cluster.runs().get(&scheduled.to_string()), None);
    assert_eq!(cluster.runs().get(&retrying.to_string()), Some(&1));
}

#[tokio::test]
async fn a_job_whose_executor_is_killed_for_good_is_lost_and_rerun_on_another_node() {
    let (mut cluster, client, id, pid) = job_hanging_on_exec_1().await;
    cluster.executor("exec-2", 2, &[]);
    cluster.wait_nodes_up(&["exec-2"]).await;

    let killed = Instant::now();
    cluster.kill9("exec-1");
    let record = wait_record(
        &mut cluster,
        id,
        "the job to run again elsewhere",
        Duration::from_secs(60),
        |r| r.attempt == 2 && r.status != JobStatus::Pending,
    )
    .await;
    let rerun_after = killed.elapsed();
    eprintln!("kill -9 to running again: {rerun_after:?}");
    assert_eq!(record.node.as_ref().map(|n| n.as_str()), Some("exec-2"));
    // The harness's heartbeat timeout is 3 s; allow generous slack on a loaded machine.
    assert!(rerun_after < Duration::from_secs(20), "{rerun_after:?}");

    let done = cluster.wait_terminal(&[id], Duration::from_secs(60)).await;
    assert_eq!(done[0].status, JobStatus::Succeeded, "{:?}", done[0]);
    assert_eq!(done[0].lost_attempts, 1);
    let events = events_of(&client, id).await;
    let lost = events
        .iter()
        .find(|e| e.kind == JobEventKind::Retrying)
        .expect("a retrying event");
    assert_eq!(lost.record.attempt_status, Some(JobStatus::Lost));
    assert!(
        lost.record
            .error
            .as_deref()
            .is_some_and(|e| e.contains("exec-1")),
        "{lost:?}"
    );
    // The orphan on the dead node outlives its executor here (nothing restarted it); kill it
    // so the test leaves nothing behind.
    let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pid), Signal::SIGKILL);
}

#[tokio::test]
async fn an_executor_killed_mid_job_and_restarted_kills_the_orphan_and_retries_the_lost_attempt() {
    let (mut cluster, _client, id, pid) = job_hanging_on_exec_1().await;
    cluster.kill9("exec-1");
    assert!(!process_gone(pid), "the job outlived its executor");
    cluster.executor("exec-1", 2, &[]);

    let done = cluster.wait_terminal(&[id], Duration::from_secs(60)).await;
    assert_eq!((done[0].status, done[0].attempt), (JobStatus::Succeeded, 2));
    assert_eq!(done[0].lost_attempts, 1);
    wait_until(
        "the orphan to be killed",
        Duration::from_secs(30),
        || async { process_gone(pid).then_some(()) },
    )
    .await;
    assert_eq!(cluster.runs().get(&id.to_string()), Some(&2));
}

#[tokio::test]
async fn a_frozen_executor_that_comes_back_kills_its_orphan_and_cannot_record_a_stale_result() {
    let (mut cluster, client, id, pid) = job_hanging_on_exec_1().await;
    cluster.executor("exec-2", 2, &[]);
    cluster.wait_nodes_up(&["exec-2"]).await;

    cluster.process("exec-1").signal(Signal::SIGSTOP);
    let done = cluster.wait_terminal(&[id], Duration::from_secs(60)).await;
    assert_eq!((done[0].status, done[0].attempt), (JobStatus::Succeeded, 2));
    assert_eq!(done[0].node.as_ref().map(|n| n.as_str()), Some("exec-2"));

    cluster.process("exec-1").signal(Signal::SIGCONT);
    wait_until(
        "the thawed executor to kill the attempt it lost",
        Duration::from_secs(30),
        || async { process_gone(pid).then_some(()) },
    )
    .await;
    // The thawed executor's process was killed, but the result it would have written is not:
    // the record stays the second attempt's, and the first attempt has no terminal event.
    cluster.wait_nodes_up(&["exec-1"]).await;
    let record = cluster.job(id).await.expect("exists");
    assert_eq!((record.status, record.attempt), (JobStatus::Succeeded, 2));
    let events = events_of(&client, id).await;
    assert!(
        !events
            .iter()
            .any(|e| e.record.attempt == 1 && e.kind.is_terminal()),
        "{events:?}"
    );
    assert!(
        cluster
            .process("exec-1")
            .log()
            .contains("taken from the node"),
        "the executor says why it stopped the process"
    );
}

#[tokio::test]
async fn a_job_that_takes_down_every_executor_it_lands_on_is_quarantined() {
    let (mut cluster, client) = mesh(
        1,
        &[("exec-1", 2), ("exec-2", 2), ("exec-3", 2), ("exec-4", 2)],
    )
    .await;
    // The shell's parent is the executor: this job kills whichever executor runs it.
    let id = create(
        &client,
        json!({"command": cluster.recording("kill -9 $PPID; sleep 1"),
               "retry": {"max_attempts": 10, "retry_on": ["lost"], "backoff": {"initial": 0}}}),
    )
    .await;
    let done = cluster.wait_terminal(&[id], Duration::from_secs(120)).await;
    assert_eq!(done[0].status, JobStatus::Quarantined, "{:?}", done[0]);
    assert_eq!(done[0].lost_attempts, 3);
    assert!(
        done[0]
            .error
            .as_deref()
            .is_some_and(|e| e.contains("lost 3 attempts")),
        "{:?}",
        done[0]
    );
    assert_eq!(cluster.runs().get(&id.to_string()), Some(&3));

    // The executor left standing still runs ordinary jobs.
    let fine = create(&client, json!({"command": "true"})).await;
    let done = cluster
        .wait_terminal(&[fine], Duration::from_secs(60))
        .await;
    assert_eq!(done[0].status, JobStatus::Succeeded);
}

#[tokio::test]
async fn draining_a_node_hands_its_running_job_back_at_the_deadline_and_reports_it_drained() {
    let (mut cluster, client, id, pid) = job_hanging_on_exec_1().await;
    let base = cluster.api("api-1").await;
    let api = cluster.http(&base);
    cluster.executor("exec-2", 2, &[]);
    cluster.wait_nodes_up(&["exec-2"]).await;

    let missing = api.post_json("/api/v1/nodes/nope/drain", "").await;
    assert_eq!(missing.status.as_u16(), 404, "{}", missing.text());
    let drained = api
        .post_json("/api/v1/nodes/exec-1/drain?deadline_seconds=1", "")
        .await;
    assert_eq!(drained.status.as_u16(), 200, "{}", drained.text());
    assert_eq!(drained.json()["availability"], "draining");

    let done = cluster.wait_terminal(&[id], Duration::from_secs(60)).await;
    assert_eq!((done[0].status, done[0].attempt), (JobStatus::Succeeded, 2));
    assert_eq!(done[0].node.as_ref().map(|n| n.as_str()), Some("exec-2"));
    assert_eq!(done[0].lost_attempts, 0, "a hand-back is not a loss");
    assert!(process_gone(pid), "the handed-back process was stopped");
    wait_until("exec-1 to report drained", Duration::from_secs(30), || {
        let api = &api;
        async move {
            let node = api.get("/api/v1/nodes/exec-1").await.json();
            (node["availability"] == "drained").then_some(())
        }
    })
    .await;

    // Drained means no new work: every new job goes to exec-2.
    let mut ids = Vec::new();
    for _ in 0..6 {
        ids.push(create(&client, json!({"command": "true"})).await);
    }
    for record in cluster.wait_terminal(&ids, Duration::from_secs(60)).await {
        assert_eq!(record.node.as_ref().map(|n| n.as_str()), Some("exec-2"));
    }

    let cordoned = api.post_json("/api/v1/nodes/exec-2/cordon", "").await;
    assert_eq!(cordoned.json()["availability"], "cordoned");
    let uncordoned = api.post_json("/api/v1/nodes/exec-1/uncordon", "").await;
    assert_eq!(uncordoned.json()["availability"], "active");
    let mut ids = Vec::new();
    for _ in 0..4 {
        ids.push(create(&client, json!({"command": "true"})).await);
    }
    for record in cluster.wait_terminal(&ids, Duration::from_secs(60)).await {
        assert_eq!(record.node.as_ref().map(|n| n.as_str()), Some("exec-1"));
    }
}

#[tokio::test]
async fn an_executor_shut_down_under_load_hands_back_what_it_cannot_finish_and_loses_nothing() {
    let mut cluster = Cluster::start().await;
    cluster.registry("registry-1");
    cluster.scheduler("scheduler-1");
    cluster.scheduler("scheduler-2");
    cluster.executor("exec-2", 4, &[]);
    cluster.set_env("CAPSTAN_SHUTDOWN_TIMEOUT", "500ms");
    cluster.executor("exec-1", 4, &[]);
    cluster.wait_nodes_up(&["exec-1", "exec-2"]).await;
    let client = cluster.client().await;
    let mut ids = Vec::new();
    for _ in 0..24 {
        ids.push(create(&client, json!({"command": cluster.recording("sleep 2")})).await);
    }
    let mesh = cluster.mesh().await;
    wait_until(
        "exec-1 to be running jobs",
        Duration::from_secs(60),
        || async {
            let node = mesh.nodes.get("exec-1").await.ok()??;
            (!node.value.jobs.is_empty()).then_some(())
        },
    )
    .await;
    // SIGTERM, then a scheduler too: both shut down gracefully under load.
    cluster.process("exec-1").signal(Signal::SIGTERM);
    cluster.process("scheduler-1").signal(Signal::SIGTERM);
    let exited = cluster
        .process("exec-1")
        .wait_exit(Duration::from_secs(30))
        .expect("the executor exits after its shutdown timeout");
    assert!(exited.success(), "{exited:?}");

    let done = cluster.wait_terminal(&ids, Duration::from_secs(120)).await;
    let runs = cluster.runs();
    let mut handed_back = 0;
    for record in &done {
        assert_eq!(record.status, JobStatus::Succeeded, "{record:?}");
        assert_eq!(
            record.lost_attempts, 0,
            "a hand-back is not a loss: {record:?}"
        );
        let ran = runs.get(&record.id.to_string()).copied().unwrap_or(0);
        assert!(
            ran >= 1 && ran <= record.attempt as usize,
            "{} ran {ran} times in {} attempts",
            record.id,
            record.attempt
        );
        handed_back += usize::from(record.attempt > 1);
    }
    assert!(handed_back > 0, "exec-1 was stopped with jobs running");
}

#[tokio::test]
async fn a_remote_job_whose_gateway_is_killed_is_lost_rerun_by_another_and_leaves_no_remote_process()
 {
    let host = capstan_testkit::sshd::SshHost::start().expect("sshd starts");
    let mut cluster = Cluster::start().await;
    cluster.set_env(
        "CAPSTAN_SECRET_KEYS",
        capstan_secrets::KeyRing::generate_entry("e2e").expect("a key"),
    );
    cluster.registry("registry-1");
    cluster.scheduler("scheduler-1");
    // Gateways under the harness's own node names: a new name would make the server reload
    // its accounts while the services connect.
    cluster.executor("exec-1", 1, &["capstan.io/ssh=true"]);
    let base = cluster.api("api-1").await;
    cluster.wait_nodes_up(&["exec-1"]).await;
    let http = cluster.http(&base);
    capstan_e2e::add_ssh_system(&http, "web-1", &host).await;

    // The first attempt hangs on the remote host; the second ends at once.
    let hang = format!("sleep {}7", host.port());
    let body = json!({
        "command": format!("if [ \"$CAPSTAN_ATTEMPT\" = 1 ]; then exec {hang}; fi; echo second"),
        "system": "web-1",
    });
    let reply = http.post_json("/api/v1/jobs", &body.to_string()).await;
    assert_eq!(reply.status, http::StatusCode::ACCEPTED, "{}", reply.text());
    let id: JobId = reply.json()["id"]
        .as_str()
        .expect("an id")
        .parse()
        .expect("a job id");
    wait_until(
        "the remote sleep to run",
        Duration::from_secs(60),
        || async { (capstan_testkit::sshd::login_processes(&hang).len() == 1).then_some(()) },
    )
    .await;
    cluster.executor("exec-2", 1, &["capstan.io/ssh=true"]);
    cluster.wait_nodes_up(&["exec-2"]).await;

    cluster.kill9("exec-1");
    let done = cluster.wait_terminal(&[id], Duration::from_secs(90)).await;
    assert_eq!(done[0].status, JobStatus::Succeeded, "{:?}", done[0]);
    assert_eq!(done[0].attempt, 2, "{:?}", done[0]);
    assert_eq!(done[0].lost_attempts, 1, "{:?}", done[0]);
    assert_eq!(done[0].node.as_ref().map(|n| n.as_str()), Some("exec-2"));
    // The dead gateway's connection went with it: the remote command was stopped on its host.
    wait_until(
        "the orphaned remote sleep to end",
        Duration::from_secs(30),
        || async { (capstan_testkit::sshd::login_processes(&hang).is_empty()).then_some(()) },
    )
    .await;
}
