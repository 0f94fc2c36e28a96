//! Text encoders: BERT with the fusion_layer split (bert), RoBERTa (roberta), and the `text_encoder.*`
//! wrapper the X-VLM models hold (with the MLM head in pre-training, bare in fine-tuning).

pub mod bert;
pub mod cross;
pub mod roberta;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use tch::{nn, Tensor};

pub use bert::{BertModel, EncoderMode, TextFlavor};
pub use cross::{cross_attention_mask, CrossContext, CrossKv};

use crate::config::TextConfig;

/// The MLM head of the `*ForMaskedLM` wrapper.
#[derive(Debug)]
pub enum MlmHead {
    /// `cls.predictions.*`.
    Bert(bert::BertMlmHead),
    /// `lm_head.*`.
    Roberta(roberta::RobertaLmHead),
}

impl MlmHead {
    /// [.., D] → logits [.., vocab].
    pub fn forward(&self, xs: &Tensor) -> Tensor {
        match self {
            MlmHead::Bert(h) => h.forward(xs),
            MlmHead::Roberta(h) => h.forward(xs),
        }
    }
}

/// `text_encoder`: `BertForMaskedLM`/`RobertaForMaskedLM` in pre-training (encoder under `bert.`/`roberta.`
/// plus the MLM head), a bare `BertModel`/`RobertaModel` in fine-tuning (encoder keys directly under
/// `text_encoder.`).
#[derive(Debug)]
pub struct TextEncoder {
    /// The encoder (embeddings + layers).
    pub model: BertModel,
    /// The MLM head, pre-training only.
    pub mlm_head: Option<MlmHead>,
    flavor: TextFlavor,
    hidden_size: i64,
    cross_kv_group: usize,
    fusion_layer: i64,
    num_layers: i64,
}

impl TextEncoder {
    /// Builds under `p` (= `text_encoder`). `with_mlm_head` selects the `*ForMaskedLM` layout.
    pub fn new(p: nn::Path, cfg: &TextConfig, with_mlm_head: bool) -> Self {
        Self::with_shared_cross_kv(p, cfg, with_mlm_head, 1)
    }

    /// As [`Self::new`], with cross layers sharing key/value in groups of `group` (NLVR2: 2).
    pub fn with_shared_cross_kv(
        p: nn::Path,
        cfg: &TextConfig,
        with_mlm_head: bool,
        group: usize,
    ) -> Self {
        let flavor = cfg.flavor();
        let model_path = if with_mlm_head {
            &p / flavor.prefix()
        } else {
            p.clone()
        };
        let model = BertModel::with_shared_cross_kv(model_path, cfg, flavor, group);
        let mlm_head = with_mlm_head.then(|| match flavor {
            TextFlavor::Bert => MlmHead::Bert(bert::BertMlmHead::new(
                &p / "cls",
                cfg,
                &model.embeddings.word_embeddings,
            )),
            TextFlavor::Roberta => MlmHead::Roberta(roberta::RobertaLmHead::new(
                &p / "lm_head",
                cfg,
                &model.embeddings.word_embeddings,
            )),
        });
        TextEncoder {
            model,
            mlm_head,
            flavor,
            hidden_size: cfg.hidden_size,
            cross_kv_group: group,
            fusion_layer: cfg.fusion_layer,
            num_layers: cfg.num_hidden_layers,
        }
    }

    /// BERT or RoBERTa.
    pub fn flavor(&self) -> TextFlavor {
        self.flavor
    }

    /// Hidden size D.
    pub fn hidden_size(&self) -> i64 {
        self.hidden_size
    }

    /// State-dict keys (relative to `text_encoder.`) that are the same tensor as another key:
    /// `(alias, source)`. The source is the variable in the VarStore; the alias is only written on save.
    pub fn tied_aliases(&self) -> Vec<(String, String)> {
        let mut aliases = self.head_aliases();
        let layer_prefix = match self.mlm_head {
            Some(_) => format!("{}.encoder.layer", self.flavor.prefix()),
            None => "encoder.layer".to_string(),
        };
        for l in 0..self.num_layers {
            let Some(owner) = bert::shared_kv_owner(l, self.fusion_layer, self.cross_kv_group)
            else {
                continue;
            };
            for module in ["key", "value"] {
                for tensor in ["weight", "bias"] {
                    let key = |layer| {
                        format!("{layer_prefix}.{layer}.crossattention.self.{module}.{tensor}")
                    };
                    aliases.push((key(l), key(owner)));
                }
            }
        }
        aliases
    }

