//! RGB images as bytes: decoding, PIL-exact bicubic resizing, flips, and `ToTensor` + `Normalize`.

use super::DataError;

/// CLIP normalisation mean (used for every vision encoder, reference §3.4).
pub const CLIP_MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
/// CLIP normalisation std (the official constants verbatim).
#[allow(clippy::excessive_precision)]
pub const CLIP_STD: [f32; 3] = [0.268_629_54, 0.261_302_58, 0.275_777_11];

/// Largest accepted side in pixels (guards hostile headers against huge allocations).
pub const MAX_SIDE: u32 = 16_384;

/// An 8-bit RGB image, rows top to bottom, `HWC` interleaved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RgbImage {
    /// Width in pixels.
    pub width: usize,
    /// Height in pixels.
    pub height: usize,
    /// `height * width * 3` bytes.
    pub data: Vec<u8>,
}

impl RgbImage {
    /// Wrap bytes; fails if the length does not match.
    pub fn new(width: usize, height: usize, data: Vec<u8>) -> Result<Self, DataError> {
        if data.len() != width * height * 3 {
            return Err(DataError::Sample(format!(
                "image buffer of {} bytes does not match {width}x{height}x3",
                data.len()
            )));
        }
        Ok(Self {
            width,
            height,
            data,
        })
    }

    /// A `width x height` image filled with one colour.
    pub fn filled(width: usize, height: usize, rgb: [u8; 3]) -> Self {
        let mut data = Vec::with_capacity(width * height * 3);
        for _ in 0..width * height {
            data.extend_from_slice(&rgb);
        }
        Self {
            width,
            height,
            data,
        }
    }

    /// Copy of the rectangle `[x0, x0 + w) x [y0, y0 + h)` (must lie inside).
    pub fn crop(&self, x0: usize, y0: usize, w: usize, h: usize) -> Self {
        let mut data = Vec::with_capacity(w * h * 3);
        for y in y0..y0 + h {
            let start = (y * self.width + x0) * 3;
            data.extend_from_slice(&self.data[start..start + w * 3]);
        }
        Self {
            width: w,
            height: h,
            data,
        }
    }

    /// Mirror left-right in place.
    pub fn hflip(&mut self) {
        let w = self.width;
        for row in self.data.chunks_exact_mut(w * 3) {
            for x in 0..w / 2 {
                let (a, b) = (x * 3, (w - 1 - x) * 3);
                for c in 0..3 {
                    row.swap(a + c, b + c);
                }
            }
        }
    }
}

/// Whether the bytes start like a JPEG (SOI marker).
pub fn is_jpeg(bytes: &[u8]) -> bool {
    bytes.starts_with(&[0xFF, 0xD8])
}

/// Decode JPEG or PNG bytes to RGB (grey and alpha are converted like PIL's `convert('RGB')`).
/// JPEG goes through libjpeg-turbo's own decoder (vendored via `mozjpeg`), so pixels equal PIL's.
pub fn decode(bytes: &[u8]) -> Result<RgbImage, DataError> {
    if is_jpeg(bytes) {
        return decode_jpeg_scaled(bytes, |_, _| 8);
    }
    let reader = image::ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| DataError::Sample(format!("cannot sniff image format: {e}")))?;
    let (w, h) = reader
        .into_dimensions()
        .map_err(|e| DataError::Sample(format!("undecodable image header: {e}")))?;
    check_size(w as usize, h as usize)?;
    let img = image::load_from_memory(bytes)
        .map_err(|e| DataError::Sample(format!("undecodable image: {e}")))?;
    let rgb = img.into_rgb8();
    let (w, h) = (rgb.width() as usize, rgb.height() as usize);
    RgbImage::new(w, h, rgb.into_raw())
}

