//! NLVR2 fine-tuning (`NLVR.train`): cross-entropy of `cls_head` on the pair's two images. The new
//! `cls_head` is the model's `init_params` (model_nlvr.py); DESIGN fix 8 trains it at `lr × lr_mult`
//! at every world size, where the official script's DDP wrapper drops the rule at world > 1.

use tch::Tensor;

use super::{FinetuneModel, TaskForward};
use crate::collective::Collective;
use crate::data::finetune::nlvr::NlvrBatch;
use crate::loss::NegativeSampler;
use crate::tasks::nlvr::NlvrModel;
use crate::xvlm::ModelError;

impl FinetuneModel for NlvrModel {
    type Batch = NlvrBatch;
    const LOSS_NAMES: &'static [&'static str] = &["ce"];

    fn is_init_param(&self, name: &str) -> bool {
        name.starts_with("cls_head.")
    }

    fn forward_train(
        &self,
        batch: &NlvrBatch,
        _collective: &dyn Collective,
        _sampler: &mut dyn NegativeSampler,
        train: bool,
    ) -> Result<TaskForward, ModelError> {
        // NLVR.py: `images = torch.cat([image0, image1], dim=0)`.
        let images = Tensor::cat(&[&batch.image0, &batch.image1], 0);
        let out = self.forward(&images, &batch.text_ids, &batch.text_atts, train)?;
        let loss = out.loss(&batch.targets);
        let debug = vec![
            ("cross_cls", out.cross_cls.detach()),
            ("logits", out.logits.detach()),
        ];
        Ok(TaskForward {
            losses: vec![loss],
            debug,
        })
    }
}
