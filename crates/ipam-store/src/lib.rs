//! The IPAM store: pools, allocations and their history, in Postgres (production) or an
//! embedded SQLite file (zero set-up), through one sqlx `Any` pool and one set of queries.
//! The two statements every Allocate pays for on Postgres (writing a group of exclusive
//! addresses, reading the change log) go through the typed driver instead.
//! Where the two dialects differ (Postgres' data-modifying CTEs and row locks, SQLite's
//! single writer) the difference is a branch on [`Backend`], kept next to its twin.
//!
//! The schema's constraints are what keep an address with one owner (or one sharing
//! group), across replicas and crashes; the in-memory index only makes the first guess.

mod error;
mod routing;
mod rows;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use herald_ipam_core::{ClaimRecord, Plan, PlanItem};
use herald_model::addr::ip_key;
use herald_model::{Allocation, AllocationRequest, HistoryEntry, IpFamily, PoolSpec};
use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::{AnyConnection, AnyPool, AssertSqlSafe, Executor, Row};

/// The change log's columns, as a literal so that fixed statements can be built with
/// `concat!` and stay `&'static` (sqlx takes those without `AssertSqlSafe`).
macro_rules! event_columns {
    () => {
        "revision, at, kind, ip, tag, pool, owner_uid, cluster_id, namespace, name, reason"
    };
}

pub use error::{CommitError, StoreError};
pub use routing::Document;
use rows::{allocation_from_rows, history_from_row};
pub use sqlx::Error as SqlxError;

/// The embedded database file used when no database URL is given.
pub const DEFAULT_SQLITE_FILE: &str = "herald-ipam.db";
/// Connections of the general pool, all kept open. Allocate writes through the hot pool;
/// here go the reads of an owner that already holds addresses, releases, pool changes,
/// routing inputs and speaker reports. A fixed set, because a connection opened on demand
/// costs its caller a TLS handshake (see `Store::open`), while waiting for one that is
/// being returned costs microseconds: with room to grow to 48, c = 8 re-Allocate calls
/// grew the pool to 13, opening each extra one in the middle of a request.
pub const DEFAULT_PG_CONNECTIONS: u32 = 16;
/// Connections of the typed Postgres pool that serves the hot statements: the group-commit
/// writer, the change feed and concurrent AllocateBatch calls.
const HOT_PG_CONNECTIONS: u32 = 8;
/// How long a caller waits for a connection before the request fails as UNAVAILABLE.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest page served by list and history calls.
pub const MAX_PAGE_SIZE: u32 = 1000;
pub const DEFAULT_PAGE_SIZE: u32 = 100;

static POSTGRES_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("../../migrations/postgres");
static SQLITE_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("../../migrations/sqlite");

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Postgres,
    Sqlite,
}

/// A pool as stored: its spec plus bookkeeping.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredPool {
    pub spec: PoolSpec,
    pub generation: i64,
    pub created_at: i64,
    pub updated_at: i64,
}

/// One row of the change log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Assigned(HistoryEntry, String),
    Released(HistoryEntry, String),
    PoolChanged { revision: i64, pool: String },
    PoolDeleted { revision: i64, pool: String },
    NodeChanged { revision: i64, node: String },
    NodeDeleted { revision: i64, node: String },
    EndpointsChanged { revision: i64, owner_uid: String },
    PolicyChanged { revision: i64 },
}

impl Event {
    pub fn revision(&self) -> i64 {
        match self {
            Self::Assigned(e, _) | Self::Released(e, _) => e.revision,
            Self::PoolChanged { revision, .. }
            | Self::PoolDeleted { revision, .. }
            | Self::NodeChanged { revision, .. }
            | Self::NodeDeleted { revision, .. }
            | Self::EndpointsChanged { revision, .. }
            | Self::PolicyChanged { revision } => *revision,
        }
    }
}

/// What a pool update or delete did (or, in a dry run, would do).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolChange {
    pub pool: Option<StoredPool>,
    /// Allocations holding addresses outside the new spec (or in the deleted pool).
    pub affected: Vec<Allocation>,
    /// The addresses released, for the caller's index: (ip, owner uid).
    pub released: Vec<(IpAddr, String)>,
}

#[derive(Debug, Clone, Default)]
pub struct AllocationFilter {
    pub pool: String,
    pub namespace: String,
    pub cluster_id: String,
}

pub enum HistoryKey<'a> {
    Ip(IpAddr),
    Owner(&'a str),
}

#[derive(Clone)]
pub struct Store {
    pool: AnyPool,
    /// Postgres only: the same database through the typed driver, for the statements every
    /// Allocate pays for. The `Any` driver cannot bind arrays, and converting rows to and
    /// from its generic form was at the top of herald-ipam's profile under load.
    hot: Option<PgPool>,
    backend: Backend,
}

/// Opens `n` connections of `pool` concurrently, in the background, so that the handshakes
/// overlap and no request waits for one. Failures only mean that a request opens the
/// connection later, as it would have anyway.
fn open_in_background<DB: sqlx::Database>(pool: &sqlx::Pool<DB>, n: u32) {
    let pool = pool.clone();
    tokio::spawn(async move {
        // Held until all are open: released at once, they would be reused instead of
        // new ones being opened.
        let opened = futures::future::join_all((0..n).map(|_| pool.acquire())).await;
        if let Some(Err(e)) = opened.iter().find(|c| c.is_err()) {
            tracing::warn!(error = %e, "opening Postgres connections ahead of use failed; requests will open them");
        }
    });
}

pub fn now_micros() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

