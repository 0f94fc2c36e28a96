//! Official task YAML keys and model JSON configs (serde).
//!
//! Field names are the official keys, so the shipped `configs/*.yaml|json` (and the official repository's)
//! deserialise as they are. Official task YAMLs carry keys this crate does not use: those are kept in
//! `extra` and reported as warnings, never errors (DESIGN.md). Relative file names inside a task config
//! (`vision_config`, `text_config`, `text_encoder`) are resolved against the config's folder first, then the
//! working directory (the official scripts run from the repository root), then the config folder's parent.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Deserializer, Serialize};

use crate::text::TextFlavor;

/// A config file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config {path}: {source}")]
    Read {
        /// File.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// The file does not parse or a key has the wrong type.
    #[error("config {path} is invalid: {reason}")]
    Parse {
        /// File.
        path: PathBuf,
        /// The parser's message (names the key).
        reason: String,
    },
    /// A key has a value the model cannot be built with.
    #[error("config {path}: key `{key}`: {reason}")]
    Invalid {
        /// File.
        path: PathBuf,
        /// The offending key.
        key: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// A key the task needs is absent.
    #[error("config {path}: missing key `{key}`")]
    Missing {
        /// File.
        path: PathBuf,
        /// The absent key.
        key: &'static str,
    },
}

fn read(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// Accepts a number or a numeric string: PyYAML reads `1e-4` as a string, and official files contain it.
fn number<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Num {
        F(f64),
        S(String),
    }
    match Num::deserialize(d)? {
        Num::F(f) => Ok(f),
        Num::S(s) => s
            .trim()
            .parse()
            .map_err(|_| serde::de::Error::custom(format!("expected a number, got {s:?}"))),
    }
}

fn opt_number<'de, D: Deserializer<'de>>(d: D) -> Result<Option<f64>, D::Error> {
    #[derive(Deserialize)]
    struct W(#[serde(deserialize_with = "number")] f64);
    Ok(Option::<W>::deserialize(d)?.map(|w| w.0))
}

/// A file list that official configs write either as one string or as a list.
fn one_or_many<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(match Option::<OneOrMany>::deserialize(d)? {
        None => vec![],
        Some(OneOrMany::One(s)) => vec![s],
        Some(OneOrMany::Many(v)) => v,
    })
}

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

/// `images:` of a pre-training config (the image-text stream).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ImagesConfig {
    /// JSON key holding the image (base64 or path).
    #[serde(default = "default_image_key")]
    pub image_key: String,
    /// True: the image key holds a path; False: base64 bytes.
    #[serde(default)]
    pub is_image_rpath: bool,
    /// JSON key holding the caption(s).
    #[serde(default = "default_caption_key")]
    pub caption_key: String,
    /// Captions are already space-separated word pieces.
    #[serde(default)]
    pub tokenized: bool,
    /// Pairs per GPU.
    pub batch_size: usize,
    /// Loader workers.
    #[serde(default)]
    pub num_workers: usize,
    /// xvlm-only: RandomResizedCrop area range (official `pretrain_transform`: [0.2, 1.0]).
    #[serde(default = "default_crop_scale")]
    pub crop_scale: (f64, f64),
    /// xvlm-only: RandomHorizontalFlip (official: True).
    #[serde(default = "default_true")]
    pub hflip: bool,
    /// xvlm-only: RandomAugment(2, 7) over the ten ops (official: True).
    #[serde(default = "default_true")]
    pub rand_augment: bool,
}

