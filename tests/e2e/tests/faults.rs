//! The fault suite: every scenario runs a load of jobs through the real service processes,
//! injects one fault while they run, and ends with [`faults::check`]: every job ended exactly
//! once, ran at most once per attempt (counted by a side-effect file), left no process behind,
//! and the SQL history equals the jobs bucket.
//!
//! The scenarios are CI-sized. With `CAPSTAN_SOAK=1` the concurrent-submission scenario runs
//! its full 10,000 jobs and the randomized soak runs for `CAPSTAN_SOAK_SECS` (default 300)
//! seconds instead of one round; `CAPSTAN_SOAK_SEED` replays a printed seed.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use capstan_e2e::Cluster;
use capstan_e2e::faults::{self, Load, LoadPlan, Prng, Submitter, Via};
use capstan_protocol::codec;
use capstan_protocol::{JobId, JobStatus, NodeId, NodeStatus, Rejection, subjects};
use capstan_testkit::wait_until;
use futures::StreamExt;
use http::{Method, StatusCode};
use nix::sys::signal::Signal;

/// Largest job spec the services accept in these tests, so oversized messages stay small.
const MAX_JOB_BYTES: usize = 64 * 1024;

/// Jobs in the concurrent-submission scenario on CI; `CAPSTAN_SOAK=1` runs the full count.
const CI_CONCURRENT_JOBS: usize = 2_000;
/// See [`CI_CONCURRENT_JOBS`].
const SOAK_CONCURRENT_JOBS: usize = 10_000;

/// A mesh for the scenarios: a registry, two schedulers, `executors` executors (`exec-1`…)
/// with `slots` each, and the API `api-1`, whose history every later API shares. Redelivery
/// waits are shortened so that a killed consumer's messages come back within the test.
async fn fleet(executors: usize, slots: u32) -> (Cluster, String) {
    let mut cluster = Cluster::start().await;
    faults::share_history(&mut cluster);
    cluster.set_env("CAPSTAN_ACK_WAIT", "10s");
    cluster.set_env("CAPSTAN_MAX_JOB_BYTES", MAX_JOB_BYTES.to_string());
    cluster.registry("registry-1");
    cluster.scheduler("scheduler-1");
    cluster.scheduler("scheduler-2");
    let nodes = node_names(executors);
    for node in &nodes {
        cluster.executor(node, slots, &[]);
    }
    let api = cluster.api("api-1").await;
    let nodes: Vec<&str> = nodes.iter().map(String::as_str).collect();
    cluster.wait_nodes_up(&nodes).await;
    capstan_e2e::faults::wait_create_answers(&cluster).await;
    (cluster, api)
}

fn node_names(count: usize) -> Vec<String> {
    (1..=count).map(|n| format!("exec-{n}")).collect()
}

/// `count` short jobs that record their runs, submitted every way.
fn short_jobs(cluster: &Cluster, count: usize, apis: &[String], seconds: f64) -> LoadPlan {
    LoadPlan::commands(count, apis, cluster.recording(&format!("sleep {seconds}")))
}

/// The node the record of `job` names.
fn node_of(records: &HashMap<JobId, capstan_protocol::JobRecord>, job: JobId) -> Option<String> {
    records
        .get(&job)
        .and_then(|r| r.node.as_ref())
        .map(|n| n.to_string())
}

// 1. kill -9 an executor mid-job.
#[tokio::test]
async fn an_executor_killed_mid_job_has_its_attempts_retried_elsewhere_and_no_job_runs_twice_per_attempt()
 {
    let (mut cluster, api) = fleet(3, 4).await;
    let load = Load::start(
        &cluster,
        short_jobs(&cluster, 90, std::slice::from_ref(&api), 1.5),
    )
    .await;
    let running = faults::wait_running_on(&mut cluster, "exec-1").await;
    cluster.kill9("exec-1");
    eprintln!(
        "killed exec-1 while it ran {} jobs; {} submissions accepted so far",
        running.len(),
        load.accepted()
    );

    let accepted = load.finish().await;
    let summary = faults::check(&mut cluster, &api, &accepted).await;
    eprintln!("{summary}");
    assert_eq!(
        summary.count(JobStatus::Succeeded),
        summary.jobs,
        "a lost attempt is retried (three attempts by default): every job succeeds"
    );
    let mesh = cluster.mesh().await;
    let records = faults::job_records(&mesh).await.expect("records");
    // (One of them may have ended in the instant between the look and the kill.)
    assert!(
        running
            .iter()
            .any(|job| records[job].attempt >= 2
                && node_of(&records, *job).as_deref() != Some("exec-1")),
        "the jobs exec-1 ran when it was killed were retried elsewhere: {:?}",
        running.iter().map(|job| &records[job]).collect::<Vec<_>>()
    );
}

