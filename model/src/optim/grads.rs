//! Gradients held explicitly, one optional tensor per optimizer parameter: computed from a loss without
//! touching `.grad`, clipped as `torch.nn.utils.clip_grad_norm_` does, averaged across ranks in
//! flattened buckets, and accumulated over micro-batches.

use tch::{Kind, Tensor};

use super::groups::NamedParam;
use super::OptimError;
use crate::collective::Collective;

/// Elements per all-reduce bucket (25 Mi float32 = 100 MB, the DDP default is 25 MB; fewer, larger
/// messages suit both the TCP ring and NCCL).
pub const DEFAULT_BUCKET_ELEMENTS: usize = 25 << 20;

/// One gradient per parameter; `None` where the parameter took no part in the loss.
#[derive(Debug)]
pub struct Gradients {
    grads: Vec<Option<Tensor>>,
}

impl Gradients {
    /// d`loss`/d`params` by one backward pass. Parameters the loss does not depend on get `None`, so the
    /// optimizer skips them (the official loop's `zero_grad(set_to_none=True)` semantics). `.grad` of
    /// the parameters is never written.
    pub fn backward(loss: &Tensor, params: &[NamedParam]) -> Result<Self, OptimError> {
        let inputs: Vec<&Tensor> = params.iter().map(|p| &p.tensor).collect();
        let outputs = Tensor::f_run_backward(&[loss], &inputs, false, false)?;
        Ok(Self {
            grads: outputs
                .into_iter()
                .map(|g| g.defined().then_some(g))
                .collect(),
        })
    }

    /// Wraps gradients computed elsewhere (aligned with the optimizer's parameters).
    pub fn from_options(grads: Vec<Option<Tensor>>) -> Self {
        Self { grads }
    }

    /// Number of slots (= parameters).
    pub fn len(&self) -> usize {
        self.grads.len()
    }

    /// True when there are no slots.
    pub fn is_empty(&self) -> bool {
        self.grads.is_empty()
    }

    /// The gradient of parameter `index`, if it has one.
    pub fn get(&self, index: usize) -> Option<&Tensor> {
        self.grads.get(index).and_then(Option::as_ref)
    }

    /// How many parameters have a gradient.
    pub fn present(&self) -> usize {
        self.grads.iter().filter(|g| g.is_some()).count()
    }

    /// Total L2 norm over every present gradient, as a float32 scalar tensor: the L2 norm of the
    /// per-tensor L2 norms, which is how torch >= 2.0 computes it.
    pub fn total_norm(&self) -> Result<Tensor, OptimError> {
        let _guard = tch::no_grad_guard();
        let norms = self
            .grads
            .iter()
            .flatten()
            .map(|g| g.f_norm())
            .collect::<Result<Vec<_>, _>>()?;
        if norms.is_empty() {
            return Ok(Tensor::from(0f32));
        }
        Ok(Tensor::f_stack(&norms, 0)?.f_norm()?)
    }

    /// `clip_grad_norm_(params, max_norm)`: scales every gradient by `min(1, max_norm / (norm + 1e-6))`
    /// and returns the norm before clipping.
    pub fn clip_norm(&mut self, max_norm: f64) -> Result<f64, OptimError> {
        let (norm, coef) = self.clip_coefficient(max_norm)?;
        let _guard = tch::no_grad_guard();
        for g in self.grads.iter_mut().flatten() {
            let _ = g.f_mul_(
                &Tensor::from(coef)
                    .f_to_device(g.device())?
                    .f_to_kind(g.kind())?,
            )?;
        }
        Ok(norm)
    }

    /// The total norm and the float32 factor `min(1, max_norm / (norm + 1e-6))` that
    /// [`Self::clip_norm`] would scale by, leaving the gradients as they are (the optimizer applies the
    /// factor in its own pass: [`AdamW::step_scaled`](super::AdamW::step_scaled)).
    pub fn clip_coefficient(&self, max_norm: f64) -> Result<(f64, f32), OptimError> {
        let total = self.total_norm()?;
        let _guard = tch::no_grad_guard();
        // torch: clip_coef = max_norm / (total_norm + 1e-6) evaluates as reciprocal() * max_norm.
        let coef = total
            .f_add_scalar(1e-6)?
            .f_reciprocal()?
            .f_mul_scalar(max_norm)?
            .f_clamp_max(1.0)?
            .f_to_kind(Kind::Float)?;
        Ok((total.f_double_value(&[])?, coef.f_double_value(&[])? as f32))
    }

    /// Multiplies every gradient by `factor`.
    pub fn scale(&mut self, factor: f64) -> Result<(), OptimError> {
        let _guard = tch::no_grad_guard();
        for g in self.grads.iter_mut().flatten() {
            let _ = g.f_mul_scalar_(factor)?;
        }
        Ok(())
    }

    /// True when no gradient holds an inf or NaN (one host sync).
    pub fn all_finite(&self) -> Result<bool, OptimError> {
        let _guard = tch::no_grad_guard();
        let mut bad: Option<Tensor> = None;
        for g in self.grads.iter().flatten() {
            let here = g.f_isfinite()?.f_logical_not()?.f_any()?;
            bad = Some(match bad {
                Some(b) => b.f_logical_or(&here)?,
                None => here,
            });
        }
        Ok(match bad {
            Some(b) => b.f_int64_value(&[])? == 0,
            None => true,
        })
    }

