//! The instruction sets of the CPU kernels: the [`Vector`] trait (`W` f32 lanes), its portable,
//! AVX2 and AVX-512 lanes, and [`Isa`], which picks one at run time (or the lesser one
//! `REPRO_CONV_ISA` asks for) and calls the GEMM and weight-gradient kernels instantiated for it.

use std::ops::Range;
use std::sync::OnceLock;

use super::gemm::{gemm_task, Gemm};
use super::weight_grad::{weight_task, WeightGrad};

/// The widest [`Vector`] (lanes).
const MAX_W: usize = 16;

/// `W` f32 lanes. Everything is `#[inline(always)]`, so the generic kernels compile to the
/// instruction set of the `#[target_feature]` function they are instantiated in.
pub(super) trait Vector: Copy {
    const W: usize;
    fn splat(v: f32) -> Self;
    /// `W` values from `src`.
    ///
    /// # Safety
    /// `src` must be valid for reading `W` floats.
    unsafe fn load_ptr(src: *const f32) -> Self;
    /// Into the first `W` values of `dst`.
    fn store(self, dst: &mut [f32]);
    /// `self · a + b`, fused where the instruction set has FMA.
    fn mul_add(self, a: Self, b: Self) -> Self;

    /// The first `W` values of `src`.
    #[inline(always)]
    fn load(src: &[f32]) -> Self {
        let src = &src[..Self::W];
        // SAFETY: `src` holds `W` floats.
        unsafe { Self::load_ptr(src.as_ptr()) }
    }

    /// `src` (fewer than `W` values) padded with zeros.
    #[inline(always)]
    fn load_part(src: &[f32]) -> Self {
        let mut buf = [0.0f32; MAX_W];
        buf[..src.len()].copy_from_slice(src);
        Self::load(&buf)
    }

    /// The first `dst.len() < W` lanes.
    #[inline(always)]
    fn store_part(self, dst: &mut [f32]) {
        let mut buf = [0.0f32; MAX_W];
        self.store(&mut buf);
        dst.copy_from_slice(&buf[..dst.len()]);
    }

    /// The sum of the lanes, left to right.
    #[inline(always)]
    fn sum(self) -> f32 {
        let mut buf = [0.0f32; MAX_W];
        self.store(&mut buf);
        buf[..Self::W].iter().sum()
    }
}

/// The fallback: 8 lanes as an array (LLVM vectorises it to what the target has).
#[derive(Clone, Copy)]
struct Portable([f32; 8]);

impl Vector for Portable {
    const W: usize = 8;
    #[inline(always)]
    fn splat(v: f32) -> Self {
        Portable([v; 8])
    }
    #[inline(always)]
    unsafe fn load_ptr(src: *const f32) -> Self {
        // SAFETY: the caller guarantees 8 readable floats.
        Portable(unsafe { src.cast::<[f32; 8]>().read_unaligned() })
    }
    #[inline(always)]
    fn store(self, dst: &mut [f32]) {
        dst[..8].copy_from_slice(&self.0);
    }
    #[inline(always)]
    fn mul_add(self, a: Self, b: Self) -> Self {
        Portable(std::array::from_fn(|i| self.0[i] * a.0[i] + b.0[i]))
    }
}

/// The instruction set the kernels run with, chosen once per process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Isa {
    #[cfg(target_arch = "x86_64")]
    Avx512,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    Portable,
}

impl Isa {
    /// The best the CPU has, unless `REPRO_CONV_ISA` asks for a lesser one.
    pub(super) fn get() -> Isa {
        static ISA: OnceLock<Isa> = OnceLock::new();
        *ISA.get_or_init(|| {
            let best = Isa::detect();
            match std::env::var("REPRO_CONV_ISA").as_deref() {
                Ok("portable") => Isa::Portable,
                #[cfg(target_arch = "x86_64")]
                Ok("avx2") if best != Isa::Portable => Isa::Avx2,
                _ => best,
            }
        })
    }

