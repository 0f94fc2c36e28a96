//! Per-line processing of image-text pairs: pick a caption, clean, tokenize, mask; decode and augment the
//! image (`ImageTextJsonDataset.__iter__` + `preprocess`).

use std::sync::Arc;

use rand::Rng;
use rand_chacha::ChaCha8Rng;

use super::caption::pre_caption;
use super::formats::parse_image_text;
use super::loader::Processor;
use super::masking::{mask_text, MaskConfig};
use super::tokenizer::TextTokenizer;
use super::transform::TrainTransform;
use super::DataError;
use crate::config::RecordKeys;

/// A text ready for the model: padded ids, mask, masked ids and MLM targets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TextSample {
    /// `[max_tokens]` ids, padded with the vocabulary's pad id.
    pub ids: Vec<i64>,
    /// `[max_tokens]` 1 for real tokens.
    pub atts: Vec<i64>,
    /// `[max_tokens]` ids after masking.
    pub ids_masked: Vec<i64>,
    /// `[max_masks]` positions, 0-padded.
    pub masked_pos: Vec<i64>,
    /// `[max_masks]` labels, -100-padded.
    pub masked_ids: Vec<i64>,
}

/// Caption cleaning, tokenisation and masking with the official settings.
#[derive(Clone)]
pub struct TextPipeline {
    /// The tokenizer.
    pub tokenizer: Arc<TextTokenizer>,
    /// `max_words` for `pre_caption`.
    pub max_words: usize,
    /// `max_tokens` (including `[CLS]`).
    pub max_tokens: usize,
    /// Masking settings.
    pub mask: MaskConfig,
    /// Captions are already space-separated word pieces (`tokenized: True`).
    pub tokenized: bool,
}

impl TextPipeline {
    /// Clean, tokenize and mask one caption.
    pub fn prepare(&self, rng: &mut impl Rng, caption: &str) -> Result<TextSample, DataError> {
        let tok = &self.tokenizer;
        let (ids, tokens) = if self.tokenized {
            let special = tok.special();
            let mut tokens = vec![String::new()];
            let mut ids = vec![special.cls];
            for piece in caption.split(' ').take(self.max_tokens.saturating_sub(1)) {
                ids.push(tok.token_id(piece).unwrap_or(special.unk));
                tokens.push(piece.to_string());
            }
            (ids, tokens)
        } else {
            let cleaned = pre_caption(caption, self.max_words)?;
            let enc = tok.encode(&cleaned, self.max_tokens)?;
            (enc.ids, enc.tokens)
        };
        if ids.len() < 2 {
            return Err(DataError::Sample(format!(
                "caption {caption:?} has no tokens"
            )));
        }
        let masked = mask_text(
            rng,
            &self.mask,
            &ids,
            &tokens,
            tok.special().mask,
            tok.vocab_size(),
        )?;
        let (ids_p, atts) = tok.pad(&ids, self.max_tokens);
        let (masked_p, _) = tok.pad(&masked.ids_masked, self.max_tokens);
        Ok(TextSample {
            ids: ids_p,
            atts,
            ids_masked: masked_p,
            masked_pos: masked.masked_pos,
            masked_ids: masked.masked_ids,
        })
    }
}

/// One image-text pair after the pre-training transform.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageTextSample {
    /// `[3, R, R]` normalised pixels.
    pub image: Vec<f32>,
    /// The chosen caption, prepared.
    pub text: TextSample,
}

/// Line processor for image-text pairs.
pub struct ImageTextProcessor {
    /// Record keys.
    pub keys: RecordKeys,
    /// Text settings.
    pub text: TextPipeline,
    /// Image transform.
    pub transform: TrainTransform,
}

impl Processor for ImageTextProcessor {
    type Sample = ImageTextSample;

    fn process(&self, line: &[u8], rng: &mut ChaCha8Rng) -> Result<ImageTextSample, DataError> {
        let record = parse_image_text(line, &self.keys)?;
        let caption = &record.captions[rng.random_range(0..record.captions.len())];
        let text = self.text.prepare(rng, caption)?;
        let bytes = record.image.load()?;
        let image = self.transform.apply_bytes(rng, &bytes)?;
        Ok(ImageTextSample { image, text })
    }
}
