//! The fully invertible RevNet (fi-RevNet) of paper-notes § 2, Glow-style, in the row layout.
//!
//! ```text
//! x (C·S·S) ─ level 0: squeeze 2×2 → K × [ActNorm → channel permutation → coupling] → split ─┐
//!           ─ level 1: squeeze 2×2 → K × [...] → split ─┐                                  z_n part
//!           ─ level L−1: squeeze 2×2 → K × [...] → final map; logits z_s = 10 channels at its centre
//! ```
//! `forward` returns the whole latent `z` (final map first, then the split-off blocks from the
//! last level to the first), the log-determinant and the log-prior per example; `inverse`
//! maps any `z` back. Coupling and split nets see only kept channels, so every layer is
//! exactly invertible up to float rounding. The authors' MNIST model is 3 levels × 16 steps,
//! hidden 128, additive coupling, channel reverse, 3×32×32 input: 2 366 640 parameters plus 20
//! in the logit BatchNorm, and so is this model in that configuration.

use dfdx::prelude::*;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::channel::{affine_per_channel, affine_relu_dropout};
use super::ops::{add_per_channel, mul_per_channel, taped, Conv2d, RowMap};
use super::{Dev, HasParams, Param, Tp, T1, T2};

/// The affine coupling's scale is `sigmoid(s + AFFINE_SCALE_OFFSET)` (Glow's `+ 2`: the
/// scale starts near 0.88, not 0.5).
pub const AFFINE_SCALE_OFFSET: f32 = 2.0;

/// A zero conv's output is scaled per channel by `exp(ZERO_CONV_LOGS_FACTOR · logs)`.
pub const ZERO_CONV_LOGS_FACTOR: f32 = 3.0;

/// Additive `y_b = x_b + t(x_a)` or affine `y_b = (x_b + t(x_a))·σ(s(x_a) + 2)` coupling.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CouplingKind {
    Additive,
    Affine,
}

/// Channel permutation between steps: reverse (the authors' code) or a seeded shuffle.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Permutation {
    Reverse,
    Shuffle,
}

/// Everything that determines the architecture (stored in every weights file).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RevNetConfig {
    /// Input channels: 1, or 3 with the digit in the last channel (the authors' layout).
    pub in_channels: usize,
    /// Input side after padding (MNIST 28 + 2·2 = 32).
    pub size: usize,
    pub levels: usize,
    pub steps: usize,
    pub hidden: usize,
    pub coupling: CouplingKind,
    pub permutation: Permutation,
    pub dropout: f32,
    pub classes: usize,
    /// Seed of the channel shuffle (when `permutation = shuffle`).
    pub permutation_seed: u64,
    /// BatchNorm on the logits before the softmax (the authors' code; not in the paper).
    #[serde(default)]
    pub logit_batchnorm: bool,
}

/// BatchNorm on the logits z_s (paper-notes § 2: in the authors' code, not in the paper).
/// Training normalises with the batch's statistics; evaluation with running averages
/// (momentum 0.1, unbiased variance, eps 1e-5, as PyTorch's `BatchNorm1d`). It acts after
/// z_s, so metamers, which keep z_s, keep the scores too.
pub struct LogitBatchNorm {
    pub weight: Param,
    pub bias: Param,
    pub running_mean: Param,
    pub running_var: Param,
}

/// The logit BatchNorm's epsilon and running-average momentum (PyTorch's defaults).
pub const BN_EPS: f32 = 1e-5;
pub const BN_MOMENTUM: f32 = 0.1;

impl LogitBatchNorm {
    fn new(dev: &Dev, classes: usize) -> LogitBatchNorm {
        LogitBatchNorm {
            weight: Param::new(dev, "logit_bn.weight", &[classes], vec![1.0; classes]),
            bias: Param::zeros(dev, "logit_bn.bias", &[classes]),
            running_mean: Param::zeros(dev, "logit_bn.running_mean", &[classes]),
            running_var: Param::new(dev, "logit_bn.running_var", &[classes], vec![1.0; classes]),
        }
    }

