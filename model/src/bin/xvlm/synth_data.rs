//! `xvlm synth-data`: write the synthetic multi-grained corpus (pre-training shards + fine-tuning files).

use std::path::PathBuf;

use anyhow::{Context, Result};
use xvlm_model::data::synth::{generate, SynthConfig};

#[derive(clap::Args)]
pub struct SynthDataArgs {
    /// Output folder (created).
    #[arg(long)]
    out: PathBuf,
    /// Number of images.
    #[arg(long, default_value_t = 400)]
    images: usize,
    /// Seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Shard files per pre-training format.
    #[arg(long, default_value_t = 4)]
    shards: usize,
    /// Image width in pixels.
    #[arg(long, default_value_t = 160)]
    width: usize,
    /// Image height in pixels.
    #[arg(long, default_value_t = 120)]
    height: usize,
}

/// Generate the corpus and print a summary.
pub fn run(args: &SynthDataArgs) -> Result<()> {
    let cfg = SynthConfig {
        images: args.images,
        seed: args.seed,
        width: args.width,
        height: args.height,
        shards: args.shards,
    };
    let start = std::time::Instant::now();
    let summary = generate(&args.out, &cfg)
        .with_context(|| format!("writing the synthetic corpus to {}", args.out.display()))?;
    println!(
        "wrote {} images (train/val/test {:?}) in {} + {} shards to {} in {:.2}s",
        args.images,
        summary.splits,
        summary.image_text_shards.len(),
        summary.region_shards.len(),
        args.out.display(),
        start.elapsed().as_secs_f64()
    );
    Ok(())
}