/// Fast JPEG decode (zune-jpeg, SIMD) for training augmentation. Its IDCT and upsampling differ from
/// libjpeg-turbo's by a few levels, so the test transform uses [`decode`] instead.
pub fn decode_fast(bytes: &[u8]) -> Result<RgbImage, DataError> {
    if !is_jpeg(bytes) {
        return decode(bytes);
    }
    use zune_jpeg::zune_core::bytestream::ZCursor;
    use zune_jpeg::zune_core::colorspace::ColorSpace;
    use zune_jpeg::zune_core::options::DecoderOptions;
    let end = bytes.iter().rposition(|&b| b != 0).unwrap_or(0);
    if end < 3 || bytes[end - 1] != 0xFF || bytes[end] != 0xD9 {
        return Err(DataError::Sample(
            "truncated JPEG (no end-of-image marker)".into(),
        ));
    }
    let opts = DecoderOptions::default()
        .set_max_width(MAX_SIDE as usize)
        .set_max_height(MAX_SIDE as usize)
        .jpeg_set_out_colorspace(ColorSpace::RGB);
    let result = std::panic::catch_unwind(|| {
        let mut d = zune_jpeg::JpegDecoder::new_with_options(ZCursor::new(bytes), opts);
        let data = d
            .decode()
            .map_err(|e| DataError::Sample(format!("undecodable JPEG: {e:?}")))?;
        let info = d
            .info()
            .ok_or_else(|| DataError::Sample("JPEG without header".into()))?;
        check_size(info.width as usize, info.height as usize)?;
        RgbImage::new(info.width as usize, info.height as usize, data)
    });
    result.unwrap_or_else(|_| Err(DataError::Sample("JPEG decoder failed".into())))
}

fn check_size(w: usize, h: usize) -> Result<(), DataError> {
    if w == 0 || h == 0 || w > MAX_SIDE as usize || h > MAX_SIDE as usize {
        return Err(DataError::Sample(format!(
            "image size {w}x{h} out of range"
        )));
    }
    Ok(())
}

/// Decode a JPEG at `n/8` of its size (libjpeg DCT scaling), where `choose_n(width, height)` picks
/// `n` in 1..=8 from the full size. A file without its end-of-image marker is rejected as truncated
/// (PIL would grey-fill it; we skip such samples instead).
pub fn decode_jpeg_scaled(
    bytes: &[u8],
    choose_n: impl FnOnce(usize, usize) -> u8,
) -> Result<RgbImage, DataError> {
    decode_jpeg_rows(bytes, true, |w, h| (choose_n(w, h), h))
}

/// Training decode with libjpeg: `choose(width, height)` gives the DCT scale `n` (1..=8) and how many rows
/// of the full-size image are needed from the top; decoding stops after those rows (the returned image
/// is that short). `fancy_upsampling: false` uses libjpeg's faster merged chroma upsampling (pixels
/// differ from PIL's by a few levels on chroma edges).
pub fn decode_jpeg_rows(
    bytes: &[u8],
    fancy_upsampling: bool,
    choose: impl FnOnce(usize, usize) -> (u8, usize),
) -> Result<RgbImage, DataError> {
    let end = bytes.iter().rposition(|&b| b != 0).unwrap_or(0);
    if end < 3 || bytes[end - 1] != 0xFF || bytes[end] != 0xD9 {
        return Err(DataError::Sample(
            "truncated JPEG (no end-of-image marker)".into(),
        ));
    }
    // libjpeg reports fatal errors by unwinding (mozjpeg's error manager resumes an unwind without
    // calling the panic hook); catch it here and turn it into a skipped sample.
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(
        || -> Result<RgbImage, DataError> {
            let io_err = |e: std::io::Error| DataError::Sample(format!("undecodable JPEG: {e}"));
            let mut d = mozjpeg::Decompress::new_mem(bytes).map_err(io_err)?;
            let (w, h) = d.size();
            check_size(w, h)?;
            let (n, need_rows) = choose(w, h);
            let n = n.clamp(1, 8);
            d.scale(n);
            if !fancy_upsampling {
                d.do_fancy_upsampling(false);
            }
            let mut started = d.rgb().map_err(io_err)?;
            let (w, h) = (started.width(), started.height());
            // Rows at scale n/8, one spare for the resampler's rounding.
            let rows = (need_rows.min(h * 8) * usize::from(n)).div_ceil(8) + 1;
            let rows = rows.min(h);
            if rows < h {
                let mut data = vec![0u8; rows * w * 3];
                started.read_scanlines_into(&mut data).map_err(io_err)?;
                // Dropping the decoder mid-image aborts it; the rest of the file is not needed.
                return RgbImage::new(w, rows, data);
            }
            let data: Vec<u8> = started.read_scanlines().map_err(io_err)?;
            // Trailing-data complaints after a complete image are not fatal.
            let _ = started.finish();
            RgbImage::new(w, h, data)
        },
    ));
    match result {
        Ok(r) => r,
        Err(payload) => {
            let msg = payload
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "libjpeg error".into());
            Err(DataError::Sample(format!("undecodable JPEG: {msg}")))
        }
    }
}