    /// Training mode: scores, and the batch mean and unbiased variance per class.
    pub fn forward_train<T: Tp>(&self, z: T2<T>) -> (T2<T>, Vec<f32>, Vec<f32>) {
        let (k, b) = *z.shape();
        let mean = z.with_empty_tape().mean::<(usize,), Axis<1>>();
        let mean_values = mean.retaped::<NoneTape>().as_vec();
        let centered = z - mean.broadcast_like::<_, Axis<1>>(&(k, b));
        let var = centered
            .with_empty_tape()
            .square()
            .mean::<(usize,), Axis<1>>();
        let unbiased = var
            .retaped::<NoneTape>()
            .as_vec()
            .iter()
            .map(|v| v * b as f32 / (b as f32 - 1.0).max(1.0))
            .collect();
        let normalised = centered / (var + BN_EPS).sqrt().broadcast_like::<_, Axis<1>>(&(k, b));
        let scaled = taped::<_, T>(&self.weight.as_vector()).broadcast_like::<_, Axis<1>>(&(k, b))
            * normalised;
        (
            taped::<_, T>(&self.bias.as_vector()).broadcast_like::<_, Axis<1>>(&(k, b)) + scaled,
            mean_values,
            unbiased,
        )
    }

    /// Evaluation mode: running statistics, as a per-class affine map (on any tape, so that an
    /// attack can differentiate the scores with respect to the input).
    pub fn forward_eval<T: Tp>(&self, z: T2<T>) -> T2<T> {
        let (k, b) = *z.shape();
        let dev = z.device().clone();
        let (rm, rv) = (
            self.running_mean.value.as_vec(),
            self.running_var.value.as_vec(),
        );
        let (w, bias) = (self.weight.value.as_vec(), self.bias.value.as_vec());
        let scale: Vec<f32> = (0..k).map(|c| w[c] / (rv[c] + BN_EPS).sqrt()).collect();
        let shift: Vec<f32> = (0..k).map(|c| bias[c] - rm[c] * scale[c]).collect();
        let scale: T1 = dev.tensor_from_vec(scale, (k,));
        let shift: T1 = dev.tensor_from_vec(shift, (k,));
        // The activation on the left: dfdx keeps the tape of the left operand.
        z * scale.broadcast_like::<_, Axis<1>>(&(k, b))
            + shift.broadcast_like::<_, Axis<1>>(&(k, b))
    }

    /// Moves the running statistics towards a batch's.
    pub fn update(&mut self, mean: &[f32], var: &[f32]) {
        let dev = self.running_mean.value.device().clone();
        let blend = |old: &Param, new: &[f32]| -> Vec<f32> {
            old.value
                .as_vec()
                .iter()
                .zip(new)
                .map(|(o, n)| (1.0 - BN_MOMENTUM) * o + BN_MOMENTUM * n)
                .collect()
        };
        let (m, v) = (
            blend(&self.running_mean, mean),
            blend(&self.running_var, var),
        );
        let k = m.len();
        self.running_mean = Param::new(&dev, "logit_bn.running_mean", &[k], m);
        self.running_var = Param::new(&dev, "logit_bn.running_var", &[k], v);
    }
}

/// ActNorm: `y = (x + b)·exp(s)` per channel; log|det| = H·W·Σ s. Data-dependent init gives
/// zero mean and unit variance per channel on the first batch.
pub struct ActNorm {
    pub bias: Param,
    pub logs: Param,
    pub channels: usize,
}

impl ActNorm {
    pub fn new(dev: &Dev, name: &str, channels: usize) -> ActNorm {
        ActNorm {
            bias: Param::zeros(dev, format!("{name}.bias"), &[channels]),
            logs: Param::zeros(dev, format!("{name}.logs"), &[channels]),
            channels,
        }
    }

    /// Sets `b = −mean`, `s = −ln(std)` per channel from `x` (computed in f64).
    pub fn init_from(&mut self, x: &T2) {
        let (rows, b) = *x.shape();
        let per = rows / self.channels * b;
        let values = x.as_vec();
        let dev = x.device().clone();
        let mut bias = Vec::with_capacity(self.channels);
        let mut logs = Vec::with_capacity(self.channels);
        for c in 0..self.channels {
            let chunk = &values[c * per..(c + 1) * per];
            let mean = chunk.iter().map(|&v| v as f64).sum::<f64>() / per as f64;
            let var = chunk
                .iter()
                .map(|&v| (v as f64 - mean).powi(2))
                .sum::<f64>()
                / per as f64;
            bias.push(-mean as f32);
            logs.push(-(var.sqrt() + 1e-6).ln() as f32);
        }
        self.bias = Param::new(&dev, self.bias.name.clone(), &[self.channels], bias);
        self.logs = Param::new(&dev, self.logs.name.clone(), &[self.channels], logs);
    }

