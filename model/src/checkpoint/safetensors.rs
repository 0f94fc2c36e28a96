//! safetensors files: read into a state dict, write a state dict (every key, tied tensors as copies).

use std::io::Read;
use std::path::Path;

use tch::{Device, Tensor};

use super::{CheckpointError, StateDict};

/// Whether `path` looks like a safetensors file (8-byte little-endian header length, then `{`).
pub fn is_safetensors(path: &Path) -> Result<bool, CheckpointError> {
    let mut f = std::fs::File::open(path).map_err(|source| CheckpointError::Open {
        path: path.to_path_buf(),
        source,
    })?;
    let mut head = [0u8; 9];
    let mut got = 0;
    while got < head.len() {
        match f.read(&mut head[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(source) => {
                return Err(CheckpointError::Open {
                    path: path.to_path_buf(),
                    source,
                })
            }
        }
    }
    Ok(got == 9 && head[8] == b'{')
}

/// Reads every tensor of a safetensors file (on the CPU).
pub fn read_safetensors(path: &Path) -> Result<Vec<(String, Tensor)>, CheckpointError> {
    if !path.exists() {
        return Err(CheckpointError::Open {
            path: path.to_path_buf(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such file"),
        });
    }
    Tensor::read_safetensors(path).map_err(|e| CheckpointError::Format {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

/// Writes `sd` to `path` (contiguous CPU copies; tensors that share storage become separate copies).
pub fn write_safetensors(sd: &StateDict, path: &Path) -> Result<(), CheckpointError> {
    let tensors: Vec<(&str, Tensor)> = sd
        .iter()
        .map(|(k, t)| (k.as_str(), t.detach().to_device(Device::Cpu).contiguous()))
        .collect();
    Tensor::write_safetensors(&tensors, path).map_err(|e| CheckpointError::Write {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}
