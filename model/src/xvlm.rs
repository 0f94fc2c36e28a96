//! The shared X-VLM core (models/xvlm.py: XVLMBase): vision encoder, text encoder (text + fusion layers),
//! projections, temperature, ITM/bbox heads and the `get_*` helpers every task model is built from.
//!
//! Task models (`tasks::pretrain` now; retrieval, VQA, NLVR2, grounding later) hold an [`XvlmCore`] built
//! with the heads they need ([`Heads`]) and add their own forward.

use tch::nn::{self, Module};
use tch::{Kind, Tensor};

use crate::checkpoint::{CheckpointError, StateDict};
use crate::collective::{Collective, CollectiveError};
use crate::config::{ConfigError, TaskConfig, TextConfig};
use crate::loss::{self, ItmWeights, NegativeKind, NegativeSampler};
use crate::text::{CrossContext, CrossKv, TextEncoder};
use crate::vision::{Backbone, VisionConfig, VisionEncoder, VisionError};

/// Errors building or running an X-VLM model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A task or text config is unusable.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The vision config is unusable.
    #[error(transparent)]
    Vision(#[from] VisionError),
    /// A checkpoint could not be read or loaded.
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    /// A collective (ITC gather) failed.
    #[error(transparent)]
    Collective(#[from] CollectiveError),
    /// Inputs of the wrong shape or a head the model was built without.
    #[error("invalid model input: {0}")]
    Input(String),
    /// An evaluation batch could not be read.
    #[error("reading evaluation {what} {range:?}")]
    EvalData {
        /// `images` or `texts`.
        what: &'static str,
        /// Their global indices.
        range: std::ops::Range<usize>,
        /// The data layer's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// Which optional heads a task model has (`use_contrastive_loss`, `use_matching_loss`, `use_mlm_loss`,
/// `use_bbox_loss` of XVLMBase).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Heads {
    /// `vision_proj`, `text_proj`, `temp`.
    pub contrastive: bool,
    /// `itm_head`.
    pub matching: bool,
    /// The text encoder is the `*ForMaskedLM` wrapper (`text_encoder.bert.*` + MLM head).
    pub mlm: bool,
    /// `bbox_head`.
    pub bbox: bool,
}

impl Heads {
    /// Every head, as `models/model_pretrain.py:XVLM`.
    pub fn pretrain() -> Self {
        Heads {
            contrastive: true,
            matching: true,
            mlm: true,
            bbox: true,
        }
    }
}

// models/xvlm.py: build_mlp
/// `Sequential(Linear(in, 2·in), LayerNorm(2·in), GELU, Linear(2·in, out))`, keys `0.*`, `1.*`, `3.*`.
#[derive(Debug)]
pub struct Mlp {
    fc1: nn::Linear,
    norm: nn::LayerNorm,
    fc2: nn::Linear,
}

impl Mlp {
    /// Builds under `p` with PyTorch default initialisation.
    pub fn new(p: nn::Path, in_dim: i64, out_dim: i64) -> Self {
        Mlp {
            fc1: nn::linear(&p / "0", in_dim, 2 * in_dim, Default::default()),
            norm: nn::layer_norm(&p / "1", vec![2 * in_dim], Default::default()),
            fc2: nn::linear(&p / "3", 2 * in_dim, out_dim, Default::default()),
        }
    }
}

impl Module for Mlp {
    fn forward(&self, xs: &Tensor) -> Tensor {
        let h = self.norm.forward(&self.fc1.forward(xs)).gelu("none");
        self.fc2.forward(&h)
    }
}

/// Vision tokens for a batch of texts (`get_vision_embeds`).
#[derive(Debug)]
pub struct VisionEmbeds {
    /// [Bt, 1+P, Dv]: per image, or per text in the region path (token 0 = the region feature).
    pub embeds: Tensor,
    /// [Bt, 1+P] 0/1 (int64): all ones, or the given region masks.
    pub atts: Tensor,
    /// Region path only: full-image tokens per image [Bimg, 1+P, Dv] (the encoder's second output).
    pub full_per_image: Option<Tensor>,
    /// Region path only: `full_per_image` gathered per text [Bt, 1+P, Dv] (`image_embeds_fullatts`).
    pub full_per_text: Option<Tensor>,
}

/// The outcome of the matching loss with everything the fixtures record.
#[derive(Debug)]
pub struct MatchingOutput {
    /// Sampling weights and similarities.
    pub weights: ItmWeights,
    /// Image negative per text [B].
    pub neg_image_idx: Tensor,
    /// Text negative per image [B].
    pub neg_text_idx: Tensor,
    /// Fusion token 0 of the positives [B, D].
    pub cross_pos_cls: Tensor,
    /// Fusion token 0 of the negatives [2B, D]: (text b, image neg_b) then (text neg_b, image b).
    pub cross_neg_cls: Tensor,
    /// `itm_head` output [3B, 2].
    pub logits: Tensor,
    /// Cross-entropy with labels `[1]·B + [0]·2B`.
    pub loss: Tensor,
}

/// The outcome of the MLM loss.
#[derive(Debug)]
pub struct MlmOutput {
    /// Multi-modal hidden states at `masked_pos` [B, M, D].
    pub hidden_at_masked_pos: Tensor,
    /// Logits [B, M, vocab].
    pub logits: Tensor,
    /// Mean CE over labels ≠ −100.
    pub loss: Tensor,
}

/// The box prediction (`predict_bbox`) with its intermediates.
#[derive(Debug)]
pub struct BboxOutput {
    /// Fusion token 0 over the full image with an all-ones mask [B, D].
    pub cross_cls: Tensor,
    /// Raw `bbox_head` output [B, 4].
    pub head_output: Tensor,
    /// `sigmoid(head_output)`: (cx, cy, w, h) in [0, 1].
    pub coord: Tensor,
}

/// XVLMBase: the encoders and heads shared by every X-VLM task model.
pub struct XvlmCore {
    /// `vision_encoder.*`.
    pub vision: VisionEncoder,
    /// `text_encoder.*`.
    pub text: TextEncoder,
    /// `vision_proj` (Dv → embed_dim).
    pub vision_proj: Option<nn::Linear>,
    /// `text_proj` (D → embed_dim).
    pub text_proj: Option<nn::Linear>,
    /// `temp` (0-dim parameter).
    pub temp: Option<Tensor>,
    /// `itm_head` (D → 2).
    pub itm_head: Option<Mlp>,
    /// `bbox_head` (D → 4).
    pub bbox_head: Option<Mlp>,
}

impl XvlmCore {
    /// Builds the core under `p` (the model root). `text_cfg.encoder_width` is overwritten with the vision
    /// width, as `build_text_encoder` does.
    pub fn new(
        p: &nn::Path,
        vision_cfg: &VisionConfig,
        text_cfg: &TextConfig,
        heads: Heads,
        embed_dim: i64,
        temp: f64,
    ) -> Result<Self, ModelError> {
        Self::with_shared_cross_kv(p, vision_cfg, text_cfg, heads, embed_dim, temp, 1)
    }

    /// As [`Self::new`], with the text encoder's cross layers sharing key/value in groups of
    /// `cross_kv_group` (NLVR2: 2, see `TextEncoder::with_shared_cross_kv`).
    pub fn with_shared_cross_kv(
        p: &nn::Path,
        vision_cfg: &VisionConfig,
        text_cfg: &TextConfig,
        heads: Heads,
        embed_dim: i64,
        temp: f64,
        cross_kv_group: usize,
    ) -> Result<Self, ModelError> {
        let vision = VisionEncoder::new(&(p / "vision_encoder"), vision_cfg)?;
        let mut text_cfg = text_cfg.clone();
        text_cfg.encoder_width = vision.width();
        let text = TextEncoder::with_shared_cross_kv(
            p / "text_encoder",
            &text_cfg,
            heads.mlm,
            cross_kv_group,
        );
        let d = text_cfg.hidden_size;
        let (vision_proj, text_proj, temp) = if heads.contrastive {
            (
                Some(nn::linear(
                    p / "vision_proj",
                    vision.width(),
                    embed_dim,
                    Default::default(),
                )),
                Some(nn::linear(
                    p / "text_proj",
                    d,
                    embed_dim,
                    Default::default(),
                )),
                Some(p.var("temp", &[], nn::Init::Const(temp))),
            )
        } else {
            (None, None, None)
        };
        Ok(XvlmCore {
            vision,
            text,
            vision_proj,
            text_proj,
            temp,
            itm_head: heads.matching.then(|| Mlp::new(p / "itm_head", d, 2)),
            bbox_head: heads.bbox.then(|| Mlp::new(p / "bbox_head", d, 4)),
        })
    }

    /// Builds from an official task config (its `vision_config`, `text_config`, `embed_dim`, `temp`).
    pub fn from_task(p: &nn::Path, task: &TaskConfig, heads: Heads) -> Result<Self, ModelError> {
        let vision_cfg = vision_config(task)?;
        let mut text_cfg = task.load_text_config()?;
        // build_text_encoder: only the pre-training model (MLM) under apex O1/O2 sets config_text.fp16.
        text_cfg.fp16 = heads.mlm
            && task
                .accelerator
                .as_ref()
                .is_some_and(|a| a.FP16_OPT_LEVEL != "O0");
        let (embed_dim, temp) = if heads.contrastive {
            (task.require_embed_dim()?, task.require_temp()?)
        } else {
            (0, 0.0)
        };
        Self::new(p, &vision_cfg, &text_cfg, heads, embed_dim, temp)
    }

    /// Checkpoint keys that are the same tensor as another key (`(alias, source)`, full keys): written on
    /// save, skipped on load.
    pub fn tied_aliases(&self) -> Vec<(String, String)> {
        self.text
            .tied_aliases()
            .into_iter()
            .map(|(a, s)| (format!("text_encoder.{a}"), format!("text_encoder.{s}")))
            .collect()
    }

    /// The buffers the official state dict holds besides the parameters (Swin index tables and shift
    /// masks, CLIP and BERT `position_ids`), computed, with their full keys.
    pub fn buffers(&self) -> Vec<(String, Tensor)> {
        let vision = self
            .vision
            .buffers()
            .into_iter()
            .map(|(k, t)| (format!("vision_encoder.{k}"), t));
        let text = self
            .text
            .buffers()
            .into_iter()
            .map(|(k, t)| (format!("text_encoder.{k}"), t));
        vision.chain(text).collect()
    }

    /// The state dict as the official code saves it, for the variables of `vs` (the VarStore this core
    /// was built in): every parameter, each tied alias pointing at its source tensor (one tensor in
    /// memory, several keys) and the computed buffers.
    pub fn state_dict(&self, vs: &nn::VarStore) -> StateDict {
        let mut sd = state_dict_with_aliases(vs, &self.tied_aliases());
        sd.extend(self.buffers());
        sd
    }

    fn require<'a, T>(head: &'a Option<T>, name: &str) -> Result<&'a T, ModelError> {
        head.as_ref()
            .ok_or_else(|| ModelError::Input(format!("the model was built without `{name}`")))
    }

    /// The temperature parameter.
    pub fn temp(&self) -> Result<&Tensor, ModelError> {
        Self::require(&self.temp, "temp")
    }

    /// Pre-training only (quirk 3): clamps `temp` in place to [0.001, 0.5] under no_grad.
    pub fn clamp_temp(&self) -> Result<(), ModelError> {
        let mut t = self.temp()?.shallow_clone();
        tch::no_grad(|| {
            let _ = t.clamp_(0.001, 0.5);
        });
        Ok(())
    }

    /// `get_vision_embeds(image)`: whole images → embeds [B, 1+P, Dv] and an all-ones mask.
    pub fn get_vision_embeds(&self, image: &Tensor, train: bool) -> VisionEmbeds {
        let (embeds, _) = self.vision.forward_t(image, None, None, train);
        let atts = ones_mask(&embeds);
        VisionEmbeds {
            embeds,
            atts,
            full_per_image: None,
            full_per_text: None,
        }
    }

    /// `get_vision_embeds(image, image_atts, idx_to_group_img)`: the encoder runs once on the distinct
    /// images; per text, region embeds with `image_atts` and the full image gathered per text. Without
    /// `image_atts` the full images are gathered per text with an all-ones mask.
    pub fn get_region_vision_embeds(
        &self,
        image: &Tensor,
        idx_to_group_img: &Tensor,
        image_atts: Option<&Tensor>,
        train: bool,
    ) -> Result<VisionEmbeds, ModelError> {
        match image_atts {
            None => {
                let (full, _) = self.vision.forward_t(image, None, None, train);
                let per_text = crate::vision::gather_rows(&full, idx_to_group_img);
                Ok(VisionEmbeds {
                    atts: ones_mask(&per_text),
                    embeds: per_text.shallow_clone(),
                    full_per_image: Some(full),
                    full_per_text: Some(per_text),
                })
            }
            Some(atts) => {
                if atts.size()[0] != idx_to_group_img.size()[0] {
                    return Err(ModelError::Input(format!(
                        "image_atts has {} rows but idx_to_group_img has {}",
                        atts.size()[0],
                        idx_to_group_img.size()[0]
                    )));
                }
                let (region, full) =
                    self.vision
                        .forward_t(image, Some(idx_to_group_img), Some(atts), train);
                let full = full.ok_or_else(|| {
                    ModelError::Input("the vision encoder returned no full-image output".into())
                })?;
                let per_text = crate::vision::gather_rows(&full, idx_to_group_img);
                Ok(VisionEmbeds {
                    embeds: region,
                    atts: atts.shallow_clone(),
                    full_per_image: Some(full),
                    full_per_text: Some(per_text),
                })
            }
        }
    }

    /// `get_text_embeds`: the text-only layers → [B, L, D].
    pub fn get_text_embeds(&self, text_ids: &Tensor, text_atts: &Tensor, train: bool) -> Tensor {
        self.text.forward_text(text_ids, text_atts, train)
    }

    /// `get_cross_embeds(image_embeds, image_atts, text_embeds=…)`: the fusion layers → [B, L, D].
    pub fn get_cross_embeds(
        &self,
        image_embeds: &Tensor,
        image_atts: &Tensor,
        text_embeds: &Tensor,
        text_atts: &Tensor,
        train: bool,
    ) -> Tensor {
        let cross = [CrossContext::new(image_embeds, image_atts)];
        self.text
            .forward_fusion(text_embeds, text_atts, &cross, train)
    }

    /// `get_cross_embeds(image_embeds, image_atts, text_ids=…)`: every layer from the ids → [B, L, D].
    pub fn get_cross_embeds_from_ids(
        &self,
        image_embeds: &Tensor,
        image_atts: &Tensor,
        text_ids: &Tensor,
        text_atts: &Tensor,
        train: bool,
    ) -> Tensor {
        let cross = [CrossContext::new(image_embeds, image_atts)];
        self.text
            .forward_multimodal(text_ids, text_atts, &cross, train)
    }

    /// The cross-attention keys and values of `image_embeds` for every fusion layer, projected once
    /// for the fusion passes over these images ([`Self::matching_loss`], [`Self::mlm_loss`]).
    pub fn cross_kv(&self, image_embeds: &Tensor) -> CrossKv {
        self.text.cross_kv(image_embeds)
    }

    /// `get_features` image side: L2-normalised `vision_proj(image_embeds[:, 0])` [B, embed_dim].
    pub fn image_feat(&self, image_embeds: &Tensor) -> Result<Tensor, ModelError> {
        let proj = Self::require(&self.vision_proj, "vision_proj")?;
        Ok(normalize(&proj.forward(&image_embeds.select(1, 0))))
    }

    /// `get_features` text side: L2-normalised `text_proj(text_embeds[:, 0])` [B, embed_dim].
    pub fn text_feat(&self, text_embeds: &Tensor) -> Result<Tensor, ModelError> {
        let proj = Self::require(&self.text_proj, "text_proj")?;
        Ok(normalize(&proj.forward(&text_embeds.select(1, 0))))
    }

    /// `get_contrastive_loss` with the features of every rank (`idx`: image ids when fine-tuning).
    pub fn contrastive_loss(
        &self,
        collective: &dyn Collective,
        image_feat: &Tensor,
        text_feat: &Tensor,
        idx: Option<&Tensor>,
    ) -> Result<Tensor, ModelError> {
        Ok(loss::itc_loss(
            collective,
            image_feat,
            text_feat,
            self.temp()?,
            idx,
        )?)
    }

    /// `get_matching_loss`: hard negatives drawn by `sampler` from the local batch (image negatives for
    /// every text first, then text negatives for every image), fusion on positives and negatives,
    /// `itm_head` on token 0. `image_kv` is [`Self::cross_kv`] of `image_embeds`: both passes index
    /// into it instead of projecting the (gathered) image tokens again.
    #[allow(clippy::too_many_arguments)]
    pub fn matching_loss(
        &self,
        image_embeds: &Tensor,
        image_kv: &CrossKv,
        image_atts: &Tensor,
        image_feat: &Tensor,
        text_embeds: &Tensor,
        text_atts: &Tensor,
        text_feat: &Tensor,
        idx: Option<&Tensor>,
        sampler: &mut dyn NegativeSampler,
        train: bool,
    ) -> Result<MatchingOutput, ModelError> {
        let itm_head = Self::require(&self.itm_head, "itm_head")?;
        let weights = ItmWeights::new(image_feat, text_feat, self.temp()?, idx);
        let neg_image_idx = sampler.sample(&weights.weights_t2i, NegativeKind::ImageForText);
        let neg_text_idx = sampler.sample(&weights.weights_i2t, NegativeKind::TextForImage);
        let bs = image_embeds.size()[0];
        if neg_image_idx.size() != [bs] || neg_text_idx.size() != [bs] {
            return Err(ModelError::Input(format!(
                "the negative sampler returned {:?} / {:?} indices for a batch of {bs}",
                neg_image_idx.size(),
                neg_text_idx.size()
            )));
        }
        let image_atts_neg = image_atts.index_select(0, &neg_image_idx);
        let text_embeds_neg = text_embeds.index_select(0, &neg_text_idx);
        let text_atts_neg = text_atts.index_select(0, &neg_text_idx);

        let text_embeds_all = Tensor::cat(&[text_embeds, &text_embeds_neg], 0);
        let text_atts_all = Tensor::cat(&[text_atts, &text_atts_neg], 0);
        // The official image_embeds_all = cat(image_embeds[neg_image_idx], image_embeds), as rows.
        let own = Tensor::arange(bs, (Kind::Int64, image_embeds.device()));
        let image_rows_all = Tensor::cat(&[&neg_image_idx.to_kind(Kind::Int64), &own], 0);
        let image_atts_all = Tensor::cat(&[&image_atts_neg, image_atts], 0);

        let fuse = |cross: CrossContext, text: &Tensor, atts: &Tensor| {
            self.text
                .forward_fusion(text, atts, &[cross], train)
                .select(1, 0)
        };
        let cross_pos_cls = fuse(
            CrossContext::projected(image_kv, None, image_atts),
            text_embeds,
            text_atts,
        );
        let cross_neg_cls = fuse(
            CrossContext::projected(image_kv, Some(image_rows_all), &image_atts_all),
            &text_embeds_all,
            &text_atts_all,
        );
        let logits = itm_head.forward(&Tensor::cat(&[&cross_pos_cls, &cross_neg_cls], 0));
        let loss = loss::itm_loss(&logits);
        Ok(MatchingOutput {
            weights,
            neg_image_idx,
            neg_text_idx,
            cross_pos_cls,
            cross_neg_cls,
            logits,
            loss,
        })
    }

    /// `get_mlm_loss`: the masked text through every layer (cross-attending to the images of
    /// `image_kv`, [`Self::cross_kv`] of the image embeddings, row `i` to image `i`), gathered at
    /// `masked_pos` [B, M], MLM head, CE against `masked_ids` [B, M] (−100 = padding).
    #[allow(clippy::too_many_arguments)]
    pub fn mlm_loss(
        &self,
        text_ids_masked: &Tensor,
        text_atts: &Tensor,
        image_kv: &CrossKv,
        image_atts: &Tensor,
        masked_pos: &Tensor,
        masked_ids: &Tensor,
        train: bool,
    ) -> Result<MlmOutput, ModelError> {
        let cross = [CrossContext::projected(image_kv, None, image_atts)];
        let hidden = self
            .text
            .forward_multimodal(text_ids_masked, text_atts, &cross, train);
        let d = hidden.size()[2];
        let (b, m) = masked_pos
            .size2()
            .map_err(|_| ModelError::Input("masked_pos must be [B, M]".into()))?;
        let index = masked_pos.unsqueeze(2).expand([b, m, d], false);
        let hidden_at_masked_pos = hidden.gather(1, &index, false);
        let logits = self
            .text
            .mlm_logits(&hidden_at_masked_pos)
            .ok_or_else(|| ModelError::Input("the text encoder has no MLM head".into()))?;
        let loss = loss::mlm_loss(&logits, masked_ids);
        Ok(MlmOutput {
            hidden_at_masked_pos,
            logits,
            loss,
        })
    }

    /// `predict_bbox`: fusion layers over the full image (all-ones mask), `bbox_head` on token 0, sigmoid.
    pub fn predict_bbox(
        &self,
        image_embeds_full: &Tensor,
        text_embeds: &Tensor,
        text_atts: &Tensor,
        train: bool,
    ) -> Result<BboxOutput, ModelError> {
        let bbox_head = Self::require(&self.bbox_head, "bbox_head")?;
        let atts = ones_mask(image_embeds_full);
        let cross_cls = self
            .get_cross_embeds(image_embeds_full, &atts, text_embeds, text_atts, train)
            .select(1, 0);
        let head_output = bbox_head.forward(&cross_cls);
        let coord = head_output.sigmoid();
        Ok(BboxOutput {
            cross_cls,
            head_output,
            coord,
        })
    }
}

