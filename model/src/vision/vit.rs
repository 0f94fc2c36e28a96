//! CLIP ViT (`models/clip_vit.py:CLIPVisionTransformer`, HF CLIP layer names) and DeiT
//! (`models/vit.py:VisionTransformer`, timm names), with X-VLM's local attention for regions
//! (XVLM-REFERENCE.md §1.4): the last `local_attn_depth` layers run on `[x_bs; x]`, where `x_bs` are the
//! hidden states gathered per text, with the additive key mask `(1 − [image_atts; ones])·(−10000)`.

use tch::nn::{self, Module};
use tch::Tensor;

use super::swin::{drop_path, layer_norm};
use super::{gather_rows, ClipVitConfig, DeitConfig};

/// `[image_atts; ones]` [Bt + B, N] → additive key mask [Bt + B, 1, 1, N] (`(1 − m)·(−10000)`).
fn local_attention_mask(image_atts: &Tensor, batch: i64, tokens: i64, like: &Tensor) -> Tensor {
    let full = Tensor::ones([batch, tokens], (like.kind(), like.device()));
    let atts = Tensor::cat(
        &[
            image_atts.to_device(like.device()).to_kind(like.kind()),
            full,
        ],
        0,
    );
    (atts.unsqueeze(1).unsqueeze(2).neg() + 1.0) * -10000.0
}

/// Runs `layers` the way both official ViTs do: the first `depth − local` layers on the images; then,
/// with regions, the rest on `[x_bs; x]` under the local mask. Returns (states, Bt) where Bt is the number
/// of leading region rows (0 without regions).
fn run_layers<L>(
    x: Tensor,
    layers: &[L],
    local_depth: i64,
    regions: Option<(&Tensor, &Tensor)>,
    layer_fn: impl Fn(&L, &Tensor, Option<&Tensor>) -> Tensor,
) -> (Tensor, i64) {
    let depth = layers.len() as i64;
    let (b, n) = (x.size()[0], x.size()[1]);
    let mask = regions
        .filter(|_| local_depth > 0)
        .map(|(_, atts)| local_attention_mask(atts, b, n, &x));
    let mut x = x;
    let mut region_rows = 0;
    for (i, layer) in layers.iter().enumerate() {
        let local = local_depth > 0 && (i as i64) >= depth - local_depth;
        if local && region_rows == 0 {
            if let Some((idx, _)) = regions {
                let x_bs = gather_rows(&x, idx);
                region_rows = x_bs.size()[0];
                x = Tensor::cat(&[x_bs, x], 0);
            }
        }
        x = layer_fn(layer, &x, if local { mask.as_ref() } else { None });
    }
    if let (Some((idx, _)), 0) = (regions, region_rows) {
        // local_attn_depth 0: the official code would mis-split; regions then get the plain outputs.
        let x_bs = gather_rows(&x, idx);
        region_rows = x_bs.size()[0];
        x = Tensor::cat(&[x_bs, x], 0);
    }
    (x, region_rows)
}

/// Splits `[x_bs; x]` after the final norm into (x_bs, Some(x)), or returns (x, None).
fn split_regions(x: Tensor, region_rows: i64) -> (Tensor, Option<Tensor>) {
    if region_rows == 0 {
        return (x, None);
    }
    let total = x.size()[0];
    let parts = x.split_with_sizes([region_rows, total - region_rows], 0);
    let mut it = parts.into_iter();
    match (it.next(), it.next()) {
        (Some(r), Some(f)) => (r, Some(f)),
        _ => unreachable!("split_with_sizes returns two parts"),
    }
}

/// HF `CLIPAttention`: q scaled by head_dim^-0.5 before `q·kᵀ`; optional additive mask.
#[derive(Debug)]
struct ClipAttention {
    q_proj: nn::Linear,
    k_proj: nn::Linear,
    v_proj: nn::Linear,
    out_proj: nn::Linear,
    heads: i64,
    scale: f64,
    dropout: f64,
}

impl ClipAttention {
    fn new(p: nn::Path, dim: i64, heads: i64, dropout: f64) -> Self {
        let lin = |name: &str| nn::linear(&p / name, dim, dim, Default::default());
        ClipAttention {
            k_proj: lin("k_proj"),
            v_proj: lin("v_proj"),
            q_proj: lin("q_proj"),
            out_proj: lin("out_proj"),
            heads,
            scale: ((dim / heads) as f64).powf(-0.5),
            dropout,
        }
    }

