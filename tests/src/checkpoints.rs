//! Helpers of the checkpoint and failure tests: committed steps, trainer pids and logs of a
//! generation, the resumed step, and weight comparison.

use std::path::{Path, PathBuf};

use crate::{write, Cluster};

/// Steps (ascending) of the committed checkpoints (those with a `MANIFEST.json`) under a job's output.
pub fn committed_checkpoints(output: &Path) -> Vec<u64> {
    let mut steps: Vec<u64> = std::fs::read_dir(output.join("checkpoints"))
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter(|e| e.path().join("MANIFEST.json").is_file())
                .filter_map(|e| e.file_name().to_str()?.strip_prefix("step-")?.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    steps.sort_unstable();
    steps
}

/// `rank -> pid` of the trainers a worker started for generation `g` of `job`.
pub fn trainer_pids(dir: &Path, worker: &str, job: &str, g: u64) -> Vec<(usize, u32)> {
    let gen_dir = dir.join(format!("work-{worker}/{job}/g{g}"));
    let mut out: Vec<(usize, u32)> = std::fs::read_dir(gen_dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|e| e == "pid"))
                .filter_map(|p| {
                    let rank = p
                        .file_stem()?
                        .to_str()?
                        .strip_prefix("rank")?
                        .parse()
                        .ok()?;
                    let pid = std::fs::read_to_string(&p).ok()?.trim().parse().ok()?;
                    Some((rank, pid))
                })
                .collect()
        })
        .unwrap_or_default();
    out.sort_unstable();
    out
}

/// Every trainer log of generation `g` of `job` on the named workers, concatenated.
pub fn gen_logs(dir: &Path, workers: &[&str], job: &str, g: u64) -> String {
    let mut paths: Vec<PathBuf> = Vec::new();
    for w in workers {
        if let Ok(rd) = std::fs::read_dir(dir.join(format!("work-{w}/{job}/g{g}"))) {
            paths.extend(
                rd.filter_map(|e| e.ok())
                    .map(|e| e.path())
                    .filter(|p| p.extension().is_some_and(|e| e == "log")),
            );
        }
    }
    paths.sort();
    paths
        .iter()
        .map(|p| std::fs::read_to_string(p).unwrap_or_default())
        .collect::<Vec<_>>()
        .join("\n")
}

/// The step a generation's log says it resumed from.
pub fn resumed_step(logs: &str) -> Option<u64> {
    step_after(logs, "resuming from committed checkpoint step-")
}

/// The number right after the first `marker` in `logs`.
pub fn step_after(logs: &str, marker: &str) -> Option<u64> {
    logs.split(marker)
        .nth(1)?
        .split(|ch: char| !ch.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

/// The f32 tensors of a safetensors file, by name.
pub fn f32_tensors(path: &Path) -> Vec<(String, Vec<f32>)> {
    let data = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = safetensors::SafeTensors::deserialize(&data).expect("safetensors");
    let mut out: Vec<(String, Vec<f32>)> = st
        .tensors()
        .into_iter()
        .map(|(name, view)| {
            assert_eq!(view.dtype(), safetensors::Dtype::F32, "{name}");
            let values = view
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            (name, values)
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// Largest absolute difference between two weight files with the same tensors.
pub fn max_weight_diff(a: &Path, b: &Path) -> f64 {
    let (a, b) = (f32_tensors(a), f32_tensors(b));
    assert!(!a.is_empty());
    assert_eq!(
        a.iter().map(|t| &t.0).collect::<Vec<_>>(),
        b.iter().map(|t| &t.0).collect::<Vec<_>>()
    );
    a.iter()
        .zip(&b)
        .flat_map(|(x, y)| x.1.iter().zip(&y.1).map(|(p, q)| (p - q).abs() as f64))
        .fold(0.0, f64::max)
}

/// The last line of `watch` output that names the job's state.
pub fn last_line(watch: &str) -> &str {
    watch.lines().last().unwrap_or_default()
}

/// Runs `job` again, uninterrupted, on the cluster (which must have two free workers) and returns the
/// largest weight difference between its final weights and those under `output`.
pub fn diff_to_uninterrupted_world_2(c: &Cluster, output: &Path, job: &str) -> f64 {
    let reference = c.submit(&write(&c.dir, "again.yaml", job));
    let watch = c.watch_succeeded(&reference);
    assert!(last_line(&watch).contains("world=2"), "{watch}");
    max_weight_diff(
        &output.join("final/model.safetensors"),
        &c.dir
            .join("runs")
            .join(&reference)
            .join("final/model.safetensors"),
    )
}

/// sha256 of every tensor's bytes in a safetensors file, by name (sorted).
pub fn tensor_hashes(path: &Path) -> Vec<(String, String)> {
    use sha2::{Digest, Sha256};
    let data = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = safetensors::SafeTensors::deserialize(&data).expect("safetensors");
    let mut out: Vec<(String, String)> = st
        .tensors()
        .into_iter()
        .map(|(name, view)| {
            let digest = Sha256::digest(view.data());
            (name, digest.iter().map(|b| format!("{b:02x}")).collect())
        })
        .collect();
    out.sort();
    out
}
