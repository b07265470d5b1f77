//! Compaction of the change log: routing-input rows superseded by a later row for the same
//! key, and older than a retention, are deleted, so that node and endpoint churn does not
//! grow `events` for ever.
//!
//! A routing-input row only says "this key changed: reload it". Once a later row for the
//! same key exists, whoever reads the later one reloads the same key, so the earlier row
//! tells nobody anything new. Allocation history (`assigned`, `released`, `updated`) and
//! pool rows are never touched: the History API and Watch promise them.

use sqlx::Row;

use crate::{Backend, Store, StoreError};

/// What one compaction run did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Compacted {
    /// Rows deleted by this run.
    pub deleted: u64,
    /// The compaction point after this run: the highest revision ever compacted away.
    pub point: i64,
}

/// Deletes up to `$2` superseded routing-input rows written before `$1` (unix
/// microseconds), oldest first. A row is superseded when a later row exists for its key:
/// the node's name (changed or deleted), the owner's endpoints, the one policy. The partial
/// indexes of migration 0003 answer each `EXISTS` with one index probe.
const DELETE_SUPERSEDED: &str = "DELETE FROM events WHERE revision IN (
    SELECT e.revision FROM events e
    WHERE e.at < $1 AND (
        (e.kind IN ('node_changed', 'node_deleted') AND EXISTS (
            SELECT 1 FROM events l WHERE l.kind IN ('node_changed', 'node_deleted')
              AND l.name = e.name AND l.revision > e.revision))
        OR (e.kind = 'endpoints_changed' AND EXISTS (
            SELECT 1 FROM events l WHERE l.kind = 'endpoints_changed'
              AND l.owner_uid = e.owner_uid AND l.revision > e.revision))
        OR (e.kind = 'policy_changed' AND EXISTS (
            SELECT 1 FROM events l WHERE l.kind = 'policy_changed' AND l.revision > e.revision))
    )
    ORDER BY e.revision
    LIMIT $2
) RETURNING revision";

/// Any constant both sides agree on: the key of the advisory lock that lets one replica
/// compact at a time on Postgres.
const COMPACTION_LOCK: i64 = 0x6865_7261_6c64_0001;

impl Store {
    /// The highest revision compaction has deleted (0 before the first): below it the log
    /// is no longer complete for routing inputs.
    pub async fn compaction_point(&self) -> Result<i64, StoreError> {
        let row = sqlx::query("SELECT revision FROM events_compaction WHERE id = 1")
            .fetch_optional(&self.pool)
            .await?;
        Ok(match row {
            Some(row) => row.try_get::<i64, _>("revision")?,
            None => 0,
        })
    }

    /// Deletes at most `batch` superseded routing-input rows written before `before_micros`
    /// and moves the compaction point past them, in one transaction. Several replicas may
    /// call it at once: on Postgres a transaction-scoped advisory lock lets one of them
    /// work and the others return at once with nothing deleted; SQLite has one writer.
    pub async fn compact_events(
        &self,
        before_micros: i64,
        batch: u32,
    ) -> Result<Compacted, StoreError> {
        let mut tx = self.pool.begin().await?;
        if self.backend == Backend::Postgres {
            let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_xact_lock($1)")
                .bind(COMPACTION_LOCK)
                .fetch_one(&mut *tx)
                .await?;
            if !locked {
                drop(tx);
                return Ok(Compacted {
                    deleted: 0,
                    point: self.compaction_point().await?,
                });
            }
        }
        let deleted: Vec<i64> = sqlx::query_scalar(DELETE_SUPERSEDED)
            .bind(before_micros)
            .bind(i64::from(batch.max(1)))
            .fetch_all(&mut *tx)
            .await?;
        if let Some(&highest) = deleted.iter().max() {
            sqlx::query(
                "UPDATE events_compaction SET revision = $1 WHERE id = 1 AND revision < $2",
            )
            .bind(highest)
            .bind(highest)
            .execute(&mut *tx)
            .await?;
        }
        let point: i64 = sqlx::query_scalar("SELECT revision FROM events_compaction WHERE id = 1")
            .fetch_one(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(Compacted {
            deleted: u64::try_from(deleted.len()).unwrap_or(u64::MAX),
            point,
        })
    }

    /// How many rows the change log holds (for tests and operators watching it stay
    /// bounded).
    pub async fn event_count(&self) -> Result<i64, StoreError> {
        Ok(sqlx::query_scalar("SELECT COUNT(*) FROM events")
            .fetch_one(&self.pool)
            .await?)
    }
}
