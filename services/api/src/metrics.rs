//! The API's metrics, beside the mesh's: jobs by status (from the history, cached a few
//! seconds), queue depths (from JetStream), the remote systems' health, requests served by
//! method and status with their durations, and, for the jobs this replica recorded in the
//! history, how long they waited, ran and took in all, and how far the history's projection
//! lags behind the events.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use capstan_mesh::Mesh;
use capstan_mesh::metrics::{Exporter, Gauges, Histograms, Label, label, latencies, latency};
use capstan_protocol::{JobEvent, SystemHealth, SystemSummary, Timestamp, topology};
use capstan_store::{History, StatusCounts};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;

/// Requests by method and status.
type Requests = Family<[Label; 2], Counter>;

/// System health gauges, by system and health.
type Healths = Family<[Label; 2], Gauge>;

/// An open live stream of a dashboard page, counted while it lives.
pub struct LivePage(Gauge);

impl Drop for LivePage {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// This replica's metrics and their exporter.
pub struct Metrics {
    exporter: Arc<Exporter>,
    submitted: Counter,
    recorded: Counter,
    wait: Histogram,
    run: Histogram,
    turnaround: Histogram,
    lag: Histogram,
    requests: Requests,
    request_seconds: Histograms,
    pages: Gauge,
}

impl Metrics {
    /// The metrics of an API on `mesh` whose history is `history`.
    pub fn new(mesh: &Mesh, history: History) -> Self {
        let mut exporter = Exporter::new(mesh);
        for spec in [topology::history_consumer(), topology::audit_consumer()] {
            exporter.watch_consumer(spec.stream, spec.name);
        }
        let metrics = Scraped::default();
        let (submitted, recorded) = (Counter::default(), Counter::default());
        let (wait, run, turnaround, lag) = (latency(), latency(), latency(), latency());
        let (requests, request_seconds) = (Requests::default(), latencies());
        let pages = Gauge::default();
        let registry = exporter.registry();
        registry.register(
            "capstan_history_jobs",
            "Jobs in the history, by status",
            metrics.jobs.clone(),
        );
        registry.register(
            "capstan_queue_depth",
            "Messages waiting to be handled, by queue",
            metrics.queues.clone(),
        );
        registry.register(
            "capstan_system_health",
            "What the last check of each remote system found (1 for its health, 0 for the others)",
            metrics.health.clone(),
        );
        registry.register(
            "capstan_remote_systems",
            "Remote systems in the catalogue, by health",
            metrics.systems.clone(),
        );
        registry.register(
            "capstan_api_submissions",
            "Jobs submitted through this API replica",
            submitted.clone(),
        );
        registry.register(
            "capstan_history_events",
            "Job events recorded in the history by this API replica",
            recorded.clone(),
        );
        registry.register(
            "capstan_job_wait_seconds",
            "From acceptance to the start of the attempt that ended the job, observed as it ends",
            wait.clone(),
        );
        registry.register(
            "capstan_job_run_seconds",
            "From the process starting to the job ending",
            run.clone(),
        );
        registry.register(
            "capstan_job_turnaround_seconds",
            "From acceptance to the job ending",
            turnaround.clone(),
        );
        registry.register(
            "capstan_history_lag_seconds",
            "From an event to its row in the history (the projection's lag)",
            lag.clone(),
        );
        registry.register(
            "capstan_http_requests",
            "Requests this API replica answered, by method and status",
            requests.clone(),
        );
        registry.register(
            "capstan_http_request_seconds",
            "How long this API replica took to answer, by method",
            request_seconds.clone(),
        );
        registry.register(
            "capstan_dashboard_live_pages",
            "Dashboard pages with a live stream of changes open on this API replica",
            pages.clone(),
        );
        let scraped = Arc::new(metrics);
        let reader = (mesh.clone(), history);
        exporter.on_scrape(move || {
            let (scraped, (mesh, history)) = (scraped.clone(), reader.clone());
            async move { scraped.refresh(&mesh, &history).await }
        });
        Self {
            exporter: Arc::new(exporter),
            submitted,
            recorded,
            wait,
            run,
            turnaround,
            lag,
            requests,
            request_seconds,
            pages,
        }
    }

