//! The catalogue of remote systems over real HTTP, with a gateway executor checking real
//! OpenSSH servers (testkit `SshHost`) through a real nats-server: credentials that never
//! come back, health as the checks find it (healthy, a refused login, a changed host key, a
//! closed port), a host key pinned on first use and audited, the `nats` listing, the metrics,
//! who may do what, and jobs on a system: output, exit code, environment and input, a timeout
//! and a cancel that leave no remote process, a changed host key, and unknown systems refused.

use std::time::Duration;

use capstan_protocol::NodeId;
use capstan_store::testing::TestDatabase;
use capstan_testkit::http::serde_json_value::{Value, json};
use capstan_testkit::http::{HttpClient, Reply};
use capstan_testkit::sshd::{LOGIN_USER, SshHost, login_processes};
use capstan_testkit::{NatsServer, wait_until};
use futures::StreamExt;
use http::StatusCode;
use tokio_util::sync::CancellationToken;

const GATEWAY: &str = "gateway-1";
const PASSWORD_CANARY: &str = "canary-in-no-reply-7f3a";

struct Stack {
    server: NatsServer,
    http: HttpClient,
    shutdown: CancellationToken,
    api: tokio::task::JoinHandle<Result<(), capstan_api::Error>>,
    _db: TestDatabase,
    _work: tempfile::TempDir,
}

fn keys() -> capstan_secrets::KeyRing {
    static ENTRY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    ENTRY
        .get_or_init(|| capstan_secrets::KeyRing::generate_entry("test").expect("a key"))
        .parse()
        .expect("a key list")
}

/// A registry, a scheduler, a gateway executor checking every 300 ms, and the API.
async fn stack() -> Stack {
    stack_checking_every(Duration::from_millis(300)).await
}

/// The same, the gateway checking each system every `interval`.
async fn stack_checking_every(interval: Duration) -> Stack {
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
    let mut executor =
        capstan_executor::Config::for_url(server.url(), NodeId::new(GATEWAY).expect("valid"));
    executor.work_dir = Some(work.path().to_path_buf());
    executor.labels = vec![("capstan.io/ssh".into(), "true".into())];
    executor.heartbeat_interval = Duration::from_millis(300);
    executor.secret_keys.keys = Some(keys());
    executor.system_check_interval = interval;
    executor.system_check_timeout = Duration::from_secs(5);
    tokio::spawn(capstan_executor::run(executor, shutdown.clone()));
    let db = TestDatabase::sqlite();
    let mut config = capstan_api::Config::for_urls(server.url(), db.url());
    config.secret_keys.keys = Some(keys());
    let running = capstan_api::start(config, shutdown.clone())
        .await
        .expect("the API starts");
    let http = HttpClient::new(format!("http://{}", running.address))
        .login("admin", capstan_api::TEST_ADMIN_PASSWORD)
        .await;
    Stack {
        server,
        http,
        shutdown,
        api: running.task,
        _db: db,
        _work: work,
    }
}

impl Stack {
    async fn add(&self, body: Value) -> Reply {
        self.http
            .post_json("/api/v1/systems", &body.to_string())
            .await
    }

    async fn patch(&self, name: &str, body: Value) -> Reply {
        self.http
            .send(
                http::Method::PATCH,
                &format!("/api/v1/systems/{name}"),
                &[("content-type", "application/json")],
                body.to_string(),
            )
            .await
    }

    /// Waits until the system's health is `health`, and returns the system.
    async fn health_becomes(&self, name: &str, health: &str) -> Value {
        wait_until(
            &format!("system {name} to be {health}"),
            Duration::from_secs(30),
            || async {
                let shown = self
                    .http
                    .get(&format!("/api/v1/systems/{name}"))
                    .await
                    .json();
                (shown["health"]["status"] == health).then_some(shown)
            },
        )
        .await
    }

