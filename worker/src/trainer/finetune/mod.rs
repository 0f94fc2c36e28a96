//! Fine-tuning on the task runner ([`Runner`](super::runner::Runner)): every fine-tuning task is a
//! [`FinetuneTask`] (its model, data, batches and evaluation), and every such task is a runner
//! [`Task`] with one map-style stream named `train` ([`StepBatches`]) and the engine driven by
//! [`FinetuneTrainer`] (the losses and parameter groups of the task model, [`FinetuneModel`]).
//!
//! Schedule: the official fine-tune loops step the scheduler after every update, with
//! `step_per_epoch = ceil(N / global batch)` although `drop_last` runs only `floor(N / global batch)`
//! steps per epoch; the job runs `epochs x floor(...)` steps (or `steps:` from the job).
//!
//! Randomness: the permutation of each epoch from (seed, epoch), every item's augmentation from (seed,
//! epoch, item), ITM negatives and dropout from (seed, step, rank). A checkpoint holds the weights, the
//! optimizer, the scheduler step and the stream cursor, so a resume at the same world size is exact;
//! the cursor counts global batches of the fixed global batch, so a resume at another world size
//! continues the same global sample stream.

pub mod grounding;
pub mod grounding_bbox;
pub mod grounding_bbox_pretrain;
mod init;
pub mod nlvr;
pub mod nlvr_pretrain;
pub mod retrieval;
mod stream;
pub mod vqa;

use std::collections::HashMap;
use std::sync::Arc;

use tch::nn::{self, VarStore};
use tch::{Device, Tensor};
use xvlm_model::checkpoint::StateDict;
use xvlm_model::collective::Collective;
use xvlm_model::config::{FinetuneKeys, TaskConfig};
use xvlm_model::data::finetune::loader::{load_batch, MapDataset};
use xvlm_model::data::finetune::sampler::TrainCursor;
use xvlm_model::optim::named_trainable_params;
use xvlm_model::train::finetune::{finetune_schedule, FinetuneModel, FinetuneTrainer, StepShape};
use xvlm_model::train::{mixed_precision_of, EngineSettings, OptimizerEngine, TrainSettings};
use xvlm_model::xvlm::ModelError;

use super::harness::setup::other;
pub use super::runner::Split;
use super::runner::{Engine, Prepared, Stepped, Task};
use super::task::{TaskContext, TaskError};
pub use stream::StepBatches;

/// What a fine-tuning task supplies to the runner.
pub trait FinetuneTask: Sized + 'static {
    /// The task model.
    type Model: FinetuneModel + 'static;
    /// The training set, read by index into the model's batches.
    type Data: MapDataset<Batch = <Self::Model as FinetuneModel>::Batch>;
    /// The task's name in job.yaml.
    const NAME: &'static str;
    /// The validation metric that picks the best checkpoint (higher is better).
    const BEST_METRIC: &'static str;

    /// Items per rank in a training step (the runner's `batch_size_train`). Default: the config's
    /// `batch_size_train`, else `batch_size`, as the official fine-tune scripts read them.
    fn train_batch_size(task: &TaskConfig) -> Result<usize, TaskError> {
        FinetuneKeys::from_task(task)
            .map(|k| k.batch_size_train)
            .map_err(other)
    }
    /// How the optimizer engine runs the updates on `device`. Default: as every official fine-tune
    /// loop, fp32 without clipping.
    fn engine_settings(_task: &TaskConfig, _device: Device) -> EngineSettings {
        EngineSettings::default()
    }
    /// Builds the model under `root` from the task config.
    fn build_model(root: &nn::Path, task: &TaskConfig) -> Result<Self::Model, ModelError>;
    /// Loads `init_checkpoint` into `vs` the way the official fine-tune loader does.
    fn load_init_checkpoint(
        model: &Self::Model,
        vs: &VarStore,
        task: &TaskConfig,
        url: &str,
    ) -> Result<(), TaskError>;
    /// The model's weights under their official names (tied tensors under every name).
    fn state_dict(model: &Self::Model, vs: &VarStore) -> StateDict;
    /// Reads the task's data: the evaluation splits (kept by the task) and the training set.
    fn load_data(task: &TaskConfig, ctx: &TaskContext<'_>)
        -> Result<(Self, Self::Data), TaskError>;
    /// A batch moved to `device`.
    fn to_device(
        batch: <Self::Model as FinetuneModel>::Batch,
        device: Device,
    ) -> <Self::Model as FinetuneModel>::Batch;
    /// Evaluates `split` on every rank (the same metrics everywhere); `None` when the config names no
    /// such split.
    fn evaluate(
        &self,
        model: &Self::Model,
        split: Split,
        comm: &dyn Collective,
    ) -> Result<Option<Vec<(String, f64)>>, TaskError>;
}

impl<M: FinetuneModel> Engine for FinetuneTrainer<'static, M> {
    fn optimizer_engine(&self) -> &OptimizerEngine {
        self.engine()
    }

    fn load_engine_state(&mut self, tensors: &HashMap<String, Tensor>) -> Result<(), TaskError> {
        self.engine_mut().load_state_tensors(tensors).map_err(other)
    }
}

