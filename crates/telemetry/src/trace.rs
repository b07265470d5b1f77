//! OpenTelemetry traces: OTLP/gRPC export of the binaries' `tracing` spans, W3C trace
//! context across every gRPC call, and the helpers that carry a context through Herald's
//! own messages (the `traceparent` fields of the routing API).
//!
//! Export is off unless an endpoint is given (`--otlp-endpoint`, or the standard
//! `OTEL_EXPORTER_OTLP_ENDPOINT`). Off, no OpenTelemetry layer is installed, the gRPC layers
//! pass requests straight through, and [`traceparent`] returns an empty string: nothing
//! is built, sampled or sent. On, spans go through a bounded queue to a batch exporter on
//! its own thread: a span that finds the queue full, or whose batch the collector did not
//! take, is dropped and counted ([`spans_dropped`]); a request never waits for the
//! collector.
//!
//! The standard environment is honoured: `OTEL_SERVICE_NAME` (default: the binary's
//! name), `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_TRACES_SAMPLER` and `OTEL_TRACES_SAMPLER_ARG`
//! (default: parent-based always-on).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, SdkTracerProvider, SpanData, SpanExporter,
    SpanProcessor,
};
use tracing::Instrument;

pub use opentelemetry::trace::SpanContext;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// Spans waiting for export at most; past it new spans are dropped (and counted). At the
/// default batch of 512 that is eight batches: a collector that keeps up never sees it
/// fill, one that is slow or gone costs at most this much memory.
pub const MAX_QUEUED_SPANS: usize = 4096;
/// How long one export may take before its batch counts as dropped.
pub const EXPORT_TIMEOUT: Duration = Duration::from_secs(3);
/// How long shutdown waits for the last spans to reach the collector.
pub const FLUSH_TIMEOUT: Duration = Duration::from_secs(3);

/// Targets whose spans never go to the collector: the transport's own machinery (an
/// export call would otherwise trace itself) and per-frame noise.
const QUIET_TARGETS: &[&str] = &[
    "h2",
    "hyper",
    "hyper_util",
    "tonic",
    "tower",
    "tower_http",
    "opentelemetry",
    "opentelemetry_sdk",
    "opentelemetry_otlp",
    "reqwest",
    "rustls",
    "sqlx",
    "kube",
    "kube_client",
    "kube_runtime",
];

static ENABLED: AtomicBool = AtomicBool::new(false);
static DROPPED: AtomicU64 = AtomicU64::new(0);

/// Whether spans are being exported (an OTLP endpoint was configured).
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// Counts `n` dropped spans, here and in `herald_otel_spans_dropped_total`.
fn count_dropped(n: u64) {
    DROPPED.fetch_add(n, Ordering::Relaxed);
    crate::metrics::spans_dropped().inc_by(n);
}

/// Spans dropped since start instead of exported: the queue was full (the collector slow
/// or gone) or the collector did not take their batch. Monotonic; for a counter metric.
pub fn spans_dropped() -> u64 {
    DROPPED.load(Ordering::Relaxed)
}

/// The exporting half, kept by `main` to flush at shutdown.
#[derive(Debug)]
pub struct Exporter {
    provider: SdkTracerProvider,
    /// Ends the export runtime's thread (see [`provider`]) once the provider has flushed.
    runtime: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Exporter {
    pub(crate) fn new(
        provider: SdkTracerProvider,
        runtime: tokio::sync::oneshot::Sender<()>,
    ) -> Self {
        Self {
            provider,
            runtime: Some(runtime),
        }
    }

    /// Sends what is queued, waiting at most [`FLUSH_TIMEOUT`] (plus a little for the
    /// exporter thread to notice). The SDK's shutdown blocks, so it runs on a blocking
    /// thread; a collector that does not answer cannot hold the process.
    pub async fn shutdown(mut self) {
        let provider = self.provider.clone();
        let flush =
            tokio::task::spawn_blocking(move || provider.shutdown_with_timeout(FLUSH_TIMEOUT));
        match tokio::time::timeout(FLUSH_TIMEOUT + Duration::from_millis(500), flush).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => tracing::warn!(error = %e, "flushing spans at shutdown failed"),
            Ok(Err(e)) => tracing::warn!(error = %e, "flushing spans at shutdown failed"),
            Err(_) => {
                tracing::warn!(timeout = ?FLUSH_TIMEOUT, "flushing spans at shutdown timed out")
            }
        }
        if let Some(runtime) = self.runtime.take() {
            let _ = runtime.send(());
        }
        ENABLED.store(false, Ordering::Relaxed);
        tracing::info!(dropped = spans_dropped(), "span export stopped");
    }
}

