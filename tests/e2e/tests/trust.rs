//! Least privilege on NATS, against the server configured as `capstan nats init` writes it:
//! each identity tries what it must not do; the server refuses it (and logs the refusal), and
//! nothing changes in the streams and buckets. The rest of the suite runs under the same
//! permissions, and fails if the server refuses a service anything.

use std::time::Duration;

use async_nats::jetstream;
use capstan_e2e::Cluster;
use capstan_mesh::identities::Identity;
use capstan_protocol::codec::{self, Encoding};
use capstan_protocol::reply::{Cancelled, Created};
use capstan_protocol::subjects::registry::NodeCall;
use capstan_protocol::{
    AuditAction, AuditRecord, ErrorCode, Heartbeat, InstanceId, JobEventKind, JobId, JobStatus,
    NodeId, NodeRecord, Registration, Rejection, RejectionCode, Reply, headers, subjects, topology,
};
use capstan_testkit::wait_until;
use futures::StreamExt;

/// How long a refused request is given before it counts as unanswered.
const REFUSED_WITHIN: Duration = Duration::from_secs(2);

fn node(name: &str) -> NodeId {
    NodeId::new(name).expect("a valid node id")
}

/// A registry, a scheduler and the executors exec-1 and exec-2, up.
async fn mesh() -> Cluster {
    let mut cluster = Cluster::start().await;
    cluster.expect_violations();
    cluster.registry("registry-1");
    cluster.scheduler("scheduler-1");
    cluster.executor("exec-1", 2, &[]);
    cluster.executor("exec-2", 2, &[]);
    cluster.wait_nodes_up(&["exec-1", "exec-2"]).await;
    // The scheduler's create endpoint may start after the nodes are up.
    capstan_e2e::faults::wait_create_answers(&cluster).await;
    cluster
}

/// A connection as `identity`, with its own inbox prefix, as the services connect.
async fn connect_as(cluster: &Cluster, identity: &Identity) -> async_nats::Client {
    async_nats::ConnectOptions::new()
        .nkey(cluster.seed(identity))
        .custom_inbox_prefix(identity.inbox_prefix())
        .connect(cluster.nats.url())
        .await
        .unwrap_or_else(|e| panic!("{} connects: {e}", identity.name()))
}

/// Waits until the server has logged a refusal naming `subject`.
async fn refused(cluster: &Cluster, subject: &str) {
    let quoted = format!("\"{subject}\"");
    wait_until(
        &format!("the server to refuse {subject}"),
        Duration::from_secs(10),
        || async {
            cluster
                .violations()
                .iter()
                .any(|line| line.contains(&quoted))
                .then_some(())
        },
    )
    .await;
}

/// Sends a JetStream publish and says whether it was stored.
async fn stored(js: &jetstream::Context, subject: String, body: &str) -> bool {
    stored_with(js, subject, async_nats::HeaderMap::new(), body).await
}

/// [`stored`], with headers.
async fn stored_with(
    js: &jetstream::Context,
    subject: String,
    map: async_nats::HeaderMap,
    body: &str,
) -> bool {
    let sent = tokio::time::timeout(REFUSED_WITHIN, async {
        js.publish_with_headers(subject, map, body.to_owned().into())
            .await
            .ok()?
            .await
            .ok()
    })
    .await;
    matches!(sent, Ok(Some(_)))
}

/// Makes a request and returns its reply, if any came.
async fn ask(client: &async_nats::Client, subject: String, body: Vec<u8>) -> Option<Vec<u8>> {
    let reply = tokio::time::timeout(REFUSED_WITHIN, client.request(subject, body.into())).await;
    match reply {
        Ok(Ok(message)) => Some(message.payload.to_vec()),
        _ => None,
    }
}

/// The audit records of `action` the audit stream holds, oldest first.
async fn audit_records(admin: &jetstream::Context, action: AuditAction) -> Vec<AuditRecord> {
    let Ok(mut stream) = admin.get_stream(topology::AUDIT.name).await else {
        return Vec::new();
    };
    let Ok(state) = stream.info().await.map(|info| info.state.clone()) else {
        return Vec::new();
    };
    let subject = subjects::audit(action);
    let mut records = Vec::new();
    for seq in state.first_sequence..=state.last_sequence {
        let Ok(message) = stream.get_raw_message(seq).await else {
            continue;
        };
        if message.subject.as_str() == subject {
            records.push(codec::decode(Encoding::MsgPack, &message.payload).expect("a record"));
        }
    }
    records
}

/// How many records of `action` the audit stream holds for `job`.
async fn audited(admin: &jetstream::Context, action: AuditAction, job: JobId) -> usize {
    let resource = format!("job/{job}");
    audit_records(admin, action)
        .await
        .iter()
        .filter(|record| record.resource.as_deref() == Some(resource.as_str()))
        .count()
}

async fn node_record(cluster: &mut Cluster, name: &str) -> NodeRecord {
    cluster
        .mesh()
        .await
        .nodes
        .get(name)
        .await
        .expect("readable")
        .expect("registered")
        .value
}