/// Every fine-tuning task runs on the runner: its training set as the `train` stream, its steps
/// through [`FinetuneTrainer`].
impl<T: FinetuneTask> Task for T {
    const TASK: &'static str = <T as FinetuneTask>::NAME;
    const BEST_METRIC: Option<&'static str> = Some(<T as FinetuneTask>::BEST_METRIC);
    type Model = <T as FinetuneTask>::Model;
    type Trainer = FinetuneTrainer<'static, <T as FinetuneTask>::Model>;
    type Streams = StepBatches<<T as FinetuneTask>::Data>;

    fn build_model(
        root: &nn::Path,
        cfg: &TaskConfig,
    ) -> Result<<T as FinetuneTask>::Model, TaskError> {
        <T as FinetuneTask>::build_model(root, cfg).map_err(other)
    }

    fn load_init_checkpoint(
        model: &<T as FinetuneTask>::Model,
        vs: &VarStore,
        cfg: &TaskConfig,
        url: &str,
    ) -> Result<(), TaskError> {
        <T as FinetuneTask>::load_init_checkpoint(model, vs, cfg, url)
    }

    fn state_dict(model: &<T as FinetuneTask>::Model, vs: &VarStore) -> StateDict {
        <T as FinetuneTask>::state_dict(model, vs)
    }

    fn prepare(
        cfg: &TaskConfig,
        ctx: &TaskContext<'_>,
        model: &'static <T as FinetuneTask>::Model,
        vs: &VarStore,
    ) -> Result<Prepared<T>, TaskError> {
        let batch_size_train = T::train_batch_size(cfg)?;
        let seed = ctx.spec.seed;
        let (task, data) = T::load_data(cfg, ctx)?;
        let data = Arc::new(data);
        let plan = ctx.batch_plan(batch_size_train);
        let reference_world = plan.global / plan.local;
        let stream = StepBatches::start(
            data.clone(),
            plan,
            seed,
            loader_threads(),
            TrainCursor::default(),
        )?;
        let schedule = finetune_schedule(cfg, data.len() as u64, batch_size_train, reference_world)
            .map_err(other)?;
        let epochs = cfg.schedular.as_ref().map_or(0.0, |s| s.epochs);
        let steps_per_epoch = stream.steps_per_epoch();
        let mut trainer = FinetuneTrainer::new(
            model,
            named_trainable_params(vs),
            cfg,
            schedule,
            seed,
            cfg.xvlm.dropout,
        )
        .map_err(other)?;
        trainer
            .engine_mut()
            .set_settings(T::engine_settings(cfg, ctx.device));
        tracing::info!(
            task = <T as FinetuneTask>::NAME,
            rank = ctx.rank,
            items = data.len(),
            accumulation = stream.accumulation(),
            "fine-tune data ready"
        );
        Ok(Prepared {
            task,
            trainer,
            streams: stream,
            steps_per_epoch,
            planned_steps: (epochs.max(0.0) as u64) * steps_per_epoch,
        })
    }

    fn step(
        &mut self,
        trainer: &mut Self::Trainer,
        stream: &mut Self::Streams,
        device: Device,
        comm: &dyn Collective,
    ) -> Result<Stepped, TaskError> {
        let batches: Vec<_> = stream
            .next_step()?
            .into_iter()
            .map(|b| T::to_device(b, device))
            .collect();
        let refs: Vec<&_> = batches.iter().collect();
        let shape = StepShape {
            loss_weight: stream.loss_weight(),
            padding: stream.padding(),
        };
        let log = trainer.run_step(&refs, shape, comm).map_err(other)?;
        Ok(Stepped {
            losses: log.losses.into_iter().map(|(k, v)| (k, Some(v))).collect(),
            lr: log.update.lrs.first().copied().unwrap_or(0.0),
            lrs: log.update.lrs.clone(),
            grad_norm: Some(log.update.grad_norm),
            samples: stream.local() * batches.len(),
        })
    }

    fn evaluate(
        &self,
        model: &<T as FinetuneTask>::Model,
        split: Split,
        comm: &dyn Collective,
    ) -> Result<Option<Vec<(String, f64)>>, TaskError> {
        <T as FinetuneTask>::evaluate(self, model, split, comm)
    }
}

/// The engine settings of the official apex scripts (`Pretrain.py` and the `*_pretrain.py` domain
/// pre-trainings): the config's `CLIP_GRAD_NORM`, and `FP16_OPT_LEVEL` O1 as autocast with dynamic loss
/// scaling on CUDA (fp32 with a warning on a CPU run).
pub fn apex_engine_settings(task: &TaskConfig, device: Device) -> EngineSettings {
    let mut settings = TrainSettings::from_task(task);
    settings.mixed_precision = mixed_precision_of(task, device);
    settings.engine()
}

/// Loads the evaluation share `share` of `set` in whole batches of `batch` (test mode: epoch 0, so the
/// same items in the same batches at every world size) and hands each to `score` with its indices.
fn score_in_batches<D: MapDataset>(
    set: &D,
    share: std::ops::Range<usize>,
    batch: usize,
    seed: u64,
    mut score: impl FnMut(&[usize], D::Batch) -> Result<(), TaskError>,
) -> Result<(), TaskError> {
    let indices: Vec<usize> = share.collect();
    for chunk in indices.chunks(batch.max(1)) {
        let loaded = load_batch(set, chunk, 0, seed, loader_threads()).map_err(other)?;
        score(chunk, loaded)?;
    }
    Ok(())
}

/// Threads loading a batch's images: `XVLM_LOADER_THREADS`, else 2.
fn loader_threads() -> usize {
    std::env::var("XVLM_LOADER_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n: &usize| n > 0)
        .unwrap_or(2)
}
