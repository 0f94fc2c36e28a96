//! `task: retrieval` through the real coordinator and two workers: kill -9 of one trainer in the middle
//! of an epoch, generation 2 resumes from the committed checkpoint, and the job ends with final weights
//! sha256-identical to an uninterrupted run, with its per-epoch validation, `best/` checkpoint and
//! closing test evaluation written.

use std::path::Path;
use std::time::Duration;

use xvlm_e2e::checkpoints::{
    committed_checkpoints, gen_logs, last_line, resumed_step, step_after, tensor_hashes,
    trainer_pids,
};
use xvlm_e2e::{alive, text, wait_until, write, Cluster};
use xvlm_model::config::configs_dir;
use xvlm_model::data::synth::{generate, SynthConfig};

/// 48 training pairs, 4 per rank at world 2: 6 steps per epoch, 3 epochs.
const STEPS: u64 = 18;
const EVERY: u64 = 4;

/// The tiny model on the retrieval split under `data`, trained for `epochs`.
fn task_yaml(data: &Path, epochs: u64) -> String {
    let configs = configs_dir();
    let configs = std::fs::canonicalize(&configs).unwrap_or(configs);
    let (d, c) = (data.display(), configs.display());
    format!(
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
text_config: '{c}/config_bert_demo.json'
text_encoder: '{d}'
batch_size_train: 4
batch_size_test: 4
batch_size_test_text: 8
max_tokens: 16
embed_dim: 16
temp: 0.07
k_test: 4
optimizer: {{opt: adamW, lr: 1e-4, weight_decay: 0.01, lr_mult: 2}}
schedular: {{sched: linear, lr: 1e-4, epochs: {epochs}, num_warmup_steps: 0.1}}
"
    )
}

/// A synthetic corpus of 30 images under `dir/data` (48 retrieval training pairs).
fn retrieval_corpus(dir: &Path) -> std::path::PathBuf {
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
    .unwrap();
    data
}

/// A retrieval fine-tune for up to 3 workers, at least 2, no periodic checkpoints and no restarts, on a
/// corpus under `dir`: 48 pairs in global batches of 3 x 4 make 4 steps per epoch, 6 epochs (margin for
/// a drain or a growth to land before the end). Returns the job file.
fn elastic_job(dir: &Path) -> std::path::PathBuf {
    let data = retrieval_corpus(dir);
    let config = write(dir, "retrieval.yaml", &task_yaml(&data, 6));
    let job_yaml = format!(
        "name: ft\ntask: retrieval\nconfig: {}\nseed: 11\nworkers: {{min: 2, max: 3}}\n\
max_restarts: 0\ncheckpoint: {{every_steps: 0, keep_last: 2}}\n",
        config.display()
    );
    write(dir, "job.yaml", &job_yaml)
}

