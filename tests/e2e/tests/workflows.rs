//! Workflows, with every service a separate process: a diamond runs its middle in parallel and
//! its join after both, handing each step's exit code and output to the steps after it; a
//! failing step skips what needs its success and runs what waits for its failure, and with
//! `fail_fast` cancels the steps still running; a cancelled workflow cancels its running step
//! and runs only its `always` steps; and a workflow whose every scheduler is killed with kill -9
//! mid-step is finished by a scheduler started afterwards, each step run exactly once.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use capstan_e2e::Cluster;
use capstan_protocol::codec;
use capstan_protocol::workflow::{STEP_KEY, WORKFLOW_KEY, WorkflowEvent};
use capstan_protocol::{Encoding, Timestamp, topology};
use capstan_testkit::http::HttpClient;
use capstan_testkit::wait_until;
use serde_json::{Value, json};

/// How long a workflow of short steps may take to end, on a loaded machine.
const ENDS_WITHIN: Duration = Duration::from_secs(120);

/// A cluster of `schedulers` schedulers and an executor of four slots, ready to take jobs, and
/// a client of its API logged in as the administrator.
async fn cluster_with(schedulers: usize) -> (Cluster, HttpClient) {
    let mut cluster = Cluster::start().await;
    cluster.registry("registry-1");
    for n in 1..=schedulers {
        cluster.scheduler(&format!("scheduler-{n}"));
    }
    cluster.executor("exec-1", 4, &[]);
    let base = cluster.api("api-1").await;
    cluster.wait_nodes_up(&["exec-1"]).await;
    capstan_e2e::faults::wait_create_answers(&cluster).await;
    let http = cluster.http(&base);
    (cluster, http)
}

/// A step running the shell `command` once `depends_on` ended as `when` asks.
fn step(name: &str, command: &str, depends_on: &[&str], when: &str) -> Value {
    json!({
        "name": name,
        "job": {"command": command},
        "depends_on": depends_on,
        "when": when,
    })
}

/// Creates a workflow over REST and returns its id; panics unless it is created, with its
/// URL in `Location` and the view of what was asked.
async fn create(http: &HttpClient, body: &Value) -> String {
    let reply = http.post_json("/api/v1/workflows", &body.to_string()).await;
    assert_eq!(reply.status.as_u16(), 201, "{}", reply.text());
    let view = reply.json();
    let id = view["id"].as_str().expect("an id").to_owned();
    let location = reply
        .headers
        .get("location")
        .and_then(|l| l.to_str().ok())
        .unwrap_or_default();
    assert!(
        location.ends_with(&format!("/api/v1/workflows/{id}")),
        "Location {location:?} for {id}"
    );
    assert_eq!(view["name"], body["name"], "{view}");
    assert_eq!(view["fail_fast"], body["fail_fast"], "{view}");
    assert_eq!(view["owner"], "admin", "{view}");
    let asked: Vec<&Value> = body["steps"]
        .as_array()
        .expect("steps")
        .iter()
        .map(|s| &s["name"])
        .collect();
    let shown: Vec<&Value> = view["steps"]
        .as_array()
        .expect("steps")
        .iter()
        .map(|s| &s["name"])
        .collect();
    assert_eq!(shown, asked, "the steps in the order given: {view}");
    id
}

/// The workflow `id` as the API shows it now.
async fn view(http: &HttpClient, id: &str) -> Value {
    let reply = http.get(&format!("/api/v1/workflows/{id}")).await;
    assert_eq!(reply.status.as_u16(), 200, "{}", reply.text());
    reply.json()
}

/// Prints the last view it was given if the test fails while it lives: what a workflow that
/// never ended looked like.
struct LastSeen(Mutex<Option<Value>>);

impl Drop for LastSeen {
    fn drop(&mut self) {
        if std::thread::panicking()
            && let Some(view) = self.0.lock().ok().and_then(|v| v.clone())
        {
            eprintln!("==== the workflow as last seen ====\n{view:#}");
        }
    }
}

