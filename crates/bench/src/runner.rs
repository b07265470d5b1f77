//! The closed loop every throughput figure comes from: `c` clients, each sending its next
//! request as soon as the previous one is answered, until a time limit or a request count
//! is reached, whichever comes first.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::stats::Latencies;

/// One client's operation. `seq` numbers the operations of one loop across all clients,
/// from 0, so each call can build a unique key from it.
pub trait Op: Send + 'static {
    fn call(&mut self, seq: u64) -> impl Future<Output = Result<(), String>> + Send;
}

/// Both bounds of a loop.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub duration: Duration,
    pub max_ops: u64,
}

/// Why a loop stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Stop {
    Time,
    Count,
}

pub struct Outcome<O> {
    /// The clients, handed back so callers can read what they recorded.
    pub ops: Vec<O>,
    pub ok: u64,
    pub errors: u64,
    pub first_error: Option<String>,
    /// From the first request to the last answer.
    pub elapsed: Duration,
    pub stop: Stop,
    /// Latencies of the successful operations.
    pub latencies: Latencies,
    /// `(seq, latency)` of every successful operation, when asked for.
    pub samples: Vec<(u64, Duration)>,
}

impl<O> Outcome<O> {
    pub fn ops_per_sec(&self) -> f64 {
        let secs = self.elapsed.as_secs_f64();
        if secs > 0.0 {
            self.ok as f64 / secs
        } else {
            0.0
        }
    }
}

struct ClientResult<O> {
    op: O,
    ok: u64,
    errors: u64,
    first_error: Option<String>,
    latencies: Latencies,
    samples: Vec<(u64, Duration)>,
}

/// Runs one closed loop with one task per client.
pub async fn run<O: Op>(ops: Vec<O>, limits: Limits, keep_samples: bool) -> Outcome<O> {
    let next = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let deadline = start + limits.duration;
    let tasks: Vec<_> = ops
        .into_iter()
        .map(|op| {
            let next = Arc::clone(&next);
            tokio::spawn(async move {
                let mut result = ClientResult {
                    op,
                    ok: 0,
                    errors: 0,
                    first_error: None,
                    latencies: Latencies::new(),
                    samples: Vec::new(),
                };
                loop {
                    if Instant::now() >= deadline {
                        break;
                    }
                    let seq = next.fetch_add(1, Ordering::Relaxed);
                    if seq >= limits.max_ops {
                        break;
                    }
                    let sent = Instant::now();
                    match result.op.call(seq).await {
                        Ok(()) => {
                            let latency = sent.elapsed();
                            result.ok += 1;
                            result.latencies.record(latency);
                            if keep_samples {
                                result.samples.push((seq, latency));
                            }
                        }
                        Err(e) => {
                            result.errors += 1;
                            result.first_error.get_or_insert(e);
                        }
                    }
                }
                result
            })
        })
        .collect();
    let mut outcome = Outcome {
        ops: Vec::with_capacity(tasks.len()),
        ok: 0,
        errors: 0,
        first_error: None,
        elapsed: Duration::ZERO,
        stop: Stop::Time,
        latencies: Latencies::new(),
        samples: Vec::new(),
    };
    for task in tasks {
        match task.await {
            Ok(result) => {
                outcome.ok += result.ok;
                outcome.errors += result.errors;
                if outcome.first_error.is_none() {
                    outcome.first_error = result.first_error;
                }
                outcome.latencies.merge(&result.latencies);
                outcome.samples.extend(result.samples);
                outcome.ops.push(result.op);
            }
            Err(e) => {
                outcome.errors += 1;
                outcome
                    .first_error
                    .get_or_insert_with(|| format!("client task failed: {e}"));
            }
        }
    }
    outcome.elapsed = start.elapsed();
    outcome.stop = if next.load(Ordering::Relaxed) >= limits.max_ops {
        Stop::Count
    } else {
        Stop::Time
    };
    outcome.samples.sort_unstable_by_key(|(seq, _)| *seq);
    outcome
}
