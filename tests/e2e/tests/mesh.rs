//! The mesh as an operator runs it: every service a separate process, with replicas, jobs
//! published exactly as the `nats` CLI publishes them (a JSON body, no headers).

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use capstan_e2e::Cluster;
use capstan_protocol::codec::{self, Encoding};
use capstan_protocol::reply::Created;
use capstan_protocol::{JobEvent, JobId, JobStatus, Reply, headers, subjects};
use capstan_testkit::wait_until;
use futures::StreamExt;

/// Registries, schedulers and executors as in the story: 2, 2 and 3.
async fn replicated() -> Cluster {
    let mut cluster = Cluster::start().await;
    cluster.registry("registry-1");
    cluster.registry("registry-2");
    cluster.scheduler("scheduler-1");
    cluster.scheduler("scheduler-2");
    cluster.executor("exec-1", 4, &["zone=eu"]);
    cluster.executor("exec-2", 4, &["zone=eu"]);
    cluster.executor("exec-3", 4, &["zone=us"]);
    cluster.wait_nodes_up(&["exec-1", "exec-2", "exec-3"]).await;
    cluster
}

/// Publishes like `nats pub`: no headers. Job ids come back through the jobs' events (a job
/// placed and ended at once has only its end's).
async fn publish_jobs(client: &async_nats::Client, bodies: &[String]) -> Vec<JobId> {
    let mut events = job_events(client).await;
    publish(client, bodies).await;
    let mut ids = HashSet::new();
    collect_ids(&mut events, &mut ids, bodies.len()).await;
    ids.into_iter().collect()
}

async fn job_events(client: &async_nats::Client) -> async_nats::Subscriber {
    let events = client
        .subscribe(subjects::JOB_EVENTS_ALL)
        .await
        .expect("subscribe");
    client.flush().await.expect("flush");
    events
}

async fn publish(client: &async_nats::Client, bodies: &[String]) {
    for body in bodies {
        client
            .publish(subjects::SUBMIT, body.clone().into())
            .await
            .expect("published");
    }
}

/// Adds the ids of jobs with events to `ids` until it holds `count`. A job has several
/// events, and a live subscriber can see one twice (a redelivered submission announces its job
/// again; the stream keeps one copy), hence a set.
async fn collect_ids(events: &mut async_nats::Subscriber, ids: &mut HashSet<JobId>, count: usize) {
    while ids.len() < count {
        let message = tokio::time::timeout(Duration::from_secs(60), events.next())
            .await
            .expect("every job accepted in time")
            .expect("open");
        let (job, _) = subjects::parse_job_event(&message.subject).expect("job event");
        ids.insert(job);
    }
}

#[tokio::test]
async fn two_hundred_jobs_published_as_plain_json_each_run_exactly_once_spread_over_three_executors()
 {
    let mut cluster = replicated().await;
    let client = cluster.client().await;
    let bodies: Vec<String> = (0..200)
        .map(|_| {
            let command = cluster.recording("true");
            serde_json::json!({ "command": command }).to_string()
        })
        .collect();
    let ids = publish_jobs(&client, &bodies).await;
    let records = cluster.wait_terminal(&ids, Duration::from_secs(120)).await;

    assert!(records.iter().all(|r| r.status == JobStatus::Succeeded));
    let runs = cluster.runs();
    assert_eq!(runs.len(), 200, "every job ran");
    for id in &ids {
        assert_eq!(runs.get(&id.to_string()), Some(&1), "job {id} ran once");
    }
    let mut per_node: HashMap<String, usize> = HashMap::new();
    for record in &records {
        assert_eq!(record.attempt, 1, "placed once");
        *per_node
            .entry(record.node.as_ref().expect("ran on a node").to_string())
            .or_default() += 1;
    }
    for node in ["exec-1", "exec-2", "exec-3"] {
        let count = per_node.get(node).copied().unwrap_or(0);
        assert!(count >= 20, "load spread over the executors: {per_node:?}");
    }
}

