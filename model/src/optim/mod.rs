//! AdamW as the official code runs it (transformers 4.12.5), its four param groups, the linear
//! warm-up/decay schedule, gradient clipping, averaging and accumulation, and apex-style dynamic loss
//! scaling for fp16 mixed precision (XVLM-REFERENCE.md §4).
//!
//! Gradients are computed explicitly ([`Gradients::backward`]) instead of accumulating into `.grad`, so a
//! parameter that took no part in a forward has no gradient and gets no update, exactly as the official
//! loop behaves under torch >= 2.0 (`zero_grad` sets grads to `None`).

mod adamw;
mod grads;
mod groups;
mod kernel;
mod scaler;
mod schedule;

pub use adamw::{AdamW, AdamWHyper, ParamState};
pub use grads::{GradAccumulator, Gradients, DEFAULT_BUCKET_ELEMENTS};
pub use groups::{
    group_index, is_no_decay, is_pretrain_init_param, named_trainable_params, NamedParam,
    ParamGroup, NO_DECAY,
};
pub use scaler::DynamicLossScaler;
pub use schedule::{LinearSchedule, Scheduler};

use crate::collective::CollectiveError;

/// What can go wrong building or stepping the optimizer, or restoring its state.
#[derive(Debug, thiserror::Error)]
pub enum OptimError {
    /// The config names an optimizer other than `adamW`.
    #[error("optimizer.opt = {0:?} is not supported (only \"adamW\")")]
    UnknownOptimizer(String),
    /// The config names a schedule other than `linear`.
    #[error("schedular.sched = {0:?} is not supported (only \"linear\")")]
    UnknownSchedule(String),
    /// A warm-up that is neither a whole number of steps nor a fraction in [0, 1).
    #[error("schedular.num_warmup_steps = {0} must be an integer or a fraction in [0, 1)")]
    BadWarmup(f64),
    /// Neither `num_training_steps` nor `epochs` × steps per epoch is known.
    #[error("schedular: {0}")]
    BadSchedule(String),
    /// A gradient list does not line up with the optimizer's parameters.
    #[error("{got} gradients for {expected} parameters")]
    GradientCount {
        /// Gradients given.
        got: usize,
        /// Parameters the optimizer holds.
        expected: usize,
    },
    /// Restored optimizer state does not fit the parameter.
    #[error("optimizer state for {name}: {reason}")]
    BadState {
        /// Parameter name.
        name: String,
        /// What does not fit.
        reason: String,
    },
    /// Two parameters share a name.
    #[error("parameter {0} is listed twice")]
    DuplicateParam(String),
    /// Two parameters overlap in memory (each would be updated twice).
    #[error("parameters {first} and {second} share memory; list a shared tensor once")]
    SharedMemory {
        /// The parameter at the lower address.
        first: String,
        /// The one overlapping it.
        second: String,
    },
    /// A libtorch operation failed.
    #[error("torch: {0}")]
    Torch(#[from] tch::TchError),
    /// Gradient averaging across ranks failed.
    #[error(transparent)]
    Collective(#[from] CollectiveError),
}