/// `regions:` of a pre-training config (the region-text stream).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RegionsConfig {
    /// JSON key holding the image.
    #[serde(default = "default_image_key")]
    pub image_key: String,
    /// True: the image key holds a path.
    #[serde(default)]
    pub is_image_rpath: bool,
    /// JSON key holding captions (must be "caption").
    #[serde(default = "default_caption_key")]
    pub caption_key: String,
    /// Captions are already word pieces.
    #[serde(default)]
    pub tokenized: bool,
    /// Probability that an iteration also runs a region step.
    #[serde(deserialize_with = "number")]
    pub iter_perc: f64,
    /// Texts per region batch.
    pub batch_size: usize,
    /// Images per region batch at most.
    pub max_images: usize,
    /// Texts per image at most.
    pub max_regions: usize,
    /// A cropped box is kept if more than this fraction of it stays in the crop.
    #[serde(deserialize_with = "number")]
    pub min_perc_in_image: f64,
    /// Loader workers.
    #[serde(default)]
    pub num_workers: usize,
    /// Skip the flip when a caption says "left"/"right" (absent in the pre-training configs → False).
    #[serde(default)]
    pub careful_hflip: bool,
}

fn default_crop_scale() -> (f64, f64) {
    (0.2, 1.0)
}
fn default_true() -> bool {
    true
}
fn default_image_key() -> String {
    "binary".into()
}
fn default_caption_key() -> String {
    "caption".into()
}

/// `optimizer:`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OptimizerConfig {
    /// Always `adamW` in the official configs.
    pub opt: String,
    /// Base learning rate.
    #[serde(deserialize_with = "number")]
    pub lr: f64,
    /// Decoupled weight decay.
    #[serde(deserialize_with = "number")]
    pub weight_decay: f64,
    /// Learning-rate multiplier of the freshly initialised parameters.
    #[serde(default, deserialize_with = "opt_number")]
    pub lr_mult: Option<f64>,
}

/// `schedular:` (sic, the official key).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SchedulerConfig {
    /// Always `linear`.
    pub sched: String,
    /// Base learning rate.
    #[serde(deserialize_with = "number")]
    pub lr: f64,
    /// Epochs.
    #[serde(deserialize_with = "number")]
    pub epochs: f64,
    /// An integer is absolute; a float in [0, 1) a fraction of the total steps.
    #[serde(deserialize_with = "number")]
    pub num_warmup_steps: f64,
    /// Total steps when given (else epochs x steps per epoch).
    #[serde(default, deserialize_with = "opt_number")]
    pub num_training_steps: Option<f64>,
}

/// `accelerator:` (upper-case official keys).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[allow(non_snake_case)]
pub struct AcceleratorConfig {
    /// Unused by the official code.
    #[serde(default)]
    pub SYNCBN: bool,
    /// apex level: O0 (fp32), O1 (autocast), O2.
    #[serde(default = "default_opt_level")]
    pub FP16_OPT_LEVEL: String,
    /// `dynamic` or a number.
    #[serde(default)]
    pub FP16_LOSS_SCALE: Option<serde_yaml::Value>,
    /// Seed the accelerator re-seeds with.
    #[serde(default)]
    pub RNG_SEED: Option<u64>,
    /// Gradient accumulation (1 in every official config).
    #[serde(default = "default_accumulate")]
    pub GRAD_ACCUMULATE_STEPS: usize,
    /// Max global grad norm.
    #[serde(default, deserialize_with = "opt_number")]
    pub CLIP_GRAD_NORM: Option<f64>,
}

/// `xvlm:` — switches that are not in the official configs (every default is the official behaviour).
/// A job sets them through `overrides: {xvlm: {...}}`, e.g. for the data-parallel check with
/// per-sample losses only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct XvlmOptions {
    /// Pre-training computes and back-propagates the ITC loss (its ranks exchange features).
    #[serde(default = "yes")]
    pub itc: bool,
    /// Pre-training computes and back-propagates the ITM loss (its negatives depend on the batch).
    #[serde(default = "yes")]
    pub itm: bool,
    /// Train-mode forward (dropout, drop-path); off makes a step a pure function of weights and data.
    #[serde(default = "yes")]
    pub dropout: bool,
}

impl Default for XvlmOptions {
    fn default() -> Self {
        XvlmOptions {
            itc: true,
            itm: true,
            dropout: true,
        }
    }
}

fn yes() -> bool {
    true
}

