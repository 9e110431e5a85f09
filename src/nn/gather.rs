//! Row gather with constant rows: the one data-movement op every layer here is made of
//! (im2col for convs, squeeze, channel permutations, logit read-out).
//!
//! `out[i] = source[index[i]]`, where an index may also be [`ZERO_ROW`] (padding taps) or
//! [`ONE_ROW`] (the bias "channel" of a conv). On CPU this is a custom op through dfdx's
//! public tape API: the forward copies rows in parallel, the backward sums the gradient of
//! every output row into its source row, grouped by source row (an inverse index computed
//! once), so it is parallel *and* bitwise deterministic for any thread count. dfdx's own
//! `gather` backward is a serial scatter loop (~2.5 ns per element), which dominated conv
//! layers. On CUDA it falls back to dfdx's `gather` over the input with a zero and a ones row
//! appended.

use std::sync::Arc;

use dfdx::prelude::*;

use super::{Dev, Tp, T2};

/// Index value that produces a row of zeros.
pub const ZERO_ROW: usize = usize::MAX;
/// Index value that produces a row of ones.
pub const ONE_ROW: usize = usize::MAX - 1;

/// A fixed gather from `source_rows` rows, built once per layer geometry.
#[derive(Clone, Debug)]
pub struct RowGather {
    pub index: Arc<Vec<usize>>,
    pub source_rows: usize,
    /// For each source row, the output rows reading it (CSR: offsets, rows).
    #[cfg_attr(feature = "cuda", allow(dead_code))]
    readers: Arc<(Vec<usize>, Vec<usize>)>,
    /// dfdx index with constants mapped to appended rows (CUDA path).
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    device_index: Tensor<(usize,), usize, Dev>,
}

impl RowGather {
    pub fn new(dev: &Dev, index: Vec<usize>, source_rows: usize) -> RowGather {
        let mut counts = vec![0usize; source_rows + 1];
        for &src in &index {
            if src < source_rows {
                counts[src + 1] += 1;
            } else {
                assert!(
                    src == ZERO_ROW || src == ONE_ROW,
                    "gather index {src} out of range {source_rows}"
                );
            }
        }
        for r in 0..source_rows {
            counts[r + 1] += counts[r];
        }
        let mut fill = counts.clone();
        let mut rows = vec![0usize; counts[source_rows]];
        for (out, &src) in index.iter().enumerate() {
            if src < source_rows {
                rows[fill[src]] = out;
                fill[src] += 1;
            }
        }
        let mapped: Vec<usize> = index
            .iter()
            .map(|&s| match s {
                ZERO_ROW => source_rows,
                ONE_ROW => source_rows + 1,
                s => s,
            })
            .collect();
        let n = mapped.len();
        RowGather {
            index: Arc::new(index),
            source_rows,
            readers: Arc::new((counts, rows)),
            device_index: dev.tensor_from_vec(mapped, (n,)),
        }
    }

    pub fn len(&self) -> usize {
        self.index.len()
    }

    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// `(source_rows, B) → (len, B)`.
    pub fn apply<T: Tp>(&self, x: T2<T>) -> T2<T> {
        assert_eq!(x.shape().0, self.source_rows, "gather source rows");
        self.apply_impl(x)
    }

    #[cfg(feature = "cuda")]
    fn apply_impl<T: Tp>(&self, x: T2<T>) -> T2<T> {
        let b = x.shape().1;
        let dev = x.device().clone();
        let zero: T2 = dev.zeros_like(&(1, b));
        let ones: T2 = dev.ones_like(&(1, b));
        ((x, zero).concat_along(Axis::<0>), ones)
            .concat_along(Axis::<0>)
            .gather(self.device_index.clone())
    }

    #[cfg(not(feature = "cuda"))]
    fn apply_impl<T: Tp>(&self, x: T2<T>) -> T2<T> {
        let (x, mut tape) = x.split_tape();
        let b = x.shape().1;
        let dev = x.device().clone();
        let out: T2 = dev.tensor_from_vec(
            self.gather_rows(&super::host_copy(&x), b),
            (self.index.len(), b),
        );
        if T::OWNS_TAPE {
            let (input, output) = (x.ghost(), out.ghost());
            let this = self.clone();
            tape.add_backward_op(move |grads| {
                // Our output's gradient is complete when this op runs and nothing reads it
                // after us: take its buffer instead of copying it.
                let upstream: Vec<f32> = std::mem::take(&mut **grads.get_or_alloc_mut(&output)?);
                this.scatter_add(&upstream, grads.get_or_alloc_mut(&input)?, b);
                Ok(())
            });
        }
        out.put_tape(tape)
    }

    /// Forward on raw rows of width `b`: `out[i] = source[index[i]]` (or a constant row).
    #[cfg(not(feature = "cuda"))]
    pub(crate) fn gather_rows(&self, source: &[f32], b: usize) -> Vec<f32> {
        use rayon::prelude::*;
        let mut out = vec![0.0f32; self.index.len() * b];
        out.par_chunks_mut(b.max(1))
            .zip(self.index.par_iter())
            .for_each(|(row, &src)| match src {
                ZERO_ROW => {}
                ONE_ROW => row.fill(1.0),
                s => row.copy_from_slice(&source[s * b..(s + 1) * b]),
            });
        out
    }

    /// Backward on raw rows: adds each output row's gradient into its source row, grouped by
    /// source row (parallel, fixed order within a row).
    #[cfg(not(feature = "cuda"))]
    pub(crate) fn scatter_add(&self, upstream: &[f32], grad: &mut [f32], b: usize) {
        use rayon::prelude::*;
        let (offsets, rows) = &*self.readers;
        grad[..self.source_rows * b]
            .par_chunks_mut(b.max(1))
            .enumerate()
            .for_each(|(src, g)| {
                for &out_row in &rows[offsets[src]..offsets[src + 1]] {
                    for (gi, ui) in g.iter_mut().zip(&upstream[out_row * b..(out_row + 1) * b]) {
                        *gi += ui;
                    }
                }
            });
    }
}
