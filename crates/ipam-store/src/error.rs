use std::net::IpAddr;

use thiserror::Error;

#[derive(Debug, Error)]
pub enum StoreError {
    #[error("{0}")]
    Config(String),
    /// The store cannot take the call now (its writer stopped, it is shutting down); the
    /// same call may succeed when retried, on this replica or another.
    #[error("{0}")]
    Unavailable(String),
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
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("migrations: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
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
