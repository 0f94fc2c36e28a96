//! Elastic resume of `task: pretrain`: a job for up to 2 workers checkpoints at world 2 (two ranks in
//! threads over a local ring, through the real [`Checkpointer`] on a `file://` output), and the next
//! generation, a single rank, resumes from that checkpoint instead of starting over: the weights and
//! the optimizer state are rank 0's exactly, the step counts continue from the saved step, the image-text
//! stream continues inside the file the saved rank 0 was reading (the single rank's file order of the
//! epoch is rank 0's files then rank 1's), and it trains on with 2 micro-batches per step.
//! A checkpoint whose task states it cannot place is refused with an error naming the problem. Both
//! with the loader's own split of the files and with the coordinator's per-rank assignment.

mod common;
mod task_common;

use common::max_diff;
use task_common::{checkpointer, corpus, spec, task, task_yaml, train_saving, weights};
use tch::Tensor;
use xvlm_model::collective::{Collective, SingleProcess};
use xvlm_proto::spec::JobSpec;
use xvlm_worker::checkpoint::Storage;
use xvlm_worker::comm::ring::local_ring;
use xvlm_worker::trainer::task::{TaskError, TrainTask};

const SAVE_AT: u64 = 2;
const TOTAL: u64 = 4;
/// Per-rank batch: the first generation's ranks stop inside their files (the synthetic shards have 8
/// and 16 lines), not at a file's end.
const BATCH: usize = 3;

/// What a rank of the first generation left: weights, tensor state and task state at `SAVE_AT`.
struct Saved {
    weights: Vec<(String, Tensor)>,
    state: Vec<(String, Tensor)>,
    meta: serde_json::Value,
}

fn first_generation(
    spec: &JobSpec,
    storage: &Storage,
    comm: &dyn Collective,
    shards: &[String],
) -> Saved {
    let mut t = task(spec, comm, shards);
    let mut ck = checkpointer(storage, spec, comm, 1);
    train_saving(&mut t, &mut ck, comm, 0, SAVE_AT, TOTAL);
    Saved {
        weights: weights(&t),
        state: t
            .checkpoint_state()
            .into_iter()
            .map(|(k, v)| (k, v.copy()))
            .collect(),
        meta: t.checkpoint_meta(),
    }
}

/// The tensor named `name`'s value as an integer.
fn int(state: &[(String, Tensor)], name: &str) -> i64 {
    state
        .iter()
        .find(|(k, _)| k == name)
        .unwrap_or_else(|| panic!("no {name} in the checkpoint state"))
        .1
        .int64_value(&[])
}

/// The saved cursor of the stream `stream` a resumed rank whose meta is `meta` should continue from:
/// that of the saved rank whose file order of the epoch starts with the resumed rank's first file.
fn expected_cursor(saved: &[Saved], meta: &serde_json::Value, stream: &str) -> serde_json::Value {
    let first = &meta["streams"][stream]["order"][0];
    let owner = saved
        .iter()
        .find(|s| &s.meta["streams"][stream]["order"][0] == first)
        .unwrap_or_else(|| panic!("no saved rank started its {stream} with {first}"));
    owner.meta["streams"][stream]["cursor"].clone()
}

#[test]
fn world_two_checkpoint_resumes_on_one_rank() {
    story(false);
}

#[test]
fn world_two_checkpoint_resumes_on_one_rank_with_assigned_shards() {
    story(true);
}

