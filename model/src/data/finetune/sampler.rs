//! Which items a rank reads: a per-epoch permutation seeded by (seed, epoch), cut into global batches of
//! `batch_per_rank x world` with the tail dropped (the official `drop_last` loader), each global batch cut
//! into equal contiguous rank slices; a resumable (epoch, batch) cursor; and evaluation slices that cover
//! every item exactly once (no `DistributedSampler` padding with duplicates).

use std::ops::Range;

use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::data::rng::{rng_for, Purpose};
use crate::data::DataError;

/// Position in a training stream: the next batch to read (saved with checkpoints).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct TrainCursor {
    /// Epoch (0-based).
    pub epoch: u64,
    /// Batch index within the epoch (0-based, `< steps_per_epoch`).
    pub batch: u64,
}

/// The training order of one rank over a map-style dataset of `len` items.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrainSampler {
    len: usize,
    batch_per_rank: usize,
    world: usize,
    rank: usize,
    seed: u64,
}

impl TrainSampler {
    /// The sampler of `rank` of `world`; fails when not even one global batch fits in the dataset.
    pub fn new(
        len: usize,
        batch_per_rank: usize,
        rank: usize,
        world: usize,
        seed: u64,
    ) -> Result<Self, DataError> {
        if batch_per_rank == 0 || world == 0 || rank >= world {
            return Err(DataError::Config(format!(
                "invalid sampler: batch {batch_per_rank} per rank, rank {rank} of world {world}"
            )));
        }
        if len < batch_per_rank * world {
            return Err(DataError::Config(format!(
                "{len} training items do not fill one global batch of {batch_per_rank} x {world}"
            )));
        }
        Ok(Self {
            len,
            batch_per_rank,
            world,
            rank,
            seed,
        })
    }

    /// Items in the dataset.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the dataset is empty (never: `new` refuses that).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Items per rank per step.
    pub fn batch_per_rank(&self) -> usize {
        self.batch_per_rank
    }

    /// Items per step over all ranks.
    pub fn global_batch(&self) -> usize {
        self.batch_per_rank * self.world
    }

    /// Steps actually run per epoch: `floor(len / global batch)` (the tail is dropped).
    pub fn steps_per_epoch(&self) -> u64 {
        (self.len / self.global_batch()) as u64
    }

    /// The official schedule's `step_per_epoch = ceil(len / global batch)` (it counts the tail batch
    /// that `drop_last` never runs), for the learning-rate schedule.
    pub fn schedule_steps_per_epoch(&self) -> u64 {
        self.len.div_ceil(self.global_batch()) as u64
    }

    /// The epoch's permutation of `0..len`, identical on every rank.
    pub fn permutation(&self, epoch: u64) -> Vec<usize> {
        permutation(self.len, self.seed, epoch)
    }

    /// The item indices of this rank at `cursor`.
    pub fn batch_indices(&self, cursor: TrainCursor) -> Vec<usize> {
        self.indices_in(&self.permutation(cursor.epoch), cursor.batch)
    }

    /// This rank's slice of global batch `batch` of an epoch permutation.
    pub fn indices_in(&self, permutation: &[usize], batch: u64) -> Vec<usize> {
        let start = batch as usize * self.global_batch() + self.rank * self.batch_per_rank;
        permutation[start..start + self.batch_per_rank].to_vec()
    }

    /// The cursor after `cursor` (rolls over into the next epoch).
    pub fn next(&self, cursor: TrainCursor) -> TrainCursor {
        if cursor.batch + 1 >= self.steps_per_epoch() {
            TrainCursor {
                epoch: cursor.epoch + 1,
                batch: 0,
            }
        } else {
            TrainCursor {
                epoch: cursor.epoch,
                batch: cursor.batch + 1,
            }
        }
    }

    /// Whether `cursor` names a batch of this sampler.
    pub fn check(&self, cursor: TrainCursor) -> Result<(), DataError> {
        if cursor.batch >= self.steps_per_epoch() {
            return Err(DataError::Config(format!(
                "cursor batch {} is past the {} steps of an epoch",
                cursor.batch,
                self.steps_per_epoch()
            )));
        }
        Ok(())
    }
}

/// A uniform permutation of `0..len` seeded by (seed, epoch) (Fisher-Yates).
pub fn permutation(len: usize, seed: u64, epoch: u64) -> Vec<usize> {
    let mut rng = rng_for(seed, Purpose::ItemShuffle, &[epoch, len as u64]);
    let mut order: Vec<usize> = (0..len).collect();
    for i in (1..len).rev() {
        let j = rng.random_range(0..=i);
        order.swap(i, j);
    }
    order
}

/// The evaluation items of `rank`: the contiguous slice `[len·r/W, len·(r+1)/W)`; the slices of all
/// ranks cover every item exactly once (sizes differ by at most one).
pub fn eval_slice(len: usize, rank: usize, world: usize) -> Range<usize> {
    let world = world.max(1);
    (len * rank / world)..(len * (rank + 1) / world)
}