/// Why export could not be set up.
#[derive(Debug, thiserror::Error)]
#[error("OTLP exporter for {endpoint}: {reason}")]
pub struct ExportError {
    endpoint: String,
    reason: String,
}

/// Builds the tracer provider exporting to `endpoint`, and the sender that ends its
/// export runtime. `default_service_name` applies when neither `OTEL_SERVICE_NAME` nor
/// `OTEL_RESOURCE_ATTRIBUTES` names the service.
///
/// The batch processor runs on a thread of its own; the gRPC channel it exports through
/// is built on a single-threaded tokio runtime on another thread of its own, so the
/// connection's work (encoding each batch, HTTP/2 framing, the socket writes) is never
/// queued among the requests on the binary's runtime.
pub(crate) fn provider(
    endpoint: &str,
    default_service_name: &'static str,
) -> Result<(SdkTracerProvider, tokio::sync::oneshot::Sender<()>), ExportError> {
    let failed = |reason: String| ExportError {
        endpoint: endpoint.to_string(),
        reason,
    };
    let (built, exporter) = std::sync::mpsc::channel();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let target = endpoint.to_string();
    let run = move || {
        let runtime = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(runtime) => runtime,
            Err(e) => {
                let _ = built.send(Err(format!("no runtime for the exporter: {e}")));
                return;
            }
        };
        // Built inside the runtime: the channel's tasks are spawned on it.
        let exporter = runtime.block_on(async {
            opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(target)
                .with_timeout(EXPORT_TIMEOUT)
                .build()
                .map_err(|e| e.to_string())
        });
        let ok = exporter.is_ok();
        let _ = built.send(exporter);
        if ok {
            // Drives the channel until the exporter is shut down or dropped.
            runtime.block_on(async {
                let _ = stopped.await;
            });
        }
    };
    std::thread::Builder::new()
        .name("otlp-export".into())
        .spawn(run)
        .map_err(|e| failed(format!("cannot start the export thread: {e}")))?;
    let exporter = exporter
        .recv()
        .map_err(|_| failed("the export thread ended".into()))?
        .map_err(failed)?;
    let mut resource = Resource::builder();
    if !names_service() {
        resource = resource.with_service_name(default_service_name);
    }
    let provider = SdkTracerProvider::builder()
        .with_span_processor(bounded_batch(exporter))
        .with_resource(resource.build())
        .build();
    Ok((provider, stop))
}

/// The batch processor over `exporter`, bounded at [`MAX_QUEUED_SPANS`] and counting drops.
fn bounded_batch<E: SpanExporter + 'static>(exporter: E) -> Bounded<BatchSpanProcessor> {
    let queued = Arc::new(AtomicUsize::new(0));
    let batch = BatchSpanProcessor::builder(Counted {
        inner: exporter,
        queued: Arc::clone(&queued),
    })
    .with_batch_config(
        BatchConfigBuilder::default()
            // Larger than our own bound, so the SDK never drops uncounted.
            .with_max_queue_size(MAX_QUEUED_SPANS * 2)
            .with_scheduled_delay(Duration::from_millis(500))
            .build(),
    )
    .build();
    Bounded {
        inner: batch,
        queued,
    }
}

/// Whether the standard environment names the service.
fn names_service() -> bool {
    std::env::var("OTEL_SERVICE_NAME").is_ok_and(|s| !s.trim().is_empty())
        || std::env::var("OTEL_RESOURCE_ATTRIBUTES").is_ok_and(|attrs| {
            attrs
                .split(',')
                .any(|kv| kv.split('=').next().map(str::trim) == Some("service.name"))
        })
}

/// The `tracing` layer exporting through `provider`, with the transport's spans kept out.
///
/// Everything else the layer can add per span is off, because each costs work on every
/// request and none is read: source location and thread (three to five attributes, one an
/// allocated string, on every span), busy/idle timings (two clock reads on every poll of
/// an instrumented future), the `target` attribute, and activating an OpenTelemetry
/// context on every poll (Herald reads context from `tracing`'s spans, never from
/// OpenTelemetry's thread-local one). A per-layer `filter_fn` that kept log lines below
/// WARN out as well broke the parenting of RPC spans (tests/tests/traces.rs), so events
/// are still filtered by target and level only.
pub(crate) fn layer<S>(
    provider: &SdkTracerProvider,
) -> impl tracing_subscriber::Layer<S> + Send + Sync + 'static
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a> + Send + Sync,
{
    use tracing_subscriber::Layer;
    use tracing_subscriber::filter::{LevelFilter, Targets};
    let targets = QUIET_TARGETS.iter().fold(
        Targets::new().with_default(LevelFilter::INFO),
        |targets, quiet| targets.with_target(*quiet, LevelFilter::OFF),
    );
    tracing_opentelemetry::layer()
        .with_tracer(provider.tracer("herald"))
        .with_location(false)
        .with_threads(false)
        .with_target(false)
        .with_tracked_inactivity(false)
        .with_context_activation(false)
        .with_filter(targets)
}