fn default_opt_level() -> String {
    "O0".into()
}
fn default_accumulate() -> usize {
    1
}

/// An official task YAML (`Pretrain_XVLM_base_4m.yaml`, `Retrieval_coco.yaml`, …): the model-building keys
/// typed, everything else in `extra`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TaskConfig {
    /// Image-text training files/folders.
    #[serde(default, deserialize_with = "one_or_many")]
    pub train_file: Vec<String>,
    /// Samples per epoch of the image-text stream.
    #[serde(default)]
    pub train_dataset_size: Option<u64>,
    /// Image-text stream settings (pre-training).
    #[serde(default)]
    pub images: Option<ImagesConfig>,
    /// Region-text training files/folders.
    #[serde(default, deserialize_with = "one_or_many")]
    pub train_file_regions: Vec<String>,
    /// Region stream settings (pre-training).
    #[serde(default)]
    pub regions: Option<RegionsConfig>,

    /// CLIP ViT backbone.
    #[serde(default)]
    pub use_clip_vit: bool,
    /// Swin backbone (neither flag → DeiT).
    #[serde(default)]
    pub use_swin: bool,
    /// Backbone JSON.
    #[serde(default)]
    pub vision_config: Option<String>,
    /// Input image side.
    pub image_res: i64,
    /// Final-stage stride (32 Swin, 16 DeiT, the JSON's patch size for CLIP).
    pub patch_size: i64,

    /// RoBERTa text backbone.
    #[serde(default)]
    pub use_roberta: bool,
    /// Text JSON.
    pub text_config: String,
    /// Folder with the vocabulary (and the HF weights).
    #[serde(default)]
    pub text_encoder: Option<String>,
    /// Fixture-only convenience key naming the vocabulary file.
    #[serde(default)]
    pub vocab: Option<String>,
    /// X-VLM-large: load BERT-large layers 13, 15, … into the cross layers.
    #[serde(default, rename = "load_bertL_by_sep")]
    pub load_bert_l_by_sep: bool,

    /// Whole-image captions in region batches also get a bbox loss.
    #[serde(default)]
    pub calc_image_bbox_loss: bool,
    /// ITC projection size.
    #[serde(default)]
    pub embed_dim: Option<i64>,
    /// Initial temperature.
    #[serde(default, deserialize_with = "opt_number")]
    pub temp: Option<f64>,

    /// Words kept by pre_caption.
    #[serde(default)]
    pub max_words: Option<usize>,
    /// Tokens per text ([CLS] included).
    #[serde(default)]
    pub max_tokens: Option<usize>,
    /// MLM masking probability.
    #[serde(default, deserialize_with = "opt_number")]
    pub mask_prob: Option<f64>,
    /// Masked positions per text at most.
    #[serde(default)]
    pub max_masks: Option<usize>,
    /// Expand masks to whole words.
    #[serde(default)]
    pub mask_whole_word: Option<bool>,
    /// Probability of a span mask.
    #[serde(default, deserialize_with = "opt_number")]
    pub skipgram_prb: Option<f64>,
    /// Longest span.
    #[serde(default)]
    pub skipgram_size: Option<usize>,

    /// Pre-training: save every this many iterations.
    #[serde(default)]
    pub ckpt_frequent_step: Option<u64>,
    /// Pre-training: save every this many epochs.
    #[serde(default)]
    pub ckpt_frequent: Option<u64>,
    /// Optimizer settings.
    #[serde(default)]
    pub optimizer: Option<OptimizerConfig>,
    /// Schedule settings (`schedular`, sic).
    #[serde(default)]
    pub schedular: Option<SchedulerConfig>,
    /// Mixed precision and clipping.
    #[serde(default)]
    pub accelerator: Option<AcceleratorConfig>,
    /// This implementation's own switches (`xvlm:`; absent from official configs, defaults = official).
    #[serde(default)]
    pub xvlm: XvlmOptions,

    /// Keys the model core does not type (the fine-tuning data keys, read by the tasks, and keys no
    /// task reads, reported by [`TaskConfig::unknown_keys`]).
    #[serde(flatten)]
    pub extra: BTreeMap<String, serde_yaml::Value>,

    /// Folder of the file this was read from (for resolving relative names).
    #[serde(skip)]
    pub source_dir: PathBuf,
    /// The file this was read from.
    #[serde(skip)]
    pub source: PathBuf,
}

