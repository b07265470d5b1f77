//! The machine a run happened on, printed with every table: figures from different
//! machines are not comparable, ratios from one run are.

use serde::Serialize;

#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    pub nproc: usize,
    pub cpu_model: String,
    pub kernel: String,
    pub postgres: String,
    pub synchronous_commit: String,
    pub fsync: String,
}

impl Machine {
    /// What the host says about itself; the Postgres fields come from [`crate::pg`].
    pub fn host() -> Self {
        let cpu_model = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|info| {
                info.lines()
                    .find(|l| l.starts_with("model name"))
                    .and_then(|l| l.split_once(':'))
                    .map(|(_, v)| v.trim().to_string())
            })
            .unwrap_or_else(|| "unknown".into());
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| "unknown".into());
        Self {
            nproc: std::thread::available_parallelism().map_or(0, |n| n.get()),
            cpu_model,
            kernel,
            postgres: String::new(),
            synchronous_commit: String::new(),
            fsync: String::new(),
        }
    }

    pub fn print(&self) {
        println!(
            "machine: nproc {} | {} | Linux {} | {} | synchronous_commit={} fsync={}",
            self.nproc,
            self.cpu_model,
            self.kernel,
            self.postgres,
            self.synchronous_commit,
            self.fsync
        );
    }
}
