//! X-VLM's BERT (models/xbert.py, transformers 4.12.5 BertModel with the `fusion_layer` split): layers
//! `[0, fusion_layer)` are text-only, layers `[fusion_layer, num_hidden_layers)` add a cross-attention block
//! whose key/value read the vision tokens (`encoder_width` wide). RoBERTa (models/xroberta.py) shares every
//! block here; only its embeddings' position ids and its MLM head differ (see `roberta.rs`).

use std::ops::Range;

use tch::nn::{self, Module};
use tch::{Kind, Tensor};

use super::cross::{CrossContext, CrossKv};
use crate::config::TextConfig;

/// Which official text backbone: decides the state-dict prefix, position ids and the MLM head layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TextFlavor {
    /// `BertForMaskedLM` / `BertModel`: prefix `bert.`, head `cls.predictions.*`.
    Bert,
    /// `RobertaForMaskedLM` / `RobertaModel`: prefix `roberta.`, head `lm_head.*`, positions from padding.
    Roberta,
}

impl TextFlavor {
    /// The submodule name of the encoder inside the `*ForMaskedLM` wrapper.
    pub fn prefix(self) -> &'static str {
        match self {
            TextFlavor::Bert => "bert",
            TextFlavor::Roberta => "roberta",
        }
    }
}

/// Which layers a forward runs (`BertEncoder.forward(mode)`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EncoderMode {
    /// `'text'`: layers `[0, fusion_layer)` from the embeddings.
    Text,
    /// `'fusion'`: layers `[fusion_layer, num_hidden_layers)` on already contextualised text states.
    Fusion,
    /// `'multi_modal'`: every layer from the embeddings.
    MultiModal,
}

/// Self-attention additive mask from 0/1 `atts` [B, L] → [B, 1, 1, L]: `(1 - m) * -10000`
/// (`BertModel.get_extended_attention_mask`, quirk 17).
pub fn self_attention_mask(atts: &Tensor) -> Tensor {
    let m = atts.unsqueeze(1).unsqueeze(1).to_kind(Kind::Float);
    (m.ones_like() - m) * -10000.0
}

/// Decoder self-attention mask: causal (position i sees j ≤ i) times the padding mask, then
/// `(1 - m) * -10000` → [B, 1, L, L] (`get_extended_attention_mask` with `is_decoder`).
pub fn causal_self_attention_mask(atts: &Tensor) -> Tensor {
    let l = atts.size()[1];
    let seq = Tensor::arange(l, (Kind::Int64, atts.device()));
    let causal = seq
        .view([1, 1, l])
        .le_tensor(&seq.view([1, l, 1]))
        .to_kind(atts.kind());
    let m = (causal.unsqueeze(1) * atts.unsqueeze(1).unsqueeze(1)).to_kind(Kind::Float);
    (m.ones_like() - m) * -10000.0
}

/// A Linear initialised as BERT's `_init_weights` does: weight N(0, initializer_range), bias 0.
pub(crate) fn bert_linear(p: nn::Path, in_dim: i64, out_dim: i64, cfg: &TextConfig) -> nn::Linear {
    nn::linear(
        p,
        in_dim,
        out_dim,
        nn::LinearConfig {
            ws_init: nn::Init::Randn {
                mean: 0.0,
                stdev: cfg.initializer_range,
            },
            bs_init: Some(nn::Init::Const(0.0)),
            bias: true,
        },
    )
}

/// Another handle on the same Linear tensors (tied modules).
fn share_linear(l: &nn::Linear) -> nn::Linear {
    nn::Linear {
        ws: l.ws.shallow_clone(),
        bs: l.bs.as_ref().map(Tensor::shallow_clone),
    }
}

/// A LayerNorm with the config's eps (weight 1, bias 0).
pub(crate) fn bert_layer_norm(p: nn::Path, dim: i64, eps: f64) -> nn::LayerNorm {
    nn::layer_norm(
        p,
        vec![dim],
        nn::LayerNormConfig {
            eps,
            ..Default::default()
        },
    )
}

/// The activation named by `hidden_act` (transformers `ACT2FN`).
pub(crate) fn activation(xs: &Tensor, name: &str) -> Tensor {
    match name {
        "gelu_new" => xs.gelu("tanh"),
        "relu" => xs.relu(),
        "quick_gelu" => xs * (xs * 1.702).sigmoid(),
        // "gelu" (and anything validated earlier) is the exact erf GELU.
        _ => xs.gelu("none"),
    }
}