impl Store {
    /// Connects to `url` (`postgres://…` or `sqlite://…`), or to the embedded SQLite file
    /// in the working directory when `url` is `None`, and runs the migrations.
    pub async fn open(url: Option<&str>) -> Result<Self, StoreError> {
        sqlx::any::install_default_drivers();
        let url = url
            .map(str::to_string)
            .unwrap_or_else(|| format!("sqlite://{DEFAULT_SQLITE_FILE}?mode=rwc"));
        let backend = if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Backend::Postgres
        } else if url.starts_with("sqlite:") {
            Backend::Sqlite
        } else {
            return Err(StoreError::Config(format!(
                "database URL must start with postgres:// or sqlite: (got {:?})",
                url.split(':').next().unwrap_or_default()
            )));
        };
        // No ping before every acquire: it doubled the round trips of an Allocate. A
        // connection that died is found by the statement that uses it, whose error the
        // client sees as UNAVAILABLE and retries; the pool then replaces the connection.
        let options = AnyPoolOptions::new()
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .test_before_acquire(false);
        // Opening a Postgres connection took ~90 ms here whenever TLS was negotiated (sqlx
        // with rustls, the default sslmode=prefer, even on loopback; 2.5 ms without TLS).
        // A request that finds no idle connection pays that: it showed as ~95 ms stalls in
        // every benchmark. So each Postgres pool keeps a working set open (`min_connections`;
        // sqlx replaces one that expires in the background, off any request's path),
        // opened all at once in the background as the store opens. One connection is
        // opened up front so that a wrong URL or an unreachable server fails the start.
        let pool = match backend {
            Backend::Postgres => {
                let pool = options
                    .max_connections(DEFAULT_PG_CONNECTIONS)
                    .min_connections(DEFAULT_PG_CONNECTIONS)
                    .connect_lazy(&url)?;
                drop(pool.acquire().await?);
                open_in_background(&pool, DEFAULT_PG_CONNECTIONS);
                pool
            }
            // One writer: SQLite serialises writes anyway, and a single connection makes
            // every read-check-write transaction in this file race-free.
            Backend::Sqlite => {
                options
                    .max_connections(1)
                    .after_connect(|conn, _| {
                        Box::pin(async move {
                            // WAL with NORMAL sync survives a killed process (only a power
                            // loss can drop the last commits); foreign keys are what keep
                            // claims and allocations consistent, so they must be on.
                            conn.execute("PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; PRAGMA foreign_keys = ON; PRAGMA busy_timeout = 5000;").await?;
                            Ok(())
                        })
                    })
                    .connect(&url)
                    .await?
            }
        };
        let hot = match backend {
            Backend::Postgres => {
                let hot = PgPoolOptions::new()
                    .acquire_timeout(ACQUIRE_TIMEOUT)
                    .test_before_acquire(false)
                    .max_connections(HOT_PG_CONNECTIONS)
                    .min_connections(HOT_PG_CONNECTIONS)
                    // Few and always in use: an idle one is kept for the next burst.
                    .idle_timeout(None)
                    // The hot statements have one best plan whatever their parameters;
                    // re-planning them on every execution is wasted time on the hot path.
                    .after_connect(|conn, _| {
                        Box::pin(async move {
                            conn.execute("SET plan_cache_mode = force_generic_plan")
                                .await
                                .map(drop)
                        })
                    })
                    .connect_lazy(&url)?;
                open_in_background(&hot, HOT_PG_CONNECTIONS);
                Some(hot)
            }
            Backend::Sqlite => None,
        };
        let store = Self { pool, hot, backend };
        store.migrate().await?;
        Ok(store)
    }

    /// How many connections each Postgres pool has open: (main, hot). None on SQLite.
    pub fn open_connections(&self) -> Option<(u32, u32)> {
        let hot = self.hot.as_ref()?;
        Some((self.pool.size(), hot.size()))
    }

    async fn migrate(&self) -> Result<(), StoreError> {
        let migrator = match self.backend {
            Backend::Postgres => &POSTGRES_MIGRATIONS,
            Backend::Sqlite => &SQLITE_MIGRATIONS,
        };
        migrator.run(&self.pool).await?;
        Ok(())
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    pub async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    pub async fn close(&self) {
        if let Some(hot) = &self.hot {
            hot.close().await;
        }
        self.pool.close().await;
    }

    // ---- pools -------------------------------------------------------------------------

    pub async fn load_pools(&self) -> Result<Vec<StoredPool>, StoreError> {
        let rows = sqlx::query(
            "SELECT name, generation, spec, created_at, updated_at FROM pools ORDER BY name",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(rows::pool_from_row).collect()
    }

    pub async fn load_pool(&self, name: &str) -> Result<Option<StoredPool>, StoreError> {
        let row = sqlx::query(
            "SELECT name, generation, spec, created_at, updated_at FROM pools WHERE name = $1",
        )
        .bind(name)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(rows::pool_from_row).transpose()
    }

    /// Every owner's hold on every address, optionally of one pool.
    pub async fn load_claims(&self, pool: Option<&str>) -> Result<Vec<ClaimRecord>, StoreError> {
        let rows = sqlx::query(
            "SELECT a.ip, a.tag, c.pool, a.owner_uid, a.ports FROM allocations a JOIN ip_claims c ON c.ip = a.ip
             WHERE ($1 = '' OR c.pool = $1)",
        )
        .bind(pool.unwrap_or_default())
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(rows::claim_from_row).collect()
    }

    /// Creates a pool; refuses a name in use and any overlap with another pool.
    pub async fn create_pool(&self, spec: &PoolSpec) -> Result<StoredPool, StoreError> {
        let result = self.create_pool_tx(spec).await;
        self.explain_overlap(spec, result).await
    }

    async fn create_pool_tx(&self, spec: &PoolSpec) -> Result<StoredPool, StoreError> {
        let mut tx = self.pool.begin().await?;
        check_overlap(&mut tx, spec).await?;
        let now = now_micros();
        let inserted = sqlx::query(
            "INSERT INTO pools (name, generation, spec, created_at, updated_at) VALUES ($1, 1, $2, $3, $3)
             ON CONFLICT (name) DO NOTHING",
        )
        .bind(spec.name.as_str())
        .bind(rows::spec_json(spec)?)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        if inserted.rows_affected() == 0 {
            return Err(StoreError::PoolExists(spec.name.to_string()));
        }
        insert_blocks(&mut tx, spec).await?;
        insert_pool_event(&mut tx, "pool_changed", spec.name.as_str(), now).await?;
        tx.commit().await?;
        Ok(StoredPool {
            spec: spec.clone(),
            generation: 1,
            created_at: now,
            updated_at: now,
        })
    }

    /// A lost race with another replica surfaces as the exclusion constraint; look again
    /// so the error names the pool and range like the ordinary check does.
    async fn explain_overlap<T>(
        &self,
        spec: &PoolSpec,
        result: Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        match result {
            Err(StoreError::OverlapRace) => {
                let mut tx = self.pool.begin().await?;
                check_overlap(&mut tx, spec).await?;
                Err(StoreError::OverlapRace)
            }
            other => other,
        }
    }

    /// Replaces a pool's spec. Allocations outside the new addresses are refused
    /// ([`StoreError::PoolInUse`]) unless `force`, which releases them; `dry_run` only
    /// reports.
    pub async fn update_pool(
        &self,
        spec: &PoolSpec,
        force: bool,
        dry_run: bool,
    ) -> Result<PoolChange, StoreError> {
        let result = self.update_pool_tx(spec, force, dry_run).await;
        self.explain_overlap(spec, result).await
    }

    async fn update_pool_tx(
        &self,
        spec: &PoolSpec,
        force: bool,
        dry_run: bool,
    ) -> Result<PoolChange, StoreError> {
        let name = spec.name.as_str();
        let mut tx = self.pool.begin().await?;
        let current = lock_pool(&mut tx, self.backend, name).await?;
        check_overlap(&mut tx, spec).await?;
        let in_pool = pool_allocations(&mut tx, name).await?;
        let affected: Vec<Allocation> = in_pool
            .into_iter()
            .filter(|a| {
                a.ips
                    .iter()
                    .any(|ip| ip.pool.as_str() == name && !spec.contains(ip.ip))
            })
            .collect();
        if !affected.is_empty() && !force && !dry_run {
            return Err(StoreError::PoolInUse {
                pool: name.to_string(),
                holders: describe(&affected),
            });
        }
        let now = now_micros();
        let updated = StoredPool {
            spec: spec.clone(),
            generation: current.generation + 1,
            created_at: current.created_at,
            updated_at: now,
        };
        if dry_run {
            tx.rollback().await?;
            // Nothing was stored: the new spec beside the generation and times that are.
            return Ok(PoolChange {
                pool: Some(StoredPool {
                    spec: spec.clone(),
                    ..current
                }),
                affected,
                released: Vec::new(),
            });
        }
        let mut released = Vec::new();
        for allocation in &affected {
            for ip in allocation.ips.iter().filter(|ip| !spec.contains(ip.ip)) {
                released.extend(
                    release_address(&mut tx, ip.ip, &format!("pool {name} shrunk"), now).await?,
                );
            }
        }
        sqlx::query("UPDATE pools SET spec = $2, generation = $3, updated_at = $4 WHERE name = $1")
            .bind(name)
            .bind(rows::spec_json(spec)?)
            .bind(updated.generation)
            .bind(now)
            .execute(&mut *tx)
            .await?;
        sqlx::query("DELETE FROM pool_blocks WHERE pool = $1")
            .bind(name)
            .execute(&mut *tx)
            .await?;
        insert_blocks(&mut tx, spec).await?;
        insert_pool_event(&mut tx, "pool_changed", name, now).await?;
        tx.commit().await?;
        Ok(PoolChange {
            pool: Some(updated),
            affected,
            released,
        })
    }

    /// Deletes a pool. One that still holds allocations is refused unless `force`, which
    /// releases them first.
    pub async fn delete_pool(
        &self,
        name: &str,
        force: bool,
        dry_run: bool,
    ) -> Result<PoolChange, StoreError> {
        let mut tx = self.pool.begin().await?;
        lock_pool(&mut tx, self.backend, name).await?;
        let affected = pool_allocations(&mut tx, name).await?;
        if !affected.is_empty() && !force && !dry_run {
            return Err(StoreError::PoolInUse {
                pool: name.to_string(),
                holders: describe(&affected),
            });
        }
        if dry_run {
            tx.rollback().await?;
            return Ok(PoolChange {
                pool: None,
                affected,
                released: Vec::new(),
            });
        }
        let now = now_micros();
        let mut released = Vec::new();
        for allocation in &affected {
            for ip in allocation.ips.iter().filter(|ip| ip.pool.as_str() == name) {
                released.extend(
                    release_address(&mut tx, ip.ip, &format!("pool {name} deleted"), now).await?,
                );
            }
        }
        sqlx::query("DELETE FROM pools WHERE name = $1")
            .bind(name)
            .execute(&mut *tx)
            .await?;
        insert_pool_event(&mut tx, "pool_deleted", name, now).await?;
        tx.commit().await?;
        Ok(PoolChange {
            pool: None,
            affected,
            released,
        })
    }

    // ---- allocations -------------------------------------------------------------------

    pub async fn get_allocation(&self, owner_uid: &str) -> Result<Option<Allocation>, StoreError> {
        let rows = sqlx::query(AssertSqlSafe(format!(
            "{ALLOCATION_SELECT} WHERE a.owner_uid = $1 ORDER BY a.family"
        )))
        .bind(owner_uid)
        .fetch_all(&self.pool)
        .await?;
        if rows.is_empty() {
            return Ok(None);
        }
        allocation_from_rows(&rows).map(Some)
    }

    /// Writes a planned allocation. Returns the revision of its last history event.
    ///
    /// The common case, one exclusive address on Postgres, is one statement and so one
    /// round trip and one commit: that is what keeps Allocate at the speed of a plain
    /// INSERT. Everything else runs in a transaction.
    pub async fn commit(&self, req: &AllocationRequest, plan: &Plan) -> Result<i64, CommitError> {
        let now = now_micros();
        if let (Some(hot), [item]) = (&self.hot, plan.items.as_slice())
            && req.sharing_key.is_empty()
        {
            return insert_exclusive_pg(hot, &[(req, plan, item)], now)
                .await
                .map_err(|e| classify(e, item));
        }
        let mut tx = self.pool.begin().await.map_err(StoreError::from)?;
        let mut revision = 0;
        for item in &plan.items {
            revision = insert_item(&mut tx, self.backend, req, plan, item, now).await?;
        }
        tx.commit().await.map_err(StoreError::from)?;
        Ok(revision)
    }

    /// Writes many planned allocations in one transaction, one commit for all. When any of
    /// them fails the transaction is abandoned and each is written on its own instead, so
    /// every result stays independent.
    pub async fn commit_batch(
        &self,
        batch: &[(&AllocationRequest, &Plan)],
    ) -> Vec<Result<i64, CommitError>> {
        match self.commit_all(batch).await {
            Ok(revisions) => revisions.into_iter().map(Ok).collect(),
            Err(_) => {
                let mut results = Vec::with_capacity(batch.len());
                for (req, plan) in batch {
                    results.push(self.commit(req, plan).await);
                }
                results
            }
        }
    }

    async fn commit_all(
        &self,
        batch: &[(&AllocationRequest, &Plan)],
    ) -> Result<Vec<i64>, CommitError> {
        let now = now_micros();
        // Exclusive addresses on Postgres: one statement of arrays for the whole batch.
        // Shared addresses need the per-item path's join semantics.
        if let Some(hot) = &self.hot
            && batch.iter().all(|(req, _)| req.sharing_key.is_empty())
        {
            let rows: Vec<(&AllocationRequest, &Plan, &PlanItem)> = batch
                .iter()
                .flat_map(|(req, plan)| plan.items.iter().map(move |item| (*req, *plan, item)))
                .collect();
            let revision = insert_exclusive_pg(hot, &rows, now).await.map_err(|e| {
                match error::violation(&e) {
                    Some(_) => CommitError::AddressTaken(rows[0].2.ip),
                    None => CommitError::Store(e.into()),
                }
            })?;
            return Ok(vec![revision; batch.len()]);
        }
        let mut tx = self.pool.begin().await.map_err(StoreError::from)?;
        let mut revisions = Vec::with_capacity(batch.len());
        for (req, plan) in batch {
            let mut revision = 0;
            for item in &plan.items {
                revision = insert_item(&mut tx, self.backend, req, plan, item, now).await?;
            }
            revisions.push(revision);
        }
        tx.commit().await.map_err(StoreError::from)?;
        Ok(revisions)
    }

    /// Releases everything `owner_uid` holds; returns what was released (address, pool).
    pub async fn release(
        &self,
        owner_uid: &str,
        reason: &str,
    ) -> Result<Vec<(IpAddr, String)>, StoreError> {
        let now = now_micros();
        let mut tx = self.pool.begin().await?;
        let held: Vec<AnyRow> = sqlx::query("SELECT a.ip, c.pool FROM allocations a JOIN ip_claims c ON c.ip = a.ip WHERE a.owner_uid = $1 ORDER BY a.family")
            .bind(owner_uid)
            .fetch_all(&mut *tx)
            .await?;
        let mut released = Vec::new();
        for row in &held {
            let ip = rows::ip_from_row(row, "ip")?;
            release_owner_address(&mut tx, ip, owner_uid, reason, now).await?;
            released.push((ip, row.try_get::<String, _>("pool")?));
        }
        // Endpoint facts only matter while the owner holds addresses.
        sqlx::query("DELETE FROM service_endpoints WHERE owner_uid = $1")
            .bind(owner_uid)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(released)
    }

    pub async fn list_allocations(
        &self,
        filter: &AllocationFilter,
        page_size: u32,
        after_uid: &str,
    ) -> Result<(Vec<Allocation>, Option<String>), StoreError> {
        let page_size = page_size.clamp(1, MAX_PAGE_SIZE);
        // Each owner has at most one row per family, so 2n + 2 rows hold the first n + 1
        // owners, of which the first n are complete.
        let rows = sqlx::query(AssertSqlSafe(format!(
            "{ALLOCATION_SELECT} WHERE a.owner_uid > $1 AND ($2 = '' OR a.namespace = $2) AND ($3 = '' OR a.cluster_id = $3)
               AND ($4 = '' OR a.owner_uid IN (SELECT a2.owner_uid FROM allocations a2 JOIN ip_claims c2 ON c2.ip = a2.ip WHERE c2.pool = $4))
             ORDER BY a.owner_uid, a.family LIMIT $5"
        )))
        .bind(after_uid)
        .bind(&filter.namespace)
        .bind(&filter.cluster_id)
        .bind(&filter.pool)
        .bind(i64::from(page_size) * 2 + 2)
        .fetch_all(&self.pool)
        .await?;
        let mut by_owner: Vec<Vec<AnyRow>> = Vec::new();
        for row in rows {
            let uid: String = row.try_get("owner_uid")?;
            match by_owner.last_mut() {
                Some(group) if group[0].try_get::<String, _>("owner_uid")? == uid => {
                    group.push(row)
                }
                _ => by_owner.push(vec![row]),
            }
        }
        let more = by_owner.len() > page_size as usize;
        by_owner.truncate(page_size as usize);
        let allocations = by_owner
            .iter()
            .map(|rows| allocation_from_rows(rows))
            .collect::<Result<Vec<_>, _>>()?;
        let next = if more {
            allocations.last().map(|a| a.owner.uid.clone())
        } else {
            None
        };
        Ok((allocations, next))
    }

    /// Every address released at or after `since` (µs), with its latest release: what a
    /// restarted service puts back in quarantine. One pass over the change log; only
    /// called when some pool keeps a quarantine.
    pub async fn released_since(&self, since: i64) -> Result<Vec<(IpAddr, i64)>, StoreError> {
        let rows = sqlx::query(
            "SELECT ip, MAX(at) AS at FROM events WHERE kind = 'released' AND at >= $1 AND ip <> ''
             GROUP BY ip",
        )
        .bind(since)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                let text: String = row.try_get("ip")?;
                let ip = text.parse().map_err(|_| {
                    StoreError::Corrupt(format!("change log: release of {text:?}, not an address"))
                })?;
                Ok((ip, row.try_get("at")?))
            })
            .collect()
    }

    /// History of an address or an owner, newest first, `before_revision` exclusive
    /// (0 = from the newest).
    pub async fn history(
        &self,
        key: HistoryKey<'_>,
        page_size: u32,
        before_revision: i64,
    ) -> Result<(Vec<HistoryEntry>, Option<i64>), StoreError> {
        let page_size = page_size.clamp(1, MAX_PAGE_SIZE);
        let (column, value) = match key {
            HistoryKey::Ip(ip) => ("ip", ip.to_string()),
            HistoryKey::Owner(uid) => ("owner_uid", uid.to_string()),
        };
        let before = if before_revision <= 0 {
            i64::MAX
        } else {
            before_revision
        };
        let rows = sqlx::query(AssertSqlSafe(format!(
            "SELECT {EVENT_COLUMNS} FROM events WHERE {column} = $1 AND revision < $2 AND kind IN ('assigned', 'released')
             ORDER BY revision DESC LIMIT $3"
        )))
        .bind(value)
        .bind(before)
        .bind(i64::from(page_size) + 1)
        .fetch_all(&self.pool)
        .await?;
        let mut entries = rows
            .iter()
            .map(history_from_row)
            .collect::<Result<Vec<_>, _>>()?;
        let more = entries.len() > page_size as usize;
        entries.truncate(page_size as usize);
        let next = if more {
            entries.last().map(|e| e.revision)
        } else {
            None
        };
        Ok((entries, next))
    }

    /// Change-log rows after `revision`, oldest first.
    pub async fn events_after(&self, revision: i64, limit: u32) -> Result<Vec<Event>, StoreError> {
        const SQL: &str = concat!(
            "SELECT ",
            event_columns!(),
            " FROM events WHERE revision > $1 ORDER BY revision LIMIT $2"
        );
        let limit = i64::from(limit);
        match &self.hot {
            Some(hot) => {
                let rows = sqlx::query(SQL)
                    .bind(revision)
                    .bind(limit)
                    .fetch_all(hot)
                    .await?;
                rows.iter().map(rows::event_from_row).collect()
            }
            None => {
                let rows = sqlx::query(SQL)
                    .bind(revision)
                    .bind(limit)
                    .fetch_all(&self.pool)
                    .await?;
                rows.iter().map(rows::event_from_row).collect()
            }
        }
    }

    /// Postgres: the oldest transaction id still running and the next one to be assigned,
    /// from a snapshot taken now. The change feed uses them to tell a rolled-back revision
    /// from one whose transaction has yet to commit. SQLite has one writer and rolls its
    /// revision counter back with the transaction, so it never leaves holes: `None`.
    pub async fn transaction_horizon(&self) -> Result<Option<(i64, i64)>, StoreError> {
        if self.backend != Backend::Postgres {
            return Ok(None);
        }
        let row = sqlx::query(
            "SELECT CAST(CAST(pg_snapshot_xmin(pg_current_snapshot()) AS TEXT) AS BIGINT) AS oldest,
                    CAST(CAST(pg_snapshot_xmax(pg_current_snapshot()) AS TEXT) AS BIGINT) AS next",
        )
        .fetch_one(&self.pool)
        .await?;
        Ok(Some((row.try_get("oldest")?, row.try_get("next")?)))
    }

    pub async fn last_revision(&self) -> Result<i64, StoreError> {
        let row = sqlx::query("SELECT COALESCE(MAX(revision), 0) AS revision FROM events")
            .fetch_one(&self.pool)
            .await?;
        Ok(row.try_get::<i64, _>("revision")?)
    }
}

