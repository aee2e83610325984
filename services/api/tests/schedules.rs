//! Schedules over real HTTP, with a registry, a scheduler and an executor on a real
//! nats-server and the history in SQLite: a schedule's ticks run its job (each run naming its
//! schedule, and listed by it), pausing holds them, resuming runs them again, deleting ends
//! them; invalid definitions and jobs are refused naming the field, and nothing is stored; the
//! coming ticks of a cron in a time zone with daylight saving; a trigger runs the job at once;
//! every change is audited; who may read, create and change whose schedules.

use std::time::{Duration, Instant};

use capstan_protocol::NodeId;
use capstan_store::testing::TestDatabase;
use capstan_testkit::http::serde_json_value::{Value, json};
use capstan_testkit::http::{HttpClient, Reply};
use capstan_testkit::{NatsServer, wait_until};
use http::StatusCode;
use tokio_util::sync::CancellationToken;

/// A cron expression that does not tick during a test (midnight on the first of January).
const YEARLY: &str = "0 0 1 1 *";

struct Stack {
    _server: NatsServer,
    http: HttpClient,
    shutdown: CancellationToken,
    api: tokio::task::JoinHandle<Result<(), capstan_api::Error>>,
    _db: TestDatabase,
    _work: tempfile::TempDir,
}

/// A registry, a scheduler, an executor and the API, with the executor listed.
async fn stack() -> Stack {
    let server = NatsServer::start().await;
    let shutdown = CancellationToken::new();
    tokio::spawn(capstan_registry::run(
        capstan_registry::Config::for_url(server.url()),
        shutdown.clone(),
    ));
    tokio::spawn(capstan_scheduler::run(
        capstan_scheduler::Config::for_url(server.url()),
        shutdown.clone(),
    ));
    let work = tempfile::tempdir().expect("work dir");
    let mut executor = capstan_executor::Config::for_url(
        server.url(),
        NodeId::new("schedules-test-node").expect("valid"),
    );
    executor.work_dir = Some(work.path().to_path_buf());
    executor.heartbeat_interval = Duration::from_millis(300);
    tokio::spawn(capstan_executor::run(executor, shutdown.clone()));
    let db = TestDatabase::sqlite();
    let config = capstan_api::Config::for_urls(server.url(), db.url());
    let running = capstan_api::start(config, shutdown.clone())
        .await
        .expect("the API starts");
    let http = HttpClient::new(format!("http://{}", running.address))
        .login("admin", capstan_api::TEST_ADMIN_PASSWORD)
        .await;
    wait_until(
        "the executor node to be listed",
        Duration::from_secs(30),
        || async {
            let reply = http.get("/api/v1/nodes").await;
            (reply.status == StatusCode::OK && !reply.json()["nodes"].as_array()?.is_empty())
                .then_some(())
        },
    )
    .await;
    Stack {
        _server: server,
        http,
        shutdown,
        api: running.task,
        _db: db,
        _work: work,
    }
}

impl Stack {
    async fn create(&self, body: &Value) -> Reply {
        self.http
            .post_json("/api/v1/schedules", &body.to_string())
            .await
    }

    async fn schedule(&self, name: &str) -> Value {
        let reply = self.http.get(&format!("/api/v1/schedules/{name}")).await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
        reply.json()
    }

    /// Waits until the schedule's view satisfies `check`, and returns it.
    async fn schedule_becomes(
        &self,
        name: &str,
        what: &str,
        check: impl Fn(&Value) -> bool,
    ) -> Value {
        wait_until(
            &format!("schedule {name}: {what}"),
            Duration::from_secs(30),
            || async {
                let shown = self.schedule(name).await;
                check(&shown).then_some(shown)
            },
        )
        .await
    }

    /// Waits until the job has ended, and returns it.
    async fn finished(&self, id: &str) -> Value {
        wait_until(
            &format!("job {id} to end"),
            Duration::from_secs(30),
            || async {
                let job = self.http.get(&format!("/api/v1/jobs/{id}")).await.json();
                let status = job["status"].as_str().unwrap_or_default();
                ["succeeded", "failed", "timed_out", "cancelled"]
                    .contains(&status)
                    .then_some(job)
            },
        )
        .await
    }

    async fn stop(self) {
        self.shutdown.cancel();
        self.api.await.expect("joins").expect("clean exit");
    }
}

