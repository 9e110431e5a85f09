//! The CPU path as a custom dfdx op: it copies the input into channel planes, runs the forward
//! [`Gemm`] and records the backward step, which runs the weight gradient and then the input
//! gradient's [`Gemm`]. The kernels are in `gemm.rs` and `weight_grad.rs`, the choice of
//! instruction set in `simd.rs`, the link lists they run over in `plan.rs`.

use std::rc::Rc;

use dfdx::prelude::*;

use super::gemm::Gemm;
use super::simd::Isa;
use super::weight_grad::weight_gradient;
use super::{Geometry, Param, Tp, T2};

pub fn kernels() -> &'static str {
    match Isa::get() {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => "avx512",
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => "avx2",
        Isa::Portable => "portable",
    }
}

/// The custom dfdx op. Forward: one [`Gemm`] over the output pixels. Backward: the weight
/// and bias gradient ([`weight_gradient`]; not under [`crate::nn::with_frozen_weights`]), then
/// the input gradient, a [`Gemm`] over the input pixels that adds to whatever gradient the
/// input already has.
pub fn conv2d<T: Tp>(
    weight: &Param,
    bias: Option<&Param>,
    x: T2<T>,
    plan: &Rc<super::Plan>,
) -> T2<T> {
    let g = plan.geometry;
    let b = x.shape().1;
    let (in_pixels, out_pixels) = (g.h * g.w, g.out_h * g.out_w);
    // `contiguous` is free for the usual contiguous input; then the raw copy is exact.
    let (x, mut tape) = x.contiguous().split_tape();
    let plane = padded_plane(in_pixels * b);
    let mut input = vec![0.0f32; g.c_in * plane];
    x.copy_into(&mut input[..g.c_in * in_pixels * b]);
    spread_planes(&mut input, in_pixels * b, plane);
    let w = super::super::host_copy(&weight.value);
    let isa = Isa::get();

    let mut y = vec![0.0f32; g.c_out * out_pixels * b];
    // Without a bias the sums start from zeros.
    let init = bias.map_or_else(
        || vec![0.0; g.c_out],
        |bias| super::super::host_copy(&bias.value),
    );
    let forward = Gemm {
        lists: &plan.inner.reads,
        a: &pack(&w, &g, false),
        rows: g.c_out,
        channels: g.c_in,
        src: &input,
        src_pixels: in_pixels,
        src_plane: plane,
        b,
        bias: Some(&init),
    };
    forward.run(isa, &mut y, out_pixels);
    let out: T2 = x.device().tensor_from_vec(y, (g.c_out * out_pixels, b));

    if T::OWNS_TAPE {
        let weights_wanted = super::super::weight_gradients_wanted();
        let (x_ghost, out_ghost) = (x.ghost(), out.ghost());
        let (w_ghost, b_ghost) = (weight.value.ghost(), bias.map(|b| b.value.ghost()));
        let plan = Rc::clone(plan);
        tape.add_backward_op(move |grads| {
            // Our output's gradient is complete when this op runs and nothing reads it
            // after us: take its buffer instead of copying it.
            let dy: Vec<f32> = std::mem::take(&mut **grads.get_or_alloc_mut(&out_ghost)?);
            if weights_wanted {
                let sums = weight_gradient(isa, &plan, &dy, (&input, plane), b);
                let weights = g.c_in * g.kernel * g.kernel;
                let columns = weights + usize::from(g.bias);
                let dw = grads.get_or_alloc_mut(&w_ghost)?;
                for (dw_row, sum_row) in dw.chunks_mut(weights).zip(sums.chunks(columns)) {
                    for (d, s) in dw_row.iter_mut().zip(sum_row) {
                        *d += s;
                    }
                }
                if let Some(b_ghost) = &b_ghost {
                    let db = grads.get_or_alloc_mut(b_ghost)?;
                    for (d, sum_row) in db.iter_mut().zip(sums.chunks(columns)) {
                        *d += sum_row[weights];
                    }
                }
            }
            let input_grad = Gemm {
                lists: &plan.inner.readers,
                a: &pack(&w, &g, true),
                rows: g.c_in,
                channels: g.c_out,
                src: &dy,
                src_pixels: out_pixels,
                src_plane: out_pixels * b,
                b,
                bias: None,
            };
            input_grad.run(isa, grads.get_or_alloc_mut(&x_ghost)?, in_pixels);
            Ok(())
        });
    }
    out.put_tape(tape)
}

/// The weights `(O, C·k²)` rearranged for a [`Gemm`]: `[(tap·C + c)·O + o]` for the forward
/// (result rows are output channels), `[(tap·O + o)·C + c]` for the input gradient.
fn pack(w: &[f32], g: &Geometry, transposed: bool) -> Vec<f32> {
    let kk = g.kernel * g.kernel;
    let mut a = vec![0.0f32; w.len()];
    for o in 0..g.c_out {
        for c in 0..g.c_in {
            for tap in 0..kk {
                let at = if transposed {
                    (tap * g.c_out + o) * g.c_in + c
                } else {
                    (tap * g.c_in + c) * g.c_out + o
                };
                a[at] = w[(o * g.c_in + c) * kk + tap];
            }
        }
    }
    a
}

/// The distance between channel planes of `floats` floats in our copy of a conv's input:
/// an odd number of cache lines. With planes a multiple of 4 KiB apart (16 channels of
/// 28×28 × 128 floats: 98 pages), the rows of all channels at one pixel fall in the same L1
/// sets, more of them than the cache has ways, and the forward ran at 60 % of its speed on
/// other sizes.
fn padded_plane(floats: usize) -> usize {
    let lines = floats.div_ceil(16);
    (lines | 1) * 16
}

/// Moves the channel planes of `buf`, packed `dense` floats apart, to `plane` apart.
fn spread_planes(buf: &mut [f32], dense: usize, plane: usize) {
    if plane == dense {
        return;
    }
    let channels = buf.len() / plane;
    // From the last channel down, so no plane is overwritten before it has moved.
    for c in (1..channels).rev() {
        buf.copy_within(c * dense..(c + 1) * dense, c * plane);
    }
}
