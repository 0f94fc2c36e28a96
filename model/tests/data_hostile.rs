//! Hostile input: every bad line is a counted skip, never a panic; missing files are clear errors.

use std::path::Path;
use std::sync::Arc;

use base64::Engine;
use serde_json::json;
use xvlm_model::config::RecordKeys;
use xvlm_model::data::augment::OpArithmetic;
use xvlm_model::data::loader::{Loader, LoaderConfig, Processor, StreamState};
use xvlm_model::data::masking::MaskConfig;
use xvlm_model::data::pixels::{self, RgbImage};
use xvlm_model::data::region::{RegionConfig, RegionProcessor};
use xvlm_model::data::rng::{rng_for, Purpose};
use xvlm_model::data::sample::{ImageTextProcessor, TextPipeline};
use xvlm_model::data::shard::ShardPlan;
use xvlm_model::data::store::list_shards;
use xvlm_model::data::synth::vocab;
use xvlm_model::data::tokenizer::TextTokenizer;
use xvlm_model::data::transform::TrainTransform;
use xvlm_model::data::DataError;

fn jpeg(w: u32, h: u32) -> Vec<u8> {
    let mut img = RgbImage::filled(w as usize, h as usize, [200, 30, 30]);
    img.data[0] = 0;
    let mut out = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 90)
        .encode(&img.data, w, h, image::ExtendedColorType::Rgb8)
        .unwrap();
    out
}

/// A JPEG whose frame header says 0 x 0.
fn zero_size_jpeg() -> Vec<u8> {
    let mut j = jpeg(16, 16);
    let sof = j.windows(2).position(|w| w == [0xFF, 0xC0]).unwrap();
    for b in &mut j[sof + 5..sof + 9] {
        *b = 0;
    }
    j
}

