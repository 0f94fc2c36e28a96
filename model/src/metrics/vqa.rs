//! VQA accuracy: X-VLM's exact match (`calculate_acc`, used when the test split has ground truth, as in
//! VLUE) and the official VQA-challenge accuracy (`vqaEval.py` of the VQA API: answer normalisation,
//! then the mean over the leave-one-annotator-out subsets of `min(#matches / 3, 1)`).
//!
//! The normalisation keeps the official script's behaviour, quirks included, because the challenge
//! numbers are only comparable if it does:
//! - answers are normalised only when the annotators disagree (`len(set(gtAnswers)) > 1`); then the
//!   annotator answers get the punctuation pass only, the prediction punctuation and digits/articles;
//! - the period regex `(?!<=\d)(\.)(?!\d)` is a typo for a look-behind, so it removes every period
//!   not followed by a digit ("3.5" keeps its period, "end." loses it), and `sub(.., re.UNICODE)`
//!   passes the flag as `count`, so at most 32 periods go;
//! - the contraction keys with capitals ("Im", "Ive") never match, since words are lowercased first.

use std::collections::{BTreeMap, HashMap};

/// Punctuation the official script removes or turns into a space.
const PUNCT: [char; 21] = [
    ';', '/', '[', ']', '"', '{', '}', '(', ')', '=', '+', '\\', '_', '-', '>', '<', '@', '`', ',',
    '?', '!',
];

/// `re.sub(periodStrip, "", text, re.UNICODE)`: `re.UNICODE` (32) lands in `count`.
const PERIOD_STRIP_COUNT: usize = 32;

/// Articles dropped by `processDigitArticle`.
const ARTICLES: [&str; 3] = ["a", "an", "the"];

/// `manualMap`: number words to digits.
const NUMBERS: [(&str, &str); 12] = [
    ("none", "0"),
    ("zero", "0"),
    ("one", "1"),
    ("two", "2"),
    ("three", "3"),
    ("four", "4"),
    ("five", "5"),
    ("six", "6"),
    ("seven", "7"),
    ("eight", "8"),
    ("nine", "9"),
    ("ten", "10"),
];

