//! A fully connected fi-RevNet on vectors (paper § 3's spheres experiment), in the project's
//! row layout: activations are `(d, B)`, features in rows, the batch in columns.
//!
//! ```text
//! x (d) ─ K × [ActNorm → reverse the d rows → coupling] ─ z (d);  z_s = z[0..C] (the logits),
//!                                                                  z_n = z[C..d] (nuisance)
//! coupling: x_a = first ⌊d/2⌋ rows (kept), x_b = the rest;
//!           additive  y_b = x_b + t(x_a)
//!           affine    y_b = (x_b + t(x_a)[..])·σ(s(x_a) + 2)     (flow::AFFINE_SCALE_OFFSET)
//! t (and s): Linear ⌊d/2⌋→H, ReLU, Linear H→H, ReLU, zero-initialised Linear H→|x_b| (×2 affine)
//! ```
//! ActNorm is the conv flow's ([`super::flow::ActNorm`]) with one "channel" per row: `y = (x +
//! b)·exp(s)`, data-dependent init (mean 0, std 1 per row on a first batch), log|det| = Σ s.
//! `forward` returns z and log|det ∂z/∂x| per example; `inverse` is exact up to float rounding
//! (each coupling's net sees only kept rows). With K ≥ 2 steps, the logits are rows that the
//! second-to-last coupling wrote (reversed, then kept by the last one).
//!
//! Weights are safetensors ([`VectorFlow::to_safetensors`]) with the [`VectorFlowConfig`] as
//! JSON under `config`, `model = "vector_firevnet"` and a one-paragraph `description` in the
//! metadata; tensor names `step{k}.actnorm.bias` / `.logs` `(d,)`,
//! `step{k}.coupling.layer{0,1,2}.weight` `(O, I)` / `.bias` `(O,)` (PyTorch's `nn.Linear`).
//!
//! Training ([`train_vector_flow`]): Adam on the flow; objective `ce` (cross-entropy on z_s)
//! or `ice` (CE on z_s + w_adv × the paper's adversarial term with a nuisance MLP on z_n,
//! clipped at log C as `ice::AdversaryVariant::Paper` + w_mle × MLE: −(log N(z_n; μ, σ) +
//! log|det J|) per dimension, with the learned factorial Gaussian of `ice`). The adversary
//! takes `inner_steps` Adamax steps per batch on the detached z_n with the true labels.

use std::collections::HashMap;

use anyhow::{bail, Context, Result};
use dfdx::prelude::*;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::flow::{ActNorm, CouplingKind, AFFINE_SCALE_OFFSET};
use super::ice::FactorialGaussian;
use super::nuisance::{log_likelihoods, Mlp, MlpConfig};
use super::ops::{argmax_rows, cross_entropy, Linear, RowMap};
use super::optim::{Optimizer, OptimizerKind};
use super::{io, rng_for, Dev, HasParams, Param, Tp, T1, T2};

/// The architecture (stored in every weights file).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VectorFlowConfig {
    /// Input (and latent) dimension d.
    pub dims: usize,
    /// Flow steps K.
    pub steps: usize,
    /// Width H of the coupling nets' hidden layers.
    pub hidden: usize,
    pub coupling: CouplingKind,
    /// C: the logits are z[0..C].
    pub classes: usize,
}

/// The coupling's net: Linear → ReLU → Linear → ReLU → zero-initialised Linear.
pub struct CouplingMlp {
    pub layer0: Linear,
    pub layer1: Linear,
    pub layer2: Linear,
}

impl CouplingMlp {
    fn new(
        dev: &Dev,
        name: &str,
        inputs: usize,
        hidden: usize,
        outputs: usize,
        rng: &mut ChaCha8Rng,
    ) -> CouplingMlp {
        CouplingMlp {
            layer0: Linear::init(dev, &format!("{name}.layer0"), inputs, hidden, rng),
            layer1: Linear::init(dev, &format!("{name}.layer1"), hidden, hidden, rng),
            layer2: Linear {
                weight: Param::zeros(dev, format!("{name}.layer2.weight"), &[outputs, hidden]),
                bias: Param::zeros(dev, format!("{name}.layer2.bias"), &[outputs]),
            },
        }
    }

    fn forward<T: Tp>(&self, x: T2<T>) -> T2<T> {
        let h = self.layer0.forward(x).relu();
        let h = self.layer1.forward(h).relu();
        self.layer2.forward(h)
    }
}

impl HasParams for CouplingMlp {
    fn visit<'a>(&'a self, f: &mut dyn FnMut(&'a Param)) {
        self.layer0.visit(f);
        self.layer1.visit(f);
        self.layer2.visit(f);
    }
    fn visit_mut(&mut self, f: &mut dyn FnMut(&mut Param)) {
        self.layer0.visit_mut(f);
        self.layer1.visit_mut(f);
        self.layer2.visit_mut(f);
    }
}

/// One step: ActNorm → reverse → coupling.
pub struct VectorStep {
    pub actnorm: ActNorm,
    pub coupling: CouplingMlp,
}

