//! Every service serves Prometheus metrics on `CAPSTAN_METRICS_LISTEN`, with `/healthz` and
//! `/readyz`, each a separate process: a job run through the mesh and a malformed
//! submission show up in the counters of the services that handled them, and every metric a
//! panel of the Grafana dashboard (`deploy/grafana/capstan.json`) queries is exported by one
//! of them.

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use capstan_e2e::Cluster;
use capstan_protocol::{JobId, subjects};
use capstan_testkit::http::HttpClient;
use capstan_testkit::wait_until;
use serde_json::{Value, json};

/// The value of the sample `series` (name and labels, as rendered) in `text`.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|line| {
        let rest = line.strip_prefix(series)?;
        rest.strip_prefix(' ')?.trim().parse().ok()
    })
}

/// The metric names `text` declares (its `# TYPE` lines), with the series names a query
/// may use for them: a histogram's `_bucket`, `_sum` and `_count`.
fn exported(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("# TYPE ") else {
            continue;
        };
        let mut words = rest.split_whitespace();
        let (Some(name), Some(kind)) = (words.next(), words.next()) else {
            continue;
        };
        names.insert(name.to_owned());
        if kind == "histogram" {
            for suffix in ["_bucket", "_sum", "_count"] {
                names.insert(format!("{name}{suffix}"));
            }
        }
    }
    names
}

/// Every `capstan_…` metric name the dashboard's panels query.
fn dashboard_metrics() -> BTreeSet<String> {
    let path = capstan_testkit::workspace_root().join("deploy/grafana/capstan.json");
    let text = std::fs::read_to_string(&path).expect("the dashboard");
    let dashboard: Value = serde_json::from_str(&text).expect("the dashboard is JSON");
    let panels = dashboard["panels"].as_array().expect("panels");
    assert!(!panels.is_empty(), "the dashboard has no panel");
    let mut names = BTreeSet::new();
    for panel in panels {
        let targets = panel["targets"].as_array().expect("targets");
        assert!(
            !targets.is_empty(),
            "panel {} queries nothing",
            panel["title"]
        );
        for target in targets {
            let expr = target["expr"].as_str().expect("an expression");
            let found = metric_names(expr);
            assert!(!found.is_empty(), "`{expr}` queries no Capstan metric");
            names.extend(found);
        }
    }
    names
}

/// The `capstan_…` identifiers in a PromQL expression.
fn metric_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = expr;
    while let Some(start) = rest.find("capstan_") {
        let tail = &rest[start..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        names.push(tail[..end].to_owned());
        rest = &tail[end..];
    }
    names
}

#[test]
fn metric_names_are_read_out_of_promql_expressions() {
    assert_eq!(
        metric_names(
            "histogram_quantile(0.99, sum by (le) (rate(capstan_x_seconds_bucket[5m]))) / capstan_y"
        ),
        ["capstan_x_seconds_bucket", "capstan_y"]
    );
    let text = "# TYPE capstan_a_total counter\n# TYPE capstan_b_seconds histogram\n";
    let names = exported(text);
    assert!(names.contains("capstan_a_total"));
    assert!(names.contains("capstan_b_seconds_bucket"));
    assert!(!names.contains("capstan_a_total_bucket"));
}

