//! The keys of the official task configs (`configs/*.yaml`) each task reads, with their types and
//! ranges. One table for every binary: the coordinator checks a job's `overrides:` against it at
//! submit (it never links libtorch, so the table cannot live in the model crate), and the model's
//! config reader reports any key outside it as unknown. A key a task starts reading is added here
//! once, and both sides know it.

use std::collections::BTreeMap;
use std::fmt;

use serde::de::{Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};

use crate::spec::TaskKind;
use crate::spec::TaskKind::{
    Grounding, GroundingBbox, GroundingBboxPretrain, Nlvr, NlvrPretrain, Pretrain, Retrieval, Vqa,
};

/// A value of a task config or of an override as parsed; unlike JSON it keeps non-finite floats, so
/// a `.nan` learning rate can be named as such.
#[derive(Clone, Debug, PartialEq)]
pub enum ConfigValue {
    /// `null` / `~`.
    Null,
    /// `true` / `false`.
    Bool(bool),
    /// A whole number.
    Integer(i128),
    /// A floating-point number (possibly NaN or infinite).
    Float(f64),
    /// A string.
    String(String),
    /// A sequence.
    List(Vec<ConfigValue>),
    /// A mapping with string keys.
    Map(BTreeMap<String, ConfigValue>),
}

impl fmt::Display for ConfigValue {
    /// YAML-like, as an error quotes it: `.nan`, `"big"`, `a list`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigValue::Null => f.write_str("null"),
            ConfigValue::Bool(b) => write!(f, "{b}"),
            ConfigValue::Integer(n) => write!(f, "{n}"),
            ConfigValue::Float(x) if x.is_nan() => f.write_str(".nan"),
            ConfigValue::Float(x) if x.is_infinite() => {
                f.write_str(if *x > 0.0 { ".inf" } else { "-.inf" })
            }
            ConfigValue::Float(x) => write!(f, "{x:?}"),
            ConfigValue::String(s) => write!(f, "{s:?}"),
            ConfigValue::List(_) => f.write_str("a list"),
            ConfigValue::Map(_) => f.write_str("a mapping"),
        }
    }
}

impl<'de> Deserialize<'de> for ConfigValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(ValueVisitor)
    }
}

struct ValueVisitor;

impl<'de> Visitor<'de> for ValueVisitor {
    type Value = ConfigValue;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a task config value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<ConfigValue, E> {
        Ok(ConfigValue::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<ConfigValue, E> {
        Ok(ConfigValue::Integer(v.into()))
    }
    fn visit_u64<E>(self, v: u64) -> Result<ConfigValue, E> {
        Ok(ConfigValue::Integer(v.into()))
    }
    fn visit_i128<E>(self, v: i128) -> Result<ConfigValue, E> {
        Ok(ConfigValue::Integer(v))
    }
    fn visit_f64<E>(self, v: f64) -> Result<ConfigValue, E> {
        Ok(ConfigValue::Float(v))
    }
    fn visit_str<E>(self, v: &str) -> Result<ConfigValue, E> {
        Ok(ConfigValue::String(v.to_string()))
    }
    fn visit_string<E>(self, v: String) -> Result<ConfigValue, E> {
        Ok(ConfigValue::String(v))
    }
    fn visit_unit<E>(self) -> Result<ConfigValue, E> {
        Ok(ConfigValue::Null)
    }
    fn visit_none<E>(self) -> Result<ConfigValue, E> {
        Ok(ConfigValue::Null)
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<ConfigValue, D::Error> {
        ConfigValue::deserialize(d)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<ConfigValue, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element()? {
            items.push(item);
        }
        Ok(ConfigValue::List(items))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<ConfigValue, A::Error> {
        let mut entries = BTreeMap::new();
        while let Some(key) = map.next_key::<MapKey>()? {
            entries.insert(key.0, map.next_value()?);
        }
        Ok(ConfigValue::Map(entries))
    }
}

/// A mapping key as text: YAML allows numbers and booleans as keys.
struct MapKey(String);

impl<'de> Deserialize<'de> for MapKey {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl Visitor<'_> for KeyVisitor {
            type Value = MapKey;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a scalar mapping key")
            }
            fn visit_str<E>(self, v: &str) -> Result<MapKey, E> {
                Ok(MapKey(v.to_string()))
            }
            fn visit_bool<E>(self, v: bool) -> Result<MapKey, E> {
                Ok(MapKey(v.to_string()))
            }
            fn visit_i64<E>(self, v: i64) -> Result<MapKey, E> {
                Ok(MapKey(v.to_string()))
            }
            fn visit_u64<E>(self, v: u64) -> Result<MapKey, E> {
                Ok(MapKey(v.to_string()))
            }
            fn visit_f64<E>(self, v: f64) -> Result<MapKey, E> {
                Ok(MapKey(v.to_string()))
            }
        }
        d.deserialize_any(KeyVisitor)
    }
}

/// Where a number must lie.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Range {
    /// Any finite value.
    Any,
    /// `>= min`.
    AtLeast(f64),
    /// `> min`.
    Above(f64),
    /// `min <= x <= max`.
    Within(f64, f64),
}

