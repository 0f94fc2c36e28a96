//! The trainer: pre-training iterations given a [`Collective`](crate::collective::Collective); it knows
//! nothing of gRPC (the worker feeds it batches and persists its state).
//!
//! For `xvlm parity` (owner of `parity.rs`): kind `pretrain_train_steps` is
//! [`run_train_steps_case`]`(case_dir, weights)`; it returns one [`Comparison`](crate::parity::Comparison)
//! per expected tensor (per-step losses, lrs, grad norms), per official param group and per final
//! weight. Map its [`TrainError`] into `ParityError` (e.g. a `#[error(transparent)] Train(#[from]
//! crate::train::TrainError)` variant).

mod pretrain;
mod replay;
pub mod seed;

pub use pretrain::{IterationLog, PretrainTrainer, StepKind, StepLog, TrainSettings};
pub use replay::run_train_steps_case;

use std::path::PathBuf;

use crate::config::ConfigError;
use crate::optim::OptimError;
use crate::xvlm::ModelError;

/// What can stop training or a training replay.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// The model failed to build or run.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// The optimizer or schedule failed.
    #[error(transparent)]
    Optim(#[from] OptimError),
    /// The task config could not be read.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The task config lacks what training needs.
    #[error("{0}")]
    Settings(String),
    /// Batches or restored state that do not fit the step.
    #[error("invalid training input: {0}")]
    Input(String),
    /// A parity case folder could not be used.
    #[error("parity case {path}: {reason}")]
    Case {
        /// The file or folder.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A libtorch operation failed.
    #[error("torch: {0}")]
    Torch(#[from] tch::TchError),
}