    fn head_aliases(&self) -> Vec<(String, String)> {
        let prefix = self.flavor.prefix();
        match (&self.mlm_head, self.flavor) {
            (None, _) => vec![],
            (Some(_), TextFlavor::Bert) => vec![
                (
                    "cls.predictions.decoder.weight".into(),
                    format!("{prefix}.embeddings.word_embeddings.weight"),
                ),
                (
                    "cls.predictions.decoder.bias".into(),
                    "cls.predictions.bias".into(),
                ),
            ],
            (Some(_), TextFlavor::Roberta) => vec![
                (
                    "lm_head.decoder.weight".into(),
                    format!("{prefix}.embeddings.word_embeddings.weight"),
                ),
                ("lm_head.decoder.bias".into(), "lm_head.bias".into()),
            ],
        }
    }

    /// The buffer the official state dict holds besides the parameters: `embeddings.position_ids`
    /// [1, max_position_embeddings] int64 (under `bert.`/`roberta.` in the `*ForMaskedLM` layout), named
    /// relative to `text_encoder.`.
    pub fn buffers(&self) -> Vec<(String, Tensor)> {
        let table = &self.model.embeddings.position_table();
        let n = table.size()[0];
        let ids = Tensor::arange(n, (tch::Kind::Int64, table.device())).unsqueeze(0);
        let key = match self.mlm_head {
            Some(_) => format!("{}.embeddings.position_ids", self.flavor.prefix()),
            None => "embeddings.position_ids".to_string(),
        };
        vec![(key, ids)]
    }

    /// Mode `'text'` (layers before `fusion_layer`): [B, L] ids → [B, L, D].
    pub fn forward_text(&self, ids: &Tensor, atts: &Tensor, train: bool) -> Tensor {
        self.model.forward_text(ids, atts, train)
    }

    /// Mode `'fusion'`: text states → cross-modal states [B, L, D].
    pub fn forward_fusion(
        &self,
        text_embeds: &Tensor,
        atts: &Tensor,
        cross: &[CrossContext],
        train: bool,
    ) -> Tensor {
        self.model.forward_fusion(text_embeds, atts, cross, train)
    }

    /// Mode `'multi_modal'`: ids through every layer → [B, L, D].
    pub fn forward_multimodal(
        &self,
        ids: &Tensor,
        atts: &Tensor,
        cross: &[CrossContext],
        train: bool,
    ) -> Tensor {
        self.model.forward_multimodal(ids, atts, cross, train)
    }

    /// Mode `'multi_modal'` that also returns the cross-attention probabilities of layer `layer`, in the
    /// autograd graph (see [`BertModel::forward_multimodal_with_cross_probs`]).
    pub fn forward_multimodal_with_cross_probs(
        &self,
        ids: &Tensor,
        atts: &Tensor,
        cross: &[CrossContext],
        layer: usize,
        train: bool,
    ) -> (Tensor, Option<Tensor>) {
        self.model
            .forward_multimodal_with_cross_probs(ids, atts, cross, layer, train)
    }

    /// Decoder forward (`BertLMHeadModel`, causal self-attention, every layer cross-attending to
    /// `cross`) → [B, L, D].
    pub fn forward_decoder(
        &self,
        ids: &Tensor,
        atts: &Tensor,
        cross: &[CrossContext],
        train: bool,
    ) -> Tensor {
        self.model.forward_decoder(ids, atts, cross, train)
    }

    /// The cross-attention keys and values of `image_embeds` for every cross layer (see
    /// [`BertModel::cross_kv`]).
    pub fn cross_kv(&self, image_embeds: &Tensor) -> CrossKv {
        self.model.cross_kv(image_embeds)
    }

    /// MLM logits for hidden states [.., D]; `None` without an MLM head.
    pub fn mlm_logits(&self, hidden: &Tensor) -> Option<Tensor> {
        self.mlm_head.as_ref().map(|h| h.forward(hidden))
    }
}

