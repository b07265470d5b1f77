//! Two settings of the same run compared in rounds, for `trace` (span export off/on) and
//! `tls` (plaintext/mutual TLS): `alloc` at one client count and the `e2e` pipeline each
//! run on both sides in several rounds that alternate which side goes first, every round
//! printed, and each side's median over the rounds compared.
//!
//! Why rounds: the p99 of 2–8 ms calls on a 2-core machine shared with compilers moves by
//! tens of percent between two runs a minute apart, more than the overheads measured. One
//! off phase then one on phase compares two moments as much as two settings; alternating
//! (off, on), (on, off), ... and taking each side's median lets a noisy minute land on
//! either side and counts it once. Every round is printed, so a real overhead shows in
//! every round, not only in the medians.

use anyhow::Context;
use serde::Serialize;

use crate::benches::{self, Common, PhaseResult};
use crate::pipeline::{self, E2ePhases};
use crate::report;

/// Each side's median over the rounds of one workload.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Medians {
    /// alloc: Allocate calls per second; e2e: Services per second one by one (1 / mean).
    pub throughput: f64,
    pub p99_ms: f64,
    /// herald-ipam's own CPU per operation (alloc) or per Service (e2e), in µs.
    pub ipam_us_per_op: f64,
    /// e2e only: the burst until the ToR holds every prefix, in ms (each round's figure
    /// is itself the median of its bursts).
    pub burst_ms: f64,
}

/// What one comparison measured: every round of both sides, their medians and the
/// ratios of the medians (on side over off side, throughput-like: above 1 is faster).
#[derive(Debug, Clone, Serialize)]
pub struct Comparison {
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
}

/// The two settings compared and how their rows are labelled.
pub struct Sides<'a> {
    pub off: &'a Common,
    pub on: &'a Common,
    pub off_label: &'a str,
    pub on_label: &'a str,
}

/// The workloads each side runs per round.
#[derive(Debug, Clone, Copy)]
pub struct Workload<'a> {
    pub clients: usize,
    pub cidr: &'a str,
    /// e2e Services one by one.
    pub count: u64,
    /// e2e Services per burst.
    pub burst: u64,
    /// Bursts per e2e phase; the phase's burst figure is their median.
    pub bursts: u64,
}

pub fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 { a / b } else { 0.0 }
}

