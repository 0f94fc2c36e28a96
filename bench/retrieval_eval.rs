//! CPU cost of the retrieval evaluation (`RetrievalModel::evaluate`, world size 1) for the base model of
//! a retrieval config (default `configs/Retrieval_coco.yaml`: Swin-B 384 + BERT-base), random weights,
//! random images and captions: N images x 5N captions for a few N, small k_test. Reports images/s and
//! texts/s encoded, ITM pairs/s, and the peak resident memory (VmHWM) after each N.
//!
//! Run: `cargo bench -p xvlm-model --bench retrieval_eval --profile dev -- --bench [--sizes 8,16,32]
//! [--k 4] [--threads 2] [--config FILE] [--device cpu|cuda]`. Without `--bench` in its arguments (e.g.
//! under `cargo test --all-targets`) it does nothing.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};
use xvlm_model::collective::SingleProcess;
use xvlm_model::config::TaskConfig;
use xvlm_model::metrics::retrieval::GroundTruth;
use xvlm_model::tasks::retrieval::eval::{RetrievalEvalConfig, SplitTensors};
use xvlm_model::tasks::RetrievalModel;

const CAPTIONS: usize = 5;

struct Options {
    sizes: Vec<usize>,
    k_test: usize,
    threads: i32,
    config: PathBuf,
    device: Device,
}

fn parse_options(args: &[String]) -> Result<Options> {
    let mut o = Options {
        sizes: vec![8, 16, 32],
        k_test: 4,
        threads: 2,
        config: Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/Retrieval_coco.yaml"),
        device: Device::Cpu,
    };
    let mut it = args.iter().skip(1);
    while let Some(a) = it.next() {
        let mut value = |name: &str| {
            it.next()
                .with_context(|| format!("{name} needs a value"))
                .cloned()
        };
        match a.as_str() {
            "--sizes" => {
                o.sizes = value("--sizes")?
                    .split(',')
                    .map(|s| s.trim().parse().context("--sizes"))
                    .collect::<Result<_>>()?
            }
            "--k" => o.k_test = value("--k")?.parse().context("--k")?,
            "--threads" => o.threads = value("--threads")?.parse().context("--threads")?,
            "--config" => o.config = value("--config")?.into(),
            "--device" => {
                o.device = match value("--device")?.as_str() {
                    "cpu" => Device::Cpu,
                    "cuda" => {
                        if let Err(e) = xvlm_model::runtime::load_cuda_backend() {
                            bail!("--device cuda: {e}");
                        }
                        if !tch::Cuda::is_available() {
                            bail!("--device cuda: no CUDA device is visible");
                        }
                        Device::Cuda(0)
                    }
                    other => bail!("--device {other}: expected cpu or cuda"),
                }
            }
            "--bench" => {}
            other if other.starts_with("--") => bail!("unknown option {other}"),
            _ => {}
        }
    }
    if o.sizes.contains(&0) || o.k_test == 0 {
        bail!("--sizes and --k must be >= 1");
    }
    Ok(o)
}

/// `VmHWM` (peak resident set) of this process in MiB.
fn peak_rss_mib() -> Result<f64> {
    let status =
        std::fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .context("no VmHWM in /proc/self/status")?;
    let kib: f64 = line
        .split_whitespace()
        .nth(1)
        .context("VmHWM without a value")?
        .parse()
        .context("VmHWM value")?;
    Ok(kib / 1024.0)
}

/// N random images and 5N random captions (random lengths) shaped as the test loader gives them.
fn random_split(task: &TaskConfig, vocab: i64, n: usize) -> Result<(SplitTensors, GroundTruth)> {
    let len = task.max_tokens.context("max_tokens")? as i64;
    let nt = (n * CAPTIONS) as i64;
    let opts = (Kind::Int64, Device::Cpu);
    let res = task.image_res;
    let ids = Tensor::randint_low(1000.min(vocab - 1), vocab, [nt, len], opts);
    let _ = ids.narrow(1, 0, 1).fill_(101);
    let lens = Tensor::randint_low(8, len + 1, [nt, 1], opts);
    let atts = Tensor::arange(len, opts)
        .unsqueeze(0)
        .lt_tensor(&lens)
        .to_kind(Kind::Int64);
    let gt = GroundTruth::new(
        (0..n * CAPTIONS).map(|t| t / CAPTIONS).collect(),
        (0..n)
            .map(|i| (i * CAPTIONS..(i + 1) * CAPTIONS).collect())
            .collect(),
    )?;
    Ok((
        SplitTensors {
            images: Tensor::randn([n as i64, 3, res, res], (Kind::Float, Device::Cpu)),
            text_ids: &ids * &atts,
            text_atts: atts,
        },
        gt,
    ))
}

fn run(o: &Options) -> Result<()> {
    tch::set_num_threads(o.threads);
    let task =
        TaskConfig::load(&o.config).with_context(|| format!("loading {}", o.config.display()))?;
    let vocab = task.load_text_config()?.vocab_size;
    tch::manual_seed(0);
    let vs = VarStore::new(o.device);
    let model = RetrievalModel::new(&vs.root(), &task)?;
    let params: usize = vs.trainable_variables().iter().map(Tensor::numel).sum();
    let base = RetrievalEvalConfig::from_task(&task)?;
    let cfg = RetrievalEvalConfig {
        k_test: o.k_test,
        itm_batch: o.k_test,
        ..base
    };
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "{} ({params} parameters), image_res {}, max_tokens {}, k_test {}, image batch {}, text \
         batch {}, {:?}, {} threads (load average at start: {}); model loaded: peak RSS {:.0} MiB",
        o.config.display(),
        task.image_res,
        task.max_tokens.unwrap_or(0),
        cfg.k_test,
        cfg.image_batch,
        cfg.text_batch,
        o.device,
        tch::get_num_threads(),
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" "),
        peak_rss_mib()?
    );
    println!(
        "{:>4} {:>5} {:>9} {:>9} {:>9} {:>10} {:>8} {:>9} {:>10}",
        "N",
        "texts",
        "images/s",
        "texts/s",
        "ITM pairs",
        "ITM pairs/s",
        "total s",
        "TR@1",
        "peak MiB"
    );
    for &n in &o.sizes {
        let (mut split, gt) = random_split(&task, vocab, n)?;
        let start = Instant::now();
        let out = model.evaluate(&SingleProcess, &gt, &mut split, &cfg)?;
        let total = start.elapsed().as_secs_f64();
        let t = out.timings;
        println!(
            "{:>4} {:>5} {:>9.2} {:>9.1} {:>9} {:>10.1} {:>8.1} {:>9.1} {:>10.0}",
            n,
            gt.n_texts(),
            n as f64 / t.images_s,
            gt.n_texts() as f64 / t.texts_s,
            out.itm_pairs,
            out.itm_pairs as f64 / t.itm_s,
            total,
            out.itm.txt_r1,
            peak_rss_mib()?
        );
        println!(
            "       phases: images {:.2} s, texts {:.2} s, similarity {:.3} s, ITM {:.2} s, metrics {:.3} s",
            t.images_s, t.texts_s, t.similarity_s, t.itm_s, t.metrics_s
        );
    }
    Ok(())
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if !args.iter().any(|a| a == "--bench") {
        return Ok(());
    }
    run(&parse_options(&args)?)
}