#[test]
fn killed_finetune_trainer_resumes_bit_identical() {
    let dir = tempfile::tempdir().unwrap();
    let data = retrieval_corpus(dir.path());
    let config = write(dir.path(), "retrieval.yaml", &task_yaml(&data, 3));
    let job_yaml = format!(
        "name: ft\ntask: retrieval\nconfig: {}\nseed: 11\nworkers: {{min: 2}}\nmax_restarts: 2\n\
checkpoint: {{every_steps: {EVERY}, keep_last: 2}}\n",
        config.display()
    );
    let c = Cluster::with_workers(dir.path(), &["w0", "w1"]);
    let job = c.submit(&write(dir.path(), "job.yaml", &job_yaml));
    let output = dir.path().join("runs").join(&job);

    wait_until(Duration::from_secs(120), || {
        !committed_checkpoints(&output).is_empty()
    })
    .unwrap_or_else(|| panic!("no checkpoint committed:\n{}", c.logs()));
    let saved = committed_checkpoints(&output)[0];
    let victim = trainer_pids(dir.path(), "w1", &job, 1);
    assert_eq!(victim.len(), 1, "one trainer on w1");
    assert!(alive(victim[0].1), "trainer finished before the kill");
    // SAFETY: plain kill(2) of a pid this test's cluster started.
    unsafe { libc::kill(victim[0].1 as i32, libc::SIGKILL) };

    let watch = c.cli(&["watch", &job]);
    assert!(
        watch.status.success(),
        "{}\n{}",
        text(&watch.stdout),
        c.logs()
    );
    let g2_logs = gen_logs(dir.path(), &["w0", "w1"], &job, 2);
    let resumed = resumed_step(&g2_logs)
        .unwrap_or_else(|| panic!("generation 2 did not resume:\n{g2_logs}\n{}", c.logs()));
    assert!(
        resumed >= saved && resumed.is_multiple_of(EVERY) && resumed < STEPS,
        "resumed from step {resumed}, first commit was {saved}"
    );
    println!("first commit step-{saved}; generation 2 resumed from step-{resumed}");
    // The closing test evaluation reaches the coordinator: `status` shows it.
    let status = c.status(&job);
    assert!(
        status.contains("eval@step-18") && status.contains("test.r_mean="),
        "no test metrics in status:\n{status}"
    );
    for file in [
        "eval/epoch-0.json",
        "eval/epoch-2.json",
        "eval/final.json",
        "best/MANIFEST.json",
    ] {
        assert!(output.join(file).is_file(), "no {file} in {output:?}");
    }

    // The same job, uninterrupted, in another output directory.
    let reference = c.submit(&write(dir.path(), "again.yaml", &job_yaml));
    let watch = c.cli(&["watch", &reference]);
    assert!(watch.status.success(), "{}", c.logs());
    let reference = dir.path().join("runs").join(&reference);
    let got = tensor_hashes(&output.join("final/model.safetensors"));
    let want = tensor_hashes(&reference.join("final/model.safetensors"));
    assert!(!got.is_empty());
    assert_eq!(got, want, "resumed run differs from the uninterrupted one");
    let metrics = |out: &Path| std::fs::read_to_string(out.join("eval/final.json")).unwrap();
    assert_eq!(
        metrics(&output),
        metrics(&reference),
        "the closing test evaluation differs"
    );
    // TensorBoard drops what generation 1 logged past its checkpoint (generation 2 starts with a
    // session START): the resumed job's loss curves are the uninterrupted job's, each step once.
    let (resumed, uninterrupted) = (finished_curves(&output), finished_curves(&reference));
    let losses: Vec<&String> = uninterrupted
        .keys()
        .filter(|t| t.starts_with("loss/"))
        .collect();
    assert!(!losses.is_empty());
    for tag in losses {
        assert_eq!(resumed.get(tag), Some(&uninterrupted[tag]), "{tag}");
        assert_eq!(uninterrupted[tag].len() as u64, STEPS, "{tag}");
    }
}

