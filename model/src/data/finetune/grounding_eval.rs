//! RefCOCO+ evaluation data (`grounding_dataset` in test mode, then what `grounding_eval` and
//! `grounding_eval_bbox` look up): every expression of `test_file` with its REFER split and box, its
//! image's size from `instances.json`, and (weak evaluation) its image's detector proposals from
//! `dets.json`. Images get the `test_transform`; texts are tokenized with `padding='longest'` and no
//! truncation, as `Grounding.val` calls the tokenizer.

use std::collections::HashMap;
use std::sync::Arc;

use rand_chacha::ChaCha8Rng;
use serde_json::Value;
use tch::Tensor;

use super::annotations::item_err;
use super::grounding::{check_box, encode_texts, load_split, GroundingDataConfig, GroundingEntry};
use super::images::{self, ImageTransform};
use super::loader::MapDataset;
use super::refer::Refer;
use super::source::read_json;
use crate::data::tokenizer::TextTokenizer;
use crate::data::DataError;

/// The REFER splits an evaluation expression may belong to.
pub const EVAL_SPLITS: [&str; 3] = ["val", "testA", "testB"];

/// One evaluation expression and what its scoring needs.
#[derive(Debug, Clone, PartialEq)]
pub struct GroundingEvalItem {
    /// The expression and its image.
    pub entry: GroundingEntry,
    /// `refer.Refs[ref_id]['split']`: one of [`EVAL_SPLITS`].
    pub split: String,
    /// The ground-truth box `[x, y, w, h]` in original pixels.
    pub ref_box: [f64; 4],
    /// `(width, height)` of the image from `instances.json`.
    pub image_wh: (f64, f64),
    /// Detector proposals `[x, y, w, h]` of the image, in file order (empty without `det_file`).
    pub dets: Vec<[f64; 4]>,
}

/// The detector proposals of `dets.json`: `{image_id: [[x, y, w, h], ...]}`.
#[derive(Debug, Clone, Default)]
pub struct Detections {
    by_image: HashMap<i64, Vec<[f64; 4]>>,
    file: String,
}

impl Detections {
    /// Reads `file`; a key that is not an image id or a box that is not 4 finite numbers with positive
    /// size is an error naming the image id and the box's position.
    pub fn load(file: &str) -> Result<Self, DataError> {
        let doc = read_json(file)?;
        let map = doc.as_object().ok_or_else(|| DataError::Annotation {
            file: file.to_string(),
            index: None,
            reason: "dets must be an object {image_id: [[x, y, w, h], ...]}".into(),
        })?;
        let mut by_image = HashMap::with_capacity(map.len());
        for (key, boxes) in map {
            let bad = |reason: String| DataError::Annotation {
                file: file.to_string(),
                index: None,
                reason: format!("image id {key:?}: {reason}"),
            };
            let id: i64 = key
                .parse()
                .map_err(|_| bad("the key is not an integer image id".into()))?;
            let list = boxes
                .as_array()
                .ok_or_else(|| bad("proposals must be a list of [x, y, w, h]".into()))?;
            let parsed = list
                .iter()
                .enumerate()
                .map(|(k, b)| proposal(b).map_err(|why| bad(format!("proposal {k}: {why}"))))
                .collect::<Result<Vec<_>, _>>()?;
            by_image.insert(id, parsed);
        }
        Ok(Self {
            by_image,
            file: file.to_string(),
        })
    }

    /// The proposals of `image_id`.
    pub fn get(&self, image_id: i64) -> Option<&Vec<[f64; 4]>> {
        self.by_image.get(&image_id)
    }
}

/// One proposal: at least 4 finite numbers (a score may follow), positive width and height.
fn proposal(b: &Value) -> Result<[f64; 4], String> {
    let nums: Option<Vec<f64>> = b
        .as_array()
        .map(|a| a.iter().map(Value::as_f64).collect())
        .unwrap_or(None);
    match nums.as_deref() {
        Some([x, y, w, h, ..])
            if [x, y, w, h].iter().all(|v| v.is_finite()) && *w > 0.0 && *h > 0.0 =>
        {
            Ok([*x, *y, *w, *h])
        }
        _ => Err(format!(
            "{b} is not [x, y, w, h] with finite numbers and w, h > 0"
        )),
    }
}

/// The evaluation expressions of `cfg.test_file` (val, then test), each with its REFER record, image
/// size and (when `dets` is given) proposals; a `ref_id` missing from the refs, a split other than
/// val / testA / testB, a box outside its image or an image without proposals is an error naming the
/// annotation file and item.
pub fn load_eval_items(
    cfg: &GroundingDataConfig,
    refer: &Refer,
    dets: Option<&Detections>,
) -> Result<Vec<GroundingEvalItem>, DataError> {
    let entries = load_split(cfg, &cfg.test_file)?;
    entries
        .into_iter()
        .map(|entry| eval_item(entry, refer, dets))
        .collect()
}

