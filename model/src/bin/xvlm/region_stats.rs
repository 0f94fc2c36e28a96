//! `xvlm region-stats`: what the pre-training region path feeds the model, batch by batch, as json
//! lines (the layout scripts/region-stats-official.py writes for the official `RegionTextJsonDataset`
//! and its `collate_fn`, so scripts/region-stats-compare.py can test the two distributions against
//! each other). Each line is one collated batch: per text its image row, whole-image flag, target box
//! (cx, cy, w, h) / R and patch-mask coverage; per image the mean and standard deviation of its
//! normalised pixels.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result};
use serde_json::json;
use tch::{Kind, Tensor};
use xvlm_model::data::loader::StreamState;
use xvlm_model::data::pipeline::{PretrainDataConfig, RegionLoader};

#[derive(clap::Args)]
pub struct RegionStatsArgs {
    /// An official-format pre-training task config (`train_file_regions`, `regions:`).
    #[arg(long)]
    config: PathBuf,
    /// Stop after this many texts.
    #[arg(long, default_value_t = 10_000)]
    texts: usize,
    /// Seed of the data stream.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Output file (json lines).
    #[arg(long)]
    out: PathBuf,
}

/// Writes batches until `--texts` texts are recorded.
pub fn run(args: &RegionStatsArgs) -> Result<()> {
    let text = std::fs::read_to_string(&args.config)
        .with_context(|| format!("reading {}", args.config.display()))?;
    let cfg: PretrainDataConfig = serde_yaml::from_str(&text)
        .with_context(|| format!("parsing {}", args.config.display()))?;
    let mut loader = RegionLoader::start(&cfg, 0, 1, args.seed, StreamState::default())?;
    let mut out = std::io::BufWriter::new(
        std::fs::File::create(&args.out)
            .with_context(|| format!("creating {}", args.out.display()))?,
    );
    let mut texts = 0usize;
    while texts < args.texts {
        let (batch, _) = loader.next_batch()?;
        let record = batch_record(
            &batch.image,
            &batch.idx_to_group_img,
            &batch.is_image,
            &batch.target_bbox,
            &batch.image_atts,
        )?;
        texts += batch.is_image.size()[0] as usize;
        writeln!(out, "{record}")?;
    }
    out.flush()?;
    println!("{texts} texts written to {}", args.out.display());
    Ok(())
}

/// One batch's json record.
fn batch_record(
    image: &Tensor,
    idx_to_group_img: &Tensor,
    is_image: &Tensor,
    target_bbox: &Tensor,
    image_atts: &Tensor,
) -> Result<serde_json::Value> {
    let rows: Vec<i64> = Vec::try_from(idx_to_group_img)?;
    let whole: Vec<i64> = Vec::try_from(is_image)?;
    let boxes: Vec<Vec<f32>> = Vec::try_from(target_bbox)?;
    // Coverage counts the patches a text may attend to, [CLS] left out.
    let patches = image_atts.size()[1] - 1;
    let covered: Vec<f64> = Vec::try_from(
        (image_atts
            .narrow(1, 1, patches)
            .sum_dim_intlist(1, false, Kind::Float)
            / patches as f64)
            .to_kind(Kind::Double),
    )?;
    let flat = image.flatten(1, -1).to_kind(Kind::Double);
    let means: Vec<f64> = Vec::try_from(flat.mean_dim(1, false, Kind::Double))?;
    let stds: Vec<f64> = Vec::try_from(flat.std_dim(1, true, false))?;
    let texts: Vec<serde_json::Value> = (0..rows.len())
        .map(|t| json!({"img": rows[t], "is_image": whole[t], "box": boxes[t], "cov": covered[t]}))
        .collect();
    let images: Vec<serde_json::Value> = means
        .iter()
        .zip(&stds)
        .map(|(m, s)| json!({"mean": m, "std": s}))
        .collect();
    Ok(json!({"texts": texts, "images": images}))
}
