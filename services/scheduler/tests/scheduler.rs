//! The scheduler against a real nats-server. Executors are simulated: their node records are
//! written to the nodes bucket directly, and dispatches are read off the dispatch stream.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use async_nats::jetstream;
use capstan_mesh::Mesh;
use capstan_protocol::codec::{self, Encoding};
use capstan_protocol::reply::Created;
use capstan_protocol::topology;
use capstan_protocol::{
    Dispatch, InstanceId, JobEvent, JobEventKind, JobId, JobRecord, JobStatus, Labels, NodeEvent,
    NodeEventKind, NodeId, NodeRecord, NodeStatus, Rejection, RejectionCode, Reply, Timestamp,
    headers, subjects,
};
use capstan_testkit::{NatsServer, wait_until};
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

struct Scheduler {
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), capstan_mesh::Error>>,
}

impl Scheduler {
    fn start(server: &NatsServer, depth: f64) -> Self {
        Self::start_with(server, |config| config.dispatch_depth = depth)
    }

    fn start_with(
        server: &NatsServer,
        configure: impl FnOnce(&mut capstan_scheduler::Config),
    ) -> Self {
        let mut config = capstan_scheduler::Config::for_url(server.url());
        config.nats.max_job_bytes = 4096;
        configure(&mut config);
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(capstan_scheduler::run(config, shutdown.clone()));
        Self { shutdown, task }
    }

    async fn stop(self) {
        self.shutdown.cancel();
        self.task.await.expect("joins").expect("clean exit");
    }
}

async fn mesh(server: &NatsServer) -> Mesh {
    Mesh::open(server.client().await).await.expect("mesh")
}

async fn add_node(mesh: &Mesh, id: &str, capacity: u32, labels: &[(&str, &str)]) -> NodeId {
    let node = NodeId::new(id).expect("valid");
    let record = NodeRecord {
        id: node.clone(),
        instance: InstanceId::generate(),
        labels: labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
        capacity,
        version: "test".into(),
        hostname: "test".into(),
        status: NodeStatus::Up,
        registered_at: Timestamp::now(),
        last_heartbeat_at: Timestamp::now(),
        jobs: vec![],
        queued: 0,
        finished: Default::default(),
        availability: Default::default(),
        drain_deadline: None,
    };
    mesh.nodes.put(id, &record).await.expect("node written");
    node
}

/// Node `id`'s record; it must exist.
async fn node_record(mesh: &Mesh, id: &str) -> NodeRecord {
    mesh.nodes.get(id).await.expect("read").expect("node").value
}

/// A live view of the nodes bucket, loaded, until `shutdown`.
async fn nodes_view(
    mesh: &Mesh,
    shutdown: &CancellationToken,
) -> capstan_mesh::BucketView<NodeRecord> {
    let view = capstan_mesh::BucketView::start(mesh.nodes.clone(), shutdown.clone())
        .await
        .expect("a view");
    assert!(view.wait_ready(Duration::from_secs(10)).await);
    view
}

/// Every dispatch currently in the stream, as (subject, dispatch), read by sequence so that
/// nothing is consumed.
async fn dispatches(mesh: &Mesh) -> Vec<(String, Dispatch)> {
    let mut stream = mesh
        .js
        .get_stream(topology::DISPATCH.name)
        .await
        .expect("stream");
    let state = stream.info().await.expect("info").state.clone();
    let mut found = Vec::new();
    if state.messages == 0 {
        return found;
    }
    for sequence in state.first_sequence..=state.last_sequence {
        let Ok(message) = stream.get_raw_message(sequence).await else {
            continue; // deleted
        };
        let dispatch: Dispatch =
            codec::decode(Encoding::MsgPack, &message.payload).expect("dispatch decodes");
        found.push((message.subject.to_string(), dispatch));
    }
    found
}

async fn record(mesh: &Mesh, id: JobId) -> Option<JobRecord> {
    mesh.jobs
        .get(&id.to_string())
        .await
        .expect("read")
        .map(|v| v.value)
}

/// The job's record with its revision; it must exist.
async fn versioned(mesh: &Mesh, id: JobId) -> capstan_mesh::Versioned<JobRecord> {
    mesh.jobs
        .get(&id.to_string())
        .await
        .expect("read")
        .expect("record")
}

async fn create(client: &async_nats::Client, body: &str) -> Reply<Created> {
    let reply = wait_until("the create endpoint", Duration::from_secs(10), || async {
        client
            .request(subjects::CREATE, body.to_owned().into())
            .await
            .ok()
    })
    .await;
    serde_json::from_slice(&reply.payload).expect("JSON reply")
}

/// A scheduler placing one job per slot that announces placements `delay` late.
fn announcing_after(server: &NatsServer, delay: Duration) -> Scheduler {
    Scheduler::start_with(server, |config| {
        config.dispatch_depth = 1.0;
        config.announce_after = delay;
    })
}

/// Publishes `record` ended `succeeded`, as its executor would.
async fn end_as_an_executor_would(mesh: &Mesh, record: &JobRecord) {
    let mut ended = record.clone();
    ended.status = JobStatus::Succeeded;
    ended.finished_at = Some(Timestamp::now());
    mesh.events
        .job(&JobEvent::new(JobEventKind::Succeeded, &ended))
        .await
        .expect("outcome published");
}

/// Waits for the `kind` event of `job` in the events stream: the event, and when it was stored.
async fn stored_event(mesh: &Mesh, job: JobId, kind: JobEventKind) -> (JobEvent, Timestamp) {
    let stream = mesh
        .js
        .get_stream(topology::EVENTS.name)
        .await
        .expect("events stream");
    let subject = subjects::job_event(job, kind);
    let stored = wait_until("the event stored", Duration::from_secs(30), || async {
        stream.get_last_raw_message_by_subject(&subject).await.ok()
    })
    .await;
    let event: JobEvent = codec::decode(Encoding::MsgPack, &stored.payload).expect("decodes");
    let at = Timestamp::from_millis(
        i64::try_from(stored.time.unix_timestamp_nanos() / 1_000_000).expect("a time"),
    );
    (event, at)
}

/// The next rejection on `rejections`, within 20 seconds.
async fn next_rejection(rejections: &mut async_nats::Subscriber) -> Rejection {
    let message = tokio::time::timeout(Duration::from_secs(20), rejections.next())
        .await
        .expect("a rejection in time")
        .expect("open");
    codec::decode(Encoding::MsgPack, &message.payload).expect("a rejection")
}

/// Whether `job` has a `kind` event in the events stream.
async fn has_event(mesh: &Mesh, job: JobId, kind: JobEventKind) -> bool {
    has_event_on(mesh, &subjects::job_event(job, kind)).await
}

/// Waits until the submissions stream holds nothing: every submission taken and acknowledged.
async fn submissions_taken(mesh: &Mesh) {
    wait_until(
        "the submissions to be taken",
        Duration::from_secs(30),
        || async {
            let mut stream = mesh.js.get_stream(topology::SUBMISSIONS.name).await.ok()?;
            let state = &stream.info().await.ok()?.state;
            (state.messages == 0).then_some(())
        },
    )
    .await;
}

/// Whether the events stream holds a message on `subject`.
async fn has_event_on(mesh: &Mesh, subject: &str) -> bool {
    let stream = mesh
        .js
        .get_stream(topology::EVENTS.name)
        .await
        .expect("events stream");
    stream
        .get_last_raw_message_by_subject(subject)
        .await
        .is_ok()
}

