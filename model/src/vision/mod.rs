//! Vision encoders: Swin (`swin`), CLIP-ViT and DeiT (`vit`), as `models/xvlm.py:build_vision_encoder`
//! builds them (XVLM-REFERENCE.md §1.3, §1.4).
//!
//! API note for `xvlm::get_vision_embeds`: the official vision modules all take
//! `forward(image, idx_to_group_img=None, image_atts=None)` and, when BOTH region arguments are given,
//! return a pair `(region embeds per text [Bt, 1+P, D], full-image embeds per image [Bimg, 1+P, D])`;
//! this is true for Swin too (`SwinTransformer.forward` does the gather and the `image_atts`-weighted
//! mean itself). `get_vision_embeds` then gathers the second output per text. So the encoder API is:
//! - [`VisionEncoder::forward_t`] `(image, idx, atts, train) -> (Tensor, Option<Tensor>)`: the official
//!   forward; the second tensor is `Some(full per-image embeds)` exactly when both region args are given;
//! - [`VisionEncoder::forward`] `(image, idx, atts) -> Tensor`: eval mode, first output only.
//!
//! `train` exists because Swin keeps stochastic depth (`drop_path_rate` 0.1, hard-coded officially,
//! also when fine-tuning); set `SwinConfig::drop_path_rate` to 0 to reproduce the fixtures in train mode.

pub mod swin;
pub mod vit;

use std::path::{Path, PathBuf};

use serde::Deserialize;
use tch::{nn, Tensor};

pub use swin::SwinTransformer;
pub use vit::{ClipVisionTransformer, DeitVisionTransformer};

/// Errors building a vision encoder or reading its configuration.
#[derive(Debug, thiserror::Error)]
pub enum VisionError {
    /// The vision JSON could not be read.
    #[error("cannot read vision config {path}: {source}")]
    Read {
        /// The JSON path.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The vision JSON is not valid for the selected backbone.
    #[error("invalid vision config {origin}: {source}")]
    Parse {
        /// Where the JSON came from.
        origin: String,
        /// The serde error (names the missing or mistyped key).
        source: serde_json::Error,
    },
    /// A value breaks one of the official `build_vision_encoder` assertions or a structural rule.
    #[error("invalid vision config: {0}")]
    Invalid(String),
}

/// Which official backbone a task config selects (`use_clip_vit`, `use_swin`, neither → DeiT).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backbone {
    /// `models/swin_transformer.py:SwinTransformer`.
    Swin,
    /// `models/clip_vit.py:CLIPVisionTransformer`.
    ClipVit,
    /// `models/vit.py:VisionTransformer` (DeiT-B/16).
    Deit,
}

impl Backbone {
    /// The official switch: `use_clip_vit` wins over `use_swin`; neither gives DeiT.
    pub fn from_flags(use_clip_vit: bool, use_swin: bool) -> Self {
        if use_clip_vit {
            Backbone::ClipVit
        } else if use_swin {
            Backbone::Swin
        } else {
            Backbone::Deit
        }
    }
}

fn default_swin_drop_path() -> f64 {
    0.1
}

/// A Swin vision JSON (`configs/config_swinB_224.json` etc.); field names are the official keys.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct SwinConfig {
    /// ImageNet checkpoint for pre-training initialisation (absent in fixtures).
    #[serde(default)]
    pub ckpt: Option<String>,
    /// Output width (= embed_dim · 2^(stages−1)).
    pub vision_width: i64,
    /// Input side; must equal the task `image_res`.
    pub image_res: i64,
    /// Attention window side.
    pub window_size: i64,
    /// Stage-0 channels.
    pub embed_dim: i64,
    /// Blocks per stage.
    pub depths: Vec<i64>,
    /// Heads per stage.
    pub num_heads: Vec<i64>,
    /// Stochastic depth; not an official key (hard-coded 0.1 in `build_vision_encoder`).
    #[serde(default = "default_swin_drop_path")]
    pub drop_path_rate: f64,
}

/// A CLIP-ViT vision JSON (`configs/config_clipvitB.json`) plus the task `image_res`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ClipVitConfig {
    /// HF CLIP checkpoint for pre-training initialisation.
    #[serde(default)]
    pub ckpt: Option<String>,
    /// Hidden width.
    pub vision_width: i64,
    /// Patch side (must equal the task `patch_size`).
    pub patch_size: i64,
    /// Activation name (`quick_gelu` or `gelu`).
    pub hidden_act: String,
    /// Attention heads.
    pub num_attention_heads: i64,
    /// Dropout on attention probabilities.
    #[serde(default)]
    pub attention_dropout: f64,
    /// MLP hidden size.
    pub intermediate_size: i64,
    /// Encoder layers.
    pub num_hidden_layers: i64,
    /// Last layers that run with region-masked attention.
    #[serde(default)]
    pub local_attn_depth: i64,
    /// Input side: the task YAML `image_res` (not a JSON key; set by [`VisionConfig::from_task`]).
    #[serde(default)]
    pub image_res: i64,
}

