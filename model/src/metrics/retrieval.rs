//! Image–text retrieval recall (`Retrieval.py: itm_eval`, XVLM-REFERENCE.md §5.1): text retrieval takes
//! the best rank among an image's captions, image retrieval the rank of a caption's one image; R@1/5/10
//! in percent, their means, and the mean of the means.
//!
//! Ranks are counted row by row ([`RetrievalRanks`]), so a caller may feed the score rows in chunks and
//! never hold a whole Ni x Nt matrix; [`itm_eval`] is the one-chunk case.

use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use crate::xvlm::ModelError;

/// Recall@K of both retrieval directions in percent, named as the official `itm_eval` dictionary.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RetrievalMetrics {
    /// Text retrieval R@1.
    pub txt_r1: f64,
    /// Text retrieval R@5.
    pub txt_r5: f64,
    /// Text retrieval R@10.
    pub txt_r10: f64,
    /// Mean of the three text retrieval recalls.
    pub txt_r_mean: f64,
    /// Image retrieval R@1.
    pub img_r1: f64,
    /// Image retrieval R@5.
    pub img_r5: f64,
    /// Image retrieval R@10.
    pub img_r10: f64,
    /// Mean of the three image retrieval recalls.
    pub img_r_mean: f64,
    /// `(txt_r_mean + img_r_mean) / 2`: the model-selection metric.
    pub r_mean: f64,
}

impl RetrievalMetrics {
    /// The names of [`RetrievalMetrics::as_pairs`], in the official order.
    pub const NAMES: [&'static str; 9] = [
        "txt_r1",
        "txt_r5",
        "txt_r10",
        "txt_r_mean",
        "img_r1",
        "img_r5",
        "img_r10",
        "img_r_mean",
        "r_mean",
    ];

    /// Recalls of text-retrieval ranks (one per image) and image-retrieval ranks (one per text).
    pub fn from_ranks(text_ranks: &[usize], image_ranks: &[usize]) -> Self {
        let recall = |ranks: &[usize], k: usize| {
            100.0 * ranks.iter().filter(|&&r| r < k).count() as f64 / ranks.len().max(1) as f64
        };
        let (txt_r1, txt_r5, txt_r10) = (
            recall(text_ranks, 1),
            recall(text_ranks, 5),
            recall(text_ranks, 10),
        );
        let (img_r1, img_r5, img_r10) = (
            recall(image_ranks, 1),
            recall(image_ranks, 5),
            recall(image_ranks, 10),
        );
        let txt_r_mean = (txt_r1 + txt_r5 + txt_r10) / 3.0;
        let img_r_mean = (img_r1 + img_r5 + img_r10) / 3.0;
        RetrievalMetrics {
            txt_r1,
            txt_r5,
            txt_r10,
            txt_r_mean,
            img_r1,
            img_r5,
            img_r10,
            img_r_mean,
            r_mean: (txt_r_mean + img_r_mean) / 2.0,
        }
    }

    /// The values in the official order (`txt_r1, …, r_mean`), as the parity fixtures store them.
    pub fn to_array(&self) -> [f64; 9] {
        [
            self.txt_r1,
            self.txt_r5,
            self.txt_r10,
            self.txt_r_mean,
            self.img_r1,
            self.img_r5,
            self.img_r10,
            self.img_r_mean,
            self.r_mean,
        ]
    }

    /// `("txt_r1", value)` pairs in the official order, for logs and metric files.
    pub fn as_pairs(&self) -> [(&'static str, f64); 9] {
        let values = self.to_array();
        std::array::from_fn(|i| (Self::NAMES[i], values[i]))
    }
}

/// How a ground truth that ties with other entries is ranked (the official `np.argsort` leaves it
/// unspecified; the −100 entries outside the top-k tie often).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum TieRule {
    /// Ties count in favour of the ground truth (rank = entries strictly greater).
    FavorGroundTruth,
    /// Ties count against it (rank = entries greater or equal, other than itself).
    AgainstGroundTruth,
    /// numpy's order for short rows (≤ 16 entries, insertion sort, stable ascending) reversed: among
    /// equal scores the higher index ranks first. Reproduces the official numbers on such rows only;
    /// numpy's order on longer rows depends on its build.
    NumpySmallRows,
}