    /// Waits until the audit trail holds `count` records of `action` (records published by
    /// other services reach the table through the API's projection).
    async fn audited(&self, action: &str, count: usize) -> Vec<Value> {
        wait_until(
            &format!("{count} {action} audit records"),
            Duration::from_secs(30),
            || async {
                let records = self.http.audit(action).await;
                (records.len() >= count).then_some(records)
            },
        )
        .await
    }

    async fn submit(&self, body: Value) -> String {
        let reply = self.http.post_json("/api/v1/jobs", &body.to_string()).await;
        assert_eq!(reply.status, StatusCode::ACCEPTED, "{}", reply.text());
        reply.json()["id"].as_str().expect("an id").to_owned()
    }

    /// Waits until the job has ended, and returns it.
    async fn finished(&self, id: &str) -> Value {
        wait_until(
            &format!("job {id} to end"),
            Duration::from_secs(60),
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

fn password_system(name: &str, host: &SshHost, password: &str, host_key: &str) -> Value {
    json!({
        "name": name,
        "hostname": "127.0.0.1",
        "port": host.port(),
        "username": LOGIN_USER,
        "auth": {"method": "password", "password": password},
        "host_key": host_key,
        "labels": {"role": "web"},
    })
}

#[tokio::test]
async fn a_system_is_checked_healthy_and_shown_listed_and_measured_without_its_credential() {
    let host = SshHost::start().expect("sshd starts");
    let stack = stack().await;
    let client = stack.server.client().await;
    let mut events = client
        .subscribe("capstan.events.systems.>")
        .await
        .expect("subscribes");

    // One system logs in with the host's password; a second one's password is a canary that
    // must come back nowhere (and that the server refuses).
    let added = stack
        .add(password_system(
            "web-1",
            &host,
            host.password(),
            &format!("{} root@web-1", host.host_key()),
        ))
        .await;
    assert_eq!(added.status, StatusCode::CREATED, "{}", added.text());
    let shown = added.json();
    assert_eq!(shown["auth_method"], "password", "{shown}");
    assert_eq!(shown["host_key"], host.host_key(), "the comment is dropped");
    assert_eq!(shown["host_key_source"], "pinned", "{shown}");
    assert_eq!(shown["key_id"], "test", "{shown}");
    assert!(
        shown["auth"].is_null() && shown["password"].is_null(),
        "{shown}"
    );
    let canary = stack
        .add(password_system(
            "web-2",
            &host,
            PASSWORD_CANARY,
            &host.host_key(),
        ))
        .await;
    assert_eq!(canary.status, StatusCode::CREATED, "{}", canary.text());

    let healthy = stack.health_becomes("web-1", "healthy").await;
    assert_eq!(healthy["health"]["checked_by"], GATEWAY, "{healthy}");
    assert!(healthy["health"]["rtt_ms"].as_u64().is_some(), "{healthy}");
    assert!(healthy["health"]["checked_at"].is_string(), "{healthy}");
    let refused = stack.health_becomes("web-2", "auth_failed").await;
    let error = refused["health"]["last_error"].as_str().unwrap_or_default();
    assert!(error.contains("refused"), "{refused}");

    // Listing by label.
    let web = stack
        .http
        .get("/api/v1/systems?label=role=web")
        .await
        .json();
    assert_eq!(web["systems"].as_array().map(Vec::len), Some(2), "{web}");
    let none = stack.http.get("/api/v1/systems?label=role=db").await.json();
    assert_eq!(none["systems"], json!([]), "{none}");
    let bad = stack.http.get("/api/v1/systems?label=role").await;
    bad.assert_problem(StatusCode::BAD_REQUEST, Some("label"));

    // The change is announced, once per change, on the system's subject.
    let event = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let message = events.next().await.expect("an event");
            if message.subject.as_str() == "capstan.events.systems.web-1.healthy" {
                return message;
            }
        }
    })
    .await
    .expect("web-1's change is announced");
    let event: capstan_protocol::SystemEvent =
        capstan_protocol::codec::decode(capstan_protocol::Encoding::MsgPack, &event.payload)
            .expect("a system event");
    assert_eq!(
        event.previous,
        capstan_protocol::SystemHealth::Unknown,
        "{event:?}"
    );
    assert_eq!(event.node, GATEWAY, "{event:?}");
    assert!(event.rtt_ms.is_some(), "{event:?}");