impl Range {
    fn contains(self, x: f64) -> bool {
        match self {
            Range::Any => true,
            Range::AtLeast(min) => x >= min,
            Range::Above(min) => x > min,
            Range::Within(min, max) => (min..=max).contains(&x),
        }
    }
}

impl fmt::Display for Range {
    /// The range as an error states it, with a leading space: ` > 0`, ` in [0, 1]`; empty for any.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Range::Any => Ok(()),
            Range::AtLeast(min) => write!(f, " >= {min}"),
            Range::Above(min) => write!(f, " > {min}"),
            Range::Within(min, max) => write!(f, " in [{min}, {max}]"),
        }
    }
}

/// What a key's value must be.
#[derive(Clone, Copy, Debug)]
pub enum ValueKind {
    /// A finite number in the range; a numeric string counts (PyYAML reads `1e-4` as a string, and the
    /// model's config reader accepts one).
    Number(Range),
    /// A whole number in the range.
    Integer(Range),
    /// `true` or `false`.
    Bool,
    /// A string.
    String,
    /// A number or a string (`FP16_LOSS_SCALE: dynamic` or `128`).
    NumberOrString,
    /// A file name or a list of file names (`train_file: a.json` or `[a.json, b.json]`).
    Files,
    /// A list of values of one kind, of exactly `len` items when set.
    List {
        /// What each item must be.
        item: &'static ValueKind,
        /// The required length.
        len: Option<usize>,
    },
    /// A mapping of these keys.
    Map(&'static [ConfigKey]),
}

/// One key of a task config: its name, what its value must be, and the tasks that read it.
#[derive(Clone, Copy, Debug)]
pub struct ConfigKey {
    /// The official key name.
    pub name: &'static str,
    /// What its value must be.
    pub kind: ValueKind,
    /// The tasks whose configs have it (inside a mapping: those of the mapping's key as well).
    pub tasks: &'static [TaskKind],
}

const fn key(name: &'static str, kind: ValueKind, tasks: &'static [TaskKind]) -> ConfigKey {
    ConfigKey { name, kind, tasks }
}

/// Every task with an official task config (all but `smoke`).
const EVERY: &[TaskKind] = &[
    Pretrain,
    Retrieval,
    Vqa,
    Nlvr,
    Grounding,
    GroundingBbox,
    NlvrPretrain,
    GroundingBboxPretrain,
];
/// Pre-training and the two domain pre-trainings (json-lines data, apex settings).
const PRETRAININGS: &[TaskKind] = &[Pretrain, NlvrPretrain, GroundingBboxPretrain];
/// The tasks with an image-text stream (`images:`).
const IMAGE_TEXT: &[TaskKind] = &[Pretrain, NlvrPretrain];
/// The tasks with a region stream (`regions:`, `train_file_regions`).
const REGIONS: &[TaskKind] = &[Pretrain, GroundingBboxPretrain];
/// The fine-tunes on annotation files.
const FINETUNES: &[TaskKind] = &[Retrieval, Vqa, Nlvr, Grounding, GroundingBbox];
/// The tasks with an ITC head (`embed_dim`, `temp`).
const ITC: &[TaskKind] = &[Pretrain, Retrieval, Grounding, NlvrPretrain];
/// The fine-tunes whose datasets take `finetune_transform` (xvlm-only augmentation softening).
const SOFTENED: &[TaskKind] = &[Retrieval, Vqa, Nlvr];
/// Both RefCOCO+ tasks.
const REFCOCO: &[TaskKind] = &[Grounding, GroundingBbox];
/// Every task but the box-grounding pre-training (whose data is region lines only).
const IMAGE_FILES: &[TaskKind] = &[
    Pretrain,
    Retrieval,
    Vqa,
    Nlvr,
    Grounding,
    GroundingBbox,
    NlvrPretrain,
];

const POSITIVE: Range = Range::Above(0.0);
const NON_NEGATIVE: Range = Range::AtLeast(0.0);
const AT_LEAST_ONE: Range = Range::AtLeast(1.0);
const PROBABILITY: Range = Range::Within(0.0, 1.0);

const CROP_SCALE: ValueKind = ValueKind::List {
    item: &ValueKind::Number(PROBABILITY),
    len: Some(2),
};

/// `optimizer:`.
const OPTIMIZER: &[ConfigKey] = &[
    key("opt", ValueKind::String, EVERY),
    key("lr", ValueKind::Number(POSITIVE), EVERY),
    key("weight_decay", ValueKind::Number(NON_NEGATIVE), EVERY),
    key("lr_mult", ValueKind::Number(POSITIVE), EVERY),
];

/// `schedular:` (sic, the official key).
const SCHEDULER: &[ConfigKey] = &[
    key("sched", ValueKind::String, EVERY),
    key("lr", ValueKind::Number(POSITIVE), EVERY),
    key("epochs", ValueKind::Number(AT_LEAST_ONE), EVERY),
    key("num_warmup_steps", ValueKind::Number(NON_NEGATIVE), EVERY),
    key("num_training_steps", ValueKind::Number(AT_LEAST_ONE), EVERY),
];

/// `accelerator:` (apex settings; the fine-tunes on annotation files run without them).
const ACCELERATOR: &[ConfigKey] = &[
    key("SYNCBN", ValueKind::Bool, EVERY),
    key("FP16_OPT_LEVEL", ValueKind::String, EVERY),
    key("FP16_LOSS_SCALE", ValueKind::NumberOrString, EVERY),
    key("RNG_SEED", ValueKind::Integer(NON_NEGATIVE), EVERY),
    key(
        "GRAD_ACCUMULATE_STEPS",
        ValueKind::Integer(AT_LEAST_ONE),
        EVERY,
    ),
    key("CLIP_GRAD_NORM", ValueKind::Number(POSITIVE), EVERY),
];

/// `xvlm:`, this implementation's switches (absent from the official configs).
const XVLM: &[ConfigKey] = &[
    key("itc", ValueKind::Bool, &[Pretrain]),
    key("itm", ValueKind::Bool, &[Pretrain]),
    key("dropout", ValueKind::Bool, EVERY),
];

/// `images:` of the image-text stream.
const IMAGES: &[ConfigKey] = &[
    key("image_key", ValueKind::String, EVERY),
    key("is_image_rpath", ValueKind::Bool, EVERY),
    key("caption_key", ValueKind::String, EVERY),
    key("tokenized", ValueKind::Bool, EVERY),
    key("image_root", ValueKind::String, EVERY),
    key("batch_size", ValueKind::Integer(AT_LEAST_ONE), EVERY),
    key("num_workers", ValueKind::Integer(NON_NEGATIVE), EVERY),
    key("crop_scale", CROP_SCALE, EVERY),
    key("hflip", ValueKind::Bool, EVERY),
    key("rand_augment", ValueKind::Bool, EVERY),
    key("exact_ops", ValueKind::Bool, EVERY),
];

/// `regions:` of the region stream.
const REGION_STREAM: &[ConfigKey] = &[
    key("image_key", ValueKind::String, EVERY),
    key("is_image_rpath", ValueKind::Bool, EVERY),
    key("caption_key", ValueKind::String, EVERY),
    key("tokenized", ValueKind::Bool, EVERY),
    key("image_root", ValueKind::String, EVERY),
    key("iter_perc", ValueKind::Number(PROBABILITY), EVERY),
    key("batch_size", ValueKind::Integer(AT_LEAST_ONE), EVERY),
    key("max_images", ValueKind::Integer(AT_LEAST_ONE), EVERY),
    key("max_regions", ValueKind::Integer(AT_LEAST_ONE), EVERY),
    key("min_perc_in_image", ValueKind::Number(PROBABILITY), EVERY),
    key("num_workers", ValueKind::Integer(NON_NEGATIVE), EVERY),
    key("careful_hflip", ValueKind::Bool, EVERY),
    key("exact_ops", ValueKind::Bool, EVERY),
];

/// `finetune_transform:` (xvlm-only softening of the fine-tune `train_transform`).
const FINETUNE_TRANSFORM: &[ConfigKey] = &[
    key("crop_scale", CROP_SCALE, EVERY),
    key("hflip", ValueKind::Bool, EVERY),
    key("rand_augment", ValueKind::Bool, EVERY),
    key("exact_ops", ValueKind::Bool, EVERY),
];

/// Every top-level key of the task configs, with the tasks that read it.
pub const TASK_CONFIG_KEYS: &[ConfigKey] = &[
    // Data.
    key("train_file", ValueKind::Files, IMAGE_FILES),
    key("train_file_regions", ValueKind::Files, REGIONS),
    key(
        "train_dataset_size",
        ValueKind::Integer(AT_LEAST_ONE),
        PRETRAININGS,
    ),
    key("images", ValueKind::Map(IMAGES), IMAGE_TEXT),
    key("regions", ValueKind::Map(REGION_STREAM), REGIONS),
    key("val_file", ValueKind::Files, &[Retrieval, Vqa, Nlvr]),
    key("test_file", ValueKind::Files, FINETUNES),
    key(
        "image_root",
        ValueKind::String,
        &[Retrieval, Nlvr, Grounding, GroundingBbox],
    ),
    key("answer_list", ValueKind::String, &[Vqa]),
    key("vqa_root", ValueKind::String, &[Vqa]),
    key("vg_root", ValueKind::String, &[Vqa]),
    key("gqa_root", ValueKind::String, &[Vqa]),
    key("refcoco_data", ValueKind::String, REFCOCO),
    key("det_file", ValueKind::String, REFCOCO),
    key("coco_file", ValueKind::String, REFCOCO),
    key("careful_hflip", ValueKind::Bool, REFCOCO),
    key(
        "finetune_transform",
        ValueKind::Map(FINETUNE_TRANSFORM),
        SOFTENED,
    ),
    // Model.
    key("use_clip_vit", ValueKind::Bool, EVERY),
    key("use_swin", ValueKind::Bool, EVERY),
    key("vision_config", ValueKind::String, EVERY),
    key("image_res", ValueKind::Integer(AT_LEAST_ONE), EVERY),
    key("patch_size", ValueKind::Integer(AT_LEAST_ONE), EVERY),
    key("use_roberta", ValueKind::Bool, EVERY),
    key("text_config", ValueKind::String, EVERY),
    key("text_encoder", ValueKind::String, EVERY),
    key("vocab", ValueKind::String, EVERY),
    key("load_bertL_by_sep", ValueKind::Bool, PRETRAININGS),
    key(
        "calc_image_bbox_loss",
        ValueKind::Bool,
        &[Pretrain, GroundingBboxPretrain],
    ),
    key("embed_dim", ValueKind::Integer(AT_LEAST_ONE), ITC),
    key("temp", ValueKind::Number(POSITIVE), ITC),
    key("num_dec_layers", ValueKind::Integer(AT_LEAST_ONE), &[Vqa]),
    key("block_num", ValueKind::Integer(NON_NEGATIVE), &[Grounding]),
    key(
        "block_num_search",
        ValueKind::List {
            item: &ValueKind::Integer(NON_NEGATIVE),
            len: None,
        },
        &[Grounding],
    ),
    // Text.
    key("max_words", ValueKind::Integer(AT_LEAST_ONE), EVERY),
    key("max_tokens", ValueKind::Integer(AT_LEAST_ONE), EVERY),
    key("eos", ValueKind::String, &[Vqa]),
    key("mask_prob", ValueKind::Number(PROBABILITY), PRETRAININGS),
    key("max_masks", ValueKind::Integer(NON_NEGATIVE), PRETRAININGS),
    key("mask_whole_word", ValueKind::Bool, PRETRAININGS),
    key("skipgram_prb", ValueKind::Number(PROBABILITY), PRETRAININGS),
    key(
        "skipgram_size",
        ValueKind::Integer(AT_LEAST_ONE),
        PRETRAININGS,
    ),
    // Training and evaluation.
    key("batch_size", ValueKind::Integer(AT_LEAST_ONE), FINETUNES),
    key(
        "batch_size_train",
        ValueKind::Integer(AT_LEAST_ONE),
        FINETUNES,
    ),
    key(
        "batch_size_test",
        ValueKind::Integer(AT_LEAST_ONE),
        FINETUNES,
    ),
    key(
        "batch_size_test_text",
        ValueKind::Integer(AT_LEAST_ONE),
        &[Retrieval],
    ),
    key(
        "k_test",
        ValueKind::Integer(AT_LEAST_ONE),
        &[Retrieval, Vqa],
    ),
    key("start_eval", ValueKind::Integer(NON_NEGATIVE), &[Vqa]),
    key(
        "ckpt_frequent_step",
        ValueKind::Integer(AT_LEAST_ONE),
        &[Pretrain],
    ),
    key(
        "ckpt_frequent",
        ValueKind::Integer(AT_LEAST_ONE),
        &[Pretrain],
    ),
    key("optimizer", ValueKind::Map(OPTIMIZER), EVERY),
    key("schedular", ValueKind::Map(SCHEDULER), EVERY),
    key("accelerator", ValueKind::Map(ACCELERATOR), PRETRAININGS),
    key("xvlm", ValueKind::Map(XVLM), EVERY),
];

/// Whether `name` is a top-level task-config key of any task.
pub fn is_known_key(name: &str) -> bool {
    TASK_CONFIG_KEYS.iter().any(|k| k.name == name)
}

/// The entry of `path` (`["optimizer", "lr"]`) in the table, for any task.
pub fn lookup(path: &[&str]) -> Option<&'static ConfigKey> {
    let (first, rest) = path.split_first()?;
    let mut entry = TASK_CONFIG_KEYS.iter().find(|k| k.name == *first)?;
    for name in rest {
        let ValueKind::Map(keys) = entry.kind else {
            return None;
        };
        entry = keys.iter().find(|k| k.name == *name)?;
    }
    Some(entry)
}

