//! The trainer: pre-training iterations given a [`Collective`](crate::collective::Collective); it knows
//! nothing of gRPC (the worker feeds it batches and persists its state).
//!
//! `xvlm parity` dispatches kind `pretrain_train_steps` to [`run_train_steps_case`]`(case_dir, weights)`
//! (wired in `parity.rs`, errors through `ParityError::Train`); it returns one
//! [`Comparison`](crate::parity::Comparison) per expected tensor (per-step losses, lrs, grad norms), per
//! official param group and per final weight.
//!
//! Differences from the official loop (for the README's list): the region-step coin is derived from
//! (seed, iteration) instead of Python's `random`; gradients of parameters unused in a step are `None`
//! (torch >= 2.0 `zero_grad`), so those parameters get no update; `GRAD_ACCUMULATE_STEPS` micro-batches
//! are averaged (the official code ignores the key); mixed precision is fp16 autocast with apex-O1-style
//! dynamic loss scaling, CUDA only (fp32 with a warning on CPU).

mod engine;
pub mod finetune;
mod pretrain;
mod replay;
pub mod seed;

pub use engine::{EngineSettings, OptimizerEngine, UpdateLog};
pub use pretrain::{
    mixed_precision_of, IterationLog, PretrainTrainer, StepKind, StepLog, TrainSettings,
};
pub use replay::{run_finetune_steps_case, run_train_steps_case};

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
