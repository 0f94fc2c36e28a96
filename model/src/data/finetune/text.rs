//! Fine-tuning text batches as the official scripts tokenize them: `[CLS]` + pieces (no `[SEP]`), a
//! literal special-token string inside a text (the VQA answers' `[SEP]` eos) kept as that token, then
//! HF-style truncation and padding (`longest` or `max_length`).

use tch::Tensor;

use crate::data::tokenizer::{TextTokenizer, TokenizerKind};
use crate::data::DataError;

/// How a batch is padded (HF `padding=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Padding {
    /// To the longest row of the batch.
    Longest,
    /// To this many tokens.
    MaxLength(usize),
}

/// A tokenized text batch.
#[derive(Debug)]
pub struct TextBatch {
    /// `[B, L]` int64 ids, `[PAD]`-padded.
    pub ids: Tensor,
    /// `[B, L]` int64 attention mask (1 for real tokens).
    pub atts: Tensor,
}

fn special_strings(kind: TokenizerKind) -> [&'static str; 5] {
    match kind {
        TokenizerKind::WordPiece => ["[CLS]", "[SEP]", "[PAD]", "[MASK]", "[UNK]"],
        TokenizerKind::ByteBpe => ["<s>", "</s>", "<pad>", "<mask>", "<unk>"],
    }
}

/// The ids of `text` without the leading `[CLS]`: word pieces, with special-token strings (exact
/// spelling) kept whole as the official tokenizer's no-split tokens.
pub fn piece_ids(tok: &TextTokenizer, text: &str) -> Result<Vec<i64>, DataError> {
    let specials = special_strings(tok.kind());
    let mut out = Vec::new();
    let mut rest = text;
    loop {
        let next = specials
            .iter()
            .filter_map(|s| rest.find(s).map(|at| (at, *s)))
            .min_by_key(|(at, _)| *at);
        let Some((at, special)) = next else {
            out.extend(tok.tokenize(rest)?.1);
            return Ok(out);
        };
        if at > 0 {
            out.extend(tok.tokenize(&rest[..at])?.1);
        }
        let id = tok
            .token_id(special)
            .ok_or_else(|| DataError::Sample(format!("vocabulary has no {special} token")))?;
        out.push(id);
        rest = &rest[at + special.len()..];
    }
}

/// `[CLS]` + pieces of every text, cut to `truncate_to` tokens when given, padded per `padding`.
/// `truncate_to = None` is the official no-truncation call (rows may exceed `max_length`).
pub fn encode_batch(
    tok: &TextTokenizer,
    texts: &[impl AsRef<str>],
    padding: Padding,
    truncate_to: Option<usize>,
) -> Result<TextBatch, DataError> {
    let cls = tok.special().cls;
    let rows = texts
        .iter()
        .map(|t| {
            let mut ids = vec![cls];
            ids.extend(piece_ids(tok, t.as_ref())?);
            if let Some(n) = truncate_to {
                ids.truncate(n.max(1));
            }
            Ok(ids)
        })
        .collect::<Result<Vec<_>, DataError>>()?;
    let longest = rows.iter().map(Vec::len).max().unwrap_or(0);
    let width = match padding {
        Padding::Longest => longest,
        Padding::MaxLength(n) => n.max(longest),
    };
    let pad = tok.special().pad;
    let mut ids = Vec::with_capacity(rows.len() * width);
    let mut atts = Vec::with_capacity(rows.len() * width);
    for row in &rows {
        ids.extend_from_slice(row);
        ids.extend(std::iter::repeat_n(pad, width - row.len()));
        atts.extend(std::iter::repeat_n(1i64, row.len()));
        atts.extend(std::iter::repeat_n(0i64, width - row.len()));
    }
    let shape = [rows.len() as i64, width as i64];
    Ok(TextBatch {
        ids: Tensor::from_slice(&ids).view(shape),
        atts: Tensor::from_slice(&atts).view(shape),
    })
}
