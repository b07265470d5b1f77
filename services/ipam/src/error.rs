//! The one mapping from domain errors to gRPC statuses, so every RPC answers the same
//! failure with the same code.

use herald_ipam_core::AllocError;
use herald_ipam_store::{CommitError, StoreError};
use herald_model::FieldError;
use thiserror::Error;
use tonic::{Code, Status};

#[derive(Debug, Error)]
pub enum IpamError {
    #[error(transparent)]
    Invalid(#[from] FieldError),
    #[error(transparent)]
    Alloc(#[from] AllocError),
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The owner holds addresses the request no longer matches. Allocations never move,
    /// so the caller must release first.
    #[error("{0}")]
    Mismatch(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    TooLarge(String),
    /// Every attempt lost a race with another replica; the caller may retry.
    #[error("{0}")]
    Contended(String),
}

impl From<CommitError> for IpamError {
    fn from(err: CommitError) -> Self {
        match err {
            CommitError::Store(e) => Self::Store(e),
            CommitError::PortInUse { ip, port } => Self::Alloc(AllocError::SharingConflict {
                key: String::new(),
                why: format!("port {port} on {ip} is already used by a Service sharing this IP"),
            }),
            other => Self::Contended(other.to_string()),
        }
    }
}

impl IpamError {
    pub fn code(&self) -> Code {
        match self {
            Self::Invalid(_) => Code::InvalidArgument,
            Self::Alloc(e) => alloc_code(e),
            Self::Store(e) => match e {
                StoreError::Config(_) => Code::InvalidArgument,
                StoreError::PoolExists(_) => Code::AlreadyExists,
                StoreError::PoolNotFound(_) => Code::NotFound,
                StoreError::Overlap { .. } | StoreError::OverlapRace => Code::AlreadyExists,
                StoreError::PoolInUse { .. } => Code::FailedPrecondition,
                // The connection or the server failed, not the request: the caller may
                // retry (and every write is idempotent for its owner).
                e if e.is_unavailable() => Code::Unavailable,
                StoreError::Unavailable { .. } | StoreError::Interrupted { .. } => {
                    Code::Unavailable
                }
                StoreError::Corrupt(_)
                | StoreError::Migrate(_)
                | StoreError::EmbeddedFile { .. }
                | StoreError::Database(_) => Code::Internal,
            },
            Self::Mismatch(_) => Code::FailedPrecondition,
            Self::NotFound(_) => Code::NotFound,
            Self::TooLarge(_) => Code::InvalidArgument,
            Self::Contended(_) => Code::Aborted,
        }
    }
}

fn alloc_code(err: &AllocError) -> Code {
    match err {
        AllocError::Invalid(_) | AllocError::NotInRequestedPool { .. } => Code::InvalidArgument,
        AllocError::UnknownPool(_) => Code::NotFound,
        AllocError::Exhausted { .. } => Code::ResourceExhausted,
        AllocError::Taken { .. } => Code::AlreadyExists,
        AllocError::PoolDisabled(_)
        | AllocError::PoolDoesNotServe { .. }
        | AllocError::NoPoolMatches { .. }
        | AllocError::NotInAnyPool { .. }
        | AllocError::NotAssignable { .. }
        | AllocError::SharingConflict { .. } => Code::FailedPrecondition,
        AllocError::DualStackUnavailable(inner) => alloc_code(inner),
    }
}

impl From<IpamError> for Status {
    fn from(err: IpamError) -> Self {
        let code = err.code();
        if code == Code::Internal {
            tracing::error!(error = %err, "internal error");
        }
        Status::new(code, err.to_string())
    }
}
