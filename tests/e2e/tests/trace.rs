//! One job is one trace: the service processes export their spans over OTLP/HTTP to a receiver
//! in the test, and the spans of a job, whether submitted over REST or over NATS with a
//! caller's `traceparent`, come from every service it passes through (the API, the executor
//! that took it or the scheduler that placed it, the executor that ran it), share one trace id,
//! and link parent to child in the order of the hops. Quieting the logs (`CAPSTAN_LOG=warn`) changes the logs
//! only: the spans are still exported, and without an exporter the trace context still reaches
//! the job's process. A workflow is one trace too: its steps' jobs join the trace of the
//! request that created it, the later ones through the scheduler that carried it on.

use std::collections::HashMap;
use std::time::Duration;

use capstan_e2e::Cluster;
use capstan_testkit::http::HttpClient;
use capstan_testkit::{OtlpReceiver, ReceivedSpan, wait_until};
use http::StatusCode;
use serde_json::json;

async fn traced_cluster(otlp: &OtlpReceiver) -> (Cluster, HttpClient) {
    cluster_with(Some(otlp), &[]).await
}

/// A cluster of one of each service with `env` set for every process, exporting its spans to
/// `otlp` when there is one.
async fn cluster_with(otlp: Option<&OtlpReceiver>, env: &[(&str, &str)]) -> (Cluster, HttpClient) {
    let mut cluster = Cluster::start().await;
    if let Some(otlp) = otlp {
        cluster.set_env("OTEL_EXPORTER_OTLP_ENDPOINT", otlp.endpoint());
        // Export within a fraction of a second instead of the default five.
        cluster.set_env("OTEL_BSP_SCHEDULE_DELAY", "100");
    }
    for (key, value) in env {
        cluster.set_env(key, *value);
    }
    cluster.registry("registry-1");
    cluster.scheduler("scheduler-1");
    cluster.executor("exec-1", 4, &[]);
    let base = cluster.api("api-1").await;
    cluster.wait_nodes_up(&["exec-1"]).await;
    let http = cluster.http(&base);
    (cluster, http)
}

/// A trace's spans, by id.
struct Trace(HashMap<String, ReceivedSpan>);

impl Trace {
    fn of(spans: Vec<ReceivedSpan>) -> Self {
        Self(
            spans
                .into_iter()
                .map(|span| (span.span_id.clone(), span))
                .collect(),
        )
    }

    fn find(&self, service: &str, name: &str, job: &str) -> Option<&ReceivedSpan> {
        self.0.values().find(|span| {
            span.service == service
                && span.name == name
                && span.attributes.get("job_id").is_none_or(|id| id == job)
        })
    }

    fn find_kind(&self, service: &str, name: &str, kind: &str) -> Option<&ReceivedSpan> {
        self.0.values().find(|span| {
            span.service == service
                && span.name == name
                && span.attributes.get("kind").is_some_and(|k| k == kind)
        })
    }

    /// True when `ancestor` is `span` or above it.
    fn descends(&self, span: &ReceivedSpan, ancestor: &ReceivedSpan) -> bool {
        let mut current = Some(span);
        while let Some(span) = current {
            if span.span_id == ancestor.span_id {
                return true;
            }
            current = self.0.get(&span.parent_span_id);
        }
        false
    }
}

/// The hops every job's trace holds below its entry span: its acceptance (by the executor
/// that took it, or a scheduler), the executor's attempt and process, and the API recording
/// its end. (The registry is in a trace only when the job's attempt was lost: the node
/// counts the attempts it runs to an end itself.)
struct Hops {
    accept: ReceivedSpan,
    run: ReceivedSpan,
    process: ReceivedSpan,
    recorded: ReceivedSpan,
}

async fn hops(otlp: &OtlpReceiver, trace_id: &str, job: &str) -> (Trace, Hops) {
    wait_until(
        "the job's spans from every hop",
        Duration::from_secs(60),
        || async {
            let trace = Trace::of(otlp.trace(trace_id));
            let hops = Hops {
                // An idle executor accepts a plain job itself; a scheduler accepts the rest.
                accept: trace
                    .find("capstan-executor", "accept job", job)
                    .or_else(|| trace.find("capstan-scheduler", "accept job", job))?
                    .clone(),
                run: trace.find("capstan-executor", "run attempt", job)?.clone(),
                process: trace.find("capstan-executor", "process", job)?.clone(),
                recorded: trace
                    .find_kind("capstan-api", "record job event", "succeeded")?
                    .clone(),
            };
            Some((trace, hops))
        },
    )
    .await
}