async fn post(client: &HttpClient, path: &str) -> Reply {
    client.send(http::Method::POST, path, &[], "").await
}

async fn delete(client: &HttpClient, path: &str) -> Reply {
    client.send(http::Method::DELETE, path, &[], "").await
}

fn ran(view: &Value) -> u64 {
    view["counts"]["ran"].as_u64().expect("counts.ran")
}

#[tokio::test]
async fn a_schedule_every_second_runs_until_paused_runs_again_once_resumed_and_ends_when_deleted() {
    let stack = stack().await;
    let created = stack
        .create(&json!({"name": "heartbeat", "every": "1s", "job": {"argv": ["/bin/true"]}}))
        .await;
    assert_eq!(created.status, StatusCode::CREATED, "{}", created.text());
    let view = created.json();
    assert_eq!(
        (
            &view["every"],
            &view["timezone"],
            &view["overlap"],
            &view["catchup"],
            &view["paused"],
            &view["owner"],
        ),
        (
            &json!("1s"),
            &json!("UTC"),
            &json!("skip"),
            &json!("last"),
            &json!(false),
            &json!("admin")
        ),
        "{view}"
    );
    assert!(view["next"].is_string(), "{view}");
    assert_eq!(view["job"]["argv"], json!(["/bin/true"]), "{view}");

    // Its runs succeed, each naming the schedule, and are listed by it.
    let runs = wait_until(
        "three runs of the schedule to succeed",
        Duration::from_secs(30),
        || async {
            let page = stack
                .http
                .get("/api/v1/jobs?schedule=heartbeat&status=succeeded")
                .await
                .json();
            let jobs = page["jobs"].as_array()?.clone();
            (jobs.len() >= 3).then_some(jobs)
        },
    )
    .await;
    for run in &runs {
        assert_eq!(run["schedule"], "heartbeat", "{run}");
        let id = run["id"].as_str().expect("an id");
        let job = stack.http.get(&format!("/api/v1/jobs/{id}")).await.json();
        assert_eq!(job["schedule"], "heartbeat", "{job}");
        assert_eq!(job["submitted_by"]["principal"], "admin", "{job}");
        assert!(
            job["spec"]["metadata"]["capstan.io/tick"].is_string(),
            "{job}"
        );
    }
    let other = stack.http.get("/api/v1/jobs?schedule=nightly").await.json();
    assert_eq!(other["jobs"], json!([]), "{other}");
    let view = stack
        .schedule_becomes("heartbeat", "three ticks ran", |view| {
            ran(view) >= 3 && view["last"]["outcome"] == "ran" && view["last_job"].is_string()
        })
        .await;
    assert!(view["last"]["at"].is_string() && view["last"]["handled_at"].is_string());

    // Paused: no tick runs (one already being handled may still be counted).
    let paused = post(&stack.http, "/api/v1/schedules/heartbeat/pause").await;
    assert_eq!(paused.status, StatusCode::OK, "{}", paused.text());
    let paused = paused.json();
    assert_eq!(paused["paused"], true, "{paused}");
    assert!(paused["next"].is_null(), "{paused}");
    assert!(
        paused["generation"].as_u64() > view["generation"].as_u64(),
        "{paused}"
    );
    let at_pause = ran(&paused);
    let started = Instant::now();
    wait_until(
        "3 s to pass while paused",
        Duration::from_secs(10),
        || async { (started.elapsed() >= Duration::from_secs(3)).then_some(()) },
    )
    .await;
    let held = ran(&stack.schedule("heartbeat").await);
    assert!(held <= at_pause + 1, "ran {held} times after {at_pause}");

    // Resumed: the ticks run again.
    let resumed = post(&stack.http, "/api/v1/schedules/heartbeat/resume").await;
    assert_eq!(resumed.status, StatusCode::OK, "{}", resumed.text());
    let resumed = resumed.json();
    assert_eq!(resumed["paused"], false, "{resumed}");
    assert!(resumed["next"].is_string(), "{resumed}");
    stack
        .schedule_becomes("heartbeat", "two more ticks ran", |view| {
            ran(view) >= held + 2
        })
        .await;

    // Deleted: gone, and its runs are still there.
    let deleted = delete(&stack.http, "/api/v1/schedules/heartbeat").await;
    assert_eq!(deleted.status, StatusCode::NO_CONTENT, "{}", deleted.text());
    let gone = stack.http.get("/api/v1/schedules/heartbeat").await;
    gone.assert_problem(StatusCode::NOT_FOUND, None);
    let again = delete(&stack.http, "/api/v1/schedules/heartbeat").await;
    again.assert_problem(StatusCode::NOT_FOUND, None);
    let listed = stack.http.get("/api/v1/schedules").await.json();
    assert_eq!(listed["items"], json!([]), "{listed}");
    let kept = stack
        .http
        .get("/api/v1/jobs?schedule=heartbeat")
        .await
        .json();
    assert!(kept["jobs"].as_array().expect("jobs").len() >= 3, "{kept}");
    stack.stop().await;
}

