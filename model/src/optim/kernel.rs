//! The AdamW update as one pass over memory, for float32 tensors on the CPU.
//!
//! The tensor form (`update_param` in adamw.rs) runs eight libtorch ops per parameter, four of them
//! allocating a parameter-sized temporary, so every element of a 215 M-parameter model is read and
//! written about twenty times per step. This loop reads the gradient, weight and both moments once and
//! writes the weight and moments once, on every intra-op thread. It performs the same float32
//! operations in the same order and rounding as the tensor form (libtorch's AVX2 / AVX-512 kernels), so
//! both moments come out bit-identical; only `sqrt` differs: libtorch takes it from MKL's vector math
//! (within 1 ulp), this loop rounds it correctly, so a weight can differ in its last bit.
//! `fused_update_matches_the_tensor_ops` in adamw.rs checks both.

use std::sync::atomic::{AtomicUsize, Ordering};

use tch::{Device, Kind, Tensor};

/// Elements one thread updates at a time (256 KiB of each stream: a chunk's four streams stay in L2).
const CHUNK: usize = 64 * 1024;

/// Below this many elements in a step, threads cost more than they save.
const PARALLEL_MIN: usize = 1 << 20;

/// The scalars of one parameter's update, already in float32 as libtorch would round them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct UpdateScalars {
    /// Multiplies the gradient first (clipping); `None` leaves it as it is.
    pub grad_scale: Option<f32>,
    /// `beta1`.
    pub beta1: f32,
    /// `1 - beta1`.
    pub one_minus_beta1: f32,
    /// `beta2`.
    pub beta2: f32,
    /// `1 - beta2`.
    pub one_minus_beta2: f32,
    /// Added to `sqrt(v)`.
    pub eps: f32,
    /// `-step_size` (lr with the bias correction folded in).
    pub neg_step_size: f32,
    /// `-lr × weight_decay`; `None` without weight decay.
    pub neg_decay: Option<f32>,
}

/// One parameter's buffers, as raw float32 pointers (see [`FusedUpdate::new`] for the guarantees).
#[derive(Debug, Clone, Copy)]
struct Slot {
    param: *mut f32,
    grad: *const f32,
    exp_avg: *mut f32,
    exp_avg_sq: *mut f32,
    len: usize,
    scalars: UpdateScalars,
}

// SAFETY: a slot's pointers address tensors that `FusedUpdate` borrows for its whole life; threads
// receive disjoint element ranges of them.
unsafe impl Send for Slot {}
unsafe impl Sync for Slot {}

/// True when `t` can take part in the fused update: float32, on the CPU, contiguous.
pub(crate) fn fusable(t: &Tensor) -> bool {
    t.device() == Device::Cpu && t.kind() == Kind::Float && t.is_contiguous()
}

/// A batch of parameter updates that run together, split across threads.
pub(crate) struct FusedUpdate<'a> {
    slots: Vec<Slot>,
    _borrow: std::marker::PhantomData<&'a mut Tensor>,
}

impl<'a> FusedUpdate<'a> {
    /// An empty batch.
    pub fn new() -> Self {
        Self {
            slots: Vec::new(),
            _borrow: std::marker::PhantomData,
        }
    }

    /// True when one parameter's tensors can join the batch: all [`fusable`], with `param`'s number
    /// of elements.
    pub fn fits(param: &Tensor, grad: &Tensor, exp_avg: &Tensor, exp_avg_sq: &Tensor) -> bool {
        let len = param.numel();
        [param, grad, exp_avg, exp_avg_sq]
            .iter()
            .all(|t| fusable(t) && t.numel() == len)
    }

    /// Adds one parameter's update. Its tensors must pass [`Self::fits`] (checked: a parameter that
    /// does not is an error of the caller, reported as false with nothing added); `param` must not
    /// share memory with another parameter of the batch (the optimizer's parameters are distinct
    /// variables, ties listed once).
    pub fn push(
        &mut self,
        param: &'a Tensor,
        grad: &'a Tensor,
        exp_avg: &'a mut Tensor,
        exp_avg_sq: &'a mut Tensor,
        scalars: UpdateScalars,
    ) -> bool {
        if !Self::fits(param, grad, exp_avg, exp_avg_sq) {
            return false;
        }
        self.slots.push(Slot {
            param: param.data_ptr() as *mut f32,
            grad: grad.data_ptr() as *const f32,
            exp_avg: exp_avg.data_ptr() as *mut f32,
            exp_avg_sq: exp_avg_sq.data_ptr() as *mut f32,
            len: param.numel(),
            scalars,
        });
        true
    }