fn assert_chain(trace: &Trace, hops: &Hops, entry_span_id: &str) {
    assert_eq!(
        hops.accept.parent_span_id, entry_span_id,
        "acceptance follows the entry"
    );
    assert_eq!(
        hops.run.parent_span_id, hops.accept.span_id,
        "the attempt follows its acceptance"
    );
    assert_eq!(
        hops.process.parent_span_id, hops.run.span_id,
        "the process is in the attempt"
    );
    assert_eq!(
        hops.process.attributes.get("exit_code").map(String::as_str),
        Some("0")
    );
    assert!(
        trace.descends(&hops.recorded, &hops.run),
        "the API records the end the executor announced: {:?}",
        hops.recorded
    );
}

#[tokio::test]
async fn a_job_submitted_over_rest_is_one_trace_from_the_request_to_its_recorded_end() {
    let otlp = OtlpReceiver::start().await;
    let (cluster, http) = traced_cluster(&otlp).await;
    a_rest_job_is_one_trace(&otlp, cluster, &http).await;
}

#[tokio::test]
async fn quiet_logs_quiet_the_logs_only_and_a_job_is_still_one_trace() {
    let otlp = OtlpReceiver::start().await;
    let (cluster, http) = cluster_with(Some(&otlp), &[("CAPSTAN_LOG", "warn")]).await;
    a_rest_job_is_one_trace(&otlp, cluster, &http).await;
}

#[tokio::test]
async fn with_quiet_logs_and_no_exporter_a_callers_trace_still_reaches_the_job_process() {
    let (cluster, _http) = cluster_with(None, &[("CAPSTAN_LOG", "warn")]).await;
    let seen = cluster.dir().join("traceparent.txt");
    let trace_id = "0af7651916cd43dd8448eb211c80319c";
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(
        "traceparent",
        format!("00-{trace_id}-b7ad6b7169203331-01").as_str(),
    );
    let body = json!({"command": format!("echo \"$TRACEPARENT\" > {}", seen.display())});
    let js = async_nats::jetstream::new(cluster.client().await);
    js.publish_with_headers(
        capstan_protocol::subjects::SUBMIT,
        headers,
        body.to_string().into(),
    )
    .await
    .expect("published")
    .await
    .expect("stored");
    let handed = wait_until(
        "the job to write its TRACEPARENT",
        Duration::from_secs(60),
        || {
            let seen = seen.clone();
            async move {
                std::fs::read_to_string(&seen)
                    .ok()
                    .filter(|text| text.ends_with('\n'))
            }
        },
    )
    .await;
    let parts: Vec<&str> = handed.trim().split('-').collect();
    assert_eq!(parts.len(), 4, "{handed}");
    assert_eq!(parts[1], trace_id, "the process is in the caller's trace");
    assert_ne!(parts[2], "b7ad6b7169203331", "with a span of its own");
}

/// Submits a job over REST and checks that its spans make one trace through all four
/// services, and that its process was handed its own span's context.
async fn a_rest_job_is_one_trace(otlp: &OtlpReceiver, mut cluster: Cluster, http: &HttpClient) {
    let seen = cluster.dir().join("traceparent.txt");
    let body = json!({"command": format!("echo \"$TRACEPARENT\" > {}", seen.display())});
    let reply = http.post_json("/api/v1/jobs", &body.to_string()).await;
    assert_eq!(reply.status, StatusCode::ACCEPTED, "{}", reply.text());
    let job = reply.json()["id"].as_str().expect("an id").to_owned();
    let record = cluster
        .wait_terminal(&[job.parse().expect("a job id")], Duration::from_secs(60))
        .await
        .remove(0);
    assert_eq!(record.status.as_str(), "succeeded");
    let traceparent = record.traceparent.expect("the record keeps its trace");
    let trace_id = traceparent
        .split('-')
        .nth(1)
        .expect("a trace id")
        .to_owned();

    let (trace, hops) = hops(otlp, &trace_id, &job).await;
    let entry = wait_until(
        "the API's request span",
        Duration::from_secs(30),
        || async {
            otlp.trace(&trace_id)
                .into_iter()
                .find(|span| span.service == "capstan-api" && span.name == "POST /api/v1/jobs")
        },
    )
    .await;
    assert_eq!(entry.parent_span_id, "", "the request starts the trace");
    assert_chain(&trace, &hops, &entry.span_id);

    // The process was handed its own span's context.
    let handed = std::fs::read_to_string(&seen).expect("the job wrote its TRACEPARENT");
    assert_eq!(
        handed.trim(),
        format!("00-{trace_id}-{}-01", hops.process.span_id)
    );
}

