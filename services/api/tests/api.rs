//! Every route of the API over real HTTP, against a real mesh (registry, scheduler and an
//! executor in this process, a real nats-server) and a real history database.

use std::time::Duration;

use capstan_store::testing::TestDatabase;
use capstan_testkit::http::HttpClient;
use capstan_testkit::http::serde_json_value::{Value, json};
use capstan_testkit::{NatsServer, wait_until};
use http::StatusCode;
use tokio_util::sync::CancellationToken;

struct Stack {
    server: NatsServer,
    http: HttpClient,
    shutdown: CancellationToken,
    api: tokio::task::JoinHandle<Result<(), capstan_api::Error>>,
    _db: TestDatabase,
    database_url: String,
    _work: tempfile::TempDir,
}

/// The secret key the API and the executor of these tests share, as a key list entry.
fn test_key_entry() -> &'static str {
    static ENTRY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    ENTRY.get_or_init(|| capstan_secrets::KeyRing::generate_entry("test").expect("a key"))
}

/// The secret keys the API and the executor of these tests share.
fn test_keys() -> capstan_secrets::KeyRing {
    test_key_entry().parse().expect("a key list")
}

async fn start_api(
    server: &NatsServer,
    database_url: &str,
    shutdown: &CancellationToken,
) -> (
    HttpClient,
    tokio::task::JoinHandle<Result<(), capstan_api::Error>>,
) {
    let mut config = capstan_api::Config::for_urls(server.url(), database_url);
    config.nats.max_job_bytes = 64 * 1024;
    config.secret_keys.keys = Some(test_keys());
    let running = capstan_api::start(config, shutdown.clone())
        .await
        .expect("the API starts");
    let http = HttpClient::new(format!("http://{}", running.address))
        .login("admin", capstan_api::TEST_ADMIN_PASSWORD)
        .await;
    (http, running.task)
}

async fn stack_on(db: TestDatabase) -> Stack {
    let server = NatsServer::start().await;
    let shutdown = CancellationToken::new();
    tokio::spawn(capstan_registry::run(
        capstan_registry::Config::for_url(server.url()),
        shutdown.clone(),
    ));
    let mut scheduler = capstan_scheduler::Config::for_url(server.url());
    // Every placement announced, however short: these tests count a job's events.
    scheduler.announce_after = Duration::ZERO;
    tokio::spawn(capstan_scheduler::run(scheduler, shutdown.clone()));
    let work = tempfile::tempdir().expect("work dir");
    let mut executor = capstan_executor::Config::for_url(
        server.url(),
        capstan_protocol::NodeId::new("api-test-node").expect("valid"),
    );
    executor.work_dir = Some(work.path().to_path_buf());
    executor.labels = vec![("zone".into(), "eu".into())];
    executor.heartbeat_interval = Duration::from_millis(300);
    // Every start announced, however short: these tests count a job's events.
    executor.announce_after = Duration::ZERO;
    executor.secret_keys.keys = Some(test_keys());
    tokio::spawn(capstan_executor::run(executor, shutdown.clone()));
    let database_url = db.url().to_owned();
    let (http, api) = start_api(&server, &database_url, &shutdown).await;
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
        server,
        http,
        shutdown,
        api,
        _db: db,
        database_url,
        _work: work,
    }
}

async fn stack() -> Stack {
    stack_on(TestDatabase::sqlite()).await
}

impl Stack {
    async fn submit(&self, body: Value) -> String {
        let reply = self.http.post_json("/api/v1/jobs", &body.to_string()).await;
        assert_eq!(reply.status, StatusCode::ACCEPTED, "{}", reply.text());
        reply.json()["id"].as_str().expect("an id").to_owned()
    }

    /// Waits until the history database has recorded the job's end (the API also shows an end
    /// that is still on its way to the history), then reads the job.
    async fn finished(&self, id: &str) -> Value {
        let job: capstan_protocol::JobId = id.parse().expect("a job id");
        let history = capstan_store::History::connect(&self.database_url)
            .await
            .expect("connects");
        wait_until(
            &format!("job {id} to be recorded finished"),
            Duration::from_secs(30),
            || async {
                let ended = history.events(job).await.ok()?.iter().any(|e| {
                    ["succeeded", "failed", "timed_out", "cancelled"].contains(&e.kind.as_str())
                });
                if !ended {
                    return None;
                }
                Some(self.http.get(&format!("/api/v1/jobs/{id}")).await.json())
            },
        )
        .await
    }

    /// Asserts `canary` is in no response of `paths` (and of the job list and audit trail), no
    /// message of any stream (buckets included), and nowhere in the history's file and WAL.
    async fn assert_nowhere_in_clear(&self, canary: &str, paths: &[String]) {
        let listed = ["/api/v1/jobs?limit=10", "/api/v1/audit?limit=100"];
        for path in paths.iter().map(String::as_str).chain(listed) {
            let text = self.http.get(path).await.text();
            assert!(!text.contains(canary), "{path}: {text}");
        }
        let js = async_nats::jetstream::new(self.server.client().await);
        let mut streams = js.stream_names();
        let mut names = Vec::new();
        while let Some(name) = futures::StreamExt::next(&mut streams).await {
            names.push(name.expect("a stream name"));
        }
        assert!(names.len() >= 6, "{names:?}");
        let mut scanned = 0;
        for name in names {
            let mut stream = js.get_stream(&name).await.expect("the stream");
            let state = stream.info().await.expect("info").state.clone();
            for seq in state.first_sequence..=state.last_sequence {
                if let Ok(message) = stream.get_raw_message(seq).await {
                    scanned += 1;
                    let headers = format!("{:?}", message.headers);
                    assert!(
                        !String::from_utf8_lossy(&message.payload).contains(canary)
                            && !headers.contains(canary),
                        "{name} #{seq} ({}) holds the secret",
                        message.subject
                    );
                }
            }
        }
        assert!(scanned > 5, "only {scanned} messages read");
        assert!(!self.history_holds(canary), "the history holds the secret");
    }

    /// Whether the history's SQLite file or its WAL holds `text`.
    fn history_holds(&self, text: &str) -> bool {
        let path = self
            .database_url
            .trim_start_matches("sqlite://")
            .split('?')
            .next()
            .expect("a path")
            .to_owned();
        let mut scanned = 0;
        let mut found = false;
        for file in [path.clone(), format!("{path}-wal")] {
            if let Ok(bytes) = std::fs::read(&file) {
                scanned += bytes.len();
                found |= String::from_utf8_lossy(&bytes).contains(text);
            }
        }
        assert!(scanned > 0, "no history file at {path}");
        found
    }

    async fn stop(self) {
        self.shutdown.cancel();
        self.api.await.expect("joins").expect("clean exit");
    }
}

#[tokio::test]
async fn a_submitted_job_is_accepted_with_its_location_runs_and_is_recorded() {
    let stack = stack().await;
    let reply = stack
        .http
        .post_json(
            "/api/v1/jobs",
            &json!({"command": "cat; echo err >&2", "stdin": "the payload", "name": "greet",
                    "labels": {"zone": "eu"}, "env": {"A": "1"}})
            .to_string(),
        )
        .await;
    assert_eq!(reply.status, StatusCode::ACCEPTED, "{}", reply.text());
    let id = reply.json()["id"].as_str().expect("id").to_owned();
    let location = reply
        .headers
        .get("location")
        .expect("Location")
        .to_str()
        .expect("text");
    assert_eq!(location, format!("/api/v1/jobs/{id}"));

    let job = stack.finished(&id).await;
    assert_eq!(job["status"], "succeeded");
    assert_eq!(job["exit_code"], 0);
    assert_eq!(job["node"], "api-test-node");
    assert_eq!(job["attempt"], 1);
    assert_eq!(job["spec"]["name"], "greet");
    assert!(
        job["spec"].get("stdin").is_none(),
        "payloads are not echoed: {job}"
    );
    for field in ["created_at", "dispatched_at", "started_at", "finished_at"] {
        assert!(job[field].is_string(), "{field} missing: {job}");
    }
    assert_eq!(job["attempts"][0]["status"], "succeeded");

    let events = stack
        .http
        .get(&format!("/api/v1/jobs/{id}/events"))
        .await
        .json();
    let kinds: Vec<&str> = events["events"]
        .as_array()
        .expect("events")
        .iter()
        .map(|e| e["kind"].as_str().unwrap_or(""))
        .collect();
    // Taken at once by the idle executor it starts `running`; placed by a scheduler (the
    // executor not yet taking submissions), `pending` first.
    assert!(
        matches!(
            kinds.as_slice(),
            ["pending", "running", "succeeded"] | ["running", "succeeded"]
        ),
        "{kinds:?}"
    );

    let logs = stack
        .http
        .get(&format!("/api/v1/jobs/{id}/logs"))
        .await
        .json();
    assert_eq!(logs["stdout"], "the payload");
    assert_eq!(logs["stderr"], "err\n");
    assert_eq!(logs["complete"], true);
    stack.stop().await;
}

