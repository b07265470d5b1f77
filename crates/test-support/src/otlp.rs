//! An in-process OTLP/gRPC trace receiver, built on the OpenTelemetry project's own
//! generated server (`opentelemetry-proto`): the binaries under test export to it, and a
//! test reads back every span with its service, trace, parent and links.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use tokio::sync::oneshot;

/// One received span, flattened for assertions. Ids are lowercase hex.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceivedSpan {
    /// The resource's `service.name`.
    pub service: String,
    pub name: String,
    pub trace_id: String,
    pub span_id: String,
    /// Empty for a root span.
    pub parent_span_id: String,
    /// The span's attributes, values as strings.
    pub attributes: BTreeMap<String, String>,
    /// (trace id, span id) of each link.
    pub links: Vec<(String, String)>,
    /// The resource's attributes, values as strings.
    pub resource: BTreeMap<String, String>,
    /// The span's events (a `tracing` event inside the span): name and attributes.
    pub events: Vec<(String, BTreeMap<String, String>)>,
    /// The span's status message (empty unless it ended in error).
    pub status_message: String,
}

impl ReceivedSpan {
    pub fn attr(&self, key: &str) -> Option<&str> {
        self.attributes.get(key).map(String::as_str)
    }
}

#[derive(Debug, Default)]
struct Shared {
    spans: Mutex<Vec<ReceivedSpan>>,
    /// Spans received, kept or not.
    count: AtomicUsize,
    /// Keep each span for [`OtlpReceiver::spans`]; otherwise only count them.
    keep: bool,
    refusing: AtomicBool,
}

/// The receiver, serving on a thread and runtime of its own (as a collector is a process
/// of its own: decoding batches never holds up the caller's tasks) until dropped or
/// [`OtlpReceiver::stop`]ped.
pub struct OtlpReceiver {
    addr: SocketAddr,
    shared: Arc<Shared>,
    stop: Option<oneshot::Sender<()>>,
}

impl OtlpReceiver {
    /// Serves on a free loopback port, keeping every span for [`Self::spans`].
    pub async fn start() -> Self {
        Self::serve(true)
    }

    /// Serves on a free loopback port, decoding every batch but only counting its spans
    /// ([`Self::count`]): for a benchmark, where keeping millions of flattened spans
    /// would measure the receiver rather than the exporters.
    pub async fn start_counting() -> Self {
        Self::serve(false)
    }

