//! Position-information resizing for a new resolution (XVLM-REFERENCE.md §1.5):
//! - Swin relative-position-bias tables (`interpolate_relative_pos_embed`, BEiT method): the source table
//!   on a geometric grid, fitted by scipy `interp2d(kind='cubic')` = FITPACK's interpolating bicubic
//!   spline (s = 0, knots at the interior data points: the tensor-product not-a-knot cubic spline),
//!   evaluated on the integer grid −t..t, clamped to the data range outside it (FITPACK `fpbisp`);
//! - ViT absolute position embeddings (`interpolate_pos_embed`): bicubic `F.interpolate` of the grid
//!   tokens, the extra (class) tokens kept.

use tch::{Kind, Tensor};

use super::CheckpointError;

const CUBIC: usize = 3;

/// The 4 non-zero cubic B-spline basis values at `u` for knots `t`, and the index of the first one.
fn bspline_basis(t: &[f64], n_coef: usize, u: f64) -> (usize, [f64; CUBIC + 1]) {
    // Span l with t[l] <= u < t[l+1], l in [3, n_coef-1]; u at the right end uses the last span.
    let mut l = CUBIC;
    while l + 1 < n_coef && u >= t[l + 1] {
        l += 1;
    }
    let mut n = [0f64; CUBIC + 1];
    let mut left = [0f64; CUBIC + 1];
    let mut right = [0f64; CUBIC + 1];
    n[0] = 1.0;
    for j in 1..=CUBIC {
        left[j] = u - t[l + 1 - j];
        right[j] = t[l + j] - u;
        let mut saved = 0.0;
        for r in 0..j {
            let temp = n[r] / (right[r + 1] + left[j - r]);
            n[r] = saved + right[r + 1] * temp;
            saved = left[j - r] * temp;
        }
        n[j] = saved;
    }
    (l - CUBIC, n)
}

/// Inverts a small dense matrix (Gauss-Jordan with partial pivoting).
fn invert(mut a: Vec<Vec<f64>>) -> Option<Vec<Vec<f64>>> {
    let m = a.len();
    let mut inv: Vec<Vec<f64>> = (0..m)
        .map(|i| (0..m).map(|j| if i == j { 1.0 } else { 0.0 }).collect())
        .collect();
    for col in 0..m {
        let pivot = (col..m).max_by(|&x, &y| a[x][col].abs().total_cmp(&a[y][col].abs()))?;
        if a[pivot][col].abs() < 1e-300 {
            return None;
        }
        a.swap(col, pivot);
        inv.swap(col, pivot);
        let p = a[col][col];
        for j in 0..m {
            a[col][j] /= p;
            inv[col][j] /= p;
        }
        for row in 0..m {
            if row != col {
                let f = a[row][col];
                if f != 0.0 {
                    for j in 0..m {
                        a[row][j] -= f * a[col][j];
                        inv[row][j] -= f * inv[col][j];
                    }
                }
            }
        }
    }
    Some(inv)
}

/// The linear map [dst, src] from values at the sorted nodes `x` to the not-a-knot cubic interpolating
/// spline evaluated at `points` (clamped to [x0, x_last]). Needs at least 4 nodes.
pub fn cubic_spline_matrix(x: &[f64], points: &[f64]) -> Vec<Vec<f64>> {
    let m = x.len();
    // FITPACK interpolation knots (fpregr, s = 0, odd k): k+1 copies of each end, interior x[2..m-2].
    let mut t = vec![x[0]; CUBIC + 1];
    t.extend_from_slice(&x[2..m - 2]);
    t.extend(std::iter::repeat_n(x[m - 1], CUBIC + 1));
    let row = |u: f64| {
        let (first, vals) = bspline_basis(&t, m, u);
        let mut r = vec![0f64; m];
        for (k, v) in vals.iter().enumerate() {
            r[first + k] = *v;
        }
        r
    };
    let colloc: Vec<Vec<f64>> = x.iter().map(|&u| row(u)).collect();
    let inv = invert(colloc).expect("B-spline collocation matrix at distinct nodes is invertible");
    points
        .iter()
        .map(|&p| {
            let b = row(p.clamp(x[0], x[m - 1]));
            (0..m)
                .map(|j| (0..m).map(|i| b[i] * inv[i][j]).sum())
                .collect()
        })
        .collect()
}

