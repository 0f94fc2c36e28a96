//! The fine-tuning runner: one [`TrainTask`] for every fine-tuning task. It owns the model, the optimizer
//! engine (through [`FinetuneTrainer`]), the training stream and its resume meta, epoch ends with
//! evaluation on the validation split, the best checkpoint (`best/`, by the task's metric), the test
//! evaluation with the best weights at the end, and `evaluate: true` (the official `--evaluate`:
//! evaluate `init_checkpoint` and stop). A task supplies only its model, data, batches, losses (through
//! [`FinetuneModel`]) and evaluation ([`FinetuneTask`]).
//!
//! Schedule: the official fine-tune loops step the scheduler after every update, with
//! `step_per_epoch = ceil(N / global batch)` although `drop_last` runs only `floor(N / global batch)`
//! steps per epoch; the job runs `epochs x floor(...)` steps (or `steps:` from the job).
//!
//! Randomness: the permutation of each epoch from (seed, epoch), every item's augmentation from (seed,
//! epoch, item), ITM negatives and dropout from (seed, step, rank). A checkpoint holds the weights, the
//! optimizer, the scheduler step and the stream cursor, so a resume at the same world size is exact.

pub mod grounding;
pub mod grounding_bbox;
pub mod grounding_bbox_pretrain;
mod init;
mod meta;
pub mod nlvr;
pub mod nlvr_pretrain;
pub mod outputs;
pub mod retrieval;
mod stream;
pub mod vqa;

use std::collections::BTreeMap;
use std::sync::Arc;

use tch::nn::{self, VarStore};
use tch::{Device, Tensor};
use xvlm_model::checkpoint::StateDict;
use xvlm_model::collective::Collective;
use xvlm_model::config::{FinetuneKeys, TaskConfig};
use xvlm_model::data::finetune::loader::{load_batch, MapDataset};
use xvlm_model::data::finetune::sampler::TrainCursor;
use xvlm_model::optim::named_trainable_params;
use xvlm_model::train::finetune::{finetune_schedule, FinetuneModel, FinetuneTrainer};
use xvlm_model::train::{mixed_precision_of, EngineSettings, TrainSettings};
use xvlm_model::xvlm::ModelError;

use super::harness::losses::mean_over_ranks;
use super::harness::setup::{broadcast_weights, build_seeded, load_task_config, other};
use super::task::{StepOutput, TaskContext, TaskError, TrainTask};
use meta::{ResumeMeta, META_VERSION, TRAIN_STREAM};
use outputs::{Best, EvalRecord, Outputs};
use stream::StepBatches;

/// An evaluation split.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    /// `val_file`: chooses the best checkpoint.
    Val,
    /// `test_file`: reported at the end, with the best weights.
    Test,
}

impl Split {
    /// The name used in metric names and files.
    pub fn as_str(self) -> &'static str {
        match self {
            Split::Val => "val",
            Split::Test => "test",
        }
    }
}

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

/// One rank of a fine-tune.
pub struct FinetuneRunner<T: FinetuneTask> {
    task: T,
    vs: VarStore,
    model: &'static T::Model,
    trainer: FinetuneTrainer<'static, T::Model>,
    data: Arc<T::Data>,
    stream: StepBatches<T::Data>,
    plan: super::batch::BatchPlan,
    seed: u64,
    threads: usize,
    device: Device,
    rank: usize,
    world: usize,
    total_steps: u64,
    evaluate_only: bool,
    lr: f64,
    best: Option<Best>,
    /// The latest evaluation's metrics (kept in the checkpoint meta).
    metrics: Vec<(String, f64)>,
    outputs: Option<Outputs>,
    config: serde_json::Value,
}