#[tokio::test]
async fn a_job_can_be_followed_through_events_logs_and_the_jobs_bucket() {
    let cluster = replicated().await;
    let client = cluster.client().await;
    let mut events = client
        .subscribe(subjects::EVENTS_ALL)
        .await
        .expect("subscribe");

    // `nats req capstan.jobs.create '{…}'` replies with the new job's id.
    // The schedulers may still be registering their endpoint: ask until one answers.
    let reply = wait_until(
        "a scheduler to answer create",
        Duration::from_secs(30),
        || {
            let client = client.clone();
            async move {
                client
                    .request(
                        subjects::CREATE,
                        r#"{"command": "echo hello; echo oops >&2; sleep 0.3", "labels": {"zone": "us"}}"#
                            .into(),
                    )
                    .await
                    .ok()
            }
        },
    )
    .await;
    let created: Reply<Created> = serde_json::from_slice(&reply.payload).expect("JSON reply");
    let id = created.into_result().expect("created").id;
    let mut logs = client
        .subscribe(subjects::job_logs(id))
        .await
        .expect("subscribe to logs");

    let mut seen = Vec::new();
    while !seen
        .iter()
        .any(|(kind, _): &(String, _)| kind == "succeeded")
    {
        let message = tokio::time::timeout(Duration::from_secs(60), events.next())
            .await
            .expect("events in time")
            .expect("open");
        let Some((job, kind)) = subjects::parse_job_event(&message.subject) else {
            continue;
        };
        if job != id {
            continue;
        }
        let map = message.headers.clone().expect("events carry headers");
        let event: JobEvent = codec::decode(Encoding::MsgPack, &message.payload).expect("decodes");
        assert_eq!(event.kind.as_str(), kind);
        assert_eq!(
            map.get(headers::STATUS).map(|v| v.to_string()),
            Some(event.record.status.to_string())
        );
        seen.push((kind.to_owned(), map));
    }
    let kinds: Vec<&str> = seen.iter().map(|(k, _)| k.as_str()).collect();
    // Taken at once by exec-3, which carries its label, it starts `running`; handed on by
    // another executor and placed by a scheduler, `pending` first.
    assert!(
        matches!(
            kinds.as_slice(),
            ["pending", "running", "succeeded"] | ["running", "succeeded"]
        ),
        "{kinds:?}"
    );
    let (_, last) = seen.last().expect("its end");
    assert_eq!(last.get(headers::NODE).map(|v| v.as_str()), Some("exec-3"));
    assert_eq!(last.get(headers::EXIT_CODE).map(|v| v.as_str()), Some("0"));
    assert!(last.get(headers::DURATION_MS).is_some());

    // The output is on the job's log subject and in the logs stream.
    let mut text = String::new();
    let mut saw_stderr = false;
    while !text.contains("hello") || !saw_stderr {
        let chunk = tokio::time::timeout(Duration::from_secs(10), logs.next()).await;
        let Ok(Some(chunk)) = chunk else { break };
        let which = chunk
            .headers
            .as_ref()
            .and_then(|h| h.get(headers::LOG_STREAM))
            .map(|v| v.to_string());
        saw_stderr |= which.as_deref() == Some("stderr");
        text.push_str(&String::from_utf8_lossy(&chunk.payload));
    }
    // A live subscription may start after the chunks were published; the stream has them all.
    let js = async_nats::jetstream::new(client.clone());
    let stored = js
        .get_stream("CAPSTAN_LOGS")
        .await
        .expect("stream")
        .get_last_raw_message_by_subject(&subjects::job_logs(id))
        .await
        .expect("output stored");
    assert!(!stored.payload.is_empty());

    // `nats kv get capstan_jobs <id>` gives the current state, as JSON.
    let kv = js.get_key_value("capstan_jobs").await.expect("bucket");
    let value = kv.get(id.to_string()).await.expect("get").expect("present");
    let state: serde_json::Value = serde_json::from_slice(&value).expect("JSON value");
    assert_eq!(state["status"], "succeeded");
    assert_eq!(state["node"], "exec-3");
    assert_eq!(state["exit_code"], 0);
}

#[tokio::test]
async fn every_running_service_is_listed_as_a_micro_service_with_its_endpoints() {
    let cluster = replicated().await;
    let client = cluster.client().await;
    // What `nats micro ls` does: ask every service for its info and collect the answers.
    let infos = wait_until(
        "seven services to answer",
        Duration::from_secs(30),
        || async {
            let inbox = client.new_inbox();
            let mut replies = client.subscribe(inbox.clone()).await.ok()?;
            client
                .publish_with_reply("$SRV.INFO", inbox, "".into())
                .await
                .ok()?;
            let mut infos = Vec::new();
            while let Ok(Some(reply)) =
                tokio::time::timeout(Duration::from_millis(500), replies.next()).await
            {
                infos.push(serde_json::from_slice::<serde_json::Value>(&reply.payload).ok()?);
            }
            // A service answers as soon as it starts, before its endpoints are added.
            let ready = infos
                .iter()
                .all(|i| i["endpoints"].as_array().is_some_and(|e| !e.is_empty()));
            (infos.len() >= 7 && ready).then_some(infos)
        },
    )
    .await;
    let mut by_name: HashMap<String, usize> = HashMap::new();
    for info in &infos {
        *by_name
            .entry(info["name"].as_str().unwrap_or_default().to_owned())
            .or_default() += 1;
        let endpoints = info["endpoints"].as_array().expect("endpoints listed");
        assert!(!endpoints.is_empty(), "{info}");
    }
    assert_eq!(by_name.get("capstan-registry"), Some(&2), "{by_name:?}");
    assert_eq!(by_name.get("capstan-scheduler"), Some(&2), "{by_name:?}");
    assert_eq!(by_name.get("capstan-executor"), Some(&3), "{by_name:?}");
    let scheduler = infos
        .iter()
        .find(|i| i["name"] == "capstan-scheduler")
        .expect("a scheduler");
    assert!(
        scheduler["endpoints"]
            .as_array()
            .expect("endpoints")
            .iter()
            .any(|e| e["subject"] == subjects::CREATE)
    );
    // Stats are served too.
    let stats = client
        .request("$SRV.STATS.capstan-registry", "".into())
        .await
        .expect("stats answer");
    let stats: serde_json::Value = serde_json::from_slice(&stats.payload).expect("JSON");
    assert!(stats["endpoints"].as_array().is_some_and(|e| !e.is_empty()));
}