/// A key of a task config or override that the task does not accept as written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key}: {message}")]
pub struct KeyError {
    /// Dotted path of the key, with the caller's prefix (`overrides.optimizer.lr`).
    pub key: String,
    /// What is wrong and what is allowed.
    pub message: String,
}

/// Checks `entries` (a job's `overrides:`, or a whole task config) against the keys `task` reads:
/// unknown keys, keys of other tasks, wrong types and values out of range are errors whose key path
/// starts with `prefix` (e.g. `overrides`; empty for none).
pub fn check_keys(
    task: TaskKind,
    prefix: &str,
    entries: &BTreeMap<String, ConfigValue>,
) -> Result<(), KeyError> {
    check_map(task, prefix, TASK_CONFIG_KEYS, entries)
}

fn join(prefix: &str, name: &str) -> String {
    if prefix.is_empty() {
        name.to_string()
    } else {
        format!("{prefix}.{name}")
    }
}

fn names(keys: &[ConfigKey], task: TaskKind) -> String {
    keys.iter()
        .filter(|k| k.tasks.contains(&task))
        .map(|k| k.name)
        .collect::<Vec<_>>()
        .join(", ")
}

fn check_map(
    task: TaskKind,
    prefix: &str,
    keys: &'static [ConfigKey],
    entries: &BTreeMap<String, ConfigValue>,
) -> Result<(), KeyError> {
    for (name, value) in entries {
        let path = join(prefix, name);
        let error = |message: String| KeyError {
            key: path.clone(),
            message,
        };
        let Some(entry) = keys.iter().find(|k| k.name == name) else {
            return Err(error(format!(
                "unknown key for task {} (its keys here: {})",
                task.as_str(),
                names(keys, task)
            )));
        };
        if !entry.tasks.contains(&task) {
            let readers: Vec<&str> = entry.tasks.iter().map(|t| t.as_str()).collect();
            return Err(error(format!(
                "task {} does not read this key (tasks that do: {})",
                task.as_str(),
                readers.join(", ")
            )));
        }
        check_value(task, &path, entry.kind, value)?;
    }
    Ok(())
}

