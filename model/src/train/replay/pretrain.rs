//! Parity kind `pretrain_train_steps`: replays the official `Pretrain.train` iterations of the fixture
//! (recorded ITM negatives and region-step draws) and compares per-step losses, learning rates, grad
//! norms, the param groups and the final weights.

use std::collections::HashMap;
use std::path::Path;

use tch::{nn::VarStore, Device, Kind, Tensor};

use super::{
    case_err, final_weight_rows, lr_sums, matrix, param_group_rows, read_tensors, TrainError,
};
use crate::collective::SingleProcess;
use crate::config::TaskConfig;
use crate::loss::ReplaySampler;
use crate::parity::{self, CaseSpec, Comparison, WeightsSource};
use crate::tasks::{PretrainBatch, PretrainModel, RegionInputs};
use crate::train::{PretrainTrainer, StepKind, StepLog, TrainSettings};

/// Runs the case folder `dir` (kind `pretrain_train_steps`) with the weights from `weights`.
pub fn run_train_steps_case(
    dir: &Path,
    weights: WeightsSource,
) -> Result<Vec<Comparison>, TrainError> {
    let spec = CaseSpec::load(dir).map_err(|e| case_err(dir, e))?;
    let tol = spec.tolerance();
    let final_rtol = spec
        .extra
        .get("final_weights_rtol")
        .and_then(serde_yaml::Value::as_f64)
        .unwrap_or(1e-4);

    let task = TaskConfig::load(&dir.join("config.yaml"))?;
    let vs = VarStore::new(Device::Cpu);
    let model = PretrainModel::new(&vs.root(), &task)?;
    let aliases = model.core.tied_aliases();
    parity::load_case_weights(&vs, dir, weights, &aliases).map_err(|e| case_err(dir, e))?;
    let mut trainer = PretrainTrainer::from_task(&model, &vs, &task, 1)?;
    // Every dropout and drop-path rate of the fixture run was 0: the forward is the eval one.
    let settings = TrainSettings {
        dropout: false,
        ..trainer.settings().clone()
    };
    trainer = trainer.with_settings(settings);

    let mut rows = param_group_rows(dir, trainer.optimizer())?;

    let batch_path = dir.join("batch.safetensors");
    let batch: HashMap<String, Tensor> = read_tensors(&batch_path)?.into_iter().collect();
    let take = |name: &str| {
        batch
            .get(name)
            .map(Tensor::shallow_clone)
            .ok_or_else(|| case_err(&batch_path, format!("lacks input tensor {name}")))
    };
    let general = pretrain_batch(&take, "general", false)?;
    let region = pretrain_batch(&take, "region", true)?;
    let expected: Vec<(String, Tensor)> = read_tensors(&dir.join("expected.safetensors"))?;
    let expected_map: HashMap<&str, &Tensor> =
        expected.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let draws = expected_map
        .get("iteration.random_draw")
        .ok_or_else(|| case_err(dir, "expected.safetensors lacks iteration.random_draw"))?;
    let draws = Vec::<f64>::try_from(draws.to_kind(Kind::Double))?;

    let mut steps: Vec<StepLog> = Vec::new();
    let mut taken = Vec::new();
    let mut lrs_after = Vec::new();
    let (mut region_k, mut general_k) = (0i64, 0i64);
    for &draw in &draws {
        // The official `random.random() < iter_perc`, on the recorded draw.
        let region_step = draw < trainer.settings().iter_perc;
        taken.push(i64::from(region_step));
        if region_step {
            let mut sampler = ReplaySampler::new(
                take("region.itm_neg_image_idx_per_step")?.get(region_k),
                take("region.itm_neg_text_idx_per_step")?.get(region_k),
            );
            region_k += 1;
            steps.push(trainer.step(StepKind::Region, &[&region], &SingleProcess, &mut sampler)?);
        }
        let mut sampler = ReplaySampler::new(
            take("general.itm_neg_image_idx_per_step")?.get(general_k),
            take("general.itm_neg_text_idx_per_step")?.get(general_k),
        );
        general_k += 1;
        steps.push(trainer.step(StepKind::General, &[&general], &SingleProcess, &mut sampler)?);
        lrs_after.push(trainer.finish_iteration());
    }

    let mut computed: HashMap<String, Tensor> = HashMap::new();
    let f32s = |f: fn(&StepLog) -> f64| {
        Tensor::from_slice(&steps.iter().map(|s| f(s) as f32).collect::<Vec<_>>())
    };
    computed.insert("steps.loss_itc".into(), f32s(|s| s.loss_itc));
    computed.insert("steps.loss_itm".into(), f32s(|s| s.loss_itm));
    computed.insert("steps.loss_mlm".into(), f32s(|s| s.loss_mlm));
    computed.insert("steps.loss_bbox".into(), f32s(|s| s.loss_bbox));
    computed.insert("steps.loss_giou".into(), f32s(|s| s.loss_giou));
    computed.insert("steps.loss_total".into(), f32s(|s| s.loss_total));
    computed.insert("steps.grad_norm".into(), f32s(|s| s.grad_norm));
    let kinds: Vec<i64> = steps
        .iter()
        .map(|s| i64::from(s.kind == StepKind::Region))
        .collect();
    computed.insert("steps.kind".into(), Tensor::from_slice(&kinds));
    let iterations: Vec<i64> = steps.iter().map(|s| s.iteration as i64).collect();
    computed.insert("steps.iteration".into(), Tensor::from_slice(&iterations));
    computed.insert(
        "steps.lr".into(),
        matrix(steps.iter().map(|s| s.lrs.clone()).collect()),
    );
    computed.insert(
        "iteration.lr_after_scheduler_step".into(),
        matrix(lrs_after),
    );
    computed.insert(
        "iteration.region_step_taken".into(),
        Tensor::from_slice(&taken),
    );

    for (name, e) in &expected {
        if name == "iteration.random_draw" {
            rows.push(Comparison {
                name: name.clone(),
                max_abs: 0.0,
                max_rel: 0.0,
                passed: true,
                note: Some(
                    "replayed input: decides the region steps here; live training derives its coin \
                     from (seed, step)"
                        .into(),
                ),
            });
            continue;
        }
        rows.push(match computed.get(name) {
            Some(got) => parity::compare(name, got, e, tol),
            None => parity::not_computed(name),
        });
    }
    let used: Vec<Vec<f64>> = steps.iter().map(|s| s.lrs.clone()).collect();
    let sums = lr_sums(&used, trainer.optimizer().groups().len());
    rows.extend(final_weight_rows(
        dir,
        &model.core.state_dict(&vs),
        trainer.optimizer(),
        &sums,
        final_rtol,
        tol.atol,
    )?);
    Ok(rows)
}

fn pretrain_batch(
    take: &dyn Fn(&str) -> Result<Tensor, TrainError>,
    prefix: &str,
    region: bool,
) -> Result<PretrainBatch, TrainError> {
    let t = |name: &str| take(&format!("{prefix}.{name}"));
    Ok(PretrainBatch {
        image: t("image")?,
        text_ids: t("text_ids")?,
        text_atts: t("text_atts")?,
        text_ids_masked: t("text_ids_masked")?,
        masked_pos: t("masked_pos")?,
        masked_ids: t("masked_ids")?,
        region: if region {
            Some(RegionInputs {
                idx_to_group_img: t("idx_to_group_img")?,
                image_atts: t("image_atts")?,
                target_bbox: t("target_bbox")?,
                is_image: t("is_image")?,
            })
        } else {
            None
        },
    })
}
