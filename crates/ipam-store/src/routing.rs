//! The routing inputs: nodes, Service endpoint facts, the BGP policy and the speakers'
//! reports. The store keeps them as JSON documents written by the service after
//! validation; every write also logs an event, so all replicas recompute routes.

use sqlx::Row;

use crate::{Backend, Store, StoreError, now_micros};

/// A stored document and when it was last written (unix microseconds).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Document {
    pub key: String,
    pub spec: String,
    pub updated_at: i64,
}

impl Store {
    pub async fn upsert_node(&self, name: &str, spec: &str) -> Result<i64, StoreError> {
        self.put_document("nodes", "name", name, spec, "node_changed")
            .await
    }

    /// Returns whether the node existed.
    pub async fn delete_node(&self, name: &str) -> Result<bool, StoreError> {
        let mut tx = self.pool.begin().await?;
        let deleted = sqlx::query("DELETE FROM nodes WHERE name = $1")
            .bind(name)
            .execute(&mut *tx)
            .await?
            .rows_affected()
            > 0;
        if deleted {
            sqlx::query("INSERT INTO events (at, kind, name) VALUES ($1, 'node_deleted', $2)")
                .bind(now_micros())
                .bind(name)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(deleted)
    }

    pub async fn load_nodes(&self) -> Result<Vec<Document>, StoreError> {
        self.documents("SELECT name AS key, spec, updated_at FROM nodes ORDER BY name")
            .await
    }

    pub async fn load_node(&self, name: &str) -> Result<Option<Document>, StoreError> {
        self.document(
            "SELECT name AS key, spec, updated_at FROM nodes WHERE name = $1",
            name,
        )
        .await
    }

    pub async fn load_endpoint(&self, owner_uid: &str) -> Result<Option<Document>, StoreError> {
        self.document(
            "SELECT owner_uid AS key, spec, updated_at FROM service_endpoints WHERE owner_uid = $1",
            owner_uid,
        )
        .await
    }

    pub async fn set_endpoints(&self, owner_uid: &str, spec: &str) -> Result<i64, StoreError> {
        self.put_document(
            "service_endpoints",
            "owner_uid",
            owner_uid,
            spec,
            "endpoints_changed",
        )
        .await
    }

    /// Many owners' endpoint documents in one transaction of two statements (one commit
    /// and two round trips for a burst, instead of a transaction each), in order: a later
    /// item for the same owner wins, and every item logs its event, as separate calls
    /// would.
    pub async fn set_endpoints_batch(&self, items: &[(&str, &str)]) -> Result<(), StoreError> {
        if items.is_empty() {
            return Ok(());
        }
        // One row per owner (its last item): a statement may not upsert a row twice.
        let mut last: Vec<(&str, &str)> = Vec::with_capacity(items.len());
        let mut at: std::collections::HashMap<&str, usize> =
            std::collections::HashMap::with_capacity(items.len());
        for (owner_uid, spec) in items {
            match at.get(owner_uid) {
                Some(&i) => last[i].1 = spec,
                None => {
                    at.insert(owner_uid, last.len());
                    last.push((owner_uid, spec));
                }
            }
        }
        let now = now_micros();
        // $1 is the time; each row's own values follow.
        let documents = (0..last.len())
            .map(|i| format!("(${}, ${}, $1)", 2 * i + 2, 2 * i + 3))
            .collect::<Vec<_>>()
            .join(", ");
        let events = (0..items.len())
            .map(|i| format!("($1, 'endpoints_changed', ${}, '')", i + 2))
            .collect::<Vec<_>>()
            .join(", ");
        let mut tx = self.pool.begin().await?;
        let sql = format!(
            "INSERT INTO service_endpoints (owner_uid, spec, updated_at) VALUES {documents}
             ON CONFLICT (owner_uid) DO UPDATE SET spec = excluded.spec, updated_at = excluded.updated_at"
        );
        let mut query = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(now);
        for (owner_uid, spec) in &last {
            query = query.bind(*owner_uid).bind(*spec);
        }
        query.execute(&mut *tx).await?;
        // Revisions follow the rows' order, so the items' events are logged in order.
        let sql = format!("INSERT INTO events (at, kind, owner_uid, name) VALUES {events}");
        let mut query = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(now);
        for (owner_uid, _) in items {
            query = query.bind(*owner_uid);
        }
        query.execute(&mut *tx).await?;
        tx.commit().await?;
        Ok(())
    }

    pub async fn load_endpoints(&self) -> Result<Vec<Document>, StoreError> {
        self.documents(
            "SELECT owner_uid AS key, spec, updated_at FROM service_endpoints ORDER BY owner_uid",
        )
        .await
    }

    pub async fn set_policy(&self, spec: &str) -> Result<i64, StoreError> {
        self.put_document("bgp_policy", "id", "1", spec, "policy_changed")
            .await
    }

    pub async fn load_policy(&self) -> Result<Option<Document>, StoreError> {
        Ok(self
            .documents("SELECT CAST(id AS TEXT) AS key, spec, updated_at FROM bgp_policy")
            .await?
            .pop())
    }

    /// Speaker reports are high-frequency status, not configuration: no event is logged.
    ///
    /// On Postgres the write does not wait for its WAL flush: a report lost in a database
    /// crash is replaced by the speaker's next one, and a flush per report would cost one
    /// fsync per node for every route change. `set_config(…, true)` is `SET LOCAL`: it
    /// ends with this statement's own transaction, so the connection goes back to the
    /// pool as durable as it came.
    pub async fn save_speaker_state(&self, node: &str, spec: &str) -> Result<(), StoreError> {
        const POSTGRES: &str = "INSERT INTO speaker_states (node, spec, reported_at)
             SELECT $1, $2, $3 FROM (SELECT set_config('synchronous_commit', 'off', true)) AS no_flush_wait
             ON CONFLICT (node) DO UPDATE SET spec = excluded.spec, reported_at = excluded.reported_at";
        const SQLITE: &str = "INSERT INTO speaker_states (node, spec, reported_at) VALUES ($1, $2, $3)
             ON CONFLICT (node) DO UPDATE SET spec = excluded.spec, reported_at = excluded.reported_at";
        let sql = match self.backend {
            Backend::Postgres => POSTGRES,
            Backend::Sqlite => SQLITE,
        };
        sqlx::query(sql)
            .bind(node)
            .bind(spec)
            .bind(now_micros())
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub async fn load_speaker_states(&self) -> Result<Vec<Document>, StoreError> {
        self.documents(
            "SELECT node AS key, spec, reported_at AS updated_at FROM speaker_states ORDER BY node",
        )
        .await
    }

    /// Writes a document and its change event in one transaction; returns the revision.
    async fn put_document(
        &self,
        table: &'static str,
        key_column: &'static str,
        key: &str,
        spec: &str,
        kind: &'static str,
    ) -> Result<i64, StoreError> {
        let now = now_micros();
        let mut tx = self.pool.begin().await?;
        // `id` is the policy's integer key; SQLite and Postgres both take the text '1'
        // only through a cast.
        let key_expr = if key_column == "id" {
            "CAST($1 AS INTEGER)"
        } else {
            "$1"
        };
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "INSERT INTO {table} ({key_column}, spec, updated_at) VALUES ({key_expr}, $2, $3)
             ON CONFLICT ({key_column}) DO UPDATE SET spec = excluded.spec, updated_at = excluded.updated_at"
        )))
        .bind(key)
        .bind(spec)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        let (owner, name) = if kind == "endpoints_changed" {
            (key, "")
        } else {
            ("", key)
        };
        let revision: i64 = sqlx::query_scalar("INSERT INTO events (at, kind, owner_uid, name) VALUES ($1, $2, $3, $4) RETURNING revision")
            .bind(now)
            .bind(kind)
            .bind(owner)
            .bind(name)
            .fetch_one(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(revision)
    }

    async fn document(&self, sql: &'static str, key: &str) -> Result<Option<Document>, StoreError> {
        let row = sqlx::query(sql)
            .bind(key)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|row| {
            Ok(Document {
                key: row.try_get("key")?,
                spec: row.try_get("spec")?,
                updated_at: row.try_get("updated_at")?,
            })
        })
        .transpose()
    }

    async fn documents(&self, sql: &'static str) -> Result<Vec<Document>, StoreError> {
        let rows = sqlx::query(sql).fetch_all(&self.pool).await?;
        rows.iter()
            .map(|row| {
                Ok(Document {
                    key: row.try_get("key")?,
                    spec: row.try_get("spec")?,
                    updated_at: row.try_get("updated_at")?,
                })
            })
            .collect()
    }
}
