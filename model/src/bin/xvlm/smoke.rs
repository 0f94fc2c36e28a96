//! `xvlm smoke-train`: a tiny MLP on a fixed regression task, to show the tensor stack trains, and with
//! `--compare-cuda` that CUDA steps agree with the CPU.

use anyhow::{bail, ensure, Result};
use tch::nn::{self, Module, OptimizerConfig};
use tch::{Device, Kind, Tensor};

#[derive(clap::Args)]
pub struct SmokeArgs {
    /// Optimizer steps.
    #[arg(long, default_value_t = 200)]
    steps: usize,
    /// Also train on CUDA device 0 from the same start (TF32 off) and compare every step's loss.
    #[arg(long)]
    compare_cuda: bool,
    /// Largest relative difference allowed between CPU and CUDA losses.
    #[arg(long, default_value_t = 1e-4)]
    tolerance: f64,
}

pub fn run(args: &SmokeArgs) -> Result<()> {
    let cpu = train_mlp(args.steps, Device::Cpu)?;
    let (first, last) = (cpu[0], cpu[cpu.len() - 1]);
    println!(
        "cpu: mlp loss {first:.5} -> {last:.5} after {} steps",
        args.steps
    );
    ensure!(
        last < first / 10.0,
        "loss did not drop tenfold ({first} -> {last})"
    );
    if args.compare_cuda {
        if !tch::Cuda::is_available() {
            bail!("--compare-cuda: libtorch sees no CUDA device (see `xvlm doctor`)");
        }
        xvlm_model::runtime::set_allow_tf32(false);
        let cuda = train_mlp(args.steps, Device::Cuda(0))?;
        let worst = cpu
            .iter()
            .zip(&cuda)
            .map(|(a, b)| (a - b).abs() / a.abs().max(1e-12))
            .fold(0.0f64, f64::max);
        println!(
            "cuda: mlp loss {:.5} -> {:.5}; max relative difference to cpu over {} steps {worst:.2e} (tolerance {:.0e})",
            cuda[0],
            cuda[cuda.len() - 1],
            args.steps,
            args.tolerance
        );
        ensure!(
            worst <= args.tolerance,
            "cuda and cpu losses differ by {worst:.2e}"
        );
    }
    Ok(())
}

/// Fits y = sin(x0) + x1 * x2 with a 3-32-1 MLP from a fixed CPU initialisation; returns every loss.
fn train_mlp(steps: usize, device: Device) -> Result<Vec<f64>> {
    ensure!(steps > 0, "--steps must be at least 1");
    tch::manual_seed(0);
    let mut vs = nn::VarStore::new(Device::Cpu);
    let root = vs.root();
    let mlp = nn::seq()
        .add(nn::linear(&root / "fc1", 3, 32, Default::default()))
        .add_fn(|x| x.tanh())
        .add(nn::linear(&root / "fc2", 32, 1, Default::default()));
    let x = Tensor::randn([256, 3], (Kind::Float, Device::Cpu));
    let y = (x.select(1, 0).sin() + x.select(1, 1) * x.select(1, 2)).unsqueeze(1);
    vs.set_device(device);
    let (x, y) = (x.to(device), y.to(device));
    let mut opt = nn::Adam::default().build(&vs, 1e-2)?;
    let mut losses = Vec::with_capacity(steps);
    for _ in 0..steps {
        let loss = mlp.forward(&x).mse_loss(&y, tch::Reduction::Mean);
        opt.backward_step(&loss);
        losses.push(loss.double_value(&[]));
    }
    Ok(losses)
}