/// Preemption of one of three workers shrinks a fine-tune to a world that does not divide its reference
/// world: SIGTERM drains w2 (its trainer and the others commit the same step and exit), generation 2
/// forms at world 2 of the job's 3 (ranks stand in for 2 and 1 reference batches), resumes that
/// checkpoint and succeeds with its closing evaluation, no restart spent.
#[test]
fn preempted_finetune_worker_shrinks_to_a_non_dividing_world() {
    let dir = tempfile::tempdir().unwrap();
    let job_yaml = elastic_job(dir.path());
    let c = Cluster::with_workers(dir.path(), &["w0", "w1", "w2"]);
    let job = c.submit(&job_yaml);
    wait_until(Duration::from_secs(120), || c.step(&job) >= 2)
        .unwrap_or_else(|| panic!("job did not reach step 2:\n{}", c.logs()));
    let w2 = c
        .workers
        .iter()
        .position(|w| w.log.ends_with("w2.log"))
        .expect("w2 started");
    // SAFETY: kill(2) of a daemon this test started.
    unsafe { libc::kill(c.workers[w2].child.id() as i32, libc::SIGTERM) };
    let watch = c.watch_succeeded(&job);
    let last = last_line(&watch);
    assert!(
        last.contains("SUCCEEDED") && last.contains("gen=2") && last.contains("world=2"),
        "expected success in generation 2 at world 2: {last}\n{watch}"
    );
    // The job has no `steps:`: the total comes from the trainers' schedule (6 epochs of 4 steps).
    assert!(
        watch
            .lines()
            .any(|l| l.contains("RUNNING") && l.contains("/24 ")),
        "no total of 24 steps while running:\n{watch}"
    );
    let g1 = gen_logs(dir.path(), &["w0", "w1", "w2"], &job, 1);
    let saved = step_after(&g1, "preempted: checkpoint step-")
        .unwrap_or_else(|| panic!("generation 1 did not checkpoint on the drain:\n{g1}"));
    let g2 = gen_logs(dir.path(), &["w0", "w1"], &job, 2);
    let resumed = resumed_step(&g2)
        .unwrap_or_else(|| panic!("generation 2 did not resume:\n{g2}\n{}", c.logs()));
    println!("drain committed step-{saved}; generation 2 at world 2 resumed from step-{resumed}");
    assert_eq!(
        resumed, saved,
        "resumed another checkpoint than the drain's"
    );
    assert!((2..24).contains(&resumed), "drain step {resumed}");
    let output = dir.path().join("runs").join(&job);
    assert!(
        output.join("eval/final.json").is_file()
            && output.join("final/model.safetensors").is_file(),
        "no closing evaluation or final weights in {output:?}"
    );
}

/// A fine-tune shrunk below its reference world grows back: started on two of the three workers it may
/// use (world 2 of 3: ranks stand in for 2 and 1 reference batches), it is asked to checkpoint and leave
/// when a third registers, and generation 2 at world 3 resumes that checkpoint and succeeds, no restart
/// spent.
#[test]
fn shrunk_finetune_grows_back_when_a_worker_joins() {
    let dir = tempfile::tempdir().unwrap();
    let job_yaml = elastic_job(dir.path());
    let mut c = Cluster::with_workers(dir.path(), &["w0", "w1"]);
    let job = c.submit(&job_yaml);
    wait_until(Duration::from_secs(120), || c.step(&job) >= 2)
        .unwrap_or_else(|| panic!("job did not reach step 2:\n{}", c.logs()));
    c.add_worker("w2", 1);
    let watch = c.watch_succeeded(&job);
    let last = last_line(&watch);
    assert!(
        last.contains("SUCCEEDED")
            && last.contains("gen=2")
            && last.contains("world=3")
            && !last.contains("restarts="),
        "expected success in generation 2 at world 3 without a restart: {last}\n{watch}"
    );
    let g2 = gen_logs(dir.path(), &["w0", "w1", "w2"], &job, 2);
    let resumed = resumed_step(&g2)
        .unwrap_or_else(|| panic!("generation 2 did not resume:\n{g2}\n{}", c.logs()));
    let output = dir.path().join("runs").join(&job);
    assert_eq!(
        committed_checkpoints(&output),
        vec![resumed],
        "generation 2 resumed from the one checkpoint the growth took"
    );
    println!("grew from world 2 to 3 at step {resumed}");
    assert!((2..24).contains(&resumed), "resumed from step {resumed}");
    assert!(
        output.join("eval/final.json").is_file(),
        "no closing evaluation"
    );
}

