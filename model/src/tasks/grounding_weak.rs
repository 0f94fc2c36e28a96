//! Weakly supervised grounding evaluation (Grounding.py `val` with `--gradcam_mode itm`, then
//! dataset/utils.py `grounding_eval`) on the retrieval model (models/model_retrieval.py):
//!
//! 1. [`itm_gradcam`]: the ITM score of each (image, expression) is back-propagated to the softmax
//!    probabilities of the cross-attention of text layer `block_num`; the map is
//!    `mean_heads, mean_text(attn · clamp(grad, 0) · text_mask)` over the P x P patch grid (image token
//!    0, Swin's mean token, dropped).
//! 2. [`grounding_eval`]: each map is upsampled bicubically to its image's size, every detection
//!    proposal is scored by `sum(mask inside the box) / sqrt(w·h)` (alpha 0.5), the best one is the
//!    prediction, and the accuracy@IoU0.5 per split is reported ([`crate::metrics::grounding`]).

use tch::nn::Module;
use tch::{Kind, Tensor};

use crate::config::TaskConfig;
use crate::metrics::grounding::{self, GroundingAccuracy, GroundingSplit};
use crate::tasks::grounding_bbox::inclusive_iou;
use crate::tasks::retrieval::RetrievalModel;
use crate::text::CrossContext;
use crate::xvlm::ModelError;

/// Which attention the Grad-CAM reads and the patch grid it is reshaped to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GradCamConfig {
    /// Text-encoder layer whose cross-attention is used (`block_num`).
    pub block_num: usize,
    /// Patch grid side P (`image_res // patch_size`).
    pub num_patches: i64,
}

impl GradCamConfig {
    /// From a task config: its `block_num` key and `image_res / patch_size`.
    pub fn from_task(task: &TaskConfig) -> Result<Self, ModelError> {
        let block_num = task
            .extra
            .get("block_num")
            .and_then(serde_yaml::Value::as_u64)
            .ok_or_else(|| {
                ModelError::Input("the config has no non-negative `block_num`".into())
            })?;
        if task.patch_size <= 0 {
            return Err(ModelError::Input(format!(
                "patch_size {} must be positive",
                task.patch_size
            )));
        }
        Ok(GradCamConfig {
            block_num: block_num as usize,
            num_patches: task.image_res / task.patch_size,
        })
    }
}

/// The Grad-CAM of one batch with the intermediates the official code hooks.
#[derive(Debug)]
pub struct GradCam {
    /// `itm_head(cross[:, 0])` [B, 2]; the backward starts from `itm_logits[:, 1].sum()`.
    pub itm_logits: Tensor,
    /// Cross-attention probabilities of layer `block_num` [B, heads, L, 1 + P²].
    pub attention_map: Tensor,
    /// d loss / d probabilities, same shape.
    pub attention_grad: Tensor,
    /// The Grad-CAM maps [B, P, P] (row-major patch grid).
    pub maps: Tensor,
}

/// `Grounding.val` on one batch: ITM forward from the token ids over every text layer, backward of the
/// summed match logit to the cross-attention probabilities of `cfg.block_num`, Grad-CAM maps.
pub fn itm_gradcam(
    model: &RetrievalModel,
    image: &Tensor,
    text_ids: &Tensor,
    text_atts: &Tensor,
    cfg: GradCamConfig,
) -> Result<GradCam, ModelError> {
    let core = &model.core;
    let itm_head = core
        .itm_head
        .as_ref()
        .ok_or_else(|| ModelError::Input("Grad-CAM needs the model's itm_head".into()))?;
    // The official evaluation back-propagates, so the graph is built even inside a caller's no_grad.
    tch::with_grad(|| {
        let vision = core.get_vision_embeds(image, false);
        let cross = [CrossContext::new(&vision.embeds, &vision.atts)];
        let (hidden, probs) = core.text.forward_multimodal_with_cross_probs(
            text_ids,
            text_atts,
            &cross,
            cfg.block_num,
            false,
        );
        let probs = probs.ok_or_else(|| {
            ModelError::Input(format!(
                "text layer block_num = {} has no cross-attention",
                cfg.block_num
            ))
        })?;
        let itm_logits = itm_head.forward(&hidden.select(1, 0));
        let loss = itm_logits.select(1, 1).sum(Kind::Float);
        let attention_grad = attention_gradient(&loss, &probs)?;
        let attention_map = probs.detach();
        let maps = gradcam_maps(&attention_map, &attention_grad, text_atts, cfg.num_patches)?;
        Ok(GradCam {
            itm_logits: itm_logits.detach(),
            attention_map,
            attention_grad,
            maps,
        })
    })
}