/// The official `contractions` map (including its own oddities, e.g. "somebody'd" -> "somebodyd").
const CONTRACTIONS: [(&str, &str); 120] = [
    ("aint", "ain't"),
    ("arent", "aren't"),
    ("cant", "can't"),
    ("couldve", "could've"),
    ("couldnt", "couldn't"),
    ("couldn'tve", "couldn't've"),
    ("couldnt've", "couldn't've"),
    ("didnt", "didn't"),
    ("doesnt", "doesn't"),
    ("dont", "don't"),
    ("hadnt", "hadn't"),
    ("hadnt've", "hadn't've"),
    ("hadn'tve", "hadn't've"),
    ("hasnt", "hasn't"),
    ("havent", "haven't"),
    ("hed", "he'd"),
    ("hed've", "he'd've"),
    ("he'dve", "he'd've"),
    ("hes", "he's"),
    ("howd", "how'd"),
    ("howll", "how'll"),
    ("hows", "how's"),
    ("Id've", "I'd've"),
    ("I'dve", "I'd've"),
    ("Im", "I'm"),
    ("Ive", "I've"),
    ("isnt", "isn't"),
    ("itd", "it'd"),
    ("itd've", "it'd've"),
    ("it'dve", "it'd've"),
    ("itll", "it'll"),
    ("let's", "let's"),
    ("maam", "ma'am"),
    ("mightnt", "mightn't"),
    ("mightnt've", "mightn't've"),
    ("mightn'tve", "mightn't've"),
    ("mightve", "might've"),
    ("mustnt", "mustn't"),
    ("mustve", "must've"),
    ("neednt", "needn't"),
    ("notve", "not've"),
    ("oclock", "o'clock"),
    ("oughtnt", "oughtn't"),
    ("ow's'at", "'ow's'at"),
    ("'ows'at", "'ow's'at"),
    ("'ow'sat", "'ow's'at"),
    ("shant", "shan't"),
    ("shed've", "she'd've"),
    ("she'dve", "she'd've"),
    ("she's", "she's"),
    ("shouldve", "should've"),
    ("shouldnt", "shouldn't"),
    ("shouldnt've", "shouldn't've"),
    ("shouldn'tve", "shouldn't've"),
    ("somebody'd", "somebodyd"),
    ("somebodyd've", "somebody'd've"),
    ("somebody'dve", "somebody'd've"),
    ("somebodyll", "somebody'll"),
    ("somebodys", "somebody's"),
    ("someoned", "someone'd"),
    ("someoned've", "someone'd've"),
    ("someone'dve", "someone'd've"),
    ("someonell", "someone'll"),
    ("someones", "someone's"),
    ("somethingd", "something'd"),
    ("somethingd've", "something'd've"),
    ("something'dve", "something'd've"),
    ("somethingll", "something'll"),
    ("thats", "that's"),
    ("thered", "there'd"),
    ("thered've", "there'd've"),
    ("there'dve", "there'd've"),
    ("therere", "there're"),
    ("theres", "there's"),
    ("theyd", "they'd"),
    ("theyd've", "they'd've"),
    ("they'dve", "they'd've"),
    ("theyll", "they'll"),
    ("theyre", "they're"),
    ("theyve", "they've"),
    ("twas", "'twas"),
    ("wasnt", "wasn't"),
    ("wed've", "we'd've"),
    ("we'dve", "we'd've"),
    ("weve", "we've"),
    ("werent", "weren't"),
    ("whatll", "what'll"),
    ("whatre", "what're"),
    ("whats", "what's"),
    ("whatve", "what've"),
    ("whens", "when's"),
    ("whered", "where'd"),
    ("wheres", "where's"),
    ("whereve", "where've"),
    ("whod", "who'd"),
    ("whod've", "who'd've"),
    ("who'dve", "who'd've"),
    ("wholl", "who'll"),
    ("whos", "who's"),
    ("whove", "who've"),
    ("whyll", "why'll"),
    ("whyre", "why're"),
    ("whys", "why's"),
    ("wont", "won't"),
    ("wouldve", "would've"),
    ("wouldnt", "wouldn't"),
    ("wouldnt've", "wouldn't've"),
    ("wouldn'tve", "wouldn't've"),
    ("yall", "y'all"),
    ("yall'll", "y'all'll"),
    ("y'allll", "y'all'll"),
    ("yall'd've", "y'all'd've"),
    ("y'alld've", "y'all'd've"),
    ("y'all'dve", "y'all'd've"),
    ("youd", "you'd"),
    ("youd've", "you'd've"),
    ("you'dve", "you'd've"),
    ("youll", "you'll"),
    ("youre", "you're"),
    ("youve", "you've"),
];

/// `processPunctuation`: each mark is deleted when it touches a space (or the text has a digit-comma-digit
/// run), else replaced by a space; then periods not followed by a digit go (at most 32, see the module
/// doc).
pub fn process_punctuation(text: &str) -> String {
    let comma_between_digits = text
        .as_bytes()
        .windows(3)
        .any(|w| w[0].is_ascii_digit() && w[1] == b',' && w[2].is_ascii_digit());
    let mut out = text.to_string();
    for p in PUNCT {
        // The official test looks at the input text, not the partly processed one.
        let touches_space = text.contains(&format!("{p} ")) || text.contains(&format!(" {p}"));
        let with = if touches_space || comma_between_digits {
            ""
        } else {
            " "
        };
        out = out.replace(p, with);
    }
    strip_periods(&out)
}

/// `periodStrip.sub("", text, 32)`: a period not followed by a digit is removed, at most 32 times.
fn strip_periods(text: &str) -> String {
    let chars: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    let mut removed = 0;
    for (i, &c) in chars.iter().enumerate() {
        let followed_by_digit = chars.get(i + 1).is_some_and(|n| n.is_ascii_digit());
        if c == '.' && !followed_by_digit && removed < PERIOD_STRIP_COUNT {
            removed += 1;
            continue;
        }
        out.push(c);
    }
    out
}