#[tokio::test]
async fn output_written_under_another_nodes_name_or_for_an_attempt_it_did_not_run_is_not_shown() {
    use capstan_protocol::{JobId, NodeId, headers, subjects};

    let stack = stack().await;
    let id = stack.submit(json!({"command": "echo real"})).await;
    stack.finished(&id).await;
    let job: JobId = id.parse().expect("a job id");
    let ran = NodeId::new("api-test-node").expect("valid");
    let other = NodeId::new("other-node").expect("valid");
    let js = async_nats::jetstream::new(stack.server.client().await);
    // Another node's words for attempt 1, and the running node's for an attempt it never had.
    for (node, attempt) in [(&other, "1"), (&ran, "2")] {
        let mut map = async_nats::HeaderMap::new();
        map.insert(headers::LOG_STREAM, "stdout");
        map.insert(headers::ATTEMPT, attempt);
        js.publish_with_headers(subjects::logs(job, node), map, "forged\n".into())
            .await
            .expect("sent")
            .await
            .expect("stored");
    }
    let logs = stack
        .http
        .get(&format!("/api/v1/jobs/{id}/logs"))
        .await
        .json();
    assert_eq!(logs["stdout"], "real\n", "{logs}");
    let (_, followed) = stack
        .http
        .read_stream(&format!("/api/v1/jobs/{id}/logs?follow=true"), |text| {
            text.contains("event: end")
        })
        .await;
    assert!(followed.contains("real"), "{followed}");
    assert!(!followed.contains("forged"), "{followed}");
    stack.stop().await;
}

#[tokio::test]
async fn a_secret_reaches_the_process_and_is_stored_and_shown_nowhere_in_clear() {
    const CANARY: &str = "canary-5f3a9c1e-secret";
    let stack = stack().await;
    let reply = stack
        .http
        .post_json(
            "/api/v1/jobs",
            &json!({
                // Compared in two halves, so the command itself does not hold the secret.
                "command": format!(
                    "test \"$TOKEN\" = \"{}\"\"{}\" && echo matched",
                    &CANARY[..10],
                    &CANARY[10..]
                ),
                "secrets": {"TOKEN": CANARY},
            })
            .to_string(),
        )
        .await;
    assert_eq!(reply.status, StatusCode::ACCEPTED, "{}", reply.text());
    assert!(!reply.text().contains(CANARY));
    let id = reply.json()["id"].as_str().expect("id").to_owned();
    let job = stack.finished(&id).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(job["spec"]["secrets"], json!(["TOKEN"]), "{job}");
    let logs = stack
        .http
        .get(&format!("/api/v1/jobs/{id}/logs"))
        .await
        .json();
    assert_eq!(
        logs["stdout"], "matched\n",
        "the process did not get its secret: {logs}"
    );

    // Nowhere in clear: every response about the job, every stream, every bucket, the table.
    stack
        .assert_nowhere_in_clear(
            CANARY,
            &[
                format!("/api/v1/jobs/{id}"),
                format!("/api/v1/jobs/{id}/events"),
            ],
        )
        .await;
    // The history keeps the secret's name only, not even its sealed value.
    assert!(
        !stack.history_holds(capstan_protocol::SealedSecret::PREFIX),
        "the history keeps a sealed value"
    );
    stack.stop().await;
}

#[tokio::test]
async fn a_stored_secret_reaches_only_the_jobs_of_the_submitters_it_lists_and_each_use_is_audited()
{
    const CANARY: &str = "canary-7d41b2e0-stored";
    let stack = stack().await;
    let put = |name: &str, body: Value| {
        let http = stack.http.clone();
        let path = format!("/api/v1/secrets/{name}");
        async move {
            http.send(
                http::Method::PUT,
                &path,
                &[("content-type", "application/json")],
                body.to_string(),
            )
            .await
        }
    };
    put("db", json!({"value": CANARY, "usable_by": []}))
        .await
        .assert_problem(StatusCode::BAD_REQUEST, Some("usable_by"));
    put("db.main", json!({"value": CANARY, "usable_by": ["admin"]}))
        .await
        .assert_problem(StatusCode::BAD_REQUEST, Some("name"));
    let created = put(
        "db",
        json!({"value": "first", "usable_by": ["admin"], "description": "the main database"}),
    )
    .await;
    assert_eq!(created.status, StatusCode::CREATED, "{}", created.text());
    let replaced = put("db", json!({"value": CANARY, "usable_by": ["admin"]})).await;
    assert_eq!(replaced.status, StatusCode::OK, "{}", replaced.text());
    let shown = replaced.json();
    assert_eq!(shown["key_id"], "test", "{shown}");
    assert_eq!(shown["usable_by"], json!(["admin"]), "{shown}");
    assert!(shown.get("value").is_none(), "{shown}");
    assert_eq!(shown["created_at"], created.json()["created_at"], "{shown}");
    let listed = stack.http.get("/api/v1/secrets").await.json();
    assert_eq!(listed["secrets"][0]["name"], "db", "{listed}");

    // An operator lists names but may not store, replace or delete; a viewer may not list.
    let operator = stack.http.new_user("olivia", "operator").await;
    let viewer = stack.http.new_user("victor", "viewer").await;
    assert_eq!(operator.get("/api/v1/secrets").await.status, StatusCode::OK);
    assert_eq!(
        viewer.get("/api/v1/secrets").await.status,
        StatusCode::FORBIDDEN
    );
    let overwrite = operator
        .send(
            http::Method::PUT,
            "/api/v1/secrets/db",
            &[("content-type", "application/json")],
            json!({"value": "mine now", "usable_by": ["olivia"]}).to_string(),
        )
        .await;
    overwrite.assert_problem(StatusCode::FORBIDDEN, None);
    let removal = operator
        .send(http::Method::DELETE, "/api/v1/secrets/db", &[], "")
        .await;
    removal.assert_problem(StatusCode::FORBIDDEN, None);

    // The admin's job, over REST, gets it.
    let id = stack
        .submit(json!({
            "command": format!(
                "test \"$DB\" = \"{}\"\"{}\" && echo matched",
                &CANARY[..10],
                &CANARY[10..]
            ),
            "secret_refs": {"DB": "db"},
        }))
        .await;
    let job = stack.finished(&id).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(job["spec"]["secret_refs"], json!({"DB": "db"}), "{job}");
    let logs = stack
        .http
        .get(&format!("/api/v1/jobs/{id}/logs"))
        .await
        .json();
    assert_eq!(
        logs["stdout"], "matched\n",
        "the process did not get it: {logs}"
    );

    // A stored secret that is not there is refused at once, naming the variable.
    let missing = stack
        .http
        .post_json(
            "/api/v1/jobs",
            &json!({"command": "true", "secret_refs": {"DB": "nope"}}).to_string(),
        )
        .await;
    missing.assert_problem(StatusCode::UNPROCESSABLE_ENTITY, Some("secret_refs.DB"));

    // Over REST, one the caller may not use is refused at once.
    let theirs = put(
        "theirs",
        json!({"value": "x", "usable_by": ["someone-else"]}),
    )
    .await;
    assert_eq!(theirs.status, StatusCode::CREATED, "{}", theirs.text());
    let refused = stack
        .http
        .post_json(
            "/api/v1/jobs",
            &json!({"command": "true", "secret_refs": {"T": "theirs"}}).to_string(),
        )
        .await;
    refused.assert_problem(StatusCode::FORBIDDEN, None);

    // A job sent on NATS by a submitter it does not list (this mesh has no NATS identities,
    // so the header is believed) fails to start, saying why, without the value.
    let client = stack.server.client().await;
    let foreign = capstan_protocol::JobId::generate().to_string();
    let mut bob = async_nats::HeaderMap::new();
    bob.insert(capstan_protocol::headers::JOB_ID, foreign.as_str());
    bob.insert(
        capstan_protocol::headers::SUBMITTED_BY,
        r#"{"principal": "bob", "via": "password"}"#,
    );
    async_nats::jetstream::new(client)
        .publish_with_headers(
            capstan_protocol::subjects::SUBMIT,
            bob,
            json!({"command": "echo ran", "secret_refs": {"DB": "db"}})
                .to_string()
                .into(),
        )
        .await
        .expect("sent")
        .await
        .expect("stored");
    let job = stack.finished(&foreign).await;
    assert_eq!(job["status"], "failed", "{job}");
    let error = job["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("secret_refs.DB") && error.contains("is not for jobs submitted by `bob`"),
        "{job}"
    );
    let logs = stack
        .http
        .get(&format!("/api/v1/jobs/{foreign}/logs"))
        .await
        .json();
    assert_eq!(logs["stdout"], "", "it ran: {logs}");

    // Each use and each refusal is on the audit trail, and so is each change.
    let audit = wait_until(
        "the uses of the secret audited",
        Duration::from_secs(30),
        || async {
            let audit = stack
                .http
                .get("/api/v1/audit?resource=secret/db&limit=50")
                .await
                .json();
            let records = audit["records"].as_array()?.clone();
            let read = |outcome: &str| {
                records
                    .iter()
                    .any(|r| r["action"] == "secret.read" && r["outcome"] == outcome)
            };
            (read("success") && read("denied")).then_some(records)
        },
    )
    .await;
    let puts = audit.iter().filter(|r| r["action"] == "secret.put").count();
    assert!(puts >= 2, "{audit:?}");
    let used = audit
        .iter()
        .find(|r| r["action"] == "secret.read" && r["outcome"] == "success")
        .expect("a use");
    assert_eq!(used["principal"], "admin", "{used}");
    assert!(
        used["detail"].as_str().unwrap_or_default().contains(&id),
        "{used}"
    );

    stack
        .assert_nowhere_in_clear(
            CANARY,
            &[
                "/api/v1/secrets".to_owned(),
                "/api/v1/secrets/db".to_owned(),
                format!("/api/v1/jobs/{id}"),
                format!("/api/v1/jobs/{foreign}"),
                "/api/v1/audit?resource=secret/db&limit=50".to_owned(),
            ],
        )
        .await;

    let gone = stack
        .http
        .send(http::Method::DELETE, "/api/v1/secrets/db", &[], "")
        .await;
    assert_eq!(gone.status, StatusCode::NO_CONTENT, "{}", gone.text());
    assert_eq!(
        stack.http.get("/api/v1/secrets/db").await.status,
        StatusCode::NOT_FOUND
    );
    stack.stop().await;
}

