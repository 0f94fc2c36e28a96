//! The training batches of one rank over the job's fixed global batch.
//!
//! A step reads global batch `cursor.batch` of epoch `cursor.epoch`'s permutation (seeded by (seed,
//! epoch), tail dropped) with `local x reference world` items. At the reference world each rank reads
//! its slice as one batch from a prefetching loader; at a smaller world (an elastic restart) it reads the
//! whole batches of the reference ranks it stands in for ([`BatchPlan::reference_micro_batches`]), as
//! micro-batches of `local` items whose gradients the engine averages. When the world does not divide
//! the reference world the ranks stand in for different numbers of them: each loss is weighted so the
//! update is the mean over every reference batch, and a rank with fewer runs forward-only repeats so
//! that the collectives inside a forward line up. Either way every item is loaded with the draws of (seed, epoch, item), so a micro-batch is
//! bit-identical to the batch the reference world's rank reads, and the cursor means the same at every
//! world size: the runner's `train` stream, whose resharded position is the saved ranks' common cursor.

use std::collections::BTreeMap;
use std::sync::Arc;

use xvlm_model::data::finetune::loader::{load_batch, MapDataset, MapLoader, MapLoaderConfig};
use xvlm_model::data::finetune::sampler::{TrainCursor, TrainSampler};

use crate::trainer::batch::BatchPlan;
use crate::trainer::harness::setup::other;
use crate::trainer::runner::meta::required_state;
use crate::trainer::runner::Streams;
use crate::trainer::task::TaskError;

/// The stream's name in the resume meta.
pub const TRAIN_STREAM: &str = "train";

/// How many items a loader prepares ahead of the step.
const PREFETCH_BATCHES: usize = 2;

/// This rank's micro-batches of each step.
pub struct StepBatches<D: MapDataset> {
    data: Arc<D>,
    /// The whole global batch of each step (one rank of world one).
    global: TrainSampler,
    plan: BatchPlan,
    cfg: MapLoaderConfig,
    /// At the reference world: the prefetching loader of this rank's slice.
    loader: Option<MapLoader<D::Batch>>,
    cursor: TrainCursor,
}

impl<D: MapDataset> StepBatches<D> {
    /// The stream of `plan`'s rank over `data`, at `cursor`; `threads` load the items of a batch.
    pub fn start(
        data: Arc<D>,
        plan: BatchPlan,
        seed: u64,
        threads: usize,
        cursor: TrainCursor,
    ) -> Result<Self, TaskError> {
        let global = TrainSampler::new(data.len(), plan.global, 0, 1, seed).map_err(other)?;
        global.check(cursor).map_err(other)?;
        let cfg = MapLoaderConfig {
            threads: threads.max(1),
            prefetch_batches: PREFETCH_BATCHES,
            seed,
        };
        let loader = if plan.world == plan.reference_world() {
            let sampler = TrainSampler::new(data.len(), plan.local, plan.rank, plan.world, seed)
                .map_err(other)?;
            Some(MapLoader::start(data.clone(), sampler, cursor, cfg).map_err(other)?)
        } else {
            None
        };
        Ok(Self {
            data,
            global,
            plan,
            cfg,
            loader,
            cursor,
        })
    }

    /// Global batches (steps) per epoch: `floor(items / global batch)`.
    pub fn steps_per_epoch(&self) -> u64 {
        self.global.steps_per_epoch()
    }

    /// The next step's batch.
    pub fn cursor(&self) -> TrainCursor {
        self.cursor
    }

    /// Items per micro-batch.
    pub fn local(&self) -> usize {
        self.plan.local
    }

    /// Micro-batches per step on this rank.
    pub fn accumulation(&self) -> usize {
        self.plan.reference_ranks().len()
    }

    /// Forward-only repeats per step that keep this rank in step with the busiest one.
    pub fn padding(&self) -> usize {
        self.plan.lockstep_forwards() - self.accumulation()
    }

    /// The weight of each micro-batch loss ([`BatchPlan::reference_loss_weight`]).
    pub fn loss_weight(&self) -> f64 {
        self.plan.reference_loss_weight()
    }

    /// This rank's micro-batches of the next step; advances the cursor.
    pub fn next_step(&mut self) -> Result<Vec<D::Batch>, TaskError> {
        let batches = match &mut self.loader {
            Some(loader) => {
                let loaded = loader.next_batch().map_err(other)?;
                if loaded.cursor != self.cursor {
                    return Err(other(format!(
                        "the loader read {:?}, the step needs {:?}",
                        loaded.cursor, self.cursor
                    )));
                }
                vec![loaded.batch]
            }
            None => {
                let indices = self.global.batch_indices(self.cursor);
                self.plan
                    .reference_micro_batches()
                    .into_iter()
                    .map(|range| {
                        load_batch(
                            self.data.as_ref(),
                            &indices[range],
                            self.cursor.epoch,
                            self.cfg.seed,
                            self.cfg.threads,
                        )
                        .map_err(other)
                    })
                    .collect::<Result<Vec<_>, _>>()?
            }
        };
        self.cursor = self.global.next(self.cursor);
        Ok(batches)
    }
}

impl<D: MapDataset> Streams for StepBatches<D> {
    type Position = TrainCursor;

    /// The prefetching loader's queue; none at a smaller world, where each step loads its batches
    /// itself (there is no queue).
    fn queue_depth(&self) -> Option<usize> {
        self.loader.as_ref().map(MapLoader::queue_depth)
    }

    fn save(&self) -> BTreeMap<String, serde_json::Value> {
        BTreeMap::from([(
            TRAIN_STREAM.to_string(),
            serde_json::to_value(self.cursor).unwrap_or_default(),
        )])
    }

    fn resumed(
        &self,
        saved: &BTreeMap<String, serde_json::Value>,
    ) -> Result<TrainCursor, TaskError> {
        required_state(saved, TRAIN_STREAM)
    }

    /// Cursors count global batches, so the saved ranks agree; rank 0's is taken.
    fn resharded(
        &self,
        saved: &[&BTreeMap<String, serde_json::Value>],
    ) -> Result<TrainCursor, TaskError> {
        let cursors = saved
            .iter()
            .enumerate()
            .map(|(r, s)| {
                required_state::<TrainCursor>(s, TRAIN_STREAM)
                    .map_err(|e| other(format!("rank {r}: {e}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let first = cursors
            .first()
            .copied()
            .ok_or_else(|| other("no saved rank"))?;
        if let Some((r, c)) = cursors.iter().enumerate().find(|(_, c)| **c != first) {
            return Err(other(format!(
                "rank {r}: stream {TRAIN_STREAM} at {c:?}, rank 0 at {first:?}"
            )));
        }
        Ok(first)
    }

    fn restart(&mut self, cursor: TrainCursor) -> Result<(), TaskError> {
        // Drop the running loader (joins its threads) before starting the new one.
        self.loader = None;
        *self = Self::start(
            self.data.clone(),
            self.plan.clone(),
            self.cfg.seed,
            self.cfg.threads,
            cursor,
        )?;
        Ok(())
    }
}