pub(crate) fn set_enabled() {
    ENABLED.store(true, Ordering::Relaxed);
}

/// Counts the spans in the queue and drops (counting) past [`MAX_QUEUED_SPANS`].
#[derive(Debug)]
struct Bounded<P> {
    inner: P,
    queued: Arc<AtomicUsize>,
}

impl<P: SpanProcessor> SpanProcessor for Bounded<P> {
    fn on_start(&self, span: &mut opentelemetry_sdk::trace::Span, cx: &opentelemetry::Context) {
        self.inner.on_start(span, cx);
    }

    fn on_end(&self, span: SpanData) {
        if self.queued.fetch_add(1, Ordering::Relaxed) >= MAX_QUEUED_SPANS {
            self.queued.fetch_sub(1, Ordering::Relaxed);
            count_dropped(1);
            return;
        }
        self.inner.on_end(span);
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

/// The exporter, counting a batch out of the queue when it is handed over and as dropped
/// when the collector did not take it.
#[derive(Debug)]
struct Counted<E> {
    inner: E,
    queued: Arc<AtomicUsize>,
}

impl<E: SpanExporter> SpanExporter for Counted<E> {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let n = batch.len();
        self.queued.fetch_sub(n, Ordering::Relaxed);
        let result = self.inner.export(batch).await;
        if result.is_err() {
            count_dropped(n as u64);
        }
        result
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

/// The W3C `traceparent` of `span`, or an empty string when tracing is off or the span
/// is not recorded: what goes into the `traceparent` fields of Herald's messages.
pub fn traceparent(span: &tracing::Span) -> String {
    if !enabled() {
        return String::new();
    }
    let mut carrier = TraceParent(String::new());
    TraceContextPropagator::new().inject_context(&span.context(), &mut carrier);
    carrier.0
}

/// The W3C `traceparent` of a span context carried in memory; empty for an invalid one.
pub fn traceparent_of(sc: &SpanContext) -> String {
    if !sc.is_valid() {
        return String::new();
    }
    let mut carrier = TraceParent(String::new());
    let cx = opentelemetry::Context::new().with_remote_span_context(sc.clone());
    TraceContextPropagator::new().inject_context(&cx, &mut carrier);
    carrier.0
}

/// The remote span context a `traceparent` names; `None` for an empty or malformed one
/// (a bad traceparent from the network is ignored, never an error).
pub fn span_context(traceparent: &str) -> Option<SpanContext> {
    if traceparent.is_empty() || !enabled() {
        return None;
    }
    let cx = TraceContextPropagator::new().extract(&TraceParent(traceparent.to_string()));
    let sc = cx.span().span_context().clone();
    sc.is_valid().then_some(sc)
}

/// Makes `span` a child of the span that `traceparent` names; nothing for an empty or
/// malformed one.
pub fn set_parent(span: &tracing::Span, traceparent: &str) {
    if let Some(sc) = span_context(traceparent) {
        let _ = span.set_parent(opentelemetry::Context::new().with_remote_span_context(sc));
    }
}

/// Makes `span` a child of the span `parent` names (a context carried in memory, as from
/// [`context_of`]).
pub fn set_parent_context(span: &tracing::Span, parent: &SpanContext) {
    if enabled() && parent.is_valid() {
        let _ =
            span.set_parent(opentelemetry::Context::new().with_remote_span_context(parent.clone()));
    }
}

/// Links `span` to each valid context of `links`: the changes one step serves at once
/// (a group commit, a coalesced recompute, one UPDATE for many prefixes).
pub fn add_links<'a>(span: &tracing::Span, links: impl IntoIterator<Item = &'a SpanContext>) {
    if !enabled() {
        return;
    }
    for sc in links {
        if sc.is_valid() {
            span.add_link(sc.clone());
        }
    }
}

/// The span context of `span`, to carry in memory to a later step; invalid when tracing
/// is off.
pub fn context_of(span: &tracing::Span) -> SpanContext {
    if !enabled() {
        return SpanContext::empty_context();
    }
    span.context().span().span_context().clone()
}

/// Holds only `traceparent`: the one header the W3C propagator writes and reads that we
/// carry (no `tracestate`).
struct TraceParent(String);

impl Injector for TraceParent {
    fn set(&mut self, key: &str, value: String) {
        if key == "traceparent" {
            self.0 = value;
        }
    }
}

impl Extractor for TraceParent {
    fn get(&self, key: &str) -> Option<&str> {
        (key == "traceparent").then_some(self.0.as_str())
    }

    fn keys(&self) -> Vec<&str> {
        vec!["traceparent"]
    }
}

struct HeaderInjector<'a>(&'a mut http::HeaderMap);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(name), Ok(value)) = (
            http::header::HeaderName::from_bytes(key.as_bytes()),
            http::HeaderValue::from_str(&value),
        ) {
            self.0.insert(name, value);
        }
    }
}