/// DeiT-B/16: everything is hard-coded officially except the input side.
#[derive(Debug, Clone, PartialEq)]
pub struct DeitConfig {
    /// Input side (task `image_res`).
    pub image_res: i64,
    /// Patch side (16).
    pub patch_size: i64,
    /// Width (768).
    pub embed_dim: i64,
    /// Blocks (12).
    pub depth: i64,
    /// Heads (12).
    pub num_heads: i64,
    /// MLP ratio (4).
    pub mlp_ratio: i64,
    /// Last blocks that run with region-masked attention (4).
    pub local_attn_depth: i64,
}

impl DeitConfig {
    /// The official hard-coded DeiT-B/16 at input side `image_res`.
    pub fn base(image_res: i64) -> Self {
        DeitConfig {
            image_res,
            patch_size: 16,
            embed_dim: 768,
            depth: 12,
            num_heads: 12,
            mlp_ratio: 4,
            local_attn_depth: 4,
        }
    }
}

/// The vision backbone configuration, one variant per official backbone.
#[derive(Debug, Clone, PartialEq)]
pub enum VisionConfig {
    /// Swin Transformer.
    Swin(SwinConfig),
    /// CLIP ViT.
    ClipVit(ClipVitConfig),
    /// DeiT ViT.
    Deit(DeitConfig),
}

