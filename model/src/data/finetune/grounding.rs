//! RefCOCO+ data (`grounding_dataset`, `grounding_dataset_bbox`, Grounding*.py): expressions cleaned
//! by `pre_caption(text, 30)`; weak training ids by image file name; box training with the random crop
//! that keeps the REFER box, the careful flip and the normalised cxcywh target (§3.5 steps 2–4, §5.5).

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use rand::Rng;
use rand_chacha::ChaCha8Rng;
use serde::Deserialize;
use tch::Tensor;

use super::annotations::{self, item_err};
use super::config::{self, one_or_many, Resolver};
use super::images::{self, GroundingTrainTransform, ImageAt, ImageTransform};
use super::loader::MapDataset;
use super::refer::Refer;
use super::retrieval::RetrievalTrainBatch;
use super::source::ImageRoot;
use super::text::{encode_batch, Padding};
use crate::data::augment::OpArithmetic;
use crate::data::caption::pre_caption;
use crate::data::pixels::{self, RgbImage};
use crate::data::tokenizer::TextTokenizer;
use crate::data::transform::box_transform;
use crate::data::DataError;

fn default_true() -> bool {
    true
}

/// The data keys of a RefCOCO+ task YAML (weak or bbox), file names resolved.
#[derive(Debug, Clone, Deserialize)]
pub struct GroundingDataConfig {
    /// Train files.
    #[serde(deserialize_with = "one_or_many")]
    pub train_file: Vec<String>,
    /// Test files (val, then testA + testB), concatenated.
    #[serde(default, deserialize_with = "one_or_many")]
    pub test_file: Vec<String>,
    /// Folder holding `refcoco+/refs(unc).p` and `refcoco+/instances.json`.
    #[serde(default)]
    pub refcoco_data: Option<String>,
    /// Detector proposals `{image_id: [[x, y, w, h], ...]}` (weak evaluation).
    #[serde(default)]
    pub det_file: Option<String>,
    /// Folder (or URL prefix) of the images.
    pub image_root: String,
    /// Square image side.
    pub image_res: usize,
    /// Train truncation (DESIGN fix 16).
    #[serde(default = "config::default_max_tokens")]
    pub max_tokens: usize,
    /// No flip when the expression says 'left' / 'right' (bbox; absent from the official
    /// `Grounding_bbox.yaml`, which then fails: reference §5.5 says use True).
    #[serde(default = "default_true")]
    pub careful_hflip: bool,
    /// `pre_caption` word limit.
    #[serde(default = "config::default_max_words")]
    pub max_words: usize,
}

impl GroundingDataConfig {
    /// Reads the keys from a task YAML value.
    pub fn from_yaml(
        value: &serde_yaml::Value,
        resolver: &Resolver<'_>,
    ) -> Result<Self, DataError> {
        let mut cfg: Self = config::parse_keys(value, "grounding data config")?;
        cfg.train_file = resolver.resolve_all(&cfg.train_file);
        cfg.test_file = resolver.resolve_all(&cfg.test_file);
        cfg.refcoco_data = cfg.refcoco_data.map(|f| resolver.resolve(&f));
        cfg.det_file = cfg.det_file.map(|f| resolver.resolve(&f));
        cfg.image_root = resolver.resolve(&cfg.image_root);
        Ok(cfg)
    }

    /// The keys of a loaded task config (names relative to its file).
    pub fn from_task_config(cfg: &crate::config::TaskConfig) -> Result<Self, DataError> {
        Self::from_yaml(&config::task_value(cfg)?, &Resolver::Task(cfg))
    }

    /// Reads a task YAML file (names relative to its folder).
    pub fn load(path: &Path) -> Result<Self, DataError> {
        let base = path.parent().unwrap_or(Path::new("."));
        Self::from_yaml(&config::read_yaml(path)?, &Resolver::Base(base))
    }

    /// The REFER index (`refcoco+`, `unc`) under `refcoco_data`.
    pub fn refer(&self) -> Result<Refer, DataError> {
        let root = self.refcoco_data.as_deref().ok_or_else(|| {
            DataError::Config("grounding: `refcoco_data` is not configured".into())
        })?;
        Refer::load(root, "refcoco+", "unc")
    }
}

