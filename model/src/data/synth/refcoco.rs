//! A synthetic RefCOCO+ split in the official file layouts: the X-VLM expression files
//! `refcoco+_{train,val,test}.json` (`{image, text, ref_id}`) and, under `refcoco+/`, what the REFER
//! toolkit and the weak evaluation read: `refs(unc).p` (a pickle of ref records), `instances.json`
//! (COCO images, annotations, categories), `dets.json` (detector proposals per image) and `cocos.json`.
//!
//! Each image has two refs, one per shape (`ref_id = 2 x image index + j`, j = 0 the left shape). Every
//! expression names its shape alone in its image ("the red circle", "the circle on the left"). Test
//! images give their left shape to `testA` and their right one to `testB`, so both test splits exist
//! even with one test image. The proposals of an image are its two shape boxes and two distractors that
//! overlap neither (inclusive IoU < 0.3), shuffled: a random proposal is right one time in four.

use std::path::Path;

use rand::seq::SliceRandom;
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use serde_json::{json, Map, Value};

use super::{mkdir, pickle, write_file, Drawn, Shape, SHAPES};
use crate::data::rng::{rng_for, Purpose};
use crate::data::DataError;
use crate::tasks::grounding_bbox::inclusive_iou;

/// Seeds the distractor draws apart from the images, the NLVR2 statements and the VQA answers.
const REFCOCO_STREAM: u64 = 0x5245_4643;
/// COCO annotation ids are `ANN_BASE + ref_id`, so they never equal a ref or image id.
const ANN_BASE: usize = 100_000;
/// Distractor proposals per image.
const DISTRACTORS: usize = 2;
/// A distractor's inclusive IoU with every shape stays below this (well under the 0.5 of a hit).
const MAX_IOU: f64 = 0.3;
/// Draws before a distractor is given up on.
const ATTEMPTS: usize = 1000;
/// Side words, by shape index (the left shape first).
const SIDES: [&str; 2] = ["left", "right"];

/// One referring-expression target: shape `j` of image `image`.
struct Ref<'a> {
    image: usize,
    j: usize,
    drawn: &'a Drawn,
    texts: Vec<String>,
}

impl Ref<'_> {
    fn id(&self) -> usize {
        2 * self.image + self.j
    }

    fn shape(&self) -> &Shape {
        &self.drawn.shapes[self.j]
    }

    /// The REFER split: test refs go to testA (left shapes) and testB (right ones).
    fn split(&self) -> &'static str {
        match (self.drawn.split, self.j) {
            (0, _) => "train",
            (1, _) => "val",
            (_, 0) => "testA",
            _ => "testB",
        }
    }
}

/// Writes the expression files under `dir` (the `finetune/` folder) and the REFER files under
/// `dir/refcoco+/`, for images of `width` x `height` pixels.
pub(super) fn write(
    dir: &Path,
    seed: u64,
    drawn: &[Drawn],
    width: usize,
    height: usize,
) -> Result<(), DataError> {
    if width < 4 || height < 4 || drawn.iter().any(|d| d.shapes.len() != 2) {
        return Err(DataError::Config(format!(
            "synth-data refcoco+: needs images of at least 4x4 with two shapes each ({}): got {width}x{height}",
            dir.display()
        )));
    }
    let refs: Vec<Ref<'_>> = drawn
        .iter()
        .enumerate()
        .flat_map(|(image, d)| {
            (0..2).map(move |j| Ref {
                image,
                j,
                drawn: d,
                texts: expressions(d, j, d.split == 0),
            })
        })
        .collect();
    for (split, file) in [
        (0, "refcoco+_train.json"),
        (1, "refcoco+_val.json"),
        (2, "refcoco+_test.json"),
    ] {
        write_json(&dir.join(file), &expression_file(&refs, split))?;
    }
    let sub = dir.join("refcoco+");
    mkdir(&sub)?;
    write_file(
        &sub.join("refs(unc).p"),
        &pickle::to_pickle(&refer_refs(&refs)),
    )?;
    write_json(
        &sub.join("instances.json"),
        &instances(drawn, &refs, width, height),
    )?;
    let dets = dets(seed, drawn, width, height, &sub.join("dets.json"))?;
    write_json(&sub.join("dets.json"), &dets)?;
    let cocos: Map<String, Value> = (0..drawn.len())
        .map(|i| (i.to_string(), json!([])))
        .collect();
    write_json(&sub.join("cocos.json"), &Value::Object(cocos))
}

