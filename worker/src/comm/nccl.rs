//! The CUDA collective backend: NCCL through cudarc's raw API, with libnccl loaded at run time.
//! Collectives are enqueued on libtorch's current CUDA stream of the rank's device, so they are ordered
//! with the surrounding tensor work. Compile-checked here; it runs only where CUDA and NCCL exist.

use std::ffi::c_void;

use cudarc::nccl::{result, sys};
use tch::{Device, Kind, Tensor};
use xvlm_model::collective::{Collective, CollectiveError};

/// Size of an NCCL unique id.
pub const UNIQUE_ID_BYTES: usize = 128;

fn fail(op: &'static str, rank: usize, reason: impl std::fmt::Display) -> CollectiveError {
    CollectiveError::Failed {
        op,
        rank,
        reason: reason.to_string(),
    }
}

/// Whether libnccl can be loaded by cudarc (it wants `libnccl.so`; see BUILD-NOTES.md section 4).
pub fn available() -> bool {
    // SAFETY: only probes for the library.
    unsafe { sys::is_culib_present() }
}

/// A fresh NCCL unique id (made by the worker hosting rank 0 and relayed by the coordinator).
pub fn unique_id() -> Result<Vec<u8>, String> {
    if !available() {
        return Err("libnccl.so cannot be loaded".into());
    }
    let id = result::get_uniqueid().map_err(|e| format!("ncclGetUniqueId: {e:?}"))?;
    Ok(id.internal.iter().map(|c| *c as u8).collect())
}

/// One NCCL communicator for this rank.
pub struct NcclCollective {
    comm: sys::ncclComm_t,
    rank: usize,
    world: usize,
    device: usize,
}

// SAFETY: an NCCL communicator may be used from any thread as long as calls are not concurrent; the
// Collective is owned by one trainer loop.
unsafe impl Send for NcclCollective {}

impl NcclCollective {
    /// Joins the communicator of `world` ranks identified by rank 0's `unique_id`, on CUDA `device`.
    pub fn new(
        rank: usize,
        world: usize,
        device: usize,
        unique_id: &[u8],
    ) -> Result<Self, CollectiveError> {
        if unique_id.len() != UNIQUE_ID_BYTES {
            return Err(fail(
                "init",
                rank,
                format!(
                    "unique id has {} bytes, expected {UNIQUE_ID_BYTES}",
                    unique_id.len()
                ),
            ));
        }
        if !available() {
            return Err(fail("init", rank, "libnccl.so cannot be loaded"));
        }
        cudarc::runtime::result::device::set(device as i32)
            .map_err(|e| fail("init", rank, format!("cudaSetDevice({device}): {e:?}")))?;
        let mut id = sys::ncclUniqueId {
            internal: [0; UNIQUE_ID_BYTES],
        };
        for (dst, src) in id.internal.iter_mut().zip(unique_id) {
            *dst = *src as _;
        }
        let mut comm: sys::ncclComm_t = std::ptr::null_mut();
        // SAFETY: `comm` is a valid out-pointer; rank < world is checked by NCCL.
        unsafe { result::comm_init_rank(&mut comm, world as i32, id, rank as i32) }
            .map_err(|e| fail("init", rank, format!("ncclCommInitRank: {e:?}")))?;
        Ok(NcclCollective {
            comm,
            rank,
            world,
            device,
        })
    }

    fn stream(&self) -> sys::cudaStream_t {
        xvlm_model::runtime::current_cuda_stream(self.device) as sys::cudaStream_t
    }

    fn check(&self, op: &'static str, t: &Tensor) -> Result<sys::ncclDataType_t, CollectiveError> {
        if t.device() != Device::Cuda(self.device) {
            return Err(fail(
                op,
                self.rank,
                format!(
                    "tensor on {:?}, communicator on cuda:{}",
                    t.device(),
                    self.device
                ),
            ));
        }
        if !t.is_contiguous() {
            return Err(fail(op, self.rank, "tensor is not contiguous"));
        }
        Ok(match t.kind() {
            Kind::Float => sys::ncclDataType_t::ncclFloat32,
            Kind::Double => sys::ncclDataType_t::ncclFloat64,
            Kind::Half => sys::ncclDataType_t::ncclFloat16,
            Kind::BFloat16 => sys::ncclDataType_t::ncclBfloat16,
            Kind::Int => sys::ncclDataType_t::ncclInt32,
            Kind::Int64 => sys::ncclDataType_t::ncclInt64,
            Kind::Uint8 | Kind::Bool => sys::ncclDataType_t::ncclUint8,
            other => return Err(fail(op, self.rank, format!("unsupported kind {other:?}"))),
        })
    }
}

impl Drop for NcclCollective {
    fn drop(&mut self) {
        // Abort rather than destroy: a failed generation must not wait on peers that are gone.
        // SAFETY: `comm` came from ncclCommInitRank and is dropped once.
        let _ = unsafe { result::comm_abort(self.comm) };
    }
}

impl Collective for NcclCollective {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    fn all_reduce_sum(&self, tensor: &mut Tensor) -> Result<(), CollectiveError> {
        let dtype = self.check("all_reduce_sum", tensor)?;
        let ptr = tensor.data_ptr();
        // SAFETY: in-place all-reduce on the tensor's device memory, enqueued on its current stream.
        unsafe {
            result::all_reduce(
                ptr as *const c_void,
                ptr,
                tensor.numel(),
                dtype,
                sys::ncclRedOp_t::ncclSum,
                self.comm,
                self.stream(),
            )
        }
        .map(|_| ())
        .map_err(|e| fail("all_reduce_sum", self.rank, format!("{e:?}")))
    }

    fn all_gather(&self, tensor: &Tensor) -> Result<Vec<Tensor>, CollectiveError> {
        let local = tensor.detach().contiguous();
        let dtype = self.check("all_gather", &local)?;
        let n = local.numel() as i64;
        let out = Tensor::empty([n * self.world as i64], (local.kind(), local.device()));
        // SAFETY: `out` holds world * n elements on the same device.
        unsafe {
            result::all_gather(
                local.data_ptr() as *const c_void,
                out.data_ptr(),
                n as usize,
                dtype,
                self.comm,
                self.stream(),
            )
        }
        .map_err(|e| fail("all_gather", self.rank, format!("{e:?}")))?;
        let shape = tensor.size();
        Ok((0..self.world)
            .map(|r| {
                if r == self.rank {
                    tensor.shallow_clone()
                } else {
                    out.narrow(0, r as i64 * n, n).view(shape.as_slice())
                }
            })
            .collect())
    }

    fn broadcast(&self, tensor: &mut Tensor, root: usize) -> Result<(), CollectiveError> {
        let dtype = self.check("broadcast", tensor)?;
        let ptr = tensor.data_ptr();
        // SAFETY: in-place broadcast on device memory.
        unsafe {
            result::broadcast(
                ptr as *const c_void,
                ptr,
                tensor.numel(),
                dtype,
                root as i32,
                self.comm,
                self.stream(),
            )
        }
        .map(|_| ())
        .map_err(|e| fail("broadcast", self.rank, format!("{e:?}")))
    }

    fn barrier(&self) -> Result<(), CollectiveError> {
        let mut t = Tensor::ones([1], (Kind::Float, Device::Cuda(self.device)));
        self.all_reduce_sum(&mut t)?;
        // Reading the value synchronises the stream.
        let got = t.double_value(&[0]);
        if got as usize != self.world {
            return Err(fail("barrier", self.rank, format!("counted {got} ranks")));
        }
        Ok(())
    }
}
