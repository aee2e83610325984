//! The registry against a real nats-server: registration, heartbeats, liveness, endpoints and
//! bad input.

use std::time::Duration;

use async_nats::jetstream;
use capstan_protocol::codec::{self, Encoding};
use capstan_protocol::subjects::registry::NodeCall;
use capstan_protocol::subjects::{self, registry as endpoints};
use capstan_protocol::{
    ErrorCode, Heartbeat, HeartbeatReply, InstanceId, NodeEvent, NodeId, NodeRecord, NodeStatus,
    Registration, Reply, headers,
};
use capstan_testkit::{NatsServer, wait_until};
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

struct Running {
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), capstan_mesh::Error>>,
}

impl Running {
    async fn stop(self) {
        self.shutdown.cancel();
        self.task.await.expect("joins").expect("clean exit");
    }
}

fn start(server: &NatsServer, timeout: Duration) -> Running {
    let mut config = capstan_registry::Config::for_url(server.url());
    config.heartbeat_timeout = timeout;
    config.sweep_interval = Duration::from_millis(100);
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(capstan_registry::run(config, shutdown.clone()));
    Running { shutdown, task }
}

async fn request<T: serde::Serialize, R: serde::de::DeserializeOwned>(
    client: &async_nats::Client,
    subject: &str,
    body: &T,
) -> Reply<R> {
    let payload = codec::to_msgpack(body).expect("encodes");
    let reply = wait_until("the endpoint to answer", Duration::from_secs(10), || {
        let payload = payload.clone();
        async move {
            client
                .request(subject.to_owned(), payload.into())
                .await
                .ok()
        }
    })
    .await;
    codec::decode(Encoding::MsgPack, &reply.payload).expect("reply decodes")
}

fn registration(node: &str) -> Registration {
    Registration {
        node: NodeId::new(node).expect("valid"),
        instance: InstanceId::generate(),
        labels: [("zone".to_owned(), "eu".to_owned())].into(),
        capacity: 4,
        version: "test".into(),
        hostname: "localhost".into(),
    }
}

async fn node_events(client: &async_nats::Client) -> async_nats::Subscriber {
    client
        .subscribe(subjects::NODE_EVENTS_ALL)
        .await
        .expect("subscribes")
}

async fn next_event(events: &mut async_nats::Subscriber) -> NodeEvent {
    let message = tokio::time::timeout(Duration::from_secs(20), events.next())
        .await
        .expect("a node event in time")
        .expect("subscription open");
    codec::decode(Encoding::MsgPack, &message.payload).expect("event decodes")
}

