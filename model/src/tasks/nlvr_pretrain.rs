//! NLVR2 domain pre-training, "text-to-images alignment" (models/model_nlvr_pretrain.py: XVLM;
//! XVLM-REFERENCE.md §5.3): the 18-layer NLVR2 text encoder (every cross layer twice, the pair sharing
//! its cross-attention key/value), `vision_proj` (loaded, only used for the negatives) and a new
//! `ta_head = Linear(768, 3)`. For each text of an image-text batch, its image and a hard negative
//! (label 0: the true image is image 0, label 1: it is image 1), or two other images (label 2).
//!
//! The negatives are drawn from the LOCAL batch, as the official forward does: `image_feat @
//! image_feat.t()` on the rank's own `image_embeds`, no all-gather.

use rand::Rng;
use tch::nn::{self, Module};
use tch::{Device, Kind, Tensor};

use crate::config::TaskConfig;
use crate::text::CrossContext;
use crate::xvlm::{vision_config, Heads, ModelError, XvlmCore};

/// The temperature of the negative-sampling similarities (a constant in the official forward).
pub const NEGATIVE_TEMP: f64 = 0.07;
/// Label: the text's own image is image 0 (the hard negative is image 1).
pub const LABEL_TRUE_IS_IMAGE0: i64 = 0;
/// Label: the text's own image is image 1.
pub const LABEL_TRUE_IS_IMAGE1: i64 = 1;
/// Label: neither image is the text's.
pub const LABEL_NEITHER: i64 = 2;
/// Probability that a text gets its own image and a hard negative (`torch.rand(1) > 1/3`).
pub const PAIR_WITH_OWN_IMAGE: f64 = 2.0 / 3.0;

/// The two images each text is shown with, and the labels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImagePairs {
    /// Batch row of image 0, per text.
    pub image0: Vec<i64>,
    /// Batch row of image 1, per text.
    pub image1: Vec<i64>,
    /// 0, 1 or 2 per text (see the `LABEL_*` constants).
    pub labels: Vec<i64>,
}

/// Sampling weights `softmax(image_feat @ image_feat.t() / 0.07, dim 1)` with the diagonal zeroed
/// [B, B] (no gradient), from the L2-normalised image features [B, E].
pub fn negative_weights(image_feat: &Tensor) -> Tensor {
    tch::no_grad(|| {
        let sim = image_feat.matmul(&image_feat.tr()) / NEGATIVE_TEMP;
        let weights = sim.softmax(1, Kind::Float);
        let n = weights.size()[0];
        let eye = Tensor::eye(n, (Kind::Bool, weights.device()));
        weights.masked_fill(&eye, 0.0)
    })
}

/// One column of `row` drawn proportionally to its weights among the columns not in `exclude`
/// (`torch.multinomial`); uniform among them when their weights are all zero (a row that underflowed).
/// `None` when no column is left.
fn draw_column(row: &[f64], exclude: &[usize], rng: &mut impl Rng) -> Option<usize> {
    let allowed = |j: &usize| !exclude.contains(j);
    let weight = |w: f64| if w.is_finite() && w > 0.0 { w } else { 0.0 };
    let total: f64 = (0..row.len()).filter(allowed).map(|j| weight(row[j])).sum();
    if total > 0.0 {
        let target = rng.random::<f64>() * total;
        let mut acc = 0.0;
        let mut last = None;
        for j in (0..row.len()).filter(allowed) {
            let w = weight(row[j]);
            if w == 0.0 {
                continue;
            }
            acc += w;
            last = Some(j);
            if target < acc {
                return Some(j);
            }
        }
        return last;
    }
    let candidates: Vec<usize> = (0..row.len()).filter(allowed).collect();
    if candidates.is_empty() {
        None
    } else {
        Some(candidates[rng.random_range(0..candidates.len())])
    }
}

