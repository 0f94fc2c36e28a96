//! Fixed global batch of `task: pretrain` at a shrunk world: a job declared for up to 2 workers runs on
//! 1 rank by accumulating 2 micro-batches per step, and ends with the same parameters as 2 ranks x 1
//! micro-batch on the same samples (per-sample losses only: MLM, with `overrides: {xvlm: {itc: false,
//! itm: false, dropout: false}}`, as in `pretrain_data_parallel.rs`).
//!
//! Same samples: two shard files A and B of exactly b lines. The 2 ranks are assigned one file each
//! (the coordinator's plan) and read one file per iteration, so iteration i is epoch i on both. The
//! single rank is assigned both files; with a local batch of b its 2 micro-batches of iteration i are
//! A's and B's lines of epoch i (in a per-epoch order, which the mean does not depend on). Augmentation
//! and masking derive from (file name, epoch, line), so every sample is identical in both runs. The lr
//! schedule is the reference world's in both (its epoch length does not depend on the world).
//!
//! Tolerance: 1e-5 on every parameter (float32; only summation order differs).

mod common;
mod task_common;

use std::path::Path;

use common::max_diff;
use task_common::{corpus, shard_files, spec, task, task_yaml, weights};
use tch::Tensor;
use xvlm_model::collective::{Collective, SingleProcess};
use xvlm_proto::spec::JobSpec;
use xvlm_worker::comm::ring::local_ring;
use xvlm_worker::trainer::task::TrainTask;

const STEPS: u64 = 4;
const B: usize = 2;
const TOLERANCE: f64 = 1e-5;

/// The MLM-only job on `config` for at most `max_workers` workers.
fn job(config: &Path, max_workers: u32) -> JobSpec {
    spec(
        config,
        STEPS,
        &format!(
            r#","workers":{{"min":1,"max":{max_workers}}},"overrides":{{"xvlm":{{"itc":false,"itm":false,"dropout":false}}}}"#
        ),
    )
}

/// What training the job on this rank produced: weights, MLM loss and samples of each step.
struct Trained {
    weights: Vec<(String, Tensor)>,
    mlm: Vec<f64>,
    samples: Vec<usize>,
}

fn train(spec: &JobSpec, comm: &dyn Collective, shards: &[String]) -> Trained {
    let mut t = task(spec, comm, shards);
    let (mut mlm, mut samples) = (Vec::new(), Vec::new());
    for step in 0..t.total_steps() {
        let out = t.step(step, comm).expect("step");
        let loss = out.losses.iter().find(|(n, _)| n == "mlm").expect("mlm");
        mlm.push(loss.1);
        samples.push(out.samples);
    }
    Trained {
        weights: weights(&t),
        mlm,
        samples,
    }
}

#[test]
fn one_rank_accumulating_two_matches_two_ranks() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = corpus(dir.path());
    let files = shard_files(&data, dir.path(), 2, B);
    let config = task_yaml(&dir.path().join("task"), &data, B, 0.0);
    let elastic = job(&config, 2);

    let one = train(&elastic, &SingleProcess, &files);
    assert_eq!(
        one.samples,
        vec![2 * B; STEPS as usize],
        "1 of max 2 ranks runs 2 micro-batches of {B}"
    );
    let comms = local_ring(2).expect("ring");
    let handles: Vec<_> = comms
        .into_iter()
        .enumerate()
        .map(|(r, c)| {
            let (spec, shard) = (elastic.clone(), vec![files[r].clone()]);
            std::thread::spawn(move || train(&spec, &c, &shard))
        })
        .collect();
    let ranks: Vec<Trained> = handles
        .into_iter()
        .map(|h| h.join().expect("rank thread"))
        .collect();
    assert_eq!(ranks[0].samples, vec![B; STEPS as usize]);
    assert_eq!(
        max_diff(&ranks[0].weights, &ranks[1].weights),
        0.0,
        "ranks diverged"
    );
    let diff = max_diff(&ranks[0].weights, &one.weights);
    eprintln!(
        "1 rank x 2 micro-batches of {B} vs 2 ranks x {B} after {STEPS} iterations: max |param diff| = {diff:e}"
    );
    assert!(diff < TOLERANCE, "max parameter difference {diff}");
    for (a, b) in ranks[0].mlm.iter().zip(&one.mlm) {
        assert!(
            (a - b).abs() < 1e-5,
            "mlm loss {a} (2 ranks) vs {b} (1 rank)"
        );
    }

    // Meaningful: a job declared for 1 worker does not accumulate, and its single rank (on the same
    // files, one micro-batch per step) ends elsewhere.
    let fixed = train(&job(&config, 1), &SingleProcess, &files);
    assert_eq!(fixed.samples, vec![B; STEPS as usize]);
    let apart = max_diff(&fixed.weights, &one.weights);
    eprintln!("without accumulation: max |param diff| = {apart:e}");
    assert!(
        apart > 100.0 * TOLERANCE,
        "one micro-batch per step matched two ({apart})"
    );
}
