//! Random geometry and colour augmentation as the official pipeline: torchvision `RandomResizedCrop`
//! parameters and the repository's `RandomAugment` (dataset/randaugment.py) on uint8 RGB.

use rand::Rng;

use super::pixels::RgbImage;

/// A crop rectangle in pixels: left, top, width, height.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CropBox {
    /// Left column.
    pub x: usize,
    /// Top row.
    pub y: usize,
    /// Width.
    pub w: usize,
    /// Height.
    pub h: usize,
}

/// torchvision `RandomResizedCrop.get_params`: 10 tries of area fraction `U(scale)` and log-uniform
/// aspect `ratio`, then the centre-crop fallback with the aspect clamped.
pub fn random_resized_crop_params(
    rng: &mut impl Rng,
    width: usize,
    height: usize,
    scale: (f64, f64),
    ratio: (f64, f64),
) -> CropBox {
    let area = (width * height) as f64;
    let (lr0, lr1) = (ratio.0.ln(), ratio.1.ln());
    for _ in 0..10 {
        let target = area * rng.random_range(scale.0..scale.1);
        let aspect = rng.random_range(lr0..lr1).exp();
        let w = (target * aspect).sqrt().round() as usize;
        let h = (target / aspect).sqrt().round() as usize;
        if w > 0 && w <= width && h > 0 && h <= height {
            let y = rng.random_range(0..=height - h);
            let x = rng.random_range(0..=width - w);
            return CropBox { x, y, w, h };
        }
    }
    let in_ratio = width as f64 / height as f64;
    let (w, h) = if in_ratio < ratio.0 {
        (width, (width as f64 / ratio.0).round() as usize)
    } else if in_ratio > ratio.1 {
        ((height as f64 * ratio.1).round() as usize, height)
    } else {
        (width, height)
    };
    let (w, h) = (w.clamp(1, width), h.clamp(1, height));
    CropBox {
        x: (width - w) / 2,
        y: (height - h) / 2,
        w,
        h,
    }
}

/// The RandAugment operations of the official `RandomAugment`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AugOp {
    /// No change.
    Identity,
    /// Per-channel stretch of [min, max] to [0, 255].
    AutoContrast,
    /// PIL-style per-channel histogram equalisation.
    Equalize,
    /// Multiply by the enhance factor.
    Brightness,
    /// Blend with a 3x3 smoothed copy (interior pixels only).
    Sharpness,
    /// Horizontal shear.
    ShearX,
    /// Vertical shear.
    ShearY,
    /// Horizontal shift.
    TranslateX,
    /// Vertical shift.
    TranslateY,
    /// Rotation about the centre.
    Rotate,
}

/// All ten operations (`pretrain_transform`, `train_transform`).
pub const ALL_OPS: [AugOp; 10] = [
    AugOp::Identity,
    AugOp::AutoContrast,
    AugOp::Equalize,
    AugOp::Brightness,
    AugOp::Sharpness,
    AugOp::ShearX,
    AugOp::ShearY,
    AugOp::TranslateX,
    AugOp::TranslateY,
    AugOp::Rotate,
];

/// The five colour operations of `box_transform` (region batches: geometry stays with the boxes).
pub const COLOUR_OPS: [AugOp; 5] = [
    AugOp::Identity,
    AugOp::AutoContrast,
    AugOp::Equalize,
    AugOp::Brightness,
    AugOp::Sharpness,
];

/// How AutoContrast and Sharpness treat values the official numpy code lets wrap.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OpArithmetic {
    /// As the official `dataset/randaugment.py` computes, the default because the published runs
    /// trained on that data: AutoContrast negates its minimum as a `np.uint8` scalar, so a channel
    /// with `0 < min < max` turns all 255; Sharpness casts its float result to uint8 unclipped
    /// (truncated, then modulo 256).
    #[default]
    Official,
    /// The documented mappings (xvlm-only `exact_ops: True`): AutoContrast stretches `[min, max]`
    /// onto `[0, 255]`, Sharpness clips to `[0, 255]`.
    Exact,
}

impl OpArithmetic {
    /// `Exact` when the config's xvlm-only `exact_ops` is set.
    pub fn from_exact_ops(exact_ops: bool) -> Self {
        if exact_ops {
            Self::Exact
        } else {
            Self::Official
        }
    }
}