/// The official pairing rule over `weights` (row-major [n, n], diagonal zero): for each text b, in
/// order, with probability 2/3 (`rand > 1/3`) a hard negative j ~ weights[b] and, with probability
/// 1/2 (`rand > 0.5`), (b, j) labelled 0, else (j, b) labelled 1; otherwise two distinct images drawn
/// without replacement from weights[b], labelled 2. Text b's own image is never its negative, and
/// never shown under label 2. Needs n >= 3 (two other images).
pub fn draw_image_pairs(
    weights: &[f64],
    n: usize,
    rng: &mut impl Rng,
) -> Result<ImagePairs, ModelError> {
    if n < 3 {
        return Err(ModelError::Input(format!(
            "NLVR pre-training needs at least 3 images per batch (two others for each text), got {n}"
        )));
    }
    if weights.len() != n * n {
        return Err(ModelError::Input(format!(
            "{} sampling weights for {n} images",
            weights.len()
        )));
    }
    let mut pairs = ImagePairs {
        image0: Vec::with_capacity(n),
        image1: Vec::with_capacity(n),
        labels: Vec::with_capacity(n),
    };
    let no_column = || ModelError::Input("no image left to draw".into());
    for b in 0..n {
        let row = &weights[b * n..(b + 1) * n];
        let (i0, i1, label) = if rng.random::<f64>() > 1.0 - PAIR_WITH_OWN_IMAGE {
            let neg = draw_column(row, &[b], rng).ok_or_else(no_column)?;
            if rng.random::<f64>() > 0.5 {
                (b, neg, LABEL_TRUE_IS_IMAGE0)
            } else {
                (neg, b, LABEL_TRUE_IS_IMAGE1)
            }
        } else {
            let first = draw_column(row, &[b], rng).ok_or_else(no_column)?;
            let second = draw_column(row, &[b, first], rng).ok_or_else(no_column)?;
            (first, second, LABEL_NEITHER)
        };
        pairs.image0.push(i0 as i64);
        pairs.image1.push(i1 as i64);
        pairs.labels.push(label);
    }
    Ok(pairs)
}

/// The outcome of a forward.
#[derive(Debug)]
pub struct NlvrPretrainOutput {
    /// The sampling weights [B, B].
    pub weights: Tensor,
    /// The drawn pairs and labels.
    pub pairs: ImagePairs,
    /// Token 0 after every text layer [B, D].
    pub cross_cls: Tensor,
    /// `ta_head` output [B, 3].
    pub logits: Tensor,
    /// The labels [B] (int64).
    pub labels: Tensor,
    /// Cross-entropy of the logits against the labels.
    pub loss: Tensor,
}

impl NlvrPretrainOutput {
    /// The fraction of texts whose label is the argmax.
    pub fn accuracy(&self) -> f64 {
        self.logits
            .argmax(1, false)
            .eq_tensor(&self.labels)
            .to_kind(Kind::Float)
            .mean(Kind::Float)
            .double_value(&[])
    }
}

/// `models/model_nlvr_pretrain.py:XVLM`.
pub struct NlvrPretrainModel {
    /// Encoders (18-layer NLVR2 text encoder) and `vision_proj`.
    pub core: XvlmCore,
    /// `ta_head` (D → 3).
    pub ta_head: nn::Linear,
}

impl NlvrPretrainModel {
    /// Builds under `p` from a task config: the text JSON's cross layers doubled (as
    /// [`crate::tasks::NlvrModel`]), `vision_proj` to `embed_dim`, a new `ta_head`.
    pub fn new(p: &nn::Path, task: &TaskConfig) -> Result<Self, ModelError> {
        let mut text_cfg = task.load_text_config()?;
        let cross_layers = text_cfg.num_hidden_layers - text_cfg.fusion_layer;
        text_cfg.num_hidden_layers = text_cfg.fusion_layer + 2 * cross_layers;
        let mut core = XvlmCore::with_shared_cross_kv(
            p,
            &vision_config(task)?,
            &text_cfg,
            Heads::default(),
            0,
            0.0,
            2,
        )?;
        core.vision_proj = Some(nn::linear(
            p / "vision_proj",
            core.vision.width(),
            task.require_embed_dim()?,
            Default::default(),
        ));
        let ta_head = nn::linear(
            p / "ta_head",
            core.text.hidden_size(),
            3,
            Default::default(),
        );
        Ok(Self { core, ta_head })
    }

