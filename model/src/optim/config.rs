//! The official task YAML's `optimizer:` and `schedular:` (sic) sections.

use serde::{Deserialize, Serialize};

/// `optimizer: {opt: adamW, lr: 1e-4, weight_decay: 0.01, lr_mult: 2}` (optim.py:create_optimizer).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OptimizerConfig {
    /// Only `adamW` exists in the official code.
    pub opt: String,
    /// Base learning rate (groups 0 and 1).
    pub lr: f64,
    /// Decoupled weight decay of groups 0 and 2.
    pub weight_decay: f64,
    /// Learning-rate multiplier of the newly initialised parameters (groups 2 and 3).
    #[serde(default = "default_lr_mult")]
    pub lr_mult: f64,
}

fn default_lr_mult() -> f64 {
    // optim.py: getattr(args, 'lr_mult', 1)
    1.0
}

/// `num_warmup_steps`: an integer is a step count, a float in [0, 1) a fraction of the total.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Warmup {
    /// Absolute number of warm-up steps (pre-training: 2500).
    Steps(u64),
    /// Fraction of the training steps (fine-tuning: 0.1).
    Fraction(f64),
}

/// `schedular: {sched: linear, lr: 1e-4, epochs: 41, num_warmup_steps: 2500}` (scheduler.py).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SchedulerConfig {
    /// Only `linear` exists in the official code.
    pub sched: String,
    /// Informational; the optimizer's lr is the base the schedule scales.
    #[serde(default)]
    pub lr: Option<f64>,
    /// Epochs; total steps = epochs × steps per epoch unless `num_training_steps` is given.
    #[serde(default)]
    pub epochs: Option<u64>,
    /// Warm-up length.
    pub num_warmup_steps: Warmup,
    /// Explicit total, overriding `epochs` × steps per epoch.
    #[serde(default)]
    pub num_training_steps: Option<u64>,
}
