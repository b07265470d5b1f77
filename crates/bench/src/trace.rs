//! `herald-bench trace`: what exporting spans costs. `alloc` at one client count and the
//! `e2e` pipeline each run with span export off and on (every binary exporting to an
//! OTLP/gRPC receiver on a thread and runtime of its own), in rounds that alternate which
//! side goes first ([`crate::rounds`] says why), and the ratios of each side's median
//! over the rounds printed beside every round's figures.

use herald_test_support::OtlpReceiver;
use serde::Serialize;

use crate::benches::Common;
use crate::report::{self, Target};
use crate::rounds::{self, Comparison, Sides, Workload};

/// Throughput with export on, as a share of off, that the issue asks for at least.
const MIN_THROUGHPUT_RATIO: f64 = 0.9;
/// How much longer p99 may be with export on.
const MAX_P99_INCREASE: f64 = 0.10;

#[derive(Debug, Clone, Serialize)]
pub struct TraceReport {
    #[serde(flatten)]
    pub comparison: Comparison,
    /// Spans the receiver took during the "on" phases.
    pub spans_received: usize,
    pub targets: Vec<Target>,
}

pub async fn trace_overhead(
    common: &Common,
    work: Workload<'_>,
    rounds: usize,
) -> anyhow::Result<TraceReport> {
    let rounds = rounds.max(1);
    common.print_header(&format!(
        "trace: span export off vs on (to an OTLP receiver on its own thread), same run, {rounds} rounds alternating which goes first; alloc c={}, e2e {} one by one + {} bursts of {}",
        work.clients, work.count, work.bursts, work.burst
    ));
    let receiver = OtlpReceiver::start_counting().await;
    let off = Common {
        otlp_endpoint: None,
        ..common.clone()
    };
    let on = Common {
        otlp_endpoint: Some(receiver.endpoint()),
        ..common.clone()
    };
    let sides = Sides {
        off: &off,
        on: &on,
        off_label: "export off",
        on_label: "export on",
    };
    let comparison = rounds::compare(&sides, work, rounds).await?;
    let spans_received = receiver.count();
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
    let c = &comparison;
    let targets = vec![
        throughput("alloc throughput on/off", c.alloc_throughput_ratio),
        p99("alloc p99 on vs off", c.alloc_p99_ratio),
        throughput("e2e throughput on/off", c.e2e_throughput_ratio),
        p99("e2e p99 on vs off", c.e2e_p99_ratio),
        throughput("e2e burst on/off", c.e2e_burst_ratio),
    ];
    report::print_targets(&targets);
    Ok(TraceReport {
        comparison,
        spans_received,
        targets,
    })
}
