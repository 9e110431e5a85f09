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

use std::rc::Rc;

use dfdx::shapes::HasShape;

use super::{Dev, Param, Tp, T2};

/// The shape of one conv applied to one input size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    pub c_in: usize,
    pub c_out: usize,
    pub kernel: usize,
    pub stride: usize,
    pub pad: usize,
    /// Whether the conv adds a bias: on CUDA the plan then gathers a block of ones rows.
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

#[cfg(feature = "cuda")]
mod imp {
    //! dfdx's ops: a row gather of whole input rows into an im2col matrix (padding taps read a
    //! zero row, a block of ones rows is the bias "channel" if there is a bias) and one matmul. With fewer output
    //! than input channels it is cheaper to matmul first and gather-sum the taps on the output
    //! side; a 1×1 conv is a plain matmul.

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

    pub fn conv2d<T: Tp>(
        weight: &Param,
        bias: Option<&Param>,
        x: T2<T>,
        plan: &super::Plan,
    ) -> T2<T> {
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
                    (taped::<_, T>(&weight.value), taped::<_, T>(&bias.value))
                        .concat_along(Axis::<1>),
                    g.c_in * kk + 1,
                ),
                None => (taped::<_, T>(&weight.value), g.c_in * kk),
            };
            let cols = gather.apply(x).reshape_like(&(k, out_pixels * b));
            wide_matmul(full, cols).reshape_like(&(g.c_out * out_pixels, b))
        }
    }
}

#[cfg(not(feature = "cuda"))]
mod imp {
    use std::ops::Range;
    use std::sync::OnceLock;

    use dfdx::prelude::*;
    use rayon::prelude::*;

    use super::*;

    /// Marks a padding tap in [`Plan::sources`].
    const NONE: u32 = u32::MAX;

    /// Output pixels per partial sum of the weight gradient. A constant: the summation order
    /// of the weight gradient depends on it.
    const WEIGHT_CHUNK: usize = 16;

    /// The widest [`Vector`] (lanes).
    const MAX_W: usize = 16;

    /// One entry of a pixel's list: a weight tap and the pixel on the other side of it.
    #[derive(Clone, Copy, Debug)]
    struct Link {
        tap: u32,
        pixel: u32,
    }

    /// A list of links per pixel, flat (compressed sparse rows).
    struct Lists {
        offsets: Vec<usize>,
        links: Vec<Link>,
    }

    impl Lists {
        fn of(&self, pixel: usize) -> &[Link] {
            &self.links[self.offsets[pixel]..self.offsets[pixel + 1]]
        }
    }

    pub struct Plan {
        /// For each output pixel, the (tap, input pixel) pairs it reads; padding taps omitted.
        reads: Lists,
        /// For each input pixel, the (tap, output pixel) pairs that read it, by output pixel.
        readers: Lists,
        /// `sources[p·k² + tap]`: the input pixel output pixel `p` reads at `tap`, or [`NONE`].
        sources: Vec<u32>,
    }

    impl Plan {
        pub fn new(_dev: &Dev, g: &Geometry) -> Plan {
            let kk = g.kernel * g.kernel;
            let (in_pixels, out_pixels) = (g.h * g.w, g.out_h * g.out_w);
            assert!(
                in_pixels < NONE as usize && out_pixels < NONE as usize,
                "conv plan: too many pixels"
            );
            let mut sources = vec![NONE; out_pixels * kk];
            let mut reads = Lists {
                offsets: vec![0],
                links: Vec::new(),
            };
            for p in 0..out_pixels {
                for tap in 0..kk {
                    if let Some(q) = g.source(p, tap) {
                        sources[p * kk + tap] = q as u32;
                        reads.links.push(Link {
                            tap: tap as u32,
                            pixel: q as u32,
                        });
                    }
                }
                reads.offsets.push(reads.links.len());
            }
            // The inverse, by a stable counting sort of the reads on their input pixel.
            let mut offsets = vec![0usize; in_pixels + 1];
            for link in &reads.links {
                offsets[link.pixel as usize + 1] += 1;
            }
            for q in 0..in_pixels {
                offsets[q + 1] += offsets[q];
            }
            let mut fill = offsets.clone();
            let mut links = vec![Link { tap: 0, pixel: 0 }; reads.links.len()];
            for p in 0..out_pixels {
                for link in reads.of(p) {
                    let q = link.pixel as usize;
                    links[fill[q]] = Link {
                        tap: link.tap,
                        pixel: p as u32,
                    };
                    fill[q] += 1;
                }
            }
            Plan {
                reads,
                readers: Lists { offsets, links },
                sources,
            }
        }
    }

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
    /// and bias gradient ([`weight_gradient`]), then the input gradient, a [`Gemm`] over the
    /// input pixels that adds to whatever gradient the input already has.
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
        let w = weight.value.as_vec();
        let isa = Isa::get();

