//! The RefCOCO+ boxes as the official code gets them from the REFER toolkit (`refTools.refer_python3.
//! REFER(refcoco_data, 'refcoco+', 'unc')`): `refcoco+/refs(unc).p` (a pickle of ref records) joined
//! with `refcoco+/instances.json` (COCO images and annotations).

use std::collections::HashMap;

use serde_json::Value;

use super::annotations::{item_err, Item};
use super::source::{read_bytes, read_json, resolve_location};
use crate::checkpoint::torch_pickle::read_plain_pickle;
use crate::data::DataError;

/// One referring expression target.
#[derive(Debug, Clone, PartialEq)]
pub struct RefRecord {
    /// `ref_id`.
    pub ref_id: i64,
    /// The COCO annotation it refers to.
    pub ann_id: i64,
    /// The COCO image.
    pub image_id: i64,
    /// `train`, `val`, `testA`, `testB`.
    pub split: String,
    /// `refToAnn[ref_id]['bbox']`: `[x, y, w, h]` in original pixels.
    pub bbox: [f64; 4],
}

/// The REFER index: refs by id, image sizes by id.
#[derive(Debug, Clone, Default)]
pub struct Refer {
    /// Records by `ref_id`.
    pub refs: HashMap<i64, RefRecord>,
    /// `(width, height)` by COCO image id (`Imgs[image_id]`).
    pub image_sizes: HashMap<i64, (f64, f64)>,
    /// The refs file read (for errors).
    pub refs_file: String,
}

fn number(it: &Item<'_>, key: &str) -> Result<f64, DataError> {
    it.get(key)
        .and_then(Value::as_f64)
        .ok_or_else(|| it.err(format!("missing or non-numeric field `{key}`")))
}

fn bbox(it: &Item<'_>) -> Result<[f64; 4], DataError> {
    let b = it
        .get("bbox")
        .and_then(Value::as_array)
        .ok_or_else(|| it.err("missing field `bbox` (a list of 4 numbers)"))?;
    let v: Option<Vec<f64>> = b.iter().map(Value::as_f64).collect();
    match v.as_deref() {
        Some(&[x, y, w, h]) => Ok([x, y, w, h]),
        _ => Err(it.err("field `bbox` must be 4 numbers [x, y, w, h]")),
    }
}

fn list_field<'a>(doc: &'a Value, key: &str, file: &str) -> Result<&'a Vec<Value>, DataError> {
    doc.get(key)
        .and_then(Value::as_array)
        .ok_or_else(|| DataError::Annotation {
            file: file.to_string(),
            index: None,
            reason: format!("missing list `{key}`"),
        })
}

impl Refer {
    /// Reads `{refcoco_data}/{dataset}/refs({split_by}).p` and `{refcoco_data}/{dataset}/instances.json`.
    pub fn load(refcoco_data: &str, dataset: &str, split_by: &str) -> Result<Self, DataError> {
        let dir = std::path::Path::new(refcoco_data).join(dataset);
        let refs_file = resolve_location(&dir, &format!("refs({split_by}).p"));
        let instances_file = resolve_location(&dir, "instances.json");
        let (anns, image_sizes) = read_instances(&instances_file)?;
        let pickle =
            read_plain_pickle(&read_bytes(&refs_file)?).map_err(|e| DataError::Annotation {
                file: refs_file.clone(),
                index: None,
                reason: format!("unreadable pickle: {e}"),
            })?;
        let Value::Array(items) = pickle else {
            return Err(DataError::Annotation {
                file: refs_file,
                index: None,
                reason: "the pickle is not a list of refs".into(),
            });
        };
        let mut refs = HashMap::new();
        for (i, v) in items.iter().enumerate() {
            let it = Item::new(&refs_file, i, v)?;
            let ann_id = it.int("ann_id")?;
            let bbox = *anns.get(&ann_id).ok_or_else(|| {
                item_err(
                    &refs_file,
                    i,
                    format!("ann_id {ann_id} is not in {instances_file}"),
                )
            })?;
            let rec = RefRecord {
                ref_id: it.int("ref_id")?,
                ann_id,
                image_id: it.int("image_id")?,
                split: it.str("split")?,
                bbox,
            };
            refs.insert(rec.ref_id, rec);
        }
        Ok(Self {
            refs,
            image_sizes,
            refs_file,
        })
    }

    /// The record of `ref_id`.
    pub fn get(&self, ref_id: i64) -> Option<&RefRecord> {
        self.refs.get(&ref_id)
    }
}

type Instances = (HashMap<i64, [f64; 4]>, HashMap<i64, (f64, f64)>);

fn read_instances(file: &str) -> Result<Instances, DataError> {
    let doc = read_json(file)?;
    let mut anns = HashMap::new();
    for (i, v) in list_field(&doc, "annotations", file)?.iter().enumerate() {
        let it = Item::new(file, i, v)?;
        anns.insert(it.int("id")?, bbox(&it)?);
    }
    let mut sizes = HashMap::new();
    for (i, v) in list_field(&doc, "images", file)?.iter().enumerate() {
        let it = Item::new(file, i, v)?;
        sizes.insert(
            it.int("id")?,
            (number(&it, "width")?, number(&it, "height")?),
        );
    }
    Ok((anns, sizes))
}