/// Which captions belong to which image (`txt2img`, `img2txt` of `re_eval_dataset`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroundTruth {
    txt2img: Vec<usize>,
    img2txt: Vec<Vec<usize>>,
}

impl GroundTruth {
    /// Checks that every index is in range and every image has a caption.
    pub fn new(txt2img: Vec<usize>, img2txt: Vec<Vec<usize>>) -> Result<Self, ModelError> {
        let (ni, nt) = (img2txt.len(), txt2img.len());
        if let Some(t) = txt2img.iter().position(|&i| i >= ni) {
            return Err(ModelError::Input(format!(
                "txt2img[{t}] = {} but there are {ni} images",
                txt2img[t]
            )));
        }
        for (i, texts) in img2txt.iter().enumerate() {
            if texts.is_empty() {
                return Err(ModelError::Input(format!("image {i} has no caption")));
            }
            if let Some(&t) = texts.iter().find(|&&t| t >= nt) {
                return Err(ModelError::Input(format!(
                    "img2txt[{i}] names text {t} but there are {nt} texts"
                )));
            }
        }
        Ok(GroundTruth { txt2img, img2txt })
    }

    /// From the tensors of the parity fixtures: `txt2img` [Nt], `img2txt` [Ni, C] (equal-length rows).
    pub fn from_tensors(txt2img: &Tensor, img2txt: &Tensor) -> Result<Self, ModelError> {
        let t2i = index_vec(txt2img, "txt2img")?;
        let (ni, per_image) = img2txt
            .size2()
            .map_err(|e| ModelError::Input(format!("img2txt must be [Ni, C]: {e}")))?;
        let i2t = index_vec(img2txt, "img2txt")?;
        let rows = i2t
            .chunks(per_image.max(1) as usize)
            .take(ni as usize)
            .map(<[usize]>::to_vec)
            .collect();
        GroundTruth::new(t2i, rows)
    }

    /// Number of images Ni.
    pub fn n_images(&self) -> usize {
        self.img2txt.len()
    }

    /// Number of texts Nt.
    pub fn n_texts(&self) -> usize {
        self.txt2img.len()
    }

    /// The image of each text.
    pub fn txt2img(&self) -> &[usize] {
        &self.txt2img
    }

    /// The captions of each image.
    pub fn img2txt(&self) -> &[Vec<usize>] {
        &self.img2txt
    }
}

fn index_vec(t: &Tensor, name: &str) -> Result<Vec<usize>, ModelError> {
    let flat = t.to_device(Device::Cpu).to_kind(Kind::Int64).reshape([-1]);
    let values = Vec::<i64>::try_from(&flat)
        .map_err(|e| ModelError::Input(format!("{name} is not an index tensor: {e}")))?;
    values
        .into_iter()
        .map(|v| usize::try_from(v).map_err(|_| ModelError::Input(format!("{name} holds {v}"))))
        .collect()
}

/// Ranks of the ground truths, filled chunk by chunk of score rows.
#[derive(Debug, Clone)]
pub struct RetrievalRanks {
    text: Vec<Option<usize>>,
    image: Vec<Option<usize>>,
    ties: TieRule,
}

impl RetrievalRanks {
    /// Empty ranks for `gt`'s images and texts.
    pub fn new(gt: &GroundTruth, ties: TieRule) -> Self {
        RetrievalRanks {
            text: vec![None; gt.n_images()],
            image: vec![None; gt.n_texts()],
            ties,
        }
    }

    /// Image→text score rows [n, Nt] of images `first..first+n`: each image's best caption rank.
    pub fn add_i2t_rows(
        &mut self,
        gt: &GroundTruth,
        rows: &Tensor,
        first: usize,
    ) -> Result<(), ModelError> {
        let rows = rows_f64(rows, gt.n_texts(), "image→text")?;
        for (r, row) in rows.iter().enumerate() {
            let i = first + r;
            let captions = gt.img2txt.get(i).ok_or_else(|| {
                ModelError::Input(format!("image→text row {i} but {} images", gt.n_images()))
            })?;
            let best = captions.iter().map(|&t| rank_of(row, t, self.ties)).min();
            self.text[i] = best;
        }
        Ok(())
    }

