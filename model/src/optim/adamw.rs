//! transformers 4.12.5 `AdamW` (optimization.py), implemented by hand: the bias correction is folded into
//! the step size, eps is added to `sqrt(v)` (not to the bias-corrected one), and the decoupled weight
//! decay is applied after the Adam update to the already updated weights. tch's `nn::AdamW` is PyTorch's
//! variant and gives other numbers.

use std::collections::HashMap;

use tch::{Kind, Tensor};

use super::groups::{group_index, NamedParam, ParamGroup};
use super::kernel::{FusedUpdate, UpdateScalars};
use super::{Gradients, OptimError};
use crate::config::OptimizerConfig;

/// Moment and epsilon settings (official: betas (0.9, 0.98), eps 1e-8, bias correction on).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWHyper {
    /// First-moment decay.
    pub beta1: f64,
    /// Second-moment decay.
    pub beta2: f64,
    /// Added to `sqrt(v)`.
    pub eps: f64,
    /// Fold `sqrt(1 - beta2^t) / (1 - beta1^t)` into the step size.
    pub correct_bias: bool,
}

impl Default for AdamWHyper {
    fn default() -> Self {
        // optim.py:create_optimizer: AdamW(groups, lr=lr, eps=1e-8, betas=(0.9, 0.98))
        Self {
            beta1: 0.9,
            beta2: 0.98,
            eps: 1e-8,
            correct_bias: true,
        }
    }
}

/// The per-parameter Adam state. `step` counts this parameter's own updates: one that had no gradient
/// in some steps lags behind the others.
#[derive(Debug)]
pub struct ParamState {
    /// Updates applied to this parameter.
    pub step: i64,
    /// First moment `m`.
    pub exp_avg: Tensor,
    /// Second moment `v`.
    pub exp_avg_sq: Tensor,
}

/// AdamW over the four official param groups.
#[derive(Debug)]
pub struct AdamW {
    params: Vec<NamedParam>,
    groups: Vec<ParamGroup>,
    hyper: AdamWHyper,
    state: Vec<Option<ParamState>>,
}

impl AdamW {
    /// Groups `params` as `create_optimizer` does: group 0 decay, 1 no decay, 2 decay × lr_mult,
    /// 3 no decay × lr_mult, where `is_new_param(name)` says whether `name` is in the model's
    /// `init_params`. The lr of every group starts at its initial lr; apply the schedule with
    /// [`AdamW::set_lr_factor`] before the first step.
    pub fn new(
        params: Vec<NamedParam>,
        cfg: &OptimizerConfig,
        is_new_param: impl Fn(&str) -> bool,
    ) -> Result<Self, OptimError> {
        if cfg.opt != "adamW" {
            return Err(OptimError::UnknownOptimizer(cfg.opt.clone()));
        }
        let mut seen = std::collections::HashSet::new();
        for p in &params {
            if !seen.insert(p.name.as_str()) {
                return Err(OptimError::DuplicateParam(p.name.clone()));
            }
        }
        check_disjoint(&params)?;
        // optim.py: lr_mult = getattr(args, 'lr_mult', 1)
        let lr_mult = cfg.lr_mult.unwrap_or(1.0);
        let settings = [
            (cfg.weight_decay, cfg.lr),
            (0.0, cfg.lr),
            (cfg.weight_decay, cfg.lr * lr_mult),
            (0.0, cfg.lr * lr_mult),
        ];
        let mut groups: Vec<ParamGroup> = settings
            .iter()
            .map(|&(weight_decay, lr)| ParamGroup {
                weight_decay,
                initial_lr: lr,
                lr,
                params: Vec::new(),
            })
            .collect();
        for (i, p) in params.iter().enumerate() {
            groups[group_index(&p.name, is_new_param(&p.name))]
                .params
                .push(i);
        }
        let state = params.iter().map(|_| None).collect();
        Ok(Self {
            params,
            groups,
            hyper: AdamWHyper::default(),
            state,
        })
    }