/// A vocabulary file could not be read or lacks a special token.
#[derive(Debug, thiserror::Error)]
pub enum VocabError {
    /// The file could not be read.
    #[error("cannot read vocabulary {path}: {source}")]
    Read {
        /// File.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// The file is not a valid vocabulary.
    #[error("vocabulary {path} is invalid: {reason}")]
    Invalid {
        /// File.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A special token the model needs is missing.
    #[error("vocabulary {path} has no {token:?} token")]
    Missing {
        /// File.
        path: PathBuf,
        /// The token looked for.
        token: &'static str,
    },
}

/// Special token ids, read from the vocabulary (never constants: the fixtures' tiny vocabularies number
/// them differently from bert-base-uncased).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpecialTokens {
    /// `[PAD]` / `<pad>`.
    pub pad: i64,
    /// `[UNK]` / `<unk>`.
    pub unk: i64,
    /// `[CLS]` / `<s>`.
    pub cls: i64,
    /// `[SEP]` / `</s>`.
    pub sep: i64,
    /// `[MASK]` / `<mask>`.
    pub mask: i64,
}

impl SpecialTokens {
    /// From a text-encoder folder: `vocab.txt` (WordPiece, BERT) or `vocab.json` (byte-level BPE, RoBERTa).
    pub fn from_dir(dir: &Path, flavor: TextFlavor) -> Result<Self, VocabError> {
        match flavor {
            TextFlavor::Bert => Self::from_wordpiece(&dir.join("vocab.txt")),
            TextFlavor::Roberta => Self::from_bpe_json(&dir.join("vocab.json")),
        }
    }

    /// From a WordPiece `vocab.txt` (id = line number).
    pub fn from_wordpiece(path: &Path) -> Result<Self, VocabError> {
        let text = std::fs::read_to_string(path).map_err(|source| VocabError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let ids: HashMap<&str, i64> = text
            .lines()
            .enumerate()
            .map(|(i, tok)| (tok.trim_end_matches('\r'), i as i64))
            .collect();
        Self::lookup(
            path,
            |t| ids.get(t).copied(),
            ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"],
        )
    }

    /// From a byte-level BPE `vocab.json` (`{token: id}`).
    pub fn from_bpe_json(path: &Path) -> Result<Self, VocabError> {
        let text = std::fs::read_to_string(path).map_err(|source| VocabError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let ids: HashMap<String, i64> =
            serde_json::from_str(&text).map_err(|e| VocabError::Invalid {
                path: path.to_path_buf(),
                reason: e.to_string(),
            })?;
        Self::lookup(
            path,
            |t| ids.get(t).copied(),
            ["<pad>", "<unk>", "<s>", "</s>", "<mask>"],
        )
    }

    fn lookup(
        path: &Path,
        get: impl Fn(&str) -> Option<i64>,
        names: [&'static str; 5],
    ) -> Result<Self, VocabError> {
        let id = |token: &'static str| {
            get(token).ok_or(VocabError::Missing {
                path: path.to_path_buf(),
                token,
            })
        };
        Ok(SpecialTokens {
            pad: id(names[0])?,
            unk: id(names[1])?,
            cls: id(names[2])?,
            sep: id(names[3])?,
            mask: id(names[4])?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fixtures' tiny vocabularies number the special tokens differently from bert-base-uncased;
    /// the ids come from the files.
    #[test]
    fn special_tokens_come_from_the_vocabulary() {
        let fixtures = crate::fixtures_dir();
        let bert = SpecialTokens::from_dir(&fixtures.join("pretrain_swin_bert"), TextFlavor::Bert)
            .unwrap();
        assert_eq!(
            bert,
            SpecialTokens {
                pad: 0,
                unk: 1,
                cls: 2,
                sep: 3,
                mask: 4
            }
        );
        let roberta = SpecialTokens::from_dir(
            &fixtures.join("pretrain_clipvit_roberta"),
            TextFlavor::Roberta,
        )
        .unwrap();
        assert_eq!(
            roberta,
            SpecialTokens {
                pad: 1,
                unk: 3,
                cls: 0,
                sep: 2,
                mask: 250
            }
        );
    }

    /// A vocabulary without `[MASK]` is refused, naming the token and the file.
    #[test]
    fn missing_special_token_is_named() {
        let dir = std::env::temp_dir().join(format!("xvlm-vocab-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("vocab.txt"), "[PAD]\n[UNK]\n[CLS]\n[SEP]\nhello\n").unwrap();
        let err = SpecialTokens::from_dir(&dir, TextFlavor::Bert)
            .unwrap_err()
            .to_string();
        std::fs::remove_dir_all(&dir).ok();
        assert!(err.contains("[MASK]") && err.contains("vocab.txt"), "{err}");
    }
}