fn write_json(path: &Path, v: &Value) -> Result<(), DataError> {
    write_file(path, v.to_string().as_bytes())
}

/// Whether naming shape `j`'s kind, with its colour and / or side when asked, fits it alone in `d`.
fn picks_out(d: &Drawn, j: usize, colour: bool, side: bool) -> bool {
    let s = &d.shapes[j];
    let fits = |(k, o): &(usize, &Shape)| {
        o.kind == s.kind && (!colour || o.colour == s.colour) && (!side || *k == j)
    };
    d.shapes.iter().enumerate().filter(fits).count() == 1
}

/// The expressions of shape `j` of `d` (two shapes): in training every form that names it alone
/// plus where it stands relative to the other shape; held out, "the red circle" and "the circle on the
/// left" (both always unique, as the colour-shape pairs differ).
fn expressions(d: &Drawn, j: usize, train: bool) -> Vec<String> {
    let s = &d.shapes[j];
    let forms: &[(bool, bool)] = if train {
        &[(true, false), (true, true), (false, true), (false, false)]
    } else {
        &[(true, false), (false, true)]
    };
    let mut out: Vec<String> = forms
        .iter()
        .filter(|&&(colour, side)| picks_out(d, j, colour, side))
        .map(|&(colour, side)| {
            let noun = if colour {
                s.name()
            } else {
                SHAPES[s.kind].to_string()
            };
            if side {
                format!("the {noun} on the {}", SIDES[j])
            } else {
                format!("the {noun}")
            }
        })
        .collect();
    if train {
        let other = &d.shapes[1 - j];
        out.push(format!(
            "the {} {} of the {}",
            s.name(),
            SIDES[j],
            other.name()
        ));
    }
    out
}