fn eval_item(
    entry: GroundingEntry,
    refer: &Refer,
    dets: Option<&Detections>,
) -> Result<GroundingEvalItem, DataError> {
    let err = |why: String| item_err(&entry.image.file, entry.image.index, why);
    let rec = refer.get(entry.ref_id).ok_or_else(|| {
        err(format!(
            "ref_id {} is not in {}",
            entry.ref_id, refer.refs_file
        ))
    })?;
    if !EVAL_SPLITS.contains(&rec.split.as_str()) {
        return Err(err(format!(
            "ref_id {} is in split {:?}, not one of val / testA / testB",
            entry.ref_id, rec.split
        )));
    }
    let image_wh = *refer.image_sizes.get(&rec.image_id).ok_or_else(|| {
        err(format!(
            "image_id {} of ref_id {} has no size in instances.json",
            rec.image_id, entry.ref_id
        ))
    })?;
    let (w, h) = image_wh;
    if !(w >= 1.0 && h >= 1.0 && w.fract() == 0.0 && h.fract() == 0.0) {
        return Err(err(format!(
            "image_id {}: size {w}x{h} is not whole pixels",
            rec.image_id
        )));
    }
    check_box(rec.bbox, w as usize, h as usize)
        .map_err(|why| err(format!("ref_id {}: {why}", entry.ref_id)))?;
    let dets = match dets {
        None => Vec::new(),
        Some(d) => d.get(rec.image_id).cloned().ok_or_else(|| {
            err(format!(
                "image_id {} of ref_id {} has no proposals in {}",
                rec.image_id, entry.ref_id, d.file
            ))
        })?,
    };
    Ok(GroundingEvalItem {
        split: rec.split.clone(),
        ref_box: rec.bbox,
        image_wh,
        dets,
        entry,
    })
}

/// A collated evaluation batch.
#[derive(Debug)]
pub struct GroundingEvalBatch {
    /// `[B, 3, R, R]` after the `test_transform`.
    pub image: Tensor,
    /// `[B, L]` padded to the longest expression of the batch.
    pub text_ids: Tensor,
    /// `[B, L]`.
    pub text_atts: Tensor,
    /// The items' positions in the evaluation set.
    pub indices: Vec<usize>,
}

/// The evaluation expressions as a map-style dataset.
pub struct GroundingEvalData {
    /// The expressions, in `test_file` order.
    pub items: Arc<Vec<GroundingEvalItem>>,
    /// The tokenizer.
    pub tokenizer: Arc<TextTokenizer>,
    /// The `test_transform` at `image_res`.
    pub transform: ImageTransform,
}

impl GroundingEvalData {
    /// The evaluation set of `cfg` (`dets.json` read when `cfg.det_file` is set and `with_dets`).
    pub fn load(
        cfg: &GroundingDataConfig,
        tokenizer: Arc<TextTokenizer>,
        with_dets: bool,
    ) -> Result<Self, DataError> {
        let refer = cfg.refer()?;
        let dets = match (&cfg.det_file, with_dets) {
            (Some(file), true) => Some(Detections::load(file)?),
            (None, true) => {
                return Err(DataError::Config(
                    "grounding evaluation needs `det_file` (the detector proposals)".into(),
                ))
            }
            (_, false) => None,
        };
        Ok(Self {
            items: Arc::new(load_eval_items(cfg, &refer, dets.as_ref())?),
            tokenizer,
            transform: ImageTransform::test(cfg.image_res),
        })
    }
}

impl MapDataset for GroundingEvalData {
    type Item = (usize, Vec<f32>);
    type Batch = GroundingEvalBatch;

    fn len(&self) -> usize {
        self.items.len()
    }

    fn load(&self, index: usize, rng: &mut ChaCha8Rng) -> Result<Self::Item, DataError> {
        let item = &self.items[index];
        Ok((index, self.transform.load(rng, &item.entry.image)?))
    }

    fn collate(&self, items: Vec<Self::Item>) -> Result<GroundingEvalBatch, DataError> {
        let entries: Vec<&GroundingEntry> =
            items.iter().map(|(i, _)| &self.items[*i].entry).collect();
        let text = encode_texts(&self.tokenizer, &entries, None)?;
        let indices = items.iter().map(|(i, _)| *i).collect();
        let images: Vec<Vec<f32>> = items.into_iter().map(|(_, im)| im).collect();
        Ok(GroundingEvalBatch {
            image: images::stack(&images, self.transform.res()),
            text_ids: text.ids,
            text_atts: text.atts,
            indices,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A proposal is 4 finite numbers with positive size (a trailing score is allowed); anything
    /// else is refused with the offending value in the message.
    #[test]
    fn proposals_must_be_finite_boxes() {
        assert_eq!(
            proposal(&serde_json::json!([1, 2.5, 3, 4, 0.9])),
            Ok([1.0, 2.5, 3.0, 4.0])
        );
        for bad in [
            serde_json::json!([1, 2, 0, 4]),
            serde_json::json!([1, 2, 3]),
            serde_json::json!([1, "2", 3, 4]),
            serde_json::json!({"x": 1}),
        ] {
            let err = proposal(&bad).expect_err("refused");
            assert!(err.contains(&bad.to_string()), "{err}");
        }
    }

    /// dets.json keys must be image ids; the error names the file and the key.
    #[test]
    fn detections_name_a_bad_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("dets.json");
        std::fs::write(&file, r#"{"7": [[0, 0, 2, 2]], "seven": []}"#).expect("write");
        let err = Detections::load(&file.display().to_string()).expect_err("refused");
        let msg = err.to_string();
        assert!(msg.contains("seven") && msg.contains("dets.json"), "{msg}");
    }
}
