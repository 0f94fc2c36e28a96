//! The two domain pre-trainings on the fine-tune runner, `task: nlvr_pretrain` (NLVR_pretrain.py) and
//! `task: grounding_bbox_pretrain` (Grounding_bbox_pretrain.py), on the demo corpus's json lines: from
//! the binary's shared briefly pre-trained checkpoint each lowers its own loss over a short run, a
//! resumed run ends bit-identical to an uninterrupted one, and the final weights load into the
//! downstream task (`nlvr`, `grounding_bbox`) as its `init_checkpoint`; from the committed learning
//! start (tests/fixtures/learning) on the learning corpus the NLVR2 pre-training learns the
//! text-to-images alignment. Every run here is without dropout: the other tests of this binary share
//! libtorch's global generator.

use std::path::Path;
use std::time::Instant;

use tch::Tensor;
use xvlm_model::checkpoint::{write_safetensors, StateDict};
use xvlm_model::collective::SingleProcess;
use xvlm_worker::checkpoint::Storage;
use xvlm_worker::trainer::finetune::grounding_bbox::GroundingBboxTask;
use xvlm_worker::trainer::finetune::grounding_bbox_pretrain::GroundingBboxPretrainTask;
use xvlm_worker::trainer::finetune::nlvr::NlvrTask;
use xvlm_worker::trainer::finetune::nlvr_pretrain::NlvrPretrainTask;
use xvlm_worker::trainer::finetune::FinetuneTask;
use xvlm_worker::trainer::task::TrainTask;

use crate::task_common::learning::{learning_corpus, learning_start};
use crate::task_common::{
    self, checkpointer, demo_config, finetune_spec, finetune_task, hashes, run, shared_pretrained,
    train_saving,
};
use crate::SERIAL;

const NO_DROPOUT: &str = r#","overrides":{"xvlm":{"dropout":false}}"#;

/// The mean of loss `name` over `steps`.
fn mean_loss(steps: &[Vec<(String, f64)>], name: &str) -> f64 {
    let values: Vec<f64> = steps.iter().map(|s| task_common::metric(s, name)).collect();
    values.iter().sum::<f64>() / values.len().max(1) as f64
}

/// The runner's weights as a safetensors file at `path` (what a job writes as its final weights).
fn save_state(task: &impl TrainTask, path: &Path) {
    let sd: StateDict = task.state().into_iter().collect();
    write_safetensors(&sd, path).expect("write checkpoint");
}

/// `key` of `state`.
fn tensor<'a>(state: &'a [(String, Tensor)], key: &str) -> &'a Tensor {
    &state
        .iter()
        .find(|(k, _)| k == key)
        .unwrap_or_else(|| panic!("no {key}"))
        .1
}

/// A runner and every step's losses.
type Trained<T> = (
    xvlm_worker::trainer::runner::Runner<T>,
    Vec<Vec<(String, f64)>>,
);

/// Trains `T` for `steps` steps from the shared pre-trained checkpoint on demo config `config`
/// (`patch` applied), returning the runner and every step's losses.
fn train_from_pretrained<T: FinetuneTask>(
    dir: &Path,
    config: &str,
    patch: &[(&str, &str)],
    steps: u64,
) -> Trained<T> {
    let (data, checkpoint, _) = shared_pretrained();
    train_from(dir, data, checkpoint, config, patch, steps)
}

/// Trains `T` for `steps` steps from `checkpoint` on demo config `config` over the corpus `data`
/// (`patch` applied), without dropout.
fn train_from<T: FinetuneTask>(
    dir: &Path,
    data: &Path,
    checkpoint: &Path,
    config: &str,
    patch: &[(&str, &str)],
    steps: u64,
) -> Trained<T> {
    let config = demo_config(dir, config, data, patch);
    let spec = finetune_spec(
        T::NAME,
        &config,
        &format!(
            r#","steps":{steps},"init_checkpoint":"file://{}"{NO_DROPOUT}"#,
            checkpoint.display()
        ),
    );
    let out = format!("file://{}", dir.join("out").display());
    let mut task = finetune_task::<T>(&spec, &SingleProcess, &out);
    let losses = run(&mut task, &SingleProcess, 0, steps);
    (task, losses)
}

