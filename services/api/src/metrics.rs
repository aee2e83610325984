//! Prometheus metrics, rendered as text on each scrape: jobs by status (from the history,
//! cached a few seconds), queue depths (from JetStream), and latency histograms of the jobs
//! this replica recorded.

use std::fmt::Write as _;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::pull;
use capstan_protocol::{JobEvent, topology};
use capstan_store::StatusCounts;

use crate::State;

/// Upper bounds of the latency buckets, in seconds.
const BOUNDS: [f64; 16] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];

/// A cumulative histogram of durations.
#[derive(Default)]
pub struct Histogram {
    buckets: [AtomicU64; BOUNDS.len()],
    count: AtomicU64,
    sum_micros: AtomicU64,
}

impl Histogram {
    /// Records one duration.
    pub fn observe(&self, duration: Duration) {
        let seconds = duration.as_secs_f64();
        for (bound, bucket) in BOUNDS.iter().zip(&self.buckets) {
            if seconds <= *bound {
                bucket.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_micros.fetch_add(
            u64::try_from(duration.as_micros()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} histogram");
        for (bound, bucket) in BOUNDS.iter().zip(&self.buckets) {
            let _ = writeln!(
                out,
                "{name}_bucket{{le=\"{bound}\"}} {}",
                bucket.load(Ordering::Relaxed)
            );
        }
        let count = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let sum = self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum {sum}");
        let _ = writeln!(out, "{name}_count {count}");
    }
}

/// Job counts by status, and when they were read.
type CachedCounts = (Instant, StatusCounts);

/// This replica's counters and histograms.
#[derive(Default)]
pub struct Metrics {
    submitted: AtomicU64,
    recorded: AtomicU64,
    wait: Histogram,
    run: Histogram,
    turnaround: Histogram,
    counts: Mutex<Option<CachedCounts>>,
}

impl Metrics {
    /// A job was submitted through this replica.
    pub fn submitted(&self) {
        self.submitted.fetch_add(1, Ordering::Relaxed);
    }

    /// An event was recorded in the history by this replica.
    pub fn recorded(&self, event: &JobEvent) {
        self.recorded.fetch_add(1, Ordering::Relaxed);
        let record = &event.record;
        // Observed when the job ends: a short attempt's start has no event of its own.
        if event.kind.is_terminal()
            && let Some(finished) = record.finished_at
        {
            self.turnaround.observe(finished.since(record.created_at));
            if let Some(started) = record.started_at {
                self.wait.observe(started.since(record.created_at));
                self.run.observe(finished.since(started));
            }
        }
    }
}

/// How long job counts from the history are reused: counting a large table is not free.
const COUNTS_TTL: Duration = Duration::from_secs(5);

async fn status_counts(state: &State) -> Option<StatusCounts> {
    if let Ok(cached) = state.metrics.counts.lock()
        && let Some((at, counts)) = cached.as_ref()
        && at.elapsed() < COUNTS_TTL
    {
        return Some(counts.clone());
    }
    let counts = state.history.status_counts().await.ok()?;
    if let Ok(mut cached) = state.metrics.counts.lock() {
        *cached = Some((Instant::now(), counts.clone()));
    }
    Some(counts)
}

async fn consumer_backlog(state: &State, stream: &str, consumer: &str) -> Option<(u64, usize)> {
    let stream = state.mesh.js.get_stream(stream).await.ok()?;
    let mut consumer = stream.get_consumer::<pull::Config>(consumer).await.ok()?;
    let info = consumer.info().await.ok()?;
    Some((info.num_pending, info.num_ack_pending))
}

/// The metrics text.
pub(crate) async fn render(state: &State) -> String {
    let mut out = String::new();
    if let Some(counts) = status_counts(state).await {
        out.push_str(
            "# HELP capstan_jobs Jobs in the history, by status.\n# TYPE capstan_jobs gauge\n",
        );
        for (status, count) in &counts.known {
            let _ = writeln!(out, "capstan_jobs{{status=\"{status}\"}} {count}");
        }
        // Rows a newer version wrote, with a status this one cannot read: counted, not lost.
        let _ = writeln!(out, "capstan_jobs{{status=\"unknown\"}} {}", counts.unknown);
    }
    out.push_str("# HELP capstan_queue_depth Messages waiting to be handled, by queue.\n# TYPE capstan_queue_depth gauge\n");
    if let Some((pending, in_hand)) = consumer_backlog(
        state,
        topology::SUBMISSIONS.name,
        topology::SCHEDULER_CONSUMER,
    )
    .await
    {
        let _ = writeln!(
            out,
            "capstan_queue_depth{{queue=\"submissions\"}} {}",
            pending + in_hand as u64
        );
    }
    if let Ok(mut stream) = state.mesh.js.get_stream(topology::DISPATCH.name).await
        && let Ok(info) = stream.info().await
    {
        let _ = writeln!(
            out,
            "capstan_queue_depth{{queue=\"dispatch\"}} {}",
            info.state.messages
        );
    }
    if let Some((pending, in_hand)) =
        consumer_backlog(state, topology::EVENTS.name, topology::HISTORY_CONSUMER).await
    {
        let _ = writeln!(
            out,
            "capstan_queue_depth{{queue=\"history\"}} {}",
            pending + in_hand as u64
        );
    }
    if let Ok(systems) = crate::catalogue::summaries(&state.mesh).await {
        render_systems(&mut out, &systems);
    }
    let metrics = &state.metrics;
    let _ = writeln!(
        out,
        "# HELP capstan_api_submissions_total Jobs submitted through this API replica.\n# TYPE capstan_api_submissions_total counter\ncapstan_api_submissions_total {}",
        metrics.submitted.load(Ordering::Relaxed)
    );
    let _ = writeln!(
        out,
        "# HELP capstan_history_events_total Job events recorded by this API replica.\n# TYPE capstan_history_events_total counter\ncapstan_history_events_total {}",
        metrics.recorded.load(Ordering::Relaxed)
    );
    metrics.wait.render(
        &mut out,
        "capstan_job_wait_seconds",
        "From acceptance to the start of the attempt that ended the job, observed as it ends.",
    );
    metrics.run.render(
        &mut out,
        "capstan_job_run_seconds",
        "From the process starting to the job ending.",
    );
    metrics.turnaround.render(
        &mut out,
        "capstan_job_turnaround_seconds",
        "From acceptance to the job ending.",
    );
    out
}

/// The health of each remote system (1 for the health its last check found, 0 for the others),
/// and how many systems are in each health.
fn render_systems(out: &mut String, systems: &[capstan_protocol::SystemSummary]) {
    use capstan_protocol::SystemHealth;
    out.push_str(
        "# HELP capstan_system_health What the last check of each remote system found (1 for \
         its health, 0 for the others).\n# TYPE capstan_system_health gauge\n",
    );
    for system in systems {
        for health in SystemHealth::ALL {
            let _ = writeln!(
                out,
                "capstan_system_health{{system=\"{}\",health=\"{health}\"}} {}",
                system.name,
                u8::from(system.health == health)
            );
        }
    }
    let _ = writeln!(
        out,
        "# HELP capstan_systems Remote systems in the catalogue, by health.\n# TYPE capstan_systems gauge"
    );
    for health in SystemHealth::ALL {
        let count = systems.iter().filter(|s| s.health == health).count();
        let _ = writeln!(out, "capstan_systems{{health=\"{health}\"}} {count}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_system_reports_one_health_and_the_totals_count_them() {
        let system = |name: &str, health| capstan_protocol::SystemSummary {
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
        let mut out = String::new();
        render_systems(
            &mut out,
            &[
                system("a", Healthy),
                system("b", Healthy),
                system("c", AuthFailed),
            ],
        );
        assert!(out.contains("capstan_system_health{system=\"a\",health=\"healthy\"} 1\n"));
        assert!(out.contains("capstan_system_health{system=\"a\",health=\"unreachable\"} 0\n"));
        assert!(out.contains("capstan_system_health{system=\"c\",health=\"auth_failed\"} 1\n"));
        assert!(
            out.contains("capstan_systems{health=\"healthy\"} 2\n"),
            "{out}"
        );
        assert!(
            out.contains("capstan_systems{health=\"auth_failed\"} 1\n"),
            "{out}"
        );
    }

    #[test]
    fn histograms_are_cumulative_with_sum_and_count() {
        let histogram = Histogram::default();
        histogram.observe(Duration::from_millis(3));
        histogram.observe(Duration::from_secs(2));
        let mut out = String::new();
        histogram.render(&mut out, "x", "help");
        assert!(out.contains("x_bucket{le=\"0.005\"} 1\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"2.5\"} 2\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"+Inf\"} 2\n"), "{out}");
        assert!(out.contains("x_count 2\n"), "{out}");
        assert!(out.contains("x_sum 2.003\n"), "{out}");
    }
}
