use std::net::IpAddr;

use herald_model::{FieldError, IpFamily};
use thiserror::Error;

/// Why a request cannot be served. Each variant maps to one gRPC status code in the
/// service, and each message names what the user can change.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum AllocError {
    #[error(transparent)]
    Invalid(#[from] FieldError),
    #[error("requested_pool {0:?}: no such pool")]
    UnknownPool(String),
    #[error("pool {0:?} is disabled: it makes no new allocations")]
    PoolDisabled(String),
    #[error(
        "pool {pool:?} does not serve Service {namespace}/{name} (its namespaces or selectors exclude it)"
    )]
    PoolDoesNotServe {
        pool: String,
        namespace: String,
        name: String,
    },
    #[error(
        "no pool serves {family} for Service {namespace}/{name}: none matches its namespace, labels and pool request, or all matching ones are disabled or manual"
    )]
    NoPoolMatches {
        family: IpFamily,
        namespace: String,
        name: String,
    },
    #[error("{family} pools {pools} are exhausted{}", quarantine_note(*quarantined))]
    Exhausted {
        family: IpFamily,
        pools: String,
        /// Released addresses of those pools still resting in quarantine.
        quarantined: u64,
    },
    #[error("requested_ips: {ip} is not in any pool")]
    NotInAnyPool { ip: IpAddr },
    #[error("requested_ips: {ip} is in pool {pool:?}, but requested_pool is {requested:?}")]
    NotInRequestedPool {
        ip: IpAddr,
        pool: String,
        requested: String,
    },
    #[error("requested_ips: {ip} is not assignable in pool {pool:?}: {why}")]
    NotAssignable {
        ip: IpAddr,
        pool: String,
        why: &'static str,
    },
    #[error("requested_ips: {ip} is already allocated to another Service{holder}")]
    Taken { ip: IpAddr, holder: String },
    #[error("sharing_key {key:?}: {why}")]
    SharingConflict { key: String, why: String },
    #[error("ip_family_policy RequireDualStack: {0}")]
    DualStackUnavailable(Box<AllocError>),
}

fn quarantine_note(quarantined: u64) -> String {
    match quarantined {
        0 => String::new(),
        n => format!(" ({n} released addresses are in quarantine and return to use when it ends)"),
    }
}