    /// Replaces the moment/eps settings (the official code always uses the defaults).
    pub fn with_hyper(mut self, hyper: AdamWHyper) -> Self {
        self.hyper = hyper;
        self
    }

    /// The parameters, in the order gradients must be given.
    pub fn params(&self) -> &[NamedParam] {
        &self.params
    }

    /// The four groups, in the official order.
    pub fn groups(&self) -> &[ParamGroup] {
        &self.groups
    }

    /// The lr of each group for the next step.
    pub fn lrs(&self) -> Vec<f64> {
        self.groups.iter().map(|g| g.lr).collect()
    }

    /// Sets every group's lr to its initial lr × `factor` (what LambdaLR does).
    pub fn set_lr_factor(&mut self, factor: f64) {
        for g in &mut self.groups {
            g.lr = g.initial_lr * factor;
        }
    }

    /// The Adam state of parameter `index`, if it has been updated.
    pub fn state(&self, index: usize) -> Option<&ParamState> {
        self.state.get(index).and_then(Option::as_ref)
    }

    /// One update with `grads` (aligned with [`AdamW::params`]); parameters without a gradient are
    /// skipped entirely: no moment update, no weight decay, no step count.
    pub fn step(&mut self, grads: &Gradients) -> Result<(), OptimError> {
        self.step_scaled(grads, None)
    }

    /// [`AdamW::step`] with every gradient first multiplied by `grad_scale` (the clip coefficient of
    /// [`Gradients::clip_coefficient`]), as if `grads` had been scaled in place: the same numbers,
    /// without a pass over the gradients. Float32 CPU parameters update in one fused pass on every
    /// intra-op thread (kernel.rs), the others with tensor ops; the two agree to the last bit.
    pub fn step_scaled(
        &mut self,
        grads: &Gradients,
        grad_scale: Option<f32>,
    ) -> Result<(), OptimError> {
        if grads.len() != self.params.len() {
            return Err(OptimError::GradientCount {
                got: grads.len(),
                expected: self.params.len(),
            });
        }
        let hyper = self.hyper;
        let _guard = tch::no_grad_guard();
        let mut group_of = vec![0usize; self.params.len()];
        for (gi, group) in self.groups.iter().enumerate() {
            for &i in &group.params {
                group_of[i] = gi;
            }
        }
        let scale_tensor = grad_scale.map(Tensor::from);
        let mut fused = FusedUpdate::new();
        for (i, (param, slot)) in self.params.iter().zip(self.state.iter_mut()).enumerate() {
            let Some(grad) = grads.get(i) else {
                continue;
            };
            let param = &param.tensor;
            let state = match slot {
                Some(state) => state,
                slot => slot.insert(ParamState {
                    step: 0,
                    exp_avg: param.f_zeros_like()?,
                    exp_avg_sq: param.f_zeros_like()?,
                }),
            };
            let group = &self.groups[group_of[i]];
            state.step += 1;
            let scalars = update_scalars(state.step, group, hyper, grad_scale);
            if FusedUpdate::fits(param, grad, &state.exp_avg, &state.exp_avg_sq) {
                let ParamState {
                    exp_avg,
                    exp_avg_sq,
                    ..
                } = state;
                fused.push(param, grad, exp_avg, exp_avg_sq, scalars);
            } else {
                let grad = match &scale_tensor {
                    Some(scale) => grad.f_mul(&scale.f_to_device(grad.device())?)?,
                    None => grad.shallow_clone(),
                };
                update_param(param, &grad, state, &scalars)?;
            }
        }
        fused.run(tch::get_num_threads().max(1) as usize);
        Ok(())
    }