/// One referring expression.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroundingEntry {
    /// Its image.
    pub image: ImageAt,
    /// `pre_caption(text, max_words)`.
    pub text: String,
    /// The REFER reference.
    pub ref_id: i64,
    /// Weak training: `img_ids[basename(image)]`, dense by first appearance of the file name.
    pub idx: i64,
}

/// Reads `files` in order; `idx` numbers image file names (the path's last component) by first
/// appearance, as the official `grounding_dataset` (train) does.
pub fn load_split(
    cfg: &GroundingDataConfig,
    files: &[String],
) -> Result<Vec<GroundingEntry>, DataError> {
    let root = ImageRoot(cfg.image_root.clone());
    let mut ids: HashMap<String, i64> = HashMap::new();
    let mut out = Vec::new();
    for file in files {
        for (i, ann) in annotations::grounding(file)?.into_iter().enumerate() {
            let text = pre_caption(&ann.text, cfg.max_words)
                .map_err(|_| item_err(file, i, "text is empty after pre_caption"))?;
            let name = ann
                .image
                .rsplit('/')
                .next()
                .unwrap_or(&ann.image)
                .to_string();
            let next = ids.len() as i64;
            let idx = *ids.entry(name).or_insert(next);
            out.push(GroundingEntry {
                image: ImageAt::new(&root, &ann.image, file, i)?,
                text,
                ref_id: ann.ref_id,
                idx,
            });
        }
    }
    images::check_all_exist(out.iter().map(|e| &e.image))?;
    Ok(out)
}

/// Expression texts tokenized with `padding='longest'`, truncated to `truncate_to` when given (the
/// official train call has `max_length` without truncation; evaluation neither).
pub fn encode_texts(
    tok: &TextTokenizer,
    entries: &[&GroundingEntry],
    truncate_to: Option<usize>,
) -> Result<super::text::TextBatch, DataError> {
    let texts: Vec<&str> = entries.iter().map(|e| e.text.as_str()).collect();
    encode_batch(tok, &texts, Padding::Longest, truncate_to)
}

/// The random choices of one box-training item: the crop `[x0, x1) x [y0, y1)` and the flip draw.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BoxDraws {
    /// `x0, y0, x1, y1` (inclusive `randint` draws, in that order).
    pub crop: [i64; 4],
    /// The `random.random()` of the flip.
    pub flip_draw: f64,
}

/// Checks the box lies inside a `width x height` image with positive size (the official assert).
pub fn check_box(bbox: [f64; 4], width: usize, height: usize) -> Result<(), String> {
    let [x, y, w, h] = bbox;
    let (wf, hf) = (width as f64, height as f64);
    if x >= 0.0 && y >= 0.0 && x + w <= wf && y + h <= hf && w > 0.0 && h > 0.0 {
        Ok(())
    } else {
        Err(format!(
            "box [{x}, {y}, {w}, {h}] is not inside the {width}x{height} image"
        ))
    }
}

/// The inclusive `randint` ranges of the crop: x0 in [0, floor(x)], y0 in [0, floor(y)],
/// x1 in [min(ceil(x+w), W), W], y1 in [min(ceil(y+h), H), H].
pub fn crop_ranges(bbox: [f64; 4], width: usize, height: usize) -> [(i64, i64); 4] {
    let [x, y, w, h] = bbox;
    let (wi, hi) = (width as i64, height as i64);
    [
        (0, x.floor() as i64),
        (0, y.floor() as i64),
        (((x + w).ceil() as i64).min(wi), wi),
        (((y + h).ceil() as i64).min(hi), hi),
    ]
}

/// Draws the crop and flip of an item from `rng` (training).
pub fn draw_box(rng: &mut impl Rng, bbox: [f64; 4], width: usize, height: usize) -> BoxDraws {
    let r = crop_ranges(bbox, width, height);
    let crop = r.map(|(lo, hi)| rng.random_range(lo..=hi));
    BoxDraws {
        crop,
        flip_draw: rng.random::<f64>(),
    }
}

/// A box-training item before the colour transform.
#[derive(Debug, Clone, PartialEq)]
pub struct BoxSample {
    /// The crop, flipped if so, resized to `R x R` (PIL bicubic).
    pub image: RgbImage,
    /// `(cx, cy, w, h) / R` after crop, flip and resize, float32.
    pub target: [f32; 4],
    /// Whether it was mirrored.
    pub flipped: bool,
}

