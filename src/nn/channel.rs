//! Per-channel affine map `y = (x + b[c]) · exp(k · s[c])` on `(C·S, B)` activations, the op
//! behind ActNorm, the zero-conv output scale and every bias add; optionally followed, in the
//! same pass, by a ReLU and an inverted-dropout mask (the coupling network's and the
//! nuisance MLP's `ActNorm/bias → ReLU → dropout`).
//!
//! On CPU it is a custom op through dfdx's public tape API: one parallel pass per channel
//! block forward, and one backward pass that produces dx, db and ds together (db[c] = Σ g,
//! ds[c] = k·Σ g·y over the block, g = dy·mask·[y > 0]·exp(k·s[c]) summed as dfdx would
//! order it), summed in a fixed order per channel so the bytes do not depend on the thread
//! count. Built from dfdx's broadcast ops instead, these maps cost more than the convolutions
//! (their reductions run serially), and a separate ReLU and dropout cost two more passes and
//! two more buffers each way. The fused op computes every value with the same f32 operations
//! in the same order as the unfused chain, so it gives the same bits (tests/nn.rs checks
//! values and gradients against dfdx's ops). On CUDA the dfdx composition is used.

use dfdx::shapes::HasShape;
use rand_chacha::ChaCha8Rng;

use super::{Param, Tp, T2};

/// `y = (x + b[c])·exp(k·s[c])` with `channels` blocks of rows; `bias` and `log_scale` are
/// per-channel parameters (`(C,)`), either may be absent.
pub fn affine_per_channel<T: Tp>(
    x: T2<T>,
    bias: Option<&Param>,
    log_scale: Option<(&Param, f32)>,
    channels: usize,
) -> T2<T> {
    imp::affine(x, bias, log_scale, channels, None)
}

/// `dropout(relu(affine_per_channel(x, …)), p)`: the mask is drawn from `dropout`'s
/// generator exactly as [`super::ops::dropout`] draws it (`None`, or p = 0: no dropout).
pub fn affine_relu_dropout<T: Tp>(
    x: T2<T>,
    bias: Option<&Param>,
    log_scale: Option<(&Param, f32)>,
    channels: usize,
    dropout: Option<(f32, &mut ChaCha8Rng)>,
) -> T2<T> {
    let n = x.shape().0 * x.shape().1;
    let mask = match dropout {
        Some((p, rng)) if p != 0.0 => Some(super::ops::DropoutMask::draw(n, p, rng)),
        _ => None,
    };
    imp::affine(x, bias, log_scale, channels, Some(mask))
}

#[cfg(feature = "cuda")]
mod imp {
    use super::super::ops::{add_per_channel, mul_per_channel, taped, DropoutMask};
    use super::*;

    /// `relu`: `None` = the affine map alone, `Some(mask)` = then ReLU and the mask if any.
    pub fn affine<T: Tp>(
        x: T2<T>,
        bias: Option<&Param>,
        log_scale: Option<(&Param, f32)>,
        channels: usize,
        relu: Option<Option<DropoutMask>>,
    ) -> T2<T> {
        let x = match bias {
            Some(b) => add_per_channel(x, taped::<_, T>(&b.as_vector()), channels),
            None => x,
        };
        let y = match log_scale {
            Some((s, k)) => mul_per_channel(x, (taped::<_, T>(&s.as_vector()) * k).exp(), channels),
            None => x,
        };
        match relu {
            None => y,
            Some(None) => y.relu(),
            Some(Some(mask)) => mask.apply(y.relu()),
        }
    }
}

#[cfg(not(feature = "cuda"))]
mod imp {
    /// The fused chain for one call: per channel `shift` and `scale = exp(k·s)`, then the
    /// ReLU and the mask if any (only after a ReLU), for channel blocks of `block` elements.
    /// The element loops carry no reduction, so the compiler vectorises them; the per-channel
    /// sums of the backward run in their own serial loop, in element order.
    struct Chain {
        shift: Vec<f32>,
        scale: Vec<f32>,
        k: f32,
        relu: bool,
        mask: Option<DropoutMask>,
        block: usize,
    }

    impl Chain {
        /// The mask's kept flags for channel `c`'s block of `len` elements.
        fn kept(&self, c: usize, len: usize) -> Option<&[bool]> {
            let start = c * self.block;
            self.mask.as_ref().map(|m| &m.kept()[start..start + len])
        }

