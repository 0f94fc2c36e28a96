//! Parity kind `finetune_train_steps`: replays the official fine-tuning loop of the case's `task:`
//! (`Retrieval.train`, ...) on the case's fixed batches (recorded ITM negatives where the task draws
//! any) through the shared [`FinetuneTrainer`], and compares per-step losses, learning rates, grad
//! norms, per-parameter gradient norms, the task's intermediates, the param groups and the final
//! weights.
//!
//! Everything the replay needs is read from the case folder: the batches (`batch{k}.*`), which batch
//! each step trains on (`steps.batch_index`), the scheduler's dataset size (`train_dataset_size`, a
//! fixture-only key of its config) and `batch_size_train`. The epoch of a step is the data layer's
//! `drop_last` count of batches per epoch, `floor(train_dataset_size / batch)`.

use std::collections::HashMap;
use std::path::Path;

use tch::{nn::VarStore, Device, Kind, Tensor};

use super::{
    case_err, final_weight_rows, lr_sums, matrix, param_group_rows, read_tensors, TrainError,
};
use crate::collective::SingleProcess;
use crate::config::{FinetuneKeys, TaskConfig};
use crate::data::finetune::grounding::GroundingBoxBatch;
use crate::data::finetune::nlvr::NlvrBatch;
use crate::data::finetune::retrieval::RetrievalTrainBatch;
use crate::data::finetune::vqa::VqaTrainBatch;
use crate::loss::{MultinomialSampler, NegativeSampler, ReplaySampler};
use crate::optim::{named_trainable_params, Gradients, NamedParam};
use crate::parity::{self, CaseSpec, Comparison, WeightsSource};
use crate::tasks::grounding_bbox::GroundingBboxModel;
use crate::tasks::retrieval::RetrievalModel;
use crate::tasks::vqa::VqaModel;
use crate::tasks::NlvrModel;
use crate::train::finetune::{
    finetune_schedule, FinetuneModel, FinetuneStepLog, FinetuneTrainer, StepObserver, StepShape,
    TaskForward,
};

/// The case's `batch.safetensors`, looked up by name.
struct CaseInputs {
    path: std::path::PathBuf,
    tensors: HashMap<String, Tensor>,
}

impl CaseInputs {
    fn load(dir: &Path) -> Result<Self, TrainError> {
        let path = dir.join("batch.safetensors");
        let tensors = read_tensors(&path)?.into_iter().collect();
        Ok(Self { path, tensors })
    }

    fn get(&self, name: &str) -> Result<Tensor, TrainError> {
        self.tensors
            .get(name)
            .map(Tensor::shallow_clone)
            .ok_or_else(|| case_err(&self.path, format!("lacks input tensor {name}")))
    }
}

/// Runs the case folder `dir` (kind `finetune_train_steps`) with the weights from `weights`.
pub fn run_finetune_steps_case(
    dir: &Path,
    weights: WeightsSource,
) -> Result<Vec<Comparison>, TrainError> {
    let spec = CaseSpec::load(dir).map_err(|e| case_err(dir, e))?;
    let task_name = spec
        .extra
        .get("task")
        .and_then(serde_yaml::Value::as_str)
        .ok_or_else(|| case_err(&dir.join("case.yaml"), "lacks `task:`"))?
        .to_string();
    let task = TaskConfig::load(&dir.join("config.yaml"))?;
    let vs = VarStore::new(Device::Cpu);
    match task_name.as_str() {
        "retrieval" => {
            let model = RetrievalModel::new(&vs.root(), &task)?;
            load_weights(dir, &vs, weights, &model.core.tied_aliases())?;
            let state = || model.core.state_dict(&vs);
            replay(dir, &spec, &task, &vs, &model, retrieval_batch, state)
        }
        "vqa" => {
            let model = VqaModel::new(&vs.root(), &task)?;
            load_weights(dir, &vs, weights, &model.tied_aliases())?;
            let state = || model.state_dict(&vs);
            replay(dir, &spec, &task, &vs, &model, vqa_batch, state)
        }
        "nlvr" => {
            let model = NlvrModel::new(&vs.root(), &task)?;
            load_weights(dir, &vs, weights, &model.core.tied_aliases())?;
            let state = || model.core.state_dict(&vs);
            replay(dir, &spec, &task, &vs, &model, nlvr_batch, state)
        }
        "grounding_bbox" => {
            let model = GroundingBboxModel::new(&vs.root(), &task)?;
            load_weights(dir, &vs, weights, &model.core.tied_aliases())?;
            let state = || model.core.state_dict(&vs);
            replay(dir, &spec, &task, &vs, &model, grounding_bbox_batch, state)
        }
        other => Err(case_err(
            dir,
            format!("finetune_train_steps for task {other:?} is not implemented in this build"),
        )),
    }
}

