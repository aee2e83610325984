//! The mesh layer against a real nats-server: topology (and its copies on a cluster of three),
//! compare-and-swap (and the read-decide-write loop over it), TTLs, idempotency and submission.

use std::time::Duration;

use async_nats::jetstream;
use capstan_mesh::lifecycle::{self, CancelError};
use capstan_mesh::store::MODIFY_ATTEMPTS;
use capstan_mesh::{Change, Claim, Error, Mesh, Modified, Submitter};
use capstan_protocol::topology;
use capstan_protocol::{
    JobEventKind, JobId, JobRecord, JobSpec, JobStatus, Timestamp, headers, subjects,
};
use capstan_testkit::{NatsServer, wait_until};
use futures::StreamExt;

async fn mesh(server: &NatsServer) -> Mesh {
    Mesh::open(server.client().await).await.expect("mesh opens")
}

#[tokio::test]
async fn racing_services_create_the_topology_once_and_agree_on_it() {
    let server = NatsServer::start().await;
    let (a, b) = tokio::join!(mesh(&server), mesh(&server));
    drop((a, b));
    let _again = mesh(&server).await;
    let js = jetstream::new(server.client().await);
    for spec in topology::STREAMS {
        let info = js
            .get_stream(spec.name)
            .await
            .expect("stream exists")
            .info()
            .await
            .expect("stream info")
            .clone();
        assert_eq!(info.config.subjects, spec.subjects);
    }
    for bucket in topology::BUCKETS {
        js.get_key_value(bucket.name).await.expect("bucket exists");
    }
}

/// Waits until every stream, bucket and shared consumer keeps `copies` copies (a consumer
/// follows its stream a moment after the stream changes).
async fn wait_copies(js: &jetstream::Context, copies: usize) {
    wait_until(
        &format!("every stream, bucket and consumer at {copies} copies"),
        Duration::from_secs(60),
        || async {
            let found = capstan_mesh::topology::replicas_of(js).await.ok()?;
            found.iter().all(|(_, n)| *n == copies).then_some(())
        },
    )
    .await;
}

#[tokio::test]
async fn a_lone_server_keeps_one_copy_of_each_stream_when_apply_is_told_no_count() {
    let server = NatsServer::start().await;
    let js = jetstream::new(server.client().await);
    let applied = capstan_mesh::topology::apply(&js, &Default::default())
        .await
        .expect("applied");
    assert_eq!(applied.replicas, topology::Replicas::ONE);
    assert_eq!(applied.servers, Some(1));
    wait_copies(&js, 1).await;
}

#[tokio::test]
async fn apply_keeps_three_copies_on_three_servers_raises_a_topology_of_one_and_services_verify_either()
 {
    use capstan_mesh::topology::{apply_with, verify};
    use topology::Replicas;
    let cluster = capstan_testkit::NatsCluster::start_with(Default::default(), 3).await;
    let js = jetstream::new(cluster.client().await);
    let limits = Default::default();

    let applied = apply_with(&js, &limits, Some(Replicas::ONE))
        .await
        .expect("applied with one copy");
    assert_eq!((applied.replicas, applied.servers), (Replicas::ONE, None));
    wait_copies(&js, 1).await;
    verify(&js).await.expect("a service verifies one copy");

    // Told no count, apply counts the servers that answer and raises every stream and bucket.
    let applied = apply_with(&js, &limits, None).await.expect("applied");
    assert_eq!(applied.replicas, Replicas::THREE);
    assert_eq!(applied.servers, Some(3));
    wait_copies(&js, 3).await;
    verify(&js).await.expect("a service verifies three copies");
    // With copies, a bucket is read from its leader (but the nodes, read from any copy).
    for bucket in topology::BUCKETS {
        let store = js.get_key_value(bucket.name).await.expect("the bucket");
        assert_eq!(
            store.stream.cached_info().config.allow_direct,
            !bucket.leader_reads(Replicas::THREE),
            "{}",
            bucket.name
        );
    }

    // Idempotent; and with a server down, the automatic count takes no copy away.
    apply_with(&js, &limits, None).await.expect("applied again");
    let mut cluster = cluster;
    cluster.kill(2);
    // Once the streams the killed server led have elected another leader.
    wait_until(
        "every stream to answer on two servers",
        Duration::from_secs(60),
        || async { capstan_mesh::topology::replicas_of(&js).await.ok() },
    )
    .await;
    let applied = apply_with(&js, &limits, None)
        .await
        .expect("applied with a server down");
    assert_eq!(applied.replicas, Replicas::THREE);
    assert_eq!(applied.servers, Some(2));
    let found = capstan_mesh::topology::replicas_of(&js)
        .await
        .expect("the copies");
    assert!(found.iter().all(|(_, n)| *n == 3), "{found:?}");
}