/// `processDigitArticle`: lowercase words, number words to digits, articles dropped, contractions
/// restored, joined by single spaces.
pub fn process_digit_article(text: &str) -> String {
    let numbers: HashMap<&str, &str> = NUMBERS.into_iter().collect();
    let contractions: HashMap<&str, &str> = CONTRACTIONS.into_iter().collect();
    let lower = text.to_lowercase();
    let words: Vec<&str> = lower
        .split_whitespace()
        .map(|w| numbers.get(w).copied().unwrap_or(w))
        .filter(|w| !ARTICLES.contains(w))
        .map(|w| contractions.get(w).copied().unwrap_or(w))
        .collect();
    words.join(" ")
}

/// The full normalisation of a predicted answer (punctuation, then digits and articles).
pub fn normalize_answer(text: &str) -> String {
    process_digit_article(&process_punctuation(text))
}

/// `ans.replace('\n', ' ').replace('\t', ' ').strip()`, applied to every answer first.
fn clean(text: &str) -> String {
    text.replace(['\n', '\t'], " ").trim().to_string()
}

/// The VQA-challenge accuracy of one prediction against its annotators' answers (usually 10): the
/// mean over the leave-one-annotator-out subsets of `min(#matching answers / 3, 1)`. 0 without
/// annotators.
pub fn challenge_accuracy(prediction: &str, annotators: &[String]) -> f64 {
    if annotators.is_empty() {
        return 0.0;
    }
    let mut gts: Vec<String> = annotators.iter().map(|a| clean(a)).collect();
    let mut pred = clean(prediction);
    let mut distinct = gts.clone();
    distinct.sort();
    distinct.dedup();
    if distinct.len() > 1 {
        for g in gts.iter_mut() {
            *g = process_punctuation(g);
        }
        pred = normalize_answer(&pred);
    }
    let total: f64 = (0..gts.len())
        .map(|left_out| {
            let matching = gts
                .iter()
                .enumerate()
                .filter(|&(j, g)| j != left_out && *g == pred)
                .count();
            (matching as f64 / 3.0).min(1.0)
        })
        .sum();
    total / gts.len() as f64
}

/// The ground-truth answer exact match compares with: the most frequent annotator answer (VQA's
/// `multiple_choice_answer`), the first one seen among equally frequent ones.
pub fn majority_answer(annotators: &[String]) -> Option<&str> {
    let mut counts: Vec<(&str, usize)> = Vec::new();
    for a in annotators {
        match counts.iter_mut().find(|(s, _)| *s == a.as_str()) {
            Some((_, n)) => *n += 1,
            None => counts.push((a.as_str(), 1)),
        }
    }
    // `max_by_key` keeps the last maximum; reversing keeps the first seen.
    counts
        .into_iter()
        .rev()
        .max_by_key(|&(_, n)| n)
        .map(|(s, _)| s)
}

/// Both accuracies over a split, as fractions of the questions scored.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct VqaAccuracy {
    /// `calculate_acc`: the share of questions whose answer equals the ground truth exactly.
    pub exact: f64,
    /// The official VQA-challenge accuracy (mean per-question accuracy).
    pub challenge: f64,
    /// Questions scored.
    pub questions: usize,
}

/// A question id with no ground truth.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("question_id {0} has a prediction but no ground-truth answers")]
pub struct MissingGroundTruth(pub i64);