    /// The optimizer state as named tensors for a checkpoint: `{param}.exp_avg`, `{param}.exp_avg_sq`
    /// and `{param}.step` (int64 scalar) for every parameter that has been updated.
    pub fn state_tensors(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        for (p, state) in self.params.iter().zip(&self.state) {
            if let Some(s) = state {
                out.push((format!("{}.exp_avg", p.name), s.exp_avg.detach().copy()));
                out.push((
                    format!("{}.exp_avg_sq", p.name),
                    s.exp_avg_sq.detach().copy(),
                ));
                out.push((format!("{}.step", p.name), Tensor::from(s.step)));
            }
        }
        out
    }

    /// Restores what [`AdamW::state_tensors`] wrote. Parameters absent from `tensors` start fresh; a
    /// name that matches no parameter, a missing moment or a shape mismatch is an error.
    pub fn load_state_tensors(
        &mut self,
        tensors: &HashMap<String, Tensor>,
    ) -> Result<(), OptimError> {
        let index: HashMap<&str, usize> = self
            .params
            .iter()
            .enumerate()
            .map(|(i, p)| (p.name.as_str(), i))
            .collect();
        let mut restored: Vec<Option<ParamState>> = self.params.iter().map(|_| None).collect();
        for key in tensors.keys() {
            let (name, field) = key.rsplit_once('.').unwrap_or((key.as_str(), ""));
            if !matches!(field, "exp_avg" | "exp_avg_sq" | "step") || !index.contains_key(name) {
                return Err(OptimError::BadState {
                    name: key.clone(),
                    reason: "matches no parameter of this model".into(),
                });
            }
        }
        for (i, p) in self.params.iter().enumerate() {
            let get = |field: &str| tensors.get(&format!("{}.{field}", p.name));
            let (Some(m), Some(v), Some(step)) = (get("exp_avg"), get("exp_avg_sq"), get("step"))
            else {
                if get("exp_avg").is_some() || get("exp_avg_sq").is_some() || get("step").is_some()
                {
                    return Err(OptimError::BadState {
                        name: p.name.clone(),
                        reason: "needs exp_avg, exp_avg_sq and step together".into(),
                    });
                }
                continue;
            };
            for (what, t) in [("exp_avg", m), ("exp_avg_sq", v)] {
                if t.size() != p.tensor.size() {
                    return Err(OptimError::BadState {
                        name: p.name.clone(),
                        reason: format!(
                            "{what} has shape {:?}, parameter {:?}",
                            t.size(),
                            p.tensor.size()
                        ),
                    });
                }
            }
            let to_param =
                |t: &Tensor| t.f_to_device(p.tensor.device())?.f_to_kind(p.tensor.kind());
            restored[i] = Some(ParamState {
                step: step.f_to_kind(Kind::Int64)?.f_int64_value(&[])?,
                exp_avg: to_param(m)?,
                exp_avg_sq: to_param(v)?,
            });
        }
        self.state = restored;
        Ok(())
    }
}

/// Every parameter owns its memory: two that overlap (a tie listed under both names, or views of one
/// buffer) would be updated twice, and the fused pass writes each through a raw pointer.
fn check_disjoint(params: &[NamedParam]) -> Result<(), OptimError> {
    let mut ranges: Vec<(usize, usize, &str)> = params
        .iter()
        .filter(|p| p.tensor.numel() > 0)
        .map(|p| {
            let start = p.tensor.data_ptr() as usize;
            let bytes = p.tensor.numel() * p.tensor.kind().elt_size_in_bytes();
            (start, start + bytes, p.name.as_str())
        })
        .collect();
    ranges.sort_unstable();
    for pair in ranges.windows(2) {
        if pair[1].0 < pair[0].1 {
            return Err(OptimError::SharedMemory {
                first: pair[0].2.to_string(),
                second: pair[1].2.to_string(),
            });
        }
    }
    Ok(())
}

