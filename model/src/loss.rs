//! Losses: ITC (gathered across ranks), ITM with hard negatives, MLM, bbox L1 + GIoU
//! (models/xvlm.py: get_contrastive_loss, get_matching_loss, get_mlm_loss, get_bbox_loss; models/box_ops.py).

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tch::{Device, Kind, Reduction, Tensor};

use crate::collective::{all_gather_local_grad, Collective, CollectiveError};

/// ITC: `logits = image_feat_all @ text_feat_allᵀ / temp` over the features of every rank (only the local
/// slice carries gradient, quirk 2), then the mean of the i2t and t2i cross-entropies.
/// Pre-training (`idx` None): the diagonal is the positive. Fine-tuning (`idx` [B] image ids): every pair
/// with equal idx is a positive, with uniform soft targets.
pub fn itc_loss(
    collective: &dyn Collective,
    image_feat: &Tensor,
    text_feat: &Tensor,
    temp: &Tensor,
    idx: Option<&Tensor>,
) -> Result<Tensor, CollectiveError> {
    let image_all = all_gather_local_grad(collective, image_feat)?;
    let text_all = all_gather_local_grad(collective, text_feat)?;
    let logits = image_all.matmul(&text_all.tr()) / temp;
    let n = image_all.size()[0];
    let loss = match idx {
        None => {
            let labels = Tensor::arange(n, (Kind::Int64, logits.device()));
            let i2t = logits.cross_entropy_for_logits(&labels);
            let t2i = logits.tr().cross_entropy_for_logits(&labels);
            (i2t + t2i) / 2.0
        }
        Some(idx) => {
            let idx_all = all_gather_local_grad(collective, &idx.view([-1, 1]))?;
            let pos = idx_all.eq_tensor(&idx_all.tr()).to_kind(Kind::Float);
            let targets = &pos / pos.sum_dim_intlist(1, true, Kind::Float);
            let soft_ce = |l: &Tensor| {
                -(l.log_softmax(1, Kind::Float) * &targets)
                    .sum_dim_intlist(1, false, Kind::Float)
                    .mean(Kind::Float)
            };
            (soft_ce(&logits) + soft_ce(&logits.tr())) / 2.0
        }
    };
    Ok(loss)
}

/// The no-grad quantities hard-negative sampling uses (`get_matching_loss`, first block).
#[derive(Debug)]
pub struct ItmWeights {
    /// `image_feat @ text_featᵀ / temp` [B, B].
    pub sim_i2t: Tensor,
    /// `text_feat @ image_featᵀ / temp` [B, B].
    pub sim_t2i: Tensor,
    /// `softmax(sim_i2t) + 1e-5` with positives zeroed: row b = which text is image b's negative.
    pub weights_i2t: Tensor,
    /// `softmax(sim_t2i) + 1e-5` with positives zeroed: row b = which image is text b's negative.
    pub weights_t2i: Tensor,
}

impl ItmWeights {
    /// Computes the weights on the LOCAL batch. Positives: the diagonal (`idx` None) or equal `idx`.
    pub fn new(
        image_feat: &Tensor,
        text_feat: &Tensor,
        temp: &Tensor,
        idx: Option<&Tensor>,
    ) -> Self {
        tch::no_grad(|| {
            let sim_i2t = image_feat.matmul(&text_feat.tr()) / temp;
            let sim_t2i = text_feat.matmul(&image_feat.tr()) / temp;
            let positives = match idx {
                None => {
                    let b = image_feat.size()[0];
                    Tensor::eye(b, (Kind::Bool, image_feat.device()))
                }
                Some(idx) => {
                    let idx = idx.view([-1, 1]);
                    idx.eq_tensor(&idx.tr())
                }
            };
            let weights =
                |sim: &Tensor| (sim.softmax(1, Kind::Float) + 1e-5).masked_fill(&positives, 0.0);
            ItmWeights {
                weights_i2t: weights(&sim_i2t),
                weights_t2i: weights(&sim_t2i),
                sim_i2t,
                sim_t2i,
            }
        })
    }
}

/// Which hard negatives a draw is for (the official code draws all image negatives, then all text ones).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NegativeKind {
    /// For each text b, an image index drawn from `weights_t2i[b]`.
    ImageForText,
    /// For each image b, a text index drawn from `weights_i2t[b]`.
    TextForImage,
}

/// Draws one column per row of a non-negative weight matrix [B, B] → indices [B] (int64, on the
/// weights' device).
pub trait NegativeSampler {
    /// One draw per row, proportional to the row's weights; zero entries are never drawn.
    fn sample(&mut self, weights: &Tensor, kind: NegativeKind) -> Tensor;
}

/// The real sampler: `torch.multinomial(weights[b], 1)` per row, from a seeded ChaCha stream (randomness
/// is derived from (seed, step, rank, purpose), never carried).
#[derive(Debug, Clone)]
pub struct MultinomialSampler {
    rng: ChaCha8Rng,
}

