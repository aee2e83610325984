//! Workflows over real HTTP on a real nats-server, with the history in SQLite: a diamond is
//! created and starts its root step (a job submitted as its creator, naming its workflow and
//! step), shown step by step and listed newest first; invalid definitions are refused naming
//! the wrong path, and nothing is stored; who may create and cancel whose workflows, and the
//! audit trail of both; a creator disabled, demoted or deleted has theirs cancelled; unknown
//! ids. The API alone carries these: it stores a workflow and
//! submits its first steps. One test adds a scheduler, which carries a cancelled workflow to
//! its end.

use std::time::Duration;

use capstan_store::testing::TestDatabase;
use capstan_testkit::http::serde_json_value::{Value, json};
use capstan_testkit::http::{HttpClient, Reply};
use capstan_testkit::{NatsServer, wait_until};
use http::StatusCode;
use tokio_util::sync::CancellationToken;

struct Stack {
    _server: NatsServer,
    http: HttpClient,
    shutdown: CancellationToken,
    api: tokio::task::JoinHandle<Result<(), capstan_api::Error>>,
    _db: TestDatabase,
}

/// The API on a fresh nats-server, with a scheduler when `scheduler`; no executor: step jobs
/// are accepted and wait.
async fn stack(scheduler: bool) -> Stack {
    let server = NatsServer::start().await;
    let shutdown = CancellationToken::new();
    if scheduler {
        tokio::spawn(capstan_scheduler::run(
            capstan_scheduler::Config::for_url(server.url()),
            shutdown.clone(),
        ));
    }
    let db = TestDatabase::sqlite();
    let config = capstan_api::Config::for_urls(server.url(), db.url());
    let running = capstan_api::start(config, shutdown.clone())
        .await
        .expect("the API starts");
    let http = HttpClient::new(format!("http://{}", running.address))
        .login("admin", capstan_api::TEST_ADMIN_PASSWORD)
        .await;
    Stack {
        _server: server,
        http,
        shutdown,
        api: running.task,
        _db: db,
    }
}

impl Stack {
    async fn workflow(&self, id: &str) -> Value {
        let reply = self.http.get(&format!("/api/v1/workflows/{id}")).await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
        reply.json()
    }

    async fn listed(&self, query: &str) -> Vec<Value> {
        let reply = self.http.get(&format!("/api/v1/workflows{query}")).await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
        reply.json()["items"].as_array().cloned().expect("items")
    }

    async fn stop(self) {
        self.shutdown.cancel();
        self.api.await.expect("joins").expect("clean exit");
    }
}

async fn create(client: &HttpClient, body: &Value) -> Reply {
    client
        .post_json("/api/v1/workflows", &body.to_string())
        .await
}

/// Creates `body` as `client`, expecting `201`; returns the workflow.
async fn created(client: &HttpClient, body: &Value) -> Value {
    let reply = create(client, body).await;
    assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.text());
    reply.json()
}

async fn cancel(client: &HttpClient, id: &str) -> Reply {
    client
        .send(
            http::Method::POST,
            &format!("/api/v1/workflows/{id}/cancel"),
            &[],
            "",
        )
        .await
}

/// The step named `name` of a workflow's view.
fn step<'a>(view: &'a Value, name: &str) -> &'a Value {
    view["steps"]
        .as_array()
        .and_then(|steps| steps.iter().find(|s| s["name"] == name))
        .unwrap_or_else(|| panic!("no step {name} in {view}"))
}

/// A step running `/bin/true` after `depends_on`.
fn true_step(name: &str, depends_on: &[&str]) -> Value {
    json!({"name": name, "job": {"argv": ["/bin/true"]}, "depends_on": depends_on})
}

/// build → (test-a, test-b) → deploy → clean-up (always).
fn diamond(name: &str) -> Value {
    json!({
        "name": name,
        "fail_fast": true,
        "steps": [
            {
                "name": "build",
                "job": {"command": "make", "env": {"API_TOKEN": "do-not-show"}, "stdin": "payload-not-shown"},
            },
            true_step("test-a", &["build"]),
            true_step("test-b", &["build"]),
            {
                "name": "deploy",
                "job": {"argv": ["/bin/true"]},
                "depends_on": ["test-a", "test-b"],
                "when": "on_success",
            },
            {
                "name": "clean-up",
                "job": {"argv": ["/bin/true"]},
                "depends_on": ["deploy"],
                "when": "always",
            },
        ],
    })
}

