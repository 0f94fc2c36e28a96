//! `xvlm parity CASE_DIR`: run a parity fixture case and compare every expected tensor.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use xvlm_model::parity::{run_case_on, WeightsSource};

/// Where the case's model weights are read from.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Weights {
    /// `model.th` if present, else `model.safetensors`.
    Auto,
    /// The official `torch.save` file `model.th`.
    Th,
    /// `model.safetensors`.
    Safetensors,
}

/// Arguments of `xvlm parity`.
#[derive(Debug, Args)]
pub struct ParityArgs {
    /// Case folder holding `case.yaml`, the inputs and `expected.safetensors`.
    pub case_dir: PathBuf,
    /// Also write the per-tensor report as JSON to this file.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Which weights file of the case to load.
    #[arg(long, value_enum, default_value_t = Weights::Auto)]
    pub weights: Weights,
    /// Where the model runs: `cpu`, `cuda` or `cuda:N` (expected tensors are compared on the CPU).
    #[arg(long, default_value = "cpu", value_parser = parse_device)]
    pub device: tch::Device,
}

fn parse_device(s: &str) -> Result<tch::Device, String> {
    match s {
        "cpu" => Ok(tch::Device::Cpu),
        "cuda" => Ok(tch::Device::Cuda(0)),
        _ => s
            .strip_prefix("cuda:")
            .and_then(|n| n.parse().ok())
            .map(tch::Device::Cuda)
            .ok_or_else(|| format!("expected cpu, cuda or cuda:N, got {s:?}")),
    }
}

/// Runs the case, prints one line per compared tensor, fails if any tensor fails.
pub fn run(args: &ParityArgs) -> Result<()> {
    let source = match args.weights {
        Weights::Auto => WeightsSource::Auto,
        Weights::Th => WeightsSource::TorchSave,
        Weights::Safetensors => WeightsSource::Safetensors,
    };
    if args.device.is_cuda() && !tch::Cuda::is_available() {
        bail!(
            "--device {:?}: CUDA is not available to this libtorch",
            args.device
        );
    }
    let report = run_case_on(&args.case_dir, source, args.device)
        .with_context(|| format!("parity case {}", args.case_dir.display()))?;
    for row in &report.rows {
        println!("{row}");
    }
    let failed = report.failures().len();
    println!(
        "{}: kind {}, {} compared, {} failed",
        args.case_dir.display(),
        report.kind,
        report.rows.len(),
        failed
    );
    if let Some(out) = &args.out {
        let json: Vec<serde_json::Value> = report
            .rows
            .iter()
            .map(|r| {
                serde_json::json!({
                    "name": r.name,
                    "max_abs": if r.max_abs.is_finite() { Some(r.max_abs) } else { None },
                    "max_rel": if r.max_rel.is_finite() { Some(r.max_rel) } else { None },
                    "passed": r.passed,
                    "note": r.note,
                })
            })
            .collect();
        let doc = serde_json::json!({
            "case": args.case_dir.display().to_string(),
            "kind": report.kind,
            "passed": report.passed(),
            "rows": json,
        });
        std::fs::write(out, serde_json::to_string_pretty(&doc)?)
            .with_context(|| format!("writing {}", out.display()))?;
    }
    if !report.passed() {
        let names: Vec<&str> = report.failures().iter().map(|r| r.name.as_str()).collect();
        bail!(
            "{failed} of {} failed: {}",
            report.rows.len(),
            names.join(", ")
        );
    }
    Ok(())
}
