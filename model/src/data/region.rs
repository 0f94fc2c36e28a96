//! Region samples (`RegionTextJsonDataset.__iter__`, reference §3.5 and §2.6): a random crop that contains
//! one annotated box, optional flip, resize, colour augmentation, and up to `max_regions` texts with their
//! patch masks and box targets.

use rand::seq::SliceRandom;
use rand::Rng;
use rand_chacha::ChaCha8Rng;

use super::augment::OpArithmetic;
use super::formats::{parse_region, RegionElem};
use super::loader::Processor;
use super::pixels;
use super::sample::{TextPipeline, TextSample};
use super::transform::box_transform;
use super::DataError;
use crate::config::RecordKeys;

/// Region sampling settings (official `regions:` keys plus the image geometry).
#[derive(Debug, Clone, PartialEq)]
pub struct RegionConfig {
    /// `image_res`.
    pub image_res: usize,
    /// `patch_size` (final vision stride, 32).
    pub patch_size: usize,
    /// `max_regions` texts per image.
    pub max_regions: usize,
    /// `min_perc_in_image`: fraction of a box that must remain inside the crop.
    pub min_perc_in_image: f64,
    /// `careful_hflip`: no flip when a caption mentions "left" or "right".
    pub careful_hflip: bool,
    /// The integer arithmetic of `box_transform`'s AutoContrast and Sharpness.
    pub arithmetic: OpArithmetic,
}

/// One image of a region batch with its texts.
#[derive(Debug, Clone, PartialEq)]
pub struct RegionSample {
    /// `[3, R, R]` normalised pixels.
    pub image: Vec<f32>,
    /// The texts (whole-image caption first when present).
    pub texts: Vec<TextSample>,
    /// Per text, the `1 + g*g` patch mask.
    pub image_atts: Vec<Vec<i64>>,
    /// Per text, (cx, cy, w, h) / R.
    pub target_bbox: Vec<[f32; 4]>,
    /// Per text, 1 for a whole-image caption.
    pub is_image: Vec<i64>,
}

/// Patch mask of a box `(x, y, w, h)` in pixels of the `res x res` image (`get_image_attns`): token 0 and
/// every patch the box touches (at least one).
pub fn patch_mask(bx: [f64; 4], res: usize, patch: usize) -> Vec<i64> {
    let g = (res / patch).max(1);
    let p = patch as f64;
    let span = |lo: f64, len: f64| {
        let min = ((lo / p).floor().max(0.0) as usize).min(g - 1);
        let max = (min + 1).max((((lo + len) / p).ceil().max(0.0) as usize).min(g));
        (min, max)
    };
    let (x_min, x_max) = span(bx[0], bx[2]);
    let (y_min, y_max) = span(bx[1], bx[3]);
    let mut mask = vec![0i64; 1 + g * g];
    mask[0] = 1;
    for i in y_min..y_max {
        for j in x_min..x_max {
            mask[1 + g * i + j] = 1;
        }
    }
    mask
}

fn mentions_side(text: &str) -> bool {
    text.contains("left") || text.contains("right")
}

/// Line processor for region annotations.
pub struct RegionProcessor {
    /// Record keys.
    pub keys: RecordKeys,
    /// Text settings.
    pub text: TextPipeline,
    /// Region settings.
    pub cfg: RegionConfig,
}

impl RegionProcessor {
    fn region_text(
        &self,
        rng: &mut ChaCha8Rng,
        elem: &RegionElem,
    ) -> Result<TextSample, DataError> {
        let mut caption = elem.captions[rng.random_range(0..elem.captions.len())].clone();
        if !elem.attributes.is_empty() {
            let attr = &elem.attributes[rng.random_range(0..elem.attributes.len())];
            caption = format!("{attr} {caption}");
        }
        self.text.prepare(rng, &caption)
    }
}

impl Processor for RegionProcessor {
    type Sample = RegionSample;