#[tokio::test]
async fn an_executor_node_cannot_dispatch_submit_act_for_another_node_or_administer_and_nothing_changes()
 {
    let mut cluster = mesh().await;
    let api = cluster.api("api-1").await;
    let (one, two) = (node("exec-1"), node("exec-2"));
    let exec = connect_as(&cluster, &Identity::Executor(one.clone())).await;
    let js = jetstream::new(exec.clone());
    let before = node_record(&mut cluster, "exec-2").await;

    // A dispatch to another node, and a submission.
    let dispatch = subjects::dispatch(&two);
    assert!(
        !stored(&js, dispatch.clone(), "{}").await,
        "dispatch stored"
    );
    refused(&cluster, &dispatch).await;
    let job = JobId::generate();
    let mut submission = async_nats::HeaderMap::new();
    submission.insert(headers::JOB_ID, job.to_string().as_str());
    assert!(
        !stored_with(
            &js,
            subjects::SUBMIT.into(),
            submission,
            "{\"command\": \"true\"}"
        )
        .await,
        "submission stored"
    );
    refused(&cluster, subjects::SUBMIT).await;
    // It takes submissions from the consumer it shares with the schedulers (the fast lane),
    // but cannot reconfigure that consumer.
    let reconfigure = format!(
        "$JS.API.CONSUMER.CREATE.{}.{}",
        topology::SUBMISSIONS.name,
        topology::SCHEDULER_CONSUMER
    );
    assert!(
        ask(&exec, reconfigure.clone(), b"{}".to_vec())
            .await
            .is_none()
    );
    refused(&cluster, &reconfigure).await;

    // Output under exec-2's name.
    let foreign_output = subjects::logs(JobId::generate(), &two);
    assert!(
        !stored(&js, foreign_output.clone(), "forged output").await,
        "output stored under another node's name"
    );
    refused(&cluster, &foreign_output).await;

    // Registering, heartbeating and leaving as exec-2, on exec-2's subjects.
    let impostor = Registration {
        node: two.clone(),
        instance: InstanceId::generate(),
        labels: Default::default(),
        capacity: 64,
        version: "forged".into(),
        hostname: "elsewhere".into(),
    };
    let beat = Heartbeat {
        node: two.clone(),
        instance: before.instance,
        jobs: Vec::new(),
        queued: 0,
        finished: Default::default(),
    };
    for (call, body) in [
        (
            NodeCall::Register,
            codec::to_msgpack(&impostor).expect("encodes"),
        ),
        (
            NodeCall::Heartbeat,
            codec::to_msgpack(&beat).expect("encodes"),
        ),
        (
            NodeCall::Deregister,
            codec::to_msgpack(&beat).expect("encodes"),
        ),
    ] {
        let subject = call.subject(&two);
        assert!(
            ask(&exec, subject.clone(), body).await.is_none(),
            "{subject} answered"
        );
        refused(&cluster, &subject).await;
    }
    // The same, on its own subject: the registry refuses it as forged and says so.
    let mut rejections = cluster
        .client()
        .await
        .subscribe(subjects::rejected(subjects::Origin::Registry))
        .await
        .expect("subscribed");
    cluster.client().await.flush().await.expect("flushed");
    let reply = ask(
        &exec,
        NodeCall::Register.subject(&one),
        codec::to_msgpack(&impostor).expect("encodes"),
    )
    .await
    .expect("the registry answers its own node");
    let reply: Reply<NodeRecord> = codec::decode(Encoding::MsgPack, &reply).expect("a reply");
    assert_eq!(
        reply.into_result().expect_err("refused").code,
        ErrorCode::Forbidden
    );
    let rejection = tokio::time::timeout(Duration::from_secs(10), rejections.next())
        .await
        .expect("a rejection in time")
        .expect("open");
    let rejection: Rejection =
        codec::decode(Encoding::MsgPack, &rejection.payload).expect("a rejection");
    assert_eq!(rejection.code, RejectionCode::Forged);

    // Writing exec-2's record, reading exec-2's dispatches, administering JetStream.
    let record = subjects::kv_key(topology::NODES.name, "exec-2");
    assert!(
        !stored(&js, record.clone(), "{}").await,
        "node record written"
    );
    refused(&cluster, &record).await;
    let spy = format!(
        "$JS.API.CONSUMER.CREATE.{}.spy.{dispatch}",
        topology::DISPATCH.name
    );
    assert!(ask(&exec, spy.clone(), b"{}".to_vec()).await.is_none());
    refused(&cluster, &spy).await;
    for verb in ["STREAM.DELETE", "STREAM.PURGE"] {
        let subject = format!("$JS.API.{verb}.{}", topology::EVENTS.name);
        assert!(ask(&exec, subject.clone(), Vec::new()).await.is_none());
        refused(&cluster, &subject).await;
    }
    // Listening to another node's commands, or to another identity's replies.
    for subject in [
        subjects::control_all(&two),
        format!("{}.>", Identity::Scheduler.inbox_prefix()),
    ] {
        let _subscription = exec.subscribe(subject.clone()).await.expect("sent");
        refused(&cluster, &subject).await;
    }

    // Nothing changed: exec-2 is the same instance, up; the streams are all there; no consumer
    // reads exec-2's dispatches but its own; the submitted job does not exist.
    let after = node_record(&mut cluster, "exec-2").await;
    assert_eq!(
        (after.instance, after.capacity, after.status),
        (
            before.instance,
            before.capacity,
            capstan_protocol::NodeStatus::Up
        )
    );
    let admin = jetstream::new(cluster.client().await);
    for stream in topology::STREAMS {
        admin
            .get_stream(stream.name)
            .await
            .expect("the stream is there");
    }
    let dispatches = admin
        .get_stream(topology::DISPATCH.name)
        .await
        .expect("stream");
    assert!(
        dispatches.consumer_info("spy").await.is_err(),
        "a spy consumer exists"
    );
    assert!(
        dispatches
            .get_last_raw_message_by_subject(&dispatch)
            .await
            .is_err(),
        "a forged dispatch is stored"
    );
    assert!(
        cluster.job(job).await.is_none(),
        "the executor's submission made a job"
    );

    // And the mesh still works, on both nodes.
    let client = cluster.client().await;
    let mut ids = Vec::new();
    for _ in 0..4 {
        let reply = client
            .request(subjects::CREATE, "{\"command\": \"true\"}".into())
            .await
            .expect("created");
        let reply: Reply<Created> = codec::decode(Encoding::Json, &reply.payload).expect("reply");
        ids.push(reply.into_result().expect("a job").id);
    }
    let records = cluster.wait_terminal(&ids, Duration::from_secs(60)).await;
    for record in &records {
        assert_eq!(record.status, JobStatus::Succeeded);
    }

    // What permissions cannot stop, the history does: an executor node may publish attempt
    // events, but not one whose subject and record disagree, nor an attempt the job never had.
    let http = cluster.http(&api);
    let events_of = |id: JobId| {
        let http = &http;
        async move {
            wait_until("the job's history", Duration::from_secs(30), || async {
                let reply = http.get(&format!("/api/v1/jobs/{id}/events")).await;
                let items = reply.json()["events"].as_array().cloned()?;
                (!items.is_empty()).then_some(items)
            })
            .await
        }
    };
    let (victim, other) = (records[0].clone(), records[1].clone());
    let before = events_of(victim.id).await;
    let mut history_rejections = cluster
        .client()
        .await
        .subscribe(subjects::rejected(subjects::Origin::History))
        .await
        .expect("subscribed");
    cluster.client().await.flush().await.expect("flushed");
    let mut far = victim.clone();
    far.attempt = 999;
    far.status = JobStatus::Failed;
    let mismatched = capstan_protocol::JobEvent::new(JobEventKind::Failed, &other);
    for (subject, event) in [
        (
            subjects::job_event(victim.id, JobEventKind::Failed),
            capstan_protocol::JobEvent::new(JobEventKind::Failed, &far),
        ),
        (
            subjects::job_event(victim.id, JobEventKind::Failed),
            mismatched,
        ),
    ] {
        let body = codec::to_msgpack(&event).expect("encodes");
        let mut map = async_nats::HeaderMap::new();
        map.insert(headers::CONTENT_TYPE, Encoding::MsgPack.content_type());
        js.publish_with_headers(subject, map, body.into())
            .await
            .expect("an executor may publish attempt events")
            .await
            .expect("stored");
        let rejection = tokio::time::timeout(Duration::from_secs(30), history_rejections.next())
            .await
            .expect("the history refuses it in time")
            .expect("open");
        let rejection: Rejection =
            codec::decode(Encoding::MsgPack, &rejection.payload).expect("a rejection");
        assert_eq!(
            rejection.code,
            RejectionCode::Forged,
            "{}",
            rejection.reason
        );
    }
    assert_eq!(
        events_of(victim.id).await,
        before,
        "a forged event entered the history"
    );
    assert_eq!(
        cluster.job(victim.id).await.expect("record").status,
        JobStatus::Succeeded
    );
}

