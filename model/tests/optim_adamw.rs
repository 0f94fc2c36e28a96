//! The optimizer against hand-computed transformers-4.12.5 AdamW formulas, the official param groups, the
//! LambdaLR schedule, clipping, accumulation, cross-rank averaging and state round trips.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};

use tch::{nn::VarStore, Device, Kind, Tensor};
use xvlm_model::collective::{Collective, CollectiveError};
use xvlm_model::config::{OptimizerConfig, SchedulerConfig};
use xvlm_model::optim::{
    group_index, is_pretrain_init_param, named_trainable_params, AdamW, DynamicLossScaler,
    GradAccumulator, Gradients, LinearSchedule, NamedParam, Scheduler,
};

const B1: f64 = 0.9;
const B2: f64 = 0.98;
const EPS: f64 = 1e-8;

fn param(name: &str, values: &[f32]) -> NamedParam {
    NamedParam {
        name: name.into(),
        tensor: Tensor::from_slice(values).set_requires_grad(true),
    }
}

fn config(lr: f64, weight_decay: f64, lr_mult: f64) -> OptimizerConfig {
    OptimizerConfig {
        opt: "adamW".into(),
        lr,
        weight_decay,
        lr_mult: Some(lr_mult),
    }
}

fn values(t: &Tensor) -> Vec<f64> {
    Vec::<f64>::try_from(t.to_kind(Kind::Double)).unwrap()
}

/// Gradients given directly, one per parameter (None = no gradient this step).
fn grads(gs: &[Option<&[f32]>]) -> Gradients {
    Gradients::from_options(gs.iter().map(|g| g.map(Tensor::from_slice)).collect())
}

/// The reference: transformers 4.12.5 AdamW on f64 scalars, for one element over a gradient sequence.
fn reference_adamw(mut p: f64, gs: &[f64], lrs: &[f64], wd: f64) -> f64 {
    let (mut m, mut v) = (0.0, 0.0);
    for (t, (&g, &lr)) in gs.iter().zip(lrs).enumerate() {
        let t = (t + 1) as f64;
        m = B1 * m + (1.0 - B1) * g;
        v = B2 * v + (1.0 - B2) * g * g;
        let denom = v.sqrt() + EPS;
        let step = lr * (1.0 - B2.powf(t)).sqrt() / (1.0 - B1.powf(t));
        p -= step * m / denom;
        p -= lr * wd * p;
    }
    p
}

fn assert_close(got: &[f64], want: &[f64], rel: f64, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= rel * w.abs().max(1e-12),
            "{what}[{i}]: got {g}, want {w}"
        );
    }
}

/// Three steps with weight decay match the hand formula; decay before the update would not.
#[test]
fn adamw_matches_hand_computed_steps_with_decay_after_update() {
    let (lr, wd) = (0.1, 0.5);
    let p0 = [1.0f32, -2.0, 0.5];
    let gs = [[0.3f32, -1.0, 2.0], [0.1, 0.4, -0.2], [-0.5, 0.0, 1.0]];
    let mut opt = AdamW::new(vec![param("w", &p0)], &config(lr, wd, 1.0), |_| false).unwrap();
    for g in &gs {
        opt.step(&grads(&[Some(g)])).unwrap();
    }
    let got = values(&opt.params()[0].tensor);
    let want: Vec<f64> = (0..3)
        .map(|j| {
            let g: Vec<f64> = gs.iter().map(|g| g[j] as f64).collect();
            reference_adamw(p0[j] as f64, &g, &[lr; 3], wd)
        })
        .collect();
    assert_close(&got, &want, 1e-6, "weights");

    // The same run with the decay applied to the weights before the update differs clearly.
    let decay_first: f64 = {
        let (mut p, mut m, mut v) = (p0[0] as f64, 0.0, 0.0);
        for (t, g) in gs.iter().enumerate() {
            let (g, t) = (g[0] as f64, (t + 1) as f64);
            m = B1 * m + (1.0 - B1) * g;
            v = B2 * v + (1.0 - B2) * g * g;
            p -= lr * wd * p;
            p -= lr * (1.0 - B2.powf(t)).sqrt() / (1.0 - B1.powf(t)) * m / (v.sqrt() + EPS);
        }
        p
    };
    assert!((got[0] - decay_first).abs() > 1e-3);
    let state = opt.state(0).unwrap();
    assert_eq!(state.step, 3);
}

