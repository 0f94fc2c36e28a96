//! Kind `param_keys`: the state-dict keys, shapes and dtypes of each official model for the real base
//! configurations (`param_keys_*.tsv`) against the state dict of our model built from `configs/`.
//!
//! Our side is the model's full state dict (`XvlmCore::state_dict`: parameters, tied aliases, computed
//! buffers); a computed buffer (`relative_position_index`, `attn_mask`, `position_ids`) may be absent but,
//! when present, must have the official shape and dtype.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use tch::nn::VarStore;
use tch::{Device, Kind};

use super::{Comparison, ParityError};
use crate::checkpoint::load::is_computed_buffer;
use crate::checkpoint::StateDict;
use crate::config::TaskConfig;
use crate::tasks::{GroundingBboxModel, NlvrModel, PretrainModel, RetrievalModel, VqaModel};
use crate::xvlm::ModelError;

pub use crate::config::configs_dir;

/// One row of a `param_keys_*.tsv`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRow {
    /// State-dict key.
    pub key: String,
    /// Shape.
    pub shape: Vec<i64>,
    /// `float32`, `int64`, ….
    pub dtype: String,
    /// `param` or `buffer`.
    pub kind: String,
    /// The earlier key this entry is the same tensor as.
    pub tied_to: Option<String>,
}

/// Reads a TSV with the header `key shape dtype kind tied_to`.
pub fn read_tsv(path: &Path) -> Result<Vec<KeyRow>, ParityError> {
    let bad = |reason: String| ParityError::Read {
        path: path.to_path_buf(),
        reason,
    };
    let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
    let mut rows = Vec::new();
    for (i, line) in text.lines().enumerate().skip(1) {
        if line.trim().is_empty() {
            continue;
        }
        let cols: Vec<&str> = line.split('\t').collect();
        if cols.len() < 4 {
            return Err(bad(format!(
                "line {}: expected 5 tab-separated columns",
                i + 1
            )));
        }
        let dims = cols[1].trim_matches(|c| c == '[' || c == ']');
        let shape = if dims.trim().is_empty() {
            vec![]
        } else {
            dims.split(',')
                .map(|d| d.trim().parse::<i64>())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| bad(format!("line {}: shape {:?}: {e}", i + 1, cols[1])))?
        };
        rows.push(KeyRow {
            key: cols[0].to_string(),
            shape,
            dtype: cols[2].to_string(),
            kind: cols[3].to_string(),
            tied_to: cols.get(4).filter(|s| !s.is_empty()).map(|s| s.to_string()),
        });
    }
    Ok(rows)
}

fn dtype_name(kind: Kind) -> String {
    match kind {
        Kind::Float => "float32".into(),
        Kind::Double => "float64".into(),
        Kind::Half => "float16".into(),
        Kind::BFloat16 => "bfloat16".into(),
        Kind::Int64 => "int64".into(),
        Kind::Int => "int32".into(),
        Kind::Bool => "bool".into(),
        other => format!("{other:?}"),
    }
}

/// Key → (shape, dtype) of a state dict.
pub fn model_keys(sd: &StateDict) -> BTreeMap<String, (Vec<i64>, String)> {
    sd.iter()
        .map(|(k, t)| (k.clone(), (t.size(), dtype_name(t.kind()))))
        .collect()
}

/// Compares the official rows with our keys: a summary row named `label`, then one failing row per
/// missing, extra or mismatched key.
pub fn compare_keys(
    label: &str,
    official: &[KeyRow],
    ours: &BTreeMap<String, (Vec<i64>, String)>,
) -> Vec<Comparison> {
    let fail = |name: String, note: String| Comparison {
        name,
        max_abs: f64::INFINITY,
        max_rel: f64::INFINITY,
        passed: false,
        note: Some(note),
    };
    let mut problems = Vec::new();
    let mut left_out = 0;
    for row in official {
        match ours.get(&row.key) {
            None if is_computed_buffer(&row.key) => left_out += 1,
            None => problems.push(fail(row.key.clone(), "missing in our model".into())),
            Some((shape, dtype)) if *shape != row.shape || *dtype != row.dtype => {
                problems.push(fail(
                    row.key.clone(),
                    format!(
                        "ours {shape:?} {dtype}, official {:?} {}",
                        row.shape, row.dtype
                    ),
                ))
            }
            Some(_) => {}
        }
    }
    let official_keys: std::collections::HashSet<&str> =
        official.iter().map(|r| r.key.as_str()).collect();
    for key in ours.keys() {
        if !official_keys.contains(key.as_str()) {
            problems.push(fail(key.clone(), "not an official key".into()));
        }
    }
    let summary = Comparison {
        name: label.to_string(),
        max_abs: 0.0,
        max_rel: 0.0,
        passed: problems.is_empty(),
        note: Some(format!(
            "{} official entries, {} ours, {} problems, {} computed buffers left out",
            official.len(),
            ours.len(),
            problems.len(),
            left_out
        )),
    };
    std::iter::once(summary).chain(problems).collect()
}

