//! VQA data (`vqa_dataset`, `vqa_collate_fn`, VQA.py): train items with the dataset's careful flip,
//! distinct answers + eos with their weights; test items with `question_id`; the answer list.

use std::path::Path;
use std::sync::Arc;

use rand::Rng;
use rand_chacha::ChaCha8Rng;
use serde::Deserialize;
use tch::Tensor;

use super::annotations::{self, VqaAnn, VqaOrigin};
use super::config::{self, one_or_many, Resolver};
use super::images::{self, ImageAt, ImageTransform};
use super::loader::MapDataset;
use super::source::ImageRoot;
use super::text::{encode_batch, Padding, TextBatch};
use crate::data::caption::pre_question;
use crate::data::tokenizer::TextTokenizer;
use crate::data::transform::TrainTransform;
use crate::data::DataError;

/// Question word limit of the train split (`max_ques_words` default).
pub const TRAIN_QUESTION_WORDS: usize = 30;
/// Question word limit of the test split (`vqa_dataset` sets 50 for `split='test'`).
pub const TEST_QUESTION_WORDS: usize = 50;

fn default_eos() -> String {
    "[SEP]".into()
}

/// The data keys of a VQA task YAML, file names resolved.
#[derive(Debug, Clone, Deserialize)]
pub struct VqaDataConfig {
    /// Train files (vqa_train, vqa_val, vg_qa), concatenated in order.
    #[serde(deserialize_with = "one_or_many")]
    pub train_file: Vec<String>,
    /// Test files.
    #[serde(default, deserialize_with = "one_or_many")]
    pub test_file: Vec<String>,
    /// `answer_list.json`.
    #[serde(default)]
    pub answer_list: Option<String>,
    /// Root of VQA (COCO) images.
    pub vqa_root: String,
    /// Root of Visual Genome images.
    #[serde(default)]
    pub vg_root: Option<String>,
    /// Root of GQA images.
    #[serde(default)]
    pub gqa_root: Option<String>,
    /// Square image side.
    pub image_res: usize,
    /// Question truncation in training.
    #[serde(default = "config::default_max_tokens")]
    pub max_tokens: usize,
    /// Appended to every answer.
    #[serde(default = "default_eos")]
    pub eos: String,
}

impl VqaDataConfig {
    /// Reads the keys from a task YAML value.
    pub fn from_yaml(
        value: &serde_yaml::Value,
        resolver: &Resolver<'_>,
    ) -> Result<Self, DataError> {
        let mut cfg: Self = config::parse_keys(value, "vqa data config")?;
        cfg.train_file = resolver.resolve_all(&cfg.train_file);
        cfg.test_file = resolver.resolve_all(&cfg.test_file);
        cfg.answer_list = cfg.answer_list.map(|f| resolver.resolve(&f));
        cfg.vqa_root = resolver.resolve(&cfg.vqa_root);
        cfg.vg_root = cfg.vg_root.map(|f| resolver.resolve(&f));
        cfg.gqa_root = cfg.gqa_root.map(|f| resolver.resolve(&f));
        Ok(cfg)
    }

    /// Reads a task YAML file (names relative to its folder).
    pub fn load(path: &Path) -> Result<Self, DataError> {
        let base = path.parent().unwrap_or(Path::new("."));
        Self::from_yaml(&config::read_yaml(path)?, &Resolver::Base(base))
    }

    fn root(&self, origin: VqaOrigin) -> Option<ImageRoot> {
        match origin {
            VqaOrigin::Vqa => Some(ImageRoot(self.vqa_root.clone())),
            VqaOrigin::Vg => self.vg_root.clone().map(ImageRoot),
            VqaOrigin::Gqa => self.gqa_root.clone().map(ImageRoot),
        }
    }
}

/// One question.
#[derive(Debug, Clone, PartialEq)]
pub struct VqaEntry {
    /// Its image.
    pub image: ImageAt,
    /// `pre_question(question, 30 | 50)`.
    pub question: String,
    /// Train: distinct answers + eos, in order of first appearance (VG: the one answer).
    pub answers: Vec<String>,
    /// Train: `count / len(answers)` per distinct answer (VG: 0.5), as float32.
    pub weights: Vec<f32>,
    /// Whether the raw question or a raw answer contains 'left' / 'right' (careful_hflip: no flip).
    pub mentions_side: bool,
    /// Test: `question_id`.
    pub question_id: Option<i64>,
}

fn mentions_side(s: &str) -> bool {
    s.contains("left") || s.contains("right")
}