#[tokio::test]
async fn a_registered_node_is_stored_listed_and_announced() {
    let server = NatsServer::start().await;
    let registry = start(&server, Duration::from_secs(10));
    let client = server.client().await;
    let mut events = node_events(&client).await;

    let registration = registration("exec-a");
    let reply: Reply<NodeRecord> = request(
        &client,
        &NodeCall::Register.subject(&registration.node),
        &registration,
    )
    .await;
    let record = reply.into_result().expect("registered");
    assert_eq!((record.status, record.capacity), (NodeStatus::Up, 4));

    let event = next_event(&mut events).await;
    assert_eq!(event.node.id, registration.node);

    let kv = jetstream::new(client.clone())
        .get_key_value("capstan_nodes")
        .await
        .expect("bucket");
    let stored = kv.get("exec-a").await.expect("get").expect("present");
    let stored: NodeRecord = serde_json::from_slice(&stored).expect("JSON record");
    assert_eq!(stored.instance, registration.instance);

    // A person lists nodes with `nats req capstan.registry.nodes.list ''` and reads JSON.
    let reply = client
        .request(endpoints::NODES_LIST, "".into())
        .await
        .expect("list answers");
    let listed: Reply<Vec<NodeRecord>> = serde_json::from_slice(&reply.payload).expect("JSON");
    assert_eq!(listed.into_result().expect("ok")[0].id, registration.node);

    let reply = client
        .request(endpoints::NODES_GET, r#"{"node": "nope"}"#.into())
        .await
        .expect("get answers");
    let missing: Reply<NodeRecord> = serde_json::from_slice(&reply.payload).expect("JSON");
    assert_eq!(
        missing.into_result().expect_err("unknown").code,
        ErrorCode::NotFound
    );
    assert!(
        reply
            .headers
            .expect("error headers")
            .get("Nats-Service-Error-Code")
            .is_some()
    );
    registry.stop().await;
}

#[tokio::test]
async fn a_node_that_stops_heartbeating_is_marked_down_once_and_up_again_when_it_returns() {
    let server = NatsServer::start().await;
    // Two replicas sweep the same bucket: the node must be announced down exactly once.
    let first = start(&server, Duration::from_secs(1));
    let second = start(&server, Duration::from_secs(1));
    let client = server.client().await;
    let mut events = node_events(&client).await;
    let registration = registration("exec-b");
    let _: Reply<NodeRecord> = request(
        &client,
        &NodeCall::Register.subject(&registration.node),
        &registration,
    )
    .await;
    assert_eq!(next_event(&mut events).await.kind.as_str(), "registered");

    let down = next_event(&mut events).await;
    assert_eq!(
        (down.kind.as_str(), down.node.status),
        ("down", NodeStatus::Down)
    );
    // No second "down" from the other replica.
    let extra = tokio::time::timeout(Duration::from_secs(2), events.next()).await;
    assert!(extra.is_err(), "a second event arrived: {extra:?}");

    let beat = Heartbeat {
        node: registration.node.clone(),
        instance: registration.instance,
        jobs: vec![],
        queued: 0,
        finished: Default::default(),
    };
    let reply: Reply<HeartbeatReply> =
        request(&client, &NodeCall::Heartbeat.subject(&beat.node), &beat).await;
    assert_eq!(reply.into_result().expect("ok"), HeartbeatReply::Ok);
    assert_eq!(next_event(&mut events).await.kind.as_str(), "up");
    first.stop().await;
    second.stop().await;
}

#[tokio::test]
async fn heartbeats_from_a_replaced_or_unknown_instance_are_told_so() {
    let server = NatsServer::start().await;
    let registry = start(&server, Duration::from_secs(10));
    let client = server.client().await;
    let old = registration("exec-c");
    let _: Reply<NodeRecord> = request(&client, &NodeCall::Register.subject(&old.node), &old).await;
    let new = Registration {
        instance: InstanceId::generate(),
        ..old.clone()
    };
    let _: Reply<NodeRecord> = request(&client, &NodeCall::Register.subject(&new.node), &new).await;

    let stale = Heartbeat {
        node: old.node.clone(),
        instance: old.instance,
        jobs: vec![],
        queued: 0,
        finished: Default::default(),
    };
    let reply: Reply<HeartbeatReply> =
        request(&client, &NodeCall::Heartbeat.subject(&stale.node), &stale).await;
    assert_eq!(reply.into_result().expect("ok"), HeartbeatReply::Superseded);

    let stranger = Heartbeat {
        node: NodeId::new("never-registered").expect("valid"),
        instance: InstanceId::generate(),
        jobs: vec![],
        queued: 0,
        finished: Default::default(),
    };
    let reply: Reply<HeartbeatReply> = request(
        &client,
        &NodeCall::Heartbeat.subject(&stranger.node),
        &stranger,
    )
    .await;
    assert_eq!(
        reply.into_result().expect("ok"),
        HeartbeatReply::UnknownNode
    );
    registry.stop().await;
}

#[tokio::test]
async fn malformed_and_invalid_requests_are_rejected_and_the_registry_keeps_serving() {
    let server = NatsServer::start().await;
    let registry = start(&server, Duration::from_secs(10));
    let client = server.client().await;
    let mut rejections = client
        .subscribe(subjects::REJECTED_ALL)
        .await
        .expect("subscribes");
    // Wait until the endpoint serves.
    let no_args = std::collections::HashMap::<String, String>::new();
    let _: Reply<Vec<NodeRecord>> = request(&client, endpoints::NODES_LIST, &no_args).await;

    let reply = client
        .request(
            NodeCall::Register.subject(&NodeId::new("exec-d").expect("valid")),
            "{\"node\": ".into(),
        )
        .await
        .expect("answers");
    let error = serde_json::from_slice::<Reply<NodeRecord>>(&reply.payload)
        .expect("JSON reply")
        .into_result()
        .expect_err("rejected");
    assert_eq!(error.code, ErrorCode::BadRequest);
    let rejection = tokio::time::timeout(Duration::from_secs(10), rejections.next())
        .await
        .expect("a rejection event")
        .expect("open");
    assert!(
        rejection
            .headers
            .expect("headers")
            .get(headers::ERROR)
            .is_some_and(|e| e.as_str().contains("malformed"))
    );

    let mut bad = registration("exec-d");
    bad.capacity = 0;
    let reply: Reply<NodeRecord> =
        request(&client, &NodeCall::Register.subject(&bad.node), &bad).await;
    let error = reply.into_result().expect_err("rejected");
    assert_eq!(error.field.as_deref(), Some("capacity"));

    let reply = client
        .request(
            NodeCall::Heartbeat.subject(&NodeId::new("exec-d").expect("valid")),
            r#"{"node": "a.b", "instance": "x"}"#.into(),
        )
        .await
        .expect("answers");
    let error = serde_json::from_slice::<Reply<HeartbeatReply>>(&reply.payload)
        .expect("JSON")
        .into_result()
        .expect_err("rejected");
    assert_eq!(error.field.as_deref(), Some("node"), "{error}");

    // Still serving.
    let good = registration("exec-e");
    let reply: Reply<NodeRecord> =
        request(&client, &NodeCall::Register.subject(&good.node), &good).await;
    assert!(reply.into_result().is_ok());
    registry.stop().await;
}

#[tokio::test]
async fn a_node_calling_about_another_node_is_refused_as_forged_and_the_other_keeps_its_record() {
    let server = NatsServer::start().await;
    let registry = start(&server, Duration::from_secs(10));
    let client = server.client().await;
    let real = registration("exec-real");
    let reply: Reply<NodeRecord> =
        request(&client, &NodeCall::Register.subject(&real.node), &real).await;
    reply.into_result().expect("the real node registers");
    let mut rejections = client
        .subscribe(subjects::rejected(subjects::Origin::Registry))
        .await
        .expect("subscribes");
    client.flush().await.expect("flushed");

    // exec-evil, on its own subjects, claims to be exec-real: a new instance, then leaving.
    let evil = NodeId::new("exec-evil").expect("valid");
    let impostor = registration("exec-real");
    let beat = Heartbeat {
        node: real.node.clone(),
        instance: real.instance,
        jobs: Vec::new(),
        queued: 0,
        finished: Default::default(),
    };
    let calls = [
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
    ];
    for (call, payload) in calls {
        let reply = client
            .request(call.subject(&evil), payload.into())
            .await
            .expect("answers");
        let reply: Reply<serde_json::Value> =
            codec::decode(Encoding::MsgPack, &reply.payload).expect("decodes");
        let error = reply.into_result().expect_err("refused");
        assert_eq!(error.code, ErrorCode::Forbidden, "{call:?}: {error}");
        let rejection = tokio::time::timeout(Duration::from_secs(10), rejections.next())
            .await
            .expect("a rejection in time")
            .expect("open");
        let rejection: capstan_protocol::Rejection =
            codec::decode(Encoding::MsgPack, &rejection.payload).expect("decodes");
        assert_eq!(rejection.code, capstan_protocol::RejectionCode::Forged);
        assert_eq!(rejection.subject, call.subject(&evil));
    }
    let kv = jetstream::new(client.clone())
        .get_key_value("capstan_nodes")
        .await
        .expect("bucket");
    let stored: NodeRecord =
        serde_json::from_slice(&kv.get("exec-real").await.expect("read").expect("kept"))
            .expect("a node record");
    assert_eq!(
        (stored.instance, stored.status),
        (real.instance, NodeStatus::Up),
        "the impostor changed the real node"
    );
    assert!(kv.get("exec-evil").await.expect("read").is_none());
    registry.stop().await;
}

fn ended(node: &NodeId, status: capstan_protocol::JobStatus) -> capstan_protocol::JobEvent {
    use capstan_protocol::job::Outcome;
    use capstan_protocol::{JobEvent, JobEventKind, JobId, JobRecord, Timestamp};
    let now = Timestamp::now();
    let record = JobRecord::new(
        JobId::generate(),
        capstan_protocol::spec::JobSpec::shell("true"),
        now,
    )
    .assigned(node.clone(), now)
    .started(InstanceId::generate(), now)
    .finished(
        &Outcome {
            status,
            exit_code: Some(i32::from(status != capstan_protocol::JobStatus::Succeeded)),
            signal: None,
            error: None,
            output: Default::default(),
        },
        now,
    );
    JobEvent::new(
        JobEventKind::terminal(status).expect("a terminal status"),
        &record,
    )
}

/// The node's record as the registry stored it.
async fn stored(mesh: &capstan_mesh::Mesh, node: &NodeId) -> NodeRecord {
    mesh.nodes
        .get(node.as_str())
        .await
        .expect("reads")
        .expect("exists")
        .value
}

/// A `retrying` event of an attempt that ended `attempt`.
fn retried(node: &NodeId, attempt: capstan_protocol::JobStatus) -> capstan_protocol::JobEvent {
    use capstan_protocol::{JobEvent, JobEventKind, JobStatus};
    let mut record = ended(node, JobStatus::Failed).record;
    record.status = JobStatus::Retrying;
    record.attempt_status = Some(attempt);
    JobEvent::new(JobEventKind::Retrying, &record)
}

#[tokio::test]
async fn a_node_tally_counts_lost_attempts_from_events_and_finished_ones_from_heartbeats() {
    use capstan_protocol::{JobStatus, NodeTally};
    let server = NatsServer::start().await;
    let registry = start(&server, Duration::from_secs(10));
    let client = server.client().await;
    let mut rejections = client
        .subscribe(subjects::REJECTED_ALL)
        .await
        .expect("subscribes");
    let registered = registration("exec-t");
    let reply: Reply<NodeRecord> = request(
        &client,
        &NodeCall::Register.subject(&registered.node),
        &registered,
    )
    .await;
    let node = reply.into_result().expect("registered").id;

    let shutdown = CancellationToken::new();
    let nats = capstan_mesh::config::NatsArgs::for_url(server.url());
    let mesh = capstan_mesh::Mesh::connect(
        &nats,
        &capstan_protocol::access::Identity::Registry,
        &shutdown,
    )
    .await
    .expect("connects");
    // The node counts what its processes ran to an end: events of those are not the
    // registry's to count (a `retrying` after a failure neither).
    for event in [
        ended(&node, JobStatus::Succeeded),
        ended(&node, JobStatus::Failed),
        retried(&node, JobStatus::Failed),
    ] {
        mesh.events.job(&event).await.expect("published");
    }
    // Lost and quarantined attempts are, whoever ended them.
    for event in [
        ended(&node, JobStatus::Lost),
        ended(&node, JobStatus::Quarantined),
        retried(&node, JobStatus::Lost),
    ] {
        mesh.events.job(&event).await.expect("published");
    }
    // A malformed event on a tallied subject is rejected and does not stop the tally.
    let subject = format!(
        "capstan.events.jobs.{}.lost",
        capstan_protocol::JobId::generate()
    );
    mesh.js
        .publish(subject.clone(), "{\"kind\": 7".into())
        .await
        .expect("sent")
        .await
        .expect("stored");
    let last = ended(&node, JobStatus::Lost);
    mesh.events.job(&last).await.expect("published");

    let node_record = |total: u64| {
        let mesh = mesh.clone();
        let key = node.to_string();
        move || {
            let mesh = mesh.clone();
            let key = key.clone();
            async move {
                let record = mesh.nodes.get(&key).await.ok()??.value;
                (record.finished.total() == total).then_some(record)
            }
        }
    };
    let record = wait_until(
        "the tally to count four lost attempts",
        Duration::from_secs(20),
        node_record(4),
    )
    .await;
    assert_eq!(record.finished.lost, 4, "{:?}", record.finished);
    assert_eq!(
        (record.finished.succeeded, record.finished.failed),
        (0, 0),
        "the node's own endings are not counted from events"
    );
    assert_eq!(record.finished.last_job, Some(last.record.id));
    let rejected = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let message = rejections.next().await.expect("open");
            let payload: serde_json::Value =
                codec::decode(Encoding::MsgPack, &message.payload).expect("decodes");
            if payload["subject"] == subject {
                return payload;
            }
        }
    })
    .await
    .expect("the malformed event is rejected");
    assert_eq!(rejected["code"], "malformed");

    // The node's own count arrives with a heartbeat, in the heartbeat's write.
    let mut finished = NodeTally::default();
    let now = capstan_protocol::Timestamp::now();
    for status in [
        JobStatus::Succeeded,
        JobStatus::Succeeded,
        JobStatus::Failed,
        JobStatus::TimedOut,
        JobStatus::Cancelled,
    ] {
        finished.count(capstan_protocol::JobId::generate(), status, now);
    }
    let beat = Heartbeat {
        node: node.clone(),
        instance: registered.instance,
        jobs: vec![],
        queued: 0,
        finished,
    };
    let reply: Reply<HeartbeatReply> =
        request(&client, &NodeCall::Heartbeat.subject(&beat.node), &beat).await;
    assert_eq!(reply.into_result().expect("ok"), HeartbeatReply::Ok);
    let record = stored(&mesh, &node).await;
    assert_eq!(
        (
            record.finished.succeeded,
            record.finished.failed,
            record.finished.timed_out,
            record.finished.cancelled,
            record.finished.lost
        ),
        (2, 1, 1, 1, 4)
    );

    // A superseded instance's count is not added.
    let mut again = registration("exec-t");
    again.instance = InstanceId::generate();
    let reply: Reply<NodeRecord> =
        request(&client, &NodeCall::Register.subject(&again.node), &again).await;
    // A re-registration keeps the tally.
    assert_eq!(reply.into_result().expect("registered").finished.total(), 9);
    let reply: Reply<HeartbeatReply> =
        request(&client, &NodeCall::Heartbeat.subject(&beat.node), &beat).await;
    assert_eq!(reply.into_result().expect("ok"), HeartbeatReply::Superseded);
    let record = stored(&mesh, &node).await;
    assert_eq!(record.finished.total(), 9);

    // The last of a node's count comes with its deregistration.
    let mut last_count = NodeTally::default();
    let last_job = capstan_protocol::JobId::generate();
    last_count.count(
        last_job,
        JobStatus::Succeeded,
        capstan_protocol::Timestamp::now(),
    );
    let leaving = Heartbeat {
        node: node.clone(),
        instance: again.instance,
        jobs: vec![],
        queued: 0,
        finished: last_count,
    };
    let reply: Reply<NodeRecord> = request(
        &client,
        &NodeCall::Deregister.subject(&leaving.node),
        &leaving,
    )
    .await;
    let left = reply.into_result().expect("deregistered");
    assert_eq!(left.status, NodeStatus::Left);
    assert_eq!(left.finished.succeeded, 3);
    assert_eq!(left.finished.last_job, Some(last_job));
    shutdown.cancel();
    registry.stop().await;
}
