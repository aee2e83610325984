//! Schedules, with every service a separate process: a schedule ticking every second runs
//! exactly once per tick while schedulers are killed and started and the API restarts, losing
//! none of the ticks that fell while no scheduler ran; and the ticks that fall while the NATS
//! server itself is down become one run (`catchup: last`) or none (`catchup: none`).

use std::collections::BTreeSet;
use std::time::Duration;

use capstan_e2e::Cluster;
use capstan_protocol::schedule::{SCHEDULE_KEY, TICK_KEY};
use capstan_protocol::{JobId, Timestamp, topology};
use capstan_testkit::http::HttpClient;
use capstan_testkit::wait_until;
use serde_json::{Value, json};

/// Creates a schedule over REST; panics unless it is created.
async fn create(http: &HttpClient, body: Value) {
    let reply = http.post_json("/api/v1/schedules", &body.to_string()).await;
    assert_eq!(reply.status.as_u16(), 201, "{}", reply.text());
}

/// Pauses schedule `name`.
async fn pause(http: &HttpClient, name: &str) {
    let reply = http
        .post_json(&format!("/api/v1/schedules/{name}/pause"), "{}")
        .await;
    assert_eq!(reply.status.as_u16(), 200, "{}", reply.text());
}

/// The job ids the runs file holds, once each; panics if any job ran twice.
fn runs_once(cluster: &Cluster) -> Vec<JobId> {
    let runs = cluster.runs();
    let twice: Vec<_> = runs.iter().filter(|(_, count)| **count > 1).collect();
    assert!(twice.is_empty(), "jobs that ran more than once: {twice:?}");
    runs.keys()
        .map(|id| id.parse().expect("a job id"))
        .collect()
}

/// The ticks the runs of `jobs` were for, each run checked to belong to `schedule`.
async fn ticks_of(cluster: &mut Cluster, jobs: &[JobId], schedule: &str) -> Vec<Timestamp> {
    let records = cluster.wait_terminal(jobs, Duration::from_secs(60)).await;
    let mut ticks = Vec::new();
    for record in records {
        assert_eq!(record.status.as_str(), "succeeded", "{record:?}");
        let metadata = &record.spec.metadata;
        assert_eq!(
            metadata.get(SCHEDULE_KEY).map(String::as_str),
            Some(schedule)
        );
        let tick = metadata.get(TICK_KEY).expect("a run names its tick");
        ticks.push(Timestamp::parse_rfc3339(tick).expect("an RFC 3339 tick"));
    }
    ticks.sort();
    ticks
}

/// Waits until the runs file holds at least `n` runs.
async fn wait_runs(cluster: &Cluster, n: usize) {
    wait_until(&format!("{n} runs"), Duration::from_secs(120), || async {
        (cluster.runs().len() >= n).then_some(())
    })
    .await;
}

/// Fired ticks waiting in the schedulers' consumer (none is handling them).
async fn ticks_waiting(cluster: &Cluster) -> u64 {
    let js = async_nats::jetstream::new(cluster.client().await);
    let Ok(mut consumer) = js
        .get_consumer_from_stream::<async_nats::jetstream::consumer::pull::Config, _, _>(
            topology::TICKS_CONSUMER,
            topology::TIMERS.name,
        )
        .await
    else {
        return 0;
    };
    match consumer.info().await {
        Ok(info) => info.num_pending + info.num_ack_pending as u64,
        Err(_) => 0,
    }
}

