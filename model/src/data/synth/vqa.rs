//! Synthetic VQA questions in the official X-VLM layouts: `vqa_train.json` (`{question_id, image,
//! question, answer: [10 annotator answers], dataset: 'vqa'}`), `vqa_val.json` (the test layout plus
//! its annotators' answers, the ground truth of the validation split), `vqa_test.json` (`{question_id,
//! image, question}`, no answers, as the official test-dev file) and `answer_list.json` (every colour
//! and shape name).
//!
//! The questions are fixed by the picture and use only the demo vocabulary: "what is on the left?"
//! (the shape kind), "what colour is on the right?" (the colour), and "what colour is the circle?"
//! for a kind the image holds once. Each question has ten annotator answers, as VQA v2 does; one
//! question in four has one of them replaced by another answer of the same type, so answer weights
//! are 0.9 / 0.1 there and the challenge accuracy differs from exact match.

use std::path::Path;

use rand::Rng;
use rand_chacha::ChaCha8Rng;
use serde_json::json;

use super::{write_file, Drawn, COLOURS, SHAPES};
use crate::data::rng::{rng_for, Purpose};
use crate::data::DataError;

/// Seeds the noisy-annotator draws apart from the images and the NLVR2 statements.
const VQA_STREAM: u64 = 0x5651_4100;
/// Annotator answers per question (VQA v2 collects ten).
const ANNOTATORS: usize = 10;
/// One question in this many gets one noisy annotator answer.
const NOISY_EVERY: u32 = 4;
/// Question ids are `image index x ID_STRIDE + question number` (at most 7 questions per image).
const ID_STRIDE: usize = 10;

/// What a question asks about, so a noisy answer is drawn from the same kind of answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Asks {
    Colour,
    Shape,
}

/// The questions an image answers: (question, answer, what it asks).
fn questions(d: &Drawn) -> Vec<(String, &'static str, Asks)> {
    let mut out = Vec::new();
    for (shape, side) in d.shapes.iter().zip(["left", "right"]) {
        out.push((
            format!("what is on the {side}?"),
            SHAPES[shape.kind],
            Asks::Shape,
        ));
        out.push((
            format!("what colour is on the {side}?"),
            COLOURS[shape.colour].0,
            Asks::Colour,
        ));
    }
    // A kind held once names one shape; held twice the question would be ambiguous.
    for shape in &d.shapes {
        if d.shapes.iter().filter(|s| s.kind == shape.kind).count() == 1 {
            out.push((
                format!("what colour is the {}?", SHAPES[shape.kind]),
                COLOURS[shape.colour].0,
                Asks::Colour,
            ));
        }
    }
    out
}

/// Ten annotator answers for `truth`, one of them another answer of its type one time in four.
fn annotators(rng: &mut ChaCha8Rng, truth: &str, asks: Asks) -> Vec<String> {
    let mut answers = vec![truth.to_string(); ANNOTATORS];
    if rng.random_ratio(1, NOISY_EVERY) {
        let pool: Vec<&str> = match asks {
            Asks::Colour => COLOURS.iter().map(|c| c.0).collect(),
            Asks::Shape => SHAPES.to_vec(),
        };
        let others: Vec<&str> = pool.into_iter().filter(|a| *a != truth).collect();
        let slot = rng.random_range(0..ANNOTATORS);
        answers[slot] = others[rng.random_range(0..others.len())].to_string();
    }
    answers
}

/// Writes `vqa_train.json`, `vqa_val.json`, `vqa_test.json` and `answer_list.json` under `dir`.
pub(super) fn write(dir: &Path, seed: u64, drawn: &[Drawn]) -> Result<(), DataError> {
    for (split, file) in [
        (0, "vqa_train.json"),
        (1, "vqa_val.json"),
        (2, "vqa_test.json"),
    ] {
        let mut rng = rng_for(seed, Purpose::Synth, &[VQA_STREAM, split as u64]);
        let mut items = Vec::new();
        for (i, d) in drawn.iter().enumerate().filter(|(_, d)| d.split == split) {
            for (k, (question, truth, asks)) in questions(d).into_iter().enumerate() {
                let question_id = i * ID_STRIDE + k;
                // Drawn for every split, so a split's noise does not depend on its layout.
                let answers = annotators(&mut rng, truth, asks);
                let item = match split {
                    0 => json!({
                        "question_id": question_id,
                        "image": d.name,
                        "question": question,
                        "answer": answers,
                        "dataset": "vqa",
                    }),
                    1 => json!({
                        "question_id": question_id,
                        "image": d.name,
                        "question": question,
                        "answer": answers,
                    }),
                    _ => json!({
                        "question_id": question_id,
                        "image": d.name,
                        "question": question,
                    }),
                };
                items.push(item);
            }
        }
        write_file(
            &dir.join(file),
            serde_json::Value::from(items).to_string().as_bytes(),
        )?;
    }
    let answers: Vec<&str> = COLOURS.iter().map(|c| c.0).chain(SHAPES).collect();
    write_file(
        &dir.join("answer_list.json"),
        serde_json::Value::from(answers).to_string().as_bytes(),
    )
}

#[cfg(test)]
mod tests {
    use super::super::Shape;
    use super::*;

    fn drawn(kinds: [usize; 2]) -> Drawn {
        Drawn {
            name: "images/000000.jpg".into(),
            split: 0,
            shapes: vec![
                Shape {
                    colour: 0,
                    kind: kinds[0],
                    bb: [0, 0, 4, 4],
                },
                Shape {
                    colour: 2,
                    kind: kinds[1],
                    bb: [8, 0, 4, 4],
                },
            ],
        }
    }

    /// Side questions always; a "what colour is the <kind>?" only for a kind held once.
    #[test]
    fn questions_are_fixed_by_the_picture() {
        let q = questions(&drawn([0, 1]));
        let asked: Vec<(&str, &str)> = q.iter().map(|(q, a, _)| (q.as_str(), *a)).collect();
        assert_eq!(
            asked,
            [
                ("what is on the left?", "circle"),
                ("what colour is on the left?", "red"),
                ("what is on the right?", "square"),
                ("what colour is on the right?", "blue"),
                ("what colour is the circle?", "red"),
                ("what colour is the square?", "blue"),
            ]
        );
        assert_eq!(questions(&drawn([2, 2])).len(), 4);
    }

    /// Ten answers, at most one of them another answer of the same type.
    #[test]
    fn annotators_agree_but_for_at_most_one() {
        let mut rng = rng_for(0, Purpose::Synth, &[VQA_STREAM]);
        let mut noisy = 0;
        for _ in 0..200 {
            let a = annotators(&mut rng, "red", Asks::Colour);
            assert_eq!(a.len(), ANNOTATORS);
            let odd: Vec<&String> = a.iter().filter(|x| *x != "red").collect();
            assert!(odd.len() <= 1);
            if let Some(o) = odd.first() {
                assert!(COLOURS.iter().any(|c| c.0 == o.as_str()));
                noisy += 1;
            }
        }
        assert!((20..80).contains(&noisy), "{noisy} noisy of 200");
    }
}