    fn detect() -> Isa {
        #[cfg(target_arch = "x86_64")]
        {
            let avx2 = is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma");
            if avx2 && is_x86_feature_detected!("avx512f") {
                return Isa::Avx512;
            }
            if avx2 {
                return Isa::Avx2;
            }
        }
        Isa::Portable
    }

    pub(super) fn gemm(self, job: &Gemm, p0: usize, out: &mut [&mut [f32]]) {
        match self {
            // SAFETY: `Isa::detect` picks these only when the CPU has the features.
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => unsafe { x86::gemm_avx512(job, p0, out) },
            // SAFETY: as above.
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => unsafe { x86::gemm_avx2(job, p0, out) },
            Isa::Portable => gemm_task::<Portable, 4, 2>(job, p0, out),
        }
    }

    pub(super) fn weight(self, job: &WeightGrad, pixels: Range<usize>, out: &mut [f32]) {
        match self {
            // SAFETY: `Isa::detect` picks these only when the CPU has the features.
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => unsafe { x86::weight_avx512(job, pixels, out) },
            // SAFETY: as above.
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => unsafe { x86::weight_avx2(job, pixels, out) },
            Isa::Portable => weight_task::<Portable, 2>(job, pixels, out),
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    //! The kernels instantiated for AVX-512 (16 lanes, 32 registers: 4 rows × 4 vectors in
    //! the GEMM, 4 × 6 in the weight gradient) and AVX2+FMA (8 lanes, 16 registers: 4 × 2).
    //!
    //! Invariant that makes the intrinsics below sound: the vector types' methods run only
    //! inside the `#[target_feature]` functions of this module, and those are called only
    //! after [`super::Isa::detect`] found the features on the CPU.

    use std::arch::x86_64::*;

    use super::{gemm_task, weight_task, Gemm, Range, Vector, WeightGrad};

    #[target_feature(enable = "avx512f,avx2,fma")]
    pub(super) fn gemm_avx512(job: &Gemm, p0: usize, out: &mut [&mut [f32]]) {
        gemm_task::<F32x16, 8, 2>(job, p0, out)
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) fn gemm_avx2(job: &Gemm, p0: usize, out: &mut [&mut [f32]]) {
        gemm_task::<F32x8, 4, 2>(job, p0, out)
    }

    #[target_feature(enable = "avx512f,avx2,fma")]
    pub(super) fn weight_avx512(job: &WeightGrad, pixels: Range<usize>, out: &mut [f32]) {
        weight_task::<F32x16, 6>(job, pixels, out)
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) fn weight_avx2(job: &WeightGrad, pixels: Range<usize>, out: &mut [f32]) {
        weight_task::<F32x8, 2>(job, pixels, out)
    }

    #[derive(Clone, Copy)]
    struct F32x16(__m512);

    impl Vector for F32x16 {
        const W: usize = 16;
        #[inline(always)]
        fn splat(v: f32) -> Self {
            // SAFETY: AVX-512F is available (module invariant).
            F32x16(unsafe { _mm512_set1_ps(v) })
        }
        #[inline(always)]
        unsafe fn load_ptr(src: *const f32) -> Self {
            // SAFETY: the caller guarantees 16 readable floats; AVX-512F is available
            // (module invariant).
            F32x16(unsafe { _mm512_loadu_ps(src) })
        }
        #[inline(always)]
        fn store(self, dst: &mut [f32]) {
            let dst = &mut dst[..16];
            // SAFETY: `dst` holds 16 floats; AVX-512F is available (module invariant).
            unsafe { _mm512_storeu_ps(dst.as_mut_ptr(), self.0) }
        }
        #[inline(always)]
        fn mul_add(self, a: Self, b: Self) -> Self {
            // SAFETY: AVX-512F is available (module invariant).
            F32x16(unsafe { _mm512_fmadd_ps(self.0, a.0, b.0) })
        }
        #[inline(always)]
        fn load_part(src: &[f32]) -> Self {
            let mask = ((1u32 << src.len().min(16)) as u16).wrapping_sub(1);
            // SAFETY: only the first `src.len()` lanes are read (masked-off lanes do not
            // fault); AVX-512F is available (module invariant).
            F32x16(unsafe { _mm512_maskz_loadu_ps(mask, src.as_ptr()) })
        }
        #[inline(always)]
        fn store_part(self, dst: &mut [f32]) {
            let mask = ((1u32 << dst.len().min(16)) as u16).wrapping_sub(1);
            // SAFETY: only the first `dst.len()` lanes are written; AVX-512F is available
            // (module invariant).
            unsafe { _mm512_mask_storeu_ps(dst.as_mut_ptr(), mask, self.0) }
        }
        #[inline(always)]
        fn sum(self) -> f32 {
            // SAFETY: AVX-512F is available (module invariant).
            let halves = unsafe {
                let high = _mm512_extractf64x4_pd::<1>(_mm512_castps_pd(self.0));
                _mm256_add_ps(_mm512_castps512_ps256(self.0), _mm256_castpd_ps(high))
            };
            F32x8(halves).sum()
        }
    }

    #[derive(Clone, Copy)]
    struct F32x8(__m256);

    impl Vector for F32x8 {
        const W: usize = 8;
        #[inline(always)]
        fn splat(v: f32) -> Self {
            // SAFETY: AVX is available (module invariant).
            F32x8(unsafe { _mm256_set1_ps(v) })
        }
        #[inline(always)]
        unsafe fn load_ptr(src: *const f32) -> Self {
            // SAFETY: the caller guarantees 8 readable floats; AVX is available (module
            // invariant).
            F32x8(unsafe { _mm256_loadu_ps(src) })
        }
        #[inline(always)]
        fn store(self, dst: &mut [f32]) {
            let dst = &mut dst[..8];
            // SAFETY: `dst` holds 8 floats; AVX is available (module invariant).
            unsafe { _mm256_storeu_ps(dst.as_mut_ptr(), self.0) }
        }
        #[inline(always)]
        fn mul_add(self, a: Self, b: Self) -> Self {
            // SAFETY: FMA is available (module invariant).
            F32x8(unsafe { _mm256_fmadd_ps(self.0, a.0, b.0) })
        }
        #[inline(always)]
        fn load_part(src: &[f32]) -> Self {
            // SAFETY: only the first `src.len()` lanes are read (masked-off lanes do not
            // fault); AVX2 is available (module invariant).
            F32x8(unsafe { _mm256_maskload_ps(src.as_ptr(), lanes_below(src.len())) })
        }
        #[inline(always)]
        fn store_part(self, dst: &mut [f32]) {
            // SAFETY: only the first `dst.len()` lanes are written; AVX2 is available
            // (module invariant).
            unsafe { _mm256_maskstore_ps(dst.as_mut_ptr(), lanes_below(dst.len()), self.0) }
        }
        #[inline(always)]
        fn sum(self) -> f32 {
            // SAFETY: AVX is available (module invariant).
            unsafe {
                let q = _mm_add_ps(
                    _mm256_castps256_ps128(self.0),
                    _mm256_extractf128_ps::<1>(self.0),
                );
                let d = _mm_add_ps(q, _mm_movehl_ps(q, q));
                _mm_cvtss_f32(_mm_add_ss(d, _mm_shuffle_ps::<1>(d, d)))
            }
        }
    }

    /// An AVX2 lane mask: all ones in the lanes below `n`.
    #[inline(always)]
    fn lanes_below(n: usize) -> __m256i {
        // SAFETY: AVX2 is available (module invariant).
        unsafe {
            _mm256_cmpgt_epi32(
                _mm256_set1_epi32(n.min(8) as i32),
                _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
            )
        }
    }
}