struct HeaderExtractor<'a>(&'a http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

/// The client side of W3C trace context over gRPC: wraps a tonic `Channel` so every call
/// carries the caller's current span in its `traceparent` metadata.
#[derive(Debug, Clone, Copy, Default)]
pub struct InjectLayer;

impl<S> tower::Layer<S> for InjectLayer {
    type Service = Inject<S>;

    fn layer(&self, inner: S) -> Inject<S> {
        Inject { inner }
    }
}

/// See [`InjectLayer`].
#[derive(Debug, Clone)]
pub struct Inject<S> {
    inner: S,
}

impl<S> Inject<S> {
    pub fn new(inner: S) -> Self {
        Self { inner }
    }
}

impl<S, B> tower::Service<http::Request<B>> for Inject<S>
where
    S: tower::Service<http::Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut TaskContext<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        if enabled() {
            let cx = tracing::Span::current().context();
            TraceContextPropagator::new()
                .inject_context(&cx, &mut HeaderInjector(request.headers_mut()));
        }
        self.inner.call(request)
    }
}

/// The server side: each gRPC request gets a server span (`rpc.system`, `rpc.service`,
/// `rpc.method`, `rpc.grpc.status_code`) that is a child of the caller's span from the
/// `traceparent` metadata. For a server stream the span covers the call up to the
/// response headers; each streamed message gets its own span where it is made.
#[derive(Debug, Clone, Copy, Default)]
pub struct ExtractLayer;

impl<S> tower::Layer<S> for ExtractLayer {
    type Service = Extract<S>;

    fn layer(&self, inner: S) -> Extract<S> {
        Extract { inner }
    }
}