        let mut y = vec![0.0f32; g.c_out * out_pixels * b];
        // Without a bias the sums start from zeros.
        let init = bias.map_or_else(|| vec![0.0; g.c_out], |bias| bias.value.as_vec());
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
            let (x_ghost, out_ghost) = (x.ghost(), out.ghost());
            let (w_ghost, b_ghost) = (weight.value.ghost(), bias.map(|b| b.value.ghost()));
            let plan = Rc::clone(plan);
            tape.add_backward_op(move |grads| {
                // Our output's gradient is complete when this op runs and nothing reads it
                // after us: take its buffer instead of copying it.
                let dy: Vec<f32> = std::mem::take(&mut **grads.get_or_alloc_mut(&out_ghost)?);
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

    /// Rows per register block: the largest power of two up to `most` and `left`.
    fn block_rows(left: usize, most: usize) -> usize {
        let cap = left.min(most).max(1);
        1 << cap.ilog2()
    }

    /// A gathered GEMM. For each result pixel `p` and result channel `m`:
    /// `out[m, p] = init + Σ_{link of p} Σ_ch a[(link.tap·channels + ch)·rows + m] · src[ch, link.pixel]`,
    /// where `init` is `bias[m]` or, without a bias, what `out` already holds.
    struct Gemm<'a> {
        lists: &'a Lists,
        a: &'a [f32],
        /// Result channels.
        rows: usize,
        /// Source channels summed over.
        channels: usize,
        /// Rows of `b` floats: `src_pixels` per channel, channel planes `src_plane` apart.
        src: &'a [f32],
        src_pixels: usize,
        src_plane: usize,
        b: usize,
        bias: Option<&'a [f32]>,
    }

    impl Gemm<'_> {
        /// Fills `out (rows·pixels, b)`, in parallel over chunks of pixels. The chunk size only
        /// balances the work; it does not change any value.
        fn run(&self, isa: Isa, out: &mut [f32], pixels: usize) {
            let b = self.b;
            assert_eq!(out.len(), self.rows * pixels * b, "conv result size");
            assert!(self.src_plane >= self.src_pixels * b, "conv source planes");
            assert_eq!(
                self.src.len(),
                self.channels * self.src_plane,
                "conv source size"
            );
            assert_eq!(self.lists.offsets.len(), pixels + 1, "conv plan size");
            assert!(self.bias.is_none_or(|bias| bias.len() == self.rows));
            assert!(self.lists.links.iter().all(|l| {
                (l.pixel as usize) < self.src_pixels
                    && (l.tap as usize + 1) * self.channels * self.rows <= self.a.len()
            }));
            if out.is_empty() {
                return;
            }
            let chunk = (pixels / 16).clamp(1, 16);
            let tasks = pixels.div_ceil(chunk);
            let mut pieces: Vec<Vec<&mut [f32]>> =
                (0..tasks).map(|_| Vec::with_capacity(self.rows)).collect();
            for row in out.chunks_mut(pixels * b) {
                for (task, piece) in row.chunks_mut(chunk * b).enumerate() {
                    pieces[task].push(piece);
                }
            }
            pieces
                .into_par_iter()
                .enumerate()
                .for_each(|(task, mut rows)| isa.gemm(self, task * chunk, &mut rows));
        }
    }

    /// One task of [`Gemm::run`]: pixels from `p0` on, `out[m]` the piece of result row `m`,
    /// in register blocks of up to `MR` rows × `NV` vectors. Per pixel and lane block the
    /// blocks of rows run back to back, so that the source rows they share stay in L1.
    #[inline(always)]
    fn gemm_task<V: Vector, const MR: usize, const NV: usize>(
        job: &Gemm,
        p0: usize,
        out: &mut [&mut [f32]],
    ) {
        let b = job.b;
        let pixels = out[0].len() / b;
        for dp in 0..pixels {
            let links = job.lists.of(p0 + dp);
            let mut lane = 0;
            while lane < b {
                // A block of NV vectors, else one vector, else the last partial one.
                let n = match b - lane {
                    left if left >= NV * V::W => NV * V::W,
                    left if left >= V::W => V::W,
                    left => left,
                };
                let at = (dp * b + lane, lane);
                let mut m0 = 0;
                while m0 < job.rows {
                    let mr = block_rows(job.rows - m0, MR);
                    let rows = &mut out[m0..m0 + mr];
                    match mr {
                        8 => gemm_rows::<V, 8, NV>(job, links, m0, rows, at, n),
                        4 => gemm_rows::<V, 4, NV>(job, links, m0, rows, at, n),
                        2 => gemm_rows::<V, 2, NV>(job, links, m0, rows, at, n),
                        _ => gemm_rows::<V, 1, NV>(job, links, m0, rows, at, n),
                    }
                    m0 += mr;
                }
                lane += n;
            }
        }
    }