    fn serve(keep: bool) -> Self {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap_or_else(|e| panic!("bind the OTLP receiver: {e}"));
        listener
            .set_nonblocking(true)
            .unwrap_or_else(|e| panic!("the OTLP receiver's socket: {e}"));
        let addr = listener
            .local_addr()
            .unwrap_or_else(|e| panic!("the OTLP receiver's address: {e}"));
        let shared = Arc::new(Shared {
            keep,
            ..Shared::default()
        });
        let service = TraceServiceServer::new(Receiver(Arc::clone(&shared)));
        let (stop, stopped) = oneshot::channel::<()>();
        let serve = move || {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(runtime) => runtime,
                Err(e) => return eprintln!("OTLP receiver: no runtime: {e}"),
            };
            runtime.block_on(async move {
                let listener = match tokio::net::TcpListener::from_std(listener) {
                    Ok(listener) => listener,
                    Err(e) => return eprintln!("OTLP receiver: {e}"),
                };
                let incoming = tonic::transport::server::TcpIncoming::from(listener);
                let server = tonic::transport::Server::builder()
                    .add_service(service)
                    .serve_with_incoming(incoming);
                tokio::select! {
                    result = server => if let Err(e) = result {
                        eprintln!("OTLP receiver: {e}");
                    },
                    _ = stopped => {}
                }
            });
            // Dropping the runtime closes the connections the exporters hold.
        };
        std::thread::Builder::new()
            .name("otlp-receiver".into())
            .spawn(serve)
            .unwrap_or_else(|e| panic!("start the OTLP receiver's thread: {e}"));
        Self {
            addr,
            shared,
            stop: Some(stop),
        }
    }

    /// What to pass as `--otlp-endpoint`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every span received so far (none from a receiver that only counts).
    pub fn spans(&self) -> Vec<ReceivedSpan> {
        lock(&self.shared.spans).clone()
    }

    /// How many spans were received so far.
    pub fn count(&self) -> usize {
        self.shared.count.load(Ordering::Relaxed)
    }

    /// Polls every 100 ms until `check` returns `Some`, for at most `timeout`; the last
    /// spans seen on timeout.
    pub async fn wait_for<T>(
        &self,
        timeout: Duration,
        mut check: impl FnMut(&[ReceivedSpan]) -> Option<T>,
    ) -> Result<T, Vec<ReceivedSpan>> {
        let deadline = Instant::now() + timeout;
        loop {
            let spans = self.spans();
            if let Some(found) = check(&spans) {
                return Ok(found);
            }
            if Instant::now() >= deadline {
                return Err(spans);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Stops taking spans, as a collector that went away: every export from now on gets
    /// UNAVAILABLE, and the receiver's runtime ends, closing its port and connections.
    pub fn stop(&mut self) {
        self.shared.refusing.store(true, Ordering::Relaxed);
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

impl Drop for OtlpReceiver {
    fn drop(&mut self) {
        self.stop();
    }
}

struct Receiver(Arc<Shared>);

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        if self.0.refusing.load(Ordering::Relaxed) {
            return Err(tonic::Status::unavailable("the collector is stopped"));
        }
        let request = request.into_inner();
        let n: usize = request
            .resource_spans
            .iter()
            .flat_map(|rs| &rs.scope_spans)
            .map(|ss| ss.spans.len())
            .sum();
        self.0.count.fetch_add(n, Ordering::Relaxed);
        if !self.0.keep {
            return Ok(tonic::Response::new(ExportTraceServiceResponse {
                partial_success: None,
            }));
        }
        let mut received = Vec::new();
        for rs in request.resource_spans {
            let resource = rs
                .resource
                .map(|r| strings(&r.attributes))
                .unwrap_or_default();
            let service = resource.get("service.name").cloned().unwrap_or_default();
            for ss in rs.scope_spans {
                for span in ss.spans {
                    let status_message = span
                        .status
                        .as_ref()
                        .map(|s| s.message.clone())
                        .unwrap_or_default();
                    let events = span
                        .events
                        .iter()
                        .map(|e| (e.name.clone(), strings(&e.attributes)))
                        .collect();
                    received.push(ReceivedSpan {
                        service: service.clone(),
                        name: span.name,
                        trace_id: hex(&span.trace_id),
                        span_id: hex(&span.span_id),
                        parent_span_id: hex(&span.parent_span_id),
                        attributes: strings(&span.attributes),
                        links: span
                            .links
                            .iter()
                            .map(|l| (hex(&l.trace_id), hex(&l.span_id)))
                            .collect(),
                        resource: resource.clone(),
                        events,
                        status_message,
                    });
                }
            }
        }
        lock(&self.0.spans).extend(received);
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn strings(attributes: &[KeyValue]) -> BTreeMap<String, String> {
    attributes
        .iter()
        .map(|kv| {
            (
                kv.key.clone(),
                kv.value.as_ref().map(string).unwrap_or_default(),
            )
        })
        .collect()
}

fn string(value: &AnyValue) -> String {
    match &value.value {
        Some(any_value::Value::StringValue(s)) => s.clone(),
        Some(any_value::Value::IntValue(i)) => i.to_string(),
        Some(any_value::Value::BoolValue(b)) => b.to_string(),
        Some(any_value::Value::DoubleValue(d)) => d.to_string(),
        Some(other) => format!("{other:?}"),
        None => String::new(),
    }
}