/// Exact resume of `T` on the small corpus: a run of `total` steps and one saved at `save_at` and
/// resumed end with identical weights (both start from one saved starting point, loaded as is).
fn resumes_bit_identically<T: FinetuneTask>(config: &str, total: u64, save_at: u64) {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = task_common::corpus(dir.path());
    let config = demo_config(dir.path(), config, &data, &[]);
    let comm = SingleProcess;
    let url = |name: &str| format!("file://{}", dir.path().join(name).display());
    let start = dir.path().join("start.safetensors");
    let fresh = finetune_task::<T>(&finetune_spec(T::NAME, &config, ""), &comm, &url("fresh"));
    save_state(&fresh, &start);
    drop(fresh);
    let spec = finetune_spec(
        T::NAME,
        &config,
        &format!(
            r#","steps":{total},"checkpoint":{{"every_steps":{save_at},"keep_last":2}},"init_checkpoint":"file://{}"{NO_DROPOUT}"#,
            start.display()
        ),
    );
    let mut reference = finetune_task::<T>(&spec, &comm, &url("reference"));
    run(&mut reference, &comm, 0, total);
    let expected = hashes(&reference);
    drop(reference);

    let storage = Storage::open(&url("resumed")).expect("storage");
    let mut first = finetune_task::<T>(&spec, &comm, &url("resumed"));
    let mut ck = checkpointer(&storage, &spec, &comm, 1);
    train_saving(&mut first, &mut ck, &comm, 0, save_at, total);
    drop(first);

    let mut second = finetune_task::<T>(&spec, &comm, &url("resumed"));
    let resumed = checkpointer(&storage, &spec, &comm, 2)
        .resume(&mut second)
        .expect("resume");
    assert_eq!(resumed, Some(save_at), "the checkpoint was not resumed");
    run(&mut second, &comm, save_at, total);
    assert_eq!(hashes(&second), expected, "resumed weights differ");
}

/// NLVR pre-training from the shared pre-trained checkpoint lowers its three-way CE on the demo
/// image-text lines over 80 steps of 8 pairs (lr 1e-4): the mean of the last 20 steps is at least 0.1
/// below that of the first 20. Measured: 1.255 -> 1.080. What this shows is the new `ta_head`
/// calibrating onto the label prior (ln 3 = 1.099 is the CE of uniform predictions); that the tiny
/// model learns the text-to-images alignment itself is the next test, from a longer start.
#[test]
fn nlvr_pretrain_lowers_its_loss() {
    let _turn = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().expect("tempdir");
    let started = Instant::now();
    let (_task, losses) =
        train_from_pretrained::<NlvrPretrainTask>(dir.path(), "NLVR_pretrain_demo.yaml", &[], 80);
    let (first, last) = (
        mean_loss(&losses[..20], "ce"),
        mean_loss(&losses[60..], "ce"),
    );
    println!(
        "nlvr_pretrain: CE {first:.4} (steps 0-19) -> {last:.4} (steps 60-79), {:.1}s",
        started.elapsed().as_secs_f64()
    );
    assert!(last < first - 0.1, "CE {first:.4} -> {last:.4}");
}

/// The learning floor: the alignment learned, CE below 0.95 (well under the prior's ln 3 = 1.099) over
/// the last 40 of 800 steps (2 epochs of the learning corpus's 3,200 lines) from the committed
/// pre-trained start (tests/fixtures/learning). At the demo config's lr 1e-4 the CE falls too slowly
/// (0.89 over steps 400-599 of a 2,000-step run), so this takes 3e-4; from the binary's 120-iteration
/// start on the demo's 320 lines no lr got below the label prior (1.07-1.11).
#[test]
fn nlvr_pretrain_learns_the_alignment() {
    let _turn = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().expect("tempdir");
    let (data, _) = learning_corpus();
    let patch = [
        ("train_dataset_size: 320 ", "train_dataset_size: 3200 "),
        ("epochs: 4,", "epochs: 2,"),
        ("lr: 1e-4,", "lr: 3e-4,"),
    ];
    let steps = 800;
    let (_task, losses) = train_from::<NlvrPretrainTask>(
        dir.path(),
        data,
        &learning_start("pretrained"),
        "NLVR_pretrain_demo.yaml",
        &patch,
        steps,
    );
    for (k, chunk) in losses.chunks(100).enumerate() {
        println!(
            "steps {}-{}: CE {:.4}",
            100 * k,
            100 * k + chunk.len() - 1,
            mean_loss(chunk, "ce")
        );
    }
    let last = mean_loss(&losses[losses.len() - 40..], "ce");
    assert!(last < 0.95, "CE {last:.4} over the last 40 steps");
}

/// Box pre-training from the shared pre-trained checkpoint lowers L1 + GIoU on the demo region lines:
/// the mean total of the last 20 steps is below that of the first 20 after 80 steps.
#[test]
fn grounding_bbox_pretrain_lowers_its_loss() {
    let _turn = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().expect("tempdir");
    let started = Instant::now();
    let steps = 80;
    let (_task, losses) = train_from_pretrained::<GroundingBboxPretrainTask>(
        dir.path(),
        "Grounding_bbox_pretrain_demo.yaml",
        &[],
        steps,
    );
    let (first, last) = (
        mean_loss(&losses[..20], "total"),
        mean_loss(&losses[60..], "total"),
    );
    println!(
        "grounding_bbox_pretrain: L1 + GIoU {first:.4} (steps 0-19) -> {last:.4} (steps 60-79), {:.1}s",
        started.elapsed().as_secs_f64()
    );
    assert!(last < first, "loss {first:.4} -> {last:.4}");
}

