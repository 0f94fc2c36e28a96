//! RefCOCO+ box domain pre-training (models/model_bbox_pretrain.py: XVLM, Grounding_bbox_pretrain.py;
//! XVLM-REFERENCE.md §5.5): vision + text + `bbox_head` (the layout of
//! [`crate::tasks::GroundingBboxModel`], so its checkpoint is the box fine-tune's `--load_bbox_pretrain`)
//! on region batches: the full image of every text (gathered per text, no region masks), the text
//! layers, `predict_bbox`, and the bbox losses (L1 + GIoU) over the region texts only: whole-image
//! captions (`is_image` 1) are masked out unless `calc_image_bbox_loss` (§2.5).

use tch::{nn, Tensor};

use crate::config::TaskConfig;
use crate::loss;
use crate::xvlm::{BboxOutput, Heads, ModelError, XvlmCore};

/// `models/model_bbox_pretrain.py:XVLM`.
pub struct BboxPretrainModel {
    /// Encoders and `bbox_head`.
    pub core: XvlmCore,
    /// `calc_image_bbox_loss`: whole-image captions count in the bbox losses too.
    pub calc_image_bbox_loss: bool,
}

impl BboxPretrainModel {
    /// Builds under `p` from a task config.
    pub fn new(p: &nn::Path, task: &TaskConfig) -> Result<Self, ModelError> {
        let heads = Heads {
            bbox: true,
            ..Heads::default()
        };
        Ok(Self {
            core: XvlmCore::from_task(p, task, heads)?,
            calc_image_bbox_loss: task.calc_image_bbox_loss,
        })
    }

    /// `image` [Bimg, 3, R, R], `idx_to_group_img` [Bt] (each text's image row), `text_ids` /
    /// `text_atts` [Bt, L] → the box of every text.
    pub fn forward(
        &self,
        image: &Tensor,
        idx_to_group_img: &Tensor,
        text_ids: &Tensor,
        text_atts: &Tensor,
        train: bool,
    ) -> Result<BboxOutput, ModelError> {
        let vision = self
            .core
            .get_region_vision_embeds(image, idx_to_group_img, None, train)?;
        let text_embeds = self.core.get_text_embeds(text_ids, text_atts, train);
        self.core
            .predict_bbox(&vision.embeds, &text_embeds, text_atts, train)
    }

    /// `get_bbox_loss(coord, target, is_image)`: (L1, GIoU), whole-image captions masked out unless
    /// `calc_image_bbox_loss` (a batch of only whole-image captions gives 0, DESIGN fix 6b).
    pub fn loss(
        &self,
        coord: &Tensor,
        target_bbox: &Tensor,
        is_image: &Tensor,
    ) -> (Tensor, Tensor) {
        pretrain_bbox_loss(coord, target_bbox, is_image, self.calc_image_bbox_loss)
    }
}

/// The domain pre-training's bbox losses (L1, GIoU): `is_image` masks whole-image captions out unless
/// `calc_image_bbox_loss` (then every text counts, `is_image = None` in the official loop).
pub fn pretrain_bbox_loss(
    coord: &Tensor,
    target_bbox: &Tensor,
    is_image: &Tensor,
    calc_image_bbox_loss: bool,
) -> (Tensor, Tensor) {
    let mask = (!calc_image_bbox_loss).then_some(is_image);
    loss::bbox_loss(coord, target_bbox, mask)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Kind;

    /// Whole-image captions do not count: the loss of a batch equals that of its region texts alone;
    /// with `calc_image_bbox_loss` every text counts.
    #[test]
    fn whole_image_captions_are_masked() {
        let pred = Tensor::from_slice(&[0.4f32, 0.5, 0.3, 0.2, 0.6, 0.6, 0.2, 0.2]).view([2, 4]);
        let target = Tensor::from_slice(&[0.5f32, 0.5, 1.0, 1.0, 0.5, 0.4, 0.3, 0.3]).view([2, 4]);
        let is_image = Tensor::from_slice(&[1i64, 0]);
        let close =
            |a: &Tensor, b: &Tensor| (a - b).abs().to_kind(Kind::Double).double_value(&[]) < 1e-6;
        let (l1, giou) = pretrain_bbox_loss(&pred, &target, &is_image, false);
        let (l1_r, giou_r) = loss::bbox_loss(&pred.narrow(0, 1, 1), &target.narrow(0, 1, 1), None);
        assert!(close(&l1, &l1_r) && close(&giou, &giou_r));
        let (l1, giou) = pretrain_bbox_loss(&pred, &target, &is_image, true);
        let (l1_a, giou_a) = loss::bbox_loss(&pred, &target, None);
        assert!(close(&l1, &l1_a) && close(&giou, &giou_a));
        assert!(!close(&l1, &l1_r));
    }
}