/// eps is added to sqrt(v) before the bias correction is folded into the step: with a gradient of
/// 1e-7 the first update is lr·(1.414e-8 / 2.414e-8) ≈ 0.586·lr, not ≈ lr as in torch.optim.AdamW.
#[test]
fn adamw_bias_correction_and_eps_placement() {
    let lr = 0.01;
    let mut opt = AdamW::new(vec![param("w", &[0.0, 0.0])], &config(lr, 0.0, 1.0), |_| {
        false
    })
    .unwrap();
    opt.step(&grads(&[Some(&[1e-7, 3.0])])).unwrap();
    let got = values(&opt.params()[0].tensor);
    let small = (1.0 - B2).sqrt() * 1e-7;
    let want_small = -lr * (1.0 - B2).sqrt() / (1.0 - B1) * ((1.0 - B1) * 1e-7) / (small + EPS);
    assert!(
        (got[0] - want_small).abs() < 1e-9,
        "{} vs {want_small}",
        got[0]
    );
    assert!((got[0] / -lr - 0.5858).abs() < 1e-3);
    // A large gradient: the bias-corrected first step has size lr.
    assert!((got[1] + lr).abs() < 1e-7, "{}", got[1]);
}

/// Group membership follows the name; lr_mult scales groups 2 and 3; a parameter without a gradient in
/// a step is not touched (no decay either) and its own step counter lags.
#[test]
fn groups_lr_mult_and_parameters_without_gradient() {
    let params = vec![
        param("vision_encoder.layers.0.blocks.0.mlp.fc1.weight", &[1.0]),
        param("vision_encoder.layers.0.blocks.0.norm1.bias", &[1.0]),
        param("itm_head.1.weight", &[1.0]),
        param("bbox_head.3.bias", &[1.0]),
    ];
    let is_new = |n: &str| n.starts_with("itm_head.") || n.starts_with("bbox_head.");
    let (lr, wd) = (0.01, 0.1);
    let mut opt = AdamW::new(params, &config(lr, wd, 2.0), is_new).unwrap();
    let members: Vec<Vec<usize>> = opt.groups().iter().map(|g| g.params.clone()).collect();
    assert_eq!(members, vec![vec![0], vec![1], vec![2], vec![3]]);
    let decays: Vec<f64> = opt.groups().iter().map(|g| g.weight_decay).collect();
    assert_eq!(decays, vec![wd, 0.0, wd, 0.0]);
    opt.set_lr_factor(0.5);
    assert_eq!(opt.lrs(), vec![0.005, 0.005, 0.01, 0.01]);

    // Step 1: bbox_head has no gradient.
    opt.step(&grads(&[Some(&[2.0]), Some(&[2.0]), Some(&[2.0]), None]))
        .unwrap();
    let after1: Vec<f64> = opt.params().iter().map(|p| values(&p.tensor)[0]).collect();
    assert_close(
        &after1[..3],
        &[
            reference_adamw(1.0, &[2.0], &[0.005], wd),
            reference_adamw(1.0, &[2.0], &[0.005], 0.0),
            reference_adamw(1.0, &[2.0], &[0.01], wd),
        ],
        1e-6,
        "step 1",
    );
    assert_eq!(after1[3], 1.0);
    assert!(opt.state(3).is_none());

    // Step 2: bbox_head's first update is bias-corrected as t = 1.
    opt.step(&grads(&[
        Some(&[1.0]),
        Some(&[1.0]),
        Some(&[1.0]),
        Some(&[-4.0]),
    ]))
    .unwrap();
    let bbox = values(&opt.params()[3].tensor)[0];
    assert_close(
        &[bbox],
        &[reference_adamw(1.0, &[-4.0], &[0.01], 0.0)],
        1e-6,
        "bbox",
    );
    assert_eq!(opt.state(3).unwrap().step, 1);
    assert_eq!(opt.state(0).unwrap().step, 2);
}

