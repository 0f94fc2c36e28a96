//! Parity of the preprocessing with the official code (fixture `image_preprocessing`): `pre_caption`,
//! `pre_question`, token ids exactly; PIL bicubic resize within 1 level; the whole test transform within
//! the fixture's absolute tolerance; plus RoBERTa BPE tokens of `pretrain_clipvit_roberta`.

use std::path::PathBuf;

use safetensors::SafeTensors;
use serde_json::Value;
use xvlm_model::data::caption::{pre_caption, pre_question};
use xvlm_model::data::pixels::{self, RgbImage};
use xvlm_model::data::tokenizer::TextTokenizer;
use xvlm_model::data::transform::TestTransform;

fn case_dir(name: &str) -> PathBuf {
    xvlm_model::fixtures_dir().join(name)
}

fn read(path: PathBuf) -> Vec<u8> {
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn i64s(st: &SafeTensors, name: &str) -> (Vec<usize>, Vec<i64>) {
    let t = st.tensor(name).unwrap();
    let v = t
        .data()
        .chunks_exact(8)
        .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
        .collect();
    (t.shape().to_vec(), v)
}

fn f32s(st: &SafeTensors, name: &str) -> Vec<f32> {
    st.tensor(name)
        .unwrap()
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect()
}

/// `pre_caption`, `pre_question` and both id encodings equal the official outputs for all 20 strings.
#[test]
fn captions_and_token_ids_match_official() {
    let dir = case_dir("image_preprocessing");
    let expected: Value = serde_json::from_slice(&read(dir.join("expected.json"))).unwrap();
    let exp_bytes = read(dir.join("expected.safetensors"));
    let st = SafeTensors::deserialize(&exp_bytes).unwrap();
    let (shape, ids) = i64s(&st, "caption_ids");
    let (_, atts) = i64s(&st, "caption_atts");
    let (_, pre_ids) = i64s(&st, "caption_pretrain_ids");
    let (_, valid) = i64s(&st, "caption_valid");
    let max_tokens = shape[1];
    let max_words = expected["max_words"].as_u64().unwrap() as usize;
    let tok = TextTokenizer::from_vocab_txt(&dir.join("vocab.txt")).unwrap();
    let captions = expected["captions"].as_array().unwrap();
    assert_eq!(captions.len(), shape[0]);
    for (i, c) in captions.iter().enumerate() {
        let raw = c["raw"].as_str().unwrap();
        assert_eq!(
            pre_question(raw, max_words),
            c["pre_question"].as_str().unwrap(),
            "pre_question({raw:?})"
        );
        let cleaned = pre_caption(raw, max_words);
        if valid[i] == 0 {
            assert!(cleaned.is_err(), "pre_caption({raw:?}) must fail");
            continue;
        }
        let cleaned = cleaned.unwrap();
        assert_eq!(
            cleaned,
            c["pre_caption"].as_str().unwrap(),
            "pre_caption({raw:?})"
        );
        let (pieces, _) = tok.tokenize(&cleaned).unwrap();
        let want: Vec<&str> = c["wordpieces"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        assert_eq!(pieces, want, "word pieces of {cleaned:?}");
        let enc = tok.encode(&cleaned, max_tokens).unwrap();
        let (padded, mask) = tok.pad(&enc.ids, max_tokens);
        let row = i * max_tokens..(i + 1) * max_tokens;
        assert_eq!(padded, pre_ids[row.clone()], "pretrain ids of {cleaned:?}");
        assert_eq!(padded, ids[row.clone()], "fine-tune ids of {cleaned:?}");
        assert_eq!(mask, atts[row], "attention mask of {cleaned:?}");
    }
}

/// From the official decoded pixels, the PIL-bicubic resize is within 1 level (in fact exact), and
/// decode + resize + normalise lands within `tensor_atol` of `test_transform`.
#[test]
fn test_transform_matches_official() {
    let dir = case_dir("image_preprocessing");
    let batch_bytes = read(dir.join("batch.safetensors"));
    let batch = SafeTensors::deserialize(&batch_bytes).unwrap();
    let exp_bytes = read(dir.join("expected.safetensors"));
    let exp = SafeTensors::deserialize(&exp_bytes).unwrap();
    let res = 64;
    let transform = TestTransform::new(res);
    for i in 0..3 {
        let decoded = batch.tensor(&format!("image_{i}.decoded_rgb")).unwrap();
        let (h, w) = (decoded.shape()[0], decoded.shape()[1]);
        let official = RgbImage::new(w, h, decoded.data().to_vec()).unwrap();
        let resized = pixels::resize_bicubic(&official, res, res);
        let want = exp.tensor(&format!("image_{i}.resized_rgb")).unwrap();
        let worst = resized
            .data
            .iter()
            .zip(want.data())
            .map(|(&a, &b)| (i32::from(a) - i32::from(b)).abs())
            .max()
            .unwrap();
        println!("image_{i}: resize max level diff {worst}");
        assert!(worst <= 1, "image_{i}: resize differs by {worst} levels");

        let jpeg = read(dir.join(format!("image_{i}.jpg")));
        let ours = pixels::decode(&jpeg).unwrap();
        let decode_diff = ours
            .data
            .iter()
            .zip(official.data.iter())
            .map(|(&a, &b)| (i32::from(a) - i32::from(b)).abs())
            .max()
            .unwrap();
        println!("image_{i}: jpeg decode max level diff vs libjpeg-turbo {decode_diff}");
        let tensor = transform.apply_bytes(&jpeg).unwrap();
        let want = f32s(&exp, &format!("image_{i}.tensor"));
        assert_eq!(tensor.len(), want.len());
        let err = tensor
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        println!("image_{i}: test transform max abs err {err}");
        assert!(
            err <= 0.016,
            "image_{i}: test transform error {err} > 0.016"
        );
    }
}

/// RoBERTa byte-level BPE: the official `<s>` + BPE tokens of the fixture captions map to the official ids,
/// and re-tokenising the text they spell (complete words only) gives the same tokens.
#[test]
fn roberta_bpe_tokens_match_official() {
    let dir = case_dir("pretrain_clipvit_roberta");
    let tok = TextTokenizer::from_dir(&dir, true).unwrap();
    assert_eq!(tok.special().pad, 1);
    assert_eq!(tok.special().cls, 0);
    let info: Value = serde_json::from_slice(&read(dir.join("info.json"))).unwrap();
    let batch_bytes = read(dir.join("batch.safetensors"));
    let batch = SafeTensors::deserialize(&batch_bytes).unwrap();
    for part in ["general", "region"] {
        let (shape, ids) = i64s(&batch, &format!("{part}.text_ids"));
        let max_tokens = shape[1];
        let rows = info["tokens"][part].as_array().unwrap();
        for (r, row) in rows.iter().enumerate() {
            let want: Vec<&str> = row
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_str().unwrap())
                .collect();
            let as_ids: Vec<i64> = want
                .iter()
                .map(|t| {
                    tok.token_id(t)
                        .unwrap_or_else(|| panic!("{t} not in vocab"))
                })
                .collect();
            let (padded, _) = tok.pad(&as_ids, max_tokens);
            assert_eq!(
                padded,
                ids[r * max_tokens..(r + 1) * max_tokens],
                "{part} row {r}"
            );
            // The text spelled by all but the (possibly truncated) last word.
            let spelled: String = want[1..].concat().replace('\u{120}', " ");
            let Some(cut) = spelled.rfind(' ') else {
                continue;
            };
            let text = &spelled[..cut];
            let (pieces, _) = tok.tokenize(text).unwrap();
            assert_eq!(
                pieces,
                want[1..1 + pieces.len()],
                "{part} row {r}: {text:?}"
            );
        }
    }
}

/// The official batches obey the masking rules we implement: the number of masked positions is
/// `min(max_masks, max(1, round_half_even(n * mask_prob)))`, labels are the original ids, position 0 is
/// never masked, and masked ids differ from the originals only at masked positions.
#[test]
fn official_mask_counts_follow_round_half_even() {
    use xvlm_model::data::masking::round_half_even;
    for case in ["pretrain_swin_bert", "pretrain_clipvit_roberta"] {
        let bytes = read(case_dir(case).join("batch.safetensors"));
        let st = SafeTensors::deserialize(&bytes).unwrap();
        for part in ["general", "region"] {
            let (shape, ids) = i64s(&st, &format!("{part}.text_ids"));
            let (_, atts) = i64s(&st, &format!("{part}.text_atts"));
            let (_, masked) = i64s(&st, &format!("{part}.text_ids_masked"));
            let (mshape, pos) = i64s(&st, &format!("{part}.masked_pos"));
            let (_, labels) = i64s(&st, &format!("{part}.masked_ids"));
            let (l, m) = (shape[1], mshape[1]);
            for r in 0..shape[0] {
                let n: i64 = atts[r * l..(r + 1) * l].iter().sum();
                let want = m.min(round_half_even(n as f64 * 0.25).max(1));
                let row_pos: Vec<usize> = pos[r * m..(r + 1) * m]
                    .iter()
                    .filter(|&&p| p > 0)
                    .map(|&p| p as usize)
                    .collect();
                assert_eq!(row_pos.len(), want, "{case} {part} row {r}: n = {n}");
                for (k, &p) in row_pos.iter().enumerate() {
                    assert_eq!(labels[r * m + k], ids[r * l + p]);
                }
                for j in 0..l {
                    if !row_pos.contains(&j) {
                        assert_eq!(
                            masked[r * l + j],
                            ids[r * l + j],
                            "{case} {part} row {r} col {j}"
                        );
                    }
                }
            }
        }
    }
}
