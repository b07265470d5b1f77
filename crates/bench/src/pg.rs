//! Postgres: the throwaway databases every phase runs in, and the raw-INSERT ceiling that
//! Allocate is measured against.

use std::time::Duration;

use anyhow::{Context, bail};
use serde::Serialize;
use sqlx::postgres::PgConnection;
use sqlx::{AssertSqlSafe, Connection, Executor, Row};

use crate::cpu::{self, CpuUse};
use crate::machine::Machine;
use crate::runner::{self, Limits, Op, Outcome};
use crate::stats::Summary;

/// How long dropping a database may take before the bench gives up on it (it is then left
/// behind, named `herald_bench_…`, for a person to drop).
const DROP_TIMEOUT: Duration = Duration::from_secs(10);

/// A database that exists while this value lives, on the server of `admin_url`.
pub struct BenchDb {
    pub url: String,
    admin_url: String,
    name: String,
}

impl BenchDb {
    pub async fn create(admin_url: &str) -> anyhow::Result<Self> {
        let name = format!("herald_bench_{:012x}", rand::random::<u64>() >> 16);
        let mut admin = connect(admin_url).await?;
        admin
            .execute(AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .await
            .with_context(|| format!("CREATE DATABASE {name} on {admin_url}"))?;
        let _ = admin.close().await;
        Ok(Self {
            url: database_url(admin_url, &name)?,
            admin_url: admin_url.to_string(),
            name,
        })
    }
}

impl Drop for BenchDb {
    fn drop(&mut self) {
        let (admin_url, name) = (self.admin_url.clone(), self.name.clone());
        // Drop cannot await, and blocking a runtime worker on that runtime would deadlock:
        // a thread with a small runtime of its own does it, bounded in time.
        let handle = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async {
                let drop_db = async {
                    let mut admin = PgConnection::connect(&admin_url).await.ok()?;
                    let sql = format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)");
                    admin.execute(AssertSqlSafe(sql)).await.ok()?;
                    admin.close().await.ok()
                };
                if tokio::time::timeout(DROP_TIMEOUT, drop_db).await.is_err() {
                    eprintln!("could not drop database {name}; drop it by hand");
                }
            });
        });
        let _ = handle.join();
    }
}

/// `admin_url` with its database replaced by `name`, keeping any query string.
fn database_url(admin_url: &str, name: &str) -> anyhow::Result<String> {
    let (base, query) = match admin_url.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (admin_url, None),
    };
    let Some(server) = base
        .strip_prefix("postgres://")
        .or_else(|| base.strip_prefix("postgresql://"))
        .map(|rest| rest.split_once('/').map_or(rest, |(server, _)| server))
    else {
        bail!("--database-url {admin_url:?} is not a postgres:// URL");
    };
    Ok(match query {
        Some(q) => format!("postgres://{server}/{name}?{q}"),
        None => format!("postgres://{server}/{name}"),
    })
}

/// The on-disk size of `tables` with their indexes and TOAST, in bytes.
pub async fn relation_bytes(url: &str, tables: &[&str]) -> anyhow::Result<u64> {
    let mut conn = connect(url).await?;
    let mut total = 0u64;
    for table in tables {
        let bytes: i64 = sqlx::query_scalar("SELECT pg_total_relation_size($1::regclass)")
            .bind(*table)
            .fetch_one(&mut conn)
            .await
            .with_context(|| format!("size of table {table}"))?;
        total += u64::try_from(bytes).unwrap_or(0);
    }
    let _ = conn.close().await;
    Ok(total)
}

async fn connect(url: &str) -> anyhow::Result<PgConnection> {
    PgConnection::connect(url).await.with_context(|| {
        format!(
            "cannot reach Postgres at {url}. Start a server (on Debian: apt-get install postgresql) \
             or point --database-url / HERALD_TEST_DATABASE_URL at one where this user may create databases"
        )
    })
}

/// Fills in the Postgres fields of `machine`.
pub async fn describe_server(admin_url: &str, machine: &mut Machine) -> anyhow::Result<()> {
    let mut conn = connect(admin_url).await?;
    let row = sqlx::query(
        "SELECT current_setting('server_version') AS version,
                current_setting('synchronous_commit') AS sync,
                current_setting('fsync') AS fsync",
    )
    .fetch_one(&mut conn)
    .await?;
    machine.postgres = format!("PostgreSQL {}", row.try_get::<String, _>("version")?);
    machine.synchronous_commit = row.try_get("sync")?;
    machine.fsync = row.try_get("fsync")?;
    let _ = conn.close().await;
    Ok(())
}

