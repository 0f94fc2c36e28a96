//! Named tensors to and from safetensors bytes (kept in memory so they can be hashed and uploaded).

use std::sync::{Arc, Mutex};

use bytes::Bytes;
use safetensors::tensor::{Dtype, Metadata, TensorInfo};
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

/// Host buffers of earlier saves, kept for the next one: a save that reuses one pays no page faults,
/// which on a fresh buffer cost more than the copy itself. Buffers come back when their upload is
/// done (the last [`Bytes`] of a [`HostFile::into_bytes`] is dropped).
#[derive(Clone, Default)]
pub struct BufferPool(Arc<Mutex<Vec<Vec<u8>>>>);

/// Buffers a pool keeps at most (a rank saves at most two files).
const POOL_BUFFERS: usize = 2;

impl BufferPool {
    /// A buffer of exactly `len` bytes: a kept one of that size, or a new zeroed one.
    fn take(&self, len: usize) -> Vec<u8> {
        let mut pool = self.0.lock().unwrap_or_else(|e| e.into_inner());
        match pool.iter().position(|b| b.len() == len) {
            Some(i) => pool.swap_remove(i),
            None => vec![0u8; len],
        }
    }

    fn give_back(&self, buf: Vec<u8>) {
        let mut pool = self.0.lock().unwrap_or_else(|e| e.into_inner());
        pool.push(buf);
        if pool.len() > POOL_BUFFERS {
            pool.remove(0);
        }
    }

