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

    /// Adds 4 vectors per iteration; returns how many leading elements it handled.
    macro_rules! kernel {
        ($name:ident, $t:ty, $feature:literal, $lanes:expr, $load:ident, $add:ident, $store:ident) => {
            #[target_feature(enable = $feature)]
            pub(super) unsafe fn $name(dst: *mut $t, src: *const $t, n: usize) -> usize {
                let step = 4 * $lanes;
                let mut i = 0;
                while i + step <= n {
                    let (d, s) = (dst.add(i), src.add(i));
                    let a0 = $add($load(d), $load(s));
                    let a1 = $add($load(d.add($lanes)), $load(s.add($lanes)));
                    let a2 = $add($load(d.add(2 * $lanes)), $load(s.add(2 * $lanes)));
                    let a3 = $add($load(d.add(3 * $lanes)), $load(s.add(3 * $lanes)));
                    $store(d, a0);
                    $store(d.add($lanes), a1);
                    $store(d.add(2 * $lanes), a2);
                    $store(d.add(3 * $lanes), a3);
                    i += step;
                }
                i
            }
        };
    }

    kernel!(
        f32_avx,
        f32,
        "avx",
        8,
        _mm256_loadu_ps,
        _mm256_add_ps,
        _mm256_storeu_ps
    );
    kernel!(
        f32_sse,
        f32,
        "sse2",
        4,
        _mm_loadu_ps,
        _mm_add_ps,
        _mm_storeu_ps
    );
    kernel!(
        f64_avx,
        f64,
        "avx",
        4,
        _mm256_loadu_pd,
        _mm256_add_pd,
        _mm256_storeu_pd
    );
    kernel!(
        f64_sse,
        f64,
        "sse2",
        2,
        _mm_loadu_pd,
        _mm_add_pd,
        _mm_storeu_pd
    );
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