// models/xbert.py: BertEmbeddings (and RobertaEmbeddings for the position ids)
/// Word + token-type (always 0) + absolute position embeddings → LayerNorm → dropout.
#[derive(Debug)]
pub struct BertEmbeddings {
    /// `word_embeddings.weight` [vocab, D]; the MLM decoder shares this tensor.
    pub word_embeddings: Tensor,
    position_embeddings: Tensor,
    token_type_embeddings: Tensor,
    layer_norm: nn::LayerNorm,
    dropout: f64,
    pad_token_id: i64,
    flavor: TextFlavor,
}

impl BertEmbeddings {
    /// Builds `word_embeddings`, `position_embeddings`, `token_type_embeddings`, `LayerNorm` under `p`.
    pub fn new(p: nn::Path, cfg: &TextConfig, flavor: TextFlavor) -> Self {
        let init = nn::Init::Randn {
            mean: 0.0,
            stdev: cfg.initializer_range,
        };
        let d = cfg.hidden_size;
        BertEmbeddings {
            word_embeddings: (&p / "word_embeddings").var("weight", &[cfg.vocab_size, d], init),
            position_embeddings: (&p / "position_embeddings").var(
                "weight",
                &[cfg.max_position_embeddings, d],
                init,
            ),
            token_type_embeddings: (&p / "token_type_embeddings").var(
                "weight",
                &[cfg.type_vocab_size, d],
                init,
            ),
            layer_norm: bert_layer_norm(&p / "LayerNorm", d, cfg.layer_norm_eps),
            dropout: cfg.hidden_dropout_prob,
            pad_token_id: cfg.pad_token_id,
            flavor,
        }
    }

    /// `position_embeddings.weight` [max_position_embeddings, D].
    pub fn position_table(&self) -> &Tensor {
        &self.position_embeddings
    }

    /// `input_ids` [B, L] → [B, L, D].
    pub fn forward_t(&self, input_ids: &Tensor, train: bool) -> Tensor {
        let (b, l) = input_ids.size2().expect("input_ids must be [B, L]");
        let position_ids = match self.flavor {
            TextFlavor::Bert => Tensor::arange(l, (Kind::Int64, input_ids.device()))
                .unsqueeze(0)
                .expand([b, l], false),
            TextFlavor::Roberta => super::roberta::position_ids(input_ids, self.pad_token_id),
        };
        // Padding rows get no gradient from the lookup, as nn.Embedding(padding_idx) does.
        let roberta_pad = match self.flavor {
            TextFlavor::Bert => -1,
            TextFlavor::Roberta => self.pad_token_id,
        };
        let words = Tensor::embedding(
            &self.word_embeddings,
            input_ids,
            self.pad_token_id,
            false,
            false,
        );
        let token_types = Tensor::embedding(
            &self.token_type_embeddings,
            &input_ids.zeros_like(),
            -1,
            false,
            false,
        );
        let positions = Tensor::embedding(
            &self.position_embeddings,
            &position_ids,
            roberta_pad,
            false,
            false,
        );
        let embeddings = words + token_types + positions;
        self.layer_norm
            .forward(&embeddings)
            .dropout(self.dropout, train)
    }
}

// models/xbert.py: BertSelfAttention
/// Multi-head attention; keys/values come from the text itself or, for cross-attention, from the vision
/// tokens (`encoder_width` wide).
#[derive(Debug)]
pub struct BertSelfAttention {
    query: nn::Linear,
    key: nn::Linear,
    value: nn::Linear,
    num_heads: i64,
    head_dim: i64,
    dropout: f64,
    scale_query_first: bool,
}

impl BertSelfAttention {
    /// `query`, `key`, `value` under `p`; key/value input width `kv_width`.
    pub fn new(p: nn::Path, cfg: &TextConfig, kv_width: i64) -> Self {
        Self::with_kv(p, cfg, kv_width, None)
    }

    /// As [`Self::new`], but with `shared` = another attention whose `key`/`value` modules this one uses
    /// (the same tensors, NLVR2's `share_cross_attention`).
    pub fn with_kv(
        p: nn::Path,
        cfg: &TextConfig,
        kv_width: i64,
        shared: Option<&BertSelfAttention>,
    ) -> Self {
        let d = cfg.hidden_size;
        let (key, value) = match shared {
            Some(other) => (share_linear(&other.key), share_linear(&other.value)),
            None => (
                bert_linear(&p / "key", kv_width, d, cfg),
                bert_linear(&p / "value", kv_width, d, cfg),
            ),
        };
        BertSelfAttention {
            query: bert_linear(&p / "query", d, d, cfg),
            key,
            value,
            num_heads: cfg.num_attention_heads,
            head_dim: d / cfg.num_attention_heads,
            dropout: cfg.attention_probs_dropout_prob,
            scale_query_first: cfg.fp16,
        }
    }