/// The fully connected fi-RevNet.
pub struct VectorFlow {
    pub config: VectorFlowConfig,
    pub steps: Vec<VectorStep>,
    /// Row reversal (its own inverse).
    reverse: RowMap,
}

impl VectorFlow {
    pub fn new(dev: &Dev, config: VectorFlowConfig, rng: &mut ChaCha8Rng) -> VectorFlow {
        let d = config.dims;
        assert!(
            d >= 2 && config.classes < d,
            "a vector flow needs d ≥ 2 and fewer logits than dimensions"
        );
        let kept = d / 2;
        let out = match config.coupling {
            CouplingKind::Additive => d - kept,
            CouplingKind::Affine => 2 * (d - kept),
        };
        let steps = (0..config.steps)
            .map(|k| VectorStep {
                actnorm: ActNorm::new(dev, &format!("step{k}.actnorm"), d),
                coupling: CouplingMlp::new(
                    dev,
                    &format!("step{k}.coupling"),
                    kept,
                    config.hidden,
                    out,
                    rng,
                ),
            })
            .collect();
        VectorFlow {
            reverse: RowMap::new(dev, (0..d).rev().collect()),
            config,
            steps,
        }
    }

    pub fn dims(&self) -> usize {
        self.config.dims
    }

    fn kept(&self) -> usize {
        self.config.dims / 2
    }

    /// One step forward: `(y, log|det| per example)`.
    fn step_forward<T: Tp>(&self, step: &VectorStep, x: T2<T>) -> (T2<T>, T1<T>) {
        let (d, b) = *x.shape();
        let kept = self.kept();
        let mut logdet = step.actnorm.logdet::<T>(d, b);
        let h = self.reverse.apply(step.actnorm.forward(x));
        let xa = h.with_empty_tape().slice((0..kept, ..));
        let xb = h.slice((kept.., ..));
        let t = step.coupling.forward(xa.with_empty_tape());
        let yb = match self.config.coupling {
            CouplingKind::Additive => xb + t,
            CouplingKind::Affine => {
                let half = d - kept;
                let shift = t.with_empty_tape().slice((0..half, ..));
                let scale = (t.slice((half.., ..)) + AFFINE_SCALE_OFFSET).sigmoid();
                logdet = logdet + scale.with_empty_tape().ln().sum::<(usize,), Axis<0>>();
                (xb + shift) * scale
            }
        };
        ((xa, yb).concat_along(Axis::<0>), logdet)
    }

    fn step_inverse(&self, step: &VectorStep, y: T2) -> T2 {
        let d = y.shape().0;
        let kept = self.kept();
        let ya = y.clone().slice((0..kept, ..));
        let yb = y.slice((kept.., ..));
        let t = step.coupling.forward(ya.clone());
        let xb = match self.config.coupling {
            CouplingKind::Additive => yb - t,
            CouplingKind::Affine => {
                let half = d - kept;
                let shift = t.clone().slice((0..half, ..));
                let scale = (t.slice((half.., ..)) + AFFINE_SCALE_OFFSET).sigmoid();
                yb / scale - shift
            }
        };
        let h = self.reverse.apply((ya, xb).concat_along(Axis::<0>));
        step.actnorm.inverse(h)
    }

    /// `x (d, B)` → `(z (d, B), log|det ∂z/∂x| (B,))`.
    pub fn forward<T: Tp>(&self, x: T2<T>) -> (T2<T>, T1<T>) {
        let (d, b) = *x.shape();
        assert_eq!(d, self.config.dims, "vector flow input rows");
        let dev = x.device().clone();
        let mut logdet: T1<T> = dev.zeros_like(&(b,)).retaped::<T>();
        let mut h = x;
        for step in &self.steps {
            let (y, ld) = self.step_forward(step, h);
            h = y;
            logdet = logdet + ld;
        }
        (h, logdet)
    }

    /// `z (d, B)` → `x`.
    pub fn inverse(&self, z: T2) -> T2 {
        let mut h = z;
        for step in self.steps.iter().rev() {
            h = self.step_inverse(step, h);
        }
        h
    }

    /// Data-dependent ActNorm init, step by step, from one batch.
    pub fn init(&mut self, x: T2) {
        let mut h = x;
        for k in 0..self.steps.len() {
            self.steps[k].actnorm.init_from(&h);
            h = self.step_forward(&self.steps[k], h).0;
        }
    }

    /// The logits z_s `(C, B)`.
    pub fn logits<T: Tp>(&self, z: T2<T>) -> T2<T> {
        z.slice((0..self.config.classes, ..))
    }

    /// The nuisance z_n `(d − C, B)`.
    pub fn nuisance<T: Tp>(&self, z: T2<T>) -> T2<T> {
        z.slice((self.config.classes.., ..))
    }

    /// Predicted classes (argmax of z_s).
    pub fn predict(&self, x: T2) -> Vec<u8> {
        argmax_rows(&self.logits(self.forward(x).0))
    }