impl TaskConfig {
    /// Reads a task YAML; unknown keys are logged as warnings.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let cfg = Self::parse(&read(path)?, path)?;
        for key in cfg.unknown_keys() {
            tracing::warn!(config = %path.display(), key, "unknown key in task config (ignored)");
        }
        Ok(cfg)
    }

    /// Reads a task YAML and applies `overrides` (a mapping, e.g. a job's `overrides:`) on top: nested
    /// mappings merge key by key, any other value replaces. Unknown keys are logged as warnings.
    pub fn load_with_overrides(
        path: &Path,
        overrides: &serde_yaml::Value,
    ) -> Result<Self, ConfigError> {
        let parse_err = |reason: String| ConfigError::Parse {
            path: path.to_path_buf(),
            reason,
        };
        let mut base: serde_yaml::Value =
            serde_yaml::from_str(&read(path)?).map_err(|e| parse_err(e.to_string()))?;
        merge_yaml(&mut base, overrides);
        let cfg = Self::from_value(base, path)?;
        for key in cfg.unknown_keys() {
            tracing::warn!(config = %path.display(), key, "unknown key in task config (ignored)");
        }
        Ok(cfg)
    }

    /// Parses YAML text; `path` names the source in errors and anchors relative file names.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let value: serde_yaml::Value =
            serde_yaml::from_str(text).map_err(|e| ConfigError::Parse {
                path: path.to_path_buf(),
                reason: e.to_string(),
            })?;
        Self::from_value(value, path)
    }

    fn from_value(value: serde_yaml::Value, path: &Path) -> Result<Self, ConfigError> {
        let mut cfg: TaskConfig =
            serde_yaml::from_value(value).map_err(|e| ConfigError::Parse {
                path: path.to_path_buf(),
                reason: e.to_string(),
            })?;
        cfg.source = path.to_path_buf();
        cfg.source_dir = path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        Ok(cfg)
    }

    /// Keys present in the file that no task reads: neither typed here nor in the shared key table
    /// ([`xvlm_proto::task_keys`], which the coordinator also checks job overrides against; a key a
    /// task starts reading is added there).
    pub fn unknown_keys(&self) -> Vec<&str> {
        self.extra
            .keys()
            .map(String::as_str)
            .filter(|k| !xvlm_proto::task_keys::is_known_key(k))
            .collect()
    }

    /// Resolves a file name from the config: absolute as is; else the first that exists of the config's
    /// folder, the working directory, the config folder's parent; else the config-folder form.
    pub fn resolve(&self, name: &str) -> PathBuf {
        let p = Path::new(name);
        if p.is_absolute() {
            return p.to_path_buf();
        }
        let candidates = [
            self.source_dir.join(p),
            p.to_path_buf(),
            self.source_dir.join("..").join(p),
        ];
        candidates
            .iter()
            .find(|c| c.exists())
            .cloned()
            .unwrap_or_else(|| self.source_dir.join(p))
    }

    /// The text JSON named by `text_config`, with the RoBERTa flag cross-checked.
    pub fn load_text_config(&self) -> Result<TextConfig, ConfigError> {
        let path = self.resolve(&self.text_config);
        let cfg = TextConfig::load(&path)?;
        let roberta = cfg.flavor() == TextFlavor::Roberta;
        if roberta != self.use_roberta {
            return Err(ConfigError::Invalid {
                path: self.source.clone(),
                key: "use_roberta",
                reason: format!(
                    "is {} but {} describes a {} model",
                    self.use_roberta,
                    path.display(),
                    if roberta { "RoBERTa" } else { "BERT" }
                ),
            });
        }
        Ok(cfg)
    }

    /// The backbone JSON path (`vision_config`).
    pub fn vision_config_path(&self) -> Result<PathBuf, ConfigError> {
        self.vision_config
            .as_deref()
            .map(|v| self.resolve(v))
            .ok_or(ConfigError::Missing {
                path: self.source.clone(),
                key: "vision_config",
            })
    }

    /// `embed_dim`, required by models with ITC.
    pub fn require_embed_dim(&self) -> Result<i64, ConfigError> {
        self.embed_dim.ok_or(ConfigError::Missing {
            path: self.source.clone(),
            key: "embed_dim",
        })
    }

    /// `temp`, required by models with ITC.
    pub fn require_temp(&self) -> Result<f64, ConfigError> {
        self.temp.ok_or(ConfigError::Missing {
            path: self.source.clone(),
            key: "temp",
        })
    }

    /// The folder holding the vocabulary (`text_encoder`, or the folder of `vocab`).
    pub fn vocab_dir(&self) -> Option<PathBuf> {
        if let Some(v) = &self.vocab {
            return self.resolve(v).parent().map(Path::to_path_buf);
        }
        self.text_encoder.as_deref().map(|t| self.resolve(t))
    }
}