/// See [`ExtractLayer`].
#[derive(Debug, Clone)]
pub struct Extract<S> {
    inner: S,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, B, R> tower::Service<http::Request<B>> for Extract<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
    S::Error: 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut TaskContext<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        if !enabled() {
            return Box::pin(self.inner.call(request));
        }
        // "/herald.ipam.v1.Ipam/Allocate" → service and method.
        let path = request.uri().path();
        let (service, method) = path
            .trim_start_matches('/')
            .split_once('/')
            .unwrap_or((path, ""));
        let span = tracing::info_span!(
            "grpc.server",
            otel.name = %path.trim_start_matches('/'),
            otel.kind = "server",
            rpc.system = "grpc",
            rpc.service = %service,
            rpc.method = %method,
            rpc.grpc.status_code = tracing::field::Empty,
            otel.status_code = tracing::field::Empty,
        );
        let parent = TraceContextPropagator::new().extract(&HeaderExtractor(request.headers()));
        if parent.span().span_context().is_valid() {
            let _ = span.set_parent(parent);
        }
        let future = {
            let _entered = span.enter();
            self.inner.call(request)
        };
        Box::pin(
            async move {
                let result = future.await;
                if let Ok(response) = &result {
                    // A unary error is trailers-only: grpc-status is in the headers. A
                    // success carries it in the trailers, after this span ends: 0.
                    let code = response
                        .headers()
                        .get("grpc-status")
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.parse::<i64>().ok())
                        .unwrap_or(0);
                    let current = tracing::Span::current();
                    current.record("rpc.grpc.status_code", code);
                    if code != 0 {
                        current.record("otel.status_code", "ERROR");
                    }
                }
                result
            }
            .instrument(span),
        )
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use opentelemetry::trace::{Tracer as _, TracerProvider as _};

    use super::*;

    /// A collector that refuses every batch, or takes `delay` to answer.
    #[derive(Debug)]
    struct Collector {
        delay: Duration,
        refuse: bool,
    }

    impl SpanExporter for Collector {
        async fn export(&self, _batch: Vec<SpanData>) -> OTelSdkResult {
            std::thread::sleep(self.delay);
            if self.refuse {
                Err(opentelemetry_sdk::error::OTelSdkError::InternalFailure(
                    "refused".into(),
                ))
            } else {
                Ok(())
            }
        }
    }

    fn provider_for(collector: Collector) -> SdkTracerProvider {
        SdkTracerProvider::builder()
            .with_span_processor(bounded_batch(collector))
            .build()
    }

    #[test]
    fn spans_a_collector_refuses_are_counted_as_dropped() {
        let provider = provider_for(Collector {
            delay: Duration::ZERO,
            refuse: true,
        });
        let before = spans_dropped();
        let tracer = provider.tracer("test");
        for _ in 0..10 {
            tracer.in_span("refused", |_| {});
        }
        let _ = provider.force_flush();
        assert!(spans_dropped() >= before + 10, "drops not counted");
        let _ = provider.shutdown();
    }

    #[test]
    fn a_slow_collector_fills_the_queue_and_spans_past_it_drop_without_waiting() {
        let provider = provider_for(Collector {
            delay: Duration::from_secs(2),
            refuse: false,
        });
        let before = spans_dropped();
        let tracer = provider.tracer("test");
        let started = Instant::now();
        let n = MAX_QUEUED_SPANS * 2;
        for _ in 0..n {
            tracer.in_span("slow", |_| {});
        }
        let took = started.elapsed();
        // At most the queue and one batch in the exporter's hands are kept.
        let dropped = spans_dropped() - before;
        assert!(
            dropped >= (n - MAX_QUEUED_SPANS - 512) as u64,
            "only {dropped} of {n} spans dropped"
        );
        assert!(
            took < Duration::from_secs(1),
            "ending spans waited: {took:?}"
        );
        drop(provider);
    }

    /// Keeps every span it is handed, for a test to read.
    #[derive(Debug, Clone, Default)]
    struct Kept(Arc<std::sync::Mutex<Vec<SpanData>>>);

    impl SpanExporter for Kept {
        async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
            self.0
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .extend(batch);
            Ok(())
        }
    }

    #[test]
    fn the_layer_exports_spans_without_per_span_extras() {
        use tracing_subscriber::layer::SubscriberExt;
        let kept = Kept::default();
        let provider = SdkTracerProvider::builder()
            .with_simple_exporter(kept.clone())
            .build();
        let subscriber = tracing_subscriber::registry().with(layer(&provider));
        tracing::subscriber::with_default(subscriber, || {
            let parent = tracing::info_span!("parent", herald.pool = "blue");
            let _entered = parent.enter();
            tracing::info_span!("child").in_scope(|| {});
            tracing::info_span!(target: "sqlx::query", "statement").in_scope(|| {});
        });
        let spans = kept.0.lock().map(|s| s.clone()).unwrap_or_default();
        let names: Vec<&str> = spans.iter().map(|s| s.name.as_ref()).collect();
        assert_eq!(
            names,
            ["child", "parent"],
            "the transport's span is kept out"
        );
        let (child, parent) = (&spans[0], &spans[1]);
        assert_eq!(
            child.parent_span_id,
            parent.span_context.span_id(),
            "a span entered inside another is its child"
        );
        let keys: Vec<&str> = parent.attributes.iter().map(|kv| kv.key.as_str()).collect();
        assert_eq!(keys, ["herald.pool"], "only the span's own fields");
        let _ = provider.shutdown();
    }

    #[test]
    fn spans_reach_a_real_collector_with_no_runtime_on_the_calling_thread() {
        let receiver = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap_or_else(|e| panic!("{e}"))
            .block_on(herald_test_support::OtlpReceiver::start_counting());
        // The export channel brings its own runtime: none here, none needed.
        assert!(tokio::runtime::Handle::try_current().is_err());
        let (provider, runtime) =
            provider(&receiver.endpoint(), "herald-test").unwrap_or_else(|e| panic!("{e}"));
        let tracer = provider.tracer("test");
        for _ in 0..10 {
            tracer.in_span("exported", |_| {});
        }
        let _ = provider.force_flush();
        let deadline = Instant::now() + Duration::from_secs(10);
        while receiver.count() < 10 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(receiver.count(), 10, "spans the collector received");
        let _ = provider.shutdown();
        let _ = runtime.send(());
    }

    #[test]
    fn a_traceparent_round_trips_and_a_bad_one_is_ignored() {
        set_enabled();
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let sc = span_context(tp).expect("a valid traceparent");
        assert_eq!(traceparent_of(&sc), tp);
        for bad in [
            "",
            "garbage",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
        ] {
            assert!(span_context(bad).is_none(), "{bad:?} accepted");
        }
    }
}