/// The median of `values` (the mean of the middle two for an even count).
pub fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    match n {
        0 => 0.0,
        _ if n % 2 == 1 => values[n / 2],
        _ => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

/// herald-ipam's CPU per operation at `per_sec` operations a second, in µs.
pub fn ipam_us_per_op(ipam_pct: f64, per_sec: f64) -> f64 {
    if per_sec > 0.0 {
        ipam_pct / 100.0 * 1e6 / per_sec
    } else {
        0.0
    }
}

/// The order of round `round`'s (from 0) two sides, `true` being the on side: it
/// alternates, so a drift in the machine's load across the run falls on both sides alike.
pub fn sides(round: usize) -> [bool; 2] {
    if round.is_multiple_of(2) {
        [false, true]
    } else {
        [true, false]
    }
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

/// `run(on)` once per side per round, in the order [`sides`] gives: the off side's
/// results and the on side's, in round order.
async fn alternate<T, F, Fut>(
    rounds: usize,
    what: &str,
    labels: [&str; 2],
    mut run: F,
) -> anyhow::Result<(Vec<T>, Vec<T>)>
where
    F: FnMut(bool) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<T>>,
{
    let mut off = Vec::with_capacity(rounds);
    let mut on = Vec::with_capacity(rounds);
    for round in 0..rounds {
        for side in sides(round) {
            let label = labels[usize::from(side)];
            let result = run(side)
                .await
                .with_context(|| format!("{what} round {}, {label}", round + 1))?;
            if side {
                on.push(result)
            } else {
                off.push(result)
            }
        }
    }
    Ok((off, on))
}

/// Runs `alloc` and `e2e` on both sides in `rounds` alternating rounds and prints every
/// round and the medians.
pub async fn compare(
    sides_: &Sides<'_>,
    work: Workload<'_>,
    rounds: usize,
) -> anyhow::Result<Comparison> {
    let rounds = rounds.max(1);
    let labels = [sides_.off_label, sides_.on_label];
    let side = |on: bool| if on { sides_.on } else { sides_.off };

    let (alloc_off, alloc_on) = alternate(rounds, "alloc", labels, |on| {
        benches::alloc_phase(side(on), work.clients, work.cidr)
    })
    .await?;
    println!();
    report::throughput_header("round");
    for (round, (off_phase, on_phase)) in alloc_off.iter().zip(&alloc_on).enumerate() {
        for (name, phase) in [(labels[0], off_phase), (labels[1], on_phase)] {
            report::throughput_row(
                &(round + 1).to_string(),
                name,
                phase.ops_per_sec,
                &phase.latency,
                phase.errors,
                &phase.cpu,
            );
            if let Some(e) = &phase.first_error {
                println!("        first Allocate error ({name}): {e}");
            }
        }
        println!(
            "        herald-ipam CPU per Allocate: {:.0} us {}, {:.0} us {}",
            ipam_us_per_op(off_phase.cpu.ipam_pct, off_phase.ops_per_sec),
            labels[0],
            ipam_us_per_op(on_phase.cpu.ipam_pct, on_phase.ops_per_sec),
            labels[1],
        );
    }
    let alloc_off_median = alloc_medians(&alloc_off);
    let alloc_on_median = alloc_medians(&alloc_on);
    let alloc_throughput_ratio = ratio(alloc_on_median.throughput, alloc_off_median.throughput);
    let alloc_p99_ratio = ratio(alloc_on_median.p99_ms, alloc_off_median.p99_ms);
    let [off_l, on_l] = labels;
    println!(
        "  alloc, median of {rounds} rounds: {:.1} ops/s {off_l}, {:.1} {on_l} ({on_l}/{off_l} {alloc_throughput_ratio:.3}); p99 {:.2} ms {off_l}, {:.2} {on_l} ({on_l}/{off_l} {alloc_p99_ratio:.3}); herald-ipam CPU per Allocate {:.0} us {off_l}, {:.0} {on_l}",
        alloc_off_median.throughput,
        alloc_on_median.throughput,
        alloc_off_median.p99_ms,
        alloc_on_median.p99_ms,
        alloc_off_median.ipam_us_per_op,
        alloc_on_median.ipam_us_per_op,
    );

    let (e2e_off, e2e_on) = alternate(rounds, "e2e", labels, |on| async move {
        Ok(pipeline::e2e(side(on), work.count, work.burst, work.bursts)
            .await?
            .allocate)
    })
    .await?;
    println!();
    println!(
        "  e2e rounds (one by one: Allocate to the route at the ToR from both nodes; burst: median of {} bursts of {}):",
        work.bursts, work.burst
    );
    for (round, (off_phase, on_phase)) in e2e_off.iter().zip(&e2e_on).enumerate() {
        println!(
            "  {:<5} mean {:.2} ms {off_l}, {:.2} {on_l}; p99 {:.2} ms {off_l}, {:.2} {on_l}; burst {:.1} ms {off_l}, {:.1} {on_l}; herald-ipam CPU per Service {:.0} us {off_l}, {:.0} {on_l}",
            round + 1,
            off_phase.one_by_one.mean_ms,
            on_phase.one_by_one.mean_ms,
            off_phase.one_by_one.p99_ms,
            on_phase.one_by_one.p99_ms,
            off_phase.burst_ms,
            on_phase.burst_ms,
            ipam_us_per_op(off_phase.one_by_one_cpu.ipam_pct, e2e_per_sec(off_phase)),
            ipam_us_per_op(on_phase.one_by_one_cpu.ipam_pct, e2e_per_sec(on_phase)),
        );
        println!(
            "        bursts (ms): {} {off_l}; {} {on_l}",
            brief_samples(&off_phase.burst_samples_ms),
            brief_samples(&on_phase.burst_samples_ms),
        );
        for (name, phases) in [(off_l, off_phase), (on_l, on_phase)] {
            if let Some(e) = &phases.first_error {
                println!("        e2e {name}: {} errors, first: {e}", phases.errors);
            }
        }
    }
    let e2e_off_median = e2e_medians(&e2e_off);
    let e2e_on_median = e2e_medians(&e2e_on);
    let e2e_throughput_ratio = ratio(e2e_on_median.throughput, e2e_off_median.throughput);
    let e2e_p99_ratio = ratio(e2e_on_median.p99_ms, e2e_off_median.p99_ms);
    let e2e_burst_ratio = ratio(e2e_off_median.burst_ms, e2e_on_median.burst_ms);
    println!(
        "  e2e, median of {rounds} rounds: {:.1} Services/s {off_l}, {:.1} {on_l} ({on_l}/{off_l} {e2e_throughput_ratio:.3}); p99 {:.2} ms {off_l}, {:.2} {on_l} ({on_l}/{off_l} {e2e_p99_ratio:.3}); burst {:.1} ms {off_l}, {:.1} {on_l} (throughput {on_l}/{off_l} {e2e_burst_ratio:.3})",
        e2e_off_median.throughput,
        e2e_on_median.throughput,
        e2e_off_median.p99_ms,
        e2e_on_median.p99_ms,
        e2e_off_median.burst_ms,
        e2e_on_median.burst_ms,
    );
    Ok(Comparison {
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
    })
}

fn brief_samples(samples: &[f64]) -> String {
    samples
        .iter()
        .map(|ms| format!("{ms:.1}"))
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
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

    #[tokio::test]
    async fn alternating_rounds_file_each_result_under_its_side_in_round_order() {
        let mut order = Vec::new();
        let mut n = 0;
        let (off, on) = alternate(3, "test", ["off", "on"], |on| {
            n += 1;
            order.push(on);
            let value = (on, n);
            async move { Ok(value) }
        })
        .await
        .unwrap();
        assert_eq!(order, [false, true, true, false, false, true]);
        assert_eq!(off, [(false, 1), (false, 4), (false, 5)]);
        assert_eq!(on, [(true, 2), (true, 3), (true, 6)]);
    }

    #[tokio::test]
    async fn a_failed_round_names_its_workload_round_and_side() {
        let result: anyhow::Result<(Vec<()>, Vec<()>)> =
            alternate(2, "alloc", ["plaintext", "mTLS"], |on| async move {
                if on { anyhow::bail!("refused") } else { Ok(()) }
            })
            .await;
        let message = format!("{:#}", result.unwrap_err());
        assert!(message.starts_with("alloc round 1, mTLS"), "{message}");
    }
}