/// The vision config a task selects (`use_clip_vit` / `use_swin` / DeiT) with the official assertions.
pub fn vision_config(task: &TaskConfig) -> Result<VisionConfig, ModelError> {
    let backbone = Backbone::from_flags(task.use_clip_vit, task.use_swin);
    let path = match backbone {
        Backbone::Deit => None,
        _ => Some(task.vision_config_path()?),
    };
    Ok(VisionConfig::from_task(
        backbone,
        path.as_deref(),
        task.image_res,
        task.patch_size,
    )?)
}

/// All-ones int64 mask over the tokens of `embeds` [B, N, D] → [B, N].
fn ones_mask(embeds: &Tensor) -> Tensor {
    let s = embeds.size();
    Tensor::ones([s[0], s[1]], (Kind::Int64, embeds.device()))
}

/// `F.normalize(x, dim=-1)`: x / max(‖x‖₂, 1e-12).
pub fn normalize(x: &Tensor) -> Tensor {
    let norm = x
        .norm_scalaropt_dim(2, [-1i64].as_slice(), true)
        .clamp_min(1e-12);
    x / norm.expand_as(x)
}

/// Parameters of `vs` plus each tied alias pointing at its source tensor (one tensor in memory, several
/// keys), without the computed buffers; [`XvlmCore::state_dict`] adds those.
pub fn state_dict_with_aliases(vs: &nn::VarStore, aliases: &[(String, String)]) -> StateDict {
    let mut sd: StateDict = vs.variables().into_iter().collect();
    for (alias, source) in aliases {
        if let Some(t) = sd.get(source).map(Tensor::shallow_clone) {
            sd.insert(alias.clone(), t);
        }
    }
    sd
}