    fn forward_t(&self, x: &Tensor, mask: Option<&Tensor>, train: bool) -> Tensor {
        let (b, n, d) = x.size3().expect("CLIPAttention expects [B, N, D]");
        let hd = d / self.heads;
        let shape = |t: Tensor| {
            t.view([b, -1, self.heads, hd])
                .transpose(1, 2)
                .contiguous()
                .view([b * self.heads, -1, hd])
        };
        let q = shape(x.apply(&self.q_proj) * self.scale);
        let k = shape(x.apply(&self.k_proj));
        let v = shape(x.apply(&self.v_proj));
        let mut w = q.bmm(&k.transpose(1, 2));
        if let Some(mask) = mask {
            w = (w.view([b, self.heads, n, n]) + mask).view([b * self.heads, n, n]);
        }
        let probs = w.softmax(-1, w.kind()).dropout(self.dropout, train);
        probs
            .bmm(&v)
            .view([b, self.heads, n, hd])
            .transpose(1, 2)
            .reshape([b, n, d])
            .apply(&self.out_proj)
    }
}

/// HF `CLIPMLP`: fc1 → activation → fc2.
#[derive(Debug)]
struct ClipMlp {
    fc1: nn::Linear,
    fc2: nn::Linear,
    quick_gelu: bool,
}

impl Module for ClipMlp {
    fn forward(&self, x: &Tensor) -> Tensor {
        let h = x.apply(&self.fc1);
        let h = if self.quick_gelu {
            // HF quick_gelu: x · σ(1.702x)
            &h * (&h * 1.702).sigmoid()
        } else {
            h.gelu("none")
        };
        h.apply(&self.fc2)
    }
}

/// HF `CLIPEncoderLayer`: pre-norm attention and MLP blocks with residuals.
#[derive(Debug)]
struct ClipEncoderLayer {
    self_attn: ClipAttention,
    layer_norm1: nn::LayerNorm,
    mlp: ClipMlp,
    layer_norm2: nn::LayerNorm,
}

impl ClipEncoderLayer {
    fn new(p: nn::Path, cfg: &ClipVitConfig) -> Self {
        let d = cfg.vision_width;
        let mp = &p / "mlp";
        ClipEncoderLayer {
            self_attn: ClipAttention::new(
                &p / "self_attn",
                d,
                cfg.num_attention_heads,
                cfg.attention_dropout,
            ),
            layer_norm1: layer_norm(&p / "layer_norm1", d, 1e-5),
            mlp: ClipMlp {
                fc1: nn::linear(&mp / "fc1", d, cfg.intermediate_size, Default::default()),
                fc2: nn::linear(&mp / "fc2", cfg.intermediate_size, d, Default::default()),
                quick_gelu: cfg.hidden_act == "quick_gelu",
            },
            layer_norm2: layer_norm(&p / "layer_norm2", d, 1e-5),
        }
    }

    fn forward_t(&self, x: &Tensor, mask: Option<&Tensor>, train: bool) -> Tensor {
        let h = x + self
            .self_attn
            .forward_t(&x.apply(&self.layer_norm1), mask, train);
        &h + h.apply(&self.layer_norm2).apply(&self.mlp)
    }
}

/// `CLIPVisionTransformer`: conv patches (no bias), class embedding, learned positions, pre-LN
/// (`pre_layrnorm`), encoder, `post_layernorm` on all tokens.
#[derive(Debug)]
pub struct ClipVisionTransformer {
    patch_embed: nn::Conv2D,
    class_embedding: Tensor,
    pos_embed: nn::Embedding,
    pre_layrnorm: nn::LayerNorm,
    layers: Vec<ClipEncoderLayer>,
    post_layernorm: nn::LayerNorm,
    local_attn_depth: i64,
    image_res: i64,
    width: i64,
    num_patches: i64,
}

