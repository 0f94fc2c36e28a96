//! `task: vqa` on the fine-tune runner: fine-tuning a briefly pre-trained tiny checkpoint (its text
//! layers split between encoder and decoder on load) on the synthetic questions answers held-out
//! questions well above the majority-answer baseline; the distributed answers (and their metrics and
//! submission file) are identical at world 1, 2 and 4; a resumed run ends bit-identical to an
//! uninterrupted one.

use std::path::Path;

use crate::task_common::{
    self, checkpointer, demo_config, finetune_spec, finetune_task, finish_at_world, hashes, metric,
    run, shared_pretrained, train_saving, SHARED_PRETRAIN_ITERATIONS,
};
use crate::SERIAL;
use xvlm_model::collective::SingleProcess;
use xvlm_model::metrics::vqa::majority_answer;
use xvlm_worker::checkpoint::Storage;
use xvlm_worker::trainer::finetune::vqa::VqaTask;
use xvlm_worker::trainer::task::TrainTask;

/// The percentage of `file`'s questions whose majority answer is the split's most frequent one.
fn majority_baseline(file: &Path) -> (f64, String, usize) {
    let items: Vec<serde_json::Value> =
        serde_json::from_slice(&std::fs::read(file).expect("vqa_val.json")).expect("json");
    let mut counts: std::collections::BTreeMap<String, usize> = Default::default();
    for item in &items {
        let answers: Vec<String> = serde_json::from_value(item["answer"].clone()).expect("answers");
        let top = majority_answer(&answers).expect("answers").to_string();
        *counts.entry(top).or_default() += 1;
    }
    let (answer, n) = counts
        .into_iter()
        .max_by_key(|(_, n)| *n)
        .expect("questions");
    // Percent, as the task reports its accuracies.
    (100.0 * n as f64 / items.len() as f64, answer, items.len())
}

/// Held-out exact-match accuracy at least twice the majority-answer baseline after fine-tuning the
/// tiny pre-trained checkpoint on the demo corpus's questions (four epochs). Pre-training and
/// fine-tuning run without dropout: the other tests of this binary share libtorch's global generator.
#[test]
fn vqa_fine_tuning_doubles_the_majority_baseline() {
    let _turn = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().expect("tempdir");
    let (data, checkpoint, pretrain_secs) = shared_pretrained();
    let (baseline, majority, questions) = majority_baseline(&data.join("finetune/vqa_val.json"));
    let started = std::time::Instant::now();

    let config = demo_config(
        dir.path(),
        "VQA_demo.yaml",
        data,
        &[("epochs: 3", "epochs: 4")],
    );
    let job = finetune_spec(
        "vqa",
        &config,
        &format!(
            r#","init_checkpoint":"file://{}","overrides":{{"xvlm":{{"dropout":false}}}}"#,
            checkpoint.display()
        ),
    );
    let out = format!("file://{}", dir.path().join("ft").display());
    let mut tuned = finetune_task::<VqaTask>(&job, &SingleProcess, &out);
    let total = tuned.total_steps();
    let losses = run(&mut tuned, &SingleProcess, 0, total);
    for (step, l) in losses.iter().enumerate().step_by(20) {
        println!("step {step}: {l:?}");
    }
    let closing = tuned.finish(&SingleProcess).expect("fine-tuned");
    println!("closing metrics: {closing:?}");
    let tuned_metrics = tuned.checkpoint_meta()["metrics"].clone();
    // The validation metrics of the best epoch's evaluation, as the checkpoint meta keeps them.
    let val_metric = |name: &str| {
        tuned_metrics
            .as_array()
            .and_then(|m| m.iter().find(|p| p[0] == name).and_then(|p| p[1].as_f64()))
            .unwrap_or_else(|| panic!("no {name} in {tuned_metrics}"))
    };
    let (acc, challenge) = (
        val_metric("val.vqa_acc"),
        val_metric("val.vqa_challenge_acc"),
    );
    println!(
        "pre-training {SHARED_PRETRAIN_ITERATIONS} iterations: {pretrain_secs:.0}s; fine-tuning {total} \
         steps: {:.0}s; held-out VQA on {questions} questions: exact {:.1} %, challenge {:.1} %, \
         majority answer {majority:?} {:.1} %",
        started.elapsed().as_secs_f64(),
        acc,
        challenge,
        baseline,
    );
    assert!(
        acc >= 2.0 * baseline,
        "held-out exact match {:.1} % is not twice the majority baseline {:.1} %",
        acc,
        baseline
    );
    // The submission of the (answer-less) test split, in the official format.
    let result: Vec<serde_json::Value> = serde_json::from_slice(
        &std::fs::read(dir.path().join("ft/eval/vqa_result.json")).expect("vqa_result.json"),
    )
    .expect("json");
    assert_eq!(result.len() as f64, metric(&closing, "test.questions"));
    assert!(result[0]["question_id"].is_i64() && result[0]["answer"].is_string());
}