    fn process(&self, line: &[u8], rng: &mut ChaCha8Rng) -> Result<RegionSample, DataError> {
        let record = parse_region(line, &self.keys)?;
        let img = pixels::decode_fast(&record.image.load()?)?;
        let (full_w, full_h) = (img.width as i64, img.height as i64);
        let elem = &record.elems[rng.random_range(0..record.elems.len())];
        let [x, y, w, h] = elem.bb.map(|v| v.trunc() as i64);
        if x < 0 || y < 0 || w <= 0 || h <= 0 || x + w > full_w || y + h > full_h {
            return Err(DataError::Sample(format!(
                "box {:?} is not inside the {full_w}x{full_h} image",
                elem.bb
            )));
        }
        let x0 = rng.random_range(0..=x);
        let y0 = rng.random_range(0..=y);
        let x1 = rng.random_range((x + w).min(full_w)..=full_w);
        let y1 = rng.random_range((y + h).min(full_h)..=full_h);
        let (cw, ch) = ((x1 - x0) as usize, (y1 - y0) as usize);
        let side_words = record.captions.iter().any(|c| mentions_side(c))
            || record
                .elems
                .iter()
                .any(|e| e.captions.iter().any(|c| mentions_side(c)));
        let flip = rng.random::<f64>() < 0.5 && !(self.cfg.careful_hflip && side_words);
        let res = self.cfg.image_res;
        let mut crop =
            pixels::resize_bicubic_crop_fast(&img, (x0 as usize, y0 as usize, cw, ch), res, res);
        if flip {
            crop.hflip();
        }
        let image = box_transform(rng, crop, self.cfg.arithmetic);

        let mut out = RegionSample {
            image,
            texts: Vec::new(),
            image_atts: Vec::new(),
            target_bbox: Vec::new(),
            is_image: Vec::new(),
        };
        let mut budget = self.cfg.max_regions;
        if !record.captions.is_empty() {
            let caption = &record.captions[rng.random_range(0..record.captions.len())];
            if let Ok(text) = self.text.prepare(rng, caption) {
                out.texts.push(text);
                out.image_atts
                    .push(vec![1; 1 + (res / self.cfg.patch_size).pow(2)]);
                out.target_bbox.push([0.5, 0.5, 1.0, 1.0]);
                out.is_image.push(1);
            }
            budget = budget.saturating_sub(1);
        }
        let mut order: Vec<usize> = (0..record.elems.len()).collect();
        order.shuffle(rng);
        let (fx0, fy0, fx1, fy1) = (x0 as f64, y0 as f64, x1 as f64, y1 as f64);
        let (fw, fh) = (cw as f64, ch as f64);
        let r = res as f64;
        for i in order {
            if budget == 0 {
                break;
            }
            let e = &record.elems[i];
            let [ex, ey, ew, eh] = e.bb;
            if ew <= 0.0 || eh <= 0.0 {
                continue;
            }
            let (ix0, iy0) = (ex.max(fx0), ey.max(fy0));
            let (ix1, iy1) = ((ex + ew).min(fx1), (ey + eh).min(fy1));
            if ix1 <= ix0 || iy1 <= iy0 {
                continue;
            }
            let (iw, ih) = (ix1 - ix0, iy1 - iy0);
            if iw * ih / (ew * eh) <= self.cfg.min_perc_in_image {
                continue;
            }
            let mut bx = ix0 - fx0;
            let by = iy0 - fy0;
            if flip {
                bx = fw - bx - iw;
            }
            let b = [bx * r / fw, by * r / fh, iw * r / fw, ih * r / fh];
            let Ok(text) = self.region_text(rng, e) else {
                continue;
            };
            out.texts.push(text);
            out.image_atts.push(patch_mask(b, res, self.cfg.patch_size));
            out.target_bbox.push([
                ((b[0] + b[2] / 2.0) / r) as f32,
                ((b[1] + b[3] / 2.0) / r) as f32,
                (b[2] / r) as f32,
                (b[3] / r) as f32,
            ]);
            out.is_image.push(0);
            budget -= 1;
        }
        if out.texts.is_empty() {
            return Err(DataError::Sample("no region text survived the crop".into()));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reference §2.6 example: box (50, 10, 100, 60) at 224 -> columns 1..4, rows 0..2 (12 patches + token 0).
    #[test]
    fn patch_mask_matches_reference_example() {
        let m = patch_mask([50.0, 10.0, 100.0, 60.0], 224, 32);
        assert_eq!(m.len(), 50);
        assert_eq!(m.iter().sum::<i64>(), 13);
        assert_eq!(m[0], 1);
        for i in 0..3 {
            for j in 1..5 {
                assert_eq!(m[1 + 7 * i + j], 1);
            }
        }
        // A zero-size box at the far corner still keeps one patch.
        let m = patch_mask([224.0, 224.0, 0.0, 0.0], 224, 32);
        assert_eq!(m.iter().sum::<i64>(), 2);
        assert_eq!(m[49], 1);
    }
}
