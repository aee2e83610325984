//! Prometheus metrics, the part every service shares: what this process did with NATS (the
//! round trip of each kind of request, the failures by operation, its connection's message
//! and byte counts), the rejections it published by origin and code, the redeliveries its
//! consumers received, and the lag of the consumers it reads; and the [`Exporter`] that
//! renders them beside the service's own, in Prometheus' text format, and serves them with
//! `/healthz` and `/readyz` on `CAPSTAN_METRICS_LISTEN`.
//!
//! The counters and histograms of this module are the process's ([`mesh`]): a process that
//! runs several services (a test) counts their work together, as a scrape of it should.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::pull;
use poem::listener::{Acceptor, Listener, TcpListener};
use poem::{EndpointExt, Route, Server};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::Histogram;
use tokio_util::sync::CancellationToken;

pub use prometheus_client::registry::Registry;

use crate::Error;

/// One label: its name and value.
pub type Label = (&'static str, String);

/// A family of counters with one label.
pub type Counters = Family<[Label; 1], Counter>;
/// A family of counters with two labels.
pub type Counters2 = Family<[Label; 2], Counter>;
/// A family of gauges with one label.
pub type Gauges = Family<[Label; 1], Gauge>;
/// A label whose value is fixed in the code (an operation's name): no allocation to count.
pub type StaticLabel = [(&'static str, &'static str); 1];

/// A family of latency histograms with one label (see [`latency`]).
pub type Histograms = Family<[Label; 1], Histogram, fn() -> Histogram>;

/// The bounds of every latency histogram, in seconds: from half a millisecond to five
/// minutes, so a NATS round trip and a long job are both measured.
pub const LATENCY_BOUNDS: [f64; 18] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0, 120.0, 300.0,
];

/// A latency histogram with [`LATENCY_BOUNDS`].
pub fn latency() -> Histogram {
    Histogram::new(LATENCY_BOUNDS)
}

/// A family of latency histograms.
pub fn latencies() -> Histograms {
    Family::new_with_constructor(latency as fn() -> Histogram)
}

/// A one-label label set.
pub fn label(name: &'static str, value: impl Into<String>) -> [Label; 1] {
    [(name, value.into())]
}

/// The NATS operations every service does.
const COMMON_OPS: [&str; 5] = [
    "kv get",
    "kv create",
    "kv update",
    "kv put",
    "event publish",
];

/// What this process did with NATS, counted once for the process.
pub struct MeshMetrics {
    /// Request round trips (a KV read or write, a publish awaiting its acknowledgement), by
    /// operation.
    pub requests: Family<StaticLabel, Histogram, fn() -> Histogram>,
    /// NATS operations that failed for want of the server, by operation.
    pub errors: Family<StaticLabel, Counter>,
    /// Rejections published, by origin and code.
    pub rejections: Counters2,
    /// Messages a consumer received again (delivered more than once), by consumer.
    pub redeliveries: Counters,
}

static MESH: LazyLock<MeshMetrics> = LazyLock::new(|| MeshMetrics {
    requests: Family::new_with_constructor(latency as fn() -> Histogram),
    errors: Family::default(),
    rejections: Counters2::default(),
    redeliveries: Counters::default(),
});

/// The process's [`MeshMetrics`].
pub fn mesh() -> &'static MeshMetrics {
    &MESH
}

impl MeshMetrics {
    /// Records one round trip of `op` that took from `started` until now.
    pub fn request(&self, op: &'static str, started: Instant) {
        self.requests
            .get_or_create(&[("op", op)])
            .observe(started.elapsed().as_secs_f64());
    }

    /// Counts `message`, received from `consumer`, if it was delivered before.
    pub fn delivered(
        &self,
        consumer: &async_nats::jetstream::consumer::PullConsumer,
        message: &async_nats::jetstream::Message,
    ) {
        if message.info().is_ok_and(|info| info.delivered > 1) {
            self.redeliveries
                .get_or_create(&label("consumer", consumer.cached_info().name.as_str()))
                .inc();
        }
    }

    fn register(&self, registry: &mut Registry) {
        // The common operations' error counts read zero before the first error, so a rate
        // over them is defined from the start.
        for op in COMMON_OPS {
            drop(self.errors.get_or_create(&[("op", op)]));
        }
        registry.register(
            "capstan_nats_request_seconds",
            "Round trips of NATS requests (KV reads and writes, acknowledged publishes), by operation",
            self.requests.clone(),
        );
        registry.register(
            "capstan_nats_errors",
            "NATS operations that failed for want of the server, by operation",
            self.errors.clone(),
        );
        registry.register(
            "capstan_rejections",
            "Messages rejected with a rejection event, by origin and code",
            self.rejections.clone(),
        );
        registry.register(
            "capstan_redeliveries",
            "Messages a durable consumer received more than once, by consumer",
            self.redeliveries.clone(),
        );
    }
}

