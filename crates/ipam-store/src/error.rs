use std::net::IpAddr;

use thiserror::Error;

#[derive(Debug, Error)]
pub enum StoreError {
    #[error("{0}")]
    Config(String),
    /// The store cannot take the call now (its writer stopped, it is shutting down); the
    /// same call may succeed when retried, on this replica or another.
    #[error("{0}")]
    Stopping(String),
    #[error("pool {0:?} already exists")]
    PoolExists(String),
    #[error("pool {0:?} not found")]
    PoolNotFound(String),
    #[error("{field} {range} overlaps {other} of pool {pool:?}")]
    Overlap {
        field: String,
        range: String,
        pool: String,
        other: String,
    },
    /// Another replica created an overlapping pool at the same moment; by the time we
    /// looked again it was gone or we could not say which.
    #[error("pool addresses overlap a pool written concurrently; retry")]
    OverlapRace,
    #[error(
        "pool {pool:?} still holds allocations: {holders} (set force to release them, or dry_run to list them)"
    )]
    PoolInUse { pool: String, holders: String },
    #[error("stored data is not what this version expects: {0}")]
    Corrupt(String),
    /// The database cannot be reached or refused the connection, and nothing was written:
    /// the same request may be retried.
    #[error("database {target} unavailable: {cause}")]
    Unavailable { target: String, cause: String },
    /// The connection broke while a write was under way: the database may have committed
    /// it or not. Every write is idempotent for its owner, so the same request again is
    /// safe and answers with what is held.
    #[error(
        "lost database {target} during the write, which may have been written or not ({cause}); the same request again is safe"
    )]
    Interrupted { target: String, cause: String },
    /// The embedded database file cannot be opened or written. Retrying cannot help: the
    /// file system must change.
    #[error("cannot use the SQLite database {path}: {cause}")]
    EmbeddedFile { path: String, cause: String },
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("migrations: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
}

impl StoreError {
    /// Whether the database, rather than the request, failed: the connection is gone or
    /// the server cannot serve now. The caller may retry.
    pub fn is_unavailable(&self) -> bool {
        match self {
            Self::Stopping(_) | Self::Unavailable { .. } | Self::Interrupted { .. } => true,
            Self::Database(e) => is_connection_error(e),
            Self::Migrate(sqlx::migrate::MigrateError::Execute(e)) => is_connection_error(e),
            _ => false,
        }
    }

    /// Whether opening the store can never succeed with this configuration, however long
    /// it is retried: a URL that cannot be parsed or names no supported database, or an
    /// embedded file the process cannot create or write. A server that refuses, is
    /// missing the database or rejects the credentials is not permanent: those are fixed
    /// on the server, often by whoever starts it after herald-ipam.
    pub fn is_permanent(&self) -> bool {
        matches!(self, Self::Config(_) | Self::EmbeddedFile { .. })
    }
}

/// Whether `err` says the connection (or the server behind it) failed, rather than the
/// statement: I/O and TLS errors, no connection to be had, and the SQLSTATEs of a server
/// that is shutting down or dropped the connection (class 08 connection exception, 57P01
/// admin_shutdown, 57P02 crash_shutdown, 57P03 cannot_connect_now, 53300
/// too_many_connections).
pub fn is_connection_error(err: &sqlx::Error) -> bool {
    match err {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(db) => db.code().is_some_and(|code| {
            code.starts_with("08") || code.starts_with("57P") || code == "53300"
        }),
        _ => false,
    }
}

/// What went wrong with a connection, in words that say where to look: refused, name
/// resolution, TLS, authentication, a missing database.
pub(crate) fn connection_cause(err: &sqlx::Error) -> String {
    match err {
        sqlx::Error::Io(e) if e.to_string().contains("lookup") => {
            format!("cannot resolve the host name ({e})")
        }
        sqlx::Error::Io(e) => e.to_string(),
        sqlx::Error::Tls(e) => format!("TLS: {e}"),
        sqlx::Error::Database(db) => match db.code().as_deref() {
            Some("28P01" | "28000") => format!("authentication failed: {}", db.message()),
            Some(code) => format!("{} (SQLSTATE {code})", db.message()),
            None => db.message().to_string(),
        },
        sqlx::Error::PoolTimedOut => "no connection could be opened in time".to_string(),
        other => other.to_string(),
    }
}

/// Why a planned allocation could not be written.
#[derive(Debug, Error)]
pub enum CommitError {
    /// Another owner (through another replica) holds the address: plan again.
    #[error("{0} is already allocated")]
    AddressTaken(IpAddr),
    /// The pool changed since the plan was made: reload it and plan again.
    #[error("pool {0:?} changed while allocating")]
    PoolChanged(String),
    /// The owner already holds an address of that family (a concurrent call won).
    #[error("the owner already holds an allocation")]
    OwnerExists,
    /// Another Service sharing the address uses the port. `holder` describes it
    /// ("Service ns/name (uid u)"), or is empty when a concurrent writer took the port
    /// between the check and the write.
    #[error("port {port} on {ip} is already used by {}", holder_or_another(holder))]
    PortInUse {
        ip: IpAddr,
        port: String,
        key: String,
        holder: String,
    },
    /// An update would change the tag (traffic policy or endpoint selector) of an address
    /// that other Services share under the old one.
    #[error(
        "{ip} is shared by Services with a different traffic policy or endpoint selector ({holder}); the change would split them"
    )]
    PolicyShared {
        ip: IpAddr,
        key: String,
        holder: String,
    },
    /// The owner's allocation changed (released, or updated by another call) between
    /// reading it and updating it: read it again.
    #[error("the owner's allocation changed while updating it")]
    AllocationChanged,
    #[error(transparent)]
    Store(#[from] StoreError),
}

fn holder_or_another(holder: &str) -> &str {
    if holder.is_empty() {
        "another Service sharing this IP"
    } else {
        holder
    }
}

pub(crate) enum Violation<'a> {
    Unique(Option<&'a str>),
    ForeignKey(Option<&'a str>),
    Exclusion,
}

/// The constraint a database error reports, in terms common to Postgres and SQLite.
pub(crate) fn violation(err: &sqlx::Error) -> Option<Violation<'_>> {
    let db = err.as_database_error()?;
    let code = db.code();
    match code.as_deref() {
        // Postgres SQLSTATEs.
        Some("23505") => Some(Violation::Unique(db.constraint())),
        Some("23503") => Some(Violation::ForeignKey(db.constraint())),
        Some("23P01") => Some(Violation::Exclusion),
        // SQLite extended result codes: SQLITE_CONSTRAINT_PRIMARYKEY, _UNIQUE, _FOREIGNKEY.
        Some("1555") | Some("2067") => Some(Violation::Unique(None)),
        Some("787") => Some(Violation::ForeignKey(None)),
        _ => None,
    }
}