impl ClipVisionTransformer {
    /// Builds the encoder under `p` (the `vision_encoder` path) with HF CLIP names.
    pub fn new(p: &nn::Path, cfg: &ClipVitConfig) -> Self {
        let d = cfg.vision_width;
        let grid = cfg.image_res / cfg.patch_size;
        let num_patches = grid * grid;
        let patch_embed = nn::conv2d(
            p / "patch_embed",
            3,
            d,
            cfg.patch_size,
            nn::ConvConfig {
                stride: cfg.patch_size,
                bias: false,
                ..Default::default()
            },
        );
        let class_embedding = p.var(
            "class_embedding",
            &[d],
            nn::Init::Randn {
                mean: 0.0,
                stdev: 1.0,
            },
        );
        let pos_embed = nn::embedding(p / "pos_embed", num_patches + 1, d, Default::default());
        let ep = p / "encoder" / "layers";
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| ClipEncoderLayer::new(&ep / i, cfg))
            .collect();
        ClipVisionTransformer {
            patch_embed,
            class_embedding,
            pos_embed,
            pre_layrnorm: layer_norm(p / "pre_layrnorm", d, 1e-5),
            layers,
            post_layernorm: layer_norm(p / "post_layernorm", d, 1e-5),
            local_attn_depth: cfg.local_attn_depth,
            image_res: cfg.image_res,
            width: d,
            num_patches,
        }
    }

    /// Output width.
    pub fn width(&self) -> i64 {
        self.width
    }

    /// Patch tokens P.
    pub fn num_patch_tokens(&self) -> i64 {
        self.num_patches
    }

    /// The `position_ids` buffer [1, 1+P] under its official name.
    pub fn buffers(&self) -> Vec<(String, Tensor)> {
        let ids = Tensor::arange(
            self.num_patches + 1,
            (tch::Kind::Int64, self.class_embedding.device()),
        );
        vec![("position_ids".to_string(), ids.unsqueeze(0))]
    }

    /// `CLIPVisionTransformer.forward`: ([B, 1+P, D], None), or with regions
    /// (region states per text [Bt, 1+P, D], Some(full states per image [B, 1+P, D])).
    pub fn forward_t(
        &self,
        image: &Tensor,
        regions: Option<(&Tensor, &Tensor)>,
        train: bool,
    ) -> (Tensor, Option<Tensor>) {
        let size = image.size();
        assert!(
            size.len() == 4 && size[2] == self.image_res && size[3] == self.image_res,
            "CLIP-ViT input {size:?} doesn't match the model image_res {}",
            self.image_res
        );
        let b = size[0];
        let x = image
            .apply(&self.patch_embed)
            .flatten(2, -1)
            .transpose(1, 2);
        let cls = self.class_embedding.expand([b, 1, -1], false);
        let x = Tensor::cat(&[cls, x], 1) + self.pos_embed.ws.unsqueeze(0);
        let x = x.apply(&self.pre_layrnorm);
        let (x, rows) = run_layers(
            x,
            &self.layers,
            self.local_attn_depth,
            regions,
            |l, x, m| l.forward_t(x, m, train),
        );
        split_regions(x.apply(&self.post_layernorm), rows)
    }
}

/// timm `Attention` as X-VLM's `models/vit.py` patches it: `(q·kᵀ)·scale + mask`.
#[derive(Debug)]
struct DeitAttention {
    qkv: nn::Linear,
    proj: nn::Linear,
    heads: i64,
    scale: f64,
}

impl DeitAttention {
    fn forward(&self, x: &Tensor, mask: Option<&Tensor>) -> Tensor {
        let (b, n, c) = x.size3().expect("Attention expects [B, N, C]");
        let qkv = x
            .apply(&self.qkv)
            .reshape([b, n, 3, self.heads, c / self.heads])
            .permute([2, 0, 3, 1, 4]);
        let (q, k, v) = (qkv.get(0), qkv.get(1), qkv.get(2));
        let attn = q.matmul(&k.transpose(-2, -1)) * self.scale;
        let attn = match mask {
            Some(mask) => attn + mask,
            None => attn,
        };
        attn.softmax(-1, attn.kind())
            .matmul(&v)
            .transpose(1, 2)
            .reshape([b, n, c])
            .apply(&self.proj)
    }
}

/// timm `Block`: pre-norm attention and MLP (exact GELU), LayerNorm eps 1e-6.
#[derive(Debug)]
struct DeitBlock {
    norm1: nn::LayerNorm,
    attn: DeitAttention,
    norm2: nn::LayerNorm,
    fc1: nn::Linear,
    fc2: nn::Linear,
}