// 2. SIGSTOP an executor past its lease, then SIGCONT.
#[tokio::test]
async fn an_executor_stopped_past_its_heartbeat_timeout_has_its_attempts_retried_and_when_it_wakes_kills_them_and_records_nothing()
 {
    let (mut cluster, api) = fleet(3, 4).await;
    // One long job per node first, so that the stopped executor holds one that outlives the
    // stop; then short ones as the load (few enough that the other nodes have room for the
    // retries at once).
    let long = cluster.recording("sleep 20");
    let short = cluster.recording("sleep 0.2");
    let mut plan = short_jobs(&cluster, 48, std::slice::from_ref(&api), 0.2);
    plan.spec = Arc::new(move |i| {
        if i < 3 {
            serde_json::json!({ "command": long, "name": "long" })
        } else {
            serde_json::json!({ "command": short })
        }
    });
    plan.concurrency = 1; // in order: the long jobs are placed first
    let load = Load::start(&cluster, plan).await;
    let mesh = cluster.mesh().await;
    let work = faults::work_root(&cluster);
    let of_long_jobs = |processes: Vec<faults::JobProcess>, long: &[JobId]| {
        processes
            .into_iter()
            .filter(|p| p.node == "exec-1" && long.iter().any(|job| p.job == job.to_string()))
            .collect::<Vec<faults::JobProcess>>()
    };
    // A record turns `running` at the claim, a moment before its process exists: wait for the
    // process too, so that the executor is stopped holding a live one.
    let (held, long_held): (HashMap<JobId, u32>, Vec<JobId>) = wait_until(
        "exec-1 to run a long job",
        Duration::from_secs(60),
        || async {
            let records = faults::job_records(&mesh).await.ok()?;
            let on_node: HashMap<JobId, u32> = records
                .values()
                .filter(|r| {
                    r.status == JobStatus::Running
                        && r.node.as_ref().is_some_and(|n| n.as_str() == "exec-1")
                })
                .map(|r| (r.id, r.attempt))
                .collect();
            let long: Vec<JobId> = records
                .values()
                .filter(|r| on_node.contains_key(&r.id) && r.spec.name.as_deref() == Some("long"))
                .map(|r| r.id)
                .collect();
            let started = !of_long_jobs(faults::job_processes(&work), &long).is_empty();
            started.then_some((on_node, long))
        },
    )
    .await;
    cluster.process("exec-1").signal(Signal::SIGSTOP);
    let orphans = of_long_jobs(faults::job_processes(&work), &long_held);
    assert!(!orphans.is_empty(), "the long job runs on exec-1");

    cluster.wait_node_status("exec-1", NodeStatus::Down).await;
    wait_until(
        "the stopped executor's attempts to be taken from it",
        Duration::from_secs(60),
        || async {
            let records = faults::job_records(&mesh).await.ok()?;
            held.iter()
                .all(|(job, attempt)| {
                    records.get(job).is_some_and(|r| {
                        !(r.status == JobStatus::Running
                            && r.attempt == *attempt
                            && r.node.as_ref().is_some_and(|n| n.as_str() == "exec-1"))
                    })
                })
                .then_some(())
        },
    )
    .await;
    // The long job's first attempt still runs under the stopped executor...
    let alive = of_long_jobs(faults::job_processes(&work), &long_held);
    assert!(
        orphans.iter().all(|o| alive.iter().any(|p| p.pid == o.pid)),
        "the long job outlives the stop: {orphans:?} then {alive:?}"
    );
    cluster.process("exec-1").signal(Signal::SIGCONT);
    // ...until the executor wakes, finds the attempt taken from it and kills it, well before
    // the process's own end (over ten seconds away).
    wait_until(
        "the woken executor to kill the attempts taken from it",
        Duration::from_secs(5),
        || async {
            let alive = faults::job_processes(&work);
            orphans
                .iter()
                .all(|orphan| alive.iter().all(|p| p.pid != orphan.pid))
                .then_some(())
        },
    )
    .await;
    faults::wait_stale_attempts_gone(&mut cluster, Duration::from_secs(5)).await;

    let accepted = load.finish().await;
    let summary = faults::check(&mut cluster, &api, &accepted).await;
    eprintln!("{summary}");
    assert_eq!(summary.count(JobStatus::Succeeded), summary.jobs);
    let records = faults::job_records(&mesh).await.expect("records");
    // The long jobs cannot have ended before the stop: each was retried, and what the zombie
    // found when it woke was not recorded over the retry.
    for job in &long_held {
        let record = &records[job];
        assert!(
            record.attempt > held[job],
            "{job}, stopped with exec-1, was retried; the zombie's result was not recorded: \
             {record:?}"
        );
    }
}