/// `configs/jobs/demo-{name}.yaml` with its task config read from `data` (the demo's `demo-out/data`
/// replaced, model files named absolutely), `steps` short, and `extra` job keys; written under `dir`.
fn demo_job(dir: &Path, data: &Path, name: &str, steps: u64, extra: &str) -> std::path::PathBuf {
    let configs = configs_dir();
    let configs = std::fs::canonicalize(&configs).unwrap_or(configs);
    let job = std::fs::read_to_string(configs.join(format!("jobs/demo-{name}.yaml")))
        .unwrap_or_else(|e| panic!("demo-{name}.yaml: {e}"));
    let mut lines = Vec::new();
    for line in job.lines() {
        if let Some(config) = line.strip_prefix("config: ../") {
            let text = std::fs::read_to_string(configs.join(config)).expect("demo task config");
            let text = text
                .replace("demo-out/data", &data.display().to_string())
                .replace("'configs/", &format!("'{}/", configs.display()));
            lines.push(format!("config: {}", write(dir, config, &text).display()));
        } else if line.starts_with("steps:") {
            lines.push(format!("steps: {steps}"));
        } else {
            lines.push(line.to_string());
        }
    }
    lines.push(extra.to_string());
    write(dir, &format!("demo-{name}.yaml"), &lines.join("\n"))
}

/// Every part-2 example job of `configs/jobs/` (VQA, NLVR2 and its domain pre-training, RefCOCO+ weak
/// and box and the box domain pre-training) runs through the real coordinator on two workers to
/// SUCCEEDED on the synthetic splits: each fine-tune (2 steps, so no epoch end: only the closing test
/// evaluation) leaves its result file and its test metrics in `status`, and each domain pre-training's final weights start the fine-tune it precedes.
#[test]
fn every_task_job_runs_through_the_coordinator() {
    let dir = tempfile::tempdir().unwrap();
    let data = retrieval_corpus(dir.path());
    let c = Cluster::with_workers(dir.path(), &["w0", "w1"]);
    let run = |name: &str, extra: &str| {
        let job = c.submit(&demo_job(dir.path(), &data, name, 2, extra));
        let watch = c.watch_succeeded(&job);
        println!("demo-{name}: {}", watch.lines().last().unwrap_or(""));
        (
            job.clone(),
            dir.path().join("runs").join(&job),
            c.status(&job),
        )
    };
    let weights_of = |out: &Path| {
        let w = out.join("final/model.safetensors");
        assert!(w.is_file(), "no final weights in {out:?}");
        format!("init_checkpoint: file://{}", w.display())
    };

    let (_, nlvr_pretrain, _) = run("nlvr-pretrain", "");
    let (_, bbox_pretrain, _) = run("grounding-bbox-pretrain", "");
    let cases = [
        (
            "vqa",
            String::new(),
            "test.questions=",
            vec!["eval/vqa_result.json"],
        ),
        (
            "nlvr",
            weights_of(&nlvr_pretrain),
            "test.acc=",
            vec!["eval/final.json"],
        ),
        (
            "grounding",
            String::new(),
            "test.val_d=",
            vec!["eval/grounding_test_result.json"],
        ),
        (
            "grounding-bbox",
            weights_of(&bbox_pretrain),
            "test.val_d=",
            vec!["eval/grounding_bbox_test_result.json"],
        ),
    ];
    for (name, extra, metric, files) in cases {
        let (job, output, status) = run(name, &extra);
        assert!(
            status.contains(metric),
            "{job} ({name}): no {metric} in status:\n{status}"
        );
        for file in files {
            let body = std::fs::read(output.join(file))
                .unwrap_or_else(|e| panic!("{name}: {file} in {output:?}: {e}"));
            let parsed: serde_json::Value = serde_json::from_slice(&body).expect("result json");
            assert!(
                parsed.as_array().is_some_and(|a| !a.is_empty()),
                "{name}: {file} is not a non-empty list"
            );
        }
    }
}

