//! Tokenisation with the `tokenizers` crate: BERT WordPiece (`vocab.txt` or `tokenizer.json`) and RoBERTa
//! byte-level BPE (`vocab.json` + `merges.txt`). Texts are `[CLS] + pieces`, never a trailing `[SEP]`.

use std::path::{Path, PathBuf};

use tokenizers::models::bpe::BPE;
use tokenizers::models::wordpiece::WordPiece;
use tokenizers::normalizers::BertNormalizer;
use tokenizers::pre_tokenizers::bert::BertPreTokenizer;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::Tokenizer;

use super::DataError;

/// Which special-token spelling the vocabulary uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenizerKind {
    /// `[CLS]`, `[PAD]`, `[MASK]`, `[SEP]`, `[UNK]`.
    WordPiece,
    /// `<s>`, `<pad>`, `<mask>`, `</s>`, `<unk>`.
    ByteBpe,
}

/// Special token ids, read from the vocabulary (never constants).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpecialIds {
    /// `[CLS]` / `<s>`.
    pub cls: i64,
    /// `[SEP]` / `</s>`.
    pub sep: i64,
    /// `[PAD]` / `<pad>`.
    pub pad: i64,
    /// `[MASK]` / `<mask>`.
    pub mask: i64,
    /// `[UNK]` / `<unk>`.
    pub unk: i64,
}

/// A text as the pre-training model takes it, before padding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenizedText {
    /// `[CLS]` followed by at most `max_tokens - 1` piece ids.
    pub ids: Vec<i64>,
    /// The matching token strings (used by the whole-word masking rule).
    pub tokens: Vec<String>,
}

/// The project's text tokenizer.
#[derive(Clone)]
pub struct TextTokenizer {
    inner: Tokenizer,
    kind: TokenizerKind,
    special: SpecialIds,
    vocab_size: usize,
}

fn tok_err(path: &Path, err: impl std::fmt::Display) -> DataError {
    DataError::Tokenizer {
        path: path.to_path_buf(),
        message: err.to_string(),
    }
}

impl TextTokenizer {
    /// Find the vocabulary in `dir` (the config's `text_encoder` folder): `tokenizer.json`, else
    /// `vocab.json` + `merges.txt` when `use_roberta`, else `vocab.txt`.
    pub fn from_dir(dir: &Path, use_roberta: bool) -> Result<Self, DataError> {
        let json = dir.join("tokenizer.json");
        if json.is_file() {
            return Self::from_tokenizer_json(&json);
        }
        if use_roberta {
            Self::from_bpe_files(&dir.join("vocab.json"), &dir.join("merges.txt"))
        } else {
            Self::from_vocab_txt(&dir.join("vocab.txt"))
        }
    }

    /// bert-base-uncased style WordPiece from a `vocab.txt` (lower-case, accent stripping, CJK split).
    pub fn from_vocab_txt(path: &Path) -> Result<Self, DataError> {
        let path_str = existing(path)?;
        let model = WordPiece::from_file(&path_str)
            .unk_token("[UNK]".into())
            .continuing_subword_prefix("##".into())
            .max_input_chars_per_word(100)
            .build()
            .map_err(|e| tok_err(path, e))?;
        let mut inner = Tokenizer::new(model);
        inner.with_normalizer(Some(BertNormalizer::new(true, true, None, true)));
        inner.with_pre_tokenizer(Some(BertPreTokenizer));
        Self::wrap(inner, TokenizerKind::WordPiece, path)
    }

    /// RoBERTa byte-level BPE from `vocab.json` + `merges.txt` (no prefix space, as the official tokenizer).
    pub fn from_bpe_files(vocab: &Path, merges: &Path) -> Result<Self, DataError> {
        let vocab_str = existing(vocab)?;
        let merges_str = existing(merges)?;
        let model = BPE::from_file(&vocab_str, &merges_str)
            .build()
            .map_err(|e| tok_err(vocab, e))?;
        let mut inner = Tokenizer::new(model);
        inner.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
        Self::wrap(inner, TokenizerKind::ByteBpe, vocab)
    }

