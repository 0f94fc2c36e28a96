//! The interface between the trainer process and what it trains. The trainer drives a [`TrainTask`]
//! step by step; tasks are chosen by the job's `task:` field in [`build`]. `pretrain` and the
//! fine-tuning tasks plug in here, each on the one task runner ([`Runner`]).

use tch::{Device, Tensor};
use xvlm_model::collective::{Collective, CollectiveError};
use xvlm_proto::spec::{JobSpec, TaskKind};

use super::batch::BatchPlan;
use super::finetune::grounding::GroundingTask;
use super::finetune::grounding_bbox::GroundingBboxTask;
use super::finetune::grounding_bbox_pretrain::GroundingBboxPretrainTask;
use super::finetune::nlvr::NlvrTask;
use super::finetune::nlvr_pretrain::NlvrPretrainTask;
use super::finetune::retrieval::RetrievalTask;
use super::finetune::vqa::VqaTask;
use super::pretrain::PretrainTask;
use super::runner::Runner;
use super::smoke::SmokeTask;
use crate::checkpoint::{Checkpointable, RestoreError};

/// A task failed to build or to step.
#[derive(Debug, thiserror::Error)]
pub enum TaskError {
    /// The job names a task this build cannot run yet.
    #[error("task {0} is not available in this build of xvlm-worker")]
    Unavailable(&'static str),
    /// A collective failed (a peer died).
    #[error(transparent)]
    Collective(#[from] CollectiveError),
    /// A tensor operation failed.
    #[error("tensor operation failed: {0}")]
    Tensor(#[from] tch::TchError),
    /// The task cannot restore a checkpoint saved at another world size.
    #[error("this task cannot resume a checkpoint saved by {saved} ranks at world size {now}")]
    WorldChanged {
        /// World size that saved the checkpoint.
        saved: usize,
        /// This generation's world size.
        now: usize,
    },
    /// Reading or writing the job output failed.
    #[error(transparent)]
    Checkpoint(#[from] crate::checkpoint::CheckpointError),
    /// Anything else, with context.
    #[error("{0}")]
    Other(String),
}

/// Everything a task needs to initialise on one rank.
pub struct TaskContext<'a> {
    /// The job spec.
    pub spec: &'a JobSpec,
    /// Global rank.
    pub rank: usize,
    /// World size.
    pub world: usize,
    /// Device of this rank.
    pub device: Device,
    /// This rank's data shard files.
    pub shards: &'a [String],
    /// Job output URL.
    pub output: &'a str,
    /// The collective (tasks broadcast initial weights, all-reduce gradients through it).
    pub comm: &'a dyn Collective,
}

impl TaskContext<'_> {
    /// How this rank walks the job's fixed global batch when its per-rank batch is `local` (the
    /// micro-batch size): its slice, micro-batches and gradient accumulation at this world size.
    pub fn batch_plan(&self, local: usize) -> BatchPlan {
        BatchPlan::for_job(self.spec, local, self.rank, self.world)
    }
}

/// What one step produced.
#[derive(Clone, Debug, PartialEq)]
pub struct StepOutput {
    /// Named losses, averaged across ranks.
    pub losses: Vec<(String, f64)>,
    /// The lr of every param group the step's update used (empty: the task has no groups).
    pub lrs: Vec<f64>,
    /// The update's total gradient norm, when the task measures it.
    pub grad_norm: Option<f64>,
    /// Samples this rank consumed.
    pub samples: usize,
    /// Evaluation results of this step (an epoch end), `split.metric` names; usually empty.
    pub metrics: Vec<(String, f64)>,
}

/// A data-parallel training task, driven one iteration at a time.
pub trait TrainTask {
    /// Iterations the job runs.
    fn total_steps(&self) -> u64;
    /// Runs iteration `step` (0-based global step): forward, backward, gradient all-reduce, update.
    fn step(&mut self, step: u64, comm: &dyn Collective) -> Result<StepOutput, TaskError>;
    /// After the last step, before the final weights are written: the closing evaluation (a
    /// fine-tune's test split). Its metrics go on the last progress line.
    fn finish(&mut self, _comm: &dyn Collective) -> Result<Vec<(String, f64)>, TaskError> {
        Ok(Vec::new())
    }
    /// Learning rate used by the last step.
    fn lr(&self) -> f64;
    /// Batches waiting in this rank's data-loader prefetch queue now; none for a task without one.
    fn loader_queue_depth(&self) -> Option<usize> {
        None
    }
    /// Named tensors that make up the model state (what a checkpoint saves).
    fn state(&self) -> Vec<(String, Tensor)>;
    /// This rank's other checkpointed tensors: optimizer, scheduler, loss-scaler state.
    fn checkpoint_state(&self) -> Vec<(String, Tensor)> {
        Vec::new()
    }
    /// The model and task configuration a checkpoint records beside the job spec (`config.json`).
    fn model_config(&self) -> serde_json::Value {
        serde_json::Value::Null
    }
    /// This rank's JSON checkpoint state: data cursors, RNG.
    fn checkpoint_meta(&self) -> serde_json::Value {
        serde_json::Value::Null
    }
    /// Restores a checkpoint: `weights` as saved from [`TrainTask::state`], `extra` from
    /// [`TrainTask::checkpoint_state`], `meta` from [`TrainTask::checkpoint_meta`]. The default copies
    /// the weights and accepts no other state (enough for tasks whose optimizer has none).
    fn restore(
        &mut self,
        weights: &[(String, Tensor)],
        extra: &[(String, Tensor)],
        _meta: &serde_json::Value,
    ) -> Result<(), TaskError> {
        if !extra.is_empty() {
            return Err(TaskError::Other(
                "this task cannot restore optimizer state; override TrainTask::restore".into(),
            ));
        }
        crate::trainer::harness::weights::copy_weights_into(&TrainTask::state(self), weights)
    }
    /// Restores a checkpoint saved by `saved_world` ranks into this generation's different world
    /// (an elastic restart). `extra` is rank 0's [`TrainTask::checkpoint_state`] (data-parallel ranks
    /// hold identical optimizer state), `metas` every saved rank's [`TrainTask::checkpoint_meta`] in
    /// rank order: per-rank data cursors must be re-derived for the new world (from the step, or from
    /// the next epoch boundary). The default refuses with [`TaskError::WorldChanged`]; the checkpointer
    /// then tries older checkpoints and, failing those, the generation starts from step 0.
    fn restore_resharded(
        &mut self,
        _weights: &[(String, Tensor)],
        _extra: &[(String, Tensor)],
        _metas: &[serde_json::Value],
        saved_world: usize,
        world: usize,
    ) -> Result<(), TaskError> {
        Err(TaskError::WorldChanged {
            saved: saved_world,
            now: world,
        })
    }
}

/// Builds one task for a rank.
type Builder = fn(&TaskContext<'_>) -> Result<Box<dyn TrainTask>, TaskError>;

/// Every task this build runs, with its builder: [`build`] and [`supported_tasks`] (what the worker
/// advertises to the coordinator) both read this one table, so they cannot disagree.
const TASKS: &[(TaskKind, Builder)] = &[
    (TaskKind::Smoke, |ctx| Ok(Box::new(SmokeTask::new(ctx)?))),
    (TaskKind::Pretrain, |ctx| {
        Ok(Box::new(Runner::<PretrainTask>::new(ctx)?))
    }),
    (TaskKind::Retrieval, |ctx| {
        Ok(Box::new(Runner::<RetrievalTask>::new(ctx)?))
    }),
    (TaskKind::Nlvr, |ctx| {
        Ok(Box::new(Runner::<NlvrTask>::new(ctx)?))
    }),
    (TaskKind::Vqa, |ctx| {
        Ok(Box::new(Runner::<VqaTask>::new(ctx)?))
    }),
    (TaskKind::Grounding, |ctx| {
        Ok(Box::new(Runner::<GroundingTask>::new(ctx)?))
    }),
    (TaskKind::GroundingBbox, |ctx| {
        Ok(Box::new(Runner::<GroundingBboxTask>::new(ctx)?))
    }),
    (TaskKind::NlvrPretrain, |ctx| {
        Ok(Box::new(Runner::<NlvrPretrainTask>::new(ctx)?))
    }),
    (TaskKind::GroundingBboxPretrain, |ctx| {
        Ok(Box::new(Runner::<GroundingBboxPretrainTask>::new(ctx)?))
    }),
];

/// The tasks this build can run, in [`TASKS`] order.
pub fn supported_tasks() -> Vec<TaskKind> {
    TASKS.iter().map(|(task, _)| *task).collect()
}

/// The task the job asks for.
pub fn build(ctx: &TaskContext<'_>) -> Result<Box<dyn TrainTask>, TaskError> {
    let task = ctx.spec.task;
    let (_, builder) = TASKS
        .iter()
        .find(|(t, _)| *t == task)
        .ok_or(TaskError::Unavailable(task.as_str()))?;
    builder(ctx)
}

/// Every task is checkpointed through its [`TrainTask`] methods.
impl<T: TrainTask + ?Sized> Checkpointable for T {
    fn state(&self) -> Vec<(String, Tensor)> {
        TrainTask::state(self)
    }

    fn checkpoint_state(&self) -> Vec<(String, Tensor)> {
        TrainTask::checkpoint_state(self)
    }

    fn checkpoint_meta(&self) -> serde_json::Value {
        TrainTask::checkpoint_meta(self)
    }

    fn restore(
        &mut self,
        weights: &[(String, Tensor)],
        extra: &[(String, Tensor)],
        meta: &serde_json::Value,
    ) -> Result<(), RestoreError> {
        TrainTask::restore(self, weights, extra, meta).map_err(RestoreError::from)
    }

    fn restore_resharded(
        &mut self,
        weights: &[(String, Tensor)],
        extra: &[(String, Tensor)],
        metas: &[serde_json::Value],
        saved_world: usize,
        world: usize,
    ) -> Result<(), RestoreError> {
        TrainTask::restore_resharded(self, weights, extra, metas, saved_world, world)
            .map_err(RestoreError::from)
    }
}

impl From<TaskError> for RestoreError {
    fn from(e: TaskError) -> Self {
        match e {
            TaskError::WorldChanged { saved, now } => RestoreError::WorldChanged { saved, now },
            other => RestoreError::Refused(other.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Exactly the tasks without a builder are unavailable, so what the worker advertises is what
    /// [`build`] accepts.
    #[test]
    fn supported_tasks_are_the_buildable_ones() {
        let supported = supported_tasks();
        for task in [TaskKind::Smoke, TaskKind::Pretrain, TaskKind::Retrieval] {
            assert!(supported.contains(&task), "{}", task.as_str());
        }
        for task in TaskKind::ALL {
            let listed = TASKS.iter().any(|(t, _)| *t == task);
            assert_eq!(listed, supported.contains(&task), "{}", task.as_str());
        }
        let mut deduped = supported.clone();
        deduped.dedup();
        assert_eq!(deduped, supported, "a task is listed twice");
    }
}