#[tokio::test]
async fn a_job_published_on_nats_with_a_traceparent_joins_the_callers_trace() {
    let otlp = OtlpReceiver::start().await;
    let (cluster, http) = traced_cluster(&otlp).await;
    // The API is listed among the micro services too, saying where it listens.
    let info = cluster
        .client()
        .await
        .request("$SRV.INFO.capstan-api", "".into())
        .await
        .expect("the API answers");
    let info: serde_json::Value = serde_json::from_slice(&info.payload).expect("JSON");
    assert_eq!(
        format!(
            "http://{}",
            info["metadata"]["listen"].as_str().unwrap_or_default()
        ),
        http.base()
    );
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let caller = "00f067aa0ba902b7";
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("traceparent", format!("00-{trace_id}-{caller}-01").as_str());
    let js = async_nats::jetstream::new(cluster.client().await);
    js.publish_with_headers(
        capstan_protocol::subjects::SUBMIT,
        headers,
        r#"{"command": "true"}"#.into(),
    )
    .await
    .expect("published")
    .await
    .expect("stored");

    let accept = wait_until("the scheduler's span", Duration::from_secs(60), || async {
        otlp.trace(trace_id)
            .into_iter()
            .find(|span| span.name == "accept job")
    })
    .await;
    let job = accept
        .attributes
        .get("job_id")
        .expect("the job's id")
        .clone();
    let (trace, hops) = hops(&otlp, trace_id, &job).await;
    assert_chain(&trace, &hops, caller);
}

#[tokio::test]
async fn a_job_on_a_remote_system_is_one_trace_with_its_ssh_connection_and_remote_command() {
    let host = capstan_testkit::sshd::SshHost::start().expect("sshd starts");
    let otlp = OtlpReceiver::start().await;
    let mut cluster = Cluster::start().await;
    cluster.set_env("OTEL_EXPORTER_OTLP_ENDPOINT", otlp.endpoint());
    cluster.set_env("OTEL_BSP_SCHEDULE_DELAY", "100");
    cluster.set_env(
        "CAPSTAN_SECRET_KEYS",
        capstan_secrets::KeyRing::generate_entry("e2e").expect("a key"),
    );
    cluster.registry("registry-1");
    cluster.scheduler("scheduler-1");
    cluster.executor("exec-1", 2, &["capstan.io/ssh=true"]);
    let base = cluster.api("api-1").await;
    cluster.wait_nodes_up(&["exec-1"]).await;
    let http = cluster.http(&base);
    capstan_e2e::add_ssh_system(&http, "web-1", &host).await;

    let body = json!({"command": "echo \"$TRACEPARENT\"", "system": "web-1"});
    let reply = http.post_json("/api/v1/jobs", &body.to_string()).await;
    assert_eq!(reply.status, StatusCode::ACCEPTED, "{}", reply.text());
    let job = reply.json()["id"].as_str().expect("an id").to_owned();
    let record = cluster
        .wait_terminal(&[job.parse().expect("a job id")], Duration::from_secs(60))
        .await
        .remove(0);
    assert_eq!(record.status.as_str(), "succeeded", "{:?}", record.error);
    let traceparent = record.traceparent.expect("the record keeps its trace");
    let trace_id = traceparent
        .split('-')
        .nth(1)
        .expect("a trace id")
        .to_owned();

    let (trace, run, remote, connect) = wait_until(
        "the remote job's spans",
        Duration::from_secs(60),
        || async {
            let trace = Trace::of(otlp.trace(&trace_id));
            let run = trace.find("capstan-executor", "run attempt", &job)?.clone();
            let remote = trace
                .find("capstan-executor", "remote command", &job)?
                .clone();
            let connect = trace.find("capstan-executor", "ssh connect", &job)?.clone();
            Some((trace, run, remote, connect))
        },
    )
    .await;
    assert!(trace.descends(&remote, &run), "{remote:?}");
    assert_eq!(connect.parent_span_id, remote.span_id, "{connect:?}");
    assert_eq!(
        remote.attributes.get("system").map(String::as_str),
        Some("web-1")
    );
    assert_eq!(
        connect.attributes.get("reused").map(String::as_str),
        Some("false")
    );

    // The remote command was handed the context of the span that ran it.
    let logs = http.get(&format!("/api/v1/jobs/{job}/logs")).await.json();
    let handed = logs["stdout"]
        .as_str()
        .unwrap_or_default()
        .trim()
        .to_owned();
    assert_eq!(handed, format!("00-{trace_id}-{}-01", remote.span_id));
}

