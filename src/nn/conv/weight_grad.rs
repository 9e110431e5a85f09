//! The weight and bias gradient of the CPU path: for each weight column, the sum over output
//! pixels and batch lanes of the output gradient times the input row the column multiplies,
//! in fixed chunks of pixels so that the order of the sums, and with it the bits, does not
//! depend on the thread count. Generic over the [`Vector`] lanes; `simd.rs` instantiates it
//! for each instruction set.

use std::ops::Range;

use rayon::prelude::*;

use super::gemm::block_rows;
use super::plan::NONE;
use super::simd::{Isa, Vector};

/// Output pixels per partial sum of the weight gradient. A constant: the summation order
/// of the weight gradient depends on it.
const WEIGHT_CHUNK: usize = 16;

/// The weight and bias gradient as `(O, C·k² + 1)` (the bias last; `(O, C·k²)` for a conv
/// without bias), summed over the output pixels in fixed chunks of [`WEIGHT_CHUNK`] (in
/// parallel), then over chunks in chunk order.
pub(super) fn weight_gradient(
    isa: Isa,
    plan: &super::Plan,
    dy: &[f32],
    (x, x_plane): (&[f32], usize),
    b: usize,
) -> Vec<f32> {
    let g = plan.geometry;
    let kk = g.kernel * g.kernel;
    let input_columns = g.c_in * kk;
    let columns = input_columns + usize::from(g.bias);
    let (in_pixels, out_pixels) = (g.h * g.w, g.out_h * g.out_w);
    assert_eq!(
        dy.len(),
        g.c_out * out_pixels * b,
        "conv output gradient size"
    );
    assert!(x_plane >= in_pixels * b, "conv input planes");
    assert_eq!(x.len(), g.c_in * x_plane, "conv input size");
    let (zeros, ones) = (vec![0.0f32; b], vec![1.0f32; b]);
    let job = WeightGrad {
        dy,
        x,
        sources: &plan.inner.sources,
        taps: kk,
        input_columns,
        columns,
        out_pixels,
        x_plane,
        b,
        zeros: &zeros,
        ones: &ones,
    };
    let per_chunk = g.c_out * columns;
    let mut partials = vec![0.0f32; out_pixels.div_ceil(WEIGHT_CHUNK) * per_chunk];
    partials
        .par_chunks_mut(per_chunk)
        .enumerate()
        .for_each(|(chunk, out)| {
            let pixels = chunk * WEIGHT_CHUNK..((chunk + 1) * WEIGHT_CHUNK).min(out_pixels);
            isa.weight(&job, pixels, out)
        });
    let mut sums = vec![0.0f32; per_chunk];
    for part in partials.chunks(per_chunk) {
        for (s, p) in sums.iter_mut().zip(part) {
            *s += p;
        }
    }
    sums
}

/// Inputs of the weight gradient: column `k < C·k²` of the weights is (c, tap) =
/// (k / k², k % k²) and multiplies the input row `x[c, q(p, tap)]`; the last column, if the
/// conv has a bias, is the bias and multiplies a row of ones.
pub(super) struct WeightGrad<'a> {
    dy: &'a [f32],
    x: &'a [f32],
    sources: &'a [u32],
    taps: usize,
    /// `C·k²`: the columns that multiply input rows.
    input_columns: usize,
    /// `input_columns`, plus one for the bias if there is one.
    columns: usize,
    out_pixels: usize,
    /// Floats from one input channel's rows to the next's.
    x_plane: usize,
    b: usize,
    zeros: &'a [f32],
    ones: &'a [f32],
}

/// What a weight column multiplies: input rows of one channel at one tap, ones (the
/// bias), or zeros (past the last column of a tile).
#[derive(Clone, Copy)]
enum Column {
    Input { plane: usize, tap: usize },
    Ones,
    Zeros,
}

impl WeightGrad<'_> {
    fn column(&self, k: usize) -> Column {
        if k < self.input_columns {
            Column::Input {
                plane: k / self.taps * self.x_plane,
                tap: k % self.taps,
            }
        } else if k < self.columns {
            Column::Ones
        } else {
            Column::Zeros
        }
    }

    /// The row (`b` floats) `column` multiplies at output pixel `p` (zeros in the padding).
    #[inline(always)]
    fn row(&self, column: Column, p: usize) -> &[f32] {
        let row = match column {
            Column::Input { plane, tap } => match self.sources[p * self.taps + tap] {
                NONE => self.zeros,
                q => &self.x[plane + q as usize * self.b..],
            },
            Column::Ones => self.ones,
            Column::Zeros => self.zeros,
        };
        &row[..self.b]
    }
}