impl VisionConfig {
    /// As `build_vision_encoder`: selects the backbone from the task flags, parses the JSON text (unused
    /// for DeiT) and applies the official assertions on `image_res` / `patch_size`.
    pub fn from_task_json(
        backbone: Backbone,
        json: Option<&str>,
        origin: &str,
        image_res: i64,
        patch_size: i64,
    ) -> Result<Self, VisionError> {
        let parse = |text: Option<&'_ str>| {
            text.map(str::to_owned).ok_or_else(|| {
                VisionError::Invalid(format!("{origin}: a vision_config JSON is required"))
            })
        };
        let perr = |source| VisionError::Parse {
            origin: origin.to_string(),
            source,
        };
        let cfg = match backbone {
            Backbone::Swin => {
                let c: SwinConfig = serde_json::from_str(&parse(json)?).map_err(perr)?;
                if c.image_res != image_res {
                    return Err(VisionError::Invalid(format!(
                        "{origin}: image_res {} in the vision JSON != task image_res {image_res}",
                        c.image_res
                    )));
                }
                if patch_size != 32 {
                    return Err(VisionError::Invalid(format!(
                        "task patch_size must be 32 (the final Swin stride), got {patch_size}"
                    )));
                }
                VisionConfig::Swin(c)
            }
            Backbone::ClipVit => {
                let mut c: ClipVitConfig = serde_json::from_str(&parse(json)?).map_err(perr)?;
                if c.patch_size != patch_size {
                    return Err(VisionError::Invalid(format!(
                        "{origin}: patch_size {} in the vision JSON != task patch_size {patch_size}",
                        c.patch_size
                    )));
                }
                c.image_res = image_res;
                VisionConfig::ClipVit(c)
            }
            Backbone::Deit => {
                if patch_size != 16 {
                    return Err(VisionError::Invalid(format!(
                        "task patch_size must be 16 for DeiT, got {patch_size}"
                    )));
                }
                VisionConfig::Deit(DeitConfig::base(image_res))
            }
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// [`VisionConfig::from_task_json`] reading the JSON from `path` (ignored for DeiT).
    pub fn from_task(
        backbone: Backbone,
        path: Option<&Path>,
        image_res: i64,
        patch_size: i64,
    ) -> Result<Self, VisionError> {
        let text = match (backbone, path) {
            (Backbone::Deit, _) | (_, None) => None,
            (_, Some(p)) => {
                Some(
                    std::fs::read_to_string(p).map_err(|source| VisionError::Read {
                        path: p.to_path_buf(),
                        source,
                    })?,
                )
            }
        };
        let origin = path.map_or_else(|| "<none>".to_string(), |p| p.display().to_string());
        Self::from_task_json(backbone, text.as_deref(), &origin, image_res, patch_size)
    }

    /// The backbone of this configuration.
    pub fn backbone(&self) -> Backbone {
        match self {
            VisionConfig::Swin(_) => Backbone::Swin,
            VisionConfig::ClipVit(_) => Backbone::ClipVit,
            VisionConfig::Deit(_) => Backbone::Deit,
        }
    }

    /// Output width of the encoder (`vision_width`).
    pub fn width(&self) -> i64 {
        match self {
            VisionConfig::Swin(c) => c.vision_width,
            VisionConfig::ClipVit(c) => c.vision_width,
            VisionConfig::Deit(c) => c.embed_dim,
        }
    }

    /// Input side in pixels.
    pub fn image_res(&self) -> i64 {
        match self {
            VisionConfig::Swin(c) => c.image_res,
            VisionConfig::ClipVit(c) => c.image_res,
            VisionConfig::Deit(c) => c.image_res,
        }
    }

    /// Side of the final token grid (P = side²).
    pub fn grid_side(&self) -> i64 {
        match self {
            VisionConfig::Swin(c) => (c.image_res / 4) >> (c.depths.len().saturating_sub(1)),
            VisionConfig::ClipVit(c) => c.image_res / c.patch_size,
            VisionConfig::Deit(c) => c.image_res / c.patch_size,
        }
    }

    /// Checks the structural rules the official modules rely on (divisibility, list lengths).
    pub fn validate(&self) -> Result<(), VisionError> {
        let bad = |m: String| Err(VisionError::Invalid(m));
        match self {
            VisionConfig::Swin(c) => {
                if c.depths.is_empty() || c.depths.len() != c.num_heads.len() {
                    return bad(format!(
                        "depths {:?} and num_heads {:?} must be non-empty and of equal length",
                        c.depths, c.num_heads
                    ));
                }
                let stages = c.depths.len() as u32;
                let expected_width = c.embed_dim << (stages - 1);
                if c.vision_width != expected_width {
                    return bad(format!(
                        "vision_width {} != embed_dim·2^(stages-1) = {expected_width}",
                        c.vision_width
                    ));
                }
                if c.image_res % 4 != 0 || (c.image_res / 4) % (1 << (stages - 1)) != 0 {
                    return bad(format!(
                        "image_res {} must be divisible by 4·2^(stages-1)",
                        c.image_res
                    ));
                }
                for (s, &h) in c.num_heads.iter().enumerate() {
                    let ch = c.embed_dim << s;
                    if h <= 0 || ch % h != 0 {
                        return bad(format!(
                            "stage {s}: {ch} channels not divisible by {h} heads"
                        ));
                    }
                    let res = (c.image_res / 4) >> s;
                    let w = c.window_size.min(res);
                    if c.window_size <= 0 || res % w != 0 {
                        return bad(format!(
                            "stage {s}: resolution {res} not divisible by window {w}"
                        ));
                    }
                }
                Ok(())
            }
            VisionConfig::ClipVit(c) => {
                if c.image_res <= 0 || c.image_res % c.patch_size != 0 {
                    return bad(format!(
                        "image_res {} must be a positive multiple of patch_size {}",
                        c.image_res, c.patch_size
                    ));
                }
                if c.vision_width % c.num_attention_heads != 0 {
                    return bad(format!(
                        "vision_width {} not divisible by {} heads",
                        c.vision_width, c.num_attention_heads
                    ));
                }
                if c.local_attn_depth < 0 || c.local_attn_depth > c.num_hidden_layers {
                    return bad(format!(
                        "local_attn_depth {} outside 0..={}",
                        c.local_attn_depth, c.num_hidden_layers
                    ));
                }
                if c.hidden_act != "quick_gelu" && c.hidden_act != "gelu" {
                    return bad(format!("unsupported hidden_act {:?}", c.hidden_act));
                }
                Ok(())
            }
            VisionConfig::Deit(c) => {
                if c.image_res <= 0 || c.image_res % c.patch_size != 0 {
                    return bad(format!(
                        "image_res {} must be a positive multiple of 16",
                        c.image_res
                    ));
                }
                Ok(())
            }
        }
    }

    /// `configs/config_swinB_224.json`.
    pub fn swin_b_224() -> Self {
        Self::swin_b(224, 7)
    }

    /// `configs/config_swinB_384.json`.
    pub fn swin_b_384() -> Self {
        Self::swin_b(384, 12)
    }

    /// `configs/config_swinB_480.json`.
    pub fn swin_b_480() -> Self {
        Self::swin_b(480, 15)
    }

    fn swin_b(image_res: i64, window_size: i64) -> Self {
        VisionConfig::Swin(SwinConfig {
            ckpt: Some("data/swin_base_patch4_window7_224_22k.pth".into()),
            vision_width: 1024,
            image_res,
            window_size,
            embed_dim: 128,
            depths: vec![2, 2, 18, 2],
            num_heads: vec![4, 8, 16, 32],
            drop_path_rate: default_swin_drop_path(),
        })
    }

    /// `configs/config_clipvitB.json` at input side `image_res`.
    pub fn clip_vit_b16(image_res: i64) -> Self {
        VisionConfig::ClipVit(ClipVitConfig {
            ckpt: Some("data/clip-vit-base-patch16.bin".into()),
            vision_width: 768,
            patch_size: 16,
            hidden_act: "quick_gelu".into(),
            num_attention_heads: 12,
            attention_dropout: 0.0,
            intermediate_size: 3072,
            num_hidden_layers: 12,
            local_attn_depth: 4,
            image_res,
        })
    }
}

/// The vision encoder of an X-VLM model, built at the `vision_encoder` path.
pub enum VisionEncoder {
    /// Swin Transformer.
    Swin(SwinTransformer),
    /// CLIP ViT.
    ClipVit(ClipVisionTransformer),
    /// DeiT ViT.
    Deit(DeitVisionTransformer),
}

impl VisionEncoder {
    /// Builds the encoder's parameters under `p` (the `vision_encoder` path) with the official names.
    pub fn new(p: &nn::Path, cfg: &VisionConfig) -> Result<Self, VisionError> {
        cfg.validate()?;
        Ok(match cfg {
            VisionConfig::Swin(c) => VisionEncoder::Swin(SwinTransformer::new(p, c)),
            VisionConfig::ClipVit(c) => VisionEncoder::ClipVit(ClipVisionTransformer::new(p, c)),
            VisionConfig::Deit(c) => VisionEncoder::Deit(DeitVisionTransformer::new(p, c)),
        })
    }