#[tokio::test]
async fn the_client_submits_and_follows_its_jobs_but_cannot_forge_events_or_output_or_read_records()
{
    let mut cluster = mesh().await;
    let client = connect_as(&cluster, &Identity::client()).await;
    let js = jetstream::new(client.clone());
    let mut events = client
        .subscribe(subjects::JOB_EVENTS_ALL)
        .await
        .expect("subscribed");
    client.flush().await.expect("flushed");

    // What it may do: create a job by request, and see it end.
    let reply = client
        .request(subjects::CREATE, "{\"command\": \"echo hi\"}".into())
        .await
        .expect("the create endpoint answers the client");
    let reply: Reply<Created> = codec::decode(Encoding::Json, &reply.payload).expect("reply");
    let job = reply.into_result().expect("created").id;
    tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(message) = events.next().await {
            if subjects::parse_job_event(&message.subject)
                == Some((job, JobEventKind::Succeeded.as_str()))
            {
                return;
            }
        }
        panic!("the events subscription ended");
    })
    .await
    .expect("the job's end event in time");

    // What it may not: an event, output, a record, a stream's content.
    let forged_event = subjects::job_event(job, JobEventKind::Failed);
    assert!(!stored(&js, forged_event.clone(), "{}").await);
    refused(&cluster, &forged_event).await;
    let forged_output = subjects::logs(job, &node("exec-1"));
    assert!(!stored(&js, forged_output.clone(), "forged output").await);
    refused(&cluster, &forged_output).await;
    let record = format!(
        "$JS.API.DIRECT.GET.KV_{bucket}.{key}",
        bucket = topology::JOBS.name,
        key = subjects::kv_key(topology::JOBS.name, &job.to_string())
    );
    assert!(ask(&client, record.clone(), Vec::new()).await.is_none());
    refused(&cluster, &record).await;
    let read_events = format!("$JS.API.CONSUMER.CREATE.{}", topology::EVENTS.name);
    assert!(
        ask(&client, read_events.clone(), b"{}".to_vec())
            .await
            .is_none()
    );
    refused(&cluster, &read_events).await;

    // Nor a submission handed on for placement, whose headers the schedulers believe.
    let handed = subjects::place_job(job);
    let mut claims = async_nats::HeaderMap::new();
    claims.insert(headers::JOB_ID, job.to_string().as_str());
    claims.insert(
        headers::SUBMITTED_BY,
        r#"{"principal": "admin", "via": "password"}"#,
    );
    assert!(
        !stored_with(&js, handed, claims, "{\"command\": \"true\"}").await,
        "hand-on stored"
    );

    // The job's stored history is its own: succeeded, no forged failure or output.
    let record = cluster.job(job).await.expect("the job");
    assert_eq!(record.status, JobStatus::Succeeded);
    let admin = jetstream::new(cluster.client().await);
    let stream = admin
        .get_stream(topology::EVENTS.name)
        .await
        .expect("stream");
    assert!(
        stream
            .get_last_raw_message_by_subject(&forged_event)
            .await
            .is_err()
    );
}

