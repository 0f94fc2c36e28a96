//! `xvlm smoke-train`: a tiny MLP on a fixed regression task, to show the tensor stack trains.

use anyhow::{ensure, Result};
use tch::nn::{self, Module, OptimizerConfig};
use tch::{Device, Kind, Tensor};

#[derive(clap::Args)]
pub struct SmokeArgs {
    /// Optimizer steps.
    #[arg(long, default_value_t = 200)]
    steps: usize,
    /// Run on CUDA device 0 when available.
    #[arg(long)]
    cuda: bool,
}

pub fn run(args: &SmokeArgs) -> Result<()> {
    let device = if args.cuda && tch::Cuda::is_available() {
        Device::Cuda(0)
    } else {
        Device::Cpu
    };
    let (first, last) = train_mlp(args.steps, device)?;
    println!(
        "device {device:?}: mlp loss {first:.5} -> {last:.5} after {} steps",
        args.steps
    );
    ensure!(
        last < first / 10.0,
        "loss did not drop tenfold ({first} -> {last})"
    );
    Ok(())
}

/// Fits y = sin(x0) + x1 * x2 with a 3-32-1 MLP; returns the first and last loss.
pub fn train_mlp(steps: usize, device: Device) -> Result<(f64, f64)> {
    tch::manual_seed(0);
    let vs = nn::VarStore::new(device);
    let root = vs.root();
    let mlp = nn::seq()
        .add(nn::linear(&root / "fc1", 3, 32, Default::default()))
        .add_fn(|x| x.tanh())
        .add(nn::linear(&root / "fc2", 32, 1, Default::default()));
    let x = Tensor::randn([256, 3], (Kind::Float, device));
    let y = x.select(1, 0).sin() + x.select(1, 1) * x.select(1, 2);
    let y = y.unsqueeze(1);
    let mut opt = nn::Adam::default().build(&vs, 1e-2)?;
    let mut first = f64::NAN;
    let mut last = f64::NAN;
    for step in 0..steps {
        let loss = mlp.forward(&x).mse_loss(&y, tch::Reduction::Mean);
        opt.backward_step(&loss);
        last = loss.double_value(&[]);
        if step == 0 {
            first = last;
        }
    }
    Ok((first, last))
}
