//! The task runner: the one [`TrainTask`] of every training task (pre-training and each fine-tune).
//! It owns the model, the optimizer engine (through the task's trainer, [`Engine`]), the task's named
//! data streams ([`Streams`]), the one resume meta ([`ResumeMeta`]: named streams, world, iteration,
//! epoch), exact and re-sharded resume, the averaging of the named losses over the ranks, epoch
//! boundaries with the evaluation hook, the best checkpoint (`best/`, by the task's metric), the test
//! evaluation with the best weights at the end, and `evaluate: true` (the official `--evaluate`:
//! evaluate `init_checkpoint` and stop). A task ([`Task`]) supplies only its model, its streams and
//! batches, its step (losses through its trainer, whose parameter groups are the task model's rule) and
//! its evaluation; a task without an evaluation ([`Task::BEST_METRIC`] `None`, pre-training) has no
//! epoch-end evaluation, no best checkpoint and no closing evaluation.
//!
//! Resume: a checkpoint holds the weights, the engine's optimizer, scheduler and loss-scaler state
//! (`checkpoint_state`), and the meta. At the same world size the streams continue from this rank's
//! saved states ([`Streams::resumed`]); at another world size from every saved rank's
//! ([`Streams::resharded`], which refuses states it cannot place before anything is restored).

pub mod meta;
pub mod outputs;

use std::collections::{BTreeMap, HashMap};
use std::fmt::Debug;

use tch::nn::{self, VarStore};
use tch::{Device, Tensor};
use xvlm_model::checkpoint::StateDict;
use xvlm_model::collective::Collective;
use xvlm_model::config::TaskConfig;
use xvlm_model::train::OptimizerEngine;

use super::harness::losses::mean_over_ranks;
use super::harness::setup::{broadcast_weights, build_seeded, load_task_config, other};
use super::task::{StepOutput, TaskContext, TaskError, TrainTask};
pub use meta::{ResumeMeta, META_VERSION};
use outputs::{Best, EvalRecord, Outputs};

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

/// The optimizer engine a task's trainer drives: the runner checkpoints and restores it.
pub trait Engine {
    /// The engine (its scheduler step is the runner's iteration).
    fn optimizer_engine(&self) -> &OptimizerEngine;
    /// Restores what [`OptimizerEngine::state_tensors`] wrote.
    fn load_engine_state(&mut self, tensors: &HashMap<String, Tensor>) -> Result<(), TaskError>;
}

/// A rank's named data streams, each with a serialisable state and a rule for another world size.
pub trait Streams {
    /// Where every stream restarts (from a checkpoint).
    type Position: Debug;
    /// Each stream's state by name (the meta's `streams`).
    fn save(&self) -> BTreeMap<String, serde_json::Value>;
    /// Where the streams continue after this rank's `saved` states of a checkpoint of this world
    /// size.
    fn resumed(
        &self,
        saved: &BTreeMap<String, serde_json::Value>,
    ) -> Result<Self::Position, TaskError>;
    /// Where they continue after every saved rank's states (in rank order) of a checkpoint of another
    /// world size; an error (naming the saved rank) for states they cannot place.
    fn resharded(
        &self,
        saved: &[&BTreeMap<String, serde_json::Value>],
    ) -> Result<Self::Position, TaskError>;
    /// Restarts every stream at `position`.
    fn restart(&mut self, position: Self::Position) -> Result<(), TaskError>;
    /// Batches waiting in the prefetch queue of the stream each step reads; none without one.
    fn queue_depth(&self) -> Option<usize> {
        None
    }
}

/// What a task's step produced on this rank.
#[derive(Debug, Clone, PartialEq)]
pub struct Stepped {
    /// This rank's named losses, the same names on every rank; `None`: not computed in this step (all
    /// ranks agree), not reported.
    pub losses: Vec<(String, Option<f64>)>,
    /// The lr of the step.
    pub lr: f64,
    /// The lr of every param group the step's update used, in the optimizer's group order.
    pub lrs: Vec<f64>,
    /// The update's total gradient norm (cross-rank averaged, before any clipping).
    pub grad_norm: Option<f64>,
    /// Samples this rank consumed.
    pub samples: usize,
}

