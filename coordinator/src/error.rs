//! The coordinator's error type and its one mapping to gRPC status codes.

use std::path::PathBuf;

use crate::state::JobState;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A submitted job is not acceptable; `field` names the request field at fault.
    #[error("{field}: {detail}")]
    Invalid { field: &'static str, detail: String },
    #[error("job {0} does not exist")]
    NoSuchJob(String),
    #[error("deployment {0} does not exist")]
    NoSuchDeployment(String),
    #[error("a deployment named {0} exists already; undeploy it first or choose another name")]
    DeploymentExists(String),
    #[error("deployment {by} serves the model name {served:?} already; give --served-model-name another")]
    ServedNameTaken { served: String, by: String },
    /// A cancel of a job that ended or is assembling.
    #[error("job {job} is {state:?} and cannot be cancelled")]
    CannotCancel { job: String, state: JobState },
    #[error("state store: {0}")]
    Store(String),
    /// A chunk or payload failed its length or checksum check.
    #[error("data loss: {0}")]
    DataLoss(String),
    #[error("{path}: {cause}")]
    Io { path: PathBuf, cause: std::io::Error },
    #[error(transparent)]
    Model(#[from] awq_model::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Error {
        let path = path.into();
        move |cause| Error::Io { path, cause }
    }

    /// A write that failed for want of room (the disk is full, or a quota reached): a fault of the
    /// coordinator's machine, which clears when space is freed; the job waits, it does not fail.
    pub fn is_storage_full(&self) -> bool {
        let cause = match self {
            Error::Io { cause, .. } | Error::Model(awq_model::Error::Io { cause, .. }) => cause,
            _ => return false,
        };
        matches!(cause.kind(), std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded)
    }
}

impl From<Error> for tonic::Status {
    fn from(e: Error) -> tonic::Status {
        let msg = e.to_string();
        if e.is_storage_full() {
            // RESOURCE_EXHAUSTED is this one condition: a worker keeps its result and sends it again.
            return tonic::Status::resource_exhausted(format!("the coordinator's disk is full: {msg}"));
        }
        match e {
            Error::Model(m) if m.is_fault() => tonic::Status::internal(msg),
            Error::Invalid { .. } | Error::Model(_) => tonic::Status::invalid_argument(msg),
            Error::NoSuchJob(_) | Error::NoSuchDeployment(_) => tonic::Status::not_found(msg),
            Error::DeploymentExists(_) | Error::ServedNameTaken { .. } => tonic::Status::already_exists(msg),
            Error::CannotCancel { .. } => tonic::Status::failed_precondition(msg),
            Error::DataLoss(_) => tonic::Status::data_loss(msg),
            Error::Store(_) => tonic::Status::unavailable(msg),
            Error::Io { .. } => tonic::Status::internal(msg),
        }
    }
}
