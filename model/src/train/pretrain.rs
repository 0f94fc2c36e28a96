//! The pre-training iteration of `Pretrain.py:train` (XVLM-REFERENCE.md §2.1): an optional region-batch
//! optimizer step (no scheduler step), then the image-text-batch optimizer step and one scheduler step.

use std::collections::HashMap;

use tch::{nn::VarStore, Tensor};

use super::seed::{derive_seed, uniform, Purpose};
use super::TrainError;
use crate::collective::Collective;
use crate::config::{OptimizerConfig, TaskConfig};
use crate::loss::{MultinomialSampler, NegativeSampler};
use crate::optim::{
    is_pretrain_init_param, named_trainable_params, AdamW, DynamicLossScaler, GradAccumulator,
    Gradients, LinearSchedule, NamedParam, Scheduler, DEFAULT_BUCKET_ELEMENTS,
};
use crate::tasks::{PretrainBatch, PretrainModel};

/// How the loop runs, from the task config's `regions`, `accelerator` keys.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainSettings {
    /// `CLIP_GRAD_NORM`: max global gradient norm (none: no clipping, the norm is still logged).
    pub clip_grad_norm: Option<f64>,
    /// `regions.iter_perc`: probability of a region step per iteration (0 without region data).
    pub iter_perc: f64,
    /// Job seed every random draw derives from (`RNG_SEED`).
    pub seed: u64,
    /// Train-mode forward (dropout, drop-path). The parity fixtures ran with every rate at 0.
    pub dropout: bool,
    /// Elements per gradient all-reduce bucket.
    pub bucket_elements: usize,
    /// fp16 autocast forward with dynamic loss scaling (apex O1); only meaningful on CUDA.
    pub mixed_precision: bool,
    /// `GRAD_ACCUMULATE_STEPS`: micro-batches the caller passes per optimizer step (their gradients
    /// are averaged), e.g. to keep the global batch when the world shrinks.
    pub micro_batches: usize,
}

impl TrainSettings {
    /// The official pre-training settings of `task` (`RNG_SEED` defaults to 42 as in the configs;
    /// dropout on unless `xvlm.dropout: false`).
    pub fn from_task(task: &TaskConfig) -> Self {
        let acc = task.accelerator.as_ref();
        TrainSettings {
            clip_grad_norm: acc.and_then(|a| a.CLIP_GRAD_NORM),
            iter_perc: task.regions.as_ref().map_or(0.0, |r| r.iter_perc),
            seed: acc.and_then(|a| a.RNG_SEED).unwrap_or(42),
            dropout: task.xvlm.dropout,
            bucket_elements: DEFAULT_BUCKET_ELEMENTS,
            mixed_precision: false,
            micro_batches: acc.map_or(1, |a| a.GRAD_ACCUMULATE_STEPS.max(1)),
        }
    }
}

/// Which batch an optimizer step ran on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepKind {
    /// A region batch (`ret_bbox_loss=True`), no scheduler step.
    Region,
    /// An image-text batch, followed by the scheduler step.
    General,
}

/// What one optimizer step logs.
#[derive(Debug, Clone, PartialEq)]
pub struct StepLog {
    /// The training iteration (global step) it belongs to.
    pub iteration: u64,
    /// Region or image-text batch.
    pub kind: StepKind,
    /// ITC loss (mean over micro-batches).
    pub loss_itc: f64,
    /// ITM loss.
    pub loss_itm: f64,
    /// MLM loss.
    pub loss_mlm: f64,
    /// Box L1 loss (0 on image-text steps).
    pub loss_bbox: f64,
    /// Box GIoU loss (0 on image-text steps).
    pub loss_giou: f64,
    /// The back-propagated sum.
    pub loss_total: f64,
    /// The lr of each param group the update used.
    pub lrs: Vec<f64>,
    /// Total gradient norm before clipping (after cross-rank averaging and loss unscaling).
    pub grad_norm: f64,
    /// The update was skipped: a gradient overflowed under mixed precision (the scale was halved).
    pub skipped: bool,
}

/// What one iteration logs.
#[derive(Debug, Clone, PartialEq)]
pub struct IterationLog {
    /// The iteration index (scheduler step before it ran).
    pub iteration: u64,
    /// Its optimizer steps in order (region first when there is one).
    pub steps: Vec<StepLog>,
    /// Every group's lr after the scheduler step that ends the iteration.
    pub lrs_after: Vec<f64>,
}

/// Runs pre-training iterations on a [`PretrainModel`]: gradients averaged over the collective,
/// clipped, applied by the official AdamW; one scheduler step per iteration.
pub struct PretrainTrainer<'m> {
    model: &'m PretrainModel,
    optimizer: AdamW,
    scheduler: Scheduler,
    settings: TrainSettings,
    scaler: Option<DynamicLossScaler>,
}

