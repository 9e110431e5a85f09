//! Layers built from dfdx's public ops in the `(C·H·W, B)` row layout.
//!
//! A 2-D convolution is [`conv2d`] (a direct kernel on CPU, see [`super::conv`]) over a plan of
//! which input pixel each tap reads, computed once per input geometry and cached by the layer.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

use dfdx::prelude::*;
use rand_chacha::ChaCha8Rng;

use super::channel::{affine_per_channel, affine_relu_dropout};
use super::conv::{conv2d, Geometry, Plan};
use super::gather::RowGather;
use super::matmul::wide_matmul;
use super::{Dev, HasParams, Param, Tp, T1, T2};

/// A parameter entering a taped computation. dfdx records an op only on the tape of its left
/// operand and merges tapes left to right, so parameters join the graph on an empty tape of
/// their own (merged when combined with the activation); gradients are keyed by tensor id and
/// land on the parameter.
pub fn taped<S: Shape, T: Tp>(param: &Tensor<S, f32, Dev>) -> Tensor<S, f32, Dev, T> {
    param.retaped::<T>()
}

/// `w (O, I) × x (I, N)`.
pub fn matmul_left<T: Tp>(w: &T2, x: T2<T>) -> T2<T> {
    wide_matmul(taped::<_, T>(w), x)
}

/// Adds a per-channel vector to `x (C·S, B)` viewed as `C` blocks of `S` rows. `v` may itself
/// be taped (a function of parameters).
pub fn add_per_channel<T: Tp, V: Tp + Merge<T>>(x: T2<T>, v: T1<V>, channels: usize) -> T2<V> {
    let (rows, b) = *x.shape();
    let per = rows / channels * b;
    let x = x.reshape_like(&(channels, per));
    (v.broadcast_like::<_, Axis<1>>(&(channels, per)) + x).reshape_like(&(rows, b))
}

/// Multiplies `x (C·S, B)` by a per-channel vector (itself possibly taped).
pub fn mul_per_channel<T: Tp, V: Tp + Merge<T>>(x: T2<T>, v: T1<V>, channels: usize) -> T2<V> {
    let (rows, b) = *x.shape();
    let per = rows / channels * b;
    let x = x.reshape_like(&(channels, per));
    (v.broadcast_like::<_, Axis<1>>(&(channels, per)) * x).reshape_like(&(rows, b))
}

/// A fixed row map (squeeze, channel reverse/shuffle, logit read-out); exactly invertible by
/// [`RowMap::inverse`] when it is a permutation.
#[derive(Clone, Debug)]
pub struct RowMap {
    pub source: Vec<usize>,
    gather: RowGather,
}

impl RowMap {
    /// A permutation: `source[i]` is the input row output row `i` reads.
    pub fn new(dev: &Dev, source: Vec<usize>) -> RowMap {
        let rows = source.len();
        RowMap::selecting(dev, source, rows)
    }

    /// A selection of rows out of `rows` input rows.
    pub fn selecting(dev: &Dev, source: Vec<usize>, rows: usize) -> RowMap {
        RowMap {
            gather: RowGather::new(dev, source.clone(), rows),
            source,
        }
    }

    pub fn apply<T: Tp>(&self, x: T2<T>) -> T2<T> {
        self.gather.apply(x)
    }

    /// The inverse permutation (panics if this map is not a bijection).
    pub fn inverse(&self, dev: &Dev) -> RowMap {
        let mut inv = vec![usize::MAX; self.source.len()];
        for (out, &src) in self.source.iter().enumerate() {
            inv[src] = out;
        }
        assert!(
            inv.iter().all(|&i| i != usize::MAX),
            "row map is not a permutation"
        );
        RowMap::new(dev, inv)
    }
}

/// 2-D convolution `(C_in·H·W, B) → (C_out·H_o·W_o, B)`, weights in PyTorch's `(O, C, k, k)`.
pub struct Conv2d {
    pub weight: Param,
    /// `None` for a conv whose output goes straight into an ActNorm (see [`Conv2d::init_without_bias`]).
    pub bias: Option<Param>,
    pub c_in: usize,
    pub c_out: usize,
    pub kernel: usize,
    pub stride: usize,
    pub pad: usize,
    plans: RefCell<HashMap<(usize, usize), Rc<Plan>>>,
}

impl Conv2d {
    pub fn new(weight: Param, bias: Option<Param>, stride: usize, pad: usize) -> Conv2d {
        let (c_out, c_in, kernel) = (weight.shape[0], weight.shape[1], weight.shape[2]);
        assert_eq!(weight.shape, vec![c_out, c_in, kernel, kernel]);
        if let Some(bias) = &bias {
            assert_eq!(bias.shape, vec![c_out]);
        }
        Conv2d {
            weight,
            bias,
            c_in,
            c_out,
            kernel,
            stride,
            pad,
            plans: RefCell::new(HashMap::new()),
        }
    }

