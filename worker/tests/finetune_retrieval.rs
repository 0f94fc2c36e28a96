//! `task: retrieval` on the fine-tune runner, through the real [`Checkpointer`] on a `file://` output:
//! exact resume (N steps uninterrupted against k steps, a checkpoint, a fresh runner resumed from it and
//! the remaining N - k: every final weight bit-identical, at world 1 with dropout and at world 2 over a
//! local TCP ring), the epoch-end validation with its `eval/epoch-E.json` and `best/` checkpoint, the
//! closing test evaluation with the best weights, and `evaluate: true`.

mod task_common;

use std::path::Path;
use std::sync::Mutex;

use task_common::{
    checkpointer, corpus, demo_config, demo_corpus, finetune_spec, finetune_task, hashes, metric,
    pretrained_checkpoint, retrieval_yaml, run, train_saving, weights_after_steps_at_world,
};
use xvlm_model::collective::{Collective, SingleProcess};
use xvlm_proto::spec::JobSpec;
use xvlm_worker::checkpoint::Storage;
use xvlm_worker::comm::ring::local_ring;
use xvlm_worker::trainer::finetune::retrieval::RetrievalTask;
use xvlm_worker::trainer::task::TrainTask;

/// Dropout draws from libtorch's process-global generator: the tests of this file take turns.
static SERIAL: Mutex<()> = Mutex::new(());

/// Pairs per rank per step: 48 train pairs give 6 steps per epoch at world 1 (3 at world 2).
const BATCH: usize = 8;
const TOTAL: u64 = 8;
const SAVE_AT: u64 = 4;

type Hashes = Vec<(String, String)>;
/// A story's uninterrupted hashes, resumed hashes and closing metrics.
type Story = (Hashes, Hashes, Vec<(String, f64)>);

/// One rank's story: the uninterrupted reference, generation 1 stopping after `SAVE_AT` (its
/// checkpoint committed), generation 2 resuming and finishing. Returns (reference, resumed) hashes.
fn story(spec: &JobSpec, out: &Path, comms: [&dyn Collective; 3]) -> Story {
    let [c0, c1, c2] = comms;
    let url = |name: &str| format!("file://{}", out.join(name).display());
    let mut reference = finetune_task::<RetrievalTask>(spec, c0, &url("reference"));
    run(&mut reference, c0, 0, TOTAL);
    let expected = hashes(&reference);
    drop(reference);

    let storage = Storage::open(&url("resumed")).expect("storage");
    let mut first = finetune_task::<RetrievalTask>(spec, c1, &url("resumed"));
    let mut ck = checkpointer(&storage, spec, c1, 1);
    train_saving(&mut first, &mut ck, c1, 0, SAVE_AT, TOTAL);
    let meta = first.checkpoint_meta();
    assert_eq!(meta["iteration"], SAVE_AT);
    assert_eq!(
        meta["streams"]["train"]["batch"],
        SAVE_AT % steps_per_epoch(c1)
    );
    drop(first);

    let mut second = finetune_task::<RetrievalTask>(spec, c2, &url("resumed"));
    let resumed = checkpointer(&storage, spec, c2, 2)
        .resume(&mut second)
        .expect("resume");
    assert_eq!(resumed, Some(SAVE_AT), "the checkpoint was not resumed");
    run(&mut second, c2, SAVE_AT, TOTAL);
    let got = hashes(&second);
    let closing = second.finish(c2).expect("closing evaluation");
    (expected, got, closing)
}

fn steps_per_epoch(comm: &dyn Collective) -> u64 {
    48 / (BATCH * comm.world_size()) as u64
}

fn setup(dir: &Path, extra: &str) -> JobSpec {
    let data = corpus(dir);
    let config = retrieval_yaml(dir, &data, BATCH, 2);
    finetune_spec(
        "retrieval",
        &config,
        &format!(
            r#","steps":{TOTAL},"checkpoint":{{"every_steps":{SAVE_AT},"keep_last":2}}{extra}"#
        ),
    )
}

