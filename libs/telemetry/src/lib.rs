//! Logging, tracing and trace-context propagation shared by every Capstan service.
//!
//! Logs are structured: `CAPSTAN_LOG_FORMAT=json` prints one JSON object a line, anything else
//! human-readable text. The filter comes from `CAPSTAN_LOG` (then `RUST_LOG`), default
//! `info,async_nats=warn`, and filters the logs only: spans are kept for tracing at `info`
//! and above whatever the log level ([`TRACE_DIRECTIVES`]), so quieting the logs neither stops
//! the export nor breaks the trace context a job carries. What is exported is the sampler's
//! to decide.
//!
//! Traces follow the OpenTelemetry conventions: spans are exported over OTLP/HTTP when
//! `OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set and
//! `OTEL_TRACES_EXPORTER` is not `none`; the service name is `OTEL_SERVICE_NAME`, default
//! `capstan-<service>`; the sampler is `OTEL_TRACES_SAMPLER` (default parent-based, always on).
//! Without an endpoint nothing is exported and spans are not recorded for OpenTelemetry, but
//! they still carry trace context (`relay`), so a job submitted with a `traceparent` keeps it
//! through every hop. [`propagation`] moves that context through NATS headers and HTTP
//! headers.

mod otlp;
pub mod propagation;
mod relay;

use std::io::IsTerminal;
use std::time::Duration;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::Layer as _;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// Keeps telemetry running; dropping it flushes the spans not yet exported.
#[must_use = "dropping the guard stops telemetry"]
pub struct Guard {
    provider: Option<SdkTracerProvider>,
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take() {
            // Bounded: a collector that is gone must not hold up the exit.
            if let Err(error) = provider.shutdown_with_timeout(Duration::from_secs(5)) {
                eprintln!("telemetry: flushing spans failed: {error}");
            }
        }
    }
}

/// The spans kept for tracing (exported, or relayed for their context), whatever the logs'
/// filter says.
pub const TRACE_DIRECTIVES: &str = "info,async_nats=warn";

/// Installs logging and tracing for `service` (e.g. `registry`). Call once, first thing in
/// `main`, inside the tokio runtime (the exporter sends on it). Later calls install nothing and
/// return an inert guard, so tests may call it freely.
pub fn init(service: &str) -> Guard {
    let filter = std::env::var("CAPSTAN_LOG")
        .ok()
        .or_else(|| std::env::var("RUST_LOG").ok())
        .and_then(|directives| EnvFilter::try_new(directives).ok())
        .unwrap_or_else(|| EnvFilter::new("info,async_nats=warn"));
    let json = std::env::var("CAPSTAN_LOG_FORMAT").is_ok_and(|format| format == "json");

    let service_name = std::env::var("OTEL_SERVICE_NAME")
        .ok()
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| format!("capstan-{service}"));
    let mut builder = SdkTracerProvider::builder().with_resource(
        Resource::builder()
            .with_service_name(service_name.clone())
            .build(),
    );
    let mut exporting = otlp::configured();
    if exporting {
        match otlp::exporter() {
            Ok(exporter) => builder = builder.with_batch_exporter(exporter),
            Err(error) => {
                eprintln!("telemetry: no span export: {error}");
                exporting = false;
            }
        }
    }
    let provider = builder.build();
    let tracer = provider.tracer(service_name);
    // Spans are made on every hop of every job, so what each costs matters: no busy and idle
    // times and no OpenTelemetry context switched in on every poll of an instrumented future
    // (propagation reads the context from the tracing span itself), and no thread attributes
    // (a runtime's worker threads say nothing about a job).
    let otel = tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_error_records_to_exceptions(true)
        .with_tracked_inactivity(false)
        .with_context_activation(false)
        .with_threads(false);
    // Without an exporter a recorded span is thrown away when it ends: the spans then only
    // carry the trace context from hop to hop (see `relay`).
    // Each layer has its own filter: the logs' level must not decide which spans exist.
    let traces = || EnvFilter::new(TRACE_DIRECTIVES);
    let (otel, relay) = if exporting {
        (Some(otel.with_filter(traces())), None)
    } else {
        (
            None,
            Some(relay::RelayLayer::default().with_filter(traces())),
        )
    };

    let registry = tracing_subscriber::registry().with(otel).with(relay);
    let result = if json {
        registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .with_current_span(false)
                    .with_writer(std::io::stderr)
                    .with_filter(filter),
            )
            .try_init()
    } else {
        registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_ansi(std::io::stderr().is_terminal())
                    .with_writer(std::io::stderr)
                    .with_filter(filter),
            )
            .try_init()
    };
    if result.is_err() {
        return Guard { provider: None };
    }
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    opentelemetry::global::set_tracer_provider(provider.clone());
    tracing::debug!(service, exporting, "telemetry initialised");
    Guard {
        provider: Some(provider),
    }
}
