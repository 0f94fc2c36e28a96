//! The resume meta of a rank (`rank-{r}.json`'s `task_state`), one layout for every task of the
//! runner: the task, the step and epoch, where each named data stream continues, the lr of the last
//! step, and the best validation result so far (tasks with an evaluation).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::outputs::Best;
use crate::trainer::harness::setup::other;
use crate::trainer::task::TaskError;

/// Version of [`ResumeMeta`]'s layout. Version 1 was two layouts (pre-training's `images` / `regions`
/// at the top level, fine-tuning's `streams`); checkpoints of either are refused.
pub const META_VERSION: u32 = 2;

/// One rank's resume state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResumeMeta {
    /// Layout version ([`META_VERSION`]).
    pub version: u32,
    /// The task (`pretrain`, `retrieval`, ...).
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
    /// Each named stream's state, as the stream wrote it ([`super::Streams::save`]).
    pub streams: BTreeMap<String, serde_json::Value>,
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
        // The version first: an older layout fails on its version, not on a missing field.
        let version = meta.get("version").and_then(serde_json::Value::as_u64);
        if version != Some(u64::from(META_VERSION)) {
            let saved = version.map_or_else(|| "none".to_string(), |v| v.to_string());
            return Err(other(format!(
                "{task} checkpoint: rank {rank}'s task state version {saved} (this build reads \
                 {META_VERSION})"
            )));
        }
        let meta: ResumeMeta = serde_json::from_value(meta.clone()).map_err(|e| {
            other(format!(
                "{task} checkpoint: rank {rank}'s task state is unreadable: {e}"
            ))
        })?;
        if meta.task != task {
            return Err(other(format!(
                "checkpoint of task {} cannot resume task {task}",
                meta.task
            )));
        }
        Ok(meta)
    }

    /// As JSON for the checkpoint.
    pub fn to_value(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or(serde_json::Value::Null)
    }
}

/// Stream `name`'s state in `streams` (a saved rank's), read as `S`; `None` when absent.
pub fn stream_state<S: serde::de::DeserializeOwned>(
    streams: &BTreeMap<String, serde_json::Value>,
    name: &str,
) -> Result<Option<S>, TaskError> {
    streams
        .get(name)
        .map(|v| {
            serde_json::from_value(v.clone())
                .map_err(|e| other(format!("the state of stream {name:?} is unreadable: {e}")))
        })
        .transpose()
}

/// Stream `name`'s state, which must be there.
pub fn required_state<S: serde::de::DeserializeOwned>(
    streams: &BTreeMap<String, serde_json::Value>,
    name: &str,
) -> Result<S, TaskError> {
    stream_state(streams, name)?.ok_or_else(|| other(format!("no state of stream {name:?}")))
}
