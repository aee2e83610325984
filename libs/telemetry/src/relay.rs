//! Trace context without recorded spans: what a service uses when it exports none.
//!
//! Recording a span for OpenTelemetry (its attributes, timings and events, handed to the SDK
//! when it closes) is work done for an exporter; with no exporter configured every recorded
//! span is thrown away when it ends. What must still happen is propagation: a job submitted
//! with a `traceparent` keeps its trace id through every hop, and every hop's own span gets an
//! id of its own, so a downstream service that does export still finds its spans in the right
//! trace. [`RelayLayer`] keeps just that per span — its [`SpanContext`], inherited from its
//! parent span or adopted from a remote parent by [`adopt`] — and nothing else.

use opentelemetry::trace::{SpanContext, TraceFlags, TraceState};
use opentelemetry_sdk::trace::{IdGenerator, RandomIdGenerator};
use tracing::Subscriber;
use tracing::span::{Attributes, Id};
use tracing_subscriber::Registry;
use tracing_subscriber::layer::{Context, Layer};
use tracing_subscriber::registry::LookupSpan;

/// A span's place in its trace, kept in the span's extensions.
#[derive(Clone, Debug)]
struct Place(SpanContext);

/// Gives every span a place in a trace: its parent's trace with an id of its own, or a new
/// trace for a root span.
#[derive(Debug, Default)]
pub(crate) struct RelayLayer {
    ids: RandomIdGenerator,
}

impl<S> Layer<S> for RelayLayer
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else { return };
        let parent = if attrs.is_contextual() {
            ctx.lookup_current()
        } else {
            attrs.parent().and_then(|parent| ctx.span(parent))
        };
        let inherited = parent.and_then(|parent| {
            parent
                .extensions()
                .get::<Place>()
                .map(|place| place.0.clone())
        });
        let place = match inherited {
            Some(parent) => SpanContext::new(
                parent.trace_id(),
                self.ids.new_span_id(),
                parent.trace_flags(),
                false,
                parent.trace_state().clone(),
            ),
            // A root: sampled, as the default parent-based sampler decides for a root.
            None => SpanContext::new(
                self.ids.new_trace_id(),
                self.ids.new_span_id(),
                TraceFlags::SAMPLED,
                false,
                TraceState::default(),
            ),
        };
        span.extensions_mut().insert(Place(place));
    }
}

/// The place of `span`, when the relay layer gave it one.
pub(crate) fn place(span: &tracing::Span) -> Option<SpanContext> {
    let mut found = None;
    span.with_subscriber(|(id, dispatch)| {
        if let Some(registry) = dispatch.downcast_ref::<Registry>()
            && let Some(span) = registry.span(id)
        {
            found = span
                .extensions()
                .get::<Place>()
                .map(|place| place.0.clone());
        }
    });
    found
}

/// Moves `span` into the trace of the remote `parent`, keeping its own span id. Returns
/// whether the relay layer holds `span` (when it does not, the recording layer does).
pub(crate) fn adopt(span: &tracing::Span, parent: &SpanContext) -> bool {
    let mut adopted = false;
    span.with_subscriber(|(id, dispatch)| {
        if let Some(registry) = dispatch.downcast_ref::<Registry>()
            && let Some(span) = registry.span(id)
        {
            let mut extensions = span.extensions_mut();
            if let Some(place) = extensions.get_mut::<Place>() {
                place.0 = SpanContext::new(
                    parent.trace_id(),
                    place.0.span_id(),
                    parent.trace_flags(),
                    false,
                    parent.trace_state().clone(),
                );
                adopted = true;
            }
        }
    });
    adopted
}

#[cfg(test)]
mod tests {
    use opentelemetry::trace::TraceContextExt;
    use opentelemetry_sdk::propagation::TraceContextPropagator;
    use tracing_subscriber::layer::SubscriberExt;

    use crate::propagation;

    /// Runs `test` with only the relay layer installed, as a service without an exporter.
    fn relayed(test: impl FnOnce()) {
        opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
        let subscriber = tracing_subscriber::registry().with(super::RelayLayer::default());
        tracing::subscriber::with_default(subscriber, test);
    }

    fn traceparent_of(headers: &async_nats::HeaderMap) -> (String, String) {
        let value = headers
            .get("traceparent")
            .expect("a traceparent")
            .as_str()
            .to_owned();
        let parts: Vec<&str> = value.split('-').collect();
        assert_eq!(parts.len(), 4, "{value}");
        (parts[1].to_owned(), parts[2].to_owned())
    }

    #[test]
    fn a_root_span_starts_a_trace_and_its_children_stay_in_it_with_ids_of_their_own() {
        relayed(|| {
            let root = tracing::info_span!("root");
            let (trace, root_id) = root.in_scope(|| {
                let mut headers = async_nats::HeaderMap::new();
                propagation::inject(&mut headers);
                traceparent_of(&headers)
            });
            let child = root.in_scope(|| tracing::info_span!("child"));
            let (child_trace, child_id) = child.in_scope(|| {
                let mut headers = async_nats::HeaderMap::new();
                propagation::inject(&mut headers);
                traceparent_of(&headers)
            });
            assert_eq!(child_trace, trace);
            assert_ne!(child_id, root_id);
            assert_eq!(
                child.in_scope(propagation::trace_id).as_deref(),
                Some(trace.as_str())
            );
        });
    }

    #[test]
    fn a_span_following_a_traceparent_joins_that_trace_and_passes_it_on() {
        relayed(|| {
            let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
            let mut incoming = async_nats::HeaderMap::new();
            incoming.insert(
                "traceparent",
                format!("00-{trace}-00f067aa0ba902b7-01").as_str(),
            );
            let span = tracing::info_span!("consume");
            propagation::follow(&span, Some(&incoming));
            let extracted = propagation::extract(Some(&incoming));
            assert!(extracted.span().span_context().is_valid());
            let (passed_trace, passed_id) = span.in_scope(|| {
                let mut outgoing = async_nats::HeaderMap::new();
                propagation::inject(&mut outgoing);
                traceparent_of(&outgoing)
            });
            assert_eq!(passed_trace, trace);
            assert_ne!(
                passed_id, "00f067aa0ba902b7",
                "a hop has a span id of its own"
            );
            let child = span.in_scope(|| tracing::info_span!("inner"));
            assert_eq!(
                child.in_scope(propagation::trace_id).as_deref(),
                Some(trace)
            );
        });
    }
}