/// The official grouping of the fixture model: every name of param_groups.json lands in its group
/// under the no-decay substring rule and the §1.8 init_params rule.
#[test]
fn fixture_param_groups_follow_the_name_rules() {
    let path = xvlm_model::fixtures_dir().join("pretrain_train_steps/param_groups.json");
    let text = std::fs::read_to_string(&path).unwrap();
    let groups: Vec<serde_json::Value> = serde_json::from_str(&text).unwrap();
    let mut count = 0;
    for g in &groups {
        let index = g["group"].as_u64().unwrap() as usize;
        for name in g["params"].as_array().unwrap() {
            let name = name.as_str().unwrap();
            assert_eq!(
                group_index(name, is_pretrain_init_param(name)),
                index,
                "{name}"
            );
            count += 1;
        }
    }
    assert_eq!(count, 217);
}

/// LambdaLR "linear": factor 0 at the first step, linear warm-up, linear decay, clamped at 0.
#[test]
fn linear_schedule_values() {
    let cfg = SchedulerConfig {
        sched: "linear".into(),
        lr: 1e-3,
        epochs: 1.0,
        num_warmup_steps: 2.0,
        num_training_steps: None,
    };
    let schedule = LinearSchedule::from_config(&cfg, 10).unwrap();
    let factors: Vec<f64> = (0..12).map(|s| schedule.factor(s)).collect();
    let want = [
        0.0, 0.5, 1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125, 0.0, 0.0,
    ];
    assert_close(&factors[..10], &want[..10], 1e-15, "factors");
    assert_eq!(&factors[10..], &[0.0, 0.0]);
    let no_warmup = LinearSchedule {
        warmup: 0,
        total: 4,
    };
    assert_eq!(no_warmup.factor(0), 1.0);
    assert_eq!(no_warmup.factor(3), 0.25);

    let mut sched = Scheduler::new(schedule);
    let mut opt = AdamW::new(vec![param("w", &[1.0])], &config(1e-3, 0.0, 2.0), |_| true).unwrap();
    opt.set_lr_factor(sched.factor());
    assert_eq!(opt.lrs(), vec![0.0; 4]);
    sched.advance();
    opt.set_lr_factor(sched.factor());
    assert_eq!(opt.lrs(), vec![0.0005, 0.0005, 0.001, 0.001]);
    // An update at lr 0 moves moments but not weights.
    opt.set_lr_factor(0.0);
    opt.step(&grads(&[Some(&[5.0])])).unwrap();
    assert_eq!(values(&opt.params()[0].tensor), vec![1.0]);
    assert_eq!(opt.state(0).unwrap().step, 1);
}

/// clip_grad_norm_: returns the pre-clip norm, scales by max/(norm + 1e-6), ignores missing grads.
#[test]
fn clipping_returns_total_norm_and_scales() {
    let mut g = grads(&[Some(&[3.0]), None, Some(&[0.0, 4.0])]);
    let norm = g.clip_norm(1.0).unwrap();
    assert!((norm - 5.0).abs() < 1e-6);
    let coef = 1.0 / (5.0 + 1e-6);
    assert_close(&values(g.get(0).unwrap()), &[3.0 * coef], 1e-6, "g0");
    assert_close(&values(g.get(2).unwrap())[1..], &[4.0 * coef], 1e-6, "g2");
    assert!(g.get(1).is_none());
    let mut small = grads(&[Some(&[0.3, 0.4])]);
    assert!((small.clip_norm(1.0).unwrap() - 0.5).abs() < 1e-7);
    assert_close(
        &values(small.get(0).unwrap()),
        &[0.3, 0.4],
        1e-7,
        "unclipped",
    );
}

