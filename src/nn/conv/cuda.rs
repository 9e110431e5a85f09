//! The CUDA path, on dfdx's ops: a row gather of whole input rows into an im2col matrix
//! (padding taps read a zero row, a block of ones rows is the bias "channel" if there is a
//! bias) and one matmul. With fewer output than input channels it is cheaper to matmul first
//! and gather-sum the taps on the output side; a 1×1 conv is a plain matmul.

use dfdx::prelude::*;

use super::super::channel::affine_per_channel;
use super::super::gather::{RowGather, ONE_ROW, ZERO_ROW};
use super::super::matmul::wide_matmul;
use super::super::ops::taped;
use super::*;

pub fn kernels() -> &'static str {
    "cuda"
}

pub struct Plan {
    /// `None` for a 1×1, stride 1, unpadded conv.
    gather: Option<RowGather>,
}

fn pointwise(g: &Geometry) -> bool {
    g.kernel == 1 && g.stride == 1 && g.pad == 0
}

fn output_side(g: &Geometry) -> bool {
    g.kernel > 1 && g.c_out < g.c_in
}

impl Plan {
    pub fn new(dev: &Dev, g: &Geometry) -> Plan {
        if pointwise(g) {
            return Plan { gather: None };
        }
        let kk = g.kernel * g.kernel;
        let (in_pixels, out_pixels) = (g.h * g.w, g.out_h * g.out_w);
        let mut source = Vec::new();
        if output_side(g) {
            // Rows of the matmul result are (o, tap, iy, ix); the sum runs over taps.
            for o in 0..g.c_out {
                for p in 0..out_pixels {
                    for tap in 0..kk {
                        source.push(
                            g.source(p, tap)
                                .map_or(ZERO_ROW, |q| (o * kk + tap) * in_pixels + q),
                        );
                    }
                }
            }
        } else {
            // Rows of the im2col matrix are (c, tap, oy, ox), then a block of bias rows.
            for c in 0..g.c_in {
                for tap in 0..kk {
                    for p in 0..out_pixels {
                        source.push(g.source(p, tap).map_or(ZERO_ROW, |q| c * in_pixels + q));
                    }
                }
            }
            if g.bias {
                source.extend(std::iter::repeat_n(ONE_ROW, out_pixels));
            }
        }
        let rows = if output_side(g) {
            g.c_out * kk * in_pixels
        } else {
            g.c_in * in_pixels
        };
        Plan {
            gather: Some(RowGather::new(dev, source, rows)),
        }
    }
}

pub fn conv2d<T: Tp>(weight: &Param, bias: Option<&Param>, x: T2<T>, plan: &super::Plan) -> T2<T> {
    let g = plan.geometry;
    let b = x.shape().1;
    let kk = g.kernel * g.kernel;
    let (in_pixels, out_pixels) = (g.h * g.w, g.out_h * g.out_w);
    let add_bias = |y: T2<T>| match bias {
        Some(bias) => affine_per_channel(y, Some(bias), None, g.c_out),
        None => y,
    };
    let Some(gather) = &plan.inner.gather else {
        let y = wide_matmul(
            taped::<_, T>(&weight.value),
            x.reshape_like(&(g.c_in, in_pixels * b)),
        );
        return add_bias(y.reshape_like(&(g.c_out * in_pixels, b)));
    };
    if output_side(&g) {
        // (O·kk, C) weight view: reorder columns (c, tap) to rows (o, tap).
        let x = x.reshape_like(&(g.c_in, in_pixels * b));
        let wt = taped::<_, T>(&weight.value)
            .reshape_like(&(g.c_out, g.c_in, kk))
            .permute::<_, Axes3<0, 2, 1>>()
            .contiguous()
            .reshape_like(&(g.c_out * kk, g.c_in));
        let y = wide_matmul(wt, x);
        let taps = gather.apply(y.reshape_like(&(g.c_out * kk * in_pixels, b)));
        let summed = taps
            .reshape_like(&(g.c_out * out_pixels, kk, b))
            .sum::<(usize, usize), Axis<1>>();
        add_bias(summed)
    } else {
        // The bias, if any, is one more weight column, multiplying the ones rows.
        let (full, k) = match bias {
            Some(bias) => (
                (taped::<_, T>(&weight.value), taped::<_, T>(&bias.value)).concat_along(Axis::<1>),
                g.c_in * kk + 1,
            ),
            None => (taped::<_, T>(&weight.value), g.c_in * kk),
        };
        let cols = gather.apply(x).reshape_like(&(k, out_pixels * b));
        wide_matmul(full, cols).reshape_like(&(g.c_out * out_pixels, b))
    }
}
