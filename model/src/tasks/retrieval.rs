//! Image–text retrieval (models/model_retrieval.py: XVLM; Retrieval.py evaluation and itm_eval): ITC with
//! image-id positives and ITM with hard negatives for training (temperature NOT clamped), and for
//! evaluation the similarity matrix, ITM re-ranking of the top-k, and recall@K (XVLM-REFERENCE.md §5.1).

use tch::{nn, Device, Kind, Tensor};

use crate::collective::Collective;
use crate::config::TaskConfig;
use crate::loss::NegativeSampler;
use crate::xvlm::{Heads, MatchingOutput, ModelError, XvlmCore};

/// `models/model_retrieval.py:XVLM`.
pub struct RetrievalModel {
    /// Encoders, projections, `temp`, `itm_head`.
    pub core: XvlmCore,
}

/// A training forward with its intermediates.
#[derive(Debug)]
pub struct RetrievalTrainOutput {
    /// Vision tokens [B, 1+P, Dv].
    pub image_embeds: Tensor,
    /// Normalised image projection [B, E].
    pub image_feat: Tensor,
    /// Text-mode states [B, L, D].
    pub text_embeds: Tensor,
    /// Normalised text projection [B, E].
    pub text_feat: Tensor,
    /// ITC loss with soft targets over equal `idx`.
    pub loss_itc: Tensor,
    /// ITM with negatives drawn among different `idx`.
    pub itm: MatchingOutput,
}

/// The evaluation of a test split (`Retrieval.evaluation`, one rank).
#[derive(Debug)]
pub struct RetrievalEval {
    /// Vision tokens of every image [Ni, 1+P, Dv].
    pub image_embeds: Tensor,
    /// Normalised image projections [Ni, E].
    pub image_feat: Tensor,
    /// Text-mode states of every caption [Nt, L, D].
    pub text_embeds: Tensor,
    /// Normalised text projections [Nt, E].
    pub text_feat: Tensor,
    /// `image_feat @ text_featᵀ` (no temperature) [Ni, Nt].
    pub sims: Tensor,
    /// Per image, the top-k texts by similarity [Ni, k].
    pub i2t_topk_idx: Tensor,
    /// Their similarities [Ni, k].
    pub i2t_topk_sim: Tensor,
    /// Their ITM "match" logits [Ni, k].
    pub i2t_topk_itm_score: Tensor,
    /// Per text, the top-k images [Nt, k].
    pub t2i_topk_idx: Tensor,
    /// Their similarities [Nt, k].
    pub t2i_topk_sim: Tensor,
    /// Their ITM logits [Nt, k].
    pub t2i_topk_itm_score: Tensor,
    /// ITM logits at the top-k, −100 elsewhere [Ni, Nt].
    pub score_i2t: Tensor,
    /// ITM logits at the top-k, −100 elsewhere [Nt, Ni].
    pub score_t2i: Tensor,
}

impl RetrievalModel {
    /// Builds under `p` from a task config.
    pub fn new(p: &nn::Path, task: &TaskConfig) -> Result<Self, ModelError> {
        let heads = Heads {
            contrastive: true,
            matching: true,
            ..Heads::default()
        };
        Ok(RetrievalModel {
            core: XvlmCore::from_task(p, task, heads)?,
        })
    }

    /// The training forward (`Retrieval.train` body): `idx` [B] are image ids (equal = positive).
    #[allow(clippy::too_many_arguments)]
    pub fn train_forward(
        &self,
        image: &Tensor,
        text_ids: &Tensor,
        text_atts: &Tensor,
        idx: &Tensor,
        collective: &dyn Collective,
        sampler: &mut dyn NegativeSampler,
        train: bool,
    ) -> Result<RetrievalTrainOutput, ModelError> {
        let core = &self.core;
        let vision = core.get_vision_embeds(image, train);
        let text_embeds = core.get_text_embeds(text_ids, text_atts, train);
        let image_feat = core.image_feat(&vision.embeds)?;
        let text_feat = core.text_feat(&text_embeds)?;
        let loss_itc = core.contrastive_loss(collective, &image_feat, &text_feat, Some(idx))?;
        let itm = core.matching_loss(
            &vision.embeds,
            &vision.atts,
            &image_feat,
            &text_embeds,
            text_atts,
            &text_feat,
            Some(idx),
            sampler,
            train,
        )?;
        Ok(RetrievalTrainOutput {
            image_embeds: vision.embeds,
            image_feat,
            text_embeds,
            text_feat,
            loss_itc,
            itm,
        })
    }

