//! The training sections of a task config: `optimizer:`, `schedular:`, `accelerator:` and xvlm's own
//! `xvlm:` switches.

use serde::{Deserialize, Serialize};

use super::de::{number, opt_number};

/// `optimizer:`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OptimizerConfig {
    /// Always `adamW` in the official configs.
    pub opt: String,
    /// Base learning rate.
    #[serde(deserialize_with = "number")]
    pub lr: f64,
    /// Decoupled weight decay.
    #[serde(deserialize_with = "number")]
    pub weight_decay: f64,
    /// Learning-rate multiplier of the freshly initialised parameters.
    #[serde(default, deserialize_with = "opt_number")]
    pub lr_mult: Option<f64>,
}

/// `schedular:` (sic, the official key).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SchedulerConfig {
    /// Always `linear`.
    pub sched: String,
    /// Base learning rate.
    #[serde(deserialize_with = "number")]
    pub lr: f64,
    /// Epochs.
    #[serde(deserialize_with = "number")]
    pub epochs: f64,
    /// An integer is absolute; a float in [0, 1) a fraction of the total steps.
    #[serde(deserialize_with = "number")]
    pub num_warmup_steps: f64,
    /// Total steps when given (else epochs x steps per epoch).
    #[serde(default, deserialize_with = "opt_number")]
    pub num_training_steps: Option<f64>,
}

/// `accelerator:` (upper-case official keys).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[allow(non_snake_case)]
pub struct AcceleratorConfig {
    /// Unused by the official code.
    #[serde(default)]
    pub SYNCBN: bool,
    /// apex level: O0 (fp32), O1 (autocast), O2.
    #[serde(default = "default_opt_level")]
    pub FP16_OPT_LEVEL: String,
    /// `dynamic` or a number.
    #[serde(default)]
    pub FP16_LOSS_SCALE: Option<serde_yaml::Value>,
    /// Seed the accelerator re-seeds with.
    #[serde(default)]
    pub RNG_SEED: Option<u64>,
    /// Gradient accumulation (1 in every official config).
    #[serde(default = "default_accumulate")]
    pub GRAD_ACCUMULATE_STEPS: usize,
    /// Max global grad norm.
    #[serde(default, deserialize_with = "opt_number")]
    pub CLIP_GRAD_NORM: Option<f64>,
}

/// `xvlm:` — switches that are not in the official configs (every default is the official behaviour).
/// A job sets them through `overrides: {xvlm: {...}}`, e.g. for the data-parallel check with
/// per-sample losses only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct XvlmOptions {
    /// Pre-training computes and back-propagates the ITC loss (its ranks exchange features).
    #[serde(default = "yes")]
    pub itc: bool,
    /// Pre-training computes and back-propagates the ITM loss (its negatives depend on the batch).
    #[serde(default = "yes")]
    pub itm: bool,
    /// Train-mode forward (dropout, drop-path); off makes a step a pure function of weights and data.
    #[serde(default = "yes")]
    pub dropout: bool,
}

impl Default for XvlmOptions {
    fn default() -> Self {
        XvlmOptions {
            itc: true,
            itm: true,
            dropout: true,
        }
    }
}

fn yes() -> bool {
    true
}

fn default_opt_level() -> String {
    "O0".into()
}
fn default_accumulate() -> usize {
    1
}