    pub fn forward<T: Tp>(&self, x: T2<T>) -> T2<T> {
        affine_per_channel(x, Some(&self.bias), Some((&self.logs, 1.0)), self.channels)
    }

    /// `dropout(relu(forward(x)), p)` in one pass (the coupling network's layers).
    pub fn forward_relu_dropout<T: Tp>(
        &self,
        x: T2<T>,
        dropout: Option<(f32, &mut ChaCha8Rng)>,
    ) -> T2<T> {
        let (bias, logs) = (Some(&self.bias), Some((&self.logs, 1.0)));
        affine_relu_dropout(x, bias, logs, self.channels, dropout)
    }

    /// log|det| per example: H·W·Σ s (the same for every example).
    pub fn logdet<T: Tp>(&self, rows: usize, batch: usize) -> T1<T> {
        let spatial = (rows / self.channels) as f32;
        let total = taped::<_, T>(&self.logs.as_vector()).sum::<(), _>() * spatial;
        total.broadcast_like(&(batch,))
    }

    pub fn inverse(&self, y: T2) -> T2 {
        let y = mul_per_channel(y, self.logs.as_vector().negate().exp(), self.channels);
        add_per_channel(y, self.bias.as_vector().negate(), self.channels)
    }
}

impl HasParams for ActNorm {
    fn visit<'a>(&'a self, f: &mut dyn FnMut(&'a Param)) {
        f(&self.bias);
        f(&self.logs);
    }
    fn visit_mut(&mut self, f: &mut dyn FnMut(&mut Param)) {
        f(&mut self.bias);
        f(&mut self.logs);
    }
}

/// A zero-initialised 3×3 conv whose output is scaled per channel by exp(3·logs) (Glow's
/// `Conv2dZeros`): the layer starts as the zero map.
pub struct ZeroConv {
    pub conv: Conv2d,
    pub logs: Param,
}

impl ZeroConv {
    pub fn new(dev: &Dev, name: &str, c_in: usize, c_out: usize) -> ZeroConv {
        ZeroConv {
            conv: Conv2d::zeros(dev, name, c_in, c_out, 3, 1),
            logs: Param::zeros(dev, format!("{name}.logs"), &[c_out]),
        }
    }

    pub fn forward<T: Tp>(&self, x: T2<T>, h: usize, w: usize) -> T2<T> {
        let (y, _, _) = self.conv.forward(x, h, w);
        affine_per_channel(
            y,
            None,
            Some((&self.logs, ZERO_CONV_LOGS_FACTOR)),
            self.conv.c_out,
        )
    }
}

impl HasParams for ZeroConv {
    fn visit<'a>(&'a self, f: &mut dyn FnMut(&'a Param)) {
        self.conv.visit(f);
        f(&self.logs);
    }
    fn visit_mut(&mut self, f: &mut dyn FnMut(&mut Param)) {
        self.conv.visit_mut(f);
        f(&mut self.logs);
    }
}

/// The coupling's network: conv3×3 → ActNorm → ReLU → conv1×1 → ActNorm → ReLU → dropout →
/// zero conv3×3. Its ActNorms are ordinary layers (no log-det: not part of the flow). The two
/// convs in front of an ActNorm have no bias, as in the authors' code: the ActNorm's bias
/// would make theirs redundant.
pub struct CouplingNet {
    pub conv1: Conv2d,
    pub norm1: ActNorm,
    pub conv2: Conv2d,
    pub norm2: ActNorm,
    pub conv3: ZeroConv,
    pub dropout: f32,
}

impl CouplingNet {
    fn new(
        dev: &Dev,
        name: &str,
        c_in: usize,
        hidden: usize,
        c_out: usize,
        dropout: f32,
        rng: &mut ChaCha8Rng,
    ) -> CouplingNet {
        CouplingNet {
            conv1: Conv2d::init_without_bias(
                dev,
                &format!("{name}.conv1"),
                c_in,
                hidden,
                3,
                1,
                1,
                rng,
            ),
            norm1: ActNorm::new(dev, &format!("{name}.norm1"), hidden),
            conv2: Conv2d::init_without_bias(
                dev,
                &format!("{name}.conv2"),
                hidden,
                hidden,
                1,
                1,
                0,
                rng,
            ),
            norm2: ActNorm::new(dev, &format!("{name}.norm2"), hidden),
            conv3: ZeroConv::new(dev, &format!("{name}.conv3"), hidden, c_out),
            dropout,
        }
    }