// 3. kill -9 one of two schedulers.
#[tokio::test]
async fn killing_one_of_two_schedulers_under_load_loses_no_job_and_runs_each_once() {
    let (mut cluster, api) = fleet(3, 4).await;
    let load = Load::start(
        &cluster,
        short_jobs(&cluster, 300, std::slice::from_ref(&api), 0.05),
    )
    .await;
    load.wait_accepted(100).await;
    cluster.kill9("scheduler-1");
    // A create request the killed scheduler was answering may go unanswered: not counted as
    // accepted, though its job may exist, and then the check finds it in the jobs bucket.
    let accepted = load.finish().await;
    eprintln!("{} of 300 submissions acknowledged", accepted.len());
    let summary = faults::check(&mut cluster, &api, &accepted).await;
    eprintln!("{summary}");
    assert_eq!(summary.count(JobStatus::Succeeded), summary.jobs);
    assert_eq!(
        summary.runs, summary.jobs,
        "no executor failed: one run each"
    );
}

// 4. Restart nats-server (file store).
#[tokio::test]
async fn restarting_the_nats_server_under_load_loses_no_acknowledged_job() {
    let (mut cluster, api) = fleet(3, 4).await;
    let load = Load::start(
        &cluster,
        short_jobs(&cluster, 300, std::slice::from_ref(&api), 0.1),
    )
    .await;
    load.wait_accepted(100).await;
    wait_until("jobs to run", Duration::from_secs(60), || async {
        (cluster.runs().len() >= 30).then_some(())
    })
    .await;
    cluster.nats.restart().await;
    let accepted = load.finish().await;
    eprintln!(
        "{} submissions accepted, {} refused around the restart",
        accepted.len(),
        300 - accepted.len()
    );
    let summary = faults::check(&mut cluster, &api, &accepted).await;
    eprintln!("{summary}");
    assert_eq!(summary.count(JobStatus::Succeeded), summary.jobs);
}

// 5. kill -9 an API replica mid-projection.
#[tokio::test]
async fn killing_an_api_replica_mid_projection_leaves_the_history_equal_to_the_jobs_bucket() {
    let (mut cluster, first) = fleet(3, 4).await;
    let second = cluster.api("api-2").await;
    let apis = [first.clone(), second.clone()];
    let load = Load::start(&cluster, short_jobs(&cluster, 300, &apis, 0.05)).await;
    // Mid-projection: the history has some of the jobs' events, not all.
    let http = cluster.http(&first);
    wait_until(
        "the history to record jobs",
        Duration::from_secs(60),
        || async {
            let page = http.try_get("/api/v1/jobs?limit=100").await.ok()?;
            let count = page.json()["jobs"].as_array().map_or(0, Vec::len);
            (count >= 60).then_some(())
        },
    )
    .await;
    cluster.kill9("api-1");
    let accepted = load.finish().await;
    let summary = faults::check(&mut cluster, &second, &accepted).await;
    eprintln!("{summary}");
    assert_eq!(summary.count(JobStatus::Succeeded), summary.jobs);
    // A replica started afterwards serves the same history.
    let third = cluster.api("api-3").await;
    faults::check(&mut cluster, &third, &accepted).await;
}

/// A bad message for the scenario below: what it is, and its bytes.
struct Bad {
    what: &'static str,
    payload: Vec<u8>,
}

/// What the oversized messages are filled with: a rejection must not repeat it, since a
/// rejected message's content may hold secrets.
const SECRET: &str = "s3cr3t-";

/// Malformed JSON, a truncated MessagePack encoding of `shape` (a message of the subject's
/// type, roughly), and `shape` with `field` blown up past the size limit with [`SECRET`].
fn bad_messages(shape: &serde_json::Value, field: &str) -> Vec<Bad> {
    let packed = codec::to_msgpack(shape).expect("encodes");
    let mut oversized = shape.clone();
    oversized[field] = serde_json::Value::String(SECRET.repeat(MAX_JOB_BYTES / SECRET.len() + 128));
    vec![
        Bad {
            what: "malformed JSON",
            payload: br#"{"command": "true", "name": }"#.to_vec(),
        },
        Bad {
            what: "truncated MessagePack",
            payload: packed[..packed.len() / 2].to_vec(),
        },
        Bad {
            what: "oversized",
            payload: serde_json::to_vec(&oversized).expect("encodes"),
        },
    ]
}