/// What [`Task::prepare`] builds besides the model.
pub struct Prepared<T: Task> {
    /// The task (its evaluation data, batch geometry).
    pub task: T,
    /// The engine driver over the model.
    pub trainer: T::Trainer,
    /// The data streams at their beginning.
    pub streams: T::Streams,
    /// Steps per epoch (epoch boundaries: evaluation, the meta's epoch).
    pub steps_per_epoch: u64,
    /// Steps the job runs when it names no `steps:`.
    pub planned_steps: u64,
}

/// What a training task supplies to the runner.
pub trait Task: Sized + 'static {
    /// The task's name in job.yaml and in its checkpoints' meta.
    const TASK: &'static str;
    /// The validation metric that picks the best checkpoint (higher is better); `None`: the task has
    /// no evaluation (no epoch-end validation, best checkpoint or closing test; `evaluate: true` does
    /// not apply).
    const BEST_METRIC: Option<&'static str>;
    /// The model.
    type Model: 'static;
    /// The engine driver over the model (its step runs the task's losses through the engine).
    type Trainer: Engine;
    /// The named data streams.
    type Streams: Streams;

    /// Builds the model under `root` from the task config.
    fn build_model(root: &nn::Path, cfg: &TaskConfig) -> Result<Self::Model, TaskError>;
    /// Loads `init_checkpoint` into `vs`.
    fn load_init_checkpoint(
        model: &Self::Model,
        vs: &VarStore,
        cfg: &TaskConfig,
        url: &str,
    ) -> Result<(), TaskError>;
    /// The model's weights under their official names (what checkpoints save).
    fn state_dict(model: &Self::Model, vs: &VarStore) -> StateDict;
    /// The task's data, streams and trainer over `model` (whose weights are final: seeded, loaded,
    /// broadcast).
    fn prepare(
        cfg: &TaskConfig,
        ctx: &TaskContext<'_>,
        model: &'static Self::Model,
        vs: &VarStore,
    ) -> Result<Prepared<Self>, TaskError>;
    /// One step: its batches from `streams`, forward, backward and update through `trainer`.
    fn step(
        &mut self,
        trainer: &mut Self::Trainer,
        streams: &mut Self::Streams,
        device: Device,
        comm: &dyn Collective,
    ) -> Result<Stepped, TaskError>;
    /// Evaluates `split` on every rank (the same metrics everywhere); `None` when there is no such
    /// split. Called only when [`Task::BEST_METRIC`] names a metric.
    fn evaluate(
        &self,
        _model: &Self::Model,
        _split: Split,
        _comm: &dyn Collective,
    ) -> Result<Option<Vec<(String, f64)>>, TaskError> {
        Ok(None)
    }
}

/// One rank of a training task.
pub struct Runner<T: Task> {
    task: T,
    vs: VarStore,
    model: &'static T::Model,
    trainer: T::Trainer,
    streams: T::Streams,
    steps_per_epoch: u64,
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

impl<T: Task> Runner<T> {
    /// Builds the model (seeded by the job seed, `init_checkpoint` loaded, broadcast from rank 0), then
    /// the task's data, streams and trainer on this rank.
    pub fn new(ctx: &TaskContext<'_>) -> Result<Self, TaskError> {
        let cfg = load_task_config(ctx)?;
        let seed = ctx.spec.seed;
        let vs = VarStore::new(ctx.device);
        let model = build_seeded(seed, || T::build_model(&vs.root(), &cfg))?;
        if let Some(url) = &ctx.spec.init_checkpoint {
            T::load_init_checkpoint(&model, &vs, &cfg, url)?;
        }
        broadcast_weights(&vs, ctx.comm)?;
        // The trainer borrows the model for its whole life, and the runner lives until the trainer
        // process exits: one leaked model per process is the simplest owner.
        let model: &'static T::Model = Box::leak(Box::new(model));
        let Prepared {
            task,
            trainer,
            streams,
            steps_per_epoch,
            planned_steps,
        } = T::prepare(&cfg, ctx, model, &vs)?;
        let evaluates = T::BEST_METRIC.is_some();
        let evaluate_only = evaluates && ctx.spec.evaluate;
        let total_steps = if evaluate_only {
            0
        } else {
            ctx.spec.steps.unwrap_or(planned_steps)
        };
        tracing::info!(
            task = T::TASK,
            rank = ctx.rank,
            world = ctx.world,
            steps_per_epoch,
            total_steps,
            evaluate_only,
            "task ready"
        );
        Ok(Self {
            task,
            vs,
            model,
            trainer,
            streams,
            steps_per_epoch,
            device: ctx.device,
            rank: ctx.rank,
            world: ctx.world,
            total_steps,
            evaluate_only,
            lr: 0.0,
            best: None,
            metrics: Vec::new(),
            outputs: (evaluates && ctx.rank == 0)
                .then(|| Outputs::open(ctx.output))
                .flatten(),
            config: serde_json::to_value(&cfg).unwrap_or_default(),
        })
    }

