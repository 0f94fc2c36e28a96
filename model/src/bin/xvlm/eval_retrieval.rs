//! `xvlm eval-retrieval`: zero-shot image-text retrieval with a pre-training checkpoint on a held-out
//! split in the official retrieval format (`[{"image": path, "caption": [..]}]`, e.g. the synth-data
//! `finetune/retrieval_test.json`). The checkpoint goes through `load_pretrained` (`bert.` prefixes
//! stripped, Swin tables adapted) into the retrieval model, as `Retrieval.py` does before fine-tuning.
//! Ranks by ITC similarity (and by ITM re-ranking of the ITC top-k) and prints TR/IR R@1/5/10 next to
//! the chance level of a random ranking.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::Deserialize;
use tch::nn::VarStore;
use tch::{Device, Tensor};
use xvlm_model::checkpoint::{adapt_for_finetune, load_state_dict, read_state_dict, LoadOptions};
use xvlm_model::collective::SingleProcess;
use xvlm_model::config::TaskConfig;
use xvlm_model::data::caption::pre_caption;
use xvlm_model::data::tokenizer::TextTokenizer;
use xvlm_model::data::transform::TestTransform;
use xvlm_model::metrics::retrieval::{GroundTruth, RetrievalMetrics};
use xvlm_model::tasks::retrieval::eval::{RetrievalEvalConfig, SplitTensors};
use xvlm_model::tasks::retrieval::RetrievalModel;
use xvlm_model::xvlm::vision_config;

/// Arguments of `xvlm eval-retrieval`.
#[derive(clap::Args)]
pub struct EvalRetrievalArgs {
    /// Pre-training checkpoint (safetensors or `torch.save` file with official keys).
    #[arg(long)]
    checkpoint: PathBuf,
    /// Official-format task config the checkpoint was trained with (model and text keys).
    #[arg(long)]
    config: PathBuf,
    /// Data folder holding `finetune/retrieval_{split}.json` and the images it names (`xvlm synth-data --out`).
    #[arg(long)]
    data: PathBuf,
    /// Split to evaluate (`test` or `val`).
    #[arg(long, default_value = "test")]
    split: String,
    /// Texts re-ranked by ITM per image (and images per text).
    #[arg(long, default_value_t = 10)]
    k_test: usize,
    /// Images per vision-encoder forward (`batch_size_test`).
    #[arg(long, default_value_t = 16)]
    image_batch: usize,
    /// Texts per text-encoder forward (`batch_size_test_text`).
    #[arg(long, default_value_t = 64)]
    text_batch: usize,
}

#[derive(Deserialize)]
struct Entry {
    image: String,
    #[serde(deserialize_with = "one_or_many")]
    caption: Vec<String>,
}

fn one_or_many<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(match OneOrMany::deserialize(d)? {
        OneOrMany::One(s) => vec![s],
        OneOrMany::Many(v) => v,
    })
}

/// The split's images and texts, and the ground-truth maps of `Retrieval.evaluation`.
struct Split {
    tensors: SplitTensors,
    gt: GroundTruth,
}

fn load_split(task: &TaskConfig, data: &Path, split: &str) -> Result<Split> {
    let file = data.join(format!("finetune/retrieval_{split}.json"));
    let text =
        std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
    let entries: Vec<Entry> =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", file.display()))?;
    if entries.is_empty() {
        bail!("{} holds no entries", file.display());
    }
    let vocab = task
        .vocab_dir()
        .with_context(|| format!("{}: missing key `text_encoder`", task.source.display()))?;
    let tokenizer = TextTokenizer::from_dir(&vocab, task.use_roberta)
        .with_context(|| format!("loading the vocabulary from {}", vocab.display()))?;
    let max_words = task.max_words.unwrap_or(30);
    let max_tokens = task.max_tokens.unwrap_or(40);
    let transform = TestTransform::new(task.image_res as usize);
    let (mut pixels, mut ids, mut atts) = (Vec::new(), Vec::new(), Vec::new());
    let (mut txt2img, mut img2txt) = (Vec::new(), Vec::new());
    for (i, e) in entries.iter().enumerate() {
        let path = data.join(&e.image);
        let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        pixels.extend(
            transform
                .apply_bytes(&bytes)
                .with_context(|| format!("decoding {}", path.display()))?,
        );
        let mut mine = Vec::new();
        for c in &e.caption {
            let clean = pre_caption(c, max_words)
                .with_context(|| format!("{}: caption {c:?}", file.display()))?;
            let enc = tokenizer.encode(&clean, max_tokens)?;
            let (row, mask) = tokenizer.pad(&enc.ids, max_tokens);
            mine.push(txt2img.len());
            ids.extend(row);
            atts.extend(mask);
            txt2img.push(i);
        }
        img2txt.push(mine);
    }
    let (ni, nt) = (entries.len() as i64, txt2img.len() as i64);
    let res = task.image_res;
    Ok(Split {
        tensors: SplitTensors {
            images: Tensor::from_slice(&pixels).view([ni, 3, res, res]),
            text_ids: Tensor::from_slice(&ids).view([nt, max_tokens as i64]),
            text_atts: Tensor::from_slice(&atts).view([nt, max_tokens as i64]),
        },
        gt: GroundTruth::new(txt2img, img2txt)
            .with_context(|| format!("{}: ground truth", file.display()))?,
    })
}