const ALLOCATION_SELECT: &str = "SELECT a.owner_uid, a.family, a.ip, a.tag, a.cluster_id, a.namespace, a.name, a.sharing_key,
    a.traffic_policy, a.ports, a.created_at, c.pool FROM allocations a JOIN ip_claims c ON c.ip = a.ip";
const EVENT_COLUMNS: &str = event_columns!();

/// Writes exclusive planned addresses, any number, in one statement with one commit:
/// every claim, allocation and history event. The text never changes, so Postgres plans
/// it once per connection; the rows travel as one array per column. Any conflict fails
/// the whole statement and writes nothing. The events are written only once every
/// allocation row is in (the count is evaluated first, once), so an owner that already
/// holds its address fails before taking a revision: a revision taken by a failed
/// statement is a hole the change feed must wait out. Returns the highest revision
/// written.
async fn insert_exclusive_pg(
    hot: &PgPool,
    rows: &[(&AllocationRequest, &Plan, &PlanItem)],
    now: i64,
) -> Result<i64, sqlx::Error> {
    const SQL: &str = "WITH r AS (
            SELECT * FROM UNNEST($2::bytea[], $3::text[], $4::text[], $5::int8[], $6::text[], $7::int4[],
                                 $8::text[], $9::text[], $10::text[], $11::int4[], $12::text[], $13::text[])
                AS r(ip, tag, pool, generation, owner_uid, family, cluster_id, namespace, name, traffic_policy, ports, ip_text)
         ), claim AS (
            INSERT INTO ip_claims (ip, tag, pool, pool_generation, created_at)
            SELECT ip, tag, pool, generation, $1 FROM r
         ), alloc AS (
            INSERT INTO allocations (owner_uid, family, ip, tag, cluster_id, namespace, name, sharing_key, traffic_policy, ports, created_at)
            SELECT owner_uid, family, ip, tag, cluster_id, namespace, name, '', traffic_policy, ports, $1 FROM r
            RETURNING 1
         ), logged AS (
            INSERT INTO events (at, kind, ip, tag, pool, owner_uid, cluster_id, namespace, name, reason)
            SELECT $1, 'assigned', ip_text, tag, pool, owner_uid, cluster_id, namespace, name, 'allocated' FROM r
            WHERE (SELECT COUNT(*) FROM alloc) > 0
            RETURNING revision
         )
         SELECT MAX(revision) FROM logged";
    let n = rows.len();
    let mut ip = Vec::with_capacity(n);
    let mut tag = Vec::with_capacity(n);
    let mut pool = Vec::with_capacity(n);
    let mut generation = Vec::with_capacity(n);
    let mut owner_uid = Vec::with_capacity(n);
    let mut family = Vec::with_capacity(n);
    let mut cluster_id = Vec::with_capacity(n);
    let mut namespace = Vec::with_capacity(n);
    let mut name = Vec::with_capacity(n);
    let mut traffic_policy = Vec::with_capacity(n);
    let mut ports = Vec::with_capacity(n);
    let mut ip_text = Vec::with_capacity(n);
    for (req, plan, item) in rows {
        ip.push(ip_key(item.ip));
        tag.push(plan.tag.as_str());
        pool.push(item.pool.as_str());
        generation.push(item.pool_generation);
        owner_uid.push(req.owner.uid.as_str());
        family.push(IpFamily::of(item.ip).code());
        cluster_id.push(req.owner.cluster_id.as_str());
        namespace.push(req.owner.namespace.as_str());
        name.push(req.owner.name.as_str());
        traffic_policy.push(req.traffic_policy.code());
        ports.push(serde_json::to_string(&req.ports).map_err(|e| sqlx::Error::Encode(e.into()))?);
        ip_text.push(item.ip.to_string());
    }
    sqlx::query_scalar::<_, Option<i64>>(SQL)
        .bind(now)
        .bind(ip)
        .bind(tag)
        .bind(pool)
        .bind(generation)
        .bind(owner_uid)
        .bind(family)
        .bind(cluster_id)
        .bind(namespace)
        .bind(name)
        .bind(traffic_policy)
        .bind(ports)
        .bind(ip_text)
        .fetch_one(hot)
        .await
        .map(Option::unwrap_or_default)
}