    /// [B, L, D] → [B, heads, L, head_dim].
    fn split_heads(&self, xs: &Tensor) -> Tensor {
        let (b, l, _) = xs.size3().expect("[B, L, D]");
        xs.view([b, l, self.num_heads, self.head_dim])
            .permute([0, 2, 1, 3])
    }

    /// `hidden` [B, Lq, D], `kv` [B, Lk, W] (the hidden states themselves for self-attention), additive
    /// `mask` [B, 1, 1, Lk] → context [B, Lq, D].
    pub fn forward_t(&self, hidden: &Tensor, kv: &Tensor, mask: &Tensor, train: bool) -> Tensor {
        self.forward_with_probs(hidden, kv, mask, train).0
    }

    /// As [`Self::forward_t`], also returning the softmax probabilities [B, heads, Lq, Lk] before
    /// dropout (what xbert's `save_attention_map` keeps), as part of the autograd graph.
    pub fn forward_with_probs(
        &self,
        hidden: &Tensor,
        kv: &Tensor,
        mask: &Tensor,
        train: bool,
    ) -> (Tensor, Tensor) {
        let (k, v) = self.project_kv(kv);
        self.attend(hidden, &k, &v, mask, train)
    }

    /// The keys and values of `kv` [B, Lk, W], split into heads [B, heads, Lk, head_dim].
    pub fn project_kv(&self, kv: &Tensor) -> (Tensor, Tensor) {
        (
            self.split_heads(&self.key.forward(kv)),
            self.split_heads(&self.value.forward(kv)),
        )
    }

    /// Attention of `hidden` [B, Lq, D] over keys `k` and values `v` [B, heads, Lk, head_dim] with
    /// the additive `mask` → (context [B, Lq, D], probabilities [B, heads, Lq, Lk]).
    fn attend(
        &self,
        hidden: &Tensor,
        k: &Tensor,
        v: &Tensor,
        mask: &Tensor,
        train: bool,
    ) -> (Tensor, Tensor) {
        let q = self.split_heads(&self.query.forward(hidden));
        let scale = (self.head_dim as f64).sqrt();
        let scores = if self.scale_query_first {
            (&q / scale).matmul(&k.transpose(-1, -2))
        } else {
            q.matmul(&k.transpose(-1, -2)) / scale
        } + mask;
        let probs = scores.softmax(-1, Kind::Float);
        let (b, _, lq, _) = q.size4().expect("[B, H, L, d]");
        let ctx = probs
            .dropout(self.dropout, train)
            .matmul(v)
            .permute([0, 2, 1, 3])
            .contiguous()
            .view([b, lq, self.num_heads * self.head_dim]);
        (ctx, probs)
    }
}

// models/xbert.py: BertSelfOutput / BertOutput
/// `LayerNorm(dropout(dense(x)) + residual)`.
#[derive(Debug)]
pub struct BertOutput {
    dense: nn::Linear,
    layer_norm: nn::LayerNorm,
    dropout: f64,
}

impl BertOutput {
    /// `dense` (in_dim → D) and `LayerNorm` under `p`.
    pub fn new(p: nn::Path, cfg: &TextConfig, in_dim: i64) -> Self {
        BertOutput {
            dense: bert_linear(&p / "dense", in_dim, cfg.hidden_size, cfg),
            layer_norm: bert_layer_norm(&p / "LayerNorm", cfg.hidden_size, cfg.layer_norm_eps),
            dropout: cfg.hidden_dropout_prob,
        }
    }

    /// `xs` [B, L, in_dim], `residual` [B, L, D] → [B, L, D].
    pub fn forward_t(&self, xs: &Tensor, residual: &Tensor, train: bool) -> Tensor {
        let h = self.dense.forward(xs).dropout(self.dropout, train);
        self.layer_norm.forward(&(h + residual))
    }
}

// models/xbert.py: BertAttention
/// Attention block: `self` + `output`.
#[derive(Debug)]
pub struct BertAttention {
    self_attn: BertSelfAttention,
    output: BertOutput,
}