    /// Text→image score rows [n, Ni] of texts `first..first+n`: the rank of each text's image.
    pub fn add_t2i_rows(
        &mut self,
        gt: &GroundTruth,
        rows: &Tensor,
        first: usize,
    ) -> Result<(), ModelError> {
        let rows = rows_f64(rows, gt.n_images(), "text→image")?;
        for (r, row) in rows.iter().enumerate() {
            let t = first + r;
            let &image = gt.txt2img.get(t).ok_or_else(|| {
                ModelError::Input(format!("text→image row {t} but {} texts", gt.n_texts()))
            })?;
            self.image[t] = Some(rank_of(row, image, self.ties));
        }
        Ok(())
    }

    /// The recalls; fails if a row was never added.
    pub fn metrics(&self) -> Result<RetrievalMetrics, ModelError> {
        let complete = |ranks: &[Option<usize>], what: &str| {
            ranks
                .iter()
                .enumerate()
                .map(|(i, r)| {
                    r.ok_or_else(|| ModelError::Input(format!("no score row for {what} {i}")))
                })
                .collect::<Result<Vec<usize>, _>>()
        };
        Ok(RetrievalMetrics::from_ranks(
            &complete(&self.text, "image")?,
            &complete(&self.image, "text")?,
        ))
    }
}

/// Position of entry `gt` in the descending order of `row` under the tie rule.
fn rank_of(row: &[f64], gt: usize, ties: TieRule) -> usize {
    let v = row[gt];
    let greater = row.iter().filter(|&&x| x > v).count();
    let tied_before = match ties {
        TieRule::FavorGroundTruth => 0,
        TieRule::AgainstGroundTruth => row.iter().filter(|&&x| x == v).count() - 1,
        TieRule::NumpySmallRows => row
            .iter()
            .enumerate()
            .filter(|&(j, &x)| x == v && j > gt)
            .count(),
    };
    greater + tied_before
}

/// The rows of a [n, width] score tensor as f64 (exact for f32 input).
fn rows_f64(t: &Tensor, width: usize, what: &str) -> Result<Vec<Vec<f64>>, ModelError> {
    let (n, m) = t
        .size2()
        .map_err(|e| ModelError::Input(format!("{what} scores must be 2-D: {e}")))?;
    if m as usize != width {
        return Err(ModelError::Input(format!(
            "{what} scores have {m} columns, expected {width}"
        )));
    }
    let t = t.to_device(Device::Cpu).to_kind(Kind::Double).contiguous();
    let flat = Vec::<f64>::try_from(t.view([-1]))
        .map_err(|e| ModelError::Input(format!("{what} scores: {e}")))?;
    Ok(flat
        .chunks(width.max(1))
        .take(n as usize)
        .map(<[f64]>::to_vec)
        .collect())
}