/// The connection's own counts, read from the client at each scrape.
#[derive(Debug)]
struct Connection(async_nats::Client);

impl Collector for Connection {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        use std::sync::atomic::Ordering::Relaxed;
        let statistics = self.0.statistics();
        let counters = [
            (
                "capstan_nats_in_messages",
                "Messages received from NATS",
                statistics.in_messages.load(Relaxed),
            ),
            (
                "capstan_nats_out_messages",
                "Messages sent to NATS",
                statistics.out_messages.load(Relaxed),
            ),
            (
                "capstan_nats_in_bytes",
                "Bytes received from NATS",
                statistics.in_bytes.load(Relaxed),
            ),
            (
                "capstan_nats_out_bytes",
                "Bytes sent to NATS",
                statistics.out_bytes.load(Relaxed),
            ),
            (
                "capstan_nats_connects",
                "Connections made to NATS, the first included",
                statistics.connects.load(Relaxed),
            ),
        ];
        for (name, help, value) in counters {
            let counter = ConstCounter::new(value);
            counter.encode(encoder.encode_descriptor(
                name,
                help,
                None,
                counter.metric_type(),
            )?)?;
        }
        let connected = ConstGauge::new(i64::from(
            self.0.connection_state() == async_nats::connection::State::Connected,
        ));
        connected.encode(encoder.encode_descriptor(
            "capstan_nats_connected",
            "1 while the connection to NATS is up",
            None,
            connected.metric_type(),
        )?)
    }
}

/// A future a scrape waits for before rendering (to read what is not counted as it happens).
type Refresh = Box<dyn Fn() -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