    fn forward<T: Tp>(&self, x: T2<T>, h: usize, w: usize, rng: Option<&mut ChaCha8Rng>) -> T2<T> {
        let (y, _, _) = self.conv1.forward(x, h, w);
        let y = self.norm1.forward_relu_dropout(y, None);
        let (y, _, _) = self.conv2.forward(y, h, w);
        let y = self
            .norm2
            .forward_relu_dropout(y, rng.map(|rng| (self.dropout, rng)));
        self.conv3.forward(y, h, w)
    }

    /// Data-dependent init of the two ActNorms on `x`.
    fn init(&mut self, x: T2, h: usize, w: usize) {
        let (y, _, _) = self.conv1.forward(x, h, w);
        self.norm1.init_from(&y);
        let y = self.norm1.forward(y).relu();
        let (y, _, _) = self.conv2.forward(y, h, w);
        self.norm2.init_from(&y);
    }
}

impl HasParams for CouplingNet {
    fn visit<'a>(&'a self, f: &mut dyn FnMut(&'a Param)) {
        self.conv1.visit(f);
        self.norm1.visit(f);
        self.conv2.visit(f);
        self.norm2.visit(f);
        self.conv3.visit(f);
    }
    fn visit_mut(&mut self, f: &mut dyn FnMut(&mut Param)) {
        self.conv1.visit_mut(f);
        self.norm1.visit_mut(f);
        self.conv2.visit_mut(f);
        self.norm2.visit_mut(f);
        self.conv3.visit_mut(f);
    }
}

/// One flow step: ActNorm → channel permutation → coupling.
pub struct FlowStep {
    pub actnorm: ActNorm,
    pub permutation: RowMap,
    pub permutation_inverse: RowMap,
    pub coupling: CouplingNet,
    pub kind: CouplingKind,
    pub channels: usize,
}

impl FlowStep {
    fn kept_rows(&self, spatial: usize) -> usize {
        self.channels / 2 * spatial
    }

    /// `(y, log|det| per example)`.
    pub fn forward<T: Tp>(
        &self,
        x: T2<T>,
        h: usize,
        w: usize,
        rng: Option<&mut ChaCha8Rng>,
    ) -> (T2<T>, T1<T>) {
        let (rows, b) = *x.shape();
        let mut logdet = self.actnorm.logdet::<T>(rows, b);
        let x = self.permutation.apply(self.actnorm.forward(x));
        let split = self.kept_rows(h * w);
        let xa = x.with_empty_tape().slice((0..split, ..));
        let xb = x.slice((split.., ..));
        let t = self.coupling.forward(xa.with_empty_tape(), h, w, rng);
        let yb = match self.kind {
            CouplingKind::Additive => xb + t,
            CouplingKind::Affine => {
                let half = rows - split;
                let shift = t.with_empty_tape().slice((0..half, ..));
                let scale = (t.slice((half.., ..)) + AFFINE_SCALE_OFFSET).sigmoid();
                logdet = logdet + scale.with_empty_tape().ln().sum::<(usize,), Axis<0>>();
                (xb + shift) * scale
            }
        };
        ((xa, yb).concat_along(Axis::<0>), logdet)
    }

    pub fn inverse(&self, y: T2, h: usize, w: usize) -> T2 {
        let rows = y.shape().0;
        let split = self.kept_rows(h * w);
        let ya = y.clone().slice((0..split, ..));
        let yb = y.slice((split.., ..));
        let t = self.coupling.forward(ya.clone(), h, w, None);
        let xb = match self.kind {
            CouplingKind::Additive => yb - t,
            CouplingKind::Affine => {
                let half = rows - split;
                let shift = t.clone().slice((0..half, ..));
                let scale = (t.slice((half.., ..)) + AFFINE_SCALE_OFFSET).sigmoid();
                yb / scale - shift
            }
        };
        let x = self
            .permutation_inverse
            .apply((ya, xb).concat_along(Axis::<0>));
        self.actnorm.inverse(x)
    }

    fn init(&mut self, x: T2, h: usize, w: usize) -> T2 {
        self.actnorm.init_from(&x);
        let x = self.permutation.apply(self.actnorm.forward(x));
        let split = self.kept_rows(h * w);
        let xa = x.clone().slice((0..split, ..));
        self.coupling.init(xa, h, w);
        self.forward(x_unpermuted(self, x), h, w, None).0
    }
}

