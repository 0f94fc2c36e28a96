//! The global batch and how one rank splits its share into micro-batches.
//!
//! The global batch is fixed for the whole job: `local batch x reference world`, where the reference
//! world is `workers.max x devices_per_worker` (the largest world the job may run at; never smaller
//! than the current world). When the world shrinks (elastic restart), each rank takes a larger slice of
//! the same global batch and walks it in micro-batches of at most the local batch, accumulating
//! gradients, so every generation follows the same global sample stream.
//!
//! Slices are contiguous and balanced: rank r of w takes samples `r*G/w .. (r+1)*G/w` of the step's
//! global batch of G samples. At the reference world that is `r*b .. (r+1)*b`, one micro-batch.
//! Slices may differ by one sample when w does not divide G, so a loss must be summed over samples and
//! scaled by [`BatchPlan::loss_scale`] (not averaged per rank) for the averaged gradient to equal the
//! full-batch gradient.

use std::ops::Range;

use xvlm_proto::spec::JobSpec;

/// One rank's view of the fixed global batch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BatchPlan {
    /// Samples per forward pass (the job's per-rank batch size).
    pub local: usize,
    /// Samples per step over all ranks.
    pub global: usize,
    /// This rank.
    pub rank: usize,
    /// Ranks in this generation.
    pub world: usize,
}

impl BatchPlan {
    /// The plan of `rank` of `world` for per-rank batch `local` under `spec`'s reference world.
    pub fn for_job(spec: &JobSpec, local: usize, rank: usize, world: usize) -> BatchPlan {
        let reference = spec.world_size(spec.workers.max_workers()) as usize;
        BatchPlan::new(local, reference.max(world), rank, world)
    }

    /// The plan of `rank` of `world` when the global batch is `local x reference_world`.
    pub fn new(local: usize, reference_world: usize, rank: usize, world: usize) -> BatchPlan {
        let world = world.max(1);
        BatchPlan {
            local: local.max(1),
            global: local.max(1) * reference_world.max(world),
            rank,
            world,
        }
    }

    /// This rank's samples as offsets into the step's global batch.
    pub fn slice(&self) -> Range<usize> {
        self.slice_of(self.rank)
    }

    fn slice_of(&self, rank: usize) -> Range<usize> {
        rank * self.global / self.world..(rank + 1) * self.global / self.world
    }

    /// This rank's micro-batches (offsets into the global batch), in order.
    pub fn micro_batches(&self) -> Vec<Range<usize>> {
        let slice = self.slice();
        (slice.start..slice.end)
            .step_by(self.local)
            .map(|s| s..(s + self.local).min(slice.end))
            .collect()
    }

    /// Micro-batches per step of the busiest rank (1 at the reference world).
    pub fn accumulation(&self) -> usize {
        (0..self.world)
            .map(|r| self.slice_of(r).len().div_ceil(self.local))
            .max()
            .unwrap_or(1)
    }

    /// Multiply a loss *summed* over this rank's samples by this before backward: after the gradient
    /// all-reduce divides by the world size, the gradient is that of the mean over the global batch.
    pub fn loss_scale(&self) -> f64 {
        self.world as f64 / self.global as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reference_world_is_one_micro_batch() {
        let p = BatchPlan::new(4, 2, 1, 2);
        assert_eq!(p.global, 8);
        assert_eq!(p.slice(), 4..8);
        assert_eq!(p.micro_batches(), vec![4..8]);
        assert_eq!(p.accumulation(), 1);
    }

    #[test]
    fn shrunk_world_accumulates_the_same_samples() {
        let p = BatchPlan::new(4, 2, 0, 1);
        assert_eq!(p.micro_batches(), vec![0..4, 4..8]);
        assert_eq!(p.accumulation(), 2);
        // 3 of 4 ranks: uneven slices cover the global batch exactly once.
        let all: Vec<usize> = (0..3)
            .flat_map(|r| BatchPlan::new(4, 4, r, 3).micro_batches())
            .flatten()
            .collect();
        assert_eq!(all, (0..16).collect::<Vec<_>>());
        assert_eq!(BatchPlan::new(4, 4, 0, 3).accumulation(), 2);
    }
}
