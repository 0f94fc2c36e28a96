//! Retrieval fine-tuning (`Retrieval.train`): `loss = itc(idx) + itm(idx)`. `model_retrieval` resets
//! `init_params` to `[]`, so no parameter gets `lr_mult` (XVLM-REFERENCE.md §4, §5.1).

use super::{FinetuneModel, TaskForward};
use crate::collective::Collective;
use crate::data::finetune::retrieval::RetrievalTrainBatch;
use crate::loss::NegativeSampler;
use crate::tasks::retrieval::RetrievalModel;
use crate::xvlm::ModelError;

impl FinetuneModel for RetrievalModel {
    type Batch = RetrievalTrainBatch;
    const LOSS_NAMES: &'static [&'static str] = &["itc", "itm"];

    fn is_init_param(&self, _name: &str) -> bool {
        false
    }

    fn forward_train(
        &self,
        batch: &RetrievalTrainBatch,
        collective: &dyn Collective,
        sampler: &mut dyn NegativeSampler,
        train: bool,
    ) -> Result<TaskForward, ModelError> {
        let out = self.train_forward(
            &batch.image,
            &batch.text_ids,
            &batch.text_atts,
            &batch.idx,
            collective,
            sampler,
            train,
        )?;
        // A copy: the optimizer updates the parameter in place after the forward.
        let temp = self.core.temp()?.detach().copy();
        let itc_logits = tch::no_grad(|| out.image_feat.matmul(&out.text_feat.tr()) / &temp);
        let debug = vec![
            ("image_feat", out.image_feat.detach()),
            ("text_feat", out.text_feat.detach()),
            ("itc_logits", itc_logits),
            (
                "itm_weights_i2t",
                out.itm.weights.weights_i2t.shallow_clone(),
            ),
            (
                "itm_weights_t2i",
                out.itm.weights.weights_t2i.shallow_clone(),
            ),
            ("temp", temp),
        ];
        Ok(TaskForward {
            losses: vec![out.loss_itc, out.itm.loss],
            debug,
        })
    }
}