impl MultinomialSampler {
    /// A sampler whose draws are a pure function of `seed`.
    pub fn new(seed: u64) -> Self {
        MultinomialSampler {
            rng: ChaCha8Rng::seed_from_u64(seed),
        }
    }

    fn draw_row(&mut self, row: &[f64]) -> i64 {
        let total: f64 = row.iter().filter(|w| **w > 0.0).sum();
        if total <= 0.0 {
            // Only possible with a batch of one (or all-positive rows): no negative exists; the
            // official multinomial would raise. Pick the first index so the step still runs.
            return 0;
        }
        let target = self.rng.random::<f64>() * total;
        let mut acc = 0.0;
        let mut last_positive = 0;
        for (j, &w) in row.iter().enumerate() {
            if w <= 0.0 {
                continue;
            }
            acc += w;
            last_positive = j;
            if target < acc {
                return j as i64;
            }
        }
        last_positive as i64
    }
}

impl NegativeSampler for MultinomialSampler {
    fn sample(&mut self, weights: &Tensor, _kind: NegativeKind) -> Tensor {
        let (rows, cols) = weights.size2().expect("weights must be [B, B]");
        let flat: Vec<f64> = Vec::try_from(
            weights
                .detach()
                .to_device(Device::Cpu)
                .to_kind(Kind::Double)
                .contiguous()
                .view([-1]),
        )
        .expect("weights convert to f64");
        let picks: Vec<i64> = (0..rows as usize)
            .map(|r| self.draw_row(&flat[r * cols as usize..(r + 1) * cols as usize]))
            .collect();
        Tensor::from_slice(&picks).to_device(weights.device())
    }
}

/// Replays recorded draws (the fixtures' `*.itm_neg_image_idx` / `*.itm_neg_text_idx`).
#[derive(Debug)]
pub struct ReplaySampler {
    image_for_text: Tensor,
    text_for_image: Tensor,
}

impl ReplaySampler {
    /// From the recorded image-negative indices (per text) and text-negative indices (per image).
    pub fn new(image_for_text: Tensor, text_for_image: Tensor) -> Self {
        ReplaySampler {
            image_for_text,
            text_for_image,
        }
    }
}

impl NegativeSampler for ReplaySampler {
    fn sample(&mut self, weights: &Tensor, kind: NegativeKind) -> Tensor {
        let recorded = match kind {
            NegativeKind::ImageForText => &self.image_for_text,
            NegativeKind::TextForImage => &self.text_for_image,
        };
        recorded.to_device(weights.device()).to_kind(Kind::Int64)
    }
}

/// ITM cross-entropy over `logits` [3B, 2] with labels `[1]·B + [0]·2B`.
pub fn itm_loss(logits: &Tensor) -> Tensor {
    let n = logits.size()[0];
    let bs = n / 3;
    let labels = Tensor::cat(
        &[
            Tensor::ones([bs], (Kind::Int64, logits.device())),
            Tensor::zeros([n - bs], (Kind::Int64, logits.device())),
        ],
        0,
    );
    logits.cross_entropy_for_logits(&labels)
}

/// MLM cross-entropy: `logits` [B, M, V] against `labels` [B, M] (−100 ignored), mean over real labels.
pub fn mlm_loss(logits: &Tensor, labels: &Tensor) -> Tensor {
    let v = logits.size()[logits.dim() - 1];
    logits.view([-1, v]).cross_entropy_loss::<Tensor>(
        &labels.view([-1]),
        None,
        Reduction::Mean,
        -100,
        0.0,
    )
}

/// Next-token loss of a decoder, summed per sequence (`BertLMHeadModel` with `reduction='none'`): logits
/// [N, L, V] at positions 0..L−1 predict `labels` [N, L] at 1..L (−100 ignored) → [N].
pub fn lm_loss_per_sequence(logits: &Tensor, labels: &Tensor) -> Tensor {
    let (n, l, v) = logits.size3().expect("logits must be [N, L, V]");
    let shifted = logits.narrow(1, 0, l - 1).contiguous().view([-1, v]);
    let targets = labels.narrow(1, 1, l - 1).contiguous().view([-1]);
    shifted
        .cross_entropy_loss::<Tensor>(&targets, None, Reduction::None, -100, 0.0)
        .view([n, -1])
        .sum_dim_intlist(1, false, Kind::Float)
}

/// `box_ops.box_cxcywh_to_xyxy`: [N, 4] (cx, cy, w, h) → (x0, y0, x1, y1).
pub fn box_cxcywh_to_xyxy(b: &Tensor) -> Tensor {
    let c = b.unbind(-1);
    let (xc, yc, w, h) = (&c[0], &c[1], &c[2], &c[3]);
    Tensor::stack(
        &[xc - w * 0.5, yc - h * 0.5, xc + w * 0.5, yc + h * 0.5],
        -1,
    )
}

