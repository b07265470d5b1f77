//! The IPAM store: pools, allocations and their history, in Postgres (production) or an
//! embedded SQLite file (zero set-up), through one sqlx `Any` pool and one set of queries.
//! The two statements every Allocate pays for on Postgres (writing a group of exclusive
//! addresses, reading the change log) go through the typed driver instead.
//! Where the two dialects differ (Postgres' data-modifying CTEs and row locks, SQLite's
//! single writer) the difference is a branch on [`Backend`], kept next to its twin.
//!
//! The schema's constraints are what keep an address with one owner (or one sharing
//! group), across replicas and crashes; the in-memory index only makes the first guess.

mod compaction;
mod error;
mod link;
mod routing;
mod rows;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::TryStreamExt;
use herald_ipam_core::{ClaimRecord, Plan, PlanItem};
use herald_model::addr::ip_key;
use herald_model::{
    Allocation, AllocationRequest, HistoryEntry, IpFamily, PoolSpec, ServicePort, same_ports,
};
use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::postgres::{PgConnectOptions, PgConnection, PgPool, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteConnection};
use sqlx::{AnyConnection, AnyPool, AssertSqlSafe, ConnectOptions, Connection, Executor, Row};

/// The locks of transactions writing the change log: the lock every INSERT (or UPDATE or
/// DELETE) takes on `events`, in this database. Granted or still waiting: one that waits
/// has taken no revision yet, but counting it only makes the feed wait a little longer.
macro_rules! log_writer_filter {
    () => {
        "WHERE locktype = 'relation' AND mode = 'RowExclusiveLock'
           AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
           AND relation = CAST('events' AS regclass)"
    };
}

/// The change log's columns, as a literal so that fixed statements can be built with
/// `concat!` and stay `&'static` (sqlx takes those without `AssertSqlSafe`).
macro_rules! event_columns {
    () => {
        "revision, at, kind, ip, tag, pool, owner_uid, cluster_id, namespace, name, reason"
    };
}

pub use compaction::Compacted;
pub use error::{CommitError, StoreError, is_connection_error};
use link::Link;
pub use routing::Document;
use rows::{allocation_from_rows, held_address_from_row, history_from_row};
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
/// Under load a connection is returned within milliseconds; waiting longer only means
/// the database is away, and the request should fail well inside a client's deadline
/// (commonly 5 s) rather than be written after the client gave up.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest wait for a new connection, TLS and authentication included (~100 ms on a
/// LAN): longer means the server is not answering, and the next attempt should start.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest wait for the health probe's `SELECT 1` on its open connection. Together with
/// the probe interval it bounds how long health says SERVING after the database went.
const PROBE_TIMEOUT: Duration = Duration::from_millis(500);
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
    /// An owner's ports or traffic policy changed on an address it keeps; the string is
    /// the address's claim tag after the change.
    Updated(HistoryEntry, String),
    PoolChanged {
        revision: i64,
        pool: String,
    },
    PoolDeleted {
        revision: i64,
        pool: String,
    },
    NodeChanged {
        revision: i64,
        node: String,
    },
    NodeDeleted {
        revision: i64,
        node: String,
    },
    EndpointsChanged {
        revision: i64,
        owner_uid: String,
    },
    PolicyChanged {
        revision: i64,
    },
}

impl Event {
    pub fn revision(&self) -> i64 {
        match self {
            Self::Assigned(e, _) | Self::Released(e, _) | Self::Updated(e, _) => e.revision,
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
    /// The revision of the change's last log entry (0 for a dry run): the caller's index
    /// has this change applied, so the change feed must not apply older entries over it.
    pub revision: i64,
}

/// What [`Store::release`] released.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Released {
    /// (ip, pool) of each address released.
    pub addresses: Vec<(IpAddr, String)>,
    /// The revision of the last `released` log entry written (0 when nothing was held).
    pub revision: i64,
}

/// One address an owner holds, as stored: the owner's allocation with this address alone
/// in `ips`, and the tag it is claimed under. What both the allocation index (the claim)
/// and the route engine (the allocation) load.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeldAddress {
    pub allocation: Allocation,
    pub tag: String,
}