/// `Retrieval.itm_eval` on whole score matrices: `scores_i2t` [Ni, Nt], `scores_t2i` [Nt, Ni].
pub fn itm_eval(
    scores_i2t: &Tensor,
    scores_t2i: &Tensor,
    gt: &GroundTruth,
    ties: TieRule,
) -> Result<RetrievalMetrics, ModelError> {
    let mut ranks = RetrievalRanks::new(gt, ties);
    ranks.add_i2t_rows(gt, scores_i2t, 0)?;
    ranks.add_t2i_rows(gt, scores_t2i, 0)?;
    ranks.metrics()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Ranks under the three tie rules: the ground truth (index 1) ties with indices 0 and 2.
    #[test]
    fn tie_rules_bracket_the_rank() {
        let row = [-100.0, -100.0, -100.0, 3.0];
        assert_eq!(rank_of(&row, 1, TieRule::FavorGroundTruth), 1);
        assert_eq!(rank_of(&row, 1, TieRule::AgainstGroundTruth), 3);
        assert_eq!(rank_of(&row, 1, TieRule::NumpySmallRows), 2);
    }

    fn two_by_four() -> (Tensor, Tensor, GroundTruth) {
        // 2 images x 4 texts; image 0 owns texts 0, 1; image 1 owns 2, 3.
        let i2t = Tensor::from_slice(&[0.1f32, 0.9, 0.5, 0.2, 0.8, 0.7, 0.6, 0.1]).view([2, 4]);
        let t2i = Tensor::from_slice(&[0.9f32, 0.1, 0.2, 0.8, 0.3, 0.4, 0.6, 0.5]).view([4, 2]);
        let gt = GroundTruth::new(vec![0, 0, 1, 1], vec![vec![0, 1], vec![2, 3]]).unwrap();
        (i2t, t2i, gt)
    }

    /// Text retrieval takes the best-ranked of an image's captions; every named field is the recall
    /// of its ranks.
    #[test]
    fn itm_eval_uses_the_best_caption() {
        let (i2t, t2i, gt) = two_by_four();
        let m = itm_eval(&i2t, &t2i, &gt, TieRule::FavorGroundTruth).unwrap();
        // Image 0: text 1 ranks first; image 1: texts 2, 3 rank 2nd and 3rd → TR@1 = 50, TR@5 = 100.
        assert_eq!((m.txt_r1, m.txt_r5, m.txt_r10), (50.0, 100.0, 100.0));
        assert!((m.txt_r_mean - 250.0 / 3.0).abs() < 1e-12);
        // Texts 0, 2 find their image first; texts 1, 3 do not → IR@1 = 50.
        assert_eq!((m.img_r1, m.img_r5, m.img_r10), (50.0, 100.0, 100.0));
        assert!((m.r_mean - 250.0 / 3.0).abs() < 1e-12);
        let pairs = m.as_pairs();
        assert_eq!(pairs[0], ("txt_r1", 50.0));
        assert_eq!(pairs[4], ("img_r1", 50.0));
        assert_eq!(pairs[8].0, "r_mean");
        assert_eq!(
            m.to_array().map(|v| v.to_bits()),
            pairs.map(|p| p.1.to_bits())
        );
    }

    /// Feeding the rows in chunks gives the metrics of the whole matrices.
    #[test]
    fn chunked_rows_match_whole_matrices() {
        let (i2t, t2i, gt) = two_by_four();
        let whole = itm_eval(&i2t, &t2i, &gt, TieRule::AgainstGroundTruth).unwrap();
        let mut ranks = RetrievalRanks::new(&gt, TieRule::AgainstGroundTruth);
        ranks.add_i2t_rows(&gt, &i2t.narrow(0, 1, 1), 1).unwrap();
        ranks.add_i2t_rows(&gt, &i2t.narrow(0, 0, 1), 0).unwrap();
        for t in 0..4 {
            ranks
                .add_t2i_rows(&gt, &t2i.narrow(0, t, 1), t as usize)
                .unwrap();
        }
        assert_eq!(ranks.metrics().unwrap(), whole);
        // A missing row is an error, not a silent zero.
        let partial = RetrievalRanks::new(&gt, TieRule::AgainstGroundTruth);
        assert!(partial.metrics().is_err());
    }

    /// Serialised with the official key names.
    #[test]
    fn metrics_serialise_with_official_names() {
        let (i2t, t2i, gt) = two_by_four();
        let m = itm_eval(&i2t, &t2i, &gt, TieRule::FavorGroundTruth).unwrap();
        let json = serde_json::to_value(m).unwrap();
        for (name, value) in m.as_pairs() {
            assert_eq!(json[name].as_f64(), Some(value), "{name}");
        }
        let back: RetrievalMetrics = serde_json::from_value(json).unwrap();
        assert_eq!(back, m);
    }

    /// Out-of-range ground truth is rejected with the index named.
    #[test]
    fn ground_truth_is_checked() {
        let err = GroundTruth::new(vec![0, 2], vec![vec![0], vec![1]]).unwrap_err();
        assert!(err.to_string().contains("txt2img[1]"), "{err}");
        assert!(GroundTruth::new(vec![0], vec![vec![0], vec![]]).is_err());
    }
}