    // `nats` users list the systems, with their health, and no credential even sealed.
    let reply = client
        .request("capstan.systems.list", "".into())
        .await
        .expect("the API answers");
    let listed: Value = serde_json::from_slice(&reply.payload).expect("JSON, as asked");
    let text = listed.to_string();
    assert_eq!(listed["ok"][0]["name"], "web-1", "{text}");
    assert_eq!(listed["ok"][0]["health"], "healthy", "{text}");
    assert_eq!(listed["ok"][1]["health"], "auth_failed", "{text}");
    assert!(
        !text.contains("sealed:") && !text.contains(host.password()),
        "{text}"
    );

    // The metrics give each system its health.
    let metrics = stack.http.get("/metrics").await.text();
    assert!(
        metrics.contains("capstan_system_health{system=\"web-1\",health=\"healthy\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("capstan_remote_systems{health=\"auth_failed\"} 1"),
        "{metrics}"
    );

    // Nowhere in clear: not in a reply, not in any stream or bucket.
    for path in [
        "/api/v1/systems",
        "/api/v1/systems/web-2",
        "/api/v1/audit?limit=100",
    ] {
        let text = stack.http.get(path).await.text();
        assert!(!text.contains(PASSWORD_CANARY), "{path}: {text}");
    }
    let js = async_nats::jetstream::new(client.clone());
    let mut scanned = 0;
    for name in [
        "KV_capstan_systems",
        "KV_capstan_system_status",
        "CAPSTAN_EVENTS",
        "CAPSTAN_AUDIT",
    ] {
        let mut stream = js.get_stream(name).await.expect("the stream");
        let state = stream.info().await.expect("info").state.clone();
        for seq in state.first_sequence..=state.last_sequence {
            if let Ok(message) = stream.get_raw_message(seq).await {
                scanned += 1;
                let payload = String::from_utf8_lossy(&message.payload);
                assert!(
                    !payload.contains(PASSWORD_CANARY),
                    "{name} #{seq}: {payload}"
                );
            }
        }
    }
    assert!(scanned >= 6, "only {scanned} messages read");

    // Both additions are audited, naming the system and never the credential.
    let created = stack.http.audit("system.create").await;
    assert_eq!(created.len(), 2, "{created:?}");
    assert!(
        created
            .iter()
            .any(|r| r["resource"] == "system/web-2" && r["principal"] == "admin"),
        "{created:?}"
    );
    stack.stop().await;
}

#[tokio::test]
async fn a_key_login_a_changed_host_key_and_a_closed_port_each_show_as_their_health() {
    let mut host = SshHost::start().expect("sshd starts");
    let other = SshHost::start().expect("sshd starts");
    let stack = stack().await;
    let key = std::fs::read_to_string(host.client_key()).expect("the client key");
    let by_key = json!({
        "name": "by-key",
        "hostname": "127.0.0.1",
        "port": host.port(),
        "username": LOGIN_USER,
        "auth": {"method": "private_key", "private_key": key},
        "host_key": host.host_key_fingerprint(),
    });
    assert_eq!(stack.add(by_key).await.status, StatusCode::CREATED);
    // Pinned to another server's key: refused before any credential is sent.
    let mismatch = password_system("mismatch", &host, host.password(), &other.host_key());
    assert_eq!(stack.add(mismatch).await.status, StatusCode::CREATED);
    let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("a port");
    let closed_port = closed.local_addr().expect("an address").port();
    drop(closed);
    let mut unreachable = password_system("gone", &host, "x", &host.host_key());
    unreachable["port"] = json!(closed_port);
    assert_eq!(stack.add(unreachable).await.status, StatusCode::CREATED);

    stack.health_becomes("by-key", "healthy").await;
    let mismatched = stack.health_becomes("mismatch", "host_key_mismatch").await;
    let error = mismatched["health"]["last_error"]
        .as_str()
        .unwrap_or_default();
    assert!(error.contains("host key mismatch"), "{mismatched}");
    stack.health_becomes("gone", "unreachable").await;

    // The server's key changes: the pinned system turns host_key_mismatch.
    host.change_host_key()
        .expect("sshd restarts with a new key");
    stack.health_becomes("by-key", "host_key_mismatch").await;

    // Its administrator pins the new key: healthy again, and the change is audited as such.
    let repinned = stack
        .patch("by-key", json!({"host_key": host.host_key()}))
        .await;
    assert_eq!(repinned.status, StatusCode::OK, "{}", repinned.text());
    assert_eq!(
        repinned.json()["health"]["status"],
        "unknown",
        "the old finding is forgotten"
    );
    stack.health_becomes("by-key", "healthy").await;
    let updates = stack.http.audit("system.update").await;
    assert_eq!(updates.len(), 1, "{updates:?}");
    assert_eq!(updates[0]["detail"], "changed host_key", "{updates:?}");

    // An inactive system is left alone; removing one removes its status with it.
    let removed = stack
        .http
        .send(http::Method::DELETE, "/api/v1/systems/gone", &[], "")
        .await;
    assert_eq!(removed.status, StatusCode::NO_CONTENT, "{}", removed.text());
    let js = async_nats::jetstream::new(stack.server.client().await);
    let status = js
        .get_key_value("capstan_system_status")
        .await
        .expect("the bucket");
    assert!(status.get("gone").await.expect("reads").is_none());
    let missing = stack.http.get("/api/v1/systems/gone").await;
    missing.assert_problem(StatusCode::NOT_FOUND, None);
    stack.stop().await;
}

#[tokio::test]
async fn trust_on_first_use_pins_the_first_key_audits_it_and_then_refuses_another() {
    let mut host = SshHost::start().expect("sshd starts");
    let stack = stack().await;
    let mut body = password_system("tofu", &host, host.password(), "");
    body.as_object_mut().expect("an object").remove("host_key");
    let refused = stack.add(body.clone()).await;
    refused.assert_problem(StatusCode::UNPROCESSABLE_ENTITY, Some("host_key"));

    body["trust_on_first_use"] = json!(true);
    let added = stack.add(body).await;
    assert_eq!(added.status, StatusCode::CREATED, "{}", added.text());
    assert!(added.json()["host_key"].is_null(), "{}", added.text());
    let pinned = stack.health_becomes("tofu", "healthy").await;
    assert_eq!(pinned["host_key"], host.host_key(), "{pinned}");
    assert_eq!(pinned["host_key_source"], "first_use", "{pinned}");
    let audited = stack.audited("system.pin", 1).await;
    assert_eq!(audited.len(), 1, "{audited:?}");
    assert_eq!(audited[0]["resource"], "system/tofu", "{audited:?}");
    assert_eq!(
        audited[0]["principal"],
        format!("node:{GATEWAY}"),
        "{audited:?}"
    );
    let detail = audited[0]["detail"].as_str().unwrap_or_default();
    assert!(detail.contains(&host.host_key_fingerprint()), "{detail}");

    // The pin holds: a new key is a mismatch, not a new pin.
    host.change_host_key()
        .expect("sshd restarts with a new key");
    stack.health_becomes("tofu", "host_key_mismatch").await;
    let still = stack.http.get("/api/v1/systems/tofu").await.json();
    assert_ne!(still["host_key"], host.host_key(), "{still}");
    assert_eq!(stack.http.audit("system.pin").await.len(), 1);
    stack.stop().await;
}

#[tokio::test]
async fn only_administrators_change_systems_and_bad_input_names_its_field_and_stores_nothing() {
    let host = SshHost::start().expect("sshd starts");
    let stack = stack().await;
    let good = password_system("web-1", &host, "pw", &host.host_key());
    let cases: Vec<(Value, &str)> = vec![
        (json!({"name": "web.1"}), "name"),
        (json!({"hostname": "-oProxyCommand=x"}), "hostname"),
        (json!({"port": 0}), "port"),
        (json!({"username": "a b"}), "username"),
        (json!({"host_key": "MD5:aa:bb"}), "host_key"),
        (json!({"auth": {"method": "password"}}), "auth.password"),
        (
            json!({"auth": {"method": "private_key", "private_key": "not a key"}}),
            "auth.private_key",
        ),
        (
            json!({"auth": {"method": "password", "password": "x", "private_key": "y"}}),
            "auth.private_key",
        ),
        (json!({"labels": {"bad key": "v"}}), "labels.bad key"),
    ];
    for (change, field) in cases {
        let mut body = good.clone();
        for (key, value) in change.as_object().expect("an object") {
            body[key] = value.clone();
        }
        let refused = stack.add(body).await;
        refused.assert_problem(StatusCode::UNPROCESSABLE_ENTITY, Some(field));
    }
    let unknown_field = stack.add(json!({"name": "x", "shell": "/bin/sh"})).await;
    assert!(
        unknown_field.status.is_client_error(),
        "{}",
        unknown_field.text()
    );
    let listed = stack.http.get("/api/v1/systems").await.json();
    assert_eq!(listed["systems"], json!([]), "nothing stored: {listed}");

    assert_eq!(stack.add(good.clone()).await.status, StatusCode::CREATED);
    let again = stack.add(good.clone()).await;
    again.assert_problem(StatusCode::CONFLICT, None);
    let nobody = stack.patch("nobody", json!({"active": false})).await;
    nobody.assert_problem(StatusCode::NOT_FOUND, None);
    let unpinned = stack.patch("web-1", json!({"host_key": null})).await;
    unpinned.assert_problem(StatusCode::UNPROCESSABLE_ENTITY, Some("host_key"));

    // An operator and a viewer read the catalogue, and change nothing in it.
    for (name, role) in [("olivia", "operator"), ("victor", "viewer")] {
        let user = stack.http.new_user(name, role).await;
        assert_eq!(user.get("/api/v1/systems").await.status, StatusCode::OK);
        let mut other = good.clone();
        other["name"] = json!(format!("{name}-box"));
        let added = user.post_json("/api/v1/systems", &other.to_string()).await;
        added.assert_problem(StatusCode::FORBIDDEN, None);
        assert_eq!(
            added.json()["permission"],
            "systems:manage",
            "{}",
            added.text()
        );
        let changed = user
            .send(
                http::Method::PATCH,
                "/api/v1/systems/web-1",
                &[("content-type", "application/json")],
                json!({"hostname": "10.0.0.66"}).to_string(),
            )
            .await;
        changed.assert_problem(StatusCode::FORBIDDEN, None);
        let removed = user
            .send(http::Method::DELETE, "/api/v1/systems/web-1", &[], "")
            .await;
        removed.assert_problem(StatusCode::FORBIDDEN, None);
    }
    let kept = stack.http.get("/api/v1/systems/web-1").await.json();
    assert_eq!(kept["hostname"], "127.0.0.1", "{kept}");
    // Every refusal is audited (under `auth.denied`, naming the system).
    let denied = stack.http.audit("auth.denied").await;
    let on_systems = denied
        .iter()
        .filter(|r| {
            r["resource"]
                .as_str()
                .is_some_and(|r| r.starts_with("system/"))
        })
        .count();
    assert_eq!(on_systems, 6, "{denied:?}");
    stack.stop().await;
}

#[tokio::test]
async fn a_job_on_a_system_runs_there_with_its_environment_and_input_and_reports_output_and_exit() {
    let host = SshHost::start().expect("sshd starts");
    let stack = stack().await;
    let added = stack
        .add(password_system(
            "web-1",
            &host,
            host.password(),
            &host.host_key(),
        ))
        .await;
    assert_eq!(added.status, StatusCode::CREATED, "{}", added.text());
    let id = stack
        .submit(json!({
            "command": "read line; echo \"$line to $GREETING as $(id -un) for $CAPSTAN_JOB_ID\"; \
                        echo oops >&2; exit 3",
            "system": "web-1",
            "env": {"GREETING": "it's `web`"},
            "stdin": "payload\n",
        }))
        .await;
    let job = stack.finished(&id).await;
    assert_eq!(job["status"], "failed", "{job}");
    assert_eq!(job["exit_code"], 3, "{job}");
    assert_eq!(job["node"], GATEWAY, "{job}");
    assert_eq!(job["spec"]["system"], "web-1", "{job}");
    let logs = wait_until("the job's output", Duration::from_secs(30), || async {
        let logs = stack
            .http
            .get(&format!("/api/v1/jobs/{id}/logs"))
            .await
            .json();
        (logs["complete"] == true).then_some(logs)
    })
    .await;
    assert_eq!(
        logs["stdout"],
        format!("payload to it's `web` as {LOGIN_USER} for {id}\n"),
        "{logs}"
    );
    assert_eq!(logs["stderr"], "oops\n", "{logs}");

    // An argv is quoted for the remote shell, argument by argument.
    let id = stack
        .submit(json!({"argv": ["printf", "%s|", "a b", "$HOME", "it's"], "system": "web-1"}))
        .await;
    let job = stack.finished(&id).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    let logs = stack
        .http
        .get(&format!("/api/v1/jobs/{id}/logs"))
        .await
        .json();
    assert_eq!(logs["stdout"], "a b|$HOME|it's|", "{logs}");
    stack.stop().await;
}

#[tokio::test]
async fn a_remote_job_past_its_timeout_or_cancelled_leaves_no_remote_process() {
    let host = SshHost::start().expect("sshd starts");
    let stack = stack().await;
    let added = stack
        .add(password_system(
            "web-1",
            &host,
            host.password(),
            &host.host_key(),
        ))
        .await;
    assert_eq!(added.status, StatusCode::CREATED, "{}", added.text());
    // Sleeps named after this host's port, so that no other test's processes are counted; the
    // first ignores SIGTERM, so only the SIGKILL after the grace ends it.
    let (stubborn, plain) = (
        format!("sleep {}1", host.port()),
        format!("sleep {}2", host.port()),
    );
    let id = stack
        .submit(json!({
            "command": format!("(trap '' TERM; exec {stubborn}) & exec {plain}"),
            "system": "web-1",
            "timeout": 4,
        }))
        .await;
    wait_until(
        "both remote sleeps to run",
        Duration::from_secs(30),
        || async {
            (login_processes(&stubborn).len() == 1 && login_processes(&plain).len() == 1)
                .then_some(())
        },
    )
    .await;
    let job = stack.finished(&id).await;
    assert_eq!(job["status"], "timed_out", "{job}");
    wait_until("no remote sleep left", Duration::from_secs(30), || async {
        (login_processes(&stubborn).is_empty() && login_processes(&plain).is_empty()).then_some(())
    })
    .await;

    let id = stack
        .submit(json!({"command": format!("exec {plain}"), "system": "web-1"}))
        .await;
    wait_until(
        "the remote sleep to run",
        Duration::from_secs(30),
        || async { (login_processes(&plain).len() == 1).then_some(()) },
    )
    .await;
    let cancelled = stack
        .http
        .post_json(&format!("/api/v1/jobs/{id}/cancel"), "")
        .await;
    assert_eq!(
        cancelled.status,
        StatusCode::ACCEPTED,
        "{}",
        cancelled.text()
    );
    let asked = std::time::Instant::now();
    let job = stack.finished(&id).await;
    assert_eq!(job["status"], "cancelled", "{job}");
    wait_until(
        "the remote sleep to end",
        Duration::from_secs(10),
        || async { (login_processes(&plain).is_empty()).then_some(()) },
    )
    .await;
    assert!(
        asked.elapsed() < Duration::from_secs(5),
        "stopped {:?} after the cancel",
        asked.elapsed()
    );
    stack.stop().await;
}

#[tokio::test]
async fn unknown_or_inactive_systems_are_refused_and_a_changed_host_key_fails_the_job() {
    let mut host = SshHost::start().expect("sshd starts");
    let stack = stack().await;
    let refused = stack
        .http
        .post_json(
            "/api/v1/jobs",
            &json!({"command": "true", "system": "nope"}).to_string(),
        )
        .await;
    refused.assert_problem(StatusCode::UNPROCESSABLE_ENTITY, Some("system"));
    let with_secret = stack
        .http
        .post_json(
            "/api/v1/jobs",
            &json!({"command": "true", "system": "web-1", "secret_refs": {"A": "db"}}).to_string(),
        )
        .await;
    with_secret.assert_problem(StatusCode::UNPROCESSABLE_ENTITY, Some("secret_refs"));

    // Over NATS: the scheduler refuses it, and says why on the rejections subject.
    let client = stack.server.client().await;
    let mut rejections = client
        .subscribe("capstan.events.rejected.submit")
        .await
        .expect("subscribes");
    client.flush().await.expect("flushed");
    let js = async_nats::jetstream::new(client.clone());
    js.publish(
        "capstan.jobs.submit",
        json!({"command": "true", "system": "nope"})
            .to_string()
            .into(),
    )
    .await
    .expect("sent")
    .await
    .expect("stored");
    let rejection = tokio::time::timeout(Duration::from_secs(30), rejections.next())
        .await
        .expect("a rejection in time")
        .expect("a message");
    let rejection: capstan_protocol::Rejection =
        capstan_protocol::codec::decode(capstan_protocol::Encoding::MsgPack, &rejection.payload)
            .expect("a rejection");
    assert_eq!(rejection.field.as_deref(), Some("system"), "{rejection:?}");
    assert!(
        rejection.reason.contains("no system `nope`"),
        "{rejection:?}"
    );

    let mut inactive = password_system("idle", &host, host.password(), &host.host_key());
    inactive["active"] = json!(false);
    assert_eq!(stack.add(inactive).await.status, StatusCode::CREATED);
    let refused = stack
        .http
        .post_json(
            "/api/v1/jobs",
            &json!({"command": "true", "system": "idle"}).to_string(),
        )
        .await;
    refused.assert_problem(StatusCode::UNPROCESSABLE_ENTITY, Some("system"));

    // The server's key changes: the job fails before any credential is sent.
    let added = stack
        .add(password_system(
            "web-1",
            &host,
            host.password(),
            &host.host_key(),
        ))
        .await;
    assert_eq!(added.status, StatusCode::CREATED, "{}", added.text());
    host.change_host_key()
        .expect("sshd restarts with a new key");
    let id = stack
        .submit(json!({"command": "echo should not run", "system": "web-1"}))
        .await;
    let job = stack.finished(&id).await;
    assert_eq!(job["status"], "failed", "{job}");
    let error = job["error"].as_str().unwrap_or_default();
    assert!(error.contains("host key mismatch"), "{job}");
    stack.stop().await;
}

#[tokio::test]
async fn a_refused_login_a_silent_host_and_a_flood_of_output_each_end_a_remote_job_clearly() {
    let host = SshHost::start().expect("sshd starts");
    let stack = stack().await;
    let wrong = password_system("wrong", &host, "not the password", &host.host_key());
    assert_eq!(stack.add(wrong).await.status, StatusCode::CREATED);
    // A host that accepts connections and never says a word.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("a port");
    let mut quiet = password_system("silent", &host, host.password(), &host.host_key());
    quiet["port"] = json!(silent.local_addr().expect("an address").port());
    assert_eq!(stack.add(quiet).await.status, StatusCode::CREATED);
    let good = password_system("web-1", &host, host.password(), &host.host_key());
    assert_eq!(stack.add(good).await.status, StatusCode::CREATED);

    let refused = stack
        .submit(json!({"command": "true", "system": "wrong"}))
        .await;
    let silenced = stack
        .submit(json!({"command": "true", "system": "silent"}))
        .await;
    // 1 GiB of output: the first MiB is kept, the rest counted, and the job still ends.
    let flood = stack
        .submit(json!({"command": "head -c 1073741824 /dev/zero", "system": "web-1"}))
        .await;

    let job = stack.finished(&refused).await;
    assert_eq!(job["status"], "failed", "{job}");
    let error = job["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("authentication") && error.contains("refused"),
        "{job}"
    );
    assert!(!job.to_string().contains("not the password"), "{job}");

    let job = stack.finished(&silenced).await;
    assert_eq!(job["status"], "failed", "{job}");
    let error = job["error"].as_str().unwrap_or_default();
    assert!(error.contains("cannot connect"), "{job}");

    let job = stack.finished(&flood).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(job["output"]["stdout_bytes"], 1_073_741_824_u64, "{job}");
    assert_eq!(job["output"]["truncated"], true, "{job}");
    drop(silent);
    stack.stop().await;
}

#[tokio::test]
async fn a_job_that_connects_before_any_check_pins_a_first_use_key_and_audits_it() {
    let host = SshHost::start().expect("sshd starts");
    // Checks an hour apart: the gateway looks again only 15 s after it started.
    let stack = stack_checking_every(Duration::from_secs(3600)).await;
    let mut body = password_system("tofu", &host, host.password(), "");
    body.as_object_mut().expect("an object").remove("host_key");
    body["trust_on_first_use"] = json!(true);
    assert_eq!(stack.add(body).await.status, StatusCode::CREATED);
    let id = stack
        .submit(json!({"command": "true", "system": "tofu"}))
        .await;
    let job = stack.finished(&id).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    let shown = stack.http.get("/api/v1/systems/tofu").await.json();
    assert_eq!(shown["host_key"], host.host_key(), "{shown}");
    assert_eq!(shown["host_key_source"], "first_use", "{shown}");
    assert_eq!(
        shown["health"]["status"], "unknown",
        "no check ran: {shown}"
    );
    let audited = stack.audited("system.pin", 1).await;
    assert_eq!(audited[0]["resource"], "system/tofu", "{audited:?}");
    stack.stop().await;
}

#[tokio::test]
async fn a_remote_job_whose_ssh_server_dies_mid_run_fails_saying_so_and_leaves_no_process() {
    let host = SshHost::start().expect("sshd starts");
    let stack = stack().await;
    let added = stack
        .add(password_system(
            "web-1",
            &host,
            host.password(),
            &host.host_key(),
        ))
        .await;
    assert_eq!(added.status, StatusCode::CREATED, "{}", added.text());
    let hang = format!("sleep {}8", host.port());
    let id = stack
        .submit(json!({"command": format!("exec {hang}"), "system": "web-1"}))
        .await;
    let pid = wait_until(
        "the remote sleep to run",
        Duration::from_secs(30),
        || async { login_processes(&hang).first().copied() },
    )
    .await;
    // The server's process for this session is the command's parent: it dies.
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("its status");
    let parent: i32 = status
        .lines()
        .find_map(|line| line.strip_prefix("PPid:"))
        .and_then(|ppid| ppid.trim().parse().ok())
        .expect("a parent");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(parent),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("the session's server process is killed");

    let job = stack.finished(&id).await;
    assert_eq!(job["status"], "failed", "{job}");
    let error = job["error"].as_str().unwrap_or_default();
    assert!(error.contains("without the command's exit status"), "{job}");
    wait_until(
        "the remote sleep to end",
        Duration::from_secs(30),
        || async { login_processes(&hang).is_empty().then_some(()) },
    )
    .await;
    stack.stop().await;
}