#[tokio::test]
async fn an_anonymous_or_unknown_connection_is_refused() {
    let mut cluster = Cluster::start().await;
    cluster.expect_violations();
    let anonymous = async_nats::ConnectOptions::new()
        .connection_timeout(Duration::from_secs(2))
        .max_reconnects(Some(0))
        .connect(cluster.nats.url())
        .await;
    assert!(anonymous.is_err(), "an anonymous connection was accepted");
    let stranger = nkeys::KeyPair::new_user().seed().expect("a seed");
    let unknown = async_nats::ConnectOptions::new()
        .nkey(stranger)
        .connection_timeout(Duration::from_secs(2))
        .max_reconnects(Some(0))
        .connect(cluster.nats.url())
        .await;
    assert!(unknown.is_err(), "an unknown NKEY was accepted");
}

#[tokio::test]
async fn capstan_nats_apply_runs_as_the_administrator_and_gives_up_without_an_identity() {
    let mut cluster = Cluster::start().await;
    cluster.expect_violations();
    let apply = |creds: Option<std::path::PathBuf>| {
        let mut command = std::process::Command::new(capstan_testkit::bin_path("capstan"));
        command
            .args(["nats", "apply", "--max-bytes", "CAPSTAN_LOGS=64MiB"])
            .env("CAPSTAN_NATS_URL", cluster.nats.url())
            .env("CAPSTAN_LOG", "warn")
            .env_remove("CAPSTAN_NATS_CREDS");
        if let Some(creds) = creds {
            command.env("CAPSTAN_NATS_CREDS", creds);
        }
        command.output().expect("capstan runs")
    };
    let refused = apply(None);
    assert!(!refused.status.success());
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(said.contains("CAPSTAN_NATS_CREDS"), "{said}");

    let applied = apply(Some(cluster.identities().seed_file(&Identity::Admin)));
    assert!(
        applied.status.success(),
        "{}",
        String::from_utf8_lossy(&applied.stderr)
    );
    assert!(String::from_utf8_lossy(&applied.stdout).contains("topology applied"));
    let admin = jetstream::new(cluster.client().await);
    let mut logs = admin.get_stream(topology::LOGS.name).await.expect("stream");
    assert_eq!(
        logs.info().await.expect("info").config.max_bytes,
        64 * 1024 * 1024,
        "the limit given to apply"
    );
}

