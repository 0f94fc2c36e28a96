//! Parity kind `image_preprocessing`: the official test transform (bicubic resize from the decoded pixels,
//! then decode + resize + normalise from the JPEG) and the text pipeline (`pre_caption`, token ids, masks).

use std::path::Path;

use tch::{Kind, Tensor};

use super::{compare, CaseSpec, Comparison, ParityError, Tolerance};
use crate::data::caption::pre_caption;
use crate::data::pixels::{self, RgbImage, CLIP_MEAN, CLIP_STD};
use crate::data::tokenizer::TextTokenizer;
use crate::data::transform::TestTransform;

/// The f32 normalisation constants against the official f64 literals: f32 rounding only.
const CONSTANT_ATOL: f64 = 1e-7;

#[derive(serde::Deserialize)]
struct Expected {
    images: Vec<String>,
    image_res: usize,
    max_words: usize,
    max_tokens: usize,
    captions: Vec<CaptionCase>,
}

#[derive(serde::Deserialize)]
struct CaptionCase {
    raw: String,
}

fn invalid(dir: &Path, reason: impl ToString) -> ParityError {
    ParityError::Read {
        path: dir.to_path_buf(),
        reason: reason.to_string(),
    }
}

fn tolerance(spec: &CaseSpec, key: &str, default: f64) -> f64 {
    spec.extra
        .get(key)
        .and_then(serde_yaml::Value::as_f64)
        .unwrap_or(default)
}

/// Computes every tensor of the case; `expected` gives the names to compare against.
pub fn run(
    dir: &Path,
    spec: &CaseSpec,
    expected: &[(String, Tensor)],
) -> Result<Vec<Comparison>, ParityError> {
    let text = std::fs::read_to_string(dir.join("expected.json")).map_err(|e| invalid(dir, e))?;
    let case: Expected = serde_json::from_str(&text).map_err(|e| invalid(dir, e))?;
    let mut got: Vec<(String, Tensor, Tolerance)> = Vec::new();
    let pixel_tol = Tolerance {
        rtol: 0.0,
        atol: tolerance(spec, "resize_max_abs_u8", 1.0),
    };
    let tensor_tol = Tolerance {
        rtol: 0.0,
        atol: tolerance(spec, "tensor_atol", 0.016),
    };
    let exact = Tolerance {
        rtol: 0.0,
        atol: 0.0,
    };
    let batch =
        Tensor::read_safetensors(dir.join("batch.safetensors")).map_err(|e| invalid(dir, e))?;
    let transform = TestTransform::new(case.image_res);
    for (i, file) in case.images.iter().enumerate() {
        let name = format!("image_{i}.decoded_rgb");
        let decoded = batch
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, t)| t)
            .ok_or_else(|| invalid(dir, format!("batch.safetensors has no {name}")))?;
        let (h, w) = (decoded.size()[0] as usize, decoded.size()[1] as usize);
        let data = Vec::<u8>::try_from(decoded.flatten(0, -1)).map_err(|e| invalid(dir, e))?;
        let official = RgbImage::new(w, h, data).map_err(|e| invalid(dir, e))?;
        let resized = pixels::resize_bicubic(&official, case.image_res, case.image_res);
        let res = case.image_res as i64;
        got.push((
            format!("image_{i}.resized_rgb"),
            Tensor::from_slice(&resized.data)
                .view([res, res, 3])
                .to_kind(Kind::Float),
            pixel_tol,
        ));
        let jpeg =
            std::fs::read(dir.join(file)).map_err(|e| invalid(dir, format!("{file}: {e}")))?;
        let chw = transform
            .apply_bytes(&jpeg)
            .map_err(|e| invalid(dir, format!("{file}: {e}")))?;
        got.push((
            format!("image_{i}.tensor"),
            Tensor::from_slice(&chw).view([3, res, res]),
            tensor_tol,
        ));
    }
    let as_f64 = |v: [f32; 3]| Tensor::from_slice(&v.map(f64::from));
    let constant_tol = Tolerance {
        rtol: 0.0,
        atol: CONSTANT_ATOL,
    };
    got.push(("normalize_mean".into(), as_f64(CLIP_MEAN), constant_tol));
    got.push(("normalize_std".into(), as_f64(CLIP_STD), constant_tol));
    let vocab = spec_vocab(dir)?;
    let tokenizer = TextTokenizer::from_vocab_txt(&vocab).map_err(|e| invalid(dir, e))?;
    let (ids, atts, valid) = encode_captions(&tokenizer, &case, dir)?;
    let rows = case.captions.len() as i64;
    let width = case.max_tokens as i64;
    got.push((
        "caption_ids".into(),
        Tensor::from_slice(&ids).view([rows, width]),
        exact,
    ));
    got.push((
        "caption_pretrain_ids".into(),
        Tensor::from_slice(&ids).view([rows, width]),
        exact,
    ));
    got.push((
        "caption_atts".into(),
        Tensor::from_slice(&atts).view([rows, width]),
        exact,
    ));
    got.push(("caption_valid".into(), Tensor::from_slice(&valid), exact));
    Ok(expected
        .iter()
        .map(
            |(name, want)| match got.iter().find(|(n, _, _)| n == name) {
                Some((_, tensor, tol)) => {
                    let want = if want.kind() == Kind::Uint8 {
                        want.to_kind(Kind::Float)
                    } else {
                        want.shallow_clone()
                    };
                    compare(name, tensor, &want, *tol)
                }
                None => super::not_computed(name),
            },
        )
        .collect())
}

fn spec_vocab(dir: &Path) -> Result<std::path::PathBuf, ParityError> {
    let path = dir.join("vocab.txt");
    if path.exists() {
        Ok(path)
    } else {
        Err(invalid(dir, "no vocab.txt in the case folder"))
    }
}

/// Row-major padded ids, attention masks, and one validity flag per caption.
type EncodedCaptions = (Vec<i64>, Vec<i64>, Vec<i64>);

/// Padded ids and masks per caption (rows of zeros where `pre_caption` rejects the text, as the official
/// fixture records), and the validity flags.
fn encode_captions(
    tokenizer: &TextTokenizer,
    case: &Expected,
    dir: &Path,
) -> Result<EncodedCaptions, ParityError> {
    let mut ids = Vec::new();
    let mut atts = Vec::new();
    let mut valid = Vec::new();
    for caption in &case.captions {
        match pre_caption(&caption.raw, case.max_words) {
            Ok(cleaned) => {
                let enc = tokenizer
                    .encode(&cleaned, case.max_tokens)
                    .map_err(|e| invalid(dir, e))?;
                let (padded, mask) = tokenizer.pad(&enc.ids, case.max_tokens);
                ids.extend(padded);
                atts.extend(mask);
                valid.push(1);
            }
            Err(_) => {
                ids.extend(std::iter::repeat_n(0, case.max_tokens));
                atts.extend(std::iter::repeat_n(0, case.max_tokens));
                valid.push(0);
            }
        }
    }
    Ok((ids, atts, valid))
}