/// Undoes ActNorm and the permutation so `init` can reuse `forward` on the step's input.
fn x_unpermuted(step: &FlowStep, x: T2) -> T2 {
    step.actnorm.inverse(step.permutation_inverse.apply(x))
}

impl HasParams for FlowStep {
    fn visit<'a>(&'a self, f: &mut dyn FnMut(&'a Param)) {
        self.actnorm.visit(f);
        self.coupling.visit(f);
    }
    fn visit_mut(&mut self, f: &mut dyn FnMut(&mut Param)) {
        self.actnorm.visit_mut(f);
        self.coupling.visit_mut(f);
    }
}

/// Split with a conditional Gaussian prior: the second half of the channels leaves the flow;
/// a zero conv on the kept half gives their mean and log-std.
pub struct SplitPrior {
    pub prior: ZeroConv,
    pub channels: usize,
}

const HALF_LN_2PI: f32 = 0.918_938_5;

/// Σ over rows of log N(z; mean, exp(logstd)²), per example.
fn gaussian_log_density<T: Tp>(z: T2<T>, mean: T2<T>, logstd: T2<T>) -> T1<T> {
    let scaled = (z - mean) * logstd.with_empty_tape().negate().exp();
    let per_entry = (scaled.square() * -0.5) - logstd - HALF_LN_2PI;
    per_entry.sum::<(usize,), Axis<0>>()
}

/// Σ over rows of log N(z; 0, 1), per example.
fn standard_log_density<T: Tp>(z: T2<T>) -> T1<T> {
    let rows = z.shape().0 as f32;
    (z.square() * -0.5).sum::<(usize,), Axis<0>>() - HALF_LN_2PI * rows
}

impl SplitPrior {
    /// `(kept, split-off, log p(split-off | kept))`.
    fn forward<T: Tp>(&self, x: T2<T>, h: usize, w: usize) -> (T2<T>, T2<T>, T1<T>) {
        let half = self.channels / 2 * h * w;
        let kept = x.with_empty_tape().slice((0..half, ..));
        let out = x.slice((half.., ..));
        let stats = self.prior.forward(kept.with_empty_tape(), h, w);
        let n = out.shape().0;
        let mean = stats.with_empty_tape().slice((0..n, ..));
        let logstd = stats.slice((n.., ..));
        let logp = gaussian_log_density(out.with_empty_tape(), mean, logstd);
        (kept, out, logp)
    }
}

impl HasParams for SplitPrior {
    fn visit<'a>(&'a self, f: &mut dyn FnMut(&'a Param)) {
        self.prior.visit(f);
    }
    fn visit_mut(&mut self, f: &mut dyn FnMut(&mut Param)) {
        self.prior.visit_mut(f);
    }
}

/// One level: squeeze, steps, and (except the last) a split.
pub struct Level {
    pub squeeze: RowMap,
    pub unsqueeze: RowMap,
    pub steps: Vec<FlowStep>,
    pub split: Option<SplitPrior>,
    /// Channels and side after the squeeze.
    pub channels: usize,
    pub side: usize,
}

/// Space-to-depth 2×2 in Glow's order: new channel `4c + 2·dy + dx`.
pub fn squeeze_map(channels: usize, side: usize) -> Vec<usize> {
    let half = side / 2;
    let mut source = Vec::with_capacity(channels * side * side);
    for c in 0..channels {
        for dy in 0..2 {
            for dx in 0..2 {
                for y in 0..half {
                    for x in 0..half {
                        source.push(c * side * side + (2 * y + dy) * side + 2 * x + dx);
                    }
                }
            }
        }
    }
    source
}

/// Row map of a channel permutation on `channels × spatial` rows.
fn channel_map(order: &[usize], spatial: usize) -> Vec<usize> {
    order
        .iter()
        .flat_map(|&c| (0..spatial).map(move |s| c * spatial + s))
        .collect()
}

/// What a forward pass returns.
pub struct FlowOutput<T> {
    /// The whole latent `(D, B)`: final map first, then split-off blocks (last level first).
    pub z: T2<T>,
    /// log|det ∂z/∂x| per example.
    pub logdet: T1<T>,
    /// log p(z) per example under the priors.
    pub logp: T1<T>,
}