#[tokio::test]
async fn a_rotation_seals_stored_secrets_and_waiting_jobs_under_the_new_key_and_leaves_the_rest() {
    let stack = stack().await;
    let stored = stack
        .http
        .send(
            http::Method::PUT,
            "/api/v1/secrets/db",
            &[("content-type", "application/json")],
            json!({"value": "stored-value", "usable_by": ["*"]}).to_string(),
        )
        .await;
    assert_eq!(stored.status, StatusCode::CREATED, "{}", stored.text());
    let done = stack
        .submit(json!({"command": "true", "secrets": {"A": "done-value"}}))
        .await;
    assert_eq!(stack.finished(&done).await["status"], "succeeded");
    let later = stack
        .submit(json!({"command": "true", "delay": 3600, "secrets": {"A": "later-value"}}))
        .await;
    // No node has this label: the job waits unplaced, where a placement may be under way.
    let nowhere = stack
        .submit(json!({"command": "true", "labels": {"zone": "mars"}, "secrets": {"A": "x"}}))
        .await;
    let mesh = capstan_mesh::Mesh::open(stack.server.client().await)
        .await
        .expect("the mesh");
    let record = |id: String| {
        let jobs = mesh.jobs.clone();
        async move { jobs.get(&id).await.expect("read").expect("a record").value }
    };
    wait_until("the jobs to wait", Duration::from_secs(30), || async {
        let waiting = record(later.clone()).await.status == capstan_protocol::JobStatus::Scheduled
            && record(nowhere.clone()).await.is_unplaced();
        waiting.then_some(())
    })
    .await;

    let new_entry = capstan_secrets::KeyRing::generate_entry("k2").expect("a key");
    let rotating: capstan_secrets::KeyRing = format!("{new_entry},{}", test_key_entry())
        .parse()
        .expect("keys");
    let rotated = capstan_api::rotate::rotate(&mesh, &rotating, Duration::ZERO)
        .await
        .expect("rotates");
    assert_eq!(rotated.stored, 1, "{rotated:?}");
    assert_eq!((rotated.jobs, rotated.job_secrets), (1, 1), "{rotated:?}");
    assert_eq!(rotated.finished, 1, "{rotated:?}");
    assert_eq!(rotated.waiting.len(), 1, "{rotated:?}");
    assert_eq!(rotated.waiting[0].to_string(), nowhere, "{rotated:?}");
    assert!(rotated.unopenable.is_empty(), "{rotated:?}");
    assert!(!rotated.complete());

    // What was sealed again opens with the new key alone.
    let only_new: capstan_secrets::KeyRing = new_entry.parse().expect("keys");
    let waiting = record(later.clone()).await;
    let sealed = &waiting.spec.secrets["A"];
    assert_eq!(sealed.key_id(), "k2");
    assert_eq!(
        only_new
            .open(waiting.id, "A", sealed)
            .expect("opens")
            .as_str(),
        "later-value"
    );
    assert_eq!(
        waiting.status,
        capstan_protocol::JobStatus::Scheduled,
        "nothing else changed"
    );
    let secret = mesh
        .secrets
        .get("db")
        .await
        .expect("read")
        .expect("stored")
        .value;
    assert_eq!(
        only_new
            .open_stored("db", &secret.sealed)
            .expect("opens")
            .as_str(),
        "stored-value"
    );
    assert_eq!(
        stack.http.get("/api/v1/secrets/db").await.json()["key_id"],
        "k2"
    );
    let again = capstan_api::rotate::rotate(&mesh, &rotating, Duration::ZERO)
        .await
        .expect("rotates");
    assert_eq!((again.stored, again.jobs), (0, 0), "{again:?}");
    stack.stop().await;
}

#[tokio::test]
async fn the_same_idempotency_key_returns_the_existing_job_with_200() {
    let stack = stack().await;
    let body = json!({"command": "true", "idempotency_key": "invoice-17"}).to_string();
    let first = stack.http.post_json("/api/v1/jobs", &body).await;
    assert_eq!(first.status, StatusCode::ACCEPTED);
    let again = stack.http.post_json("/api/v1/jobs", &body).await;
    assert_eq!(again.status, StatusCode::OK);
    assert_eq!(again.json()["id"], first.json()["id"]);
    assert_eq!(again.json()["duplicate"], true);
    stack.stop().await;
}