#[tokio::test]
async fn a_json_job_published_without_headers_is_dispatched_to_a_node_carrying_its_labels() {
    let server = NatsServer::start().await;
    let mesh = mesh(&server).await;
    add_node(&mesh, "plain", 4, &[]).await;
    let eu = add_node(&mesh, "eu-1", 4, &[("zone", "eu")]).await;
    let scheduler = Scheduler::start(&server, 2.0);
    let client = server.client().await;
    let mut events = client
        .subscribe(subjects::JOB_EVENTS_ALL)
        .await
        .expect("subscribe");

    // Exactly what `nats pub` sends: a JSON body, no headers.
    client
        .publish(
            subjects::SUBMIT,
            r#"{"command": "echo hello", "labels": {"zone": "eu"}}"#.into(),
        )
        .await
        .expect("published");

    let event = tokio::time::timeout(Duration::from_secs(20), events.next())
        .await
        .expect("an event")
        .expect("open");
    let (job, kind) = subjects::parse_job_event(&event.subject).expect("job event subject");
    assert_eq!(kind, "pending");
    let found = wait_until("the dispatch", Duration::from_secs(20), || async {
        let found = dispatches(&mesh).await;
        (!found.is_empty()).then_some(found)
    })
    .await;
    assert_eq!(found.len(), 1);
    let (subject, dispatch) = &found[0];
    assert_eq!(subject, &subjects::dispatch(&eu));
    assert_eq!(dispatch.record.id, job);
    assert_eq!(dispatch.record.attempt, 1);

    let stored = record(&mesh, job).await.expect("record");
    assert_eq!(stored.status, JobStatus::Pending);
    assert_eq!(stored.node, Some(eu));
    let current = mesh
        .jobs
        .get(&job.to_string())
        .await
        .expect("read")
        .expect("present");
    assert_eq!(
        current.revision, dispatch.revision,
        "the dispatch carries the record's revision"
    );
    scheduler.stop().await;
}