/// d `loss` / d `probs` without touching the parameters' `.grad` (the official `zero_grad` + hook).
fn attention_gradient(loss: &Tensor, probs: &Tensor) -> Result<Tensor, ModelError> {
    if !probs.requires_grad() {
        return Err(ModelError::Input(
            "the cross-attention probabilities carry no gradient (are the model's variables frozen?)"
                .into(),
        ));
    }
    Tensor::f_run_backward(&[loss], &[probs], false, false)
        .map_err(|e| ModelError::Input(format!("Grad-CAM backward failed: {e}")))?
        .pop()
        .ok_or_else(|| ModelError::Input("Grad-CAM backward returned no gradient".into()))
}

/// Grad-CAM maps [B, P, P] from attention probabilities and their gradients [B, heads, L, 1 + P²]:
/// `(attn · mask · clamp(grad, 0) · mask)` averaged over heads, then over all L text positions (padding
/// included in the count, as the official `mean`).
pub fn gradcam_maps(
    attention_map: &Tensor,
    attention_grad: &Tensor,
    text_atts: &Tensor,
    num_patches: i64,
) -> Result<Tensor, ModelError> {
    let (b, heads, l, n) = attention_map
        .size4()
        .map_err(|_| ModelError::Input("attention map must be [B, heads, L, 1 + P²]".into()))?;
    let p = num_patches;
    if n != 1 + p * p || attention_grad.size() != attention_map.size() {
        return Err(ModelError::Input(format!(
            "attention map {:?} / gradient {:?} do not fit a {p} x {p} patch grid plus one token",
            attention_map.size(),
            attention_grad.size()
        )));
    }
    if text_atts.size() != [b, l] {
        return Err(ModelError::Input(format!(
            "text mask {:?} does not match the attention's [{b}, {l}]",
            text_atts.size()
        )));
    }
    let mask = text_atts.view([b, 1, l, 1, 1]);
    let grid = [b, heads, l, p, p];
    let cams = attention_map.narrow(3, 1, p * p).reshape(grid) * &mask;
    let grads = attention_grad
        .narrow(3, 1, p * p)
        .clamp_min(0)
        .reshape(grid)
        * &mask;
    Ok((cams * grads)
        .mean_dim(1, false, None)
        .mean_dim(1, false, None))
}

/// `F.interpolate(map.view(1, 1, P, P), size=(height, width), mode='bicubic')` (align_corners False)
/// → [height, width].
pub fn upsample_map(map: &Tensor, height: i64, width: i64) -> Result<Tensor, ModelError> {
    let (ph, pw) = map.size2().map_err(|_| {
        ModelError::Input(format!(
            "a Grad-CAM map must be [P, P], not {:?}",
            map.size()
        ))
    })?;
    if height <= 0 || width <= 0 {
        return Err(ModelError::Input(format!(
            "image size {height} x {width} must be positive"
        )));
    }
    Ok(map
        .view([1, 1, ph, pw])
        .upsample_bicubic2d([height, width], false, None, None)
        .view([height, width]))
}

/// Python slice `start:stop` on an axis of `len` (negative indices count from the end, out-of-range ends
/// clamp) → (start, length).
fn python_slice(start: i64, stop: i64, len: i64) -> (i64, i64) {
    let norm = |i: i64| if i < 0 { (i + len).max(0) } else { i.min(len) };
    let (s, e) = (norm(start), norm(stop));
    (s, (e - s).max(0))
}

