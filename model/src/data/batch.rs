//! Collate samples into exactly the tensors the pre-training model takes (names as in the
//! `pretrain_swin_bert` fixture's `general.*` / `region.*` batch tensors).

use rand::seq::index::sample;
use rand::Rng;
use tch::Tensor;

use super::region::RegionSample;
use super::sample::{ImageTextSample, TextSample};

/// An image-text batch (`ImageTextJsonDataset.collate_fn`).
#[derive(Debug)]
pub struct ImageTextBatch {
    /// `[B, 3, R, R]` float32.
    pub image: Tensor,
    /// `[B, L]` int64.
    pub text_ids: Tensor,
    /// `[B, L]` int64.
    pub text_atts: Tensor,
    /// `[B, L]` int64.
    pub text_ids_masked: Tensor,
    /// `[B, M]` int64.
    pub masked_pos: Tensor,
    /// `[B, M]` int64 (-100 padding).
    pub masked_ids: Tensor,
}

/// A region batch (`RegionTextJsonDataset.collate_fn`).
#[derive(Debug)]
pub struct RegionBatch {
    /// `[Bimg, 3, R, R]` float32.
    pub image: Tensor,
    /// `[Bt]` int64: the image row of every text.
    pub idx_to_group_img: Tensor,
    /// `[Bt, L]` int64.
    pub text_ids: Tensor,
    /// `[Bt, L]` int64.
    pub text_atts: Tensor,
    /// `[Bt, L]` int64.
    pub text_ids_masked: Tensor,
    /// `[Bt, M]` int64.
    pub masked_pos: Tensor,
    /// `[Bt, M]` int64.
    pub masked_ids: Tensor,
    /// `[Bt, 1 + P]` int64 patch masks.
    pub image_atts: Tensor,
    /// `[Bt, 4]` float32 (cx, cy, w, h) / R.
    pub target_bbox: Tensor,
    /// `[Bt]` int64, 1 for whole-image captions.
    pub is_image: Tensor,
}

fn stack_images(images: &[&Vec<f32>]) -> Tensor {
    let per = images.first().map_or(0, |v| v.len());
    let side = ((per / 3) as f64).sqrt() as i64;
    let flat: Vec<f32> = images.iter().flat_map(|v| v.iter().copied()).collect();
    Tensor::from_slice(&flat).view([images.len() as i64, 3, side, side])
}

fn rows(texts: &[&TextSample], f: impl Fn(&TextSample) -> &Vec<i64>) -> Tensor {
    let width = texts.first().map_or(0, |t| f(t).len()) as i64;
    let flat: Vec<i64> = texts.iter().flat_map(|t| f(t).iter().copied()).collect();
    Tensor::from_slice(&flat).view([texts.len() as i64, width])
}

impl ImageTextBatch {
    /// Stack samples.
    pub fn collate(samples: &[ImageTextSample]) -> Self {
        let images: Vec<&Vec<f32>> = samples.iter().map(|s| &s.image).collect();
        let texts: Vec<&TextSample> = samples.iter().map(|s| &s.text).collect();
        Self {
            image: stack_images(&images),
            text_ids: rows(&texts, |t| &t.ids),
            text_atts: rows(&texts, |t| &t.atts),
            text_ids_masked: rows(&texts, |t| &t.ids_masked),
            masked_pos: rows(&texts, |t| &t.masked_pos),
            masked_ids: rows(&texts, |t| &t.masked_ids),
        }
    }

    /// `(name, tensor)` pairs with the fixture names (without the `general.` prefix).
    pub fn named(&self) -> Vec<(&'static str, &Tensor)> {
        vec![
            ("image", &self.image),
            ("text_ids", &self.text_ids),
            ("text_atts", &self.text_atts),
            ("text_ids_masked", &self.text_ids_masked),
            ("masked_pos", &self.masked_pos),
            ("masked_ids", &self.masked_ids),
        ]
    }
}

/// Which flattened texts a region batch keeps: all (shuffled sample) when there are enough, else all
/// plus a random sample of duplicates, else the list repeated and cut (reference §3.5). Padding
/// duplicates act as ITC/ITM negatives (quirk 6a, kept).
pub fn choose_texts(rng: &mut impl Rng, n: usize, batch_size: usize) -> Vec<usize> {
    if n == 0 {
        return Vec::new();
    }
    if n >= batch_size {
        return sample(rng, n, batch_size).into_vec();
    }
    let missing = batch_size - n;
    if missing <= n {
        let mut idx: Vec<usize> = (0..n).collect();
        idx.extend(sample(rng, n, missing).into_vec());
        idx
    } else {
        (0..batch_size).map(|i| i % n).collect()
    }
}

impl RegionBatch {
    /// Collate images and choose exactly `batch_size` texts with `rng` (derived from the batch index).
    pub fn collate(rng: &mut impl Rng, samples: &[RegionSample], batch_size: usize) -> Self {
        let images: Vec<&Vec<f32>> = samples.iter().map(|s| &s.image).collect();
        let mut flat: Vec<(usize, usize)> = Vec::new();
        for (i, s) in samples.iter().enumerate() {
            for t in 0..s.texts.len() {
                flat.push((i, t));
            }
        }
        let chosen: Vec<(usize, usize)> = choose_texts(rng, flat.len(), batch_size)
            .into_iter()
            .map(|k| flat[k])
            .collect();
        let texts: Vec<&TextSample> = chosen.iter().map(|&(i, t)| &samples[i].texts[t]).collect();
        let group: Vec<i64> = chosen.iter().map(|&(i, _)| i as i64).collect();
        let atts: Vec<i64> = chosen
            .iter()
            .flat_map(|&(i, t)| samples[i].image_atts[t].iter().copied())
            .collect();
        let atts_width = samples.first().map_or(0, |s| s.image_atts[0].len()) as i64;
        let boxes: Vec<f32> = chosen
            .iter()
            .flat_map(|&(i, t)| samples[i].target_bbox[t])
            .collect();
        let is_image: Vec<i64> = chosen
            .iter()
            .map(|&(i, t)| samples[i].is_image[t])
            .collect();
        let bt = chosen.len() as i64;
        Self {
            image: stack_images(&images),
            idx_to_group_img: Tensor::from_slice(&group),
            text_ids: rows(&texts, |t| &t.ids),
            text_atts: rows(&texts, |t| &t.atts),
            text_ids_masked: rows(&texts, |t| &t.ids_masked),
            masked_pos: rows(&texts, |t| &t.masked_pos),
            masked_ids: rows(&texts, |t| &t.masked_ids),
            image_atts: Tensor::from_slice(&atts).view([bt, atts_width]),
            target_bbox: Tensor::from_slice(&boxes).view([bt, 4]),
            is_image: Tensor::from_slice(&is_image),
        }
    }

    /// `(name, tensor)` pairs with the fixture names (without the `region.` prefix).
    pub fn named(&self) -> Vec<(&'static str, &Tensor)> {
        vec![
            ("image", &self.image),
            ("idx_to_group_img", &self.idx_to_group_img),
            ("text_ids", &self.text_ids),
            ("text_atts", &self.text_atts),
            ("text_ids_masked", &self.text_ids_masked),
            ("masked_pos", &self.masked_pos),
            ("masked_ids", &self.masked_ids),
            ("image_atts", &self.image_atts),
            ("target_bbox", &self.target_bbox),
            ("is_image", &self.is_image),
        ]
    }
}