impl BertAttention {
    /// `self.*` and `output.*` under `p`; key/value width `kv_width`.
    pub fn new(p: nn::Path, cfg: &TextConfig, kv_width: i64) -> Self {
        Self::with_kv(p, cfg, kv_width, None)
    }

    /// As [`Self::new`], taking key/value from `shared` when given.
    pub fn with_kv(
        p: nn::Path,
        cfg: &TextConfig,
        kv_width: i64,
        shared: Option<&BertAttention>,
    ) -> Self {
        BertAttention {
            self_attn: BertSelfAttention::with_kv(
                &p / "self",
                cfg,
                kv_width,
                shared.map(|a| &a.self_attn),
            ),
            output: BertOutput::new(&p / "output", cfg, cfg.hidden_size),
        }
    }

    /// Post-LN attention block: `LN(hidden + dropout(dense(attn(hidden, kv))))`.
    pub fn forward_t(&self, hidden: &Tensor, kv: &Tensor, mask: &Tensor, train: bool) -> Tensor {
        let ctx = self.self_attn.forward_t(hidden, kv, mask, train);
        self.output.forward_t(&ctx, hidden, train)
    }

    /// As [`Self::forward_t`], also returning the attention probabilities (see
    /// [`BertSelfAttention::forward_with_probs`]).
    pub fn forward_with_probs(
        &self,
        hidden: &Tensor,
        kv: &Tensor,
        mask: &Tensor,
        train: bool,
    ) -> (Tensor, Tensor) {
        let (ctx, probs) = self.self_attn.forward_with_probs(hidden, kv, mask, train);
        (self.output.forward_t(&ctx, hidden, train), probs)
    }

    /// Cross-attention block of text layer `layer` over `cross` → (output, probabilities).
    fn forward_cross(
        &self,
        hidden: &Tensor,
        cross: &CrossContext,
        layer: usize,
        train: bool,
    ) -> (Tensor, Tensor) {
        let (k, v) = cross.keys_values(layer, |embeds| self.self_attn.project_kv(embeds));
        let (ctx, probs) = self.self_attn.attend(hidden, &k, &v, &cross.mask, train);
        (self.output.forward_t(&ctx, hidden, train), probs)
    }
}

// models/xbert.py: BertLayer(config, layer_num)
/// One transformer layer; layers at or after `fusion_layer` carry `crossattention`.
#[derive(Debug)]
pub struct BertLayer {
    index: usize,
    attention: BertAttention,
    crossattention: Option<BertAttention>,
    intermediate: nn::Linear,
    output: BertOutput,
    hidden_act: String,
}

impl BertLayer {
    /// Layer `layer_num` under `p` (`attention`, `crossattention`, `intermediate.dense`, `output`).
    pub fn new(p: nn::Path, cfg: &TextConfig, layer_num: i64) -> Self {
        Self::with_shared_cross_kv(p, cfg, layer_num, None)
    }

    /// As [`Self::new`]; a cross layer takes its cross-attention key/value from `shared`'s when given.
    pub fn with_shared_cross_kv(
        p: nn::Path,
        cfg: &TextConfig,
        layer_num: i64,
        shared: Option<&BertLayer>,
    ) -> Self {
        let shared_cross = shared.and_then(|l| l.crossattention.as_ref());
        let crossattention = (layer_num >= cfg.fusion_layer).then(|| {
            BertAttention::with_kv(&p / "crossattention", cfg, cfg.encoder_width, shared_cross)
        });
        BertLayer {
            index: layer_num as usize,
            attention: BertAttention::new(&p / "attention", cfg, cfg.hidden_size),
            crossattention,
            intermediate: bert_linear(
                &p / "intermediate" / "dense",
                cfg.hidden_size,
                cfg.intermediate_size,
                cfg,
            ),
            output: BertOutput::new(&p / "output", cfg, cfg.intermediate_size),
            hidden_act: cfg.hidden_act.clone(),
        }
    }

    /// `hidden` [B, L, D] with self mask [B, 1, 1, L]; `cross` is required for cross layers.
    pub fn forward_t(
        &self,
        hidden: &Tensor,
        self_mask: &Tensor,
        cross: Option<&CrossContext>,
        train: bool,
    ) -> Tensor {
        self.forward_capture(hidden, self_mask, cross, false, train)
            .0
    }

