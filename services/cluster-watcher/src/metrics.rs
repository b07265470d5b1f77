//! herald-cluster-watcher's metrics. Reconciles, the leader flag and IPAM errors are
//! counted where they happen; the pending Services and the reconciles in flight are read
//! from the leader's caches and controllers at scrape time ([`crate::controller::scrape`]).

use std::sync::LazyLock;

use herald_telemetry::metrics::latency_buckets;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

use crate::mapping::FailureReason;

/// A step of a Service's reconcile that waits on another system.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StepLabel {
    pub step: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CallCode {
    pub call: &'static str,
    pub code: String,
}

pub struct Metrics {
    pub reconciles: Family<ResultLabel, Counter>,
    pub reconcile_duration: Family<ResultLabel, Histogram>,
    pub step_duration: Family<StepLabel, Histogram>,
    pub leader: Gauge,
    pub ipam_errors: Family<CallCode, Counter>,
    pub allocate_batch_size: Histogram,
    pub endpoints_batch_size: Histogram,
}

pub static METRICS: LazyLock<Metrics> = LazyLock::new(|| Metrics {
    reconciles: Family::default(),
    reconcile_duration: Family::new_with_constructor(|| Histogram::new(latency_buckets())),
    step_duration: Family::new_with_constructor(|| Histogram::new(latency_buckets())),
    leader: Gauge::default(),
    ipam_errors: Family::default(),
    // 1 to 1,000 (herald-ipam's largest batch) in powers of 4.
    allocate_batch_size: Histogram::new([1.0, 4.0, 16.0, 64.0, 256.0, 1000.0]),
    endpoints_batch_size: Histogram::new([1.0, 4.0, 16.0, 64.0, 256.0, 1000.0]),
});

/// Requests in one call to herald-ipam from the Allocate batcher (1: a plain Allocate).
pub fn observe_allocate_batch(size: usize) {
    METRICS.allocate_batch_size.observe(size as f64);
}

/// Services in one call to herald-ipam from the endpoints batcher (1: a plain
/// SetServiceEndpoints, more: one SetServiceEndpointsBatch).
pub fn observe_endpoints_batch(size: usize) {
    METRICS.endpoints_batch_size.observe(size as f64);
}

/// How long a reconcile waited on one step: `allocate` (herald-ipam, batched), `status`
/// (the API server's status write), `event`, `endpoints` (herald-ipam, batched).
pub fn observe_step(step: &'static str, seconds: f64) {
    METRICS
        .step_duration
        .get_or_create(&StepLabel { step })
        .observe(seconds);
}

pub fn observe_reconcile(ok: bool, seconds: f64) {
    let label = ResultLabel {
        result: if ok { "ok" } else { "error" },
    };
    METRICS.reconciles.get_or_create(&label).inc();
    METRICS
        .reconcile_duration
        .get_or_create(&label)
        .observe(seconds);
}

pub fn count_ipam_error(call: &'static str, code: tonic::Code) {
    // tonic's Debug of a code is its name (`Unavailable`): bounded, 17 values.
    METRICS
        .ipam_errors
        .get_or_create(&CallCode {
            call,
            code: format!("{code:?}"),
        })
        .inc();
}

/// Why a served Service has no address yet, as a bounded label: the reason of the
/// watcher's own condition when it is one the watcher writes, else `NotYetAllocated`
/// (not handled yet, or handled and waiting for a retry).
pub fn pending_reason(condition_reason: Option<&str>) -> &'static str {
    const KNOWN: [FailureReason; 5] = [
        FailureReason::NoPoolMatches,
        FailureReason::PoolExhausted,
        FailureReason::RequestedIpTaken,
        FailureReason::SharingConflict,
        FailureReason::InvalidRequest,
    ];
    KNOWN
        .into_iter()
        .map(FailureReason::as_str)
        .find(|known| Some(*known) == condition_reason)
        .unwrap_or("NotYetAllocated")
}

pub fn registry() -> Registry {
    let m = &*METRICS;
    let mut r = herald_telemetry::metrics::registry();
    r.register(
        "herald_watcher_reconciles",
        "Services handled, by result (an error is retried with backoff)",
        m.reconciles.clone(),
    );
    r.register_with_unit(
        "herald_watcher_reconcile_duration",
        "Time to handle one Service, by result",
        Unit::Seconds,
        m.reconcile_duration.clone(),
    );
    r.register_with_unit(
        "herald_watcher_reconcile_step_duration",
        "Time a Service's handling waited on one step (allocate, status, event, endpoints)",
        Unit::Seconds,
        m.step_duration.clone(),
    );
    r.register(
        "herald_watcher_leader",
        "1 while this replica holds the Lease and works, 0 while it stands by",
        m.leader.clone(),
    );
    r.register(
        "herald_watcher_ipam_rpc_errors",
        "Calls to herald-ipam that failed, by call and gRPC code",
        m.ipam_errors.clone(),
    );
    r.register(
        "herald_watcher_allocate_batch_size",
        "Allocate requests per call to herald-ipam (1: a plain Allocate, more: one AllocateBatch)",
        m.allocate_batch_size.clone(),
    );
    r.register(
        "herald_watcher_endpoints_batch_size",
        "Services' endpoints per call to herald-ipam (1: a plain SetServiceEndpoints, more: one SetServiceEndpointsBatch)",
        m.endpoints_batch_size.clone(),
    );
    r.register_collector(Box::new(LeaderCollector));
    r
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ControllerLabel {
    controller: &'static str,
}

/// The pending Services and reconciles in flight of the running leader; a standby (or a leader
/// whose caches are not synced yet) reports zeros, since it has nothing waiting.
#[derive(Debug)]
struct LeaderCollector;

impl Collector for LeaderCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let scrape = crate::controller::scrape().unwrap_or_default();
        let mut metric = encoder.encode_descriptor(
            "herald_watcher_services_pending",
            "Served LoadBalancer Services without an address, by reason",
            None,
            MetricType::Gauge,
        )?;
        for reason in [
            "NoPoolMatches",
            "PoolExhausted",
            "RequestedIPTaken",
            "SharingConflict",
            "InvalidRequest",
            "NotYetAllocated",
        ] {
            let n = scrape.pending.get(reason).copied().unwrap_or(0);
            ConstGauge::new(n as i64).encode(metric.encode_family(&ReasonLabel { reason })?)?;
        }
        let mut metric = encoder.encode_descriptor(
            "herald_watcher_reconciles_in_flight",
            "Reconciles running now, by controller (services, nodes)",
            None,
            MetricType::Gauge,
        )?;
        for (controller, n) in [
            ("services", scrape.services_in_flight),
            ("nodes", scrape.nodes_in_flight),
        ] {
            ConstGauge::new(n as i64)
                .encode(metric.encode_family(&ControllerLabel { controller })?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pending_reasons_are_bounded() {
        assert_eq!(pending_reason(Some("PoolExhausted")), "PoolExhausted");
        assert_eq!(pending_reason(Some("RequestedIPTaken")), "RequestedIPTaken");
        assert_eq!(
            pending_reason(Some("anything someone wrote")),
            "NotYetAllocated"
        );
        assert_eq!(pending_reason(None), "NotYetAllocated");
    }
}