    /// Any tokenizer saved by HF `tokenizers` (`tokenizer.json`); post-processing is not used.
    pub fn from_tokenizer_json(path: &Path) -> Result<Self, DataError> {
        existing(path)?;
        let inner = Tokenizer::from_file(path).map_err(|e| tok_err(path, e))?;
        let kind = if inner.token_to_id("[CLS]").is_some() {
            TokenizerKind::WordPiece
        } else {
            TokenizerKind::ByteBpe
        };
        Self::wrap(inner, kind, path)
    }

    fn wrap(inner: Tokenizer, kind: TokenizerKind, path: &Path) -> Result<Self, DataError> {
        let names = match kind {
            TokenizerKind::WordPiece => ["[CLS]", "[SEP]", "[PAD]", "[MASK]", "[UNK]"],
            TokenizerKind::ByteBpe => ["<s>", "</s>", "<pad>", "<mask>", "<unk>"],
        };
        let id = |name: &str| -> Result<i64, DataError> {
            inner
                .token_to_id(name)
                .map(i64::from)
                .ok_or_else(|| tok_err(path, format!("vocabulary has no {name} token")))
        };
        let special = SpecialIds {
            cls: id(names[0])?,
            sep: id(names[1])?,
            pad: id(names[2])?,
            mask: id(names[3])?,
            unk: id(names[4])?,
        };
        let vocab_size = inner.get_vocab_size(true);
        Ok(Self {
            inner,
            kind,
            special,
            vocab_size,
        })
    }

    /// The vocabulary's special ids.
    pub fn special(&self) -> SpecialIds {
        self.special
    }

    /// WordPiece or byte-level BPE.
    pub fn kind(&self) -> TokenizerKind {
        self.kind
    }

    /// Number of ids (the MLM random-token range is `0..vocab_size`).
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// The id of one token string, if the vocabulary has it.
    pub fn token_id(&self, token: &str) -> Option<i64> {
        self.inner.token_to_id(token).map(i64::from)
    }

    /// Word pieces of `text` without special tokens: (tokens, ids).
    pub fn tokenize(&self, text: &str) -> Result<(Vec<String>, Vec<i64>), DataError> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| DataError::Sample(format!("tokenizer failed on {text:?}: {e}")))?;
        let ids = enc.get_ids().iter().map(|&i| i64::from(i)).collect();
        Ok((enc.get_tokens().to_vec(), ids))
    }

    /// `[CLS] + pieces[..max_tokens - 1]` (the pre-training and fine-tuning single-text encoding).
    pub fn encode(&self, text: &str, max_tokens: usize) -> Result<TokenizedText, DataError> {
        let (mut tokens, mut ids) = self.tokenize(text)?;
        let keep = max_tokens.saturating_sub(1);
        tokens.truncate(keep);
        ids.truncate(keep);
        let cls_name = match self.kind {
            TokenizerKind::WordPiece => "[CLS]",
            TokenizerKind::ByteBpe => "<s>",
        };
        tokens.insert(0, cls_name.to_string());
        ids.insert(0, self.special.cls);
        Ok(TokenizedText { ids, tokens })
    }

    /// Ids padded with `pad` to `max_tokens` and the attention mask (1 for real tokens).
    pub fn pad(&self, ids: &[i64], max_tokens: usize) -> (Vec<i64>, Vec<i64>) {
        let mut out = vec![self.special.pad; max_tokens];
        let mut atts = vec![0i64; max_tokens];
        for (i, &id) in ids.iter().take(max_tokens).enumerate() {
            out[i] = id;
            atts[i] = 1;
        }
        (out, atts)
    }
}

fn existing(path: &Path) -> Result<String, DataError> {
    if !path.is_file() {
        return Err(DataError::MissingFile(PathBuf::from(path)));
    }
    path.to_str()
        .map(str::to_string)
        .ok_or_else(|| tok_err(path, "path is not valid UTF-8"))
}
