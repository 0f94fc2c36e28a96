//! libtorch trains through tch on this machine: a tiny MLP's loss drops at least tenfold.

use tch::nn::{self, Module, OptimizerConfig};
use tch::{Device, Kind, Tensor};

/// Proves autograd, an optimizer and the CPU kernels work end to end (factor 10 in 300 AdamW steps).
#[test]
fn tiny_mlp_loss_drops_tenfold() {
    tch::manual_seed(7);
    let vs = nn::VarStore::new(Device::Cpu);
    let root = vs.root();
    let mlp = nn::seq()
        .add(nn::linear(&root / "fc1", 4, 32, Default::default()))
        .add_fn(|x| x.relu())
        .add(nn::linear(&root / "fc2", 32, 1, Default::default()));
    let x = Tensor::randn([128, 4], (Kind::Float, Device::Cpu));
    let y = (x.select(1, 0) * 2.0 - x.select(1, 3) + x.select(1, 1).cos()).unsqueeze(1);
    let mut opt = nn::AdamW::default().build(&vs, 1e-2).expect("optimizer");
    let first = mlp
        .forward(&x)
        .mse_loss(&y, tch::Reduction::Mean)
        .double_value(&[]);
    for _ in 0..300 {
        let loss = mlp.forward(&x).mse_loss(&y, tch::Reduction::Mean);
        opt.backward_step(&loss);
    }
    let last = mlp
        .forward(&x)
        .mse_loss(&y, tch::Reduction::Mean)
        .double_value(&[]);
    assert!(
        last * 10.0 < first,
        "loss {first} -> {last} did not drop tenfold"
    );
}