/// Writes one planned address for `req`: the claim (unless it is a shared address that
/// exists already), the owner's allocation row, the shared ports and the history event.
async fn insert_item(
    conn: &mut AnyConnection,
    backend: Backend,
    req: &AllocationRequest,
    plan: &Plan,
    item: &PlanItem,
    now: i64,
) -> Result<i64, CommitError> {
    let owner = &req.owner;
    let key = ip_key(item.ip);
    let ports =
        serde_json::to_string(&req.ports).map_err(|e| StoreError::Corrupt(e.to_string()))?;
    let family = IpFamily::of(item.ip).code();
    let reason = if item.joins_shared {
        format!("shared under key {}", req.sharing_key)
    } else {
        "allocated".to_string()
    };
    let revision = match backend {
        Backend::Postgres => {
            // One statement: a conflict on the address leaves `claim` empty and the
            // allocation's foreign key (ip, tag) then fails unless the address is held
            // under this very tag (a sharing group), so nothing partial is ever written.
            let row = sqlx::query(
                "WITH claim AS (
                    INSERT INTO ip_claims (ip, tag, pool, pool_generation, created_at) VALUES ($1, $2, $3, $4, $5)
                    ON CONFLICT (ip) DO NOTHING RETURNING ip
                 ), alloc AS (
                    INSERT INTO allocations (owner_uid, family, ip, tag, cluster_id, namespace, name, sharing_key, traffic_policy, ports, created_at)
                    VALUES ($6, $7, $1, $2, $8, $9, $10, $11, $12, $13, $5) RETURNING owner_uid
                 )
                 INSERT INTO events (at, kind, ip, tag, pool, owner_uid, cluster_id, namespace, name, reason)
                 SELECT $5, 'assigned', $14, $2, $3, owner_uid, $8, $9, $10, $15 FROM alloc
                 RETURNING revision",
            )
            .bind(key.as_slice())
            .bind(&plan.tag)
            .bind(item.pool.as_str())
            .bind(item.pool_generation)
            .bind(now)
            .bind(&owner.uid)
            .bind(family)
            .bind(&owner.cluster_id)
            .bind(&owner.namespace)
            .bind(&owner.name)
            .bind(&req.sharing_key)
            .bind(req.traffic_policy.code())
            .bind(&ports)
            .bind(item.ip.to_string())
            .bind(&reason)
            .fetch_one(&mut *conn)
            .await
            .map_err(|e| classify(e, item))?;
            row.try_get::<i64, _>("revision")
                .map_err(StoreError::from)?
        }
        Backend::Sqlite => {
            // One writer: these checks cannot race, and they tell the reasons apart that
            // SQLite's "FOREIGN KEY constraint failed" does not.
            let holder: Option<String> =
                sqlx::query_scalar("SELECT tag FROM ip_claims WHERE ip = $1")
                    .bind(key.as_slice())
                    .fetch_optional(&mut *conn)
                    .await
                    .map_err(StoreError::from)?;
            match holder {
                Some(tag) if tag != plan.tag => return Err(CommitError::AddressTaken(item.ip)),
                Some(_) => {}
                None => {
                    let generation: Option<i64> =
                        sqlx::query_scalar("SELECT generation FROM pools WHERE name = $1")
                            .bind(item.pool.as_str())
                            .fetch_optional(&mut *conn)
                            .await
                            .map_err(StoreError::from)?;
                    if generation != Some(item.pool_generation) {
                        return Err(CommitError::PoolChanged(item.pool.to_string()));
                    }
                    sqlx::query("INSERT INTO ip_claims (ip, tag, pool, pool_generation, created_at) VALUES ($1, $2, $3, $4, $5)")
                        .bind(key.as_slice())
                        .bind(&plan.tag)
                        .bind(item.pool.as_str())
                        .bind(item.pool_generation)
                        .bind(now)
                        .execute(&mut *conn)
                        .await
                        .map_err(|e| classify(e, item))?;
                }
            }
            sqlx::query(
                "INSERT INTO allocations (owner_uid, family, ip, tag, cluster_id, namespace, name, sharing_key, traffic_policy, ports, created_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
            )
            .bind(&owner.uid)
            .bind(family)
            .bind(key.as_slice())
            .bind(&plan.tag)
            .bind(&owner.cluster_id)
            .bind(&owner.namespace)
            .bind(&owner.name)
            .bind(&req.sharing_key)
            .bind(req.traffic_policy.code())
            .bind(&ports)
            .bind(now)
            .execute(&mut *conn)
            .await
            .map_err(|e| classify(e, item))?;
            sqlx::query_scalar::<_, i64>(
                "INSERT INTO events (at, kind, ip, tag, pool, owner_uid, cluster_id, namespace, name, reason)
                 VALUES ($1, 'assigned', $2, $3, $4, $5, $6, $7, $8, $9) RETURNING revision",
            )
            .bind(now)
            .bind(item.ip.to_string())
            .bind(&plan.tag)
            .bind(item.pool.as_str())
            .bind(&owner.uid)
            .bind(&owner.cluster_id)
            .bind(&owner.namespace)
            .bind(&owner.name)
            .bind(&reason)
            .fetch_one(&mut *conn)
            .await
            .map_err(StoreError::from)?
        }
    };
    if !req.sharing_key.is_empty() {
        for port in &req.ports {
            sqlx::query("INSERT INTO shared_ports (ip, protocol, port, owner_uid, family) VALUES ($1, $2, $3, $4, $5)")
                .bind(key.as_slice())
                .bind(&port.protocol)
                .bind(i32::from(port.port))
                .bind(&owner.uid)
                .bind(family)
                .execute(&mut *conn)
                .await
                .map_err(|e| match error::violation(&e) {
                    Some(error::Violation::Unique(_)) => CommitError::PortInUse { ip: item.ip, port: format!("{}/{}", port.port, port.protocol) },
                    _ => CommitError::Store(e.into()),
                })?;
        }
    }
    Ok(revision)
}

