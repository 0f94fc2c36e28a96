//! The optimizer engine every task trains through: gradients of one or more micro-batches accumulated
//! (their mean), the apex-style loss scale, the cross-rank average, unscaling, optional clipping, the
//! official AdamW over the four param groups, and the linear schedule. A task supplies the forward and
//! its loss; which parameters get `lr × lr_mult` is the task model's `init_params` rule.
//!
//! One update is `backward` once per micro-batch, then `update`; `advance_schedule` ends a scheduler
//! step (pre-training: once per iteration, after its last update; fine-tuning: after every update).

use std::collections::HashMap;

use tch::Tensor;

use crate::collective::Collective;
use crate::config::OptimizerConfig;
use crate::optim::{
    AdamW, DynamicLossScaler, GradAccumulator, Gradients, LinearSchedule, NamedParam, OptimError,
    Scheduler, DEFAULT_BUCKET_ELEMENTS,
};

/// How updates are made, beyond the optimizer config.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EngineSettings {
    /// `CLIP_GRAD_NORM`: max global gradient norm (none: no clipping, the norm is still reported).
    pub clip_grad_norm: Option<f64>,
    /// Elements per gradient all-reduce bucket.
    pub bucket_elements: usize,
    /// fp16 autocast forward with dynamic loss scaling (apex O1); only meaningful on CUDA.
    pub mixed_precision: bool,
}

impl Default for EngineSettings {
    /// The fine-tuning loops: no clipping, fp32.
    fn default() -> Self {
        Self {
            clip_grad_norm: None,
            bucket_elements: DEFAULT_BUCKET_ELEMENTS,
            mixed_precision: false,
        }
    }
}

/// What one update did.
#[derive(Debug, Clone, PartialEq)]
pub struct UpdateLog {
    /// The lr of each param group the update used.
    pub lrs: Vec<f64>,
    /// Total gradient norm before clipping (after cross-rank averaging and loss unscaling).
    pub grad_norm: f64,
    /// The update was skipped: a gradient overflowed under mixed precision (the scale was halved).
    pub skipped: bool,
    /// Micro-batches whose mean gradient made the update.
    pub micro_batches: usize,
}

/// AdamW, its schedule, the loss scaler and the gradients pending for the next update.
pub struct OptimizerEngine {
    optimizer: AdamW,
    scheduler: Scheduler,
    settings: EngineSettings,
    scaler: Option<DynamicLossScaler>,
    pending: GradAccumulator,
}

impl OptimizerEngine {
    /// An engine over `params` with the official groups (`is_init_param(name)`: the task model's
    /// `init_params`, trained at `lr × lr_mult`), at scheduler step 0.
    pub fn new(
        params: Vec<NamedParam>,
        optimizer: &OptimizerConfig,
        is_init_param: impl Fn(&str) -> bool,
        schedule: LinearSchedule,
        settings: EngineSettings,
    ) -> Result<Self, OptimError> {
        let mut optimizer = AdamW::new(params, optimizer, is_init_param)?;
        let scheduler = Scheduler::new(schedule);
        optimizer.set_lr_factor(scheduler.factor());
        Ok(Self {
            optimizer,
            scheduler,
            scaler: settings.mixed_precision.then(DynamicLossScaler::official),
            settings,
            pending: GradAccumulator::new(),
        })
    }

    /// The settings in use.
    pub fn settings(&self) -> &EngineSettings {
        &self.settings
    }

    /// Replaces the settings; turning mixed precision on starts the official loss scaler (a running one
    /// is kept), turning it off drops it.
    pub fn set_settings(&mut self, settings: EngineSettings) {
        self.scaler = match (settings.mixed_precision, self.scaler.take()) {
            (true, Some(scaler)) => Some(scaler),
            (true, None) => Some(DynamicLossScaler::official()),
            (false, _) => None,
        };
        self.settings = settings;
    }

    /// The loss scaler (mixed precision only).
    pub fn scaler(&self) -> Option<&DynamicLossScaler> {
        self.scaler.as_ref()
    }

    /// Replaces the loss scaler's state (mixed precision only).
    pub fn set_scaler(&mut self, scaler: DynamicLossScaler) {
        if self.settings.mixed_precision {
            self.scaler = Some(scaler);
        }
    }

    /// The optimizer (parameters, groups, state).
    pub fn optimizer(&self) -> &AdamW {
        &self.optimizer
    }

    /// Scheduler steps taken so far.
    pub fn schedule_step(&self) -> u64 {
        self.scheduler.step
    }

    /// The schedule.
    pub fn schedule(&self) -> LinearSchedule {
        self.scheduler.schedule
    }

    /// The lr of each group for the next update.
    pub fn lrs(&self) -> Vec<f64> {
        self.optimizer.lrs()
    }

