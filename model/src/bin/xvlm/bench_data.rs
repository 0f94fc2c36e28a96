//! `xvlm bench-data`: decode + full pre-training transform (RandomResizedCrop 0.2-1 bicubic, flip,
//! RandAugment(2, 7), ToTensor, Normalize) over the JPEGs of a folder; prints images/s per thread last.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use xvlm_model::data::rng::{rng_for, Purpose};
use xvlm_model::data::transform::TrainTransform;

#[derive(clap::Args)]
pub struct BenchDataArgs {
    /// Folder of JPEG files.
    #[arg(long, required_unless_present = "photo_like")]
    images: Option<PathBuf>,
    /// Instead of a folder, generate this many photo-like 640x480 JPEGs in memory (textures at many
    /// frequencies plus sensor-like noise, quality 92): they decode slower than flat synthetic shapes.
    #[arg(long)]
    photo_like: Option<usize>,
    /// Output resolution.
    #[arg(long, default_value_t = 224)]
    res: usize,
    /// Images to transform in total.
    #[arg(long, default_value_t = 500)]
    n: usize,
    /// Worker threads.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Decode every JPEG at full size (no DCT-scaled decode shortcut).
    #[arg(long)]
    full_decode: bool,
    /// Training decode through libjpeg-turbo (DCT scaling, stop below the crop) even without the
    /// `simd-jpeg` feature.
    #[arg(long)]
    libjpeg: bool,
}

/// Run the benchmark; the last line is the per-thread rate.
pub fn run(args: &BenchDataArgs) -> Result<()> {
    let blobs = match (&args.images, args.photo_like) {
        (_, Some(n)) => (0..n.max(1))
            .map(|i| photo_like_jpeg(i as u64, 640, 480))
            .collect::<Result<Vec<_>>>()?,
        (Some(dir), None) => read_jpegs(dir)?,
        (None, None) => bail!("give --images DIR or --photo-like N"),
    };
    let threads = args.threads.max(1);
    let mut transform = TrainTransform::pretrain(args.res);
    transform.libjpeg_decode |= args.libjpeg;
    let start = Instant::now();
    let (failures, cpu_ns): (usize, Option<u64>) = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let blobs = &blobs;
                let transform = &transform;
                let full = args.full_decode;
                let n = args.n;
                s.spawn(move || {
                    let cpu0 = thread_cpu_ns();
                    let mut failed = 0usize;
                    for i in (t..n).step_by(threads) {
                        let mut rng = rng_for(0, Purpose::Sample, &[i as u64]);
                        let bytes = &blobs[i % blobs.len()];
                        let out = if full {
                            xvlm_model::data::pixels::decode(bytes)
                                .map(|img| transform.apply(&mut rng, &img))
                        } else {
                            transform.apply_bytes(&mut rng, bytes)
                        };
                        match out {
                            Ok(v) => {
                                std::hint::black_box(v);
                            }
                            Err(_) => failed += 1,
                        }
                    }
                    (
                        failed,
                        thread_cpu_ns().zip(cpu0).map(|(b, a)| b.saturating_sub(a)),
                    )
                })
            })
            .collect();
        let mut failures = 0usize;
        let mut cpu = Some(0u64);
        for h in handles {
            let (f, c) = h.join().unwrap_or((usize::MAX, None));
            failures = failures.saturating_add(f);
            cpu = cpu.zip(c).map(|(a, b)| a + b);
        }
        (failures, cpu)
    });
    let secs = start.elapsed().as_secs_f64();
    let rate = args.n as f64 / secs;
    println!(
        "{} images ({} files, {} failed) at {} in {:.3}s with {threads} thread(s): {:.1} images/s total",
        args.n,
        blobs.len(),
        failures,
        args.res,
        secs,
        rate
    );
    // The machine may be shared: CPU time (from /proc) gives the rate per busy core as well.
    let per_cpu = cpu_ns
        .filter(|&ns| ns > 0)
        .map(|ns| {
            format!(
                " ({:.1} images per CPU-second)",
                args.n as f64 / (ns as f64 * 1e-9)
            )
        })
        .unwrap_or_default();
    println!("{:.1} images/s per thread{per_cpu}", rate / threads as f64);
    Ok(())
}

fn read_jpegs(dir: &std::path::Path) -> Result<Vec<Vec<u8>>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("listing {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| e.eq_ignore_ascii_case("jpg") || e.eq_ignore_ascii_case("jpeg"))
        })
        .collect();
    files.sort();
    if files.is_empty() {
        bail!("no .jpg files in {}", dir.display());
    }
    files
        .iter()
        .map(|p| std::fs::read(p).with_context(|| format!("reading {}", p.display())))
        .collect()
}

/// A deterministic textured image: per channel a sum of random plane waves from coarse to fine (like
/// the 1/f spectrum of natural images), hard-edged blobs, and per-pixel noise, JPEG quality 92.
fn photo_like_jpeg(seed: u64, w: usize, h: usize) -> Result<Vec<u8>> {
    use rand::Rng;
    let mut rng = rng_for(seed, Purpose::Sample, &[0x9407]);
    let mut waves = Vec::new();
    for octave in 0..6 {
        let freq = 0.004 * f32::powi(2.3, octave);
        for _ in 0..3 {
            let angle: f32 = rng.random_range(0.0..std::f32::consts::TAU);
            let amp = [0, 1, 2].map(|_| rng.random_range(10.0..40.0f32) / (1.0 + octave as f32));
            let phase: f32 = rng.random_range(0.0..std::f32::consts::TAU);
            waves.push((freq * angle.cos(), freq * angle.sin(), phase, amp));
        }
    }
    let blobs: Vec<(f32, f32, f32, [f32; 3])> = (0..12)
        .map(|_| {
            (
                rng.random_range(0.0..w as f32),
                rng.random_range(0.0..h as f32),
                rng.random_range(10.0..120.0f32),
                [0, 1, 2].map(|_| rng.random_range(-60.0..60.0f32)),
            )
        })
        .collect();
    let base = [0, 1, 2].map(|_| rng.random_range(70.0..180.0f32));
    let mut data = vec![0u8; w * h * 3];
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    for y in 0..h {
        for x in 0..w {
            let (fx, fy) = (x as f32, y as f32);
            let mut v = base;
            for &(kx, ky, ph, amp) in &waves {
                let s = (kx * fx + ky * fy + ph).sin();
                for c in 0..3 {
                    v[c] += amp[c] * s;
                }
            }
            for &(bx, by, r, col) in &blobs {
                if (fx - bx).powi(2) + (fy - by).powi(2) < r * r {
                    for c in 0..3 {
                        v[c] += col[c];
                    }
                }
            }
            for (c, val) in v.iter().enumerate() {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                let noise = (state % 13) as f32 - 6.0;
                data[(y * w + x) * 3 + c] = (val + noise).clamp(0.0, 255.0) as u8;
            }
        }
    }
    let mut jpeg = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpeg, 92)
        .encode(&data, w as u32, h as u32, image::ExtendedColorType::Rgb8)
        .context("encoding a photo-like JPEG")?;
    Ok(jpeg)
}

/// On-CPU time of the calling thread in ns (Linux `/proc/thread-self/schedstat`), if available.
fn thread_cpu_ns() -> Option<u64> {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}
