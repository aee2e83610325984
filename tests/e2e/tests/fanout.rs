//! Fan-out, with every service a separate process: one command run once on each of several
//! remote systems (a real sshd under several names) or executor nodes, each target a job of
//! its own, with `max_parallel`, `fail_fast`, cancel (asked, or by disabling its creator), an
//! aggregate outcome, bad selectors, and a scheduler killed mid-way.

use std::time::Duration;

use capstan_e2e::Cluster;
use capstan_protocol::codec::{self, Encoding};
use capstan_protocol::{JobId, JobRecord, Rejection, subjects};
use capstan_testkit::http::HttpClient;
use capstan_testkit::wait_until;
use futures::StreamExt;
use serde_json::{Value, json};

/// Submits `body` over REST and returns the job's id.
async fn submit(http: &HttpClient, body: Value) -> JobId {
    let reply = http.post_json("/api/v1/jobs", &body.to_string()).await;
    assert_eq!(reply.status.as_u16(), 202, "{}", reply.text());
    reply.json()["id"]
        .as_str()
        .expect("an id")
        .parse()
        .expect("a job id")
}

/// Waits until fan-out `id` has an outcome other than `running`; returns its job.
async fn wait_outcome(http: &HttpClient, id: JobId, timeout: Duration) -> Value {
    let path = format!("/api/v1/jobs/{id}");
    wait_until("the fan-out to end", timeout, || async {
        let reply = http.get(&path).await;
        (reply.status.as_u16() == 200).then_some(())?;
        let job = reply.json();
        let outcome = job["fanout"]["outcome"].as_str()?.to_owned();
        (outcome != "running").then_some(job)
    })
    .await
}

/// The targets of fan-out `id`.
async fn targets(http: &HttpClient, id: JobId) -> Vec<Value> {
    let reply = http.get(&format!("/api/v1/jobs/{id}/targets")).await;
    assert_eq!(reply.status.as_u16(), 200, "{}", reply.text());
    reply.json()["targets"].as_array().expect("a list").clone()
}

/// The status of each target of fan-out `id`, in order.
async fn target_statuses(http: &HttpClient, id: JobId) -> Vec<Value> {
    targets(http, id)
        .await
        .iter()
        .map(|t| t["status"].clone())
        .collect()
}

/// Waits until the first target of fan-out `id` runs.
async fn first_target_running(http: &HttpClient, id: JobId) {
    wait_until(
        "the first target to run",
        Duration::from_secs(60),
        || async {
            targets(http, id)
                .await
                .first()
                .filter(|t| t["status"] == "running")
                .map(|_| ())
        },
    )
    .await;
}

/// The most of `records` that ran at once, from their own start and finish times.
fn most_at_once(records: &[JobRecord]) -> i32 {
    let mut edges = Vec::new();
    for record in records {
        let started = record.started_at.expect("started");
        let finished = record.finished_at.expect("finished");
        // At the same instant an end sorts before a start.
        edges.push((started, 1i32));
        edges.push((finished, -1i32));
    }
    edges.sort();
    let (mut now, mut most) = (0, 0);
    for (_, step) in edges {
        now += step;
        most = most.max(now);
    }
    most
}

/// A mesh with gateway executors (4 slots each, with their extra labels) and the API, with
/// secret keys for the systems' credentials.
async fn gateway_mesh(gateways: &[(&str, &[&str])]) -> (Cluster, HttpClient) {
    let mut cluster = Cluster::start().await;
    cluster.set_env(
        "CAPSTAN_SECRET_KEYS",
        capstan_secrets::KeyRing::generate_entry("e2e").expect("a key"),
    );
    cluster.registry("registry-1");
    cluster.scheduler("scheduler-1");
    for (gateway, labels) in gateways {
        let mut all = vec!["capstan.io/ssh=true"];
        all.extend_from_slice(labels);
        cluster.executor(gateway, 4, &all);
    }
    let base = cluster.api("api-1").await;
    let names: Vec<&str> = gateways.iter().map(|(name, _)| *name).collect();
    cluster.wait_nodes_up(&names).await;
    let http = cluster.http(&base);
    (cluster, http)
}

/// Labels system `name` with `labels` (an administrator's PATCH).
async fn label_system(http: &HttpClient, name: &str, labels: Value) {
    let reply = http
        .patch_json(
            &format!("/api/v1/systems/{name}"),
            &json!({ "labels": labels }).to_string(),
        )
        .await;
    assert_eq!(reply.status.as_u16(), 200, "{}", reply.text());
}

