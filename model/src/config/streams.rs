//! The pre-training stream sections of a task config, `images:` and `regions:`, and the record keys
//! both share. One definition serves the task config and the data pipeline (model/src/data), which
//! builds its transforms and region settings from them.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::de::number;

/// How a record names its image (the `images:` / `regions:` keys of the official task config).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordKeys {
    /// Key of the image: base64 bytes, or a path when `is_image_rpath`.
    #[serde(default = "default_image_key")]
    pub image_key: String,
    /// Key of the caption(s).
    #[serde(default = "default_caption_key")]
    pub caption_key: String,
    /// Whether `image_key` holds a path under `image_root` instead of base64 bytes.
    #[serde(default)]
    pub is_image_rpath: bool,
    /// Whether captions are already space-separated word pieces.
    #[serde(default)]
    pub tokenized: bool,
    /// Root folder for image paths (not an official key; the official code uses paths as given).
    #[serde(default)]
    pub image_root: Option<PathBuf>,
}

impl Default for RecordKeys {
    fn default() -> Self {
        Self {
            image_key: default_image_key(),
            caption_key: default_caption_key(),
            is_image_rpath: false,
            tokenized: false,
            image_root: None,
        }
    }
}

/// `images:` of the official pre-training config (the image-text stream).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ImagesSection {
    /// Record keys.
    #[serde(flatten)]
    pub keys: RecordKeys,
    /// Pairs per batch (per GPU).
    pub batch_size: usize,
    /// Loader threads.
    #[serde(default = "default_workers")]
    pub num_workers: usize,
    /// xvlm-only: RandomResizedCrop area range (official: 0.2-1).
    #[serde(default = "default_crop_scale")]
    pub crop_scale: (f64, f64),
    /// xvlm-only: random horizontal flip (official: on).
    #[serde(default = "default_true")]
    pub hflip: bool,
    /// xvlm-only: RandAugment(2, 7) (official: on).
    #[serde(default = "default_true")]
    pub rand_augment: bool,
    /// xvlm-only: AutoContrast and Sharpness without the official uint8 wraps (official: wraps).
    #[serde(default)]
    pub exact_ops: bool,
}

/// `regions:` of the official pre-training config (the region-text stream).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RegionsSection {
    /// Record keys.
    #[serde(flatten)]
    pub keys: RecordKeys,
    /// Texts per region batch.
    pub batch_size: usize,
    /// Images per region batch at most.
    pub max_images: usize,
    /// Texts per image at most.
    pub max_regions: usize,
    /// A cropped box is kept if more than this fraction of it stays in the crop.
    #[serde(deserialize_with = "number")]
    pub min_perc_in_image: f64,
    /// Probability that an iteration also runs a region step (required, as `Pretrain.py` reads it).
    #[serde(deserialize_with = "number")]
    pub iter_perc: f64,
    /// Skip the flip when a caption says "left"/"right" (absent in the pre-training configs → False).
    #[serde(default)]
    pub careful_hflip: bool,
    /// Loader threads.
    #[serde(default = "default_workers")]
    pub num_workers: usize,
    /// xvlm-only: `box_transform` without the official uint8 wraps (official: wraps).
    #[serde(default)]
    pub exact_ops: bool,
}

fn default_image_key() -> String {
    "binary".into()
}

fn default_caption_key() -> String {
    "caption".into()
}

fn default_workers() -> usize {
    4
}

fn default_crop_scale() -> (f64, f64) {
    (0.2, 1.0)
}

fn default_true() -> bool {
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    const REGIONS: &str =
        "{batch_size: 6, max_images: 2, max_regions: 3, min_perc_in_image: '0.5', \
                           iter_perc: '1e-1'}";

    /// Numbers written as strings (PyYAML reads `1e-1` as one) parse; the defaults are the official
    /// ones (base64 `binary` images, `caption`, 4 loader threads, the official wraps).
    #[test]
    fn regions_take_numeric_strings_and_official_defaults() {
        let r: RegionsSection = serde_yaml::from_str(REGIONS).unwrap();
        assert_eq!((r.min_perc_in_image, r.iter_perc), (0.5, 0.1));
        assert_eq!(r.keys, RecordKeys::default());
        assert_eq!(r.num_workers, 4);
        assert!(!r.exact_ops && !r.careful_hflip);
        let i: ImagesSection = serde_yaml::from_str("{batch_size: 8}").unwrap();
        assert_eq!(
            (i.num_workers, i.crop_scale, i.hflip),
            (4, (0.2, 1.0), true)
        );
    }

    /// `Pretrain.py` reads `regions.iter_perc` unconditionally, so a section without it is refused
    /// by name rather than read as "never a region step".
    #[test]
    fn regions_without_iter_perc_are_refused() {
        let text = REGIONS.replace(", iter_perc: '1e-1'", "");
        let err = serde_yaml::from_str::<RegionsSection>(&text).unwrap_err();
        assert!(err.to_string().contains("iter_perc"), "{err}");
    }
}
