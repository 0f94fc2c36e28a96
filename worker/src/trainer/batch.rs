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

    /// Per-rank batches of the reference world in the global batch.
    pub fn reference_world(&self) -> usize {
        self.global / self.local
    }

    /// The reference ranks whose whole batches this rank runs: rank r of w takes `r*R/w ..
    /// (r+1)*R/w` of the R reference batches (balanced; uneven when w does not divide R).
    pub fn reference_ranks(&self) -> Range<usize> {
        let (r, w) = (self.reference_world(), self.world);
        self.rank * r / w..(self.rank + 1) * r / w
    }

    /// This rank's micro-batches as whole reference batches (offsets into the global batch): each is
    /// exactly the batch a rank of the reference world reads, also when w does not divide R.
    pub fn reference_micro_batches(&self) -> Vec<Range<usize>> {
        self.reference_ranks()
            .map(|k| k * self.local..(k + 1) * self.local)
            .collect()
    }

    /// Forwards every rank runs per step when micro-batches are whole reference batches: the busiest
    /// rank's count, because collectives inside a forward need the same calls on every rank.
    pub fn lockstep_forwards(&self) -> usize {
        self.reference_world().div_ceil(self.world)
    }

    /// The weight of each of this rank's reference micro-batch losses (whose gradients the engine
    /// averages per rank, then over the ranks) that makes the update the mean over all R reference
    /// batches: `w * c / R` for c micro-batches here; exactly 1 when w divides R.
    pub fn reference_loss_weight(&self) -> f64 {
        let count = self.reference_ranks().len();
        if count * self.world == self.reference_world() {
            1.0
        } else {
            (self.world * count) as f64 / self.reference_world() as f64
        }
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

    #[test]
    fn reference_micro_batches_are_whole_reference_batches() {
        // Dividing worlds: the same micro-batches as the balanced slices, weight exactly 1.
        for (world, rank) in [(1, 0), (2, 1), (4, 3)] {
            let p = BatchPlan::new(4, 4, rank, world);
            assert_eq!(p.reference_micro_batches(), p.micro_batches());
            assert_eq!(p.reference_loss_weight(), 1.0);
            assert_eq!(p.lockstep_forwards(), 4 / world);
        }
        // 3 ranks of a reference world of 4: batches 0, 1 and 2..4; every one exactly once.
        let plans: Vec<_> = (0..3).map(|r| BatchPlan::new(4, 4, r, 3)).collect();
        let ranks: Vec<_> = plans.iter().map(BatchPlan::reference_ranks).collect();
        assert_eq!(ranks, vec![0..1, 1..2, 2..4]);
        assert_eq!(plans[2].reference_micro_batches(), vec![8..12, 12..16]);
        assert!(plans.iter().all(|p| p.lockstep_forwards() == 2));
        // Per-rank means of weighted losses, averaged over 3 ranks: each batch counts 1/4.
        let weights: Vec<f64> = plans.iter().map(BatchPlan::reference_loss_weight).collect();
        assert_eq!(weights, vec![0.75, 0.75, 1.5]);
        let per_batch: Vec<f64> = plans
            .iter()
            .zip(&weights)
            .map(|(p, w)| w / p.reference_ranks().len() as f64 / 3.0)
            .collect();
        assert!(per_batch.iter().all(|b| (b - 0.25).abs() < 1e-15));
    }
}
