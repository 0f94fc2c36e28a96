//! Named losses of a step, averaged over the ranks for the progress line.

use tch::{Device, Kind, Tensor};
use xvlm_model::collective::Collective;

use super::setup::other;
use crate::trainer::task::TaskError;

/// Each rank's `(name, value)` losses averaged over the ranks (one all-reduce of a float32 vector on
/// `device`); every rank passes the same names in the same order.
pub fn mean_over_ranks(
    comm: &dyn Collective,
    device: Device,
    losses: &[(&str, f64)],
) -> Result<Vec<(String, f64)>, TaskError> {
    let values: Vec<f64> = losses.iter().map(|(_, v)| *v).collect();
    let mut sum = Tensor::from_slice(&values)
        .to_kind(Kind::Float)
        .to_device(device);
    comm.all_reduce_sum(&mut sum)?;
    let sum: Vec<f64> =
        Vec::try_from(sum.to_device(Device::Cpu).to_kind(Kind::Double)).map_err(other)?;
    let world = comm.world_size().max(1) as f64;
    Ok(losses
        .iter()
        .zip(sum)
        .map(|((name, _), v)| (name.to_string(), v / world))
        .collect())
}