    /// The weights file: parameters, the config and a description in the metadata, plus
    /// `extra` (e.g. the training settings).
    pub fn to_safetensors(&self, extra: HashMap<String, String>) -> Result<Vec<u8>> {
        let mut meta = extra;
        meta.insert("config".into(), serde_json::to_string(&self.config)?);
        meta.insert("model".into(), "vector_firevnet".into());
        meta.insert("format".into(), "pt".into());
        meta.insert("description".into(), self.description());
        io::save(&self.params(), meta)
    }

    /// Rebuilds a flow from a file written by [`VectorFlow::to_safetensors`].
    pub fn from_safetensors(dev: &Dev, bytes: &[u8]) -> Result<VectorFlow> {
        let meta = io::metadata(bytes)?;
        if meta.get("model").map(String::as_str) != Some("vector_firevnet") {
            bail!("not a vector fi-RevNet weights file (metadata `model` is not vector_firevnet)");
        }
        let config: VectorFlowConfig = serde_json::from_str(
            meta.get("config")
                .context("weights file has no `config` metadata")?,
        )
        .context("weights file `config` metadata")?;
        // Initial values are overwritten by the file; the generator only has to exist.
        let mut flow = VectorFlow::new(dev, config, &mut rng_for(0, "placeholder"));
        io::load_into(dev, &mut flow, bytes)?;
        Ok(flow)
    }

    /// What a reader in another framework needs to rebuild the model from the file.
    pub fn description(&self) -> String {
        let c = &self.config;
        let (d, kept) = (c.dims, c.dims / 2);
        let coupling = match c.coupling {
            CouplingKind::Additive => "additive: y_b = x_b + t(x_a)".to_string(),
            CouplingKind::Affine => format!(
                "affine: t(x_a) = (shift, s) split in halves of {} rows, y_b = (x_b + shift) * sigmoid(s + {AFFINE_SCALE_OFFSET})",
                d - kept
            ),
        };
        format!(
            "x: (d={d}) vector. {} steps k, each: actnorm y = (x + step{{k}}.actnorm.bias) * exp(step{{k}}.actnorm.logs) (log|det| = sum logs); reverse the {d} coordinates; coupling with x_a = first {kept} coordinates (kept), x_b = the other {}, {coupling}, t = layer2(relu(layer1(relu(layer0(x_a))))) with step{{k}}.coupling.layer{{0,1,2}} PyTorch nn.Linear (hidden {}); output (x_a, y_b). z = output of the last step; logits z_s = z[0:{}], nuisance z_n = z[{}:{d}].",
            c.steps,
            d - kept,
            c.hidden,
            c.classes,
            c.classes
        )
    }
}

impl HasParams for VectorFlow {
    fn visit<'a>(&'a self, f: &mut dyn FnMut(&'a Param)) {
        for step in &self.steps {
            step.actnorm.visit(f);
            step.coupling.visit(f);
        }
    }
    fn visit_mut(&mut self, f: &mut dyn FnMut(&mut Param)) {
        for step in &mut self.steps {
            step.actnorm.visit_mut(f);
            step.coupling.visit_mut(f);
        }
    }
}

/// Examples `indices` of an example-major table `x (n × d)` as a `(d, B)` batch.
pub fn columns(dev: &Dev, x: &[f32], d: usize, indices: &[usize]) -> T2 {
    let b = indices.len();
    let mut out = vec![0.0f32; d * b];
    for (col, &i) in indices.iter().enumerate() {
        for (r, &v) in x[i * d..(i + 1) * d].iter().enumerate() {
            out[r * b + col] = v;
        }
    }
    dev.tensor_from_vec(out, (d, b))
}

/// The columns of a `(rows, B)` tensor as example-major rows.
pub fn rows_of(t: &T2) -> Vec<Vec<f32>> {
    let (rows, b) = *t.shape();
    let v = t.as_vec();
    (0..b)
        .map(|col| (0..rows).map(|r| v[r * b + col]).collect())
        .collect()
}

/// What `ce` and `ice` train.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VectorObjective {
    Ce,
    Ice,
}

/// The iCE terms: the paper's adversarial term (clipped at log C) and the MLE term.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VectorIceSettings {
    pub w_adv: f32,
    pub w_mle: f32,
    pub inner_steps: usize,
    pub adversary_width: usize,
    /// Linear layers of the adversary MLP (ReLU between, no dropout).
    pub adversary_layers: usize,
    pub adversary_lr: f32,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VectorTrainSettings {
    pub objective: VectorObjective,
    pub epochs: usize,
    pub batch_size: usize,
    /// Adam's learning rate for the flow (and the learned prior).
    pub lr: f32,
    /// Points of the data-dependent ActNorm init (the first ones of the training set).
    pub init_batch: usize,
    pub seed: u64,
    /// `null` for `ce`.
    pub ice: Option<VectorIceSettings>,
}

/// One epoch's numbers (errors in %; training numbers are batch means over the epoch).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VectorEpoch {
    pub epoch: usize,
    pub loss: f64,
    pub ce: f64,
    pub train_error: f64,
    pub test_error: f64,
    /// iCE: the MLE term in nats per dimension.
    pub nll_nats_per_dim: Option<f64>,
    /// iCE: the adversary's training cross-entropy (nats) and its error on the batches.
    pub adversary_ce: Option<f64>,
    pub adversary_error: Option<f64>,
}

