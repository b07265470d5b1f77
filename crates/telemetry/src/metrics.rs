//! What the three binaries' metrics share: the exemplar label that carries a trace id,
//! reading that trace id from a W3C `traceparent`, a gauge of the time since an event,
//! the latency buckets, and the registry every binary starts from.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::TraceContextExt;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use prometheus_client::encoding::{EncodeLabelSet, EncodeMetric, MetricEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::{MetricType, TypedMetric};
use prometheus_client::registry::Registry;

/// An exemplar's labels: the trace that produced the observation. Grafana opens the trace
/// from `trace_id` in the Tempo or Jaeger data source.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TraceLabel {
    pub trace_id: String,
}

/// The trace id of a W3C `traceparent` (`00-<trace id>-<span id>-<flags>`), as 32 hex
/// digits; `None` when it is empty or not a valid trace context.
pub fn trace_id_of(traceparent: &str) -> Option<String> {
    if traceparent.is_empty() {
        return None;
    }
    let carrier: HashMap<String, String> =
        HashMap::from([("traceparent".to_string(), traceparent.to_string())]);
    let context = TraceContextPropagator::new().extract(&carrier);
    let span = context.span();
    let span_context = span.span_context();
    span_context
        .is_valid()
        .then(|| span_context.trace_id().to_string())
}

/// Latency buckets in seconds for work that takes from a fraction of a millisecond (an
/// in-memory step) to seconds (a commit under load, a route through a slow ToR).
pub fn latency_buckets() -> impl Iterator<Item = f64> {
    [
        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    ]
    .into_iter()
}

/// A gauge of the seconds since [`Age::mark`] was last called, read at scrape time; until
/// the first mark, the seconds since the gauge was made (the process has waited that long).
#[derive(Debug, Clone)]
pub struct Age(Arc<Mutex<Instant>>);

impl Default for Age {
    fn default() -> Self {
        Self(Arc::new(Mutex::new(Instant::now())))
    }
}

impl Age {
    pub fn mark(&self) {
        *self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Instant::now();
    }

    pub fn seconds(&self) -> f64 {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .elapsed()
            .as_secs_f64()
    }
}

impl TypedMetric for Age {
    const TYPE: MetricType = MetricType::Gauge;
}

impl EncodeMetric for Age {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        encoder.encode_gauge(&self.seconds())
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

/// Spans the OpenTelemetry exporter dropped because its queue was full (the collector
/// slow or gone). A hook: the exporter's drop callback increments it, and every binary's
/// registry carries it from [`registry`] on.
pub fn spans_dropped() -> &'static Counter {
    static DROPPED: std::sync::LazyLock<Counter> = std::sync::LazyLock::new(Counter::default);
    &DROPPED
}

/// The registry a binary starts from: what every binary exports
/// (`herald_otel_spans_dropped_total`).
pub fn registry() -> Registry {
    let mut registry = Registry::default();
    registry.register(
        "herald_otel_spans_dropped",
        "Spans dropped by the OpenTelemetry exporter (queue full: the collector is slow or gone)",
        spans_dropped().clone(),
    );
    registry
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_trace_id_comes_from_a_valid_traceparent_only() {
        assert_eq!(
            trace_id_of("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01").as_deref(),
            Some("0af7651916cd43dd8448eb211c80319c")
        );
        assert_eq!(trace_id_of(""), None);
        assert_eq!(trace_id_of("not a traceparent"), None);
        // An all-zero trace id is invalid by the W3C spec.
        assert_eq!(
            trace_id_of("00-00000000000000000000000000000000-b7ad6b7169203331-01"),
            None
        );
    }

    #[test]
    fn age_counts_from_the_last_mark() {
        let age = Age::default();
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert!(age.seconds() >= 0.02);
        age.mark();
        assert!(age.seconds() < 0.02);
    }
}