impl HeldAddress {
    /// The index's record of the address, as [`Store::each_claim`] gives it (one: `ips`
    /// holds the one address).
    pub fn claims(&self) -> impl Iterator<Item = ClaimRecord> + '_ {
        let a = &self.allocation;
        a.ips.iter().map(|assigned| ClaimRecord {
            ip: assigned.ip,
            tag: self.tag.clone(),
            pool: assigned.pool.to_string(),
            owner_uid: a.owner.uid.clone(),
            ports: a.ports.clone(),
        })
    }
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
    link: Arc<Link>,
    /// Postgres only: the health probe's own connection, outside the pools, so that a busy
    /// pool cannot hold the probe back (nor the probe take a request's connection).
    probe: Option<Arc<Probe>>,
}

struct Probe {
    options: PgConnectOptions,
    connection: tokio::sync::Mutex<Option<PgConnection>>,
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

/// Set on every SQLite connection. WAL with NORMAL sync survives a killed process (only a
/// power loss can drop the last commits); foreign keys are what keep claims and
/// allocations consistent, so they must be on.
const SQLITE_PRAGMAS: &str = "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; PRAGMA foreign_keys = ON; PRAGMA busy_timeout = 5000;";

/// `host:port` (or the Unix socket) a Postgres URL connects to, for messages.
fn postgres_target(options: &PgConnectOptions) -> String {
    let (host, port) = (options.get_host(), options.get_port());
    match options.get_socket() {
        Some(dir) => format!("{}/.s.PGSQL.{port}", dir.display()),
        None if host.starts_with('/') => format!("{host}/.s.PGSQL.{port}"),
        None if host.contains(':') => format!("[{host}]:{port}"),
        None => format!("{host}:{port}"),
    }
}

fn unreachable(link: &Link, err: &sqlx::Error) -> StoreError {
    StoreError::Unavailable {
        target: link.target().to_string(),
        cause: error::connection_cause(err),
    }
}

/// One connection to Postgres, outside any pool, within `timeout`.
async fn connect_postgres(
    link: &Link,
    options: &PgConnectOptions,
    timeout: Duration,
) -> Result<PgConnection, StoreError> {
    match tokio::time::timeout(timeout, options.connect()).await {
        Ok(Ok(connection)) => Ok(connection),
        Ok(Err(sqlx::Error::Configuration(e))) => {
            Err(StoreError::Config(format!("database URL: {e}")))
        }
        Ok(Err(e)) => Err(unreachable(link, &e)),
        Err(_) => Err(StoreError::Unavailable {
            target: link.target().to_string(),
            cause: format!("no connection within {timeout:?}"),
        }),
    }
}

/// Opens the embedded file once, as the pool will, so that a file or directory that
/// cannot be used is reported with its path and the reason.
async fn check_sqlite(options: &SqliteConnectOptions, path: &Path) -> Result<(), StoreError> {
    let opened = async {
        let mut connection: SqliteConnection = options.connect().await?;
        connection.execute(SQLITE_PRAGMAS).await?;
        connection.close().await
    };
    opened
        .await
        .map_err(|e| match sqlite_file_problem(path, &e) {
            Some(cause) => StoreError::EmbeddedFile {
                path: path.display().to_string(),
                cause,
            },
            None => StoreError::Database(e),
        })
}

/// Why SQLite cannot open or write `path`, when the error is about the file (SQLITE_PERM,
/// _READONLY, _CANTOPEN, _NOTADB). SQLite says only "unable to open database file"; the
/// file system says why.
fn sqlite_file_problem(path: &Path, err: &sqlx::Error) -> Option<String> {
    let db = err.as_database_error()?;
    // The primary result code is the low byte of the extended one SQLite reports.
    let primary = db.code()?.parse::<i32>().ok()? & 0xff;
    if !matches!(primary, 3 | 8 | 14 | 26) {
        return None;
    }
    let file_system = match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
    {
        Ok(_) => None,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(path)
            {
                Ok(_) => {
                    let _ = std::fs::remove_file(path);
                    Some(
                        "the file does not exist; add ?mode=rwc to the URL to create it"
                            .to_string(),
                    )
                }
                Err(e) => Some(e.to_string()),
            }
        }
        Err(e) => Some(e.to_string()),
    };
    Some(file_system.unwrap_or_else(|| {
        format!(
            "{} (the directory must be writable too, for the write-ahead log)",
            db.message()
        )
    }))
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
                "database URL must start with postgres://, postgresql:// or sqlite: (got {:?})",
                url.split(':').next().unwrap_or_default()
            )));
        };
        // The first connection is opened directly, not through a pool: a pool retries a
        // refused connection until its timeout and then reports only that it timed out,
        // while this error names the cause. On Postgres it becomes the health probe's.
        let (link, probe) = match backend {
            Backend::Postgres => {
                let options = PgConnectOptions::from_str(&url)
                    .map_err(|e| StoreError::Config(format!("database URL: {e}")))?;
                let link = Arc::new(Link::new(postgres_target(&options)));
                let first = connect_postgres(&link, &options, CONNECT_TIMEOUT).await?;
                let probe = Probe {
                    options,
                    connection: tokio::sync::Mutex::new(Some(first)),
                };
                (link, Some(Arc::new(probe)))
            }
            Backend::Sqlite => {
                let options = SqliteConnectOptions::from_str(&url)
                    .map_err(|e| StoreError::Config(format!("database URL: {e}")))?;
                let path = options.get_filename();
                let path = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
                check_sqlite(&options, &path).await?;
                (Arc::new(Link::new(path.display().to_string())), None)
            }
        };
        // No ping before every acquire: it doubled the round trips of an Allocate. A
        // connection that died is found by the statement that uses it, whose error the
        // client sees as UNAVAILABLE and retries; the pool then replaces the connection.
        let options = AnyPoolOptions::new()
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .test_before_acquire(false)
            // ...but one opened before connections were last found broken (the server
            // restarted, or terminated them) is replaced rather than tried.
            .before_acquire({
                let link = Arc::clone(&link);
                move |_, meta| {
                    let trusted = link.trusts(meta.age);
                    Box::pin(async move { Ok(trusted) })
                }
            });
        // Opening a Postgres connection took ~90 ms here whenever TLS was negotiated (sqlx
        // with rustls, the default sslmode=prefer, even on loopback; 2.5 ms without TLS).
        // A request that finds no idle connection pays that: it showed as ~95 ms stalls in
        // every benchmark. So each Postgres pool keeps a working set open (`min_connections`;
        // sqlx replaces one that expires in the background, off any request's path),
        // opened all at once in the background as the store opens. (The connection opened
        // above already made a wrong URL or an unreachable server fail the start.)
        let pool = match backend {
            Backend::Postgres => {
                let pool = options
                    .max_connections(DEFAULT_PG_CONNECTIONS)
                    .min_connections(DEFAULT_PG_CONNECTIONS)
                    .connect_lazy(&url)?;
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
                            conn.execute(SQLITE_PRAGMAS).await?;
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
                    .before_acquire({
                        let link = Arc::clone(&link);
                        move |_, meta| {
                            let trusted = link.trusts(meta.age);
                            Box::pin(async move { Ok(trusted) })
                        }
                    })
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
        let store = Self {
            pool,
            hot,
            backend,
            link,
            probe,
        };
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

    /// Where the database is: `host:port`, a Unix socket, or the SQLite file.
    pub fn target(&self) -> &str {
        self.link.target()
    }

    /// `Ok` unless the last probe found the database away; then an
    /// [`StoreError::Unavailable`] saying where and why, so a request fails at once
    /// instead of waiting for a connection that cannot come.
    pub fn check_available(&self) -> Result<(), StoreError> {
        self.link.check()
    }

    /// Resolves once the database is known to be away (at once if it is now).
    pub async fn went_down(&self) {
        self.link.went_down().await;
    }

    /// Resolves when a request met a broken connection and asked for a probe.
    pub async fn probe_wanted(&self) {
        self.link.probe_wanted().await;
    }

    /// Tells the store that a request failed with `err`. A connection-level failure marks
    /// every pooled connection open now as suspect (they are replaced, not reused) and
    /// asks the health probe to look at once.
    pub fn note_failure(&self, err: &StoreError) {
        if self.backend == Backend::Postgres && err.is_unavailable() {
            self.link.mark_broken();
        }
    }

    /// Asks the database whether it answers, on a connection of the probe's own, and
    /// records the answer for [`Store::check_available`]. An open connection that fails
    /// is replaced at once and asked again, so a server restart that was over before the
    /// probe looked does not count as an outage (though the pooled connections it broke
    /// are replaced). The embedded SQLite file has no link to lose: always `Ok`.
    pub async fn probe(&self) -> Result<(), StoreError> {
        let Some(probe) = &self.probe else {
            return Ok(());
        };
        let mut slot = probe.connection.lock().await;
        let connect_timeout = if slot.is_some() && self.link.check().is_ok() {
            PROBE_TIMEOUT
        } else {
            CONNECT_TIMEOUT
        };
        if let Some(connection) = slot.as_mut() {
            match tokio::time::timeout(PROBE_TIMEOUT, connection.execute("SELECT 1")).await {
                Ok(Ok(_)) => {
                    self.link.mark_up();
                    return Ok(());
                }
                Ok(Err(_)) | Err(_) => {
                    *slot = None;
                    self.link.mark_broken();
                }
            }
        }
        let answered = async {
            let mut connection =
                connect_postgres(&self.link, &probe.options, connect_timeout).await?;
            match tokio::time::timeout(PROBE_TIMEOUT, connection.execute("SELECT 1")).await {
                Ok(Ok(_)) => Ok(connection),
                Ok(Err(e)) => Err(unreachable(&self.link, &e)),
                Err(_) => Err(StoreError::Unavailable {
                    target: self.link.target().to_string(),
                    cause: format!("no answer to SELECT 1 within {PROBE_TIMEOUT:?}"),
                }),
            }
        };
        match answered.await {
            Ok(connection) => {
                *slot = Some(connection);
                self.link.mark_up();
                Ok(())
            }
            Err(e) => {
                let cause = match &e {
                    StoreError::Unavailable { cause, .. } => cause.clone(),
                    other => other.to_string(),
                };
                self.link.mark_down(cause);
                Err(e)
            }
        }
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

    /// Hands every owner's hold on every address to `each` as the rows arrive, rather than
    /// collecting them: a restart with 100,000 allocations never holds all their rows and
    /// all their records at once beside the index they are fed into. Returns how many.
    pub async fn each_claim(&self, mut each: impl FnMut(ClaimRecord)) -> Result<u64, StoreError> {
        let mut rows = sqlx::query(
            "SELECT a.ip, a.tag, c.pool, a.owner_uid, a.ports FROM allocations a JOIN ip_claims c ON c.ip = a.ip",
        )
        .fetch(&self.pool);
        let mut count = 0;
        while let Some(row) = rows.try_next().await? {
            each(rows::claim_from_row(&row)?);
            count += 1;
        }
        Ok(count)
    }

    /// Hands every address every owner holds to `each`, as the rows arrive: one query over
    /// the allocations, where paging through them re-ran the join and a sort once per page
    /// (100 pages for 100,000 allocations). A restart loads the index and the route engine
    /// from this one pass. The rows come in no order, and an owner with an address in
    /// each family comes twice; leaving out the ORDER BY saves the database a sort of
    /// every row (on disk beyond `work_mem`), which the caller needs only to pair up the
    /// few dual-stack owners. Returns how many.
    pub async fn each_held_address(
        &self,
        mut each: impl FnMut(HeldAddress),
    ) -> Result<u64, StoreError> {
        let mut rows = sqlx::query(ALLOCATION_SELECT).fetch(&self.pool);
        let mut count = 0;
        while let Some(row) = rows.try_next().await? {
            each(held_address_from_row(&row)?);
            count += 1;
        }
        Ok(count)
    }

    /// How many owner holds there are: what [`Store::each_claim`] will hand over.
    pub async fn claim_count(&self) -> Result<u64, StoreError> {
        let count: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM allocations")
            .fetch_one(&self.pool)
            .await?;
        Ok(u64::try_from(count).unwrap_or(0))
    }

    /// Every owner's hold on `ip` (several when it is shared): what a replica that lost a
    /// race for the address learns of the winner, one indexed lookup instead of re-reading
    /// the pool's claims.
    pub async fn load_claims_at(&self, ip: IpAddr) -> Result<Vec<ClaimRecord>, StoreError> {
        let rows = sqlx::query(
            "SELECT a.ip, a.tag, c.pool, a.owner_uid, a.ports FROM allocations a JOIN ip_claims c ON c.ip = a.ip
             WHERE a.ip = $1",
        )
        .bind(ip_key(ip))
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
                revision: 0,
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
        let revision = insert_pool_event(&mut tx, "pool_changed", name, now).await?;
        tx.commit().await?;
        Ok(PoolChange {
            pool: Some(updated),
            affected,
            released,
            revision,
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
                revision: 0,
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
        let revision = insert_pool_event(&mut tx, "pool_deleted", name, now).await?;
        tx.commit().await?;
        Ok(PoolChange {
            pool: None,
            affected,
            released,
            revision,
        })
    }

    // ---- allocations -------------------------------------------------------------------

    pub async fn get_allocation(&self, owner_uid: &str) -> Result<Option<Allocation>, StoreError> {
        Ok(self
            .get_held(owner_uid)
            .await?
            .map(|(allocation, _)| allocation))
    }

    /// What `owner_uid` holds, with the claim tag its addresses are held under (which
    /// carries its traffic policy and endpoint selector when it shares).
    pub async fn get_held(
        &self,
        owner_uid: &str,
    ) -> Result<Option<(Allocation, String)>, StoreError> {
        let rows = sqlx::query(AssertSqlSafe(format!(
            "{ALLOCATION_SELECT} WHERE a.owner_uid = $1 ORDER BY a.family"
        )))
        .bind(owner_uid)
        .fetch_all(&self.pool)
        .await?;
        let Some(first) = rows.first() else {
            return Ok(None);
        };
        let tag: String = first.try_get("tag")?;
        Ok(Some((allocation_from_rows(&rows)?, tag)))
    }

    /// Changes the ports and traffic policy (with it, the claim tag) of `held`, which
    /// `req`'s owner holds, to the request's, in one transaction: the old ports are freed,
    /// the new ones claimed, and one `updated` event per address is logged. Refused when
    /// another Service sharing one of the addresses uses one of the new ports, or shares
    /// it under the old tag while the tag changes; then nothing changes. The addresses,
    /// the owner's identity and its creation time stay. Returns the last event's revision.
    pub async fn update_allocation(
        &self,
        req: &AllocationRequest,
        held: &Allocation,
    ) -> Result<i64, CommitError> {
        let now = now_micros();
        let uid = &req.owner.uid;
        let mut tx = self.pool.begin().await.map_err(StoreError::from)?;
        // Postgres locks the owner's rows and the claims they reference: a concurrent join
        // of one of its addresses (whose foreign key takes a key-share lock on the claim)
        // waits until this update ends, then sees its ports and tag. SQLite has one writer.
        let lock = match self.backend {
            Backend::Postgres => " FOR UPDATE",
            Backend::Sqlite => "",
        };
        let rows = sqlx::query(AssertSqlSafe(format!(
            "{ALLOCATION_SELECT} WHERE a.owner_uid = $1 ORDER BY a.family{lock}"
        )))
        .bind(uid)
        .fetch_all(&mut *tx)
        .await
        .map_err(StoreError::from)?;
        let Some(first) = rows.first() else {
            return Err(CommitError::AllocationChanged);
        };
        let current = allocation_from_rows(&rows)?;
        if current.ips != held.ips || current.sharing_key != req.sharing_key {
            return Err(CommitError::AllocationChanged);
        }
        let old_tag: String = first.try_get("tag").map_err(StoreError::from)?;
        let tag = req.claim_tag();
        for assigned in &current.ips {
            if tag != old_tag
                && let Some(row) = sqlx::query(
                    "SELECT owner_uid, namespace, name FROM allocations WHERE ip = $1 AND owner_uid <> $2
                     ORDER BY owner_uid LIMIT 1",
                )
                .bind(ip_key(assigned.ip))
                .bind(uid)
                .fetch_optional(&mut *tx)
                .await
                .map_err(StoreError::from)?
            {
                return Err(CommitError::PolicyShared {
                    ip: assigned.ip,
                    key: req.sharing_key.clone(),
                    holder: describe_owner_row(&row)?,
                });
            }
            if !req.sharing_key.is_empty()
                && let Some((port, holder)) =
                    port_taken(&mut tx, assigned.ip, uid, &req.ports).await?
            {
                return Err(CommitError::PortInUse {
                    ip: assigned.ip,
                    port,
                    key: req.sharing_key.clone(),
                    holder,
                });
            }
        }
        // The rows are rewritten rather than updated: an allocation references its claim
        // by (ip, tag), so a new tag needs the claim changed between the two.
        let reason = update_reason(&current, req);
        let ports =
            serde_json::to_string(&req.ports).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        sqlx::query("DELETE FROM shared_ports WHERE owner_uid = $1")
            .bind(uid)
            .execute(&mut *tx)
            .await
            .map_err(StoreError::from)?;
        sqlx::query("DELETE FROM allocations WHERE owner_uid = $1")
            .bind(uid)
            .execute(&mut *tx)
            .await
            .map_err(StoreError::from)?;
        let mut revision = 0;
        for (row, assigned) in rows.iter().zip(&current.ips) {
            let key = ip_key(assigned.ip);
            let family = IpFamily::of(assigned.ip).code();
            let created_at: i64 = row.try_get("created_at").map_err(StoreError::from)?;
            if tag != old_tag {
                sqlx::query("UPDATE ip_claims SET tag = $2 WHERE ip = $1")
                    .bind(key.as_slice())
                    .bind(&tag)
                    .execute(&mut *tx)
                    .await
                    .map_err(StoreError::from)?;
            }
            sqlx::query(
                "INSERT INTO allocations (owner_uid, family, ip, tag, cluster_id, namespace, name, sharing_key, traffic_policy, ports, created_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
            )
            .bind(uid)
            .bind(family)
            .bind(key.as_slice())
            .bind(&tag)
            .bind(&current.owner.cluster_id)
            .bind(&current.owner.namespace)
            .bind(&current.owner.name)
            .bind(&req.sharing_key)
            .bind(req.traffic_policy.code())
            .bind(&ports)
            .bind(created_at)
            .execute(&mut *tx)
            .await
            .map_err(StoreError::from)?;
            if !req.sharing_key.is_empty() {
                insert_shared_ports(&mut tx, req, assigned.ip, family).await?;
            }
            revision = sqlx::query_scalar::<_, i64>(
                "INSERT INTO events (at, kind, ip, tag, pool, owner_uid, cluster_id, namespace, name, reason)
                 VALUES ($1, 'updated', $2, $3, $4, $5, $6, $7, $8, $9) RETURNING revision",
            )
            .bind(now)
            .bind(assigned.ip.to_string())
            .bind(&tag)
            .bind(assigned.pool.as_str())
            .bind(uid)
            .bind(&current.owner.cluster_id)
            .bind(&current.owner.namespace)
            .bind(&current.owner.name)
            .bind(&reason)
            .fetch_one(&mut *tx)
            .await
            .map_err(StoreError::from)?;
        }
        tx.commit().await.map_err(StoreError::from)?;
        Ok(revision)
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

    /// Releases everything `owner_uid` holds; returns what was released.
    pub async fn release(&self, owner_uid: &str, reason: &str) -> Result<Released, StoreError> {
        let now = now_micros();
        let mut tx = self.pool.begin().await?;
        let held: Vec<AnyRow> = sqlx::query("SELECT a.ip, c.pool FROM allocations a JOIN ip_claims c ON c.ip = a.ip WHERE a.owner_uid = $1 ORDER BY a.family")
            .bind(owner_uid)
            .fetch_all(&mut *tx)
            .await?;
        let mut released = Released {
            addresses: Vec::new(),
            revision: 0,
        };
        for row in &held {
            let ip = rows::ip_from_row(row, "ip")?;
            if let Some(revision) =
                release_owner_address(&mut tx, ip, owner_uid, reason, now).await?
            {
                released.revision = released.revision.max(revision);
            }
            released
                .addresses
                .push((ip, row.try_get::<String, _>("pool")?));
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
        // Without a pool filter the subquery is left out, not just short-circuited: a
        // generic plan (Postgres) or SQLite still built its whole result for every page,
        // and the route engine's load at start-up reads 100 pages for 100k allocations.
        let by_pool = if filter.pool.is_empty() {
            "$4 = ''"
        } else {
            "a.owner_uid IN (SELECT a2.owner_uid FROM allocations a2 JOIN ip_claims c2 ON c2.ip = a2.ip WHERE c2.pool = $4)"
        };
        // Each owner has at most one row per family, so 2n + 2 rows hold the first n + 1
        // owners, of which the first n are complete.
        let rows = sqlx::query(AssertSqlSafe(format!(
            "{ALLOCATION_SELECT} WHERE a.owner_uid > $1 AND ($2 = '' OR a.namespace = $2) AND ($3 = '' OR a.cluster_id = $3)
               AND {by_pool}
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
            "SELECT {EVENT_COLUMNS} FROM events WHERE {column} = $1 AND revision < $2 AND kind IN ('assigned', 'released', 'updated')
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

    /// Postgres: the transactions writing the change log right now (their virtual
    /// transaction ids). An INSERT holds its lock on the table from before it takes a
    /// revision from the sequence until its transaction ends, so a revision that is missing
    /// while a later one is visible belongs to one of the writers listed after that later
    /// one was read. The change feed waits for them before it calls the revision a
    /// rollback. SQLite has one writer and rolls its revision counter back with the
    /// transaction, so it never leaves holes: `None`.
    pub async fn log_writers(&self) -> Result<Option<Vec<String>>, StoreError> {
        let Some(hot) = &self.hot else {
            return Ok(None);
        };
        const SQL: &str = concat!(
            "SELECT virtualtransaction FROM pg_locks ",
            log_writer_filter!()
        );
        Ok(Some(sqlx::query_scalar(SQL).fetch_all(hot).await?))
    }

    /// How many of `writers` (from [`Store::log_writers`]) are still running.
    pub async fn log_writers_running(&self, writers: &[String]) -> Result<usize, StoreError> {
        let Some(hot) = &self.hot else {
            return Ok(0);
        };
        if writers.is_empty() {
            return Ok(0);
        }
        const SQL: &str = concat!(
            "SELECT COUNT(DISTINCT virtualtransaction) FROM pg_locks ",
            log_writer_filter!(),
            " AND virtualtransaction = ANY($1)"
        );
        let running: i64 = sqlx::query_scalar(SQL).bind(writers).fetch_one(hot).await?;
        Ok(usize::try_from(running).unwrap_or(usize::MAX))
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
    // A port in use is refused before anything is written, naming who uses it, and takes
    // no revision (which would be a hole the change feed waits out). Whether the plan
    // joins the address or not: another replica may have claimed it meanwhile.
    if !req.sharing_key.is_empty()
        && let Some((port, holder)) = port_taken(conn, item.ip, &owner.uid, &req.ports).await?
    {
        return Err(CommitError::PortInUse {
            ip: item.ip,
            port,
            key: req.sharing_key.clone(),
            holder,
        });
    }
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
        insert_shared_ports(conn, req, item.ip, family).await?;
    }
    Ok(revision)
}

/// Claims `req`'s ports on the shared address `ip` for its owner. A port another owner
/// took since [`port_taken`] looked is refused by the table's key.
async fn insert_shared_ports(
    conn: &mut AnyConnection,
    req: &AllocationRequest,
    ip: IpAddr,
    family: i32,
) -> Result<(), CommitError> {
    let key = ip_key(ip);
    for port in &req.ports {
        sqlx::query("INSERT INTO shared_ports (ip, protocol, port, owner_uid, family) VALUES ($1, $2, $3, $4, $5)")
            .bind(key.as_slice())
            .bind(&port.protocol)
            .bind(i32::from(port.port))
            .bind(&req.owner.uid)
            .bind(family)
            .execute(&mut *conn)
            .await
            .map_err(|e| match error::violation(&e) {
                Some(error::Violation::Unique(_)) => CommitError::PortInUse {
                    ip,
                    port: format!("{}/{}", port.port, port.protocol),
                    key: req.sharing_key.clone(),
                    holder: String::new(),
                },
                _ => CommitError::Store(e.into()),
            })?;
    }
    Ok(())
}

/// The first of `ports` that another owner of the shared address `ip` uses, as
/// ("port/protocol", that owner described), so a refusal can name who holds it.
async fn port_taken(
    conn: &mut AnyConnection,
    ip: IpAddr,
    owner_uid: &str,
    ports: &[ServicePort],
) -> Result<Option<(String, String)>, StoreError> {
    if ports.is_empty() {
        return Ok(None);
    }
    let rows = sqlx::query(
        "SELECT s.protocol, s.port, a.owner_uid, a.namespace, a.name FROM shared_ports s
         JOIN allocations a ON a.owner_uid = s.owner_uid AND a.family = s.family
         WHERE s.ip = $1 AND s.owner_uid <> $2 ORDER BY s.owner_uid, s.protocol, s.port",
    )
    .bind(ip_key(ip))
    .bind(owner_uid)
    .fetch_all(&mut *conn)
    .await?;
    for row in &rows {
        let protocol: String = row.try_get("protocol")?;
        let port: i32 = row.try_get("port")?;
        if ports
            .iter()
            .any(|p| p.protocol == protocol && i32::from(p.port) == port)
        {
            return Ok(Some((
                format!("{port}/{protocol}"),
                describe_owner_row(row)?,
            )));
        }
    }
    Ok(None)
}

/// "Service ns/name (uid u)" from a row with owner_uid, namespace and name.
fn describe_owner_row(row: &AnyRow) -> Result<String, StoreError> {
    Ok(format!(
        "Service {}/{} (uid {})",
        row.try_get::<String, _>("namespace")?,
        row.try_get::<String, _>("name")?,
        row.try_get::<String, _>("owner_uid")?
    ))
}

/// The history's reason for an update: what changed, old and new.
fn update_reason(before: &Allocation, req: &AllocationRequest) -> String {
    /// Ports listed in a reason; a Service may have up to 1,024.
    const SHOWN: usize = 8;
    let list = |ports: &[ServicePort]| {
        if ports.is_empty() {
            return "none".to_string();
        }
        let mut shown: Vec<String> = ports
            .iter()
            .take(SHOWN)
            .map(|p| format!("{}/{}", p.port, p.protocol))
            .collect();
        if ports.len() > SHOWN {
            shown.push(format!("and {} more", ports.len() - SHOWN));
        }
        shown.join(", ")
    };
    let mut changes = Vec::new();
    if !same_ports(&before.ports, &req.ports) {
        changes.push(format!(
            "ports {} (were {})",
            list(&req.ports),
            list(&before.ports)
        ));
    }
    if before.traffic_policy != req.traffic_policy {
        changes.push(format!(
            "traffic policy {:?} (was {:?})",
            req.traffic_policy, before.traffic_policy
        ));
    }
    if changes.is_empty() {
        changes.push("endpoint selector changed".to_string());
    }
    format!("updated: {}", changes.join("; "))
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
) -> Result<i64, StoreError> {
    let revision: i64 = sqlx::query_scalar(
        "INSERT INTO events (at, kind, pool) VALUES ($1, $2, $3) RETURNING revision",
    )
    .bind(now)
    .bind(kind)
    .bind(pool)
    .fetch_one(&mut *tx)
    .await?;
    Ok(revision)
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
/// Returns the revision of the `released` entry, or `None` when the owner did not hold it.
async fn release_owner_address(
    tx: &mut AnyConnection,
    ip: IpAddr,
    owner_uid: &str,
    reason: &str,
    now: i64,
) -> Result<Option<i64>, StoreError> {
    let key = ip_key(ip);
    let row = sqlx::query(
        "DELETE FROM allocations WHERE owner_uid = $1 AND ip = $2
         RETURNING tag, cluster_id, namespace, name",
    )
    .bind(owner_uid)
    .bind(key.as_slice())
    .fetch_optional(&mut *tx)
    .await?;
    let Some(row) = row else { return Ok(None) };
    let pool: String = sqlx::query_scalar("SELECT pool FROM ip_claims WHERE ip = $1")
        .bind(key.as_slice())
        .fetch_one(&mut *tx)
        .await?;
    sqlx::query("DELETE FROM ip_claims WHERE ip = $1 AND NOT EXISTS (SELECT 1 FROM allocations WHERE ip = $1)")
        .bind(key.as_slice())
        .execute(&mut *tx)
        .await?;
    let revision: i64 = sqlx::query_scalar(
        "INSERT INTO events (at, kind, ip, tag, pool, owner_uid, cluster_id, namespace, name, reason)
         VALUES ($1, 'released', $2, $3, $4, $5, $6, $7, $8, $9) RETURNING revision",
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
    .fetch_one(&mut *tx)
    .await?;
    Ok(Some(revision))
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