#[tokio::test]
async fn a_workflow_is_one_trace_from_its_request_through_every_steps_job() {
    let otlp = OtlpReceiver::start().await;
    let (mut cluster, http) = traced_cluster(&otlp).await;
    let body = json!({
        "name": "traced",
        "steps": [
            {"name": "first", "job": {"command": "echo one"}},
            {"name": "second", "job": {"command": "true"}, "depends_on": ["first"]},
        ],
    });
    let reply = http.post_json("/api/v1/workflows", &body.to_string()).await;
    assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.text());
    let id = reply.json()["id"].as_str().expect("an id").to_owned();
    let view = wait_until("the workflow ends", Duration::from_secs(60), || async {
        let view = http.get(&format!("/api/v1/workflows/{id}")).await.json();
        (view["status"] != "running").then_some(view)
    })
    .await;
    assert_eq!(view["status"], "succeeded", "{view}");
    let jobs: Vec<String> = view["steps"]
        .as_array()
        .expect("steps")
        .iter()
        .map(|step| step["job"].as_str().expect("a job").to_owned())
        .collect();
    let records = cluster
        .wait_terminal(
            &jobs
                .iter()
                .map(|job| job.parse().expect("a job id"))
                .collect::<Vec<_>>(),
            Duration::from_secs(60),
        )
        .await;
    let trace_ids: Vec<String> = records
        .iter()
        .map(|record| {
            let traceparent = record.traceparent.as_deref().expect("a trace");
            traceparent
                .split('-')
                .nth(1)
                .expect("a trace id")
                .to_owned()
        })
        .collect();
    assert_eq!(
        trace_ids[0], trace_ids[1],
        "both steps' jobs share one trace"
    );
    let trace_id = &trace_ids[0];

    let (trace, entry, first, second, carried) =
        wait_until("the workflow's spans", Duration::from_secs(60), || async {
            let trace = Trace::of(otlp.trace(trace_id));
            let entry = trace
                .0
                .values()
                .find(|s| s.service == "capstan-api" && s.name == "POST /api/v1/workflows")?
                .clone();
            let first = trace.find("capstan-executor", "process", &jobs[0])?.clone();
            let second = trace.find("capstan-executor", "process", &jobs[1])?.clone();
            // Of the scheduler's passes over the workflow, the one that started the second.
            let carried = trace
                .0
                .values()
                .find(|s| {
                    s.service == "capstan-scheduler"
                        && s.name == "workflow"
                        && trace.descends(&second, s)
                })?
                .clone();
            Some((trace, entry, first, second, carried))
        })
        .await;
    assert_eq!(entry.parent_span_id, "", "the request starts the trace");
    assert!(
        trace.descends(&first, &entry),
        "the first step runs inside the request"
    );
    assert!(
        trace.descends(&carried, &entry),
        "the scheduler carrying the workflow follows its trace"
    );
    assert!(trace.descends(&second, &carried));
}
