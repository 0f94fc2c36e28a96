//! NLVR2 data (`nlvr_dataset`, NLVR.py): two images, `pre_caption(sentence, 30)`, label True → 1.

use std::path::Path;
use std::sync::Arc;

use rand_chacha::ChaCha8Rng;
use serde::Deserialize;
use tch::Tensor;

use super::annotations::{self, item_err};
use super::config::{self, one_or_many, Resolver};
use super::images::{self, ImageAt, ImageTransform};
use super::loader::MapDataset;
use super::retrieval::FinetuneTransformSection;
use super::source::ImageRoot;
use super::text::{encode_batch, Padding};
use crate::data::caption::pre_caption;
use crate::data::tokenizer::TextTokenizer;
use crate::data::DataError;

/// The data keys of an NLVR2 task YAML, file names resolved.
#[derive(Debug, Clone, Deserialize)]
pub struct NlvrDataConfig {
    /// Train files.
    #[serde(deserialize_with = "one_or_many")]
    pub train_file: Vec<String>,
    /// Dev files.
    #[serde(default, deserialize_with = "one_or_many")]
    pub val_file: Vec<String>,
    /// Test files.
    #[serde(default, deserialize_with = "one_or_many")]
    pub test_file: Vec<String>,
    /// Folder (or URL prefix) of the images.
    pub image_root: String,
    /// Square image side.
    pub image_res: usize,
    /// `pre_caption` word limit.
    #[serde(default = "config::default_max_words")]
    pub max_words: usize,
    /// xvlm-only softening of the training transform (absent: the official `train_transform`).
    #[serde(default)]
    pub finetune_transform: FinetuneTransformSection,
}

impl NlvrDataConfig {
    /// Reads the keys from a task YAML value.
    pub fn from_yaml(
        value: &serde_yaml::Value,
        resolver: &Resolver<'_>,
    ) -> Result<Self, DataError> {
        let mut cfg: Self = config::parse_keys(value, "nlvr data config")?;
        cfg.train_file = resolver.resolve_all(&cfg.train_file);
        cfg.val_file = resolver.resolve_all(&cfg.val_file);
        cfg.test_file = resolver.resolve_all(&cfg.test_file);
        cfg.image_root = resolver.resolve(&cfg.image_root);
        Ok(cfg)
    }

    /// Reads the keys of a loaded task config (names resolved as its other files).
    pub fn from_task_config(cfg: &crate::config::TaskConfig) -> Result<Self, DataError> {
        Self::from_yaml(&config::task_value(cfg)?, &Resolver::Task(cfg))
    }

    /// Reads a task YAML file (names relative to its folder).
    pub fn load(path: &Path) -> Result<Self, DataError> {
        let base = path.parent().unwrap_or(Path::new("."));
        Self::from_yaml(&config::read_yaml(path)?, &Resolver::Base(base))
    }
}

/// One sentence about an image pair.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NlvrEntry {
    /// Left and right images.
    pub images: [ImageAt; 2],
    /// `pre_caption(sentence, max_words)`.
    pub sentence: String,
    /// 1 for 'True', 0 for 'False'.
    pub target: i64,
}

/// Reads `files` in order (an empty cleaned sentence is an error naming the item).
pub fn load_split(cfg: &NlvrDataConfig, files: &[String]) -> Result<Vec<NlvrEntry>, DataError> {
    let root = ImageRoot(cfg.image_root.clone());
    let mut out = Vec::new();
    for file in files {
        for (i, ann) in annotations::nlvr(file)?.into_iter().enumerate() {
            let sentence = pre_caption(&ann.sentence, cfg.max_words)
                .map_err(|_| item_err(file, i, "sentence is empty after pre_caption"))?;
            out.push(NlvrEntry {
                images: [
                    ImageAt::new(&root, &ann.images[0], file, i)?,
                    ImageAt::new(&root, &ann.images[1], file, i)?,
                ],
                sentence,
                target: i64::from(ann.label),
            });
        }
    }
    images::check_all_exist(out.iter().flat_map(|e| e.images.iter()))?;
    Ok(out)
}