        /// `out = post(pre(x))` on channel `c`'s block: the affine value `(x + shift)·scale`,
        /// then exactly the f32 operations of dfdx's `relu` (max with 0) and of `x * mask`
        /// (mask ∈ {0, 1/(1−p)}).
        fn forward_block(&self, c: usize, x: &[f32], out: &mut [f32]) {
            let (shift, scale) = (self.shift[c], self.scale[c]);
            match (self.kept(c, x.len()), self.relu) {
                (Some(kept), _) => {
                    let keep = self.mask.as_ref().map_or(1.0, |m| m.keep_factor());
                    for ((o, &v), &k) in out.iter_mut().zip(x).zip(kept) {
                        *o = ((v + shift) * scale).max(0.0) * if k { keep } else { 0.0 };
                    }
                }
                (None, true) => {
                    for (o, &v) in out.iter_mut().zip(x) {
                        *o = ((v + shift) * scale).max(0.0);
                    }
                }
                (None, false) => {
                    for (o, &v) in out.iter_mut().zip(x) {
                        *o = (v + shift) * scale;
                    }
                }
            }
        }

        /// The backward on channel `c`'s block. In place: `x` becomes the affine values y
        /// (recomputed with the forward's operations: the same bits) and `dy` the gradient g
        /// at the affine output (through the mask, dfdx's `dy·factor`, then the ReLU, dfdx's
        /// `[y > 0]·g`); `gx += g·scale`. Returns `(Σ g · scale, k · Σ g·y)` summed in element
        /// order.
        fn backward_block(
            &self,
            c: usize,
            x: &mut [f32],
            dy: &mut [f32],
            gx: &mut [f32],
        ) -> (f32, f32) {
            let (shift, scale) = (self.shift[c], self.scale[c]);
            let keep = self.mask.as_ref().map_or(1.0, |m| m.keep_factor());
            let kept = self.kept(c, x.len());
            for (i, ((x, dy), gx)) in x
                .iter_mut()
                .zip(dy.iter_mut())
                .zip(gx.iter_mut())
                .enumerate()
            {
                let y = (*x + shift) * scale;
                let mut g = *dy;
                if let Some(kept) = kept {
                    g *= if kept[i] { keep } else { 0.0 };
                }
                if self.relu {
                    g *= if y > 0.0 { 1.0 } else { 0.0 };
                }
                *x = y;
                *dy = g;
                *gx += g * scale;
            }
            let (mut g_sum, mut gy) = (0.0f32, 0.0f32);
            for (&g, &y) in dy.iter().zip(x.iter()) {
                g_sum += g;
                gy += g * y;
            }
            (g_sum * scale, self.k * gy)
        }
    }

    use dfdx::prelude::*;
    use rayon::prelude::*;

    use super::super::host_copy;
    use super::super::ops::DropoutMask;
    use super::*;

    /// `relu`: `None` = the affine map alone, `Some(mask)` = then ReLU and the mask if any.
    pub fn affine<T: Tp>(
        x: T2<T>,
        bias: Option<&Param>,
        log_scale: Option<(&Param, f32)>,
        channels: usize,
        relu: Option<Option<DropoutMask>>,
    ) -> T2<T> {
        let (rows, b) = *x.shape();
        assert_eq!(rows % channels, 0, "rows must split into channel blocks");
        let (relu, mask) = match relu {
            None => (false, None),
            Some(mask) => (true, mask),
        };
        if let Some(mask) = &mask {
            assert_eq!(mask.len(), rows * b, "dropout mask size");
        }
        let chain = Chain {
            shift: bias.map_or_else(|| vec![0.0; channels], |p| host_copy(&p.value)),
            scale: log_scale.map_or_else(
                || vec![1.0; channels],
                |(p, k)| host_copy(&p.value).iter().map(|s| (k * s).exp()).collect(),
            ),
            k: log_scale.map_or(0.0, |(_, k)| k),
            relu,
            mask,
            block: (rows / channels * b).max(1),
        };
        let block = chain.block;
        let (x, mut tape) = x.split_tape();
        let mut input = host_copy(&x);
        let mut out = vec![0.0f32; rows * b];
        out.par_chunks_mut(block)
            .zip(input.par_chunks(block))
            .enumerate()
            .for_each(|(c, (o, i))| chain.forward_block(c, i, o));
        let dev = x.device().clone();
        let out: T2 = dev.tensor_from_vec(out, (rows, b));
        if T::OWNS_TAPE {
            let (x_ghost, out_ghost) = (x.ghost(), out.ghost());
            let bias = bias.map(|p| p.value.clone());
            let log_scale = log_scale.map(|(p, _)| p.value.clone());
            tape.add_backward_op(move |grads| {
                let mut upstream: Vec<f32> =
                    std::mem::take(&mut **grads.get_or_alloc_mut(&out_ghost)?);
                let grad_x = grads.get_or_alloc_mut(&x_ghost)?;
                let sums: Vec<(f32, f32)> = grad_x
                    .par_chunks_mut(block)
                    .zip(upstream.par_chunks_mut(block))
                    .zip(input.par_chunks_mut(block))
                    .enumerate()
                    .map(|(c, ((gx, dy), x))| chain.backward_block(c, x, dy, gx))
                    .collect();
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
