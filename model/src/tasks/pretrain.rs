//! The pre-training model (models/model_pretrain.py: XVLM): ITC + ITM + MLM on image-text batches, plus
//! the box losses on region batches (XVLM-REFERENCE.md §2).

use tch::{nn, Kind, Tensor};

use crate::collective::Collective;
use crate::config::TaskConfig;
use crate::loss::{self, NegativeSampler};
use crate::xvlm::{Heads, ModelError, XvlmCore};

/// The extra inputs of a region batch (`RegionTextJsonDataset.collate_fn`).
#[derive(Debug)]
pub struct RegionInputs {
    /// Image row of every text [Bt] (int64).
    pub idx_to_group_img: Tensor,
    /// 0/1 patch mask per text [Bt, 1+P] (int64).
    pub image_atts: Tensor,
    /// Target boxes (cx, cy, w, h) / image_res [Bt, 4].
    pub target_bbox: Tensor,
    /// 1 for whole-image captions [Bt] (int64).
    pub is_image: Tensor,
}

/// One pre-training batch: image-text pairs, or a region batch when `region` is set (then `image` holds
/// the distinct images and every other tensor is per text).
#[derive(Debug)]
pub struct PretrainBatch {
    /// Images [B, 3, R, R] (normalised).
    pub image: Tensor,
    /// `[CLS]` + word pieces, padded [B, L] (int64).
    pub text_ids: Tensor,
    /// 1 for real tokens [B, L].
    pub text_atts: Tensor,
    /// `text_ids` after masking [B, L].
    pub text_ids_masked: Tensor,
    /// Masked positions [B, M] (0-padded).
    pub masked_pos: Tensor,
    /// Original ids at `masked_pos` [B, M] (−100-padded).
    pub masked_ids: Tensor,
    /// Region-batch inputs.
    pub region: Option<RegionInputs>,
}

impl PretrainBatch {
    /// Checks the shapes the forward relies on, naming the offending input.
    pub fn validate(&self) -> Result<(), ModelError> {
        let bad = |what: String| Err(ModelError::Input(what));
        let image = self.image.size();
        if image.len() != 4 {
            return bad(format!("image must be [B, 3, R, R], got {image:?}"));
        }
        let ids = self.text_ids.size();
        if ids.len() != 2 {
            return bad(format!("text_ids must be [B, L], got {ids:?}"));
        }
        for (name, t) in [
            ("text_atts", &self.text_atts),
            ("text_ids_masked", &self.text_ids_masked),
        ] {
            if t.size() != ids {
                return bad(format!("{name} {:?} != text_ids {ids:?}", t.size()));
            }
        }
        let pos = self.masked_pos.size();
        if pos.len() != 2 || pos[0] != ids[0] || self.masked_ids.size() != pos {
            return bad(format!(
                "masked_pos {pos:?} and masked_ids {:?} must both be [B={}, M]",
                self.masked_ids.size(),
                ids[0]
            ));
        }
        let b = ids[0];
        match &self.region {
            None if image[0] != b => bad(format!("{} images for {b} texts", image[0])),
            None => Ok(()),
            Some(r) => {
                let shapes = [
                    ("idx_to_group_img", r.idx_to_group_img.size(), 1),
                    ("image_atts", r.image_atts.size(), 2),
                    ("target_bbox", r.target_bbox.size(), 2),
                    ("is_image", r.is_image.size(), 1),
                ];
                for (name, shape, dims) in shapes {
                    if shape.len() != dims || shape[0] != b {
                        return bad(format!(
                            "{name} {shape:?} must have {dims} dims and {b} rows"
                        ));
                    }
                }
                if r.target_bbox.size()[1] != 4 {
                    return bad(format!(
                        "target_bbox {:?} must be [B, 4]",
                        r.target_bbox.size()
                    ));
                }
                Ok(())
            }
        }
    }
}

/// Every loss of a forward and the intermediates the parity fixtures record.
#[derive(Debug)]
pub struct PretrainOutput {
    /// ITC loss.
    pub loss_itc: Tensor,
    /// ITM loss.
    pub loss_itm: Tensor,
    /// MLM loss.
    pub loss_mlm: Tensor,
    /// Box L1 loss (region batches).
    pub loss_bbox: Option<Tensor>,
    /// Box GIoU loss (region batches).
    pub loss_giou: Option<Tensor>,
    /// The sum `Pretrain.train` back-propagates.
    pub loss_total: Tensor,
    /// Intermediates by fixture name (without the `general.`/`region.` prefix).
    pub intermediates: Vec<(String, Tensor)>,
}

impl PretrainOutput {
    /// Every recorded tensor (losses and intermediates) by fixture name, without prefix.
    pub fn named_tensors(&self) -> Vec<(String, Tensor)> {
        let mut out = vec![
            ("loss_itc".to_string(), self.loss_itc.shallow_clone()),
            ("loss_itm".to_string(), self.loss_itm.shallow_clone()),
            ("loss_mlm".to_string(), self.loss_mlm.shallow_clone()),
            ("loss_total".to_string(), self.loss_total.shallow_clone()),
        ];
        if let Some(l) = &self.loss_bbox {
            out.push(("loss_bbox".into(), l.shallow_clone()));
        }
        if let Some(l) = &self.loss_giou {
            out.push(("loss_giou".into(), l.shallow_clone()));
        }
        out.extend(
            self.intermediates
                .iter()
                .map(|(n, t)| (n.clone(), t.shallow_clone())),
        );
        out
    }
}