/// `RandomAugment(N, M, isPIL=True, augs=ops)`.
#[derive(Debug, Clone)]
pub struct RandAugment {
    /// Number of ops drawn (with replacement).
    pub n: usize,
    /// Level (out of `MAX_LEVEL` = 10).
    pub m: u32,
    /// The op set.
    pub ops: Vec<AugOp>,
    /// The integer arithmetic of AutoContrast and Sharpness.
    pub arithmetic: OpArithmetic,
}

const MAX_LEVEL: f64 = 10.0;
const FILL: u8 = 128;

impl RandAugment {
    /// RandAugment(2, 7) over `ops`, as every official transform uses.
    pub fn new(ops: &[AugOp]) -> Self {
        Self {
            n: 2,
            m: 7,
            ops: ops.to_vec(),
            arithmetic: OpArithmetic::Official,
        }
    }

    /// This augmentation with AutoContrast and Sharpness computed as `arithmetic` says.
    pub fn with_arithmetic(mut self, arithmetic: OpArithmetic) -> Self {
        self.arithmetic = arithmetic;
        self
    }

    /// Draw N ops uniformly with replacement; apply each with probability 0.5.
    pub fn apply(&self, rng: &mut impl Rng, img: &mut RgbImage) {
        if self.ops.is_empty() {
            return;
        }
        let level = f64::from(self.m) / MAX_LEVEL;
        let chosen: Vec<AugOp> = (0..self.n)
            .map(|_| self.ops[rng.random_range(0..self.ops.len())])
            .collect();
        for op in chosen {
            if rng.random::<f64>() > 0.5 {
                continue;
            }
            let sign = |rng: &mut dyn rand::RngCore| {
                if rng.random::<f64>() > 0.5 {
                    -1.0
                } else {
                    1.0
                }
            };
            match op {
                AugOp::Identity => {}
                AugOp::AutoContrast => autocontrast(img, self.arithmetic),
                AugOp::Equalize => equalize(img),
                AugOp::Brightness => brightness(img, (level * 1.8 + 0.1) as f32),
                AugOp::Sharpness => sharpness(img, (level * 1.8 + 0.1) as f32, self.arithmetic),
                AugOp::ShearX => {
                    let f = level * 0.3 * sign(rng);
                    *img = warp_affine(img, [1.0, f, 0.0, 0.0, 1.0, 0.0]);
                }
                AugOp::ShearY => {
                    let f = level * 0.3 * sign(rng);
                    *img = warp_affine(img, [1.0, 0.0, 0.0, f, 1.0, 0.0]);
                }
                AugOp::TranslateX => {
                    let o = level * 10.0 * sign(rng);
                    *img = warp_affine(img, [1.0, 0.0, -o, 0.0, 1.0, 0.0]);
                }
                AugOp::TranslateY => {
                    let o = level * 10.0 * sign(rng);
                    *img = warp_affine(img, [1.0, 0.0, 0.0, 0.0, 1.0, -o]);
                }
                AugOp::Rotate => {
                    let deg = level * 30.0 * sign(rng);
                    *img = warp_affine(img, rotation_matrix(img, deg));
                }
            }
        }
    }
}

fn apply_luts(img: &mut RgbImage, luts: &[[u8; 256]; 3]) {
    for p in img.data.chunks_exact_mut(3) {
        p[0] = luts[0][p[0] as usize];
        p[1] = luts[1][p[1] as usize];
        p[2] = luts[2][p[2] as usize];
    }
}

fn histograms(img: &RgbImage) -> [[u32; 256]; 3] {
    let mut h = [[0u32; 256]; 3];
    for p in img.data.chunks_exact(3) {
        h[0][p[0] as usize] += 1;
        h[1][p[1] as usize] += 1;
        h[2][p[2] as usize] += 1;
    }
    h
}