/// Turns a constraint violation from writing `item` into what it means.
fn classify(err: sqlx::Error, item: &PlanItem) -> CommitError {
    match error::violation(&err) {
        Some(error::Violation::Unique(constraint))
            if constraint.is_none_or(|c| c.contains("allocations")) =>
        {
            CommitError::OwnerExists
        }
        Some(error::Violation::Unique(_)) => CommitError::AddressTaken(item.ip),
        Some(error::Violation::ForeignKey(constraint))
            if constraint.is_some_and(|c| c.contains("pool")) =>
        {
            CommitError::PoolChanged(item.pool.to_string())
        }
        Some(error::Violation::ForeignKey(_)) => CommitError::AddressTaken(item.ip),
        _ => CommitError::Store(err.into()),
    }
}

async fn lock_pool(
    tx: &mut AnyConnection,
    backend: Backend,
    name: &str,
) -> Result<StoredPool, StoreError> {
    // FOR UPDATE conflicts with the key-share lock each claim's foreign key takes on its
    // pool row, so a pool change waits for allocations in flight and blocks new ones.
    let sql = match backend {
        Backend::Postgres => {
            "SELECT name, generation, spec, created_at, updated_at FROM pools WHERE name = $1 FOR UPDATE"
        }
        Backend::Sqlite => {
            "SELECT name, generation, spec, created_at, updated_at FROM pools WHERE name = $1"
        }
    };
    let row = sqlx::query(sql).bind(name).fetch_optional(&mut *tx).await?;
    row.as_ref()
        .map(rows::pool_from_row)
        .transpose()?
        .ok_or_else(|| StoreError::PoolNotFound(name.to_string()))
}

