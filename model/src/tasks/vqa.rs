//! VQA as answer generation (models/model_vqa.py: XVLM): the 12-layer text encoder reads the question
//! with cross-attention to the image; a `BertLMHeadModel` decoder (`text_decoder`, `num_dec_layers`
//! layers, every one cross-attending to the question states) scores answers. Training: weighted,
//! per-answer summed NLL. Inference: `rank_answer` (XVLM-REFERENCE.md §5.2), including quirk 12 (the first
//! token's log-probability counted twice).

use tch::{nn, Kind, Tensor};

use crate::config::{ConfigError, TaskConfig};
use crate::loss;
use crate::text::{CrossContext, TextEncoder};
use crate::xvlm::{Heads, ModelError, XvlmCore};

/// `models/model_vqa.py:XVLM`.
pub struct VqaModel {
    /// Vision encoder and the bare text encoder (no heads).
    pub core: XvlmCore,
    /// `text_decoder` (`bert.*` + `cls.*`).
    pub text_decoder: TextEncoder,
    /// Padding id of the answers (masked to −100 in the targets).
    pub pad_token_id: i64,
}

/// The steps of `rank_answer`, every intermediate kept.
#[derive(Debug)]
pub struct AnswerRanking {
    /// Decoder logits at position 0 for the input `[CLS]` [Q, vocab].
    pub start_logits: Tensor,
    /// `softmax(start_logits)` at every answer's first token [Q, A].
    pub prob_first_token: Tensor,
    /// Top-k answers by first-token probability [Q, k].
    pub first_token_topk_ids: Tensor,
    /// Their probabilities [Q, k].
    pub first_token_topk_probs: Tensor,
    /// Summed NLL of each candidate (in `first_token_topk_ids` order) [Q, k].
    pub candidate_answer_nll: Tensor,
    /// Answer indices after re-ranking [Q, k].
    pub topk_ids: Tensor,
    /// Their probabilities after re-ranking [Q, k].
    pub topk_probs: Tensor,
}

impl AnswerRanking {
    /// The answer `VQA.evaluation` reports per question: `topk_ids` at the argmax of `topk_probs` [Q].
    pub fn pred_answer_index(&self) -> Tensor {
        let best = self.topk_probs.argmax(1, true);
        self.topk_ids.gather(1, &best, false).squeeze_dim(1)
    }
}

/// What the VQA training forward computes.
#[derive(Debug)]
pub struct VqaTrainLoss {
    /// `(weights · per-answer NLL).sum() / B`.
    pub loss: Tensor,
    /// Summed NLL of each answer [N].
    pub per_answer: Tensor,
    /// Text-encoder states of the questions before the per-answer repetition [B, Lq, D].
    pub question_states: Tensor,
}

fn int_key(task: &TaskConfig, key: &'static str) -> Option<i64> {
    task.extra.get(key).and_then(serde_yaml::Value::as_i64)
}

impl VqaModel {
    /// Builds under `p`: the decoder copies the text config with `fusion_layer` 0, `num_dec_layers`
    /// layers and `encoder_width` = the text width. `pad_token_id` comes from the task config (VQA.py sets
    /// it from the tokenizer) or else the text config.
    pub fn new(p: &nn::Path, task: &TaskConfig) -> Result<Self, ModelError> {
        let text_cfg = task.load_text_config()?;
        if text_cfg.flavor() == crate::text::TextFlavor::Roberta {
            return Err(ModelError::Input(
                "VQA with RoBERTa is refused, as the official model does".into(),
            ));
        }
        let cross_layers = text_cfg.num_hidden_layers - text_cfg.fusion_layer;
        let num_dec_layers = int_key(task, "num_dec_layers").unwrap_or(cross_layers);
        if num_dec_layers != cross_layers {
            return Err(ModelError::Config(ConfigError::Invalid {
                path: task.source.clone(),
                key: "num_dec_layers",
                reason: format!(
                    "{num_dec_layers} != the {cross_layers} cross layers the decoder is initialised from"
                ),
            }));
        }
        let core = XvlmCore::from_task(p, task, Heads::default())?;
        let mut dec_cfg = text_cfg.clone();
        dec_cfg.encoder_width = text_cfg.hidden_size;
        dec_cfg.fusion_layer = 0;
        dec_cfg.num_hidden_layers = num_dec_layers;
        let text_decoder = TextEncoder::new(p / "text_decoder", &dec_cfg, true);
        Ok(VqaModel {
            core,
            text_decoder,
            pad_token_id: int_key(task, "pad_token_id").unwrap_or(text_cfg.pad_token_id),
        })
    }

    /// Every tied alias of the model (encoder side and the decoder's LM head), full keys.
    pub fn tied_aliases(&self) -> Vec<(String, String)> {
        let mut aliases = self.core.tied_aliases();
        aliases.extend(
            self.text_decoder
                .tied_aliases()
                .into_iter()
                .map(|(a, s)| (format!("text_decoder.{a}"), format!("text_decoder.{s}"))),
        );
        aliases
    }

    /// The official state dict: parameters, tied aliases and computed buffers of both text stacks.
    pub fn state_dict(&self, vs: &nn::VarStore) -> crate::checkpoint::StateDict {
        let mut sd = crate::xvlm::state_dict_with_aliases(vs, &self.tied_aliases());
        sd.extend(self.core.buffers());
        sd.extend(
            self.text_decoder
                .buffers()
                .into_iter()
                .map(|(k, t)| (format!("text_decoder.{k}"), t)),
        );
        sd
    }

