//! Readers for the official fine-tuning annotation layouts (reference §3.1, §5): one JSON list per file,
//! each item checked field by field. Every problem is an error naming the file and the item index;
//! nothing here reads images.

use serde_json::{Map, Value};

use super::source::{json_type, read_json_list};
use crate::data::DataError;

/// One item of an annotation list, for typed field access with errors that name file and index.
pub struct Item<'a> {
    file: &'a str,
    index: usize,
    obj: &'a Map<String, Value>,
}

impl<'a> Item<'a> {
    /// Wraps the `index`-th value of `file` (which must be an object).
    pub fn new(file: &'a str, index: usize, value: &'a Value) -> Result<Self, DataError> {
        match value {
            Value::Object(obj) => Ok(Self { file, index, obj }),
            other => Err(item_err(
                file,
                index,
                format!("expected an object, found {}", json_type(other)),
            )),
        }
    }

    /// An error about this item.
    pub fn err(&self, reason: impl ToString) -> DataError {
        item_err(self.file, self.index, reason)
    }

    fn field(&self, key: &str) -> Result<&'a Value, DataError> {
        self.obj
            .get(key)
            .ok_or_else(|| self.err(format!("missing field `{key}`")))
    }

    fn wrong(&self, key: &str, want: &str, got: &Value) -> DataError {
        self.err(format!(
            "field `{key}` must be {want}, found {}",
            json_type(got)
        ))
    }

    /// A required string field.
    pub fn str(&self, key: &str) -> Result<String, DataError> {
        match self.field(key)? {
            Value::String(s) => Ok(s.clone()),
            v => Err(self.wrong(key, "a string", v)),
        }
    }

    /// An optional string field (absent or null: `None`).
    pub fn opt_str(&self, key: &str) -> Result<Option<String>, DataError> {
        match self.obj.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(v) => Err(self.wrong(key, "a string", v)),
        }
    }

    /// A required non-empty list of strings.
    pub fn str_list(&self, key: &str) -> Result<Vec<String>, DataError> {
        let v = self.field(key)?;
        let Value::Array(items) = v else {
            return Err(self.wrong(key, "a list of strings", v));
        };
        if items.is_empty() {
            return Err(self.err(format!("field `{key}` is an empty list")));
        }
        items
            .iter()
            .enumerate()
            .map(|(i, x)| match x {
                Value::String(s) => Ok(s.clone()),
                other => Err(self.err(format!(
                    "field `{key}`[{i}] must be a string, found {}",
                    json_type(other)
                ))),
            })
            .collect()
    }

    /// A required integer field (an integer-valued string is accepted too, as GQA ids are strings).
    pub fn int(&self, key: &str) -> Result<i64, DataError> {
        match self.field(key)? {
            Value::Number(n) if n.as_i64().is_some() => Ok(n.as_i64().unwrap_or_default()),
            Value::String(s) if s.trim().parse::<i64>().is_ok() => {
                Ok(s.trim().parse::<i64>().unwrap_or_default())
            }
            v => Err(self.wrong(key, "an integer", v)),
        }
    }

    /// A required scalar used as a dictionary key (`image_id`): its JSON text, so `1` and `"1"` differ
    /// as they do for a Python dict.
    pub fn key(&self, key: &str) -> Result<String, DataError> {
        match self.field(key)? {
            v @ (Value::String(_) | Value::Number(_) | Value::Bool(_)) => Ok(v.to_string()),
            v => Err(self.wrong(key, "a string or a number", v)),
        }
    }

    /// The raw field, if present.
    pub fn get(&self, key: &str) -> Option<&'a Value> {
        self.obj.get(key)
    }
}

/// An error about item `index` of `file`.
pub fn item_err(file: &str, index: usize, reason: impl ToString) -> DataError {
    DataError::Annotation {
        file: file.to_string(),
        index: Some(index),
        reason: reason.to_string(),
    }
}

/// Reads `file` as a list and parses every item with `parse`, in order.
pub fn read_items<T>(
    file: &str,
    mut parse: impl FnMut(&Item<'_>) -> Result<T, DataError>,
) -> Result<Vec<T>, DataError> {
    let values = read_json_list(file)?;
    values
        .iter()
        .enumerate()
        .map(|(i, v)| parse(&Item::new(file, i, v)?))
        .collect()
}

/// Retrieval train item `{image, caption, image_id}` (`re_train_dataset`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetrievalTrainAnn {
    /// Image path under `image_root`.
    pub image: String,
    /// The raw caption.
    pub caption: String,
    /// `image_id` as a dictionary key (its JSON text).
    pub image_id: String,
}

/// Reads a retrieval train file.
pub fn retrieval_train(file: &str) -> Result<Vec<RetrievalTrainAnn>, DataError> {
    read_items(file, |it| {
        Ok(RetrievalTrainAnn {
            image: it.str("image")?,
            caption: it.str("caption")?,
            image_id: it.key("image_id")?,
        })
    })
}