// 6. Malformed, truncated and oversized messages on every consumed subject.
#[tokio::test]
async fn malformed_truncated_and_oversized_messages_on_every_consumed_subject_are_rejected_and_the_mesh_keeps_working()
 {
    let (mut cluster, api) = fleet(3, 4).await;
    let client = cluster.client().await;
    let js = jetstream::new(client.clone());
    let mut rejections = client
        .subscribe(subjects::REJECTED_ALL)
        .await
        .expect("subscribe");
    client.flush().await.expect("flush");
    let load = Load::start(
        &cluster,
        short_jobs(&cluster, 150, std::slice::from_ref(&api), 0.1),
    )
    .await;
    load.wait_accepted(30).await;

    let node = NodeId::new("exec-1").expect("valid");
    let some_job = JobId::generate();
    let record = serde_json::json!({
        "id": some_job.to_string(), "status": "pending", "attempt": 1, "node": "exec-1",
        "spec": {"command": "true"}, "created_at": "2026-01-01T00:00:00Z",
        "updated_at": "2026-01-01T00:00:00Z",
    });
    let spec = serde_json::json!({ "command": "true", "name": "bad" });
    // A `lost` event: both the history and the registry's tally read that kind.
    let event =
        serde_json::json!({ "kind": "lost", "at": "2026-01-01T00:00:00Z", "record": record });
    let event_subject = subjects::job_event(some_job, capstan_protocol::JobEventKind::Lost);
    let dispatch_subject = subjects::dispatch(&node);
    let control_subject = subjects::control(&node, "cancel");
    let beat = serde_json::json!({ "node": "exec-1", "instance": JobId::generate().to_string(), "jobs": [] });
    let registration = serde_json::json!({
        "node": "exec-9", "instance": JobId::generate().to_string(), "capacity": 1, "version": "0",
    });
    let node_call = |call: subjects::registry::NodeCall, node: &str| {
        call.subject(&capstan_protocol::NodeId::new(node).expect("valid"))
    };
    let register = node_call(subjects::registry::NodeCall::Register, "exec-9");
    let heartbeat = node_call(subjects::registry::NodeCall::Heartbeat, "exec-1");
    let deregister = node_call(subjects::registry::NodeCall::Deregister, "exec-1");

    // Stored subjects: the consumer must reject (and terminate) each message.
    let mut expected: Vec<(&str, String)> = Vec::new(); // (origin, subject), once per message
    for (subject, shape, field, origins) in [
        (subjects::SUBMIT.to_owned(), &spec, "stdin", vec!["submit"]),
        (
            dispatch_subject.clone(),
            &serde_json::json!({ "record": record, "revision": 1 }),
            "record",
            vec!["dispatch"],
        ),
        (
            event_subject.clone(),
            &event,
            "record",
            vec!["history", "registry"],
        ),
    ] {
        for bad in bad_messages(shape, field) {
            js.publish(subject.clone(), bad.payload.into())
                .await
                .expect("published")
                .await
                .unwrap_or_else(|e| panic!("{} on {subject} stored: {e}", bad.what));
            for origin in &origins {
                expected.push((*origin, subject.clone()));
            }
        }
    }
    // Core NATS commands: nobody to answer, so the rejection is the only trace.
    for bad in bad_messages(
        &serde_json::json!({ "job": some_job.to_string(), "attempt": 1 }),
        "job",
    ) {
        client
            .publish(control_subject.clone(), bad.payload.into())
            .await
            .expect("published");
        expected.push(("*", control_subject.clone()));
    }
    // Request/reply endpoints: each must answer with an error, and report the rejection.
    let mut unanswered = Vec::new();
    for (subject, shape, field) in [
        (subjects::CREATE.to_owned(), &spec, "stdin"),
        (
            subjects::CANCEL.to_owned(),
            &serde_json::json!({ "id": some_job.to_string() }),
            "id",
        ),
        (register, &registration, "node"),
        (heartbeat, &beat, "node"),
        (deregister, &beat, "node"),
    ] {
        for bad in bad_messages(shape, field) {
            let reply = client.request(subject.clone(), bad.payload.into()).await;
            let error = reply.ok().and_then(|reply| {
                capstan_mesh::wire::decode::<serde_json::Value>(
                    reply.headers.as_ref(),
                    &reply.payload,
                )
                .ok()
                .and_then(|(body, _)| body.get("error").cloned())
            });
            if error.is_none() {
                unanswered.push(format!("{} on {subject}: no error reply", bad.what));
            }
            expected.push(("*", subject.clone()));
        }
    }
    // And the REST submission endpoint.
    let http = cluster.http(&api);
    for bad in bad_messages(&spec, "stdin") {
        let reply = http
            .send(
                Method::POST,
                "/api/v1/jobs",
                &[("content-type", "application/json")],
                bad.payload,
            )
            .await;
        if !(reply.status == StatusCode::BAD_REQUEST
            || reply.status == StatusCode::PAYLOAD_TOO_LARGE)
        {
            unanswered.push(format!(
                "{} on POST /api/v1/jobs: {}",
                bad.what, reply.status
            ));
        }
    }

    // Every stored or core message is reported on `capstan.events.rejected.<origin>`.
    let mut seen: Vec<(String, String)> = Vec::new();
    let mut leaks = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    let missing = loop {
        let mut missing: Vec<(&str, String)> = Vec::new();
        let mut pool = seen.clone();
        for (origin, subject) in &expected {
            let found = pool
                .iter()
                .position(|(o, s)| (*origin == "*" || o == origin) && s == subject);
            match found {
                Some(at) => {
                    pool.swap_remove(at);
                }
                None => missing.push((*origin, subject.clone())),
            }
        }
        if missing.is_empty() || Instant::now() >= deadline {
            break missing;
        }
        if let Ok(Some(message)) =
            tokio::time::timeout(Duration::from_millis(500), rejections.next()).await
        {
            let origin = message
                .subject
                .as_str()
                .rsplit('.')
                .next()
                .unwrap_or("")
                .to_owned();
            let rejection: Rejection = codec::decode(codec::Encoding::MsgPack, &message.payload)
                .expect("rejections decode");
            if rejection.reason.contains(SECRET)
                || rejection
                    .field
                    .as_deref()
                    .is_some_and(|f| f.contains(SECRET))
            {
                leaks.push(format!(
                    "the rejection from {origin} of a message on {} repeats the message's content \
                     ({} bytes of reason: {:.120}…)",
                    rejection.subject,
                    rejection.reason.len(),
                    rejection.reason
                ));
            }
            seen.push((origin, rejection.subject));
        }
    };
    let mut problems = unanswered;
    problems.extend(missing.iter().map(|(origin, subject)| {
        format!("no rejection from {origin} for a bad message on {subject}")
    }));
    problems.extend(leaks);

    // The services are all still up, and still work.
    for name in [
        "registry-1",
        "scheduler-1",
        "scheduler-2",
        "exec-1",
        "exec-2",
        "exec-3",
        "api-1",
    ] {
        if !cluster.process(name).is_running() {
            problems.push(format!("{name} exited"));
        }
    }
    let submitter = Submitter::new(&cluster, &[]).await;
    let after = submitter
        .submit(
            Via::Create,
            0,
            &serde_json::json!({ "command": cluster.recording("true") }).to_string(),
        )
        .await
        .expect("a job is created after the bad messages");
    let mut accepted = load.finish().await;
    accepted.push(after.id);
    let summary = faults::check(&mut cluster, &api, &accepted).await;
    eprintln!("{summary}");
    assert_eq!(summary.count(JobStatus::Succeeded), summary.jobs);
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

// 7. 10,000 jobs submitted concurrently over REST and NATS.
#[tokio::test]
async fn thousands_of_jobs_submitted_concurrently_over_rest_and_nats_each_run_exactly_once() {
    let count = if faults::soak_enabled() {
        SOAK_CONCURRENT_JOBS
    } else {
        CI_CONCURRENT_JOBS
    };
    let (mut cluster, api) = fleet(3, 8).await;
    let second = cluster.api("api-2").await;
    let started = Instant::now();
    let mut plan = LoadPlan::commands(count, &[api.clone(), second], cluster.recording("true"));
    plan.concurrency = 96;
    let load = Load::start(&cluster, plan).await;
    let accepted = load.finish().await;
    let submitted = started.elapsed();
    assert_eq!(accepted.len(), count, "every submission was accepted");
    let summary = faults::check(&mut cluster, &api, &accepted).await;
    eprintln!(
        "{count} jobs submitted in {submitted:?}, all checked after {:?}: {summary}",
        started.elapsed()
    );
    assert_eq!(summary.count(JobStatus::Succeeded), count);
    assert_eq!(summary.runs, count, "each ran exactly once");
}

// 8. A job that writes 1 GB of output.
#[tokio::test]
async fn a_job_writing_a_gigabyte_of_output_succeeds_with_its_size_counted_while_its_executor_keeps_running_others()
 {
    const GIB: u64 = 1 << 30;
    let (mut cluster, api) = fleet(1, 4).await;
    let submitter = Submitter::new(&cluster, &[]).await;
    let gate = cluster.dir().join("second-half");
    // Half the output, then wait until the test has seen other jobs finish, then the rest:
    // the other jobs run while this one's output is being read.
    let command = cluster.recording(&format!(
        "head -c {half} /dev/zero; until [ -e {gate} ]; do sleep 0.05; done; head -c {half} /dev/zero",
        half = GIB / 2,
        gate = gate.display()
    ));
    let big = submitter
        .submit(
            Via::Create,
            0,
            &serde_json::json!({ "command": command, "name": "gigabyte" }).to_string(),
        )
        .await
        .expect("created")
        .id;
    let mesh = cluster.mesh().await;
    wait_until("the big job to run", Duration::from_secs(60), || async {
        mesh.jobs
            .get(&big.to_string())
            .await
            .ok()
            .flatten()
            .filter(|r| r.value.status == JobStatus::Running)
    })
    .await;
    let load = Load::start(
        &cluster,
        short_jobs(&cluster, 60, std::slice::from_ref(&api), 0.05),
    )
    .await;
    let others = load.finish().await;
    let records = cluster
        .wait_terminal(&others, Duration::from_secs(120))
        .await;
    assert!(records.iter().all(|r| r.status == JobStatus::Succeeded));
    let still = cluster.job(big).await.expect("the big job exists");
    assert_eq!(
        still.status,
        JobStatus::Running,
        "the others finished meanwhile"
    );
    std::fs::write(&gate, b"").expect("open the gate");

    let record = &cluster
        .wait_terminal(&[big], Duration::from_secs(300))
        .await[0];
    assert_eq!(record.status, JobStatus::Succeeded, "{record:?}");
    let output = record.output.expect("output counted");
    assert_eq!(output.stdout_bytes, GIB);
    assert!(output.truncated, "only the cap is kept: {output:?}");
    let mut accepted = others;
    accepted.push(big);
    let summary = faults::check(&mut cluster, &api, &accepted).await;
    eprintln!("{summary}");
    cluster.wait_nodes_up(&["exec-1"]).await;
}

// 9. A job whose child ignores SIGTERM and forks.
#[tokio::test]
async fn a_timed_out_job_whose_children_ignore_sigterm_and_fork_leaves_no_process_behind() {
    let (mut cluster, api) = fleet(2, 4).await;
    let load = Load::start(
        &cluster,
        short_jobs(&cluster, 60, std::slice::from_ref(&api), 0.1),
    )
    .await;
    let forked = cluster.dir().join("forked");
    let forked = forked.display();
    // Children and grandchildren that ignore SIGTERM, one of them double-forked (its parent
    // exits, so it is re-parented but stays in the job's process group).
    let command = cluster.recording(&format!(
        r#"trap "" TERM
        (trap "" TERM; echo child >> {forked}; sleep 1000) &
        (trap "" TERM; (trap "" TERM; echo grandchild >> {forked}; sleep 1000) & wait) &
        (trap "" TERM; (echo orphan >> {forked}; exec sleep 1000) &) &
        wait"#
    ));
    let submitter = Submitter::new(&cluster, &[]).await;
    let job = submitter
        .submit(
            Via::Create,
            0,
            &serde_json::json!({ "command": command, "timeout": 2 }).to_string(),
        )
        .await
        .expect("created")
        .id;
    let record = &cluster.wait_terminal(&[job], Duration::from_secs(60)).await[0];
    assert_eq!(record.status, JobStatus::TimedOut, "{record:?}");
    let lines = std::fs::read_to_string(cluster.dir().join("forked")).unwrap_or_default();
    assert_eq!(lines.lines().count(), 3, "every child started: {lines:?}");
    // The kill grace is one second (see `Cluster::executor`); once the job is recorded its
    // whole group is gone, give or take the kernel's bookkeeping.
    let work = faults::work_root(&cluster);
    wait_until(
        "every process of the timed-out job to be gone",
        Duration::from_secs(5),
        || async {
            faults::job_processes(&work)
                .iter()
                .all(|p| p.job != job.to_string())
                .then_some(())
        },
    )
    .await;
    let mut accepted = load.finish().await;
    accepted.push(job);
    let summary = faults::check(&mut cluster, &api, &accepted).await;
    eprintln!("{summary}");
    assert_eq!(summary.count(JobStatus::TimedOut), 1);
    assert_eq!(summary.count(JobStatus::Succeeded), summary.jobs - 1);
}

// 10. A submit with a duplicate idempotency key racing itself.
#[tokio::test]
async fn submissions_with_one_idempotency_key_racing_each_other_make_one_job_that_runs_once() {
    let (mut cluster, api) = fleet(2, 4).await;
    let second = cluster.api("api-2").await;
    let apis = [api.clone(), second];
    let load = Load::start(&cluster, short_jobs(&cluster, 60, &apis, 0.1)).await;
    let key = format!("race-{}", JobId::generate());
    let body = serde_json::json!({
        "command": cluster.recording("sleep 0.5"),
        "idempotency_key": key,
    })
    .to_string();
    let submitter = Submitter::new(&cluster, &apis).await;
    let js = jetstream::new(cluster.client().await);
    let racers = 60;
    let start = Arc::new(tokio::sync::Barrier::new(racers));
    let mut tasks = Vec::new();
    for i in 0..racers {
        let (submitter, js, body, start) =
            (submitter.clone(), js.clone(), body.clone(), start.clone());
        tasks.push(tokio::spawn(async move {
            start.wait().await;
            match i % 4 {
                0 => (
                    "rest",
                    submitter.submit(Via::Rest, i, &body).await.map(Some),
                ),
                1 => (
                    "create",
                    submitter.submit(Via::Create, i, &body).await.map(Some),
                ),
                // With a job id of its own: a different job, unless the key says otherwise.
                2 => (
                    "publish",
                    submitter.submit(Via::Publish, i, &body).await.map(|_| None),
                ),
                // As `nats pub` does: no headers at all.
                _ => {
                    let stored = async {
                        js.publish(subjects::SUBMIT, body.into())
                            .await
                            .map_err(|e| e.to_string())?
                            .await
                            .map_err(|e| e.to_string())
                    };
                    ("plain publish", stored.await.map(|_| None))
                }
            }
        }));
    }
    let mut answered = HashSet::new();
    let mut fresh = 0;
    for task in tasks {
        let (via, outcome) = task.await.expect("joins");
        if let Some(created) = outcome.unwrap_or_else(|e| panic!("a {via} submission failed: {e}"))
        {
            answered.insert(created.id);
            fresh += usize::from(!created.duplicate);
        }
    }
    assert_eq!(
        answered.len(),
        1,
        "every answer names the same job: {answered:?}"
    );
    assert!(fresh <= 1, "{fresh} answers claim to have created the job");
    let job = *answered.iter().next().expect("one");

    faults::wait_submissions_handled(&cluster).await;
    let mut accepted = load.finish().await;
    accepted.push(job);
    let summary = faults::check(&mut cluster, &api, &accepted).await;
    eprintln!("{summary}");
    let mesh = cluster.mesh().await;
    let records = faults::job_records(&mesh).await.expect("records");
    let keyed: Vec<JobId> = records
        .values()
        .filter(|r| r.spec.idempotency_key.as_deref() == Some(key.as_str()))
        .map(|r| r.id)
        .collect();
    assert_eq!(keyed, [job], "one job holds the key");
    assert_eq!(records[&job].status, JobStatus::Succeeded);
    assert_eq!(
        cluster.runs().get(&job.to_string()),
        Some(&1),
        "it ran once"
    );
    assert_eq!(summary.runs, summary.jobs, "nothing else ran twice either");
}

/// The event history of every job that ended lost or quarantined, for the soak's failure
/// message.
async fn lost_histories(cluster: &mut Cluster, api: &str) -> String {
    let mesh = cluster.mesh().await;
    let records = faults::job_records(&mesh).await.unwrap_or_default();
    let http = cluster.http(api);
    let mut text = String::new();
    for record in records
        .values()
        .filter(|r| matches!(r.status, JobStatus::Lost | JobStatus::Quarantined))
    {
        text.push_str(&format!(
            "{} {}: {:?}\n",
            record.id, record.status, record.error
        ));
        let events = http
            .get(&format!("/api/v1/jobs/{}/events", record.id))
            .await;
        for event in events.json()["events"].as_array().into_iter().flatten() {
            text.push_str(&format!(
                "  {} {} attempt {} node {} error {}\n",
                event["at"], event["kind"], event["attempt"], event["node"], event["error"]
            ));
        }
    }
    text
}

/// A fault of the soak, by scenario number.
#[derive(Debug, Clone, Copy)]
enum Fault {
    KillExecutor(usize),
    StopExecutor(usize),
    KillScheduler(usize),
    RestartNats,
    KillApi(usize),
}

impl Fault {
    fn draw(random: &mut Prng) -> Self {
        match random.below(1..6) {
            1 => Self::KillExecutor(random.below(1..4)),
            2 => Self::StopExecutor(random.below(1..4)),
            3 => Self::KillScheduler(random.below(1..3)),
            4 => Self::RestartNats,
            _ => Self::KillApi(random.below(1..3)),
        }
    }
}

/// Injects `fault` and heals it (restarts what it killed, wakes what it stopped); `apis` are
/// the live APIs by name.
async fn inject(cluster: &mut Cluster, fault: Fault, apis: &mut HashMap<String, String>) {
    match fault {
        Fault::KillExecutor(n) => {
            let node = format!("exec-{n}");
            cluster.kill9(&node);
            // Down first, so the fault is noticed before the node comes back.
            cluster.wait_node_status(&node, NodeStatus::Down).await;
            cluster.executor(&node, 4, &[]);
            cluster.wait_nodes_up(&[&node]).await;
        }
        Fault::StopExecutor(n) => {
            let node = format!("exec-{n}");
            let now = capstan_protocol::Timestamp::now;
            eprintln!("{}: SIGSTOP {node}", now());
            cluster.process(&node).signal(Signal::SIGSTOP);
            cluster.wait_node_status(&node, NodeStatus::Down).await;
            eprintln!("{}: {node} is down; SIGCONT", now());
            cluster.process(&node).signal(Signal::SIGCONT);
            cluster.wait_nodes_up(&[&node]).await;
            eprintln!("{}: {node} is up", now());
        }
        Fault::KillScheduler(n) => {
            let name = format!("scheduler-{n}");
            cluster.kill9(&name);
            cluster.scheduler(&name);
        }
        Fault::RestartNats => cluster.nats.restart().await,
        Fault::KillApi(n) => {
            let name = format!("api-{n}");
            cluster.kill9(&name);
            let base = cluster.api(&name).await;
            apis.insert(name, base);
        }
    }
}

// The soak: faults 1–5 drawn at random, each under load, each followed by the check.
#[tokio::test]
async fn randomized_executor_scheduler_nats_and_api_faults_under_load_keep_every_promise() {
    let seed = Prng::seed_from_env();
    let soak = faults::soak_enabled();
    let budget = if soak {
        Duration::from_secs(
            std::env::var("CAPSTAN_SOAK_SECS")
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or(300),
        )
    } else {
        Duration::ZERO // one round
    };
    eprintln!("soak seed {seed} (replay with CAPSTAN_SOAK_SEED={seed}); budget {budget:?}");
    let mut random = Prng::new(seed);
    let (mut cluster, first) = fleet(3, 4).await;
    let second = cluster.api("api-2").await;
    let mut apis: HashMap<String, String> =
        HashMap::from([("api-1".to_owned(), first), ("api-2".to_owned(), second)]);
    let started = Instant::now();
    let mut accepted = Vec::new();
    let mut round = 0;
    loop {
        round += 1;
        let fault = Fault::draw(&mut random);
        let count = random.below(60..150);
        let seconds = [0.05, 0.2, 0.5, 1.0][random.below(0..4)];
        eprintln!("round {round}: {count} jobs of {seconds}s, {fault:?}");
        let bases: Vec<String> = apis.values().cloned().collect();
        let load = Load::start(&cluster, short_jobs(&cluster, count, &bases, seconds)).await;
        load.wait_accepted(random.below(1..count / 2)).await;
        inject(&mut cluster, fault, &mut apis).await;
        accepted.extend(load.finish().await);
        let reader = apis.values().next().expect("an API").clone();
        let summary = faults::check(&mut cluster, &reader, &accepted).await;
        eprintln!("round {round} checked: {summary}");
        // Each fault takes at most one executor of three, or none: with two healthy nodes
        // throughout, no job of any round may end lost or set aside.
        let set_aside = summary.count(JobStatus::Lost) + summary.count(JobStatus::Quarantined);
        if set_aside > 0 {
            let histories = lost_histories(&mut cluster, &reader).await;
            panic!(
                "round {round} ({fault:?}) left {set_aside} jobs lost or quarantined: \
                 {summary}\n{histories}"
            );
        }
        if started.elapsed() >= budget {
            break;
        }
    }
    assert!(round >= 1 && !accepted.is_empty());
}