    /// A dashboard page opened its live stream; the stream is counted until the returned
    /// guard is dropped (when the page is left or the stream ends).
    pub fn live_page(&self) -> LivePage {
        self.pages.inc();
        LivePage(self.pages.clone())
    }

    /// The metrics text.
    pub async fn render(&self) -> String {
        self.exporter.render().await
    }

    /// A job was submitted through this replica.
    pub fn submitted(&self) {
        self.submitted.inc();
    }

    /// A request was answered with `status` after `took`. Methods other than the standard
    /// ones count as `other`: a client inventing methods must not grow the series.
    pub fn request(&self, method: &str, status: u16, took: Duration) {
        const KNOWN: [&str; 7] = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"];
        let method = KNOWN
            .into_iter()
            .find(|known| *known == method)
            .unwrap_or("other");
        self.requests
            .get_or_create(&[
                ("method", method.to_owned()),
                ("status", status.to_string()),
            ])
            .inc();
        self.request_seconds
            .get_or_create(&label("method", method))
            .observe(took.as_secs_f64());
    }

    /// An event was recorded in the history by this replica.
    pub fn recorded(&self, event: &JobEvent) {
        self.recorded.inc();
        self.lag
            .observe(Timestamp::now().since(event.at).as_secs_f64());
        let record = &event.record;
        // Observed when the job ends: a short attempt's start has no event of its own.
        if event.kind.is_terminal()
            && let Some(finished) = record.finished_at
        {
            self.turnaround
                .observe(finished.since(record.created_at).as_secs_f64());
            if let Some(started) = record.started_at {
                self.wait
                    .observe(started.since(record.created_at).as_secs_f64());
                self.run.observe(finished.since(started).as_secs_f64());
            }
        }
    }

    /// Serves the metrics without a credential on `listen`, with `/healthz` and `/readyz`.
    pub async fn serve(
        &self,
        listen: &str,
        shutdown: tokio_util::sync::CancellationToken,
    ) -> Result<tokio::task::JoinHandle<()>, capstan_mesh::Error> {
        let (_, task) = self.exporter.clone().serve(listen, shutdown).await?;
        Ok(task)
    }
}

/// What is read at each scrape: gauges set from the history and JetStream.
#[derive(Default)]
struct Scraped {
    jobs: Gauges,
    queues: Gauges,
    health: Healths,
    systems: Gauges,
    /// Job counts by status, and when they were read.
    counts: Mutex<Option<(Instant, StatusCounts)>>,
}

/// How long job counts from the history are reused: counting a large table is not free.
const COUNTS_TTL: Duration = Duration::from_secs(5);

impl Scraped {
    async fn refresh(&self, mesh: &Mesh, history: &History) {
        let (counts, depths, systems) = tokio::join!(
            self.status_counts(history),
            queue_depths(mesh),
            crate::catalogue::summaries(mesh)
        );
        if let Some(counts) = counts {
            for (status, count) in &counts.known {
                self.jobs
                    .get_or_create(&label("status", status.as_str()))
                    .set(*count);
            }
            // Rows a newer version wrote, with a status this one cannot read: counted, not lost.
            self.jobs
                .get_or_create(&label("status", "unknown"))
                .set(counts.unknown);
        }
        for (queue, depth) in depths {
            self.queues
                .get_or_create(&label("queue", queue))
                .set(i64::try_from(depth).unwrap_or(i64::MAX));
        }
        if let Ok(systems) = systems {
            self.set_systems(&systems);
        }
    }