    /// The task's data streams.
    pub fn streams(&self) -> &T::Streams {
        &self.streams
    }

    /// The next step's index (= the engine's scheduler step).
    fn iteration(&self) -> u64 {
        self.trainer.optimizer_engine().schedule_step()
    }

    /// The epoch step `step` belongs to.
    fn epoch_of(&self, step: u64) -> u64 {
        step / self.steps_per_epoch.max(1)
    }

    /// Evaluates `split` and writes its record; returns the metrics.
    fn evaluate_split(
        &self,
        split: Split,
        epoch: u64,
        step: u64,
        comm: &dyn Collective,
        file: &str,
    ) -> Result<Option<Vec<(String, f64)>>, TaskError> {
        if T::BEST_METRIC.is_none() {
            return Ok(None);
        }
        let Some(metrics) = self.task.evaluate(self.model, split, comm)? else {
            return Ok(None);
        };
        tracing::info!(
            task = T::TASK,
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
        let Some(best_metric) = T::BEST_METRIC else {
            return Ok(Vec::new());
        };
        let file = format!("eval/epoch-{epoch}.json");
        let Some(metrics) = self.evaluate_split(Split::Val, epoch, done, comm, &file)? else {
            return Ok(Vec::new());
        };
        let value = metrics
            .iter()
            .find(|(k, _)| k == best_metric)
            .map(|(_, v)| *v)
            .ok_or_else(|| {
                other(format!(
                    "{} evaluation gave no {best_metric} metric",
                    T::TASK
                ))
            })?;
        if self.best.is_none_or(|b| value > b.value) {
            let best = Best {
                epoch,
                step: done,
                value,
            };
            if let Some(out) = &self.outputs {
                out.write_best(&self.state(), best_metric, best)?;
            }
            // Every rank waits for rank 0's write: a later failure then never resumes past a best
            // that is not on storage.
            comm.barrier()?;
            self.best = Some(best);
        }
        self.metrics = prefixed(Split::Val, metrics, epoch);
        Ok(self.metrics.clone())
    }

    /// Restores the weights and the engine state, which must be at `meta.iteration`, restarts the
    /// streams at `position` and takes the rest of `meta`.
    fn restore_from(
        &mut self,
        weights: &[(String, Tensor)],
        extra: &[(String, Tensor)],
        meta: &ResumeMeta,
        position: <T::Streams as Streams>::Position,
    ) -> Result<(), TaskError> {
        if extra.is_empty() {
            return Err(other(format!(
                "{} checkpoint has no optimizer/scheduler state for this rank",
                T::TASK
            )));
        }
        crate::trainer::harness::weights::copy_weights_into(&self.state(), weights)?;
        let extra: HashMap<String, Tensor> = extra
            .iter()
            .map(|(k, t)| (k.clone(), t.shallow_clone()))
            .collect();
        self.trainer.load_engine_state(&extra)?;
        if self.iteration() != meta.iteration {
            return Err(other(format!(
                "{} checkpoint: scheduler step {} but task state says iteration {}",
                T::TASK,
                self.iteration(),
                meta.iteration
            )));
        }
        tracing::info!(
            task = T::TASK,
            rank = self.rank,
            iteration = meta.iteration,
            saved_world = meta.world,
            world = self.world,
            streams = ?position,
            best = ?meta.best,
            "state restored"
        );
        self.streams.restart(position)?;
        self.lr = meta.lr;
        self.best = meta.best;
        self.metrics = meta.metrics.clone();
        Ok(())
    }

    /// A stream error while placing a checkpoint, with the task's name.
    fn placing(e: TaskError) -> TaskError {
        other(format!("{} checkpoint, {e}", T::TASK))
    }
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

impl<T: Task> TrainTask for Runner<T> {
    fn total_steps(&self) -> u64 {
        self.total_steps
    }

    fn step(&mut self, step: u64, comm: &dyn Collective) -> Result<StepOutput, TaskError> {
        if step != self.iteration() {
            return Err(other(format!(
                "task {} asked for step {step} but is at step {} (resume restores the step from a \
                 checkpoint)",
                T::TASK,
                self.iteration()
            )));
        }
        let out = self
            .task
            .step(&mut self.trainer, &mut self.streams, self.device, comm)?;
        self.lr = out.lr;
        let named: Vec<(&str, f64)> = out
            .losses
            .iter()
            .map(|(k, v)| (k.as_str(), v.unwrap_or(0.0)))
            .collect();
        let mut losses = mean_over_ranks(comm, self.device, &named)?;
        let computed: Vec<bool> = out.losses.iter().map(|(_, v)| v.is_some()).collect();
        let mut kept = computed.iter();
        losses.retain(|_| kept.next().copied().unwrap_or(true));
        let done = step + 1;
        let metrics = if done.is_multiple_of(self.steps_per_epoch.max(1)) {
            self.end_epoch(self.epoch_of(step), done, comm)?
        } else {
            Vec::new()
        };
        Ok(StepOutput {
            losses,
            lrs: out.lrs,
            grad_norm: out.grad_norm,
            samples: out.samples,
            metrics,
        })
    }

    fn finish(&mut self, comm: &dyn Collective) -> Result<Vec<(String, f64)>, TaskError> {
        if T::BEST_METRIC.is_none() {
            return Ok(Vec::new());
        }
        let done = self.iteration();
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

    fn loader_queue_depth(&self) -> Option<usize> {
        self.streams.queue_depth()
    }

    fn state(&self) -> Vec<(String, Tensor)> {
        T::state_dict(self.model, &self.vs).into_iter().collect()
    }

    fn checkpoint_state(&self) -> Vec<(String, Tensor)> {
        self.trainer.optimizer_engine().state_tensors()
    }

    fn model_config(&self) -> serde_json::Value {
        self.config.clone()
    }

    fn checkpoint_meta(&self) -> serde_json::Value {
        let iteration = self.iteration();
        ResumeMeta {
            version: META_VERSION,
            task: T::TASK.into(),
            iteration,
            epoch: self.epoch_of(iteration),
            rank: self.rank,
            world: self.world,
            lr: self.lr,
            streams: self.streams.save(),
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
        let meta = ResumeMeta::parse(meta, self.rank, T::TASK)?;
        let position = self
            .streams
            .resumed(&meta.streams)
            .map_err(|e| Self::placing(other(format!("rank {}: {e}", meta.rank))))?;
        self.restore_from(weights, extra, &meta, position)
    }

    /// The saved ranks must describe one checkpoint (every rank's meta, all at one iteration); the
    /// streams continue by their own rule for another world ([`Streams::resharded`]); the weights and
    /// rank 0's engine state (identical on every data-parallel rank) restore exactly.
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
            .map(|(r, m)| ResumeMeta::parse(m, r, T::TASK))
            .collect::<Result<Vec<_>, _>>()?;
        if metas.is_empty() || metas.len() != saved_world {
            return Err(other(format!(
                "{} checkpoint of {saved_world} ranks has {} task states",
                T::TASK,
                metas.len()
            )));
        }
        let first = metas[0].clone();
        for (r, m) in metas.iter().enumerate() {
            let why = if m.rank != r || m.world != saved_world {
                format!("task state of rank {} of {}", m.rank, m.world)
            } else if m.iteration != first.iteration {
                format!(
                    "at iteration {}, rank 0 at {}",
                    m.iteration, first.iteration
                )
            } else {
                continue;
            };
            return Err(Self::placing(other(format!("rank {r}: {why}"))));
        }
        let saved: Vec<&BTreeMap<String, serde_json::Value>> =
            metas.iter().map(|m| &m.streams).collect();
        let position = self.streams.resharded(&saved).map_err(Self::placing)?;
        tracing::info!(
            task = T::TASK,
            saved_world,
            world,
            "restoring a checkpoint of another world size"
        );
        self.restore_from(weights, extra, &first, position)
    }
}
