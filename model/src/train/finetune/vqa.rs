//! VQA fine-tuning (`VQA.train`): the weighted, per-answer summed NLL of the answer decoder divided by
//! the number of questions. `init_params` are the decoder's cross-attention key/value when the vision
//! width differs from the text width: they cannot start from the encoder's cross-attention, which maps
//! from the vision width (model_vqa.py:41-45, XVLM-REFERENCE.md §5.2).

use tch::Tensor;

use super::{FinetuneModel, TaskForward};
use crate::collective::Collective;
use crate::data::finetune::vqa::VqaTrainBatch;
use crate::loss::NegativeSampler;
use crate::tasks::vqa::VqaModel;
use crate::xvlm::ModelError;

/// Whether `name` is a decoder cross-attention key or value tensor (`text_decoder.bert.encoder.layer.
/// {l}.crossattention.self.{key,value}.{weight,bias}`).
fn is_decoder_cross_kv(name: &str) -> bool {
    let Some(rest) = name.strip_prefix("text_decoder.bert.encoder.layer.") else {
        return false;
    };
    let Some((layer, tail)) = rest.split_once('.') else {
        return false;
    };
    layer.parse::<usize>().is_ok()
        && matches!(
            tail,
            "crossattention.self.key.weight"
                | "crossattention.self.key.bias"
                | "crossattention.self.value.weight"
                | "crossattention.self.value.bias"
        )
}

impl FinetuneModel for VqaModel {
    type Batch = VqaTrainBatch;
    const LOSS_NAMES: &'static [&'static str] = &["answer"];

    fn is_init_param(&self, name: &str) -> bool {
        self.core.vision.width() != self.core.text.hidden_size() && is_decoder_cross_kv(name)
    }

    fn forward_train(
        &self,
        batch: &VqaTrainBatch,
        _collective: &dyn Collective,
        _sampler: &mut dyn NegativeSampler,
        train: bool,
    ) -> Result<TaskForward, ModelError> {
        let k = Tensor::from_slice(&batch.k);
        let out = self.train_loss(
            &batch.image,
            &batch.text_ids,
            &batch.text_atts,
            &batch.answer_ids,
            &batch.answer_atts,
            &k,
            &batch.weights,
            train,
        )?;
        let debug = vec![
            ("answer_loss", out.per_answer.detach()),
            ("question_states", out.question_states.detach()),
        ];
        Ok(TaskForward {
            losses: vec![out.loss],
            debug,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::is_decoder_cross_kv;

    #[test]
    fn decoder_cross_kv_names() {
        assert!(is_decoder_cross_kv(
            "text_decoder.bert.encoder.layer.5.crossattention.self.value.bias"
        ));
        assert!(!is_decoder_cross_kv(
            "text_decoder.bert.encoder.layer.5.crossattention.self.query.bias"
        ));
        assert!(!is_decoder_cross_kv(
            "text_encoder.encoder.layer.5.crossattention.self.key.weight"
        ));
        assert!(!is_decoder_cross_kv(
            "text_decoder.bert.encoder.layer.x.crossattention.self.key.weight"
        ));
    }
}
