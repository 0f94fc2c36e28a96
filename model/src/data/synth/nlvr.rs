//! Synthetic NLVR2 statements (the official `nlvr_{train,dev,test}.json` layout: `{images: [left,
//! right], sentence, label: 'True' | 'False'}`) about pairs of images of one split, fixed by what the
//! pictures hold: "the left image has a red circle and the right image has none".
//!
//! Labels alternate, so every split is balanced. A False statement names either a shape that neither
//! image holds or one that only the other image holds (half each): a model that only detects the shape
//! in either image is right on three statements of four, binding the shape to its side gets the rest.

use std::path::Path;

use rand::Rng;
use rand_chacha::ChaCha8Rng;
use serde_json::json;

use super::{write_file, Drawn, Shape, COLOURS, SHAPES};
use crate::data::rng::{rng_for, Purpose};
use crate::data::DataError;

/// Seeds the statement draws apart from the per-image draws (which take one coordinate).
const NLVR_STREAM: u64 = 0x4e4c_5652;
/// Statements per training image.
const TRAIN_PER_IMAGE: usize = 4;
/// Statements of a held-out split (val and test).
const HELD_OUT: usize = 300;
/// Draws before a pair that fits a statement is given up on.
const ATTEMPTS: usize = 1000;

/// Writes `nlvr_train.json`, `nlvr_dev.json` and `nlvr_test.json` under `dir` (an empty list for a
/// split of fewer than two images).
pub(super) fn write(dir: &Path, seed: u64, drawn: &[Drawn]) -> Result<(), DataError> {
    for (split, file) in [
        (0, "nlvr_train.json"),
        (1, "nlvr_dev.json"),
        (2, "nlvr_test.json"),
    ] {
        let images: Vec<&Drawn> = drawn.iter().filter(|d| d.split == split).collect();
        // A split of one image has no pairs (a corpus of a dozen images has one-image held-out splits).
        let count = if images.len() < 2 {
            0
        } else if split == 0 {
            TRAIN_PER_IMAGE * images.len()
        } else {
            HELD_OUT
        };
        let mut rng = rng_for(seed, Purpose::Synth, &[NLVR_STREAM, split as u64]);
        let items = (0..count)
            .map(|k| statement(&mut rng, &images, k % 2 == 0))
            .collect::<Result<Vec<_>, _>>()?;
        write_file(
            &dir.join(file),
            serde_json::Value::from(items).to_string().as_bytes(),
        )?;
    }
    Ok(())
}

/// One statement with the label `truth`.
fn statement(
    rng: &mut ChaCha8Rng,
    images: &[&Drawn],
    truth: bool,
) -> Result<serde_json::Value, DataError> {
    let pick = |rng: &mut ChaCha8Rng| images[rng.random_range(0..images.len())];
    let shape_of = |rng: &mut ChaCha8Rng, d: &Drawn| -> (usize, usize) {
        let s: &Shape = &d.shapes[rng.random_range(0..d.shapes.len())];
        (s.colour, s.kind)
    };
    for _ in 0..ATTEMPTS {
        // `named` is the image the sentence says has the shape, `other` the one it says has none.
        let (named, other) = (pick(rng), pick(rng));
        if std::ptr::eq(named, other) {
            continue;
        }
        let (colour, kind) = if truth {
            shape_of(rng, named)
        } else if rng.random_bool(0.5) {
            (
                rng.random_range(0..COLOURS.len()),
                rng.random_range(0..SHAPES.len()),
            )
        } else {
            shape_of(rng, other)
        };
        let holds = named.has(colour, kind) && !other.has(colour, kind);
        if holds != truth || (!truth && named.has(colour, kind)) {
            continue;
        }
        let left_named = rng.random_bool(0.5);
        let (first, second) = if left_named {
            ("left", "right")
        } else {
            ("right", "left")
        };
        let [left, right] = if left_named {
            [named, other]
        } else {
            [other, named]
        };
        return Ok(json!({
            "images": [left.name, right.name],
            "sentence": format!(
                "the {first} image has a {} {} and the {second} image has none",
                COLOURS[colour].0, SHAPES[kind]
            ),
            "label": if truth { "True" } else { "False" },
        }));
    }
    Err(DataError::Config(format!(
        "synth-data: no image pair of {} images fits an NLVR2 statement",
        images.len()
    )))
}
