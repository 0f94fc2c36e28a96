//! Named tensors to and from safetensors bytes (kept in memory so they can be hashed and uploaded).

use safetensors::tensor::{Dtype, TensorView};
use tch::{Kind, Tensor};

use super::CheckpointError;

fn dtype(kind: Kind) -> Option<Dtype> {
    Some(match kind {
        Kind::Float => Dtype::F32,
        Kind::Double => Dtype::F64,
        Kind::Half => Dtype::F16,
        Kind::BFloat16 => Dtype::BF16,
        Kind::Int64 => Dtype::I64,
        Kind::Int => Dtype::I32,
        Kind::Int16 => Dtype::I16,
        Kind::Int8 => Dtype::I8,
        Kind::Uint8 => Dtype::U8,
        Kind::Bool => Dtype::BOOL,
        _ => return None,
    })
}

fn kind(dtype: Dtype) -> Option<Kind> {
    Some(match dtype {
        Dtype::F32 => Kind::Float,
        Dtype::F64 => Kind::Double,
        Dtype::F16 => Kind::Half,
        Dtype::BF16 => Kind::BFloat16,
        Dtype::I64 => Kind::Int64,
        Dtype::I32 => Kind::Int,
        Dtype::I16 => Kind::Int16,
        Dtype::I8 => Kind::Int8,
        Dtype::U8 => Kind::Uint8,
        Dtype::BOOL => Kind::Bool,
        _ => return None,
    })
}

/// Host copies of named tensors: what a save holds while the upload runs. Every tensor is a
/// contiguous CPU tensor owned by this value (so its bytes can be borrowed without another copy).
pub struct HostTensors(Vec<(String, Tensor)>);

impl HostTensors {
    /// Deep-copies `tensors` into contiguous CPU memory (the only part of a save the step waits for).
    pub fn copy_of(tensors: &[(String, Tensor)]) -> HostTensors {
        HostTensors(
            tensors
                .iter()
                .map(|(k, t)| {
                    let host =
                        tch::no_grad(|| t.detach().to_device(tch::Device::Cpu).contiguous().copy());
                    (k.clone(), host)
                })
                .collect(),
        )
    }

    /// Whether there are no tensors.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Total bytes of tensor data.
    pub fn bytes(&self) -> usize {
        self.0
            .iter()
            .map(|(_, t)| t.numel() * t.kind().elt_size_in_bytes())
            .sum()
    }

    /// Serialises as a safetensors file.
    pub fn to_safetensors(&self, what: &str) -> Result<Vec<u8>, CheckpointError> {
        let buffers: Vec<&[u8]> = self
            .0
            .iter()
            .map(|(_, t)| {
                let n = t.numel() * t.kind().elt_size_in_bytes();
                if n == 0 {
                    return &[][..];
                }
                // SAFETY: `copy_of` made every tensor a contiguous CPU tensor that `self` owns and
                // nothing else writes; the slice lives no longer than `self`.
                unsafe { std::slice::from_raw_parts(t.data_ptr() as *const u8, n) }
            })
            .collect();
        let mut views = Vec::with_capacity(self.0.len());
        for ((name, t), buf) in self.0.iter().zip(&buffers) {
            let dt = dtype(t.kind()).ok_or_else(|| {
                CheckpointError::Format(format!("{what}: {name}: dtype {:?}", t.kind()))
            })?;
            let shape: Vec<usize> = t.size().iter().map(|&d| d as usize).collect();
            let view = TensorView::new(dt, shape, buf)
                .map_err(|e| CheckpointError::Format(format!("{what}: {name}: {e}")))?;
            views.push((name.clone(), view));
        }
        safetensors::serialize(views, None)
            .map_err(|e| CheckpointError::Format(format!("{what}: {e}")))
    }
}

/// Parses safetensors bytes into CPU tensors, in file order of names.
pub fn from_safetensors(data: &[u8], what: &str) -> Result<Vec<(String, Tensor)>, CheckpointError> {
    let st = safetensors::SafeTensors::deserialize(data)
        .map_err(|e| CheckpointError::Format(format!("{what}: {e}")))?;
    let mut out = Vec::new();
    let mut names: Vec<String> = st.names().into_iter().map(str::to_string).collect();
    names.sort();
    for name in names {
        let view = st
            .tensor(&name)
            .map_err(|e| CheckpointError::Format(format!("{what}: {name}: {e}")))?;
        let k = kind(view.dtype()).ok_or_else(|| {
            CheckpointError::Format(format!("{what}: {name}: dtype {:?}", view.dtype()))
        })?;
        let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
        let t = Tensor::f_from_data_size(view.data(), &shape, k)
            .map_err(|e| CheckpointError::Format(format!("{what}: {name}: {e}")))?;
        out.push((name, t));
    }
    Ok(out)
}