/// A trained flow and what trained beside it.
pub struct TrainedVectorFlow {
    pub flow: VectorFlow,
    pub history: Vec<VectorEpoch>,
    /// iCE: the jointly trained nuisance classifier and the learned prior on z_n.
    pub adversary: Option<Mlp>,
    pub prior: Option<FactorialGaussian>,
}

/// Error (%) of the flow's logits on examples `indices`.
pub fn error_rate(dev: &Dev, flow: &VectorFlow, x: &[f32], y: &[u8], indices: &[usize]) -> f64 {
    let d = flow.dims();
    let mut wrong = 0usize;
    for batch in indices.chunks(1000) {
        let predictions = flow.predict(columns(dev, x, d, batch));
        wrong += batch
            .iter()
            .zip(&predictions)
            .filter(|(&i, &p)| y[i] != p)
            .count();
        dev.empty_cache();
    }
    100.0 * wrong as f64 / indices.len().max(1) as f64
}

/// The adversary and the prior of an iCE run, with their optimisers.
struct IceParts {
    settings: VectorIceSettings,
    adversary: Mlp,
    adversary_optimizer: Optimizer,
    prior: FactorialGaussian,
    prior_optimizer: Optimizer,
}

/// Sums of one epoch's batch statistics.
#[derive(Default)]
struct EpochSums {
    batches: usize,
    seen: usize,
    loss: f64,
    ce: f64,
    wrong: usize,
    nll: f64,
    adversary_ce: f64,
    adversary_wrong: usize,
}

/// Trains a vector fi-RevNet on `(train_x, train_y)` (`n × d`, example-major); the test error
/// is measured after every epoch. `progress` gets (steps done, steps in all). Deterministic
/// for a seed (init, order, and adversary come from `rng_for(settings.seed, …)`).
#[allow(clippy::too_many_arguments)]
pub fn train_vector_flow(
    dev: &Dev,
    config: VectorFlowConfig,
    settings: &VectorTrainSettings,
    train_x: &[f32],
    train_y: &[u8],
    test_x: &[f32],
    test_y: &[u8],
    progress: &dyn Fn(usize, usize),
) -> TrainedVectorFlow {
    let d = config.dims;
    let classes = config.classes;
    let n = train_y.len();
    assert_eq!(train_x.len(), n * d, "training table is n × d");
    let seed = settings.seed;
    let mut flow = VectorFlow::new(dev, config, &mut rng_for(seed, "vector-flow-init"));
    let first: Vec<usize> = (0..settings.init_batch.min(n).max(1)).collect();
    flow.init(columns(dev, train_x, d, &first));
    let mut optimizer = Optimizer::new(OptimizerKind::Adam, dev, &flow);
    let mut ice = match (settings.objective, &settings.ice) {
        (VectorObjective::Ce, _) => None,
        (VectorObjective::Ice, None) => panic!("objective ice needs its settings"),
        (VectorObjective::Ice, Some(s)) => {
            let adversary = Mlp::new(
                dev,
                "adversary",
                MlpConfig {
                    inputs: d - classes,
                    width: s.adversary_width,
                    layers: s.adversary_layers,
                    dropout: 0.0,
                    classes,
                },
                &mut rng_for(seed, "vector-ice-adversary-init"),
            );
            let prior = FactorialGaussian::new(dev, d - classes);
            Some(IceParts {
                settings: s.clone(),
                adversary_optimizer: Optimizer::new(OptimizerKind::Adamax, dev, &adversary),
                prior_optimizer: Optimizer::new(OptimizerKind::Adam, dev, &prior),
                adversary,
                prior,
            })
        }
    };
    let test_indices: Vec<usize> = (0..test_y.len()).collect();
    let batch_size = settings.batch_size.max(1);
    let steps_per_epoch = n.div_ceil(batch_size);
    let total = steps_per_epoch * settings.epochs;
    let mut history = Vec::new();
    for epoch in 0..settings.epochs {
        let mut order: Vec<usize> = (0..n).collect();
        order.shuffle(&mut rng_for(seed, &format!("vector-flow-shuffle/{epoch}")));
        let mut sums = EpochSums::default();
        for (i, batch) in order.chunks(batch_size).enumerate() {
            let x = columns(dev, train_x, d, batch);
            let labels: Vec<u8> = batch.iter().map(|&i| train_y[i]).collect();
            let grads = match &mut ice {
                None => ce_step(&flow, x, &labels, &mut sums),
                Some(parts) => ice_step(&flow, parts, x, &labels, &mut sums),
            };
            optimizer.update(&mut flow, &grads, settings.lr);
            if let Some(parts) = &mut ice {
                parts
                    .prior_optimizer
                    .update(&mut parts.prior, &grads, settings.lr);
            }
            drop(grads);
            dev.empty_cache();
            progress(epoch * steps_per_epoch + i + 1, total);
        }
        let batches = sums.batches.max(1) as f64;
        let seen = sums.seen.max(1) as f64;
        let is_ice = ice.is_some();
        history.push(VectorEpoch {
            epoch: epoch + 1,
            loss: sums.loss / batches,
            ce: sums.ce / batches,
            train_error: 100.0 * sums.wrong as f64 / seen,
            test_error: error_rate(dev, &flow, test_x, test_y, &test_indices),
            nll_nats_per_dim: is_ice.then(|| sums.nll / batches),
            adversary_ce: is_ice.then(|| sums.adversary_ce / batches),
            adversary_error: is_ice.then(|| 100.0 * sums.adversary_wrong as f64 / seen),
        });
    }
    let (adversary, prior) = match ice {
        Some(parts) => (Some(parts.adversary), Some(parts.prior)),
        None => (None, None),
    };
    TrainedVectorFlow {
        flow,
        history,
        adversary,
        prior,
    }
}