/// `[{image, text, ref_id}]` of the refs of one split (0 train, 1 val, 2 test).
fn expression_file(refs: &[Ref<'_>], split: usize) -> Value {
    let items: Vec<Value> = refs
        .iter()
        .filter(|r| r.drawn.split == split)
        .flat_map(|r| {
            r.texts
                .iter()
                .map(move |t| json!({"image": r.drawn.name, "text": t, "ref_id": r.id()}))
        })
        .collect();
    Value::from(items)
}

/// The image's file name without its folder, as COCO and REFER store it.
fn file_name(d: &Drawn) -> &str {
    d.name.rsplit('/').next().unwrap_or(&d.name)
}

fn category_id(s: &Shape) -> usize {
    s.kind + 1
}

fn xywh(s: &Shape) -> [f64; 4] {
    s.bb.map(|v| v as f64)
}

/// The REFER ref records, sentence ids numbered across all refs in order.
fn refer_refs(refs: &[Ref<'_>]) -> Value {
    let mut next_sent = 0usize;
    let mut out = Vec::with_capacity(refs.len());
    for r in refs {
        let sent_ids: Vec<usize> = (next_sent..next_sent + r.texts.len()).collect();
        next_sent += r.texts.len();
        let sentences: Vec<Value> = r
            .texts
            .iter()
            .zip(&sent_ids)
            .map(|(t, id)| {
                let tokens: Vec<&str> = t.split_whitespace().collect();
                json!({"sent_id": id, "raw": t, "sent": t, "tokens": tokens})
            })
            .collect();
        out.push(json!({
            "ref_id": r.id(),
            "ann_id": ANN_BASE + r.id(),
            "image_id": r.image,
            "category_id": category_id(r.shape()),
            "split": r.split(),
            "sentences": sentences,
            "sent_ids": sent_ids,
            "file_name": file_name(r.drawn),
        }));
    }
    Value::from(out)
}

/// COCO `instances.json`: every image, one annotation per ref, a category per shape kind.
fn instances(drawn: &[Drawn], refs: &[Ref<'_>], width: usize, height: usize) -> Value {
    let images: Vec<Value> = drawn
        .iter()
        .enumerate()
        .map(|(i, d)| json!({"id": i, "width": width, "height": height, "file_name": file_name(d)}))
        .collect();
    let annotations: Vec<Value> = refs
        .iter()
        .map(|r| {
            let bbox = xywh(r.shape());
            json!({
                "id": ANN_BASE + r.id(),
                "image_id": r.image,
                "category_id": category_id(r.shape()),
                "bbox": bbox,
                "area": bbox[2] * bbox[3],
                "iscrowd": 0,
                "segmentation": [],
            })
        })
        .collect();
    let categories: Vec<Value> = SHAPES
        .iter()
        .enumerate()
        .map(|(k, name)| json!({"id": k + 1, "name": name, "supercategory": "shape"}))
        .collect();
    json!({"images": images, "annotations": annotations, "categories": categories})
}

/// `{image_id: [[x, y, w, h], ...]}` for every image: its shape boxes and the distractors, shuffled.
fn dets(
    seed: u64,
    drawn: &[Drawn],
    width: usize,
    height: usize,
    file: &Path,
) -> Result<Value, DataError> {
    let mut out = Map::new();
    for (i, d) in drawn.iter().enumerate() {
        // One stream per image, so an image's proposals do not depend on the corpus size.
        let mut rng = rng_for(seed, Purpose::Synth, &[REFCOCO_STREAM, i as u64]);
        let truths: Vec<[f64; 4]> = d.shapes.iter().map(xywh).collect();
        let mut boxes = truths.clone();
        for _ in 0..DISTRACTORS {
            let b = distractor(&mut rng, &truths, width, height).ok_or_else(|| {
                DataError::Config(format!(
                    "synth-data {}: no box of {} overlaps its shapes by IoU < {MAX_IOU}",
                    file.display(),
                    d.name
                ))
            })?;
            boxes.push(b);
        }
        boxes.shuffle(&mut rng);
        out.insert(i.to_string(), json!(boxes));
    }
    Ok(Value::Object(out))
}

/// A box of a tenth to a half of each image side inside the image whose inclusive IoU with every
/// shape box is below [`MAX_IOU`] (width and height at least 4).
fn distractor(
    rng: &mut ChaCha8Rng,
    truths: &[[f64; 4]],
    width: usize,
    height: usize,
) -> Option<[f64; 4]> {
    let (lo_w, lo_h) = ((width / 10).max(2), (height / 10).max(2));
    for _ in 0..ATTEMPTS {
        let w = rng.random_range(lo_w..=(width / 2).max(lo_w));
        let h = rng.random_range(lo_h..=(height / 2).max(lo_h));
        let x = rng.random_range(0..=width - w);
        let y = rng.random_range(0..=height - h);
        let b = [x as f64, y as f64, w as f64, h as f64];
        if truths.iter().all(|t| inclusive_iou(*t, b) < MAX_IOU) {
            return Some(b);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::path::PathBuf;

    use super::super::{generate, make_item, vocab, SynthConfig, COLOURS};
    use super::*;
    use crate::checkpoint::torch_pickle::read_plain_pickle;
    use crate::data::finetune::config::Resolver;
    use crate::data::finetune::grounding::{load_split, GroundingDataConfig, GroundingEntry};
    use crate::data::finetune::grounding_eval::Detections;
    use crate::data::finetune::refer::Refer;

    /// `(colour, kind, rest)` of "[colour] kind rest...".
    fn noun<'a>(w: &'a [&'a str]) -> (Option<usize>, usize, &'a [&'a str]) {
        let colour = COLOURS.iter().position(|c| Some(&c.0) == w.first());
        let w = if colour.is_some() { &w[1..] } else { w };
        let kind = SHAPES
            .iter()
            .position(|s| Some(s) == w.first())
            .unwrap_or_else(|| panic!("no shape word at {w:?}"));
        (colour, kind, &w[1..])
    }

    fn fits(s: &Shape, colour: Option<usize>, kind: usize) -> bool {
        s.kind == kind && colour.is_none_or(|c| c == s.colour)
    }

    /// The shapes of `d` an expression describes, read independently of how it was written.
    fn referents(text: &str, d: &Drawn) -> Vec<usize> {
        let w: Vec<&str> = text.split_whitespace().collect();
        assert_eq!(w.first(), Some(&"the"), "{text}");
        let (colour, kind, rest) = noun(&w[1..]);
        let side = |s: &str| SIDES.iter().position(|x| *x == s);
        (0..d.shapes.len())
            .filter(|&k| {
                fits(&d.shapes[k], colour, kind)
                    && match rest {
                        [] => true,
                        ["on", "the", s] => side(s) == Some(k),
                        [s, "of", "the", tail @ ..] => {
                            let (c2, k2, end) = noun(tail);
                            assert!(end.is_empty(), "{text}");
                            side(s) == Some(k)
                                && d.shapes
                                    .iter()
                                    .enumerate()
                                    .any(|(m, o)| m != k && fits(o, c2, k2))
                        }
                        other => panic!("unparsed {other:?} in {text:?}"),
                    }
            })
            .collect()
    }

    fn drawn(a: (usize, usize), b: (usize, usize)) -> Drawn {
        let shape = |(colour, kind), x| Shape {
            colour,
            kind,
            bb: [x, 0, 4, 4],
        };
        Drawn {
            name: "images/000000.jpg".into(),
            split: 0,
            shapes: vec![shape(a, 0), shape(b, 8)],
        }
    }

    /// For every pair of distinct colour-shape pairs, every expression names its shape alone, uses
    /// only vocabulary words, and training has more expressions than the held-out one or two.
    #[test]
    fn every_expression_names_one_shape() {
        let vocab = vocab();
        let words: Vec<&str> = vocab.lines().collect();
        let pairs: Vec<(usize, usize)> = (0..COLOURS.len())
            .flat_map(|c| (0..SHAPES.len()).map(move |k| (c, k)))
            .collect();
        let mut checked = 0;
        for &a in &pairs {
            for &b in pairs.iter().filter(|&&b| b != a) {
                let d = drawn(a, b);
                for j in 0..2 {
                    let (train, held) = (expressions(&d, j, true), expressions(&d, j, false));
                    assert!(train.len() >= 3 && train.len() > held.len(), "{train:?}");
                    assert_eq!(held.len(), 2, "{held:?}");
                    for t in train.iter().chain(&held) {
                        assert_eq!(referents(t, &d), [j], "{t:?} in {:?}", d.shapes);
                        assert!(t.split_whitespace().all(|w| words.contains(&w)), "{t}");
                        checked += 1;
                    }
                }
            }
        }
        assert!(checked > 4 * pairs.len() * (pairs.len() - 1), "{checked}");
    }

    /// "the circle" is only said when the other shape is not a circle.
    #[test]
    fn a_bare_kind_only_when_unambiguous() {
        let same = expressions(&drawn((0, 0), (2, 0)), 0, true);
        assert!(!same.contains(&"the circle".to_string()), "{same:?}");
        let differ = expressions(&drawn((0, 0), (2, 1)), 0, true);
        assert!(differ.contains(&"the circle".to_string()), "{differ:?}");
    }

    fn corpus() -> (tempfile::TempDir, SynthConfig, Vec<Drawn>) {
        let dir = tempfile::tempdir().expect("temp dir");
        let cfg = SynthConfig {
            images: 20,
            seed: 7,
            ..SynthConfig::default()
        };
        let summary = generate(dir.path(), &cfg).expect("generate");
        let [n_train, n_val, _] = summary.splits;
        let drawn = (0..cfg.images)
            .map(|i| Drawn {
                name: format!("images/{i:06}.jpg"),
                split: usize::from(i >= n_train) + usize::from(i >= n_train + n_val),
                shapes: make_item(&cfg, i).expect("item").shapes,
            })
            .collect();
        (dir, cfg, drawn)
    }

    fn grounding_config(root: &Path) -> GroundingDataConfig {
        let yaml = "train_file: ['finetune/refcoco+_train.json']\n\
                    test_file: ['finetune/refcoco+_val.json', 'finetune/refcoco+_test.json']\n\
                    refcoco_data: 'finetune'\n\
                    det_file: 'finetune/refcoco+/dets.json'\n\
                    image_root: '.'\n\
                    image_res: 64\n";
        let value: serde_yaml::Value = serde_yaml::from_str(yaml).expect("yaml");
        GroundingDataConfig::from_yaml(&value, &Resolver::Base(root)).expect("grounding config")
    }

    /// Loads each expression file with `load_split` and checks every entry against REFER and the drawn
    /// shapes: the split its file implies, the shape's box, an expression that names that shape alone.
    fn check_expressions(
        cfg: &GroundingDataConfig,
        refer: &Refer,
        drawn: &[Drawn],
    ) -> HashMap<i64, Vec<String>> {
        let mut texts: HashMap<i64, Vec<String>> = HashMap::new();
        let files: Vec<(String, usize)> = cfg
            .train_file
            .iter()
            .map(|f| (f.clone(), 0))
            .chain(cfg.test_file.iter().cloned().zip([1, 2]))
            .collect();
        for (file, split) in files {
            let entries: Vec<GroundingEntry> =
                load_split(cfg, std::slice::from_ref(&file)).expect("load_split");
            assert!(!entries.is_empty(), "{file} is empty");
            for e in entries {
                let r = refer.get(e.ref_id).expect("ref_id in refs(unc).p");
                let (i, j) = (e.ref_id as usize / 2, e.ref_id as usize % 2);
                let d = &drawn[i];
                assert_eq!(d.split, split, "{file}: ref {}", e.ref_id);
                let want = match (split, j) {
                    (0, _) => "train",
                    (1, _) => "val",
                    (_, 0) => "testA",
                    _ => "testB",
                };
                assert_eq!(r.split, want, "ref {}", e.ref_id);
                assert_eq!(r.image_id, i as i64);
                assert_eq!(r.bbox, xywh(&d.shapes[j]), "ref {}", e.ref_id);
                assert!(e.image.location.ends_with(&d.name), "{}", e.image.location);
                assert_eq!(referents(&e.text, d), [j], "{}", e.text);
                texts.entry(e.ref_id).or_default().push(e.text);
            }
        }
        texts
    }

    /// The refs pickle holds exactly the expressions of the json files, with consistent sentence ids.
    fn check_sentences(refs_file: &str, texts: &HashMap<i64, Vec<String>>) {
        let bytes = std::fs::read(refs_file).expect("read refs");
        let records = read_plain_pickle(&bytes).expect("refs pickle");
        let records = records.as_array().expect("a list");
        assert_eq!(records.len(), texts.len());
        for rec in records {
            let ref_id = rec["ref_id"].as_i64().expect("ref_id");
            let raws: Vec<String> = rec["sentences"]
                .as_array()
                .expect("sentences")
                .iter()
                .map(|s| s["raw"].as_str().expect("raw").to_string())
                .collect();
            assert_eq!(Some(&raws), texts.get(&ref_id), "ref {ref_id}");
            let ids: Vec<&Value> = rec["sentences"]
                .as_array()
                .expect("sentences")
                .iter()
                .map(|s| &s["sent_id"])
                .collect();
            assert_eq!(
                ids,
                rec["sent_ids"]
                    .as_array()
                    .expect("sent_ids")
                    .iter()
                    .collect::<Vec<_>>()
            );
        }
    }

    /// Every held-out image has its two shape boxes and two distractors.
    fn check_dets(file: &str, drawn: &[Drawn]) {
        let dets = Detections::load(file).expect("dets.json");
        for (i, d) in drawn.iter().enumerate() {
            let boxes = dets
                .get(i as i64)
                .unwrap_or_else(|| panic!("no dets for {i}"));
            assert_eq!(boxes.len(), 4, "image {i}");
            let hits = |t: [f64; 4]| {
                boxes
                    .iter()
                    .filter(|b| inclusive_iou(t, **b) >= 0.5)
                    .count()
            };
            for s in &d.shapes {
                assert_eq!(hits(xywh(s)), 1, "image {i}: {boxes:?} vs {s:?}");
            }
            let near_any = boxes
                .iter()
                .filter(|b| d.shapes.iter().any(|s| inclusive_iou(xywh(s), **b) >= 0.5))
                .count();
            assert_eq!(near_any, 2, "image {i}: {boxes:?}");
        }
    }

    /// A generated corpus loads with the RefCOCO+ readers and agrees with the drawn shapes.
    #[test]
    fn generated_split_loads_with_the_official_readers() {
        let (dir, synth, drawn) = corpus();
        let cfg = grounding_config(dir.path());
        let refer = cfg.refer().expect("Refer::load");
        assert_eq!(refer.refs.len(), 2 * synth.images);
        for split in ["train", "val", "testA", "testB"] {
            assert!(
                refer.refs.values().any(|r| r.split == split),
                "no {split} refs"
            );
        }
        for i in 0..synth.images as i64 {
            let size = (synth.width as f64, synth.height as f64);
            assert_eq!(refer.image_sizes.get(&i), Some(&size), "image {i}");
        }
        let texts = check_expressions(&cfg, &refer, &drawn);
        assert_eq!(texts.len(), refer.refs.len());
        check_sentences(&refer.refs_file, &texts);
        let det_file = cfg.det_file.clone().expect("det_file");
        check_dets(&det_file, &drawn);
        let cocos: PathBuf = dir.path().join("finetune/refcoco+/cocos.json");
        let cocos: Value =
            serde_json::from_slice(&std::fs::read(cocos).expect("cocos")).expect("json");
        assert_eq!(cocos.as_object().map(Map::len), Some(synth.images));
    }
}