    /// `image` [B, 3, R, R] (each text's own image), `text_ids` / `text_atts` [B, L]; the pairs are
    /// drawn from `rng`.
    pub fn forward(
        &self,
        image: &Tensor,
        text_ids: &Tensor,
        text_atts: &Tensor,
        rng: &mut impl Rng,
        train: bool,
    ) -> Result<NlvrPretrainOutput, ModelError> {
        let b = text_ids.size()[0];
        if image.size().first() != Some(&b) {
            return Err(ModelError::Input(format!(
                "NLVR pre-training needs one image per text ({b}), got {:?}",
                image.size()
            )));
        }
        let vision = self.core.get_vision_embeds(image, train);
        let weights = tch::no_grad(|| {
            self.core
                .image_feat(&vision.embeds)
                .map(|f| negative_weights(&f))
        })?;
        let flat = Vec::<f64>::try_from(
            weights
                .to_device(Device::Cpu)
                .to_kind(Kind::Double)
                .contiguous()
                .view([-1]),
        )
        .map_err(|e| ModelError::Input(format!("sampling weights: {e}")))?;
        let pairs = draw_image_pairs(&flat, b as usize, rng)?;
        let device = image.device();
        let rows = |v: &[i64]| Tensor::from_slice(v).to_device(device);
        let (idx0, idx1) = (rows(&pairs.image0), rows(&pairs.image1));
        let (embeds0, embeds1) = (
            vision.embeds.index_select(0, &idx0),
            vision.embeds.index_select(0, &idx1),
        );
        let (atts0, atts1) = (
            vision.atts.index_select(0, &idx0),
            vision.atts.index_select(0, &idx1),
        );
        let cross = [
            CrossContext::new(&embeds0, &atts0),
            CrossContext::new(&embeds1, &atts1),
        ];
        let hidden = self
            .core
            .text
            .forward_multimodal(text_ids, text_atts, &cross, train);
        let cross_cls = hidden.select(1, 0);
        let logits = self.ta_head.forward(&cross_cls);
        let labels = rows(&pairs.labels);
        let loss = logits.cross_entropy_for_logits(&labels);
        Ok(NlvrPretrainOutput {
            weights,
            pairs,
            cross_cls,
            logits,
            labels,
            loss,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    fn uniform(n: usize) -> Vec<f64> {
        (0..n * n)
            .map(|k| if k / n == k % n { 0.0 } else { 1.0 })
            .collect()
    }

    /// Over many draws the labels are 1/3 each (2/3 own image, split evenly over the two sides), the
    /// own image sits at the side its label names, and it is never the negative nor under label 2;
    /// the two images of label 2 differ.
    #[test]
    fn pairing_rule_proportions_and_sides() {
        let n = 6;
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let mut counts = [0usize; 3];
        let rounds = 4000;
        for _ in 0..rounds {
            let p = draw_image_pairs(&uniform(n), n, &mut rng).unwrap();
            for b in 0..n {
                let (i0, i1, label) = (p.image0[b], p.image1[b], p.labels[b]);
                let own = b as i64;
                counts[label as usize] += 1;
                match label {
                    LABEL_TRUE_IS_IMAGE0 => assert!(i0 == own && i1 != own),
                    LABEL_TRUE_IS_IMAGE1 => assert!(i1 == own && i0 != own),
                    _ => assert!(i0 != own && i1 != own && i0 != i1),
                }
            }
        }
        let total = (rounds * n) as f64;
        for (label, &c) in counts.iter().enumerate() {
            let frac = c as f64 / total;
            assert!((frac - 1.0 / 3.0).abs() < 0.015, "label {label}: {frac:.4}");
        }
    }

    /// Negatives follow the weights: a column with 9x the weight of the others is drawn ~9/13 of the
    /// time (4 other columns of weight 1), the zeroed diagonal never.
    #[test]
    fn negatives_are_drawn_in_proportion_to_the_weights() {
        let n = 6;
        let mut w = uniform(n);
        w[2] = 9.0; // row 0 prefers image 2
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let (mut heavy, mut hard) = (0usize, 0usize);
        for _ in 0..6000 {
            let p = draw_image_pairs(&w, n, &mut rng).unwrap();
            let neg = match p.labels[0] {
                LABEL_TRUE_IS_IMAGE0 => p.image1[0],
                LABEL_TRUE_IS_IMAGE1 => p.image0[0],
                _ => continue,
            };
            assert_ne!(neg, 0);
            hard += 1;
            heavy += usize::from(neg == 2);
        }
        let frac = heavy as f64 / hard as f64;
        assert!((frac - 9.0 / 13.0).abs() < 0.03, "{frac:.3}");
    }

    /// The weights: softmax of sim / 0.07 per row with a zero diagonal; an underflowed row still gets
    /// another image; fewer than 3 images is an error, not a panic.
    #[test]
    fn weights_and_edge_cases() {
        let feat = Tensor::from_slice(&[1f32, 0.0, 0.0, 1.0, 0.6, 0.8]).view([3, 2]);
        let w = negative_weights(&feat);
        let v: Vec<f32> = Vec::try_from(w.contiguous().view([-1])).unwrap();
        for i in 0..3 {
            assert_eq!(v[i * 3 + i], 0.0);
        }
        let (s01, s02) = (0.0f32, 0.6f32);
        let ratio = v[2] / v[1];
        assert!((ratio - ((s02 - s01) / 0.07).exp()).abs() / ratio < 1e-4);
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let p = draw_image_pairs(&[0.0; 9], 3, &mut rng).unwrap();
        for b in 0..3 {
            assert!(p.image0[b] != p.image1[b]);
        }
        assert!(draw_image_pairs(&[0.0; 4], 2, &mut rng).is_err());
        assert!(draw_image_pairs(&[0.0; 8], 3, &mut rng).is_err());
    }
}