fn count_wrong(predictions: &[u8], labels: &[u8]) -> usize {
    predictions
        .iter()
        .zip(labels)
        .filter(|(p, y)| p != y)
        .count()
}

/// Cross-entropy on z_s. The rest of z enters the loss × 0, so that every parameter has a
/// gradient (the last coupling writes only z_n) and the optimiser's contract holds.
fn ce_step(flow: &VectorFlow, x: T2, labels: &[u8], sums: &mut EpochSums) -> super::Grads {
    let (z, _) = flow.forward(x.leaky_traced());
    let all = z.with_empty_tape();
    let logits = flow.logits(z);
    sums.wrong += count_wrong(&argmax_rows(&logits.retaped::<NoneTape>()), labels);
    let ce = cross_entropy(logits, labels);
    let loss = ce + all.sum::<(), _>() * 0.0;
    let value = loss.retaped::<NoneTape>().array() as f64;
    sums.batches += 1;
    sums.seen += labels.len();
    sums.loss += value;
    sums.ce += value;
    loss.backward()
}

/// The encoder's iCE loss CE + w_mle·MLE + w_adv·(−min(CE_adv, log C)) of a forward pass
/// `(z, log|det|)`, for a fixed adversary and prior (on any tape), and the values of its parts: `(loss, ce, nll, wrong,
/// adversary wrong)`.
///
/// z_n is sliced out of z once and shared by the prior and the adversary: dfdx 0.13's `slice`
/// backward *assigns* the slice's gradient into the source's instead of adding it, so two
/// overlapping slices of z would keep only one of the two gradients (a test below compares the
/// whole gradient with finite differences).
#[allow(clippy::type_complexity)]
fn ice_encoder_loss<T: Tp>(
    flow: &VectorFlow,
    adversary: &Mlp,
    prior: &FactorialGaussian,
    (z, logdet): (T2<T>, T1<T>),
    labels: &[u8],
    w_mle: f32,
    w_adv: f32,
) -> (Tensor<(), f32, Dev, T>, f32, f32, usize, usize) {
    let b = labels.len() as f32;
    let d = flow.dims() as f32;
    let zn = flow.nuisance(z.with_empty_tape());
    let logits = flow.logits(z);
    let wrong = count_wrong(&argmax_rows(&logits.retaped::<NoneTape>()), labels);
    let ce = cross_entropy(logits, labels);
    let log_density = prior.log_density(zn.with_empty_tape());
    let nll = (log_density + logdet).sum::<(), _>() * (-1.0 / (b * d));
    let adversary_logits = adversary.forward(zn, None);
    let adversary_wrong = count_wrong(
        &argmax_rows(&adversary_logits.retaped::<NoneTape>()),
        labels,
    );
    let log_likelihood = log_likelihoods(adversary_logits, labels);
    let log_chance = (flow.config.classes as f32).ln();
    // min(CE_i, log C): the gradient of CE_i where CE_i < log C, zero elsewhere.
    let below: Vec<f32> = log_likelihood
        .retaped::<NoneTape>()
        .as_vec()
        .iter()
        .map(|&ll| if -ll < log_chance { 1.0 } else { 0.0 })
        .collect();
    let mask: T1 = log_likelihood
        .device()
        .tensor_from_vec(below, (labels.len(),));
    // −mean(min(CE_i, log C)) up to a constant: minimising it maximises the adversary's CE.
    let adversarial = (log_likelihood * mask).sum::<(), _>() * (1.0 / b);
    let (ce_value, nll_value) = (
        ce.retaped::<NoneTape>().array(),
        nll.retaped::<NoneTape>().array(),
    );
    let loss = ce + nll * w_mle;
    let loss = loss + adversarial * w_adv;
    (loss, ce_value, nll_value, wrong, adversary_wrong)
}