/// GIoU of matching rows of two xyxy box sets [N, 4] → [N] (the diagonal of
/// `box_ops.generalized_box_iou`, computed row by row with the same operations).
pub fn paired_generalized_iou(b1: &Tensor, b2: &Tensor) -> Tensor {
    let area = |b: &Tensor| (b.select(1, 2) - b.select(1, 0)) * (b.select(1, 3) - b.select(1, 1));
    let (area1, area2) = (area(b1), area(b2));
    let lt = b1.narrow(1, 0, 2).maximum(&b2.narrow(1, 0, 2));
    let rb = b1.narrow(1, 2, 2).minimum(&b2.narrow(1, 2, 2));
    let wh = (rb - lt).clamp_min(0.0);
    let inter = wh.select(1, 0) * wh.select(1, 1);
    let union = area1 + area2 - &inter;
    let iou = inter / &union;
    let lt = b1.narrow(1, 0, 2).minimum(&b2.narrow(1, 0, 2));
    let rb = b1.narrow(1, 2, 2).maximum(&b2.narrow(1, 2, 2));
    let wh = (rb - lt).clamp_min(0.0);
    let enclosing = wh.select(1, 0) * wh.select(1, 1);
    iou - (&enclosing - union) / enclosing
}

/// Box L1 and GIoU losses (`get_bbox_loss`): `pred`, `target` [N, 4] normalised cxcywh. With `is_image`
/// [N] (1 = whole-image caption), those rows are zeroed and not counted. If any box is degenerate the
/// GIoU part is zero (as the official code). A batch with no counted box gives (0, 0) instead of the
/// official 0/0 = NaN (DESIGN fix 6b).
pub fn bbox_loss(pred: &Tensor, target: &Tensor, is_image: Option<&Tensor>) -> (Tensor, Tensor) {
    let l1 = (pred - target).abs();
    let boxes1 = box_cxcywh_to_xyxy(pred);
    let boxes2 = box_cxcywh_to_xyxy(target);
    let degenerate = |b: &Tensor| {
        b.narrow(1, 2, 2)
            .lt_tensor(&b.narrow(1, 0, 2))
            .any()
            .int64_value(&[])
            != 0
    };
    let giou = if degenerate(&boxes1) || degenerate(&boxes2) {
        tracing::warn!("degenerate box in the bbox loss: GIoU loss set to 0 for this batch");
        Tensor::zeros([pred.size()[0]], (pred.kind(), pred.device()))
    } else {
        paired_generalized_iou(&boxes1, &boxes2).neg() + 1.0
    };
    match is_image {
        None => {
            let n = pred.size()[0] as f64;
            (l1.sum(Kind::Float) / n, giou.sum(Kind::Float) / n)
        }
        Some(is_image) => {
            let keep = is_image.ones_like() - is_image;
            let num_boxes = keep.sum(Kind::Int64);
            let l1 = l1 * keep.view([-1, 1]);
            let giou = giou * &keep;
            if num_boxes.int64_value(&[]) == 0 {
                // Sums of zeroed rows: 0, still connected to the graph.
                (l1.sum(Kind::Float), giou.sum(Kind::Float))
            } else {
                (
                    l1.sum(Kind::Float) / &num_boxes,
                    giou.sum(Kind::Float) / &num_boxes,
                )
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Fix 6b: a region batch made only of whole-image captions gives bbox losses of 0, not NaN.
    #[test]
    fn bbox_loss_without_region_boxes_is_zero() {
        let pred = Tensor::from_slice(&[0.4f32, 0.5, 0.3, 0.2, 0.6, 0.6, 0.2, 0.2]).view([2, 4]);
        let target = Tensor::from_slice(&[0.5f32, 0.5, 1.0, 1.0, 0.5, 0.5, 1.0, 1.0]).view([2, 4]);
        let is_image = Tensor::from_slice(&[1i64, 1]);
        let (l1, giou) = bbox_loss(&pred, &target, Some(&is_image));
        assert_eq!(l1.double_value(&[]), 0.0);
        assert_eq!(giou.double_value(&[]), 0.0);
    }

    /// Identical boxes have GIoU 1; disjoint ones are penalised by the enclosing box.
    #[test]
    fn giou_of_known_boxes() {
        let a = Tensor::from_slice(&[0.0f32, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0, 1.0]).view([2, 4]);
        let b = Tensor::from_slice(&[0.0f32, 0.0, 1.0, 1.0, 2.0, 0.0, 3.0, 1.0]).view([2, 4]);
        let g: Vec<f32> = Vec::try_from(paired_generalized_iou(&a, &b)).unwrap();
        assert!((g[0] - 1.0).abs() < 1e-6);
        // IoU 0, union 2, enclosing 3 → 0 − 1/3.
        assert!((g[1] + 1.0 / 3.0).abs() < 1e-6);
    }
}