/// Refuses `spec` if any of its ranges overlaps another pool's, naming both.
async fn check_overlap(tx: &mut AnyConnection, spec: &PoolSpec) -> Result<(), StoreError> {
    let rows = sqlx::query(
        "SELECT name, generation, spec, created_at, updated_at FROM pools WHERE name <> $1",
    )
    .bind(spec.name.as_str())
    .fetch_all(&mut *tx)
    .await?;
    for row in &rows {
        let other = rows::pool_from_row(row)?;
        for (i, range) in spec.addresses.iter().enumerate() {
            if let Some(theirs) = other.spec.addresses.iter().find(|r| r.overlaps(range)) {
                return Err(StoreError::Overlap {
                    field: format!("pool.addresses[{i}]"),
                    range: range.to_string(),
                    pool: other.spec.name.to_string(),
                    other: theirs.to_string(),
                });
            }
        }
    }
    Ok(())
}

async fn insert_blocks(tx: &mut AnyConnection, spec: &PoolSpec) -> Result<(), StoreError> {
    for range in &spec.addresses {
        for (ip, len) in range.to_cidrs() {
            sqlx::query("INSERT INTO pool_blocks (pool, block) VALUES ($1, $2)")
                .bind(spec.name.as_str())
                .bind(format!("{ip}/{len}"))
                .execute(&mut *tx)
                .await
                .map_err(|e| match error::violation(&e) {
                    Some(error::Violation::Exclusion) => StoreError::OverlapRace,
                    _ => e.into(),
                })?;
        }
    }
    Ok(())
}