/// Score of each detection (x, y, w, h) on an upsampled map [H, W]:
/// `mask[int(y):int(y + h), int(x):int(x + w)].sum() / (w * h) ** 0.5` in float32.
pub fn detection_scores(mask: &Tensor, dets: &[[f64; 4]]) -> Result<Vec<f32>, ModelError> {
    let (height, width) = mask
        .size2()
        .map_err(|_| ModelError::Input("an upsampled map must be [H, W]".into()))?;
    let score = |d: &[f64; 4]| {
        // Python int() truncates toward zero, as `as` does.
        let (y0, ny) = python_slice(d[1] as i64, (d[1] + d[3]) as i64, height);
        let (x0, nx) = python_slice(d[0] as i64, (d[0] + d[2]) as i64, width);
        let inside = mask.narrow(0, y0, ny).narrow(1, x0, nx).sum(Kind::Float);
        (inside / (d[2] * d[3]).sqrt()).double_value(&[]) as f32
    };
    Ok(dets.iter().map(score).collect())
}

/// The first detection whose score is strictly greater than every earlier one and than 0 (the official
/// `max_score = 0` start); `None` when no score is positive.
pub fn choose_detection(scores: &[f32]) -> Option<usize> {
    let mut best: Option<(usize, f32)> = None;
    for (i, &s) in scores.iter().enumerate() {
        if s > best.map_or(0.0, |(_, m)| m) {
            best = Some((i, s));
        }
    }
    best.map(|(i, _)| i)
}

/// One referring expression to evaluate.
#[derive(Debug)]
pub struct ExpressionInput {
    /// Its Grad-CAM map [P, P].
    pub gradcam: Tensor,
    /// Image height (`refer.Imgs[image_id]['height']`).
    pub height: i64,
    /// Image width.
    pub width: i64,
    /// Detection proposals of its image (x, y, w, h), in file order.
    pub dets: Vec<[f64; 4]>,
    /// Ground-truth box (x, y, w, h).
    pub ref_box: [f64; 4],
    /// Its split.
    pub split: GroundingSplit,
}

/// The evaluation of one expression.
#[derive(Debug)]
pub struct ExpressionEval {
    /// The upsampled map [height, width].
    pub mask: Tensor,
    /// Score per detection.
    pub scores: Vec<f32>,
    /// The chosen detection; `None` when no score was positive and the previous prediction was kept.
    pub chosen: Option<usize>,
    /// The predicted box (x, y, w, h).
    pub pred_box: [f64; 4],
    /// Inclusive-pixel IoU with the ground truth.
    pub iou: f64,
    /// `iou >= 0.5`.
    pub correct: bool,
}

/// The choice among one expression's proposals: its upsampled map, every proposal's score and the
/// proposal with the best positive score (`None`: none was positive).
#[derive(Debug)]
pub struct ProposalChoice {
    /// The upsampled map [height, width].
    pub mask: Tensor,
    /// Score per detection.
    pub scores: Vec<f32>,
    /// The chosen detection.
    pub chosen: Option<usize>,
}

/// Upsamples an expression's map to its image and scores its proposals (the part of `grounding_eval`
/// that needs only the expression itself, so ranks can run it on their shares).
pub fn choose_proposal(e: &ExpressionInput) -> Result<ProposalChoice, ModelError> {
    let mask = upsample_map(&e.gradcam, e.height, e.width)?;
    let scores = detection_scores(&mask, &e.dets)?;
    let chosen = choose_detection(&scores);
    Ok(ProposalChoice {
        mask,
        scores,
        chosen,
    })
}

/// The box of an expression without a prediction: zero-sized, so its IoU with any box is 0.
pub const NO_PREDICTION: [f64; 4] = [0.0; 4];

