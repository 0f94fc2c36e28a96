//! transformers 4.12.5 `AdamW` (optimization.py), implemented by hand: the bias correction is folded into
//! the step size, eps is added to `sqrt(v)` (not to the bias-corrected one), and the decoupled weight
//! decay is applied after the Adam update to the already updated weights. tch's `nn::AdamW` is PyTorch's
//! variant and gives other numbers.

use std::collections::HashMap;

use tch::{Kind, Tensor};

use super::groups::{group_index, NamedParam, ParamGroup};
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
        if grads.len() != self.params.len() {
            return Err(OptimError::GradientCount {
                got: grads.len(),
                expected: self.params.len(),
            });
        }
        let hyper = self.hyper;
        let _guard = tch::no_grad_guard();
        for group in &self.groups {
            for &i in &group.params {
                let Some(grad) = grads.get(i) else {
                    continue;
                };
                let param = &self.params[i].tensor;
                let state = match &mut self.state[i] {
                    Some(state) => state,
                    slot => slot.insert(ParamState {
                        step: 0,
                        exp_avg: param.f_zeros_like()?,
                        exp_avg_sq: param.f_zeros_like()?,
                    }),
                };
                update_param(param, grad, state, group, hyper)?;
            }
        }
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

/// One transformers-4.12.5 AdamW update of `param` in place (under no_grad).
fn update_param(
    param: &Tensor,
    grad: &Tensor,
    state: &mut ParamState,
    group: &ParamGroup,
    hyper: AdamWHyper,
) -> Result<(), OptimError> {
    let AdamWHyper {
        beta1,
        beta2,
        eps,
        correct_bias,
    } = hyper;
    state.step += 1;
    // exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
    let _ = state.exp_avg.f_mul_scalar_(beta1)?;
    let _ = state.exp_avg.f_add_(&grad.f_mul_scalar(1.0 - beta1)?)?;
    // exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    let _ = state.exp_avg_sq.f_mul_scalar_(beta2)?;
    let _ = state
        .exp_avg_sq
        .f_addcmul_(&grad.f_mul_scalar(1.0 - beta2)?, grad)?;
    let mut denom = state.exp_avg_sq.f_sqrt()?;
    let _ = denom.f_add_scalar_(eps)?;
    let mut step_size = group.lr;
    if correct_bias {
        // python `beta ** step` with an int step is C pow(), as powf is.
        let t = state.step as f64;
        step_size = step_size * (1.0 - beta2.powf(t)).sqrt() / (1.0 - beta1.powf(t));
    }
    // p.addcdiv_(exp_avg, denom, value=-step_size)
    let mut p = param.shallow_clone();
    let _ = p.f_addcdiv_(&state.exp_avg.f_mul_scalar(-step_size)?, &denom)?;
    if group.weight_decay > 0.0 {
        // p.add_(p, alpha=-lr * wd): decay of the already updated weights.
        let decay = p.f_mul_scalar(-group.lr * group.weight_decay)?;
        let _ = p.f_add_(&decay)?;
    }
    Ok(())
}