fn load_weights(
    dir: &Path,
    vs: &VarStore,
    weights: WeightsSource,
    aliases: &[(String, String)],
) -> Result<(), TrainError> {
    parity::load_case_weights(vs, dir, weights, aliases).map_err(|e| case_err(dir, e))
}

fn retrieval_batch(inputs: &CaseInputs, prefix: &str) -> Result<RetrievalTrainBatch, TrainError> {
    let t = |name: &str| inputs.get(&format!("{prefix}.{name}"));
    Ok(RetrievalTrainBatch {
        image: t("image")?,
        text_ids: t("text_ids")?,
        text_atts: t("text_atts")?,
        idx: t("idx")?,
    })
}

fn vqa_batch(inputs: &CaseInputs, prefix: &str) -> Result<VqaTrainBatch, TrainError> {
    let t = |name: &str| inputs.get(&format!("{prefix}.{name}"));
    Ok(VqaTrainBatch {
        image: t("image")?,
        text_ids: t("question_ids")?,
        text_atts: t("question_atts")?,
        answer_ids: t("answer_ids")?,
        answer_atts: t("answer_atts")?,
        weights: t("weights")?,
        k: Vec::<i64>::try_from(t("k")?)?,
    })
}

fn nlvr_batch(inputs: &CaseInputs, prefix: &str) -> Result<NlvrBatch, TrainError> {
    let t = |name: &str| inputs.get(&format!("{prefix}.{name}"));
    Ok(NlvrBatch {
        image0: t("image0")?,
        image1: t("image1")?,
        text_ids: t("text_ids")?,
        text_atts: t("text_atts")?,
        targets: t("targets")?,
    })
}

fn grounding_bbox_batch(
    inputs: &CaseInputs,
    prefix: &str,
) -> Result<GroundingBoxBatch, TrainError> {
    let t = |name: &str| inputs.get(&format!("{prefix}.{name}"));
    Ok(GroundingBoxBatch {
        image: t("image")?,
        text_ids: t("text_ids")?,
        text_atts: t("text_atts")?,
        target_bbox: t("target_bbox")?,
    })
}

/// Records each step's intermediates and per-parameter gradient norms.
#[derive(Default)]
struct Recorder {
    /// Per debug name, one tensor per step.
    debug: HashMap<&'static str, Vec<Tensor>>,
    /// Per step, each parameter's gradient norm by name (-1 = no gradient).
    grad_norms: Vec<HashMap<String, f32>>,
}

impl StepObserver for Recorder {
    fn forward(&mut self, forward: &TaskForward) {
        for (name, t) in &forward.debug {
            self.debug.entry(name).or_default().push(t.shallow_clone());
        }
    }

    fn gradients(&mut self, params: &[NamedParam], grads: &Gradients) {
        let norms = params
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let norm = grads
                    .get(i)
                    .and_then(|g| g.f_norm().ok())
                    .and_then(|n| n.f_double_value(&[]).ok())
                    .map_or(-1.0, |n| n as f32);
                (p.name.clone(), norm)
            })
            .collect();
        self.grad_norms.push(norms);
    }
}