#[tokio::test]
async fn compare_and_swap_lets_exactly_one_of_two_writers_win() {
    let server = NatsServer::start().await;
    let mesh = mesh(&server).await;
    let record = JobRecord::new(JobId::generate(), JobSpec::shell("true"), Timestamp::now());
    let key = record.id.to_string();
    let revision = mesh.jobs.create(&key, &record).await.expect("created");
    assert!(matches!(
        mesh.jobs.create(&key, &record).await,
        Err(Error::AlreadyExists { .. })
    ));

    let node = "n1".parse().expect("valid node id");
    let first = record.assigned(node, Timestamp::now());
    let mut second = first.clone();
    second.error = Some("other writer".into());
    let (a, b) = tokio::join!(
        mesh.jobs.update(&key, &first, revision),
        mesh.jobs.update(&key, &second, revision)
    );
    let wins = [a.is_ok(), b.is_ok()];
    assert_eq!(wins.iter().filter(|won| **won).count(), 1, "{wins:?}");
    let loser = if a.is_ok() { b } else { a };
    assert!(matches!(loser, Err(Error::Conflict { .. })));
    let stored = mesh.jobs.get(&key).await.expect("read").expect("present");
    assert_eq!(stored.value.attempt, 1);
}

#[tokio::test]
async fn a_modify_that_lost_its_race_reads_again_and_decides_on_what_it_finds() {
    let server = NatsServer::start().await;
    let mesh = mesh(&server).await;
    let record = JobRecord::new(JobId::generate(), JobSpec::shell("true"), Timestamp::now());
    let key = record.id.to_string();

    // An absent key is created.
    let created = mesh
        .jobs
        .modify(&key, |current| {
            assert!(current.is_none());
            Change::<_, ()>::Write(record.clone())
        })
        .await
        .expect("created");
    let Modified::Written { written, previous } = created else {
        panic!("nothing written");
    };
    assert_eq!((written.value.clone(), previous), (record.clone(), None));

    // Another writer gets in after the copy this writer holds was read.
    let known = written.clone();
    let node = "n1".parse().expect("valid node id");
    let other = record.assigned(node, Timestamp::now());
    mesh.jobs
        .update(&key, &other, written.revision)
        .await
        .expect("the other writer wins");
    let mut seen = Vec::new();
    let modified = mesh
        .jobs
        .modify_from(&key, Some(known), |current| {
            let current = current.expect("present");
            seen.push(current.value.attempt);
            let mut next = current.value.clone();
            next.error = Some("decided on what was read".into());
            Change::<_, ()>::Write(next)
        })
        .await
        .expect("written on the second decision");
    assert_eq!(
        seen,
        [0, 1],
        "decided on the held copy, then on the record read"
    );
    let Modified::Written { written, previous } = modified else {
        panic!("nothing written");
    };
    assert_eq!(previous.map(|p| p.value), Some(other));
    let stored = mesh.jobs.get(&key).await.expect("read").expect("present");
    assert_eq!(stored, written);

    // A decision to stop writes nothing.
    let stopped = mesh
        .jobs
        .modify(&key, |current| Change::Stop(current.map(|c| c.revision)))
        .await
        .expect("read");
    assert_eq!(stopped, Modified::Stopped(Some(stored.revision)));
    assert_eq!(mesh.jobs.get(&key).await.expect("read"), Some(stored));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_changed_under_every_write_gives_up_as_kept_changing() {
    let server = NatsServer::start().await;
    let mesh = mesh(&server).await;
    let record = JobRecord::new(JobId::generate(), JobSpec::shell("true"), Timestamp::now());
    let key = record.id.to_string();
    mesh.jobs.create(&key, &record).await.expect("created");
    let runtime = tokio::runtime::Handle::current();
    let mut decisions = 0;
    let modified = mesh
        .jobs
        .modify(&key, |current| {
            decisions += 1;
            let current = current.expect("present");
            // Another writer changes the key between this read and this write, every time.
            tokio::task::block_in_place(|| runtime.block_on(mesh.jobs.put(&key, &current.value)))
                .expect("the other writer wins");
            Change::<_, ()>::Write(current.value.clone())
        })
        .await;
    assert!(
        matches!(&modified, Err(Error::KeptChanging { key: k }) if *k == key),
        "{modified:?}"
    );
    assert_eq!(decisions, MODIFY_ATTEMPTS);
}

#[tokio::test]
async fn finished_records_written_with_a_ttl_expire() {
    let server = NatsServer::start().await;
    let mesh = mesh(&server).await;
    let record = JobRecord::new(JobId::generate(), JobSpec::shell("true"), Timestamp::now());
    let key = record.id.to_string();
    let revision = mesh.jobs.create(&key, &record).await.expect("created");
    mesh.jobs
        .update_with_ttl(&key, &record, revision, Duration::from_secs(1))
        .await
        .expect("updated with a TTL");
    assert!(matches!(
        mesh.jobs
            .update_with_ttl(&key, &record, revision, Duration::from_secs(1))
            .await,
        Err(Error::Conflict { .. })
    ));
    wait_until("the record to expire", Duration::from_secs(15), || async {
        mesh.jobs
            .get(&key)
            .await
            .expect("read")
            .is_none()
            .then_some(())
    })
    .await;
}

#[tokio::test]
async fn racing_claims_of_one_idempotency_key_have_one_winner() {
    let server = NatsServer::start().await;
    let mesh = mesh(&server).await;
    let (a, b) = (JobId::generate(), JobId::generate());
    let (claim_a, claim_b) = tokio::join!(
        mesh.idempotency.claim("order-7", a),
        mesh.idempotency.claim("order-7", b)
    );
    let (claim_a, claim_b) = (claim_a.expect("claims"), claim_b.expect("claims"));
    match (claim_a, claim_b) {
        (Claim::Claimed, Claim::Existing(winner)) => assert_eq!(winner, a),
        (Claim::Existing(winner), Claim::Claimed) => assert_eq!(winner, b),
        other => panic!("expected one winner, got {other:?}"),
    }
    let winner = mesh.idempotency.lookup("order-7").await.expect("lookup");
    assert!(winner == Some(a) || winner == Some(b));
    // The winner claiming again (a redelivery) still succeeds.
    let winner = winner.expect("claimed");
    assert_eq!(
        mesh.idempotency
            .claim("order-7", winner)
            .await
            .expect("claims"),
        Claim::Claimed
    );
}

#[tokio::test]
async fn a_submission_is_stored_with_its_job_id_and_a_repeated_key_returns_the_same_job() {
    let server = NatsServer::start().await;
    let mesh = mesh(&server).await;
    let submitter = Submitter::new(mesh.js.clone(), mesh.idempotency.clone());
    let mut spec = JobSpec::shell("echo hi");
    spec.idempotency_key = Some("nightly-2026-11-23".into());
    let first = submitter.submit(&spec).await.expect("submitted");
    assert!(!first.duplicate);
    let again = submitter.submit(&spec).await.expect("submitted");
    assert_eq!((again.id, again.duplicate), (first.id, true));

    let stream = mesh
        .js
        .get_stream(topology::SUBMISSIONS.name)
        .await
        .expect("stream");
    let consumer = stream
        .create_consumer(jetstream::consumer::pull::Config::default())
        .await
        .expect("consumer");
    let mut messages = consumer
        .fetch()
        .max_messages(10)
        .messages()
        .await
        .expect("fetch");
    let message = messages.next().await.expect("one message").expect("ok");
    assert_eq!(message.subject.as_str(), subjects::submit_job(first.id));
    let id = message
        .headers
        .as_ref()
        .and_then(|h| h.get(headers::JOB_ID))
        .map(|v| v.to_string());
    assert_eq!(id, Some(first.id.to_string()));
    assert!(
        messages.next().await.is_none(),
        "the duplicate stored nothing"
    );
}

#[tokio::test]
async fn a_cancel_stored_without_its_announcement_is_announced_when_asked_again() {
    let server = NatsServer::start().await;
    let mesh = mesh(&server).await;
    let record = JobRecord::new(JobId::generate(), JobSpec::shell("true"), Timestamp::now());
    let key = record.id.to_string();
    let revision = mesh.jobs.create(&key, &record).await.expect("created");
    // The first cancel's write was stored, then NATS went away: no reply, no event.
    lifecycle::write(&mesh, &record.cancelled(Timestamp::now()), revision)
        .await
        .expect("cancelled");
    let again = lifecycle::cancel(&mesh, record.id).await;
    assert!(
        matches!(
            again,
            Err(CancelError::Finished {
                status: JobStatus::Cancelled,
                ..
            })
        ),
        "{again:?}"
    );
    // Asked once more: the stream still holds one announcement.
    let _ = lifecycle::cancel(&mesh, record.id).await;
    let subject = subjects::job_event(record.id, JobEventKind::Cancelled);
    assert_eq!(
        events_on(&mesh, &subject).await,
        1,
        "announcements of the cancel on {subject}"
    );
}

/// The events stored on `subject`, counted.
async fn events_on(mesh: &Mesh, subject: &str) -> usize {
    let stream = mesh
        .js
        .get_stream(topology::EVENTS.name)
        .await
        .expect("events stream");
    let consumer = stream
        .create_consumer(jetstream::consumer::pull::Config {
            filter_subject: subject.to_owned(),
            ..Default::default()
        })
        .await
        .expect("consumer");
    let mut batch = consumer
        .fetch()
        .max_messages(10)
        .expires(Duration::from_secs(1))
        .messages()
        .await
        .expect("fetch");
    let mut found = 0;
    while let Some(Ok(_)) = batch.next().await {
        found += 1;
    }
    found
}

#[tokio::test]
async fn a_job_cancelled_before_anything_created_its_record_is_created_cancelled_from_its_submission()
 {
    let server = NatsServer::start().await;
    let mesh = mesh(&server).await;
    let submitter = Submitter::new(mesh.js.clone(), mesh.idempotency.clone());
    // Stored, and nothing takes it: no scheduler, no executor.
    let created = submitter
        .submit(&JobSpec::shell("sleep 60"))
        .await
        .expect("submitted");
    assert!(
        mesh.jobs
            .get(&created.id.to_string())
            .await
            .expect("read")
            .is_none()
    );

    let (outcome, record) = lifecycle::cancel(&mesh, created.id)
        .await
        .expect("a job accepted but not created is cancelled");
    assert_eq!(outcome, capstan_protocol::CancelOutcome::Cancelled);
    assert_eq!(record.status, JobStatus::Cancelled);
    let stored = mesh
        .jobs
        .get(&created.id.to_string())
        .await
        .expect("read")
        .expect("the record is created");
    assert_eq!(stored.value.status, JobStatus::Cancelled);
    assert_eq!(stored.value.spec, JobSpec::shell("sleep 60"));
    assert!(
        stored.value.submission_seq.is_some(),
        "it names its submission, so whoever takes the submission finds this job"
    );
    assert_eq!(
        events_on(
            &mesh,
            &subjects::job_event(created.id, JobEventKind::Cancelled)
        )
        .await,
        1
    );
    // Asked again, it is a job that has finished.
    assert!(matches!(
        lifecycle::cancel(&mesh, created.id).await,
        Err(CancelError::Finished {
            status: JobStatus::Cancelled,
            ..
        })
    ));
}

#[tokio::test]
async fn a_cancel_finds_no_job_for_an_unknown_id_nor_for_a_submission_that_repeats_another_jobs_key()
 {
    let server = NatsServer::start().await;
    let mesh = mesh(&server).await;
    assert!(matches!(
        lifecycle::cancel(&mesh, JobId::generate()).await,
        Err(CancelError::NotFound(_))
    ));
    // A submission under an idempotency key another job holds is that job's repeat, which a
    // scheduler refuses: it is no job of its own to cancel, and the key keeps its job.
    let mut spec = JobSpec::shell("true");
    spec.idempotency_key = Some("nightly-2026-12-05".into());
    let holder = JobId::generate();
    assert_eq!(
        mesh.idempotency
            .claim("nightly-2026-12-05", holder)
            .await
            .expect("claimed"),
        Claim::Claimed
    );
    let repeat = JobId::generate();
    let mut map = async_nats::HeaderMap::new();
    map.insert(headers::JOB_ID, repeat.to_string().as_str());
    mesh.js
        .publish_with_headers(
            subjects::submit_job(repeat),
            map,
            serde_json::to_vec(&spec).expect("json").into(),
        )
        .await
        .expect("published")
        .await
        .expect("stored");
    assert!(matches!(
        lifecycle::cancel(&mesh, repeat).await,
        Err(CancelError::NotFound(_))
    ));
    assert!(
        mesh.jobs
            .get(&repeat.to_string())
            .await
            .expect("read")
            .is_none()
    );
    assert_eq!(
        mesh.idempotency
            .lookup("nightly-2026-12-05")
            .await
            .expect("read"),
        Some(holder)
    );
}
