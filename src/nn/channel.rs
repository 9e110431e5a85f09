//! Per-channel affine map `y = (x + b[c]) · exp(k · s[c])` on `(C·S, B)` activations, the op
//! behind ActNorm, the zero-conv output scale and every bias add.
//!
//! On CPU it is a custom op through dfdx's public tape API: one parallel pass per channel
//! block forward, and one backward pass that produces dx, db and ds together (db[c] = Σ g,
//! ds[c] = k·Σ dy·y over the block, g = dy·exp(k·s[c])), summed in a fixed order per channel
//! so the bytes do not depend on the thread count. Built from dfdx's broadcast ops instead,
//! these maps cost more than the convolutions (their reductions run serially). On CUDA the
//! broadcast composition is used.

use super::{Param, Tp, T2};

/// `y = (x + b[c])·exp(k·s[c])` with `channels` blocks of rows; `bias` and `log_scale` are
/// per-channel parameters (`(C,)`), either may be absent.
pub fn affine_per_channel<T: Tp>(
    x: T2<T>,
    bias: Option<&Param>,
    log_scale: Option<(&Param, f32)>,
    channels: usize,
) -> T2<T> {
    imp::affine(x, bias, log_scale, channels)
}

#[cfg(feature = "cuda")]
mod imp {
    use super::super::ops::{add_per_channel, mul_per_channel, taped};
    use super::*;

    pub fn affine<T: Tp>(
        x: T2<T>,
        bias: Option<&Param>,
        log_scale: Option<(&Param, f32)>,
        channels: usize,
    ) -> T2<T> {
        let x = match bias {
            Some(b) => add_per_channel(x, taped::<_, T>(&b.as_vector()), channels),
            None => x,
        };
        match log_scale {
            Some((s, k)) => mul_per_channel(x, (taped::<_, T>(&s.as_vector()) * k).exp(), channels),
            None => x,
        }
    }
}

#[cfg(not(feature = "cuda"))]
mod imp {
    use dfdx::prelude::*;
    use rayon::prelude::*;

    use super::*;

    pub fn affine<T: Tp>(
        x: T2<T>,
        bias: Option<&Param>,
        log_scale: Option<(&Param, f32)>,
        channels: usize,
    ) -> T2<T> {
        let (rows, b) = *x.shape();
        assert_eq!(rows % channels, 0, "rows must split into channel blocks");
        let block = rows / channels * b;
        let shift: Vec<f32> = bias.map_or_else(|| vec![0.0; channels], |p| p.value.as_vec());
        let (scale, k): (Vec<f32>, f32) = match log_scale {
            Some((p, k)) => (p.value.as_vec().iter().map(|s| (k * s).exp()).collect(), k),
            None => (vec![1.0; channels], 0.0),
        };
        let (x, mut tape) = x.split_tape();
        let input = x.as_vec();
        let mut out = vec![0.0f32; rows * b];
        out.par_chunks_mut(block.max(1))
            .zip(input.par_chunks(block.max(1)))
            .enumerate()
            .for_each(|(c, (o, i))| {
                for (o, i) in o.iter_mut().zip(i) {
                    *o = (i + shift[c]) * scale[c];
                }
            });
        let dev = x.device().clone();
        let out: T2 = dev.tensor_from_vec(out, (rows, b));
        if T::OWNS_TAPE {
            let (x_ghost, out_ghost) = (x.ghost(), out.ghost());
            let out_values = out.clone();
            let bias = bias.map(|p| p.value.clone());
            let log_scale = log_scale.map(|(p, _)| p.value.clone());
            tape.add_backward_op(move |grads| {
                let upstream: Vec<f32> = std::mem::take(&mut **grads.get_or_alloc_mut(&out_ghost)?);
                let y = out_values.as_vec();
                // Per channel: (Σ g, k·Σ dy·y), in a fixed order.
                let sums: Vec<(f32, f32)> = upstream
                    .par_chunks(block.max(1))
                    .zip(y.par_chunks(block.max(1)))
                    .enumerate()
                    .map(|(c, (dy, y))| {
                        let mut g_sum = 0.0f32;
                        let mut dyy = 0.0f32;
                        for (dy, y) in dy.iter().zip(y) {
                            g_sum += dy;
                            dyy += dy * y;
                        }
                        (g_sum * scale[c], k * dyy)
                    })
                    .collect();
                let grad_x = grads.get_or_alloc_mut(&x_ghost)?;
                grad_x
                    .par_chunks_mut(block.max(1))
                    .zip(upstream.par_chunks(block.max(1)))
                    .enumerate()
                    .for_each(|(c, (gx, dy))| {
                        for (gx, dy) in gx.iter_mut().zip(dy) {
                            *gx += dy * scale[c];
                        }
                    });
                if let Some(bias) = &bias {
                    let grad_b = grads.get_or_alloc_mut(bias)?;
                    for (g, (db, _)) in grad_b.iter_mut().zip(&sums) {
                        *g += db;
                    }
                }
                if let Some(log_scale) = &log_scale {
                    let grad_s = grads.get_or_alloc_mut(log_scale)?;
                    for (g, (_, ds)) in grad_s.iter_mut().zip(&sums) {
                        *g += ds;
                    }
                }
                Ok(())
            });
        }
        out.put_tape(tape)
    }
}
