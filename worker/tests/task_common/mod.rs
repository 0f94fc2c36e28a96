//! Shared by the task tests: a synthetic corpus, tiny task configs on it, job specs and ways to run
//! task ranks (pre-training, fine-tuning) in threads with real checkpoints.

#![allow(dead_code)]

pub mod learning;

use std::path::{Path, PathBuf};

use tch::{Device, Tensor};
use xvlm_model::collective::Collective;
use xvlm_model::config::configs_dir;
use xvlm_model::data::synth::{generate, SynthConfig};
use xvlm_proto::spec::JobSpec;
use xvlm_worker::checkpoint::{sha256_hex, Checkpointer, Part, Storage};
use xvlm_worker::trainer::finetune::FinetuneTask;
use xvlm_worker::trainer::pretrain::PretrainTask;
use xvlm_worker::trainer::runner::Runner;
use xvlm_worker::trainer::task::{TaskContext, TrainTask};

/// The text encoder of the tests: the tiny BERT of reference §7 with the synthetic vocabulary's size.
const BERT: &str = r#"{"architectures": ["BertForMaskedLM"], "attention_probs_dropout_prob": 0.1,
  "hidden_act": "gelu", "hidden_dropout_prob": 0.1, "hidden_size": 32, "initializer_range": 0.02,
  "intermediate_size": 64, "layer_norm_eps": 1e-12, "max_position_embeddings": 64,
  "model_type": "bert", "num_attention_heads": 2, "num_hidden_layers": 4, "pad_token_id": 0,
  "type_vocab_size": 2, "vocab_size": 192, "fusion_layer": 2, "encoder_width": 128}"#;

/// A synthetic corpus (30 images: 24 train lines in 2 image-text and 2 region shards) under `dir/data`.
pub fn corpus(dir: &Path) -> PathBuf {
    let data = dir.join("data");
    generate(
        &data,
        &SynthConfig {
            images: 30,
            width: 64,
            height: 48,
            shards: 2,
            ..SynthConfig::default()
        },
    )
    .expect("synthetic corpus");
    data
}

/// Writes the tiny task config (Swin 128 + 4-layer BERT) over `data`'s corpus to `dir/task.yaml`;
/// `batch` image-text pairs per rank, region steps with probability `iter_perc`.
pub fn task_yaml(dir: &Path, data: &Path, batch: usize, iter_perc: f64) -> PathBuf {
    let configs = configs_dir();
    let configs = std::fs::canonicalize(&configs).unwrap_or(configs);
    std::fs::create_dir_all(dir).expect("mkdir");
    std::fs::write(dir.join("bert.json"), BERT).expect("write bert.json");
    let (d, c, t) = (data.display(), configs.display(), dir.display());
    let yaml = format!(
        "train_file: ['{d}/pretrain/image_text']
train_dataset_size: 16
images: {{image_key: binary, is_image_rpath: False, caption_key: caption, tokenized: False, batch_size: {batch}, num_workers: 2}}
train_file_regions: ['{d}/pretrain/regions']
regions: {{image_key: binary, is_image_rpath: False, caption_key: caption, tokenized: False, iter_perc: {iter_perc}, batch_size: 6, max_images: 2, max_regions: 3, min_perc_in_image: 0.5, num_workers: 2}}
use_clip_vit: False
use_swin: True
vision_config: '{c}/config_swin_tiny_128.json'
image_res: 128
patch_size: 32
use_roberta: False
text_config: '{t}/bert.json'
text_encoder: '{d}'
load_bertL_by_sep: False
calc_image_bbox_loss: False
embed_dim: 16
temp: 0.07
max_words: 12
max_tokens: 16
mask_prob: 0.25
max_masks: 3
mask_whole_word: True
skipgram_prb: 0.2
skipgram_size: 3
optimizer: {{opt: adamW, lr: 1e-3, weight_decay: 0.01, lr_mult: 2}}
schedular: {{sched: linear, lr: 1e-3, epochs: 2, num_warmup_steps: 2}}
accelerator: {{SYNCBN: false, FP16_OPT_LEVEL: O0, FP16_LOSS_SCALE: dynamic, RNG_SEED: 42, GRAD_ACCUMULATE_STEPS: 1, CLIP_GRAD_NORM: 5.0}}
"
    );
    let path = dir.join("task.yaml");
    std::fs::write(&path, yaml).expect("write task.yaml");
    path
}