/// Reads a TensorBoard log directory with TensorBoard's own reader (which drops the steps a session
/// START re-opens, as TensorBoard does) and prints `{tag: [[step, value], ...]}`.
const READ_SCALARS: &str = r#"
import json, sys
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
acc = EventAccumulator(sys.argv[1], size_guidance={"scalars": 0})
acc.Reload()
print(json.dumps({t: [[e.step, e.value] for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}))
"#;

type Curves = std::collections::BTreeMap<String, Vec<(u64, f64)>>;

/// The curves of a finished job under `output`, once its closing test metrics are written.
fn finished_curves(output: &Path) -> Curves {
    let mut curves = Curves::new();
    wait_until(Duration::from_secs(20), || {
        curves = read_scalars(&output.join("tensorboard"));
        curves.contains_key("eval/test.r_mean")
    })
    .unwrap_or_else(|| panic!("no closing test metrics in the event files: {curves:?}"));
    curves
}

fn read_scalars(dir: &Path) -> Curves {
    let out = std::process::Command::new(xvlm_e2e::tools_python())
        .args(["-c", READ_SCALARS])
        .arg(dir)
        .output()
        .expect("run the TensorBoard reader");
    assert!(out.status.success(), "reader failed: {}", text(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("reader output")
}

/// One `watch` line's step, losses and lr.
type Watched = (u64, Vec<(String, f64)>, f64);

/// Every `watch` line with losses.
fn watched_steps(watch: &str) -> Vec<Watched> {
    watch
        .lines()
        .filter_map(|line| {
            let step = line
                .split("step=")
                .nth(1)?
                .split('/')
                .next()?
                .parse()
                .ok()?;
            let losses = line.split("losses: ").nth(1)?.split(" lr=").next()?;
            let losses: Vec<(String, f64)> = losses
                .split_whitespace()
                .filter_map(|kv| {
                    let (k, v) = kv.split_once('=')?;
                    Some((k.to_string(), v.parse().ok()?))
                })
                .collect();
            let lr = line.split(" lr=").nth(1)?.split(' ').next()?.parse().ok()?;
            (!losses.is_empty()).then_some((step, losses, lr))
        })
        .collect()
}

/// A fine-tune's TensorBoard files, read back with TensorBoard's reader: every loss at every step
/// once, equal to what `watch` showed; each param group's lr (the lr_mult groups at twice the lr);
/// the grad norm and throughput; the per-epoch validation and the closing test metrics as the job's
/// eval files hold them.
#[test]
fn tensorboard_files_hold_the_reported_curves() {
    let dir = tempfile::tempdir().unwrap();
    let data = retrieval_corpus(dir.path());
    let config = write(dir.path(), "retrieval.yaml", &task_yaml(&data, 2));
    let job_file = write(
        dir.path(),
        "job.yaml",
        &format!(
            "name: tb\ntask: retrieval\nconfig: {}\nseed: 5\nworkers: {{min: 2, max: 2}}\n\
max_restarts: 0\ncheckpoint: {{every_steps: 0, keep_last: 1}}\n",
            config.display()
        ),
    );
    let c = Cluster::with_workers(dir.path(), &["w0", "w1"]);
    let job = c.submit(&job_file);
    let watch = c.watch_log(&job);
    c.watch_succeeded(&job);
    let output = dir.path().join("runs").join(&job);
    let steps = 12; // 48 pairs in global batches of 2 x 4, 2 epochs.
    let curves = finished_curves(&output);

    let losses: Vec<&String> = curves.keys().filter(|t| t.starts_with("loss/")).collect();
    assert!(!losses.is_empty(), "no losses: {curves:?}");
    for tag in losses {
        let at: Vec<u64> = curves[tag].iter().map(|(s, _)| *s).collect();
        assert_eq!(
            at,
            (1..=steps).collect::<Vec<_>>(),
            "{tag}: every step once"
        );
    }
    for tag in ["grad_norm", "samples_per_sec", "lr/group0", "lr/group2"] {
        let points = curves.get(tag).unwrap_or_else(|| panic!("no {tag}"));
        assert_eq!(points.len() as u64, steps, "{tag}: {points:?}");
        // The warm-up's first lr is 0.
        let least = if tag.starts_with("lr/") {
            0.0
        } else {
            f64::MIN_POSITIVE
        };
        assert!(
            points.iter().all(|(_, v)| v.is_finite() && *v >= least),
            "{tag}: {points:?}"
        );
    }
    for ((_, base), (_, mult)) in curves["lr/group0"].iter().zip(&curves["lr/group2"]) {
        assert!(
            (mult - 2.0 * base).abs() <= 1e-4 * base,
            "lr_mult 2: {base} and {mult}"
        );
    }

    let watched = watched_steps(&watch.text());
    assert!(!watched.is_empty(), "no watch lines:\n{}", watch.text());
    for (step, losses, lr) in &watched {
        for (name, value) in losses {
            let logged = curves[&format!("loss/{name}")][(*step - 1) as usize].1;
            assert!(
                (logged - value).abs() <= 5.1e-5 + 1e-6 * value.abs(),
                "step {step} {name}: watch {value}, TensorBoard {logged}"
            );
        }
        let logged = curves["lr/group0"][(*step - 1) as usize].1;
        assert!(
            (logged - lr).abs() <= 5.1e-5,
            "step {step} lr: watch {lr}, TensorBoard {logged}"
        );
    }

    let val: Vec<u64> = curves["eval/val.r_mean"].iter().map(|(s, _)| *s).collect();
    assert_eq!(val, vec![6, 12], "validation at each epoch end");
    let final_json: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(output.join("eval/final.json")).expect("eval/final.json"),
    )
    .expect("final.json");
    let r_mean = final_json[0]["metrics"]["r_mean"]
        .as_f64()
        .expect("test r_mean");
    let logged = curves["eval/test.r_mean"]
        .last()
        .map(|(_, v)| *v)
        .unwrap_or(f64::NAN);
    assert!(
        (logged - r_mean).abs() < 1e-4 * r_mean.abs().max(1.0),
        "test r_mean {r_mean}, TensorBoard {logged}"
    );
}

/// Checkpoints are O(model), not O(world x model): the same fine-tune at world 1, 2 and 4 (CPU slots
/// of one worker) commits the weights and the optimizer state once (rank 0's `model.safetensors`
/// and `state.safetensors`, the same bytes at every world), and one small JSON record per rank.
#[test]
fn checkpoint_bytes_do_not_grow_with_the_world() {
    let dir = tempfile::tempdir().unwrap();
    let data = retrieval_corpus(dir.path());
    let config = write(dir.path(), "retrieval.yaml", &task_yaml(&data, 2));
    let mut rows = Vec::new();
    for world in [1u32, 2, 4] {
        let run = dir.path().join(format!("world-{world}"));
        std::fs::create_dir_all(&run).unwrap();
        let mut c = Cluster::start(&run);
        c.add_worker("w0", world);
        let job = c.submit(&write(
            &run,
            "job.yaml",
            &format!(
                "name: bytes\ntask: retrieval\nconfig: {}\nseed: 2\nworkers: {{min: 1, devices_per_worker: {world}}}\n\
max_restarts: 0\ncheckpoint: {{every_steps: 3, keep_last: 50}}\n",
                config.display()
            ),
        ));
        c.watch_succeeded(&job);
        let step = run.join("runs").join(&job).join("checkpoints/step-3");
        assert!(
            step.join("MANIFEST.json").is_file(),
            "no commit at step 3 at world {world}"
        );
        let mut tensors = Vec::new();
        let mut records = 0u64;
        let mut record_files = 0;
        for entry in std::fs::read_dir(&step).unwrap() {
            let entry = entry.unwrap();
            let name = entry.file_name().into_string().unwrap();
            let size = entry.metadata().unwrap().len();
            if name.ends_with(".safetensors") {
                tensors.push((name, size));
            } else if name.starts_with("rank-") && name.ends_with(".json") {
                records += size;
                record_files += 1;
            }
        }
        tensors.sort();
        println!("world {world}: tensor files {tensors:?}, {record_files} rank records of {records} bytes in all");
        assert_eq!(record_files, world, "one record per rank");
        rows.push(tensors);
    }
    let names: Vec<&str> = rows[0].iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["model.safetensors", "state.safetensors"]);
    assert!(
        rows.iter().all(|r| r == &rows[0]),
        "the replicated state is written once at every world: {rows:?}"
    );
}
