//! `herald-bench trace`: what exporting spans costs. `alloc` at one client count and the
//! `e2e` pipeline each run with span export off and on (every binary exporting to an
//! OTLP/gRPC receiver on a thread and runtime of its own), in several rounds that
//! alternate which side goes first, and the ratios of each side's median over the rounds
//! printed beside every round's figures.
//!
//! Why rounds: the p99 of 2–8 ms calls on a 2-core machine shared with compilers moves by
//! tens of percent between two runs a minute apart, more than the overhead measured. One
//! off phase then one on phase compares two moments as much as two settings; alternating
//! (off, on), (on, off), ... and taking each side's median lets a noisy minute land on
//! either side and counts it once. Every round is printed, so a real overhead shows in
//! every round, not only in the medians.

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

/// Each side's median over the rounds of one workload.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Medians {
    /// alloc: Allocate calls per second; e2e: Services per second one by one (1 / mean).
    pub throughput: f64,
    pub p99_ms: f64,
    /// herald-ipam's own CPU per operation (alloc) or per Service (e2e), in µs.
    pub ipam_us_per_op: f64,
    /// e2e only: the burst until the ToR holds every prefix, in ms.
    pub burst_ms: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct TraceReport {
    pub rounds: usize,
    pub alloc_off: Vec<PhaseResult>,
    pub alloc_on: Vec<PhaseResult>,
    pub alloc_off_median: Medians,
    pub alloc_on_median: Medians,
    pub alloc_throughput_ratio: f64,
    pub alloc_p99_ratio: f64,
    pub e2e_off: Vec<E2ePhases>,
    pub e2e_on: Vec<E2ePhases>,
    pub e2e_off_median: Medians,
    pub e2e_on_median: Medians,
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

/// The median of `values` (the mean of the middle two for an even count).
fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    match n {
        0 => 0.0,
        _ if n % 2 == 1 => values[n / 2],
        _ => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

/// herald-ipam's CPU per operation at `per_sec` operations a second, in µs.
fn ipam_us_per_op(ipam_pct: f64, per_sec: f64) -> f64 {
    if per_sec > 0.0 {
        ipam_pct / 100.0 * 1e6 / per_sec
    } else {
        0.0
    }
}

/// Whether round `round` (from 0) runs export off first: the order alternates, so a
/// drift in the machine's load across the run falls on both sides alike.
fn off_first(round: usize) -> bool {
    round.is_multiple_of(2)
}

fn alloc_medians(phases: &[PhaseResult]) -> Medians {
    Medians {
        throughput: median(phases.iter().map(|p| p.ops_per_sec).collect()),
        p99_ms: median(phases.iter().map(|p| p.latency.p99_ms).collect()),
        ipam_us_per_op: median(
            phases
                .iter()
                .map(|p| ipam_us_per_op(p.cpu.ipam_pct, p.ops_per_sec))
                .collect(),
        ),
        burst_ms: 0.0,
    }
}

/// Services per second one by one: the pipeline is a closed loop of one.
fn e2e_per_sec(phase: &E2ePhases) -> f64 {
    ratio(1000.0, phase.one_by_one.mean_ms)
}

fn e2e_medians(phases: &[E2ePhases]) -> Medians {
    Medians {
        throughput: median(phases.iter().map(e2e_per_sec).collect()),
        p99_ms: median(phases.iter().map(|p| p.one_by_one.p99_ms).collect()),
        ipam_us_per_op: median(
            phases
                .iter()
                .map(|p| ipam_us_per_op(p.one_by_one_cpu.ipam_pct, e2e_per_sec(p)))
                .collect(),
        ),
        burst_ms: median(phases.iter().map(|p| p.burst_ms).collect()),
    }
}

pub async fn trace_overhead(
    common: &Common,
    clients: usize,
    cidr: &str,
    count: u64,
    burst: u64,
    rounds: usize,
) -> anyhow::Result<TraceReport> {
    let rounds = rounds.max(1);
    common.print_header(&format!(
        "trace: span export off vs on (to an OTLP receiver on its own thread), same run, {rounds} rounds alternating which goes first; alloc c={clients}, e2e {count} one by one + {burst} at once"
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

    let mut alloc_off = Vec::with_capacity(rounds);
    let mut alloc_on = Vec::with_capacity(rounds);
    for round in 0..rounds {
        for export in sides(round) {
            let (side, label) = if export { (&on, "on") } else { (&off, "off") };
            let phase = benches::alloc_phase(side, clients, cidr)
                .await
                .with_context(|| format!("alloc round {}, export {label}", round + 1))?;
            if export {
                alloc_on.push(phase);
            } else {
                alloc_off.push(phase);
            }
        }
    }
    println!();
    report::throughput_header("round");
    for (round, (off_phase, on_phase)) in alloc_off.iter().zip(&alloc_on).enumerate() {
        for (name, phase) in [("export off", off_phase), ("export on", on_phase)] {
            report::throughput_row(
                &(round + 1).to_string(),
                name,
                phase.ops_per_sec,
                &phase.latency,
                phase.errors,
                &phase.cpu,
            );
        }
        println!(
            "        herald-ipam CPU per Allocate: {:.0} us off, {:.0} us on",
            ipam_us_per_op(off_phase.cpu.ipam_pct, off_phase.ops_per_sec),
            ipam_us_per_op(on_phase.cpu.ipam_pct, on_phase.ops_per_sec),
        );
    }
    let alloc_off_median = alloc_medians(&alloc_off);
    let alloc_on_median = alloc_medians(&alloc_on);
    let alloc_throughput_ratio = ratio(alloc_on_median.throughput, alloc_off_median.throughput);
    let alloc_p99_ratio = ratio(alloc_on_median.p99_ms, alloc_off_median.p99_ms);
    println!(
        "  alloc, median of {rounds} rounds: {:.1} ops/s off, {:.1} on (on/off {alloc_throughput_ratio:.3}); p99 {:.2} ms off, {:.2} on (on/off {alloc_p99_ratio:.3}); herald-ipam CPU per Allocate {:.0} us off, {:.0} on",
        alloc_off_median.throughput,
        alloc_on_median.throughput,
        alloc_off_median.p99_ms,
        alloc_on_median.p99_ms,
        alloc_off_median.ipam_us_per_op,
        alloc_on_median.ipam_us_per_op,
    );

    let mut e2e_off = Vec::with_capacity(rounds);
    let mut e2e_on = Vec::with_capacity(rounds);
    for round in 0..rounds {
        for export in sides(round) {
            let (side, label) = if export { (&on, "on") } else { (&off, "off") };
            let phases = pipeline::e2e(side, count, burst)
                .await
                .with_context(|| format!("e2e round {}, export {label}", round + 1))?
                .allocate;
            if export {
                e2e_on.push(phases);
            } else {
                e2e_off.push(phases);
            }
        }
    }
    println!();
    println!("  e2e rounds (one by one: Allocate to the route at the ToR from both nodes):");
    for (round, (off_phase, on_phase)) in e2e_off.iter().zip(&e2e_on).enumerate() {
        println!(
            "  {:<5} mean {:.2} ms off, {:.2} on; p99 {:.2} ms off, {:.2} on; burst of {burst} {:.1} ms off, {:.1} on",
            round + 1,
            off_phase.one_by_one.mean_ms,
            on_phase.one_by_one.mean_ms,
            off_phase.one_by_one.p99_ms,
            on_phase.one_by_one.p99_ms,
            off_phase.burst_ms,
            on_phase.burst_ms,
        );
    }
    let e2e_off_median = e2e_medians(&e2e_off);
    let e2e_on_median = e2e_medians(&e2e_on);
    let e2e_throughput_ratio = ratio(e2e_on_median.throughput, e2e_off_median.throughput);
    let e2e_p99_ratio = ratio(e2e_on_median.p99_ms, e2e_off_median.p99_ms);
    let e2e_burst_ratio = ratio(e2e_off_median.burst_ms, e2e_on_median.burst_ms);
    println!(
        "  e2e, median of {rounds} rounds: {:.1} Services/s off, {:.1} on (on/off {e2e_throughput_ratio:.3}); p99 {:.2} ms off, {:.2} on (on/off {e2e_p99_ratio:.3}); burst {:.1} ms off, {:.1} on (throughput on/off {e2e_burst_ratio:.3})",
        e2e_off_median.throughput,
        e2e_on_median.throughput,
        e2e_off_median.p99_ms,
        e2e_on_median.p99_ms,
        e2e_off_median.burst_ms,
        e2e_on_median.burst_ms,
    );
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
    let targets = vec![
        throughput("alloc throughput on/off", alloc_throughput_ratio),
        p99("alloc p99 on vs off", alloc_p99_ratio),
        throughput("e2e throughput on/off", e2e_throughput_ratio),
        p99("e2e p99 on vs off", e2e_p99_ratio),
        throughput("e2e burst on/off", e2e_burst_ratio),
    ];
    report::print_targets(&targets);
    Ok(TraceReport {
        rounds,
        alloc_off,
        alloc_on,
        alloc_off_median,
        alloc_on_median,
        alloc_throughput_ratio,
        alloc_p99_ratio,
        e2e_off,
        e2e_on,
        e2e_off_median,
        e2e_on_median,
        e2e_throughput_ratio,
        e2e_p99_ratio,
        e2e_burst_ratio,
        spans_received,
        targets,
    })
}

/// The order of round `round`'s two sides: `true` is export on.
fn sides(round: usize) -> [bool; 2] {
    if off_first(round) {
        [false, true]
    } else {
        [true, false]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_median_of_rounds_takes_the_middle_and_ignores_one_outlier() {
        assert_eq!(median(vec![7.5, 4.9, 5.1]), 5.1);
        assert_eq!(median(vec![4.0, 100.0, 5.0, 6.0]), 5.5);
        assert_eq!(median(Vec::new()), 0.0);
    }

    #[test]
    fn rounds_alternate_which_side_goes_first() {
        assert_eq!(sides(0), [false, true]);
        assert_eq!(sides(1), [true, false]);
        assert_eq!(sides(2), [false, true]);
    }
}