    /// [`Self::forward_t`]; with `capture`, also the cross-attention probabilities [B, heads, L, Nv]
    /// (`None` for a text-only layer).
    fn forward_capture(
        &self,
        hidden: &Tensor,
        self_mask: &Tensor,
        cross: Option<&CrossContext>,
        capture: bool,
        train: bool,
    ) -> (Tensor, Option<Tensor>) {
        let mut h = self.attention.forward_t(hidden, hidden, self_mask, train);
        let mut probs = None;
        if let Some(crossattention) = &self.crossattention {
            let ctx = cross.expect("a cross-attention layer needs vision embeddings");
            let (out, p) = crossattention.forward_cross(&h, ctx, self.index, train);
            probs = capture.then_some(p);
            h = out;
        }
        let inter = activation(&self.intermediate.forward(&h), &self.hidden_act);
        (self.output.forward_t(&inter, &h, train), probs)
    }
}

/// The layer whose cross-attention key/value layer `layer` uses, if not its own: cross layers form
/// groups of `group` starting at `fusion_layer`, owned by the first of the group.
pub fn shared_kv_owner(layer: i64, fusion_layer: i64, group: usize) -> Option<i64> {
    let group = group.max(1) as i64;
    let offset = (layer - fusion_layer).rem_euclid(group);
    (layer >= fusion_layer && offset != 0).then_some(layer - offset)
}

// models/xbert.py: BertModel(add_pooling_layer=False) with BertEncoder(mode)
/// Embeddings + `encoder.layer.{i}`; no pooler.
#[derive(Debug)]
pub struct BertModel {
    /// The embedding block (its word embeddings are shared with the MLM decoder).
    pub embeddings: BertEmbeddings,
    layers: Vec<BertLayer>,
    fusion_layer: usize,
}

impl BertModel {
    /// Builds `embeddings.*` and `encoder.layer.{0..num_hidden_layers}.*` under `p`.
    pub fn new(p: nn::Path, cfg: &TextConfig, flavor: TextFlavor) -> Self {
        Self::with_shared_cross_kv(p, cfg, flavor, 1)
    }

    /// As [`Self::new`], with the cross layers in groups of `group` consecutive layers that share one
    /// cross-attention key/value (the first of the group owns it). `group` 2 is NLVR2's
    /// `share_cross_attention`; 1 shares nothing.
    pub fn with_shared_cross_kv(
        p: nn::Path,
        cfg: &TextConfig,
        flavor: TextFlavor,
        group: usize,
    ) -> Self {
        let mut layers: Vec<BertLayer> = Vec::with_capacity(cfg.num_hidden_layers as usize);
        for i in 0..cfg.num_hidden_layers {
            let owner = shared_kv_owner(i, cfg.fusion_layer, group);
            let shared = owner.map(|o| &layers[o as usize]);
            let layer =
                BertLayer::with_shared_cross_kv(&p / "encoder" / "layer" / i, cfg, i, shared);
            layers.push(layer);
        }
        BertModel {
            embeddings: BertEmbeddings::new(&p / "embeddings", cfg, flavor),
            layers,
            fusion_layer: cfg.fusion_layer as usize,
        }
    }

    /// The cross-attention keys and values of `image_embeds` [U, Nv, encoder_width] for every cross
    /// layer, projected once for fusion passes that share these images
    /// ([`CrossContext::projected`]).
    pub fn cross_kv(&self, image_embeds: &Tensor) -> CrossKv {
        CrossKv::new(
            self.layers
                .iter()
                .map(|layer| {
                    layer
                        .crossattention
                        .as_ref()
                        .map(|c| c.self_attn.project_kv(image_embeds))
                })
                .collect(),
        )
    }

    /// Number of layers.
    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// The layer range a mode runs.
    pub fn layer_range(&self, mode: EncoderMode) -> Range<usize> {
        match mode {
            EncoderMode::Text => 0..self.fusion_layer,
            EncoderMode::Fusion => self.fusion_layer..self.layers.len(),
            EncoderMode::MultiModal => 0..self.layers.len(),
        }
    }

    /// Runs `range` of layers on `hidden` [B, L, D]. Cross layer `l` attends to
    /// `cross[(l - fusion_layer) % cross.len()]` (a list for NLVR2's two images).
    pub fn run_layers(
        &self,
        hidden: Tensor,
        text_atts: &Tensor,
        cross: &[CrossContext],
        range: Range<usize>,
        train: bool,
    ) -> Tensor {
        self.run_layers_with_mask(hidden, &self_attention_mask(text_atts), cross, range, train)
    }

