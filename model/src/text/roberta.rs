//! RoBERTa's differences from BERT (models/xroberta.py): position ids counted from the padding id, and the
//! `lm_head` layout. Every encoder block is BERT's (`bert.rs`).

use tch::nn::{self, Module};
use tch::{Kind, Tensor};

use super::bert::{activation, bert_layer_norm, bert_linear};
use crate::config::TextConfig;

/// `create_position_ids_from_input_ids`: real tokens get `pad + 1, pad + 2, …` in order, padding keeps
/// `pad`. `input_ids` [B, L] → [B, L] int64.
pub fn position_ids(input_ids: &Tensor, pad_token_id: i64) -> Tensor {
    let mask = input_ids.ne(pad_token_id).to_kind(Kind::Int);
    let incremental = mask.cumsum(1, Kind::Int) * &mask;
    incremental.to_kind(Kind::Int64) + pad_token_id
}

// models/xroberta.py: RobertaLMHead
/// `dense` → GELU → `layer_norm` → decoder (weight = word embeddings) + `bias`.
#[derive(Debug)]
pub struct RobertaLmHead {
    dense: nn::Linear,
    layer_norm: nn::LayerNorm,
    /// `lm_head.bias` (also saved as `lm_head.decoder.bias`).
    pub bias: Tensor,
    decoder_weight: Tensor,
}

impl RobertaLmHead {
    /// Builds `dense`, `layer_norm`, `bias` under `p` (= `text_encoder.lm_head`).
    pub fn new(p: nn::Path, cfg: &TextConfig, word_embeddings: &Tensor) -> Self {
        RobertaLmHead {
            dense: bert_linear(&p / "dense", cfg.hidden_size, cfg.hidden_size, cfg),
            layer_norm: bert_layer_norm(&p / "layer_norm", cfg.hidden_size, cfg.layer_norm_eps),
            bias: p.var("bias", &[cfg.vocab_size], nn::Init::Const(0.0)),
            decoder_weight: word_embeddings.shallow_clone(),
        }
    }

    /// [.., D] → logits [.., vocab].
    pub fn forward(&self, xs: &Tensor) -> Tensor {
        let h = activation(&self.dense.forward(xs), "gelu");
        self.layer_norm
            .forward(&h)
            .linear(&self.decoder_weight, Some(&self.bias))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Positions start at pad + 1 and padding keeps the pad id, as HF RoBERTa numbers them.
    #[test]
    fn positions_count_from_padding_id() {
        let ids = Tensor::from_slice(&[0i64, 50, 60, 1, 1, 0, 7, 1, 1, 1]).view([2, 5]);
        let pos = position_ids(&ids, 1);
        let got: Vec<i64> = Vec::try_from(pos.view([-1])).unwrap();
        assert_eq!(got, vec![2, 3, 4, 1, 1, 2, 3, 1, 1, 1]);
    }
}