/// AutoContrast with cutoff 0: per channel, map [min, max] onto [0, 255] (`Official`: all 255 when
/// min > 0, the uint8 wrap of `-min`); identity if max <= min.
pub fn autocontrast(img: &mut RgbImage, arithmetic: OpArithmetic) {
    let hist = histograms(img);
    let mut luts = [[0u8; 256]; 3];
    for c in 0..3 {
        let low = hist[c].iter().position(|&n| n > 0).unwrap_or(0);
        let high = hist[c].iter().rposition(|&n| n > 0).unwrap_or(0);
        for (v, out) in luts[c].iter_mut().enumerate() {
            *out = if high <= low {
                v as u8
            } else if low > 0 && arithmetic == OpArithmetic::Official {
                // offset = (256 - low) * scale > 255 for every v: the whole channel clips to 255.
                255
            } else if arithmetic == OpArithmetic::Official {
                // The official table: arange * scale + offset (here low == 0, so offset == 0).
                let scale = 255.0 / (high - low) as f64;
                (v as f64 * scale - low as f64 * scale).clamp(0.0, 255.0) as u8
            } else {
                let scale = 255.0 / (high - low) as f64;
                ((v as f64 - low as f64) * scale).clamp(0.0, 255.0) as u8
            };
        }
    }
    apply_luts(img, &luts);
}

/// PIL-equivalent equalisation per channel (the official `equalize_func`).
pub fn equalize(img: &mut RgbImage) {
    let hist = histograms(img);
    let mut luts = [[0u8; 256]; 3];
    for c in 0..3 {
        let h = &hist[c];
        let nonzero: Vec<u64> = h
            .iter()
            .filter(|&&n| n > 0)
            .map(|&n| u64::from(n))
            .collect();
        let step = nonzero[..nonzero.len().saturating_sub(1)]
            .iter()
            .sum::<u64>()
            / 255;
        if step == 0 {
            for (v, out) in luts[c].iter_mut().enumerate() {
                *out = v as u8;
            }
            continue;
        }
        let mut cum = step / 2;
        for v in 0..256 {
            luts[c][v] = (cum / step).min(255) as u8;
            cum += u64::from(h[v]);
        }
    }
    apply_luts(img, &luts);
}

/// Brightness: `clip(v * f, 0, 255)` truncated to uint8 (float32 as numpy).
pub fn brightness(img: &mut RgbImage, factor: f32) {
    let mut lut = [0u8; 256];
    for (v, out) in lut.iter_mut().enumerate() {
        *out = (v as f32 * factor).clamp(0.0, 255.0) as u8;
    }
    apply_luts(img, &[lut, lut, lut]);
}

/// Sharpness: interior pixels = blur + f * (img - blur) with blur = round(filter [[1,1,1],[1,5,1],[1,1,1]]/13);
/// border pixels unchanged; the float result cast as `arithmetic` says (`Official`: numpy's unclipped
/// `astype(np.uint8)`, truncation then modulo 256; `Exact`: clipped to 0..255).
pub fn sharpness(img: &mut RgbImage, factor: f32, arithmetic: OpArithmetic) {
    let (w, h) = (img.width, img.height);
    if w < 3 || h < 3 {
        return;
    }
    let src = img.data.clone();
    let row = w * 3;
    for y in 1..h - 1 {
        let (up, mid, down) = (
            &src[(y - 1) * row..y * row],
            &src[y * row..(y + 1) * row],
            &src[(y + 1) * row..(y + 2) * row],
        );
        let out = &mut img.data[y * row..(y + 1) * row];
        for i in 3..row - 3 {
            let s = u32::from(up[i - 3])
                + u32::from(up[i])
                + u32::from(up[i + 3])
                + u32::from(mid[i - 3])
                + 5 * u32::from(mid[i])
                + u32::from(mid[i + 3])
                + u32::from(down[i - 3])
                + u32::from(down[i])
                + u32::from(down[i + 3]);
            // round(s / 13): 13 is odd, so there are no ties.
            let blur = ((2 * s + 13) / 26) as f32;
            let v = f32::from(mid[i]);
            let sharpened = blur + factor * (v - blur);
            out[i] = match arithmetic {
                // Truncation toward zero, then the low 8 bits, as numpy's float32 -> uint8 cast.
                OpArithmetic::Official => sharpened as i32 as u8,
                OpArithmetic::Exact => sharpened.clamp(0.0, 255.0) as u8,
            };
        }
    }
}

