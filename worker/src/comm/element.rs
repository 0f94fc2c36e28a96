//! Element types the CPU collectives sum natively, and their add kernels. The worker crate builds at
//! -O1, where LLVM does not vectorise loops, so the float kernels use SIMD intrinsics explicitly (AVX
//! when the CPU has it, else SSE2, which every x86_64 has); other types and targets use a plain loop.

/// A type the CPU collectives can sum element-wise.
pub(crate) trait Element: Copy + Send + Sync + 'static {
    /// Bytes per element.
    const SIZE: usize = std::mem::size_of::<Self>();
    /// `dst[i] += src[i]` over the common length.
    fn add_assign(dst: &mut [Self], src: &[Self]);
}

macro_rules! plain_element {
    ($($t:ty),*) => {$(
        impl Element for $t {
            fn add_assign(dst: &mut [Self], src: &[Self]) {
                for (d, s) in dst.iter_mut().zip(src) {
                    *d += *s;
                }
            }
        }
    )*};
}
plain_element!(i32, i64);

#[cfg(not(target_arch = "x86_64"))]
plain_element!(f32, f64);

#[cfg(target_arch = "x86_64")]
mod simd {
    use std::arch::x86_64::*;

    /// An unaligned vector: reading or writing it through a pointer compiles to one unaligned move,
    /// without the debug-build precondition checks of `_mm*_loadu_*` and `ptr::add` (with them the
    /// -O1 kernel ran at a fifth of memcpy's speed).
    #[repr(C, packed)]
    #[derive(Clone, Copy)]
    struct Unaligned<V>(V);

    /// Adds 4 vectors per iteration; returns how many leading elements it handled.
    macro_rules! kernel {
        ($name:ident, $t:ty, $feature:literal, $vec:ty, $add:ident) => {
            #[target_feature(enable = $feature)]
            pub(super) unsafe fn $name(dst: *mut $t, src: *const $t, n: usize) -> usize {
                const LANES: usize = std::mem::size_of::<$vec>() / std::mem::size_of::<$t>();
                let done = n - n % (4 * LANES);
                let mut d = dst as *mut Unaligned<$vec>;
                let mut s = src as *const Unaligned<$vec>;
                let end = dst.wrapping_add(done) as *mut Unaligned<$vec>;
                // Wrapping pointer steps: in bounds by construction, and free of debug checks.
                while d != end {
                    let a0 = $add((*d).0, (*s).0);
                    let a1 = $add((*d.wrapping_add(1)).0, (*s.wrapping_add(1)).0);
                    let a2 = $add((*d.wrapping_add(2)).0, (*s.wrapping_add(2)).0);
                    let a3 = $add((*d.wrapping_add(3)).0, (*s.wrapping_add(3)).0);
                    *d = Unaligned(a0);
                    *d.wrapping_add(1) = Unaligned(a1);
                    *d.wrapping_add(2) = Unaligned(a2);
                    *d.wrapping_add(3) = Unaligned(a3);
                    d = d.wrapping_add(4);
                    s = s.wrapping_add(4);
                }
                done
            }
        };
    }

    kernel!(f32_avx, f32, "avx", __m256, _mm256_add_ps);
    kernel!(f32_sse, f32, "sse2", __m128, _mm_add_ps);
    kernel!(f64_avx, f64, "avx", __m256d, _mm256_add_pd);
    kernel!(f64_sse, f64, "sse2", __m128d, _mm_add_pd);
}

#[cfg(target_arch = "x86_64")]
macro_rules! simd_element {
    ($t:ty, $avx:ident, $sse:ident) => {
        impl Element for $t {
            fn add_assign(dst: &mut [Self], src: &[Self]) {
                let n = dst.len().min(src.len());
                // SAFETY: both pointers are valid for `n` elements, the slices do not overlap (one is
                // borrowed mutably), and the AVX kernel only runs on a CPU that has AVX.
                let done = unsafe {
                    if std::is_x86_feature_detected!("avx") {
                        simd::$avx(dst.as_mut_ptr(), src.as_ptr(), n)
                    } else {
                        simd::$sse(dst.as_mut_ptr(), src.as_ptr(), n)
                    }
                };
                for (d, s) in dst[done..n].iter_mut().zip(&src[done..n]) {
                    *d += *s;
                }
            }
        }
    };
}

#[cfg(target_arch = "x86_64")]
simd_element!(f32, f32_avx, f32_sse);
#[cfg(target_arch = "x86_64")]
simd_element!(f64, f64_avx, f64_sse);

#[cfg(test)]
mod tests {
    use super::Element;

    #[test]
    fn float_kernels_add_every_element() {
        for n in [0usize, 1, 3, 15, 16, 17, 33, 1000] {
            let mut d: Vec<f32> = (0..n).map(|i| i as f32).collect();
            let s: Vec<f32> = (0..n).map(|i| (2 * i + 1) as f32).collect();
            f32::add_assign(&mut d, &s);
            assert!(d.iter().enumerate().all(|(i, v)| *v == (3 * i + 1) as f32));
            let mut d: Vec<f64> = (0..n).map(|i| i as f64).collect();
            let s: Vec<f64> = (0..n).map(|i| (2 * i + 1) as f64).collect();
            f64::add_assign(&mut d, &s);
            assert!(d.iter().enumerate().all(|(i, v)| *v == (3 * i + 1) as f64));
        }
    }
}
