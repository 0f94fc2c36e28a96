//! A synthetic multi-grained corpus: images of coloured shapes at known boxes, captions determined by the
//! content ("a red circle left of a blue square"), region annotations, in the official pre-training
//! json-lines formats (several shards), plus fine-tuning files of the same images (retrieval
//! train/val/test, grounding with boxes, NLVR2 statements about image pairs in [`nlvr`], VQA questions
//! in [`vqa`], a RefCOCO+ split in the official REFER layouts in [`refcoco`]) and a WordPiece
//! `vocab.txt` that covers every word.

mod nlvr;
mod pickle;
mod refcoco;
mod vqa;

use std::io::Write;
use std::path::{Path, PathBuf};

use base64::Engine;
use rand::Rng;
use serde_json::json;

use super::pixels::RgbImage;
use super::rng::{rng_for, Purpose};
use super::DataError;

/// Colour names and their RGB values.
pub const COLOURS: [(&str, [u8; 3]); 6] = [
    ("red", [220, 40, 40]),
    ("green", [40, 170, 60]),
    ("blue", [40, 70, 220]),
    ("yellow", [235, 210, 40]),
    ("purple", [150, 50, 190]),
    ("orange", [245, 140, 30]),
];

/// Shape names.
pub const SHAPES: [&str; 3] = ["circle", "square", "triangle"];

/// Generator settings.
#[derive(Debug, Clone)]
pub struct SynthConfig {
    /// Number of images.
    pub images: usize,
    /// Seed.
    pub seed: u64,
    /// Image width.
    pub width: usize,
    /// Image height.
    pub height: usize,
    /// Shard files per pre-training format.
    pub shards: usize,
    /// Side of each (square-boxed) shape as a fraction of `min(height, width / 2)`, drawn uniformly.
    pub shape_side: (f64, f64),
    /// Range of each background channel (drawn per image; every pixel then darkened by up to 11).
    pub background: (u8, u8),
}

impl Default for SynthConfig {
    fn default() -> Self {
        Self {
            images: 400,
            seed: 0,
            width: 160,
            height: 120,
            shards: 4,
            shape_side: (0.3, 0.6),
            background: (200, 250),
        }
    }
}

/// One drawn shape.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Shape {
    colour: usize,
    kind: usize,
    bb: [usize; 4],
}

/// What a fine-tune writer knows of one written image.
#[derive(Debug, Clone)]
struct Drawn {
    /// The image's name under the corpus folder (`images/000123.jpg`).
    name: String,
    /// 0 train, 1 val, 2 test.
    split: usize,
    /// The left shape, then the right one (different colour-shape pairs).
    shapes: Vec<Shape>,
}

impl Drawn {
    /// Whether the image holds a shape of this colour and kind.
    fn has(&self, colour: usize, kind: usize) -> bool {
        self.shapes
            .iter()
            .any(|s| s.colour == colour && s.kind == kind)
    }
}

impl Shape {
    fn name(&self) -> String {
        format!("{} {}", COLOURS[self.colour].0, SHAPES[self.kind])
    }
}

fn draw(img: &mut RgbImage, s: &Shape) {
    let [x, y, w, h] = s.bb;
    let rgb = COLOURS[s.colour].1;
    let (cx, cy, r) = (
        x as f64 + w as f64 / 2.0,
        y as f64 + h as f64 / 2.0,
        w as f64 / 2.0,
    );
    for py in y..y + h {
        for px in x..x + w {
            let (fx, fy) = (px as f64 + 0.5, py as f64 + 0.5);
            let inside = match s.kind {
                0 => (fx - cx).powi(2) + (fy - cy).powi(2) <= r * r,
                1 => true,
                _ => {
                    // Apex at the top centre, base at the bottom.
                    let t = (fy - y as f64) / h as f64;
                    (fx - cx).abs() <= t * w as f64 / 2.0
                }
            };
            if inside {
                let o = (py * img.width + px) * 3;
                img.data[o..o + 3].copy_from_slice(&rgb);
            }
        }
    }
}

struct Item {
    id: usize,
    jpeg: Vec<u8>,
    shapes: Vec<Shape>,
    captions: Vec<String>,
}

