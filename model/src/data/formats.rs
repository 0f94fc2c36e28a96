//! The official pre-training json-lines records (reference §3.1): image-text pairs and region annotations.

use std::path::{Component, Path, PathBuf};

use crate::config::RecordKeys;
use base64::Engine;
use serde_json::Value;

use super::DataError;

/// An image named by a record, not yet loaded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageRef {
    /// Encoded bytes (decoded from base64).
    Bytes(Vec<u8>),
    /// A file under the image root.
    Path(PathBuf),
}

impl ImageRef {
    /// The encoded image bytes (reads the file for a path).
    pub fn load(&self) -> Result<std::borrow::Cow<'_, [u8]>, DataError> {
        match self {
            ImageRef::Bytes(b) => Ok(std::borrow::Cow::Borrowed(b)),
            ImageRef::Path(p) => std::fs::read(p)
                .map(std::borrow::Cow::Owned)
                .map_err(|e| DataError::Sample(format!("cannot read image {}: {e}", p.display()))),
        }
    }
}

/// One image-text pair line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageTextRecord {
    /// The image.
    pub image: ImageRef,
    /// Candidate captions (one is chosen per read).
    pub captions: Vec<String>,
}

/// One annotated region (`elems` entry).
#[derive(Debug, Clone, PartialEq)]
pub struct RegionElem {
    /// Box `[x, y, w, h]` in pixels, top-left origin.
    pub bb: [f64; 4],
    /// Candidate captions.
    pub captions: Vec<String>,
    /// Candidate attributes (one is prepended to the caption when present).
    pub attributes: Vec<String>,
}

/// One region-annotation line.
#[derive(Debug, Clone, PartialEq)]
pub struct RegionRecord {
    /// The image.
    pub image: ImageRef,
    /// The annotated regions.
    pub elems: Vec<RegionElem>,
    /// Whole-image captions (optional `caption`).
    pub captions: Vec<String>,
}

fn bad(msg: impl Into<String>) -> DataError {
    DataError::Sample(msg.into())
}

/// Parse a line as a JSON object.
pub fn parse_object(line: &[u8]) -> Result<serde_json::Map<String, Value>, DataError> {
    let text = std::str::from_utf8(line).map_err(|e| bad(format!("line is not UTF-8: {e}")))?;
    match serde_json::from_str::<Value>(text) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(bad("line is not a JSON object")),
        Err(e) => Err(bad(format!("invalid JSON: {e}"))),
    }
}

/// A `str | [str]` field; `None` when absent.
fn strings(v: Option<&Value>, key: &str) -> Result<Option<Vec<String>>, DataError> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(vec![s.clone()])),
        Some(Value::Array(items)) => {
            let out: Option<Vec<String>> =
                items.iter().map(|i| i.as_str().map(String::from)).collect();
            match out {
                Some(v) if !v.is_empty() => Ok(Some(v)),
                Some(_) => Err(bad(format!("`{key}` is an empty list"))),
                None => Err(bad(format!("`{key}` has a non-string entry"))),
            }
        }
        Some(_) => Err(bad(format!(
            "`{key}` is neither a string nor a list of strings"
        ))),
    }
}

/// Resolve `rel` under `root`; a path that would leave the root is rejected.
pub fn resolve_under(root: &Path, rel: &str) -> Result<PathBuf, DataError> {
    let p = Path::new(rel);
    let mut clean = PathBuf::new();
    for comp in p.components() {
        match comp {
            Component::Normal(c) => clean.push(c),
            Component::CurDir => {}
            Component::RootDir | Component::Prefix(_) => {}
            Component::ParentDir => {
                return Err(bad(format!("image path {rel:?} leaves the image root")));
            }
        }
    }
    if p.is_absolute() {
        let abs = Path::new("/").join(&clean);
        return match abs.strip_prefix(root) {
            Ok(_) => Ok(abs),
            Err(_) => Err(bad(format!(
                "image path {rel:?} is outside the image root {}",
                root.display()
            ))),
        };
    }
    if clean.as_os_str().is_empty() {
        return Err(bad("empty image path"));
    }
    Ok(root.join(clean))
}