/// The float32 scalars of one update of a parameter at its `step`-th update, rounded as libtorch
/// rounds a double scalar for a float32 tensor.
fn update_scalars(
    step: i64,
    group: &ParamGroup,
    hyper: AdamWHyper,
    grad_scale: Option<f32>,
) -> UpdateScalars {
    let AdamWHyper {
        beta1,
        beta2,
        eps,
        correct_bias,
    } = hyper;
    let mut step_size = group.lr;
    if correct_bias {
        // python `beta ** step` with an int step is C pow(), as powf is.
        let t = step as f64;
        step_size = step_size * (1.0 - beta2.powf(t)).sqrt() / (1.0 - beta1.powf(t));
    }
    UpdateScalars {
        grad_scale,
        beta1: beta1 as f32,
        one_minus_beta1: (1.0 - beta1) as f32,
        beta2: beta2 as f32,
        one_minus_beta2: (1.0 - beta2) as f32,
        eps: eps as f32,
        neg_step_size: -step_size as f32,
        neg_decay: (group.weight_decay > 0.0).then(|| (-group.lr * group.weight_decay) as f32),
    }
}

/// One transformers-4.12.5 AdamW update of `param` in place (under no_grad), with tensor ops; `grad`
/// is already scaled. The step count is already advanced.
fn update_param(
    param: &Tensor,
    grad: &Tensor,
    state: &mut ParamState,
    s: &UpdateScalars,
) -> Result<(), OptimError> {
    // exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
    let _ = state.exp_avg.f_mul_scalar_(s.beta1 as f64)?;
    let _ = state
        .exp_avg
        .f_add_(&grad.f_mul_scalar(s.one_minus_beta1 as f64)?)?;
    // exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    let _ = state.exp_avg_sq.f_mul_scalar_(s.beta2 as f64)?;
    let _ = state
        .exp_avg_sq
        .f_addcmul_(&grad.f_mul_scalar(s.one_minus_beta2 as f64)?, grad)?;
    let mut denom = state.exp_avg_sq.f_sqrt()?;
    let _ = denom.f_add_scalar_(s.eps as f64)?;
    // p.addcdiv_(exp_avg, denom, value=-step_size)
    let mut p = param.shallow_clone();
    let _ = p.f_addcdiv_(&state.exp_avg.f_mul_scalar(s.neg_step_size as f64)?, &denom)?;
    if let Some(neg_decay) = s.neg_decay {
        // p.add_(p, alpha=-lr * wd): decay of the already updated weights.
        let decay = p.f_mul_scalar(neg_decay as f64)?;
        let _ = p.f_add_(&decay)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn random(n: i64, seed: i64, positive: bool) -> Tensor {
        tch::manual_seed(seed);
        let t = Tensor::randn([n], (Kind::Float, tch::Device::Cpu));
        if positive {
            t.abs() * 0.01
        } else {
            t
        }
    }

    /// The fused pass and the tensor ops agree (moments bit for bit, weights to the last bit), over
    /// lengths that are and are not multiples of the vector width and the thread chunk, with and
    /// without decay and clip scale, at several step counts, on one and on several threads.
    #[test]
    fn fused_update_matches_the_tensor_ops() {
        let lens = [1i64, 7, 1000, 65_536 + 3, 1_200_001];
        let group = |lr: f64, weight_decay: f64| ParamGroup {
            weight_decay,
            initial_lr: lr,
            lr,
            params: Vec::new(),
        };
        let cases = [
            (group(1e-4, 0.01), Some(0.37f32), 1i64),
            (group(3e-5, 0.0), None, 2),
            (group(2e-4, 0.02), Some(1.0), 17),
        ];
        for threads in [1usize, 2] {
            for (k, (group, scale, step)) in cases.iter().enumerate() {
                let scalars = update_scalars(*step, group, AdamWHyper::default(), *scale);
                let mut reference = Vec::new();
                let mut fused_state = Vec::new();
                for (j, &n) in lens.iter().enumerate() {
                    let seed = (k * 10 + j) as i64 * 4;
                    let p = random(n, seed, false);
                    let g = random(n, seed + 1, false);
                    let m = random(n, seed + 2, false) * 0.1;
                    let v = random(n, seed + 3, true);
                    let mut state = ParamState {
                        step: *step,
                        exp_avg: m.copy(),
                        exp_avg_sq: v.copy(),
                    };
                    let p_ref = p.copy();
                    let g_scaled = match scale {
                        Some(s) => g.f_mul(&Tensor::from(*s)).unwrap(),
                        None => g.shallow_clone(),
                    };
                    tch::no_grad(|| update_param(&p_ref, &g_scaled, &mut state, &scalars)).unwrap();
                    reference.push((p_ref, state.exp_avg, state.exp_avg_sq, p.copy()));
                    fused_state.push((p, g, m, v));
                }
                let mut fused = FusedUpdate::new();
                for (p, g, m, v) in fused_state.iter_mut() {
                    assert!(fused.push(p, g, m, v, scalars));
                }
                fused.run(threads);
                for ((p_ref, m_ref, v_ref, p0), (p, _, m, v)) in reference.iter().zip(&fused_state)
                {
                    let n = p.numel();
                    for (what, a, b) in [("exp_avg", m_ref, m), ("exp_avg_sq", v_ref, v)] {
                        let differ = a.ne_tensor(b).sum(Kind::Int64).int64_value(&[]);
                        assert_eq!(
                            differ, 0,
                            "{what} of {n} elements, case {k}, {threads} threads"
                        );
                    }
                    // sqrt: MKL's (libtorch) against the correctly rounded one; the update may move
                    // by its last bit, and the weight by one rounding more.
                    let update = (p_ref - p0).abs();
                    let bound = (p_ref.abs() + update) * (2.0 * f64::from(f32::EPSILON));
                    let beyond = (p_ref - p)
                        .abs()
                        .gt_tensor(&bound)
                        .sum(Kind::Int64)
                        .int64_value(&[]);
                    assert_eq!(
                        beyond, 0,
                        "param of {n} elements, case {k}, {threads} threads"
                    );
                }
            }
        }
    }

    #[test]
    fn parameters_sharing_memory_are_refused() {
        let buffer = Tensor::zeros([8], (Kind::Float, tch::Device::Cpu));
        let params = vec![
            NamedParam {
                name: "a".into(),
                tensor: buffer.narrow(0, 0, 5),
            },
            NamedParam {
                name: "b".into(),
                tensor: buffer.narrow(0, 4, 4),
            },
        ];
        let err = check_disjoint(&params).unwrap_err().to_string();
        assert!(err.contains("a") && err.contains("b"), "{err}");
        let apart = vec![
            NamedParam {
                name: "a".into(),
                tensor: buffer.narrow(0, 0, 4),
            },
            NamedParam {
                name: "b".into(),
                tensor: buffer.narrow(0, 4, 4),
            },
        ];
        assert!(check_disjoint(&apart).is_ok());
    }

    #[test]
    fn tensors_that_cannot_fuse_are_refused() {
        let scalars = update_scalars(
            1,
            &ParamGroup {
                weight_decay: 0.0,
                initial_lr: 1e-3,
                lr: 1e-3,
                params: Vec::new(),
            },
            AdamWHyper::default(),
            None,
        );
        let p = Tensor::zeros([4], (Kind::Double, tch::Device::Cpu));
        let g = p.ones_like();
        let (mut m, mut v) = (p.zeros_like(), p.zeros_like());
        assert!(!FusedUpdate::new().push(&p, &g, &mut m, &mut v, scalars));
        let p = Tensor::zeros([4, 4], (Kind::Float, tch::Device::Cpu));
        let g = p.ones_like().transpose(0, 1);
        let (mut m, mut v) = (p.zeros_like(), p.zeros_like());
        assert!(FusedUpdate::new().push(&p, &p.ones_like(), &mut m, &mut v, scalars));
        assert!(!FusedUpdate::new().push(&p, &g, &mut m, &mut v, scalars));
    }
}