/// A collated NLVR2 batch.
#[derive(Debug)]
pub struct NlvrBatch {
    /// `[B, 3, R, R]` left images.
    pub image0: Tensor,
    /// `[B, 3, R, R]` right images.
    pub image1: Tensor,
    /// `[B, L]` padding longest, no truncation (NLVR.py).
    pub text_ids: Tensor,
    /// `[B, L]`.
    pub text_atts: Tensor,
    /// `[B]` int64 labels.
    pub targets: Tensor,
}

/// Collates entries with their loaded image pairs.
pub fn collate(
    tok: &TextTokenizer,
    entries: &[&NlvrEntry],
    pairs: &[[Vec<f32>; 2]],
    res: usize,
) -> Result<NlvrBatch, DataError> {
    let texts: Vec<&str> = entries.iter().map(|e| e.sentence.as_str()).collect();
    let t = encode_batch(tok, &texts, Padding::Longest, None)?;
    let left: Vec<Vec<f32>> = pairs.iter().map(|p| p[0].clone()).collect();
    let right: Vec<Vec<f32>> = pairs.iter().map(|p| p[1].clone()).collect();
    let targets: Vec<i64> = entries.iter().map(|e| e.target).collect();
    Ok(NlvrBatch {
        image0: images::stack(&left, res),
        image1: images::stack(&right, res),
        text_ids: t.ids,
        text_atts: t.atts,
        targets: Tensor::from_slice(&targets),
    })
}

impl NlvrData {
    /// The training set of `cfg`: `train_transform` (or the config's `finetune_transform`).
    pub fn train(cfg: &NlvrDataConfig, tokenizer: Arc<TextTokenizer>) -> Result<Self, DataError> {
        Ok(Self {
            entries: Arc::new(load_split(cfg, &cfg.train_file)?),
            tokenizer,
            transform: cfg.finetune_transform.transform(cfg.image_res)?,
        })
    }

    /// An evaluation split of `cfg` (`test_transform`); `None` when the config names no file for it.
    pub fn eval(
        cfg: &NlvrDataConfig,
        files: &[String],
        tokenizer: Arc<TextTokenizer>,
    ) -> Result<Option<Self>, DataError> {
        if files.is_empty() {
            return Ok(None);
        }
        Ok(Some(Self {
            entries: Arc::new(load_split(cfg, files)?),
            tokenizer,
            transform: ImageTransform::test(cfg.image_res),
        }))
    }
}

/// An NLVR2 split as a map-style dataset.
pub struct NlvrData {
    /// The entries.
    pub entries: Arc<Vec<NlvrEntry>>,
    /// The tokenizer.
    pub tokenizer: Arc<TextTokenizer>,
    /// `train_transform` for training, `test_transform` for evaluation.
    pub transform: ImageTransform,
}

impl MapDataset for NlvrData {
    type Item = (usize, [Vec<f32>; 2]);
    type Batch = NlvrBatch;

    fn len(&self) -> usize {
        self.entries.len()
    }

    fn load(&self, index: usize, rng: &mut ChaCha8Rng) -> Result<Self::Item, DataError> {
        let e = &self.entries[index];
        let left = self.transform.load(rng, &e.images[0])?;
        let right = self.transform.load(rng, &e.images[1])?;
        Ok((index, [left, right]))
    }

    fn collate(&self, items: Vec<Self::Item>) -> Result<NlvrBatch, DataError> {
        let entries: Vec<&NlvrEntry> = items.iter().map(|(i, _)| &self.entries[*i]).collect();
        let pairs: Vec<[Vec<f32>; 2]> = items.iter().map(|(_, p)| p.clone()).collect();
        collate(&self.tokenizer, &entries, &pairs, self.transform.res())
    }
}