/// Whether a cleaned expression names a side (careful_hflip then skips the flip).
pub fn mentions_side(text: &str) -> bool {
    text.contains("left") || text.contains("right")
}

/// `grounding_dataset_bbox` (train) geometry with the given draws; errors say which check failed.
pub fn box_sample(
    img: &RgbImage,
    bbox: [f64; 4],
    draws: BoxDraws,
    no_flip: bool,
    res: usize,
) -> Result<BoxSample, String> {
    check_box(bbox, img.width, img.height)?;
    let ranges = crop_ranges(bbox, img.width, img.height);
    for (v, (lo, hi)) in draws.crop.iter().zip(ranges) {
        if *v < lo || *v > hi {
            return Err(format!("crop draw {v} outside [{lo}, {hi}]"));
        }
    }
    let [x0, y0, x1, y1] = draws.crop;
    let (w0, h0) = (x1 - x0, y1 - y0);
    if w0 <= 0 || h0 <= 0 {
        return Err(format!("empty crop {:?}", draws.crop));
    }
    let mut crop = img.crop(x0 as usize, y0 as usize, w0 as usize, h0 as usize);
    let flipped = draws.flip_draw < 0.5 && !no_flip;
    if flipped {
        crop.hflip();
    }
    let image = pixels::resize_bicubic(&crop, res, res);
    // The official float64 arithmetic, in its order, then float32.
    let [mut x, mut y, mut w, mut h] = bbox;
    let (cw, ch, r) = (w0 as f64, h0 as f64, res as f64);
    x -= x0 as f64;
    y -= y0 as f64;
    if flipped {
        x = (cw - x) - w;
    }
    x *= r / cw;
    w *= r / cw;
    y *= r / ch;
    h *= r / ch;
    let cx = x + 0.5 * w;
    let cy = y + 0.5 * h;
    Ok(BoxSample {
        image,
        target: [cx / r, cy / r, w / r, h / r].map(|v| v as f32),
        flipped,
    })
}

/// Stacks box targets into `[B, 4]` float32.
pub fn stack_targets(targets: &[[f32; 4]]) -> Tensor {
    let flat: Vec<f32> = targets.iter().flatten().copied().collect();
    Tensor::from_slice(&flat).view([targets.len() as i64, 4])
}

/// The weak grounding train split as a map-style dataset (`Resize → flip → RandomAugment`).
pub struct GroundingTrainData {
    /// The expressions.
    pub entries: Arc<Vec<GroundingEntry>>,
    /// The tokenizer.
    pub tokenizer: Arc<TextTokenizer>,
    /// The image transform (the grounding train transform; `test_transform` for checks).
    pub transform: ImageTransform,
    /// `Some(max_tokens)` (DESIGN fix 16) or `None` (the official call, no truncation).
    pub truncate_to: Option<usize>,
}

impl GroundingTrainData {
    /// With the official grounding train transform and truncation to `max_tokens`.
    pub fn new(
        entries: Arc<Vec<GroundingEntry>>,
        tokenizer: Arc<TextTokenizer>,
        cfg: &GroundingDataConfig,
    ) -> Self {
        Self {
            entries,
            tokenizer,
            transform: ImageTransform::GroundingTrain(GroundingTrainTransform::new(cfg.image_res)),
            truncate_to: Some(cfg.max_tokens),
        }
    }
}

impl MapDataset for GroundingTrainData {
    type Item = (usize, Vec<f32>);
    // The weak task trains the retrieval model (Grounding.py uses models/model_retrieval.py): its
    // batches are retrieval batches with `idx` numbering image file names.
    type Batch = RetrievalTrainBatch;

    fn len(&self) -> usize {
        self.entries.len()
    }

    fn load(&self, index: usize, rng: &mut ChaCha8Rng) -> Result<Self::Item, DataError> {
        Ok((index, self.transform.load(rng, &self.entries[index].image)?))
    }