#[tokio::test]
async fn a_diamond_starts_its_root_step_as_a_job_of_its_creator_naming_its_workflow_and_step() {
    let stack = stack(false).await;
    let reply = create(&stack.http, &diamond("release")).await;
    assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.text());
    let view = reply.json();
    let id = view["id"].as_str().expect("an id").to_owned();
    assert_eq!(
        reply.headers.get("location").and_then(|v| v.to_str().ok()),
        Some(format!("/api/v1/workflows/{id}").as_str())
    );
    assert_eq!(
        (
            &view["name"],
            &view["status"],
            &view["fail_fast"],
            &view["owner"]
        ),
        (
            &json!("release"),
            &json!("running"),
            &json!(true),
            &json!("admin")
        ),
        "{view}"
    );
    assert!(view["created_at"].is_string() && view["updated_at"].is_string());
    assert!(view["finished_at"].is_null() && view["cancel_requested_at"].is_null());

    // Every step is shown, in order, with its graph; only the root has started.
    let shown = stack.workflow(&id).await;
    let names: Vec<&str> = shown["steps"]
        .as_array()
        .expect("steps")
        .iter()
        .map(|s| s["name"].as_str().expect("a name"))
        .collect();
    assert_eq!(names, ["build", "test-a", "test-b", "deploy", "clean-up"]);
    let build = step(&shown, "build");
    assert_eq!(build["status"], "running", "{shown}");
    assert_eq!(build["depends_on"], json!([]), "{shown}");
    assert_eq!(build["when"], "on_success", "{shown}");
    assert!(build["started_at"].is_string(), "{shown}");
    let job = build["job"]
        .as_str()
        .expect("the root step's job")
        .to_owned();
    for name in ["test-a", "test-b", "deploy", "clean-up"] {
        let waiting = step(&shown, name);
        assert_eq!(waiting["status"], "waiting", "{shown}");
        assert!(waiting["job"].is_null(), "{shown}");
    }
    assert_eq!(
        step(&shown, "deploy")["depends_on"],
        json!(["test-a", "test-b"])
    );
    assert_eq!(step(&shown, "clean-up")["when"], "always");
    // What the steps' jobs carry is not part of the workflow's view.
    let text = shown.to_string();
    for hidden in ["do-not-show", "payload-not-shown", "make", "API_TOKEN"] {
        assert!(!text.contains(hidden), "{hidden} shown in {text}");
    }

    // The root step's job is accepted, submitted as the creator, naming its workflow and step.
    let accepted = stack.http.get(&format!("/api/v1/jobs/{job}")).await;
    assert_eq!(accepted.status, StatusCode::OK, "{}", accepted.text());
    let accepted = accepted.json();
    assert_eq!(accepted["status"], "pending", "{accepted}");
    assert_eq!(accepted["submitted_by"]["principal"], "admin", "{accepted}");
    assert_eq!(
        accepted["spec"]["metadata"]["capstan.io/workflow"],
        json!(id)
    );
    assert_eq!(accepted["spec"]["metadata"]["capstan.io/step"], "build");
    assert_eq!(accepted["spec"]["command"], "make", "{accepted}");

    // Listed, with its steps counted; newest first; filtered by status.
    let later = created(
        &stack.http,
        &json!({"name": "later", "steps": [true_step("only", &[])]}),
    )
    .await;
    let items = stack.listed("").await;
    let ids: Vec<&str> = items
        .iter()
        .map(|w| w["id"].as_str().expect("an id"))
        .collect();
    assert_eq!(ids, [later["id"].as_str().expect("an id"), id.as_str()]);
    let summary = &items[1];
    assert_eq!(
        (&summary["name"], &summary["status"], &summary["owner"]),
        (&json!("release"), &json!("running"), &json!("admin"))
    );
    assert_eq!(
        summary["steps"],
        json!({"total": 5, "waiting": 4, "running": 1, "succeeded": 0, "failed": 0, "cancelled": 0, "skipped": 0})
    );
    assert_eq!(stack.listed("?status=running").await.len(), 2);
    assert_eq!(stack.listed("?status=succeeded").await, Vec::<Value>::new());
    let bad_filter = stack.http.get("/api/v1/workflows?status=sometimes").await;
    bad_filter.assert_problem(StatusCode::BAD_REQUEST, None);
    stack.stop().await;
}