async fn insert_pool_event(
    tx: &mut AnyConnection,
    kind: &str,
    pool: &str,
    now: i64,
) -> Result<(), StoreError> {
    sqlx::query("INSERT INTO events (at, kind, pool) VALUES ($1, $2, $3)")
        .bind(now)
        .bind(kind)
        .bind(pool)
        .execute(&mut *tx)
        .await?;
    Ok(())
}

async fn pool_allocations(
    tx: &mut AnyConnection,
    pool: &str,
) -> Result<Vec<Allocation>, StoreError> {
    let rows = sqlx::query(AssertSqlSafe(format!(
        "{ALLOCATION_SELECT} WHERE a.owner_uid IN (SELECT a2.owner_uid FROM allocations a2 JOIN ip_claims c2 ON c2.ip = a2.ip WHERE c2.pool = $1)
         ORDER BY a.owner_uid, a.family"
    )))
    .bind(pool)
    .fetch_all(&mut *tx)
    .await?;
    let mut grouped: BTreeMap<String, Vec<AnyRow>> = BTreeMap::new();
    for row in rows {
        grouped
            .entry(row.try_get("owner_uid")?)
            .or_default()
            .push(row);
    }
    grouped
        .values()
        .map(|rows| allocation_from_rows(rows))
        .collect()
}

