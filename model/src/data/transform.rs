//! The official image pipelines (reference §3.4): `test_transform`, the RandomResizedCrop training
//! transforms, and the colour-only `box_transform` of region batches. Outputs are normalised CHW float32.

use rand::Rng;

use super::augment::{self, CropBox, OpArithmetic, RandAugment};
use super::pixels::{self, RgbImage, CLIP_MEAN, CLIP_STD};
use super::DataError;

/// `Resize((R, R), bicubic) -> ToTensor -> Normalize(CLIP)`.
#[derive(Debug, Clone)]
pub struct TestTransform {
    /// Output side R.
    pub res: usize,
}

impl TestTransform {
    /// The test transform at resolution `res`.
    pub fn new(res: usize) -> Self {
        Self { res }
    }

    /// Transform a decoded image: `[3, R, R]` values.
    pub fn apply(&self, img: &RgbImage) -> Vec<f32> {
        let resized = pixels::resize_bicubic(img, self.res, self.res);
        pixels::to_normalized_chw(&resized, CLIP_MEAN, CLIP_STD)
    }

    /// Decode JPEG/PNG bytes and transform.
    pub fn apply_bytes(&self, bytes: &[u8]) -> Result<Vec<f32>, DataError> {
        Ok(self.apply(&pixels::decode(bytes)?))
    }
}

/// `RandomResizedCrop(R, scale, bicubic) -> RandomHorizontalFlip -> RandAugment(2, 7) -> ToTensor ->
/// Normalize(CLIP)`: `pretrain_transform` with scale (0.2, 1), `train_transform` with (0.5, 1).
#[derive(Debug, Clone)]
pub struct TrainTransform {
    /// Output side R.
    pub res: usize,
    /// Area fraction range of the crop.
    pub scale: (f64, f64),
    /// Whether to flip with probability 0.5.
    pub hflip: bool,
    /// The augmentation.
    pub rand_augment: RandAugment,
    /// Decode JPEGs with libjpeg-turbo (DCT-scaled, stopping below the crop) instead of `zune-jpeg`;
    /// on by default with the `simd-jpeg` feature, where libjpeg-turbo has its SIMD code.
    pub libjpeg_decode: bool,
}

impl TrainTransform {
    /// The pre-training image-text transform (scale 0.2-1, flip, all ten ops).
    pub fn pretrain(res: usize) -> Self {
        Self {
            res,
            scale: (0.2, 1.0),
            hflip: true,
            rand_augment: RandAugment::new(&augment::ALL_OPS),
            libjpeg_decode: cfg!(feature = "simd-jpeg"),
        }
    }

    /// The fine-tuning `train_transform` (scale 0.5-1).
    pub fn finetune(res: usize) -> Self {
        Self {
            scale: (0.5, 1.0),
            ..Self::pretrain(res)
        }
    }

    /// This transform softened by the xvlm-only keys of section `key` (`images`,
    /// `finetune_transform`): another crop area range, the flip or RandAugment off.
    pub fn softened(
        mut self,
        key: &str,
        crop_scale: (f64, f64),
        hflip: bool,
        rand_augment: bool,
    ) -> Result<Self, DataError> {
        let (lo, hi) = crop_scale;
        if !(lo > 0.0 && lo < hi && hi <= 1.0) {
            return Err(DataError::Config(format!(
                "{key}.crop_scale must satisfy 0 < min < max <= 1, got [{lo}, {hi}]"
            )));
        }
        self.scale = (lo, hi);
        self.hflip = hflip;
        if !rand_augment {
            self.rand_augment = RandAugment::new(&[]);
        }
        Ok(self)
    }

    /// This transform with AutoContrast and Sharpness computed as `arithmetic` says.
    pub fn with_arithmetic(mut self, arithmetic: OpArithmetic) -> Self {
        self.rand_augment = self.rand_augment.with_arithmetic(arithmetic);
        self
    }

    fn crop_params(&self, rng: &mut impl Rng, w: usize, h: usize) -> CropBox {
        augment::random_resized_crop_params(rng, w, h, self.scale, (3.0 / 4.0, 4.0 / 3.0))
    }