/// Waits until the workflow `id` satisfies `done`, and returns its view.
async fn wait_view(
    http: &HttpClient,
    id: &str,
    what: &str,
    timeout: Duration,
    done: impl Fn(&Value) -> bool,
) -> Value {
    let last = LastSeen(Mutex::new(None));
    wait_until(what, timeout, || async {
        let view = http
            .try_get(&format!("/api/v1/workflows/{id}"))
            .await
            .ok()
            .filter(|reply| reply.status.is_success())?
            .json();
        *last.0.lock().expect("not poisoned") = Some(view.clone());
        done(&view).then_some(view)
    })
    .await
}

/// Waits until the workflow `id` has ended, and returns its view.
async fn wait_ended(http: &HttpClient, id: &str) -> Value {
    let view = wait_view(http, id, "the workflow to end", ENDS_WITHIN, |view| {
        view["status"] != "running"
    })
    .await;
    assert!(view["finished_at"].is_string(), "{view}");
    for step in view["steps"].as_array().expect("steps") {
        assert!(
            !matches!(step["status"].as_str(), Some("waiting" | "running")),
            "an ended workflow has a step that did not end: {view:#}"
        );
    }
    view
}

/// Step `name` of `view`.
fn step_of<'a>(view: &'a Value, name: &str) -> &'a Value {
    view["steps"]
        .as_array()
        .expect("steps")
        .iter()
        .find(|s| s["name"] == name)
        .unwrap_or_else(|| panic!("no step {name} in {view:#}"))
}

/// The job of step `name`, as `GET /api/v1/jobs/{id}` shows it; checks that it names its
/// workflow and step.
async fn job_of(http: &HttpClient, view: &Value, name: &str) -> Value {
    let step = step_of(view, name);
    let job = step["job"]
        .as_str()
        .unwrap_or_else(|| panic!("step {name} has no job: {step}"));
    let reply = http.get(&format!("/api/v1/jobs/{job}")).await;
    assert_eq!(reply.status.as_u16(), 200, "{}", reply.text());
    let record = reply.json();
    let metadata = &record["spec"]["metadata"];
    assert_eq!(metadata[WORKFLOW_KEY], view["id"], "{record}");
    assert_eq!(metadata[STEP_KEY], name, "{record}");
    record
}

/// Checks that step `name` of `view` ran and ended `status`, and that its job says the same.
async fn assert_ran(http: &HttpClient, view: &Value, name: &str, status: &str) -> Value {
    let step = step_of(view, name);
    assert_eq!(step["status"], status, "step {name}: {view:#}");
    assert!(step["started_at"].is_string(), "step {name}: {step}");
    assert!(step["ended_at"].is_string(), "step {name}: {step}");
    let job = job_of(http, view, name).await;
    assert_eq!(job["status"], status, "step {name}'s job: {job}");
    job
}

/// Checks that step `name` of `view` was skipped: it has no job.
fn assert_skipped(view: &Value, name: &str) {
    let step = step_of(view, name);
    assert_eq!(step["status"], "skipped", "step {name}: {view:#}");
    assert!(step["job"].is_null(), "a skipped step ran a job: {step}");
    assert!(
        step["ended_at"].is_string(),
        "a skipped step says when: {step}"
    );
}

/// The time `field` of `step`, in milliseconds.
fn millis(step: &Value, field: &str) -> i64 {
    let text = step[field]
        .as_str()
        .unwrap_or_else(|| panic!("no {field}: {step}"));
    Timestamp::parse_rfc3339(text)
        .expect("an RFC 3339 time")
        .as_millis()
}