#[tokio::test]
async fn a_job_waits_pending_until_a_matching_node_appears() {
    let server = NatsServer::start().await;
    let mesh = mesh(&server).await;
    add_node(&mesh, "cpu-only", 4, &[]).await;
    let scheduler = Scheduler::start(&server, 2.0);
    let client = server.client().await;
    let Reply::Ok(created) =
        create(&client, r#"{"command": "train", "labels": {"gpu": "yes"}}"#).await
    else {
        panic!("created");
    };
    let waiting = wait_until("the job's record", Duration::from_secs(20), || async {
        record(&mesh, created.id).await
    })
    .await;
    assert_eq!(
        (waiting.status, waiting.node.clone()),
        (JobStatus::Pending, None)
    );
    assert!(dispatches(&mesh).await.is_empty());

    let revision = versioned(&mesh, created.id).await.revision;

    let gpu = add_node(&mesh, "gpu-1", 1, &[("gpu", "yes")]).await;
    let found = wait_until(
        "placement on the new node",
        Duration::from_secs(20),
        || async { Some(dispatches(&mesh).await).filter(|found| !found.is_empty()) },
    )
    .await;
    assert_eq!(found.len(), 1);
    let (subject, dispatch) = &found[0];
    assert_eq!(subject, &subjects::dispatch(&gpu));
    assert_eq!(
        (dispatch.record.node.clone(), dispatch.record.attempt),
        (Some(gpu.clone()), 1)
    );
    // The placement wrote nothing: the dispatch carries the assignment over the revision the
    // waiting record still has, for the executor's claim to write both at once.
    let stored = versioned(&mesh, created.id).await;
    assert_eq!(stored.revision, revision);
    assert_eq!(dispatch.revision, revision);
    assert_eq!((stored.value.node, stored.value.attempt), (None, 0));
    scheduler.stop().await;
}

#[tokio::test]
async fn bad_submissions_are_rejected_naming_the_field_and_later_jobs_are_still_accepted() {
    let server = NatsServer::start().await;
    let mesh = mesh(&server).await;
    add_node(&mesh, "n1", 8, &[]).await;
    let scheduler = Scheduler::start(&server, 2.0);
    let client = server.client().await;
    let mut rejections = client
        .subscribe(subjects::REJECTED_ALL)
        .await
        .expect("subscribe");

    let truncated = {
        let spec = capstan_protocol::JobSpec::shell("echo a fairly long command line");
        let packed = codec::to_msgpack(&spec).expect("encodes");
        packed[..packed.len() / 2].to_vec()
    };
    let oversized = format!(r#"{{"command": "cat", "stdin": "{}"}}"#, "x".repeat(5000));
    let cases: Vec<(Vec<u8>, RejectionCode, Option<&str>)> = vec![
        (b"{\"command\": ".to_vec(), RejectionCode::Malformed, None),
        (truncated, RejectionCode::Malformed, None),
        (
            br#"{"command": "true", "comand": 1}"#.to_vec(),
            RejectionCode::Invalid,
            Some("comand"),
        ),
        (
            br#"{"command": "true", "argv": ["true"]}"#.to_vec(),
            RejectionCode::Invalid,
            Some("command"),
        ),
        (
            br#"{"command": "true", "timeout": -3}"#.to_vec(),
            RejectionCode::Invalid,
            Some("timeout"),
        ),
        (
            br#"{"command": 7}"#.to_vec(),
            RejectionCode::Invalid,
            Some("command"),
        ),
        (
            oversized.into_bytes(),
            RejectionCode::TooLarge,
            Some("stdin"),
        ),
    ];
    for (payload, code, field) in &cases {
        client
            .publish(subjects::SUBMIT, payload.clone().into())
            .await
            .expect("published");
        let rejection = next_rejection(&mut rejections).await;
        assert_eq!(rejection.code, *code, "{rejection:?}");
        assert_eq!(rejection.field.as_deref(), *field, "{rejection:?}");
        assert!(!rejection.reason.is_empty());
    }
    let mut bad_id = async_nats::HeaderMap::new();
    bad_id.insert(headers::JOB_ID, "not-a-ulid");
    client
        .publish_with_headers(subjects::SUBMIT, bad_id, r#"{"command": "true"}"#.into())
        .await
        .expect("published");
    let rejection = next_rejection(&mut rejections).await;
    assert_eq!(rejection.field.as_deref(), Some(headers::JOB_ID));

    // The consumer moved on: a good job is still accepted, and nothing bad was stored.
    let Reply::Ok(created) = create(&client, r#"{"command": "true"}"#).await else {
        panic!("created");
    };
    wait_until("the good job's record", Duration::from_secs(20), || async {
        record(&mesh, created.id).await
    })
    .await;
    let keys: Vec<String> =
        futures::TryStreamExt::try_collect(mesh.jobs.kv().keys().await.expect("keys"))
            .await
            .expect("keys");
    assert_eq!(
        keys,
        vec![created.id.to_string()],
        "only the good job is stored"
    );
    // A submission is acknowledged after the record it makes is written: the queue empties
    // a moment after the last record appears.
    let pending = || async {
        mesh.js
            .get_stream(topology::SUBMISSIONS.name)
            .await
            .expect("stream")
            .info()
            .await
            .expect("info")
            .state
            .messages
    };
    wait_until(
        "every submission, good or bad, to leave the work queue",
        Duration::from_secs(20),
        || async { (pending().await == 0).then_some(()) },
    )
    .await;
    assert_eq!(
        pending().await,
        0,
        "every submission, good or bad, left the work queue"
    );
    scheduler.stop().await;
}

#[tokio::test]
async fn the_create_endpoint_returns_the_id_and_a_repeated_idempotency_key_returns_the_same_job() {
    let server = NatsServer::start().await;
    let mesh = mesh(&server).await;
    add_node(&mesh, "n1", 8, &[]).await;
    let scheduler = Scheduler::start(&server, 2.0);
    let client = server.client().await;
    let body = r#"{"command": "backup", "idempotency_key": "backup-2026-11-23"}"#;
    let Reply::Ok(first) = create(&client, body).await else {
        panic!("created")
    };
    assert!(!first.duplicate);
    let Reply::Ok(second) = create(&client, body).await else {
        panic!("answered")
    };
    assert_eq!((second.id, second.duplicate), (first.id, true));

    // The same key over plain publish does not make a second job either.
    client
        .publish(subjects::SUBMIT, body.into())
        .await
        .expect("published");
    let Reply::Ok(other) = create(&client, r#"{"command": "true"}"#).await else {
        panic!("created")
    };
    // The scheduler creates records concurrently, so the first job's may come after the other's:
    // wait for both before counting.
    for id in [first.id, other.id] {
        wait_until("both jobs recorded", Duration::from_secs(20), || async {
            record(&mesh, id).await
        })
        .await;
    }
    let jobs: Vec<String> =
        futures::TryStreamExt::try_collect(mesh.jobs.kv().keys().await.expect("keys"))
            .await
            .expect("keys");
    assert_eq!(jobs.len(), 2, "{jobs:?}");

    let Reply::Error(error) = create(&client, r#"{"command": "true", "timeout": "soon"}"#).await
    else {
        panic!("rejected")
    };
    assert_eq!(error.field.as_deref(), Some("timeout"));
    scheduler.stop().await;
}

#[tokio::test]
async fn a_submission_stored_while_no_scheduler_runs_is_accepted_when_one_starts() {
    let server = NatsServer::start().await;
    let mesh = mesh(&server).await;
    add_node(&mesh, "n1", 8, &[]).await;
    let client = server.client().await;
    let js = jetstream::new(client.clone());
    let ack = js
        .publish(subjects::SUBMIT, r#"{"command": "true"}"#.into())
        .await
        .expect("published")
        .await
        .expect("stored");
    let scheduler = Scheduler::start(&server, 2.0);
    let found = wait_until("the dispatch", Duration::from_secs(20), || async {
        let found = dispatches(&mesh).await;
        (!found.is_empty()).then_some(found)
    })
    .await;
    assert_eq!(found[0].1.record.submission_seq, Some(ack.sequence));
    scheduler.stop().await;
}

#[tokio::test]
async fn a_submission_handed_on_for_placement_is_accepted_as_its_sender_with_its_delay_counted_from_its_submission()
 {
    let server = NatsServer::start().await;
    let mesh = mesh(&server).await;
    add_node(&mesh, "n1", 8, &[]).await;
    let client = server.client().await;
    let mut rejections = client
        .subscribe(subjects::rejected(subjects::Origin::Submit))
        .await
        .expect("subscribe");
    client.flush().await.expect("flushed");
    let scheduler = Scheduler::start(&server, 2.0);
    let js = jetstream::new(client.clone());

    // Read off a client's submission stored ten minutes ago, then handed on.
    let body = r#"{"command": "true", "delay": 3600}"#;
    let submitted_ms = u64::try_from(Timestamp::now().as_millis() - 600_000).expect("positive");
    let original = capstan_mesh::intake::read(
        &format!("{}.from.ops", subjects::SUBMIT),
        None,
        body.as_bytes(),
        capstan_mesh::intake::Stored {
            seq: 3,
            published_ms: submitted_ms,
        },
        4096,
    )
    .expect("a valid submission");
    let forward = capstan_mesh::intake::forward(&original, None);
    js.publish_with_headers(forward.subject.clone(), forward.headers, body.into())
        .await
        .expect("published")
        .await
        .expect("stored");
    let stored = wait_until("the job's record", Duration::from_secs(20), || async {
        record(&mesh, original.id).await
    })
    .await;
    assert_eq!(stored.status, JobStatus::Scheduled);
    assert_eq!(
        stored.submitted_by,
        Some(capstan_protocol::SubmittedBy::nats_client("ops"))
    );
    assert_eq!(
        stored.next_attempt_at,
        Some(Timestamp::from_millis(
            i64::try_from(submitted_ms).expect("fits") + 3_600_000
        )),
        "the delay counts from the original submission, not from the hand-on"
    );

    // One without the headers that say whose it is is refused, naming the first missing.
    let stray = JobId::generate();
    js.publish(subjects::place_job(stray), body.into())
        .await
        .expect("published")
        .await
        .expect("stored");
    let rejection = next_rejection(&mut rejections).await;
    assert_eq!(rejection.code, RejectionCode::Invalid);
    assert_eq!(rejection.field.as_deref(), Some(headers::JOB_ID));
    assert!(record(&mesh, stray).await.is_none());
    scheduler.stop().await;
}

#[tokio::test]
async fn a_resubmitted_job_id_is_one_job_and_a_reused_id_with_another_spec_is_a_conflict() {
    let server = NatsServer::start().await;
    let mesh = mesh(&server).await;
    add_node(&mesh, "n1", 8, &[]).await;
    let scheduler = Scheduler::start(&server, 2.0);
    let client = server.client().await;
    let mut rejections = client
        .subscribe(subjects::REJECTED_ALL)
        .await
        .expect("subscribe");
    let id = JobId::generate();
    let with_id = || {
        let mut map = async_nats::HeaderMap::new();
        map.insert(headers::JOB_ID, id.to_string().as_str());
        map
    };
    for _ in 0..2 {
        client
            .publish_with_headers(subjects::SUBMIT, with_id(), r#"{"command": "true"}"#.into())
            .await
            .expect("published");
    }
    client
        .publish_with_headers(
            subjects::SUBMIT,
            with_id(),
            r#"{"command": "false"}"#.into(),
        )
        .await
        .expect("published");
    let rejection = next_rejection(&mut rejections).await;
    assert_eq!(rejection.code, RejectionCode::Conflict);
    let stored = record(&mesh, id).await.expect("the job");
    assert_eq!(stored.spec.argv(), ["sh", "-c", "true"]);
    assert_eq!(dispatches(&mesh).await.len(), 1, "dispatched once");
    scheduler.stop().await;
}

#[tokio::test]
async fn two_replicas_accept_and_dispatch_each_of_300_jobs_exactly_once_spread_by_load() {
    let server = NatsServer::start().await;
    let mesh = mesh(&server).await;
    let nodes = [
        add_node(&mesh, "a", 100, &[]).await,
        add_node(&mesh, "b", 100, &[]).await,
        add_node(&mesh, "c", 100, &[]).await,
    ];
    let first = Scheduler::start(&server, 1.0);
    let second = Scheduler::start(&server, 1.0);
    let client = server.client().await;
    for n in 0..300 {
        client
            .publish(
                subjects::SUBMIT,
                format!(r#"{{"command": "echo {n}"}}"#).into(),
            )
            .await
            .expect("published");
    }
    let found = wait_until("300 dispatches", Duration::from_secs(60), || async {
        let found = dispatches(&mesh).await;
        (found.len() >= 300).then_some(found)
    })
    .await;
    assert_eq!(found.len(), 300);
    let ids: HashSet<JobId> = found.iter().map(|(_, d)| d.record.id).collect();
    assert_eq!(ids.len(), 300, "no job dispatched twice");
    let mut per_node: HashMap<String, usize> = HashMap::new();
    for (subject, _) in &found {
        *per_node.entry(subject.clone()).or_default() += 1;
    }
    for node in &nodes {
        let count = per_node
            .get(&subjects::dispatch(node))
            .copied()
            .unwrap_or(0);
        // 300 jobs over three idle nodes of 100 slots. Replicas learn of each other's
        // placements through events, so a node may get a few more than its share while another
        // gets fewer; the executor, not the scheduler, enforces its slots.
        assert!((80..=120).contains(&count), "{per_node:?}");
    }
    first.stop().await;
    second.stop().await;
}

#[tokio::test]
async fn a_fenced_node_gets_no_placement_until_its_fence_ends() {
    let server = NatsServer::start().await;
    let mesh = mesh(&server).await;
    let a = add_node(&mesh, "fence-a", 4, &[]).await;
    let b = add_node(&mesh, "fence-b", 4, &[]).await;
    let shutdown = CancellationToken::new();
    let view = nodes_view(&mesh, &shutdown).await;
    wait_until(
        "both nodes in the view",
        Duration::from_secs(10),
        || async { (view.values().len() == 2).then_some(()) },
    )
    .await;
    let cluster = capstan_scheduler::cluster::Cluster::new(view, 1.0, Duration::from_secs(10));
    cluster.fence(&a, Duration::from_millis(300));
    let picks: Vec<NodeId> = (0..4)
        .map(|_| {
            cluster
                .reserve(&Default::default(), JobId::generate())
                .expect("room")
        })
        .collect();
    assert!(picks.iter().all(|node| *node == b), "{picks:?}");
    // Fenced and full: the job waits for room rather than going to the fenced node.
    assert!(
        cluster
            .reserve(&Default::default(), JobId::generate())
            .is_err()
    );
    wait_until("the fence to end", Duration::from_secs(10), || async {
        cluster
            .reserve(&Default::default(), JobId::generate())
            .ok()
            .filter(|node| *node == a)
    })
    .await;
    shutdown.cancel();
}

#[tokio::test]
async fn a_heartbeat_written_before_jobs_ended_does_not_count_them_again_but_counts_jobs_never_seen()
 {
    let server = NatsServer::start().await;
    let mesh = mesh(&server).await;
    let node = add_node(&mesh, "beat-a", 2, &[]).await;
    let shutdown = CancellationToken::new();
    let view = nodes_view(&mesh, &shutdown).await;
    let cluster =
        capstan_scheduler::cluster::Cluster::new(view.clone(), 1.0, Duration::from_secs(10));
    let selector = Default::default();
    wait_until("the node in the view", Duration::from_secs(10), || async {
        cluster.reserve(&selector, JobId::generate()).ok()
    })
    .await;
    let first = cluster.reserve(&selector, JobId::generate()).expect("room");
    assert_eq!(first, node);
    // Full now; the node's heartbeat lists both jobs it runs.
    let held: Vec<JobId> = cluster.assigned_to(&node);
    assert_eq!(held.len(), 2);
    assert!(cluster.reserve(&selector, JobId::generate()).is_err());
    let mut record = mesh
        .nodes
        .get("beat-a")
        .await
        .expect("read")
        .expect("there")
        .value;
    record.jobs = held.clone();
    mesh.nodes.put("beat-a", &record).await.expect("heartbeat");
    wait_until(
        "the heartbeat in the view",
        Duration::from_secs(10),
        || async {
            view.get("beat-a")
                .filter(|entry| entry.value.jobs.len() == 2)
                .map(drop)
        },
    )
    .await;
    // Both end; the heartbeat still lists them, and is read again and again until the next.
    for job in &held {
        cluster.observe_finished(Some(&node), *job, Some(1));
    }
    cluster.reconcile();
    cluster.reconcile();
    assert_eq!(
        cluster.loads().get(&node),
        Some(&0),
        "ended jobs counted again"
    );
    assert_eq!(
        cluster.reserve(&selector, JobId::generate()),
        Ok(node.clone())
    );
    // A job the node holds that this replica never saw placed is counted from the heartbeat.
    let unseen = JobId::generate();
    record.jobs = vec![unseen];
    mesh.nodes.put("beat-a", &record).await.expect("heartbeat");
    wait_until("the second heartbeat", Duration::from_secs(10), || async {
        view.get("beat-a")
            .filter(|entry| entry.value.jobs == vec![unseen])
            .map(drop)
    })
    .await;
    cluster.reconcile();
    assert!(cluster.is_assigned(&node, unseen));
    assert!(
        cluster.reserve(&selector, JobId::generate()).is_err(),
        "the node is full again"
    );
    shutdown.cancel();
}

#[tokio::test]
async fn a_placement_announced_after_its_attempt_ended_holds_no_slot_but_a_later_attempt_does() {
    let server = NatsServer::start().await;
    let mesh = mesh(&server).await;
    let node = add_node(&mesh, "late-a", 1, &[]).await;
    let shutdown = CancellationToken::new();
    let view = nodes_view(&mesh, &shutdown).await;
    let cluster = capstan_scheduler::cluster::Cluster::new(view, 1.0, Duration::from_secs(10));
    let selector = Default::default();
    let job = JobId::generate();
    wait_until("the node in the view", Duration::from_secs(10), || async {
        cluster.reserve(&selector, job).ok()
    })
    .await;
    // The attempt ends, then its placement's announcement arrives (published before the end
    // reached its publisher, or by a replica that had not seen the end yet).
    cluster.observe_finished(Some(&node), job, Some(1));
    cluster.observe_assigned(node.clone(), job, Some(1));
    assert!(!cluster.is_assigned(&node, job), "the ended attempt counts");
    assert_eq!(
        cluster.reserve(&selector, JobId::generate()),
        Ok(node.clone()),
        "the node's slot is held by an ended attempt"
    );
    // Its retry, placed on the node by another replica, counts.
    let other = JobId::generate();
    cluster.observe_finished(Some(&node), other, Some(1));
    cluster.observe_assigned(node.clone(), other, Some(2));
    assert!(
        cluster.is_assigned(&node, other),
        "the retry is not counted"
    );
    shutdown.cancel();
}

#[tokio::test]
async fn a_scheduler_whose_intake_consumer_is_refused_exits_with_the_reason_instead_of_serving_without_intake()
 {
    let server = NatsServer::start().await;
    let mesh = mesh(&server).await;
    // Someone else's push consumer holds the intake's durable name: the server cannot turn
    // it into the schedulers' pull consumer.
    let stream = mesh
        .js
        .get_stream(topology::SUBMISSIONS.name)
        .await
        .expect("stream");
    stream
        .create_consumer(jetstream::consumer::push::Config {
            durable_name: Some(topology::SCHEDULER_CONSUMER.to_owned()),
            deliver_subject: "elsewhere".to_owned(),
            filter_subject: subjects::SUBMIT.to_owned(),
            ack_policy: jetstream::consumer::AckPolicy::Explicit,
            ..Default::default()
        })
        .await
        .expect("the squatting consumer");
    let scheduler = Scheduler::start(&server, 2.0);
    let ended = tokio::time::timeout(Duration::from_secs(60), scheduler.task)
        .await
        .expect("the scheduler stops on its own")
        .expect("joins");
    match ended {
        Err(capstan_mesh::Error::Setup { what, .. }) => {
            assert!(what.contains(topology::SCHEDULER_CONSUMER), "{what}");
        }
        other => panic!("expected a set-up failure naming the consumer, got {other:?}"),
    }
    // Its endpoints went with it: nothing answers a create any more.
    let asked = server
        .client()
        .await
        .request(subjects::CREATE, r#"{"command": "true"}"#.into())
        .await;
    assert!(asked.is_err(), "a stopped scheduler answered: {asked:?}");
}

#[tokio::test]
async fn a_waiting_job_cancelled_while_it_waits_gets_no_claimable_dispatch_and_the_next_one_does() {
    let server = NatsServer::start().await;
    let mesh = mesh(&server).await;
    let scheduler = Scheduler::start(&server, 2.0);
    let client = server.client().await;
    let mut created = Vec::new();
    for name in ["cancelled", "kept"] {
        let body = format!(r#"{{"command": "{name}", "labels": {{"gpu": "yes"}}}}"#);
        let Reply::Ok(job) = create(&client, &body).await else {
            panic!("created");
        };
        wait_until(
            "the job recorded as waiting",
            Duration::from_secs(20),
            || async { record(&mesh, job.id).await },
        )
        .await;
        created.push(job.id);
    }
    // The scheduler holds both, from the records it wrote; one changes under it.
    capstan_mesh::lifecycle::cancel(&mesh, created[0])
        .await
        .expect("cancelled");

    let gpu = add_node(&mesh, "gpu-1", 4, &[("gpu", "yes")]).await;
    wait_until(
        "both submissions handled",
        Duration::from_secs(20),
        || async {
            let stream = mesh.js.get_stream(topology::SUBMISSIONS.name).await.ok()?;
            let info = stream
                .consumer_info(topology::SCHEDULER_CONSUMER)
                .await
                .ok()?;
            (info.num_pending == 0 && info.num_ack_pending == 0).then_some(())
        },
    )
    .await;
    // The placement writes nothing, so the cancel is not seen there: what keeps the cancelled
    // job from running is that its dispatch names a revision its record has left, and an
    // executor's claim is a compare-and-swap on it.
    let cancelled = versioned(&mesh, created[0]).await;
    assert_eq!(
        (cancelled.value.status, cancelled.value.node),
        (JobStatus::Cancelled, None)
    );
    let kept = versioned(&mesh, created[1]).await;
    let found = dispatches(&mesh).await;
    for (subject, dispatch) in &found {
        assert_eq!(subject, &subjects::dispatch(&gpu));
        if dispatch.record.id == created[0] {
            assert!(
                dispatch.revision < cancelled.revision,
                "a cancelled job's dispatch must not be claimable: {dispatch:?}"
            );
        }
    }
    let claimable: Vec<JobId> = found
        .iter()
        .filter(|(_, d)| d.record.id == created[1] && d.revision == kept.revision)
        .map(|(_, d)| d.record.id)
        .collect();
    assert_eq!(
        claimable,
        [created[1]],
        "the job still waiting is dispatched"
    );
    scheduler.stop().await;
}

#[tokio::test]
async fn a_placement_after_waiting_is_announced_only_when_the_job_outlasts_the_announce_delay() {
    let server = NatsServer::start().await;
    let mesh = mesh(&server).await;
    let delay = Duration::from_secs(2);
    let scheduler = announcing_after(&server, delay);
    let client = server.client().await;
    let mut created = Vec::new();
    for _ in 0..2 {
        let Reply::Ok(job) = create(&client, r#"{"command": "x", "labels": {"gpu": "yes"}}"#).await
        else {
            panic!("created");
        };
        created.push(job.id);
    }
    // One slot: the first job placed ends at once (its outcome published as an executor
    // would), which makes room for the second, which never ends.
    let gpu = add_node(&mesh, "gpu-1", 1, &[("gpu", "yes")]).await;
    let first = wait_until("a first placement", Duration::from_secs(20), || async {
        dispatches(&mesh).await.into_iter().next()
    })
    .await
    .1
    .record;
    let second = created
        .iter()
        .copied()
        .find(|id| *id != first.id)
        .expect("the other job");
    end_as_an_executor_would(&mesh, &first).await;

    let (event, stored_at) = stored_event(&mesh, second, JobEventKind::Dispatched).await;
    assert_eq!(event.record.node.as_ref(), Some(&gpu));
    let placed_at = event.record.dispatched_at.expect("placed");
    assert_eq!(event.at, placed_at, "the event reports the placement");
    assert!(
        stored_at.since(placed_at) >= delay - Duration::from_millis(10),
        "announced {:?} after the placement",
        stored_at.since(placed_at)
    );
    // The first job was placed before the second, so its announcement would have been due
    // earlier; it ended first, so there is none.
    assert!(
        !has_event(&mesh, first.id, JobEventKind::Dispatched).await,
        "a placement that ended within the delay was announced"
    );
    scheduler.stop().await;
}

#[tokio::test]
async fn a_job_placed_as_it_is_created_announces_its_creation_only_when_it_outlasts_half_the_announce_delay()
 {
    let server = NatsServer::start().await;
    let mesh = mesh(&server).await;
    let delay = Duration::from_secs(2);
    let scheduler = announcing_after(&server, delay);
    let client = server.client().await;
    add_node(&mesh, "eu-1", 4, &[("zone", "eu")]).await;
    // Once a first job is dispatched, the scheduler knows the node: the next ones are placed
    // as they are created.
    let Reply::Ok(warm_up) = create(&client, r#"{"command": "x", "labels": {"zone": "eu"}}"#).await
    else {
        panic!("created");
    };
    let dispatched_job = |job: JobId| {
        let mesh = mesh.clone();
        async move {
            dispatches(&mesh)
                .await
                .into_iter()
                .find(|(_, d)| d.record.id == job)
                .map(|(_, d)| d.record)
        }
    };
    wait_until("the first dispatch", Duration::from_secs(20), || {
        dispatched_job(warm_up.id)
    })
    .await;
    let mut placed = Vec::new();
    for _ in 0..2 {
        let Reply::Ok(job) = create(&client, r#"{"command": "x", "labels": {"zone": "eu"}}"#).await
        else {
            panic!("created");
        };
        let record = wait_until("the job dispatched", Duration::from_secs(20), || {
            dispatched_job(job.id)
        })
        .await;
        assert!(record.node.is_some(), "placed as it was created");
        placed.push(record);
    }
    // The first ends at once; the second never.
    end_as_an_executor_would(&mesh, &placed[0]).await;
    let (event, stored_at) = stored_event(&mesh, placed[1].id, JobEventKind::Pending).await;
    assert_eq!(
        event.record.node, placed[1].node,
        "the event names the node"
    );
    let after = stored_at.since(event.record.created_at);
    assert!(
        after >= delay / 2 - Duration::from_millis(10),
        "announced {after:?} after the creation"
    );
    assert!(
        !has_event(&mesh, placed[0].id, JobEventKind::Pending).await,
        "a job that ended within the delay had its creation announced"
    );
    scheduler.stop().await;
}

#[tokio::test]
async fn a_job_waiting_for_room_announces_its_creation_only_when_it_outlasts_half_the_announce_delay()
 {
    let server = NatsServer::start().await;
    let mesh = mesh(&server).await;
    let delay = Duration::from_secs(2);
    let scheduler = announcing_after(&server, delay);
    let client = server.client().await;
    // No node carries either label yet: both wait.
    let Reply::Ok(stuck) = create(&client, r#"{"command": "x", "labels": {"gpu": "yes"}}"#).await
    else {
        panic!("created");
    };
    let Reply::Ok(brief) = create(&client, r#"{"command": "x", "labels": {"zone": "eu"}}"#).await
    else {
        panic!("created");
    };
    // Both are taken by the scheduler (no executor runs) and wait for room.
    for job in [stuck.id, brief.id] {
        wait_until("the job recorded", Duration::from_secs(20), || async {
            record(&mesh, job).await
        })
        .await;
    }
    // A node for the second arrives well within half the delay.
    let eu = add_node(&mesh, "eu-1", 1, &[("zone", "eu")]).await;
    let placed = wait_until("the second job placed", Duration::from_secs(20), || async {
        dispatches(&mesh)
            .await
            .into_iter()
            .find(|(_, d)| d.record.id == brief.id)
            .map(|(_, d)| d.record)
    })
    .await;
    assert_eq!(placed.node.as_ref(), Some(&eu));
    assert!(
        Timestamp::now().since(placed.created_at) < delay / 2,
        "the test placed the job too slowly to say anything"
    );

    // The job nothing can run is announced, waiting, once it has waited half the delay.
    let (event, stored_at) = stored_event(&mesh, stuck.id, JobEventKind::Pending).await;
    assert!(event.record.is_unplaced(), "announced as created");
    let after = stored_at.since(event.record.created_at);
    assert!(
        after >= delay / 2 - Duration::from_millis(10),
        "announced {after:?} after the creation"
    );
    // The placed one is announced by its placement, a full delay after it: later than its
    // creation's announcement would have been due, had it still waited.
    let (dispatched, _) = stored_event(&mesh, brief.id, JobEventKind::Dispatched).await;
    assert_eq!(dispatched.record.node.as_ref(), Some(&eu));
    assert!(
        !has_event(&mesh, brief.id, JobEventKind::Pending).await,
        "a job placed within half the delay had its creation announced"
    );
    scheduler.stop().await;
}

#[tokio::test]
async fn a_job_placed_after_waiting_on_a_node_that_goes_down_before_claiming_it_is_placed_again_elsewhere()
 {
    let server = NatsServer::start().await;
    let mesh = mesh(&server).await;
    let scheduler = Scheduler::start(&server, 1.0);
    let client = server.client().await;
    let Reply::Ok(job) = create(&client, r#"{"command": "x", "labels": {"gpu": "yes"}}"#).await
    else {
        panic!("created");
    };
    wait_until(
        "the job recorded as waiting",
        Duration::from_secs(20),
        || async { record(&mesh, job.id).await },
    )
    .await;
    let first = add_node(&mesh, "gpu-1", 1, &[("gpu", "yes")]).await;
    wait_until("a dispatch to gpu-1", Duration::from_secs(20), || async {
        dispatches(&mesh)
            .await
            .into_iter()
            .find(|(subject, _)| *subject == subjects::dispatch(&first))
    })
    .await;
    // Its record still says waiting (the claim would have written the assignment). The node
    // stops heartbeating before it claims: the registry marks it down and says so.
    let mut down = mesh
        .nodes
        .get(first.as_str())
        .await
        .expect("read")
        .expect("node")
        .value;
    down.status = NodeStatus::Down;
    mesh.nodes
        .put(first.as_str(), &down)
        .await
        .expect("node written");
    mesh.events
        .node(&NodeEvent {
            kind: NodeEventKind::Down,
            at: Timestamp::now(),
            node: down,
        })
        .await
        .expect("event published");

    let handed_back = wait_until(
        "the unclaimed attempt handed back",
        Duration::from_secs(20),
        || async {
            record(&mesh, job.id)
                .await
                .filter(|r| r.handed_back_attempts == 1)
        },
    )
    .await;
    assert_eq!(handed_back.attempt, 1, "{handed_back:?}");
    let second = add_node(&mesh, "gpu-2", 1, &[("gpu", "yes")]).await;
    let (_, again) = wait_until("a dispatch to gpu-2", Duration::from_secs(20), || async {
        dispatches(&mesh)
            .await
            .into_iter()
            .find(|(subject, _)| *subject == subjects::dispatch(&second))
    })
    .await;
    assert_eq!(
        (again.record.id, again.record.attempt),
        (job.id, 2),
        "the next attempt goes to the node that is up"
    );
    scheduler.stop().await;
}

#[tokio::test]
async fn a_preferred_node_with_room_is_picked_first_and_another_takes_the_job_when_it_is_full() {
    let server = NatsServer::start().await;
    let mesh = mesh(&server).await;
    let near = add_node(&mesh, "zone-near", 1, &[("zone", "eu-1")]).await;
    let far = add_node(&mesh, "zone-far", 4, &[("zone", "us-1")]).await;
    let shutdown = CancellationToken::new();
    let view = nodes_view(&mesh, &shutdown).await;
    wait_until(
        "both nodes in the view",
        Duration::from_secs(10),
        || async { (view.values().len() == 2).then_some(()) },
    )
    .await;
    let cluster = capstan_scheduler::cluster::Cluster::new(view, 1.0, Duration::from_secs(10));
    let zone: Labels = [("zone".to_owned(), "eu-1".to_owned())].into();
    // The far node is emptier relative to its slots, yet the near one is picked while it
    // has room.
    let first = cluster
        .reserve_preferring(&Labels::new(), &zone, JobId::generate())
        .expect("room");
    assert_eq!(first, near);
    let second = cluster
        .reserve_preferring(&Labels::new(), &zone, JobId::generate())
        .expect("room elsewhere");
    assert_eq!(second, far, "a preference is not a requirement");
    shutdown.cancel();
}

/// Creates the jobs described by `bodies`, one after the other, and returns their ids.
async fn create_all(client: &async_nats::Client, bodies: &[String]) -> Vec<JobId> {
    let mut ids = Vec::new();
    for body in bodies {
        let Reply::Ok(created) = create(client, body).await else {
            panic!("{body} refused");
        };
        ids.push(created.id);
    }
    ids
}

/// The jobs dispatched so far, in dispatch order.
async fn dispatched_jobs(mesh: &Mesh) -> Vec<JobId> {
    dispatches(mesh)
        .await
        .into_iter()
        .map(|(_, dispatch)| dispatch.record.id)
        .collect()
}

/// Ends `job`'s dispatched attempt as its executor would: the record, then the event.
async fn end_dispatched(mesh: &Mesh, job: JobId) {
    let found = dispatches(mesh).await;
    let (_, dispatch) = found
        .iter()
        .find(|(_, d)| d.record.id == job)
        .expect("dispatched");
    let mut ended = dispatch.record.clone();
    ended.status = JobStatus::Succeeded;
    ended.finished_at = Some(Timestamp::now());
    mesh.jobs
        .put(&job.to_string(), &ended)
        .await
        .expect("the end written");
    end_as_an_executor_would(mesh, &dispatch.record).await;
}

#[tokio::test]
async fn jobs_sharing_a_concurrency_key_run_at_most_limit_at_once_in_submission_order_under_two_schedulers()
 {
    let server = NatsServer::start().await;
    let mesh = mesh(&server).await;
    add_node(&mesh, "big", 8, &[]).await;
    let first = Scheduler::start(&server, 2.0);
    let second = Scheduler::start(&server, 2.0);
    let client = server.client().await;
    let bodies: Vec<String> = (0..6)
        .map(|n| {
            format!(
                r#"{{"command": "migrate {n}", "concurrency": {{"key": "db.main", "limit": 2}}}}"#
            )
        })
        .collect();
    let jobs = create_all(&client, &bodies).await;

    // Two take the slots as they arrive; the other four wait in line, oldest first.
    let line = |mesh: &Mesh| {
        let mesh = mesh.clone();
        async move {
            mesh.concurrency
                .get("db.main")
                .await
                .expect("readable")
                .map(|slots| slots.value)
                .unwrap_or_default()
        }
    };
    wait_until(
        "two running and four in line",
        Duration::from_secs(30),
        || async {
            let slots = line(&mesh).await;
            (slots.holders.len() == 2 && slots.waiting.len() == 4).then_some(())
        },
    )
    .await;
    let mut ended: Vec<JobId> = Vec::new();
    loop {
        let slots = line(&mesh).await;
        let waiting: Vec<JobId> = slots.waiting.iter().map(|w| w.job).collect();
        let mut in_order = waiting.clone();
        in_order.sort();
        assert_eq!(waiting, in_order, "the line is in submission order");
        let dispatched = dispatched_jobs(&mesh).await;
        let running: Vec<JobId> = dispatched
            .iter()
            .copied()
            .filter(|job| !ended.contains(job))
            .collect();
        assert!(running.len() <= 2, "{running:?} run at once");
        let Some(oldest) = running.iter().min().copied() else {
            break;
        };
        // A freed slot goes to the first in line, whichever replica holds it.
        let before = dispatched.len();
        end_dispatched(&mesh, oldest).await;
        ended.push(oldest);
        if let Some(next) = waiting.first() {
            let got = wait_until(
                "the next in line dispatched",
                Duration::from_secs(30),
                || async {
                    let dispatched = dispatched_jobs(&mesh).await;
                    (dispatched.len() > before).then(|| dispatched[before])
                },
            )
            .await;
            assert_eq!(&got, next, "the slot went to the first in line");
        }
    }
    let (mut all, mut submitted) = (ended.clone(), jobs.clone());
    all.sort();
    submitted.sort();
    assert_eq!(all, submitted, "every job ran once");
    first.stop().await;
    second.stop().await;
}

#[tokio::test]
async fn among_jobs_waiting_for_room_a_higher_priority_goes_first_and_equal_ones_in_submission_order()
 {
    let server = NatsServer::start().await;
    let mesh = mesh(&server).await;
    add_node(&mesh, "small", 1, &[]).await;
    let port = capstan_testkit::server::free_port();
    let scheduler = Scheduler::start_with(&server, |config| {
        config.dispatch_depth = 1.0;
        config.metrics.metrics_listen = Some(format!("127.0.0.1:{port}"));
    });
    let client = server.client().await;
    let running = create_all(&client, &[r#"{"command": "first"}"#.to_owned()]).await[0];
    wait_until(
        "the first job dispatched",
        Duration::from_secs(30),
        || async { (dispatched_jobs(&mesh).await == vec![running]).then_some(()) },
    )
    .await;
    let bodies: Vec<String> = [("low", 1), ("normal-a", 5), ("high", 9), ("normal-b", 5)]
        .iter()
        .map(|(name, priority)| format!(r#"{{"command": "{name}", "priority": {priority}}}"#))
        .collect();
    let waiting = create_all(&client, &bodies).await;
    let (low, normal_a, high, normal_b) = (waiting[0], waiting[1], waiting[2], waiting[3]);
    // All four are in the scheduler's queue before room appears.
    let metrics = capstan_testkit::http::HttpClient::new(format!("http://127.0.0.1:{port}"));
    wait_until(
        "four jobs waiting for room",
        Duration::from_secs(30),
        || async {
            let text = metrics.try_get("/metrics").await.ok()?.text();
            text.lines()
                .any(|line| line == "capstan_scheduler_waiting 4")
                .then_some(())
        },
    )
    .await;
    let mut order = Vec::new();
    let mut current = running;
    for _ in 0..waiting.len() {
        // Counted before the end: the next job may be dispatched as soon as it is heard.
        let before = dispatched_jobs(&mesh).await.len();
        end_dispatched(&mesh, current).await;
        current = wait_until(
            "the next job dispatched",
            Duration::from_secs(30),
            || async {
                let dispatched = dispatched_jobs(&mesh).await;
                (dispatched.len() > before).then(|| dispatched[before])
            },
        )
        .await;
        order.push(current);
    }
    assert_eq!(order, vec![high, normal_a, normal_b, low]);
    scheduler.stop().await;
}

/// A job an executor took from its submission: recorded running on `node` as `instance`,
/// under the submission stored at `seq`; handed on for placement, as a taker that finds it
/// recorded does.
async fn taken_and_handed_on(mesh: &Mesh, node: &NodeId, instance: InstanceId, seq: u64) -> JobId {
    let id = JobId::generate();
    let body = r#"{"command": "sleep 60"}"#;
    let mut map = async_nats::HeaderMap::new();
    map.insert(headers::JOB_ID, id.to_string().as_str());
    let submission = capstan_mesh::intake::read(
        subjects::SUBMIT,
        Some(&map),
        body.as_bytes(),
        capstan_mesh::intake::Stored {
            seq,
            published_ms: u64::try_from(Timestamp::now().as_millis()).expect("positive"),
        },
        4096,
    )
    .expect("a valid submission");
    let now = Timestamp::now();
    let mut running = JobRecord::new(id, submission.spec.clone(), now)
        .assigned(node.clone(), now)
        .started(instance, now);
    running.submission_seq = Some(seq);
    mesh.jobs
        .create(&id.to_string(), &running)
        .await
        .expect("created");
    let forward = capstan_mesh::intake::forward(&submission, Some(&map));
    mesh.js
        .publish_with_headers(forward.subject, forward.headers, body.into())
        .await
        .expect("published")
        .await
        .expect("stored");
    id
}

#[tokio::test]
async fn a_taken_attempt_whose_submission_comes_back_is_dispatched_to_its_live_node_and_lost_when_its_node_is_gone()
 {
    let server = NatsServer::start().await;
    let mesh = mesh(&server).await;
    let node = add_node(&mesh, "n1", 4, &[]).await;
    let instance = node_record(&mesh, "n1").await.instance;
    let scheduler = Scheduler::start(&server, 2.0);

    // Its taker is alive: the attempt goes on where it runs, now held by the node's dispatches.
    let alive = taken_and_handed_on(&mesh, &node, instance, 7).await;
    let (_, dispatch) = wait_until("a dispatch to n1", Duration::from_secs(20), || async {
        dispatches(&mesh)
            .await
            .into_iter()
            .find(|(subject, d)| *subject == subjects::dispatch(&node) && d.record.id == alive)
    })
    .await;
    assert_eq!(dispatch.record.status, JobStatus::Running);
    assert_eq!(dispatch.record.instance, Some(instance));
    let still = record(&mesh, alive).await.expect("record");
    assert_eq!((still.status, still.attempt), (JobStatus::Running, 1));

    // Its taker restarted as another instance: the attempt is lost, to be retried.
    let restarted = taken_and_handed_on(&mesh, &node, InstanceId::generate(), 8).await;
    // Its taker's node is unknown: the same.
    let gone = NodeId::new("gone-1").expect("valid");
    let vanished = taken_and_handed_on(&mesh, &gone, InstanceId::generate(), 9).await;
    for job in [restarted, vanished] {
        let lost = wait_until("the attempt lost", Duration::from_secs(20), || async {
            record(&mesh, job).await.filter(|r| r.lost_attempts == 1)
        })
        .await;
        assert_ne!(lost.status, JobStatus::Running, "{lost:?}");
    }
    assert!(
        !dispatches(&mesh)
            .await
            .iter()
            .any(|(_, d)| d.record.id == restarted && d.record.attempt == 1),
        "no dispatch of an attempt whose runner is gone"
    );
    scheduler.stop().await;
}

#[tokio::test]
async fn a_node_going_down_loses_the_taken_attempts_its_last_heartbeat_listed() {
    let server = NatsServer::start().await;
    let mesh = mesh(&server).await;
    let node = add_node(&mesh, "n1", 4, &[]).await;
    let mut down = node_record(&mesh, "n1").await;
    let scheduler = Scheduler::start(&server, 2.0);
    // Node events are read from the moment the scheduler follows them.
    wait_until(
        "the scheduler to follow node events",
        Duration::from_secs(20),
        || async {
            mesh.js
                .get_stream(topology::EVENTS.name)
                .await
                .ok()?
                .get_consumer::<jetstream::consumer::pull::Config>(topology::NODES_CONSUMER)
                .await
                .ok()
        },
    )
    .await;
    // Recorded running there, with no dispatch: taken from its submission.
    let id = JobId::generate();
    let now = Timestamp::now();
    let running = JobRecord::new(id, capstan_protocol::JobSpec::shell("sleep 60"), now)
        .assigned(node.clone(), now)
        .started(down.instance, now);
    mesh.jobs
        .create(&id.to_string(), &running)
        .await
        .expect("created");
    down.status = NodeStatus::Down;
    down.jobs = vec![id];
    mesh.nodes.put("n1", &down).await.expect("node written");
    mesh.events
        .node(&NodeEvent {
            kind: NodeEventKind::Down,
            at: Timestamp::now(),
            node: down,
        })
        .await
        .expect("event published");
    let lost = wait_until("the attempt lost", Duration::from_secs(20), || async {
        record(&mesh, id).await.filter(|r| r.lost_attempts == 1)
    })
    .await;
    assert_ne!(lost.status, JobStatus::Running, "{lost:?}");
    scheduler.stop().await;
}

#[tokio::test]
async fn a_submission_an_executor_asks_for_is_its_and_one_left_waiting_is_taken_by_a_scheduler() {
    let server = NatsServer::start().await;
    let mesh = mesh(&server).await;
    add_node(&mesh, "n1", 4, &[]).await;
    let scheduler = Scheduler::start(&server, 2.0);
    let consumer: jetstream::consumer::PullConsumer = wait_until(
        "the submissions consumer",
        Duration::from_secs(20),
        || async {
            mesh.js
                .get_stream(topology::SUBMISSIONS.name)
                .await
                .ok()?
                .get_consumer(topology::SCHEDULER_CONSUMER)
                .await
                .ok()
        },
    )
    .await;
    // An executor with a free slot asks (the executors' priority)...
    let mut executor = consumer
        .batch()
        .group(topology::SUBMISSIONS_GROUP)
        .max_messages(1)
        .expires(Duration::from_secs(10))
        .messages()
        .await
        .expect("a pull");
    // ...the server has it before the submission arrives.
    consumer.clone().info().await.expect("info");
    let first = JobId::generate();
    let mut map = async_nats::HeaderMap::new();
    map.insert(headers::JOB_ID, first.to_string().as_str());
    mesh.js
        .publish_with_headers(subjects::SUBMIT, map, r#"{"command": "true"}"#.into())
        .await
        .expect("published")
        .await
        .expect("stored");
    let taken = tokio::time::timeout(Duration::from_secs(10), executor.next())
        .await
        .expect("delivered to the executor in time")
        .expect("a message")
        .expect("no error");
    assert_eq!(
        taken
            .headers
            .as_ref()
            .and_then(|m| m.get(headers::JOB_ID))
            .map(|v| v.to_string()),
        Some(first.to_string())
    );
    taken.ack().await.expect("acknowledged");
    assert!(
        record(&mesh, first).await.is_none(),
        "the scheduler did not take it too"
    );

    // With no executor asking, the scheduler takes the next one.
    let Reply::Ok(second) = create(&server.client().await, r#"{"command": "true"}"#).await else {
        panic!("created");
    };
    wait_until(
        "the scheduler to accept it",
        Duration::from_secs(20),
        || async { record(&mesh, second.id).await },
    )
    .await;
    scheduler.stop().await;
}

#[tokio::test]
async fn a_job_cancelled_before_a_scheduler_took_its_submission_is_never_placed() {
    let server = NatsServer::start().await;
    let mesh = mesh(&server).await;
    add_node(&mesh, "exec-1", 4, &[]).await;
    // Accepted while no scheduler runs, and cancelled at once.
    let submitter = capstan_mesh::Submitter::new(mesh.js.clone(), mesh.idempotency.clone());
    let created = submitter
        .submit(&capstan_protocol::JobSpec::shell("sleep 60"))
        .await
        .expect("submitted");
    let (_, cancelled) = capstan_mesh::lifecycle::cancel(&mesh, created.id)
        .await
        .expect("cancelled from its submission");
    assert_eq!(cancelled.status, JobStatus::Cancelled);

    let scheduler = Scheduler::start(&server, 1.0);
    submissions_taken(&mesh).await;
    assert_eq!(
        record(&mesh, created.id).await.map(|r| r.status),
        Some(JobStatus::Cancelled),
        "the job stays cancelled"
    );
    assert!(
        dispatches(&mesh).await.is_empty(),
        "a cancelled job is dispatched to no node"
    );
    assert!(!has_event(&mesh, created.id, JobEventKind::Pending).await);
    scheduler.stop().await;
}

#[tokio::test]
async fn a_fan_out_cancelled_before_a_scheduler_took_its_submission_ends_cancelled_with_no_target_run()
 {
    let server = NatsServer::start().await;
    let mesh = mesh(&server).await;
    add_node(&mesh, "exec-1", 4, &[("zone", "a")]).await;
    add_node(&mesh, "exec-2", 4, &[("zone", "a")]).await;
    // Accepted while no scheduler runs, and cancelled at once.
    let id = JobId::generate();
    let mut map = async_nats::HeaderMap::new();
    map.insert(headers::JOB_ID, id.to_string().as_str());
    mesh.js
        .publish_with_headers(
            subjects::submit_job(id),
            map,
            r#"{"command": "sleep 60", "nodes": {"labels": {"zone": "a"}}}"#.into(),
        )
        .await
        .expect("published")
        .await
        .expect("stored");
    let (parent, asked) = capstan_mesh::fanout::cancel(&mesh, id)
        .await
        .expect("read")
        .expect("a parent accepted but not created is cancelled");
    assert!(asked);
    assert_eq!(
        parent.status,
        capstan_protocol::fanout::FanOutStatus::Cancelled
    );
    assert!(parent.targets.is_empty(), "no target was chosen");
    assert!(
        has_event_on(
            &mesh,
            &subjects::fanout_event(id, capstan_protocol::fanout::FanOutStatus::Cancelled)
        )
        .await,
        "the parent's end is announced"
    );

    let scheduler = Scheduler::start(&server, 1.0);
    submissions_taken(&mesh).await;
    let stored = mesh
        .fanouts
        .get(&id.to_string())
        .await
        .expect("read")
        .expect("the parent");
    assert_eq!(
        stored.value.status,
        capstan_protocol::fanout::FanOutStatus::Cancelled
    );
    assert!(
        stored.value.targets.is_empty(),
        "{:?}",
        stored.value.targets
    );
    assert!(
        dispatches(&mesh).await.is_empty(),
        "no target is dispatched to a node"
    );
    scheduler.stop().await;
}