impl DeitBlock {
    fn new(p: nn::Path, cfg: &DeitConfig) -> Self {
        let d = cfg.embed_dim;
        let lin = |q: nn::Path, i: i64, o: i64| {
            nn::linear(
                q,
                i,
                o,
                nn::LinearConfig {
                    ws_init: nn::Init::Randn {
                        mean: 0.0,
                        stdev: 0.02,
                    },
                    bs_init: Some(nn::Init::Const(0.0)),
                    bias: true,
                },
            )
        };
        let ap = &p / "attn";
        let mp = &p / "mlp";
        DeitBlock {
            norm1: layer_norm(&p / "norm1", d, 1e-6),
            attn: DeitAttention {
                qkv: lin(&ap / "qkv", d, 3 * d),
                proj: lin(&ap / "proj", d, d),
                heads: cfg.num_heads,
                scale: ((d / cfg.num_heads) as f64).powf(-0.5),
            },
            norm2: layer_norm(&p / "norm2", d, 1e-6),
            fc1: lin(&mp / "fc1", d, cfg.mlp_ratio * d),
            fc2: lin(&mp / "fc2", cfg.mlp_ratio * d, d),
        }
    }

    fn forward_t(&self, x: &Tensor, mask: Option<&Tensor>, train: bool) -> Tensor {
        // drop_path is 0 in the official DeiT build.
        let x = x + drop_path(&self.attn.forward(&x.apply(&self.norm1), mask), 0.0, train);
        let m = x
            .apply(&self.norm2)
            .apply(&self.fc1)
            .gelu("none")
            .apply(&self.fc2);
        &x + m
    }
}

/// `models/vit.py:VisionTransformer` (DeiT-B/16 without head): `patch_embed.proj`, `cls_token`,
/// `pos_embed`, `blocks.{i}`, final `norm`.
#[derive(Debug)]
pub struct DeitVisionTransformer {
    proj: nn::Conv2D,
    cls_token: Tensor,
    pos_embed: Tensor,
    blocks: Vec<DeitBlock>,
    norm: nn::LayerNorm,
    local_attn_depth: i64,
    image_res: i64,
    width: i64,
    num_patches: i64,
}

impl DeitVisionTransformer {
    /// Builds the encoder under `p` (the `vision_encoder` path) with timm names.
    pub fn new(p: &nn::Path, cfg: &DeitConfig) -> Self {
        let d = cfg.embed_dim;
        let grid = cfg.image_res / cfg.patch_size;
        let num_patches = grid * grid;
        let trunc = nn::Init::Randn {
            mean: 0.0,
            stdev: 0.02,
        };
        let proj = nn::conv2d(
            p / "patch_embed" / "proj",
            3,
            d,
            cfg.patch_size,
            nn::ConvConfig {
                stride: cfg.patch_size,
                ..Default::default()
            },
        );
        let cls_token = p.var("cls_token", &[1, 1, d], trunc);
        let pos_embed = p.var("pos_embed", &[1, num_patches + 1, d], trunc);
        let blocks = (0..cfg.depth)
            .map(|i| DeitBlock::new(p / "blocks" / i, cfg))
            .collect();
        DeitVisionTransformer {
            proj,
            cls_token,
            pos_embed,
            blocks,
            norm: layer_norm(p / "norm", d, 1e-6),
            local_attn_depth: cfg.local_attn_depth,
            image_res: cfg.image_res,
            width: d,
            num_patches,
        }
    }

    /// Output width.
    pub fn width(&self) -> i64 {
        self.width
    }

    /// Patch tokens P.
    pub fn num_patch_tokens(&self) -> i64 {
        self.num_patches
    }

    /// `VisionTransformer.forward`: as [`ClipVisionTransformer::forward_t`].
    pub fn forward_t(
        &self,
        image: &Tensor,
        regions: Option<(&Tensor, &Tensor)>,
        train: bool,
    ) -> (Tensor, Option<Tensor>) {
        let size = image.size();
        assert!(
            size.len() == 4 && size[2] == self.image_res && size[3] == self.image_res,
            "DeiT input {size:?} doesn't match the model image_res {}",
            self.image_res
        );
        let b = size[0];
        let x = image.apply(&self.proj).flatten(2, -1).transpose(1, 2);
        let cls = self.cls_token.expand([b, -1, -1], false);
        let x = Tensor::cat(&[cls, x], 1);
        let n = x.size()[1];
        let x = x + self.pos_embed.slice(1, 0, n, 1);
        let (x, rows) = run_layers(
            x,
            &self.blocks,
            self.local_attn_depth,
            regions,
            |l, x, m| l.forward_t(x, m, train),
        );
        split_regions(x.apply(&self.norm), rows)
    }
}