fn make_item(cfg: &SynthConfig, id: usize) -> Result<Item, DataError> {
    let mut rng = rng_for(cfg.seed, Purpose::Synth, &[id as u64]);
    let (w, h) = (cfg.width, cfg.height);
    let (lo, hi) = cfg.background;
    let bg = [
        rng.random_range(lo..=hi),
        rng.random_range(lo..=hi),
        rng.random_range(lo..=hi),
    ];
    let mut img = RgbImage::filled(w, h, bg);
    for v in img.data.iter_mut() {
        *v = v.saturating_sub(rng.random_range(0..12u8));
    }
    let first = (
        rng.random_range(0..COLOURS.len()),
        rng.random_range(0..SHAPES.len()),
    );
    let mut second = first;
    while second == first {
        second = (
            rng.random_range(0..COLOURS.len()),
            rng.random_range(0..SHAPES.len()),
        );
    }
    let mut shapes = Vec::new();
    for (k, (colour, kind)) in [first, second].into_iter().enumerate() {
        let half = w / 2;
        let room = h.min(half) as f64;
        let (a, b) = cfg.shape_side;
        let side_lo = ((a * room) as usize).clamp(1, h.min(half));
        let side = rng.random_range(side_lo..=((b * room) as usize).clamp(side_lo, h.min(half)));
        let x = k * half + rng.random_range(0..=half - side);
        let y = rng.random_range(0..=h - side);
        let s = Shape {
            colour,
            kind,
            bb: [x, y, side, side],
        };
        draw(&mut img, &s);
        shapes.push(s);
    }
    let (l, r) = (shapes[0].name(), shapes[1].name());
    let captions = vec![
        format!("a {l} left of a {r}"),
        format!("a {r} right of a {l}"),
    ];
    let mut jpeg = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpeg, 92)
        .encode(
            &img.data,
            w as u32,
            h as u32,
            image::ExtendedColorType::Rgb8,
        )
        .map_err(|e| DataError::Sample(format!("jpeg encode: {e}")))?;
    Ok(Item {
        id,
        jpeg,
        shapes,
        captions,
    })
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<(), DataError> {
    std::fs::write(path, bytes).map_err(|e| DataError::Io {
        path: path.to_path_buf(),
        source: e,
    })
}

fn mkdir(path: &Path) -> Result<(), DataError> {
    std::fs::create_dir_all(path).map_err(|e| DataError::Io {
        path: path.to_path_buf(),
        source: e,
    })
}

/// What was written.
#[derive(Debug, Clone)]
pub struct SynthSummary {
    /// Image-text shard files.
    pub image_text_shards: Vec<PathBuf>,
    /// Region shard files.
    pub region_shards: Vec<PathBuf>,
    /// Images in the train / val / test splits.
    pub splits: [usize; 3],
}

