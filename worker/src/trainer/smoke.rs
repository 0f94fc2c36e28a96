//! `task: smoke`, the test and demo task: an MLP (features -> hidden -> 1, tanh) regressing a fixed
//! random teacher network on deterministic synthetic samples, trained data-parallel with SGD.
//!
//! Sample i of the global stream depends only on (seed, i). Step s trains on the global batch
//! `s*G .. (s+1)*G` (G = [`BatchPlan::global`]); rank r processes its slice of it in micro-batches of at
//! most the local batch b, accumulating gradients (at the reference world: samples `s*G + r*b .. + b`
//! in one pass). Gradients are averaged across ranks, so any world size follows the same trajectory as
//! one rank with batch G (up to float summation order), and an elastic restart at a smaller world
//! continues the same sample stream.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tch::nn::{self, Module, OptimizerConfig};
use tch::{Device, Tensor};
use xvlm_model::collective::Collective;
use xvlm_proto::spec::SmokeSpec;

use super::batch::BatchPlan;
use super::task::{StepOutput, TaskContext, TaskError, TrainTask};
use crate::comm::{all_reduce_mean_gradients, BUCKET_BYTES};

/// The smoke regression task.
pub struct SmokeTask {
    vs: nn::VarStore,
    model: nn::Sequential,
    opt: nn::Optimizer,
    params: SmokeSpec,
    seed: u64,
    batch: BatchPlan,
    device: Device,
    total_steps: u64,
    teacher: (Tensor, Tensor),
}

impl SmokeTask {
    /// Builds the model from the job seed (identical on every rank, and broadcast from rank 0 as
    /// data-parallel training requires).
    pub fn new(ctx: &TaskContext<'_>) -> Result<Self, TaskError> {
        let params = ctx.spec.smoke_params();
        let (f, h) = (params.features as i64, params.hidden as i64);
        let vs = nn::VarStore::new(ctx.device);
        let root = vs.root();
        let model = nn::seq()
            .add(nn::linear(&root / "fc1", f, h, Default::default()))
            .add_fn(|x| x.tanh())
            .add(nn::linear(&root / "fc2", h, 1, Default::default()));
        let mut rng = ChaCha8Rng::seed_from_u64(ctx.spec.seed);
        init_from_rng(&vs, &mut rng);
        for (_, mut var) in sorted_variables(&vs) {
            ctx.comm.broadcast(&mut var, 0)?;
        }
        let opt = nn::Sgd::default().build(&vs, params.lr)?;
        let mut rng = ChaCha8Rng::seed_from_u64(ctx.spec.seed ^ 0x7ea_c4e5);
        let mut draw = |n: usize, scale: f32| -> Vec<f32> {
            (0..n)
                .map(|_| rng.random_range(-1.0f32..1.0) * scale)
                .collect()
        };
        let teacher = (
            Tensor::from_slice(&draw((f * 8) as usize, 1.0))
                .view([f, 8])
                .to_device(ctx.device),
            Tensor::from_slice(&draw(8, 1.0))
                .view([8, 1])
                .to_device(ctx.device),
        );
        let batch = ctx.batch_plan(params.batch_size as usize);
        Ok(SmokeTask {
            vs,
            model,
            opt,
            params,
            seed: ctx.spec.seed,
            batch,
            device: ctx.device,
            total_steps: ctx.spec.steps.unwrap_or(0),
            teacher,
        })
    }

    /// Features of global samples `start..start+n`, shape `[n, features]`.
    pub fn samples(&self, start: u64, n: usize) -> Tensor {
        let f = self.params.features as usize;
        let mut data = Vec::with_capacity(n * f);
        for i in start..start + n as u64 {
            let mut rng =
                ChaCha8Rng::seed_from_u64(self.seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ i);
            data.extend((0..f).map(|_| rng.random_range(-1.0f32..1.0)));
        }
        Tensor::from_slice(&data)
            .view([n as i64, f as i64])
            .to_device(self.device)
    }

    fn targets(&self, x: &Tensor) -> Tensor {
        tch::no_grad(|| x.matmul(&self.teacher.0).tanh().matmul(&self.teacher.1))
    }
}

/// Overwrites every parameter with U(-1/sqrt(fan_in), 1/sqrt(fan_in)) draws from `rng` (torch's
/// `nn.Linear` default). A private generator, unlike `tch::manual_seed`, keeps initialisation
/// deterministic when several tasks are built concurrently in one process (the data-parallel tests).
fn init_from_rng(vs: &nn::VarStore, rng: &mut ChaCha8Rng) {
    tch::no_grad(|| {
        let variables = vs.variables();
        for (name, mut var) in sorted_variables(vs) {
            let size = var.size();
            let weight = name
                .strip_suffix("bias")
                .map(|layer| format!("{layer}weight"));
            let fan_in = weight
                .and_then(|w| variables.get(&w).map(|w| w.size()[1]))
                .unwrap_or(size[size.len() - 1]);
            let bound = 1.0 / (fan_in as f32).sqrt();
            let values: Vec<f32> = (0..var.numel())
                .map(|_| rng.random_range(-bound..bound))
                .collect();
            var.copy_(
                &Tensor::from_slice(&values)
                    .view(size.as_slice())
                    .to_device(var.device()),
            );
        }
    });
}

fn sorted_variables(vs: &nn::VarStore) -> Vec<(String, Tensor)> {
    let mut vars: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    vars
}

impl TrainTask for SmokeTask {
    fn total_steps(&self) -> u64 {
        self.total_steps
    }

    fn step(&mut self, step: u64, comm: &dyn Collective) -> Result<StepOutput, TaskError> {
        let first = step * self.batch.global as u64;
        let scale = self.batch.loss_scale();
        self.opt.zero_grad();
        let mut squared = 0f64;
        for micro in self.batch.micro_batches() {
            let x = self.samples(first + micro.start as u64, micro.len());
            let y = self.targets(&x);
            let sum = self.model.forward(&x).mse_loss(&y, tch::Reduction::Sum);
            (&sum * scale).backward();
            squared += sum.double_value(&[]);
        }
        let params: Vec<Tensor> = sorted_variables(&self.vs)
            .into_iter()
            .map(|(_, t)| t)
            .collect();
        all_reduce_mean_gradients(&params, comm, BUCKET_BYTES)?;
        self.opt.step();
        let mut global = Tensor::from_slice(&[squared as f32]).to_device(self.device);
        comm.all_reduce_sum(&mut global)?;
        let mse = global.double_value(&[0]) / self.batch.global as f64;
        if self.params.step_delay_ms > 0 {
            std::thread::sleep(std::time::Duration::from_millis(self.params.step_delay_ms));
        }
        Ok(StepOutput {
            losses: vec![("mse".into(), mse)],
            lrs: vec![self.params.lr],
            grad_norm: None,
            samples: self.batch.slice().len(),
            metrics: Vec::new(),
        })
    }

    fn lr(&self) -> f64 {
        self.params.lr
    }

    fn state(&self) -> Vec<(String, Tensor)> {
        sorted_variables(&self.vs)
    }

    /// The sample stream is a function of the step and the batch plan, and SGD without momentum has
    /// no state: the weights are all a resume at another world size needs.
    fn restore_resharded(
        &mut self,
        weights: &[(String, Tensor)],
        extra: &[(String, Tensor)],
        _metas: &[serde_json::Value],
        _saved_world: usize,
        _world: usize,
    ) -> Result<(), TaskError> {
        self.restore(weights, extra, &serde_json::Value::Null)
    }
}