// ---- the ceiling -----------------------------------------------------------------------

/// The table the ceiling inserts into: a unique key like an address claim's, and a row of
/// similar width.
pub(crate) const CEILING_TABLE: &str = "CREATE TABLE ceiling (
    ip          BYTEA PRIMARY KEY,
    owner_uid   TEXT NOT NULL,
    created_at  BIGINT NOT NULL
)";
/// One autocommit statement per operation; sqlx prepares it once per connection and
/// reuses the prepared statement afterwards.
pub(crate) const CEILING_INSERT: &str =
    "INSERT INTO ceiling (ip, owner_uid, created_at) VALUES ($1, $2, $3)";

#[derive(Debug, Clone, Serialize)]
pub struct CeilingResult {
    pub clients: usize,
    pub tps: f64,
    pub ok: u64,
    pub errors: u64,
    pub elapsed_s: f64,
    pub stop: runner::Stop,
    pub latency: Summary,
    pub cpu: CpuUse,
    pub pg: PgActivity,
}

struct InsertOp {
    conn: PgConnection,
    /// Keeps warm-up keys apart from the measured ones.
    key_base: u64,
}

impl Op for InsertOp {
    async fn call(&mut self, seq: u64) -> Result<(), String> {
        let key = (self.key_base + seq).to_be_bytes();
        sqlx::query(CEILING_INSERT)
            .bind(key.as_slice())
            .bind(format!("bench-{seq}"))
            .bind(seq as i64)
            .execute(&mut self.conn)
            .await
            .map(drop)
            .map_err(|e| e.to_string())
    }
}

/// Raw single-row INSERT tps with `clients` connections, in a fresh database of its own.
pub async fn ceiling(
    admin_url: &str,
    clients: usize,
    warmup: Limits,
    measure: Limits,
) -> anyhow::Result<CeilingResult> {
    let db = BenchDb::create(admin_url).await?;
    let mut setup = connect(&db.url).await?;
    setup.execute(CEILING_TABLE).await?;
    let _ = setup.close().await;
    let mut ops = Vec::with_capacity(clients);
    for _ in 0..clients {
        ops.push(InsertOp {
            conn: connect(&db.url).await?,
            key_base: 1 << 40,
        });
    }
    let warm = runner::run(ops, warmup, false).await;
    let mut ops = warm.ops;
    for op in &mut ops {
        op.key_base = 0;
    }
    let sampler = sample_activity(&db.url).await?;
    let before = cpu::sample(None);
    let outcome: Outcome<InsertOp> = runner::run(ops, measure, false).await;
    let after = cpu::sample(None);
    let pg = sampler.finish().await?;
    let result = CeilingResult {
        clients,
        tps: outcome.ops_per_sec(),
        ok: outcome.ok,
        errors: outcome.errors + warm.errors,
        elapsed_s: outcome.elapsed.as_secs_f64(),
        stop: outcome.stop,
        latency: outcome.latencies.summary(),
        cpu: cpu::between(&before, &after),
        pg,
    };
    if let Some(e) = outcome.first_error.or(warm.first_error) {
        eprintln!(
            "pg-ceiling c={clients}: {} errors, first: {e}",
            result.errors
        );
    }
    // Closing politely is not part of the measurement; a failure here changes nothing.
    for op in outcome.ops {
        let _ = op.conn.close().await;
    }
    drop(db);
    Ok(result)
}

// ---- what Postgres waits on ----------------------------------------------------------------

/// How often the wait sampler looks at `pg_stat_activity`: often enough for a few thousand
/// samples per phase, rarely enough to cost the server next to nothing.
const WAIT_SAMPLE_INTERVAL: Duration = Duration::from_millis(10);

/// Counts of what the client backends of one database were doing, sampled from
/// `pg_stat_activity`, plus the database's counters over the same span.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PgActivity {
    pub samples: u64,
    /// `state/wait_event_type:wait_event` → backend-samples, most frequent first.
    pub waits: Vec<(String, u64)>,
    pub xact_commit: i64,
    pub xact_rollback: i64,
    pub tup_inserted: i64,
    pub tup_fetched: i64,
    pub tup_returned: i64,
    pub blks_hit: i64,
}