/// The predicted box of each expression from its chosen proposal, in evaluation order: an expression
/// whose proposals all scored <= 0 keeps the previous expression's prediction, as the official loop's
/// `pred_box` variable does. The first expression has none to keep (the official code then fails on an
/// undefined name): it gets [`NO_PREDICTION`], which overlaps nothing and counts as wrong.
pub fn resolve_predictions<'a>(
    choices: impl IntoIterator<Item = (Option<usize>, &'a [[f64; 4]])>,
) -> Result<Vec<[f64; 4]>, ModelError> {
    let mut boxes: Vec<[f64; 4]> = Vec::new();
    for (n, (chosen, dets)) in choices.into_iter().enumerate() {
        let pred = match (chosen, boxes.last()) {
            (Some(i), _) => *dets.get(i).ok_or_else(|| {
                ModelError::Input(format!(
                    "expression {n}: chosen proposal {i} of {}",
                    dets.len()
                ))
            })?,
            (None, Some(prev)) => *prev,
            (None, None) => NO_PREDICTION,
        };
        boxes.push(pred);
    }
    Ok(boxes)
}

/// `grounding_eval(results, dets, cocos, refer, alpha=0.5, mask_size=P)`: per-expression evaluations in
/// order and the accuracy per split ([`choose_proposal`] on each, then [`resolve_predictions`]).
pub fn grounding_eval(
    expressions: &[ExpressionInput],
) -> Result<(Vec<ExpressionEval>, GroundingAccuracy), ModelError> {
    let choices = expressions
        .iter()
        .map(choose_proposal)
        .collect::<Result<Vec<_>, _>>()?;
    let boxes = resolve_predictions(
        choices
            .iter()
            .zip(expressions)
            .map(|(c, e)| (c.chosen, e.dets.as_slice())),
    )?;
    let evals: Vec<ExpressionEval> = choices
        .into_iter()
        .zip(expressions)
        .zip(boxes)
        .map(|((c, e), pred_box)| {
            let iou = inclusive_iou(e.ref_box, pred_box);
            ExpressionEval {
                mask: c.mask,
                scores: c.scores,
                chosen: c.chosen,
                pred_box,
                iou,
                correct: grounding::is_correct(iou),
            }
        })
        .collect();
    let accuracy = grounding::grounding_accuracy(
        expressions
            .iter()
            .zip(&evals)
            .map(|(e, r)| (e.split, r.iou)),
    )?;
    Ok((evals, accuracy))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Python slicing: negative starts count from the end, stops clamp, reversed ranges are empty.
    #[test]
    fn python_slice_semantics() {
        assert_eq!(python_slice(2, 5, 10), (2, 3));
        assert_eq!(python_slice(8, 15, 10), (8, 2));
        assert_eq!(python_slice(-2, 10, 10), (8, 2));
        assert_eq!(python_slice(5, 3, 10), (5, 0));
    }

    /// The first strictly largest positive score wins; no positive score chooses nothing.
    #[test]
    fn detection_choice() {
        assert_eq!(choose_detection(&[0.1, 0.3, 0.3, 0.2]), Some(1));
        assert_eq!(choose_detection(&[0.0, -1.0]), None);
        assert_eq!(choose_detection(&[f32::NAN, 0.5]), Some(1));
    }

    /// A constant map upsamples to the same constant; a box's score is its area over sqrt(area).
    #[test]
    fn scores_on_a_constant_map() {
        let map = Tensor::full([3, 3], 2.0, (Kind::Float, tch::Device::Cpu));
        let mask = upsample_map(&map, 20, 30).unwrap();
        assert_eq!(mask.size(), vec![20, 30]);
        let scores = detection_scores(&mask, &[[1.5, 2.0, 4.0, 9.0]]).unwrap();
        // Rows 2..11, columns 1..5: 9 x 4 pixels of value 2 over sqrt(36).
        assert!((scores[0] - 72.0 / 6.0).abs() < 1e-4, "{scores:?}");
    }
}