/// Pillow's fixed-point precision for 8-bit resampling.
const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Pillow's bicubic kernel (a = -0.5).
fn bicubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// Integer filter taps for one axis, as Pillow's `precompute_coeffs` + `normalize_coeffs_8bpc`.
struct Taps {
    ksize: usize,
    /// Per output index: (first input index, number of taps).
    bounds: Vec<(usize, usize)>,
    /// `out_size * ksize` fixed-point weights.
    weights: Vec<i32>,
}

fn precompute_taps(in_size: usize, out_size: usize) -> Taps {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = 2.0 * filterscale;
    let ksize = support.ceil() as usize * 2 + 1;
    let mut bounds = Vec::with_capacity(out_size);
    let mut weights = vec![0i32; out_size * ksize];
    let mut k = vec![0f64; ksize];
    for xx in 0..out_size {
        let center = (xx as f64 + 0.5) * scale;
        let ss = 1.0 / filterscale;
        let xmin = ((center - support + 0.5) as i64).max(0) as usize;
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
        let n = xmax.saturating_sub(xmin);
        let mut ww = 0.0;
        for (x, kx) in k.iter_mut().enumerate().take(n) {
            let w = bicubic((x as f64 + xmin as f64 - center + 0.5) * ss);
            *kx = w;
            ww += w;
        }
        for x in 0..n {
            let w = if ww != 0.0 { k[x] / ww } else { k[x] };
            let fixed = w * f64::from(1u32 << PRECISION_BITS);
            weights[xx * ksize + x] = if w < 0.0 {
                (-0.5 + fixed) as i32
            } else {
                (0.5 + fixed) as i32
            };
        }
        bounds.push((xmin, n));
    }
    Taps {
        ksize,
        bounds,
        weights,
    }
}

#[inline]
fn clip8(v: i32) -> u8 {
    if v >= (1 << PRECISION_BITS << 8) {
        255
    } else if v <= 0 {
        0
    } else {
        (v >> PRECISION_BITS) as u8
    }
}

/// Horizontal pass: rows `rows` of the view (`x0`, `y0`, width `w`) of `img` resampled to `taps`.
fn horizontal_pass(
    src: &[u8],
    stride: usize,
    (x0, y0): (usize, usize),
    rows: std::ops::Range<usize>,
    taps: &Taps,
) -> Vec<u8> {
    let out_w = taps.bounds.len();
    let n_rows = rows.len();
    let mut out = vec![0u8; n_rows * out_w * 3];
    let half = 1i32 << (PRECISION_BITS - 1);
    for (r, row) in rows.enumerate() {
        let line = &src[((y0 + row) * stride + x0) * 3..];
        let dst = &mut out[r * out_w * 3..(r + 1) * out_w * 3];
        for (xx, d) in dst.chunks_exact_mut(3).enumerate() {
            let (xmin, n) = taps.bounds[xx];
            let k = &taps.weights[xx * taps.ksize..xx * taps.ksize + n];
            let (mut s0, mut s1, mut s2) = (half, half, half);
            for (p, &kw) in line[xmin * 3..(xmin + n) * 3].chunks_exact(3).zip(k) {
                s0 += i32::from(p[0]) * kw;
                s1 += i32::from(p[1]) * kw;
                s2 += i32::from(p[2]) * kw;
            }
            d[0] = clip8(s0);
            d[1] = clip8(s1);
            d[2] = clip8(s2);
        }
    }
    out
}

/// Vertical pass over the view (`x0`, `y0`, width `w`) of `src`; `row_shift` is subtracted from the
/// taps' row indices (the horizontal pass may have produced only the rows in use).
fn vertical_pass(
    src: &[u8],
    stride: usize,
    (x0, y0, w): (usize, usize, usize),
    row_shift: usize,
    taps: &Taps,
) -> Vec<u8> {
    let out_h = taps.bounds.len();
    let row_len = w * 3;
    let mut out = vec![0u8; out_h * row_len];
    let half = 1i32 << (PRECISION_BITS - 1);
    let mut acc = vec![0i32; row_len];
    for yy in 0..out_h {
        let (ymin, n) = taps.bounds[yy];
        let k = &taps.weights[yy * taps.ksize..yy * taps.ksize + n];
        acc.iter_mut().for_each(|a| *a = half);
        for (i, &kw) in k.iter().enumerate() {
            let row = y0 + ymin + i - row_shift;
            let start = (row * stride + x0) * 3;
            for (a, &p) in acc.iter_mut().zip(&src[start..start + row_len]) {
                *a += i32::from(p) * kw;
            }
        }
        for (o, &a) in out[yy * row_len..(yy + 1) * row_len].iter_mut().zip(&acc) {
            *o = clip8(a);
        }
    }
    out
}

