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
    #[arg(long)]
    images: PathBuf,
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
}

/// Run the benchmark; the last line is the per-thread rate.
pub fn run(args: &BenchDataArgs) -> Result<()> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(&args.images)
        .with_context(|| format!("listing {}", args.images.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| e.eq_ignore_ascii_case("jpg") || e.eq_ignore_ascii_case("jpeg"))
        })
        .collect();
    files.sort();
    if files.is_empty() {
        bail!("no .jpg files in {}", args.images.display());
    }
    let blobs: Vec<Vec<u8>> = files
        .iter()
        .map(|p| std::fs::read(p).with_context(|| format!("reading {}", p.display())))
        .collect::<Result<_>>()?;
    let threads = args.threads.max(1);
    let transform = TrainTransform::pretrain(args.res);
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

/// On-CPU time of the calling thread in ns (Linux `/proc/thread-self/schedstat`), if available.
fn thread_cpu_ns() -> Option<u64> {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}