    /// Crop, resize, flip and augment to uint8 (before `ToTensor`).
    pub fn augment(&self, rng: &mut impl Rng, img: &RgbImage) -> RgbImage {
        let b = self.crop_params(rng, img.width, img.height);
        self.finish(rng, img, b)
    }

    /// Decode and augment encoded bytes. Documented training-only shortcuts change pixels slightly (see
    /// the data README): without the `simd-jpeg` feature JPEGs go through the fast SIMD `zune-jpeg`
    /// decoder (a few levels from libjpeg-turbo); with it, libjpeg-turbo decodes with DCT scaling by 1/2,
    /// 1/4 or 1/8 when the crop (drawn on the full size) stays at least `res` pixels on both sides at
    /// that scale, with merged chroma upsampling, and stops below the crop. The resize is the SIMD
    /// Catmull-Rom of [`pixels::resize_bicubic_crop_fast`].
    pub fn augment_bytes(&self, rng: &mut impl Rng, bytes: &[u8]) -> Result<RgbImage, DataError> {
        if !pixels::is_jpeg(bytes) {
            let img = pixels::decode(bytes)?;
            return Ok(self.augment(rng, &img));
        }
        if !self.libjpeg_decode {
            let img = pixels::decode_fast(bytes)?;
            return Ok(self.augment(rng, &img));
        }
        let mut chosen: Option<(CropBox, usize)> = None;
        let res = self.res;
        let img = pixels::decode_jpeg_rows(bytes, false, |w, h| {
            let b = self.crop_params(rng, w, h);
            // Only the power-of-two scales have SIMD IDCTs.
            let n = [1u8, 2, 4, 8]
                .into_iter()
                .find(|&n| b.w * n as usize >= res * 8 && b.h * n as usize >= res * 8)
                .unwrap_or(8);
            chosen = Some((b, n as usize));
            // The training resampler reads up to its filter support (2 px per unit of scale) past the
            // crop edge, so keep those rows too: the output does not depend on where decoding stopped.
            (n, b.y + b.h + 2 * b.h.div_ceil(res) + 2)
        })?;
        let (b, n) = chosen.ok_or_else(|| DataError::Sample("JPEG header unreadable".into()))?;
        let b = if n == 8 {
            b
        } else {
            let x = (b.x * n / 8).min(img.width - 1);
            let y = (b.y * n / 8).min(img.height - 1);
            CropBox {
                x,
                y,
                w: ((b.w * n + 4) / 8).clamp(1, img.width - x),
                h: ((b.h * n + 4) / 8).clamp(1, img.height - y),
            }
        };
        Ok(self.finish(rng, &img, b))
    }

    /// Decode, augment and normalise: `[3, R, R]` values.
    pub fn apply_bytes(&self, rng: &mut impl Rng, bytes: &[u8]) -> Result<Vec<f32>, DataError> {
        let out = self.augment_bytes(rng, bytes)?;
        Ok(pixels::to_normalized_chw(&out, CLIP_MEAN, CLIP_STD))
    }

    fn finish(&self, rng: &mut impl Rng, img: &RgbImage, b: CropBox) -> RgbImage {
        let mut out =
            pixels::resize_bicubic_crop_fast(img, (b.x, b.y, b.w, b.h), self.res, self.res);
        if self.hflip && rng.random::<f64>() < 0.5 {
            out.hflip();
        }
        self.rand_augment.apply(rng, &mut out);
        out
    }

    /// The full transform: `[3, R, R]` normalised values.
    pub fn apply(&self, rng: &mut impl Rng, img: &RgbImage) -> Vec<f32> {
        pixels::to_normalized_chw(&self.augment(rng, img), CLIP_MEAN, CLIP_STD)
    }
}

/// `box_transform`: RandAugment(2, 7) over the five colour ops, ToTensor, Normalize (geometry is done by
/// the region sampler so the boxes follow it).
pub fn box_transform(rng: &mut impl Rng, mut img: RgbImage, arithmetic: OpArithmetic) -> Vec<f32> {
    RandAugment::new(&augment::COLOUR_OPS)
        .with_arithmetic(arithmetic)
        .apply(rng, &mut img);
    pixels::to_normalized_chw(&img, CLIP_MEAN, CLIP_STD)
}
