//! Fine-tuning steps as every official fine-tune loop runs them (`Retrieval.train`, `VQA.train`, ...):
//! forward, the sum of the task's losses back-propagated, one AdamW update through the
//! [`OptimizerEngine`] (no clipping, fp32), then one scheduler step after every update.
//!
//! A task plugs in by implementing [`FinetuneModel`] for its model (its batch type, loss names, the
//! `init_params` that get `lr × lr_mult`); the step, the schedule and the derived randomness are shared.

mod bbox_pretrain;
mod grounding_bbox;
mod nlvr;
mod nlvr_pretrain;
mod retrieval;
mod vqa;

use tch::Tensor;

use super::engine::{EngineSettings, OptimizerEngine, UpdateLog};
use super::seed::{derive_seed, Purpose};
use super::TrainError;
use crate::collective::Collective;
use crate::config::TaskConfig;
use crate::loss::{MultinomialSampler, NegativeSampler};
use crate::optim::{Gradients, LinearSchedule, NamedParam};
use crate::xvlm::ModelError;

/// What a task's training forward returns: its losses in [`FinetuneModel::LOSS_NAMES`] order (the
/// back-propagated loss is their sum) and named intermediates a parity replay compares.
pub struct TaskForward {
    /// One scalar per loss name.
    pub losses: Vec<Tensor>,
    /// Detached intermediates under the names the parity cases use (`image_feat`, `temp`, ...).
    pub debug: Vec<(&'static str, Tensor)>,
}

/// A fine-tuning task model: what the shared step needs to train it.
pub trait FinetuneModel {
    /// One (micro-)batch of model inputs.
    type Batch;
    /// Names of the losses [`FinetuneModel::forward_train`] returns, in order (`total` is added).
    const LOSS_NAMES: &'static [&'static str];
    /// Whether parameter `name` is in the official task model's `init_params` (trained at
    /// `lr × lr_mult`; DESIGN fix 8: at every world size).
    fn is_init_param(&self, name: &str) -> bool;
    /// The training forward on `batch`: ITM negatives from `sampler`, dropout when `train`.
    fn forward_train(
        &self,
        batch: &Self::Batch,
        collective: &dyn Collective,
        sampler: &mut dyn NegativeSampler,
        train: bool,
    ) -> Result<TaskForward, ModelError>;
}

/// Sees the inside of a step (parity replays); every method defaults to doing nothing.
pub trait StepObserver {
    /// One micro-batch's forward.
    fn forward(&mut self, _forward: &TaskForward) {}
    /// The update's gradients (averaged over ranks, before the optimizer), beside their parameters.
    fn gradients(&mut self, _params: &[NamedParam], _grads: &Gradients) {}
}

/// Observes nothing.
pub struct NoObserver;

impl StepObserver for NoObserver {}

/// What one fine-tuning step logs.
#[derive(Debug, Clone, PartialEq)]
pub struct FinetuneStepLog {
    /// The step (scheduler steps before it ran).
    pub step: u64,
    /// Each loss (mean over micro-batches, this rank) and `total`, their sum.
    pub losses: Vec<(String, f64)>,
    /// What the update did.
    pub update: UpdateLog,
    /// Every group's lr after the scheduler step that ends the step.
    pub lrs_after: Vec<f64>,
}

/// The official fine-tune schedule: `step_per_epoch = ceil(train_dataset_size / (batch × world))`
/// (counting the tail `drop_last` never runs, as `Retrieval.main` does), total = epochs × that.
pub fn finetune_schedule(
    task: &TaskConfig,
    train_dataset_size: u64,
    batch_size: usize,
    world: usize,
) -> Result<LinearSchedule, TrainError> {
    let sched = task.schedular.as_ref().ok_or_else(|| {
        TrainError::Settings(format!(
            "{}: missing key `schedular`",
            task.source.display()
        ))
    })?;
    let global = (batch_size * world.max(1)) as u64;
    if global == 0 {
        return Err(TrainError::Settings(format!(
            "{}: batch_size_train must be positive",
            task.source.display()
        )));
    }
    Ok(LinearSchedule::from_config(
        sched,
        train_dataset_size.div_ceil(global),
    )?)
}

/// How one rank's micro-batches of a step stand for the reference world's batches.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepShape {
    /// Weight of each micro-batch loss (1 unless the world does not divide the reference world).
    pub loss_weight: f64,
    /// Forward-only repeats of the last micro-batch after the others, so that every rank makes the
    /// same collective calls.
    pub padding: usize,
}

impl Default for StepShape {
    fn default() -> Self {
        StepShape {
            loss_weight: 1.0,
            padding: 0,
        }
    }
}

/// Runs fine-tuning steps of one task model.
pub struct FinetuneTrainer<'m, M: FinetuneModel> {
    model: &'m M,
    engine: OptimizerEngine,
    seed: u64,
    dropout: bool,
}

