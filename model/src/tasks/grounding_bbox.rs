//! RefCOCO+ grounding with box regression (models/model_bbox.py: XVLM; Grounding_bbox.py evaluation):
//! vision + text + `bbox_head`, L1 + GIoU against the target box, and the VLUE-style score — the
//! fraction of predictions whose inclusive-pixel IoU with the reference box is at least 0.5
//! (XVLM-REFERENCE.md §5.5).

use tch::{nn, Kind, Tensor};

use crate::config::TaskConfig;
use crate::loss;
use crate::xvlm::{BboxOutput, Heads, ModelError, XvlmCore};

/// The outcome of a grounding forward.
#[derive(Debug)]
pub struct GroundingBboxOutput {
    /// Vision tokens [B, 1+P, Dv].
    pub image_embeds: Tensor,
    /// The box prediction (token 0, raw head output, sigmoid coordinates).
    pub bbox: BboxOutput,
}

/// `models/model_bbox.py:XVLM`.
pub struct GroundingBboxModel {
    /// Encoders and `bbox_head`.
    pub core: XvlmCore,
}

impl GroundingBboxModel {
    /// Builds under `p` from a task config.
    pub fn new(p: &nn::Path, task: &TaskConfig) -> Result<Self, ModelError> {
        let heads = Heads {
            bbox: true,
            ..Heads::default()
        };
        Ok(GroundingBboxModel {
            core: XvlmCore::from_task(p, task, heads)?,
        })
    }

    /// Full image → text layers → `predict_bbox` (fusion over the whole image, all-ones mask).
    pub fn forward(
        &self,
        image: &Tensor,
        text_ids: &Tensor,
        text_atts: &Tensor,
        train: bool,
    ) -> Result<GroundingBboxOutput, ModelError> {
        let vision = self.core.get_vision_embeds(image, train);
        let text_embeds = self.core.get_text_embeds(text_ids, text_atts, train);
        let bbox = self
            .core
            .predict_bbox(&vision.embeds, &text_embeds, text_atts, train)?;
        Ok(GroundingBboxOutput {
            image_embeds: vision.embeds,
            bbox,
        })
    }

    /// `get_bbox_loss(coord, target)` with every box counted: (L1, GIoU).
    pub fn loss(coord: &Tensor, target_bbox: &Tensor) -> (Tensor, Tensor) {
        loss::bbox_loss(coord, target_bbox, None)
    }
}

/// Predicted (cx, cy, w, h) in [0, 1] [N, 4] → (x, y, w, h) pixels of the original image, with
/// `image_wh` [N, 2] (width, height), computed in the prediction's dtype as `grounding_eval_bbox_vlue`.
pub fn to_pixel_xywh(coord: &Tensor, image_wh: &Tensor) -> Tensor {
    let wh = image_wh.to_kind(coord.kind());
    let (w_img, h_img) = (wh.select(1, 0), wh.select(1, 1));
    let cx = coord.select(1, 0) * &w_img;
    let cy = coord.select(1, 1) * &h_img;
    let w = coord.select(1, 2) * &w_img;
    let h = coord.select(1, 3) * &h_img;
    let x = cx - &w / 2.0;
    let y = cy - &h / 2.0;
    Tensor::stack(&[x, y, w, h], 1)
}

/// `computeIoU` of two (x, y, w, h) boxes with the inclusive-pixel convention (RefCOCO's).
pub fn inclusive_iou(a: [f64; 4], b: [f64; 4]) -> f64 {
    let x1 = a[0].max(b[0]);
    let y1 = a[1].max(b[1]);
    let x2 = (a[0] + a[2] - 1.0).min(b[0] + b[2] - 1.0);
    let y2 = (a[1] + a[3] - 1.0).min(b[1] + b[3] - 1.0);
    let inter = if x1 < x2 && y1 < y2 {
        (x2 - x1 + 1.0) * (y2 - y1 + 1.0)
    } else {
        0.0
    };
    inter / (a[2] * a[3] + b[2] * b[3] - inter)
}

/// Per-sample IoU [N] (float64) of reference boxes [N, 4] and predicted boxes [N, 4] (both x, y, w, h),
/// and the score: the fraction with IoU ≥ 0.5.
pub fn grounding_score(ref_xywh: &Tensor, pred_xywh: &Tensor) -> (Tensor, f64) {
    let rows = |t: &Tensor| -> Vec<[f64; 4]> {
        let flat: Vec<f64> = Vec::try_from(
            t.to_device(tch::Device::Cpu)
                .to_kind(Kind::Double)
                .contiguous()
                .view([-1]),
        )
        .unwrap_or_default();
        flat.chunks_exact(4)
            .map(|c| [c[0], c[1], c[2], c[3]])
            .collect()
    };
    let ious: Vec<f64> = rows(ref_xywh)
        .into_iter()
        .zip(rows(pred_xywh))
        .map(|(r, p)| inclusive_iou(r, p))
        .collect();
    let hits = ious.iter().filter(|&&iou| iou >= 0.5).count();
    let score = if ious.is_empty() {
        0.0
    } else {
        hits as f64 / ious.len() as f64
    };
    (Tensor::from_slice(&ious), score)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parity::{run_case, WeightsSource};

    /// The inclusive-pixel convention: identical boxes give 1; a 10x10 box and its 5-pixel shift overlap
    /// on 5x10 pixels.
    #[test]
    fn inclusive_iou_of_known_boxes() {
        assert_eq!(
            inclusive_iou([0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 10.0]),
            1.0
        );
        let iou = inclusive_iou([0.0, 0.0, 10.0, 10.0], [5.0, 0.0, 10.0, 10.0]);
        assert!((iou - 50.0 / 150.0).abs() < 1e-12);
        assert_eq!(
            inclusive_iou([0.0, 0.0, 5.0, 5.0], [20.0, 20.0, 5.0, 5.0]),
            0.0
        );
    }

    /// The `grounding_bbox` fixture from both weight files.
    #[test]
    fn grounding_bbox_fixture_parity() {
        let dir = crate::fixtures_dir().join("grounding_bbox");
        for source in [WeightsSource::TorchSave, WeightsSource::Safetensors] {
            let report = run_case(&dir, source).unwrap();
            assert_eq!(report.rows.len(), 10);
            assert!(report.passed(), "{source:?}: {:#?}", report.failures());
        }
    }
}
