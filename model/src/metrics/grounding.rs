//! RefCOCO+ grounding accuracy per split (dataset/utils.py `grounding_eval`): an expression is correct
//! when the inclusive-pixel IoU of its predicted box with the ground truth is at least 0.5, and each of
//! `val_d` / `testA_d` / `testB_d` is the fraction of correct expressions of that split.

use crate::xvlm::ModelError;

/// The IoU at or above which a prediction counts as correct.
pub const IOU_THRESHOLD: f64 = 0.5;

/// A RefCOCO+ split (`refer.Refs[ref_id]['split']`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroundingSplit {
    /// `val`.
    Val,
    /// `testA`.
    TestA,
    /// `testB`.
    TestB,
}

impl GroundingSplit {
    /// From the split's name in the RefCOCO+ refs.
    pub fn from_name(name: &str) -> Result<Self, ModelError> {
        match name {
            "val" => Ok(GroundingSplit::Val),
            "testA" => Ok(GroundingSplit::TestA),
            "testB" => Ok(GroundingSplit::TestB),
            other => Err(ModelError::Input(format!(
                "unknown grounding split {other:?} (val, testA, testB)"
            ))),
        }
    }

    /// From the fixtures' integer code: 0 val, 1 testA, 2 testB.
    pub fn from_code(code: i64) -> Result<Self, ModelError> {
        match code {
            0 => Ok(GroundingSplit::Val),
            1 => Ok(GroundingSplit::TestA),
            2 => Ok(GroundingSplit::TestB),
            other => Err(ModelError::Input(format!(
                "unknown grounding split code {other} (0 val, 1 testA, 2 testB)"
            ))),
        }
    }

    /// The metric key of the split (`val_d`, `testA_d`, `testB_d`).
    pub fn metric_name(self) -> &'static str {
        match self {
            GroundingSplit::Val => "val_d",
            GroundingSplit::TestA => "testA_d",
            GroundingSplit::TestB => "testB_d",
        }
    }
}

/// Accuracy (a fraction, not a percentage) per split.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GroundingAccuracy {
    /// `val_d`.
    pub val_d: f64,
    /// `testA_d`.
    pub test_a_d: f64,
    /// `testB_d`.
    pub test_b_d: f64,
}

impl GroundingAccuracy {
    /// `(metric name, value)` in the official dict order.
    pub fn as_pairs(&self) -> [(&'static str, f64); 3] {
        [
            (GroundingSplit::Val.metric_name(), self.val_d),
            (GroundingSplit::TestA.metric_name(), self.test_a_d),
            (GroundingSplit::TestB.metric_name(), self.test_b_d),
        ]
    }
}

/// Whether an IoU counts as a correct grounding.
pub fn is_correct(iou: f64) -> bool {
    iou >= IOU_THRESHOLD
}

/// Accuracy per split from `(split, iou)` per expression; every split must have an expression (the
/// official code divides by each count).
pub fn grounding_accuracy(
    outcomes: impl IntoIterator<Item = (GroundingSplit, f64)>,
) -> Result<GroundingAccuracy, ModelError> {
    // (correct, count) for val, testA, testB.
    let mut tally = [(0usize, 0usize); 3];
    for (split, iou) in outcomes {
        let slot = &mut tally[split as usize];
        slot.0 += usize::from(is_correct(iou));
        slot.1 += 1;
    }
    let fraction = |split: GroundingSplit| {
        let (correct, count) = tally[split as usize];
        if count == 0 {
            return Err(ModelError::Input(format!(
                "no expression of split {} to compute {} over",
                split.metric_name().trim_end_matches("_d"),
                split.metric_name()
            )));
        }
        Ok(correct as f64 / count as f64)
    };
    Ok(GroundingAccuracy {
        val_d: fraction(GroundingSplit::Val)?,
        test_a_d: fraction(GroundingSplit::TestA)?,
        test_b_d: fraction(GroundingSplit::TestB)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// IoU exactly 0.5 counts; the fractions are per split.
    #[test]
    fn accuracy_per_split() {
        use GroundingSplit::*;
        let acc = grounding_accuracy([
            (Val, 0.5),
            (Val, 0.49),
            (TestA, 0.9),
            (TestB, 0.1),
            (TestB, 0.2),
            (TestB, 0.7),
        ])
        .unwrap();
        assert_eq!(acc.val_d, 0.5);
        assert_eq!(acc.test_a_d, 1.0);
        assert_eq!(acc.test_b_d, 1.0 / 3.0);
    }

    /// An empty split is an error naming it, as the official division by zero is.
    #[test]
    fn empty_split_is_an_error() {
        let err = grounding_accuracy([(GroundingSplit::Val, 1.0), (GroundingSplit::TestA, 1.0)])
            .unwrap_err()
            .to_string();
        assert!(err.contains("testB"), "{err}");
    }
}