/// A `task: pretrain` job on `config` for `steps` iterations; `extra` is more JSON members (with a
/// leading comma), e.g. `,"checkpoint":{...}` or `,"overrides":{...}`.
pub fn spec(config: &Path, steps: u64, extra: &str) -> JobSpec {
    JobSpec::from_json(&format!(
        r#"{{"name":"pt","task":"pretrain","config":"{}","steps":{steps},"seed":11{extra}}}"#,
        config.display()
    ))
    .expect("job spec")
}

/// A task for this rank of `comm` (1 libtorch thread), reading `shards` when given.
pub fn task(spec: &JobSpec, comm: &dyn Collective, shards: &[String]) -> Runner<PretrainTask> {
    tch::set_num_threads(1);
    let ctx = TaskContext {
        spec,
        rank: comm.rank(),
        world: comm.world_size(),
        device: Device::Cpu,
        shards,
        output: "",
        comm,
    };
    Runner::new(&ctx).expect("pretrain task")
}

/// Runs steps `from..to`, returning the reported losses of each.
pub fn run(
    task: &mut impl TrainTask,
    comm: &dyn Collective,
    from: u64,
    to: u64,
) -> Vec<Vec<(String, f64)>> {
    (from..to)
        .map(|s| task.step(s, comm).expect("step").losses)
        .collect()
}

/// sha256 of every weight, by name.
pub fn hashes(task: &impl TrainTask) -> Vec<(String, String)> {
    task.state()
        .into_iter()
        .map(|(k, t)| {
            let t = t.contiguous();
            let n = t.numel();
            let mut buf = vec![0u8; n * t.kind().elt_size_in_bytes()];
            t.copy_data_u8(&mut buf, n);
            (k, sha256_hex(&buf))
        })
        .collect()
}

/// Deep copies of every weight.
pub fn weights(task: &impl TrainTask) -> Vec<(String, Tensor)> {
    task.state()
        .into_iter()
        .map(|(k, t)| (k, t.detach().copy()))
        .collect()
}

/// `files` shard files of exactly `lines` lines each, cut from the synthetic corpus under `data`:
/// `file://` URLs as the coordinator hands them out.
pub fn shard_files(data: &Path, dir: &Path, files: usize, lines: usize) -> Vec<String> {
    let mut all = Vec::new();
    let mut parts: Vec<PathBuf> = std::fs::read_dir(data.join("pretrain/image_text"))
        .expect("corpus")
        .map(|e| e.expect("entry").path())
        .collect();
    parts.sort();
    for p in parts {
        let text = std::fs::read_to_string(&p).expect("shard");
        all.extend(text.lines().map(str::to_string));
    }
    assert!(all.len() >= files * lines, "corpus too small");
    let out = dir.join("shards");
    std::fs::create_dir_all(&out).expect("mkdir");
    (0..files)
        .map(|k| {
            let path = out.join(format!("part-{k}.jsonl"));
            std::fs::write(&path, all[k * lines..(k + 1) * lines].join("\n") + "\n")
                .expect("write");
            format!("file://{}", path.display())
        })
        .collect()
}

/// The checkpointer of this rank of `comm` in `generation` of the job.
pub fn checkpointer(
    storage: &Storage,
    spec: &JobSpec,
    comm: &dyn Collective,
    generation: u64,
) -> Checkpointer {
    Checkpointer::new(
        storage.clone(),
        spec.checkpoint.clone(),
        comm.rank(),
        comm.world_size(),
        generation,
        serde_json::json!({ "job": spec }),
    )
}

/// Runs steps `from..to` of a job of `total` steps with checkpoints on the job's cadence, then waits
/// for the save in flight and commits it (the one place these tests commit checkpoints).
pub fn train_saving(
    task: &mut impl TrainTask,
    ck: &mut Checkpointer,
    comm: &dyn Collective,
    from: u64,
    to: u64,
    total: u64,
) {
    let mut parts = Vec::new();
    for step in from..to {
        task.step(step, comm).expect("step");
        parts.extend(ck.after_step(step + 1, total, &*task).expect("after_step"));
    }
    parts.extend(ck.finish().expect("upload"));
    commit_parts(ck.storage(), parts, comm);
}

/// Parts reported so far, by storage URL: [`commit_parts`] plays the coordinator.
static PARTS: std::sync::Mutex<Vec<(String, Part)>> = std::sync::Mutex::new(Vec::new());