/// Builds (on CPU, random init) the model a `param_keys_<name>.tsv` describes, from the base configs in
/// `configs`, and returns its full state dict (parameters, tied aliases, computed buffers). `None` for
/// models this build does not implement yet.
pub fn build_model(name: &str, configs: &Path) -> Result<Option<StateDict>, ParityError> {
    let vs = VarStore::new(Device::Cpu);
    let pretrain_yaml = configs.join("Pretrain_XVLM_base_4m.yaml");
    // Each model from its official task config (the CLIP/RoBERTa variant patches the 4M one as the
    // fixture generator did).
    let sd = match name {
        "pretrain" => {
            let task = TaskConfig::load(&pretrain_yaml).map_err(ModelError::from)?;
            PretrainModel::new(&vs.root(), &task)?.core.state_dict(&vs)
        }
        "pretrain_clipvit_roberta" => {
            let mut task = TaskConfig::load(&pretrain_yaml).map_err(ModelError::from)?;
            task.use_clip_vit = true;
            task.use_swin = false;
            task.vision_config = Some(configs.join("config_clipvitB.json").display().to_string());
            task.image_res = 224;
            task.patch_size = 16;
            task.use_roberta = true;
            task.text_config = configs.join("config_roberta.json").display().to_string();
            PretrainModel::new(&vs.root(), &task)?.core.state_dict(&vs)
        }
        "retrieval" => {
            let task = load_task(&configs.join("Retrieval_coco.yaml"))?;
            RetrievalModel::new(&vs.root(), &task)?.core.state_dict(&vs)
        }
        "grounding_bbox" => {
            let task = load_task(&configs.join("Grounding_bbox.yaml"))?;
            GroundingBboxModel::new(&vs.root(), &task)?
                .core
                .state_dict(&vs)
        }
        "nlvr" => {
            let task = load_task(&configs.join("NLVR.yaml"))?;
            let model = NlvrModel::new(&vs.root(), &task)?;
            model.core.state_dict(&vs)
        }
        "vqa" => {
            let task = load_task(&configs.join("VQA.yaml"))?;
            VqaModel::new(&vs.root(), &task)?.state_dict(&vs)
        }
        _ => return Ok(None),
    };
    Ok(Some(sd))
}

fn load_task(path: &Path) -> Result<TaskConfig, ParityError> {
    Ok(TaskConfig::load(path).map_err(ModelError::from)?)
}

/// Runs every `param_keys_*.tsv` in `dir` (selected by `only`, if given) against our models.
pub fn run_filtered(dir: &Path, only: Option<&str>) -> Result<Vec<Comparison>, ParityError> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| ParityError::Read {
            path: dir.to_path_buf(),
            reason: e.to_string(),
        })?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("param_keys_") && n.ends_with(".tsv"))
        })
        .collect();
    files.sort();
    let mut rows = Vec::new();
    for file in files {
        let stem = file
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or_default();
        let name = stem.trim_start_matches("param_keys_");
        if only.is_some_and(|o| !name.starts_with(o)) {
            continue;
        }
        let official = read_tsv(&file)?;
        match build_model(name, &configs_dir())? {
            Some(sd) => rows.extend(compare_keys(stem, &official, &model_keys(&sd))),
            None => rows.push(Comparison {
                name: stem.to_string(),
                max_abs: f64::INFINITY,
                max_rel: f64::INFINITY,
                passed: false,
                note: Some(format!("the {name} model is not implemented yet")),
            }),
        }
    }
    Ok(rows)
}

/// Kind `param_keys`: every TSV in the case folder.
pub fn run(dir: &Path) -> Result<Vec<Comparison>, ParityError> {
    run_filtered(dir, None)
}