impl<T: FinetuneTask> FinetuneRunner<T> {
    /// Builds the model (seeded by the job seed, `init_checkpoint` loaded, broadcast from rank 0), the
    /// data, the stream and the trainer of this rank.
    pub fn new(ctx: &TaskContext<'_>) -> Result<Self, TaskError> {
        let task_cfg = load_task_config(ctx)?;
        let batch_size_train = T::train_batch_size(&task_cfg)?;
        let seed = ctx.spec.seed;
        let vs = VarStore::new(ctx.device);
        let model = build_seeded(seed, || {
            T::build_model(&vs.root(), &task_cfg).map_err(other)
        })?;
        if let Some(url) = &ctx.spec.init_checkpoint {
            T::load_init_checkpoint(&model, &vs, &task_cfg, url)?;
        }
        broadcast_weights(&vs, ctx.comm)?;
        let (task, data) = T::load_data(&task_cfg, ctx)?;
        let data = Arc::new(data);

        // The trainer borrows the model for its whole life, and the runner lives until the trainer
        // process exits: one leaked model per process is the simplest owner.
        let model: &'static T::Model = Box::leak(Box::new(model));
        let plan = ctx.batch_plan(batch_size_train);
        let reference_world = plan.global / plan.local;
        let threads = loader_threads();
        let stream = StepBatches::start(
            data.clone(),
            plan.clone(),
            seed,
            threads,
            TrainCursor::default(),
        )?;
        let schedule = finetune_schedule(
            &task_cfg,
            data.len() as u64,
            batch_size_train,
            reference_world,
        )
        .map_err(other)?;
        let epochs = task_cfg.schedular.as_ref().map_or(0.0, |s| s.epochs);
        let planned = (epochs.max(0.0) as u64) * stream.steps_per_epoch();
        let evaluate_only = ctx.spec.evaluate;
        let total_steps = if evaluate_only {
            0
        } else {
            ctx.spec.steps.unwrap_or(planned)
        };
        let mut trainer = FinetuneTrainer::new(
            model,
            named_trainable_params(&vs),
            &task_cfg,
            schedule,
            seed,
            task_cfg.xvlm.dropout,
        )
        .map_err(other)?;
        trainer
            .engine_mut()
            .set_settings(T::engine_settings(&task_cfg, ctx.device));
        tracing::info!(
            task = T::NAME,
            rank = ctx.rank,
            world = ctx.world,
            items = data.len(),
            steps_per_epoch = stream.steps_per_epoch(),
            total_steps,
            accumulation = stream.accumulation(),
            evaluate_only,
            "fine-tune task ready"
        );
        Ok(Self {
            task,
            vs,
            model,
            trainer,
            data,
            stream,
            plan,
            seed,
            threads,
            device: ctx.device,
            rank: ctx.rank,
            world: ctx.world,
            total_steps,
            evaluate_only,
            lr: 0.0,
            best: None,
            metrics: Vec::new(),
            outputs: (ctx.rank == 0).then(|| Outputs::open(ctx.output)).flatten(),
            config: serde_json::to_value(&task_cfg).unwrap_or_default(),
        })
    }

    /// The epoch step `step` belongs to.
    fn epoch_of(&self, step: u64) -> u64 {
        step / self.stream.steps_per_epoch().max(1)
    }

    /// Evaluates `split` and writes its record; returns the metrics named `{split}.{metric}`.
    fn evaluate_split(
        &self,
        split: Split,
        epoch: u64,
        step: u64,
        comm: &dyn Collective,
        file: &str,
    ) -> Result<Option<Vec<(String, f64)>>, TaskError> {
        let Some(metrics) = self.task.evaluate(self.model, split, comm)? else {
            return Ok(None);
        };
        tracing::info!(
            task = T::NAME,
            split = split.as_str(),
            epoch,
            ?metrics,
            "evaluated"
        );
        if let Some(out) = &self.outputs {
            let record = EvalRecord {
                split: split.as_str(),
                epoch,
                step,
                metrics: EvalRecord::metrics_map(&metrics),
            };
            out.write_eval(file, &[record])?;
        }
        Ok(Some(metrics))
    }

