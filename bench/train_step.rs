//! CPU cost of pre-training: one optimizer step (forward + backward + AdamW) on an image-text batch and
//! on a region batch, and one eval forward (no_grad), for the tiny config and the real base config
//! (Swin-B 224 + BERT-base), fp32, random weights and inputs.
//!
//! Run: `cargo bench -p xvlm-model --bench train_step --profile dev -- [--iters N] [--batch B]
//! [--threads T] [--only tiny|base] [--device cpu|cuda] [--configs DIR] [--json FILE]` (defaults: 3
//! timed iterations after 1 warm-up, batch 2, 2 threads, CPU, the repository's `configs/`). `--json`
//! also writes one JSON line per config with each phase's times under the phase names of the official
//! side (`../shared/bench/official_step_bench.py`), which `scripts/step-speed.sh` compares. On CUDA a config
//! with `FP16_OPT_LEVEL` O1 trains with fp16 autocast and loss scaling. Without `--bench` in its
//! arguments (e.g. under `cargo test --all-targets`) it does nothing, so test runs stay fast.

use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};
use xvlm_model::collective::SingleProcess;
use xvlm_model::config::TaskConfig;
use xvlm_model::loss::MultinomialSampler;
use xvlm_model::optim::{is_pretrain_init_param, named_trainable_params, AdamW, Gradients};
use xvlm_model::tasks::{PretrainBatch, PretrainModel, RegionInputs};
use xvlm_model::train::{PretrainTrainer, StepKind};

struct Options {
    iters: usize,
    batch: i64,
    threads: i32,
    only: Option<String>,
    device: Device,
    configs: std::path::PathBuf,
    json: Option<std::path::PathBuf>,
}

