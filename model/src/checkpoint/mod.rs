//! Checkpoints: official `torch.save` files (`torch_zip` + `torch_pickle`), safetensors (`safetensors`), loading a
//! state dict into a `VarStore` with a report (`load`), the official key handling and position-table
//! resizing (`official`, `resize`).
//!
//! A state dict is a sorted map from the official dotted key to a tensor; tied weights appear under every
//! official key (as in a PyTorch `state_dict()`).

pub mod hf_text;
pub mod load;
pub mod official;
pub mod resize;
pub mod safetensors;
pub mod torch_pickle;
pub mod torch_zip;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub use self::safetensors::{read_safetensors, write_safetensors};
pub use hf_text::text_init_state_dict;
pub use load::{add_aliases, load_state_dict, varstore_state_dict, LoadOptions, LoadReport};
pub use official::{adapt_for_finetune, vision_init_state_dict};
pub use resize::{interpolate_pos_embed, interpolate_relative_pos_embed};
pub use torch_pickle::{read_torch_file, TorchFile};

/// Official key → tensor (sorted by key).
pub type StateDict = BTreeMap<String, tch::Tensor>;

/// Errors reading, writing, converting or loading checkpoints.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// The file does not exist or cannot be opened.
    #[error("cannot open checkpoint {path}: {source}")]
    Open {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not in a format we read.
    #[error("{path} is not a readable checkpoint: {reason}")]
    Format {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// Writing failed.
    #[error("cannot write checkpoint {path}: {reason}")]
    Write {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// Tensors in the checkpoint don't have the model's shapes.
    #[error("shape mismatch for {} key(s): {}", .0.len(), format_mismatches(.0))]
    ShapeMismatch(Vec<ShapeMismatch>),
    /// A strict load found missing or unexpected keys.
    #[error("strict load failed: missing {missing:?}, unexpected {unexpected:?}")]
    Keys {
        /// Model keys absent from the checkpoint.
        missing: Vec<String>,
        /// Checkpoint keys the model does not have.
        unexpected: Vec<String>,
    },
    /// A required key is absent.
    #[error("checkpoint lacks key {0}")]
    MissingKey(String),
    /// A resize cannot be done (table not square, too small for a cubic fit, ...).
    #[error("cannot resize {key}: {reason}")]
    Resize {
        /// The key being resized.
        key: String,
        /// Why.
        reason: String,
    },
    /// A libtorch error while copying tensors.
    #[error("libtorch error: {0}")]
    Torch(#[from] tch::TchError),
}

/// One key whose tensor has another shape than the model's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShapeMismatch {
    /// The official key.
    pub key: String,
    /// Shape in the model.
    pub model: Vec<i64>,
    /// Shape in the checkpoint.
    pub checkpoint: Vec<i64>,
}

fn format_mismatches(m: &[ShapeMismatch]) -> String {
    m.iter()
        .map(|s| {
            format!(
                "{} (model {:?}, checkpoint {:?})",
                s.key, s.model, s.checkpoint
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Reads a state dict from an official `torch.save` file (`{'model': sd, ...}` or a bare state dict) or a
/// safetensors file; the format is recognised from the content, not the extension.
pub fn read_state_dict(path: &Path) -> Result<StateDict, CheckpointError> {
    if safetensors::is_safetensors(path)? {
        Ok(read_safetensors(path)?.into_iter().collect())
    } else {
        Ok(read_torch_file(path)?.state_dict())
    }
}