    /// [`Self::run_layers`] with a precomputed additive self-attention mask ([B, 1, 1 or L, L]).
    pub fn run_layers_with_mask(
        &self,
        hidden: Tensor,
        self_mask: &Tensor,
        cross: &[CrossContext],
        range: Range<usize>,
        train: bool,
    ) -> Tensor {
        self.run_layers_capture(hidden, self_mask, cross, range, None, train)
            .0
    }

    /// [`Self::run_layers_with_mask`], also returning the cross-attention probabilities of layer
    /// `capture` when it runs and has cross-attention.
    fn run_layers_capture(
        &self,
        hidden: Tensor,
        self_mask: &Tensor,
        cross: &[CrossContext],
        range: Range<usize>,
        capture: Option<usize>,
        train: bool,
    ) -> (Tensor, Option<Tensor>) {
        let mut h = hidden;
        let mut captured = None;
        for l in range {
            let ctx = (l >= self.fusion_layer && !cross.is_empty())
                .then(|| &cross[(l - self.fusion_layer) % cross.len()]);
            let (out, probs) =
                self.layers[l].forward_capture(&h, self_mask, ctx, capture == Some(l), train);
            h = out;
            captured = captured.or(probs);
        }
        (h, captured)
    }

    /// Mode `'text'`: `input_ids` [B, L] → text states [B, L, D].
    pub fn forward_text(&self, input_ids: &Tensor, text_atts: &Tensor, train: bool) -> Tensor {
        let emb = self.embeddings.forward_t(input_ids, train);
        self.run_layers(
            emb,
            text_atts,
            &[],
            self.layer_range(EncoderMode::Text),
            train,
        )
    }

    /// Mode `'fusion'`: text states [B, L, D] (from [`Self::forward_text`]) cross-attending to `cross`.
    pub fn forward_fusion(
        &self,
        text_embeds: &Tensor,
        text_atts: &Tensor,
        cross: &[CrossContext],
        train: bool,
    ) -> Tensor {
        self.run_layers(
            text_embeds.shallow_clone(),
            text_atts,
            cross,
            self.layer_range(EncoderMode::Fusion),
            train,
        )
    }

    /// Decoder (`is_decoder`, as `BertLMHeadModel`): every layer from `input_ids` with causal
    /// self-attention.
    pub fn forward_decoder(
        &self,
        input_ids: &Tensor,
        text_atts: &Tensor,
        cross: &[CrossContext],
        train: bool,
    ) -> Tensor {
        let emb = self.embeddings.forward_t(input_ids, train);
        self.run_layers_with_mask(
            emb,
            &causal_self_attention_mask(text_atts),
            cross,
            self.layer_range(EncoderMode::MultiModal),
            train,
        )
    }

    /// Mode `'multi_modal'` that also returns the softmax probabilities [B, heads, L, Nv] of the
    /// cross-attention of layer `layer`, still in the autograd graph (Grad-CAM reads their gradient);
    /// `None` when that layer has no cross-attention.
    pub fn forward_multimodal_with_cross_probs(
        &self,
        input_ids: &Tensor,
        text_atts: &Tensor,
        cross: &[CrossContext],
        layer: usize,
        train: bool,
    ) -> (Tensor, Option<Tensor>) {
        let emb = self.embeddings.forward_t(input_ids, train);
        self.run_layers_capture(
            emb,
            &self_attention_mask(text_atts),
            cross,
            self.layer_range(EncoderMode::MultiModal),
            Some(layer),
            train,
        )
    }

    /// Mode `'multi_modal'`: every layer from `input_ids`.
    pub fn forward_multimodal(
        &self,
        input_ids: &Tensor,
        text_atts: &Tensor,
        cross: &[CrossContext],
        train: bool,
    ) -> Tensor {
        let emb = self.embeddings.forward_t(input_ids, train);
        self.run_layers(
            emb,
            text_atts,
            cross,
            self.layer_range(EncoderMode::MultiModal),
            train,
        )
    }
}

// models/xbert.py: BertOnlyMLMHead / BertLMPredictionHead
/// `transform.dense` → GELU → `transform.LayerNorm` → decoder (weight = word embeddings) + `bias`.
#[derive(Debug)]
pub struct BertMlmHead {
    dense: nn::Linear,
    layer_norm: nn::LayerNorm,
    /// `cls.predictions.bias` (also saved as `cls.predictions.decoder.bias`).
    pub bias: Tensor,
    decoder_weight: Tensor,
    hidden_act: String,
}