impl<'m> PretrainTrainer<'m> {
    /// A trainer over `params` (the model's trainable variables) with the official groups (lr_mult on
    /// the §1.8 init_params), at scheduler step 0.
    pub fn new(
        model: &'m PretrainModel,
        params: Vec<NamedParam>,
        optimizer: &OptimizerConfig,
        schedule: LinearSchedule,
        settings: TrainSettings,
    ) -> Result<Self, TrainError> {
        let mut optimizer = AdamW::new(params, optimizer, is_pretrain_init_param)?;
        let scheduler = Scheduler::new(schedule);
        optimizer.set_lr_factor(scheduler.factor());
        let scaler = settings.mixed_precision.then(DynamicLossScaler::official);
        Ok(Self {
            model,
            optimizer,
            scheduler,
            settings,
            scaler,
        })
    }

    /// The trainer `Pretrain.main` builds from the task config for `world_size` ranks:
    /// `step_per_epoch = ceil(train_dataset_size / (images.batch_size × world_size))`.
    pub fn from_task(
        model: &'m PretrainModel,
        vs: &VarStore,
        task: &TaskConfig,
        world_size: usize,
    ) -> Result<Self, TrainError> {
        let missing = |key: &str| {
            TrainError::Settings(format!("{}: missing key `{key}`", task.source.display()))
        };
        let opt = task
            .optimizer
            .as_ref()
            .ok_or_else(|| missing("optimizer"))?;
        let sched = task
            .schedular
            .as_ref()
            .ok_or_else(|| missing("schedular"))?;
        let size = task
            .train_dataset_size
            .ok_or_else(|| missing("train_dataset_size"))?;
        let batch = task
            .images
            .as_ref()
            .ok_or_else(|| missing("images"))?
            .batch_size;
        let global = (batch * world_size.max(1)) as u64;
        if global == 0 {
            return Err(TrainError::Settings(format!(
                "{}: images.batch_size must be positive",
                task.source.display()
            )));
        }
        let schedule = LinearSchedule::from_config(sched, size.div_ceil(global))?;
        let mut settings = TrainSettings::from_task(task);
        if let Some(acc) = &task.accelerator {
            let level = acc.FP16_OPT_LEVEL.as_str();
            if level != "O0" && !vs.device().is_cuda() {
                tracing::warn!(level, "FP16_OPT_LEVEL on a CPU run: training in fp32");
            } else if level != "O0" {
                if level != "O1" {
                    tracing::warn!(
                        level,
                        "FP16_OPT_LEVEL: runs as O1 (fp16 autocast, fp32 weights)"
                    );
                }
                settings.mixed_precision = true;
            }
        }
        Self::new(model, named_trainable_params(vs), opt, schedule, settings)
    }

    /// The settings in use.
    pub fn settings(&self) -> &TrainSettings {
        &self.settings
    }

    /// Replaces the settings (e.g. `dropout: false` for a deterministic replay); turning mixed
    /// precision on starts the official loss scaler, turning it off drops it.
    pub fn with_settings(mut self, settings: TrainSettings) -> Self {
        self.scaler = match (settings.mixed_precision, self.scaler.take()) {
            (true, Some(scaler)) => Some(scaler),
            (true, None) => Some(DynamicLossScaler::official()),
            (false, _) => None,
        };
        self.settings = settings;
        self
    }

    /// The loss scaler (mixed precision only).
    pub fn scaler(&self) -> Option<&DynamicLossScaler> {
        self.scaler.as_ref()
    }

    /// Replaces the loss scaler's state (mixed precision only; e.g. a restored or a test scale).
    pub fn set_scaler(&mut self, scaler: DynamicLossScaler) {
        if self.settings.mixed_precision {
            self.scaler = Some(scaler);
        }
    }

    /// The optimizer (parameters, groups, state).
    pub fn optimizer(&self) -> &AdamW {
        &self.optimizer
    }

    /// The next iteration's index (= scheduler steps taken).
    pub fn iteration(&self) -> u64 {
        self.scheduler.step
    }

    /// Whether iteration [`Self::iteration`] runs a region step: a coin derived from (seed, iteration),
    /// identical on every rank and after a resume (quirk 1).
    pub fn region_step_due(&self) -> bool {
        uniform(self.settings.seed, self.iteration(), Purpose::RegionCoin) < self.settings.iter_perc
    }

