//! Trace context across hops: injected into the headers of every NATS publish, extracted on
//! every consume, and read from HTTP requests, using W3C `traceparent`/`tracestate`.

use opentelemetry::propagation::{Extractor, Injector};
use opentelemetry::trace::TraceContextExt;
use tracing_opentelemetry::OpenTelemetrySpanExt;

struct NatsInjector<'a>(&'a mut async_nats::HeaderMap);

impl Injector for NatsInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0.insert(key, value.as_str());
    }
}

struct NatsExtractor<'a>(&'a async_nats::HeaderMap);

impl Extractor for NatsExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(|value| value.as_str())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.iter().map(|(name, _)| name.as_ref()).collect()
    }
}

/// The trace context of `span`: its place from the relay layer when no spans are recorded,
/// otherwise the recording layer's.
fn context_of(span: &tracing::Span) -> opentelemetry::Context {
    match crate::relay::place(span) {
        Some(place) => opentelemetry::Context::new().with_remote_span_context(place),
        None => span.context(),
    }
}

/// Makes `span` a child of the remote `parent`, whichever layer keeps its context.
fn set_parent(span: &tracing::Span, parent: opentelemetry::Context) {
    let remote = parent.span().span_context().clone();
    if remote.is_valid() && !crate::relay::adopt(span, &remote) {
        let _ = span.set_parent(parent);
    }
}

/// Writes the current span's trace context into `headers`.
pub fn inject(headers: &mut async_nats::HeaderMap) {
    let context = context_of(&tracing::Span::current());
    opentelemetry::global::get_text_map_propagator(|propagator| {
        propagator.inject_context(&context, &mut NatsInjector(headers));
    });
}

/// The trace context carried by `headers`, if any.
pub fn extract(headers: Option<&async_nats::HeaderMap>) -> opentelemetry::Context {
    match headers {
        Some(headers) => opentelemetry::global::get_text_map_propagator(|propagator| {
            propagator.extract(&NatsExtractor(headers))
        }),
        None => opentelemetry::Context::new(),
    }
}

/// Makes `span` a child of the context carried by `headers` (no-op without one).
pub fn follow(span: &tracing::Span, headers: Option<&async_nats::HeaderMap>) {
    set_parent(span, extract(headers));
}

/// Makes `span` part of the trace a stored `traceparent` names (a job's, a fan-out parent's,
/// a workflow's, kept in its record): for the hops no message leads to (no-op without one).
pub fn follow_traceparent(span: &tracing::Span, traceparent: Option<&str>) {
    if let Some(traceparent) = traceparent {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("traceparent", traceparent);
        follow(span, Some(&headers));
    }
}

/// Makes `span` a child of the context in an HTTP request's headers (no-op without one).
pub fn follow_http(span: &tracing::Span, headers: &http::HeaderMap) {
    let parent = opentelemetry::global::get_text_map_propagator(|propagator| {
        propagator.extract(&opentelemetry_http::HeaderExtractor(headers))
    });
    set_parent(span, parent);
}

/// The current span's context as a W3C `traceparent` value, if it has one.
pub fn traceparent() -> Option<String> {
    let mut headers = async_nats::HeaderMap::new();
    inject(&mut headers);
    headers
        .get("traceparent")
        .map(|value| value.as_str().to_owned())
}

/// The trace id of the current span, as 32 hex digits, if it has one.
pub fn trace_id() -> Option<String> {
    let context = context_of(&tracing::Span::current());
    let span = context.span();
    let span_context = span.span_context();
    span_context
        .is_valid()
        .then(|| span_context.trace_id().to_string())
}