/// Releases `ip` from every owner holding it (a shared address has several).
async fn release_address(
    tx: &mut AnyConnection,
    ip: IpAddr,
    reason: &str,
    now: i64,
) -> Result<Vec<(IpAddr, String)>, StoreError> {
    let owners: Vec<String> = sqlx::query_scalar("SELECT owner_uid FROM allocations WHERE ip = $1")
        .bind(ip_key(ip))
        .fetch_all(&mut *tx)
        .await?;
    for owner in &owners {
        release_owner_address(tx, ip, owner, reason, now).await?;
    }
    Ok(owners.into_iter().map(|o| (ip, o)).collect())
}

/// Deletes `owner_uid`'s hold on `ip`, the claim once nobody holds it, and records why.
async fn release_owner_address(
    tx: &mut AnyConnection,
    ip: IpAddr,
    owner_uid: &str,
    reason: &str,
    now: i64,
) -> Result<(), StoreError> {
    let key = ip_key(ip);
    let row = sqlx::query(
        "DELETE FROM allocations WHERE owner_uid = $1 AND ip = $2
         RETURNING tag, cluster_id, namespace, name",
    )
    .bind(owner_uid)
    .bind(key.as_slice())
    .fetch_optional(&mut *tx)
    .await?;
    let Some(row) = row else { return Ok(()) };
    let pool: String = sqlx::query_scalar("SELECT pool FROM ip_claims WHERE ip = $1")
        .bind(key.as_slice())
        .fetch_one(&mut *tx)
        .await?;
    sqlx::query("DELETE FROM ip_claims WHERE ip = $1 AND NOT EXISTS (SELECT 1 FROM allocations WHERE ip = $1)")
        .bind(key.as_slice())
        .execute(&mut *tx)
        .await?;
    sqlx::query(
        "INSERT INTO events (at, kind, ip, tag, pool, owner_uid, cluster_id, namespace, name, reason)
         VALUES ($1, 'released', $2, $3, $4, $5, $6, $7, $8, $9)",
    )
    .bind(now)
    .bind(ip.to_string())
    .bind(row.try_get::<String, _>("tag")?)
    .bind(pool)
    .bind(owner_uid)
    .bind(row.try_get::<String, _>("cluster_id")?)
    .bind(row.try_get::<String, _>("namespace")?)
    .bind(row.try_get::<String, _>("name")?)
    .bind(reason)
    .execute(&mut *tx)
    .await?;
    Ok(())
}

fn describe(allocations: &[Allocation]) -> String {
    const SHOWN: usize = 20;
    let mut parts: Vec<String> = allocations
        .iter()
        .take(SHOWN)
        .map(|a| {
            let ips: Vec<String> = a.ips.iter().map(|i| i.ip.to_string()).collect();
            format!(
                "{} held by {}/{} (uid {})",
                ips.join(","),
                a.owner.namespace,
                a.owner.name,
                a.owner.uid
            )
        })
        .collect();
    if allocations.len() > SHOWN {
        parts.push(format!("and {} more", allocations.len() - SHOWN));
    }
    parts.join("; ")
}