/// OpenCV `getRotationMatrix2D((W/2, H/2), deg, 1)`.
fn rotation_matrix(img: &RgbImage, deg: f64) -> [f64; 6] {
    let (cx, cy) = (img.width as f64 / 2.0, img.height as f64 / 2.0);
    let (a, b) = (deg.to_radians().cos(), deg.to_radians().sin());
    [
        a,
        b,
        (1.0 - a) * cx - b * cy,
        -b,
        a,
        b * cx + (1.0 - a) * cy,
    ]
}

/// OpenCV `warpAffine(img, M, (W, H), INTER_LINEAR, BORDER_CONSTANT 128)`: `M` maps source to
/// destination; every destination pixel samples the inverse-mapped source bilinearly (10-bit weights).
/// Source coordinates are stepped along each row in 16.16 fixed point from the row's exact start (OpenCV
/// also steps in fixed point, with 10 fractional bits), so a weight may differ by one step from
/// rounding the exact coordinate.
pub fn warp_affine(img: &RgbImage, m: [f64; 6]) -> RgbImage {
    let det = m[0] * m[4] - m[1] * m[3];
    let det = if det == 0.0 { 1.0 } else { 1.0 / det };
    let (a, b, d, e) = (m[4] * det, -m[1] * det, -m[3] * det, m[0] * det);
    let c = -a * m[2] - b * m[5];
    let f = -d * m[2] - e * m[5];
    let (w, h) = (img.width as i64, img.height as i64);
    let src = &img.data;
    let mut out = vec![FILL; src.len()];
    const BITS: i32 = 10;
    const ONE: i32 = 1 << BITS;
    const FIX: f64 = 65_536.0;
    let fill = i32::from(FILL);
    let row_len = (w * 3) as usize;
    let (dx, dy) = ((a * FIX).round() as i64, (d * FIX).round() as i64);
    for (y, dst_row) in out.chunks_exact_mut(row_len).enumerate() {
        let sx0 = ((b * y as f64 + c) * FIX).round() as i64;
        let sy0 = ((e * y as f64 + f) * FIX).round() as i64;
        for (x, o) in dst_row.chunks_exact_mut(3).enumerate() {
            let sx = sx0 + dx * x as i64;
            let sy = sy0 + dy * x as i64;
            let (x0, y0) = (sx >> 16, sy >> 16);
            if x0 < -1 || y0 < -1 || x0 >= w || y0 >= h {
                continue;
            }
            let wx = (((sx & 0xFFFF) + 32) >> 6) as i32;
            let wy = (((sy & 0xFFFF) + 32) >> 6) as i32;
            let blend = |p00: i32, p01: i32, p10: i32, p11: i32| -> u8 {
                let top = p00 * (ONE - wx) + p01 * wx;
                let bot = p10 * (ONE - wx) + p11 * wx;
                ((top * (ONE - wy) + bot * wy + (1 << (2 * BITS - 1))) >> (2 * BITS)) as u8
            };
            if x0 >= 0 && y0 >= 0 && x0 + 1 < w && y0 + 1 < h {
                let p = ((y0 * w + x0) * 3) as usize;
                let top = &src[p..p + 6];
                let bot = &src[p + row_len..p + row_len + 6];
                for ch in 0..3 {
                    o[ch] = blend(
                        i32::from(top[ch]),
                        i32::from(top[3 + ch]),
                        i32::from(bot[ch]),
                        i32::from(bot[3 + ch]),
                    );
                }
            } else {
                let px = |xx: i64, yy: i64, ch: usize| -> i32 {
                    if xx < 0 || yy < 0 || xx >= w || yy >= h {
                        fill
                    } else {
                        i32::from(src[((yy * w + xx) * 3) as usize + ch])
                    }
                };
                for (ch, v) in o.iter_mut().enumerate() {
                    *v = blend(
                        px(x0, y0, ch),
                        px(x0 + 1, y0, ch),
                        px(x0, y0 + 1, ch),
                        px(x0 + 1, y0 + 1, ch),
                    );
                }
            }
        }
    }
    RgbImage {
        width: img.width,
        height: img.height,
        data: out,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn translate_by_whole_pixels_shifts_and_fills() {
        let mut img = RgbImage::filled(4, 2, [0, 0, 0]);
        img.data[0] = 200; // pixel (0, 0) red
        let out = warp_affine(&img, [1.0, 0.0, 1.0, 0.0, 1.0, 0.0]);
        assert_eq!(out.data[0..3], [FILL, FILL, FILL]);
        assert_eq!(out.data[3], 200);
    }

    #[test]
    fn equalize_constant_image_is_identity() {
        let mut img = RgbImage::filled(3, 3, [7, 8, 9]);
        equalize(&mut img);
        assert_eq!(img.data[0..3], [7, 8, 9]);
    }

    /// The input of a `tests/fixtures/randaugment/cases.json` case: splitmix64 bytes, channel c mapped
    /// onto `ranges[c]` (as `scripts/randaugment-cases.py`).
    fn case_image(case: &serde_json::Value) -> RgbImage {
        let (w, h) = (case["w"].as_u64().unwrap(), case["h"].as_u64().unwrap());
        let (w, h) = (w as usize, h as usize);
        let ranges: Vec<(u32, u32)> = case["ranges"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| (r[0].as_u64().unwrap() as u32, r[1].as_u64().unwrap() as u32))
            .collect();
        let raw =
            crate::data::pixels::tests::splitmix64_bytes(case["seed"].as_u64().unwrap(), w * h * 3);
        let data = raw
            .iter()
            .enumerate()
            .map(|(i, &b)| {
                let (lo, hi) = ranges[i % 3];
                (lo + u32::from(b) % (hi - lo + 1)) as u8
            })
            .collect();
        RgbImage::new(w, h, data).unwrap()
    }

    /// AutoContrast, Sharpness (both arithmetics), Equalize and Brightness are bit-exact against the
    /// official `dataset/randaugment.py` (numpy + OpenCV) on 240 images that hit every wrap.
    #[test]
    fn colour_ops_match_the_official_functions_on_every_case() {
        use sha2::{Digest, Sha256};
        let doc: serde_json::Value =
            serde_json::from_str(include_str!("../../tests/fixtures/randaugment/cases.json"))
                .expect("cases.json parses");
        let factor = doc["factor"].as_f64().unwrap() as f32;
        let cases = doc["cases"].as_array().unwrap();
        assert!(cases.len() >= 200, "only {} cases", cases.len());
        type Op = Box<dyn Fn(&mut RgbImage)>;
        let ops: [(&str, Op); 6] = [
            (
                "autocontrast",
                Box::new(|i| autocontrast(i, OpArithmetic::Official)),
            ),
            (
                "autocontrast_exact",
                Box::new(|i| autocontrast(i, OpArithmetic::Exact)),
            ),
            (
                "sharpness",
                Box::new(move |i| sharpness(i, factor, OpArithmetic::Official)),
            ),
            (
                "sharpness_exact",
                Box::new(move |i| sharpness(i, factor, OpArithmetic::Exact)),
            ),
            ("equalize", Box::new(equalize)),
            ("brightness", Box::new(move |i| brightness(i, factor))),
        ];
        let mut failed = Vec::new();
        let mut wrapped = 0;
        for case in cases {
            let input = case_image(case);
            for (name, op) in &ops {
                let mut img = input.clone();
                op(&mut img);
                let got = format!("{:x}", Sha256::digest(&img.data));
                if got != case[*name].as_str().unwrap() {
                    failed.push(format!(
                        "{name} {}x{} {}",
                        input.width, input.height, case["kind"]
                    ));
                }
            }
            if case["autocontrast"] != case["autocontrast_exact"] {
                wrapped += 1;
            }
        }
        assert!(
            failed.is_empty(),
            "{} mismatches: {:?}",
            failed.len(),
            &failed[..failed.len().min(10)]
        );
        // The fixture exercises the wrap, or the test could not tell the arithmetics apart.
        assert!(
            wrapped > cases.len() / 3,
            "only {wrapped} cases differ between the arithmetics"
        );
    }

    #[test]
    fn crop_params_fit_inside() {
        let mut rng = crate::data::rng::rng_for(1, crate::data::rng::Purpose::Sample, &[]);
        for _ in 0..200 {
            let b = random_resized_crop_params(&mut rng, 50, 30, (0.2, 1.0), (0.75, 4.0 / 3.0));
            assert!(b.w > 0 && b.h > 0 && b.x + b.w <= 50 && b.y + b.h <= 30);
        }
    }
}