    /// Output width (`vision_width`).
    pub fn width(&self) -> i64 {
        match self {
            VisionEncoder::Swin(m) => m.width(),
            VisionEncoder::ClipVit(m) => m.width(),
            VisionEncoder::Deit(m) => m.width(),
        }
    }

    /// Number of patch tokens P of the output (the output has 1 + P tokens).
    pub fn num_patch_tokens(&self) -> i64 {
        match self {
            VisionEncoder::Swin(m) => m.num_patch_tokens(),
            VisionEncoder::ClipVit(m) => m.num_patch_tokens(),
            VisionEncoder::Deit(m) => m.num_patch_tokens(),
        }
    }

    /// Buffers the official state dict holds but we compute (Swin `relative_position_index`/`attn_mask`,
    /// CLIP `position_ids`), named relative to `vision_encoder.`.
    pub fn buffers(&self) -> Vec<(String, Tensor)> {
        match self {
            VisionEncoder::Swin(m) => m.buffers(),
            VisionEncoder::ClipVit(m) => m.buffers(),
            VisionEncoder::Deit(_) => Vec::new(),
        }
    }

    /// The official forward: image [B, 3, R, R] → ([B, 1+P, D], None); with both `idx_to_group_img` [Bt]
    /// and `image_atts` [Bt, 1+P]: (region embeds [Bt, 1+P, D], Some(full embeds [B, 1+P, D])).
    pub fn forward_t(
        &self,
        image: &Tensor,
        idx_to_group_img: Option<&Tensor>,
        image_atts: Option<&Tensor>,
        train: bool,
    ) -> (Tensor, Option<Tensor>) {
        let regions = idx_to_group_img.zip(image_atts);
        match self {
            VisionEncoder::Swin(m) => m.forward_t(image, regions, train),
            VisionEncoder::ClipVit(m) => m.forward_t(image, regions, train),
            VisionEncoder::Deit(m) => m.forward_t(image, regions, train),
        }
    }

    /// Eval-mode forward returning the first official output (see [`VisionEncoder::forward_t`]).
    pub fn forward(
        &self,
        image: &Tensor,
        idx_to_group_img: Option<&Tensor>,
        image_atts: Option<&Tensor>,
    ) -> Tensor {
        self.forward_t(image, idx_to_group_img, image_atts, false).0
    }
}

/// Gathers rows of `x` [B, N, D] per text: `x[idx]` → [Bt, N, D] (`torch.gather` on dim 0).
pub(crate) fn gather_rows(x: &Tensor, idx: &Tensor) -> Tensor {
    x.index_select(0, &idx.to_device(x.device()))
}