    /// `itm_head(fusion(text, image))[:, 1]` for aligned rows of texts and images, all-ones image mask.
    fn itm_scores(
        &self,
        image_embeds: &Tensor,
        text_embeds: &Tensor,
        text_atts: &Tensor,
    ) -> Result<Tensor, ModelError> {
        let itm_head =
            self.core.itm_head.as_ref().ok_or_else(|| {
                ModelError::Input("the model was built without `itm_head`".into())
            })?;
        let s = image_embeds.size();
        let ones = Tensor::ones([s[0], s[1]], (Kind::Int64, image_embeds.device()));
        let cls = self
            .core
            .get_cross_embeds(image_embeds, &ones, text_embeds, text_atts, false)
            .select(1, 0);
        Ok(nn::Module::forward(itm_head, &cls).select(1, 1))
    }

    /// `Retrieval.evaluation` on one rank: encodes every image and caption, ranks by similarity and
    /// re-scores the top `k_test` with the ITM head (both directions). Eval mode, no gradient.
    pub fn evaluate(
        &self,
        images: &Tensor,
        text_ids: &Tensor,
        text_atts: &Tensor,
        k_test: i64,
    ) -> Result<RetrievalEval, ModelError> {
        tch::no_grad(|| {
            let core = &self.core;
            let text_embeds = core.get_text_embeds(text_ids, text_atts, false);
            let text_feat = core.text_feat(&text_embeds)?;
            let image_embeds = core.get_vision_embeds(images, false).embeds;
            let image_feat = core.image_feat(&image_embeds)?;
            let sims = image_feat.matmul(&text_feat.tr());
            let (ni, nt) = (sims.size()[0], sims.size()[1]);
            let k_i2t = k_test.min(nt);
            let k_t2i = k_test.min(ni);

            let (i2t_topk_sim, i2t_topk_idx) = sims.topk(k_i2t, 1, true, true);
            let mut i2t_scores = Vec::with_capacity(ni as usize);
            for i in 0..ni {
                let topk = i2t_topk_idx.get(i);
                let img = image_embeds.get(i).unsqueeze(0).repeat([k_i2t, 1, 1]);
                i2t_scores.push(self.itm_scores(
                    &img,
                    &text_embeds.index_select(0, &topk),
                    &text_atts.index_select(0, &topk),
                )?);
            }
            let i2t_topk_itm_score = Tensor::stack(&i2t_scores, 0);
            let score_i2t = Tensor::full([ni, nt], -100.0, (Kind::Float, sims.device())).scatter(
                1,
                &i2t_topk_idx,
                &i2t_topk_itm_score,
            );

            let sims_t = sims.tr();
            let (t2i_topk_sim, t2i_topk_idx) = sims_t.topk(k_t2i, 1, true, true);
            let mut t2i_scores = Vec::with_capacity(nt as usize);
            for t in 0..nt {
                let topk = t2i_topk_idx.get(t);
                let txt = text_embeds.get(t).unsqueeze(0).repeat([k_t2i, 1, 1]);
                let att = text_atts.get(t).unsqueeze(0).repeat([k_t2i, 1]);
                t2i_scores.push(self.itm_scores(
                    &image_embeds.index_select(0, &topk),
                    &txt,
                    &att,
                )?);
            }
            let t2i_topk_itm_score = Tensor::stack(&t2i_scores, 0);
            let score_t2i = Tensor::full([nt, ni], -100.0, (Kind::Float, sims.device())).scatter(
                1,
                &t2i_topk_idx,
                &t2i_topk_itm_score,
            );

            Ok(RetrievalEval {
                image_embeds,
                image_feat,
                text_embeds,
                text_feat,
                sims,
                i2t_topk_idx,
                i2t_topk_sim,
                i2t_topk_itm_score,
                t2i_topk_idx,
                t2i_topk_sim,
                t2i_topk_itm_score,
                score_i2t,
                score_t2i,
            })
        })
    }
}

/// How `itm_eval` ranks a ground truth that ties with other entries (the official `np.argsort` leaves it
/// unspecified; the −100 entries outside the top-k tie often).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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

fn rows_f64(t: &Tensor) -> Vec<Vec<f64>> {
    let t = t.to_device(Device::Cpu).to_kind(Kind::Double).contiguous();
    let (n, m) = t.size2().unwrap_or((0, 0));
    let flat: Vec<f64> = Vec::try_from(t.view([-1])).unwrap_or_default();
    (0..n as usize)
        .map(|r| flat[r * m as usize..(r + 1) * m as usize].to_vec())
        .collect()
}

fn rows_i64(t: &Tensor) -> Vec<Vec<i64>> {
    let t = t.to_device(Device::Cpu).to_kind(Kind::Int64).contiguous();
    let size = t.size();
    let m = if size.len() == 2 { size[1] } else { 1 };
    let flat: Vec<i64> = Vec::try_from(t.view([-1])).unwrap_or_default();
    flat.chunks(m.max(1) as usize)
        .map(<[i64]>::to_vec)
        .collect()
}