fn parse_options(args: &[String]) -> Result<Options> {
    let mut o = Options {
        iters: 3,
        batch: 2,
        threads: 2,
        only: None,
        device: Device::Cpu,
        configs: Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs"),
        json: None,
    };
    let mut it = args.iter().skip(1);
    while let Some(a) = it.next() {
        let mut value = |name: &str| {
            it.next()
                .with_context(|| format!("{name} needs a value"))
                .cloned()
        };
        match a.as_str() {
            "--iters" => o.iters = value("--iters")?.parse().context("--iters")?,
            "--batch" => o.batch = value("--batch")?.parse().context("--batch")?,
            "--threads" => o.threads = value("--threads")?.parse().context("--threads")?,
            "--only" => o.only = Some(value("--only")?),
            "--configs" => o.configs = value("--configs")?.into(),
            "--json" => o.json = Some(value("--json")?.into()),
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
    if o.iters == 0 || o.batch < 2 {
        bail!("--iters must be >= 1 and --batch >= 2 (ITM needs a negative)");
    }
    Ok(o)
}

/// A random image-text batch (or region batch: one image, `b` texts with random patch masks) shaped as
/// the task config's loader would produce it.
fn random_batch(
    task: &TaskConfig,
    vocab: i64,
    b: i64,
    region: bool,
    device: Device,
) -> Result<PretrainBatch> {
    let res = task.image_res;
    let len = task.max_tokens.context("max_tokens")? as i64;
    let masks = task.max_masks.context("max_masks")? as i64;
    let opts = (Kind::Int64, Device::Cpu);
    let text_ids = Tensor::randint_low(1000.min(vocab - 1), vocab, [b, len], opts);
    let _ = text_ids.narrow(1, 0, 1).fill_(2);
    let text_atts = Tensor::ones([b, len], opts);
    let _ = text_atts.narrow(1, len - 2, 2).fill_(0);
    let masked_pos = Tensor::randint_low(1, len - 2, [b, masks], opts);
    let masked_ids = text_ids.gather(1, &masked_pos, false);
    let text_ids_masked = text_ids.scatter_value(1, &masked_pos, 4);
    let images = if region { 1 } else { b };
    let image = Tensor::randn([images, 3, res, res], (Kind::Float, Device::Cpu));
    let region = region.then(|| {
        let grid = res / task.patch_size;
        let patches = Tensor::randint(2, [b, grid * grid], opts);
        let _ = patches.narrow(1, 0, 1).fill_(1);
        RegionInputs {
            idx_to_group_img: Tensor::zeros([b], opts),
            image_atts: Tensor::cat(&[Tensor::ones([b, 1], opts), patches], 1),
            target_bbox: Tensor::rand([b, 4], (Kind::Float, Device::Cpu)) * 0.4 + 0.3,
            is_image: Tensor::zeros([b], opts),
        }
    });
    Ok(PretrainBatch {
        image: image.to_device(device),
        text_ids: text_ids.to_device(device),
        text_atts: text_atts.to_device(device),
        text_ids_masked: text_ids_masked.to_device(device),
        masked_pos: masked_pos.to_device(device),
        masked_ids: masked_ids.to_device(device),
        region: region.map(|r| RegionInputs {
            idx_to_group_img: r.idx_to_group_img.to_device(device),
            image_atts: r.image_atts.to_device(device),
            target_bbox: r.target_bbox.to_device(device),
            is_image: r.is_image.to_device(device),
        }),
    })
}

/// The seconds of each timed run of one phase.
struct Timing(Vec<f64>);

impl Timing {
    fn mean(&self) -> f64 {
        self.0.iter().sum::<f64>() / self.0.len() as f64
    }

    fn min(&self) -> f64 {
        self.0.iter().cloned().fold(f64::INFINITY, f64::min)
    }

    /// `{"mean", "min", "times"}`, as the official side writes a phase.
    fn json(&self) -> serde_json::Value {
        serde_json::json!({"mean": self.mean(), "min": self.min(), "times": self.0})
    }
}

/// The peak resident set of this process so far (`VmHWM`), in MiB.
fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// `iters` timed runs after one warm-up run (CUDA work included: synchronised).
fn time(iters: usize, device: Device, mut f: impl FnMut() -> Result<()>) -> Result<Timing> {
    let sync = || {
        if let Device::Cuda(i) = device {
            tch::Cuda::synchronize(i as i64);
        }
    };
    f()?;
    sync();
    let mut times = Vec::with_capacity(iters);
    for _ in 0..iters {
        let start = Instant::now();
        f()?;
        sync();
        times.push(start.elapsed().as_secs_f64());
    }
    Ok(Timing(times))
}

/// Benchmarks one config; its phases and peak RSS as one JSON object.
fn bench_config(label: &str, path: &Path, o: &Options) -> Result<serde_json::Value> {
    let task = TaskConfig::load(path).with_context(|| format!("loading {}", path.display()))?;
    let vocab = task.load_text_config()?.vocab_size;
    tch::manual_seed(0);
    let vs = VarStore::new(o.device);
    let model = PretrainModel::new(&vs.root(), &task)?;
    let params: i64 = vs
        .trainable_variables()
        .iter()
        .map(Tensor::numel)
        .sum::<usize>() as i64;
    let mut trainer = PretrainTrainer::from_task(&model, &vs, &task, 1)?;
    let general = random_batch(&task, vocab, o.batch, false, o.device)?;
    let region = random_batch(&task, vocab, o.batch, true, o.device)?;
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "{label}: {} ({params} parameters), image_res {}, max_tokens {}, batch {}, {:?}, {}, \
         {} threads (load average at start: {})",
        path.display(),
        task.image_res,
        task.max_tokens.unwrap_or(0),
        o.batch,
        o.device,
        if trainer.settings().mixed_precision {
            "fp16 autocast + loss scaling"
        } else {
            "fp32"
        },
        tch::get_num_threads(),
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
    let mut sampler = MultinomialSampler::new(0);
    let mut logs = Vec::new();
    let train_general = time(o.iters, o.device, || {
        logs.push(trainer.step(StepKind::General, &[&general], &SingleProcess, &mut sampler)?);
        Ok(())
    })?;
    report("train step, image-text batch", &train_general);
    let train_region = time(o.iters, o.device, || {
        logs.push(trainer.step(StepKind::Region, &[&region], &SingleProcess, &mut sampler)?);
        Ok(())
    })?;
    report("train step, region batch (1 image)", &train_region);
    let losses: Vec<String> = logs
        .iter()
        .map(|l| format!("{:.4}", l.loss_total))
        .collect();
    let skipped = logs.iter().filter(|l| l.skipped).count();
    println!(
        "  step losses {}, {skipped} skipped, loss scale {:?}",
        losses.join(" "),
        trainer.scaler().map(|s| s.scale)
    );
    if logs.iter().any(|l| !l.loss_total.is_finite()) {
        bail!("{label}: a training loss is not finite");
    }
    let eval_forward = time(o.iters, o.device, || {
        tch::no_grad(|| model.forward(&general, &SingleProcess, &mut sampler, false))?;
        Ok(())
    })?;
    report("eval forward (no_grad), image-text batch", &eval_forward);
    // The optimizer's share: clipping + AdamW over every parameter with a gradient.
    let mut adamw = AdamW::new(
        named_trainable_params(&vs),
        task.optimizer.as_ref().context("optimizer")?,
        is_pretrain_init_param,
    )?;
    adamw.set_lr_factor(0.5);
    let clip_adamw = time(o.iters, o.device, || {
        let grads = Gradients::from_options(
            adamw
                .params()
                .iter()
                .map(|p| Some(p.tensor.ones_like()))
                .collect(),
        );
        // The engine's path: the clip factor is applied inside the (fused) AdamW pass.
        let (_, coef) = grads.clip_coefficient(1.0)?;
        adamw.step_scaled(&grads, Some(coef))?;
        Ok(())
    })?;
    report("of which clip + AdamW alone", &clip_adamw);
    Ok(serde_json::json!({
        "bench": "train_step",
        "config": label,
        "params": params,
        "batch": o.batch,
        "threads": tch::get_num_threads(),
        "peak_rss_mib": peak_rss_mib(),
        "phases": {
            "train_general": train_general.json(),
            "train_region": train_region.json(),
            "eval_forward": eval_forward.json(),
            "clip_adamw": clip_adamw.json(),
        },
    }))
}

/// One phase's line: mean and min seconds.
fn report(phase: &str, t: &Timing) {
    println!("  {phase}: mean {:.3} s, min {:.3} s", t.mean(), t.min());
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if !args.iter().any(|a| a == "--bench") {
        println!("train_step: benchmark; run it with `cargo bench -p xvlm-model --bench train_step --profile dev`");
        return Ok(());
    }
    let o = parse_options(&args)?;
    tch::set_num_threads(o.threads);
    let configs = [
        ("tiny", o.configs.join("Pretrain_XVLM_tiny.yaml")),
        ("base", o.configs.join("Pretrain_XVLM_base_4m.yaml")),
    ];
    for (label, path) in &configs {
        if o.only.as_deref().is_some_and(|only| only != *label) {
            continue;
        }
        let result = bench_config(label, path, &o)?;
        if let Some(json) = &o.json {
            let mut file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(json)
                .with_context(|| format!("--json {}", json.display()))?;
            use std::io::Write;
            writeln!(file, "{result}").with_context(|| format!("writing {}", json.display()))?;
        }
    }
    Ok(())
}