#[tokio::test]
async fn a_schedule_ticking_every_second_runs_once_per_tick_and_loses_none_while_schedulers_and_the_api_restart()
 {
    let mut cluster = Cluster::start().await;
    cluster.registry("registry-1");
    cluster.scheduler("scheduler-1");
    cluster.scheduler("scheduler-2");
    cluster.executor("exec-1", 8, &[]);
    let base = cluster.api("api-1").await;
    cluster.wait_nodes_up(&["exec-1"]).await;
    let http = cluster.http(&base);
    create(
        &http,
        json!({
            "name": "every-second",
            "every": "1s",
            "overlap": "allow",
            "job": {"command": cluster.recording("true")},
        }),
    )
    .await;
    wait_runs(&cluster, 10).await;
    cluster.kill9("scheduler-1");
    wait_runs(&cluster, 20).await;
    // No scheduler at all: the armed tick fires on the server and waits for one, and the
    // ticks after it fall with no one to arm them.
    cluster.kill9("scheduler-2");
    let alone_at = Timestamp::now();
    let stopped = cluster.runs().len();
    wait_until(
        "a tick to fire with no scheduler, and three more to fall",
        Duration::from_secs(60),
        || async {
            (ticks_waiting(&cluster).await > 0
                && Timestamp::now().since(alone_at) >= Duration::from_secs(3))
            .then_some(())
        },
    )
    .await;
    cluster.scheduler("scheduler-3");
    wait_runs(&cluster, stopped + 5).await;
    cluster.kill9("api-1");
    let base = cluster.api("api-2").await;
    let http = cluster.http(&base);
    wait_runs(&cluster, 60).await;
    pause(&http, "every-second").await;
    // Every run the schedule submitted has run (none is still on its way to the file).
    let ran = wait_until(
        "every run submitted to have run",
        Duration::from_secs(60),
        || async {
            let view = http
                .try_get("/api/v1/schedules/every-second")
                .await
                .ok()?
                .json();
            let ran = view["counts"]["ran"].as_u64()?;
            (cluster.runs().len() as u64 == ran).then_some(ran)
        },
    )
    .await;

    let jobs = runs_once(&cluster);
    let ticks = ticks_of(&mut cluster, &jobs, "every-second").await;
    let distinct: BTreeSet<_> = ticks.iter().collect();
    assert_eq!(distinct.len(), ticks.len(), "a tick ran twice: {ticks:?}");
    for pair in ticks.windows(2) {
        assert_eq!(
            pair[1].as_millis() - pair[0].as_millis(),
            1000,
            "a tick was lost between {} and {}",
            pair[0].to_rfc3339(),
            pair[1].to_rfc3339()
        );
    }
    assert_eq!(ran, ticks.len() as u64);
    let view = http.get("/api/v1/schedules/every-second").await.json();
    assert_eq!(view["paused"], true, "{view}");
    assert_eq!(view["counts"]["skipped"].as_u64(), Some(0), "{view}");
}

#[tokio::test]
async fn ticks_that_fall_while_the_nats_server_is_down_run_once_with_catchup_last_and_not_at_all_with_none()
 {
    let mut cluster = Cluster::start().await;
    cluster.registry("registry-1");
    cluster.scheduler("scheduler-1");
    cluster.executor("exec-1", 8, &[]);
    let base = cluster.api("api-1").await;
    cluster.wait_nodes_up(&["exec-1"]).await;
    let http = cluster.http(&base);
    for (name, catchup) in [("catch-last", "last"), ("catch-none", "none")] {
        let command = format!("echo {name} >> {}", cluster.runs_file().display());
        create(
            &http,
            json!({
                "name": name,
                "every": "2s",
                "catchup": catchup,
                "job": {"command": command},
            }),
        )
        .await;
    }
    let count = |cluster: &Cluster, name: &str| cluster.runs().get(name).copied().unwrap_or(0);
    wait_until("both schedules to run", Duration::from_secs(60), || async {
        (count(&cluster, "catch-last") >= 2 && count(&cluster, "catch-none") >= 2).then_some(())
    })
    .await;

    cluster.kill_nats(0);
    let down_at = Timestamp::now();
    let before = (count(&cluster, "catch-last"), count(&cluster, "catch-none"));
    // Down for longer than the grace a late firing gets: several ticks fall meanwhile.
    wait_until(
        "the outage to last 20 s",
        Duration::from_secs(60),
        || async { (Timestamp::now().since(down_at) >= Duration::from_secs(20)).then_some(()) },
    )
    .await;
    cluster.restart_nats(0).await;

    let views = wait_until(
        "both schedules to handle the missed ticks",
        Duration::from_secs(120),
        || async {
            let last = http
                .try_get("/api/v1/schedules/catch-last")
                .await
                .ok()?
                .json();
            let none = http
                .try_get("/api/v1/schedules/catch-none")
                .await
                .ok()?
                .json();
            let handled = |view: &Value| {
                view["last"]["handled_at"]
                    .as_str()
                    .and_then(|at| Timestamp::parse_rfc3339(at).ok())
                    .is_some_and(|at| at > down_at.plus(Duration::from_secs(20)))
            };
            (handled(&last) && handled(&none)).then_some((last, none))
        },
    )
    .await;
    let (last, none) = views;
    assert!(none["counts"]["missed"].as_u64() >= Some(1), "{none}");
    assert_eq!(last["counts"]["missed"].as_u64(), Some(0), "{last}");
    // Until the schedules are back on their two-second beat, `last` ran once for the outage
    // and `none` not at all.
    // The run a handled tick submitted reaches the file once an executor has run it.
    let after = wait_until(
        "catch-last's run for the outage",
        Duration::from_secs(60),
        || async {
            let after = (count(&cluster, "catch-last"), count(&cluster, "catch-none"));
            (after.0 > before.0).then_some(after)
        },
    )
    .await;
    assert!(
        after.0 - before.0 <= after.1 - before.1 + 2,
        "catch-last ran more than once for the outage: {before:?} → {after:?}"
    );
}
