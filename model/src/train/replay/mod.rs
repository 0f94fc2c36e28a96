//! Parity replays of official training loops: `pretrain_train_steps` ([`pretrain`]) and the fine-tuning
//! `finetune_train_steps` ([`finetune`]), with the comparisons they share (param groups, final weights).

mod finetune;
mod pretrain;

pub use finetune::run_finetune_steps_case;
pub use pretrain::run_train_steps_case;

use std::collections::{BTreeSet, HashMap};
use std::path::Path;

use tch::Tensor;

use super::TrainError;
use crate::checkpoint::{self, StateDict};
use crate::optim::AdamW;
use crate::parity::{self, Comparison, Tolerance};

pub(super) fn case_err(path: &Path, reason: impl std::fmt::Display) -> TrainError {
    TrainError::Case {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    }
}

pub(super) fn read_tensors(path: &Path) -> Result<Vec<(String, Tensor)>, TrainError> {
    Tensor::read_safetensors(path).map_err(|e| case_err(path, e))
}

/// [N, 4] float64 from rows of group lrs.
pub(super) fn matrix(rows: Vec<Vec<f64>>) -> Tensor {
    let n = rows.len() as i64;
    let flat: Vec<f64> = rows.into_iter().flatten().collect();
    let cols = if n == 0 { 0 } else { flat.len() as i64 / n };
    Tensor::from_slice(&flat).view([n, cols])
}

/// One row per official param group: same member names, lr and weight decay.
pub(super) fn param_group_rows(dir: &Path, opt: &AdamW) -> Result<Vec<Comparison>, TrainError> {
    let path = dir.join("param_groups.json");
    let text = std::fs::read_to_string(&path).map_err(|e| case_err(&path, e))?;
    let official: Vec<serde_json::Value> =
        serde_json::from_str(&text).map_err(|e| case_err(&path, e))?;
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
pub(super) fn final_weight_rows(
    dir: &Path,
    ours: &StateDict,
    opt: &AdamW,
    lr_sums: &[f64],
    rtol: f64,
    atol: f64,
) -> Result<Vec<Comparison>, TrainError> {
    let expected = read_tensors(&dir.join("final.safetensors"))?;
    // By storage, so that a tied alias (NLVR2's shared cross K/V under both layers' names) finds the
    // group of the one parameter behind it.
    let group_of: HashMap<usize, usize> = opt
        .groups()
        .iter()
        .enumerate()
        .flat_map(|(g, grp)| grp.params.iter().map(move |&p| (p, g)))
        .map(|(p, g)| (opt.params()[p].tensor.data_ptr() as usize, g))
        .collect();
    let lr_sum = |name: &str| -> f64 {
        ours.get(name)
            .and_then(|t| group_of.get(&(t.data_ptr() as usize)))
            .map_or(0.0, |&g| lr_sums[g])
    };
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

/// The sum over `lrs` (one row per update, one column per group) of each group's lr.
pub(super) fn lr_sums(lrs: &[Vec<f64>], groups: usize) -> Vec<f64> {
    let mut sums = vec![0.0; groups];
    for row in lrs {
        for (sum, lr) in sums.iter_mut().zip(row) {
            *sum += lr;
        }
    }
    sums
}