/// Scores `predictions` (question id, answer) against `ground_truth` (question id -> annotator
/// answers); every predicted question must have ground truth.
pub fn vqa_accuracy(
    predictions: &[(i64, String)],
    ground_truth: &BTreeMap<i64, Vec<String>>,
) -> Result<VqaAccuracy, MissingGroundTruth> {
    let (mut exact, mut challenge) = (0usize, 0.0f64);
    for (qid, answer) in predictions {
        let gts = ground_truth.get(qid).ok_or(MissingGroundTruth(*qid))?;
        if majority_answer(gts) == Some(answer.as_str()) {
            exact += 1;
        }
        challenge += challenge_accuracy(answer, gts);
    }
    let n = predictions.len();
    let share = |x: f64| if n == 0 { 0.0 } else { x / n as f64 };
    Ok(VqaAccuracy {
        exact: share(exact as f64),
        challenge: share(challenge),
        questions: n,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answers(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    /// 3 of 10 annotators agree: 7 subsets keep 3 matches (1.0), 3 keep 2 (2/3): (7 + 2) / 10 = 0.9.
    #[test]
    fn three_of_ten_is_point_nine() {
        let gts = answers(&[
            "red", "red", "red", "blue", "blue", "blue", "blue", "blue", "blue", "blue",
        ]);
        assert!((challenge_accuracy("red", &gts) - 0.9).abs() < 1e-12);
    }

    /// All agree: 1.0; one of ten: every subset without it gives 1/3 (9 of them), with it 0: 0.3;
    /// two of ten: 8 subsets 2/3, 2 subsets 1/3: (16/3 + 2/3) / 10 = 0.6; four or more: 1.0.
    #[test]
    fn leave_one_out_counts() {
        let ten = |k: usize| {
            let mut v = vec!["yes".to_string(); k];
            v.extend(vec!["no".to_string(); 10 - k]);
            v
        };
        assert!((challenge_accuracy("yes", &ten(10)) - 1.0).abs() < 1e-12);
        assert!((challenge_accuracy("yes", &ten(1)) - 0.3).abs() < 1e-12);
        assert!((challenge_accuracy("yes", &ten(2)) - 0.6).abs() < 1e-12);
        assert!((challenge_accuracy("yes", &ten(4)) - 1.0).abs() < 1e-12);
        assert_eq!(challenge_accuracy("maybe", &ten(4)), 0.0);
        assert_eq!(challenge_accuracy("yes", &[]), 0.0);
    }

    /// The prediction is normalised when the annotators disagree: articles, number words, case,
    /// punctuation and contractions.
    #[test]
    fn normalisation_when_annotators_disagree() {
        let gts = answers(&["2", "2", "2", "2", "two dogs", "2", "2", "2", "2", "2"]);
        assert!((challenge_accuracy("Two", &gts) - 1.0).abs() < 1e-12);
        assert!((challenge_accuracy("the two.", &gts) - 1.0).abs() < 1e-12);
        assert_eq!(normalize_answer("A Red  Circle!"), "red circle");
        assert_eq!(normalize_answer("dont"), "don't");
        assert_eq!(normalize_answer("3.5"), "3.5");
        assert_eq!(normalize_answer("end."), "end");
        assert_eq!(process_punctuation("black/white"), "black white");
        assert_eq!(process_punctuation("black / white"), "black  white");
        assert_eq!(process_punctuation("1,000"), "1000");
    }

    /// As the official script, nothing is normalised when every annotator gave the same answer.
    #[test]
    fn no_normalisation_when_annotators_agree() {
        let gts = answers(&["2"; 10]);
        assert_eq!(challenge_accuracy("two", &gts), 0.0);
        assert!((challenge_accuracy(" 2\n", &gts) - 1.0).abs() < 1e-12);
    }

    /// Exact match against the majority answer; the challenge accuracy beside it.
    #[test]
    fn split_accuracy() {
        let mut gt = BTreeMap::new();
        gt.insert(1, answers(&["red"; 10]));
        gt.insert(
            2,
            answers(&[
                "circle", "circle", "circle", "square", "square", "square", "square", "square",
                "square", "square",
            ]),
        );
        let preds = vec![(1, "red".to_string()), (2, "circle".to_string())];
        let acc = vqa_accuracy(&preds, &gt).unwrap();
        assert_eq!(acc.questions, 2);
        assert!((acc.exact - 0.5).abs() < 1e-12);
        assert!((acc.challenge - 0.95).abs() < 1e-12);
        assert_eq!(majority_answer(&answers(&["a", "b", "b", "a"])), Some("a"));
        assert_eq!(
            vqa_accuracy(&[(3, "red".into())], &gt),
            Err(MissingGroundTruth(3))
        );
    }
}