/// Backward gives None for parameters the loss does not use and leaves `.grad` unset; accumulating
/// two half-batches of a mean loss equals the full batch.
#[test]
fn backward_and_accumulation() {
    let params = vec![param("a", &[1.0, 2.0]), param("b", &[3.0])];
    let x = Tensor::from_slice(&[1.0f32, -1.0, 2.0, 0.5]).view([2, 2]);
    let loss_of = |rows: &Tensor| (rows.matmul(&params[0].tensor)).square().mean(Kind::Float);
    let full = Gradients::backward(&loss_of(&x), &params).unwrap();
    assert!(full.get(1).is_none());
    assert!(!params[0].tensor.grad().defined());
    let mut acc = GradAccumulator::new();
    acc.add(Gradients::backward(&loss_of(&x.narrow(0, 0, 1)), &params).unwrap())
        .unwrap();
    acc.add(Gradients::backward(&loss_of(&x.narrow(0, 1, 1)), &params).unwrap())
        .unwrap();
    assert_eq!(acc.micro_batches(), 2);
    let mean = acc.take_mean().unwrap().unwrap();
    assert_close(
        &values(mean.get(0).unwrap()),
        &values(full.get(0).unwrap()),
        1e-6,
        "acc",
    );
    assert!(mean.get(1).is_none());
    assert!(acc.take_mean().unwrap().is_none());
}

/// A stand-in for a 2-rank job whose other rank holds a gradient of all ones for every parameter.
struct OtherRankOnes {
    calls: AtomicUsize,
}

impl Collective for OtherRankOnes {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        2
    }
    fn all_reduce_sum(&self, tensor: &mut Tensor) -> Result<(), CollectiveError> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        let _ = tensor.f_add_scalar_(1.0).unwrap();
        Ok(())
    }
    fn all_gather(&self, tensor: &Tensor) -> Result<Vec<Tensor>, CollectiveError> {
        Ok(vec![tensor.shallow_clone(), tensor.ones_like()])
    }
    fn broadcast(&self, _tensor: &mut Tensor, _root: usize) -> Result<(), CollectiveError> {
        Ok(())
    }
    fn barrier(&self) -> Result<(), CollectiveError> {
        Ok(())
    }
}

/// Averaging over ranks: (local + other) / 2, in buckets; a parameter with no local gradient gets the
/// other rank's gradient / 2.
#[test]
fn all_reduce_mean_in_buckets() {
    let params = vec![
        param("a", &[0.0, 0.0]),
        param("b", &[0.0]),
        param("c", &[0.0; 3]),
    ];
    let collective = OtherRankOnes {
        calls: AtomicUsize::new(0),
    };
    let mut g = grads(&[Some(&[3.0, 5.0]), None, Some(&[1.0, 2.0, 3.0])]);
    g.all_reduce_mean(&collective, &params, 3).unwrap();
    // presence + bucket [a, b] (3 elements) + bucket [c]
    assert_eq!(collective.calls.load(Ordering::Relaxed), 3);
    assert_close(&values(g.get(0).unwrap()), &[2.0, 3.0], 1e-7, "a");
    assert_close(&values(g.get(1).unwrap()), &[0.5], 1e-7, "b");
    assert_close(&values(g.get(2).unwrap()), &[1.0, 1.5, 2.0], 1e-7, "c");
}