    /// Buffers kept now.
    pub fn kept(&self) -> usize {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

/// A file's buffer that returns to its pool when the last reference is dropped.
struct Pooled {
    buf: Vec<u8>,
    pool: BufferPool,
}

impl AsRef<[u8]> for Pooled {
    fn as_ref(&self) -> &[u8] {
        &self.buf
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        self.pool.give_back(std::mem::take(&mut self.buf));
    }
}

/// A safetensors file assembled in host memory straight from named tensors: what a save holds
/// while the upload runs. Each tensor is copied (from any device) into its final place in the file,
/// so a save costs one copy of the state and no serialisation pass.
pub struct HostFile {
    bytes: Vec<u8>,
    tensors: usize,
    pool: BufferPool,
}

impl HostFile {
    /// Lays out the safetensors header of `tensors` (the `safetensors` crate's order: descending
    /// dtype alignment, then name) and copies every tensor into the file (the only part of a save
    /// the step waits for). `what` names the file in errors.
    /// The buffer comes from `pool` when it holds one of the right size.
    pub fn copy_of(
        tensors: &[(String, Tensor)],
        what: &str,
        pool: &BufferPool,
    ) -> Result<HostFile, CheckpointError> {
        let bad = |name: &str, e: &dyn std::fmt::Display| {
            CheckpointError::Format(format!("{what}: {name}: {e}"))
        };
        let mut items = Vec::with_capacity(tensors.len());
        for (name, t) in tensors {
            let dt = dtype(t.kind()).ok_or_else(|| bad(name, &format!("dtype {:?}", t.kind())))?;
            items.push((name, t, dt));
        }
        items.sort_by(|a, b| b.2.cmp(&a.2).then(a.0.cmp(b.0)));
        let mut infos = Vec::with_capacity(items.len());
        let mut offset = 0usize;
        for (name, t, dt) in &items {
            let len = t.numel() * t.kind().elt_size_in_bytes();
            let shape = t.size().iter().map(|&d| d as usize).collect();
            infos.push((
                name.to_string(),
                TensorInfo {
                    dtype: *dt,
                    shape,
                    data_offsets: (offset, offset + len),
                },
            ));
            offset += len;
        }
        let metadata = Metadata::new(None, infos).map_err(|e| bad("header", &e))?;
        let mut header = serde_json::to_vec(&metadata).map_err(|e| bad("header", &e))?;
        header.resize(header.len().next_multiple_of(8), b' ');
        let start = 8 + header.len();
        // Every byte is written below, so a reused buffer needs no clearing.
        let mut bytes = pool.take(start + offset);
        bytes[..8].copy_from_slice(&(header.len() as u64).to_le_bytes());
        bytes[8..start].copy_from_slice(&header);
        let mut at = start;
        for (_, t, _) in &items {
            let len = t.numel() * t.kind().elt_size_in_bytes();
            copy_into(t, &mut bytes[at..at + len]);
            at += len;
        }
        Ok(HostFile {
            bytes,
            tensors: items.len(),
            pool: pool.clone(),
        })
    }

    /// Whether the file holds no tensors.
    pub fn is_empty(&self) -> bool {
        self.tensors == 0
    }

    /// The file's bytes; the buffer goes back to the pool when the last clone is dropped.
    pub fn into_bytes(self) -> Bytes {
        Bytes::from_owner(Pooled {
            buf: self.bytes,
            pool: self.pool,
        })
    }
}

/// Copies `t` (any device, any strides) into `slot`, its contiguous little-endian bytes.
fn copy_into(t: &Tensor, slot: &mut [u8]) {
    if slot.is_empty() {
        return;
    }
    let src = t.detach();
    let elt = t.kind().elt_size_in_bytes();
    if (slot.as_ptr() as usize).is_multiple_of(elt) {
        let size = t.size();
        let mut strides = vec![1i64; size.len()];
        for i in (0..size.len().saturating_sub(1)).rev() {
            strides[i] = strides[i + 1] * size[i + 1].max(1);
        }
        // SAFETY: `slot` is exactly numel x element-size bytes, aligned for the element type, and
        // outlives `dst`, which is dropped at the end of this block; nothing else touches `slot`.
        let mut dst = unsafe {
            Tensor::from_blob(
                slot.as_mut_ptr(),
                &size,
                &strides,
                t.kind(),
                tch::Device::Cpu,
            )
        };
        tch::no_grad(|| dst.copy_(&src));
    } else {
        let host = src.to_device(tch::Device::Cpu).contiguous();
        host.copy_data_u8(slot, t.numel());
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

#[cfg(test)]
mod tests {
    use super::*;
    use safetensors::tensor::TensorView;

    /// The file is byte for byte what `safetensors::serialize` writes for the same tensors, from
    /// mixed dtypes, a strided (transposed) tensor and an empty one, and it reads back equal.
    #[test]
    fn host_file_equals_the_crates_serialisation() {
        let tensors = vec![
            (
                "b.weight".to_string(),
                Tensor::arange(12, (Kind::Float, tch::Device::Cpu))
                    .view([3, 4])
                    .tr(),
            ),
            ("a.count".to_string(), Tensor::from_slice(&[3i64, -1, 7])),
            (
                "c.half".to_string(),
                Tensor::from_slice(&[1.5f32, -2.0]).to_kind(Kind::Half),
            ),
            (
                "d.empty".to_string(),
                Tensor::zeros([0, 3], (Kind::Float, tch::Device::Cpu)),
            ),
        ];
        let pool = BufferPool::default();
        let file = HostFile::copy_of(&tensors, "test", &pool)
            .unwrap()
            .into_bytes();
        let contiguous: Vec<(String, Tensor)> = tensors
            .iter()
            .map(|(k, t)| (k.clone(), t.contiguous()))
            .collect();
        let buffers: Vec<Vec<u8>> = contiguous
            .iter()
            .map(|(_, t)| {
                let mut b = vec![0u8; t.numel() * t.kind().elt_size_in_bytes()];
                t.copy_data_u8(&mut b, t.numel());
                b
            })
            .collect();
        let views: Vec<(String, TensorView)> = contiguous
            .iter()
            .zip(&buffers)
            .map(|((k, t), b)| {
                let shape = t.size().iter().map(|&d| d as usize).collect();
                (
                    k.clone(),
                    TensorView::new(dtype(t.kind()).unwrap(), shape, b).unwrap(),
                )
            })
            .collect();
        let expected = safetensors::serialize(views, None).unwrap();
        assert_eq!(file[..], expected[..]);
        let back = from_safetensors(&file, "test").unwrap();
        for (name, t) in &tensors {
            let (_, got) = back.iter().find(|(k, _)| k == name).unwrap();
            assert!(got.equal(t), "{name}");
        }
        // The buffer returns when the last reference goes, and the next file of that size reuses
        // it, overwriting every byte.
        let (first, copy) = (file.as_ptr(), file.clone());
        drop(file);
        assert_eq!(pool.kept(), 0, "a clone is still alive");
        drop(copy);
        assert_eq!(pool.kept(), 1);
        let again = HostFile::copy_of(&tensors, "test", &pool)
            .unwrap()
            .into_bytes();
        assert_eq!(again.as_ptr(), first);
        assert_eq!(again[..], expected[..]);
    }
}