fn check_value(
    task: TaskKind,
    path: &str,
    kind: ValueKind,
    value: &ConfigValue,
) -> Result<(), KeyError> {
    let error = |message: String| KeyError {
        key: path.to_string(),
        message,
    };
    let ok = match kind {
        ValueKind::Number(range) => match value {
            ConfigValue::Integer(n) => range.contains(*n as f64),
            ConfigValue::Float(x) => x.is_finite() && range.contains(*x),
            ConfigValue::String(s) => s
                .trim()
                .parse::<f64>()
                .is_ok_and(|x| x.is_finite() && range.contains(x)),
            _ => false,
        },
        ValueKind::Integer(range) => {
            matches!(value, ConfigValue::Integer(n) if range.contains(*n as f64))
        }
        ValueKind::Bool => matches!(value, ConfigValue::Bool(_)),
        ValueKind::String => matches!(value, ConfigValue::String(_)),
        ValueKind::NumberOrString => match value {
            ConfigValue::Float(x) => x.is_finite(),
            ConfigValue::Integer(_) | ConfigValue::String(_) => true,
            _ => false,
        },
        ValueKind::Files => match value {
            ConfigValue::String(_) => true,
            ConfigValue::List(items) => items.iter().all(|i| matches!(i, ConfigValue::String(_))),
            _ => false,
        },
        ValueKind::List { item, len } => {
            let ConfigValue::List(items) = value else {
                return Err(error(format!("must be {}, got {value}", describe(kind))));
            };
            if len.is_some_and(|n| n != items.len()) {
                return Err(error(format!(
                    "must be {}, got {} items",
                    describe(kind),
                    items.len()
                )));
            }
            for (i, v) in items.iter().enumerate() {
                check_value(task, &format!("{path}[{i}]"), *item, v)?;
            }
            true
        }
        ValueKind::Map(keys) => {
            let ConfigValue::Map(entries) = value else {
                return Err(error(format!(
                    "must be a mapping of {}, got {value}",
                    names(keys, task)
                )));
            };
            return check_map(task, path, keys, entries);
        }
    };
    if ok {
        Ok(())
    } else {
        Err(error(format!("must be {}, got {value}", describe(kind))))
    }
}