/// Distinct answers with the official weights: `1/len` added per occurrence in float64, then float32.
pub fn answer_weights(answers: &[String]) -> (Vec<String>, Vec<f32>) {
    let share = 1.0 / answers.len() as f64;
    let mut distinct: Vec<String> = Vec::new();
    let mut weights: Vec<f64> = Vec::new();
    for a in answers {
        match distinct.iter().position(|d| d == a) {
            Some(p) => weights[p] += share,
            None => {
                distinct.push(a.clone());
                weights.push(share);
            }
        }
    }
    (distinct, weights.into_iter().map(|w| w as f32).collect())
}

fn entry(
    cfg: &VqaDataConfig,
    file: &str,
    index: usize,
    ann: VqaAnn,
    train: bool,
) -> Result<VqaEntry, DataError> {
    let root = cfg.root(ann.origin).ok_or_else(|| {
        annotations::item_err(
            file,
            index,
            format!("no image root configured for {:?} items", ann.origin),
        )
    })?;
    let side = mentions_side(&ann.question) || ann.answers.iter().any(|a| mentions_side(a));
    let (answers, weights) = match (train, ann.origin) {
        (false, _) => (Vec::new(), Vec::new()),
        (true, VqaOrigin::Vg) => (ann.answers.clone(), vec![0.5]),
        (true, _) => answer_weights(&ann.answers),
    };
    let words = if train {
        TRAIN_QUESTION_WORDS
    } else {
        TEST_QUESTION_WORDS
    };
    Ok(VqaEntry {
        image: ImageAt::new(&root, &ann.image, file, index)?,
        question: pre_question(&ann.question, words),
        answers: answers.into_iter().map(|a| a + &cfg.eos).collect(),
        weights,
        mentions_side: side,
        question_id: ann.question_id,
    })
}

/// Reads the train split (all `train_file`s in order).
pub fn load_train(cfg: &VqaDataConfig) -> Result<Vec<VqaEntry>, DataError> {
    let mut out = Vec::new();
    for file in &cfg.train_file {
        for (i, ann) in annotations::vqa_train(file)?.into_iter().enumerate() {
            out.push(entry(cfg, file, i, ann, true)?);
        }
    }
    images::check_all_exist(out.iter().map(|e| &e.image))?;
    Ok(out)
}

/// Reads the test split (all `test_file`s in order).
pub fn load_test(cfg: &VqaDataConfig) -> Result<Vec<VqaEntry>, DataError> {
    let mut out = Vec::new();
    for file in &cfg.test_file {
        for (i, ann) in annotations::vqa_test(file)?.into_iter().enumerate() {
            out.push(entry(cfg, file, i, ann, false)?);
        }
    }
    images::check_all_exist(out.iter().map(|e| &e.image))?;
    Ok(out)
}

/// The answer list with eos appended (the candidates of `rank_answer`).
pub fn load_answer_list(cfg: &VqaDataConfig) -> Result<Vec<String>, DataError> {
    let file = cfg
        .answer_list
        .as_deref()
        .ok_or_else(|| DataError::Config("vqa: `answer_list` is not configured".into()))?;
    Ok(annotations::answer_list(file)?
        .into_iter()
        .map(|a| a + &cfg.eos)
        .collect())
}

/// The answer list tokenized as VQA.evaluation: `[CLS] pieces [SEP]`, padding longest.
pub fn encode_answer_list(tok: &TextTokenizer, answers: &[String]) -> Result<TextBatch, DataError> {
    encode_batch(tok, answers, Padding::Longest, None)
}

/// One loaded train item.
#[derive(Debug)]
pub struct VqaTrainSample {
    /// `[3, R, R]`.
    pub image: Vec<f32>,
    /// Dataset index.
    pub index: usize,
    /// Whether the image was mirrored.
    pub flipped: bool,
}

/// Whether the dataset mirrors an item for the given `random.random()` draw (careful_hflip).
pub fn flips(entry: &VqaEntry, draw: f64) -> bool {
    draw < 0.5 && !entry.mentions_side
}

/// Loads a train item's image: decode, mirror if [`flips`], then `transform`.
pub fn load_train_image(
    entry: &VqaEntry,
    draw: f64,
    transform: &ImageTransform,
    rng: &mut ChaCha8Rng,
) -> Result<(Vec<f32>, bool), DataError> {
    let mut img = entry.image.decode()?;
    let flipped = flips(entry, draw);
    if flipped {
        img.hflip();
    }
    Ok((transform.apply(rng, &img), flipped))
}

