//! Parity kind `grounding_weak_eval`: the weakly supervised RefCOCO+ evaluation (Grounding.py `val` with
//! `--gradcam_mode itm`, then `grounding_eval`) on the retrieval model. Every batch `batch{k}.*` of
//! `batch.safetensors` runs [`itm_gradcam`] on the images its expressions point to (`eval.image_index`,
//! in loader order); the maps then go through [`grounding_eval`] with each expression's image size,
//! detections, ground-truth box and split from the `eval.*` inputs. `block_num` and the patch grid come
//! from `config.yaml`.

use std::collections::HashMap;
use std::path::Path;

use tch::{Device, Kind, Tensor};

use super::{compare, not_computed, CaseBatch, CaseModel, CaseSpec, Comparison, ParityError};
use super::{read_tensors, Tolerance, WeightsSource};
use crate::metrics::grounding::GroundingSplit;
use crate::tasks::grounding_weak::{
    grounding_eval, itm_gradcam, ExpressionEval, ExpressionInput, GradCamConfig,
};
use crate::tasks::RetrievalModel;

/// Runs the case in `dir` on the CPU.
pub fn run(
    dir: &Path,
    spec: &CaseSpec,
    weights: WeightsSource,
) -> Result<Vec<Comparison>, ParityError> {
    let CaseModel { task, model, .. } =
        CaseModel::load(dir, weights, Device::Cpu, RetrievalModel::new, |m| {
            m.core.tied_aliases()
        })?;
    let cfg = GradCamConfig::from_task(&task)?;
    let batch = CaseBatch::open(dir, Device::Cpu)?;
    let mut computed = HashMap::new();
    let maps = run_batches(&model, &batch, cfg, &mut computed)?;
    let expressions = expression_inputs(&batch, &maps)?;
    let (evals, accuracy) = grounding_eval(&expressions)?;
    put_evals(&evals, dets_width(&batch)?, &mut computed);
    for (name, value) in accuracy.as_pairs() {
        computed.insert(format!("metric.{name}"), Tensor::from(value));
    }
    let expected = read_tensors(&dir.join("expected.safetensors"))?;
    let tol = spec.tolerance();
    Ok(expected
        .iter()
        .map(|(name, e)| match computed.get(name) {
            Some(got) => compare_nan_padded(name, got, e, tol),
            None => not_computed(name),
        })
        .collect())
}

/// Grad-CAM of `batch0`, `batch1`, … in order; returns the maps of every expression [N, P, P].
fn run_batches(
    model: &RetrievalModel,
    batch: &CaseBatch,
    cfg: GradCamConfig,
    computed: &mut HashMap<String, Tensor>,
) -> Result<Tensor, ParityError> {
    let images = batch.get("images")?;
    let image_index = batch.get("eval.image_index")?;
    let n = image_index.numel() as i64;
    let mut maps = Vec::new();
    let mut offset = 0i64;
    for k in 0.. {
        let prefix = format!("batch{k}");
        if !batch.tensors.contains_key(&format!("{prefix}.text_ids")) {
            break;
        }
        let ids = batch.get(&format!("{prefix}.text_ids"))?;
        let atts = batch.get(&format!("{prefix}.text_atts"))?;
        let b = ids.size()[0];
        if offset + b > n {
            return Err(invalid(
                batch,
                format!("{prefix} runs past the {n} expressions"),
            ));
        }
        let image = images.index_select(0, &image_index.narrow(0, offset, b));
        let gc = itm_gradcam(model, &image, &ids, &atts, cfg)?;
        computed.insert(format!("{prefix}.itm_logits"), gc.itm_logits);
        computed.insert(format!("{prefix}.cross_attention_map"), gc.attention_map);
        computed.insert(format!("{prefix}.cross_attention_grad"), gc.attention_grad);
        maps.push(gc.maps);
        offset += b;
    }
    if offset != n {
        return Err(invalid(
            batch,
            format!("the batches hold {offset} expressions, eval.image_index {n}"),
        ));
    }
    let maps = Tensor::cat(&maps, 0);
    computed.insert("eval.gradcam".into(), maps.shallow_clone());
    Ok(maps)
}

