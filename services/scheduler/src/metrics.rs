//! The scheduler's metrics, beside the mesh's: submissions by what the intake made of them,
//! how long a job took from its acceptance to its first dispatch (waiting for room included),
//! the jobs held waiting for room, timers fired, schedules' ticks by outcome, attempts settled as lost, and the lag of the
//! scheduler's three consumers.

use std::sync::{Arc, LazyLock};
use std::time::Duration;

use capstan_mesh::metrics::{Counters, Exporter, label, latency};
use capstan_protocol::topology;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;

/// What this process's scheduler did.
pub(crate) struct SchedulerMetrics {
    submissions: Counters,
    placement_seconds: Histogram,
    timers: Counter,
    lost: Counter,
    ticks: Counters,
}

static SCHEDULER: LazyLock<SchedulerMetrics> = LazyLock::new(|| SchedulerMetrics {
    submissions: Counters::default(),
    placement_seconds: latency(),
    timers: Counter::default(),
    lost: Counter::default(),
    ticks: Counters::default(),
});

/// The process's scheduler metrics.
pub(crate) fn scheduler() -> &'static SchedulerMetrics {
    &SCHEDULER
}

impl SchedulerMetrics {
    /// The intake handled a submission: `accepted` (placed or waiting), `duplicate`,
    /// `conflict`, `rejected`, or `retry` (NATS could not answer; it comes back).
    pub(crate) fn submission(&self, outcome: &'static str) {
        self.submissions
            .get_or_create(&label("outcome", outcome))
            .inc();
    }

    /// A job's first attempt was dispatched `after` its acceptance.
    pub(crate) fn placed(&self, after: Duration) {
        self.placement_seconds.observe(after.as_secs_f64());
    }

    /// A durable timer fired.
    pub(crate) fn timer(&self) {
        self.timers.inc();
    }

    /// A schedule's tick was handled here: `ran`, `skipped`, `queued` or `missed`.
    pub(crate) fn schedule_tick(&self, outcome: &'static str) {
        self.ticks.get_or_create(&label("outcome", outcome)).inc();
    }

    /// An attempt was settled as lost with its node.
    pub(crate) fn lost(&self) {
        self.lost.inc();
    }
}

/// The exporter of a scheduler: the mesh's metrics, its consumers' lag, and its own;
/// `waiting` says how many jobs it holds waiting for room.
pub(crate) fn exporter(
    mesh: &capstan_mesh::Mesh,
    waiting: Arc<dyn Fn() -> usize + Send + Sync>,
) -> Exporter {
    let metrics = scheduler();
    let mut exporter = Exporter::new(mesh);
    for spec in [
        topology::scheduler_consumer(),
        topology::place_consumer(),
        topology::timers_consumer(),
        topology::ticks_consumer(),
        topology::nodes_consumer(),
    ] {
        exporter.watch_consumer(spec.stream, spec.name);
    }
    // Every outcome is exported from the start: idle executors may take every submission, so
    // a scheduler may handle none for a long while.
    for outcome in ["accepted", "duplicate", "conflict", "rejected", "retry"] {
        drop(
            metrics
                .submissions
                .get_or_create(&label("outcome", outcome)),
        );
    }
    let registry = exporter.registry();
    registry.register(
        "capstan_scheduler_submissions",
        "Submissions handled by this scheduler, by outcome",
        metrics.submissions.clone(),
    );
    registry.register(
        "capstan_scheduler_placement_seconds",
        "From a job's acceptance to its first dispatch, waiting for room included",
        metrics.placement_seconds.clone(),
    );
    registry.register(
        "capstan_scheduler_schedule_ticks",
        "Schedules' ticks handled here, by outcome",
        metrics.ticks.clone(),
    );
    registry.register(
        "capstan_scheduler_timers",
        "Durable timers (delays, retries) fired here",
        metrics.timers.clone(),
    );
    registry.register(
        "capstan_scheduler_lost_attempts",
        "Attempts settled as lost (or handed back) because their node went away",
        metrics.lost.clone(),
    );
    let held = Gauge::<i64>::default();
    registry.register(
        "capstan_scheduler_waiting",
        "Jobs this scheduler holds waiting for an executor with room",
        held.clone(),
    );
    exporter.on_scrape(move || {
        held.set(i64::try_from(waiting()).unwrap_or(i64::MAX));
        std::future::ready(())
    });
    exporter
}
