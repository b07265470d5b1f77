//! herald-ipam's metrics. Counters and histograms are updated where the work happens; the
//! pool figures and the feed's lag are read from the index and the feed at scrape time
//! ([`IndexCollector`]), so they are true when Prometheus reads them.

use std::sync::{Arc, LazyLock, OnceLock};
use std::time::Duration;

use herald_model::IpFamily;
use herald_telemetry::metrics::latency_buckets;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};
use tonic::Code;

use crate::ipam::Ipam;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PoolResult {
    /// The pool the address came from or went back to; empty when the call failed before
    /// one was chosen (a caller's bad pool name must not become a series).
    pub pool: String,
    /// `ok` or the gRPC code the caller saw, in snake case.
    pub result: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RpcLabels {
    pub service: String,
    pub method: String,
    pub code: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RpcMethod {
    pub service: String,
    pub method: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StreamLabel {
    pub stream: &'static str,
}

pub struct Metrics {
    pub allocations: Family<PoolResult, Counter>,
    pub releases: Family<PoolResult, Counter>,
    pub rpcs: Family<RpcLabels, Counter>,
    pub rpc_duration: Family<RpcMethod, Histogram>,
    pub commit_duration: Histogram,
    pub commit_group_size: Histogram,
    pub subscribers: Family<StreamLabel, Gauge>,
    pub publish_duration: Histogram,
    pub snapshots_published: Counter,
    pub stream_resyncs: Counter,
}

pub static METRICS: LazyLock<Metrics> = LazyLock::new(|| Metrics {
    allocations: Family::default(),
    releases: Family::default(),
    rpcs: Family::default(),
    rpc_duration: Family::new_with_constructor(|| Histogram::new(latency_buckets())),
    commit_duration: Histogram::new(latency_buckets()),
    // 1, 2, 4 … 1024 plans: a group never exceeds the writer's MAX_GROUP.
    commit_group_size: Histogram::new(exponential_buckets(1.0, 2.0, 11)),
    subscribers: Family::default(),
    publish_duration: Histogram::new(latency_buckets()),
    snapshots_published: Counter::default(),
    stream_resyncs: Counter::default(),
});

/// The registry `/metrics` serves: [`METRICS`] and the scrape-time figures of the index
/// and feed behind `slot` (none until the store is open).
pub fn registry(slot: Arc<OnceLock<Arc<Ipam>>>) -> Registry {
    let m = &*METRICS;
    let mut r = herald_telemetry::metrics::registry();
    r.register(
        "herald_ipam_allocations",
        "Allocate results per item (AllocateBatch counts each), by pool and result",
        m.allocations.clone(),
    );
    r.register(
        "herald_ipam_releases",
        "Release calls by pool (one per address released) and result",
        m.releases.clone(),
    );
    r.register(
        "herald_ipam_rpcs",
        "gRPC calls handled, by service, method and status code",
        m.rpcs.clone(),
    );
    r.register_with_unit(
        "herald_ipam_rpc_duration",
        "Time from a gRPC call's arrival to its response headers (a stream: to its start)",
        Unit::Seconds,
        m.rpc_duration.clone(),
    );
    r.register_with_unit(
        "herald_ipam_store_commit_duration",
        "Time to write one group-commit group to the store",
        Unit::Seconds,
        m.commit_duration.clone(),
    );
    r.register(
        "herald_ipam_store_commit_group_plans",
        "Plans written per group commit",
        m.commit_group_size.clone(),
    );
    r.register(
        "herald_ipam_stream_subscribers",
        "Open Watch and WatchNodeRoutes streams",
        m.subscribers.clone(),
    );
    r.register_with_unit(
        "herald_ipam_route_publish_duration",
        "Time to recompute the node route sets and publish the changed snapshots",
        Unit::Seconds,
        m.publish_duration.clone(),
    );
    r.register(
        "herald_ipam_route_snapshots_published",
        "Node route snapshots published to speakers (only changed sets are published)",
        m.snapshots_published.clone(),
    );
    r.register(
        "herald_ipam_route_stream_resyncs",
        "WatchNodeRoutes streams sent a fresh full snapshot because they fell behind the deltas",
        m.stream_resyncs.clone(),
    );
    r.register_collector(Box::new(IndexCollector { slot }));
    r
}

/// `code` as a label value: bounded (gRPC has 17 codes) and readable.
pub fn code_label(code: Code) -> &'static str {
    match code {
        Code::Ok => "ok",
        Code::Cancelled => "cancelled",
        Code::Unknown => "unknown",
        Code::InvalidArgument => "invalid_argument",
        Code::DeadlineExceeded => "deadline_exceeded",
        Code::NotFound => "not_found",
        Code::AlreadyExists => "already_exists",
        Code::PermissionDenied => "permission_denied",
        Code::ResourceExhausted => "resource_exhausted",
        Code::FailedPrecondition => "failed_precondition",
        Code::Aborted => "aborted",
        Code::OutOfRange => "out_of_range",
        Code::Unimplemented => "unimplemented",
        Code::Internal => "internal",
        Code::Unavailable => "unavailable",
        Code::DataLoss => "data_loss",
        Code::Unauthenticated => "unauthenticated",
    }
}

pub fn count_allocation(pool: &str, code: Code) {
    METRICS
        .allocations
        .get_or_create(&PoolResult {
            pool: pool.to_string(),
            result: code_label(code),
        })
        .inc();
}

pub fn count_release(pool: &str, code: Code) {
    METRICS
        .releases
        .get_or_create(&PoolResult {
            pool: pool.to_string(),
            result: code_label(code),
        })
        .inc();
}

pub fn observe_commit(plans: usize, took: Duration) {
    METRICS.commit_duration.observe(took.as_secs_f64());
    METRICS.commit_group_size.observe(plans as f64);
}

/// Counts an open stream until dropped; moved into the stream's task.
pub struct Subscribed(&'static str);

impl Subscribed {
    pub fn new(stream: &'static str) -> Self {
        METRICS
            .subscribers
            .get_or_create(&StreamLabel { stream })
            .inc();
        Self(stream)
    }
}

impl Drop for Subscribed {
    fn drop(&mut self) {
        METRICS
            .subscribers
            .get_or_create(&StreamLabel { stream: self.0 })
            .dec();
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PoolFigure {
    pool: String,
    family: &'static str,
    state: &'static str,
}

/// Pool addresses and the feed's lag, read from the index and the feed at each scrape.
struct IndexCollector {
    slot: Arc<OnceLock<Arc<Ipam>>>,
}

impl std::fmt::Debug for IndexCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IndexCollector").finish_non_exhaustive()
    }
}

impl Collector for IndexCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(ipam) = self.slot.get() else {
            return Ok(());
        };
        // Copied out first: the index lock is never held while encoding.
        let figures: Vec<(PoolFigure, f64)> = {
            let index = ipam.index();
            index
                .pools()
                .flat_map(|(spec, _)| {
                    let name = spec.name.as_str().to_string();
                    index.usage(&name).into_iter().flat_map(move |u| {
                        let family = match u.family {
                            IpFamily::V4 => "ipv4",
                            IpFamily::V6 => "ipv6",
                        };
                        // An IPv6 pool's size can pass 2^64; a gauge is a float anyway.
                        [
                            ("total", u.total as f64),
                            ("used", u.used as f64),
                            ("free", u.free() as f64),
                            ("quarantined", u.quarantined as f64),
                        ]
                        .map(|(state, v)| {
                            (
                                PoolFigure {
                                    pool: name.clone(),
                                    family,
                                    state,
                                },
                                v,
                            )
                        })
                    })
                })
                .collect()
        };
        let mut metric = encoder.encode_descriptor(
            "herald_ipam_pool_addresses",
            "Addresses per pool, family and state (total, used, free, quarantined), read from the index at scrape time",
            None,
            prometheus_client::metrics::MetricType::Gauge,
        )?;
        for (labels, value) in &figures {
            ConstGauge::new(*value).encode(metric.encode_family(labels)?)?;
        }

        let stall = *ipam.feed().stall().borrow();
        let lag = stall.map_or(0.0, |s| s.held_for().as_secs_f64());
        let held = stall.map_or(0, |s| s.held_back) as i64;
        let gauge = ConstGauge::new(lag);
        gauge.encode(encoder.encode_descriptor(
            "herald_ipam_feed_lag",
            "How long the change feed has been holding changes back behind a revision still to come (0 when it is not)",
            Some(&Unit::Seconds),
            gauge.metric_type(),
        )?)?;
        let gauge = ConstGauge::new(held);
        gauge.encode(encoder.encode_descriptor(
            "herald_ipam_feed_held_back_changes",
            "Changes the feed has read and holds back behind that revision",
            None,
            gauge.metric_type(),
        )?)?;
        let gauge = ConstGauge::new(ipam.feed().delivered());
        gauge.encode(encoder.encode_descriptor(
            "herald_ipam_feed_revision",
            "The change-log revision this replica has applied up to",
            None,
            gauge.metric_type(),
        )?)?;
        Ok(())
    }
}

/// Counts and times every gRPC call by the path it named and the status it got. A call
/// the server cannot route (UNIMPLEMENTED) is counted under `unknown`, so a client naming
/// made-up methods cannot grow the label set. The status is read from the response
/// headers: tonic answers every error of a unary call trailers-only, with `grpc-status` in
/// the headers, and a response without it is a call that succeeded (or a stream that
/// started).
#[derive(Debug, Clone, Copy, Default)]
pub struct RpcMetricsLayer;

impl<S> tower::Layer<S> for RpcMetricsLayer {
    type Service = RpcMetrics<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RpcMetrics { inner }
    }
}

