//! What a cross-attention layer attends to: the vision tokens of each text row and their key mask,
//! either as tokens that every layer projects to keys and values itself (the official code's way), or
//! as keys and values projected once per layer for a set of images ([`CrossKv`]) that several fusion
//! passes index into. Pre-training fuses every image four times (the ITM positive, the text negative,
//! as another text's image negative, and the MLM pass), so projecting once saves three quarters of the
//! cross-attention key/value work of those passes, forward and backward. Both ways compute the same
//! values: a linear layer is applied row by row, so projecting rows and then selecting them equals
//! selecting and then projecting.

use tch::{Kind, Tensor};

/// One vision stream a cross-attention layer attends to, and its additive key mask [P, 1, 1, Nv]
/// (see [`cross_attention_mask`]), for P text rows.
pub struct CrossContext<'a> {
    vision: Vision<'a>,
    /// Additive mask, `(1 - m) * -1e9`.
    pub mask: Tensor,
}

/// Where a layer's keys and values come from.
enum Vision<'a> {
    /// Vision tokens [P, Nv, encoder_width], one row per text row.
    Tokens(&'a Tensor),
    /// Keys and values already projected for U images; text row `i` attends to image `rows[i]`
    /// (`None`: row `i` to image `i`).
    Projected {
        kv: &'a CrossKv,
        rows: Option<Tensor>,
    },
}

impl<'a> CrossContext<'a> {
    /// Vision tokens `embeds` [P, Nv, W] with 0/1 `image_atts` [P, Nv] (any dtype).
    pub fn new(embeds: &'a Tensor, image_atts: &Tensor) -> Self {
        CrossContext {
            vision: Vision::Tokens(embeds),
            mask: cross_attention_mask(image_atts),
        }
    }

    /// The images of `kv`, text row `i` attending to image `rows[i]` (`None`: to image `i`), with
    /// 0/1 `image_atts` [P, Nv] per text row.
    pub fn projected(kv: &'a CrossKv, rows: Option<Tensor>, image_atts: &Tensor) -> Self {
        CrossContext {
            vision: Vision::Projected { kv, rows },
            mask: cross_attention_mask(image_atts),
        }
    }

    /// The keys and values [P, heads, Nv, head_dim] of text layer `layer`, whose projection is
    /// `project` (applied to the tokens when they are not projected yet).
    pub(crate) fn keys_values(
        &self,
        layer: usize,
        project: impl FnOnce(&Tensor) -> (Tensor, Tensor),
    ) -> (Tensor, Tensor) {
        match &self.vision {
            Vision::Tokens(embeds) => project(embeds),
            Vision::Projected { kv, rows } => {
                let (k, v) = kv.layer(layer);
                match rows {
                    Some(rows) => (k.index_select(0, rows), v.index_select(0, rows)),
                    None => (k.shallow_clone(), v.shallow_clone()),
                }
            }
        }
    }
}

/// The cross-attention keys and values of one set of images [U, Nv, W], projected once by every
/// cross layer of a text encoder (built by `BertModel::cross_kv`).
pub struct CrossKv {
    /// Per text layer: (keys, values) [U, heads, Nv, head_dim]; `None` for a text-only layer.
    layers: Vec<Option<(Tensor, Tensor)>>,
}

impl CrossKv {
    /// Wraps per-layer projections (`None` where a layer has no cross-attention).
    pub(crate) fn new(layers: Vec<Option<(Tensor, Tensor)>>) -> Self {
        CrossKv { layers }
    }

    /// The projections of `layer`.
    ///
    /// # Panics
    /// When `layer` has no cross-attention: the encoder only asks its cross layers.
    fn layer(&self, layer: usize) -> &(Tensor, Tensor) {
        self.layers
            .get(layer)
            .and_then(Option::as_ref)
            .unwrap_or_else(|| panic!("text layer {layer} has no projected cross keys/values"))
    }
}

/// Cross-attention additive mask from 0/1 `image_atts` [B, Nv] → [B, 1, 1, Nv]: `(1 - m) * -1e9`
/// (transformers 4.12.5 `invert_attention_mask` in float32, quirk 17).
pub fn cross_attention_mask(image_atts: &Tensor) -> Tensor {
    let m = image_atts.unsqueeze(1).unsqueeze(1).to_kind(Kind::Float);
    (m.ones_like() - m) * -1e9
}