/// Generation 1 at world 2, generation 2 at world 1; `assigned`: image-text files come from the
/// coordinator's plan (one file per rank, then both), else the loader splits them.
fn story(assigned: bool) {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = corpus(dir.path());
    let mut files: Vec<String> = std::fs::read_dir(data.join("pretrain/image_text"))
        .expect("corpus")
        .map(|e| format!("file://{}", e.expect("entry").path().display()))
        .collect();
    files.sort();
    assert_eq!(files.len(), 2);
    let shards_of = |rank: usize| -> Vec<String> {
        if assigned {
            vec![files[rank].clone()]
        } else {
            Vec::new()
        }
    };
    let config = task_yaml(dir.path(), &data, BATCH, 0.5);
    let spec = spec(
        &config,
        TOTAL,
        &format!(
            r#","workers":{{"min":1,"max":2}},"checkpoint":{{"every_steps":{SAVE_AT},"keep_last":2}},"overrides":{{"xvlm":{{"dropout":false}}}}"#
        ),
    );
    let storage = Storage::open(&format!("file://{}/out", dir.path().display())).expect("storage");

    let handles: Vec<_> = local_ring(2)
        .expect("ring")
        .into_iter()
        .enumerate()
        .map(|(r, c)| {
            let (spec, storage, shards) = (spec.clone(), storage.clone(), shards_of(r));
            std::thread::spawn(move || first_generation(&spec, &storage, &c, &shards))
        })
        .collect();
    let saved: Vec<Saved> = handles
        .into_iter()
        .map(|h| h.join().expect("rank thread"))
        .collect();
    assert_eq!(saved[0].meta["world"], 2);
    let step_name = saved[0]
        .state
        .iter()
        .map(|(k, _)| k.clone())
        .find(|k| k.contains("word_embeddings") && k.ends_with(".step"))
        .expect("optimizer step count of the word embeddings in the checkpoint state");
    // One optimizer step per iteration, two when it ran a region step too.
    let saved_steps = int(&saved[0].state, &step_name);
    assert!(saved_steps >= SAVE_AT as i64, "{step_name} = {saved_steps}");

    let all = if assigned { files.clone() } else { Vec::new() };
    let mut one = task(&spec, &SingleProcess, &all);

    // Task states it cannot place are refused with a clear error, before anything is restored.
    let metas: Vec<serde_json::Value> = saved.iter().map(|s| s.meta.clone()).collect();
    let refused = |metas: &[serde_json::Value], one: &mut dyn TrainTask| -> String {
        match one.restore_resharded(&saved[0].weights, &saved[0].state, metas, 2, 1) {
            Err(TaskError::Other(why)) => why,
            other => panic!("expected a refusal, got {other:?}"),
        }
    };
    let mut bad = metas.clone();
    bad[1]["version"] = 99.into();
    let why = refused(&bad, &mut one);
    assert!(why.contains("version 99"), "{why}");
    let mut bad = metas.clone();
    bad[0]["streams"]["images"]["order"] = serde_json::json!([]);
    let why = refused(&bad, &mut one);
    assert!(why.contains("file order"), "{why}");
    let mut bad = metas.clone();
    bad[1]["streams"]["images"]["plan"] = if assigned {
        "split 1/2: 2 files, sha256 0123456789abcdef".into()
    } else {
        "split 1/2: 3 files, sha256 0123456789abcdef".into()
    };
    let why = refused(&bad, &mut one);
    assert!(why.contains("image-text files"), "{why}");

    let resumed = checkpointer(&storage, &spec, &SingleProcess, 2)
        .resume(&mut one)
        .expect("resume");
    assert_eq!(
        resumed,
        Some(SAVE_AT),
        "the world-2 checkpoint was not resumed"
    );
    assert_eq!(max_diff(&weights(&one), &saved[0].weights), 0.0);
    let state = one.checkpoint_state();
    assert_eq!(
        max_diff(&state, &saved[0].state),
        0.0,
        "optimizer state differs from rank 0's"
    );
    let meta = one.checkpoint_meta();
    assert_eq!(meta["iteration"], SAVE_AT);
    assert_eq!(meta["world"], 1);
    // Both saved ranks are inside their first file of epoch 0; the single rank continues inside the
    // first file of its order, where the saved rank reading it stopped.
    for s in &saved {
        let cursor = &s.meta["streams"]["images"]["cursor"];
        assert!(
            cursor["epoch"] == 0 && cursor["file"] == 0 && cursor["line"].as_u64() > Some(0),
            "{cursor}"
        );
    }
    for stream in ["images", "regions"] {
        assert_eq!(
            meta["streams"][stream]["cursor"],
            expected_cursor(&saved, &meta, stream),
            "the {stream} stream does not continue where the saved rank stopped"
        );
    }

    let (mut samples, mut optimizer_steps) = (Vec::new(), 0);
    for step in SAVE_AT..TOTAL {
        let out = one.step(step, &SingleProcess).expect("step after resume");
        assert!(
            out.losses.iter().all(|(_, v)| v.is_finite()),
            "{:?}",
            out.losses
        );
        optimizer_steps += 1 + i64::from(out.losses.iter().any(|(n, _)| n == "bbox"));
        samples.push(out.samples);
    }
    assert_eq!(
        samples,
        vec![2 * BATCH; (TOTAL - SAVE_AT) as usize],
        "2 micro-batches per step"
    );
    let state = one.checkpoint_state();
    assert_eq!(int(&state, "scheduler.step"), TOTAL as i64);
    assert_eq!(int(&state, &step_name), saved_steps + optimizer_steps);
    assert!(max_diff(&weights(&one), &saved[0].weights) > 0.0);
}
