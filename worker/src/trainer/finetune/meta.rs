//! The resume meta of a fine-tune rank (`rank-{r}.json`'s `task_state`): where each named data stream
//! continues, the step and epoch, and the best validation result so far.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use xvlm_model::data::finetune::sampler::TrainCursor;

use super::outputs::Best;
use crate::trainer::harness::setup::other;
use crate::trainer::task::TaskError;

/// Version of [`ResumeMeta`]'s layout.
pub const META_VERSION: u32 = 1;

/// The stream of training batches.
pub const TRAIN_STREAM: &str = "train";

/// One rank's resume state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResumeMeta {
    /// Layout version ([`META_VERSION`]).
    pub version: u32,
    /// The task (`retrieval`, ...).
    pub task: String,
    /// Steps done (= the scheduler step saved beside it).
    pub iteration: u64,
    /// The epoch the next step belongs to.
    pub epoch: u64,
    /// The saving rank.
    pub rank: usize,
    /// Its world size.
    pub world: usize,
    /// The lr of the last step.
    pub lr: f64,
    /// Each named stream's next batch. Cursors count global batches of the job's fixed global batch,
    /// so they mean the same at every world size.
    pub streams: BTreeMap<String, TrainCursor>,
    /// The best validation result so far.
    #[serde(default)]
    pub best: Option<Best>,
    /// The latest evaluation's metrics (`val.r_mean`, ...; empty before the first epoch end).
    #[serde(default)]
    pub metrics: Vec<(String, f64)>,
}

impl ResumeMeta {
    /// Reads saved rank `rank`'s meta of task `task`.
    pub fn parse(meta: &serde_json::Value, rank: usize, task: &str) -> Result<Self, TaskError> {
        let meta: ResumeMeta = serde_json::from_value(meta.clone()).map_err(|e| {
            other(format!(
                "{task} checkpoint: rank {rank}'s task state is unreadable: {e}"
            ))
        })?;
        if meta.version != META_VERSION {
            return Err(other(format!(
                "{task} checkpoint: rank {rank}'s task state version {} (this build reads \
                 {META_VERSION})",
                meta.version
            )));
        }
        if meta.task != task {
            return Err(other(format!(
                "checkpoint of task {} cannot resume task {task}",
                meta.task
            )));
        }
        Ok(meta)
    }

    /// The cursor of stream `name`.
    pub fn stream(&self, name: &str) -> Result<TrainCursor, TaskError> {
        self.streams.get(name).copied().ok_or_else(|| {
            other(format!(
                "{} checkpoint has no cursor of stream {name:?}",
                self.task
            ))
        })
    }

    /// As JSON for the checkpoint.
    pub fn to_value(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or(serde_json::Value::Null)
    }
}