#[derive(Debug, Clone)]
pub struct RpcMetrics<S> {
    inner: S,
}

impl<S, ReqBody, ResBody> tower::Service<tonic::codegen::http::Request<ReqBody>> for RpcMetrics<S>
where
    S: tower::Service<
            tonic::codegen::http::Request<ReqBody>,
            Response = tonic::codegen::http::Response<ResBody>,
        >,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = futures::future::BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: tonic::codegen::http::Request<ReqBody>) -> Self::Future {
        let start = std::time::Instant::now();
        let path = request.uri().path().to_string();
        let answer = self.inner.call(request);
        Box::pin(async move {
            let response = answer.await;
            if let Ok(response) = &response {
                let code = response
                    .headers()
                    .get("grpc-status")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<i32>().ok())
                    .map_or(Code::Ok, Code::from_i32);
                record_rpc(&path, code, start.elapsed());
            }
            response
        })
    }
}

fn record_rpc(path: &str, code: Code, took: Duration) {
    let (service, method) = match path.trim_start_matches('/').split_once('/') {
        Some((service, method)) if code != Code::Unimplemented => {
            (service.to_string(), method.to_string())
        }
        _ => ("unknown".to_string(), "unknown".to_string()),
    };
    METRICS
        .rpc_duration
        .get_or_create(&RpcMethod {
            service: service.clone(),
            method: method.clone(),
        })
        .observe(took.as_secs_f64());
    METRICS
        .rpcs
        .get_or_create(&RpcLabels {
            service,
            method,
            code: code_label(code),
        })
        .inc();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rpcs(service: &str, method: &str, code: &'static str) -> u64 {
        METRICS
            .rpcs
            .get(&RpcLabels {
                service: service.into(),
                method: method.into(),
                code,
            })
            .map_or(0, |c| c.get())
    }

    #[test]
    fn calls_are_counted_by_method_and_code_and_unknown_paths_stay_bounded() {
        let before = rpcs("herald.ipam.v1.Ipam", "Allocate", "resource_exhausted");
        record_rpc(
            "/herald.ipam.v1.Ipam/Allocate",
            Code::ResourceExhausted,
            Duration::from_millis(3),
        );
        assert_eq!(
            rpcs("herald.ipam.v1.Ipam", "Allocate", "resource_exhausted"),
            before + 1
        );
        let unknown = rpcs("unknown", "unknown", "unimplemented");
        record_rpc("/made.up/Thing", Code::Unimplemented, Duration::ZERO);
        record_rpc(
            "/herald.ipam.v1.Ipam/Nope",
            Code::Unimplemented,
            Duration::ZERO,
        );
        assert_eq!(rpcs("unknown", "unknown", "unimplemented"), unknown + 2);
        assert_eq!(rpcs("made.up", "Thing", "unimplemented"), 0);
    }
}