#[tokio::test]
async fn a_job_sent_by_a_client_is_attributed_to_it_whatever_its_header_claims_and_a_viewer_cannot_submit()
 {
    let mut cluster = mesh().await;
    let client = connect_as(&cluster, &Identity::client()).await;
    let js = jetstream::new(client.clone());
    let mut events = client
        .subscribe(subjects::JOB_EVENTS_ALL)
        .await
        .expect("subscribed");
    client.flush().await.expect("flushed");

    // A stored submission claiming to come from the API's administrator, and a created job.
    let forged = JobId::generate();
    let mut claim = async_nats::HeaderMap::new();
    claim.insert(headers::JOB_ID, forged.to_string().as_str());
    claim.insert(
        headers::SUBMITTED_BY,
        r#"{"principal": "admin", "via": "password"}"#,
    );
    js.publish_with_headers(subjects::SUBMIT, claim, r#"{"command": "true"}"#.into())
        .await
        .expect("sent")
        .await
        .expect("stored");
    let reply = client
        .request(subjects::CREATE, r#"{"command": "true"}"#.into())
        .await
        .expect("the create endpoint answers the client");
    let reply: Reply<Created> = codec::decode(Encoding::Json, &reply.payload).expect("reply");
    let created = reply.into_result().expect("created").id;
    let mut ended = std::collections::HashSet::new();
    tokio::time::timeout(Duration::from_secs(60), async {
        while ended.len() < 2 {
            let message = events
                .next()
                .await
                .expect("the events subscription is open");
            if let Some((job, kind)) = subjects::parse_job_event(&message.subject)
                && kind == JobEventKind::Succeeded.as_str()
                && (job == forged || job == created)
            {
                ended.insert(job);
            }
        }
    })
    .await
    .expect("both jobs end in time");
    for job in [forged, created] {
        let record = cluster.job(job).await.expect("the job");
        let by = record.submitted_by.expect("attributed");
        assert_eq!(by.principal, "nats:client", "{job}");
        assert_eq!(by.via, capstan_protocol::AuthMethod::Nats);
    }

    // The audit trail names the client for each.
    let admin = jetstream::new(cluster.client().await);
    wait_until(
        "both submissions audited",
        Duration::from_secs(10),
        || async {
            let by_client = audit_records(&admin, AuditAction::JobSubmit)
                .await
                .iter()
                .filter(|record| record.principal.as_deref() == Some("nats:client"))
                .count();
            (by_client >= 2).then_some(())
        },
    )
    .await;

    // A viewer follows events, and its submission is refused by the server.
    let viewer = connect_as(&cluster, &Cluster::viewer()).await;
    let mut viewed = viewer
        .subscribe(subjects::JOB_EVENTS_ALL)
        .await
        .expect("subscribed");
    viewer.flush().await.expect("flushed");
    let refused_job = JobId::generate();
    let mut named = async_nats::HeaderMap::new();
    named.insert(headers::JOB_ID, refused_job.to_string().as_str());
    viewer
        .publish_with_headers(subjects::SUBMIT, named, r#"{"command": "true"}"#.into())
        .await
        .expect("published");
    viewer.flush().await.expect("flushed");
    refused(&cluster, subjects::SUBMIT).await;
    let reply = client
        .request(subjects::CREATE, r#"{"command": "true"}"#.into())
        .await
        .expect("the create endpoint answers the client");
    let reply: Reply<Created> = codec::decode(Encoding::Json, &reply.payload).expect("reply");
    let seen = reply.into_result().expect("created").id;
    tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            let message = viewed.next().await.expect("open");
            if subjects::parse_job_event(&message.subject).is_some_and(|(job, _)| job == seen) {
                return;
            }
        }
    })
    .await
    .expect("the viewer sees the client's job");
    assert!(
        cluster.job(refused_job).await.is_none(),
        "the viewer's job exists"
    );
}

#[tokio::test]
async fn a_forged_dispatch_over_a_stolen_revision_runs_the_stored_spec_not_its_own() {
    let mut cluster = mesh().await;
    // A job that waits for a node no one has: its record stays as its creation wrote it.
    let job = JobId::generate();
    let mut named = async_nats::HeaderMap::new();
    named.insert(headers::JOB_ID, job.to_string().as_str());
    let body = serde_json::json!({
        "command": cluster.recording("true"),
        "labels": {"zone": "nowhere"},
    })
    .to_string();
    jetstream::new(cluster.client().await)
        .publish_with_headers(subjects::SUBMIT, named, body.into())
        .await
        .expect("sent")
        .await
        .expect("stored");
    let mesh = cluster.mesh().await;
    let stored = wait_until("the job waiting", Duration::from_secs(30), || async {
        mesh.jobs
            .get(&job.to_string())
            .await
            .expect("read")
            .filter(|entry| entry.value.is_unplaced())
    })
    .await;

    // A dispatch with that revision carrying a spec of its own, sent with the only grant
    // that may dispatch (a scheduler's).
    let forged_marker = cluster.runs_file().with_file_name("forged");
    let mut forged = stored
        .value
        .assigned(node("exec-1"), capstan_protocol::Timestamp::now());
    forged.spec = capstan_protocol::JobSpec::shell(format!("touch {}", forged_marker.display()));
    let dispatch = capstan_protocol::Dispatch {
        record: forged,
        revision: stored.revision,
    };
    let scheduler = connect_as(&cluster, &Identity::Scheduler).await;
    let mut map = capstan_mesh::wire::msgpack_headers();
    map.insert(headers::JOB_ID, job.to_string().as_str());
    map.insert(headers::ATTEMPT, "1");
    jetstream::new(scheduler)
        .publish_with_headers(
            subjects::dispatch(&node("exec-1")),
            map,
            codec::to_msgpack(&dispatch).expect("encodes").into(),
        )
        .await
        .expect("sent")
        .await
        .expect("stored");

    // The attempt runs what the bucket holds: the submitted command, once.
    let ended = wait_until("the job to end", Duration::from_secs(60), || async {
        mesh.jobs
            .get(&job.to_string())
            .await
            .expect("read")
            .map(|entry| entry.value)
            .filter(|record| record.status.is_terminal())
    })
    .await;
    assert_eq!(ended.status, JobStatus::Succeeded);
    assert_eq!(ended.spec, stored.value.spec, "the stored spec changed");
    assert_eq!(cluster.runs().get(&job.to_string()), Some(&1));
    assert!(!forged_marker.exists(), "the forged command ran");
}

/// Fails if any of `canaries` is in `text`, naming `what`.
fn assert_clear_of(canaries: &[&str], what: &str, text: &[u8]) {
    let text = String::from_utf8_lossy(text);
    for canary in canaries {
        assert!(!text.contains(canary), "{what} holds a secret in clear");
    }
}

/// Every file under `dir`, recursively.
fn files_under(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    let mut dirs = vec![dir.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                dirs.push(path);
            } else {
                files.push(path);
            }
        }
    }
    files
}

