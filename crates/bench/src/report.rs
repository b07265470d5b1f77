//! Printing: a short table per benchmark and one line per target, met or not.

use serde::Serialize;

use crate::cpu::CpuUse;
use crate::stats::Summary;

/// A target from BENCHMARKS.md and how this run measured against it. A missed target is
/// reported, not turned into a failing exit code: the figures are the product here.
#[derive(Debug, Clone, Serialize)]
pub struct Target {
    pub name: String,
    pub measured: String,
    pub goal: String,
    pub met: bool,
}

impl Target {
    pub fn new(name: impl Into<String>, measured: String, goal: String, met: bool) -> Self {
        Self {
            name: name.into(),
            measured,
            goal,
            met,
        }
    }
}

pub fn print_targets(targets: &[Target]) {
    for t in targets {
        println!(
            "  target {:<28} {:<34} goal {:<26} {}",
            t.name,
            t.measured,
            t.goal,
            if t.met { "MET" } else { "NOT MET" }
        );
    }
}

pub fn header(title: &str) {
    println!();
    println!("== {title} ==");
}

/// Column titles of a throughput row; see [`throughput_row`].
pub fn throughput_header(first: &str) {
    println!(
        "  {first:<5} {:<14} {:>10} {:>8} {:>8} {:>8} {:>8} {:>9} {:>6} {:>8}  cpu (% of one core)",
        "workload", "ops/s", "p50 ms", "p99 ms", "p99.9", "max ms", "ok", "errors", "us/op"
    );
}

pub fn throughput_row(
    first: &str,
    workload: &str,
    ops_per_sec: f64,
    latency: &Summary,
    errors: u64,
    cpu: &CpuUse,
) {
    println!(
        "  {first:<5} {workload:<14} {ops_per_sec:>10.1} {:>8.2} {:>8.2} {:>8.2} {:>8.2} {:>9} {errors:>6} {:>8.0}  {}",
        latency.p50_ms,
        latency.p99_ms,
        latency.p999_ms,
        latency.max_ms,
        latency.count,
        cpu.machine_us_per_op(ops_per_sec),
        cpu.brief()
    );
}
