//! The pre-training iteration of `Pretrain.py:train` (XVLM-REFERENCE.md §2.1): an optional region-batch
//! optimizer step (no scheduler step), then the image-text-batch optimizer step and one scheduler step.

use std::collections::HashMap;

use tch::{nn::VarStore, Tensor};

use super::engine::{EngineSettings, OptimizerEngine, UpdateLog};
use super::seed::{derive_seed, uniform, Purpose};
use super::TrainError;
use crate::collective::Collective;
use crate::config::{OptimizerConfig, TaskConfig};
use crate::loss::{MultinomialSampler, NegativeSampler};
use crate::optim::{
    is_pretrain_init_param, named_trainable_params, AdamW, DynamicLossScaler, LinearSchedule,
    NamedParam, DEFAULT_BUCKET_ELEMENTS,
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

    /// What the optimizer engine needs of these settings.
    pub fn engine(&self) -> EngineSettings {
        EngineSettings {
            clip_grad_norm: self.clip_grad_norm,
            bucket_elements: self.bucket_elements,
            mixed_precision: self.mixed_precision,
        }
    }
}

/// Whether `task`'s `FP16_OPT_LEVEL` asks for mixed precision on `device`: O1 (and O2, run as O1) on
/// CUDA; on a CPU run the request is dropped with a warning.
pub fn mixed_precision_of(task: &TaskConfig, device: tch::Device) -> bool {
    let Some(acc) = &task.accelerator else {
        return false;
    };
    let level = acc.FP16_OPT_LEVEL.as_str();
    if level == "O0" {
        return false;
    }
    if !device.is_cuda() {
        tracing::warn!(level, "FP16_OPT_LEVEL on a CPU run: training in fp32");
        return false;
    }
    if level != "O1" {
        tracing::warn!(
            level,
            "FP16_OPT_LEVEL: runs as O1 (fp16 autocast, fp32 weights)"
        );
    }
    true
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

/// Runs pre-training iterations on a [`PretrainModel`] through the [`OptimizerEngine`]: gradients
/// averaged over the collective, clipped, applied by the official AdamW; one scheduler step per
/// iteration.
pub struct PretrainTrainer<'m> {
    model: &'m PretrainModel,
    engine: OptimizerEngine,
    settings: TrainSettings,
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
        let engine = OptimizerEngine::new(
            params,
            optimizer,
            is_pretrain_init_param,
            schedule,
            settings.engine(),
        )?;
        Ok(Self {
            model,
            engine,
            settings,
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
        settings.mixed_precision = mixed_precision_of(task, vs.device());
        Self::new(model, named_trainable_params(vs), opt, schedule, settings)
    }

    /// The settings in use.
    pub fn settings(&self) -> &TrainSettings {
        &self.settings
    }

    /// Replaces the settings (e.g. `dropout: false` for a deterministic replay); turning mixed
    /// precision on starts the official loss scaler, turning it off drops it.
    pub fn with_settings(mut self, settings: TrainSettings) -> Self {
        self.engine.set_settings(settings.engine());
        self.settings = settings;
        self
    }

    /// The loss scaler (mixed precision only).
    pub fn scaler(&self) -> Option<&DynamicLossScaler> {
        self.engine.scaler()
    }

    /// Replaces the loss scaler's state (mixed precision only; e.g. a restored or a test scale).
    pub fn set_scaler(&mut self, scaler: DynamicLossScaler) {
        self.engine.set_scaler(scaler);
    }

    /// The optimizer (parameters, groups, state).
    pub fn optimizer(&self) -> &AdamW {
        self.engine.optimizer()
    }

    /// The optimizer engine (state for checkpoints, the lr of each group).
    pub fn engine(&self) -> &OptimizerEngine {
        &self.engine
    }

    /// The next iteration's index (= scheduler steps taken).
    pub fn iteration(&self) -> u64 {
        self.engine.schedule_step()
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
        let dropout = self.settings.dropout;
        for batch in micro_batches {
            let out = self.engine.forward(|| {
                self.model
                    .forward(batch, collective, &mut *sampler, dropout)
            })?;
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
            self.engine.backward(&out.loss_total)?;
        }
        let UpdateLog {
            lrs,
            grad_norm,
            skipped,
            ..
        } = self.engine.update(collective)?;
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
        self.engine.advance_schedule()
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

    /// Optimizer, scheduler and scaler state for a checkpoint (see [`OptimizerEngine::state_tensors`]).
    pub fn state_tensors(&self) -> Vec<(String, Tensor)> {
        self.engine.state_tensors()
    }

    /// Restores what [`Self::state_tensors`] wrote (the model weights are restored separately).
    pub fn load_state_tensors(
        &mut self,
        tensors: &HashMap<String, Tensor>,
    ) -> Result<(), TrainError> {
        Ok(self.engine.load_state_tensors(tensors)?)
    }
}