#[tokio::test]
async fn a_fan_out_over_systems_runs_once_on_each_at_most_max_parallel_at_once_even_when_its_scheduler_is_killed()
 {
    let host = capstan_testkit::sshd::SshHost::start().expect("sshd starts");
    let (mut cluster, http) = gateway_mesh(&[("exec-1", &[])]).await;
    for name in ["web-1", "web-2", "web-3", "db-1"] {
        capstan_e2e::add_ssh_system(&http, name, &host).await;
        let role = if name.starts_with("web") { "web" } else { "db" };
        label_system(&http, name, json!({ "role": role })).await;
    }
    let id = submit(
        &http,
        json!({
            "command": "echo \"ran $CAPSTAN_JOB_ID\"; sleep 2",
            "systems": {"labels": {"role": "web"}},
            "max_parallel": 2,
            "name": "restart",
        }),
    )
    .await;
    // Mid-way (the first targets running), the only scheduler dies; another takes over.
    wait_until("a target to run", Duration::from_secs(60), || async {
        let reply = http.get(&format!("/api/v1/jobs/{id}/targets")).await;
        (reply.status.as_u16() == 200).then_some(())?;
        let running = reply.json()["targets"]
            .as_array()?
            .iter()
            .any(|t| t["status"] == "running");
        running.then_some(())
    })
    .await;
    cluster.kill9("scheduler-1");
    cluster.scheduler("scheduler-2");

    let job = wait_outcome(&http, id, Duration::from_secs(120)).await;
    assert_eq!(job["fanout"]["outcome"], "succeeded", "{job}");
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(job["fanout"]["total"], 3, "{job}");
    assert_eq!(job["spec"]["systems"]["labels"]["role"], "web", "{job}");

    let targets = targets(&http, id).await;
    let names: Vec<&str> = targets
        .iter()
        .map(|t| t["target"].as_str().expect("a name"))
        .collect();
    assert_eq!(names, ["web-1", "web-2", "web-3"], "db-1 is no web system");
    let mut records = Vec::new();
    for target in &targets {
        assert_eq!(target["status"], "succeeded", "{target}");
        assert_eq!(target["exit_code"], 0, "{target}");
        assert_eq!(target["attempt"], 1, "each target ran once: {target}");
        let child: JobId = target["job"]
            .as_str()
            .expect("a job")
            .parse()
            .expect("an id");
        let record = cluster.job(child).await.expect("the target's job");
        assert_eq!(record.spec.system.as_deref(), target["target"].as_str());
        assert_eq!(record.spec.fanout_parent(), Some(id));
        assert_eq!(
            record.spec.name.as_deref(),
            Some(
                format!(
                    "restart [{}]",
                    target["target"].as_str().unwrap_or_default()
                )
                .as_str()
            )
        );
        // Each target's output is its job's.
        let logs = http.get(&format!("/api/v1/jobs/{child}/logs")).await;
        assert!(
            logs.text().contains(&format!("ran {child}")),
            "{}",
            logs.text()
        );
        let name = target["target"].as_str().expect("a name");
        let by_target = http
            .get(&format!("/api/v1/jobs/{id}/targets/{name}/logs"))
            .await;
        assert_eq!(
            by_target.text(),
            logs.text(),
            "the target's output is its job's"
        );
        records.push(record);
    }
    let missing = http
        .get(&format!("/api/v1/jobs/{id}/targets/db-1/logs"))
        .await;
    assert_eq!(missing.status.as_u16(), 404, "{}", missing.text());
    let most = most_at_once(&records);
    assert!(most <= 2, "{most} targets ran at once with max_parallel 2");
}

#[tokio::test]
async fn a_fan_out_with_an_unreachable_system_ends_partial_without_rerunning_the_others() {
    let host = capstan_testkit::sshd::SshHost::start().expect("sshd starts");
    let (_cluster, http) = gateway_mesh(&[("exec-1", &[])]).await;
    capstan_e2e::add_ssh_system(&http, "web-1", &host).await;
    // A port nothing listens on.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("a free port")
        .local_addr()
        .expect("its address")
        .port();
    let unreachable = json!({
        "name": "gone-1",
        "hostname": "127.0.0.1",
        "port": closed,
        "username": "nobody",
        "auth": {"method": "password", "password": "a password that never leaves the API"},
        "host_key": host.host_key(),
    });
    let added = http
        .post_json("/api/v1/systems", &unreachable.to_string())
        .await;
    assert_eq!(added.status.as_u16(), 201, "{}", added.text());

    let id = submit(
        &http,
        json!({"command": "echo up", "systems": {"names": ["web-1", "gone-1"]}}),
    )
    .await;
    let job = wait_outcome(&http, id, Duration::from_secs(120)).await;
    assert_eq!(job["fanout"]["outcome"], "partial", "{job}");
    assert_eq!(
        job["status"], "failed",
        "a partial fan-out is no success: {job}"
    );
    assert!(
        job["error"]
            .as_str()
            .is_some_and(|e| e.contains("1 of 2 targets succeeded")),
        "{job}"
    );
    let targets = targets(&http, id).await;
    assert_eq!(targets[0]["status"], "succeeded", "{targets:?}");
    assert_eq!(targets[0]["attempt"], 1, "web-1 was not rerun: {targets:?}");
    assert_eq!(targets[1]["status"], "failed", "{targets:?}");
    assert!(targets[1]["error"].is_string(), "{targets:?}");
    assert!(
        !serde_json::to_string(&targets)
            .expect("json")
            .contains("never leaves the API"),
        "no credential in a target"
    );
}