/// A collated VQA train batch (`vqa_collate_fn` + VQA.train tokenization).
#[derive(Debug)]
pub struct VqaTrainBatch {
    /// `[B, 3, R, R]`.
    pub image: Tensor,
    /// `[B, Lq]` questions: padding longest, truncated to `max_tokens`.
    pub text_ids: Tensor,
    /// `[B, Lq]`.
    pub text_atts: Tensor,
    /// `[A, La]` all answers of the batch, flattened in item order (padding longest, no truncation).
    pub answer_ids: Tensor,
    /// `[A, La]`.
    pub answer_atts: Tensor,
    /// `[A]` float32 answer weights.
    pub weights: Tensor,
    /// Answers per question (`n`).
    pub k: Vec<i64>,
}

/// Collates train items (entries in batch order with their images).
pub fn collate_train(
    tok: &TextTokenizer,
    entries: &[&VqaEntry],
    images_chw: &[Vec<f32>],
    res: usize,
    max_tokens: usize,
) -> Result<VqaTrainBatch, DataError> {
    let questions: Vec<&str> = entries.iter().map(|e| e.question.as_str()).collect();
    let answers: Vec<&str> = entries
        .iter()
        .flat_map(|e| e.answers.iter().map(String::as_str))
        .collect();
    let weights: Vec<f32> = entries
        .iter()
        .flat_map(|e| e.weights.iter().copied())
        .collect();
    let q = encode_batch(tok, &questions, Padding::Longest, Some(max_tokens))?;
    let a = encode_batch(tok, &answers, Padding::Longest, None)?;
    Ok(VqaTrainBatch {
        image: images::stack(images_chw, res),
        text_ids: q.ids,
        text_atts: q.atts,
        answer_ids: a.ids,
        answer_atts: a.atts,
        weights: Tensor::from_slice(&weights),
        k: entries.iter().map(|e| e.answers.len() as i64).collect(),
    })
}

/// A collated VQA test batch.
#[derive(Debug)]
pub struct VqaTestBatch {
    /// `[B, 3, R, R]`.
    pub image: Tensor,
    /// `[B, Lq]` questions: padding longest, no truncation (VQA.evaluation).
    pub text_ids: Tensor,
    /// `[B, Lq]`.
    pub text_atts: Tensor,
    /// `[B]` int64.
    pub question_id: Tensor,
}

/// Collates test items.
pub fn collate_test(
    tok: &TextTokenizer,
    entries: &[&VqaEntry],
    images_chw: &[Vec<f32>],
    res: usize,
) -> Result<VqaTestBatch, DataError> {
    let questions: Vec<&str> = entries.iter().map(|e| e.question.as_str()).collect();
    let q = encode_batch(tok, &questions, Padding::Longest, None)?;
    let ids: Vec<i64> = entries
        .iter()
        .map(|e| e.question_id.unwrap_or(-1))
        .collect();
    Ok(VqaTestBatch {
        image: images::stack(images_chw, res),
        text_ids: q.ids,
        text_atts: q.atts,
        question_id: Tensor::from_slice(&ids),
    })
}

/// The VQA train split as a map-style dataset (`train_transform_wohflip`, the dataset's own flip).
pub struct VqaTrainData {
    /// The questions.
    pub entries: Arc<Vec<VqaEntry>>,
    /// The tokenizer.
    pub tokenizer: Arc<TextTokenizer>,
    /// The image transform.
    pub transform: ImageTransform,
    /// Question truncation.
    pub max_tokens: usize,
}

impl VqaTrainData {
    /// With the official `train_transform_wohflip`.
    pub fn new(
        entries: Arc<Vec<VqaEntry>>,
        tokenizer: Arc<TextTokenizer>,
        cfg: &VqaDataConfig,
    ) -> Self {
        let mut t = TrainTransform::finetune(cfg.image_res);
        t.hflip = false;
        Self {
            entries,
            tokenizer,
            transform: ImageTransform::Train(t),
            max_tokens: cfg.max_tokens,
        }
    }
}

impl MapDataset for VqaTrainData {
    type Item = VqaTrainSample;
    type Batch = VqaTrainBatch;

    fn len(&self) -> usize {
        self.entries.len()
    }

    fn load(&self, index: usize, rng: &mut ChaCha8Rng) -> Result<VqaTrainSample, DataError> {
        let draw = rng.random::<f64>();
        let (image, flipped) = load_train_image(&self.entries[index], draw, &self.transform, rng)?;
        Ok(VqaTrainSample {
            image,
            index,
            flipped,
        })
    }

    fn collate(&self, items: Vec<VqaTrainSample>) -> Result<VqaTrainBatch, DataError> {
        let entries: Vec<&VqaEntry> = items.iter().map(|s| &self.entries[s.index]).collect();
        let images: Vec<Vec<f32>> = items.into_iter().map(|s| s.image).collect();
        collate_train(
            &self.tokenizer,
            &entries,
            &images,
            self.transform.res(),
            self.max_tokens,
        )
    }
}