/// PIL `Image.resize((out_w, out_h), BICUBIC)` of the rectangle `(x0, y0, w, h)` of `img` (the crop taken
/// first, as `img.crop(box).resize(...)`), bit-exact with Pillow's 8-bit two-pass resampler.
///
/// Pass order matters (each pass rounds to 8 bits): Pillow 13 (which made the fixtures;
/// `ImagingResampleInner`) runs the vertical pass first iff the height loses more than twice as many
/// pixels as the width, `in_h - out_h > 0 && in_h - out_h > 2 * (in_w - out_w)` (differences in pixels,
/// the width's negative when it grows), and the horizontal pass first otherwise.
pub fn resize_bicubic_crop(
    img: &RgbImage,
    crop: (usize, usize, usize, usize),
    out_w: usize,
    out_h: usize,
) -> RgbImage {
    let (_, _, w, h) = crop;
    resize_two_pass(
        img,
        crop,
        out_w,
        out_h,
        pil_vertical_first(w, h, out_w, out_h),
    )
}

/// Pillow 13's pass-order rule for resizing `in_w x in_h` to `out_w x out_h`.
fn pil_vertical_first(in_w: usize, in_h: usize, out_w: usize, out_h: usize) -> bool {
    let lost_h = in_h as i64 - out_h as i64;
    let lost_w = in_w as i64 - out_w as i64;
    lost_h > 0 && lost_h > 2 * lost_w
}

fn resize_two_pass(
    img: &RgbImage,
    (x0, y0, w, h): (usize, usize, usize, usize),
    out_w: usize,
    out_h: usize,
    vertical_first: bool,
) -> RgbImage {
    let need_h = out_w != w;
    let need_v = out_h != h;
    let stride = img.width;
    let data = match (need_h, need_v) {
        (false, false) => img.crop(x0, y0, w, h).data,
        (true, false) => horizontal_pass(
            &img.data,
            stride,
            (x0, y0),
            0..h,
            &precompute_taps(w, out_w),
        ),
        (false, true) => vertical_pass(
            &img.data,
            stride,
            (x0, y0, w),
            0,
            &precompute_taps(h, out_h),
        ),
        (true, true) => {
            let taps_h = precompute_taps(w, out_w);
            let taps_v = precompute_taps(h, out_h);
            if vertical_first {
                let tmp = vertical_pass(&img.data, stride, (x0, y0, w), 0, &taps_v);
                horizontal_pass(&tmp, w, (0, 0), 0..out_h, &taps_h)
            } else {
                let first = taps_v.bounds[0].0;
                let (bl, nl) = taps_v.bounds[out_h - 1];
                let tmp = horizontal_pass(&img.data, stride, (x0, y0), first..bl + nl, &taps_h);
                vertical_pass(&tmp, out_w, (0, 0, out_w), first, &taps_v)
            }
        }
    };
    RgbImage {
        width: out_w,
        height: out_h,
        data,
    }
}

/// Fast Catmull-Rom (the same kernel as PIL's bicubic) resize of the rectangle `(x0, y0, w, h)` for the
/// training transform, through `fast_image_resize` (SIMD, 16-bit fixed-point weights). Its rounding
/// differs from Pillow's 22-bit weights by about a level, so the test transform keeps
/// [`resize_bicubic_crop`]. The SIMD paths produce the same integers as the scalar one.
pub fn resize_bicubic_crop_fast(
    img: &RgbImage,
    (x0, y0, w, h): (usize, usize, usize, usize),
    out_w: usize,
    out_h: usize,
) -> RgbImage {
    use fast_image_resize::{images::Image, FilterType, PixelType, ResizeAlg, ResizeOptions};
    thread_local! {
        static RESIZER: std::cell::RefCell<fast_image_resize::Resizer> =
            std::cell::RefCell::new(fast_image_resize::Resizer::new());
    }
    let src = fast_image_resize::images::ImageRef::new(
        img.width as u32,
        img.height as u32,
        &img.data,
        PixelType::U8x3,
    );
    let mut dst = Image::new(out_w as u32, out_h as u32, PixelType::U8x3);
    let opts = ResizeOptions::new()
        .resize_alg(ResizeAlg::Convolution(FilterType::CatmullRom))
        .crop(x0 as f64, y0 as f64, w as f64, h as f64);
    let done = src
        .ok()
        .is_some_and(|src| RESIZER.with(|r| r.borrow_mut().resize(&src, &mut dst, &opts).is_ok()));
    if !done {
        // Only reachable on an inconsistent image; the exact resampler handles every valid input.
        return resize_bicubic_crop(img, (x0, y0, w, h), out_w, out_h);
    }
    RgbImage {
        width: out_w,
        height: out_h,
        data: dst.into_vec(),
    }
}

