//! `W (M, K) × X (K, N)` for a small parameter-side matrix W and a wide activation X: the linear
//! layers (N = batch), and on CUDA the convs (N = pixels × batch, tens of thousands).
//!
//! dfdx computes the weight gradient dW = dY·Xᵀ as one product with an output of only M×K
//! entries and a reduction over all N, which runs on one core. This custom op (CPU) splits N
//! into fixed chunks of [`CHUNK`] columns and runs them in parallel: forward and
//! dX = Wᵀ·dY chunk by chunk, dW as per-chunk partial products summed in chunk order (none under
//! [`super::with_frozen_weights`]). The
//! chunking does not depend on the thread count, so neither do the bytes. A narrow product (N
//! within one chunk: an MLP layer on one batch) is split into fixed blocks of rows instead, so
//! it does not run on one core either. On CUDA it falls back
//! to dfdx's matmul. (Convs have their own kernel, [`super::conv`].)

use dfdx::prelude::*;

use super::{Tp, T2};

/// Columns per parallel chunk (fixed: the summation order of dW depends on it).
pub const CHUNK: usize = 2048;

/// `w × x`; `w` may carry its own tape (a function of parameters).
pub fn wide_matmul<T: Tp, W: Tp + Merge<T>>(w: T2<W>, x: T2<T>) -> T2<W> {
    imp::wide_matmul(w, x)
}

#[cfg(feature = "cuda")]
mod imp {
    use super::*;

    pub fn wide_matmul<T: Tp, W: Tp + Merge<T>>(w: T2<W>, x: T2<T>) -> T2<W> {
        w.matmul(x)
    }
}

#[cfg(not(feature = "cuda"))]
mod imp {
    use rayon::prelude::*;

    use super::super::{host_copy, weight_gradients_wanted};
    use super::*;

    /// A raw pointer that may cross threads: every chunk writes a disjoint set of columns.
    #[derive(Clone, Copy)]
    struct Shared(*mut f32);
    unsafe impl Send for Shared {}
    unsafe impl Sync for Shared {}

    impl Shared {
        /// The pointer `offset` floats on. A method, so that closures capture the whole (Send)
        /// wrapper, not its raw field.
        ///
        /// # Safety
        /// The buffer the pointer came from must still be alive and hold at least `offset`
        /// floats (`offset` may be its length, one past the end), as [`pointer::add`] requires.
        unsafe fn at(self, offset: usize) -> *mut f32 {
            // SAFETY: `offset` stays within the live buffer (this function's contract).
            unsafe { self.0.add(offset) }
        }
    }

    /// Rows per block when the product is narrow (one column chunk); fixed like [`CHUNK`].
    const ROW_BLOCK: usize = 64;

    fn row_blocks(m: usize, n: usize) -> Vec<(usize, usize)> {
        if n > CHUNK {
            return vec![(0, m)];
        }
        (0..m)
            .step_by(ROW_BLOCK)
            .map(|start| (start, (start + ROW_BLOCK).min(m)))
            .collect()
    }

    fn chunks(n: usize) -> Vec<(usize, usize)> {
        (0..n)
            .step_by(CHUNK)
            .map(|start| (start, (start + CHUNK).min(n)))
            .collect()
    }

    /// `c[:, chunk] += a × b[:, chunk]` for a (m×k; or the transpose of a row-major k×m
    /// matrix), b (k×n) and c (m×n), all row-major.
    fn product(
        m: usize,
        k: usize,
        n: usize,
        a: &[f32],
        a_transposed: bool,
        b: &[f32],
        c: &mut [f32],
    ) {
        assert!(
            a.len() >= m * k && b.len() >= k * n && c.len() >= m * n,
            "matmul buffer sizes"
        );
        // Nothing to add; and below, every tile's offsets then lie inside the buffers.
        if m == 0 || k == 0 || n == 0 {
            return;
        }
        let out = Shared(c.as_mut_ptr());
        let (rsa, csa) = if a_transposed {
            (1, m as isize)
        } else {
            (k as isize, 1)
        };
        // Tiles of (rows, columns): column chunks, and for a narrow product (an MLP layer on
        // one batch: N fits one chunk) also fixed blocks of rows, so it is not left on one
        // core. The tiling depends on the shapes only, never on the thread count.
        let rows = row_blocks(m, n);
        let tiles: Vec<((usize, usize), (usize, usize))> = chunks(n)
            .into_iter()
            .flat_map(|c| rows.iter().map(move |&r| (r, c)))
            .collect();
        tiles
            .into_par_iter()
            .for_each(|((row_start, row_end), (start, end))| {
                // SAFETY: sizes checked above and no dimension is zero, so row_start < m and
                // start < n: every offset below lies inside its buffer (`out.at`:
                // row_start·n + start < m·n <= c.len(), and `c` outlives the parallel loop).
                // Each tile reads and writes only rows row_start..row_end and columns
                // start..end of c; a and b are only read.
                unsafe {
                    matrixmultiply::sgemm(
                        row_end - row_start,
                        k,
                        end - start,
                        1.0,
                        a.as_ptr().offset(row_start as isize * rsa),
                        rsa,
                        csa,
                        b.as_ptr().add(start),
                        n as isize,
                        1,
                        1.0,
                        out.at(row_start * n + start),
                        n as isize,
                        1,
                    );
                }
            });
    }