/// One task of [`weight_gradient`]: `out[o·columns + k] = Σ_{p ∈ pixels} Σ_lanes
/// dy[o, p] · row(k, p)`. Tiles of `KR` columns in the outer loop, so that their input rows
/// stay in L1 while every block of output channels passes over them: streaming those rows
/// from L2 for each block instead made this pass three times slower than the forward.
#[inline(always)]
pub(super) fn weight_task<V: Vector, const KR: usize>(
    job: &WeightGrad,
    pixels: Range<usize>,
    out: &mut [f32],
) {
    let c_out = out.len() / job.columns;
    let mut rows = [[job.zeros; KR]; WEIGHT_CHUNK];
    let rows = &mut rows[..pixels.len()];
    // One k-tile's accumulators, `(o, j)` → a vector of lane sums.
    let mut tile_sums = vec![0.0f32; c_out * KR * V::W];
    for k0 in (0..job.columns).step_by(KR) {
        // The tile's input rows, looked up once for all blocks of output channels.
        for j in 0..KR {
            let column = job.column(k0 + j);
            for (row, p) in rows.iter_mut().zip(pixels.clone()) {
                row[j] = job.row(column, p);
            }
        }
        let mut o0 = 0;
        while o0 < c_out {
            let mr = block_rows(c_out - o0, 4);
            let (p0, sums) = (pixels.start, &mut tile_sums[..]);
            match mr {
                4 => weight_tile::<V, 4, KR>(job, rows, p0, o0, sums),
                2 => weight_tile::<V, 2, KR>(job, rows, p0, o0, sums),
                _ => weight_tile::<V, 1, KR>(job, rows, p0, o0, sums),
            }
            o0 += mr;
        }
        // The lanes summed here, apart from the kernels: a reduction with the columns'
        // bounds inside them kept LLVM from holding the accumulators in registers only.
        for (o, out) in out.chunks_mut(job.columns).enumerate() {
            for (j, out) in out[k0..].iter_mut().take(KR).enumerate() {
                *out = V::load(&tile_sums[(o * KR + j) * V::W..]).sum();
            }
        }
    }
}

/// `MR` output channels from `o0` × `KR` weight columns, in registers (one vector of lanes
/// each) over the pixels from `p0` and all lanes, into `sums[(o·KR + j)·W..][..W]`.
/// `rows[dp][j]` is the row column `j` of the tile multiplies at pixel `p0 + dp`.
#[inline(always)]
fn weight_tile<V: Vector, const MR: usize, const KR: usize>(
    job: &WeightGrad,
    rows: &[[&[f32]; KR]],
    p0: usize,
    o0: usize,
    sums: &mut [f32],
) {
    let full = job.b - job.b % V::W;
    weight_lanes::<V, MR, KR, false>(job, rows, p0, o0, 0..full, sums);
    // A last partial vector of lanes, apart: on the portable path its loads are calls, and
    // a call in the same loop as the main one made LLVM keep the accumulators in memory.
    if full < job.b {
        weight_lanes::<V, MR, KR, true>(job, rows, p0, o0, full..job.b, sums);
    }
}

/// [`weight_tile`] over `lanes`: whole vectors (stored to `sums`), or one partial vector if
/// `PART` (added to `sums`).
#[inline(always)]
#[allow(clippy::needless_range_loop)] // fixed-size register blocks read best as indices
fn weight_lanes<V: Vector, const MR: usize, const KR: usize, const PART: bool>(
    job: &WeightGrad,
    rows: &[[&[f32]; KR]],
    p0: usize,
    o0: usize,
    lanes: Range<usize>,
    sums: &mut [f32],
) {
    let b = job.b;
    assert!(lanes.end <= b && (PART || lanes.len().is_multiple_of(V::W)));
    let dy_row = |i: usize, p: usize| &job.dy[((o0 + i) * job.out_pixels + p) * b..][..b];
    let mut acc = [[V::splat(0.0); KR]; MR];
    for (dp, x_rows) in rows.iter().enumerate() {
        if PART {
            let mut d = [V::splat(0.0); MR];
            for i in 0..MR {
                d[i] = V::load_part(&dy_row(i, p0 + dp)[lanes.clone()]);
            }
            for j in 0..KR {
                let xv = V::load_part(&x_rows[j][lanes.clone()]);
                for i in 0..MR {
                    acc[i][j] = d[i].mul_add(xv, acc[i][j]);
                }
            }
            continue;
        }
        // Raw pointers: ten slices' lengths and bounds checks do not fit in the registers
        // beside 24 accumulators, and spilling them made this loop twice as slow.
        let mut dy = [std::ptr::null(); MR];
        for i in 0..MR {
            dy[i] = dy_row(i, p0 + dp).as_ptr();
        }
        let mut xs = [std::ptr::null(); KR];
        for j in 0..KR {
            assert_eq!(x_rows[j].len(), b);
            xs[j] = x_rows[j].as_ptr();
        }
        for lane in lanes.clone().step_by(V::W) {
            let mut d = [V::splat(0.0); MR];
            for i in 0..MR {
                // SAFETY: every row holds `b` floats (`dy_row`, the assert above), and
                // `lane + W <= lanes.end <= b` (whole vectors, asserted on entry).
                d[i] = unsafe { V::load_ptr(dy[i].add(lane)) };
            }
            for j in 0..KR {
                // SAFETY: as above.
                let xv = unsafe { V::load_ptr(xs[j].add(lane)) };
                for i in 0..MR {
                    acc[i][j] = d[i].mul_add(xv, acc[i][j]);
                }
            }
        }
    }
    for i in 0..MR {
        for j in 0..KR {
            let sum = &mut sums[((o0 + i) * KR + j) * V::W..][..V::W];
            let total = if PART {
                acc[i][j].mul_add(V::splat(1.0), V::load(sum))
            } else {
                acc[i][j]
            };
            total.store(sum);
        }
    }
}
