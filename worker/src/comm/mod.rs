//! Collective backends for `xvlm_model::collective::Collective`: the CPU ring (TCP, shared-memory
//! channels, a shared segment when every rank is on one host) and NCCL (CUDA),
//! the bucketed gradient all-reduce data-parallel training uses on top of either, and a wrapper
//! timing the all-reduces (`timed`).

mod element;
mod local_group;
pub mod nccl;
pub mod ring;
mod ring_hello;
pub mod shm;
pub mod timed;

use tch::Tensor;
use xvlm_model::collective::{Collective, CollectiveError};

/// Gradients are flattened into buckets of about this many bytes before each all-reduce.
pub const BUCKET_BYTES: usize = 25 << 20;

/// Averages the gradients of `params` across ranks: flattened into buckets of at most `bucket_bytes`
/// (same kind and device per bucket), summed with one all-reduce per bucket, divided by the world size.
/// Parameters without a gradient are skipped on every rank alike (they depend only on the model).
pub fn all_reduce_mean_gradients(
    params: &[Tensor],
    comm: &dyn Collective,
    bucket_bytes: usize,
) -> Result<(), CollectiveError> {
    let world = comm.world_size();
    if world == 1 {
        return Ok(());
    }
    let grads: Vec<Tensor> = params
        .iter()
        .map(|p| p.grad())
        .filter(|g| g.defined())
        .collect();
    let mut bucket: Vec<&Tensor> = Vec::new();
    let mut bytes = 0usize;
    for g in &grads {
        let size = g.numel() * g.kind().elt_size_in_bytes();
        let compatible = bucket
            .first()
            .is_none_or(|f| f.kind() == g.kind() && f.device() == g.device());
        if !bucket.is_empty() && (!compatible || bytes + size > bucket_bytes) {
            reduce_bucket(&bucket, comm, world)?;
            bucket.clear();
            bytes = 0;
        }
        bucket.push(g);
        bytes += size;
    }
    if !bucket.is_empty() {
        reduce_bucket(&bucket, comm, world)?;
    }
    Ok(())
}

fn reduce_bucket(
    bucket: &[&Tensor],
    comm: &dyn Collective,
    world: usize,
) -> Result<(), CollectiveError> {
    tch::no_grad(|| {
        let flats: Vec<Tensor> = bucket.iter().map(|g| g.reshape([-1])).collect();
        let mut flat = Tensor::cat(&flats, 0);
        comm.all_reduce_sum(&mut flat)?;
        let _ = flat.g_div_scalar_(world as f64);
        let mut offset = 0i64;
        for g in bucket {
            let n = g.numel() as i64;
            let mut target = (*g).shallow_clone();
            target.copy_(&flat.narrow(0, offset, n).view_as(g));
            offset += n;
        }
        Ok(())
    })
}
