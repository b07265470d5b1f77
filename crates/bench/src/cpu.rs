//! Where the CPU went during a phase: this process (the load generator), herald-ipam and
//! Postgres, read from /proc. On a 2-core machine the three share the cores, so this split
//! is the first thing to look at when a ratio falls short.

use std::time::Instant;

use serde::Serialize;

/// /proc reports process times in USER_HZ, which Linux fixes at 100 for user space on
/// every architecture.
const USER_HZ: f64 = 100.0;

#[derive(Debug, Clone, Copy)]
pub struct CpuSample {
    at: Instant,
    bench: u64,
    ipam: u64,
    postgres: u64,
    machine_busy: u64,
    machine_total: u64,
}

/// CPU used over a phase, in percent of one core (200 % is both cores of a 2-core
/// machine); `machine_busy_pct` is in percent of all `machine_cores`.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct CpuUse {
    pub bench_pct: f64,
    pub ipam_pct: f64,
    pub postgres_pct: f64,
    pub machine_busy_pct: f64,
    pub machine_cores: usize,
}

impl CpuUse {
    pub fn brief(&self) -> String {
        format!(
            "bench {:.0}% ipam {:.0}% pg {:.0}% (machine {:.0}% busy)",
            self.bench_pct, self.ipam_pct, self.postgres_pct, self.machine_busy_pct
        )
    }

    /// Microseconds of CPU, all processes and the kernel together, per operation of a
    /// phase that ran `ops_per_sec`. A closed loop on a machine shared by client, server
    /// and database is bounded by this cost: it is how two workloads' ratio decomposes.
    pub fn machine_us_per_op(&self, ops_per_sec: f64) -> f64 {
        if ops_per_sec <= 0.0 {
            return 0.0;
        }
        self.machine_busy_pct / 100.0 * self.machine_cores as f64 * 1e6 / ops_per_sec
    }
}

/// Takes a sample. `ipam` is the herald-ipam process, when one runs. Postgres is every
/// process named `postgres` (the server forks one backend per connection); backends that
/// end during a phase take their time with them, so phases keep their connections open.
pub fn sample(ipam: Option<u32>) -> CpuSample {
    let (machine_busy, machine_total) = machine_ticks().unwrap_or((0, 0));
    CpuSample {
        at: Instant::now(),
        bench: process_ticks(std::process::id()).map_or(0, |(_, t)| t),
        ipam: ipam.and_then(process_ticks).map_or(0, |(_, t)| t),
        postgres: postgres_ticks(),
        machine_busy,
        machine_total,
    }
}

pub fn between(before: &CpuSample, after: &CpuSample) -> CpuUse {
    let secs = after.at.duration_since(before.at).as_secs_f64();
    if secs <= 0.0 {
        return CpuUse::default();
    }
    let pct = |a: u64, b: u64| b.saturating_sub(a) as f64 / USER_HZ / secs * 100.0;
    let total = after.machine_total.saturating_sub(before.machine_total);
    let busy = after.machine_busy.saturating_sub(before.machine_busy);
    CpuUse {
        bench_pct: pct(before.bench, after.bench),
        ipam_pct: pct(before.ipam, after.ipam),
        postgres_pct: pct(before.postgres, after.postgres),
        machine_busy_pct: if total > 0 {
            busy as f64 / total as f64 * 100.0
        } else {
            0.0
        },
        machine_cores: std::thread::available_parallelism().map_or(0, |n| n.get()),
    }
}

/// `(command name, user + system ticks)` of one process.
fn process_ticks(pid: u32) -> Option<(String, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may itself contain spaces or parentheses.
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let comm = stat.get(open + 1..close)?.to_string();
    let fields: Vec<&str> = stat.get(close + 2..)?.split_whitespace().collect();
    // After the name: state is field 3 of proc(5), utime 14 and stime 15.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((comm, utime + stime))
}

fn postgres_ticks() -> u64 {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return 0;
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(process_ticks)
        .filter(|(comm, _)| comm == "postgres")
        .map(|(_, ticks)| ticks)
        .sum()
}

/// `(busy, total)` ticks over all cores since boot; I/O wait counts as idle.
fn machine_ticks() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let ticks: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest time is already in user).
    let total: u64 = ticks.iter().take(8).sum();
    let idle = ticks.get(3).copied().unwrap_or(0) + ticks.get(4).copied().unwrap_or(0);
    Some((total - idle, total))
}

/// User + system CPU seconds `pid` has used so far.
pub fn process_seconds(pid: u32) -> Option<f64> {
    process_ticks(pid).map(|(_, ticks)| ticks as f64 / USER_HZ)
}
