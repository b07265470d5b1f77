//! The background task that keeps the change log bounded: every so often it asks the store
//! to delete routing-input rows that a later row for the same key supersedes and that are
//! older than the retention ([`herald_ipam_store::Store::compact_events`]).
//!
//! Every replica runs it; the store lets one at a time do the work. The rows it deletes
//! are older than the retention, which is far longer than the feed's poll interval, so
//! every replica's feed delivered them long ago. A feed that still lags behind them (held
//! back by a long transaction) sees a compacted revision as a hole; the hole logic passes
//! it once the transactions writing the log when it was seen have ended, as it would a
//! rollback, and the later row for the same key, which is never compacted, makes the route
//! engine reload that key all the same.

use std::sync::Arc;
use std::time::Duration;

use herald_ipam_store::{StoreError, now_micros};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::ipam::Ipam;

/// How long superseded routing-input rows stay: long enough that every replica's feed has
/// passed them many times over, short enough that node churn leaves few rows behind.
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(5 * 60);
/// The shortest retention accepted: five times the feed's poll interval.
pub const MIN_RETENTION: Duration = Duration::from_secs(1);
/// Rows deleted per transaction, so that one run never holds a long lock on the log.
const BATCH: u32 = 1000;
/// Batches per run at most; a run that hits it goes again at the next period.
const BATCHES_PER_RUN: usize = 20;
/// Longest time between runs, whatever the retention.
const MAX_PERIOD: Duration = Duration::from_secs(30);

/// How often compaction runs for `retention`: a quarter of it, so that a row lives at most
/// about 1.25 retentions, and never less often than [`MAX_PERIOD`].
pub fn period(retention: Duration) -> Duration {
    (retention / 4).min(MAX_PERIOD)
}

/// Runs compaction every [`period`] until `shutdown`. Store errors are logged and retried
/// at the next period: an unbounded log is a slow problem, never a reason to stop serving.
pub async fn run(
    ipam: Arc<Ipam>,
    retention: Duration,
    shutdown: CancellationToken,
) -> Result<(), StoreError> {
    let period = period(retention);
    let retention_micros = i64::try_from(retention.as_micros()).unwrap_or(i64::MAX);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            () = tokio::time::sleep(period) => {}
        }
        let before = now_micros().saturating_sub(retention_micros);
        let mut total = 0;
        // Bounded: BATCHES_PER_RUN transactions at most, and a short batch ends the run.
        for _ in 0..BATCHES_PER_RUN {
            match ipam.store().compact_events(before, BATCH).await {
                Ok(done) => {
                    total += done.deleted;
                    debug!(
                        deleted = done.deleted,
                        point = done.point,
                        "compacted the change log"
                    );
                    if done.deleted < u64::from(BATCH) {
                        break;
                    }
                }
                Err(e) => {
                    warn!(error = %e, "compacting the change log failed; retrying later");
                    break;
                }
            }
        }
        if total >= u64::from(BATCH) {
            info!(
                deleted = total,
                "compacted superseded routing rows from the change log"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_period_follows_the_retention_up_to_a_limit() {
        assert_eq!(period(Duration::from_secs(1)), Duration::from_millis(250));
        assert_eq!(period(DEFAULT_RETENTION), MAX_PERIOD);
    }

    #[test]
    fn the_minimum_retention_dwarfs_the_feed_poll() {
        assert!(MIN_RETENTION >= crate::feed::POLL_INTERVAL * 5);
    }
}
