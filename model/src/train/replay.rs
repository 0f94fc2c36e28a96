//! Parity kind `pretrain_train_steps`: replays the official `Pretrain.train` iterations of the fixture
//! (recorded ITM negatives and region-step draws) and compares per-step losses, learning rates, grad
//! norms, the param groups and the final weights.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;

use tch::{nn::VarStore, Device, Kind, Tensor};

use super::pretrain::{PretrainTrainer, StepKind, StepLog};
use super::TrainError;
use crate::checkpoint;
use crate::collective::SingleProcess;
use crate::config::TaskConfig;
use crate::loss::ReplaySampler;
use crate::parity::{self, CaseSpec, Comparison, Tolerance, WeightsSource};
use crate::tasks::{PretrainBatch, PretrainModel, RegionInputs};

fn case_err(path: &Path, reason: impl std::fmt::Display) -> TrainError {
    TrainError::Case {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    }
}

fn read_tensors(path: &Path) -> Result<Vec<(String, Tensor)>, TrainError> {
    Tensor::read_safetensors(path).map_err(|e| case_err(path, e))
}

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
    let settings = super::TrainSettings {
        dropout: false,
        ..trainer.settings().clone()
    };
    trainer = trainer.with_settings(settings);

    let mut rows = param_group_rows(dir, &trainer)?;

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
    let mut lr_sums = vec![0.0; trainer.optimizer().groups().len()];
    for step in &steps {
        for (sum, lr) in lr_sums.iter_mut().zip(&step.lrs) {
            *sum += lr;
        }
    }
    rows.extend(final_weight_rows(
        dir, &vs, &model, &trainer, &lr_sums, final_rtol, tol.atol,
    )?);
    Ok(rows)
}

/// [N, 4] float64 from rows of group lrs.
fn matrix(rows: Vec<Vec<f64>>) -> Tensor {
    let n = rows.len() as i64;
    let flat: Vec<f64> = rows.into_iter().flatten().collect();
    let cols = if n == 0 { 0 } else { flat.len() as i64 / n };
    Tensor::from_slice(&flat).view([n, cols])
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

/// One row per official param group: same member names, lr and weight decay.
fn param_group_rows(dir: &Path, trainer: &PretrainTrainer) -> Result<Vec<Comparison>, TrainError> {
    let path = dir.join("param_groups.json");
    let text = std::fs::read_to_string(&path).map_err(|e| case_err(&path, e))?;
    let official: Vec<serde_json::Value> =
        serde_json::from_str(&text).map_err(|e| case_err(&path, e))?;
    let opt = trainer.optimizer();
    let mut rows = Vec::new();
    for (i, group) in official.iter().enumerate() {
        let name = format!("param_groups.{i}");
        let want: BTreeSet<&str> = group["params"]
            .as_array()
            .map(|a| a.iter().filter_map(|v| v.as_str()).collect())
            .unwrap_or_default();
        let Some(ours) = opt.groups().get(i) else {
            rows.push(parity::not_computed(&name));
            continue;
        };
        let got: BTreeSet<&str> = ours
            .params
            .iter()
            .map(|&p| opt.params()[p].name.as_str())
            .collect();
        let missing: Vec<&&str> = want.difference(&got).take(3).collect();
        let extra: Vec<&&str> = got.difference(&want).take(3).collect();
        let lr = group["initial_lr"].as_f64().unwrap_or(f64::NAN);
        let wd = group["weight_decay"].as_f64().unwrap_or(f64::NAN);
        let same_hyper =
            (ours.initial_lr - lr).abs() <= 1e-12 && (ours.weight_decay - wd).abs() <= 1e-12;
        let passed = missing.is_empty() && extra.is_empty() && same_hyper;
        rows.push(Comparison {
            name,
            max_abs: 0.0,
            max_rel: 0.0,
            passed,
            note: (!passed).then(|| {
                format!(
                    "missing {missing:?}, unexpected {extra:?}, lr {} vs {lr}, wd {} vs {wd}",
                    ours.initial_lr, ours.weight_decay
                )
            }),
        });
    }
    Ok(rows)
}

/// True for the attention key biases, whose gradient is mathematically zero (see the case README).
fn is_key_bias(name: &str) -> bool {
    name.ends_with("attention.self.key.bias")
}

/// Compares every tensor of `final.safetensors` with the trained weights: relative `rtol`, except the
/// key biases (and the key third of Swin `qkv.bias`), which get an absolute tolerance of 3 × the sum
/// of the lrs their group used (`lr_sums`; float32 noise that Adam normalises into updates of size
/// ~lr per step).
fn final_weight_rows(
    dir: &Path,
    vs: &VarStore,
    model: &PretrainModel,
    trainer: &PretrainTrainer,
    lr_sums: &[f64],
    rtol: f64,
    atol: f64,
) -> Result<Vec<Comparison>, TrainError> {
    let expected = read_tensors(&dir.join("final.safetensors"))?;
    let ours = model.core.state_dict(vs);
    let opt = trainer.optimizer();
    let group_of: HashMap<&str, usize> = opt
        .groups()
        .iter()
        .enumerate()
        .flat_map(|(g, grp)| grp.params.iter().map(move |&p| (p, g)))
        .map(|(p, g)| (opt.params()[p].name.as_str(), g))
        .collect();
    let lr_sum = |name: &str| -> f64 { group_of.get(name).map_or(0.0, |&g| lr_sums[g]) };
    let rel = Tolerance { rtol, atol };
    let mut rows = Vec::new();
    for (name, e) in &expected {
        let Some(got) = ours.get(name) else {
            if checkpoint::load::is_computed_buffer(name) {
                continue;
            }
            rows.push(parity::not_computed(&format!("final.{name}")));
            continue;
        };
        let row_name = format!("final.{name}");
        if is_key_bias(name) {
            let abs = Tolerance {
                rtol: 0.0,
                atol: 3.0 * lr_sum(name),
            };
            rows.push(parity::compare(&format!("{row_name} (abs)"), got, e, abs));
        } else if name.ends_with("attn.qkv.bias") && e.dim() == 1 && e.size()[0] % 3 == 0 {
            let c = e.size()[0] / 3;
            let qv = |t: &Tensor| Tensor::cat(&[t.narrow(0, 0, c), t.narrow(0, 2 * c, c)], 0);
            rows.push(parity::compare(
                &format!("{row_name}[q,v]"),
                &qv(got),
                &qv(e),
                rel,
            ));
            let abs = Tolerance {
                rtol: 0.0,
                atol: 3.0 * lr_sum(name),
            };
            rows.push(parity::compare(
                &format!("{row_name}[k] (abs)"),
                &got.narrow(0, c, c),
                &e.narrow(0, c, c),
                abs,
            ));
        } else {
            rows.push(parity::compare(&row_name, got, e, rel));
        }
    }
    Ok(rows)
}
