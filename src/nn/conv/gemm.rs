//! The gathered GEMM of the CPU path, one kernel for the forward and for the input gradient:
//! for each result pixel, register blocks of result channels × batch lanes accumulated over
//! the pixel's links (`plan.rs`) and the source channels. Generic over the [`Vector`] lanes;
//! `simd.rs` instantiates it for each instruction set.

use rayon::prelude::*;

use super::plan::{Link, Lists};
use super::simd::{Isa, Vector};

/// Rows per register block: the largest power of two up to `most` and `left`.
pub(super) fn block_rows(left: usize, most: usize) -> usize {
    let cap = left.min(most).max(1);
    1 << cap.ilog2()
}

/// A gathered GEMM. For each result pixel `p` and result channel `m`:
/// `out[m, p] = init + Σ_{link of p} Σ_ch a[(link.tap·channels + ch)·rows + m] · src[ch, link.pixel]`,
/// where `init` is `bias[m]` or, without a bias, what `out` already holds.
pub(super) struct Gemm<'a> {
    pub(super) lists: &'a Lists,
    pub(super) a: &'a [f32],
    /// Result channels.
    pub(super) rows: usize,
    /// Source channels summed over.
    pub(super) channels: usize,
    /// Rows of `b` floats: `src_pixels` per channel, channel planes `src_plane` apart.
    pub(super) src: &'a [f32],
    pub(super) src_pixels: usize,
    pub(super) src_plane: usize,
    pub(super) b: usize,
    pub(super) bias: Option<&'a [f32]>,
}

impl Gemm<'_> {
    /// Fills `out (rows·pixels, b)`, in parallel over chunks of pixels. The chunk size only
    /// balances the work; it does not change any value.
    pub(super) fn run(&self, isa: Isa, out: &mut [f32], pixels: usize) {
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
pub(super) fn gemm_task<V: Vector, const MR: usize, const NV: usize>(
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