/// Retrieval evaluation item `{image, caption: [..]}` (`re_eval_dataset`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetrievalEvalAnn {
    /// Image path under `image_root`.
    pub image: String,
    /// The raw captions of this image.
    pub captions: Vec<String>,
}

/// Reads a retrieval val/test file.
pub fn retrieval_eval(file: &str) -> Result<Vec<RetrievalEvalAnn>, DataError> {
    read_items(file, |it| {
        Ok(RetrievalEvalAnn {
            image: it.str("image")?,
            captions: it.str_list("caption")?,
        })
    })
}

/// Which image root a VQA item's image is under (`dataset` key; absent = VQA).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VqaOrigin {
    /// `vqa_root`.
    Vqa,
    /// `vg_root` (single answer, weight 0.5).
    Vg,
    /// `gqa_root`.
    Gqa,
}

/// VQA item (`vqa_dataset`): train items carry answers, test items a question id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VqaAnn {
    /// Image path under the origin's root.
    pub image: String,
    /// The raw question.
    pub question: String,
    /// The image root.
    pub origin: VqaOrigin,
    /// Train: the annotators' answers (VG: the one answer). Empty for test items.
    pub answers: Vec<String>,
    /// Test: `question_id`.
    pub question_id: Option<i64>,
}

fn vqa_origin(it: &Item<'_>) -> Result<VqaOrigin, DataError> {
    match it.opt_str("dataset")?.as_deref() {
        None | Some("vqa") => Ok(VqaOrigin::Vqa),
        Some("vg") => Ok(VqaOrigin::Vg),
        Some("gqa") => Ok(VqaOrigin::Gqa),
        Some(other) => Err(it.err(format!(
            "field `dataset` must be 'vqa', 'vg' or 'gqa', found {other:?}"
        ))),
    }
}

/// Reads a VQA train file (`vqa_train.json`, `vqa_val.json`, `vg_qa.json`): VG answers are one string,
/// the others a list of annotator answers.
pub fn vqa_train(file: &str) -> Result<Vec<VqaAnn>, DataError> {
    read_items(file, |it| {
        let origin = vqa_origin(it)?;
        let answers = match origin {
            VqaOrigin::Vg => vec![it.str("answer")?],
            _ => it.str_list("answer")?,
        };
        Ok(VqaAnn {
            image: it.str("image")?,
            question: it.str("question")?,
            origin,
            answers,
            question_id: None,
        })
    })
}

/// Reads a VQA test file `[{question_id, image, question}]`.
pub fn vqa_test(file: &str) -> Result<Vec<VqaAnn>, DataError> {
    read_items(file, |it| {
        Ok(VqaAnn {
            image: it.str("image")?,
            question: it.str("question")?,
            origin: vqa_origin(it)?,
            answers: Vec::new(),
            question_id: Some(it.int("question_id")?),
        })
    })
}

/// Reads `answer_list.json` (a list of strings).
pub fn answer_list(file: &str) -> Result<Vec<String>, DataError> {
    let values = read_json_list(file)?;
    values
        .iter()
        .enumerate()
        .map(|(i, v)| match v {
            Value::String(s) => Ok(s.clone()),
            other => Err(item_err(
                file,
                i,
                format!("expected a string, found {}", json_type(other)),
            )),
        })
        .collect()
}

/// NLVR2 item `{images: [left, right], sentence, label}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NlvrAnn {
    /// The two image paths under `image_root`.
    pub images: [String; 2],
    /// The raw sentence.
    pub sentence: String,
    /// `label == 'True'`.
    pub label: bool,
}

/// Reads an NLVR2 file; a label other than 'True' / 'False' is an error.
pub fn nlvr(file: &str) -> Result<Vec<NlvrAnn>, DataError> {
    read_items(file, |it| {
        let images = it.str_list("images")?;
        let [a, b]: [String; 2] = images
            .try_into()
            .map_err(|v: Vec<String>| it.err(format!("`images` has {} entries, not 2", v.len())))?;
        let label = match it.str("label")?.as_str() {
            "True" => true,
            "False" => false,
            other => {
                return Err(it.err(format!(
                    "field `label` must be 'True' or 'False', found {other:?}"
                )))
            }
        };
        Ok(NlvrAnn {
            images: [a, b],
            sentence: it.str("sentence")?,
            label,
        })
    })
}

/// RefCOCO+ item `{image, text, ref_id}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroundingAnn {
    /// Image path under `image_root`.
    pub image: String,
    /// The raw referring expression.
    pub text: String,
    /// The REFER reference id.
    pub ref_id: i64,
}

/// Reads a RefCOCO+ file.
pub fn grounding(file: &str) -> Result<Vec<GroundingAnn>, DataError> {
    read_items(file, |it| {
        Ok(GroundingAnn {
            image: it.str("image")?,
            text: it.str("text")?,
            ref_id: it.int("ref_id")?,
        })
    })
}