fn text_pipeline(dir: &Path) -> TextPipeline {
    std::fs::write(dir.join("vocab.txt"), vocab()).unwrap();
    TextPipeline {
        tokenizer: Arc::new(TextTokenizer::from_vocab_txt(&dir.join("vocab.txt")).unwrap()),
        max_words: 12,
        max_tokens: 16,
        mask: MaskConfig {
            max_masks: 3,
            ..MaskConfig::default()
        },
        tokenized: false,
    }
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// Decoder-level hostility returns errors, never panics.
#[test]
fn bad_images_are_errors() {
    let good = jpeg(16, 16);
    assert!(pixels::decode(&good).is_ok());
    assert!(
        pixels::decode(&good[..good.len() / 2]).is_err(),
        "truncated JPEG"
    );
    assert!(pixels::decode(&zero_size_jpeg()).is_err(), "zero-size JPEG");
    assert!(pixels::decode(&[]).is_err(), "empty bytes");
    assert!(pixels::decode(b"not an image at all").is_err());
    let mut garbage = good.clone();
    for b in garbage.iter_mut().skip(200).take(200) {
        *b = 0xFF;
    }
    let _ = pixels::decode(&garbage); // corrupt entropy data: error or grey pixels, no panic
}

/// A shard mixing 7 bad lines (truncated JPEG, zero-size image, empty image, empty caption, invalid
/// UTF-8, invalid JSON, a 100 MB line) with 4 good ones: the loader yields the good ones and counts 7 skips.
#[test]
fn bad_lines_are_counted_skips() {
    let dir = tempfile::tempdir().unwrap();
    let text = text_pipeline(dir.path());
    let good = jpeg(24, 20);
    let line = |bin: &[u8], cap: &str| json!({"binary": b64(bin), "caption": cap}).to_string();
    let mut body = Vec::new();
    let mut push = |l: &[u8]| {
        body.extend_from_slice(l);
        body.push(b'\n');
    };
    push(line(&good[..good.len() / 2], "a red circle").as_bytes());
    push(line(&zero_size_jpeg(), "a red circle").as_bytes());
    push(line(&[], "a red circle").as_bytes());
    push(line(&good, "?!.,").as_bytes());
    push(b"{\"binary\": \"\xff\xfe\", \"caption\": \"x\"}");
    push(b"{\"binary\": \"AAAA\", \"caption\": ");
    let mut huge = vec![b'x'; 100 << 20];
    huge[0] = b'"';
    push(&huge);
    drop(huge);
    for _ in 0..4 {
        push(line(&good, "a red circle left of a blue square").as_bytes());
    }
    std::fs::write(dir.path().join("part-0.jsonl"), &body).unwrap();
    drop(body);

    let entries = vec![dir.path().join("part-0.jsonl").display().to_string()];
    let plan = ShardPlan::new(list_shards(&entries).unwrap(), 0, 1, 0).unwrap();
    let processor = ImageTextProcessor {
        keys: RecordKeys::default(),
        text,
        transform: TrainTransform::pretrain(32),
    };
    let mut cfg = LoaderConfig::new(2, 2, 0);
    cfg.max_line_bytes = 64 << 20;
    let mut loader = Loader::start(plan, Arc::new(processor), cfg, StreamState::default());
    let first = loader.next_batch().unwrap();
    let second = loader.next_batch().unwrap();
    assert_eq!(first.samples.len() + second.samples.len(), 4);
    assert_eq!(second.state.skipped, 7, "skips counted");
    assert_eq!(second.state.lines, 11);
    assert_eq!(first.lines[0].line, 7, "first good line is line 7");
}

/// A missing entry or a shard that disappears after listing is an error naming the file.
#[test]
fn missing_files_are_clear_errors() {
    let err = list_shards(&["/no/such/dir/shards".to_string()]).unwrap_err();
    assert!(matches!(err, DataError::MissingFile(_)));
    assert!(err.to_string().contains("/no/such/dir/shards"), "{err}");

    let dir = tempfile::tempdir().unwrap();
    let text = text_pipeline(dir.path());
    let shard = dir.path().join("gone.jsonl");
    std::fs::write(&shard, "{}\n").unwrap();
    let plan = ShardPlan::new(
        list_shards(&[shard.display().to_string()]).unwrap(),
        0,
        1,
        0,
    )
    .unwrap();
    std::fs::remove_file(&shard).unwrap();
    let processor = ImageTextProcessor {
        keys: RecordKeys::default(),
        text,
        transform: TrainTransform::pretrain(32),
    };
    let mut loader = Loader::start(
        plan,
        Arc::new(processor),
        LoaderConfig::new(1, 1, 0),
        StreamState::default(),
    );
    let err = loader.next_batch().unwrap_err();
    assert!(err.to_string().contains("gone.jsonl"), "{err}");
}

fn region_processor(dir: &Path, careful_hflip: bool) -> RegionProcessor {
    RegionProcessor {
        keys: RecordKeys::default(),
        text: text_pipeline(dir),
        cfg: RegionConfig {
            image_res: 64,
            patch_size: 32,
            max_regions: 3,
            min_perc_in_image: 0.5,
            careful_hflip,
            arithmetic: OpArithmetic::Official,
        },
    }
}

/// Boxes outside the image, zero-size boxes and non-numeric boxes are skips, not panics.
#[test]
fn bad_boxes_are_skips() {
    let dir = tempfile::tempdir().unwrap();
    let p = region_processor(dir.path(), false);
    let img = b64(&jpeg(40, 30));
    for bb in [
        json!([30, 20, 20, 20]),
        json!([-5, 0, 10, 10]),
        json!([0, 0, 0, 5]),
        json!([1, 2, 3]),
        json!(["a", 0, 1, 1]),
    ] {
        let line = json!({"binary": img, "elems": [{"bb": bb, "caption": "circle"}]}).to_string();
        let mut rng = rng_for(0, Purpose::Sample, &[]);
        let r = p.process(line.as_bytes(), &mut rng);
        assert!(matches!(r, Err(DataError::Sample(_))), "bb {bb}: {r:?}");
    }
    let ok = json!({"binary": img, "elems": [{"bb": [2, 2, 10, 10], "caption": "circle", "attributes": "red"}]});
    let mut rng = rng_for(0, Purpose::Sample, &[]);
    assert!(p.process(ok.to_string().as_bytes(), &mut rng).is_ok());
}

/// `careful_hflip`: a region sample whose captions say "left" is never flipped (its box stays on the
/// left), while without it some samples are flipped; the caption text is never edited.
#[test]
fn careful_hflip_keeps_left_captions_unflipped() {
    let dir = tempfile::tempdir().unwrap();
    let img = b64(&jpeg(64, 32));
    let line =
        json!({"binary": img, "elems": [{"bb": [0, 8, 16, 16], "caption": "circle on the left"}]})
            .to_string();
    let careful = region_processor(dir.path(), true);
    let careless = region_processor(dir.path(), false);
    let left_id = careful.text.tokenizer.token_id("left").unwrap();
    let mut flipped = 0;
    for s in 0..40 {
        let a = careful
            .process(line.as_bytes(), &mut rng_for(s, Purpose::Sample, &[]))
            .unwrap();
        assert!(
            a.target_bbox[0][0] < 0.5,
            "seed {s}: careful sample flipped"
        );
        assert!(a.texts[0].ids.contains(&left_id), "caption edited");
        let b = careless
            .process(line.as_bytes(), &mut rng_for(s, Purpose::Sample, &[]))
            .unwrap();
        if b.target_bbox[0][0] > 0.5 {
            flipped += 1;
        }
    }
    assert!(
        flipped > 5,
        "without careful_hflip only {flipped}/40 flipped"
    );
}
