//! RefCOCO+ box fine-tuning (`Grounding_bbox.train`): L1 + GIoU of the predicted box against the target.
//! `model_bbox` lists no `init_params`, so no parameter gets `lr_mult` (XVLM-REFERENCE.md §5.5).

use super::{FinetuneModel, TaskForward};
use crate::collective::Collective;
use crate::data::finetune::grounding::GroundingBoxBatch;
use crate::loss::NegativeSampler;
use crate::tasks::grounding_bbox::GroundingBboxModel;
use crate::xvlm::ModelError;

impl FinetuneModel for GroundingBboxModel {
    type Batch = GroundingBoxBatch;
    const LOSS_NAMES: &'static [&'static str] = &["bbox", "giou"];

    fn is_init_param(&self, _name: &str) -> bool {
        false
    }

    fn forward_train(
        &self,
        batch: &GroundingBoxBatch,
        _collective: &dyn Collective,
        _sampler: &mut dyn NegativeSampler,
        train: bool,
    ) -> Result<TaskForward, ModelError> {
        let out = self.forward(&batch.image, &batch.text_ids, &batch.text_atts, train)?;
        let (loss_bbox, loss_giou) = Self::loss(&out.bbox.coord, &batch.target_bbox);
        let debug = vec![
            ("bbox_head_output", out.bbox.head_output.detach()),
            ("output_coord", out.bbox.coord.detach()),
        ];
        Ok(TaskForward {
            losses: vec![loss_bbox, loss_giou],
            debug,
        })
    }
}