/// Reports this rank's checkpoint parts and commits a step once every rank's part is in, as the
/// coordinator does; then waits for every rank, so the commit is done when any rank goes on.
fn commit_parts(storage: &Storage, parts: Vec<Part>, comm: &dyn Collective) {
    let url = storage.url_of("");
    {
        let mut held = PARTS.lock().unwrap_or_else(|e| e.into_inner());
        for part in parts {
            let (step, world) = (part.step, part.world);
            held.push((url.clone(), part));
            let of_step = |(u, p): &(String, Part)| *u == url && p.step == step;
            if held.iter().filter(|x| of_step(x)).count() == world {
                let complete: Vec<Part> = held
                    .iter()
                    .filter(|x| of_step(x))
                    .map(|(_, p)| p.clone())
                    .collect();
                held.retain(|x| !of_step(x));
                storage.commit_parts(&complete, 2).expect("commit");
            }
        }
    }
    comm.barrier().expect("barrier");
}

/// Writes a tiny retrieval task config (Swin 128 + 4-layer BERT) over `data`'s fine-tuning split to
/// `dir/retrieval.yaml`: `batch` pairs per rank, the official transforms.
pub fn retrieval_yaml(dir: &Path, data: &Path, batch: usize, epochs: u64) -> PathBuf {
    let configs = configs_dir();
    let configs = std::fs::canonicalize(&configs).unwrap_or(configs);
    std::fs::create_dir_all(dir).expect("mkdir");
    std::fs::write(dir.join("bert.json"), BERT).expect("write bert.json");
    let (d, c, t) = (data.display(), configs.display(), dir.display());
    let yaml = format!(
        "train_file: ['{d}/finetune/retrieval_train.json']
val_file: '{d}/finetune/retrieval_val.json'
test_file: '{d}/finetune/retrieval_test.json'
image_root: '{d}'
vision_config: '{c}/config_swin_tiny_128.json'
use_clip_vit: False
use_swin: True
image_res: 128
patch_size: 32
use_roberta: False
text_config: '{t}/bert.json'
text_encoder: '{d}'
batch_size_train: {batch}
batch_size_test: 4
batch_size_test_text: 8
max_tokens: 16
embed_dim: 16
temp: 0.07
k_test: 4
optimizer: {{opt: adamW, lr: 1e-3, weight_decay: 0.01, lr_mult: 2}}
schedular: {{sched: linear, lr: 1e-3, epochs: {epochs}, num_warmup_steps: 0.1}}
"
    );
    let path = dir.join("retrieval.yaml");
    std::fs::write(&path, yaml).expect("write retrieval.yaml");
    path
}

/// A fine-tune job of `task` (its job.yaml name) on `config`; `extra` is more JSON members (with a
/// leading comma).
pub fn finetune_spec(task: &str, config: &Path, extra: &str) -> JobSpec {
    JobSpec::from_json(&format!(
        r#"{{"name":"ft","task":"{task}","config":"{}","seed":11{extra}}}"#,
        config.display()
    ))
    .expect("job spec")
}

/// The fine-tune runner of task `T` for this rank of `comm` (1 libtorch thread), writing to `output`.
pub fn finetune_task<T: FinetuneTask>(
    spec: &JobSpec,
    comm: &dyn Collective,
    output: &str,
) -> Runner<T> {
    tch::set_num_threads(1);
    let ctx = TaskContext {
        spec,
        rank: comm.rank(),
        world: comm.world_size(),
        device: Device::Cpu,
        shards: &[],
        output,
        comm,
    };
    Runner::new(&ctx).unwrap_or_else(|e| panic!("{} task: {e}", T::NAME))
}

/// The corpus `scripts/demo.sh` writes (400 images, large shapes on a plain background) under
/// `dir/data`.
pub fn demo_corpus(dir: &Path) -> PathBuf {
    let data = dir.join("data");
    generate(
        &data,
        &SynthConfig {
            shape_side: (0.6, 0.95),
            background: (225, 225),
            ..SynthConfig::default()
        },
    )
    .expect("synthetic corpus");
    data
}

/// configs/`name` with its data folder replaced by `data`, its model files named absolutely and each
/// `(from, to)` of `patch` applied, written to `dir/name`.
pub fn demo_config(dir: &Path, name: &str, data: &Path, patch: &[(&str, &str)]) -> PathBuf {
    let configs = configs_dir();
    let configs = std::fs::canonicalize(&configs).unwrap_or(configs);
    let text = std::fs::read_to_string(configs.join(name)).expect("demo config");
    let mut text = text
        .replace("demo-out/data", &data.display().to_string())
        .replace("'configs/", &format!("'{}/", configs.display()));
    for (from, to) in patch {
        assert!(text.contains(from), "{name} has no {from:?}");
        text = text.replace(from, to);
    }
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write config");
    path
}