    /// [`gemm_block`] for `n` lanes: `NV` whole vectors, one, or one partial.
    #[inline(always)]
    fn gemm_rows<V: Vector, const MR: usize, const NV: usize>(
        job: &Gemm,
        links: &[Link],
        m0: usize,
        out: &mut [&mut [f32]],
        at: (usize, usize),
        n: usize,
    ) {
        if n == NV * V::W {
            gemm_block::<V, MR, NV, false>(job, links, m0, out, at, n)
        } else if n == V::W {
            gemm_block::<V, MR, 1, false>(job, links, m0, out, at, n)
        } else {
            gemm_block::<V, MR, 1, true>(job, links, m0, out, at, n)
        }
    }

    /// `MR` result rows × `NV` vectors of lanes (one partial vector of `n < W` lanes when
    /// `PART`), accumulated in registers over the links and source channels. `at` is the
    /// offset in the result pieces and the lane offset in the source rows.
    #[inline(always)]
    #[allow(clippy::needless_range_loop)] // fixed-size register blocks read best as indices
    fn gemm_block<V: Vector, const MR: usize, const NV: usize, const PART: bool>(
        job: &Gemm,
        links: &[Link],
        m0: usize,
        out: &mut [&mut [f32]],
        (at, lane): (usize, usize),
        n: usize,
    ) {
        let mut acc = [[V::splat(0.0); NV]; MR];
        for i in 0..MR {
            let row = &out[i][at..at + n];
            for v in 0..NV {
                acc[i][v] = match job.bias {
                    Some(bias) => V::splat(bias[m0 + i]),
                    None if PART => V::load_part(row),
                    None => V::load(&row[v * V::W..]),
                };
            }
        }
        let plane = job.src_plane;
        let per_tap = job.channels * job.rows;
        for link in links {
            let a = &job.a[link.tap as usize * per_tap..][..per_tap];
            let src = &job.src[link.pixel as usize * job.b + lane..];
            for ch in 0..job.channels {
                let w = &a[ch * job.rows + m0..][..MR];
                let x = &src[ch * plane..][..n];
                let mut xv = [V::splat(0.0); NV];
                for v in 0..NV {
                    xv[v] = if PART {
                        V::load_part(x)
                    } else {
                        V::load(&x[v * V::W..])
                    };
                }
                for i in 0..MR {
                    let wi = V::splat(w[i]);
                    for v in 0..NV {
                        acc[i][v] = xv[v].mul_add(wi, acc[i][v]);
                    }
                }
            }
        }
        for i in 0..MR {
            let row = &mut out[i][at..at + n];
            for v in 0..NV {
                if PART {
                    acc[i][v].store_part(row);
                } else {
                    acc[i][v].store(&mut row[v * V::W..]);
                }
            }
        }
    }

    /// The weight and bias gradient as `(O, C·k² + 1)` (the bias last; `(O, C·k²)` for a conv
    /// without bias), summed over the output pixels in fixed chunks of [`WEIGHT_CHUNK`] (in
    /// parallel), then over chunks in chunk order.
    fn weight_gradient(
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
    struct WeightGrad<'a> {
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
    fn weight_task<V: Vector, const KR: usize>(
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

    /// `W` f32 lanes. Everything is `#[inline(always)]`, so the generic kernels compile to the
    /// instruction set of the `#[target_feature]` function they are instantiated in.
    trait Vector: Copy {
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
    enum Isa {
        #[cfg(target_arch = "x86_64")]
        Avx512,
        #[cfg(target_arch = "x86_64")]
        Avx2,
        Portable,
    }

    impl Isa {
        /// The best the CPU has, unless `REPRO_CONV_ISA` asks for a lesser one.
        fn get() -> Isa {
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

        fn gemm(self, job: &Gemm, p0: usize, out: &mut [&mut [f32]]) {
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

        fn weight(self, job: &WeightGrad, pixels: Range<usize>, out: &mut [f32]) {
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
}