/// PIL bicubic resize of the whole image.
pub fn resize_bicubic(img: &RgbImage, out_w: usize, out_h: usize) -> RgbImage {
    resize_bicubic_crop(img, (0, 0, img.width, img.height), out_w, out_h)
}

/// `ToTensor()` then `Normalize(mean, std)` in float32: CHW values `(v / 255 - mean) / std`.
pub fn to_normalized_chw(img: &RgbImage, mean: [f32; 3], std: [f32; 3]) -> Vec<f32> {
    let mut lut = [[0f32; 256]; 3];
    for (c, table) in lut.iter_mut().enumerate() {
        for (v, out) in table.iter_mut().enumerate() {
            *out = (v as f32 / 255.0 - mean[c]) / std[c];
        }
    }
    let plane = img.width * img.height;
    let mut out = vec![0f32; plane * 3];
    let (r, rest) = out.split_at_mut(plane);
    let (g, b) = rest.split_at_mut(plane);
    for (i, p) in img.data.chunks_exact(3).enumerate() {
        r[i] = lut[0][p[0] as usize];
        g[i] = lut[1][p[1] as usize];
        b[i] = lut[2][p[2] as usize];
    }
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use sha2::{Digest, Sha256};

    /// `n` bytes from splitmix64 seeded with `seed`, each output little-endian (as
    /// `scripts/pil-resize-cases.py` and `scripts/randaugment-cases.py`).
    pub(crate) fn splitmix64_bytes(seed: u64, n: usize) -> Vec<u8> {
        let mut state = seed;
        let mut out = Vec::with_capacity(n + 8);
        while out.len() < n {
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            out.extend_from_slice(&z.to_le_bytes());
        }
        out.truncate(n);
        out
    }

    #[test]
    fn splitmix64_matches_the_reference_sequence() {
        // First output for seed 0 from the splitmix64 reference implementation.
        assert_eq!(
            splitmix64_bytes(0, 8),
            0xE220_A839_7B1D_CDAFu64.to_le_bytes()
        );
    }

    /// Every case of `tests/fixtures/pil_resize/cases.json` (Pillow 13 `Image.resize(BICUBIC)` of a
    /// noise image, by `scripts/pil-resize-cases.py`) is bit-exact.
    #[test]
    fn bicubic_resize_matches_pil_on_every_case() {
        let doc: serde_json::Value =
            serde_json::from_str(include_str!("../../tests/fixtures/pil_resize/cases.json"))
                .expect("cases.json parses");
        let cases = doc["cases"].as_array().expect("cases array");
        assert!(cases.len() >= 300, "only {} cases", cases.len());
        let mut failed = Vec::new();
        for case in cases {
            let f = case.as_array().expect("case row");
            let dim = |i: usize| f[i].as_u64().expect("size") as usize;
            let (w, h, ow, oh) = (dim(0), dim(1), dim(2), dim(3));
            let seed = f[4].as_u64().expect("seed");
            let (kind, want) = (f[5].as_str().unwrap(), f[6].as_str().unwrap());
            let img = RgbImage::new(w, h, splitmix64_bytes(seed, w * h * 3)).unwrap();
            let out = resize_bicubic(&img, ow, oh);
            assert_eq!(
                (out.width, out.height, out.data.len()),
                (ow, oh, ow * oh * 3)
            );
            if hex::encode(Sha256::digest(&out.data)) != want {
                failed.push(format!("{w}x{h} -> {ow}x{oh} ({kind}, seed {seed})"));
            }
        }
        assert!(
            failed.is_empty(),
            "{} of {} resizes differ from PIL:\n{}",
            failed.len(),
            cases.len(),
            failed.join("\n")
        );
    }
}
