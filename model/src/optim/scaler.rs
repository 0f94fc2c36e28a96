//! Dynamic loss scaling for fp16 mixed precision, as apex amp's `LossScaler` (opt level O1,
//! `loss_scale='dynamic'`, `max_loss_scale=1024`, `min_loss_scale=1` in the official accelerator): the
//! loss is multiplied by the scale before backward; gradients are unscaled and checked; a step with an
//! inf/NaN gradient is skipped and halves the scale; 2000 clean steps in a row double it.

use tch::{Kind, Tensor};

use super::{Gradients, OptimError};

/// apex `LossScaler` state and settings.
#[derive(Debug, Clone, PartialEq)]
pub struct DynamicLossScaler {
    /// The current scale.
    pub scale: f64,
    /// Clean steps since the last change.
    pub unskipped: u64,
    /// Upper bound (official: 1024).
    pub max_scale: f64,
    /// Lower bound (official: 1).
    pub min_scale: f64,
    /// Clean steps before the scale doubles (apex: 2000).
    pub growth_interval: u64,
}

impl DynamicLossScaler {
    /// The official pre-training scaler: starts at min(2^16, 1024) = 1024, bounds [1, 1024].
    pub fn official() -> Self {
        Self::new(1024.0, 1.0)
    }

    /// A scaler with `[min_scale, max_scale]` bounds, starting at min(2^16, max_scale) as apex does.
    pub fn new(max_scale: f64, min_scale: f64) -> Self {
        Self {
            scale: max_scale.min(65536.0),
            unskipped: 0,
            max_scale,
            min_scale,
            growth_interval: 2000,
        }
    }

    /// `loss × scale`, the tensor to back-propagate.
    pub fn scale_loss(&self, loss: &Tensor) -> Result<Tensor, OptimError> {
        Ok(loss.f_to_kind(Kind::Float)?.f_mul_scalar(self.scale)?)
    }

    /// Divides every gradient by the scale; returns false when any gradient holds an inf or NaN.
    pub fn unscale(&self, grads: &mut Gradients) -> Result<bool, OptimError> {
        grads.scale(1.0 / self.scale)?;
        grads.all_finite()
    }

    /// Records a step's outcome: an overflow halves the scale (not below the minimum) and resets the
    /// count; `growth_interval` clean steps double it (not above the maximum).
    pub fn update(&mut self, overflow: bool) {
        if overflow {
            self.scale = (self.scale / 2.0).max(self.min_scale);
            self.unskipped = 0;
            return;
        }
        self.unskipped += 1;
        if self.unskipped == self.growth_interval {
            self.scale = (self.scale * 2.0).min(self.max_scale);
            self.unskipped = 0;
        }
    }

    /// `scaler.scale` (f64) and `scaler.unskipped` (int64) for a checkpoint.
    pub fn state_tensors(&self) -> Vec<(String, Tensor)> {
        vec![
            ("scaler.scale".into(), Tensor::from(self.scale)),
            (
                "scaler.unskipped".into(),
                Tensor::from(self.unskipped as i64),
            ),
        ]
    }

    /// Restores what [`Self::state_tensors`] wrote.
    pub fn load_state(&mut self, scale: &Tensor, unskipped: &Tensor) -> Result<(), OptimError> {
        self.scale = scale.f_double_value(&[])?;
        self.unskipped = u64::try_from(unskipped.f_int64_value(&[])?).unwrap_or(0);
        Ok(())
    }
}