    /// Vision tokens [B, 1+P, Dv] and the question states [B, Lq, D] (all 12 layers, cross-attending to
    /// the whole image).
    pub fn encode_question(
        &self,
        image: &Tensor,
        question_ids: &Tensor,
        question_atts: &Tensor,
        train: bool,
    ) -> (Tensor, Tensor) {
        let vision = self.core.get_vision_embeds(image, train);
        let states = self.core.get_cross_embeds_from_ids(
            &vision.embeds,
            &vision.atts,
            question_ids,
            question_atts,
            train,
        );
        (vision.embeds, states)
    }

    /// Per-sequence summed NLL of `answer_ids` [N, La] given question states [N, Lq, D].
    fn answer_nll(
        &self,
        answer_ids: &Tensor,
        answer_atts: &Tensor,
        question_states: &Tensor,
        question_atts: &Tensor,
        train: bool,
    ) -> Result<Tensor, ModelError> {
        let cross = [CrossContext::new(question_states, question_atts)];
        let hidden = self
            .text_decoder
            .forward_decoder(answer_ids, answer_atts, &cross, train);
        let logits = self.decoder_logits(&hidden)?;
        let targets = answer_ids.masked_fill(&answer_ids.eq(self.pad_token_id), -100);
        Ok(loss::lm_loss_per_sequence(&logits, &targets))
    }

    fn decoder_logits(&self, hidden: &Tensor) -> Result<Tensor, ModelError> {
        self.text_decoder
            .mlm_logits(hidden)
            .ok_or_else(|| ModelError::Input("the text decoder has no LM head".into()))
    }

    /// The training loss: question states repeated `k[b]` times for the answers of question b;
    /// `(weights · per-answer NLL).sum() / B`.
    #[allow(clippy::too_many_arguments)]
    pub fn train_loss(
        &self,
        image: &Tensor,
        question_ids: &Tensor,
        question_atts: &Tensor,
        answer_ids: &Tensor,
        answer_atts: &Tensor,
        k: &Tensor,
        weights: &Tensor,
        train: bool,
    ) -> Result<VqaTrainLoss, ModelError> {
        let (_, states) = self.encode_question(image, question_ids, question_atts, train);
        let b = question_ids.size()[0];
        let rows = Tensor::arange(b, (Kind::Int64, states.device())).repeat_interleave_self_tensor(
            &k.to_device(states.device()),
            0,
            None,
        );
        if rows.size()[0] != answer_ids.size()[0] {
            return Err(ModelError::Input(format!(
                "k sums to {} answers but answer_ids has {} rows",
                rows.size()[0],
                answer_ids.size()[0]
            )));
        }
        let per_answer = self.answer_nll(
            answer_ids,
            answer_atts,
            &states.index_select(0, &rows),
            &question_atts.index_select(0, &rows),
            train,
        )?;
        let loss = (weights * &per_answer).sum(Kind::Float) / image.size()[0] as f64;
        Ok(VqaTrainLoss {
            loss,
            per_answer,
            question_states: states,
        })
    }

    /// `rank_answer`: first-token probabilities of every answer from `[CLS]` alone, top-k, teacher-forced
    /// NLL of those k, `log p(first) − NLL` softmaxed and re-ranked. Eval mode, no gradient.
    pub fn rank_answer(
        &self,
        question_states: &Tensor,
        question_atts: &Tensor,
        answer_ids: &Tensor,
        answer_atts: &Tensor,
        k: i64,
    ) -> Result<AnswerRanking, ModelError> {
        tch::no_grad(|| {
            let q = question_states.size()[0];
            let start_ids = answer_ids.get(0).get(0).view([1, 1]).repeat([q, 1]);
            let start_atts = start_ids.ones_like();
            let cross = [CrossContext::new(question_states, question_atts)];
            let hidden = self
                .text_decoder
                .forward_decoder(&start_ids, &start_atts, &cross, false);
            let start_logits = self.decoder_logits(&hidden)?.select(1, 0);
            let prob_first_token = start_logits
                .softmax(1, Kind::Float)
                .index_select(1, &answer_ids.select(1, 1));
            let (first_token_topk_probs, first_token_topk_ids) =
                prob_first_token.topk(k, 1, true, true);

            let flat = first_token_topk_ids.view([-1]);
            let input_ids = answer_ids.index_select(0, &flat);
            let input_atts = answer_atts.index_select(0, &flat);
            // tile(x, 0, k): every question repeated k times in place (repeat_interleave order).
            let states = question_states.repeat_interleave_self_int(k, 0, None);
            let atts = question_atts.repeat_interleave_self_int(k, 0, None);
            let nll = self.answer_nll(&input_ids, &input_atts, &states, &atts, false)?;
            let candidate_answer_nll = nll.view([q, k]);

            let log_probs_sum = first_token_topk_probs.log() - &candidate_answer_nll;
            let (topk_probs, rerank) = log_probs_sum
                .softmax(-1, Kind::Float)
                .topk(k, 1, true, true);
            let topk_ids = first_token_topk_ids.gather(1, &rerank, false);
            Ok(AnswerRanking {
                start_logits,
                prob_first_token,
                first_token_topk_ids,
                first_token_topk_probs,
                candidate_answer_nll,
                topk_ids,
                topk_probs,
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use crate::parity::{run_case, WeightsSource};

    /// The `vqa` fixture (answer ranking and training loss) from both weight files.
    #[test]
    fn vqa_fixture_parity() {
        let dir = crate::fixtures_dir().join("vqa");
        for source in [WeightsSource::TorchSave, WeightsSource::Safetensors] {
            let report = run_case(&dir, source).unwrap();
            assert_eq!(report.rows.len(), 12);
            assert!(report.passed(), "{source:?}: {:#?}", report.failures());
        }
    }
}