#[tokio::test]
async fn canaries_sent_over_rest_and_nats_reach_their_processes_and_no_log_span_stream_or_file_holds_them()
 {
    const OVER_REST: &str = "canary-rest-9a41c7e0";
    const OVER_NATS: &str = "canary-nats-2e88b0f3";
    const STORED: &str = "canary-stored-5d13fa6b";
    let canaries = [OVER_REST, OVER_NATS, STORED];
    let otlp = capstan_testkit::OtlpReceiver::start().await;
    let entry = capstan_secrets::KeyRing::generate_entry("e2e").expect("a key");
    let keys: capstan_secrets::KeyRing = entry.parse().expect("a key list");
    let mut cluster = Cluster::start().await;
    cluster.set_env("OTEL_EXPORTER_OTLP_ENDPOINT", otlp.endpoint());
    cluster.set_env("OTEL_BSP_SCHEDULE_DELAY", "100");
    // Everything the services log at debug, where a leak would most likely be.
    cluster.set_env(
        "CAPSTAN_LOG",
        "debug,async_nats=info,hyper=info,hyper_util=info,h2=info,sqlx=info,sea_orm=info,\
         reqwest=info",
    );
    cluster.set_env("CAPSTAN_SECRET_KEYS", entry.clone());
    cluster.registry("registry-1");
    cluster.scheduler("scheduler-1");
    cluster.executor("exec-1", 2, &[]);
    let base = cluster.api("api-1").await;
    cluster.wait_nodes_up(&["exec-1"]).await;
    let http = cluster.http(&base);
    // Each job compares its variables in two halves: no command holds a canary.
    let check = |variable: &str, canary: &str| {
        format!(
            "test \"${variable}\" = \"{}\"\"{}\"",
            &canary[..8],
            &canary[8..]
        )
    };

    let stored = http
        .send(
            http::Method::PUT,
            "/api/v1/secrets/db",
            &[("content-type", "application/json")],
            serde_json::json!({"value": STORED, "usable_by": ["nats:client"]}).to_string(),
        )
        .await;
    assert_eq!(
        stored.status,
        http::StatusCode::CREATED,
        "{}",
        stored.text()
    );
    let over_rest = http
        .post_json(
            "/api/v1/jobs",
            &serde_json::json!({
                "command": format!("{} && echo matched", check("TOKEN", OVER_REST)),
                "secrets": {"TOKEN": OVER_REST},
            })
            .to_string(),
        )
        .await;
    assert_eq!(
        over_rest.status,
        http::StatusCode::ACCEPTED,
        "{}",
        over_rest.text()
    );
    let over_rest: JobId = over_rest.json()["id"]
        .as_str()
        .expect("an id")
        .parse()
        .expect("a job id");

    // A client holding a key seals its own secret for the id it picks, and names the stored one.
    let over_nats = JobId::generate();
    let sealed = keys.seal(over_nats, "T", OVER_NATS).expect("sealed");
    let client = connect_as(&cluster, &Identity::client()).await;
    let mut id = async_nats::HeaderMap::new();
    id.insert(headers::JOB_ID, over_nats.to_string().as_str());
    let body = serde_json::json!({
        "command": format!("{} && {} && echo matched", check("T", OVER_NATS), check("DB", STORED)),
        "secrets": {"T": sealed.as_str()},
        "secret_refs": {"DB": "db"},
    });
    jetstream::new(client.clone())
        .publish_with_headers(subjects::SUBMIT, id, body.to_string().into())
        .await
        .expect("sent")
        .await
        .expect("stored");

    let ended = cluster
        .wait_terminal(&[over_rest, over_nats], Duration::from_secs(60))
        .await;
    for record in &ended {
        assert_eq!(record.status, JobStatus::Succeeded, "{record:?}");
    }
    for job in [over_rest, over_nats] {
        wait_until("the job's output", Duration::from_secs(30), || async {
            let logs = http.get(&format!("/api/v1/jobs/{job}/logs")).await.json();
            (logs["stdout"] == "matched\n").then_some(())
        })
        .await;
    }
    // The spans of both jobs' executions are exported.
    wait_until(
        "the executor's spans of both jobs",
        Duration::from_secs(30),
        || async {
            let spans = otlp.spans();
            let ran = |job: JobId| {
                spans.iter().any(|span| {
                    span.service == "capstan-executor"
                        && span.attributes.get("job_id") == Some(&job.to_string())
                })
            };
            (ran(over_rest) && ran(over_nats)).then_some(())
        },
    )
    .await;

    // Nowhere in clear: any service's log, the server's, every exported span, every stream
    // and bucket, every file the services wrote, and what the API answers.
    for name in ["registry-1", "scheduler-1", "exec-1", "api-1"] {
        let log = cluster.process_log(name);
        assert!(!log.is_empty(), "{name} logged nothing");
        assert_clear_of(&canaries, &format!("the log of {name}"), log.as_bytes());
    }
    assert_clear_of(&canaries, "the server's log", cluster.nats.log().as_bytes());
    let exported = otlp.raw();
    assert!(!exported.is_empty());
    assert_clear_of(&canaries, "the exported spans", &exported);
    let js = jetstream::new(cluster.client().await);
    let mut names = js.stream_names();
    let mut scanned = 0;
    while let Some(name) = names.next().await {
        let name = name.expect("a stream name");
        let mut stream = js.get_stream(&name).await.expect("the stream");
        let state = stream.info().await.expect("info").state.clone();
        for seq in state.first_sequence..=state.last_sequence {
            if let Ok(message) = stream.get_raw_message(seq).await {
                scanned += 1;
                let what = format!("{name} #{seq} ({})", message.subject);
                assert_clear_of(&canaries, &what, &message.payload);
                assert_clear_of(
                    &canaries,
                    &what,
                    format!("{:?}", message.headers).as_bytes(),
                );
            }
        }
    }
    assert!(scanned > 10, "only {scanned} messages");
    let files = files_under(&cluster.dir());
    assert!(files.iter().any(|f| f.to_string_lossy().contains("api-1")));
    for file in files {
        if let Ok(bytes) = std::fs::read(&file) {
            assert_clear_of(&canaries, &file.display().to_string(), &bytes);
        }
    }
    for path in [
        format!("/api/v1/jobs/{over_rest}"),
        format!("/api/v1/jobs/{over_nats}"),
        format!("/api/v1/jobs/{over_nats}/events"),
        "/api/v1/jobs?limit=10".to_owned(),
        "/api/v1/secrets".to_owned(),
        "/api/v1/audit?limit=200".to_owned(),
    ] {
        assert_clear_of(&canaries, &path, http.get(&path).await.text().as_bytes());
    }
    // Listing the stored secrets works under the API's permissions, and shows no value.
    let listed = http.get("/api/v1/secrets").await.json();
    assert_eq!(listed["secrets"][0]["name"], "db", "{listed}");
    assert_eq!(listed["secrets"][0]["key_id"], "e2e", "{listed}");
    // The client's use of the stored secret is on the audit trail, in its name.
    let audit = http
        .get("/api/v1/audit?action=secret.read&limit=10")
        .await
        .json();
    assert_eq!(audit["records"][0]["principal"], "nats:client", "{audit}");
    assert_eq!(audit["records"][0]["outcome"], "success", "{audit}");
}

