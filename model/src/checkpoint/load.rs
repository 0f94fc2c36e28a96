//! Loading a state dict into a `VarStore` by official key, with a report of what did not match.

use tch::nn::VarStore;

use super::{CheckpointError, ShapeMismatch, StateDict};

/// Key suffixes of buffers the official models keep in their state dict but we compute instead
/// (Swin `relative_position_index` and shift `attn_mask`, `position_ids` of BERT/RoBERTa/CLIP).
pub const COMPUTED_BUFFERS: [&str; 3] = ["relative_position_index", "attn_mask", "position_ids"];

/// Whether `key` names one of the [`COMPUTED_BUFFERS`].
pub fn is_computed_buffer(key: &str) -> bool {
    let last = key.rsplit('.').next().unwrap_or(key);
    COMPUTED_BUFFERS.contains(&last)
}

/// How strictly to load.
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// Fail on missing or unexpected keys (the official loaders are non-strict).
    pub strict: bool,
    /// Checkpoint keys that are expected not to match a variable (e.g. tied aliases such as
    /// `text_encoder.cls.predictions.decoder.weight`); they are reported as `ignored`.
    pub ignore: Vec<String>,
}

/// What a load did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LoadReport {
    /// Variables filled from the checkpoint.
    pub loaded: Vec<String>,
    /// Variables with no checkpoint key (left as initialised).
    pub missing: Vec<String>,
    /// Checkpoint keys with no variable (not counting ignored ones).
    pub unexpected: Vec<String>,
    /// Computed buffers and `LoadOptions::ignore` keys present in the checkpoint and skipped.
    pub ignored: Vec<String>,
}

impl std::fmt::Display for LoadReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "loaded {} tensors, {} missing, {} unexpected, {} ignored buffers/aliases",
            self.loaded.len(),
            self.missing.len(),
            self.unexpected.len(),
            self.ignored.len()
        )?;
        if !self.missing.is_empty() {
            write!(f, "; missing: {}", self.missing.join(", "))?;
        }
        if !self.unexpected.is_empty() {
            write!(f, "; unexpected: {}", self.unexpected.join(", "))?;
        }
        Ok(())
    }
}

/// Copies every tensor of `sd` into the variable of the same name (converting dtype and device).
///
/// Shape mismatches are always an error naming each key (like `load_state_dict`, even non-strict); nothing
/// is copied unless all shapes agree. Missing/unexpected keys are errors only when `opts.strict`.
pub fn load_state_dict(
    vs: &VarStore,
    sd: &StateDict,
    opts: &LoadOptions,
) -> Result<LoadReport, CheckpointError> {
    let vars = vs.variables();
    let mut report = LoadReport::default();
    let mut mismatches = Vec::new();
    let mut names: Vec<&String> = vars.keys().collect();
    names.sort();
    for name in names {
        let var = &vars[name];
        match sd.get(name) {
            None => report.missing.push(name.clone()),
            Some(t) if t.size() != var.size() => mismatches.push(ShapeMismatch {
                key: name.clone(),
                model: var.size(),
                checkpoint: t.size(),
            }),
            Some(_) => report.loaded.push(name.clone()),
        }
    }
    for key in sd.keys() {
        if vars.contains_key(key) {
            continue;
        }
        if is_computed_buffer(key) || opts.ignore.iter().any(|i| i == key) {
            report.ignored.push(key.clone());
        } else {
            report.unexpected.push(key.clone());
        }
    }
    if !mismatches.is_empty() {
        return Err(CheckpointError::ShapeMismatch(mismatches));
    }
    if opts.strict && (!report.missing.is_empty() || !report.unexpected.is_empty()) {
        return Err(CheckpointError::Keys {
            missing: report.missing,
            unexpected: report.unexpected,
        });
    }
    tch::no_grad(|| -> Result<(), CheckpointError> {
        for name in &report.loaded {
            let mut var = vars[name].shallow_clone();
            var.f_copy_(&sd[name])?;
        }
        Ok(())
    })?;
    Ok(report)
}

/// The variables of `vs` as a state dict (shallow handles, sorted by key).
pub fn varstore_state_dict(vs: &VarStore) -> StateDict {
    vs.variables().into_iter().collect()
}

/// Adds every `(alias, source)` pair to `sd` as another handle on the source tensor, so tied weights
/// (MLM decoder = word embeddings, NLVR shared cross K/V) are saved under every official key.
pub fn add_aliases(
    sd: &mut StateDict,
    aliases: &[(String, String)],
) -> Result<(), CheckpointError> {
    for (alias, source) in aliases {
        let t = sd
            .get(source)
            .ok_or_else(|| {
                CheckpointError::MissingKey(format!("{source} (source of alias {alias})"))
            })?
            .shallow_clone();
        sd.insert(alias.clone(), t);
    }
    Ok(())
}
