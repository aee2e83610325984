//! The executor's metrics, beside the mesh's: submissions taken (run at once or handed on),
//! attempts by outcome and how long they ran
//! (local or on a remote system), how long starting a process took, this node's slots and how
//! many are busy, and, on a gateway, how its SSH runs got their connections and how many it
//! keeps open.

use std::sync::{Arc, LazyLock};
use std::time::Duration;

use capstan_mesh::metrics::{Counters, Exporter, Histograms, label, latencies, latency};
use capstan_remote::ssh::Connected;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;

/// What this process's executor did.
pub(crate) struct ExecutorMetrics {
    attempts: Counters,
    submissions: Counters,
    attempt_seconds: Histograms,
    spawn_seconds: Histogram,
    ssh_connections: Counters,
    ssh_connect_seconds: Histogram,
}

static EXECUTOR: LazyLock<ExecutorMetrics> = LazyLock::new(|| ExecutorMetrics {
    attempts: Counters::default(),
    submissions: Counters::default(),
    attempt_seconds: latencies(),
    spawn_seconds: latency(),
    ssh_connections: Counters::default(),
    ssh_connect_seconds: latency(),
});

/// The process's executor metrics.
pub(crate) fn executor() -> &'static ExecutorMetrics {
    &EXECUTOR
}

impl ExecutorMetrics {
    /// An attempt ended with `status` after running `ran`, here or on a remote system.
    pub(crate) fn attempt(&self, status: &'static str, remote: bool, ran: Duration) {
        self.attempts.get_or_create(&label("status", status)).inc();
        self.attempt_seconds
            .get_or_create(&label("where", if remote { "remote" } else { "local" }))
            .observe(ran.as_secs_f64());
    }

    /// A submission taken from the shared consumer was run here at once.
    pub(crate) fn taken(&self) {
        self.submissions
            .get_or_create(&label("outcome", "taken"))
            .inc();
    }

    /// A submission taken from the shared consumer was handed on for placement.
    pub(crate) fn handed_on(&self) {
        self.submissions
            .get_or_create(&label("outcome", "handed_on"))
            .inc();
    }

    /// Starting a process took `took`.
    pub(crate) fn spawned(&self, took: Duration) {
        self.spawn_seconds.observe(took.as_secs_f64());
    }

    /// How an SSH run got its connection.
    pub(crate) fn ssh(&self, connected: Connected) {
        let (outcome, took) = match connected {
            Connected::Reused => ("reused", None),
            Connected::Made(took) => ("made", Some(took)),
            Connected::Failed(took) => ("failed", Some(took)),
        };
        self.ssh_connections
            .get_or_create(&label("outcome", outcome))
            .inc();
        if let Some(took) = took {
            self.ssh_connect_seconds.observe(took.as_secs_f64());
        }
    }
}

/// The exporter of an executor: the mesh's metrics, its dispatch consumer's lag, and its own;
/// `busy` says how many slots hold an attempt, `pooled` how many SSH connections are kept.
pub(crate) fn exporter(
    mesh: &capstan_mesh::Mesh,
    consumer: String,
    slots: u32,
    busy: Arc<dyn Fn() -> usize + Send + Sync>,
    pooled: Option<Arc<dyn Fn() -> usize + Send + Sync>>,
) -> Exporter {
    let metrics = executor();
    let mut exporter = Exporter::new(mesh);
    exporter.watch_consumer(capstan_protocol::topology::DISPATCH.name, consumer);
    for outcome in ["reused", "made", "failed"] {
        drop(
            metrics
                .ssh_connections
                .get_or_create(&label("outcome", outcome)),
        );
    }
    let registry = exporter.registry();
    registry.register(
        "capstan_executor_attempts",
        "Attempts this executor ran to their end, by status",
        metrics.attempts.clone(),
    );
    for outcome in ["taken", "handed_on"] {
        drop(
            metrics
                .submissions
                .get_or_create(&label("outcome", outcome)),
        );
    }
    registry.register(
        "capstan_executor_submissions",
        "Submissions this executor took: run at once, or handed on for placement",
        metrics.submissions.clone(),
    );
    registry.register(
        "capstan_executor_attempt_seconds",
        "How long attempts ran, from the claim to the process's end, local or remote",
        metrics.attempt_seconds.clone(),
    );
    registry.register(
        "capstan_executor_spawn_seconds",
        "How long starting a job's process took",
        metrics.spawn_seconds.clone(),
    );
    registry.register(
        "capstan_ssh_connections",
        "How SSH runs got their connection: reused, made, or failed",
        metrics.ssh_connections.clone(),
    );
    registry.register(
        "capstan_ssh_connect_seconds",
        "How long connecting and logging in to a remote system took",
        metrics.ssh_connect_seconds.clone(),
    );
    let (slots_gauge, busy_gauge, pooled_gauge) = (
        Gauge::<i64>::default(),
        Gauge::<i64>::default(),
        Gauge::<i64>::default(),
    );
    slots_gauge.set(i64::from(slots));
    registry.register(
        "capstan_executor_slots",
        "Jobs this executor runs at once",
        slots_gauge,
    );
    registry.register(
        "capstan_executor_busy_slots",
        "Slots holding an attempt now",
        busy_gauge.clone(),
    );
    registry.register(
        "capstan_ssh_pooled_connections",
        "SSH connections kept open for reuse",
        pooled_gauge.clone(),
    );
    exporter.on_scrape(move || {
        busy_gauge.set(i64::try_from(busy()).unwrap_or(i64::MAX));
        if let Some(pooled) = &pooled {
            pooled_gauge.set(i64::try_from(pooled()).unwrap_or(i64::MAX));
        }
        std::future::ready(())
    });
    exporter
}