#[test]
fn world_one_resumes_bit_identically_and_keeps_the_best() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().expect("tempdir");
    let spec = setup(dir.path(), "");
    let (expected, got, closing) = story(
        &spec,
        dir.path(),
        [&SingleProcess, &SingleProcess, &SingleProcess],
    );
    assert_eq!(expected.len(), got.len());
    for ((name, a), (_, b)) in expected.iter().zip(&got) {
        assert_eq!(a, b, "{name} differs after the resume");
    }
    // Epoch 0 ended at step 6 inside the resumed generation: validation, the best weights, and the
    // test split evaluated with them at the end.
    let out = dir.path().join("resumed");
    let epoch0: serde_json::Value = serde_json::from_slice(
        &std::fs::read(out.join("eval/epoch-0.json")).expect("eval/epoch-0.json"),
    )
    .expect("json");
    let r_mean = epoch0[0]["metrics"]["r_mean"].as_f64().expect("r_mean");
    assert!((0.0..=100.0).contains(&r_mean), "{epoch0}");
    let manifest: serde_json::Value = serde_json::from_slice(
        &std::fs::read(out.join("best/MANIFEST.json")).expect("best/MANIFEST.json"),
    )
    .expect("json");
    assert_eq!(manifest["best"]["step"], 6, "{manifest}");
    assert!(out.join("eval/final.json").is_file());
    let names: Vec<&str> = closing.iter().map(|(k, _)| k.as_str()).collect();
    for name in ["test.txt_r1", "test.img_r10", "test.r_mean", "test.epoch"] {
        assert!(names.contains(&name), "{name} missing from {names:?}");
    }
}

#[test]
fn world_two_resumes_bit_identically() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().expect("tempdir");
    let spec = setup(
        dir.path(),
        r#","workers":{"min":2,"max":2},"overrides":{"xvlm":{"dropout":false}}"#,
    );
    let rings: Vec<_> = (0..3).map(|_| local_ring(2).expect("ring")).collect();
    let results: Vec<Story> = std::thread::scope(|s| {
        let mut by_rank: Vec<_> = (0..2).map(|_| Vec::new()).collect();
        for ring in rings {
            for (r, c) in ring.into_iter().enumerate() {
                by_rank[r].push(c);
            }
        }
        let handles: Vec<_> = by_rank
            .into_iter()
            .map(|comms| {
                let spec = &spec;
                let dir = dir.path();
                s.spawn(move || story(spec, dir, [&comms[0], &comms[1], &comms[2]]))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("rank"))
            .collect()
    });
    for (expected, got, closing) in &results {
        assert_eq!(expected, got, "a rank's weights differ after the resume");
        assert_eq!(closing, &results[0].2, "ranks disagree on the test metrics");
    }
}

#[test]
fn evaluate_only_scores_the_init_weights_and_trains_nothing() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().expect("tempdir");
    let spec = setup(dir.path(), r#","evaluate":true"#);
    let out = format!("file://{}", dir.path().join("eval-only").display());
    let mut task = finetune_task::<RetrievalTask>(&spec, &SingleProcess, &out);
    assert_eq!(task.total_steps(), 0);
    let before = hashes(&task);
    let metrics = task.finish(&SingleProcess).expect("evaluation");
    assert_eq!(hashes(&task), before);
    let names: Vec<&str> = metrics.iter().map(|(k, _)| k.as_str()).collect();
    assert!(
        names.contains(&"val.r_mean") && names.contains(&"test.r_mean"),
        "{names:?}"
    );
    assert!(dir.path().join("eval-only/eval/final.json").is_file());
}

/// Pre-training iterations that make the starting checkpoint (one rank, 8 pairs per batch).
const PRETRAIN_ITERATIONS: u64 = 120;

