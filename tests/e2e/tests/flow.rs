//! Flow control, with every service a separate process: jobs sharing a concurrency key never
//! run more than its limit at once across executors and schedulers, as the jobs themselves
//! record it, and all of them finish; a waiting job says why it waits.

use std::time::Duration;

use capstan_e2e::Cluster;
use capstan_protocol::{JobId, JobStatus};
use capstan_testkit::http::HttpClient;
use capstan_testkit::wait_until;
use serde_json::json;

/// Submits `body` over REST and returns the job's id.
async fn submit(http: &HttpClient, body: serde_json::Value) -> JobId {
    let reply = http.post_json("/api/v1/jobs", &body.to_string()).await;
    assert_eq!(reply.status.as_u16(), 202, "{}", reply.text());
    reply.json()["id"]
        .as_str()
        .expect("an id")
        .parse()
        .expect("a job id")
}

/// The most jobs that ran at once, from the `start`/`end` lines the jobs wrote (nanoseconds of
/// the executors' shared clock).
fn most_at_once(log: &str) -> (usize, usize) {
    let mut edges = Vec::new();
    for line in log.lines() {
        let mut parts = line.split_whitespace();
        let (Some(kind), Some(at)) = (parts.next(), parts.next()) else {
            continue;
        };
        let at: u128 = at.parse().expect("a timestamp");
        match kind {
            // At the same instant an end sorts before a start.
            "start" => edges.push((at, 1i64)),
            "end" => edges.push((at, -1i64)),
            other => panic!("unexpected line {other}"),
        }
    }
    let starts = edges.iter().filter(|(_, step)| *step > 0).count();
    edges.sort();
    let (mut now, mut most) = (0i64, 0i64);
    for (_, step) in edges {
        now += step;
        most = most.max(now);
    }
    (most as usize, starts)
}

#[tokio::test]
async fn a_hundred_jobs_limited_to_three_at_once_never_run_more_than_three_under_two_schedulers_and_all_finish()
 {
    let mut cluster = Cluster::start().await;
    cluster.registry("registry-1");
    cluster.scheduler("scheduler-1");
    cluster.scheduler("scheduler-2");
    cluster.executor("exec-1", 4, &[]);
    cluster.executor("exec-2", 4, &[]);
    let base = cluster.api("api-1").await;
    cluster.wait_nodes_up(&["exec-1", "exec-2"]).await;
    capstan_e2e::faults::wait_create_answers(&cluster).await;
    let http = cluster.http(&base);
    let log = cluster.runs_file().with_file_name("limited.log");
    let command = format!(
        "echo start $(date +%s%N) >> {log}; sleep 0.1; echo end $(date +%s%N) >> {log}",
        log = log.display()
    );
    let mut jobs = Vec::new();
    for _ in 0..100 {
        let body = json!({"command": command, "concurrency": {"key": "shared-db", "limit": 3}});
        jobs.push(submit(&http, body).await);
    }

    // While most wait, a waiting job says why.
    let waiting = jobs[99];
    let reason = wait_until(
        "a waiting job's reason",
        Duration::from_secs(60),
        || async {
            let job = http.get(&format!("/api/v1/jobs/{waiting}")).await.json();
            let reason = job["waiting"].clone();
            (job["status"] == "pending" && reason.is_object()).then_some(reason)
        },
    )
    .await;
    assert_eq!(reason["concurrency_key"], "shared-db", "{reason}");
    assert_eq!(reason["limit"], 3, "{reason}");

    let records = cluster.wait_terminal(&jobs, Duration::from_secs(300)).await;
    for record in &records {
        assert_eq!(record.status, JobStatus::Succeeded, "{record:?}");
    }
    let (most, started) = most_at_once(&std::fs::read_to_string(&log).expect("the log"));
    assert_eq!(started, 100, "every job ran once");
    assert!(most <= 3, "{most} jobs sharing a limit of 3 ran at once");
    assert!(most >= 2, "the limit was used: at most {most} at once");
}