    /// PyTorch's default init, with a bias (drawn after the weights).
    #[allow(clippy::too_many_arguments)]
    pub fn init(
        dev: &Dev,
        name: &str,
        c_in: usize,
        c_out: usize,
        kernel: usize,
        stride: usize,
        pad: usize,
        rng: &mut ChaCha8Rng,
    ) -> Conv2d {
        let mut conv = Conv2d::init_without_bias(dev, name, c_in, c_out, kernel, stride, pad, rng);
        let fan_in = c_in * kernel * kernel;
        conv.bias = Some(Param::uniform(
            dev,
            format!("{name}.bias"),
            &[c_out],
            fan_in,
            rng,
        ));
        conv
    }

    /// PyTorch's default init of the weights, and no bias: for a conv followed by an ActNorm,
    /// whose own per-channel bias would make the conv's redundant (the authors' coupling nets,
    /// PyTorch's `bias=False`).
    #[allow(clippy::too_many_arguments)]
    pub fn init_without_bias(
        dev: &Dev,
        name: &str,
        c_in: usize,
        c_out: usize,
        kernel: usize,
        stride: usize,
        pad: usize,
        rng: &mut ChaCha8Rng,
    ) -> Conv2d {
        let fan_in = c_in * kernel * kernel;
        let weight = Param::uniform(
            dev,
            format!("{name}.weight"),
            &[c_out, c_in, kernel, kernel],
            fan_in,
            rng,
        );
        Conv2d::new(weight, None, stride, pad)
    }

    /// Weights and bias zero (a coupling's last layer starts as the identity map).
    pub fn zeros(
        dev: &Dev,
        name: &str,
        c_in: usize,
        c_out: usize,
        kernel: usize,
        pad: usize,
    ) -> Conv2d {
        let weight = Param::zeros(
            dev,
            format!("{name}.weight"),
            &[c_out, c_in, kernel, kernel],
        );
        let bias = Param::zeros(dev, format!("{name}.bias"), &[c_out]);
        Conv2d::new(weight, Some(bias), 1, pad)
    }

    pub fn out_size(&self, h: usize, w: usize) -> (usize, usize) {
        (
            (h + 2 * self.pad - self.kernel) / self.stride + 1,
            (w + 2 * self.pad - self.kernel) / self.stride + 1,
        )
    }

    fn plan(&self, dev: &Dev, h: usize, w: usize) -> Rc<Plan> {
        let mut plans = self.plans.borrow_mut();
        let plan = plans.entry((h, w)).or_insert_with(|| {
            let (out_h, out_w) = self.out_size(h, w);
            let geometry = Geometry {
                c_in: self.c_in,
                c_out: self.c_out,
                kernel: self.kernel,
                stride: self.stride,
                pad: self.pad,
                bias: self.bias.is_some(),
                h,
                w,
                out_h,
                out_w,
            };
            Rc::new(Plan::new(dev, geometry))
        });
        Rc::clone(plan)
    }

    /// Convolves `x (C_in·h·w, B)`; returns the output and its spatial size.
    pub fn forward<T: Tp>(&self, x: T2<T>, h: usize, w: usize) -> (T2<T>, usize, usize) {
        assert_eq!(x.shape().0, self.c_in * h * w, "conv input rows");
        let plan = self.plan(x.device(), h, w);
        let y = conv2d(&self.weight, self.bias.as_ref(), x, &plan);
        (y, plan.geometry.out_h, plan.geometry.out_w)
    }
}

impl HasParams for Conv2d {
    fn visit<'a>(&'a self, f: &mut dyn FnMut(&'a Param)) {
        f(&self.weight);
        if let Some(bias) = &self.bias {
            f(bias);
        }
    }
    fn visit_mut(&mut self, f: &mut dyn FnMut(&mut Param)) {
        f(&mut self.weight);
        if let Some(bias) = &mut self.bias {
            f(bias);
        }
    }
}

/// Fully connected layer `(I, B) → (O, B)`, weight `(O, I)` as in PyTorch.
pub struct Linear {
    pub weight: Param,
    pub bias: Param,
}

impl Linear {
    pub fn init(
        dev: &Dev,
        name: &str,
        inputs: usize,
        outputs: usize,
        rng: &mut ChaCha8Rng,
    ) -> Linear {
        Linear {
            weight: Param::uniform(
                dev,
                format!("{name}.weight"),
                &[outputs, inputs],
                inputs,
                rng,
            ),
            bias: Param::uniform(dev, format!("{name}.bias"), &[outputs], inputs, rng),
        }
    }