fn image_ref(
    obj: &serde_json::Map<String, Value>,
    keys: &RecordKeys,
) -> Result<ImageRef, DataError> {
    let raw = obj
        .get(&keys.image_key)
        .and_then(Value::as_str)
        .ok_or_else(|| bad(format!("missing string `{}`", keys.image_key)))?;
    if keys.is_image_rpath {
        let root = keys.image_root.as_deref().unwrap_or(Path::new("."));
        return resolve_under(root, raw).map(ImageRef::Path);
    }
    base64::engine::general_purpose::STANDARD
        .decode(raw.trim())
        .map(ImageRef::Bytes)
        .map_err(|e| bad(format!("`{}` is not base64: {e}", keys.image_key)))
}

/// Parse an image-text line.
pub fn parse_image_text(line: &[u8], keys: &RecordKeys) -> Result<ImageTextRecord, DataError> {
    let obj = parse_object(line)?;
    let captions = strings(obj.get(&keys.caption_key), &keys.caption_key)?
        .ok_or_else(|| bad(format!("missing `{}`", keys.caption_key)))?;
    Ok(ImageTextRecord {
        image: image_ref(&obj, keys)?,
        captions,
    })
}

/// Parse a region-annotation line.
pub fn parse_region(line: &[u8], keys: &RecordKeys) -> Result<RegionRecord, DataError> {
    let obj = parse_object(line)?;
    let elems_v = obj
        .get("elems")
        .and_then(Value::as_array)
        .ok_or_else(|| bad("missing `elems` list"))?;
    let mut elems = Vec::with_capacity(elems_v.len());
    for e in elems_v {
        let e = e
            .as_object()
            .ok_or_else(|| bad("`elems` entry is not an object"))?;
        let bb_v = e
            .get("bb")
            .and_then(Value::as_array)
            .filter(|a| a.len() == 4)
            .ok_or_else(|| bad("`bb` must be [x, y, w, h]"))?;
        let mut bb = [0f64; 4];
        for (slot, v) in bb.iter_mut().zip(bb_v) {
            *slot = v
                .as_f64()
                .filter(|x| x.is_finite())
                .ok_or_else(|| bad("`bb` has a non-number"))?;
        }
        let captions = strings(e.get("caption"), "caption")?
            .ok_or_else(|| bad("`elems` entry without caption"))?;
        let attributes = strings(e.get("attributes"), "attributes")?.unwrap_or_default();
        elems.push(RegionElem {
            bb,
            captions,
            attributes,
        });
    }
    if elems.is_empty() {
        return Err(bad("`elems` is empty"));
    }
    Ok(RegionRecord {
        image: image_ref(&obj, keys)?,
        elems,
        captions: strings(obj.get("caption"), "caption")?.unwrap_or_default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_cannot_escape_root() {
        let root = Path::new("/data/img");
        assert_eq!(
            resolve_under(root, "a/b.jpg").unwrap(),
            root.join("a/b.jpg")
        );
        assert!(resolve_under(root, "../etc/passwd").is_err());
        assert!(resolve_under(root, "a/../../x").is_err());
        assert!(resolve_under(root, "/etc/passwd").is_err());
        assert_eq!(
            resolve_under(root, "/data/img/x.jpg").unwrap(),
            PathBuf::from("/data/img/x.jpg")
        );
    }

    #[test]
    fn captions_str_or_list() {
        let keys = RecordKeys::default();
        let r = parse_image_text(br#"{"binary": "AAEC", "caption": ["a", "b"]}"#, &keys).unwrap();
        assert_eq!(r.captions, vec!["a", "b"]);
        assert_eq!(r.image, ImageRef::Bytes(vec![0, 1, 2]));
        assert!(parse_image_text(br#"{"binary": "AAEC", "caption": 3}"#, &keys).is_err());
        assert!(parse_image_text(b"{not json", &keys).is_err());
        assert!(parse_image_text(b"\xff\xfe", &keys).is_err());
    }
}
