//! Helpers shared by the worker's integration tests.

use tch::Tensor;

/// Largest absolute difference between two named tensor lists (same names in the same order).
pub fn max_diff(a: &[(String, Tensor)], b: &[(String, Tensor)]) -> f64 {
    assert_eq!(a.len(), b.len(), "different numbers of tensors");
    a.iter()
        .zip(b)
        .map(|((na, ta), (nb, tb))| {
            assert_eq!(na, nb);
            (ta - tb).abs().max().double_value(&[])
        })
        .fold(0.0, f64::max)
}
