//! Schedules in the scheduler, against a real nats-server: ticks armed on the server become
//! runs, once per tick even with two replicas handling them, each labelled with its schedule
//! and tick; `overlap` decides what a tick does while the previous run goes on; a malformed
//! tick is rejected and the next one still runs. Schedules are written to their bucket
//! directly, as the API writes them; no executor runs, so a run stays `pending` until the test
//! ends it as an executor would.

use std::collections::BTreeSet;
use std::time::Duration;

use capstan_mesh::Mesh;
use capstan_protocol::schedule::{
    Catchup, Overlap, SCHEDULE_KEY, ScheduleDefinition, ScheduleRecord, TICK_KEY,
};
use capstan_protocol::{
    AuthMethod, JobEvent, JobEventKind, JobRecord, JobStatus, SubmittedBy, Timestamp, codec,
    subjects,
};
use capstan_testkit::{NatsServer, wait_until};
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

async fn mesh(server: &NatsServer) -> Mesh {
    Mesh::open(server.client().await).await.expect("mesh")
}

fn start_scheduler(server: &NatsServer, shutdown: &CancellationToken) {
    tokio::spawn(capstan_scheduler::run(
        capstan_scheduler::Config::for_url(server.url()),
        shutdown.clone(),
    ));
}

/// Stores schedule `name` ticking every second from now, and arms its first tick, as the API
/// does.
async fn schedule(mesh: &Mesh, name: &str, overlap: Overlap) -> ScheduleRecord {
    let job = codec::decode_spec(codec::Encoding::Json, br#"{"argv": ["/bin/true"]}"#)
        .expect("a valid job");
    let now = Timestamp::now();
    let record = ScheduleRecord::new(
        name.to_owned(),
        ScheduleDefinition {
            cron: None,
            every: Some("1s".to_owned()),
            timezone: "UTC".to_owned(),
            overlap,
            catchup: Catchup::Last,
            paused: false,
        },
        job,
        SubmittedBy {
            principal: "alice".to_owned(),
            via: AuthMethod::Password,
            token: None,
        },
        now,
    );
    mesh.schedules
        .create(name, &record)
        .await
        .expect("schedule stored");
    let tick = record.armed(now).expect("a tick to arm");
    capstan_mesh::schedules::arm(mesh, &tick)
        .await
        .expect("tick armed");
    record
}

/// The runs of schedule `name` so far.
async fn runs(mesh: &Mesh, name: &str) -> Vec<JobRecord> {
    let records = mesh.jobs.values().await.expect("jobs listed");
    records
        .into_iter()
        .map(|versioned| versioned.value)
        .filter(|record| record.spec.metadata.get(SCHEDULE_KEY).map(String::as_str) == Some(name))
        .collect()
}

async fn stored(mesh: &Mesh, name: &str) -> ScheduleRecord {
    mesh.schedules
        .get(name)
        .await
        .expect("readable")
        .expect("the schedule exists")
        .value
}

#[tokio::test]
async fn two_schedulers_run_each_tick_once_labelled_with_its_schedule_and_tick() {
    let server = NatsServer::start().await;
    let mesh = mesh(&server).await;
    let shutdown = CancellationToken::new();
    start_scheduler(&server, &shutdown);
    start_scheduler(&server, &shutdown);
    schedule(&mesh, "twice-served", Overlap::Allow).await;

    let runs = wait_until("five runs", Duration::from_secs(60), || async {
        let runs = runs(&mesh, "twice-served").await;
        (runs.len() >= 5).then_some(runs)
    })
    .await;
    let ticks: Vec<Timestamp> = runs
        .iter()
        .map(|run| {
            let tick = run.spec.metadata.get(TICK_KEY).expect("a tick");
            Timestamp::parse_rfc3339(tick).expect("RFC 3339")
        })
        .collect();
    let distinct: BTreeSet<_> = ticks.iter().collect();
    assert_eq!(distinct.len(), ticks.len(), "a tick ran twice: {ticks:?}");
    let sorted: Vec<_> = distinct.into_iter().collect();
    for pair in sorted.windows(2) {
        assert_eq!(
            pair[1].as_millis() - pair[0].as_millis(),
            1000,
            "{sorted:?}"
        );
    }
    for run in &runs {
        assert_eq!(
            run.submitted_by.as_ref().map(|by| by.principal.as_str()),
            Some("alice")
        );
    }
    let record = stored(&mesh, "twice-served").await;
    assert!(record.counts.ran >= 5, "{record:?}");
    assert!(record.next > record.last.as_ref().map(|last| last.at));
    shutdown.cancel();
}

#[tokio::test]
async fn with_overlap_skip_ticks_while_the_previous_run_goes_on_are_skipped_and_counted() {
    let server = NatsServer::start().await;
    let mesh = mesh(&server).await;
    let shutdown = CancellationToken::new();
    start_scheduler(&server, &shutdown);
    schedule(&mesh, "one-at-a-time", Overlap::Skip).await;

    // No executor: the first run stays pending, and every later tick is skipped.
    let record = wait_until("two skipped ticks", Duration::from_secs(60), || async {
        let record = stored(&mesh, "one-at-a-time").await;
        (record.counts.skipped >= 2).then_some(record)
    })
    .await;
    assert_eq!(record.counts.ran, 1, "{record:?}");
    assert_eq!(runs(&mesh, "one-at-a-time").await.len(), 1);
    shutdown.cancel();
}

#[tokio::test]
async fn with_overlap_queue_one_tick_waits_and_runs_when_the_previous_run_ends() {
    let server = NatsServer::start().await;
    let mesh = mesh(&server).await;
    let shutdown = CancellationToken::new();
    start_scheduler(&server, &shutdown);
    schedule(&mesh, "queued", Overlap::Queue).await;

    let record = wait_until(
        "a queued tick and a skipped one",
        Duration::from_secs(60),
        || async {
            let record = stored(&mesh, "queued").await;
            (record.queued.is_some() && record.counts.skipped >= 1).then_some(record)
        },
    )
    .await;
    assert_eq!(record.counts.ran, 1, "{record:?}");
    let first = runs(&mesh, "queued").await.pop().expect("the first run");
    let queued_tick = record.queued.expect("queued");

    let mut ended = first.clone();
    ended.status = JobStatus::Succeeded;
    ended.finished_at = Some(Timestamp::now());
    let current = mesh
        .jobs
        .get(&first.id.to_string())
        .await
        .expect("readable")
        .expect("the run's record");
    mesh.jobs
        .update(&first.id.to_string(), &ended, current.revision)
        .await
        .expect("the end written");
    mesh.events
        .job(&JobEvent::new(JobEventKind::Succeeded, &ended))
        .await
        .expect("the end published");

    let second = wait_until("the queued run", Duration::from_secs(30), || async {
        let runs = runs(&mesh, "queued").await;
        runs.into_iter().find(|run| run.id != first.id)
    })
    .await;
    assert_eq!(
        second.spec.metadata.get(TICK_KEY).map(String::as_str),
        Some(queued_tick.to_rfc3339().as_str())
    );
    let record = stored(&mesh, "queued").await;
    assert_eq!(record.last_job, Some(second.id));
    shutdown.cancel();
}

#[tokio::test]
async fn a_malformed_tick_is_rejected_and_the_schedule_still_runs() {
    let server = NatsServer::start().await;
    let mesh = mesh(&server).await;
    let client = server.client().await;
    let mut rejections = client
        .subscribe(subjects::rejected(subjects::Origin::Timer))
        .await
        .expect("subscribed");
    let shutdown = CancellationToken::new();
    start_scheduler(&server, &shutdown);
    mesh.js
        .publish(subjects::schedule_tick("broken"), "{not json".into())
        .await
        .expect("published")
        .await
        .expect("stored");
    let rejection = tokio::time::timeout(Duration::from_secs(30), rejections.next())
        .await
        .expect("a rejection in time")
        .expect("a message");
    assert!(
        String::from_utf8_lossy(&rejection.payload).contains("broken")
            || rejection.subject.as_str().ends_with("timer"),
        "{rejection:?}"
    );
    schedule(&mesh, "after-the-bad-one", Overlap::Allow).await;
    wait_until(
        "a run after the malformed tick",
        Duration::from_secs(30),
        || async { (!runs(&mesh, "after-the-bad-one").await.is_empty()).then_some(()) },
    )
    .await;
    shutdown.cancel();
}