/// Exported state restores an identical optimizer: continuing both gives bit-identical weights.
#[test]
fn state_round_trip() {
    let make = || {
        AdamW::new(
            vec![param("w", &[1.0, -1.0]), param("norm.bias", &[0.5])],
            &config(0.01, 0.1, 1.0),
            |_| false,
        )
        .unwrap()
    };
    let mut a = make();
    a.step(&grads(&[Some(&[0.5, 1.0]), None])).unwrap();
    a.step(&grads(&[Some(&[-0.5, 2.0]), Some(&[1.0])])).unwrap();
    let exported: HashMap<String, Tensor> = a.state_tensors().into_iter().collect();
    assert_eq!(exported.len(), 6);
    assert_eq!(exported["norm.bias.step"].int64_value(&[]), 1);

    let mut b = make();
    for (pa, pb) in a.params().iter().zip(b.params()) {
        tch::no_grad(|| pb.tensor.shallow_clone().copy_(&pa.tensor));
    }
    b.load_state_tensors(&exported).unwrap();
    for opt in [&mut a, &mut b] {
        opt.step(&grads(&[Some(&[0.25, -1.0]), Some(&[2.0])]))
            .unwrap();
    }
    for (pa, pb) in a.params().iter().zip(b.params()) {
        assert_eq!(values(&pa.tensor), values(&pb.tensor), "{}", pa.name);
    }
    let mut bad = exported;
    bad.insert("nope.exp_avg".into(), Tensor::from(0f32));
    assert!(make().load_state_tensors(&bad).is_err());
}

/// VarStore parameters come out in creation order, a tied tensor once under its first official name.
#[test]
fn named_params_from_var_store() {
    let vs = VarStore::new(Device::Cpu);
    let emb_path = vs.root() / "text_encoder" / "bert" / "embeddings";
    let emb = (&emb_path / "word_embeddings").var("weight", &[4, 2], tch::nn::Init::Const(0.0));
    let _ln = (&emb_path / "LayerNorm").var("weight", &[2], tch::nn::Init::Const(1.0));
    let names: Vec<String> = named_trainable_params(&vs)
        .into_iter()
        .map(|p| p.name)
        .collect();
    assert_eq!(
        names,
        vec![
            "text_encoder.bert.embeddings.word_embeddings.weight",
            "text_encoder.bert.embeddings.LayerNorm.weight"
        ]
    );
    assert_eq!(emb.size(), vec![4, 2]);
}

/// apex dynamic loss scaling: starts at min(2^16, max), an overflow halves the scale (not below the
/// minimum), `growth_interval` clean steps double it (not above the maximum); unscaling divides
/// exactly and detects inf/NaN.
#[test]
fn dynamic_loss_scaler() {
    let mut s = DynamicLossScaler::official();
    assert_eq!(s.scale, 1024.0);
    s.update(true);
    assert_eq!((s.scale, s.unskipped), (512.0, 0));
    for _ in 0..1999 {
        s.update(false);
    }
    assert_eq!((s.scale, s.unskipped), (512.0, 1999));
    s.update(false);
    assert_eq!((s.scale, s.unskipped), (1024.0, 0));
    for _ in 0..2000 {
        s.update(false);
    }
    assert_eq!(s.scale, 1024.0, "capped at max");
    let mut tiny = DynamicLossScaler::new(1024.0, 1.0);
    tiny.scale = 1.0;
    tiny.update(true);
    assert_eq!(tiny.scale, 1.0, "floored at min");

    let mut g = grads(&[Some(&[1024.0, -2048.0]), None]);
    assert!(s.unscale(&mut g).unwrap());
    assert_eq!(values(g.get(0).unwrap()), vec![1.0, -2.0]);
    let mut bad = grads(&[Some(&[1.0]), Some(&[f32::INFINITY])]);
    assert!(!s.unscale(&mut bad).unwrap());
    let mut nan = grads(&[Some(&[f32::NAN])]);
    assert!(!s.unscale(&mut nan).unwrap());
    let scaled = s.scale_loss(&Tensor::from(3.0f32)).unwrap();
    assert_eq!(scaled.double_value(&[]), 3072.0);
}
