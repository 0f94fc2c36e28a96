//! Box domain pre-training (`Grounding_bbox_pretrain.train`): L1 + GIoU of each region text's box over
//! its full image, whole-image captions masked by `is_image` (unless `calc_image_bbox_loss`).
//! `model_bbox_pretrain` lists no `init_params`, so no parameter gets `lr_mult`.

use super::{FinetuneModel, TaskForward};
use crate::collective::Collective;
use crate::data::batch::RegionBatch;
use crate::loss::NegativeSampler;
use crate::tasks::bbox_pretrain::BboxPretrainModel;
use crate::xvlm::ModelError;

impl FinetuneModel for BboxPretrainModel {
    type Batch = RegionBatch;
    const LOSS_NAMES: &'static [&'static str] = &["bbox", "giou"];

    fn is_init_param(&self, _name: &str) -> bool {
        false
    }

    fn forward_train(
        &self,
        batch: &RegionBatch,
        _collective: &dyn Collective,
        _sampler: &mut dyn NegativeSampler,
        train: bool,
    ) -> Result<TaskForward, ModelError> {
        let out = self.forward(
            &batch.image,
            &batch.idx_to_group_img,
            &batch.text_ids,
            &batch.text_atts,
            train,
        )?;
        let (loss_bbox, loss_giou) = self.loss(&out.coord, &batch.target_bbox, &batch.is_image);
        let debug = vec![
            ("bbox_head_output", out.head_output.detach()),
            ("output_coord", out.coord.detach()),
        ];
        Ok(TaskForward {
            losses: vec![loss_bbox, loss_giou],
            debug,
        })
    }
}