/// The fine-tuning keys of an official task config that training and evaluation read (the official
/// scripts read them from the YAML; they are untyped in [`TaskConfig`]).
#[derive(Debug, Clone, PartialEq)]
pub struct FinetuneKeys {
    /// `batch_size_train`: per-rank training batch.
    pub batch_size_train: usize,
    /// `batch_size_test`: per-rank evaluation batch of images (or examples).
    pub batch_size_test: usize,
    /// `batch_size_test_text`: evaluation batch of texts (retrieval; defaults to `batch_size_test`).
    pub batch_size_test_text: usize,
    /// `k_test`: candidates re-scored by ITM (retrieval, VQA).
    pub k_test: Option<usize>,
}

impl FinetuneKeys {
    /// Reads the keys from `task` (`batch_size` stands in for a missing `batch_size_train` /
    /// `batch_size_test`, as the NLVR2 and grounding scripts read it); a missing batch size, or any
    /// key not a positive integer, is an error naming the file and key.
    pub fn from_task(task: &TaskConfig) -> Result<Self, ConfigError> {
        let read = |key: &'static str| -> Result<Option<usize>, ConfigError> {
            match task.extra.get(key) {
                None => Ok(None),
                Some(v) => v
                    .as_u64()
                    .filter(|&n| n > 0)
                    .map(|n| Some(n as usize))
                    .ok_or_else(|| ConfigError::Invalid {
                        path: task.source.clone(),
                        key,
                        reason: format!("must be a positive integer, got {v:?}"),
                    }),
            }
        };
        // Retrieval.py and VQA.py read `batch_size_train` / `batch_size_test`; NLVR.py, Grounding.py
        // and Grounding_bbox.py read one `batch_size` for both.
        let batch = |key: &'static str| match read(key)? {
            Some(n) => Ok(n),
            None => read("batch_size")?.ok_or_else(|| ConfigError::Missing {
                path: task.source.clone(),
                key,
            }),
        };
        let batch_size_test = batch("batch_size_test")?;
        Ok(Self {
            batch_size_train: batch("batch_size_train")?,
            batch_size_test,
            batch_size_test_text: read("batch_size_test_text")?.unwrap_or(batch_size_test),
            k_test: read("k_test")?,
        })
    }
}

/// Merges `over` into `base`: mappings key by key (recursively), anything else replaced.
fn merge_yaml(base: &mut serde_yaml::Value, over: &serde_yaml::Value) {
    match (base, over) {
        (serde_yaml::Value::Mapping(b), serde_yaml::Value::Mapping(o)) => {
            for (k, v) in o {
                match b.get_mut(k) {
                    Some(slot) => merge_yaml(slot, v),
                    None => {
                        b.insert(k.clone(), v.clone());
                    }
                }
            }
        }
        (b, o) => *b = o.clone(),
    }
}