#[tokio::test]
async fn a_gateway_checks_a_system_under_its_permissions_and_a_client_lists_it_without_credentials()
{
    let host = capstan_testkit::sshd::SshHost::start().expect("sshd starts");
    let entry = capstan_secrets::KeyRing::generate_entry("e2e").expect("a key");
    let mut cluster = Cluster::start().await;
    cluster.expect_violations();
    cluster.set_env("CAPSTAN_SECRET_KEYS", entry);
    cluster.set_env("CAPSTAN_SYSTEM_CHECK_INTERVAL", "500ms");
    cluster.registry("registry-1");
    cluster.executor("exec-1", 1, &["capstan.io/ssh=true"]);
    let base = cluster.api("api-1").await;
    cluster.wait_nodes_up(&["exec-1"]).await;
    let http = cluster.http(&base);
    let added = http
        .post_json(
            "/api/v1/systems",
            &serde_json::json!({
                "name": "web-1",
                "hostname": "127.0.0.1",
                "port": host.port(),
                "username": capstan_testkit::sshd::LOGIN_USER,
                "auth": {"method": "password", "password": host.password()},
                "host_key": host.host_key_fingerprint(),
            })
            .to_string(),
        )
        .await;
    assert_eq!(added.status, http::StatusCode::CREATED, "{}", added.text());
    wait_until(
        "the gateway process to find web-1 healthy",
        Duration::from_secs(60),
        || async {
            let shown = http.get("/api/v1/systems/web-1").await.json();
            (shown["health"]["status"] == "healthy").then_some(())
        },
    )
    .await;

    // A client lists it over NATS, from its own account: no credential, not even sealed.
    let client = connect_as(&cluster, &Identity::client()).await;
    let reply = client
        .request(subjects::SYSTEMS_LIST, "{}".into())
        .await
        .expect("the API answers the client");
    let text = String::from_utf8_lossy(&reply.payload).to_string();
    let listed: Reply<Vec<capstan_protocol::SystemSummary>> =
        codec::decode(Encoding::Json, &reply.payload).expect("a listing");
    let listed = listed.into_result().expect("listed");
    assert_eq!(listed.len(), 1, "{text}");
    assert_eq!(listed[0].health, capstan_protocol::SystemHealth::Healthy);
    assert!(
        !text.contains("sealed:") && !text.contains(host.password()),
        "{text}"
    );
    // It cannot read the catalogue itself.
    let record = format!(
        "$JS.API.DIRECT.GET.KV_{}.{}",
        topology::SYSTEMS.name,
        subjects::kv_key(topology::SYSTEMS.name, "web-1")
    );
    assert!(ask(&client, record.clone(), Vec::new()).await.is_none());
    refused(&cluster, &record).await;

    // The gateway may not rewrite where a system is or how it logs in.
    let gateway = connect_as(&cluster, &Identity::Gateway(node("exec-1"))).await;
    let catalogue = subjects::kv_key(topology::SYSTEMS.name, "web-1");
    let js = jetstream::new(gateway);
    assert!(!stored(&js, catalogue.clone(), "{\"hostname\": \"evil\"}").await);
    refused(&cluster, &catalogue).await;
    let kept = http.get("/api/v1/systems/web-1").await.json();
    assert_eq!(kept["hostname"], "127.0.0.1", "{kept}");

    // An executor that is no gateway neither reads the catalogue nor records a finding.
    let plain = connect_as(&cluster, &Identity::Executor(node("exec-5"))).await;
    assert!(ask(&plain, record, Vec::new()).await.is_none());
    let status = subjects::kv_key(topology::SYSTEM_STATUS.name, "web-1");
    let js = jetstream::new(plain);
    assert!(!stored(&js, status.clone(), "{\"health\": \"healthy\"}").await);
    refused(&cluster, &status).await;
}