    /// One optimizer step on `micro_batches` (gradient accumulation: their mean gradient), each a region
    /// batch for [`StepKind::Region`] or an image-text batch for [`StepKind::General`]. Negatives come
    /// from `sampler`. Does not advance the scheduler.
    pub fn step(
        &mut self,
        kind: StepKind,
        micro_batches: &[&PretrainBatch],
        collective: &dyn Collective,
        sampler: &mut dyn NegativeSampler,
    ) -> Result<StepLog, TrainError> {
        if micro_batches.is_empty() {
            return Err(TrainError::Input(
                "an optimizer step needs at least one batch".into(),
            ));
        }
        if let Some(bad) = micro_batches
            .iter()
            .find(|b| b.region.is_some() != (kind == StepKind::Region))
        {
            return Err(TrainError::Input(format!(
                "a {kind:?} step got a {} batch",
                if bad.region.is_some() {
                    "region"
                } else {
                    "image-text"
                }
            )));
        }
        let mut sums = [0.0f64; 6];
        let mut accumulator = GradAccumulator::new();
        let dropout = self.settings.dropout;
        for batch in micro_batches {
            let mut forward = || {
                self.model
                    .forward(batch, collective, &mut *sampler, dropout)
            };
            let out = if self.scaler.is_some() {
                crate::runtime::autocast_cuda(true, forward)?
            } else {
                forward()?
            };
            let value = |t: Option<&Tensor>| -> Result<f64, TrainError> {
                Ok(t.map(|t| t.f_double_value(&[])).transpose()?.unwrap_or(0.0))
            };
            let losses = [
                value(Some(&out.loss_itc))?,
                value(Some(&out.loss_itm))?,
                value(Some(&out.loss_mlm))?,
                value(out.loss_bbox.as_ref())?,
                value(out.loss_giou.as_ref())?,
                value(Some(&out.loss_total))?,
            ];
            for (s, l) in sums.iter_mut().zip(losses) {
                *s += l;
            }
            let to_backward = match &self.scaler {
                Some(scaler) => scaler.scale_loss(&out.loss_total)?,
                None => out.loss_total.shallow_clone(),
            };
            accumulator.add(Gradients::backward(&to_backward, self.optimizer.params())?)?;
        }
        let mut grads = accumulator
            .take_mean()?
            .ok_or_else(|| TrainError::Input("no gradients were computed".into()))?;
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
        let grad_norm = match self.settings.clip_grad_norm {
            Some(max) => grads.clip_norm(max)?,
            None => grads.total_norm()?.f_double_value(&[])?,
        };
        let lrs = self.optimizer.lrs();
        if !skipped {
            self.optimizer.step(&grads)?;
        }
        let n = micro_batches.len() as f64;
        let log = StepLog {
            iteration: self.iteration(),
            kind,
            loss_itc: sums[0] / n,
            loss_itm: sums[1] / n,
            loss_mlm: sums[2] / n,
            loss_bbox: sums[3] / n,
            loss_giou: sums[4] / n,
            loss_total: sums[5] / n,
            lrs,
            grad_norm,
            skipped,
        };
        tracing::info!(
            iteration = log.iteration,
            kind = ?log.kind,
            loss_itc = log.loss_itc,
            loss_itm = log.loss_itm,
            loss_mlm = log.loss_mlm,
            loss_bbox = log.loss_bbox,
            loss_giou = log.loss_giou,
            lr = ?log.lrs,
            grad_norm = log.grad_norm,
            skipped = log.skipped,
            "optimizer step"
        );
        Ok(log)
    }

    /// Ends the iteration: one scheduler step; returns every group's new lr.
    pub fn finish_iteration(&mut self) -> Vec<f64> {
        self.scheduler.advance();
        self.optimizer.set_lr_factor(self.scheduler.factor());
        self.optimizer.lrs()
    }

    /// One full iteration with derived randomness: the region step on `region` when given (call
    /// [`Self::region_step_due`] to decide whether to draw one), then the image-text step on `general`,
    /// then the scheduler step. ITM negatives and libtorch's generator are seeded from
    /// (seed, iteration, rank, purpose).
    pub fn run_iteration(
        &mut self,
        region: Option<&[&PretrainBatch]>,
        general: &[&PretrainBatch],
        collective: &dyn Collective,
    ) -> Result<IterationLog, TrainError> {
        let iteration = self.iteration();
        let rank = collective.rank();
        let seed = self.settings.seed;
        let mut steps = Vec::with_capacity(2);
        let plan = [
            (
                region,
                StepKind::Region,
                Purpose::ItmRegion,
                Purpose::TorchRegion,
            ),
            (
                Some(general),
                StepKind::General,
                Purpose::ItmGeneral,
                Purpose::TorchGeneral,
            ),
        ];
        for (batches, kind, itm, torch) in plan {
            let Some(batches) = batches else { continue };
            // libtorch's generator is process-global: touch it only when dropout draws from it, so a
            // deterministic run never races with other tasks of the process (in-process ranks, tests).
            if self.settings.dropout {
                tch::manual_seed(derive_seed(seed, iteration, rank, torch) as i64);
            }
            let mut sampler = MultinomialSampler::new(derive_seed(seed, iteration, rank, itm));
            steps.push(self.step(kind, batches, collective, &mut sampler)?);
        }
        let lrs_after = self.finish_iteration();
        Ok(IterationLog {
            iteration,
            steps,
            lrs_after,
        })
    }

    /// Optimizer and scheduler state for a checkpoint: `optimizer.{param}.{exp_avg,exp_avg_sq,step}` and
    /// `scheduler.step` (int64 scalar).
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
    ) -> Result<(), TrainError> {
        let step = tensors
            .get("scheduler.step")
            .ok_or_else(|| TrainError::Input("training state lacks scheduler.step".into()))?
            .f_int64_value(&[])?;
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
        self.scheduler.step = u64::try_from(step)
            .map_err(|_| TrainError::Input(format!("scheduler.step = {step} is negative")))?;
        self.optimizer.set_lr_factor(self.scheduler.factor());
        Ok(())
    }
}