#[tokio::test]
async fn an_invalid_definition_or_job_is_refused_naming_its_field_and_nothing_is_stored() {
    let stack = stack().await;
    let job = json!({"argv": ["/bin/true"]});
    let cases = [
        (
            json!({"cron": "61 * * * *", "job": job}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "cron",
        ),
        (
            json!({"cron": "0 9 * * *", "timezone": "Mars/Base", "job": job}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "timezone",
        ),
        (
            json!({"every": "500ms", "job": job}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "every",
        ),
        (
            json!({"cron": "* * * * *", "every": "5s", "job": job}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "every",
        ),
        (
            json!({"job": job}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "cron",
        ),
        (
            json!({"every": "5s", "job": {"argv": []}}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "job.argv",
        ),
        (
            json!({"every": "5s", "job": {"command": "true", "argv": ["/bin/true"]}}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "job.command",
        ),
        (
            json!({"every": "5s", "job": {"argv": ["/bin/true"], "timeout": -1}}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "job.timeout",
        ),
        (
            json!({"every": "5s", "job": {"argv": ["/bin/true"], "delay": 5}}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "job.run_at",
        ),
        (
            json!({"every": "5s", "job": {"argv": ["/bin/true"], "idempotency_key": "k"}}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "job.idempotency_key",
        ),
        (
            json!({"every": "5s", "job": {"argv": ["/bin/true"], "secrets": {"TOKEN": "x"}}}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "job.secrets",
        ),
        (
            json!({"every": "5s", "job": {"argv": ["/bin/true"], "system": "nowhere"}}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "job.system",
        ),
        (
            json!({"every": "5s", "job": {"argv": ["/bin/true"], "secret_refs": {"TOKEN": "none"}}}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "job.secret_refs.TOKEN",
        ),
        (
            json!({"every": "5s", "job": {"argv": ["/bin/true"], "metadata": {"capstan.io/schedule": "x"}}}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "job.metadata.capstan.io/schedule",
        ),
        (
            json!({"every": "5s", "job": {"argv": "/bin/true"}}),
            StatusCode::BAD_REQUEST,
            "job.argv",
        ),
        (
            json!({"every": "5s", "overlap": "sometimes", "job": job}),
            StatusCode::BAD_REQUEST,
            "overlap",
        ),
    ];
    for (index, (mut body, status, field)) in cases.into_iter().enumerate() {
        let name = format!("bad-{index}");
        body["name"] = json!(name);
        let refused = stack.create(&body).await;
        refused.assert_problem(status, Some(field));
        let absent = stack.http.get(&format!("/api/v1/schedules/{name}")).await;
        absent.assert_problem(StatusCode::NOT_FOUND, None);
    }
    let badly_named = stack
        .create(&json!({"name": "a.b", "every": "5s", "job": job}))
        .await;
    badly_named.assert_problem(StatusCode::UNPROCESSABLE_ENTITY, Some("name"));
    let listed = stack.http.get("/api/v1/schedules").await.json();
    assert_eq!(listed["items"], json!([]), "nothing stored: {listed}");

    // A name is taken once; a change is checked as a creation is, and stores nothing when
    // refused.
    let good = json!({"name": "good", "cron": YEARLY, "job": job});
    assert_eq!(stack.create(&good).await.status, StatusCode::CREATED);
    let taken = stack.create(&good).await;
    taken.assert_problem(StatusCode::CONFLICT, None);
    let before = stack.schedule("good").await;
    for (patch, field) in [
        (json!({"cron": "61 * * * *"}), "cron"),
        (json!({"timezone": "Mars/Base"}), "timezone"),
        (json!({"every": "500ms"}), "every"),
        (json!({"job": {"argv": []}}), "job.argv"),
        (
            json!({"job": {"argv": ["/bin/true"], "idempotency_key": "k"}}),
            "job.idempotency_key",
        ),
    ] {
        let refused = stack
            .http
            .patch_json("/api/v1/schedules/good", &patch.to_string())
            .await;
        refused.assert_problem(StatusCode::UNPROCESSABLE_ENTITY, Some(field));
    }
    assert_eq!(stack.schedule("good").await, before, "unchanged");
    let nobody = stack
        .http
        .patch_json("/api/v1/schedules/nobody", r#"{"paused": true}"#)
        .await;
    nobody.assert_problem(StatusCode::NOT_FOUND, None);
    stack.stop().await;
}

/// Days since 1970-01-01 of a civil date (Howard Hinnant's `days_from_civil`).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year - era * 400;
    let day_of_year = (153 * ((month + 9) % 12) + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

/// 0 for Sunday to 6 for Saturday.
fn weekday(days: i64) -> i64 {
    (days + 4).rem_euclid(7)
}

/// The last Sunday of `month`, as days since 1970-01-01.
fn last_sunday(year: i64, month: i64) -> i64 {
    let last = days_from_civil(year, month, 31);
    last - weekday(last)
}

#[tokio::test]
async fn a_cron_in_berlin_previews_its_weekday_ticks_in_utc_through_daylight_saving_even_paused() {
    let stack = stack().await;
    let created = stack
        .create(&json!({
            "name": "standup",
            "cron": "0 9 * * MON-FRI",
            "timezone": "Europe/Berlin",
            "paused": true,
            "job": {"command": "echo standup"},
        }))
        .await;
    assert_eq!(created.status, StatusCode::CREATED, "{}", created.text());
    assert!(created.json()["next"].is_null(), "paused: no next tick");
    let preview = stack
        .http
        .get("/api/v1/schedules/standup/next?count=5")
        .await;
    assert_eq!(preview.status, StatusCode::OK, "{}", preview.text());
    let preview = preview.json();
    assert_eq!(preview["timezone"], "Europe/Berlin", "{preview}");
    let times: Vec<&str> = preview["times"]
        .as_array()
        .expect("times")
        .iter()
        .map(|t| t.as_str().expect("a time"))
        .collect();
    assert_eq!(times.len(), 5, "{preview}");
    let mut previous = None;
    for time in &times {
        // `YYYY-MM-DDTHH:MM:SSZ`
        let part = |range: std::ops::Range<usize>| -> i64 { time[range].parse().expect("digits") };
        let (year, month, day, hour) = (part(0..4), part(5..7), part(8..10), part(11..13));
        assert!(time.ends_with(":00:00Z"), "{time}");
        let days = days_from_civil(year, month, day);
        assert!((1..=5).contains(&weekday(days)), "{time} is not a weekday");
        // Summer time (UTC+2) from the last Sunday of March to the last Sunday of October.
        let summer = days > last_sunday(year, 3) && days < last_sunday(year, 10);
        assert_eq!(hour, if summer { 7 } else { 8 }, "{time}");
        assert!(previous < Some(*time), "{times:?} increase");
        previous = Some(*time);
    }
    let default = stack
        .http
        .get("/api/v1/schedules/standup/next")
        .await
        .json();
    assert_eq!(default["times"].as_array().map(Vec::len), Some(10));
    for count in ["0", "101"] {
        let refused = stack
            .http
            .get(&format!("/api/v1/schedules/standup/next?count={count}"))
            .await;
        refused.assert_problem(StatusCode::BAD_REQUEST, Some("count"));
    }
    let missing = stack.http.get("/api/v1/schedules/nobody/next").await;
    missing.assert_problem(StatusCode::NOT_FOUND, None);
    stack.stop().await;
}

#[tokio::test]
async fn a_trigger_runs_the_job_at_once_as_the_schedules_run_and_every_change_is_audited() {
    let stack = stack().await;
    let created = stack
        .create(&json!({
            "name": "report",
            "cron": YEARLY,
            "job": {"command": "echo report", "metadata": {"team": "ops"}},
        }))
        .await;
    assert_eq!(created.status, StatusCode::CREATED, "{}", created.text());

    let triggered = post(&stack.http, "/api/v1/schedules/report/trigger").await;
    assert_eq!(
        triggered.status,
        StatusCode::ACCEPTED,
        "{}",
        triggered.text()
    );
    let id = triggered.json()["id"].as_str().expect("an id").to_owned();
    assert_eq!(
        triggered
            .headers
            .get("location")
            .and_then(|v| v.to_str().ok()),
        Some(format!("/api/v1/jobs/{id}").as_str())
    );
    let job = stack.finished(&id).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(job["schedule"], "report", "{job}");
    assert_eq!(job["spec"]["metadata"]["team"], "ops", "{job}");
    assert!(
        job["spec"]["metadata"]["capstan.io/tick"].is_string(),
        "{job}"
    );
    assert!(job["spec"]["idempotency_key"].is_null(), "{job}");
    assert_eq!(job["submitted_by"]["principal"], "admin", "{job}");
    // Each trigger is a run of its own.
    let second = post(&stack.http, "/api/v1/schedules/report/trigger").await;
    assert_eq!(second.status, StatusCode::ACCEPTED, "{}", second.text());
    assert_ne!(second.json()["id"], json!(id));
    let listed = wait_until(
        "both triggered runs in the history",
        Duration::from_secs(30),
        || async {
            let page = stack.http.get("/api/v1/jobs?schedule=report").await.json();
            let jobs = page["jobs"].as_array()?.clone();
            (jobs.len() == 2).then_some(jobs)
        },
    )
    .await;
    assert!(listed.iter().all(|job| job["schedule"] == "report"));

    // A change: `every` replaces `cron`; a new generation; the job replaced whole.
    let before = stack.schedule("report").await;
    let changed = stack
        .http
        .patch_json(
            "/api/v1/schedules/report",
            &json!({"every": "1h", "overlap": "queue", "job": {"argv": ["/bin/echo", "hi"]}})
                .to_string(),
        )
        .await;
    assert_eq!(changed.status, StatusCode::OK, "{}", changed.text());
    let changed = changed.json();
    assert!(changed["cron"].is_null(), "{changed}");
    assert_eq!(changed["every"], "1h", "{changed}");
    assert_eq!(changed["overlap"], "queue", "{changed}");
    assert_eq!(
        changed["job"]["argv"],
        json!(["/bin/echo", "hi"]),
        "{changed}"
    );
    assert!(changed["job"]["command"].is_null(), "{changed}");
    assert!(
        changed["generation"].as_u64() > before["generation"].as_u64(),
        "{changed}"
    );
    assert_eq!(changed["created_at"], before["created_at"], "{changed}");
    let back = stack
        .http
        .patch_json(
            "/api/v1/schedules/report",
            &json!({"cron": YEARLY}).to_string(),
        )
        .await;
    assert_eq!(back.status, StatusCode::OK, "{}", back.text());
    assert_eq!(
        (&back.json()["cron"], &back.json()["every"]),
        (&json!(YEARLY), &Value::Null)
    );
    assert_eq!(
        post(&stack.http, "/api/v1/schedules/report/pause")
            .await
            .status,
        StatusCode::OK
    );
    assert_eq!(
        delete(&stack.http, "/api/v1/schedules/report").await.status,
        StatusCode::NO_CONTENT
    );

    // Every change is in the audit trail, by name.
    for (action, count) in [
        ("schedule.create", 1),
        ("schedule.trigger", 2),
        ("schedule.update", 3),
        ("schedule.delete", 1),
    ] {
        let records: Vec<Value> = stack
            .http
            .audit(action)
            .await
            .into_iter()
            .filter(|r| r["resource"] == "schedule/report" && r["outcome"] == "success")
            .collect();
        assert_eq!(records.len(), count, "{action}: {records:?}");
        assert!(records.iter().all(|r| r["principal"] == "admin"));
    }
    let triggers = stack.http.audit("schedule.trigger").await;
    assert!(
        triggers
            .iter()
            .any(|r| r["detail"].as_str().is_some_and(|d| d.contains(&id))),
        "{triggers:?}"
    );
    // A refused creation is audited as a failure.
    let refused = stack
        .create(&json!({"name": "report", "cron": "61 * * * *", "job": {"command": "true"}}))
        .await;
    refused.assert_problem(StatusCode::UNPROCESSABLE_ENTITY, Some("cron"));
    let failures: Vec<Value> = stack
        .http
        .audit("schedule.create")
        .await
        .into_iter()
        .filter(|r| r["outcome"] == "failure")
        .collect();
    assert_eq!(failures.len(), 1, "{failures:?}");
    stack.stop().await;
}

#[tokio::test]
async fn viewers_read_schedules_and_operators_change_only_their_own() {
    let stack = stack().await;
    let olivia = stack.http.new_user("olivia", "operator").await;
    let oscar = stack.http.new_user("oscar", "operator").await;
    let victor = stack.http.new_user("victor", "viewer").await;
    let body = json!({
        "name": "olivias",
        "cron": YEARLY,
        "job": {"command": "echo $TOKEN", "env": {"TOKEN": "plain-value"}},
    });
    let created = olivia
        .post_json("/api/v1/schedules", &body.to_string())
        .await;
    assert_eq!(created.status, StatusCode::CREATED, "{}", created.text());
    assert_eq!(created.json()["owner"], "olivia");
    assert_eq!(created.json()["job"]["env"]["TOKEN"], "plain-value");

    // A viewer reads, masked, and creates nothing.
    let listed = victor.get("/api/v1/schedules").await;
    assert_eq!(listed.status, StatusCode::OK, "{}", listed.text());
    assert_eq!(listed.json()["items"][0]["job"]["env"]["TOKEN"], "***");
    let shown = victor.get("/api/v1/schedules/olivias").await;
    assert_eq!(shown.status, StatusCode::OK, "{}", shown.text());
    assert_eq!(shown.json()["job"]["env"]["TOKEN"], "***");
    assert_eq!(
        victor.get("/api/v1/schedules/olivias/next").await.status,
        StatusCode::OK
    );
    let mut own = body.clone();
    own["name"] = json!("victors");
    let refused = victor
        .post_json("/api/v1/schedules", &own.to_string())
        .await;
    refused.assert_problem(StatusCode::FORBIDDEN, None);
    assert_eq!(refused.json()["permission"], "schedules:manage");
    // Nor does an operator change another operator's schedule.
    let changed = oscar
        .patch_json("/api/v1/schedules/olivias", r#"{"paused": true}"#)
        .await;
    changed.assert_problem(StatusCode::FORBIDDEN, None);
    assert_eq!(changed.json()["permission"], "schedules:manage:any");
    for path in ["pause", "resume", "trigger"] {
        let refused = post(&oscar, &format!("/api/v1/schedules/olivias/{path}")).await;
        refused.assert_problem(StatusCode::FORBIDDEN, None);
    }
    let removed = delete(&oscar, "/api/v1/schedules/olivias").await;
    removed.assert_problem(StatusCode::FORBIDDEN, None);
    assert_eq!(
        oscar.get("/api/v1/schedules/olivias").await.json()["job"]["env"]["TOKEN"],
        "***"
    );

    // Its owner changes it; an administrator changes anyone's, and the owner stays.
    let paused = post(&olivia, "/api/v1/schedules/olivias/pause").await;
    assert_eq!(paused.status, StatusCode::OK, "{}", paused.text());
    let by_admin = stack
        .http
        .patch_json("/api/v1/schedules/olivias", r#"{"overlap": "allow"}"#)
        .await;
    assert_eq!(by_admin.status, StatusCode::OK, "{}", by_admin.text());
    assert_eq!(by_admin.json()["owner"], "olivia");
    assert_eq!(by_admin.json()["job"]["env"]["TOKEN"], "plain-value");
    assert_eq!(
        delete(&olivia, "/api/v1/schedules/olivias").await.status,
        StatusCode::NO_CONTENT
    );

    // Every refusal is audited (under `auth.denied`, naming the schedule).
    let denied = stack.http.audit("auth.denied").await;
    let on_schedules = denied
        .iter()
        .filter(|r| {
            r["resource"]
                .as_str()
                .is_some_and(|r| r.starts_with("schedule/"))
        })
        .count();
    assert_eq!(on_schedules, 6, "{denied:?}");
    stack.stop().await;
}

#[tokio::test]
async fn disabling_demoting_or_deleting_an_owner_pauses_their_schedules_which_stay_paused_until_undone()
 {
    let stack = stack().await;
    let olivia = stack.http.new_user("olivia", "operator").await;
    let oscar = stack.http.new_user("oscar", "operator").await;
    for (owner, name) in [
        (&olivia, "olivias"),
        (&oscar, "oscars"),
        (&stack.http, "admins"),
    ] {
        let body = json!({"name": name, "every": "1h", "job": {"argv": ["/bin/true"]}});
        let created = owner
            .post_json("/api/v1/schedules", &body.to_string())
            .await;
        assert_eq!(created.status, StatusCode::CREATED, "{}", created.text());
        assert_eq!(created.json()["paused"], false);
    }

    // Disabling olivia pauses her schedule, and only hers; the audit record says so.
    let disabled = stack
        .http
        .patch_json("/api/v1/users/olivia", r#"{"disabled": true}"#)
        .await;
    assert_eq!(disabled.status, StatusCode::OK, "{}", disabled.text());
    let olivias = stack.schedule("olivias").await;
    assert_eq!(olivias["paused"], true, "{olivias}");
    assert!(olivias["next"].is_null(), "no tick to come: {olivias}");
    assert_eq!(stack.schedule("oscars").await["paused"], false);
    assert_eq!(stack.schedule("admins").await["paused"], false);
    let updates = stack.http.audit("user.update").await;
    assert!(
        updates.iter().any(|r| r["detail"].as_str().is_some_and(
            |d| d.contains("disabled") && d.contains("paused their schedules olivias")
        )),
        "{updates:?}"
    );

    // Not even an administrator resumes it, by either route, while she stays disabled.
    post(&stack.http, "/api/v1/schedules/olivias/resume")
        .await
        .assert_problem(StatusCode::CONFLICT, None);
    stack
        .http
        .patch_json("/api/v1/schedules/olivias", r#"{"paused": false}"#)
        .await
        .assert_problem(StatusCode::CONFLICT, None);
    // Changing it while it stays paused is fine.
    let changed = stack
        .http
        .patch_json("/api/v1/schedules/olivias", r#"{"every": "2h"}"#)
        .await;
    assert_eq!(changed.status, StatusCode::OK, "{}", changed.text());
    assert_eq!(stack.schedule("olivias").await["paused"], true);

    // Enabled again, she is not resumed by herself; resuming works again.
    let enabled = stack
        .http
        .patch_json("/api/v1/users/olivia", r#"{"disabled": false}"#)
        .await;
    assert_eq!(enabled.status, StatusCode::OK, "{}", enabled.text());
    assert_eq!(stack.schedule("olivias").await["paused"], true);
    let resumed = post(&stack.http, "/api/v1/schedules/olivias/resume").await;
    assert_eq!(resumed.status, StatusCode::OK, "{}", resumed.text());
    assert_eq!(resumed.json()["paused"], false);

    // Demoted to viewer (who may not submit jobs), she is paused again, and stays so.
    let demoted = stack
        .http
        .patch_json("/api/v1/users/olivia", r#"{"role": "viewer"}"#)
        .await;
    assert_eq!(demoted.status, StatusCode::OK, "{}", demoted.text());
    assert_eq!(stack.schedule("olivias").await["paused"], true);
    let refused = post(&stack.http, "/api/v1/schedules/olivias/resume").await;
    refused.assert_problem(StatusCode::CONFLICT, None);
    assert!(
        refused.text().contains("may no longer submit jobs"),
        "{}",
        refused.text()
    );

    // Deleting oscar pauses his, for good.
    let deleted = delete(&stack.http, "/api/v1/users/oscar").await;
    assert_eq!(deleted.status, StatusCode::NO_CONTENT, "{}", deleted.text());
    assert_eq!(stack.schedule("oscars").await["paused"], true);
    let refused = post(&stack.http, "/api/v1/schedules/oscars/resume").await;
    refused.assert_problem(StatusCode::CONFLICT, None);
    assert!(
        refused.text().contains("no longer exists"),
        "{}",
        refused.text()
    );
    assert_eq!(stack.schedule("admins").await["paused"], false);
    stack.stop().await;
}