    pub fn forward<T: Tp>(&self, x: T2<T>) -> T2<T> {
        let y = matmul_left(&self.weight.value, x);
        let rows = self.weight.shape[0];
        affine_per_channel(y, Some(&self.bias), None, rows)
    }

    /// `dropout(relu(forward(x)), p)` with the bias, ReLU and mask in one pass
    /// ([`affine_relu_dropout`]); `rng` `None` = evaluation mode.
    pub fn forward_relu_dropout<T: Tp>(
        &self,
        x: T2<T>,
        p: f32,
        rng: Option<&mut ChaCha8Rng>,
    ) -> T2<T> {
        let y = matmul_left(&self.weight.value, x);
        let rows = self.weight.shape[0];
        affine_relu_dropout(y, Some(&self.bias), None, rows, rng.map(|rng| (p, rng)))
    }
}

impl HasParams for Linear {
    fn visit<'a>(&'a self, f: &mut dyn FnMut(&'a Param)) {
        f(&self.weight);
        f(&self.bias);
    }
    fn visit_mut(&mut self, f: &mut dyn FnMut(&mut Param)) {
        f(&mut self.weight);
        f(&mut self.bias);
    }
}

/// Inverted dropout with a mask from the caller's seeded generator (not the device's), so a
/// resumed run draws the same masks. `None` = evaluation mode.
pub fn dropout<T: Tp>(x: T2<T>, p: f32, rng: Option<&mut ChaCha8Rng>) -> T2<T> {
    let Some(rng) = rng else { return x };
    if p == 0.0 {
        return x;
    }
    let n = x.shape().0 * x.shape().1;
    DropoutMask::draw(n, p, rng).apply(x)
}

/// An inverted-dropout mask: element i is kept (× 1/(1−p)) unless the i-th draw
/// `rng.gen::<f32>()` is below p. [`dropout`] and the fused
/// [`super::channel::affine_relu_dropout`] draw it the same way, so they agree bit for bit.
#[derive(Clone, Debug)]
pub struct DropoutMask {
    kept: Vec<bool>,
    keep_factor: f32,
}

impl DropoutMask {
    pub fn draw(n: usize, p: f32, rng: &mut ChaCha8Rng) -> DropoutMask {
        use rand::Rng;
        DropoutMask {
            kept: (0..n).map(|_| rng.gen::<f32>() >= p).collect(),
            keep_factor: 1.0 / (1.0 - p),
        }
    }

    pub fn len(&self) -> usize {
        self.kept.len()
    }

    pub fn is_empty(&self) -> bool {
        self.kept.is_empty()
    }

    /// Which elements are kept.
    pub fn kept(&self) -> &[bool] {
        &self.kept
    }

    /// What a kept element is multiplied by: 1/(1−p).
    pub fn keep_factor(&self) -> f32 {
        self.keep_factor
    }

    /// What element i is multiplied by: 1/(1−p) or 0.
    #[inline]
    pub fn factor(&self, i: usize) -> f32 {
        if self.kept[i] {
            self.keep_factor
        } else {
            0.0
        }
    }

    /// `x · mask` through dfdx's multiply.
    pub fn apply<T: Tp>(&self, x: T2<T>) -> T2<T> {
        let shape = *x.shape();
        assert_eq!(shape.0 * shape.1, self.len(), "dropout mask size");
        let values = (0..self.len()).map(|i| self.factor(i)).collect();
        let mask: T2 = x.device().tensor_from_vec(values, shape);
        x * mask
    }
}

/// Mean cross-entropy of `logits (K, B)` (classes in rows) against labels.
///
/// dfdx 0.13's `log_softmax`/`logsumexp` backward is wrong on non-contiguous tensors (the
/// forward looks right), so the logits are made contiguous first; a regression test in
/// tests/nn.rs fails if this is removed.
pub fn cross_entropy<T: Tp>(logits: T2<T>, labels: &[u8]) -> Tensor<(), f32, Dev, T> {
    let (k, b) = *logits.shape();
    assert_eq!(labels.len(), b);
    let mut onehot = vec![0.0f32; k * b];
    for (col, &y) in labels.iter().enumerate() {
        onehot[y as usize * b + col] = -1.0 / b as f32;
    }
    let onehot: T2 = logits.device().tensor_from_vec(onehot, (k, b));
    let logp = logits.contiguous().log_softmax::<Axis<0>>();
    (logp * onehot).sum()
}

/// Argmax over rows of `(K, B)` scores, per column.
pub fn argmax_rows(scores: &T2) -> Vec<u8> {
    let (k, b) = *scores.shape();
    let values = scores.as_vec();
    (0..b)
        .map(|col| {
            let mut best = 0;
            for row in 1..k {
                if values[row * b + col] > values[best * b + col] {
                    best = row;
                }
            }
            best as u8
        })
        .collect()
}
