//! On-demand checkpoint requests, daemon -> trainer -> every rank. The daemon writes the request id
//! into a file next to the trainer's assignment (atomically, by rename); rank 0 reads it after each
//! step and one all-reduce per step hands the id to every rank, so all ranks save at the same step
//! boundary whichever rank the request reached and however late.

use std::path::{Path, PathBuf};

use tch::{Device, Kind, Tensor};
use tracing::warn;
use xvlm_model::collective::{Collective, CollectiveError};

/// The request file of `rank` in a generation directory.
pub fn request_file(generation_dir: &Path, rank: usize) -> PathBuf {
    generation_dir.join(format!("rank{rank}.checkpoint-request"))
}

/// Writes request `id` for a trainer (tmp file + rename: the trainer never reads half a number).
pub fn write_request(path: &Path, id: u64) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, id.to_string())?;
    std::fs::rename(&tmp, path)
}

/// Rank 0's view of the request file and the last request every rank agreed on.
pub struct CheckpointRequests {
    file: Option<PathBuf>,
    rank: usize,
    device: Device,
    served: u64,
}

impl CheckpointRequests {
    /// Requests read from `file` (rank 0 only; other ranks learn them through the collective).
    pub fn new(file: Option<PathBuf>, rank: usize, device: Device) -> Self {
        CheckpointRequests {
            file,
            rank,
            device,
            served: 0,
        }
    }

    fn pending(&self) -> u64 {
        let Some(file) = self.file.as_ref().filter(|_| self.rank == 0) else {
            return 0;
        };
        match std::fs::read_to_string(file) {
            Ok(text) => match text.trim().parse::<u64>() {
                Ok(id) if id > self.served => id,
                Ok(_) => 0,
                Err(e) => {
                    warn!("{}: not a request id ({e})", file.display());
                    0
                }
            },
            Err(_) => 0,
        }
    }

    /// A new request id every rank agrees on, or `None`; every rank calls it after every step
    /// (one collective). Ids stay exact in an f64 up to 2^53.
    pub fn poll(&mut self, comm: &dyn Collective) -> Result<Option<u64>, CollectiveError> {
        if comm.world_size() == 1 {
            let id = self.pending();
            self.served = self.served.max(id);
            return Ok((id > 0).then_some(id));
        }
        let mut t = Tensor::from_slice(&[self.pending() as f64])
            .to_kind(Kind::Double)
            .to_device(self.device);
        comm.all_reduce_sum(&mut t)?;
        let id = t.double_value(&[0]).round() as u64;
        if id > self.served {
            self.served = id;
            return Ok(Some(id));
        }
        Ok(None)
    }
}
