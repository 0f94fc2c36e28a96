//! Runs a parity case folder against its expected tensors (`xvlm parity`).
//!
//! A case folder holds `case.yaml` (kind and tolerances), inputs and `expected.safetensors`; every expected
//! tensor must be computed and compared, and an unknown kind is an error.

use tch::{Kind, Tensor};

/// Per-tensor tolerance: `max|got - expected| <= rtol * max|expected| + atol`.
#[derive(Debug, Clone, Copy, serde::Deserialize)]
pub struct Tolerance {
    /// Relative part, scaled by the largest expected magnitude.
    pub rtol: f64,
    /// Absolute floor.
    pub atol: f64,
}

/// The outcome for one named tensor.
#[derive(Debug, Clone)]
pub struct Comparison {
    /// Tensor name as in `expected.safetensors`.
    pub name: String,
    /// max |got - expected|.
    pub max_abs: f64,
    /// max_abs / max |expected|.
    pub max_rel: f64,
    /// Whether it is within tolerance (and shapes agree).
    pub passed: bool,
    /// Why it failed when it is not a numeric miss (shape mismatch, not computed).
    pub note: Option<String>,
}

impl std::fmt::Display for Comparison {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:<60} max_abs {:.3e} max_rel {:.3e} {}",
            self.name,
            self.max_abs,
            self.max_rel,
            if self.passed { "PASS" } else { "FAIL" }
        )?;
        if let Some(note) = &self.note {
            write!(f, " ({note})")?;
        }
        Ok(())
    }
}

/// Compares `got` with `expected` under `tol` (integer tensors must match exactly).
pub fn compare(name: &str, got: &Tensor, expected: &Tensor, tol: Tolerance) -> Comparison {
    if got.size() != expected.size() {
        return Comparison {
            name: name.to_string(),
            max_abs: f64::INFINITY,
            max_rel: f64::INFINITY,
            passed: false,
            note: Some(format!(
                "shape {:?} != expected {:?}",
                got.size(),
                expected.size()
            )),
        };
    }
    let exact = !expected.is_floating_point();
    let g = got.to_kind(Kind::Double);
    let e = expected.to_kind(Kind::Double);
    let (max_abs, scale) = if e.numel() == 0 {
        (0.0, 0.0)
    } else {
        (
            (&g - &e).abs().max().double_value(&[]),
            e.abs().max().double_value(&[]),
        )
    };
    let max_rel = if scale > 0.0 {
        max_abs / scale
    } else {
        max_abs
    };
    let passed = if exact {
        max_abs == 0.0
    } else {
        max_abs <= tol.rtol * scale + tol.atol
    };
    Comparison {
        name: name.to_string(),
        max_abs,
        max_rel,
        passed,
        note: None,
    }
}

/// The failure for an expected tensor the runner did not compute.
pub fn not_computed(name: &str) -> Comparison {
    Comparison {
        name: name.to_string(),
        max_abs: f64::INFINITY,
        max_rel: f64::INFINITY,
        passed: false,
        note: Some("not computed".into()),
    }
}
