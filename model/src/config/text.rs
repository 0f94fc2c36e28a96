//! The BERT/RoBERTa text JSON of a task config.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::{read, ConfigError};
use crate::text::TextFlavor;

/// The BERT/RoBERTa text JSON (`configs/config_bert.json`, `config_roberta.json`): transformers' BertConfig
/// keys plus X-VLM's `fusion_layer` and `encoder_width`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TextConfig {
    /// Vocabulary size (30522 BERT, 50265 RoBERTa).
    pub vocab_size: i64,
    /// Hidden size D.
    pub hidden_size: i64,
    /// Total layers (text + cross).
    pub num_hidden_layers: i64,
    /// Attention heads.
    pub num_attention_heads: i64,
    /// Feed-forward width.
    pub intermediate_size: i64,
    /// Activation name (`gelu` = exact erf GELU).
    #[serde(default = "default_hidden_act")]
    pub hidden_act: String,
    /// Dropout after dense layers and embeddings.
    #[serde(default = "default_dropout")]
    pub hidden_dropout_prob: f64,
    /// Dropout on attention probabilities.
    #[serde(default = "default_dropout")]
    pub attention_probs_dropout_prob: f64,
    /// Position-embedding rows.
    #[serde(default = "default_max_position")]
    pub max_position_embeddings: i64,
    /// Token-type rows (2 BERT, 1 RoBERTa).
    #[serde(default = "default_type_vocab")]
    pub type_vocab_size: i64,
    /// LayerNorm eps (1e-12 BERT, 1e-5 RoBERTa).
    #[serde(default = "default_ln_eps")]
    pub layer_norm_eps: f64,
    /// Padding id (0 BERT, 1 RoBERTa); RoBERTa positions count from it.
    #[serde(default)]
    pub pad_token_id: i64,
    /// Std of the normal init of Linear/Embedding weights.
    #[serde(default = "default_init_range")]
    pub initializer_range: f64,
    /// First layer with cross-attention: layers `[0, fusion_layer)` are text-only.
    pub fusion_layer: i64,
    /// Width of the vision tokens the cross-attention keys/values read; overwritten with the vision
    /// encoder's width when a model is built (`build_text_encoder`).
    #[serde(default = "default_encoder_width")]
    pub encoder_width: i64,
    /// `bert` or `roberta`.
    #[serde(default)]
    pub model_type: Option<String>,
    /// Set at build time when pre-training with apex O1/O2 (`build_text_encoder`): attention divides the
    /// query by √head_dim before `QKᵀ` instead of the scores after it (an fp16 overflow guard).
    #[serde(default)]
    pub fp16: bool,
    /// Other transformers keys (`architectures`, `bos_token_id`, …), kept for round trips.
    #[serde(flatten)]
    pub extra: BTreeMap<String, serde_json::Value>,
}

fn default_hidden_act() -> String {
    "gelu".into()
}
fn default_dropout() -> f64 {
    0.1
}
fn default_max_position() -> i64 {
    512
}
fn default_type_vocab() -> i64 {
    2
}
fn default_ln_eps() -> f64 {
    1e-12
}
fn default_init_range() -> f64 {
    0.02
}
fn default_encoder_width() -> i64 {
    768
}

impl TextConfig {
    /// Reads and validates a text JSON.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let cfg: TextConfig =
            serde_json::from_str(&read(path)?).map_err(|e| ConfigError::Parse {
                path: path.to_path_buf(),
                reason: e.to_string(),
            })?;
        cfg.validate(path)?;
        Ok(cfg)
    }

    /// Checks the values a model build relies on.
    pub fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let invalid = |key, reason: String| ConfigError::Invalid {
            path: path.to_path_buf(),
            key,
            reason,
        };
        if self.num_attention_heads <= 0 || self.hidden_size % self.num_attention_heads != 0 {
            return Err(invalid(
                "num_attention_heads",
                format!(
                    "hidden_size {} is not a multiple of {} heads",
                    self.hidden_size, self.num_attention_heads
                ),
            ));
        }
        if !(0..=self.num_hidden_layers).contains(&self.fusion_layer) {
            return Err(invalid(
                "fusion_layer",
                format!(
                    "{} is outside 0..={} (num_hidden_layers)",
                    self.fusion_layer, self.num_hidden_layers
                ),
            ));
        }
        if !matches!(
            self.hidden_act.as_str(),
            "gelu" | "gelu_new" | "relu" | "quick_gelu"
        ) {
            return Err(invalid(
                "hidden_act",
                format!("unsupported activation {:?}", self.hidden_act),
            ));
        }
        Ok(())
    }

    /// BERT or RoBERTa, from `model_type` (or the `architectures` list).
    pub fn flavor(&self) -> TextFlavor {
        let roberta_arch = self
            .extra
            .get("architectures")
            .and_then(|a| a.as_array())
            .is_some_and(|a| {
                a.iter()
                    .any(|s| s.as_str().is_some_and(|s| s.starts_with("Roberta")))
            });
        if self.model_type.as_deref() == Some("roberta") || roberta_arch {
            TextFlavor::Roberta
        } else {
            TextFlavor::Bert
        }
    }
}