#[tokio::test(flavor = "multi_thread")]
async fn every_service_serves_metrics_that_count_its_work_and_cover_the_dashboard() {
    let mut cluster = Cluster::start().await;
    let mut listeners = HashMap::new();
    let mut listen = |cluster: &mut Cluster, service: &'static str| {
        let port = capstan_testkit::server::free_port();
        cluster.set_env("CAPSTAN_METRICS_LISTEN", format!("127.0.0.1:{port}"));
        listeners.insert(service, HttpClient::new(format!("http://127.0.0.1:{port}")));
    };
    listen(&mut cluster, "registry");
    cluster.registry("registry-1");
    listen(&mut cluster, "scheduler");
    cluster.scheduler("scheduler-1");
    listen(&mut cluster, "executor");
    cluster.executor("exec-1", 2, &[]);
    listen(&mut cluster, "api");
    let base = cluster.api("api-1").await;
    let http = cluster.http(&base);
    cluster.wait_nodes_up(&["exec-1"]).await;

    // Each listener answers its health without a credential.
    for (service, client) in &listeners {
        let ready = wait_until(
            &format!("{service}'s /readyz"),
            Duration::from_secs(30),
            || async {
                client
                    .try_get("/readyz")
                    .await
                    .ok()
                    .filter(|reply| reply.status.is_success())
            },
        )
        .await;
        assert_eq!(ready.text(), "ready", "{service}");
        assert!(
            client.get("/healthz").await.status.is_success(),
            "{service}"
        );
    }

    // A job through the mesh, and a malformed submission over NATS.
    let reply = http
        .post_json("/api/v1/jobs", &json!({"argv": ["true"]}).to_string())
        .await;
    assert_eq!(reply.status.as_u16(), 202, "{}", reply.text());
    let id: JobId = reply.json()["id"]
        .as_str()
        .expect("an id")
        .parse()
        .expect("a job id");
    cluster.wait_terminal(&[id], Duration::from_secs(60)).await;
    let js = async_nats::jetstream::new(cluster.client().await);
    js.publish(subjects::SUBMIT, "{not json".into())
        .await
        .expect("publish")
        .await
        .expect("stored");

    let scrape = |service: &'static str| {
        let client = listeners[service].clone();
        async move {
            let reply = client.get("/metrics").await;
            assert!(reply.status.is_success(), "{service}: {}", reply.text());
            reply.text()
        }
    };
    // What each service counted of that work (the counts arrive as the work is done).
    let expectations: [(&str, &str, f64); 8] = [
        (
            "executor",
            "capstan_executor_attempts_total{status=\"succeeded\"}",
            1.0,
        ),
        ("executor", "capstan_executor_spawn_seconds_count", 1.0),
        ("executor", "capstan_executor_slots", 2.0),
        // An idle executor takes a plain job, and a malformed one, before any scheduler.
        (
            "executor",
            "capstan_executor_submissions_total{outcome=\"taken\"}",
            1.0,
        ),
        (
            "executor",
            "capstan_rejections_total{origin=\"submit\",code=\"malformed\"}",
            1.0,
        ),
        ("registry", "capstan_registry_heartbeats_total", 1.0),
        (
            "registry",
            "capstan_registry_nodes{status=\"up\",availability=\"active\"}",
            1.0,
        ),
        ("api", "capstan_history_jobs{status=\"succeeded\"}", 1.0),
    ];
    for (service, series, least) in expectations {
        let text = wait_until(
            &format!("{service} to report {series} ≥ {least}"),
            Duration::from_secs(30),
            || async {
                let text = scrape(service).await;
                sample(&text, series)
                    .is_some_and(|value| value >= least)
                    .then_some(text)
            },
        )
        .await;
        assert!(
            sample(&text, "capstan_nats_connected") == Some(1.0),
            "{service} is not connected:\n{text}"
        );
        assert!(
            sample(&text, "capstan_nats_out_messages_total").is_some_and(|sent| sent > 0.0),
            "{service} sent nothing:\n{text}"
        );
    }
    let api = scrape("api").await;
    assert!(
        sample(
            &api,
            "capstan_http_requests_total{method=\"POST\",status=\"202\"}"
        )
        .is_some_and(|count| count >= 1.0),
        "{api}"
    );

    // Every metric the dashboard queries is exported by some service.
    let mut all = BTreeSet::new();
    for service in ["registry", "scheduler", "executor", "api"] {
        all.extend(exported(&scrape(service).await));
    }
    let missing: Vec<_> = dashboard_metrics()
        .into_iter()
        .filter(|name| !all.contains(name))
        .collect();
    assert!(
        missing.is_empty(),
        "the dashboard queries metrics no service exports: {missing:?}"
    );
}
