//! The X-VLM model in tch: encoders, pre-training and fine-tuning tasks, checkpoints, optimizer and data.
//!
//! Numerics follow the official PyTorch code (see `../shared/XVLM-REFERENCE.md`); the parity fixtures in
//! `tests/fixtures/parity/` are the definition of correct.

pub mod checkpoint;
pub mod collective;
pub mod config;
pub mod data;
pub mod loss;
pub mod metrics;
pub mod optim;
pub mod parity;
pub mod runtime;
pub mod tasks;
pub mod text;
pub mod train;
pub mod vision;
pub mod xvlm;

/// The parity fixtures shipped with the project (`tests/fixtures/parity/`).
pub fn fixtures_dir() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/parity")
}