/// The fi-RevNet.
pub struct FiRevNet {
    pub config: RevNetConfig,
    pub levels: Vec<Level>,
    pub logit_bn: Option<LogitBatchNorm>,
    logit_rows: RowMap,
    nuisance_rows: RowMap,
}

impl FiRevNet {
    pub fn new(dev: &Dev, config: RevNetConfig, rng: &mut ChaCha8Rng) -> FiRevNet {
        let mut channels = config.in_channels;
        let mut side = config.size;
        let mut levels = Vec::new();
        let mut shuffle_rng = super::rng_for(config.permutation_seed, "channel-shuffle");
        for l in 0..config.levels {
            let squeeze = RowMap::new(dev, squeeze_map(channels, side));
            let unsqueeze = squeeze.inverse(dev);
            channels *= 4;
            side /= 2;
            let spatial = side * side;
            let steps = (0..config.steps)
                .map(|k| {
                    let name = format!("level{l}.step{k}");
                    let order: Vec<usize> = match config.permutation {
                        Permutation::Reverse => (0..channels).rev().collect(),
                        Permutation::Shuffle => {
                            use rand::seq::SliceRandom;
                            let mut order: Vec<usize> = (0..channels).collect();
                            order.shuffle(&mut shuffle_rng);
                            order
                        }
                    };
                    let permutation = RowMap::new(dev, channel_map(&order, spatial));
                    let permutation_inverse = permutation.inverse(dev);
                    let kept = channels / 2;
                    let out = match config.coupling {
                        CouplingKind::Additive => channels - kept,
                        CouplingKind::Affine => 2 * (channels - kept),
                    };
                    FlowStep {
                        actnorm: ActNorm::new(dev, &format!("{name}.actnorm"), channels),
                        permutation,
                        permutation_inverse,
                        coupling: CouplingNet::new(
                            dev,
                            &format!("{name}.coupling"),
                            kept,
                            config.hidden,
                            out,
                            config.dropout,
                            rng,
                        ),
                        kind: config.coupling,
                        channels,
                    }
                })
                .collect();
            let split = (l + 1 < config.levels).then(|| SplitPrior {
                prior: ZeroConv::new(
                    dev,
                    &format!("level{l}.split.prior"),
                    channels / 2,
                    2 * (channels - channels / 2),
                ),
                channels,
            });
            levels.push(Level {
                squeeze,
                unsqueeze,
                steps,
                split,
                channels,
                side,
            });
            if l + 1 < config.levels {
                channels /= 2;
            }
        }
        let last = levels.last().expect("at least one level");
        let (c, s) = (last.channels, last.side);
        assert!(
            config.classes <= c,
            "the final map has {c} channels, fewer than {} classes",
            config.classes
        );
        let centre = (s / 2) * s + s / 2;
        let logit_source: Vec<usize> = (0..config.classes).map(|k| k * s * s + centre).collect();
        let dims = config.in_channels * config.size * config.size;
        let nuisance_source: Vec<usize> = (0..dims).filter(|r| !logit_source.contains(r)).collect();
        let logit_bn = config
            .logit_batchnorm
            .then(|| LogitBatchNorm::new(dev, config.classes));
        FiRevNet {
            logit_bn,
            logit_rows: RowMap::selecting(dev, logit_source, dims),
            nuisance_rows: RowMap::selecting(dev, nuisance_source, dims),
            config,
            levels,
        }
    }

    /// Latent dimension D (= input dimension).
    pub fn dims(&self) -> usize {
        self.config.in_channels * self.config.size * self.config.size
    }

    /// Rows of `z` holding the logits `z_s`, in class order.
    pub fn logit_indices(&self) -> &[usize] {
        &self.logit_rows.source
    }

    /// The logits `z_s (classes, B)` of a latent.
    pub fn logits<T: Tp>(&self, z: T2<T>) -> T2<T> {
        self.logit_rows.apply(z)
    }

    /// Class scores in evaluation mode: the logits, through the logit BatchNorm if any.
    pub fn scores<T: Tp>(&self, z: T2<T>) -> T2<T> {
        let logits = self.logits(z);
        match &self.logit_bn {
            Some(bn) => bn.forward_eval(logits),
            None => logits,
        }
    }

    /// The nuisance view `z_n (D − classes, B)`: every latent row except the logits.
    pub fn nuisance<T: Tp>(&self, z: T2<T>) -> T2<T> {
        self.nuisance_rows.apply(z)
    }