    /// The end of epoch `epoch` (after step `done`): validation, and the best weights when it improved.
    fn end_epoch(
        &mut self,
        epoch: u64,
        done: u64,
        comm: &dyn Collective,
    ) -> Result<Vec<(String, f64)>, TaskError> {
        let file = format!("eval/epoch-{epoch}.json");
        let Some(metrics) = self.evaluate_split(Split::Val, epoch, done, comm, &file)? else {
            return Ok(Vec::new());
        };
        let value = metrics
            .iter()
            .find(|(k, _)| k == T::BEST_METRIC)
            .map(|(_, v)| *v)
            .ok_or_else(|| {
                other(format!(
                    "{} evaluation gave no {} metric",
                    T::NAME,
                    T::BEST_METRIC
                ))
            })?;
        if self.best.is_none_or(|b| value > b.value) {
            let best = Best {
                epoch,
                step: done,
                value,
            };
            if let Some(out) = &self.outputs {
                out.write_best(&self.state(), T::BEST_METRIC, best)?;
            }
            // Every rank waits for rank 0's write: a later failure then never resumes past a best
            // that is not on storage.
            comm.barrier()?;
            self.best = Some(best);
        }
        self.metrics = prefixed(Split::Val, metrics, epoch);
        Ok(self.metrics.clone())
    }

