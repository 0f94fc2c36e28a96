//! NLVR2 domain pre-training (`NLVR_pretrain.train`): cross-entropy of `ta_head` over (text, image 0,
//! image 1) pairs drawn per text from the local batch. The pair draws come from the batch's own seed
//! (its lines' draws, [`crate::data::finetune::jsonl`]), so a resume replays them. `ta_head` is the
//! model's `init_params` (trained at `lr × lr_mult`; the script builds the optimizer on the bare
//! model, so the rule applies there too).

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::{FinetuneModel, TaskForward};
use crate::collective::Collective;
use crate::data::finetune::jsonl::ImageTextLinesBatch;
use crate::loss::NegativeSampler;
use crate::tasks::nlvr_pretrain::NlvrPretrainModel;
use crate::xvlm::ModelError;

impl FinetuneModel for NlvrPretrainModel {
    type Batch = ImageTextLinesBatch;
    const LOSS_NAMES: &'static [&'static str] = &["ce"];

    fn is_init_param(&self, name: &str) -> bool {
        name.starts_with("ta_head.")
    }

    fn forward_train(
        &self,
        batch: &ImageTextLinesBatch,
        _collective: &dyn Collective,
        _sampler: &mut dyn NegativeSampler,
        train: bool,
    ) -> Result<TaskForward, ModelError> {
        let mut rng = ChaCha8Rng::seed_from_u64(batch.draw_seed);
        let b = &batch.batch;
        let out = self.forward(&b.image, &b.text_ids, &b.text_atts, &mut rng, train)?;
        let debug = vec![
            ("weights", out.weights.detach()),
            ("labels", out.labels.detach()),
            ("logits", out.logits.detach()),
        ];
        Ok(TaskForward {
            losses: vec![out.loss],
            debug,
        })
    }
}
