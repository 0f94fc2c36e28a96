//! The collective operations data-parallel training needs. Backends (TCP ring, NCCL) live in the worker;
//! the model only sees this trait, so a single process uses [`SingleProcess`].

use std::ops::Range;

use tch::Tensor;

/// A failed collective: a peer died, a socket broke, NCCL reported an error.
#[derive(Debug, thiserror::Error)]
pub enum CollectiveError {
    /// Transport-level failure talking to a peer.
    #[error("collective {op} failed at rank {rank}: {reason}")]
    Failed {
        /// Which operation.
        op: &'static str,
        /// This process's rank.
        rank: usize,
        /// What went wrong.
        reason: String,
    },
}

/// Sum/gather/broadcast across the ranks of one job generation. Every rank calls the same operations in
/// the same order with tensors of the same shape and dtype.
pub trait Collective: Send {
    /// This process's rank, 0..world_size.
    fn rank(&self) -> usize;
    /// Number of ranks.
    fn world_size(&self) -> usize;
    /// In-place element-wise sum across ranks (contiguous tensor).
    fn all_reduce_sum(&self, tensor: &mut Tensor) -> Result<(), CollectiveError>;
    /// Every rank's tensor, in rank order (the local one included, as given).
    fn all_gather(&self, tensor: &Tensor) -> Result<Vec<Tensor>, CollectiveError>;
    /// Overwrites `tensor` with the root rank's value.
    fn broadcast(&self, tensor: &mut Tensor, root: usize) -> Result<(), CollectiveError>;
    /// Returns once every rank has reached it.
    fn barrier(&self) -> Result<(), CollectiveError>;
}

/// World size 1: every collective is the identity.
#[derive(Debug, Default, Clone, Copy)]
pub struct SingleProcess;

impl Collective for SingleProcess {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn all_reduce_sum(&self, _tensor: &mut Tensor) -> Result<(), CollectiveError> {
        Ok(())
    }
    fn all_gather(&self, tensor: &Tensor) -> Result<Vec<Tensor>, CollectiveError> {
        Ok(vec![tensor.shallow_clone()])
    }
    fn broadcast(&self, _tensor: &mut Tensor, _root: usize) -> Result<(), CollectiveError> {
        Ok(())
    }
    fn barrier(&self) -> Result<(), CollectiveError> {
        Ok(())
    }
}

/// The official `AllGather` autograd function: the gathered features in rank order, where only the local
/// slice carries gradient (its backward returns the local slice of the incoming gradient).
pub fn all_gather_local_grad(
    collective: &dyn Collective,
    local: &Tensor,
) -> Result<Tensor, CollectiveError> {
    if collective.world_size() == 1 {
        return Ok(local.shallow_clone());
    }
    let gathered = collective.all_gather(&local.detach())?;
    let rank = collective.rank();
    let parts: Vec<Tensor> = gathered
        .into_iter()
        .enumerate()
        .map(|(r, t)| if r == rank { local.shallow_clone() } else { t })
        .collect();
    Ok(Tensor::cat(&parts, 0))
}

/// The slice of `0..n` rank `rank` of `world` scores in a distributed evaluation: a contiguous run of whole batches of `batch`
/// (the last one may be short), balanced to within one batch; empty when there are fewer batches than
/// ranks. Every item lands in the same batch at every world size, so its outputs are bit-identical.
pub fn rank_slice(n: usize, batch: usize, world: usize, rank: usize) -> Range<usize> {
    let batches = n.div_ceil(batch);
    let lo = batches * rank / world;
    let hi = batches * (rank + 1) / world;
    (lo * batch).min(n)..(hi * batch).min(n)
}

/// Every rank's slice, in rank order.
pub fn rank_slices(n: usize, batch: usize, world: usize) -> Vec<Range<usize>> {
    (0..world).map(|r| rank_slice(n, batch, world, r)).collect()
}

/// Every rank's per-item results of a distributed evaluation, merged in item order: rank `r` computed
/// `per_item` values for each item of `slices[r]` (its share, [`rank_slices`]) in `mine`. The shares are
/// padded with `pad` to the longest (all_gather needs one shape everywhere) and the padding dropped.
pub fn gather_shares<T: tch::kind::Element + Copy>(
    comm: &dyn Collective,
    slices: &[Range<usize>],
    mut mine: Vec<T>,
    per_item: usize,
    pad: T,
) -> Result<Vec<T>, CollectiveError> {
    let failed = |reason: String| CollectiveError::Failed {
        op: "gather_shares",
        rank: comm.rank(),
        reason,
    };
    let own = slices.get(comm.rank()).map_or(0, |s| s.len()) * per_item;
    if mine.len() != own {
        return Err(failed(format!(
            "this rank's share holds {} values, its slice needs {own}",
            mine.len()
        )));
    }
    let width = slices.iter().map(|s| s.len()).max().unwrap_or(0) * per_item;
    let mut merged = Vec::with_capacity(slices.iter().map(|s| s.len()).sum::<usize>() * per_item);
    if width == 0 {
        return Ok(merged);
    }
    mine.resize(width, pad);
    let gathered = comm.all_gather(&Tensor::from_slice(&mine))?;
    for (slice, t) in slices.iter().zip(&gathered) {
        let values = Vec::<T>::try_from(t).map_err(|e| failed(e.to_string()))?;
        let take = slice.len() * per_item;
        let part = values
            .get(..take)
            .ok_or_else(|| failed(format!("a rank sent {} of {take} values", values.len())))?;
        merged.extend_from_slice(part);
    }
    Ok(merged)
}