/// The official bisection for the geometric ratio q and the source coordinates
/// `[-dis reversed, 0, dis]` for a `src_size` grid reaching `dst_size // 2`.
pub fn geometric_source_grid(src_size: i64, dst_size: i64) -> (f64, Vec<f64>) {
    let n = src_size / 2;
    let target = (dst_size / 2) as f64;
    let gp = |q: f64| (1.0 - q.powf(n as f64)) / (1.0 - q);
    let (mut left, mut right) = (1.01f64, 1.5f64);
    let mut q = (left + right) / 2.0;
    while right - left > 1e-6 {
        q = (left + right) / 2.0;
        if gp(q) > target {
            right = q;
        } else {
            left = q;
        }
    }
    let mut dis = Vec::with_capacity(n as usize);
    let mut cur = 1.0f64;
    for i in 0..n {
        dis.push(cur);
        cur += q.powf((i + 1) as f64);
    }
    let mut x: Vec<f64> = dis.iter().rev().map(|d| -d).collect();
    x.push(0.0);
    x.extend_from_slice(&dis);
    (q, x)
}

/// `interpolate_relative_pos_embed(table [src², heads], dst_num_pos)` → [dst², heads] (float32).
/// A no-op when the sizes agree; refuses tables smaller than 5×5 (FITPACK cannot fit them) and
/// non-square ones. `key` only names the tensor in errors.
pub fn interpolate_relative_pos_embed(
    table: &Tensor,
    dst_num_pos: i64,
    key: &str,
) -> Result<Tensor, CheckpointError> {
    let err = |reason: String| CheckpointError::Resize {
        key: key.to_string(),
        reason,
    };
    let (src_num_pos, heads) = table.size2().map_err(|_| {
        err(format!(
            "expected a [rows, heads] table, got {:?}",
            table.size()
        ))
    })?;
    let src = (src_num_pos as f64).sqrt() as i64;
    let dst = (dst_num_pos as f64).sqrt() as i64;
    if src * src != src_num_pos || dst * dst != dst_num_pos {
        return Err(err(format!(
            "{src_num_pos} -> {dst_num_pos} rows: both must be squares"
        )));
    }
    if src == dst {
        return Ok(table.shallow_clone());
    }
    if src <= CUBIC as i64 {
        return Err(err(format!(
            "a {src}x{src} table (window {}) has too few points for the official cubic spline fit",
            (src + 1) / 2
        )));
    }
    let (_, x) = geometric_source_grid(src, dst);
    let t = (dst / 2) as f64;
    let points: Vec<f64> = (0..dst).map(|k| -t + k as f64).collect();
    let a = cubic_spline_matrix(&x, &points);
    let a = Tensor::from_slice(&a.concat()).view([dst, src]);
    let z = table
        .to_device(tch::Device::Cpu)
        .to_kind(Kind::Float)
        .to_kind(Kind::Double)
        .transpose(0, 1)
        .reshape([heads, src, src]);
    // out_h = A · Z_h · Aᵀ: rows follow y (first axis), columns x; the grid is the same on both.
    let out = a.matmul(&z).matmul(&a.transpose(0, 1));
    Ok(out
        .reshape([heads, dst * dst])
        .transpose(0, 1)
        .contiguous()
        .to_kind(Kind::Float)
        .to_device(table.device()))
}

/// `interpolate_pos_embed(pos [1, N, D], num_patches, extra)`: bicubic resize of the √(N−extra) grid to
/// √num_patches (align_corners False), the first `extra` tokens kept. No-op when the grids agree.
pub fn interpolate_pos_embed(
    pos: &Tensor,
    num_patches: i64,
    num_extra_tokens: i64,
    key: &str,
) -> Result<Tensor, CheckpointError> {
    let (_, n, d) = pos.size3().map_err(|_| CheckpointError::Resize {
        key: key.to_string(),
        reason: format!("expected [1, N, D], got {:?}", pos.size()),
    })?;
    let orig = ((n - num_extra_tokens) as f64).sqrt() as i64;
    let new = (num_patches as f64).sqrt() as i64;
    if orig == new {
        return Ok(pos.shallow_clone());
    }
    if orig * orig != n - num_extra_tokens {
        return Err(CheckpointError::Resize {
            key: key.to_string(),
            reason: format!("{} grid tokens are not a square", n - num_extra_tokens),
        });
    }
    let extra = pos.slice(1, 0, num_extra_tokens, 1);
    let grid = pos
        .slice(1, num_extra_tokens, None, 1)
        .reshape([-1, orig, orig, d])
        .permute([0, 3, 1, 2]);
    let resized = grid
        .upsample_bicubic2d([new, new], false, None, None)
        .permute([0, 2, 3, 1])
        .flatten(1, 2);
    Ok(Tensor::cat(&[extra, resized], 1))
}