/// One iCE step: the adversary's inner steps on the detached z_n with the true labels, then
/// the encoder's gradients of [`ice_encoder_loss`] (as `ice::revnet_ice_step` with the `paper`
/// variants).
fn ice_step(
    flow: &VectorFlow,
    parts: &mut IceParts,
    x: T2,
    labels: &[u8],
    sums: &mut EpochSums,
) -> super::Grads {
    let s = parts.settings.clone();
    let out = flow.forward(x.leaky_traced());
    let detached = flow.nuisance(out.0.retaped::<NoneTape>());
    let mut adversary_ce = 0.0f64;
    for _ in 0..s.inner_steps {
        let logits = parts
            .adversary
            .forward(detached.clone().leaky_traced(), None);
        let loss = log_likelihoods(logits, labels).mean() * -1.0;
        adversary_ce += loss.retaped::<NoneTape>().array() as f64;
        let grads = loss.backward();
        parts
            .adversary_optimizer
            .update(&mut parts.adversary, &grads, s.adversary_lr);
    }
    drop(detached);
    let (loss, ce, nll, wrong, adversary_wrong) = ice_encoder_loss(
        flow,
        &parts.adversary,
        &parts.prior,
        out,
        labels,
        s.w_mle,
        s.w_adv,
    );
    sums.batches += 1;
    sums.seen += labels.len();
    sums.wrong += wrong;
    sums.adversary_wrong += adversary_wrong;
    sums.ce += ce as f64;
    sums.nll += nll as f64;
    sums.adversary_ce += adversary_ce / s.inner_steps.max(1) as f64;
    sums.loss += loss.retaped::<NoneTape>().array() as f64;
    loss.backward()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::device;
    use rand::{Rng, SeedableRng};

    fn config(dims: usize, coupling: CouplingKind) -> VectorFlowConfig {
        VectorFlowConfig {
            dims,
            steps: 3,
            hidden: 8,
            coupling,
            classes: 2,
        }
    }

    fn random(rng: &mut ChaCha8Rng, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| rng.gen_range(-scale..scale)).collect()
    }

    /// Moves every parameter off its (often zero) init, so that no layer is the identity.
    fn perturb(flow: &mut VectorFlow, rng: &mut ChaCha8Rng, scale: f32) {
        perturb_params(flow, rng, scale);
    }

    fn perturb_params(model: &mut impl HasParams, rng: &mut ChaCha8Rng, scale: f32) {
        let dev = device();
        model.visit_mut(&mut |p| {
            let values: Vec<f32> = p
                .value
                .as_vec()
                .iter()
                .map(|v| v + rng.gen_range(-scale..scale))
                .collect();
            *p = Param::new(&dev, p.name.clone(), &p.shape, values);
        });
    }

    fn flow_with(dims: usize, coupling: CouplingKind, seed: u64) -> VectorFlow {
        let dev = device();
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut flow = VectorFlow::new(&dev, config(dims, coupling), &mut rng);
        let x = dev.tensor_from_vec(random(&mut rng, dims * 16, 4.0), (dims, 16));
        flow.init(x);
        perturb(&mut flow, &mut rng, 0.3);
        flow
    }

    #[test]
    fn inverse_undoes_forward_to_1e_5() {
        let dev = device();
        for coupling in [CouplingKind::Additive, CouplingKind::Affine] {
            for dims in [6, 7, 100] {
                let flow = flow_with(dims, coupling, 1);
                let mut rng = ChaCha8Rng::seed_from_u64(2);
                let x: T2 = dev.tensor_from_vec(random(&mut rng, dims * 32, 3.0), (dims, 32));
                let (z, _) = flow.forward(x.clone());
                let back = flow.inverse(z.clone());
                let err = back
                    .as_vec()
                    .iter()
                    .zip(x.as_vec())
                    .map(|(a, b)| (a - b).abs())
                    .fold(0.0f32, f32::max);
                assert!(err < 1e-5, "{coupling:?} d={dims}: reconstruction {err}");
                // And the latent is not the input (the test would be vacuous otherwise).
                let moved = z
                    .as_vec()
                    .iter()
                    .zip(x.as_vec())
                    .map(|(a, b)| (a - b).abs())
                    .fold(0.0f32, f32::max);
                assert!(moved > 0.1, "{coupling:?}: the flow is the identity");
            }
        }
    }

    /// The flow in f64, from the f32 parameters: `(z, log|det|)`.
    fn reference(flow: &VectorFlow, x: &[f64]) -> (Vec<f64>, f64) {
        let values =
            |p: &Param| -> Vec<f64> { p.value.as_vec().iter().map(|&v| v as f64).collect() };
        let linear = |l: &Linear, x: &[f64]| -> Vec<f64> {
            let (w, b) = (values(&l.weight), values(&l.bias));
            let inputs = x.len();
            (0..b.len())
                .map(|o| b[o] + (0..inputs).map(|i| w[o * inputs + i] * x[i]).sum::<f64>())
                .collect()
        };
        let relu = |v: Vec<f64>| -> Vec<f64> { v.into_iter().map(|a| a.max(0.0)).collect() };
        let d = x.len();
        let kept = d / 2;
        let mut h = x.to_vec();
        let mut logdet = 0.0;
        for step in &flow.steps {
            let (bias, logs) = (values(&step.actnorm.bias), values(&step.actnorm.logs));
            let normed: Vec<f64> = (0..d).map(|i| (h[i] + bias[i]) * logs[i].exp()).collect();
            logdet += logs.iter().sum::<f64>();
            let permuted: Vec<f64> = (0..d).map(|i| normed[d - 1 - i]).collect();
            let xa = &permuted[..kept];
            let xb = &permuted[kept..];
            let c = &step.coupling;
            let t = linear(
                &c.layer2,
                &relu(linear(&c.layer1, &relu(linear(&c.layer0, xa)))),
            );
            let yb: Vec<f64> = match flow.config.coupling {
                CouplingKind::Additive => xb.iter().zip(&t).map(|(a, b)| a + b).collect(),
                CouplingKind::Affine => {
                    let half = d - kept;
                    (0..half)
                        .map(|i| {
                            let scale = 1.0 / (1.0 + (-(t[half + i] + 2.0)).exp());
                            logdet += scale.ln();
                            (xb[i] + t[i]) * scale
                        })
                        .collect()
                }
            };
            h = xa.iter().copied().chain(yb).collect();
        }
        (h, logdet)
    }

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
    fn log_det_matches_a_numerical_jacobian_in_f64() {
        let dev = device();
        let d = 6;
        for coupling in [CouplingKind::Additive, CouplingKind::Affine] {
            let flow = flow_with(d, coupling, 5);
            let mut rng = ChaCha8Rng::seed_from_u64(6);
            let x0 = random(&mut rng, d, 1.5);
            let (z, logdet) = flow.forward(dev.tensor_from_vec(x0.clone(), (d, 1)));
            let x0: Vec<f64> = x0.iter().map(|&v| v as f64).collect();
            // The f64 reference is the same function as the f32 flow.
            let (z_ref, logdet_ref) = reference(&flow, &x0);
            for (a, b) in z.as_vec().iter().zip(&z_ref) {
                assert!((*a as f64 - b).abs() < 1e-4, "{coupling:?}: z {a} vs {b}");
            }
            // Central differences of the f64 reference.
            let eps = 1e-6;
            let mut jac = vec![vec![0.0f64; d]; d];
            for j in 0..d {
                let (mut plus, mut minus) = (x0.clone(), x0.clone());
                plus[j] += eps;
                minus[j] -= eps;
                let (zp, zm) = (reference(&flow, &plus).0, reference(&flow, &minus).0);
                for i in 0..d {
                    jac[i][j] = (zp[i] - zm[i]) / (2.0 * eps);
                }
            }
            let numeric = log_abs_det(jac);
            let reported = logdet.as_vec()[0] as f64;
            assert!(
                (numeric - reported).abs() < 1e-4 && (numeric - logdet_ref).abs() < 1e-6,
                "{coupling:?}: numerical {numeric}, reported {reported}, reference {logdet_ref}"
            );
            assert!(
                reported.abs() > 0.1,
                "the test needs a non-trivial log-det, got {reported}"
            );
        }
    }

    /// Two spheres, radii 1 and 3.
    fn tiny_data(n: usize, d: usize, seed: u64) -> (Vec<f32>, Vec<u8>) {
        let s = crate::data::spheres::sample(n, d, 1.0, 3.0, seed, "vector-flow-test");
        (s.x, s.y)
    }

    fn settings(objective: VectorObjective) -> VectorTrainSettings {
        VectorTrainSettings {
            objective,
            epochs: 6,
            batch_size: 16,
            lr: 1e-2,
            init_batch: 32,
            seed: 3,
            ice: (objective == VectorObjective::Ice).then_some(VectorIceSettings {
                w_adv: 1.0,
                w_mle: 1.0,
                inner_steps: 2,
                adversary_width: 8,
                adversary_layers: 2,
                adversary_lr: 1e-3,
            }),
        }
    }

    #[test]
    fn gradients_are_finite_and_reach_every_parameter() {
        let dev = device();
        let (x, y) = tiny_data(16, 6, 1);
        for coupling in [CouplingKind::Additive, CouplingKind::Affine] {
            let flow = flow_with(6, coupling, 7);
            let indices: Vec<usize> = (0..16).collect();
            let grads = ce_step(
                &flow,
                columns(&dev, &x, 6, &indices),
                &y,
                &mut EpochSums::default(),
            );
            let mut nonzero = 0;
            for p in flow.params() {
                let g: T2 = grads.get(&p.value);
                let g = g.as_vec();
                assert!(
                    g.iter().all(|v| v.is_finite()),
                    "{}: gradient not finite",
                    p.name
                );
                nonzero += g.iter().any(|&v| v != 0.0) as usize;
            }
            assert!(
                nonzero > flow.params().len() / 2,
                "{coupling:?}: gradients vanish"
            );
        }
    }

    /// Replaces entry `k` of parameter `name` by `v`.
    fn set_entry(model: &mut impl HasParams, name: &str, k: usize, v: f32) {
        let dev = device();
        model.visit_mut(&mut |p| {
            if p.name == name {
                let mut values = p.value.as_vec();
                values[k] = v;
                *p = Param::new(&dev, p.name.clone(), &p.shape, values);
            }
        });
    }

    /// Autograd against central differences (f32, eps 1e-3) on the first and last entry of
    /// every parameter of the flow and of the prior, for the CE and the iCE encoder losses.
    #[test]
    fn loss_gradients_match_finite_differences() {
        let dev = device();
        let (x, y) = tiny_data(32, 6, 4);
        let indices: Vec<usize> = (0..32).collect();
        let x = columns(&dev, &x, 6, &indices);
        let mut flow = flow_with(6, CouplingKind::Affine, 8);
        let adversary = Mlp::new(
            &dev,
            "adversary",
            MlpConfig {
                inputs: 4,
                width: 8,
                layers: 2,
                dropout: 0.0,
                classes: 2,
            },
            &mut rng_for(0, "test-adversary"),
        );
        let mut prior = FactorialGaussian::new(&dev, 4);
        perturb_params(&mut prior, &mut ChaCha8Rng::seed_from_u64(9), 0.3);
        for ice in [false, true] {
            let loss_of = |flow: &VectorFlow, prior: &FactorialGaussian| -> f64 {
                if ice {
                    let out = flow.forward(x.clone());
                    ice_encoder_loss(flow, &adversary, prior, out, &y, 0.7, 2.0)
                        .0
                        .array() as f64
                } else {
                    cross_entropy(flow.logits(flow.forward(x.clone()).0), &y).array() as f64
                }
            };
            let grads = if ice {
                let out = flow.forward(x.clone().leaky_traced());
                ice_encoder_loss(&flow, &adversary, &prior, out, &y, 0.7, 2.0)
                    .0
                    .backward()
            } else {
                ce_step(&flow, x.clone(), &y, &mut EpochSums::default())
            };
            let mut checked = 0;
            let targets: Vec<(bool, String, Vec<f32>, Vec<f32>)> = flow
                .params()
                .iter()
                .map(|p| {
                    (true, p.name.clone(), p.value.as_vec(), {
                        let g: T2 = grads.get(&p.value);
                        g.as_vec()
                    })
                })
                .chain(prior.params().iter().filter(|_| ice).map(|p| {
                    (false, p.name.clone(), p.value.as_vec(), {
                        let g: T2 = grads.get(&p.value);
                        g.as_vec()
                    })
                }))
                .collect();
            for (in_flow, name, values, analytic) in targets {
                for k in [0, values.len() - 1] {
                    let eps = 1e-3f32;
                    let mut at = |v: f32| {
                        if in_flow {
                            set_entry(&mut flow, &name, k, v);
                        } else {
                            set_entry(&mut prior, &name, k, v);
                        }
                        loss_of(&flow, &prior)
                    };
                    let numeric = (at(values[k] + eps) - at(values[k] - eps)) / (2.0 * eps as f64);
                    at(values[k]);
                    let a = analytic[k] as f64;
                    assert!(
                        (numeric - a).abs() <= 2e-3 + 3e-2 * a.abs(),
                        "ice {ice}: {name}[{k}]: autograd {a}, finite differences {numeric}"
                    );
                    checked += (a.abs() > 1e-4) as usize;
                }
            }
            assert!(
                checked > 10,
                "ice {ice}: too few non-zero gradients ({checked})"
            );
        }
    }

    #[test]
    fn training_is_deterministic_for_a_seed_and_learns() {
        let dev = device();
        let (x, y) = tiny_data(128, 6, 2);
        let (tx, ty) = tiny_data(64, 6, 3);
        for objective in [VectorObjective::Ce, VectorObjective::Ice] {
            let run = || {
                let trained = train_vector_flow(
                    &dev,
                    config(6, CouplingKind::Additive),
                    &settings(objective),
                    &x,
                    &y,
                    &tx,
                    &ty,
                    &|_, _| {},
                );
                let bytes = trained.flow.to_safetensors(HashMap::new()).unwrap();
                (bytes, trained.history)
            };
            let (a, history) = run();
            let (b, _) = run();
            assert_eq!(a, b, "{objective:?}: two runs, different weights");
            assert!(history.iter().all(|e| e.loss.is_finite()));
            assert!(
                history.last().unwrap().test_error < 40.0,
                "{objective:?}: {history:?}"
            );
        }
    }

    #[test]
    fn weights_files_rebuild_the_flow() {
        let dev = device();
        let flow = flow_with(7, CouplingKind::Affine, 4);
        let bytes = flow.to_safetensors(HashMap::new()).unwrap();
        let back = VectorFlow::from_safetensors(&dev, &bytes).unwrap();
        assert_eq!(back.config, flow.config);
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let x: T2 = dev.tensor_from_vec(random(&mut rng, 7 * 4, 1.0), (7, 4));
        assert_eq!(
            back.forward(x.clone()).0.as_vec(),
            flow.forward(x).0.as_vec()
        );
        assert_eq!(back.to_safetensors(HashMap::new()).unwrap(), bytes);
    }
}
