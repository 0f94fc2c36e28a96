//! Swin Transformer as `models/swin_transformer.py` defines it (XVLM-REFERENCE.md §1.3), with the
//! official parameter names (`patch_embed.proj`, `layers.{s}.blocks.{b}.attn.qkv`, ...).
//!
//! The `relative_position_index` and shift `attn_mask` buffers are computed here, never loaded.

use tch::nn::{self, Module};
use tch::{Kind, Tensor};

use super::{gather_rows, SwinConfig};

/// Linear layer with the official Swin init (weights trunc-normal std .02, bias 0).
fn swin_linear(p: nn::Path, in_dim: i64, out_dim: i64, bias: bool) -> nn::Linear {
    nn::linear(
        p,
        in_dim,
        out_dim,
        nn::LinearConfig {
            ws_init: nn::Init::Randn {
                mean: 0.0,
                stdev: 0.02,
            },
            bs_init: Some(nn::Init::Const(0.0)),
            bias,
        },
    )
}

/// LayerNorm with the given eps (weight 1, bias 0).
pub(crate) fn layer_norm(p: nn::Path, dim: i64, eps: f64) -> nn::LayerNorm {
    nn::layer_norm(
        p,
        vec![dim],
        nn::LayerNormConfig {
            eps,
            ..Default::default()
        },
    )
}

/// timm `DropPath`: per-sample Bernoulli keep mask scaled by 1/keep_prob; identity at eval or p = 0.
pub(crate) fn drop_path(x: &Tensor, prob: f64, train: bool) -> Tensor {
    if !train || prob == 0.0 {
        return x.shallow_clone();
    }
    let keep = 1.0 - prob;
    let mut shape = vec![x.size()[0]];
    shape.extend(std::iter::repeat_n(1, x.dim() - 1));
    let random = (Tensor::rand(&shape, (x.kind(), x.device())) + keep).floor();
    x.g_div_scalar(keep) * random
}

/// `window_partition`: [B, H, W, C] → [B·nW, w, w, C] (batch outermost, then window row, window col).
pub fn window_partition(x: &Tensor, w: i64) -> Tensor {
    let (b, h, wd, c) = x.size4().expect("window_partition expects [B, H, W, C]");
    x.view([b, h / w, w, wd / w, w, c])
        .permute([0, 1, 3, 2, 4, 5])
        .contiguous()
        .view([-1, w, w, c])
}

/// `window_reverse`: [B·nW, w, w, C] → [B, H, W, C], the exact inverse of [`window_partition`].
pub fn window_reverse(windows: &Tensor, w: i64, h: i64, wd: i64) -> Tensor {
    let b = windows.size()[0] / (h * wd / w / w);
    windows
        .view([b, h / w, wd / w, w, w, -1])
        .permute([0, 1, 3, 2, 4, 5])
        .contiguous()
        .view([b, h, wd, -1])
}

/// `relative_position_index` for a w×w window: [w², w²] int64,
/// index(a, b) = (ha − hb + w − 1)·(2w − 1) + (wa − wb + w − 1).
pub fn relative_position_index(w: i64) -> Tensor {
    let n = (w * w) as usize;
    let mut idx = Vec::with_capacity(n * n);
    for a in 0..w * w {
        for b in 0..w * w {
            let (ha, wa) = (a / w, a % w);
            let (hb, wb) = (b / w, b % w);
            idx.push((ha - hb + w - 1) * (2 * w - 1) + (wa - wb + w - 1));
        }
    }
    Tensor::from_slice(&idx).view([w * w, w * w])
}

/// Shifted-window `attn_mask` for an H×W map: [nW, w², w²] float32, −100 where the two tokens of a window
/// come from different regions of the rolled map, else 0.
pub fn shift_attn_mask(h: i64, wd: i64, w: i64, shift: i64) -> Tensor {
    let region = |i: i64, size: i64| -> i64 {
        if i < size - w {
            0
        } else if i < size - shift {
            1
        } else {
            2
        }
    };
    let n = w * w;
    let mut mask = Vec::with_capacity(((h / w) * (wd / w) * n * n) as usize);
    for wr in 0..h / w {
        for wc in 0..wd / w {
            let label = |t: i64| region(wr * w + t / w, h) * 3 + region(wc * w + t % w, wd);
            for a in 0..n {
                for b in 0..n {
                    mask.push(if label(a) != label(b) { -100f32 } else { 0f32 });
                }
            }
        }
    }
    Tensor::from_slice(&mask).view([-1, n, n])
}

/// `WindowAttention`: multi-head self-attention inside a window with a relative position bias.
#[derive(Debug)]
pub struct WindowAttention {
    qkv: nn::Linear,
    proj: nn::Linear,
    relative_position_bias_table: Tensor,
    relative_position_index: Tensor,
    num_heads: i64,
    window: i64,
    scale: f64,
}