    async fn status_counts(&self, history: &History) -> Option<StatusCounts> {
        if let Ok(cached) = self.counts.lock()
            && let Some((at, counts)) = cached.as_ref()
            && at.elapsed() < COUNTS_TTL
        {
            return Some(counts.clone());
        }
        let counts = history.status_counts().await.ok()?;
        if let Ok(mut cached) = self.counts.lock() {
            *cached = Some((Instant::now(), counts.clone()));
        }
        Some(counts)
    }

    /// The health of each remote system (1 for the health its last check found, 0 for the
    /// others), and how many systems are in each health. A system no longer in the catalogue
    /// is no longer reported.
    fn set_systems(&self, systems: &[SystemSummary]) {
        self.health.clear();
        for system in systems {
            for health in SystemHealth::ALL {
                self.health
                    .get_or_create(&[
                        ("system", system.name.clone()),
                        ("health", health.to_string()),
                    ])
                    .set(i64::from(system.health == health));
            }
        }
        for health in SystemHealth::ALL {
            let count = systems.iter().filter(|s| s.health == health).count();
            self.systems
                .get_or_create(&label("health", health.to_string()))
                .set(i64::try_from(count).unwrap_or(i64::MAX));
        }
    }
}

/// The submissions and history consumers' backlog (waiting plus in hand), and the dispatch
/// stream's messages.
async fn queue_depths(mesh: &Mesh) -> Vec<(&'static str, u64)> {
    use async_nats::jetstream::consumer::pull;
    let backlog = |stream: &'static str, consumer: &'static str| async move {
        let stream = mesh.js.get_stream(stream).await.ok()?;
        let mut consumer = stream.get_consumer::<pull::Config>(consumer).await.ok()?;
        let info = consumer.info().await.ok()?;
        Some(info.num_pending + info.num_ack_pending as u64)
    };
    let dispatch = async {
        let mut stream = mesh.js.get_stream(topology::DISPATCH.name).await.ok()?;
        Some(stream.info().await.ok()?.state.messages)
    };
    let (submissions, history, dispatch) = tokio::join!(
        backlog(topology::SUBMISSIONS.name, topology::SCHEDULER_CONSUMER),
        backlog(topology::EVENTS.name, topology::HISTORY_CONSUMER),
        dispatch
    );
    [
        ("submissions", submissions),
        ("history", history),
        ("dispatch", dispatch),
    ]
    .into_iter()
    .filter_map(|(queue, depth)| Some((queue, depth?)))
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_system_reports_one_health_and_the_totals_count_them() {
        let system = |name: &str, health| SystemSummary {
            name: name.into(),
            hostname: "h".into(),
            port: 22,
            username: "u".into(),
            auth_method: "password".into(),
            labels: Default::default(),
            active: true,
            health,
            checked_at: None,
        };
        use capstan_protocol::SystemHealth::{AuthFailed, Healthy};
        let scraped = Scraped::default();
        let mut registry = capstan_mesh::metrics::Registry::default();
        registry.register("capstan_system_health", "h", scraped.health.clone());
        registry.register("capstan_remote_systems", "s", scraped.systems.clone());
        scraped.set_systems(&[system("gone", Healthy)]);
        scraped.set_systems(&[
            system("a", Healthy),
            system("b", Healthy),
            system("c", AuthFailed),
        ]);
        let out = capstan_mesh::metrics::render(&registry);
        assert!(
            out.contains("capstan_system_health{system=\"a\",health=\"healthy\"} 1\n"),
            "{out}"
        );
        assert!(
            out.contains("capstan_system_health{system=\"a\",health=\"unreachable\"} 0\n"),
            "{out}"
        );
        assert!(
            out.contains("capstan_system_health{system=\"c\",health=\"auth_failed\"} 1\n"),
            "{out}"
        );
        assert!(
            !out.contains("system=\"gone\""),
            "a removed system is still reported:\n{out}"
        );
        assert!(
            out.contains("capstan_remote_systems{health=\"healthy\"} 2\n"),
            "{out}"
        );
        assert!(
            out.contains("capstan_remote_systems{health=\"auth_failed\"} 1\n"),
            "{out}"
        );
    }
}