/// Each expression's map with its image size, detections, ground-truth box and split.
fn expression_inputs(
    batch: &CaseBatch,
    maps: &Tensor,
) -> Result<Vec<ExpressionInput>, ParityError> {
    let hw = ints(batch, "eval.image_hw")?;
    let num_dets = ints(batch, "eval.num_dets")?;
    let splits = ints(batch, "eval.split")?;
    let dets = floats(batch, "eval.dets_xywh")?;
    let ref_boxes = floats(batch, "eval.ref_bbox_xywh")?;
    let n = maps.size()[0] as usize;
    let width = dets_width(batch)?;
    let sizes_ok = hw.len() == 2 * n
        && num_dets.len() == n
        && splits.len() == n
        && dets.len() == 4 * width * n
        && ref_boxes.len() == 4 * n;
    if !sizes_ok {
        return Err(invalid(
            batch,
            format!("eval.* inputs do not describe {n} expressions"),
        ));
    }
    (0..n)
        .map(|i| {
            let count = usize::try_from(num_dets[i])
                .ok()
                .filter(|&c| c <= width)
                .ok_or_else(|| invalid(batch, format!("eval.num_dets[{i}] = {}", num_dets[i])))?;
            let row = &dets[4 * width * i..];
            Ok(ExpressionInput {
                gradcam: maps.get(i as i64),
                height: hw[2 * i],
                width: hw[2 * i + 1],
                dets: (0..count).map(|d| box_at(row, d)).collect(),
                ref_box: box_at(&ref_boxes, i),
                split: GroundingSplit::from_code(splits[i])?,
            })
        })
        .collect()
}

/// The `eval.*` outputs of every expression (detection scores NaN-padded to `width`).
fn put_evals(evals: &[ExpressionEval], width: usize, computed: &mut HashMap<String, Tensor>) {
    let n = evals.len() as i64;
    let mut scores = vec![f32::NAN; evals.len() * width];
    for (i, e) in evals.iter().enumerate() {
        scores[i * width..i * width + e.scores.len()].copy_from_slice(&e.scores);
        computed.insert(format!("eval.upsampled_mask.{i}"), e.mask.shallow_clone());
    }
    // -1: no positive score, the previous prediction was kept.
    let chosen: Vec<i64> = evals
        .iter()
        .map(|e| e.chosen.map_or(-1, |c| c as i64))
        .collect();
    let boxes: Vec<f64> = evals.iter().flat_map(|e| e.pred_box).collect();
    let ious: Vec<f64> = evals.iter().map(|e| e.iou).collect();
    let correct: Vec<i64> = evals.iter().map(|e| i64::from(e.correct)).collect();
    let outputs = [
        (
            "eval.det_scores",
            Tensor::from_slice(&scores).view([n, width as i64]),
        ),
        ("eval.chosen_det", Tensor::from_slice(&chosen)),
        (
            "eval.pred_box_xywh",
            Tensor::from_slice(&boxes).view([n, 4]),
        ),
        ("eval.iou", Tensor::from_slice(&ious)),
        ("eval.correct", Tensor::from_slice(&correct)),
    ];
    for (name, t) in outputs {
        computed.insert(name.into(), t);
    }
}

/// [`compare`] where NaN marks padding: the NaN positions must agree, the rest is compared as usual.
fn compare_nan_padded(name: &str, got: &Tensor, expected: &Tensor, tol: Tolerance) -> Comparison {
    if !expected.is_floating_point() || got.size() != expected.size() {
        return compare(name, got, expected, tol);
    }
    let got = got.to_kind(Kind::Double);
    let expected = expected.to_kind(Kind::Double);
    let (g_nan, e_nan) = (got.isnan(), expected.isnan());
    if !g_nan.equal(&e_nan) {
        let mut row = compare(name, &got, &expected, tol);
        row.passed = false;
        row.note = Some("NaN (padding) positions differ".into());
        return row;
    }
    compare(
        name,
        &got.nan_to_num(0.0, None, None),
        &expected.nan_to_num(0.0, None, None),
        tol,
    )
}

/// Box `i` (x, y, w, h) of a flat row-major [.., 4] list.
fn box_at(flat: &[f64], i: usize) -> [f64; 4] {
    [
        flat[4 * i],
        flat[4 * i + 1],
        flat[4 * i + 2],
        flat[4 * i + 3],
    ]
}

/// The padded detection count per expression (`eval.dets_xywh` is [N, D, 4]).
fn dets_width(batch: &CaseBatch) -> Result<usize, ParityError> {
    match batch.get("eval.dets_xywh")?.size().as_slice() {
        [_, d, 4] => Ok(*d as usize),
        other => Err(invalid(
            batch,
            format!("eval.dets_xywh is {other:?}, not [N, D, 4]"),
        )),
    }
}

fn ints(batch: &CaseBatch, name: &str) -> Result<Vec<i64>, ParityError> {
    let t = batch
        .get(name)?
        .to_kind(Kind::Int64)
        .contiguous()
        .view([-1]);
    Vec::try_from(t).map_err(|e| invalid(batch, format!("{name}: {e}")))
}

fn floats(batch: &CaseBatch, name: &str) -> Result<Vec<f64>, ParityError> {
    let t = batch
        .get(name)?
        .to_kind(Kind::Double)
        .contiguous()
        .view([-1]);
    Vec::try_from(t).map_err(|e| invalid(batch, format!("{name}: {e}")))
}

fn invalid(batch: &CaseBatch, reason: String) -> ParityError {
    ParityError::Read {
        path: batch.path.clone(),
        reason,
    }
}