impl<'m, M: FinetuneModel> FinetuneTrainer<'m, M> {
    /// A trainer over `params` with the official groups of `model`, `schedule`, at step 0; random draws
    /// derive from `seed`, dropout when `dropout`.
    pub fn new(
        model: &'m M,
        params: Vec<NamedParam>,
        task: &TaskConfig,
        schedule: LinearSchedule,
        seed: u64,
        dropout: bool,
    ) -> Result<Self, TrainError> {
        let optimizer = task.optimizer.as_ref().ok_or_else(|| {
            TrainError::Settings(format!(
                "{}: missing key `optimizer`",
                task.source.display()
            ))
        })?;
        let engine = OptimizerEngine::new(
            params,
            optimizer,
            |name| model.is_init_param(name),
            schedule,
            EngineSettings::default(),
        )?;
        Ok(Self {
            model,
            engine,
            seed,
            dropout,
        })
    }

    /// The optimizer engine (groups, state for checkpoints).
    pub fn engine(&self) -> &OptimizerEngine {
        &self.engine
    }

    /// The optimizer engine, mutably (restoring a checkpoint).
    pub fn engine_mut(&mut self) -> &mut OptimizerEngine {
        &mut self.engine
    }

    /// The next step's index (= scheduler steps taken).
    pub fn step_index(&self) -> u64 {
        self.engine.schedule_step()
    }

    /// One step on `micro_batches` (their mean gradient, each loss weighted and followed by forward-only
    /// repeats as `shape` says) with negatives from `sampler`; `observer` sees each micro-batch's
    /// forward and the update's gradients (a parity replay records them).
    pub fn step_with(
        &mut self,
        micro_batches: &[&M::Batch],
        shape: StepShape,
        collective: &dyn Collective,
        sampler: &mut dyn NegativeSampler,
        observer: &mut dyn StepObserver,
    ) -> Result<FinetuneStepLog, TrainError> {
        if micro_batches.is_empty() {
            return Err(TrainError::Input(
                "an optimizer step needs at least one batch".into(),
            ));
        }
        let step = self.step_index();
        let mut sums = vec![0.0f64; M::LOSS_NAMES.len() + 1];
        for batch in micro_batches {
            let out = self.engine.forward(|| {
                self.model
                    .forward_train(batch, collective, &mut *sampler, self.dropout)
            })?;
            if out.losses.len() != M::LOSS_NAMES.len() {
                return Err(TrainError::Input(format!(
                    "the task forward returned {} losses for {} names",
                    out.losses.len(),
                    M::LOSS_NAMES.len()
                )));
            }
            let total = out
                .losses
                .iter()
                .skip(1)
                .fold(out.losses[0].shallow_clone(), |acc, l| acc + l);
            for (sum, loss) in sums.iter_mut().zip(out.losses.iter().chain([&total])) {
                *sum += loss.f_double_value(&[])?;
            }
            observer.forward(&out);
            if shape.loss_weight == 1.0 {
                self.engine.backward(&total)?;
            } else {
                self.engine.backward(&(total * shape.loss_weight))?;
            }
        }
        // The repeats only keep the collectives of a forward (ITC's all-gather) in step with the
        // busiest rank: no gradient, no loss.
        let last = micro_batches[micro_batches.len() - 1];
        for _ in 0..shape.padding {
            tch::no_grad(|| {
                self.engine.forward(|| {
                    self.model
                        .forward_train(last, collective, &mut *sampler, self.dropout)
                })
            })?;
        }
        let update = self
            .engine
            .update_observed(collective, &mut |params, grads| {
                observer.gradients(params, grads)
            })?;
        let lrs_after = self.engine.advance_schedule();
        let n = micro_batches.len() as f64;
        let losses = M::LOSS_NAMES
            .iter()
            .copied()
            .chain(["total"])
            .zip(sums)
            .map(|(name, sum)| (name.to_string(), sum / n))
            .collect();
        Ok(FinetuneStepLog {
            step,
            losses,
            update,
            lrs_after,
        })
    }

    /// One step with derived randomness: ITM negatives and libtorch's generator seeded from
    /// (seed, step, rank, purpose), so ranks draw independently and a resume replays the draws.
    pub fn run_step(
        &mut self,
        micro_batches: &[&M::Batch],
        shape: StepShape,
        collective: &dyn Collective,
    ) -> Result<FinetuneStepLog, TrainError> {
        let (step, rank) = (self.step_index(), collective.rank());
        // libtorch's generator is process-global: touch it only when dropout draws from it.
        if self.dropout {
            tch::manual_seed(derive_seed(self.seed, step, rank, Purpose::TorchGeneral) as i64);
        }
        let mut sampler =
            MultinomialSampler::new(derive_seed(self.seed, step, rank, Purpose::ItmGeneral));
        self.step_with(
            micro_batches,
            shape,
            collective,
            &mut sampler,
            &mut NoObserver,
        )
    }
}