#[tokio::test]
async fn a_clients_create_cancel_and_submission_are_audited_once_before_they_are_answered_or_acknowledged()
 {
    let cluster = mesh().await;
    let client = connect_as(&cluster, &Identity::client()).await;
    let admin = jetstream::new(cluster.client().await);

    // Created and cancelled over request/reply: each record is stored when its answer
    // arrives, so the trail is read at once, without waiting.
    let reply = client
        .request(subjects::CREATE, r#"{"command": "sleep 30"}"#.into())
        .await
        .expect("the create endpoint answers the client");
    let reply: Reply<Created> = codec::decode(Encoding::Json, &reply.payload).expect("reply");
    let created = reply.into_result().expect("created").id;
    assert_eq!(
        audited(&admin, AuditAction::JobSubmit, created).await,
        1,
        "the created job {created} is audited once when the client is answered"
    );
    let reply = client
        .request(
            subjects::CANCEL,
            serde_json::json!({"id": created.to_string()})
                .to_string()
                .into(),
        )
        .await
        .expect("the cancel endpoint answers the client");
    let reply: Reply<Cancelled> = codec::decode(Encoding::Json, &reply.payload).expect("reply");
    reply.into_result().expect("cancelled");
    assert_eq!(
        audited(&admin, AuditAction::JobCancel, created).await,
        1,
        "the cancel of {created} is audited once when the client is answered"
    );

    // Submitted to the stream: whoever takes it (an idle executor, or a scheduler)
    // acknowledges the submission only once it is on the audit trail.
    let js = jetstream::new(client.clone());
    let job = JobId::generate();
    let mut named = async_nats::HeaderMap::new();
    named.insert(headers::JOB_ID, job.to_string().as_str());
    let stored = js
        .publish_with_headers(subjects::SUBMIT, named, r#"{"command": "true"}"#.into())
        .await
        .expect("sent")
        .await
        .expect("stored");
    wait_until(
        "the submission to be acknowledged",
        Duration::from_secs(30),
        || async {
            let stream = admin.get_stream(topology::SUBMISSIONS.name).await.ok()?;
            let mut consumer = stream
                .get_consumer::<jetstream::consumer::pull::Config>(topology::SCHEDULER_CONSUMER)
                .await
                .ok()?;
            let info = consumer.info().await.ok()?;
            (info.ack_floor.stream_sequence >= stored.sequence).then_some(())
        },
    )
    .await;
    assert_eq!(
        audited(&admin, AuditAction::JobSubmit, job).await,
        1,
        "the submission of {job} is audited once by the time it is acknowledged"
    );
}
