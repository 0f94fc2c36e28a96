//! Exact resume of `task: pretrain` through the real [`Checkpointer`] on a `file://` output: N
//! iterations uninterrupted, versus k iterations, a checkpoint, a fresh task resumed from it and the
//! remaining N - k; every final weight is bit-identical (sha256 of each tensor), on CPU with one
//! libtorch thread. World 1 runs with dropout on (its generator is derived from the iteration) and
//! region steps on a derived coin; world 2 (two threads over a local TCP ring) with dropout off,
//! because libtorch's generator is shared by the threads of a process.

mod task_common;

use std::sync::Mutex;

use task_common::{checkpointer, corpus, hashes, run, spec, task, task_yaml, train_saving};
use xvlm_model::collective::{Collective, SingleProcess};
use xvlm_proto::spec::JobSpec;
use xvlm_worker::checkpoint::Storage;
use xvlm_worker::comm::ring::local_ring;
use xvlm_worker::trainer::task::TrainTask;

/// Dropout draws from libtorch's process-global generator: the tests of this file take turns.
static SERIAL: Mutex<()> = Mutex::new(());

const TOTAL: u64 = 6;

/// sha256 of every weight, by name.
type Hashes = Vec<(String, String)>;
const SAVE_AT: u64 = 3;

/// One rank's story: the uninterrupted reference, generation 1 stopping after `SAVE_AT` (its
/// checkpoint committed), generation 2 resuming and finishing. Returns (reference, resumed) hashes.
fn story(spec: &JobSpec, storage: &Storage, comms: [&dyn Collective; 3]) -> (Hashes, Hashes) {
    let [c0, c1, c2] = comms;
    let mut reference = task(spec, c0, &[]);
    run(&mut reference, c0, 0, TOTAL);
    let expected = hashes(&reference);
    drop(reference);

    let mut first = task(spec, c1, &[]);
    let mut ck = checkpointer(storage, spec, c1, 1);
    train_saving(&mut first, &mut ck, c1, 0, SAVE_AT, TOTAL);
    // What the checkpoint carries besides the weights.
    let extra = first.checkpoint_state();
    assert!(
        extra.iter().any(|(k, _)| k.ends_with(".exp_avg_sq")),
        "no optimizer moments in the checkpoint"
    );
    assert!(extra.iter().any(|(k, _)| k == "scheduler.step"));
    let meta = first.checkpoint_meta();
    assert_eq!(meta["iteration"], SAVE_AT);
    assert!(
        meta["streams"]["images"]["lines"].as_u64().unwrap_or(0) > 0,
        "no data cursor in {meta}"
    );
    drop(first);

    let mut second = task(spec, c2, &[]);
    let resumed_from = checkpointer(storage, spec, c2, 2)
        .resume(&mut second)
        .expect("resume");
    assert_eq!(resumed_from, Some(SAVE_AT));
    assert_ne!(
        hashes(&second),
        expected,
        "resumed before training the rest"
    );
    run(&mut second, c2, SAVE_AT, TOTAL);
    (expected, hashes(&second))
}

fn job(dir: &std::path::Path, overrides: &str) -> JobSpec {
    let data = corpus(dir);
    let config = task_yaml(dir, &data, 4, 0.5);
    spec(
        &config,
        TOTAL,
        &format!(r#","checkpoint":{{"every_steps":{SAVE_AT},"keep_last":2}}{overrides}"#),
    )
}

/// One rank, dropout on, region steps on the derived coin: bit-identical after resume.
#[test]
fn pretrain_resume_is_bit_exact_on_one_rank() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().expect("tempdir");
    let spec = job(dir.path(), "");
    let storage = Storage::open(&format!("file://{}/out", dir.path().display())).expect("storage");
    let (expected, resumed) = story(&spec, &storage, [&SingleProcess; 3]);
    assert_eq!(
        resumed, expected,
        "resumed run differs from the uninterrupted one"
    );
}

/// Two ranks in threads over a local ring, dropout off: each rank's weights are bit-identical to the
/// uninterrupted run's after resume.
#[test]
fn pretrain_resume_is_bit_exact_on_two_ranks() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().expect("tempdir");
    let spec = job(dir.path(), r#","overrides":{"xvlm":{"dropout":false}}"#);
    let storage = Storage::open(&format!("file://{}/out", dir.path().display())).expect("storage");
    let rings: Vec<_> = (0..3).map(|_| local_ring(2).expect("ring")).collect();
    let mut per_rank: Vec<Vec<_>> = vec![Vec::new(), Vec::new()];
    for ring in rings {
        for (r, c) in ring.into_iter().enumerate() {
            per_rank[r].push(c);
        }
    }
    let handles: Vec<_> = per_rank
        .into_iter()
        .map(|comms| {
            let (spec, storage) = (spec.clone(), storage.clone());
            std::thread::spawn(move || story(&spec, &storage, [&comms[0], &comms[1], &comms[2]]))
        })
        .collect();
    let results: Vec<_> = handles
        .into_iter()
        .map(|h| h.join().expect("rank thread"))
        .collect();
    for (rank, (expected, resumed)) in results.iter().enumerate() {
        assert_eq!(resumed, expected, "rank {rank}: resumed run differs");
    }
    assert_eq!(results[0].0, results[1].0, "the ranks' weights diverged");
}