    /// Runs every update on up to `threads` threads.
    pub fn run(self, threads: usize) {
        let chunks: Vec<(usize, usize, usize)> = self
            .slots
            .iter()
            .enumerate()
            .flat_map(|(i, s)| {
                (0..s.len)
                    .step_by(CHUNK)
                    .map(move |start| (i, start, CHUNK.min(s.len - start)))
            })
            .collect();
        let total: usize = self.slots.iter().map(|s| s.len).sum();
        let threads = if total < PARALLEL_MIN {
            1
        } else {
            threads.clamp(1, chunks.len().max(1))
        };
        let next = AtomicUsize::new(0);
        let work = || loop {
            let k = next.fetch_add(1, Ordering::Relaxed);
            let Some(&(i, start, len)) = chunks.get(k) else {
                break;
            };
            // SAFETY: chunk k covers elements [start, start + len) of slot i, inside its tensors
            // (len ≤ numel - start); each chunk goes to one thread, and slots do not overlap.
            unsafe { update_chunk(&self.slots[i], start, len) };
        };
        if threads == 1 {
            work();
        } else {
            std::thread::scope(|scope| {
                for _ in 1..threads {
                    scope.spawn(work);
                }
                work();
            });
        }
    }
}

/// The update of elements `[start, start + len)` of one slot.
///
/// # Safety
/// The range lies inside the slot's tensors and no other thread touches it.
unsafe fn update_chunk(slot: &Slot, start: usize, len: usize) {
    let p = std::slice::from_raw_parts_mut(slot.param.add(start), len);
    let g = std::slice::from_raw_parts(slot.grad.add(start), len);
    let m = std::slice::from_raw_parts_mut(slot.exp_avg.add(start), len);
    let v = std::slice::from_raw_parts_mut(slot.exp_avg_sq.add(start), len);
    update_elements(p, g, m, v, &slot.scalars);
}

/// The arithmetic, element by element, in the tensor form's order and rounding. libtorch's CPU
/// `addcmul_` (AVX2 and AVX-512 kernels) rounds `v + t1 * t2` once, a fused multiply-add; every other
/// op rounds each result.
fn update_elements(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], s: &UpdateScalars) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU has the features the function is compiled for.
        return unsafe { update_elements_avx2(p, g, m, v, s) };
    }
    update_elements_portable(p, g, m, v, s)
}

/// [`update_elements_portable`] compiled for AVX2 with hardware FMA (vectorised by the compiler).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn update_elements_avx2(
    p: &mut [f32],
    g: &[f32],
    m: &mut [f32],
    v: &mut [f32],
    s: &UpdateScalars,
) {
    update_elements_portable(p, g, m, v, s)
}

#[inline(always)]
fn update_elements_portable(
    p: &mut [f32],
    g: &[f32],
    m: &mut [f32],
    v: &mut [f32],
    s: &UpdateScalars,
) {
    let scale = s.grad_scale.unwrap_or(1.0);
    let decay = s.neg_decay.unwrap_or(0.0);
    let scaled = s.grad_scale.is_some();
    let decayed = s.neg_decay.is_some();
    for (((p, &g), m), v) in p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
        // clip: g.mul_(coef)
        let g = if scaled { g * scale } else { g };
        // exp_avg.mul_(beta1).add_(grad * (1 - beta1))
        *m = *m * s.beta1 + g * s.one_minus_beta1;
        // exp_avg_sq.mul_(beta2).addcmul_(grad * (1 - beta2), grad)
        *v = (g * s.one_minus_beta2).mul_add(g, *v * s.beta2);
        // denom = exp_avg_sq.sqrt().add_(eps); p.addcdiv_(exp_avg * -step_size, denom)
        let denom = v.sqrt() + s.eps;
        let mut w = *p + (*m * s.neg_step_size) / denom;
        // p.add_(p * (-lr * wd))
        if decayed {
            w = w + w * decay;
        }
        *p = w;
    }
}