    /// Runs a forward under fp16 autocast when mixed precision is on.
    pub fn forward<T>(&self, f: impl FnOnce() -> T) -> T {
        if self.scaler.is_some() {
            crate::runtime::autocast_cuda(true, f)
        } else {
            f()
        }
    }

    /// Back-propagates one micro-batch's `loss` (scaled under mixed precision) and keeps its gradients
    /// for the next [`Self::update`]. `.grad` of the parameters is never written.
    pub fn backward(&mut self, loss: &Tensor) -> Result<(), OptimError> {
        let scaled = match &self.scaler {
            Some(scaler) => scaler.scale_loss(loss)?,
            None => loss.shallow_clone(),
        };
        self.pending
            .add(Gradients::backward(&scaled, self.optimizer.params())?)
    }

    /// One optimizer update from the pending micro-batches: their mean gradient, averaged over the
    /// ranks, unscaled (an overflow skips the update and halves the scale), clipped when configured,
    /// applied by AdamW. Does not advance the schedule.
    pub fn update(&mut self, collective: &dyn Collective) -> Result<UpdateLog, OptimError> {
        self.update_observed(collective, &mut |_, _| {})
    }

    /// [`Self::update`], showing `observe` the final gradients (averaged, unscaled, before clipping)
    /// beside the parameters they belong to.
    pub fn update_observed(
        &mut self,
        collective: &dyn Collective,
        observe: &mut dyn FnMut(&[NamedParam], &Gradients),
    ) -> Result<UpdateLog, OptimError> {
        let micro_batches = self.pending.micro_batches();
        let mut grads = self.pending.take_mean()?.ok_or(OptimError::GradientCount {
            got: 0,
            expected: self.optimizer.params().len(),
        })?;
        grads.all_reduce_mean(
            collective,
            self.optimizer.params(),
            self.settings.bucket_elements,
        )?;
        // apex: unscale after the all-reduce; an overflow skips the update (the scheduler still runs).
        let mut skipped = false;
        if let Some(scaler) = &mut self.scaler {
            skipped = !scaler.unscale(&mut grads)?;
            scaler.update(skipped);
        }
        observe(self.optimizer.params(), &grads);
        let (grad_norm, clip) = match self.settings.clip_grad_norm {
            Some(max) => {
                let (norm, coef) = grads.clip_coefficient(max)?;
                (norm, Some(coef))
            }
            None => (grads.total_norm()?.f_double_value(&[])?, None),
        };
        let lrs = self.optimizer.lrs();
        if !skipped {
            self.optimizer.step_scaled(&grads, clip)?;
        }
        Ok(UpdateLog {
            lrs,
            grad_norm,
            skipped,
            micro_batches,
        })
    }

    /// One scheduler step; returns every group's new lr.
    pub fn advance_schedule(&mut self) -> Vec<f64> {
        self.scheduler.advance();
        self.optimizer.set_lr_factor(self.scheduler.factor());
        self.optimizer.lrs()
    }

    /// Optimizer, scheduler and scaler state for a checkpoint:
    /// `optimizer.{param}.{exp_avg,exp_avg_sq,step}`, `scheduler.step` (int64 scalar), `scaler.*`.
    pub fn state_tensors(&self) -> Vec<(String, Tensor)> {
        let mut out: Vec<(String, Tensor)> = self
            .optimizer
            .state_tensors()
            .into_iter()
            .map(|(k, t)| (format!("optimizer.{k}"), t))
            .collect();
        out.push((
            "scheduler.step".into(),
            Tensor::from(self.scheduler.step as i64),
        ));
        if let Some(scaler) = &self.scaler {
            out.extend(scaler.state_tensors());
        }
        out
    }

    /// Restores what [`Self::state_tensors`] wrote (the model weights are restored separately).
    pub fn load_state_tensors(
        &mut self,
        tensors: &HashMap<String, Tensor>,
    ) -> Result<(), OptimError> {
        let bad = |reason: String| OptimError::BadState {
            name: "scheduler.step".into(),
            reason,
        };
        let step = tensors
            .get("scheduler.step")
            .ok_or_else(|| bad("missing from the training state".into()))?
            .f_int64_value(&[])?;
        let step = u64::try_from(step).map_err(|_| bad(format!("{step} is negative")))?;
        if let (Some(scaler), Some(scale), Some(unskipped)) = (
            &mut self.scaler,
            tensors.get("scaler.scale"),
            tensors.get("scaler.unskipped"),
        ) {
            scaler.load_state(scale, unskipped)?;
        }
        let optimizer: HashMap<String, Tensor> = tensors
            .iter()
            .filter_map(|(k, t)| {
                Some((k.strip_prefix("optimizer.")?.to_string(), t.shallow_clone()))
            })
            .collect();
        self.optimizer.load_state_tensors(&optimizer)?;
        self.scheduler.step = step;
        self.optimizer.set_lr_factor(self.scheduler.factor());
        Ok(())
    }
}