/// The lines of `file`, none if it does not exist.
fn lines(file: &Path) -> Vec<String> {
    std::fs::read_to_string(file)
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

/// Every event of workflow `id` stored so far, in order, with its subject.
async fn events_of(cluster: &Cluster, id: &str) -> Vec<(String, WorkflowEvent)> {
    let js = jetstream::new(cluster.client().await);
    let stream = js
        .get_stream(topology::EVENTS.name)
        .await
        .expect("the events stream");
    let mut events = Vec::new();
    let mut next = 1;
    loop {
        let stored = stream
            .raw_message_builder()
            .sequence(next)
            .next_by_subject(format!("capstan.events.workflows.{id}.>"))
            .send()
            .await;
        let Ok(stored) = stored else { break };
        next = stored.sequence + 1;
        let event: WorkflowEvent =
            codec::decode(Encoding::MsgPack, &stored.payload).expect("a workflow event");
        events.push((stored.subject.to_string(), event));
    }
    events
}

#[tokio::test]
async fn a_diamond_runs_its_two_tests_in_parallel_and_deploys_after_both_with_the_builds_exit_code_and_output_passed_on()
 {
    let (cluster, http) = cluster_with(1).await;
    let timeline = cluster.dir().join("timeline.log");
    let saw = cluster.dir().join("test-a-saw.txt");
    let output = cluster.dir().join("test-a-output.txt");
    let test = |name: &str, extra: &str| {
        format!(
            "echo start {name} $(date +%s%N) >> {t}; {extra} sleep 2; echo end {name} $(date +%s%N) >> {t}",
            t = timeline.display()
        )
    };
    let test_a = test(
        "test-a",
        &format!(
            "printf '%s %s\\n' \"$CAPSTAN_STEP_BUILD_STATUS\" \"$CAPSTAN_STEP_BUILD_EXIT_CODE\" > {}; \
             printf '%s' \"$CAPSTAN_STEP_BUILD_OUTPUT\" > {};",
            saw.display(),
            output.display()
        ),
    );
    let test_b = test("test-b", "");
    let deploy = format!(
        "echo deploy $(date +%s%N) $CAPSTAN_STEP_TEST_A_STATUS $CAPSTAN_STEP_TEST_B_STATUS \
         ${{CAPSTAN_STEP_BUILD_STATUS:-unset}} >> {}",
        timeline.display()
    );
    let body = json!({
        "name": "release",
        "steps": [
            step("build", "echo building; echo version=1.2.3", &[], "on_success"),
            step("test-a", &test_a, &["build"], "on_success"),
            step("test-b", &test_b, &["build"], "on_success"),
            step("deploy", &deploy, &["test-a", "test-b"], "on_success"),
        ],
        "fail_fast": false,
    });
    let id = create(&http, &body).await;

    let view = wait_ended(&http, &id).await;
    assert_eq!(view["status"], "succeeded", "{view:#}");
    assert!(view["cancel_requested_at"].is_null(), "{view}");
    let mut jobs = Vec::new();
    for name in ["build", "test-a", "test-b", "deploy"] {
        let job = assert_ran(&http, &view, name, "succeeded").await;
        assert_eq!(step_of(&view, name)["exit_code"], 0, "{view:#}");
        assert_eq!(job["exit_code"], 0, "{job}");
        jobs.push(job["id"].as_str().expect("a job id").to_owned());
    }
    jobs.sort();
    jobs.dedup();
    assert_eq!(jobs.len(), 4, "each step ran a job of its own: {jobs:?}");

    // The two tests overlapped; deploy started after both had ended.
    let mut at: BTreeMap<(String, String), u128> = BTreeMap::new();
    let mut deployed = None;
    for line in lines(&timeline) {
        let parts: Vec<&str> = line.split_whitespace().collect();
        match parts.as_slice() {
            [kind @ ("start" | "end"), name, ns] => {
                let ns = ns.parse().expect("nanoseconds");
                let before = at.insert(((*kind).to_owned(), (*name).to_owned()), ns);
                assert!(before.is_none(), "{name} ran twice: {line}");
            }
            ["deploy", ns, rest @ ..] => {
                assert!(deployed.is_none(), "deploy ran twice");
                deployed = Some((ns.parse::<u128>().expect("nanoseconds"), rest.join(" ")));
            }
            _ => panic!("unexpected line {line:?}"),
        }
    }
    let edge = |kind: &str, name: &str| {
        at.get(&(kind.to_owned(), name.to_owned()))
            .copied()
            .unwrap_or_else(|| panic!("no {kind} of {name}: {at:?}"))
    };
    let (start_a, end_a) = (edge("start", "test-a"), edge("end", "test-a"));
    let (start_b, end_b) = (edge("start", "test-b"), edge("end", "test-b"));
    assert!(
        start_a < end_b && start_b < end_a,
        "test-a ({start_a}..{end_a}) and test-b ({start_b}..{end_b}) did not overlap"
    );
    let (deployed_at, deploy_saw) = deployed.expect("deploy ran");
    assert!(
        deployed_at > end_a && deployed_at > end_b,
        "deploy started at {deployed_at}, before a test ended ({end_a}, {end_b})"
    );
    assert_eq!(
        deploy_saw, "succeeded succeeded unset",
        "deploy sees how both tests ended, and nothing of build, which it does not depend on"
    );
    let (a, b, d) = (
        step_of(&view, "test-a"),
        step_of(&view, "test-b"),
        step_of(&view, "deploy"),
    );
    assert!(
        millis(d, "started_at") >= millis(a, "ended_at").max(millis(b, "ended_at")),
        "{view:#}"
    );

    // What build said reached test-a.
    assert_eq!(
        std::fs::read_to_string(&saw).expect("test-a wrote what it saw"),
        "succeeded 0\n"
    );
    let passed = std::fs::read_to_string(&output).expect("test-a wrote build's output");
    assert_eq!(passed.trim_end(), "building\nversion=1.2.3", "{passed:?}");

    // Announced: the workflow's start, each step's start and end, and its end last.
    let expected: Vec<String> = {
        let mut subjects = vec![format!("{id}.running"), format!("{id}.succeeded")];
        for name in ["build", "test-a", "test-b", "deploy"] {
            for status in ["running", "succeeded"] {
                subjects.push(format!("{id}.steps.{name}.{status}"));
            }
        }
        subjects.sort();
        subjects
    };
    let events = wait_until(
        "the workflow's events to be stored",
        Duration::from_secs(60),
        || async {
            let events = events_of(&cluster, &id).await;
            (events.len() >= expected.len()).then_some(events)
        },
    )
    .await;
    let mut subjects: Vec<String> = events
        .iter()
        .map(|(subject, _)| {
            subject
                .strip_prefix("capstan.events.workflows.")
                .expect("a workflow event subject")
                .to_owned()
        })
        .collect();
    assert_eq!(
        events[0].0,
        format!("capstan.events.workflows.{id}.running")
    );
    let (last, end) = events.last().expect("events");
    assert_eq!(*last, format!("capstan.events.workflows.{id}.succeeded"));
    assert!(end.step.is_none(), "{end:?}");
    subjects.sort();
    assert_eq!(subjects, expected, "each event once");
    for (subject, event) in &events {
        assert_eq!(event.workflow.to_string(), id, "{subject}: {event:?}");
        assert_eq!(event.name, "release", "{subject}: {event:?}");
        if let Some(step) = &event.step
            && subject.ends_with(".succeeded")
        {
            assert_eq!(step.exit_code, Some(0), "{subject}: {event:?}");
            assert_eq!(
                step.job.map(|j| j.to_string()).as_deref(),
                step_of(&view, &step.name)["job"].as_str(),
                "{subject}: {event:?}"
            );
        }
    }
}

#[tokio::test]
async fn without_fail_fast_a_failing_step_skips_what_needs_its_success_runs_its_on_failure_step_and_lets_the_other_branch_finish()
 {
    let (cluster, http) = cluster_with(1).await;
    let file = cluster.runs_file();
    let record = |line: &str| format!("echo {line} >> {}", file.display());
    let body = json!({
        "name": "partly-broken",
        "steps": [
            step("a", "exit 3", &[], "on_success"),
            step("b", "sleep 1", &[], "on_success"),
            step("after-b", &record("after-b"), &["b"], "on_success"),
            step("after-a", &record("after-a"), &["a"], "on_success"),
            step(
                "cleanup",
                &record("cleanup $CAPSTAN_STEP_A_STATUS $CAPSTAN_STEP_A_EXIT_CODE"),
                &["a"],
                "on_failure",
            ),
        ],
        "fail_fast": false,
    });
    let id = create(&http, &body).await;

    let view = wait_ended(&http, &id).await;
    assert_eq!(view["status"], "failed", "{view:#}");
    let a = assert_ran(&http, &view, "a", "failed").await;
    assert_eq!(step_of(&view, "a")["exit_code"], 3, "{view:#}");
    assert_eq!(a["exit_code"], 3, "{a}");
    assert_ran(&http, &view, "b", "succeeded").await;
    assert_ran(&http, &view, "after-b", "succeeded").await;
    assert_skipped(&view, "after-a");
    assert_ran(&http, &view, "cleanup", "succeeded").await;
    let mut ran = lines(&file);
    ran.sort();
    assert_eq!(ran, ["after-b", "cleanup failed 3"]);
}

#[tokio::test]
async fn with_fail_fast_a_failing_step_cancels_the_slow_one_skips_its_follower_and_still_runs_the_always_step()
 {
    let (cluster, http) = cluster_with(1).await;
    let file = cluster.runs_file();
    let record = |line: &str| format!("echo {line} >> {}", file.display());
    let body = json!({
        "name": "fail-fast",
        "steps": [
            step("quick-fail", "sleep 1; exit 1", &[], "on_success"),
            step(
                "slow",
                &format!("{}; sleep 60; {}", record("slow-started"), record("slow-ended")),
                &[],
                "on_success",
            ),
            step("after-slow", &record("after-slow"), &["slow"], "on_success"),
            step(
                "report",
                &record("report $CAPSTAN_STEP_QUICK_FAIL_STATUS $CAPSTAN_STEP_SLOW_STATUS"),
                &["quick-fail", "slow"],
                "always",
            ),
        ],
        "fail_fast": true,
    });
    let created = Instant::now();
    let id = create(&http, &body).await;

    let view = wait_ended(&http, &id).await;
    let took = created.elapsed();
    assert!(
        took < Duration::from_secs(30),
        "the workflow took {took:?}: the slow step was not stopped"
    );
    assert_eq!(view["status"], "failed", "{view:#}");
    assert_eq!(view["fail_fast"], true, "{view}");
    assert_ran(&http, &view, "quick-fail", "failed").await;
    assert_eq!(step_of(&view, "quick-fail")["exit_code"], 1, "{view:#}");
    assert_ran(&http, &view, "slow", "cancelled").await;
    assert_skipped(&view, "after-slow");
    assert_ran(&http, &view, "report", "succeeded").await;
    let ran = lines(&file);
    assert!(
        ran.contains(&"report failed cancelled".to_owned()),
        "the always step saw how both ended: {ran:?}"
    );
    assert!(
        !ran.iter().any(|l| l == "slow-ended" || l == "after-slow"),
        "{ran:?}"
    );
}

#[tokio::test]
async fn cancelling_a_workflow_cancels_its_running_step_skips_the_waiting_ones_and_runs_only_its_always_step()
 {
    let (cluster, http) = cluster_with(1).await;
    let file = cluster.runs_file();
    let record = |line: &str| format!("echo {line} >> {}", file.display());
    let body = json!({
        "name": "to-cancel",
        "steps": [
            step("long", &format!("{}; sleep 60", record("long-started")), &[], "on_success"),
            step("after-long", &record("after-long"), &["long"], "on_success"),
            step("on-failure", &record("on-failure"), &["long"], "on_failure"),
            step(
                "finally",
                &record("finally $CAPSTAN_STEP_LONG_STATUS"),
                &["long"],
                "always",
            ),
        ],
        "fail_fast": false,
    });
    let id = create(&http, &body).await;
    wait_until(
        "the long step to be running",
        Duration::from_secs(60),
        || async {
            lines(&file)
                .contains(&"long-started".to_owned())
                .then_some(())
        },
    )
    .await;
    let running = view(&http, &id).await;
    assert_eq!(running["status"], "running", "{running:#}");
    assert_eq!(
        step_of(&running, "long")["status"],
        "running",
        "{running:#}"
    );

    let asked = Instant::now();
    let reply = http
        .post_json(&format!("/api/v1/workflows/{id}/cancel"), "{}")
        .await;
    assert_eq!(reply.status.as_u16(), 202, "{}", reply.text());
    let answered = reply.json();
    assert_eq!(answered["id"], id, "{answered}");
    assert!(answered["cancel_requested_at"].is_string(), "{answered}");

    let view = wait_ended(&http, &id).await;
    let took = asked.elapsed();
    assert!(
        took < Duration::from_secs(30),
        "the workflow took {took:?} to end after its cancel"
    );
    assert_eq!(view["status"], "cancelled", "{view:#}");
    assert_eq!(
        view["cancel_requested_at"], answered["cancel_requested_at"],
        "{view}"
    );
    assert_ran(&http, &view, "long", "cancelled").await;
    assert_skipped(&view, "after-long");
    assert_skipped(&view, "on-failure");
    assert_ran(&http, &view, "finally", "succeeded").await;
    assert_eq!(lines(&file), ["long-started", "finally cancelled"]);
}

#[tokio::test]
async fn a_workflow_whose_every_scheduler_is_killed_mid_step_is_finished_by_a_new_one_running_each_step_once()
 {
    let (mut cluster, http) = cluster_with(2).await;
    let file = cluster.runs_file();
    let record = |line: &str| format!("echo {line} >> {}", file.display());
    let body = json!({
        "name": "chain",
        "steps": [
            step("one", &record("one"), &[], "on_success"),
            step("two", &format!("sleep 4; {}", record("two")), &["one"], "on_success"),
            step("three", &record("three"), &["two"], "on_success"),
        ],
        "fail_fast": false,
    });
    let id = create(&http, &body).await;

    // Once step two's job runs, no scheduler is left.
    let running = wait_view(
        &http,
        &id,
        "step two to be running",
        Duration::from_secs(60),
        |view| step_of(view, "two")["status"] == "running",
    )
    .await;
    let two = step_of(&running, "two")["job"]
        .as_str()
        .expect("step two has a job")
        .to_owned();
    wait_until("step two's job to run", Duration::from_secs(60), || async {
        let job = http.try_get(&format!("/api/v1/jobs/{two}")).await.ok()?;
        (job.status.is_success() && job.json()["status"] == "running").then_some(())
    })
    .await;
    cluster.kill9("scheduler-1");
    cluster.kill9("scheduler-2");
    assert_eq!(
        lines(&file),
        ["one"],
        "the schedulers were killed while step two ran"
    );

    // Step two ends with no scheduler; nothing can start step three.
    wait_until("step two to end", Duration::from_secs(60), || async {
        lines(&file).contains(&"two".to_owned()).then_some(())
    })
    .await;
    assert_eq!(lines(&file), ["one", "two"]);
    let stalled = view(&http, &id).await;
    assert_eq!(stalled["status"], "running", "{stalled:#}");
    assert_eq!(
        step_of(&stalled, "three")["status"],
        "waiting",
        "{stalled:#}"
    );

    cluster.scheduler("scheduler-3");
    let view = wait_ended(&http, &id).await;
    assert_eq!(view["status"], "succeeded", "{view:#}");
    for name in ["one", "two", "three"] {
        let job = assert_ran(&http, &view, name, "succeeded").await;
        assert_eq!(job["attempt"], 1, "step {name} ran once: {job}");
    }
    assert_eq!(step_of(&view, "two")["job"], two.as_str(), "{view:#}");
    assert_eq!(lines(&file), ["one", "two", "three"]);
}