/// Write the corpus under `out`:
/// `pretrain/image_text/part-*.jsonl`, `pretrain/regions/part-*.jsonl` (train split only, base64 images),
/// `images/*.jpg`, `finetune/{retrieval_train,retrieval_val,retrieval_test,grounding_train,grounding_test}.json`,
/// `finetune/nlvr_{train,dev,test}.json`, `finetune/{vqa_train,vqa_val,vqa_test,answer_list}.json`,
/// `finetune/refcoco+_{train,val,test}.json` with `finetune/refcoco+/{refs(unc).p,instances.json,dets.json,cocos.json}`,
/// `vocab.txt`, and `README.md`.
pub fn generate(out: &Path, cfg: &SynthConfig) -> Result<SynthSummary, DataError> {
    if cfg.images < 10 || cfg.shards == 0 {
        return Err(DataError::Config(
            "synth-data needs at least 10 images and 1 shard".into(),
        ));
    }
    if cfg.width < 32 || cfg.height < 32 {
        return Err(DataError::Config(
            "synth-data images must be at least 32x32".into(),
        ));
    }
    let (a, b) = cfg.shape_side;
    if !(a > 0.0 && a <= b && b <= 1.0) {
        return Err(DataError::Config(format!(
            "synth-data shape side fractions must satisfy 0 < min <= max <= 1, got {a}..{b}"
        )));
    }
    if cfg.background.0 > cfg.background.1 {
        return Err(DataError::Config(format!(
            "synth-data background range {}..{} is empty",
            cfg.background.0, cfg.background.1
        )));
    }
    let it_dir = out.join("pretrain/image_text");
    let rg_dir = out.join("pretrain/regions");
    let img_dir = out.join("images");
    let ft_dir = out.join("finetune");
    for d in [&it_dir, &rg_dir, &img_dir, &ft_dir] {
        mkdir(d)?;
    }
    let n = cfg.images;
    let n_test = (n / 10).max(1);
    let n_val = (n / 10).max(1);
    let n_train = n - n_test - n_val;
    let b64 = base64::engine::general_purpose::STANDARD;

    // Unequal shard sizes on purpose: shard k gets a share proportional to k + 1.
    let weights: Vec<usize> = (1..=cfg.shards).collect();
    let total: usize = weights.iter().sum();
    let shard_of = |i: usize| -> usize {
        let pos = i * total / n_train.max(1);
        let mut acc = 0;
        for (k, w) in weights.iter().enumerate() {
            acc += w;
            if pos < acc {
                return k;
            }
        }
        cfg.shards - 1
    };
    let mut it_lines = vec![String::new(); cfg.shards];
    let mut rg_lines = vec![String::new(); cfg.shards];
    let mut retrieval = [Vec::new(), Vec::new(), Vec::new()];
    let mut grounding = [Vec::new(), Vec::new()];
    let mut drawn = Vec::with_capacity(n);
    for i in 0..n {
        let item = make_item(cfg, i)?;
        let name = format!("images/{:06}.jpg", item.id);
        write_file(&out.join(&name), &item.jpeg)?;
        let split = if i < n_train {
            0
        } else if i < n_train + n_val {
            1
        } else {
            2
        };
        if split == 0 {
            let k = shard_of(i);
            let bin = b64.encode(&item.jpeg);
            it_lines[k] += &json!({"binary": bin, "caption": item.captions}).to_string();
            it_lines[k].push('\n');
            let elems: Vec<_> = item
                .shapes
                .iter()
                .map(|s| {
                    json!({
                        "bb": s.bb,
                        "caption": SHAPES[s.kind],
                        "attributes": [COLOURS[s.colour].0],
                    })
                })
                .collect();
            let mut region = json!({"binary": bin, "elems": elems});
            if i % 2 == 0 {
                region["caption"] = json!(item.captions[0]);
            }
            rg_lines[k] += &region.to_string();
            rg_lines[k].push('\n');
            for c in &item.captions {
                retrieval[0].push(json!({"image": name, "caption": c, "image_id": i}));
            }
        } else {
            retrieval[split].push(json!({"image": name, "caption": item.captions}));
        }
        let g = if split == 0 { 0 } else { 1 };
        for (j, s) in item.shapes.iter().enumerate() {
            let side = if j == 0 { "left" } else { "right" };
            grounding[g].push(json!({
                "image": name,
                "text": format!("the {} on the {side}", s.name()),
                "ref_id": i * 2 + j,
                "bbox": s.bb,
            }));
        }
        drawn.push(Drawn {
            name,
            split,
            shapes: item.shapes,
        });
    }
    let mut image_text_shards = Vec::new();
    let mut region_shards = Vec::new();
    for k in 0..cfg.shards {
        let p = it_dir.join(format!("part-{k:05}.jsonl"));
        write_file(&p, it_lines[k].as_bytes())?;
        image_text_shards.push(p);
        let p = rg_dir.join(format!("part-{k:05}.jsonl"));
        write_file(&p, rg_lines[k].as_bytes())?;
        region_shards.push(p);
    }
    for (name, items) in [
        ("retrieval_train.json", &retrieval[0]),
        ("retrieval_val.json", &retrieval[1]),
        ("retrieval_test.json", &retrieval[2]),
        ("grounding_train.json", &grounding[0]),
        ("grounding_test.json", &grounding[1]),
    ] {
        write_file(
            &ft_dir.join(name),
            serde_json::Value::from(items.clone())
                .to_string()
                .as_bytes(),
        )?;
    }
    nlvr::write(&ft_dir, cfg.seed, &drawn)?;
    vqa::write(&ft_dir, cfg.seed, &drawn)?;
    refcoco::write(&ft_dir, cfg.seed, &drawn, cfg.width, cfg.height)?;
    write_file(&out.join("vocab.txt"), vocab().as_bytes())?;
    write_file(&out.join("pretrain_data.yaml"), data_yaml(out).as_bytes())?;
    let mut readme = Vec::new();
    let _ = writeln!(
        readme,
        "# synthetic X-VLM corpus\n\n{n} images ({n_train} train, {n_val} val, {n_test} test), seed {}, \
         {}x{} JPEG.\nPre-training shards hold the train split only (base64 images); fine-tuning files \
         name images under `images/` (is_image_rpath with image root = this folder).\nGrounding boxes \
         are [x, y, w, h] pixels. `vocab.txt` is a WordPiece vocabulary covering every word; \
         `pretrain_data.yaml` holds the official data keys for pre-training on it.\nRefCOCO+ \
         (official layouts): `finetune/refcoco+_{{train,val,test}}.json` name images under `images/`; \
         `finetune/refcoco+/` holds `refs(unc).p` (REFER refs, splits train / val / testA / testB), \
         `instances.json` (COCO boxes), `dets.json` (4 proposals per image: both shapes, 2 distractors) \
         and `cocos.json` (set `refcoco_data` to `finetune`).",
        cfg.seed, cfg.width, cfg.height
    );
    write_file(&out.join("README.md"), &readme)?;
    Ok(SynthSummary {
        image_text_shards,
        region_shards,
        splits: [n_train, n_val, n_test],
    })
}

