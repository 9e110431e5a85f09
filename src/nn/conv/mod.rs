//! 2-D convolution in the `(C·H·W, B)` row layout. On CPU: a direct "gathered GEMM" kernel that
//! never builds an im2col matrix and never packs. On CUDA: dfdx's ops (row gather + matmul).
//!
//! Why a kernel of our own: every tap of an output pixel reads one whole input row of B
//! contiguous floats, so a conv is a sequence of multiply-adds on B-vectors. Through im2col and
//! `matrixmultiply::sgemm` instead, packing the 9×-inflated column matrix cost as much as the
//! arithmetic: M (16–64 output channels) is tiny while N (pixels × batch) is ~10⁵.
//!
//! With p an output pixel, q an input pixel and `q(p, tap)` the pixel p reads at a tap (none in
//! the padding), each `[channel, pixel]` below a row of B floats (products lane by lane):
//!
//! ```text
//! forward       y[o, p]   = bias[o] + Σ_tap Σ_c W[o, c, tap] · x[c, q(p, tap)]
//! input grad    dx[c, q] += Σ_{(p, tap) with q(p, tap) = q} Σ_o W[o, c, tap] · dy[o, p]
//! weight grad   dW[o, c, tap] += Σ_p Σ_lanes dy[o, p] · x[c, q(p, tap)]   (db: x a row of ones)
//! ```
//!
//! The bias is optional: a conv followed by an ActNorm has none (the ActNorm's own bias would
//! make it redundant), and then the forward starts from zeros and the weight gradient has no
//! bias column.
//!
//! The first two are one kernel, [`Gemm`]: for each result pixel a list of (tap, pixel on the
//! other side) links (the [`Plan`] holds them in both directions), and a register block of up to
//! 4 result channels × a block of batch lanes accumulated over links × channels. The input
//! gradient is thus a gather over the pixels that read q, never a racing scatter. The weight
//! gradient ([`WeightGrad`]) holds a tile of 4 output channels × a few weight columns in
//! registers while it runs over a fixed chunk of pixels; chunk partials are summed in chunk order.
//!
//! **Determinism.** Each result value is made by one kernel call in a fixed order; threads only
//! decide who makes which call, and the weight gradient's pixel chunks are a constant. So the
//! bytes do not depend on the thread count.
//!
//! **Instruction sets.** The crate is not built with `target-cpu=native`, so the kernels are
//! generic over a [`Vector`] of lanes, all `#[inline(always)]`, and instantiated inside
//! `#[target_feature]` functions for AVX-512 and AVX2+FMA (picked at run time), plus a portable
//! fallback. `REPRO_CONV_ISA=avx2` or `=portable` forces a lesser one (the tests cover all three).
//! Results differ between instruction sets in the last bits (FMA or not, lane blocking).
//!
//! **Files.** This one: the public API ([`Geometry`], [`Plan`], [`kernels`], [`conv2d`]), which
//! defers to the path the build has. The CPU path: `plan.rs` (the link lists), `cpu.rs` (the
//! dfdx op: forward and backward), `gemm.rs` ([`Gemm`]), `weight_grad.rs` ([`WeightGrad`]) and
//! `simd.rs` (the [`Vector`] lanes and the instruction set). The CUDA path: `cuda.rs`.

use std::rc::Rc;

use dfdx::shapes::HasShape;

use super::{Dev, Param, Tp, T2};

#[cfg(not(feature = "cuda"))]
mod cpu;
#[cfg(feature = "cuda")]
mod cuda;
#[cfg(not(feature = "cuda"))]
mod gemm;
#[cfg(not(feature = "cuda"))]
mod plan;
#[cfg(not(feature = "cuda"))]
mod simd;
#[cfg(not(feature = "cuda"))]
mod weight_grad;

/// The path this build runs: its plan, [`kernels`] and [`conv2d`].
#[cfg(not(feature = "cuda"))]
mod imp {
    pub use super::cpu::{conv2d, kernels};
    pub use super::plan::Plan;
}
#[cfg(feature = "cuda")]
use cuda as imp;

/// The shape of one conv applied to one input size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    pub c_in: usize,
    pub c_out: usize,
    pub kernel: usize,
    pub stride: usize,
    pub pad: usize,
    /// Whether the conv adds a bias: one more column of the weight gradient on CPU, a block of
    /// ones rows in the im2col on CUDA.
    pub bias: bool,
    pub h: usize,
    pub w: usize,
    pub out_h: usize,
    pub out_w: usize,
}

impl Geometry {
    /// The input pixel (`iy·w + ix`) that output pixel `p` reads at `tap` (`ky·k + kx`), or
    /// `None` when the tap falls in the zero padding.
    fn source(&self, p: usize, tap: usize) -> Option<usize> {
        let (oy, ox) = (p / self.out_w, p % self.out_w);
        let (ky, kx) = (tap / self.kernel, tap % self.kernel);
        let iy = (oy * self.stride + ky).checked_sub(self.pad)?;
        let ix = (ox * self.stride + kx).checked_sub(self.pad)?;
        (iy < self.h && ix < self.w).then_some(iy * self.w + ix)
    }
}

/// Everything a conv needs for one input geometry; built once and cached by the layer.
pub struct Plan {
    pub geometry: Geometry,
    inner: imp::Plan,
}

impl Plan {
    pub fn new(dev: &Dev, geometry: Geometry) -> Plan {
        Plan {
            geometry,
            inner: imp::Plan::new(dev, &geometry),
        }
    }
}

/// Which kernels convolutions run on: `avx512`, `avx2` or `portable` on CPU, `cuda` on CUDA.
pub fn kernels() -> &'static str {
    imp::kernels()
}

/// Convolves `x (C_in·h·w, B)` with `weight (O, C_in·k·k)` and, if the plan's geometry has
/// one, `bias (O,)`, returning `(O·out_h·out_w, B)`.
pub fn conv2d<T: Tp>(weight: &Param, bias: Option<&Param>, x: T2<T>, plan: &Rc<Plan>) -> T2<T> {
    let g = plan.geometry;
    assert_eq!(x.shape().0, g.c_in * g.h * g.w, "conv input rows");
    assert_eq!(bias.is_some(), g.bias, "conv bias against its plan");
    imp::conv2d(weight, bias, x, plan)
}