impl WindowAttention {
    /// Builds `qkv`, `proj` and `relative_position_bias_table` [(2w−1)², heads] under `p`.
    pub fn new(p: nn::Path, dim: i64, window: i64, num_heads: i64) -> Self {
        let table = p.var(
            "relative_position_bias_table",
            &[(2 * window - 1) * (2 * window - 1), num_heads],
            nn::Init::Randn {
                mean: 0.0,
                stdev: 0.02,
            },
        );
        let head_dim = dim / num_heads;
        WindowAttention {
            qkv: swin_linear(&p / "qkv", dim, 3 * dim, true),
            proj: swin_linear(&p / "proj", dim, dim, true),
            relative_position_bias_table: table,
            relative_position_index: relative_position_index(window).to_device(p.device()),
            num_heads,
            window,
            scale: (head_dim as f64).powf(-0.5),
        }
    }

    /// x [B·nW, N, C], mask [nW, N, N] → [B·nW, N, C].
    pub fn forward(&self, x: &Tensor, mask: Option<&Tensor>) -> Tensor {
        let (b_, n, c) = x.size3().expect("WindowAttention expects [B_, N, C]");
        let h = self.num_heads;
        let qkv = x
            .apply(&self.qkv)
            .reshape([b_, n, 3, h, c / h])
            .permute([2, 0, 3, 1, 4]);
        let (q, k, v) = (qkv.get(0), qkv.get(1), qkv.get(2));
        let q = q * self.scale;
        let nn_ = self.window * self.window;
        let bias = self
            .relative_position_bias_table
            .index_select(0, &self.relative_position_index.view([-1]))
            .view([nn_, nn_, -1])
            .permute([2, 0, 1])
            .contiguous();
        let attn = q.matmul(&k.transpose(-2, -1)) + bias.unsqueeze(0);
        let attn = match mask {
            Some(mask) => {
                let nw = mask.size()[0];
                (attn.view([b_ / nw, nw, h, n, n]) + mask.unsqueeze(1).unsqueeze(0))
                    .view([-1, h, n, n])
            }
            None => attn,
        };
        let attn = attn.softmax(-1, attn.kind());
        attn.matmul(&v)
            .transpose(1, 2)
            .reshape([b_, n, c])
            .apply(&self.proj)
    }
}

/// timm `Mlp`: fc1 → exact GELU → fc2.
#[derive(Debug)]
pub struct Mlp {
    fc1: nn::Linear,
    fc2: nn::Linear,
}

impl Mlp {
    /// Builds `fc1` (dim → hidden) and `fc2` (hidden → dim) under `p`.
    pub fn new(p: nn::Path, dim: i64, hidden: i64) -> Self {
        Mlp {
            fc1: swin_linear(&p / "fc1", dim, hidden, true),
            fc2: swin_linear(&p / "fc2", hidden, dim, true),
        }
    }
}

impl Module for Mlp {
    fn forward(&self, x: &Tensor) -> Tensor {
        x.apply(&self.fc1).gelu("none").apply(&self.fc2)
    }
}

/// `SwinTransformerBlock`: (shifted) window attention and MLP, pre-norm with residuals.
#[derive(Debug)]
pub struct SwinBlock {
    norm1: nn::LayerNorm,
    attn: WindowAttention,
    norm2: nn::LayerNorm,
    mlp: Mlp,
    resolution: (i64, i64),
    window: i64,
    shift: i64,
    attn_mask: Option<Tensor>,
    drop_path: f64,
}

impl SwinBlock {
    /// Builds a block for an H×W map; clamps the window to the resolution (no shift) like the official.
    pub fn new(
        p: nn::Path,
        dim: i64,
        resolution: (i64, i64),
        num_heads: i64,
        window: i64,
        shift: i64,
        drop_path: f64,
    ) -> Self {
        let (mut window, mut shift) = (window, shift);
        let min_res = resolution.0.min(resolution.1);
        if min_res <= window {
            shift = 0;
            window = min_res;
        }
        let attn_mask = (shift > 0).then(|| {
            shift_attn_mask(resolution.0, resolution.1, window, shift).to_device(p.device())
        });
        SwinBlock {
            norm1: layer_norm(&p / "norm1", dim, 1e-5),
            attn: WindowAttention::new(&p / "attn", dim, window, num_heads),
            norm2: layer_norm(&p / "norm2", dim, 1e-5),
            mlp: Mlp::new(&p / "mlp", dim, 4 * dim),
            resolution,
            window,
            shift,
            attn_mask,
            drop_path,
        }
    }

    /// Window size after clamping.
    pub fn window(&self) -> i64 {
        self.window
    }

    /// Shift after clamping.
    pub fn shift(&self) -> i64 {
        self.shift
    }

