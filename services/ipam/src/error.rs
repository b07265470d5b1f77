//! The one mapping from domain errors to gRPC statuses, so every RPC answers the same
//! failure with the same code.

use herald_ipam_core::AllocError;
use herald_ipam_store::{CommitError, StoreError};
use herald_model::{FieldError, shorten};
use thiserror::Error;
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

/// Longest status message sent. Values a message quotes are already cut to 64 bytes
/// (see [`herald_model::shorten`]), so messages are far shorter; this is the bound for
/// the rest, so a status always fits in the 16 KiB of metadata that gRPC C-core clients
/// (grpcio and others) accept. Generous enough that the hint at the end of the longest
/// ordinary message ("release it first", "set force") is never cut off.
pub const MAX_MESSAGE_BYTES: usize = 1024;

#[derive(Debug, Error)]
pub enum IpamError {
    #[error(transparent)]
    Invalid(#[from] FieldError),
    #[error(transparent)]
    Alloc(#[from] AllocError),
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The owner holds addresses the request no longer matches (allocations never move,
    /// so the caller must release first), or the uid is held by another Service.
    #[error("{0}")]
    Mismatch(String),
    #[error("{0}")]
    NotFound(String),
    /// Every attempt lost a race with another replica; the caller may retry.
    #[error("{0}")]
    Contended(String),
}

impl From<CommitError> for IpamError {
    fn from(err: CommitError) -> Self {
        match err {
            CommitError::Store(e) => Self::Store(e),
            // The request's own key, and the Service in the way, as the index's check says.
            CommitError::PortInUse { ref key, .. } | CommitError::PolicyShared { ref key, .. } => {
                Self::Alloc(AllocError::SharingConflict {
                    key: key.clone(),
                    why: err.to_string(),
                })
            }
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
                StoreError::Stopping(_) => Code::Unavailable,
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
        let message = shorten(&err.to_string(), MAX_MESSAGE_BYTES).into_owned();
        match err.field_error() {
            // The field in machine-readable form beside the text (google.rpc.BadRequest).
            Some(field) => Status::with_error_details(
                code,
                message,
                ErrorDetails::with_bad_request_violation(&field.field, &field.reason),
            ),
            None => Status::new(code, message),
        }
    }
}

impl IpamError {
    /// The field a caller must fix, when the error is about one.
    fn field_error(&self) -> Option<&FieldError> {
        match self {
            Self::Invalid(field) | Self::Alloc(AllocError::Invalid(field)) => Some(field),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use tonic_types::StatusExt;

    use super::*;

    #[test]
    fn a_field_error_becomes_invalid_argument_with_a_bad_request_detail() {
        let err = IpamError::Invalid(FieldError::new(
            "service_labels[app]",
            "v".repeat(3 << 20),
            "must be at most 63 characters",
        ));
        let status = Status::from(err);
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(
            status.message().len() <= MAX_MESSAGE_BYTES,
            "{}",
            status.message()
        );
        let bad = status.get_details_bad_request().expect("BadRequest");
        assert_eq!(bad.field_violations.len(), 1);
        assert_eq!(bad.field_violations[0].field, "service_labels[app]");
        assert_eq!(
            bad.field_violations[0].description,
            "must be at most 63 characters"
        );
    }

    #[test]
    fn every_message_is_cut_to_the_limit() {
        let status = Status::from(IpamError::Mismatch("x".repeat(100_000)));
        assert_eq!(status.code(), Code::FailedPrecondition);
        assert!(status.message().len() <= MAX_MESSAGE_BYTES);
        assert!(
            status.message().ends_with("(100000 bytes)"),
            "{}",
            status.message()
        );
        assert!(status.details().is_empty());
    }
}