    /// Restores the weights, the engine state and the stream of a saved `meta`.
    fn restore_from(
        &mut self,
        weights: &[(String, Tensor)],
        extra: &[(String, Tensor)],
        meta: &ResumeMeta,
    ) -> Result<(), TaskError> {
        if extra.is_empty() {
            return Err(other(format!(
                "{} checkpoint has no optimizer/scheduler state for this rank",
                T::NAME
            )));
        }
        crate::trainer::harness::weights::copy_weights_into(&self.state(), weights)?;
        let extra: std::collections::HashMap<String, Tensor> = extra
            .iter()
            .map(|(k, t)| (k.clone(), t.shallow_clone()))
            .collect();
        self.trainer
            .engine_mut()
            .load_state_tensors(&extra)
            .map_err(other)?;
        if self.trainer.step_index() != meta.iteration {
            return Err(other(format!(
                "{} checkpoint: scheduler step {} but task state says iteration {}",
                T::NAME,
                self.trainer.step_index(),
                meta.iteration
            )));
        }
        let cursor = meta.stream(TRAIN_STREAM)?;
        // Drop the running loader (joins its threads) before starting the new one.
        self.stream = StepBatches::start(
            self.data.clone(),
            self.plan.clone(),
            self.seed,
            self.threads,
            cursor,
        )?;
        self.lr = meta.lr;
        self.best = meta.best;
        self.metrics = meta.metrics.clone();
        tracing::info!(
            task = T::NAME,
            rank = self.rank,
            iteration = meta.iteration,
            ?cursor,
            best = ?self.best,
            "fine-tune state restored"
        );
        Ok(())
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

/// `{split}.{name}` metrics plus the epoch they belong to.
fn prefixed(split: Split, metrics: Vec<(String, f64)>, epoch: u64) -> Vec<(String, f64)> {
    let mut out: Vec<(String, f64)> = metrics
        .into_iter()
        .map(|(k, v)| (format!("{}.{k}", split.as_str()), v))
        .collect();
    out.push((format!("{}.epoch", split.as_str()), epoch as f64));
    out
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

impl<T: FinetuneTask> TrainTask for FinetuneRunner<T> {
    fn total_steps(&self) -> u64 {
        self.total_steps
    }

    fn step(&mut self, step: u64, comm: &dyn Collective) -> Result<StepOutput, TaskError> {
        if step != self.trainer.step_index() {
            return Err(other(format!(
                "task {} asked for step {step} but is at step {} (resume restores the step from a \
                 checkpoint)",
                T::NAME,
                self.trainer.step_index()
            )));
        }
        let batches: Vec<_> = self
            .stream
            .next_step()?
            .into_iter()
            .map(|b| T::to_device(b, self.device))
            .collect();
        let refs: Vec<&_> = batches.iter().collect();
        let log = self.trainer.run_step(&refs, comm).map_err(other)?;
        self.lr = log.update.lrs.first().copied().unwrap_or(0.0);
        let named: Vec<(&str, f64)> = log.losses.iter().map(|(k, v)| (k.as_str(), *v)).collect();
        let losses = mean_over_ranks(comm, self.device, &named)?;
        let done = step + 1;
        let metrics = if done.is_multiple_of(self.stream.steps_per_epoch().max(1)) {
            self.end_epoch(self.epoch_of(step), done, comm)?
        } else {
            Vec::new()
        };
        Ok(StepOutput {
            losses,
            samples: self.plan.local * batches.len(),
            metrics,
        })
    }

    fn finish(&mut self, comm: &dyn Collective) -> Result<Vec<(String, f64)>, TaskError> {
        let done = self.trainer.step_index();
        let epoch = self.epoch_of(done.saturating_sub(1));
        let mut metrics = Vec::new();
        if self.evaluate_only {
            if let Some(val) = self.evaluate_split(Split::Val, 0, 0, comm, "eval/val.json")? {
                metrics.extend(prefixed(Split::Val, val, 0));
            }
        } else if let Some(best) = self.best {
            // The test split is evaluated with the best validation weights (rank 0 reads them and
            // every rank takes them from it).
            match &self.outputs {
                Some(out) => {
                    let weights = out.read_best(best)?;
                    crate::trainer::harness::weights::copy_weights_into(&self.state(), &weights)?;
                }
                None if self.rank == 0 => tracing::warn!(
                    "the job output holds no best weights: the test split is scored with the \
                     final weights"
                ),
                None => {}
            }
            broadcast_weights(&self.vs, comm)?;
        }
        let from_epoch = self.best.map_or(epoch, |b| b.epoch);
        if let Some(test) =
            self.evaluate_split(Split::Test, from_epoch, done, comm, "eval/final.json")?
        {
            metrics.extend(prefixed(Split::Test, test, from_epoch));
        }
        Ok(metrics)
    }

    fn lr(&self) -> f64 {
        self.lr
    }

    fn state(&self) -> Vec<(String, Tensor)> {
        T::state_dict(self.model, &self.vs).into_iter().collect()
    }

    fn checkpoint_state(&self) -> Vec<(String, Tensor)> {
        self.trainer.engine().state_tensors()
    }

    fn model_config(&self) -> serde_json::Value {
        self.config.clone()
    }

    fn checkpoint_meta(&self) -> serde_json::Value {
        let iteration = self.trainer.step_index();
        ResumeMeta {
            version: META_VERSION,
            task: T::NAME.into(),
            iteration,
            epoch: self.stream.cursor().epoch,
            rank: self.rank,
            world: self.world,
            lr: self.lr,
            streams: BTreeMap::from([(TRAIN_STREAM.to_string(), self.stream.cursor())]),
            best: self.best,
            metrics: self.metrics.clone(),
        }
        .to_value()
    }

    fn restore(
        &mut self,
        weights: &[(String, Tensor)],
        extra: &[(String, Tensor)],
        meta: &serde_json::Value,
    ) -> Result<(), TaskError> {
        let meta = ResumeMeta::parse(meta, self.rank, T::NAME)?;
        self.restore_from(weights, extra, &meta)
    }

    /// Cursors count global batches of the fixed global batch, so a checkpoint of another world size
    /// restores exactly like one of this world (its ranks agree; rank 0's is taken).
    fn restore_resharded(
        &mut self,
        weights: &[(String, Tensor)],
        extra: &[(String, Tensor)],
        metas: &[serde_json::Value],
        saved_world: usize,
        world: usize,
    ) -> Result<(), TaskError> {
        let metas = metas
            .iter()
            .enumerate()
            .map(|(r, m)| ResumeMeta::parse(m, r, T::NAME))
            .collect::<Result<Vec<_>, _>>()?;
        let first = metas.first().ok_or_else(|| {
            other(format!(
                "{} checkpoint of {saved_world} ranks has no task state",
                T::NAME
            ))
        })?;
        if let Some(m) = metas
            .iter()
            .find(|m| m.iteration != first.iteration || m.streams != first.streams)
        {
            return Err(other(format!(
                "{} checkpoint: rank {} is at step {} {:?}, rank 0 at step {} {:?}",
                T::NAME,
                m.rank,
                m.iteration,
                m.streams,
                first.iteration,
                first.streams
            )));
        }
        tracing::info!(
            task = T::NAME,
            saved_world,
            world,
            "restoring a checkpoint of another world size"
        );
        let first = first.clone();
        self.restore_from(weights, extra, &first)
    }
}