/// A briefly pre-trained starting checkpoint: `iterations` of Pretrain_XVLM_demo.yaml on `data` (one
/// rank; `extra` job members), written to `dir/pretrained.safetensors`.
pub fn pretrained_checkpoint(dir: &Path, data: &Path, iterations: u64, extra: &str) -> PathBuf {
    let pretrain = demo_config(dir, "Pretrain_XVLM_demo.yaml", data, &[]);
    let spec = spec(&pretrain, iterations, extra);
    let comm = xvlm_model::collective::SingleProcess;
    let mut pretrained = task(&spec, &comm, &[]);
    run(&mut pretrained, &comm, 0, iterations);
    let checkpoint = dir.join("pretrained.safetensors");
    let sd: xvlm_model::checkpoint::StateDict = pretrained.state().into_iter().collect();
    xvlm_model::checkpoint::write_safetensors(&sd, &checkpoint).expect("write checkpoint");
    checkpoint
}

/// The value of metric `name`.
pub fn metric(metrics: &[(String, f64)], name: &str) -> f64 {
    metrics
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| *v)
        .unwrap_or_else(|| panic!("no {name} in {metrics:?}"))
}

/// `rank_body` run by every rank of a local TCP ring of `world` ranks, one thread each; their results
/// in rank order.
fn on_local_ring<R: Send>(
    world: usize,
    rank_body: impl Fn(&xvlm_worker::comm::ring::RingCollective) -> R + Sync,
) -> Vec<R> {
    let ring = xvlm_worker::comm::ring::local_ring(world).expect("ring");
    let body = &rank_body;
    std::thread::scope(|s| {
        let handles: Vec<_> = ring
            .into_iter()
            .map(|comm| s.spawn(move || body(&comm)))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("rank"))
            .collect()
    })
}

/// The closing metrics of a `finish` (an `evaluate: true` job scores its splits) of task `T` by every
/// rank of a local TCP ring of `world` ranks writing to `output`; panics when the ranks disagree.
pub fn finish_at_world<T: FinetuneTask>(
    spec: &JobSpec,
    world: usize,
    output: &str,
) -> Vec<(String, f64)> {
    let metrics = on_local_ring(world, |comm| {
        let mut task = finetune_task::<T>(spec, comm, output);
        task.finish(comm).expect("evaluation")
    });
    for m in &metrics {
        assert_eq!(m, &metrics[0], "ranks disagree at world {world}");
    }
    metrics.into_iter().next().expect("a rank")
}

/// Pre-training iterations of [`shared_pretrained`]'s checkpoint (one rank, 8 pairs per batch).
pub const SHARED_PRETRAIN_ITERATIONS: u64 = 120;

/// The demo corpus and a starting checkpoint pre-trained on it without dropout
/// ([`SHARED_PRETRAIN_ITERATIONS`]), made once per test binary: (data folder, checkpoint, seconds
/// the pre-training took). No dropout, so making it draws nothing from libtorch's global generator
/// that another test of the binary is using.
pub fn shared_pretrained() -> &'static (PathBuf, PathBuf, f64) {
    static SHARED: std::sync::OnceLock<(PathBuf, PathBuf, f64)> = std::sync::OnceLock::new();
    SHARED.get_or_init(|| {
        // Kept for the whole binary: the tests read from it until the process exits.
        let dir = Box::leak(Box::new(tempfile::tempdir().expect("tempdir")));
        let data = demo_corpus(dir.path());
        let started = std::time::Instant::now();
        let checkpoint = pretrained_checkpoint(
            dir.path(),
            &data,
            SHARED_PRETRAIN_ITERATIONS,
            r#","overrides":{"xvlm":{"dropout":false}}"#,
        );
        (data, checkpoint, started.elapsed().as_secs_f64())
    })
}

/// Every weight of task `T` after `steps` training steps on a local TCP ring of `world` ranks;
/// panics when the ranks' weights differ.
pub fn weights_after_steps_at_world<T: FinetuneTask>(
    spec: &JobSpec,
    world: usize,
    steps: u64,
    output: &str,
) -> Vec<(String, Tensor)> {
    let by_rank = on_local_ring(world, |comm| {
        let mut task = finetune_task::<T>(spec, comm, output);
        run(&mut task, comm, 0, steps);
        weights(&task)
    });
    for (r, w) in by_rank.iter().enumerate().skip(1) {
        for ((name, a), (_, b)) in w.iter().zip(&by_rank[0]) {
            assert!(
                a.equal(b),
                "rank {r} of world {world}: {name} differs from rank 0"
            );
        }
    }
    by_rank.into_iter().next().expect("a rank")
}