/// The data keys of an official pre-training config for this corpus, at the tiny test sizes of reference
/// §7 (image_res 128, 16 tokens, 3 masks, image batch 4, region batch 6 texts over 2 images).
fn data_yaml(out: &Path) -> String {
    let root = std::path::absolute(out).unwrap_or_else(|_| out.to_path_buf());
    let d = root.display();
    format!(
        "# Data keys for pre-training on the synthetic corpus (official key names).\n\
         train_file: ['{d}/pretrain/image_text']\n\
         train_file_regions: ['{d}/pretrain/regions']\n\
         train_dataset_size: {n}\n\
         images: {{image_key: 'binary', is_image_rpath: False, caption_key: 'caption', tokenized: False, \
         batch_size: 4, num_workers: 2}}\n\
         regions: {{image_key: 'binary', is_image_rpath: False, caption_key: 'caption', tokenized: False, \
         iter_perc: 0.5, batch_size: 6, max_images: 2, max_regions: 3, min_perc_in_image: 0.5, \
         num_workers: 2}}\n\
         image_res: 128\npatch_size: 32\nmax_words: 12\nmax_tokens: 16\nmask_prob: 0.25\n\
         max_masks: 3\nskipgram_prb: 0.2\nskipgram_size: 3\nmask_whole_word: True\n\
         text_encoder: '{d}'\nuse_roberta: False\n",
        n = count_lines(&root.join("pretrain/image_text")),
    )
}

fn count_lines(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .filter_map(|e| std::fs::read(e.path()).ok())
                .map(|b| b.iter().filter(|&&c| c == b'\n').count())
                .sum()
        })
        .unwrap_or(0)
}

/// A WordPiece vocabulary with the BERT special ids ([PAD] 0, [UNK] 100, [CLS] 101, [SEP] 102,
/// [MASK] 103), every caption word, and single letters so other text still tokenizes.
pub fn vocab() -> String {
    let mut v: Vec<String> = vec!["[PAD]".into()];
    for i in 1..100 {
        v.push(format!("[unused{i}]"));
    }
    for s in ["[UNK]", "[CLS]", "[SEP]", "[MASK]"] {
        v.push(s.into());
    }
    let words = [
        "a", "the", "of", "on", "left", "right", "an", "and", "is", "in", "with",
    ];
    for w in words
        .iter()
        .copied()
        .chain(COLOURS.iter().map(|c| c.0))
        .chain(SHAPES)
    {
        if !v.iter().any(|x| x == w) {
            v.push(w.into());
        }
    }
    for c in 'a'..='z' {
        let s = c.to_string();
        if !v.contains(&s) {
            v.push(s);
        }
        v.push(format!("##{c}"));
    }
    for c in '0'..='9' {
        v.push(c.to_string());
    }
    // The fine-tune questions and statements, appended so every earlier id stays what it was (the
    // demo text config has 192 ids).
    for w in ["what", "colour", "image", "has", "none", "?"] {
        v.push(w.into());
    }
    let mut out = v.join("\n");
    out.push('\n');
    out
}