/// A mid-run resume of the NLVR pre-training (saved inside the second epoch of 3 steps) ends
/// bit-identical: the image pairs are drawn again from the batches' own seeds.
#[test]
fn nlvr_pretrain_resumes_bit_identically_at_world_1() {
    let _turn = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    resumes_bit_identically::<NlvrPretrainTask>("NLVR_pretrain_demo.yaml", 6, 4);
}

/// A mid-run resume of the box pre-training ends bit-identical.
#[test]
fn grounding_bbox_pretrain_resumes_bit_identically_at_world_1() {
    let _turn = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    resumes_bit_identically::<GroundingBboxPretrainTask>("Grounding_bbox_pretrain_demo.yaml", 8, 4);
}

/// The NLVR pre-training's final weights are the NLVR2 fine-tune's `init_checkpoint` in the doubled
/// layout: loaded as they are (the second layer of a cross pair keeps its own trained query, not a
/// copy of the first's), `ta_head` and `vision_proj` skipped.
#[test]
fn nlvr_pretrain_checkpoint_loads_into_nlvr() {
    let _turn = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().expect("tempdir");
    let (pretrain, _) =
        train_from_pretrained::<NlvrPretrainTask>(dir.path(), "NLVR_pretrain_demo.yaml", &[], 3);
    let trained = pretrain.state();
    let file = dir.path().join("nlvr_pretrain.safetensors");
    save_state(&pretrain, &file);
    drop(pretrain);
    assert!(trained.iter().any(|(k, _)| k.starts_with("ta_head.")));

    let (data, _, _) = shared_pretrained();
    let config = demo_config(dir.path(), "NLVR_demo.yaml", data, &[]);
    let spec = finetune_spec(
        "nlvr",
        &config,
        &format!(r#","init_checkpoint":"file://{}""#, file.display()),
    );
    let nlvr = finetune_task::<NlvrTask>(&spec, &SingleProcess, "");
    let loaded = nlvr.state();
    // Tiny BERT: fusion_layer 2 of 4 layers → the pairs (2, 3) and (4, 5).
    let query =
        |l: usize| format!("text_encoder.encoder.layer.{l}.crossattention.self.query.weight");
    assert!(tensor(&loaded, &query(3)).equal(tensor(&trained, &query(3))));
    assert!(!tensor(&loaded, &query(3)).equal(tensor(&loaded, &query(2))));
    for (k, t) in &loaded {
        if k.starts_with("cls_head.") {
            continue;
        }
        assert!(t.equal(tensor(&trained, k)), "{k} was not loaded as saved");
    }
    assert!(!loaded.iter().any(|(k, _)| k.starts_with("ta_head.")));
}

/// The box pre-training's final weights are the box fine-tune's `init_checkpoint` (the official
/// `--load_bbox_pretrain`): every weight, `bbox_head` included, loads as saved.
#[test]
fn grounding_bbox_pretrain_checkpoint_loads_into_grounding_bbox() {
    let _turn = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().expect("tempdir");
    let (pretrain, _) = train_from_pretrained::<GroundingBboxPretrainTask>(
        dir.path(),
        "Grounding_bbox_pretrain_demo.yaml",
        &[],
        3,
    );
    let trained = pretrain.state();
    let file = dir.path().join("bbox_pretrain.safetensors");
    save_state(&pretrain, &file);
    drop(pretrain);

    let (data, checkpoint, _) = shared_pretrained();
    let config = demo_config(dir.path(), "Grounding_bbox_demo.yaml", data, &[]);
    let spec = |file: &Path| {
        finetune_spec(
            "grounding_bbox",
            &config,
            &format!(r#","init_checkpoint":"file://{}""#, file.display()),
        )
    };
    let bbox = finetune_task::<GroundingBboxTask>(&spec(&file), &SingleProcess, "");
    let loaded = bbox.state();
    assert_eq!(loaded.len(), trained.len());
    for (k, t) in &loaded {
        assert!(t.equal(tensor(&trained, k)), "{k} was not loaded as saved");
    }
    // The domain pre-training moved the head away from the general checkpoint's.
    let general = finetune_task::<GroundingBboxTask>(&spec(checkpoint), &SingleProcess, "");
    let head = "bbox_head.3.weight";
    assert!(!tensor(&general.state(), head).equal(tensor(&loaded, head)));
}
