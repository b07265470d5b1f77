//! `herald-bench trace`: what exporting spans costs. `alloc` at one client count and the
//! `e2e` pipeline each run twice in one run, with span export off and on (every binary
//! exporting to an in-process OTLP/gRPC receiver), and the ratios printed.

use anyhow::Context;
use herald_test_support::OtlpReceiver;
use serde::Serialize;

use crate::benches::{self, Common, PhaseResult};
use crate::pipeline::{self, E2ePhases};
use crate::report::{self, Target};

/// Throughput with export on, as a share of off, that the issue asks for at least.
const MIN_THROUGHPUT_RATIO: f64 = 0.9;
/// How much longer p99 may be with export on.
const MAX_P99_INCREASE: f64 = 0.10;

#[derive(Debug, Clone, Serialize)]
pub struct TraceReport {
    pub alloc_off: PhaseResult,
    pub alloc_on: PhaseResult,
    pub alloc_throughput_ratio: f64,
    pub alloc_p99_ratio: f64,
    pub e2e_off: E2ePhases,
    pub e2e_on: E2ePhases,
    /// Services per second one by one (1 / mean latency), on / off.
    pub e2e_throughput_ratio: f64,
    pub e2e_p99_ratio: f64,
    /// Burst prefixes per second, on / off.
    pub e2e_burst_ratio: f64,
    /// Spans the receiver took during the "on" phases.
    pub spans_received: usize,
    pub targets: Vec<Target>,
}

fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 { a / b } else { 0.0 }
}

pub async fn trace_overhead(
    common: &Common,
    clients: usize,
    cidr: &str,
    count: u64,
    burst: u64,
) -> anyhow::Result<TraceReport> {
    common.print_header(&format!(
        "trace: span export off vs on (to an in-process OTLP receiver), same run; alloc c={clients}, e2e {count} one by one + {burst} at once"
    ));
    let receiver = OtlpReceiver::start().await;
    let off = Common {
        otlp_endpoint: None,
        ..common.clone()
    };
    let on = Common {
        otlp_endpoint: Some(receiver.endpoint()),
        ..common.clone()
    };

    let alloc_off = benches::alloc_phase(&off, clients, cidr)
        .await
        .context("alloc, export off")?;
    let alloc_on = benches::alloc_phase(&on, clients, cidr)
        .await
        .context("alloc, export on")?;
    report::throughput_header("c");
    for (name, phase) in [("export off", &alloc_off), ("export on", &alloc_on)] {
        report::throughput_row(
            &clients.to_string(),
            name,
            phase.ops_per_sec,
            &phase.latency,
            phase.errors,
            &phase.cpu,
        );
    }
    let alloc_throughput_ratio = ratio(alloc_on.ops_per_sec, alloc_off.ops_per_sec);
    let alloc_p99_ratio = ratio(alloc_on.latency.p99_ms, alloc_off.latency.p99_ms);
    println!(
        "  alloc: throughput on/off {alloc_throughput_ratio:.3}, p99 on/off {alloc_p99_ratio:.3}"
    );

    let e2e_off = pipeline::e2e(&off, count, burst)
        .await
        .context("e2e, export off")?
        .allocate;
    let e2e_on = pipeline::e2e(&on, count, burst)
        .await
        .context("e2e, export on")?
        .allocate;
    let e2e_throughput_ratio = ratio(e2e_off.one_by_one.mean_ms, e2e_on.one_by_one.mean_ms);
    let e2e_p99_ratio = ratio(e2e_on.one_by_one.p99_ms, e2e_off.one_by_one.p99_ms);
    let e2e_burst_ratio = ratio(e2e_off.burst_ms, e2e_on.burst_ms);
    println!();
    println!(
        "  e2e one by one: mean {:.2} ms off, {:.2} ms on (throughput on/off {e2e_throughput_ratio:.3}); p99 {:.2} ms off, {:.2} ms on (on/off {e2e_p99_ratio:.3})",
        e2e_off.one_by_one.mean_ms,
        e2e_on.one_by_one.mean_ms,
        e2e_off.one_by_one.p99_ms,
        e2e_on.one_by_one.p99_ms
    );
    println!(
        "  e2e burst of {burst}: {:.1} ms off, {:.1} ms on (throughput on/off {e2e_burst_ratio:.3})",
        e2e_off.burst_ms, e2e_on.burst_ms
    );
    let spans_received = receiver.spans().len();
    println!("  spans received while on: {spans_received}");

    let throughput = |name: &str, r: f64| {
        Target::new(
            name,
            format!("{r:.3}x"),
            format!(">= {MIN_THROUGHPUT_RATIO}x"),
            r >= MIN_THROUGHPUT_RATIO,
        )
    };
    let p99 = |name: &str, r: f64| {
        Target::new(
            name,
            format!("{:+.1} %", (r - 1.0) * 100.0),
            format!("<= +{:.0} %", MAX_P99_INCREASE * 100.0),
            r <= 1.0 + MAX_P99_INCREASE,
        )
    };
    let targets = vec![
        throughput("alloc throughput on/off", alloc_throughput_ratio),
        p99("alloc p99 on vs off", alloc_p99_ratio),
        throughput("e2e throughput on/off", e2e_throughput_ratio),
        p99("e2e p99 on vs off", e2e_p99_ratio),
        throughput("e2e burst on/off", e2e_burst_ratio),
    ];
    report::print_targets(&targets);
    Ok(TraceReport {
        alloc_off,
        alloc_on,
        alloc_throughput_ratio,
        alloc_p99_ratio,
        e2e_off,
        e2e_on,
        e2e_throughput_ratio,
        e2e_p99_ratio,
        e2e_burst_ratio,
        spans_received,
        targets,
    })
}