impl BertMlmHead {
    /// Builds `predictions.*` under `p` (= `text_encoder.cls`); the decoder weight is `word_embeddings`.
    pub fn new(p: nn::Path, cfg: &TextConfig, word_embeddings: &Tensor) -> Self {
        let pred = &p / "predictions";
        BertMlmHead {
            dense: bert_linear(
                &pred / "transform" / "dense",
                cfg.hidden_size,
                cfg.hidden_size,
                cfg,
            ),
            layer_norm: bert_layer_norm(
                &pred / "transform" / "LayerNorm",
                cfg.hidden_size,
                cfg.layer_norm_eps,
            ),
            bias: pred.var("bias", &[cfg.vocab_size], nn::Init::Const(0.0)),
            decoder_weight: word_embeddings.shallow_clone(),
            hidden_act: cfg.hidden_act.clone(),
        }
    }

    /// [.., D] → logits [.., vocab].
    pub fn forward(&self, xs: &Tensor) -> Tensor {
        let h = activation(&self.dense.forward(xs), &self.hidden_act);
        self.layer_norm
            .forward(&h)
            .linear(&self.decoder_weight, Some(&self.bias))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::text::cross::cross_attention_mask;
    use tch::Device;

    fn tiny_cfg() -> TextConfig {
        serde_json::from_str(
            r#"{"vocab_size": 50, "hidden_size": 8, "num_hidden_layers": 2, "num_attention_heads": 2,
                "intermediate_size": 16, "fusion_layer": 1, "encoder_width": 6}"#,
        )
        .unwrap()
    }

    /// Quirk 17: self-attention masks add −10000, cross-attention masks −1e9, visible positions 0.
    #[test]
    fn mask_constants() {
        let atts = Tensor::from_slice(&[1i64, 1, 0]).view([1, 3]);
        let s: Vec<f32> = Vec::try_from(self_attention_mask(&atts).view([-1])).unwrap();
        assert_eq!(s, vec![0.0, 0.0, -10000.0]);
        let c: Vec<f32> = Vec::try_from(cross_attention_mask(&atts).view([-1])).unwrap();
        assert_eq!(c, vec![0.0, 0.0, -1e9]);
    }

    /// The decoder mask hides later positions and padding: row i of a [1, 0]-padded length-3 input.
    #[test]
    fn causal_mask_hides_the_future_and_padding() {
        let atts = Tensor::from_slice(&[1i64, 1, 0]).view([1, 3]);
        let m: Vec<f32> = Vec::try_from(causal_self_attention_mask(&atts).view([-1])).unwrap();
        let x = -10000.0;
        assert_eq!(m, vec![0.0, x, x, 0.0, 0.0, x, 0.0, 0.0, x]);
    }

    /// The fp16 overflow guard (query scaled before QKᵀ) computes the same attention.
    #[test]
    fn fp16_query_scaling_is_equivalent() {
        tch::manual_seed(0);
        let vs = nn::VarStore::new(Device::Cpu);
        let mut attn = BertSelfAttention::new(vs.root() / "self", &tiny_cfg(), 6);
        let hidden = Tensor::randn([2, 4, 8], (Kind::Float, Device::Cpu));
        let kv = Tensor::randn([2, 5, 6], (Kind::Float, Device::Cpu));
        let mask = cross_attention_mask(&Tensor::ones([2, 5], (Kind::Int64, Device::Cpu)));
        let plain = attn.forward_t(&hidden, &kv, &mask, false);
        attn.scale_query_first = true;
        let guarded = attn.forward_t(&hidden, &kv, &mask, false);
        assert!(plain.allclose(&guarded, 1e-5, 1e-6, false));
    }

