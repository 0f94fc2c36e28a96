//! Where fine-tuning files live: annotation JSON and images as plain paths, `file://` or `s3://` URLs
//! (opened by `xvlm_proto::storage`), resolved against the config's folder, and read whole.

use std::path::{Component, Path, PathBuf};

use object_store::ObjectStoreExt;
use serde_json::Value;

use crate::data::formats::resolve_under;
use crate::data::DataError;

/// Whether `name` is a URL (`scheme://...`) rather than a local path.
pub fn is_url(name: &str) -> bool {
    name.contains("://")
}

/// A config file name made usable: URLs and absolute paths as they are, relative paths joined to `base`.
pub fn resolve_location(base: &Path, name: &str) -> String {
    if is_url(name) || Path::new(name).is_absolute() {
        name.to_string()
    } else {
        base.join(name).display().to_string()
    }
}

fn annotation_err(file: &str, reason: impl ToString) -> DataError {
    DataError::Annotation {
        file: file.to_string(),
        index: None,
        reason: reason.to_string(),
    }
}

/// The whole content of a local file or an object.
pub fn read_bytes(location: &str) -> Result<Vec<u8>, DataError> {
    if !is_url(location) {
        let path = PathBuf::from(location);
        return std::fs::read(&path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                DataError::MissingFile(path)
            } else {
                DataError::Io { path, source: e }
            }
        });
    }
    let located = xvlm_proto::storage::open(location, &[]).map_err(|e| DataError::BadLocation {
        url: location.to_string(),
        reason: e.reason,
    })?;
    let store_err = |e: object_store::Error| match e {
        object_store::Error::NotFound { .. } => DataError::MissingFile(PathBuf::from(location)),
        e => DataError::Store {
            url: location.to_string(),
            message: e.to_string(),
        },
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| DataError::Store {
            url: location.to_string(),
            message: format!("cannot start I/O runtime: {e}"),
        })?;
    rt.block_on(async {
        let got = located.store.get(&located.path).await.map_err(store_err)?;
        got.bytes().await.map(|b| b.to_vec()).map_err(store_err)
    })
}

/// A JSON document read from `location`; invalid JSON is an error naming the file.
pub fn read_json(location: &str) -> Result<Value, DataError> {
    let bytes = read_bytes(location)?;
    serde_json::from_slice(&bytes)
        .map_err(|e| annotation_err(location, format!("invalid JSON: {e}")))
}

/// A JSON file whose top level must be a list (every official fine-tuning annotation file).
pub fn read_json_list(location: &str) -> Result<Vec<Value>, DataError> {
    match read_json(location)? {
        Value::Array(items) => Ok(items),
        other => Err(annotation_err(
            location,
            format!("expected a JSON list, found {}", json_type(&other)),
        )),
    }
}

/// The JSON type name of a value, for error messages.
pub fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// An image root (`image_root`, `vqa_root`, `vg_root`, ...): a local folder or a URL prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRoot(pub String);

impl ImageRoot {
    /// The location of `rel` under the root (`os.path.join(root, rel)`); paths that leave the root are
    /// rejected.
    pub fn join(&self, rel: &str) -> Result<String, String> {
        if !is_url(&self.0) {
            return resolve_under(Path::new(&self.0), rel)
                .map(|p| p.display().to_string())
                .map_err(|e| match e {
                    DataError::Sample(why) => why,
                    other => other.to_string(),
                });
        }
        let p = Path::new(rel);
        if p.components().any(|c| matches!(c, Component::ParentDir)) {
            return Err(format!("image path {rel:?} leaves the image root"));
        }
        let rel = rel.trim_start_matches('/');
        if rel.is_empty() {
            return Err("empty image path".into());
        }
        Ok(format!("{}/{rel}", self.0.trim_end_matches('/')))
    }

    /// Whether the root is local (so image existence can be checked up front cheaply).
    pub fn is_local(&self) -> bool {
        !is_url(&self.0)
    }
}