fn print_metrics(label: &str, m: &RetrievalMetrics) {
    print_array(label, &m.to_array());
}

fn print_array(label: &str, m: &[f64; 9]) {
    println!(
        "{label:<22} TR R@1 {:6.2}  R@5 {:6.2}  R@10 {:6.2}   IR R@1 {:6.2}  R@5 {:6.2}  R@10 {:6.2}   mean {:6.2}",
        m[0], m[1], m[2], m[4], m[5], m[6], m[8]
    );
}

pub fn run(args: &EvalRetrievalArgs) -> Result<()> {
    let task = TaskConfig::load(&args.config)
        .with_context(|| format!("loading {}", args.config.display()))?;
    let mut split = load_split(&task, &args.data, &args.split)?;

    let vs = VarStore::new(Device::Cpu);
    let model = RetrievalModel::new(&vs.root(), &task)
        .with_context(|| format!("building the model of {}", args.config.display()))?;
    let mut sd = read_state_dict(&args.checkpoint)
        .with_context(|| format!("reading {}", args.checkpoint.display()))?;
    adapt_for_finetune(&mut sd, &vision_config(&task)?, true)
        .with_context(|| format!("adapting {}", args.checkpoint.display()))?;
    let report = load_state_dict(&vs, &sd, &LoadOptions::default())
        .with_context(|| format!("loading {}", args.checkpoint.display()))?;
    if !report.missing.is_empty() {
        bail!(
            "{} lacks {} weights of the retrieval model (e.g. {}): not a checkpoint of this config",
            args.checkpoint.display(),
            report.missing.len(),
            report.missing[0]
        );
    }

    let start = std::time::Instant::now();
    let cfg = RetrievalEvalConfig::new(args.k_test, args.image_batch, args.text_batch);
    let eval = model.evaluate(&SingleProcess, &split.gt, &mut split.tensors, &cfg)?;
    let itc = eval.itc.to_array();
    // A random ranking: text retrieval hits if any of an image's captions lands in the top K, image
    // retrieval if the one right image does.
    let (n_images, n_texts) = (split.gt.n_images(), split.gt.n_texts());
    let per_image = n_texts as f64 / n_images as f64;
    let chance = |k: f64, n: f64, hits: f64| 100.0 * (1.0 - (1.0 - k.min(n) / n).powf(hits));
    let (nt, ni) = (n_texts as f64, n_images as f64);
    let tr = [
        chance(1.0, nt, per_image),
        chance(5.0, nt, per_image),
        chance(10.0, nt, per_image),
    ];
    let ir = [
        100.0 / ni,
        100.0 * 5f64.min(ni) / ni,
        100.0 * 10f64.min(ni) / ni,
    ];
    let (tr_mean, ir_mean) = (tr.iter().sum::<f64>() / 3.0, ir.iter().sum::<f64>() / 3.0);
    let chance = [
        tr[0],
        tr[1],
        tr[2],
        tr_mean,
        ir[0],
        ir[1],
        ir[2],
        ir_mean,
        (tr_mean + ir_mean) / 2.0,
    ];
    println!(
        "zero-shot retrieval on {} ({} images, {} texts), checkpoint {} ({:.1}s)",
        args.data
            .join(format!("finetune/retrieval_{}.json", args.split))
            .display(),
        n_images,
        n_texts,
        args.checkpoint.display(),
        start.elapsed().as_secs_f64()
    );
    // Collapsed features (every image or every text mapped to nearly the same vector) rank at chance.
    let spread = |f: &Tensor| -> f64 {
        let n = f.size()[0];
        let sims = f.matmul(&f.tr());
        let off = (sims.sum(tch::Kind::Double) - sims.trace().to_kind(tch::Kind::Double))
            / ((n * (n - 1)).max(1) as f64);
        off.double_value(&[])
    };
    let (image_spread, text_spread) = (spread(&eval.image_feat), spread(&eval.text_feat));
    println!(
        "mean cosine between different items: images {image_spread:.3}, texts {text_spread:.3} (1.000 = collapsed)"
    );
    print_metrics("ITC similarity", &eval.itc);
    print_metrics(&format!("ITM re-rank (k={})", args.k_test), &eval.itm);
    print_array("chance (random order)", &chance);
    println!(
        "R@1 vs chance (ITC): text retrieval {:.1}% vs {:.1}% ({:.1}x), image retrieval {:.1}% vs {:.1}% ({:.1}x)",
        itc[0],
        chance[0],
        itc[0] / chance[0],
        itc[4],
        chance[4],
        itc[4] / chance[4]
    );
    if image_spread > 0.99 || text_spread > 0.99 {
        println!(
            "note: the ITC features are collapsed (nearly one vector for every image or text), so these \
             rankings are decided by noise: the model has not learned image-text alignment"
        );
    }
    Ok(())
}
