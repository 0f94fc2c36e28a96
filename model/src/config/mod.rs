//! Official task YAML keys and model JSON configs (serde).
//!
//! Field names are the official keys, so the shipped `configs/*.yaml|json` (and the official repository's)
//! deserialise as they are. Official task YAMLs carry keys this crate does not use: those are kept in
//! `extra` and reported as warnings, never errors (DESIGN.md). Relative file names inside a task config
//! (`vision_config`, `text_config`, `text_encoder`) are resolved against the config's folder first, then the
//! working directory (the official scripts run from the repository root), then the config folder's parent.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::text::TextFlavor;
use de::{one_or_many, opt_number};

mod de;
mod streams;
mod text;
mod training;

pub use streams::{ImagesSection, RecordKeys, RegionsSection};
pub use text::TextConfig;
pub use training::{AcceleratorConfig, OptimizerConfig, SchedulerConfig, XvlmOptions};

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
    pub images: Option<ImagesSection>,
    /// Region-text training files/folders.
    #[serde(default, deserialize_with = "one_or_many")]
    pub train_file_regions: Vec<String>,
    /// Region stream settings (pre-training).
    #[serde(default)]
    pub regions: Option<RegionsSection>,

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