    /// The computed `relative_position_index` buffer [w², w²].
    pub fn relative_position_index(&self) -> &Tensor {
        &self.attn.relative_position_index
    }

    /// The computed shift `attn_mask` buffer [nW, w², w²] (shifted blocks only).
    pub fn attn_mask(&self) -> Option<&Tensor> {
        self.attn_mask.as_ref()
    }

    /// x [B, H·W, C] → [B, H·W, C].
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Tensor {
        let (h, wd) = self.resolution;
        let (b, l, c) = x.size3().expect("SwinBlock expects [B, L, C]");
        assert_eq!(
            l,
            h * wd,
            "Swin block: input has {l} tokens, expected {h}x{wd}"
        );
        let w = self.window;
        let shortcut = x;
        let mut y = x.apply(&self.norm1).view([b, h, wd, c]);
        if self.shift > 0 {
            y = y.roll([-self.shift, -self.shift], [1, 2]);
        }
        let windows = window_partition(&y, w).view([-1, w * w, c]);
        let attn = self
            .attn
            .forward(&windows, self.attn_mask.as_ref())
            .view([-1, w, w, c]);
        let mut y = window_reverse(&attn, w, h, wd);
        if self.shift > 0 {
            y = y.roll([self.shift, self.shift], [1, 2]);
        }
        let y = y.view([b, h * wd, c]);
        let x = shortcut + drop_path(&y, self.drop_path, train);
        let m = x.apply(&self.norm2).apply(&self.mlp);
        &x + drop_path(&m, self.drop_path, train)
    }
}

/// `PatchMerging`: 2×2 neighbourhoods concatenated (x0 even/even, x1 odd/even, x2 even/odd, x3 odd/odd)
/// → LayerNorm(4C) → Linear(4C → 2C, no bias).
#[derive(Debug)]
pub struct PatchMerging {
    norm: nn::LayerNorm,
    reduction: nn::Linear,
    resolution: (i64, i64),
}

impl PatchMerging {
    /// Builds `norm` and `reduction` under `p` for an H×W map of `dim` channels.
    pub fn new(p: nn::Path, dim: i64, resolution: (i64, i64)) -> Self {
        PatchMerging {
            reduction: swin_linear(&p / "reduction", 4 * dim, 2 * dim, false),
            norm: layer_norm(&p / "norm", 4 * dim, 1e-5),
            resolution,
        }
    }
}

impl Module for PatchMerging {
    /// x [B, H·W, C] → [B, H·W/4, 2C].
    fn forward(&self, x: &Tensor) -> Tensor {
        let (h, w) = self.resolution;
        let (b, _, c) = x.size3().expect("PatchMerging expects [B, L, C]");
        let x = x.view([b, h, w, c]);
        let phase = |r: i64, col: i64| x.slice(1, r, None, 2).slice(2, col, None, 2);
        Tensor::cat(&[phase(0, 0), phase(1, 0), phase(0, 1), phase(1, 1)], -1)
            .view([b, -1, 4 * c])
            .apply(&self.norm)
            .apply(&self.reduction)
    }
}

/// `BasicLayer`: one stage of blocks, then an optional patch merging.
#[derive(Debug)]
pub struct SwinStage {
    blocks: Vec<SwinBlock>,
    downsample: Option<PatchMerging>,
}

impl SwinStage {
    /// The stage's blocks.
    pub fn blocks(&self) -> &[SwinBlock] {
        &self.blocks
    }

    /// x [B, L, C] → [B, L, C] or [B, L/4, 2C] after merging.
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Tensor {
        let mut x = x.shallow_clone();
        for block in &self.blocks {
            x = block.forward_t(&x, train);
        }
        match &self.downsample {
            Some(d) => x.apply(d),
            None => x,
        }
    }
}

/// `SwinTransformer` without a classification head; output token 0 is the mean of the patch tokens.
#[derive(Debug)]
pub struct SwinTransformer {
    proj: nn::Conv2D,
    patch_norm: nn::LayerNorm,
    layers: Vec<SwinStage>,
    norm: nn::LayerNorm,
    image_res: i64,
    width: i64,
    num_patches: i64,
}