/// `Retrieval.itm_eval`: text retrieval R@1/5/10 and mean (best rank among an image's captions), image
/// retrieval R@1/5/10 and mean, and their mean, in percent, ordered
/// `txt_r1, txt_r5, txt_r10, txt_r_mean, img_r1, img_r5, img_r10, img_r_mean, r_mean`.
pub fn itm_eval(
    scores_i2t: &Tensor,
    scores_t2i: &Tensor,
    txt2img: &Tensor,
    img2txt: &Tensor,
    ties: TieRule,
) -> [f64; 9] {
    let i2t = rows_f64(scores_i2t);
    let t2i = rows_f64(scores_t2i);
    let img2txt = rows_i64(img2txt);
    let txt2img: Vec<i64> = rows_i64(txt2img).into_iter().flatten().collect();
    let tr_ranks: Vec<usize> = i2t
        .iter()
        .zip(&img2txt)
        .map(|(row, gts)| {
            gts.iter()
                .map(|&g| rank_of(row, g as usize, ties))
                .min()
                .unwrap_or(usize::MAX)
        })
        .collect();
    let ir_ranks: Vec<usize> = t2i
        .iter()
        .zip(&txt2img)
        .map(|(row, &g)| rank_of(row, g as usize, ties))
        .collect();
    let recall = |ranks: &[usize], k: usize| {
        100.0 * ranks.iter().filter(|&&r| r < k).count() as f64 / ranks.len().max(1) as f64
    };
    let (tr1, tr5, tr10) = (
        recall(&tr_ranks, 1),
        recall(&tr_ranks, 5),
        recall(&tr_ranks, 10),
    );
    let (ir1, ir5, ir10) = (
        recall(&ir_ranks, 1),
        recall(&ir_ranks, 5),
        recall(&ir_ranks, 10),
    );
    let tr_mean = (tr1 + tr5 + tr10) / 3.0;
    let ir_mean = (ir1 + ir5 + ir10) / 3.0;
    [
        tr1,
        tr5,
        tr10,
        tr_mean,
        ir1,
        ir5,
        ir10,
        ir_mean,
        (tr_mean + ir_mean) / 2.0,
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parity::{run_case, WeightsSource};

    /// The `retrieval` fixture (evaluation, training forward, metrics) from both weight files.
    #[test]
    fn retrieval_fixture_parity() {
        let dir = crate::fixtures_dir().join("retrieval");
        for source in [WeightsSource::TorchSave, WeightsSource::Safetensors] {
            let report = run_case(&dir, source).unwrap();
            assert_eq!(report.rows.len(), 28);
            assert!(report.passed(), "{source:?}: {:#?}", report.failures());
        }
    }

    /// Ranks under the three tie rules: the ground truth (index 1) ties with indices 0 and 2.
    #[test]
    fn tie_rules_bracket_the_rank() {
        let row = [-100.0, -100.0, -100.0, 3.0];
        assert_eq!(rank_of(&row, 1, TieRule::FavorGroundTruth), 1);
        assert_eq!(rank_of(&row, 1, TieRule::AgainstGroundTruth), 3);
        assert_eq!(rank_of(&row, 1, TieRule::NumpySmallRows), 2);
    }

    /// Text retrieval takes the best-ranked of an image's captions.
    #[test]
    fn itm_eval_uses_the_best_caption() {
        // 2 images x 4 texts; image 0 owns texts 0, 1; image 1 owns 2, 3.
        let i2t = Tensor::from_slice(&[0.1f32, 0.9, 0.5, 0.2, 0.8, 0.7, 0.6, 0.1]).view([2, 4]);
        let t2i = Tensor::from_slice(&[0.9f32, 0.1, 0.2, 0.8, 0.3, 0.4, 0.6, 0.5]).view([4, 2]);
        let txt2img = Tensor::from_slice(&[0i64, 0, 1, 1]);
        let img2txt = Tensor::from_slice(&[0i64, 1, 2, 3]).view([2, 2]);
        let m = itm_eval(&i2t, &t2i, &txt2img, &img2txt, TieRule::FavorGroundTruth);
        // Image 0: text 1 ranks first; image 1: texts 2, 3 rank 2nd and 3rd → TR@1 = 50.
        assert_eq!(m[0], 50.0);
        assert_eq!(m[1], 100.0);
        // Texts 0, 2 find their image first; texts 1, 3 do not → IR@1 = 50.
        assert_eq!(m[4], 50.0);
    }
}