fn replay<M: FinetuneModel>(
    dir: &Path,
    spec: &CaseSpec,
    task: &TaskConfig,
    vs: &VarStore,
    model: &M,
    batch_of: fn(&CaseInputs, &str) -> Result<M::Batch, TrainError>,
    state: impl Fn() -> crate::checkpoint::StateDict,
) -> Result<Vec<Comparison>, TrainError> {
    let tol = spec.tolerance();
    let final_rtol = spec
        .extra
        .get("final_weights_rtol")
        .and_then(serde_yaml::Value::as_f64)
        .unwrap_or(1e-4);
    let keys = FinetuneKeys::from_task(task)?;
    let size = task.train_dataset_size.ok_or_else(|| {
        case_err(
            &dir.join("config.yaml"),
            "lacks `train_dataset_size` (the dataset length the official scheduler saw)",
        )
    })?;
    let schedule = finetune_schedule(task, size, keys.batch_size_train, 1)?;
    let batches_per_epoch = (size / keys.batch_size_train as u64).max(1);
    let mut trainer =
        FinetuneTrainer::new(model, named_trainable_params(vs), task, schedule, 0, false)?;
    let mut rows = param_group_rows(dir, trainer.engine().optimizer())?;

    let inputs = CaseInputs::load(dir)?;
    let order = Vec::<i64>::try_from(inputs.get("steps.batch_index")?)?;
    let mut recorder = Recorder::default();
    let mut logs: Vec<FinetuneStepLog> = Vec::new();
    for (s, &k) in order.iter().enumerate() {
        let batch = batch_of(&inputs, &format!("batch{k}"))?;
        let mut sampler: Box<dyn NegativeSampler> = match (
            inputs.get("steps.itm_neg_image_idx"),
            inputs.get("steps.itm_neg_text_idx"),
        ) {
            (Ok(image), Ok(text)) => {
                Box::new(ReplaySampler::new(image.get(s as i64), text.get(s as i64)))
            }
            // A task that draws no negatives never calls the sampler.
            _ => Box::new(MultinomialSampler::new(0)),
        };
        logs.push(trainer.step_with(
            &[&batch],
            StepShape::default(),
            &SingleProcess,
            &mut *sampler,
            &mut recorder,
        )?);
    }

    let mut computed: HashMap<String, Tensor> = HashMap::new();
    let f32s = |values: Vec<f64>| {
        Tensor::from_slice(&values.into_iter().map(|v| v as f32).collect::<Vec<_>>())
    };
    for (i, name) in M::LOSS_NAMES.iter().chain(&["total"]).enumerate() {
        let values: Vec<f64> = logs.iter().map(|l| l.losses[i].1).collect();
        if *name == "total" {
            // Single-loss tasks record the back-propagated loss as `steps.loss`.
            computed.insert("steps.loss".into(), f32s(values.clone()));
        }
        computed.insert(format!("steps.loss_{name}"), f32s(values));
    }
    computed.insert(
        "steps.grad_norm".into(),
        f32s(logs.iter().map(|l| l.update.grad_norm).collect()),
    );
    let used: Vec<Vec<f64>> = logs.iter().map(|l| l.update.lrs.clone()).collect();
    computed.insert("steps.lr".into(), matrix(used.clone()));
    computed.insert(
        "steps.lr_after_scheduler_step".into(),
        matrix(logs.iter().map(|l| l.lrs_after.clone()).collect()),
    );
    let epochs: Vec<i64> = logs
        .iter()
        .map(|l| (l.step / batches_per_epoch) as i64)
        .collect();
    computed.insert("steps.epoch".into(), Tensor::from_slice(&epochs));
    for (name, per_step) in &recorder.debug {
        // Per-step shapes differ where batches do (VQA answers): those exist only as `step{s}.X`.
        if let Ok(stacked) = Tensor::f_stack(per_step, 0) {
            computed.insert(format!("steps.{name}"), stacked);
        }
        for (s, t) in per_step.iter().enumerate() {
            computed.insert(format!("step{s}.{name}"), t.shallow_clone());
        }
    }
    computed.insert(
        "steps.param_grad_norm".into(),
        param_grad_norms(dir, &recorder.grad_norms)?,
    );

    let expected = read_tensors(&dir.join("expected.safetensors"))?;
    for (name, e) in &expected {
        rows.push(match computed.get(name) {
            Some(got) => parity::compare(name, &got.to_kind(e.kind()), e, tol),
            None => parity::not_computed(name),
        });
    }
    let opt = trainer.engine().optimizer();
    let sums = lr_sums(&used, opt.groups().len());
    rows.extend(final_weight_rows(
        dir,
        &state(),
        opt,
        &sums,
        final_rtol,
        tol.atol,
    )?);
    Ok(rows)
}

/// `steps.param_grad_norm` [steps, P] in the order of `info.json`'s `param_grad_norm_names`.
fn param_grad_norms(dir: &Path, per_step: &[HashMap<String, f32>]) -> Result<Tensor, TrainError> {
    let path = dir.join("info.json");
    let text = std::fs::read_to_string(&path).map_err(|e| case_err(&path, e))?;
    let info: serde_json::Value = serde_json::from_str(&text).map_err(|e| case_err(&path, e))?;
    let names: Vec<&str> = info["param_grad_norm_names"]
        .as_array()
        .ok_or_else(|| case_err(&path, "lacks `param_grad_norm_names`"))?
        .iter()
        .filter_map(serde_json::Value::as_str)
        .collect();
    let mut flat = Vec::with_capacity(per_step.len() * names.len());
    for norms in per_step {
        for name in &names {
            // A name the optimizer does not hold (NaN) fails the comparison instead of hiding.
            flat.push(norms.get(*name).copied().unwrap_or(f32::NAN));
        }
    }
    Ok(Tensor::from_slice(&flat)
        .view([per_step.len() as i64, names.len() as i64])
        .to_kind(Kind::Float))
}