#[tokio::test]
async fn an_invalid_workflow_is_refused_naming_the_wrong_path_and_nothing_is_stored() {
    let stack = stack(false).await;
    let ok = |name: &str| true_step(name, &[]);
    let with_job =
        |job: Value| json!({"name": "w", "steps": [ok("first"), {"name": "second", "job": job}]});
    let cases = [
        (
            json!({"name": "w", "steps": [true_step("a", &["c"]), true_step("b", &["a"]), true_step("c", &["b"])]}),
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("steps[0].depends_on"),
            "a cycle: a → c → b → a",
        ),
        (
            json!({"name": "w", "steps": [ok("a"), true_step("b", &["a", "z"])]}),
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("steps[1].depends_on[1]"),
            "no step is named `z`",
        ),
        (
            json!({"name": "w", "steps": [ok("a"), ok("a")]}),
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("steps[1].name"),
            "also the name of steps[0]",
        ),
        (
            json!({"name": "w", "steps": [ok("a"), true_step("b", &["b"])]}),
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("steps[1].depends_on[0]"),
            "the step itself",
        ),
        (
            json!({"name": "w", "steps": [ok("a.b")]}),
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("steps[0].name"),
            "letters, digits",
        ),
        (
            with_job(json!({"argv": []})),
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("steps[1].job.argv"),
            "",
        ),
        (
            with_job(json!({"command": "true", "argv": ["/bin/true"]})),
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("steps[1].job.command"),
            "",
        ),
        (
            with_job(json!({"argv": ["/bin/true"], "timeout": -1})),
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("steps[1].job.timeout"),
            "",
        ),
        (
            with_job(json!({"argv": ["/bin/true"], "delay": 5})),
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("steps[1].job.run_at"),
            "",
        ),
        (
            with_job(json!({"argv": ["/bin/true"], "idempotency_key": "k"})),
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("steps[1].job.idempotency_key"),
            "",
        ),
        (
            with_job(json!({"argv": ["/bin/true"], "secrets": {"TOKEN": "x"}})),
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("steps[1].job.secrets"),
            "secret_refs",
        ),
        (
            with_job(json!({"argv": ["/bin/true"], "system": "nowhere"})),
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("steps[1].job.system"),
            "",
        ),
        (
            with_job(json!({"argv": ["/bin/true"], "systems": {"names": ["a", "b"]}})),
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("steps[1].job.systems"),
            "fan-out",
        ),
        (
            with_job(json!({"argv": ["/bin/true"], "metadata": {"capstan.io/step": "x"}})),
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("steps[1].job.metadata.capstan.io/step"),
            "set by the workflow",
        ),
        (
            with_job(json!({"argv": "/bin/true"})),
            StatusCode::BAD_REQUEST,
            Some("steps[1].job.argv"),
            "",
        ),
        (
            with_job(json!({"argv": ["/bin/true"], "colour": "red"})),
            StatusCode::BAD_REQUEST,
            Some("steps[1].job.colour"),
            "unknown field `colour`",
        ),
        (
            json!({"name": "w", "steps": [{"name": "a", "job": {"argv": ["/bin/true"]}, "when": "sometimes"}]}),
            StatusCode::BAD_REQUEST,
            Some("steps[0].when"),
            "",
        ),
        (
            json!({"name": "w", "steps": []}),
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("steps"),
            "1 to 100 steps",
        ),
        (
            json!({"name": "w", "steps": (0..101).map(|n| ok(&format!("s{n}"))).collect::<Vec<_>>()}),
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("steps"),
            "got 101",
        ),
        (
            json!({"name": "", "steps": [ok("a")]}),
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("name"),
            "",
        ),
        (
            json!({"name": "two\nlines", "steps": [ok("a")]}),
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("name"),
            "control character",
        ),
        (
            json!({"name": "n".repeat(129), "steps": [ok("a")]}),
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("name"),
            "at most 128",
        ),
        (
            json!({"name": "w", "steps": [ok("a")], "retries": 3}),
            StatusCode::BAD_REQUEST,
            Some("retries"),
            "",
        ),
    ];
    // The handler audits what it refuses; a body the parser refuses never reaches it.
    let handled = cases
        .iter()
        .filter(|case| case.1 == StatusCode::UNPROCESSABLE_ENTITY)
        .count();
    for (body, status, field, says) in cases {
        let refused = create(&stack.http, &body).await;
        refused.assert_problem(status, field);
        let detail = refused.json()["detail"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        assert!(detail.contains(says), "{detail:?} does not say {says:?}");
    }
    // Malformed JSON, and a body that is not JSON.
    let malformed = stack
        .http
        .post_json("/api/v1/workflows", r#"{"name": "w", "steps": ["#)
        .await;
    malformed.assert_problem(StatusCode::BAD_REQUEST, None);
    assert!(malformed.json()["field"].is_null(), "{}", malformed.text());
    let text = stack
        .http
        .send(
            http::Method::POST,
            "/api/v1/workflows",
            &[("content-type", "text/plain")],
            "name: w",
        )
        .await;
    text.assert_problem(StatusCode::UNSUPPORTED_MEDIA_TYPE, None);

    // Nothing was stored, and no step's job was submitted.
    assert_eq!(stack.listed("").await, Vec::<Value>::new());
    let jobs = stack.http.get("/api/v1/jobs").await.json();
    assert_eq!(jobs["jobs"], json!([]), "{jobs}");
    // The refusals the handler made are audited as failed creations.
    let failures = stack
        .http
        .audit("workflow.create")
        .await
        .into_iter()
        .filter(|r| r["outcome"] == "failure")
        .count();
    assert_eq!(failures, handled, "failed creations audited");
    stack.stop().await;
}

#[tokio::test]
async fn viewers_cannot_create_and_operators_cancel_only_their_own_workflows() {
    let stack = stack(false).await;
    let olivia = stack.http.new_user("olivia", "operator").await;
    let oscar = stack.http.new_user("oscar", "operator").await;
    let victor = stack.http.new_user("victor", "viewer").await;

    // A viewer reads workflows and creates none.
    let refused = create(&victor, &diamond("victors")).await;
    refused.assert_problem(StatusCode::FORBIDDEN, None);
    assert_eq!(refused.json()["permission"], "jobs:submit");
    let olivias = created(&olivia, &diamond("olivias")).await;
    let olivias_id = olivias["id"].as_str().expect("an id").to_owned();
    assert_eq!(olivias["owner"], "olivia");
    let seen = victor.get(&format!("/api/v1/workflows/{olivias_id}")).await;
    assert_eq!(seen.status, StatusCode::OK, "{}", seen.text());
    let listed = victor.get("/api/v1/workflows").await;
    assert_eq!(listed.status, StatusCode::OK, "{}", listed.text());
    assert_eq!(listed.json()["items"].as_array().map(Vec::len), Some(1));
    let refused = cancel(&victor, &olivias_id).await;
    refused.assert_problem(StatusCode::FORBIDDEN, None);
    assert_eq!(refused.json()["permission"], "jobs:cancel:own");

    // An operator does not cancel another operator's workflow.
    let refused = cancel(&oscar, &olivias_id).await;
    refused.assert_problem(StatusCode::FORBIDDEN, None);
    assert_eq!(refused.json()["permission"], "jobs:cancel:any");
    let untouched = stack.workflow(&olivias_id).await;
    assert!(untouched["cancel_requested_at"].is_null(), "{untouched}");
    let unknown = cancel(&oscar, "01ARZ3NDEKTSV4RRFFQ69G5FAV").await;
    unknown.assert_problem(StatusCode::NOT_FOUND, None);

    // Its owner does: the waiting steps are skipped but for the `always` one, which starts
    // at once (the step it waits for was skipped), and the root step's job (no scheduler took
    // it) is still running.
    let cancelled = cancel(&olivia, &olivias_id).await;
    assert_eq!(
        cancelled.status,
        StatusCode::ACCEPTED,
        "{}",
        cancelled.text()
    );
    let cancelled = cancelled.json();
    assert!(cancelled["cancel_requested_at"].is_string(), "{cancelled}");
    assert_eq!(cancelled["status"], "running", "{cancelled}");
    for name in ["test-a", "test-b", "deploy"] {
        assert_eq!(step(&cancelled, name)["status"], "skipped", "{cancelled}");
    }
    let clean_up = step(&cancelled, "clean-up");
    assert_eq!(clean_up["status"], "running", "{cancelled}");
    assert!(clean_up["job"].is_string(), "{cancelled}");
    assert_eq!(
        step(&cancelled, "build")["status"],
        "running",
        "{cancelled}"
    );
    // Asked again while it still runs: accepted, the first request's time kept.
    let again = cancel(&olivia, &olivias_id).await;
    assert_eq!(again.status, StatusCode::ACCEPTED, "{}", again.text());
    assert_eq!(
        again.json()["cancel_requested_at"],
        cancelled["cancel_requested_at"]
    );

    // An administrator cancels anyone's.
    let oscars = created(&oscar, &diamond("oscars")).await;
    let oscars_id = oscars["id"].as_str().expect("an id").to_owned();
    let by_admin = cancel(&stack.http, &oscars_id).await;
    assert_eq!(by_admin.status, StatusCode::ACCEPTED, "{}", by_admin.text());
    assert!(by_admin.json()["cancel_requested_at"].is_string());
    assert_eq!(by_admin.json()["owner"], "oscar");

    // Creations and cancels are audited by workflow, refusals under `auth.denied`.
    let resource = |id: &str| json!(format!("workflow/{id}"));
    let creations: Vec<Value> = stack
        .http
        .audit("workflow.create")
        .await
        .into_iter()
        .filter(|r| r["outcome"] == "success")
        .collect();
    assert_eq!(creations.len(), 2, "{creations:?}");
    assert!(
        creations
            .iter()
            .any(|r| r["resource"] == resource(&olivias_id)
                && r["principal"] == "olivia"
                && r["detail"].as_str().is_some_and(|d| d.contains("olivias")))
    );
    assert!(creations.iter().all(|r| {
        !r["detail"]
            .as_str()
            .unwrap_or_default()
            .contains("do-not-show")
    }));
    let cancels: Vec<(Value, Value)> = stack
        .http
        .audit("workflow.cancel")
        .await
        .into_iter()
        .filter(|r| r["outcome"] == "success")
        .map(|r| (r["resource"].clone(), r["principal"].clone()))
        .collect();
    assert_eq!(cancels.len(), 3, "{cancels:?}");
    assert_eq!(
        cancels
            .iter()
            .filter(|(r, p)| *r == resource(&olivias_id) && p == "olivia")
            .count(),
        2
    );
    assert!(cancels.contains(&(resource(&oscars_id), json!("admin"))));
    let denied = stack.http.audit("auth.denied").await;
    let on_workflows = denied
        .iter()
        .filter(|r| {
            r["resource"]
                .as_str()
                .is_some_and(|r| r.starts_with("workflow/"))
        })
        .count();
    assert_eq!(on_workflows, 3, "{denied:?}");
    stack.stop().await;
}

#[tokio::test]
async fn an_unknown_or_malformed_workflow_id_is_not_found() {
    let stack = stack(false).await;
    for id in ["01ARZ3NDEKTSV4RRFFQ69G5FAV", "not-an-id", "a.b"] {
        let missing = stack.http.get(&format!("/api/v1/workflows/{id}")).await;
        missing.assert_problem(StatusCode::NOT_FOUND, None);
        let missing = cancel(&stack.http, id).await;
        missing.assert_problem(StatusCode::NOT_FOUND, None);
    }
    stack.stop().await;
}

#[tokio::test]
async fn a_cancelled_workflow_ends_cancelled_and_a_cancel_after_its_end_is_a_conflict() {
    let stack = stack(true).await;
    let body = json!({"name": "stopped", "steps": [true_step("wait", &[]), true_step("after", &["wait"])]});
    let workflow = created(&stack.http, &body).await;
    let id = workflow["id"].as_str().expect("an id").to_owned();
    let job = step(&workflow, "wait")["job"]
        .as_str()
        .expect("a job")
        .to_owned();
    // No executor: the scheduler takes the step's job and it waits for a node.
    wait_until(
        "the step's job to be taken by the scheduler",
        Duration::from_secs(30),
        || async {
            let job = stack.http.get(&format!("/api/v1/jobs/{job}")).await;
            (job.status == StatusCode::OK && job.json()["status"] == "pending").then_some(())
        },
    )
    .await;
    let asked = cancel(&stack.http, &id).await;
    assert_eq!(asked.status, StatusCode::ACCEPTED, "{}", asked.text());
    let ended = wait_until(
        "the workflow to end cancelled",
        Duration::from_secs(60),
        || async {
            let view = stack.workflow(&id).await;
            (view["status"] == "cancelled").then_some(view)
        },
    )
    .await;
    assert!(ended["finished_at"].is_string(), "{ended}");
    assert_eq!(step(&ended, "wait")["status"], "cancelled", "{ended}");
    assert_eq!(step(&ended, "after")["status"], "skipped", "{ended}");
    let job = stack.http.get(&format!("/api/v1/jobs/{job}")).await.json();
    assert_eq!(job["status"], "cancelled", "{job}");
    let late = cancel(&stack.http, &id).await;
    late.assert_problem(StatusCode::CONFLICT, None);
    assert!(
        late.json()["detail"]
            .as_str()
            .is_some_and(|d| d.contains("cancelled"))
    );
    let ended_list = stack.listed("?status=cancelled").await;
    assert_eq!(ended_list.len(), 1, "{ended_list:?}");
    assert_eq!(ended_list[0]["steps"]["skipped"], 1);
    stack.stop().await;
}

#[tokio::test]
async fn disabling_demoting_or_deleting_its_creator_cancels_a_running_workflow_and_no_other() {
    let stack = stack(false).await;
    let olivia = stack.http.new_user("olivia", "operator").await;
    let oscar = stack.http.new_user("oscar", "operator").await;
    let dora = stack.http.new_user("dora", "operator").await;
    let mut ids = std::collections::BTreeMap::new();
    for (creator, name) in [
        (&olivia, "olivias"),
        (&oscar, "oscars"),
        (&dora, "doras"),
        (&stack.http, "admins"),
    ] {
        let workflow = created(creator, &diamond(name)).await;
        ids.insert(name, workflow["id"].as_str().expect("an id").to_owned());
    }
    let cancel_asked = |view: &Value| view["cancel_requested_at"].is_string();

    // Disabled, olivia's workflow is cancelled: its waiting steps are skipped but for the
    // `always` clean-up. Only hers, and the audit record names it.
    let disabled = stack
        .http
        .patch_json("/api/v1/users/olivia", r#"{"disabled": true}"#)
        .await;
    assert_eq!(disabled.status, StatusCode::OK, "{}", disabled.text());
    let olivias = stack.workflow(&ids["olivias"]).await;
    assert!(cancel_asked(&olivias), "{olivias}");
    for name in ["test-a", "test-b", "deploy"] {
        assert_eq!(step(&olivias, name)["status"], "skipped", "{olivias}");
    }
    for other in ["oscars", "doras", "admins"] {
        let view = stack.workflow(&ids[other]).await;
        assert!(!cancel_asked(&view), "{view}");
    }
    let detail = format!("cancelled their workflows {}", ids["olivias"]);
    let updates = stack.http.audit("user.update").await;
    assert!(
        updates.iter().any(|r| r["detail"]
            .as_str()
            .is_some_and(|d| d.contains("disabled") && d.contains(&detail))),
        "{updates:?}"
    );

    // Demoted to a viewer, who may not submit jobs, oscar's is cancelled too.
    let demoted = stack
        .http
        .patch_json("/api/v1/users/oscar", r#"{"role": "viewer"}"#)
        .await;
    assert_eq!(demoted.status, StatusCode::OK, "{}", demoted.text());
    let oscars = stack.workflow(&ids["oscars"]).await;
    assert!(cancel_asked(&oscars), "{oscars}");

    // Deleted, dora's is cancelled; the administrator's still runs untouched.
    let deleted = stack
        .http
        .send(http::Method::DELETE, "/api/v1/users/dora", &[], "")
        .await;
    assert_eq!(deleted.status, StatusCode::NO_CONTENT, "{}", deleted.text());
    let doras = stack.workflow(&ids["doras"]).await;
    assert!(cancel_asked(&doras), "{doras}");
    let deletions = stack.http.audit("user.delete").await;
    let detail = format!("cancelled their workflows {}", ids["doras"]);
    assert!(
        deletions
            .iter()
            .any(|r| r["detail"].as_str().is_some_and(|d| d.contains(&detail))),
        "{deletions:?}"
    );
    let admins = stack.workflow(&ids["admins"]).await;
    assert!(!cancel_asked(&admins), "{admins}");
    assert_eq!(step(&admins, "test-a")["status"], "waiting", "{admins}");
    stack.stop().await;
}