    /// Fusing over keys/values projected once per image and selected per text row gives the states of
    /// fusing over the gathered image tokens (the official way), and the same gradients for the image
    /// tokens and every weight: three texts over two images, one image twice, with its own masks.
    #[test]
    fn projected_cross_kv_matches_gathered_tokens() {
        tch::manual_seed(0);
        let vs = nn::VarStore::new(Device::Cpu);
        let cfg = TextConfig {
            num_hidden_layers: 3,
            ..tiny_cfg()
        };
        let model = BertModel::new(vs.root(), &cfg, TextFlavor::Bert);
        let opts = (Kind::Float, Device::Cpu);
        let text = Tensor::randn([3, 4, 8], opts);
        let text_atts = Tensor::from_slice(&[1i64, 1, 1, 0, 1, 1, 1, 1, 1, 1, 0, 0]).view([3, 4]);
        let images = Tensor::randn([2, 5, 6], opts).set_requires_grad(true);
        let rows = Tensor::from_slice(&[1i64, 0, 1]);
        let image_atts =
            Tensor::from_slice(&[1i64, 1, 1, 1, 0, 1, 1, 1, 1, 1, 1, 0, 1, 0, 1]).view([3, 5]);
        let run = |cross: CrossContext| {
            let out = model.forward_fusion(&text, &text_atts, &[cross], false);
            let loss = (&out * &out).sum(Kind::Float);
            let mut inputs: Vec<Tensor> = vs.trainable_variables();
            inputs.push(images.shallow_clone());
            let grads = Tensor::run_backward(&[&loss], &inputs, false, false);
            (out.detach(), grads)
        };
        let gathered = images.index_select(0, &rows);
        let (official, official_grads) = run(CrossContext::new(&gathered, &image_atts));
        let kv = model.cross_kv(&images);
        let (projected, projected_grads) = run(CrossContext::projected(
            &kv,
            Some(rows.shallow_clone()),
            &image_atts,
        ));
        assert!(official.allclose(&projected, 1e-5, 1e-6, false));
        assert_eq!(official_grads.len(), projected_grads.len());
        // Layers before `fusion_layer` take no part (undefined on both sides); the image tokens do.
        assert!(projected_grads.last().is_some_and(Tensor::defined));
        for (a, b) in official_grads.iter().zip(&projected_grads) {
            assert_eq!(a.defined(), b.defined());
            if a.defined() {
                assert!(a.allclose(b, 1e-4, 1e-6, false), "{a:?} vs {b:?}");
            }
        }
        // Rows that differ from the gathering give other states: the rows are used.
        let kv = tch::no_grad(|| model.cross_kv(&images));
        let swapped_rows = Some(Tensor::from_slice(&[0i64, 1, 0]));
        let swapped = tch::no_grad(|| {
            let cross = CrossContext::projected(&kv, swapped_rows, &image_atts);
            model.forward_fusion(&text, &text_atts, &[cross], false)
        });
        assert!(!official.allclose(&swapped, 1e-3, 1e-4, false));
    }

    /// The capturing forward computes the same states, and probabilities only for a cross layer.
    #[test]
    fn cross_probs_hook_keeps_the_forward() {
        tch::manual_seed(0);
        let vs = nn::VarStore::new(Device::Cpu);
        let model = BertModel::new(vs.root(), &tiny_cfg(), TextFlavor::Bert);
        let ids = Tensor::from_slice(&[2i64, 7, 9, 0]).view([1, 4]);
        let atts = Tensor::from_slice(&[1i64, 1, 1, 0]).view([1, 4]);
        let image = Tensor::randn([1, 5, 6], (Kind::Float, Device::Cpu));
        let cross = [CrossContext::new(&image, &image.ones_like().select(2, 0))];
        let plain = model.forward_multimodal(&ids, &atts, &cross, false);
        let (hidden, probs) =
            model.forward_multimodal_with_cross_probs(&ids, &atts, &cross, 1, false);
        assert!(plain.equal(&hidden));
        let probs = probs.expect("layer 1 cross-attends");
        assert_eq!(probs.size(), vec![1, 2, 4, 5]);
        assert!(probs.requires_grad());
        let rows = probs.sum_dim_intlist(-1, false, Kind::Float);
        assert!(rows.allclose(&rows.ones_like(), 1e-6, 1e-6, false));
        let (_, none) = model.forward_multimodal_with_cross_probs(&ids, &atts, &cross, 0, false);
        assert!(none.is_none());
    }

    /// Only layers at or after `fusion_layer` have cross-attention, with key/value of the vision width.
    #[test]
    fn fusion_split_builds_cross_attention_from_fusion_layer() {
        let vs = nn::VarStore::new(Device::Cpu);
        let _model = BertModel::new(vs.root(), &tiny_cfg(), TextFlavor::Bert);
        let vars = vs.variables();
        assert!(!vars.contains_key("encoder.layer.0.crossattention.self.key.weight"));
        assert_eq!(
            vars["encoder.layer.1.crossattention.self.key.weight"].size(),
            vec![8, 6]
        );
    }
}
