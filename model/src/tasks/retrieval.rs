//! Image–text retrieval (models/model_retrieval.py: XVLM): ITC with image-id positives and ITM with hard
//! negatives for training (temperature NOT clamped); the distributed `Retrieval.py: evaluation` is in
//! [`eval`], its recall@K in [`crate::metrics::retrieval`] (XVLM-REFERENCE.md §5.1).

use tch::{nn, Tensor};

use crate::collective::Collective;
use crate::config::TaskConfig;
use crate::loss::NegativeSampler;
use crate::xvlm::{Heads, MatchingOutput, ModelError, XvlmCore};

pub mod eval;

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
            &core.cross_kv(&vision.embeds),
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
}

#[cfg(test)]
mod tests {
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
}