/// `models/model_pretrain.py:XVLM`: the core with every head and the text encoder as `*ForMaskedLM`.
pub struct PretrainModel {
    /// Encoders and heads.
    pub core: XvlmCore,
    /// `calc_image_bbox_loss`: whole-image captions also get the box loss.
    pub calc_image_bbox_loss: bool,
    /// Compute the ITC loss (`xvlm.itc`, on in the official model); off, it is a constant 0.
    pub itc: bool,
    /// Compute the ITM loss (`xvlm.itm`, on in the official model); off, it is a constant 0.
    pub itm: bool,
}

impl PretrainModel {
    /// Builds the model under `p` (the VarStore root) from an official task config.
    pub fn new(p: &nn::Path, task: &TaskConfig) -> Result<Self, ModelError> {
        Ok(PretrainModel {
            core: XvlmCore::from_task(p, task, Heads::pretrain())?,
            calc_image_bbox_loss: task.calc_image_bbox_loss,
            itc: task.xvlm.itc,
            itm: task.xvlm.itm,
        })
    }

    /// `XVLM.forward`: clamps `temp`, then ITC (gathered over `collective`), ITM (negatives from
    /// `sampler`), MLM, and for region batches the box losses on the full image. With [`Self::itc`] or
    /// [`Self::itm`] off that loss is a constant 0 (no gather, no negatives, no intermediates of it).
    pub fn forward(
        &self,
        batch: &PretrainBatch,
        collective: &dyn Collective,
        sampler: &mut dyn NegativeSampler,
        train: bool,
    ) -> Result<PretrainOutput, ModelError> {
        batch.validate()?;
        let core = &self.core;
        core.clamp_temp()?;
        let vision = match &batch.region {
            None => core.get_vision_embeds(&batch.image, train),
            Some(r) => core.get_region_vision_embeds(
                &batch.image,
                &r.idx_to_group_img,
                Some(&r.image_atts),
                train,
            )?,
        };
        let text_embeds = core.get_text_embeds(&batch.text_ids, &batch.text_atts, train);
        let zero = || Tensor::zeros([], (Kind::Float, batch.image.device()));
        let mut intermediates: Vec<(String, Tensor)> = vec![
            ("image_atts".into(), vision.atts.shallow_clone()),
            ("image_embeds".into(), vision.embeds.shallow_clone()),
            ("text_embeds".into(), text_embeds.shallow_clone()),
            ("temp".into(), core.temp()?.detach().copy()),
        ];
        let (mut loss_itc, mut loss_itm) = (zero(), zero());
        // The ITM passes and the MLM pass fuse the same images: their cross keys/values once.
        let image_kv = core.cross_kv(&vision.embeds);
        if self.itc || self.itm {
            let image_feat = core.image_feat(&vision.embeds)?;
            let text_feat = core.text_feat(&text_embeds)?;
            if self.itc {
                loss_itc = core.contrastive_loss(collective, &image_feat, &text_feat, None)?;
            }
            if self.itm {
                let itm = core.matching_loss(
                    &vision.embeds,
                    &image_kv,
                    &vision.atts,
                    &image_feat,
                    &text_embeds,
                    &batch.text_atts,
                    &text_feat,
                    None,
                    sampler,
                    train,
                )?;
                loss_itm = itm.loss;
                intermediates.extend([
                    ("sim_i2t".into(), itm.weights.sim_i2t),
                    ("sim_t2i".into(), itm.weights.sim_t2i),
                    ("itm_weights_i2t".into(), itm.weights.weights_i2t),
                    ("itm_weights_t2i".into(), itm.weights.weights_t2i),
                    ("itm_neg_image_idx".into(), itm.neg_image_idx),
                    ("itm_neg_text_idx".into(), itm.neg_text_idx),
                    ("itm_cross_pos_cls".into(), itm.cross_pos_cls),
                    ("itm_cross_neg_cls".into(), itm.cross_neg_cls),
                    ("itm_logits".into(), itm.logits),
                ]);
            }
            intermediates.push(("image_feat".into(), image_feat));
            intermediates.push(("text_feat".into(), text_feat));
        }
        let mlm = core.mlm_loss(
            &batch.text_ids_masked,
            &batch.text_atts,
            &image_kv,
            &vision.atts,
            &batch.masked_pos,
            &batch.masked_ids,
            train,
        )?;

        let mut loss_total = &loss_itc + &loss_itm + &mlm.loss;
        intermediates.push(("mlm_hidden_at_masked_pos".into(), mlm.hidden_at_masked_pos));
        intermediates.push(("mlm_logits".into(), mlm.logits));

        let (mut loss_bbox, mut loss_giou) = (None, None);
        if let Some(region) = &batch.region {
            let full_per_text = vision.full_per_text.as_ref().ok_or_else(|| {
                ModelError::Input("region batch without full-image embeddings".into())
            })?;
            let bbox = core.predict_bbox(full_per_text, &text_embeds, &batch.text_atts, train)?;
            let is_image = (!self.calc_image_bbox_loss).then_some(&region.is_image);
            let (l1, giou) = loss::bbox_loss(&bbox.coord, &region.target_bbox, is_image);
            loss_total = loss_total + &l1 + &giou;
            if let Some(full) = &vision.full_per_image {
                intermediates.push(("vision_encoder_out_full".into(), full.shallow_clone()));
            }
            intermediates.push((
                "image_embeds_fullatts".into(),
                full_per_text.shallow_clone(),
            ));
            intermediates.push(("bbox_cross_cls".into(), bbox.cross_cls));
            intermediates.push(("bbox_head_output".into(), bbox.head_output));
            intermediates.push(("bbox_output_coord".into(), bbox.coord));
            loss_bbox = Some(l1);
            loss_giou = Some(giou);
        }
        Ok(PretrainOutput {
            loss_itc,
            loss_itm,
            loss_mlm: mlm.loss,
            loss_bbox,
            loss_giou,
            loss_total: loss_total.to_kind(Kind::Float),
            intermediates,
        })
    }
}