/// The project's `configs/` folder (official-format task and model configs).
pub fn configs_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every shipped task YAML parses, has no unknown keys and resolves its model JSONs.
    #[test]
    fn every_task_yaml_in_configs_parses() {
        let mut seen = 0;
        for entry in std::fs::read_dir(configs_dir()).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().and_then(|e| e.to_str()) != Some("yaml") {
                continue;
            }
            let cfg = TaskConfig::load(&path).unwrap_or_else(|e| panic!("{e}"));
            assert!(
                cfg.unknown_keys().is_empty(),
                "{}: {:?}",
                path.display(),
                cfg.unknown_keys()
            );
            let text = cfg.load_text_config().unwrap_or_else(|e| panic!("{e}"));
            assert!(text.fusion_layer < text.num_hidden_layers);
            assert!(
                cfg.vision_config_path().unwrap().exists(),
                "{}",
                path.display()
            );
            seen += 1;
        }
        assert!(
            seen >= 7,
            "expected the pre-training and fine-tuning configs"
        );
    }

    /// The 4M config carries the official values (XVLM-REFERENCE.md §1.2, §2.1, §4).
    #[test]
    fn base_4m_values() {
        let cfg = TaskConfig::load(&configs_dir().join("Pretrain_XVLM_base_4m.yaml")).unwrap();
        assert!(cfg.use_swin && !cfg.use_clip_vit && !cfg.use_roberta);
        assert_eq!(
            (cfg.image_res, cfg.patch_size, cfg.embed_dim),
            (224, 32, Some(256))
        );
        assert_eq!(cfg.temp, Some(0.07));
        assert_eq!((cfg.max_tokens, cfg.max_masks), (Some(40), Some(8)));
        let regions = cfg.regions.as_ref().unwrap();
        assert_eq!(
            (regions.batch_size, regions.max_images, regions.iter_perc),
            (128, 48, 0.5)
        );
        let opt = cfg.optimizer.as_ref().unwrap();
        assert_eq!(
            (opt.lr, opt.weight_decay, opt.lr_mult),
            (1e-4, 0.01, Some(2.0))
        );
        let sched = cfg.schedular.as_ref().unwrap();
        assert_eq!((sched.epochs, sched.num_warmup_steps), (41.0, 2500.0));
        assert_eq!(cfg.accelerator.as_ref().unwrap().FP16_OPT_LEVEL, "O1");
    }

    /// Every text JSON parses with the official keys; BERT and RoBERTa are told apart.
    #[test]
    fn text_jsons_parse() {
        let bert = TextConfig::load(&configs_dir().join("config_bert.json")).unwrap();
        assert_eq!(
            (bert.vocab_size, bert.pad_token_id, bert.fusion_layer),
            (30522, 0, 6)
        );
        assert_eq!(bert.flavor(), TextFlavor::Bert);
        let roberta = TextConfig::load(&configs_dir().join("config_roberta.json")).unwrap();
        assert_eq!((roberta.vocab_size, roberta.pad_token_id), (50265, 1));
        assert_eq!(roberta.layer_norm_eps, 1e-5);
        assert_eq!(roberta.flavor(), TextFlavor::Roberta);
    }

    /// Unknown keys are kept and reported (warnings), not rejected; PyYAML-style `1e-4` strings parse.
    #[test]
    fn unknown_keys_are_reported_not_rejected() {
        let yaml = "image_res: 64\npatch_size: 32\ntext_config: t.json\nsome_new_key: 3\n\
                    optimizer: {opt: adamW, lr: '1e-4', weight_decay: 0.01}\n";
        let cfg = TaskConfig::parse(yaml, Path::new("x/task.yaml")).unwrap();
        assert_eq!(cfg.unknown_keys(), vec!["some_new_key"]);
        assert_eq!(cfg.optimizer.unwrap().lr, 1e-4);
    }

    /// Overrides patch nested keys and leave their siblings alone.
    #[test]
    fn overrides_merge_into_the_file() {
        let over: serde_yaml::Value =
            serde_yaml::from_str("images: {batch_size: 16}\nembed_dim: 64\n").unwrap();
        let cfg = TaskConfig::load_with_overrides(
            &configs_dir().join("Pretrain_XVLM_base_4m.yaml"),
            &over,
        )
        .unwrap();
        let images = cfg.images.unwrap();
        assert_eq!((images.batch_size, images.num_workers), (16, 4));
        assert_eq!(cfg.embed_dim, Some(64));
    }

    /// `xvlm:` is absent from the official files (official behaviour), set through overrides, and a
    /// misspelt switch is an error naming it.
    #[test]
    fn xvlm_switches_default_to_official_and_override() {
        let path = configs_dir().join("Pretrain_XVLM_base_4m.yaml");
        let cfg = TaskConfig::load(&path).unwrap();
        assert_eq!(cfg.xvlm, XvlmOptions::default());
        assert!(cfg.xvlm.itc && cfg.xvlm.itm && cfg.xvlm.dropout);
        let over: serde_yaml::Value =
            serde_yaml::from_str("xvlm: {itc: false, dropout: false}").unwrap();
        let cfg = TaskConfig::load_with_overrides(&path, &over).unwrap();
        assert_eq!(
            cfg.xvlm,
            XvlmOptions {
                itc: false,
                itm: true,
                dropout: false
            }
        );
        assert!(!cfg.unknown_keys().contains(&"xvlm"));
        let bad: serde_yaml::Value = serde_yaml::from_str("xvlm: {itx: false}").unwrap();
        let err = TaskConfig::load_with_overrides(&path, &bad)
            .unwrap_err()
            .to_string();
        assert!(err.contains("itx"), "{err}");
    }

    /// Every key this struct types, at the top and inside its sections, is in the shared key table
    /// the coordinator checks overrides against: a key typed here without an entry there would be
    /// refused as an override although the model reads it.
    #[test]
    fn typed_keys_are_in_the_shared_key_table() {
        let cfg = TaskConfig::load(&configs_dir().join("Pretrain_XVLM_base_4m.yaml")).unwrap();
        let value = serde_yaml::to_value(&cfg).unwrap();
        let serde_yaml::Value::Mapping(top) = value else {
            panic!("a task config serialises to a mapping")
        };
        let mut checked = 0;
        for (key, inner) in &top {
            let key = key.as_str().unwrap();
            assert!(
                xvlm_proto::task_keys::lookup(&[key]).is_some(),
                "`{key}` is typed in TaskConfig but missing from xvlm_proto::task_keys"
            );
            checked += 1;
            if let serde_yaml::Value::Mapping(section) = inner {
                for inner_key in section.keys() {
                    let inner_key = inner_key.as_str().unwrap();
                    assert!(
                        xvlm_proto::task_keys::lookup(&[key, inner_key]).is_some(),
                        "`{key}.{inner_key}` is typed in TaskConfig but missing from xvlm_proto::task_keys"
                    );
                    checked += 1;
                }
            }
        }
        // Every section of the 4M config is present, so its nested keys were all seen.
        for section in [
            "images",
            "regions",
            "optimizer",
            "schedular",
            "accelerator",
            "xvlm",
        ] {
            assert!(
                top.get(section).is_some_and(serde_yaml::Value::is_mapping),
                "{section}"
            );
        }
        assert!(checked > 60, "only {checked} keys checked");
    }

    /// A fusion layer past the last layer is refused with the key named.
    #[test]
    fn bad_fusion_layer_is_refused() {
        let mut cfg = TextConfig::load(&configs_dir().join("config_bert.json")).unwrap();
        cfg.fusion_layer = 13;
        let err = cfg.validate(Path::new("c.json")).unwrap_err().to_string();
        assert!(err.contains("fusion_layer"), "{err}");
    }
}
