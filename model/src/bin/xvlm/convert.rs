//! `xvlm convert IN OUT`: an official `torch.save` checkpoint (or a safetensors file) to safetensors.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use xvlm_model::checkpoint::{read_state_dict, write_safetensors};

/// Arguments of `xvlm convert`.
#[derive(Args)]
pub struct ConvertArgs {
    /// Input checkpoint: `torch.save` file (`{'model': state_dict, ...}` or a bare state dict) or safetensors.
    pub input: PathBuf,
    /// Output safetensors file (every state-dict key, buffers included; tied tensors as copies).
    pub output: PathBuf,
}

/// Reads the state dict of `input` and writes it to `output`.
pub fn run(args: &ConvertArgs) -> Result<()> {
    let sd = read_state_dict(&args.input)
        .with_context(|| format!("reading {}", args.input.display()))?;
    anyhow::ensure!(!sd.is_empty(), "{} holds no tensors", args.input.display());
    write_safetensors(&sd, &args.output)
        .with_context(|| format!("writing {}", args.output.display()))?;
    let numel: i64 = sd.values().map(|t| t.numel() as i64).sum();
    println!(
        "wrote {} tensors ({numel} elements) to {}",
        sd.len(),
        args.output.display()
    );
    Ok(())
}