impl PgActivity {
    /// One line per wait kind, as a share of backend-samples, and the counters per `ops`.
    pub fn print(&self, ops: u64) {
        let total: u64 = self.waits.iter().map(|(_, n)| n).sum();
        if total > 0 {
            let top: Vec<String> = self
                .waits
                .iter()
                .take(8)
                .map(|(what, n)| format!("{what} {:.0}%", *n as f64 * 100.0 / total as f64))
                .collect();
            let active: u64 = self
                .waits
                .iter()
                .filter(|(what, _)| what.starts_with("active/"))
                .map(|(_, n)| n)
                .sum();
            let per_sample = |n: u64| n as f64 / self.samples.max(1) as f64;
            println!(
                "        pg backends: {:.1} connected, {:.2} active on average ({} samples); {}",
                per_sample(total),
                per_sample(active),
                self.samples,
                top.join(", ")
            );
        }
        if ops > 0 {
            let per = |v: i64| v as f64 / ops as f64;
            println!(
                "        pg per op: {:.2} commits, {:.2} rollbacks, {:.1} rows inserted, {:.1} fetched, {:.1} returned, {:.1} buffer hits",
                per(self.xact_commit),
                per(self.xact_rollback),
                per(self.tup_inserted),
                per(self.tup_fetched),
                per(self.tup_returned),
                per(self.blks_hit)
            );
        }
    }
}

pub struct ActivitySampler {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<anyhow::Result<PgActivity>>,
}

/// Starts sampling the client backends connected to `database_url`'s database.
pub async fn sample_activity(database_url: &str) -> anyhow::Result<ActivitySampler> {
    let mut conn = connect(database_url).await?;
    let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
    let start = database_counters(&mut conn).await?;
    let task = tokio::spawn(async move {
        let mut counts: std::collections::HashMap<String, u64> = Default::default();
        let mut samples = 0;
        let mut tick = tokio::time::interval(WAIT_SAMPLE_INTERVAL);
        loop {
            tokio::select! {
                _ = &mut stopped => break,
                _ = tick.tick() => {}
            }
            let rows = sqlx::query(
                "SELECT COALESCE(state, '') AS state,
                        COALESCE(wait_event_type, 'CPU') AS kind,
                        COALESCE(wait_event, '') AS event,
                        CASE WHEN state = 'active' THEN left(regexp_replace(query, '[[:space:]]+', ' ', 'g'), 32) ELSE '' END AS query
                   FROM pg_stat_activity
                  WHERE datname = current_database() AND backend_type = 'client backend'
                    AND pid <> pg_backend_pid()",
            )
            .fetch_all(&mut conn)
            .await?;
            samples += 1;
            for row in rows {
                let state: String = row.try_get("state")?;
                let kind: String = row.try_get("kind")?;
                let event: String = row.try_get("event")?;
                let query: String = row.try_get("query")?;
                *counts
                    .entry(format!("{state}/{kind}:{event} {query}"))
                    .or_default() += 1;
            }
        }
        let end = database_counters(&mut conn).await?;
        let _ = conn.close().await;
        let mut waits: Vec<(String, u64)> = counts.into_iter().collect();
        waits.sort_by_key(|w| std::cmp::Reverse(w.1));
        Ok(PgActivity {
            samples,
            waits,
            xact_commit: end[0] - start[0],
            xact_rollback: end[1] - start[1],
            tup_inserted: end[2] - start[2],
            tup_fetched: end[3] - start[3],
            tup_returned: end[4] - start[4],
            blks_hit: end[5] - start[5],
        })
    });
    Ok(ActivitySampler { stop, task })
}

impl ActivitySampler {
    pub async fn finish(self) -> anyhow::Result<PgActivity> {
        let _ = self.stop.send(());
        self.task.await?
    }
}

/// This database's cumulative counters. Statistics are flushed by backends at the end of
/// transactions (at most once a second), so short spans undercount a little.
async fn database_counters(conn: &mut PgConnection) -> anyhow::Result<[i64; 6]> {
    sqlx::query("SELECT pg_stat_clear_snapshot()")
        .execute(&mut *conn)
        .await?;
    let row = sqlx::query(
        "SELECT xact_commit, xact_rollback, tup_inserted, tup_fetched, tup_returned, blks_hit
           FROM pg_stat_database WHERE datname = current_database()",
    )
    .fetch_one(&mut *conn)
    .await?;
    Ok([
        row.try_get("xact_commit")?,
        row.try_get("xact_rollback")?,
        row.try_get("tup_inserted")?,
        row.try_get("tup_fetched")?,
        row.try_get("tup_returned")?,
        row.try_get("blks_hit")?,
    ])
}