impl SwinTransformer {
    /// Builds the encoder under `p` (the `vision_encoder` path).
    pub fn new(p: &nn::Path, cfg: &SwinConfig) -> Self {
        const PATCH: i64 = 4;
        let proj = nn::conv2d(
            p / "patch_embed" / "proj",
            3,
            cfg.embed_dim,
            PATCH,
            nn::ConvConfig {
                stride: PATCH,
                ..Default::default()
            },
        );
        let patch_norm = layer_norm(p / "patch_embed" / "norm", cfg.embed_dim, 1e-5);
        let total: i64 = cfg.depths.iter().sum();
        // torch.linspace(0, rate, total) in float32, as `[x.item() for x in ...]`.
        let dpr: Vec<f64> = if total > 0 {
            Vec::<f64>::try_from(Tensor::linspace(
                0.0,
                cfg.drop_path_rate,
                total,
                (Kind::Float, tch::Device::Cpu),
            ))
            .unwrap_or_default()
        } else {
            Vec::new()
        };
        let stages = cfg.depths.len();
        let grid = cfg.image_res / PATCH;
        let mut layers = Vec::with_capacity(stages);
        let mut offset = 0usize;
        for (s, (&depth, &heads)) in cfg.depths.iter().zip(&cfg.num_heads).enumerate() {
            let dim = cfg.embed_dim << s;
            let res = (grid >> s, grid >> s);
            let lp = p / "layers" / s;
            let blocks = (0..depth)
                .map(|b| {
                    let shift = if b % 2 == 0 { 0 } else { cfg.window_size / 2 };
                    let rate = dpr.get(offset + b as usize).copied().unwrap_or(0.0);
                    SwinBlock::new(
                        &lp / "blocks" / b,
                        dim,
                        res,
                        heads,
                        cfg.window_size,
                        shift,
                        rate,
                    )
                })
                .collect();
            offset += depth as usize;
            let downsample =
                (s + 1 < stages).then(|| PatchMerging::new(&lp / "downsample", dim, res));
            layers.push(SwinStage { blocks, downsample });
        }
        let width = cfg.embed_dim << (stages - 1);
        let last = grid >> (stages - 1);
        SwinTransformer {
            proj,
            patch_norm,
            layers,
            norm: layer_norm(p / "norm", width, 1e-5),
            image_res: cfg.image_res,
            width,
            num_patches: last * last,
        }
    }

    /// Output width.
    pub fn width(&self) -> i64 {
        self.width
    }

    /// Final-stage patch tokens P.
    pub fn num_patch_tokens(&self) -> i64 {
        self.num_patches
    }

    /// The stages (for inspection in tests).
    pub fn stages(&self) -> &[SwinStage] {
        &self.layers
    }

    /// The computed buffers under their official names (relative to `vision_encoder.`), for writing
    /// checkpoints the official code loads unchanged.
    pub fn buffers(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        for (s, stage) in self.layers.iter().enumerate() {
            for (b, block) in stage.blocks.iter().enumerate() {
                let base = format!("layers.{s}.blocks.{b}");
                if let Some(mask) = block.attn_mask() {
                    out.push((format!("{base}.attn_mask"), mask.shallow_clone()));
                }
                out.push((
                    format!("{base}.attn.relative_position_index"),
                    block.relative_position_index().shallow_clone(),
                ));
            }
        }
        out
    }

    /// Final normed patch tokens [B, P, C] of images [B, 3, R, R].
    pub fn forward_patches(&self, image: &Tensor, train: bool) -> Tensor {
        let size = image.size();
        assert!(
            size.len() == 4 && size[2] == self.image_res && size[3] == self.image_res,
            "Swin input {size:?} doesn't match the model image_res {}",
            self.image_res
        );
        let mut x = image
            .apply(&self.proj)
            .flatten(2, -1)
            .transpose(1, 2)
            .apply(&self.patch_norm);
        for layer in &self.layers {
            x = layer.forward_t(&x, train);
        }
        x.apply(&self.norm)
    }

    /// `SwinTransformer.forward`: ([B, 1+P, C] with token 0 = mean of the patches, None); with
    /// `regions = (idx_to_group_img [Bt], image_atts [Bt, 1+P])`: (per text [weighted mean; patches of its
    /// image] [Bt, 1+P, C], Some(per image output [B, 1+P, C])).
    pub fn forward_t(
        &self,
        image: &Tensor,
        regions: Option<(&Tensor, &Tensor)>,
        train: bool,
    ) -> (Tensor, Option<Tensor>) {
        let x = self.forward_patches(image, train);
        let x_cls = x.transpose(1, 2).adaptive_avg_pool1d([1]); // [B, C, 1]
        let full = Tensor::cat(&[x_cls.transpose(1, 2), x.shallow_clone()], 1);
        match regions {
            None => (full, None),
            Some((idx, atts)) => {
                let x_bs = gather_rows(&x, idx);
                let weights = atts
                    .to_device(x.device())
                    .slice(1, 1, None, 1)
                    .unsqueeze(2)
                    .to_kind(x.kind()); // [Bt, P, 1]
                let sum = (&weights * &x_bs)
                    .transpose(1, 2)
                    .sum_dim_intlist(-1, true, x.kind());
                let count = weights.transpose(1, 2).sum_dim_intlist(-1, true, x.kind());
                let cls = sum / count; // [Bt, C, 1]
                (Tensor::cat(&[cls.transpose(1, 2), x_bs], 1), Some(full))
            }
        }
    }
}