/// A consumer whose lag is read at each scrape: its stream and name.
type Watched = (&'static str, String);

/// How long a scrape waits for what it reads from NATS before rendering what it has.
const SCRAPE_READS: Duration = Duration::from_secs(2);

/// A service's metrics: the shared ones, the service's own (registered in
/// [`Exporter::registry`]), and what is read at each scrape.
pub struct Exporter {
    registry: Registry,
    client: async_nats::Client,
    js: async_nats::jetstream::Context,
    consumers: Vec<Watched>,
    pending: Gauges,
    ack_pending: Gauges,
    refresh: Vec<Refresh>,
}

impl Exporter {
    /// An exporter of `mesh`'s connection and of the process's [`MeshMetrics`].
    pub fn new(mesh: &crate::Mesh) -> Self {
        let mut registry = Registry::default();
        MESH.register(&mut registry);
        registry.register_collector(Box::new(Connection(mesh.client.clone())));
        let pending = Gauges::default();
        let ack_pending = Gauges::default();
        registry.register(
            "capstan_consumer_pending",
            "Messages a durable consumer has yet to receive, by consumer",
            pending.clone(),
        );
        registry.register(
            "capstan_consumer_ack_pending",
            "Messages a durable consumer received and has not acknowledged yet, by consumer",
            ack_pending.clone(),
        );
        Self {
            registry,
            client: mesh.client.clone(),
            js: mesh.js.clone(),
            consumers: Vec::new(),
            pending,
            ack_pending,
            refresh: Vec::new(),
        }
    }

    /// Where the service registers its own metrics.
    pub fn registry(&mut self) -> &mut Registry {
        &mut self.registry
    }

    /// Reads the lag of consumer `name` on `stream` at each scrape.
    pub fn watch_consumer(&mut self, stream: &'static str, name: impl Into<String>) -> &mut Self {
        let name = name.into();
        // Read as zero until the first redelivery.
        drop(
            MESH.redeliveries
                .get_or_create(&label("consumer", name.as_str())),
        );
        self.consumers.push((stream, name));
        self
    }

    /// Runs `refresh` before each render, to set gauges from what the service holds or reads.
    pub fn on_scrape<F, Fut>(&mut self, refresh: F) -> &mut Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        self.refresh.push(Box::new(move || Box::pin(refresh())));
        self
    }

    /// The metrics in Prometheus' text format, after reading what is read at each scrape
    /// (for at most a few seconds: a NATS that does not answer leaves the last values).
    pub async fn render(&self) -> String {
        let reads = async {
            let consumers = futures::future::join_all(
                self.consumers
                    .iter()
                    .map(|(stream, name)| self.read_consumer(stream, name)),
            );
            let refreshes = futures::future::join_all(self.refresh.iter().map(|refresh| refresh()));
            tokio::join!(consumers, refreshes);
        };
        if tokio::time::timeout(SCRAPE_READS, reads).await.is_err() {
            tracing::debug!("a scrape's reads took too long; rendering what is known");
        }
        render(&self.registry)
    }

    async fn read_consumer(&self, stream: &str, name: &str) {
        let read = async {
            let stream = self.js.get_stream(stream).await.ok()?;
            let mut consumer = stream.get_consumer::<pull::Config>(name).await.ok()?;
            consumer.info().await.ok().cloned()
        };
        if let Some(info) = read.await {
            let key = label("consumer", name);
            self.pending
                .get_or_create(&key)
                .set(i64::try_from(info.num_pending).unwrap_or(i64::MAX));
            self.ack_pending
                .get_or_create(&key)
                .set(i64::try_from(info.num_ack_pending).unwrap_or(i64::MAX));
        }
    }

    /// Serves `/metrics`, `/healthz` (the process answers) and `/readyz` (its NATS connection
    /// is up) without a credential on `listen` until `shutdown`; the address it listens on,
    /// and the task serving.
    pub async fn serve(
        self: Arc<Self>,
        listen: &str,
        shutdown: CancellationToken,
    ) -> Result<(SocketAddr, tokio::task::JoinHandle<()>), Error> {
        let acceptor = TcpListener::bind(listen.to_owned())
            .into_acceptor()
            .await
            .map_err(|source| Error::setup(format!("metrics listener on {listen}"), source))?;
        let address = acceptor
            .local_addr()
            .first()
            .and_then(|address| address.as_socket_addr().copied())
            .ok_or_else(|| {
                Error::setup(
                    format!("metrics listener on {listen}"),
                    "it has no socket address",
                )
            })?;
        let client = self.client.clone();
        let app = Route::new()
            .at(
                "/metrics",
                poem::get(poem::endpoint::make(move |_| {
                    let exporter = self.clone();
                    async move {
                        poem::Response::builder()
                            .content_type(CONTENT_TYPE)
                            .body(exporter.render().await)
                    }
                })),
            )
            .at("/healthz", poem::get(poem::endpoint::make_sync(|_| "ok")))
            .at(
                "/readyz",
                poem::get(poem::endpoint::make_sync(move |_| {
                    if client.connection_state() == async_nats::connection::State::Connected {
                        poem::Response::builder().body("ready")
                    } else {
                        poem::Response::builder()
                            .status(poem::http::StatusCode::SERVICE_UNAVAILABLE)
                            .body("not connected to NATS")
                    }
                })),
            )
            .map_to_response();
        tracing::info!(%address, "metrics listener ready");
        let task = tokio::spawn(async move {
            let served = Server::new_with_acceptor(acceptor)
                .run_with_graceful_shutdown(
                    app,
                    shutdown.cancelled_owned(),
                    Some(Duration::from_secs(5)),
                )
                .await;
            if let Err(error) = served {
                tracing::warn!(error = %error, "the metrics listener failed");
            }
        });
        Ok((address, task))
    }
}

/// The content type of [`render`]'s text.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// `registry`'s metrics in Prometheus' text format (version 0.0.4).
pub fn render(registry: &Registry) -> String {
    let mut text = String::new();
    if let Err(error) = prometheus_client::encoding::prometheus_text::encode(&mut text, registry) {
        tracing::warn!(error = %error, "cannot render the metrics");
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_gauges_and_histograms_render_in_the_prometheus_text_format() {
        let mut registry = Registry::default();
        let errors = Counters::default();
        let waits = latencies();
        registry.register("capstan_test_errors", "errors", errors.clone());
        registry.register("capstan_test_wait_seconds", "waits", waits.clone());
        errors.get_or_create(&label("op", "kv get")).inc_by(3);
        waits.get_or_create(&label("queue", "a")).observe(0.003);
        let text = render(&registry);
        assert!(
            text.contains("capstan_test_errors_total{op=\"kv get\"} 3\n"),
            "{text}"
        );
        assert!(
            text.contains("# TYPE capstan_test_wait_seconds histogram"),
            "{text}"
        );
        assert!(
            text.contains("capstan_test_wait_seconds_bucket{le=\"0.005\",queue=\"a\"} 1\n")
                || text.contains("capstan_test_wait_seconds_bucket{queue=\"a\",le=\"0.005\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("capstan_test_wait_seconds_count{queue=\"a\"} 1\n"),
            "{text}"
        );
    }
}