/// Every question is answered once, in the same batch, whatever the world size: the same metrics and
/// the same submission file at 1, 2 and 4 ranks (batches of 4 leave a short last one).
#[test]
fn vqa_answers_are_identical_at_world_1_2_4() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = task_common::corpus(dir.path());
    let config = demo_config(
        dir.path(),
        "VQA_demo.yaml",
        &data,
        &[("batch_size_test: 32", "batch_size_test: 2")],
    );
    let spec = finetune_spec("vqa", &config, r#","evaluate":true"#);
    let mut by_world = Vec::new();
    for world in [1usize, 2, 4] {
        let out = format!("file://{}", dir.path().join(format!("w{world}")).display());
        let metrics = finish_at_world::<VqaTask>(&spec, world, &out);
        let read = |name: &str| {
            std::fs::read(dir.path().join(format!("w{world}/eval/{name}"))).expect("result file")
        };
        by_world.push((
            metrics,
            read("vqa_val_result.json"),
            read("vqa_result.json"),
        ));
    }
    println!("world 1: {:?}", by_world[0].0);
    assert!(metric(&by_world[0].0, "val.questions") >= 9.0);
    metric(&by_world[0].0, "val.vqa_challenge_acc");
    assert_eq!(by_world[1], by_world[0], "world 2 differs from world 1");
    assert_eq!(by_world[2], by_world[0], "world 4 differs from world 1");
}

/// 8 steps uninterrupted against 4, a checkpoint, a fresh runner resumed from it and 4 more: every
/// weight bit-identical at world 1. The other tests of this binary draw from libtorch's global
/// generator at the same time, so nothing here may: dropout is off and every runner starts from one
/// saved VQA checkpoint (loaded as is) instead of fresh weights (the runner's dropout replay itself is
/// covered by finetune_retrieval.rs, whose tests take turns).
#[test]
fn vqa_resumes_bit_identically_at_world_1() {
    let _turn = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().expect("tempdir");
    let data = task_common::corpus(dir.path());
    let config = demo_config(
        dir.path(),
        "VQA_demo.yaml",
        &data,
        &[("batch_size_train: 16", "batch_size_train: 8")],
    );
    let (total, save_at) = (8u64, 4u64);
    let comm = SingleProcess;
    let url = |name: &str| format!("file://{}", dir.path().join(name).display());
    let start = dir.path().join("start.safetensors");
    let fresh = finetune_task::<VqaTask>(&finetune_spec("vqa", &config, ""), &comm, &url("fresh"));
    let sd: xvlm_model::checkpoint::StateDict = fresh.state().into_iter().collect();
    xvlm_model::checkpoint::write_safetensors(&sd, &start).expect("write start");
    drop(fresh);
    let spec = finetune_spec(
        "vqa",
        &config,
        &format!(
            r#","steps":{total},"checkpoint":{{"every_steps":{save_at},"keep_last":2}},"overrides":{{"xvlm":{{"dropout":false}}}},"init_checkpoint":"file://{}""#,
            start.display()
        ),
    );
    let mut reference = finetune_task::<VqaTask>(&spec, &comm, &url("reference"));
    run(&mut reference, &comm, 0, total);
    let expected = hashes(&reference);
    drop(reference);

    let storage = Storage::open(&url("resumed")).expect("storage");
    let mut first = finetune_task::<VqaTask>(&spec, &comm, &url("resumed"));
    let mut ck = checkpointer(&storage, &spec, &comm, 1);
    train_saving(&mut first, &mut ck, &comm, 0, save_at, total);
    drop(first);

    let mut second = finetune_task::<VqaTask>(&spec, &comm, &url("resumed"));
    let resumed = checkpointer(&storage, &spec, &comm, 2)
        .resume(&mut second)
        .expect("resume");
    assert_eq!(resumed, Some(save_at), "the checkpoint was not resumed");
    run(&mut second, &comm, save_at, total);
    assert_eq!(hashes(&second), expected, "resumed weights differ");
}