    /// Adds `other` slot by slot (a missing side counts as zero; both missing stays missing).
    pub fn add(&mut self, other: Gradients) -> Result<(), OptimError> {
        if other.len() != self.len() {
            return Err(OptimError::GradientCount {
                got: other.len(),
                expected: self.len(),
            });
        }
        let _guard = tch::no_grad_guard();
        for (mine, theirs) in self.grads.iter_mut().zip(other.grads) {
            match (mine.as_mut(), theirs) {
                (Some(m), Some(t)) => {
                    let _ = m.f_add_(&t)?;
                }
                (None, Some(t)) => *mine = Some(t),
                (_, None) => {}
            }
        }
        Ok(())
    }

    /// Averages the gradients over all ranks: sums them in flattened buckets of at most
    /// `bucket_elements` elements with `all_reduce_sum`, then divides by the world size. A parameter
    /// with a gradient on some rank gets one everywhere (zeros where it had none), so every rank applies
    /// the same update. The identity for world size 1.
    pub fn all_reduce_mean(
        &mut self,
        collective: &dyn Collective,
        params: &[NamedParam],
        bucket_elements: usize,
    ) -> Result<(), OptimError> {
        let world = collective.world_size();
        if world == 1 {
            return Ok(());
        }
        if params.len() != self.len() {
            return Err(OptimError::GradientCount {
                got: self.len(),
                expected: params.len(),
            });
        }
        let _guard = tch::no_grad_guard();
        let device = params
            .first()
            .map_or(tch::Device::Cpu, |p| p.tensor.device());
        let presence: Vec<f32> = self
            .grads
            .iter()
            .map(|g| if g.is_some() { 1.0 } else { 0.0 })
            .collect();
        let mut presence = Tensor::from_slice(&presence).f_to_device(device)?;
        collective.all_reduce_sum(&mut presence)?;
        let presence = Vec::<f32>::try_from(presence.f_to_device(tch::Device::Cpu)?)?;
        for ((slot, p), count) in self.grads.iter_mut().zip(params).zip(presence) {
            if slot.is_none() && count > 0.0 {
                *slot = Some(p.tensor.f_zeros_like()?);
            }
        }
        let bucket_elements = bucket_elements.max(1);
        let mut bucket: Vec<usize> = Vec::new();
        let mut elements = 0usize;
        let mut kind: Option<Kind> = None;
        let order: Vec<usize> = (0..self.grads.len())
            .filter(|&i| self.grads[i].is_some())
            .collect();
        for i in order {
            let (n, g_kind) = match &self.grads[i] {
                Some(g) => (g.numel(), g.kind()),
                None => continue,
            };
            if !bucket.is_empty() && (elements + n > bucket_elements || kind != Some(g_kind)) {
                self.reduce_bucket(collective, &bucket, world)?;
                bucket.clear();
                elements = 0;
            }
            kind = Some(g_kind);
            bucket.push(i);
            elements += n;
        }
        if !bucket.is_empty() {
            self.reduce_bucket(collective, &bucket, world)?;
        }
        Ok(())
    }

    fn reduce_bucket(
        &mut self,
        collective: &dyn Collective,
        members: &[usize],
        world: usize,
    ) -> Result<(), OptimError> {
        let flat: Vec<Tensor> = members
            .iter()
            .map(|&i| {
                self.grads[i]
                    .as_ref()
                    .expect("bucket members have gradients")
                    .f_reshape([-1])
            })
            .collect::<Result<_, _>>()?;
        let mut buffer = Tensor::f_cat(&flat, 0)?;
        collective.all_reduce_sum(&mut buffer)?;
        let buffer = buffer.f_div_scalar(world as f64)?;
        let mut offset = 0i64;
        for &i in members {
            let g = self.grads[i]
                .as_mut()
                .expect("bucket members have gradients");
            let n = g.numel() as i64;
            let part = buffer.f_narrow(0, offset, n)?.f_view(g.size().as_slice())?;
            g.f_copy_(&part)?;
            offset += n;
        }
        Ok(())
    }
}

/// Sums the gradients of several micro-batches and returns their mean, so that accumulating `n`
/// micro-batches of a mean loss equals one step on the whole batch.
#[derive(Debug, Default)]
pub struct GradAccumulator {
    sum: Option<Gradients>,
    micro_batches: usize,
}

impl GradAccumulator {
    /// An empty accumulator.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds one micro-batch's gradients.
    pub fn add(&mut self, grads: Gradients) -> Result<(), OptimError> {
        self.micro_batches += 1;
        match &mut self.sum {
            Some(sum) => sum.add(grads),
            None => {
                self.sum = Some(grads);
                Ok(())
            }
        }
    }

    /// Micro-batches added so far.
    pub fn micro_batches(&self) -> usize {
        self.micro_batches
    }

    /// The mean gradient over the micro-batches (`None` if none were added); resets the accumulator.
    pub fn take_mean(&mut self) -> Result<Option<Gradients>, OptimError> {
        let n = std::mem::take(&mut self.micro_batches);
        let Some(mut sum) = self.sum.take() else {
            return Ok(None);
        };
        if n > 1 {
            sum.scale(1.0 / n as f64)?;
        }
        Ok(Some(sum))
    }
}
