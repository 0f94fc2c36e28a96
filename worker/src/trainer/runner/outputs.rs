//! What a task with an evaluation writes besides checkpoints, on the job output's storage (rank 0 only):
//! evaluation results (`eval/epoch-E.json`, `eval/final.json`) and the best weights (`best/`).
//!
//! `best/` is a checkpoint of its own: `best/model.safetensors`, then `best/MANIFEST.json` last (size,
//! sha256, the step, epoch and metric it was chosen by), so a reader never takes half-written weights
//! and a manifest that does not match its file is refused. It lives beside `checkpoints/` and `final/`,
//! so `keep_last` retention never removes it. It is written when a validation result beats every
//! earlier one; a resumed run replays the same epochs to the same numbers, so rewriting it is harmless.

use serde::{Deserialize, Serialize};
use tch::Tensor;

use crate::checkpoint::format::{from_safetensors, BufferPool, HostFile};
use crate::checkpoint::{sha256_hex, Storage};
use crate::trainer::harness::setup::other;
use crate::trainer::task::TaskError;

/// Where the best weights go, relative to the job output.
pub const BEST_WEIGHTS: &str = "best/model.safetensors";
/// Their manifest, written after them.
pub const BEST_MANIFEST: &str = "best/MANIFEST.json";

/// The best validation result so far (kept in the resume meta).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Best {
    /// Epoch whose end it was measured at.
    pub epoch: u64,
    /// Steps done then.
    pub step: u64,
    /// The selecting metric's value.
    pub value: f64,
}

/// `best/MANIFEST.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct BestManifest {
    file: String,
    size: u64,
    sha256: String,
    metric: String,
    best: Best,
}

/// One evaluation's results as written to `eval/*.json`.
#[derive(Debug, Clone, Serialize)]
pub struct EvalRecord<'a> {
    /// `val`, `test`.
    pub split: &'a str,
    /// Epoch the weights come from.
    pub epoch: u64,
    /// Steps done.
    pub step: u64,
    /// Named metrics (`txt_r1`, ...).
    pub metrics: serde_json::Map<String, serde_json::Value>,
}

impl EvalRecord<'_> {
    /// `metrics` as a JSON map.
    pub fn metrics_map(metrics: &[(String, f64)]) -> serde_json::Map<String, serde_json::Value> {
        metrics
            .iter()
            .map(|(k, v)| (k.clone(), serde_json::json!(v)))
            .collect()
    }
}

/// The job output a fine-tune writes its evaluations and best weights to.
pub struct Outputs {
    storage: Storage,
}

impl Outputs {
    /// Opens the job output; `None` (with a warning) when no backend can open it.
    pub fn open(url: &str) -> Option<Self> {
        match Storage::open(url) {
            Ok(storage) => Some(Self { storage }),
            Err(e) => {
                tracing::warn!("evaluation results and best weights are not written: {e}");
                None
            }
        }
    }

    /// Writes `records` (one evaluation round) to `name` (e.g. `eval/epoch-3.json`).
    pub fn write_eval(&self, name: &str, records: &[EvalRecord<'_>]) -> Result<(), TaskError> {
        let json = serde_json::to_vec_pretty(records).map_err(other)?;
        self.storage.put(name, json.into())?;
        tracing::info!(
            url = self.storage.url_of(name),
            "evaluation results written"
        );
        Ok(())
    }

    /// Writes any JSON document (e.g. a task's prediction file) to `name`.
    pub fn write_json(&self, name: &str, value: &impl Serialize) -> Result<(), TaskError> {
        let json = serde_json::to_vec(value).map_err(other)?;
        self.storage.put(name, json.into())?;
        tracing::info!(url = self.storage.url_of(name), "results written");
        Ok(())
    }

    /// Writes the best weights, then their manifest.
    pub fn write_best(
        &self,
        weights: &[(String, Tensor)],
        metric: &str,
        best: Best,
    ) -> Result<(), TaskError> {
        let data = HostFile::copy_of(weights, BEST_WEIGHTS, &BufferPool::default())?.into_bytes();
        let manifest = BestManifest {
            file: BEST_WEIGHTS.into(),
            size: data.len() as u64,
            sha256: sha256_hex(&data),
            metric: metric.into(),
            best,
        };
        self.storage.put(BEST_WEIGHTS, data)?;
        let json = serde_json::to_vec_pretty(&manifest).map_err(other)?;
        self.storage.put(BEST_MANIFEST, json.into())?;
        tracing::info!(
            url = self.storage.url_of(BEST_WEIGHTS),
            epoch = best.epoch,
            metric,
            value = best.value,
            "best weights written"
        );
        Ok(())
    }

    /// Reads the best weights, checked against their manifest (which must name `best`).
    pub fn read_best(&self, best: Best) -> Result<Vec<(String, Tensor)>, TaskError> {
        let missing = |what: &str| other(format!("{}: missing", self.storage.url_of(what)));
        let manifest = self
            .storage
            .get(BEST_MANIFEST)?
            .ok_or_else(|| missing(BEST_MANIFEST))?;
        let manifest: BestManifest = serde_json::from_slice(&manifest)
            .map_err(|e| other(format!("{}: {e}", self.storage.url_of(BEST_MANIFEST))))?;
        if manifest.best != best {
            return Err(other(format!(
                "{} describes {:?}, the run's best is {best:?}",
                self.storage.url_of(BEST_MANIFEST),
                manifest.best
            )));
        }
        let data = self
            .storage
            .get(BEST_WEIGHTS)?
            .ok_or_else(|| missing(BEST_WEIGHTS))?;
        let sha = sha256_hex(&data);
        if data.len() as u64 != manifest.size || sha != manifest.sha256 {
            return Err(other(format!(
                "{}: size {} sha256 {sha}, manifest says size {} sha256 {}",
                self.storage.url_of(BEST_WEIGHTS),
                data.len(),
                manifest.size,
                manifest.sha256
            )));
        }
        Ok(from_safetensors(&data, BEST_WEIGHTS)?)
    }
}