    fn collate(&self, items: Vec<Self::Item>) -> Result<RetrievalTrainBatch, DataError> {
        let entries: Vec<&GroundingEntry> = items.iter().map(|(i, _)| &self.entries[*i]).collect();
        let text = encode_texts(&self.tokenizer, &entries, self.truncate_to)?;
        let images: Vec<Vec<f32>> = items.into_iter().map(|(_, im)| im).collect();
        Ok(RetrievalTrainBatch {
            image: images::stack(&images, self.transform.res()),
            text_ids: text.ids,
            text_atts: text.atts,
            idx: Tensor::from_slice(&entries.iter().map(|e| e.idx).collect::<Vec<_>>()),
        })
    }
}

/// A collated box-grounding train batch.
#[derive(Debug)]
pub struct GroundingBoxBatch {
    /// `[B, 3, R, R]` after crop, flip, resize and `box_transform`.
    pub image: Tensor,
    /// `[B, L]` padding longest (truncated to `truncate_to` when set).
    pub text_ids: Tensor,
    /// `[B, L]`.
    pub text_atts: Tensor,
    /// `[B, 4]` float32 normalised `(cx, cy, w, h)`.
    pub target_bbox: Tensor,
}

/// The box-grounding train split as a map-style dataset (random crop keeping the box, careful flip,
/// resize, `box_transform`).
pub struct GroundingBoxTrainData {
    /// The expressions.
    pub entries: Arc<Vec<GroundingEntry>>,
    /// The REFER box of each entry.
    pub boxes: Vec<[f64; 4]>,
    /// The tokenizer.
    pub tokenizer: Arc<TextTokenizer>,
    /// Output side.
    pub res: usize,
    /// No flip for expressions naming a side.
    pub careful_hflip: bool,
    /// `Some(max_tokens)` (DESIGN fix 16) or `None` (the official call).
    pub truncate_to: Option<usize>,
}

impl GroundingBoxTrainData {
    /// Looks up every entry's box in `refer`; a `ref_id` it lacks is an error naming the item.
    pub fn new(
        entries: Arc<Vec<GroundingEntry>>,
        refer: &Refer,
        tokenizer: Arc<TextTokenizer>,
        cfg: &GroundingDataConfig,
    ) -> Result<Self, DataError> {
        let boxes = entries
            .iter()
            .map(|e| {
                refer.get(e.ref_id).map(|r| r.bbox).ok_or_else(|| {
                    item_err(
                        &e.image.file,
                        e.image.index,
                        format!("ref_id {} is not in {}", e.ref_id, refer.refs_file),
                    )
                })
            })
            .collect::<Result<_, _>>()?;
        Ok(Self {
            entries,
            boxes,
            tokenizer,
            res: cfg.image_res,
            careful_hflip: cfg.careful_hflip,
            truncate_to: Some(cfg.max_tokens),
        })
    }
}

impl MapDataset for GroundingBoxTrainData {
    type Item = (usize, Vec<f32>, [f32; 4]);
    type Batch = GroundingBoxBatch;

    fn len(&self) -> usize {
        self.entries.len()
    }

    fn load(&self, index: usize, rng: &mut ChaCha8Rng) -> Result<Self::Item, DataError> {
        let e = &self.entries[index];
        let img = e.image.decode()?;
        let bbox = self.boxes[index];
        check_box(bbox, img.width, img.height).map_err(|why| e.image.err(why))?;
        let draws = draw_box(rng, bbox, img.width, img.height);
        let no_flip = self.careful_hflip && mentions_side(&e.text);
        let s = box_sample(&img, bbox, draws, no_flip, self.res).map_err(|why| e.image.err(why))?;
        Ok((
            index,
            box_transform(rng, s.image, OpArithmetic::Official),
            s.target,
        ))
    }

    fn collate(&self, items: Vec<Self::Item>) -> Result<GroundingBoxBatch, DataError> {
        let entries: Vec<&GroundingEntry> =
            items.iter().map(|(i, _, _)| &self.entries[*i]).collect();
        let text = encode_texts(&self.tokenizer, &entries, self.truncate_to)?;
        let targets: Vec<[f32; 4]> = items.iter().map(|(_, _, t)| *t).collect();
        let images: Vec<Vec<f32>> = items.into_iter().map(|(_, im, _)| im).collect();
        Ok(GroundingBoxBatch {
            image: images::stack(&images, self.res),
            text_ids: text.ids,
            text_atts: text.atts,
            target_bbox: stack_targets(&targets),
        })
    }
}