/// Fine-tuning a (briefly) pre-trained checkpoint on the synthetic retrieval split raises the held-out
/// recall of both directions (ITM re-ranked, as Retrieval.py reports), on the demo corpus's 40 test
/// images: each direction's mean of R@1/5/10 to at least 1.4x the starting checkpoint's and 15 points
/// above it. R@1 alone is printed, not asserted: on 40 images a few hits decide it, and those move with
/// another CPU's float kernels (it failed on one machine at image 15.0 -> 21.2 while R@5 went 56 -> 98).
#[test]
fn fine_tuning_a_pretrained_checkpoint_raises_held_out_recall() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().expect("tempdir");
    let data = demo_corpus(dir.path());
    let started = std::time::Instant::now();
    let checkpoint = pretrained_checkpoint(dir.path(), &data, PRETRAIN_ITERATIONS, "");
    let pretrain_secs = started.elapsed().as_secs_f64();

    // 4 of the demo's 10 epochs: the test runs on one rank (twice the demo's steps per epoch).
    let finetune = demo_config(
        dir.path(),
        "Retrieval_demo.yaml",
        &data,
        &[("epochs: 10,", "epochs: 4,")],
    );
    let job = |extra: &str| {
        finetune_spec(
            "retrieval",
            &finetune,
            &format!(
                r#","init_checkpoint":"file://{}"{extra}"#,
                checkpoint.display()
            ),
        )
    };
    let out = |name: &str| format!("file://{}", dir.path().join(name).display());
    let mut zero_shot =
        finetune_task::<RetrievalTask>(&job(r#","evaluate":true"#), &SingleProcess, &out("zs"));
    let opening = zero_shot.finish(&SingleProcess).expect("zero-shot");
    drop(zero_shot);

    let spec = job("");
    let mut tuned = finetune_task::<RetrievalTask>(&spec, &SingleProcess, &out("ft"));
    let total = tuned.total_steps();
    run(&mut tuned, &SingleProcess, 0, total);
    let closing = tuned.finish(&SingleProcess).expect("fine-tuned");
    let pair = |m: &[(String, f64)], name: &str| {
        (
            metric(m, &format!("test.txt_{name}")),
            metric(m, &format!("test.img_{name}")),
        )
    };
    let (r1_before, r1_after) = (pair(&opening, "r1"), pair(&closing, "r1"));
    let (before, after) = (pair(&opening, "r_mean"), pair(&closing, "r_mean"));
    println!(
        "pre-training {PRETRAIN_ITERATIONS} iterations: {pretrain_secs:.0}s; fine-tuning {total} \
         steps: {:.0}s; held-out mean of R@1/5/10: text {:.1} -> {:.1}, image {:.1} -> {:.1}; R@1 \
         text {:.1} -> {:.1}, image {:.1} -> {:.1} (chance 2.5)",
        started.elapsed().as_secs_f64() - pretrain_secs,
        before.0,
        after.0,
        before.1,
        after.1,
        r1_before.0,
        r1_after.0,
        r1_before.1,
        r1_after.1
    );
    for (what, b, a) in [("text", before.0, after.0), ("image", before.1, after.1)] {
        assert!(
            a >= 1.4 * b && a >= b + 15.0,
            "{what} retrieval's mean of R@1/5/10 went from {b:.1} to {a:.1} (needs 1.4x and +15)"
        );
    }
}

/// Retrieval gathers ITC features across ranks inside each forward: at 3 ranks of a job made for 4
/// the ranks stand in for 2, 1 and 1 reference batches, and the two with fewer run a forward-only
/// repeat so that every gather lines up. The steps complete and every rank ends with the same weights.
#[test]
fn retrieval_at_a_world_that_does_not_divide_the_reference_stays_in_lockstep() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().expect("tempdir");
    let data = corpus(dir.path());
    let config = retrieval_yaml(dir.path(), &data, 4, 2);
    let spec = finetune_spec(
        "retrieval",
        &config,
        r#","workers":{"min":1,"max":4},"overrides":{"xvlm":{"dropout":false}}"#,
    );
    let out = format!("file://{}", dir.path().join("w3").display());
    let start = weights_after_steps_at_world::<RetrievalTask>(&spec, 1, 0, &out);
    let three = weights_after_steps_at_world::<RetrievalTask>(&spec, 3, 2, &out);
    let moved = start.iter().zip(&three).any(|((_, a), (_, b))| !a.equal(b));
    assert!(moved, "two steps at world 3 changed no weight");
}
