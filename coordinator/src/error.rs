//! The coordinator's one error type; each variant names the job, worker, field or file involved.

use xvlm_proto::spec::SpecError;

/// What can go wrong in the coordinator library.
#[derive(Debug, thiserror::Error)]
pub enum CoordError {
    /// The job spec is invalid.
    #[error(transparent)]
    Spec(#[from] SpecError),
    /// The job can never run on the registered workers.
    #[error("{field}: {message}")]
    Unsatisfiable {
        /// The job.yaml field to change.
        field: String,
        /// Why.
        message: String,
    },
    /// The request needs a running job.
    #[error("job {job} is {state}: checkpoints are taken only while it is RUNNING")]
    NotRunning {
        /// The job.
        job: String,
        /// Its state.
        state: String,
    },
    /// No job with this id.
    #[error("no job {0:?}")]
    UnknownJob(String),
    /// No registered worker with this name.
    #[error("no registered worker {0:?}")]
    UnknownWorker(String),
    /// The peer speaks another protocol version.
    #[error("protocol version {theirs} is not supported (this coordinator speaks {ours})")]
    Protocol {
        /// Theirs.
        theirs: u32,
        /// Ours.
        ours: u32,
    },
    /// The job store failed.
    #[error("job store {path}: {reason}")]
    Store {
        /// Store location.
        path: String,
        /// What failed.
        reason: String,
    },
    /// The gRPC server failed.
    #[error("gRPC server: {0}")]
    Server(String),
    /// A checkpoint commit could not be written.
    #[error("committing checkpoint step-{step} to {output}: {reason}")]
    Commit {
        /// The job output URL.
        output: String,
        /// The step.
        step: u64,
        /// What failed.
        reason: String,
    },
    /// Listing data shards failed.
    #[error("data shards {url}: {reason}")]
    Shards {
        /// The URL being listed.
        url: String,
        /// What failed.
        reason: String,
    },
    /// Trainer logs could not be read or written.
    #[error("trainer logs {path}: {reason}")]
    Logs {
        /// The file or directory.
        path: String,
        /// What failed.
        reason: String,
    },
    /// The TLS files could not be read or used.
    #[error("TLS: {0}")]
    Tls(String),
    /// A non-loopback address would be served without TLS and tokens.
    #[error(
        "refusing to listen on {addr} without {missing}: set them up (README: Security) or pass \
         --insecure on a network you trust"
    )]
    Insecure {
        /// The address.
        addr: std::net::SocketAddr,
        /// What is missing, in words.
        missing: String,
    },
}

impl From<CoordError> for tonic::Status {
    fn from(e: CoordError) -> Self {
        let msg = e.to_string();
        match e {
            CoordError::Spec(_) | CoordError::Unsatisfiable { .. } | CoordError::Shards { .. } => {
                tonic::Status::invalid_argument(msg)
            }
            CoordError::UnknownJob(_) | CoordError::UnknownWorker(_) => {
                tonic::Status::not_found(msg)
            }
            CoordError::Protocol { .. } | CoordError::NotRunning { .. } => {
                tonic::Status::failed_precondition(msg)
            }
            CoordError::Store { .. }
            | CoordError::Server(_)
            | CoordError::Commit { .. }
            | CoordError::Logs { .. }
            | CoordError::Tls(_)
            | CoordError::Insecure { .. } => tonic::Status::internal(msg),
        }
    }
}
