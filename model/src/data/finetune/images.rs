//! Fine-tuning images: reading a dataset image (errors name the annotation file and item), the official
//! fine-tune transforms (reference §3.4, §5.1), and stacking into `[B, 3, R, R]`.
//!
//! - `train_transform` (retrieval, NLVR2): [`TrainTransform::finetune`] = RandomResizedCrop(R, scale
//!   (0.5, 1), bicubic) → RandomHorizontalFlip → RandomAugment(2, 7, the ten ops) → ToTensor → Normalize;
//! - `train_transform_wohflip` (VQA, the dataset flips): the same without the flip;
//! - grounding (weak) train: [`GroundingTrainTransform`] = Resize((R, R)) → flip → RandomAugment;
//! - `box_transform` (grounding with boxes, after the dataset's crop/flip/resize): colour ops only;
//! - `test_transform`: [`TestTransform`] = Resize((R, R), bicubic) → ToTensor → Normalize (PIL-exact).

use rand::Rng;
use rand_chacha::ChaCha8Rng;
use tch::Tensor;

use super::source::{read_bytes, ImageRoot};
use crate::data::augment::{RandAugment, ALL_OPS};
use crate::data::pixels::{self, RgbImage, CLIP_MEAN, CLIP_STD};
use crate::data::transform::{TestTransform, TrainTransform};
use crate::data::DataError;

/// The image of one annotation item: where it is, and which file/item named it (for errors).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageAt {
    /// Path or URL of the image.
    pub location: String,
    /// The annotation file that names it.
    pub file: String,
    /// The item's index in that file.
    pub index: usize,
}

impl ImageAt {
    /// Resolves `rel` under `root`; a path leaving the root is an error naming file and index.
    pub fn new(root: &ImageRoot, rel: &str, file: &str, index: usize) -> Result<Self, DataError> {
        let location = root.join(rel).map_err(|why| DataError::Annotation {
            file: file.to_string(),
            index: Some(index),
            reason: why,
        })?;
        Ok(Self {
            location,
            file: file.to_string(),
            index,
        })
    }

    /// An error about this image, naming the annotation item.
    pub fn err(&self, reason: impl std::fmt::Display) -> DataError {
        DataError::Annotation {
            file: self.file.clone(),
            index: Some(self.index),
            reason: format!("image {}: {reason}", self.location),
        }
    }

    /// The encoded bytes.
    pub fn read(&self) -> Result<Vec<u8>, DataError> {
        read_bytes(&self.location).map_err(|e| match e {
            DataError::MissingFile(_) => self.err("missing"),
            e => self.err(e),
        })
    }

    /// Decoded as PIL `Image.open(p).convert('RGB')` (alpha dropped, grey replicated, EXIF not applied).
    pub fn decode(&self) -> Result<RgbImage, DataError> {
        pixels::decode(&self.read()?).map_err(|e| self.err(e))
    }

    /// Fails (naming the item) if a local image file does not exist; URLs are checked when read.
    pub fn check_exists(&self) -> Result<(), DataError> {
        if super::source::is_url(&self.location) || std::path::Path::new(&self.location).is_file() {
            Ok(())
        } else {
            Err(self.err("missing"))
        }
    }
}

/// Checks that every distinct local image exists (cheap up-front check; a missing one names its first
/// item).
pub fn check_all_exist<'a>(images: impl IntoIterator<Item = &'a ImageAt>) -> Result<(), DataError> {
    let mut seen = std::collections::HashSet::new();
    for im in images {
        if seen.insert(im.location.as_str()) {
            im.check_exists()?;
        }
    }
    Ok(())
}

/// The image transform a fine-tuning dataset applies.
#[derive(Debug, Clone)]
pub enum ImageTransform {
    /// Deterministic `test_transform`.
    Test(TestTransform),
    /// RandomResizedCrop training transform (`train_transform`, or `train_transform_wohflip` with the
    /// flip off).
    Train(TrainTransform),
    /// The weakly supervised grounding train transform.
    GroundingTrain(GroundingTrainTransform),
}

impl ImageTransform {
    /// The official fine-tune `train_transform` at side `res`.
    pub fn train(res: usize) -> Self {
        Self::Train(TrainTransform::finetune(res))
    }

    /// The official `test_transform` at side `res`.
    pub fn test(res: usize) -> Self {
        Self::Test(TestTransform::new(res))
    }

    /// The output side.
    pub fn res(&self) -> usize {
        match self {
            Self::Test(t) => t.res,
            Self::Train(t) => t.res,
            Self::GroundingTrain(t) => t.res,
        }
    }

    /// `[3, R, R]` normalised values of an encoded image.
    pub fn apply_bytes(&self, rng: &mut ChaCha8Rng, bytes: &[u8]) -> Result<Vec<f32>, DataError> {
        match self {
            Self::Test(t) => t.apply_bytes(bytes),
            Self::Train(t) => t.apply_bytes(rng, bytes),
            Self::GroundingTrain(t) => Ok(t.apply(rng, &pixels::decode(bytes)?)),
        }
    }

    /// `[3, R, R]` normalised values of a decoded image.
    pub fn apply(&self, rng: &mut ChaCha8Rng, img: &RgbImage) -> Vec<f32> {
        match self {
            Self::Test(t) => t.apply(img),
            Self::Train(t) => t.apply(rng, img),
            Self::GroundingTrain(t) => t.apply(rng, img),
        }
    }

    /// Reads, decodes and transforms the image of `at`.
    pub fn load(&self, rng: &mut ChaCha8Rng, at: &ImageAt) -> Result<Vec<f32>, DataError> {
        let bytes = at.read()?;
        self.apply_bytes(rng, &bytes).map_err(|e| at.err(e))
    }
}

/// Grounding (weak) train: `Resize((R, R), bicubic) → RandomHorizontalFlip → RandomAugment(2, 7) →
/// ToTensor → Normalize`.
#[derive(Debug, Clone)]
pub struct GroundingTrainTransform {
    /// Output side R.
    pub res: usize,
    /// The augmentation (the ten ops).
    pub rand_augment: RandAugment,
}

impl GroundingTrainTransform {
    /// At side `res`.
    pub fn new(res: usize) -> Self {
        Self {
            res,
            rand_augment: RandAugment::new(&ALL_OPS),
        }
    }

    /// The transform of a decoded image.
    pub fn apply(&self, rng: &mut impl Rng, img: &RgbImage) -> Vec<f32> {
        let mut out = pixels::resize_bicubic_crop_fast(
            img,
            (0, 0, img.width, img.height),
            self.res,
            self.res,
        );
        if rng.random::<f64>() < 0.5 {
            out.hflip();
        }
        self.rand_augment.apply(rng, &mut out);
        pixels::to_normalized_chw(&out, CLIP_MEAN, CLIP_STD)
    }
}

/// `ToTensor → Normalize` of an already resized image.
pub fn normalize(img: &RgbImage) -> Vec<f32> {
    pixels::to_normalized_chw(img, CLIP_MEAN, CLIP_STD)
}

/// Stacks `[3, R, R]` images into a `[B, 3, R, R]` float tensor.
pub fn stack(images: &[Vec<f32>], res: usize) -> Tensor {
    let flat: Vec<f32> = images.iter().flatten().copied().collect();
    let r = res as i64;
    Tensor::from_slice(&flat).view([images.len() as i64, 3, r, r])
}