    /// dW (m×k) += dY (m×n) · Xᵀ, X (k×n): per-chunk partials summed in chunk order (or, for a
    /// narrow product, row blocks in parallel).
    fn weight_gradient(m: usize, k: usize, n: usize, dy: &[f32], x: &[f32], dw: &mut [f32]) {
        assert!(
            dy.len() >= m * n && x.len() >= k * n && dw.len() >= m * k,
            "matmul buffer sizes"
        );
        // Nothing to add; and below, every block's offsets then lie inside the buffers.
        if m == 0 || k == 0 || n == 0 {
            return;
        }
        if n <= CHUNK {
            // Narrow (one chunk): blocks of rows of dW in parallel, each summed in one go.
            let out = Shared(dw.as_mut_ptr());
            row_blocks(m, n)
                .into_par_iter()
                .for_each(|(row_start, row_end)| {
                    // SAFETY: sizes checked above and no dimension is zero, so row_start < m:
                    // every offset below lies inside its buffer (`out.at`: row_start·k < m·k
                    // <= dw.len(), and `dw` outlives the parallel loop). Each block reads rows
                    // row_start..row_end of dy and all of x (as its transpose), and writes
                    // only those rows of dw.
                    unsafe {
                        matrixmultiply::sgemm(
                            row_end - row_start,
                            n,
                            k,
                            1.0,
                            dy.as_ptr().add(row_start * n),
                            n as isize,
                            1,
                            x.as_ptr(),
                            1,
                            n as isize,
                            1.0,
                            out.at(row_start * k),
                            k as isize,
                            1,
                        );
                    }
                });
            return;
        }
        let partials: Vec<Vec<f32>> = chunks(n)
            .into_par_iter()
            .map(|(start, end)| {
                let mut part = vec![0.0f32; m * k];
                // SAFETY: sizes checked above; reads columns start..end of dy and of x (read
                // as its transpose: row stride 1, column stride n); writes a private buffer.
                unsafe {
                    matrixmultiply::sgemm(
                        m,
                        end - start,
                        k,
                        1.0,
                        dy.as_ptr().add(start),
                        n as isize,
                        1,
                        x.as_ptr().add(start),
                        1,
                        n as isize,
                        0.0,
                        part.as_mut_ptr(),
                        k as isize,
                        1,
                    );
                }
                part
            })
            .collect();
        for part in partials {
            for (g, p) in dw.iter_mut().zip(part) {
                *g += p;
            }
        }
    }

    /// The custom op: `y = w × x`.
    fn matmul_op<T: Tp, W: Tp + Merge<T>>(w: T2<W>, x: T2<T>) -> T2<W> {
        let (m, k) = *w.shape();
        let n = x.shape().1;
        let (w, w_tape) = w.split_tape();
        let (x, x_tape) = x.split_tape();
        let mut tape = w_tape.merge(x_tape);
        let cols = host_copy(&x);
        let weights = host_copy(&w);
        let mut y = vec![0.0f32; m * n];
        product(m, k, n, &weights, false, &cols, &mut y);
        let out: T2 = x.device().tensor_from_vec(y, (m, n));
        if W::OWNS_TAPE {
            let weights_wanted = weight_gradients_wanted();
            let (w_ghost, x_ghost, out_ghost) = (w.ghost(), x.ghost(), out.ghost());
            tape.add_backward_op(move |grads| {
                let dy: Vec<f32> = std::mem::take(&mut **grads.get_or_alloc_mut(&out_ghost)?);
                if weights_wanted {
                    weight_gradient(m, k, n, &dy, &cols, grads.get_or_alloc_mut(&w_ghost)?);
                }
                product(
                    k,
                    m,
                    n,
                    &weights,
                    true,
                    &dy,
                    grads.get_or_alloc_mut(&x_ghost)?,
                );
                Ok(())
            });
        }
        out.put_tape(tape)
    }

    pub fn wide_matmul<T: Tp, W: Tp + Merge<T>>(w: T2<W>, x: T2<T>) -> T2<W> {
        assert_eq!(w.shape().1, x.shape().0, "matmul inner dimensions");
        matmul_op(w, x)
    }
}