#[tokio::test]
async fn a_fan_out_over_nodes_runs_once_per_matching_node_and_fail_fast_cancel_or_its_creator_disabled_stop_the_rest()
 {
    let mut cluster = Cluster::start().await;
    cluster.registry("registry-1");
    cluster.scheduler("scheduler-1");
    cluster.executor("exec-1", 2, &["zone=a"]);
    cluster.executor("exec-2", 2, &["zone=a"]);
    cluster.executor("exec-3", 2, &["zone=b"]);
    let base = cluster.api("api-1").await;
    cluster.wait_nodes_up(&["exec-1", "exec-2", "exec-3"]).await;
    let http = cluster.http(&base);

    // One run on each node of zone a, on that node.
    let id = submit(
        &http,
        json!({"command": "echo \"$CAPSTAN_NODE_ID\"", "nodes": {"labels": {"zone": "a"}}}),
    )
    .await;
    let job = wait_outcome(&http, id, Duration::from_secs(60)).await;
    assert_eq!(job["fanout"]["outcome"], "succeeded", "{job}");
    let listed = targets(&http, id).await;
    assert_eq!(listed.len(), 2, "{listed:?}");
    for target in &listed {
        assert_eq!(target["kind"], "node");
        assert_eq!(
            target["node"], target["target"],
            "pinned to its node: {target}"
        );
    }

    // fail_fast: exec-1's run fails, so exec-2's is cancelled and exec-3's never starts.
    let id = submit(
        &http,
        json!({
            "command": "if [ \"$CAPSTAN_NODE_ID\" = exec-1 ]; then sleep 1; exit 3; fi; sleep 60",
            "nodes": {},
            "max_parallel": 2,
            "fail_fast": true,
        }),
    )
    .await;
    let job = wait_outcome(&http, id, Duration::from_secs(60)).await;
    assert_eq!(job["fanout"]["outcome"], "failed", "{job}");
    let statuses = target_statuses(&http, id).await;
    assert_eq!(statuses, ["failed", "cancelled", "skipped"], "{job}");

    // A cancel of the parent stops the running target and skips the others.
    let id = submit(
        &http,
        json!({"command": "sleep 60", "nodes": {}, "max_parallel": 1}),
    )
    .await;
    first_target_running(&http, id).await;
    // As others would try it: an operator may not cancel the administrator's fan-out (refused
    // and audited), a viewer may read its targets but not submit one.
    let password = "a-long-enough-password";
    for (name, role) in [("olga", "operator"), ("vic", "viewer")] {
        let body = json!({"name": name, "password": password, "role": role});
        let created = http.post_json("/api/v1/users", &body.to_string()).await;
        assert_eq!(created.status.as_u16(), 201, "{}", created.text());
    }
    let olga = HttpClient::new(base.clone()).login("olga", password).await;
    let vic = HttpClient::new(base.clone()).login("vic", password).await;
    let refused = olga
        .post_json(&format!("/api/v1/jobs/{id}/cancel"), "{}")
        .await;
    assert_eq!(refused.status.as_u16(), 403, "{}", refused.text());
    wait_until(
        "the refusal in the audit trail",
        Duration::from_secs(30),
        || async {
            let records = http
                .get("/api/v1/audit?action=auth.denied&principal=olga")
                .await
                .json();
            let found = records["records"]
                .as_array()?
                .iter()
                .any(|r| r["resource"] == format!("job/{id}").as_str());
            found.then_some(())
        },
    )
    .await;
    assert_eq!(
        vic.get(&format!("/api/v1/jobs/{id}/targets"))
            .await
            .status
            .as_u16(),
        200
    );
    let fanned = vic
        .post_json(
            "/api/v1/jobs",
            &json!({"command": "true", "nodes": {}}).to_string(),
        )
        .await;
    assert_eq!(fanned.status.as_u16(), 403, "{}", fanned.text());

    let cancelled = http
        .post_json(&format!("/api/v1/jobs/{id}/cancel"), "{}")
        .await;
    assert_eq!(cancelled.status.as_u16(), 202, "{}", cancelled.text());
    let job = wait_outcome(&http, id, Duration::from_secs(60)).await;
    assert_eq!(job["fanout"]["outcome"], "cancelled", "{job}");
    assert_eq!(job["status"], "cancelled", "{job}");
    let statuses = target_statuses(&http, id).await;
    assert_eq!(statuses, ["cancelled", "skipped", "skipped"], "{job}");
    let again = http
        .post_json(&format!("/api/v1/jobs/{id}/cancel"), "{}")
        .await;
    assert_eq!(again.status.as_u16(), 409, "{}", again.text());

    // Disabling its creator cancels a fan-out that would go on submitting targets as her.
    let id = submit(
        &olga,
        json!({"command": "sleep 60", "nodes": {}, "max_parallel": 1}),
    )
    .await;
    first_target_running(&http, id).await;
    let disabled = http
        .patch_json("/api/v1/users/olga", r#"{"disabled": true}"#)
        .await;
    assert_eq!(disabled.status.as_u16(), 200, "{}", disabled.text());
    let job = wait_outcome(&http, id, Duration::from_secs(60)).await;
    assert_eq!(job["fanout"]["outcome"], "cancelled", "{job}");
    let statuses = target_statuses(&http, id).await;
    assert_eq!(statuses, ["cancelled", "skipped", "skipped"], "{job}");
    let updates = http
        .get("/api/v1/audit?action=user.update&principal=admin")
        .await
        .json();
    let named = updates["records"].as_array().is_some_and(|records| {
        records.iter().any(|r| {
            r["detail"]
                .as_str()
                .is_some_and(|d| d.contains(&format!("cancelled their fan-outs {id}")))
        })
    });
    assert!(named, "{updates}");
}

#[tokio::test]
async fn a_fan_out_selector_matching_nothing_is_refused_naming_the_field_over_rest_and_nats() {
    let mut cluster = Cluster::start().await;
    cluster.registry("registry-1");
    cluster.scheduler("scheduler-1");
    cluster.executor("exec-1", 1, &[]);
    let base = cluster.api("api-1").await;
    cluster.wait_nodes_up(&["exec-1"]).await;
    let http = cluster.http(&base);

    for (body, field) in [
        (
            json!({"command": "true", "nodes": {"labels": {"zone": "mars"}}}),
            "nodes.labels",
        ),
        (
            json!({"command": "true", "systems": {"labels": {"role": "web"}}}),
            "systems.labels",
        ),
        (
            json!({"command": "true", "systems": {"names": ["nowhere"]}}),
            "systems.names[0]",
        ),
        (
            json!({"command": "true", "systems": {"names": ["a", "a"]}}),
            "systems.names[1]",
        ),
        (
            json!({"command": "true", "max_parallel": 2}),
            "max_parallel",
        ),
    ] {
        let reply = http.post_json("/api/v1/jobs", &body.to_string()).await;
        assert_eq!(reply.status.as_u16(), 422, "{body}: {}", reply.text());
        assert_eq!(
            reply.json()["field"].as_str(),
            Some(field),
            "{body}: {}",
            reply.text()
        );
    }

    // Over NATS the scheduler refuses it with a rejection naming the field.
    let client = cluster.client().await;
    let mut rejections = client
        .subscribe(subjects::rejected(subjects::Origin::Submit))
        .await
        .expect("subscribe");
    client.flush().await.expect("flush");
    let js = async_nats::jetstream::new(client.clone());
    js.publish(
        subjects::SUBMIT,
        json!({"command": "true", "nodes": {"labels": {"zone": "mars"}}})
            .to_string()
            .into(),
    )
    .await
    .expect("publish")
    .await
    .expect("stored");
    let message = tokio::time::timeout(Duration::from_secs(30), rejections.next())
        .await
        .expect("a rejection in time")
        .expect("a message");
    let rejection: Rejection =
        codec::decode(Encoding::MsgPack, &message.payload).expect("a rejection");
    assert_eq!(
        rejection.field.as_deref(),
        Some("nodes.labels"),
        "{rejection:?}"
    );

    // The mesh keeps working, and an idempotency key makes a second submission the same
    // fan-out.
    let body = json!({"command": "true", "nodes": {}, "idempotency_key": "fan-once"});
    let id = submit(&http, body.clone()).await;
    let job = wait_outcome(&http, id, Duration::from_secs(60)).await;
    assert_eq!(job["fanout"]["outcome"], "succeeded", "{job}");
    let again = http.post_json("/api/v1/jobs", &body.to_string()).await;
    assert_eq!(again.status.as_u16(), 200, "{}", again.text());
    assert_eq!(again.json()["id"], id.to_string(), "{}", again.text());
}

#[tokio::test]
async fn a_gateway_killed_mid_fan_out_loses_only_its_targets_attempts_which_run_again_elsewhere() {
    let host = capstan_testkit::sshd::SshHost::start().expect("sshd starts");
    let (mut cluster, http) = gateway_mesh(&[("exec-1", &[]), ("exec-2", &[])]).await;
    let names: Vec<String> = (1..=6).map(|n| format!("web-{n}")).collect();
    for name in &names {
        capstan_e2e::add_ssh_system(&http, name, &host).await;
    }
    // Named after the host's port, so that only this test's remote commands are counted.
    let command = format!("sleep 4.{}", host.port());
    let id = submit(
        &http,
        json!({"command": format!("exec {command}"), "systems": {"names": names}}),
    )
    .await;
    wait_until(
        "targets to run on both gateways",
        Duration::from_secs(60),
        || async {
            let listed = targets(&http, id).await;
            let on = |node: &str| {
                listed
                    .iter()
                    .any(|t| t["status"] == "running" && t["node"] == node)
            };
            (on("exec-1") && on("exec-2")).then_some(())
        },
    )
    .await;
    let listed = targets(&http, id).await;
    let running_on = |node: &str| -> Vec<JobId> {
        listed
            .iter()
            .filter(|t| t["status"] == "running" && t["node"] == node)
            .map(|t| t["job"].as_str().expect("a job").parse().expect("an id"))
            .collect()
    };
    let (on_killed, on_kept) = (running_on("exec-1"), running_on("exec-2"));
    cluster.kill9("exec-1");

    let job = wait_outcome(&http, id, Duration::from_secs(120)).await;
    assert_eq!(job["fanout"]["outcome"], "succeeded", "{job}");
    for target in targets(&http, id).await {
        let child: JobId = target["job"]
            .as_str()
            .expect("a job")
            .parse()
            .expect("an id");
        let record = cluster.job(child).await.expect("the target's job");
        assert_eq!(
            record.status,
            capstan_protocol::JobStatus::Succeeded,
            "{record:?}"
        );
        if on_killed.contains(&child) {
            assert_eq!(record.lost_attempts, 1, "lost with its gateway: {record:?}");
            assert_eq!(record.attempt, 2, "{record:?}");
            assert_eq!(record.node.as_ref().map(|n| n.as_str()), Some("exec-2"));
        } else if on_kept.contains(&child) {
            assert_eq!(record.attempt, 1, "the other targets ran once: {record:?}");
        }
    }
    // The killed gateway's remote commands were stopped on the host.
    wait_until(
        "the killed gateway's remote commands to end",
        Duration::from_secs(30),
        || async {
            capstan_testkit::sshd::login_processes(&command)
                .is_empty()
                .then_some(())
        },
    )
    .await;
    let mesh = cluster.mesh().await;
    let records = capstan_e2e::faults::job_records(&mesh)
        .await
        .expect("records");
    let violations = capstan_e2e::faults::fanout_differences(&mesh, &records).await;
    assert!(violations.is_empty(), "{violations:#?}");
}

#[tokio::test]
async fn each_target_runs_on_a_gateway_in_its_systems_zone_when_one_has_room() {
    let host = capstan_testkit::sshd::SshHost::start().expect("sshd starts");
    let (_cluster, http) =
        gateway_mesh(&[("exec-1", &["zone=eu"]), ("exec-2", &["zone=us"])]).await;
    let zones = [("web-eu", "eu"), ("web-us", "us")];
    for (name, zone) in zones {
        capstan_e2e::add_ssh_system(&http, name, &host).await;
        label_system(&http, name, json!({ "zone": zone })).await;
    }
    // Several rounds, so that a placement that ignored zones would be caught.
    for _ in 0..3 {
        let id = submit(
            &http,
            json!({"command": "true", "systems": {"names": ["web-eu", "web-us"]}}),
        )
        .await;
        let job = wait_outcome(&http, id, Duration::from_secs(60)).await;
        assert_eq!(job["fanout"]["outcome"], "succeeded", "{job}");
        for target in targets(&http, id).await {
            let expected = if target["target"] == "web-eu" {
                "exec-1"
            } else {
                "exec-2"
            };
            assert_eq!(target["node"], expected, "{target}");
        }
    }
}