/// What a value of `kind` is, as an error states it after "must be".
fn describe(kind: ValueKind) -> String {
    match kind {
        ValueKind::Number(range) => format!("a finite number{range}"),
        ValueKind::Integer(range) => format!("an integer{range}"),
        ValueKind::Bool => "true or false".into(),
        ValueKind::String => "a string".into(),
        ValueKind::NumberOrString => "a finite number or a string".into(),
        ValueKind::Files => "a file name or a list of file names".into(),
        ValueKind::List { item, len } => match len {
            Some(n) => format!("a list of {n} items, each {}", describe(*item)),
            None => format!("a list, each item {}", describe(*item)),
        },
        ValueKind::Map(_) => "a mapping".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> BTreeMap<String, ConfigValue> {
        serde_json::from_str(json).unwrap()
    }

    fn check(task: TaskKind, json: &str) -> Result<(), KeyError> {
        check_keys(task, "overrides", &parse(json))
    }

    /// Valid overrides pass, numeric strings count as numbers (PyYAML reads `1e-4` as one).
    #[test]
    fn valid_overrides_pass() {
        check(
            Retrieval,
            r#"{"optimizer": {"lr": 1e-4, "weight_decay": 0}, "batch_size_train": 4,
                "schedular": {"lr": "3e-5", "epochs": 2}, "finetune_transform": {"crop_scale": [0.5, 1.0]},
                "xvlm": {"dropout": false}, "train_file": ["a.json", "b.json"], "val_file": "v.json"}"#,
        )
        .unwrap();
        check(Grounding, r#"{"block_num_search": [8, 9, 10, 7]}"#).unwrap();
        check(Pretrain, r#"{"xvlm": {"itc": false, "itm": false}}"#).unwrap();
    }

    /// Each refusal names the key path and what is allowed.
    #[test]
    fn bad_overrides_are_refused_with_the_key_path() {
        let cases = [
            (
                Retrieval,
                r#"{"optimizer": {"lr": -1}}"#,
                "overrides.optimizer.lr: must be a finite number > 0, got -1",
            ),
            (
                Retrieval,
                r#"{"optimizer": {"lr": "nan"}}"#,
                "overrides.optimizer.lr: must be a finite number > 0, got \"nan\"",
            ),
            (
                Retrieval,
                r#"{"optimizer": {"lr": null}}"#,
                "overrides.optimizer.lr: must be a finite number > 0, got null",
            ),
            (
                Retrieval,
                r#"{"optimizer": {"weight_decay": -0.5}}"#,
                "overrides.optimizer.weight_decay: must be a finite number >= 0, got -0.5",
            ),
            (
                Retrieval,
                r#"{"batch_size_train": 0}"#,
                "overrides.batch_size_train: must be an integer >= 1, got 0",
            ),
            (
                Retrieval,
                r#"{"batch_size_train": 16.0}"#,
                "overrides.batch_size_train: must be an integer >= 1, got 16.0",
            ),
            (
                Retrieval,
                r#"{"schedular": {"epochs": 0}}"#,
                "overrides.schedular.epochs: must be a finite number >= 1, got 0",
            ),
            (
                Pretrain,
                r#"{"regions": {"iter_perc": 1.5}}"#,
                "overrides.regions.iter_perc: must be a finite number in [0, 1], got 1.5",
            ),
            (
                Retrieval,
                r#"{"image_res": "big"}"#,
                "overrides.image_res: must be an integer >= 1, got \"big\"",
            ),
            (
                Retrieval,
                r#"{"use_swin": 1}"#,
                "overrides.use_swin: must be true or false, got 1",
            ),
            (
                Retrieval,
                r#"{"optimizer": 3}"#,
                "overrides.optimizer: must be a mapping of opt, lr, weight_decay, lr_mult, got 3",
            ),
            (
                Retrieval,
                r#"{"finetune_transform": {"crop_scale": [0.5]}}"#,
                "overrides.finetune_transform.crop_scale: must be a list of 2 items, each a finite number in [0, 1], got 1 items",
            ),
            (
                Grounding,
                r#"{"block_num_search": [8, -1]}"#,
                "overrides.block_num_search[1]: must be an integer >= 0, got -1",
            ),
        ];
        for (task, json, want) in cases {
            assert_eq!(check(task, json).unwrap_err().to_string(), want, "{json}");
        }
    }

    /// Unknown keys list the task's keys at that level; another task's key names the tasks reading it.
    #[test]
    fn unknown_and_foreign_keys_are_refused() {
        let err = check(Retrieval, r#"{"optimizer": {"lrr": 1}}"#).unwrap_err();
        assert_eq!(err.key, "overrides.optimizer.lrr");
        assert!(
            err.message
                .contains("unknown key for task retrieval (its keys here: opt, lr,"),
            "{err}"
        );
        let err = check(Retrieval, r#"{"batch_size_tarin": 1}"#).unwrap_err();
        assert_eq!(err.key, "overrides.batch_size_tarin");
        assert!(err.message.contains("batch_size_train"), "{err}");
        let err = check(Retrieval, r#"{"block_num": 3}"#).unwrap_err();
        assert_eq!(
            err.to_string(),
            "overrides.block_num: task retrieval does not read this key (tasks that do: grounding)"
        );
        let err = check(Retrieval, r#"{"xvlm": {"itc": false}}"#).unwrap_err();
        assert_eq!(err.key, "overrides.xvlm.itc");
        let err = check(Vqa, r#"{"accelerator": {"CLIP_GRAD_NORM": 1}}"#).unwrap_err();
        assert_eq!(err.key, "overrides.accelerator");
    }

    /// Non-finite floats (which JSON cannot carry) are refused and quoted as YAML writes them.
    #[test]
    fn non_finite_numbers_are_named() {
        for (x, shown) in [
            (f64::NAN, ".nan"),
            (f64::INFINITY, ".inf"),
            (-f64::INFINITY, "-.inf"),
        ] {
            let optimizer = BTreeMap::from([("lr".to_string(), ConfigValue::Float(x))]);
            let entries = BTreeMap::from([("optimizer".to_string(), ConfigValue::Map(optimizer))]);
            let err = check_keys(Retrieval, "overrides", &entries).unwrap_err();
            assert_eq!(
                err.to_string(),
                format!("overrides.optimizer.lr: must be a finite number > 0, got {shown}")
            );
        }
    }

    /// Lookups walk nested mappings; the table has no duplicated names at any level.
    #[test]
    fn table_lookup_and_no_duplicates() {
        assert!(matches!(
            lookup(&["optimizer", "lr"]).map(|k| k.kind),
            Some(ValueKind::Number(Range::Above(_)))
        ));
        assert!(lookup(&["optimizer", "nope"]).is_none());
        assert!(lookup(&["lr"]).is_none());
        assert!(is_known_key("k_test") && !is_known_key("k_tset"));
        fn no_dups(keys: &[ConfigKey]) {
            for (i, k) in keys.iter().enumerate() {
                assert!(
                    keys[..i].iter().all(|o| o.name != k.name),
                    "{} twice",
                    k.name
                );
                assert!(!k.tasks.is_empty(), "{} has no task", k.name);
                if let ValueKind::Map(inner) = k.kind {
                    no_dups(inner);
                }
            }
        }
        no_dups(TASK_CONFIG_KEYS);
    }
}