    /// `x (C·S·S, B)` → latent, log-det, log-prior. `rng` draws dropout masks (training).
    pub fn forward<T: Tp>(&self, x: T2<T>, mut rng: Option<&mut ChaCha8Rng>) -> FlowOutput<T> {
        let b = x.shape().1;
        let dev = x.device().clone();
        let mut logdet: T1<T> = dev.zeros_like(&(b,)).retaped::<T>();
        let mut logp: T1<T> = dev.zeros_like(&(b,)).retaped::<T>();
        let mut outs: Vec<T2<T>> = Vec::new();
        let mut h = x;
        for level in &self.levels {
            h = level.squeeze.apply(h);
            for step in &level.steps {
                let (y, ld) = step.forward(h, level.side, level.side, rng.as_deref_mut());
                h = y;
                logdet = logdet + ld;
            }
            if let Some(split) = &level.split {
                let (kept, out, lp) = split.forward(h, level.side, level.side);
                logp = logp + lp;
                outs.push(out);
                h = kept;
            }
        }
        logp = logp + standard_log_density(h.with_empty_tape());
        let mut z = h;
        for out in outs.into_iter().rev() {
            z = (z, out).concat_along(Axis::<0>);
        }
        FlowOutput { z, logdet, logp }
    }

    /// Latent → input (evaluation mode: no dropout).
    pub fn inverse(&self, z: T2) -> T2 {
        // Block sizes of z: final map, then split-off blocks from the last level to the first.
        let mut blocks: Vec<usize> = Vec::new();
        for level in &self.levels {
            let rows = level.channels * level.side * level.side;
            if level.split.is_some() {
                blocks.push(rows - level.channels / 2 * level.side * level.side);
            }
        }
        let last = self.levels.last().expect("at least one level");
        let final_rows = last.channels * last.side * last.side;
        let mut h = z.clone().slice((0..final_rows, ..));
        let mut offset = final_rows;
        let mut split_blocks: Vec<T2> = Vec::new();
        for rows in blocks.iter().rev() {
            split_blocks.push(z.clone().slice((offset..offset + rows, ..)));
            offset += rows;
        }
        // split_blocks[0] belongs to the last split level.
        let mut next_split = split_blocks.into_iter();
        for level in self.levels.iter().rev() {
            if level.split.is_some() {
                let out = next_split.next().expect("one block per split");
                h = (h, out).concat_along(Axis::<0>);
            }
            for step in level.steps.iter().rev() {
                h = step.inverse(h, level.side, level.side);
            }
            h = level.unsqueeze.apply(h);
        }
        h
    }

    /// Data-dependent ActNorm init from one batch (the authors use 512 images).
    pub fn init(&mut self, x: T2) {
        let mut h = x;
        for level in &mut self.levels {
            h = level.squeeze.apply(h);
            for step in &mut level.steps {
                h = step.init(h, level.side, level.side);
            }
            if let Some(split) = &level.split {
                let (kept, _, _) = split.forward(h, level.side, level.side);
                h = kept;
            }
        }
    }
}

impl HasParams for FiRevNet {
    fn visit<'a>(&'a self, f: &mut dyn FnMut(&'a Param)) {
        for level in &self.levels {
            for step in &level.steps {
                step.visit(f);
            }
            if let Some(split) = &level.split {
                split.visit(f);
            }
        }
        if let Some(bn) = &self.logit_bn {
            f(&bn.weight);
            f(&bn.bias);
        }
    }
    fn visit_buffers<'a>(&'a self, f: &mut dyn FnMut(&'a Param)) {
        if let Some(bn) = &self.logit_bn {
            f(&bn.running_mean);
            f(&bn.running_var);
        }
    }
    fn visit_buffers_mut(&mut self, f: &mut dyn FnMut(&mut Param)) {
        if let Some(bn) = &mut self.logit_bn {
            f(&mut bn.running_mean);
            f(&mut bn.running_var);
        }
    }
    fn visit_mut(&mut self, f: &mut dyn FnMut(&mut Param)) {
        for level in &mut self.levels {
            for step in &mut level.steps {
                step.visit_mut(f);
            }
            if let Some(split) = &mut level.split {
                split.visit_mut(f);
            }
        }
        if let Some(bn) = &mut self.logit_bn {
            f(&mut bn.weight);
            f(&mut bn.bias);
        }
    }
}
