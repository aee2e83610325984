//! The registry's metrics, beside the mesh's: the nodes by status and availability (from its
//! view of the nodes bucket, at each scrape), heartbeats answered, node events announced by
//! kind, and the lag of the tally's consumer.

use std::sync::LazyLock;

use capstan_mesh::BucketView;
use capstan_mesh::metrics::{Counters, Exporter, label};
use capstan_protocol::{Availability, NodeRecord, NodeStatus, topology};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;

/// What this process's registry did.
pub(crate) struct RegistryMetrics {
    heartbeats: Counter,
    events: Counters,
}

static REGISTRY: LazyLock<RegistryMetrics> = LazyLock::new(|| RegistryMetrics {
    heartbeats: Counter::default(),
    events: Counters::default(),
});

/// The process's registry metrics.
pub(crate) fn registry() -> &'static RegistryMetrics {
    &REGISTRY
}

impl RegistryMetrics {
    /// A heartbeat was answered.
    pub(crate) fn heartbeat(&self) {
        self.heartbeats.inc();
    }

    /// A node event of `kind` was announced.
    pub(crate) fn event(&self, kind: &'static str) {
        self.events.get_or_create(&label("kind", kind)).inc();
    }
}

/// Nodes by status and availability.
type NodeGauges = Family<[(&'static str, &'static str); 2], Gauge>;

/// The exporter of a registry: the mesh's metrics, the tally's lag, and its own.
pub(crate) fn exporter(mesh: &capstan_mesh::Mesh, view: BucketView<NodeRecord>) -> Exporter {
    let metrics = registry();
    let mut exporter = Exporter::new(mesh);
    let tally = topology::registry_consumer();
    exporter.watch_consumer(tally.stream, tally.name);
    let registry = exporter.registry();
    registry.register(
        "capstan_registry_heartbeats",
        "Heartbeats this registry answered",
        metrics.heartbeats.clone(),
    );
    registry.register(
        "capstan_registry_node_events",
        "Node events this registry announced, by kind",
        metrics.events.clone(),
    );
    let nodes = NodeGauges::default();
    registry.register(
        "capstan_registry_nodes",
        "Executor nodes known, by status and availability",
        nodes.clone(),
    );
    exporter.on_scrape(move || {
        let counts = view.read(|records| {
            let mut counts = std::collections::HashMap::new();
            for record in records.values() {
                *counts
                    .entry((record.value.status, record.value.availability))
                    .or_insert(0_i64) += 1;
            }
            counts
        });
        // Every combination is set, so a count that fell to zero reads zero.
        for status in [NodeStatus::Up, NodeStatus::Down, NodeStatus::Left] {
            for availability in [
                Availability::Active,
                Availability::Cordoned,
                Availability::Draining,
                Availability::Drained,
            ] {
                nodes
                    .get_or_create(&[
                        ("status", status.as_str()),
                        ("availability", availability.as_str()),
                    ])
                    .set(counts.get(&(status, availability)).copied().unwrap_or(0));
            }
        }
        std::future::ready(())
    });
    exporter
}