#[tokio::test]
async fn bad_requests_get_precise_problems_and_store_nothing() {
    let stack = stack().await;
    let post = |body: String| {
        let http = stack.http.clone();
        async move { http.post_json("/api/v1/jobs", &body).await }
    };
    post("{\"command\": ".into())
        .await
        .assert_problem(StatusCode::BAD_REQUEST, None);
    post("[1, 2]".into())
        .await
        .assert_problem(StatusCode::BAD_REQUEST, None);
    let wrong_type = post(r#"{"command": "true", "timeout": "soon"}"#.into()).await;
    wrong_type.assert_problem(StatusCode::BAD_REQUEST, None);
    assert!(
        wrong_type.json()["detail"]
            .as_str()
            .unwrap_or("")
            .contains("timeout"),
        "{}",
        wrong_type.text()
    );
    let unknown = post(r#"{"command": "true", "comand": "x"}"#.into()).await;
    unknown.assert_problem(StatusCode::BAD_REQUEST, None);
    assert!(
        unknown.json()["detail"]
            .as_str()
            .unwrap_or("")
            .contains("comand"),
        "{}",
        unknown.text()
    );
    post(r#"{"command": "true", "argv": ["true"]}"#.into())
        .await
        .assert_problem(StatusCode::UNPROCESSABLE_ENTITY, Some("command"));
    post(r#"{"command": "true", "timeout": -5}"#.into())
        .await
        .assert_problem(StatusCode::UNPROCESSABLE_ENTITY, Some("timeout"));
    post(r#"{"name": "no program"}"#.into())
        .await
        .assert_problem(StatusCode::UNPROCESSABLE_ENTITY, Some("command"));
    let huge = json!({"command": "cat", "stdin": "x".repeat(100 * 1024)}).to_string();
    post(huge)
        .await
        .assert_problem(StatusCode::PAYLOAD_TOO_LARGE, None);
    let chunked = stack
        .http
        .send(
            http::Method::POST,
            "/api/v1/jobs",
            &[
                ("content-type", "application/json"),
                ("transfer-encoding", "chunked"),
            ],
            json!({"command": "cat", "stdin": "y".repeat(100 * 1024)}).to_string(),
        )
        .await;
    chunked.assert_problem(StatusCode::PAYLOAD_TOO_LARGE, None);
    stack
        .http
        .send(
            http::Method::POST,
            "/api/v1/jobs",
            &[("content-type", "text/plain")],
            "true",
        )
        .await
        .assert_problem(StatusCode::UNSUPPORTED_MEDIA_TYPE, None);

    stack
        .http
        .get("/api/v1/jobs/not-an-id")
        .await
        .assert_problem(StatusCode::BAD_REQUEST, Some("id"));
    stack
        .http
        .get("/api/v1/jobs/01ARZ3NDEKTSV4RRFFQ69G5FAV")
        .await
        .assert_problem(StatusCode::NOT_FOUND, None);
    stack
        .http
        .get("/api/v1/jobs/01ARZ3NDEKTSV4RRFFQ69G5FAV/logs")
        .await
        .assert_problem(StatusCode::NOT_FOUND, None);
    stack
        .http
        .get("/api/v1/jobs/01ARZ3NDEKTSV4RRFFQ69G5FAV/events")
        .await
        .assert_problem(StatusCode::NOT_FOUND, None);
    stack
        .http
        .get("/api/v1/jobs?cursor=%27%3B%20drop")
        .await
        .assert_problem(StatusCode::BAD_REQUEST, Some("cursor"));
    stack
        .http
        .get("/api/v1/jobs?status=done")
        .await
        .assert_problem(StatusCode::BAD_REQUEST, None);
    stack
        .http
        .get("/api/v1/jobs?status=unknown")
        .await
        .assert_problem(StatusCode::BAD_REQUEST, Some("status"));
    stack
        .http
        .get("/api/v1/jobs?limit=0")
        .await
        .assert_problem(StatusCode::BAD_REQUEST, None);
    stack
        .http
        .get("/api/v1/jobs?limit=100000")
        .await
        .assert_problem(StatusCode::BAD_REQUEST, None);
    stack
        .http
        .get("/api/v1/jobs?label=zone")
        .await
        .assert_problem(StatusCode::BAD_REQUEST, Some("label"));
    stack
        .http
        .get("/api/v1/jobs?since=yesterday")
        .await
        .assert_problem(StatusCode::BAD_REQUEST, Some("since"));
    stack
        .http
        .get("/api/v1/nodes/bad.node")
        .await
        .assert_problem(StatusCode::BAD_REQUEST, Some("id"));
    stack
        .http
        .get("/api/v1/nodes/nobody")
        .await
        .assert_problem(StatusCode::NOT_FOUND, None);
    stack
        .http
        .get("/api/v1/nothing-here")
        .await
        .assert_problem(StatusCode::NOT_FOUND, None);

    // Nothing was stored: no job in the live state, none in the history.
    let mesh = capstan_mesh::Mesh::open(stack.server.client().await)
        .await
        .expect("mesh");
    let keys: Vec<String> =
        futures::TryStreamExt::try_collect(mesh.jobs.kv().keys().await.expect("keys"))
            .await
            .expect("keys");
    assert!(keys.is_empty(), "{keys:?}");
    assert_eq!(
        stack.http.get("/api/v1/jobs").await.json()["jobs"],
        json!([])
    );
    stack.stop().await;
}

#[tokio::test]
async fn lists_filter_and_page_newest_first() {
    let stack = stack().await;
    let mut ids = Vec::new();
    for n in 0..7 {
        let command = if n % 3 == 0 { "false" } else { "true" };
        let name = if n % 2 == 0 { "even" } else { "odd" };
        ids.push(
            stack
                .submit(json!({"command": command, "name": name, "labels": {"zone": "eu"}}))
                .await,
        );
    }
    for id in &ids {
        stack.finished(id).await;
    }
    let mut seen = Vec::new();
    let mut path = "/api/v1/jobs?limit=3".to_owned();
    loop {
        let page = stack.http.get(&path).await.json();
        seen.extend(
            page["jobs"]
                .as_array()
                .expect("jobs")
                .iter()
                .map(|j| j["id"].as_str().unwrap_or("").to_owned()),
        );
        match page["next_cursor"].as_str() {
            Some(cursor) => path = format!("/api/v1/jobs?limit=3&cursor={cursor}"),
            None => break,
        }
    }
    // Newest first by id; ids made within one millisecond order by their random part.
    let mut newest_first = ids.clone();
    newest_first.sort_by(|a, b| b.cmp(a));
    assert_eq!(seen, newest_first);
    let failed = stack.http.get("/api/v1/jobs?status=failed").await.json();
    assert_eq!(failed["jobs"].as_array().expect("jobs").len(), 3);
    let even = stack
        .http
        .get("/api/v1/jobs?name=even&label=zone%3Deu")
        .await
        .json();
    assert_eq!(even["jobs"].as_array().expect("jobs").len(), 4);
    let none = stack.http.get("/api/v1/jobs?label=zone%3Dus").await.json();
    assert_eq!(none["jobs"], json!([]));
    let future = stack
        .http
        .get("/api/v1/jobs?since=2999-01-01T00:00:00Z")
        .await
        .json();
    assert_eq!(future["jobs"], json!([]));
    // A row a newer version wrote, with a status this one does not know, lists as `unknown`:
    // not as `failed`, and without failing the page.
    let statuses = |page: Value| -> Vec<(String, String)> {
        page["jobs"]
            .as_array()
            .expect("jobs")
            .iter()
            .map(|j| {
                let text = |field: &str| j[field].as_str().unwrap_or_default().to_owned();
                (text("id"), text("status"))
            })
            .collect()
    };
    let before = statuses(stack.http.get("/api/v1/jobs?name=odd").await.json());
    write_history_status(&stack.database_url, &ids[1], "paused").await;
    let after = statuses(stack.http.get("/api/v1/jobs?name=odd").await.json());
    let expected: Vec<(String, String)> = before
        .into_iter()
        .map(|(id, status)| {
            let status = if id == ids[1] {
                "unknown".into()
            } else {
                status
            };
            (id, status)
        })
        .collect();
    assert!(expected.contains(&(ids[1].clone(), "unknown".into())));
    assert_eq!(after, expected);
    // The metric counts it too, apart from the statuses this version knows.
    let metrics = stack.http.get("/metrics").await.text();
    assert!(
        metrics.contains("capstan_history_jobs{status=\"unknown\"} 1"),
        "{metrics}"
    );
    stack.stop().await;
}

/// Sets job `id`'s status in the history as a newer version might have written it.
async fn write_history_status(database_url: &str, id: &str, status: &str) {
    use capstan_store::entity::job;
    use sea_orm::sea_query::Expr;
    use sea_orm::{ColumnTrait, EntityTrait, QueryFilter};
    let history = capstan_store::History::connect(database_url)
        .await
        .expect("connects");
    job::Entity::update_many()
        .col_expr(job::Column::Status, Expr::value(status))
        .filter(job::Column::Id.eq(id))
        .exec(history.connection())
        .await
        .expect("the row is updated");
}

#[tokio::test]
async fn a_job_seen_ended_shows_its_end_among_its_events_while_the_history_is_behind() {
    use sea_orm::{ConnectionTrait, TransactionTrait};
    let stack = stack().await;
    // Another writer holds the history's write lock: the projection cannot record anything.
    let other = capstan_store::History::connect(&stack.database_url)
        .await
        .expect("connects");
    let hold = other.connection().begin().await.expect("a transaction");
    hold.execute_unprepared("CREATE TABLE held_by_the_test (x INTEGER)")
        .await
        .expect("the write lock is taken");

    let id = stack.submit(json!({"argv": ["echo", "hello"]})).await;
    wait_until(
        "the job to be seen ended",
        Duration::from_secs(30),
        || async {
            let job = stack.http.get(&format!("/api/v1/jobs/{id}")).await.json();
            (job["status"] == "succeeded").then_some(())
        },
    )
    .await;
    let reply = stack.http.get(&format!("/api/v1/jobs/{id}/events")).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let early = reply.json()["events"].clone();
    let kinds: Vec<&str> = early
        .as_array()
        .expect("a list")
        .iter()
        .filter_map(|e| e["kind"].as_str())
        .collect();
    // This stack announces every step, however short (a job the executor took at once has
    // no `pending`).
    assert!(
        matches!(
            kinds.as_slice(),
            ["pending", "running", "succeeded"] | ["running", "succeeded"]
        ),
        "{early}"
    );
    let seqs: Vec<i64> = early
        .as_array()
        .expect("a list")
        .iter()
        .filter_map(|e| e["seq"].as_i64())
        .collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{early}");
    let job: capstan_protocol::JobId = id.parse().expect("a job id");
    let recorded = other.events(job).await.expect("the history is read");
    assert!(
        recorded.is_empty(),
        "the history was not held back: {recorded:?}"
    );

    // Once the history catches up, it shows the same events.
    hold.rollback().await.expect("the lock is released");
    wait_until(
        "the history to catch up",
        Duration::from_secs(60),
        || async {
            let recorded = other.events(job).await.ok()?;
            (recorded.len() == seqs.len()).then_some(())
        },
    )
    .await;
    let reply = stack.http.get(&format!("/api/v1/jobs/{id}/events")).await;
    assert_eq!(reply.json()["events"], early);
    stack.stop().await;
}

#[tokio::test]
async fn logs_can_be_followed_while_the_job_runs_until_it_ends() {
    let stack = stack().await;
    let id = stack
        .submit(json!({"command": "echo first; sleep 1; echo second >&2; exit 3"}))
        .await;
    wait_until("the job to start", Duration::from_secs(30), || async {
        let job = stack.http.get(&format!("/api/v1/jobs/{id}")).await.json();
        (job["status"] == "running").then_some(())
    })
    .await;
    let (status, text) = stack
        .http
        .read_stream(&format!("/api/v1/jobs/{id}/logs?follow=true"), |text| {
            text.contains("event: end")
        })
        .await;
    assert_eq!(status, StatusCode::OK);
    let first = text.find("first").expect("stdout streamed");
    let second = text
        .find("second")
        .unwrap_or_else(|| panic!("stderr streamed: {text}"));
    let end = text.find("event: end").expect("an end event");
    assert!(first < second && second < end, "{text}");
    assert!(text.contains("\"exit_code\":3"), "{text}");

    // Following a finished job replays its output and ends at once.
    let (_, again) = stack
        .http
        .read_stream(&format!("/api/v1/jobs/{id}/logs?follow=true"), |text| {
            text.contains("event: end")
        })
        .await;
    assert!(
        again.contains("first") && again.contains("event: end"),
        "{again}"
    );
    stack.stop().await;
}

#[tokio::test]
async fn cancel_stops_a_running_job_and_refuses_a_finished_one() {
    let stack = stack().await;
    let id = stack.submit(json!({"command": "sleep 300"})).await;
    wait_until("the job to start", Duration::from_secs(30), || async {
        let job = stack.http.get(&format!("/api/v1/jobs/{id}")).await.json();
        (job["status"] == "running").then_some(())
    })
    .await;
    let reply = stack
        .http
        .post_json(&format!("/api/v1/jobs/{id}/cancel"), "")
        .await;
    assert_eq!(reply.status, StatusCode::ACCEPTED, "{}", reply.text());
    assert_eq!(reply.json()["outcome"], "requested");
    let job = stack.finished(&id).await;
    assert_eq!(job["status"], "cancelled");
    stack
        .http
        .post_json(&format!("/api/v1/jobs/{id}/cancel"), "")
        .await
        .assert_problem(StatusCode::CONFLICT, None);
    stack
        .http
        .post_json("/api/v1/jobs/01ARZ3NDEKTSV4RRFFQ69G5FAV/cancel", "")
        .await
        .assert_problem(StatusCode::NOT_FOUND, None);

    // A job that cannot be placed (no node carries its label) is cancelled at once.
    let waiting = stack
        .submit(json!({"command": "true", "labels": {"gpu": "yes"}}))
        .await;
    wait_until(
        "the job to be accepted",
        Duration::from_secs(30),
        || async {
            (stack
                .http
                .get(&format!("/api/v1/jobs/{waiting}"))
                .await
                .status
                == StatusCode::OK)
                .then_some(())
        },
    )
    .await;
    let reply = stack
        .http
        .post_json(&format!("/api/v1/jobs/{waiting}/cancel"), "")
        .await;
    assert_eq!(reply.json()["outcome"], "cancelled", "{}", reply.text());
    assert_eq!(stack.finished(&waiting).await["status"], "cancelled");
    stack.stop().await;
}

#[tokio::test]
async fn nodes_health_metrics_and_the_api_description_are_served() {
    let stack = stack().await;
    let nodes = stack.http.get("/api/v1/nodes").await.json();
    assert_eq!(nodes["nodes"][0]["id"], "api-test-node");
    assert_eq!(nodes["nodes"][0]["labels"]["zone"], "eu");
    let node = stack.http.get("/api/v1/nodes/api-test-node").await;
    assert_eq!(node.status, StatusCode::OK);
    assert_eq!(node.json()["status"], "up");

    assert_eq!(stack.http.get("/healthz").await.status, StatusCode::OK);
    let ready = stack.http.get("/readyz").await;
    assert_eq!(ready.status, StatusCode::OK, "{}", ready.text());

    let id = stack.submit(json!({"command": "true"})).await;
    stack.finished(&id).await;
    let metrics = wait_until(
        "metrics to count the job",
        Duration::from_secs(20),
        || async {
            let text = stack.http.get("/metrics").await.text();
            text.contains("capstan_history_jobs{status=\"succeeded\"} 1")
                .then_some(text)
        },
    )
    .await;
    for expected in [
        "capstan_queue_depth{queue=\"submissions\"}",
        "capstan_queue_depth{queue=\"history\"}",
        "capstan_job_turnaround_seconds_count 1",
        "capstan_api_submissions_total 1",
    ] {
        assert!(metrics.contains(expected), "{expected} missing:\n{metrics}");
    }

    let spec = stack.http.get("/openapi.json").await;
    assert_eq!(spec.status, StatusCode::OK);
    assert_eq!(
        spec.json(),
        serde_json::from_str::<Value>(&capstan_api::openapi_json()).expect("JSON")
    );
    assert!(spec.json()["paths"]["/api/v1/jobs"]["post"].is_object());
    let docs = stack.http.get("/docs/").await;
    assert_eq!(docs.status, StatusCode::OK);
    assert!(docs.text().to_lowercase().contains("swagger"));
    stack.stop().await;
}

#[tokio::test]
async fn the_history_works_on_postgresql() {
    let stack = stack_on(TestDatabase::postgres().await).await;
    assert!(stack.database_url.starts_with("postgres://"));
    let id = stack.submit(json!({"command": "echo pg"})).await;
    assert_eq!(stack.finished(&id).await["status"], "succeeded");
    let page = stack.http.get("/api/v1/jobs?status=succeeded").await.json();
    assert_eq!(page["jobs"][0]["id"], id.as_str());
    stack.stop().await;
}

async fn table_dump(database_url: &str) -> String {
    use capstan_store::entity::{attempt, event, job, job_label};
    use sea_orm::EntityTrait;
    let history = capstan_store::History::connect(database_url)
        .await
        .expect("connects");
    let db = history.connection();
    let mut jobs = job::Entity::find().all(db).await.expect("jobs");
    jobs.sort_by(|a, b| a.id.cmp(&b.id));
    let mut attempts = attempt::Entity::find().all(db).await.expect("attempts");
    attempts.sort_by(|a, b| (&a.job_id, a.attempt).cmp(&(&b.job_id, b.attempt)));
    let mut events = event::Entity::find().all(db).await.expect("events");
    events.sort_by_key(|e| e.seq);
    let mut labels = job_label::Entity::find().all(db).await.expect("labels");
    labels.sort_by(|a, b| (&a.job_id, &a.key).cmp(&(&b.job_id, &b.key)));
    format!("{jobs:?}\n{attempts:?}\n{events:?}\n{labels:?}")
}

/// The kinds of a job's events, as `GET /jobs/{id}/events` lists them.
fn event_kinds(events: &serde_json::Value) -> Vec<&str> {
    events["events"]
        .as_array()
        .expect("events")
        .iter()
        .filter_map(|e| e["kind"].as_str())
        .collect()
}

#[tokio::test]
async fn two_api_replicas_share_the_history_and_a_rebuild_equals_it() {
    let stack = stack().await;
    // A second replica on the same database and NATS.
    let (second, second_task) =
        start_api(&stack.server, &stack.database_url, &stack.shutdown).await;
    let mut ids = Vec::new();
    for n in 0..20 {
        let http = if n % 2 == 0 { &stack.http } else { &second };
        let reply = http
            .post_json(
                "/api/v1/jobs",
                &json!({"command": "true", "labels": {"zone": "eu"}}).to_string(),
            )
            .await;
        ids.push(reply.json()["id"].as_str().expect("id").to_owned());
    }
    let mut total = 0_u64;
    for id in &ids {
        stack.finished(id).await;
        let events = second
            .get(&format!("/api/v1/jobs/{id}/events"))
            .await
            .json();
        let kinds = event_kinds(&events);
        // Taken at once by the idle executor a job starts `running`; placed by a scheduler,
        // `pending` first.
        assert!(
            matches!(
                kinds.as_slice(),
                ["pending", "running", "succeeded"] | ["running", "succeeded"]
            ),
            "no duplicate, none lost: {events}"
        );
        total += u64::try_from(kinds.len()).expect("fits");
    }

    // Rebuild into an empty database from the events stream: the same rows.
    let rebuilt = TestDatabase::sqlite();
    let history = capstan_store::History::connect(rebuilt.url())
        .await
        .expect("connects");
    let mesh = capstan_mesh::Mesh::open(stack.server.client().await)
        .await
        .expect("mesh");
    let done = capstan_api::rebuild::rebuild(&mesh, &history)
        .await
        .expect("rebuilt");
    assert_eq!(done.events, total);
    assert_eq!(
        table_dump(rebuilt.url()).await,
        table_dump(&stack.database_url).await
    );
    stack.stop().await;
    second_task.await.expect("joins").expect("clean exit");
}

#[tokio::test]
async fn the_history_survives_a_nats_restart_and_keeps_recording() {
    let mut stack = stack().await;
    let before = stack.submit(json!({"command": "echo before"})).await;
    stack.finished(&before).await;
    stack.server.restart().await;
    // Served from SQL while and after NATS restarts.
    let job = stack.http.get(&format!("/api/v1/jobs/{before}")).await;
    assert_eq!(job.status, StatusCode::OK);
    // The services reconnect; a new job is recorded too.
    let after = wait_until(
        "a submission after the restart",
        Duration::from_secs(60),
        || async {
            let reply = stack
                .http
                .post_json(
                    "/api/v1/jobs",
                    &json!({"command": "echo after"}).to_string(),
                )
                .await;
            (reply.status == StatusCode::ACCEPTED)
                .then(|| reply.json()["id"].as_str().unwrap_or("").to_owned())
        },
    )
    .await;
    assert_eq!(stack.finished(&after).await["status"], "succeeded");
    let events = stack
        .http
        .get(&format!("/api/v1/jobs/{before}/events"))
        .await
        .json();
    assert!(
        matches!(
            event_kinds(&events).as_slice(),
            ["pending", "running", "succeeded"] | ["running", "succeeded"]
        ),
        "{events}"
    );
    stack.stop().await;
}

#[tokio::test]
async fn delayed_and_retried_jobs_show_their_waits_attempts_and_events_over_rest() {
    let stack = stack().await;
    let scheduled = stack.submit(json!({"command": "true", "delay": 600})).await;
    let job = wait_until(
        "the job to be accepted",
        Duration::from_secs(30),
        || async {
            let reply = stack.http.get(&format!("/api/v1/jobs/{scheduled}")).await;
            (reply.status == StatusCode::OK).then(|| reply.json())
        },
    )
    .await;
    assert_eq!(job["status"], "scheduled", "{job}");
    assert!(job["next_attempt_at"].is_string(), "{job}");
    assert_eq!(job["spec"]["delay"], 600.0, "{job}");
    let cancelled = stack
        .http
        .post_json(&format!("/api/v1/jobs/{scheduled}/cancel"), "")
        .await;
    assert_eq!(
        cancelled.status,
        StatusCode::ACCEPTED,
        "{}",
        cancelled.text()
    );
    assert_eq!(cancelled.json()["outcome"], "cancelled");
    assert_eq!(stack.finished(&scheduled).await["status"], "cancelled");

    let retried = stack
        .submit(json!({"command": "echo try; exit 4",
                       "retry": {"max_attempts": 2, "backoff": {"initial": 0.2}}}))
        .await;
    let job = stack.finished(&retried).await;
    assert_eq!(
        (job["status"].as_str(), job["attempt"].as_u64()),
        (Some("failed"), Some(2))
    );
    let attempts = job["attempts"].as_array().expect("attempts");
    assert_eq!(attempts.len(), 2, "{job}");
    for attempt in attempts {
        assert_eq!(attempt["status"], "failed", "{attempt}");
        assert_eq!(attempt["exit_code"], 4, "{attempt}");
        assert!(attempt["finished_at"].is_string(), "{attempt}");
    }
    let events = stack
        .http
        .get(&format!("/api/v1/jobs/{retried}/events"))
        .await
        .json();
    let kinds: Vec<&str> = events["events"]
        .as_array()
        .expect("events")
        .iter()
        .filter_map(|e| e["kind"].as_str())
        .collect();
    assert!(kinds.contains(&"retrying"), "{kinds:?}");
    assert_eq!(kinds.last(), Some(&"failed"), "{kinds:?}");

    // A timeout is retried too when the policy says so, and the last one is final.
    let slow = stack
        .submit(json!({"command": "sleep 30", "timeout": 0.3,
                       "retry": {"max_attempts": 2, "retry_on": ["timed_out"],
                                 "backoff": {"initial": 0.1}}}))
        .await;
    let job = stack.finished(&slow).await;
    assert_eq!(
        (job["status"].as_str(), job["attempt"].as_u64()),
        (Some("timed_out"), Some(2))
    );
    let statuses: Vec<&str> = job["attempts"]
        .as_array()
        .expect("attempts")
        .iter()
        .filter_map(|a| a["status"].as_str())
        .collect();
    assert_eq!(statuses, ["timed_out", "timed_out"], "{job}");

    let bad = stack
        .http
        .post_json(
            "/api/v1/jobs",
            r#"{"command": "true", "retry": {"max_attempts": 0}}"#,
        )
        .await;
    bad.assert_problem(StatusCode::UNPROCESSABLE_ENTITY, Some("retry.max_attempts"));
    let bad = stack
        .http
        .post_json("/api/v1/jobs", r#"{"command": "true", "run_at": "soon"}"#)
        .await;
    bad.assert_problem(StatusCode::UNPROCESSABLE_ENTITY, Some("run_at"));
    stack.stop().await;
}

#[tokio::test]
async fn a_full_submissions_stream_refuses_new_jobs_with_a_clear_problem_and_runs_every_accepted_one()
 {
    let server = NatsServer::start().await;
    // The administrator gives the submissions stream room for a few jobs only.
    let js = async_nats::jetstream::new(server.client().await);
    let mut limits = capstan_mesh::topology::Limits::default();
    limits
        .set(capstan_protocol::topology::SUBMISSIONS.name, 16 * 1024)
        .expect("a valid limit");
    capstan_mesh::topology::apply(&js, &limits)
        .await
        .expect("applied");
    let shutdown = CancellationToken::new();
    let db = TestDatabase::sqlite();
    let (http, api) = start_api(&server, db.url(), &shutdown).await;

    // No scheduler yet: submissions stay in the stream until it is full.
    let stdin = "x".repeat(2048);
    let mut accepted = Vec::new();
    let mut refusal = None;
    for n in 0..64 {
        let body = json!({"command": "cat > /dev/null", "stdin": stdin, "name": format!("j{n}")});
        let reply = http.post_json("/api/v1/jobs", &body.to_string()).await;
        match reply.status {
            StatusCode::ACCEPTED => {
                accepted.push(reply.json()["id"].as_str().expect("id").to_owned())
            }
            _ => {
                refusal = Some(reply);
                break;
            }
        }
    }
    let refusal = refusal.expect("the stream filled up within 64 jobs");
    assert_eq!(
        refusal.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        refusal.text()
    );
    let problem = refusal.json();
    assert!(
        problem["type"].as_str().unwrap_or("").ends_with("full"),
        "{problem}"
    );
    assert!(
        problem["detail"]
            .as_str()
            .unwrap_or("")
            .contains("submissions stream is full"),
        "{problem}"
    );
    assert!(accepted.len() >= 2, "only {} accepted", accepted.len());
    let mut stream = js
        .get_stream(capstan_protocol::topology::SUBMISSIONS.name)
        .await
        .expect("stream");
    let held = stream.info().await.expect("info").state.messages;
    assert_eq!(
        held,
        accepted.len() as u64,
        "the stream lost or kept extra submissions"
    );

    // A scheduler and an executor start: every accepted job runs.
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
        capstan_protocol::NodeId::new("full-test-node").expect("valid"),
    );
    executor.work_dir = Some(work.path().to_path_buf());
    tokio::spawn(capstan_executor::run(executor, shutdown.clone()));
    for id in &accepted {
        wait_until(
            &format!("{id} to succeed"),
            Duration::from_secs(60),
            || async {
                let job = http.get(&format!("/api/v1/jobs/{id}")).await.json();
                (job["status"] == "succeeded").then_some(())
            },
        )
        .await;
    }
    shutdown.cancel();
    api.await.expect("joins").expect("clean exit");
}

#[tokio::test]
async fn a_secret_key_file_is_written_once_for_its_owner_only_and_kept_after() {
    use clap::Parser as _;
    use std::os::unix::fs::PermissionsExt as _;
    let dir = tempfile::tempdir().expect("a dir");
    let path = dir.path().join("keys");
    let key = |id: &str| {
        let cli = capstan_api::admin::Cli::try_parse_from([
            "capstan",
            "secrets",
            "key",
            "--id",
            id,
            "--out",
            path.to_str().expect("a path"),
        ])
        .expect("the command parses");
        capstan_api::admin::run(cli)
    };
    key("k1").await.expect("writes");
    let first = std::fs::read_to_string(&path).expect("written");
    let mode = std::fs::metadata(&path).expect("meta").permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let keys = capstan_secrets::KeyRing::from_file(&path).expect("a key list");
    assert_eq!(keys.sealing_key(), "k1");
    key("k2").await.expect("keeps");
    assert_eq!(std::fs::read_to_string(&path).expect("kept"), first);
}

#[tokio::test]
async fn an_audit_record_on_another_actions_subject_is_refused_as_forged() {
    use capstan_protocol::{AuditAction, AuditOutcome, AuditRecord, subjects};
    let stack = stack().await;
    let js = async_nats::jetstream::new(stack.server.client().await);
    let publish = |subject: String, resource: &str| {
        let mut record = AuditRecord::new(AuditAction::UserDelete, AuditOutcome::Success);
        record.principal = Some("admin".into());
        record.resource = Some(resource.to_owned());
        let payload = capstan_protocol::codec::to_msgpack(&record).expect("encoded");
        let js = js.clone();
        async move {
            js.publish(subject, payload.into())
                .await
                .expect("sent")
                .await
                .expect("stored");
        }
    };
    // An executor may publish `secret.read` records only; this one claims a user's deletion.
    publish(subjects::audit(AuditAction::SecretRead), "user/forged").await;
    publish(subjects::audit(AuditAction::UserDelete), "user/genuine").await;
    wait_until(
        "the genuine record projected",
        Duration::from_secs(30),
        || async {
            let audit = stack
                .http
                .get("/api/v1/audit?resource=user/genuine")
                .await
                .json();
            (!audit["records"].as_array()?.is_empty()).then_some(())
        },
    )
    .await;
    let forged = stack
        .http
        .get("/api/v1/audit?resource=user/forged")
        .await
        .json();
    assert_eq!(forged["records"], json!([]), "{forged}");
    stack.stop().await;
}

#[tokio::test]
async fn a_submission_audited_again_after_the_deduplication_window_is_one_record_in_the_history() {
    use capstan_mesh::intake::Submission;
    use capstan_protocol::codec::{self, Encoding};
    use capstan_protocol::{
        AuditAction, AuditOutcome, AuditRecord, JobId, JobSpec, SubmittedBy, topology,
    };
    let server = NatsServer::start().await;
    let mesh = capstan_mesh::Mesh::open(server.client().await)
        .await
        .expect("mesh opens");
    // The audit stream forgets message ids after 100 ms (its least) instead of two minutes,
    // set before anything is published on it (the server arms its first purge with the window
    // it has then), so that a second audit below is stored again, as one past the window is.
    let audit_stream = || async {
        mesh.js
            .get_stream(topology::AUDIT.name)
            .await
            .expect("the audit stream")
    };
    let mut config = audit_stream().await.cached_info().config.clone();
    config.duplicate_window = Duration::from_millis(100);
    mesh.js
        .update_stream(config)
        .await
        .expect("window shortened");

    // A client's submission, as the service that takes it (executor or scheduler) reads it.
    let submission = Submission {
        id: JobId::generate(),
        submitted_by: SubmittedBy::nats_client("client-a"),
        from_client: true,
        submitted_ms: 1_767_225_600_000,
        seq: 42,
        spec: JobSpec::shell("true"),
    };
    let audit = || {
        mesh.events.audit_client(
            AuditAction::JobSubmit,
            &submission.submitted_by,
            submission.id,
            AuditOutcome::Success,
            Some(submission.audit_key()),
        )
    };
    audit().await.expect("audited");
    // Audited again (redelivered, or taken by another service) until the stream stores it a
    // second time: the deduplication window has passed.
    wait_until(
        "the second audit stored past the window",
        Duration::from_secs(30),
        || async {
            audit().await.ok()?;
            let stored = audit_stream().await.info().await.ok()?.state.messages;
            (stored >= 2).then_some(())
        },
    )
    .await;
    let mut stream = audit_stream().await;
    let mut records = Vec::new();
    for seq in 1..=stream.info().await.expect("info").state.last_sequence {
        let message = stream.get_raw_message(seq).await.expect("stored");
        let record: AuditRecord =
            codec::decode(Encoding::MsgPack, &message.payload).expect("a record");
        records.push(record);
    }
    assert!(records.len() >= 2, "{records:?}");
    assert!(
        records.iter().all(|record| record.id == records[0].id),
        "every audit of one submission carries one id: {records:?}"
    );

    // Projected as the API's `api-audit` consumer projects them: one row.
    let db = capstan_store::testing::TestDatabase::sqlite();
    let history = capstan_store::History::connect(db.url())
        .await
        .expect("history");
    history.record_audit(&records).await.expect("written");
    let rows = history
        .audit(&capstan_store::AuditQuery {
            resource: Some(format!("job/{}", submission.id)),
            limit: 50,
            ..Default::default()
        })
        .await
        .expect("read");
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0].action, "job.submit");
    // Dated when the client submitted it, whichever service audited it and when.
    assert_eq!(rows[0].at, 1_767_225_600_000, "{rows:?}");
}

#[tokio::test]
async fn an_accepted_job_is_shown_from_the_moment_it_is_accepted_even_before_a_scheduler_runs() {
    // No scheduler yet: the submissions wait in their stream.
    let server = NatsServer::start().await;
    let shutdown = CancellationToken::new();
    let db = TestDatabase::sqlite();
    let (http, api) = start_api(&server, db.url(), &shutdown).await;
    let reply = http
        .post_json(
            "/api/v1/jobs",
            &json!({"command": "echo accepted", "name": "early"}).to_string(),
        )
        .await;
    assert_eq!(reply.status, StatusCode::ACCEPTED, "{}", reply.text());
    let id = reply.json()["id"].as_str().expect("an id").to_owned();
    let shown = http.get(&format!("/api/v1/jobs/{id}")).await;
    assert_eq!(shown.status, StatusCode::OK, "{}", shown.text());
    let job = shown.json();
    assert_eq!(job["status"], "pending", "{job}");
    assert_eq!(job["attempt"], 0, "{job}");
    assert_eq!(job["attempts"], json!([]), "{job}");
    assert_eq!(job["spec"]["command"], "echo accepted", "{job}");
    assert_eq!(job["submitted_by"]["principal"], "admin", "{job}");
    // Its output too: none yet, and a follow that starts now sees all of it and the end.
    let captured = http.get(&format!("/api/v1/jobs/{id}/logs")).await;
    assert_eq!(captured.status, StatusCode::OK, "{}", captured.text());
    assert_eq!(captured.json()["stdout"], "", "{}", captured.text());
    let following = {
        let http = http.clone();
        let path = format!("/api/v1/jobs/{id}/logs?follow=true");
        tokio::spawn(async move {
            http.read_stream(&path, |text| text.contains("event: end"))
                .await
        })
    };
    let later = http
        .post_json(
            "/api/v1/jobs",
            &json!({"command": "true", "delay": 3600}).to_string(),
        )
        .await;
    let later = later.json()["id"].as_str().expect("an id").to_owned();
    let job = http.get(&format!("/api/v1/jobs/{later}")).await.json();
    assert_eq!(job["status"], "scheduled", "{job}");
    let unknown = http
        .get(&format!(
            "/api/v1/jobs/{}",
            capstan_protocol::JobId::generate()
        ))
        .await;
    unknown.assert_problem(StatusCode::NOT_FOUND, None);

    // Submissions stored on NATS are read as a scheduler will read them: one without a sender
    // is the mesh's, one whose sender cannot be read is no job, nor is one whose id header
    // names another job than its subject.
    let js = async_nats::jetstream::new(server.client().await);
    let submit = |job: capstan_protocol::JobId, header_id: String, sender: Option<&'static str>| {
        let js = js.clone();
        async move {
            let mut map = async_nats::HeaderMap::new();
            map.insert(capstan_protocol::headers::JOB_ID, header_id.as_str());
            if let Some(sender) = sender {
                map.insert(capstan_protocol::headers::SUBMITTED_BY, sender);
            }
            js.publish_with_headers(
                capstan_protocol::subjects::submit_job(job),
                map,
                json!({"argv": ["true"]}).to_string().into(),
            )
            .await
            .expect("sent")
            .await
            .expect("stored");
        }
    };
    let plain = capstan_protocol::JobId::generate();
    submit(plain, plain.to_string(), None).await;
    let job = http.get(&format!("/api/v1/jobs/{plain}")).await.json();
    assert_eq!(job["status"], "pending", "{job}");
    assert_eq!(job["submitted_by"]["principal"], "nats", "{job}");
    let unreadable = capstan_protocol::JobId::generate();
    submit(unreadable, unreadable.to_string(), Some("{not json")).await;
    http.get(&format!("/api/v1/jobs/{unreadable}"))
        .await
        .assert_problem(StatusCode::NOT_FOUND, None);
    let renamed = capstan_protocol::JobId::generate();
    submit(
        renamed,
        capstan_protocol::JobId::generate().to_string(),
        None,
    )
    .await;
    http.get(&format!("/api/v1/jobs/{renamed}"))
        .await
        .assert_problem(StatusCode::NOT_FOUND, None);

    // One handed on to the schedulers for placement is shown too, as its original sender's.
    let handed = capstan_mesh::intake::read(
        &format!("{}.from.ops", capstan_protocol::subjects::SUBMIT),
        None,
        br#"{"argv": ["true"]}"#,
        capstan_mesh::intake::Stored {
            seq: 1,
            published_ms: u64::try_from(capstan_protocol::Timestamp::now().as_millis())
                .expect("positive"),
        },
        usize::MAX,
    )
    .expect("a valid submission");
    let forward = capstan_mesh::intake::forward(&handed, None);
    js.publish_with_headers(
        forward.subject,
        forward.headers,
        json!({"argv": ["true"]}).to_string().into(),
    )
    .await
    .expect("sent")
    .await
    .expect("stored");
    let job = http
        .get(&format!("/api/v1/jobs/{}", handed.id))
        .await
        .json();
    assert_eq!(job["status"], "pending", "{job}");
    assert_eq!(job["submitted_by"]["principal"], "nats:ops", "{job}");

    // A scheduler and an executor arrive: the same job runs and ends.
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
        capstan_protocol::NodeId::new("late-node").expect("valid"),
    );
    executor.work_dir = Some(work.path().to_path_buf());
    tokio::spawn(capstan_executor::run(executor, shutdown.clone()));
    let job = wait_until("the job to end", Duration::from_secs(60), || async {
        let job = http.get(&format!("/api/v1/jobs/{id}")).await.json();
        (job["status"] == "succeeded").then_some(job)
    })
    .await;
    assert_eq!(job["attempts"][0]["attempt"], 1, "{job}");
    assert_eq!(job["attempts"][0]["status"], "succeeded", "{job}");
    let (status, followed) = following.await.expect("the follow ends");
    assert_eq!(status, StatusCode::OK, "{followed}");
    assert!(followed.contains("accepted"), "{followed}");
    assert!(followed.contains("\"status\":\"succeeded\""), "{followed}");
    shutdown.cancel();
    api.await.expect("joins").expect("clean exit");
}

#[tokio::test]
async fn disabling_or_demoting_a_user_cancels_their_waiting_and_running_jobs_and_no_one_elses() {
    let stack = stack().await;
    let olivia = stack.http.new_user("olivia", "operator").await;
    let oscar = stack.http.new_user("oscar", "operator").await;
    let submit = |client: &HttpClient, body: Value| {
        let client = client.clone();
        async move {
            let reply = client.post_json("/api/v1/jobs", &body.to_string()).await;
            assert_eq!(reply.status, StatusCode::ACCEPTED, "{}", reply.text());
            reply.json()["id"].as_str().expect("an id").to_owned()
        }
    };
    let later = json!({"command": "true", "delay": 600});
    let olivias_later = submit(&olivia, later.clone()).await;
    let olivias_running = submit(&olivia, json!({"command": "sleep 60"})).await;
    let oscars_later = submit(&oscar, later.clone()).await;
    let admins_later = submit(&stack.http, later).await;
    // The history shows each as it is: the delayed ones scheduled, the sleep running.
    for (id, status) in [
        (&olivias_later, "scheduled"),
        (&olivias_running, "running"),
        (&oscars_later, "scheduled"),
        (&admins_later, "scheduled"),
    ] {
        wait_until(
            &format!("{id} to be {status} in the history"),
            Duration::from_secs(30),
            || async {
                let page = stack
                    .http
                    .get(&format!("/api/v1/jobs?status={status}&limit=100"))
                    .await
                    .json();
                page["jobs"]
                    .as_array()?
                    .iter()
                    .any(|job| job["id"] == id.as_str())
                    .then_some(())
            },
        )
        .await;
    }

    // Disabled, olivia has both her jobs cancelled, and the audit record names them.
    let disabled = stack
        .http
        .patch_json("/api/v1/users/olivia", r#"{"disabled": true}"#)
        .await;
    assert_eq!(disabled.status, StatusCode::OK, "{}", disabled.text());
    for id in [&olivias_later, &olivias_running] {
        assert_eq!(stack.finished(id).await["status"], "cancelled", "{id}");
    }
    let updates = stack.http.audit("user.update").await;
    assert!(
        updates
            .iter()
            .any(|r| r["detail"].as_str().is_some_and(|d| {
                d.contains("disabled")
                    && d.contains("cancelled their jobs")
                    && d.contains(olivias_later.as_str())
                    && d.contains(olivias_running.as_str())
            })),
        "{updates:?}"
    );
    for id in [&oscars_later, &admins_later] {
        let job = stack.http.get(&format!("/api/v1/jobs/{id}")).await.json();
        assert_eq!(job["status"], "scheduled", "{job}");
    }

    // Demoted to a viewer, who may not submit jobs, oscar has his cancelled; the
    // administrator's waits on.
    let demoted = stack
        .http
        .patch_json("/api/v1/users/oscar", r#"{"role": "viewer"}"#)
        .await;
    assert_eq!(demoted.status, StatusCode::OK, "{}", demoted.text());
    assert_eq!(stack.finished(&oscars_later).await["status"], "cancelled");
    let job = stack
        .http
        .get(&format!("/api/v1/jobs/{admins_later}"))
        .await
        .json();
    assert_eq!(job["status"], "scheduled", "{job}");
    stack.stop().await;
}
