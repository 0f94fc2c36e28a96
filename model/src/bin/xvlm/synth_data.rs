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
    /// Smallest shape side, as a fraction of min(height, width / 2).
    #[arg(long, default_value_t = 0.3)]
    shape_min: f64,
    /// Largest shape side, as a fraction of min(height, width / 2).
    #[arg(long, default_value_t = 0.6)]
    shape_max: f64,
    /// Darkest background channel value (each image draws its background colour in this range).
    #[arg(long, default_value_t = 200)]
    background_min: u8,
    /// Brightest background channel value.
    #[arg(long, default_value_t = 250)]
    background_max: u8,
}

/// Generate the corpus and print a summary.
pub fn run(args: &SynthDataArgs) -> Result<()> {
    let cfg = SynthConfig {
        images: args.images,
        seed: args.seed,
        width: args.width,
        height: args.height,
        shards: args.shards,
        shape_side: (args.shape_min, args.shape_max),
        background: (args.background_min, args.background_max),
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
