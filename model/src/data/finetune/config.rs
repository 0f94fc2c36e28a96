//! The data keys of the official fine-tuning task YAMLs, read from a YAML value (a task file, a parsed
//! [`TaskConfig`], or a parity case's per-task file), with every file name resolved once.

use std::path::Path;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer};

use super::source::{is_url, resolve_location};
use crate::config::TaskConfig;
use crate::data::DataError;

/// `str | [str]` as a list (the official configs use both for `train_file` / `test_file`).
pub fn one_or_many<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(match OneOrMany::deserialize(d)? {
        OneOrMany::One(s) => vec![s],
        OneOrMany::Many(v) => v,
    })
}

/// Parses the data keys `T` out of a whole task YAML (other keys are ignored).
pub fn parse_keys<T: DeserializeOwned>(
    value: &serde_yaml::Value,
    source: &str,
) -> Result<T, DataError> {
    serde_yaml::from_value(value.clone()).map_err(|e| DataError::Config(format!("{source}: {e}")))
}

/// Reads a YAML file into a value.
pub fn read_yaml(path: &Path) -> Result<serde_yaml::Value, DataError> {
    let text = std::fs::read_to_string(path).map_err(|e| DataError::Io {
        path: path.to_path_buf(),
        source: e,
    })?;
    serde_yaml::from_str(&text).map_err(|e| DataError::Config(format!("{}: {e}", path.display())))
}

/// How relative file names in a config become locations.
pub enum Resolver<'a> {
    /// Joined to this folder (a task file's folder, a parity case folder).
    Base(&'a Path),
    /// [`TaskConfig::resolve`] (config folder, working directory, config parent; first that exists).
    Task(&'a TaskConfig),
}

impl Resolver<'_> {
    /// The location of `name`: URLs unchanged.
    pub fn resolve(&self, name: &str) -> String {
        if is_url(name) {
            return name.to_string();
        }
        match self {
            Resolver::Base(base) => resolve_location(base, name),
            Resolver::Task(cfg) => cfg.resolve(name).display().to_string(),
        }
    }

    /// Every name of a list resolved.
    pub fn resolve_all(&self, names: &[String]) -> Vec<String> {
        names.iter().map(|n| self.resolve(n)).collect()
    }
}

/// A parsed [`TaskConfig`] as the YAML value it came from (typed and extra keys together); its unset
/// optional keys (serialised as null) are dropped so the data keys' defaults apply.
pub fn task_value(cfg: &TaskConfig) -> Result<serde_yaml::Value, DataError> {
    let mut value = serde_yaml::to_value(cfg)
        .map_err(|e| DataError::Config(format!("{}: {e}", cfg.source.display())))?;
    if let serde_yaml::Value::Mapping(m) = &mut value {
        m.retain(|_, v| !v.is_null());
    }
    Ok(value)
}

/// The `pre_caption` word limit of every fine-tuning dataset (their constructors' default).
pub const fn default_max_words() -> usize {
    30
}

/// The fine-tuning `max_tokens` of the official task configs.
pub const fn default_max_tokens() -> usize {
    40
}
