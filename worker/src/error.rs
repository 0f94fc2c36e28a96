//! The worker's one error type.

use std::path::{Path, PathBuf};

use xvlm_model::collective::CollectiveError;

use crate::trainer::task::TaskError;

/// What can go wrong in the worker library.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The trainer's assignment is unreadable.
    #[error("assignment {0}")]
    Assignment(String),
    /// A collective failed.
    #[error(transparent)]
    Collective(#[from] CollectiveError),
    /// The task failed.
    #[error(transparent)]
    Task(#[from] TaskError),
    /// Talking to the coordinator failed.
    #[error("coordinator {0}")]
    Coordinator(String),
    /// A checkpoint could not be saved or resumed.
    #[error(transparent)]
    Checkpoint(#[from] crate::checkpoint::CheckpointError),
    /// The trainer was asked to leave and committed the checkpoint of `step` first.
    #[error("preempted: checkpoint step-{step} committed; leaving")]
    Preempted {
        /// The committed step.
        step: u64,
    },
    /// The metrics listener (`--http-listen`) failed.
    #[error("metrics listener {addr}: {reason}")]
    Metrics {
        /// Its address.
        addr: String,
        /// What failed.
        reason: String,
    },
    /// A trainer process could not be started.
    #[error("cannot start trainer: {0}")]
    Spawn(String),
}

impl WorkerError {
    /// An I/O error on `path`.
    pub fn io(path: &Path, source: std::io::Error) -> Self {
        WorkerError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}