#[tokio::test]
async fn a_job_published_while_no_scheduler_runs_runs_once_one_starts() {
    let mut cluster = Cluster::start().await;
    cluster.registry("registry-1");
    cluster.executor("exec-1", 2, &[]);
    cluster.wait_nodes_up(&["exec-1"]).await;
    // Wait until the executor created the streams, then publish with no scheduler anywhere.
    let client = cluster.client().await;
    let js = async_nats::jetstream::new(client.clone());
    let body = serde_json::json!({ "command": cluster.recording("true") }).to_string();
    js.publish(subjects::SUBMIT, body.into())
        .await
        .expect("published")
        .await
        .expect("stored while no scheduler runs");

    cluster.scheduler("scheduler-1");
    wait_until("the job to run", Duration::from_secs(60), || async {
        (cluster.runs().len() == 1).then_some(())
    })
    .await;
    assert_eq!(cluster.runs().values().copied().collect::<Vec<_>>(), [1]);
}

#[tokio::test]
async fn killing_one_of_two_schedulers_mid_burst_loses_no_job_and_runs_none_twice() {
    let mut cluster = replicated().await;
    let client = cluster.client().await;
    let bodies: Vec<String> = (0..300)
        .map(|_| serde_json::json!({ "command": cluster.recording("sleep 0.02") }).to_string())
        .collect();
    let (first, rest) = bodies.split_at(100);
    let mut events = job_events(&client).await;
    let mut accepted = HashSet::new();
    publish(&client, first).await;
    collect_ids(&mut events, &mut accepted, 50).await;
    cluster.kill9("scheduler-1");
    publish(&client, rest).await;
    collect_ids(&mut events, &mut accepted, 300).await;
    let ids: Vec<JobId> = accepted.into_iter().collect();
    let records = cluster.wait_terminal(&ids, Duration::from_secs(180)).await;
    assert!(records.iter().all(|r| r.status == JobStatus::Succeeded));
    let runs = cluster.runs();
    assert_eq!(runs.len(), 300);
    assert!(runs.values().all(|n| *n == 1), "a job ran twice");
}

#[tokio::test]
async fn malformed_messages_on_every_consumed_subject_are_rejected_and_the_mesh_keeps_working() {
    let mut cluster = replicated().await;
    let client = cluster.client().await;
    let mut rejections = client
        .subscribe(subjects::REJECTED_ALL)
        .await
        .expect("subscribe");
    let js = async_nats::jetstream::new(client.clone());
    let garbage: &[u8] = b"\x93\x01\x02";
    js.publish(subjects::SUBMIT, garbage.into())
        .await
        .expect("published")
        .await
        .expect("stored");
    let node = capstan_protocol::NodeId::new("exec-1").expect("valid");
    js.publish(subjects::dispatch(&node), garbage.into())
        .await
        .expect("published")
        .await
        .expect("stored");
    for subject in [
        subjects::CREATE.to_owned(),
        subjects::registry::NodeCall::Register.subject(&node),
        subjects::registry::NodeCall::Heartbeat.subject(&node),
        subjects::registry::NODES_GET.to_owned(),
    ] {
        // The nodes being up says the registries answer; a scheduler's endpoint may still be
        // on its way: ask until one is there.
        let reply = wait_until(
            &format!("an endpoint on {subject}"),
            Duration::from_secs(30),
            || async {
                client
                    .request(subject.clone(), "{not json".into())
                    .await
                    .ok()
            },
        )
        .await;
        let body: serde_json::Value = serde_json::from_slice(&reply.payload).expect("JSON error");
        assert_eq!(body["error"]["code"], "bad_request", "{subject}: {body}");
    }
    let mut origins = HashSet::new();
    while origins.len() < 4 {
        let message = tokio::time::timeout(Duration::from_secs(30), rejections.next())
            .await
            .expect("rejections in time")
            .expect("open");
        origins.insert(message.subject.to_string());
    }
    for origin in ["submit", "dispatch", "create", "registry"] {
        assert!(
            origins.contains(&format!("capstan.events.rejected.{origin}")),
            "{origins:?}"
        );
    }
    // Still working.
    let body = serde_json::json!({ "command": cluster.recording("true") }).to_string();
    let ids = publish_jobs(&client, &[body]).await;
    let records = cluster.wait_terminal(&ids, Duration::from_secs(60)).await;
    assert_eq!(records[0].status, JobStatus::Succeeded);
}
