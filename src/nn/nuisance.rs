//! The nuisance classifier and the post-hoc probe: an MLP that tries to read the label from a
//! view of the latent (z_n, or z_s for comparison), and what its cross-entropy says about the
//! label information in that view.
//!
//! Paper § 4 (iCE): the *adversary* D(z_n) is trained jointly with the flow; its cross-entropy
//! is a Barber–Agakov bound, I(y; z) ≥ H(y) − CE(q(y|z)), for any classifier q. The authors'
//! adversary is a 3-layer MLP 3072→512→512→10 with ReLU and dropout 0.1 ([`MlpConfig`] with
//! `layers = 3`, `width = 512`). Paper-notes § 3: an adversary can be fooled without the
//! information being gone, so a *fresh probe* of the same shape, trained to convergence on the
//! frozen latents ([`train_probe`]), gives the honest bound; the report shows both.
//!
//! Tensors are in the row layout `(features, B)`; feature tables handed to the probe are
//! example-major (`n × dims`), as they come out of the latent pass.

use anyhow::{ensure, Context, Result};
use dfdx::prelude::*;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::ops::{argmax_rows, Linear};
use super::optim::{Optimizer, OptimizerKind};
use super::{rng_for, Dev, HasParams, Param, Tp, T1, T2};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MlpConfig {
    pub inputs: usize,
    /// Units of every hidden layer.
    pub width: usize,
    /// Linear layers in all (the authors' adversary: 3).
    pub layers: usize,
    pub dropout: f32,
    pub classes: usize,
}

/// `Linear → ReLU → dropout` × (layers − 1), then a linear read-out.
pub struct Mlp {
    pub config: MlpConfig,
    layers: Vec<Linear>,
}

impl Mlp {
    /// Parameters are named `{prefix}.layer{i}.weight` / `.bias` (PyTorch shapes).
    pub fn new(dev: &Dev, prefix: &str, config: MlpConfig, rng: &mut ChaCha8Rng) -> Mlp {
        assert!(config.layers >= 1, "an MLP has at least one layer");
        let mut layers = Vec::new();
        let mut inputs = config.inputs;
        for i in 0..config.layers {
            let outputs = if i + 1 == config.layers {
                config.classes
            } else {
                config.width
            };
            layers.push(Linear::init(
                dev,
                &format!("{prefix}.layer{i}"),
                inputs,
                outputs,
                rng,
            ));
            inputs = outputs;
        }
        Mlp { config, layers }
    }

    /// `x (inputs, B)` → class logits `(classes, B)`; `rng` draws dropout masks (training).
    pub fn forward<T: Tp>(&self, x: T2<T>, mut rng: Option<&mut ChaCha8Rng>) -> T2<T> {
        let mut h = x;
        for (i, layer) in self.layers.iter().enumerate() {
            h = if i + 1 < self.layers.len() {
                layer.forward_relu_dropout(h, self.config.dropout, rng.as_deref_mut())
            } else {
                layer.forward(h)
            };
        }
        h
    }
}

impl Mlp {
    /// A weights file: the parameters plus the config (and `role`) in the metadata.
    pub fn to_safetensors(&self, role: &str) -> Result<Vec<u8>> {
        let meta = std::collections::HashMap::from([
            ("config".to_string(), serde_json::to_string(&self.config)?),
            ("role".to_string(), role.to_string()),
            ("format".to_string(), "pt".to_string()),
        ]);
        super::io::save(&self.params(), meta)
    }

    /// Rebuilds an MLP from a file written by [`Mlp::to_safetensors`].
    pub fn from_safetensors(dev: &Dev, prefix: &str, bytes: &[u8]) -> Result<Mlp> {
        let meta = super::io::metadata(bytes)?;
        let config: MlpConfig = serde_json::from_str(
            meta.get("config")
                .ok_or_else(|| anyhow::anyhow!("MLP weights file has no `config` metadata"))?,
        )
        .context("MLP weights file `config` metadata")?;
        // Initial values are overwritten by the file; the generator only has to exist.
        let mut mlp = Mlp::new(dev, prefix, config, &mut rng_for(0, "placeholder"));
        super::io::load_into(dev, &mut mlp, bytes)?;
        Ok(mlp)
    }
}

/// The latent views of examples `indices` of `images`, in evaluation mode (no dropout, no
/// dequantisation noise): the logits z_s (before any logit BatchNorm, an invertible map) and
/// the nuisance z_n, as example-major feature tables.
pub fn latent_views(
    dev: &Dev,
    model: &super::flow::FiRevNet,
    images: &[u8],
    labels: &[u8],
    indices: &[usize],
) -> (Features, Features) {
    let classes = model.config.classes;
    let mut logits = Features::new(classes);
    let mut nuisance = Features::new(model.dims() - classes);
    for batch in indices.chunks(500) {
        let x = super::input::revnet_input(dev, images, batch, model.config.in_channels, None);
        let z = model.forward(x, None).z;
        let y: Vec<u8> = batch.iter().map(|&i| labels[i]).collect();
        logits.push_columns(&model.logits(z.clone()), &y);
        nuisance.push_columns(&model.nuisance(z), &y);
        dev.empty_cache();
    }
    (logits, nuisance)
}

/// Readout of a trained classifier on raw (unstandardised) features, e.g. the jointly
/// trained adversary on z_n.
pub fn readout_raw(dev: &Dev, mlp: &Mlp, features: &Features) -> Readout {
    let identity = Standardizer {
        mean: vec![0.0; features.dims],
        inv_std: vec![1.0; features.dims],
    };
    readout(dev, mlp, &identity, features)
}

impl HasParams for Mlp {
    fn visit<'a>(&'a self, f: &mut dyn FnMut(&'a Param)) {
        self.layers.iter().for_each(|l| l.visit(f));
    }
    fn visit_mut(&mut self, f: &mut dyn FnMut(&mut Param)) {
        self.layers.iter_mut().for_each(|l| l.visit_mut(f));
    }
}

/// log q(y_i | z_i) per example, `(B,)`, of `logits (K, B)`. Made contiguous first: dfdx
/// 0.13's `log_softmax` backward is wrong on non-contiguous tensors (see `ops::cross_entropy`).
pub fn log_likelihoods<T: Tp>(logits: T2<T>, labels: &[u8]) -> T1<T> {
    let (k, b) = *logits.shape();
    assert_eq!(labels.len(), b, "one label per column");
    let mut onehot = vec![0.0f32; k * b];
    for (col, &y) in labels.iter().enumerate() {
        onehot[y as usize * b + col] = 1.0;
    }
    let onehot: T2 = logits.device().tensor_from_vec(onehot, (k, b));
    (logits.contiguous().log_softmax::<Axis<0>>() * onehot).sum::<(usize,), Axis<0>>()
}

/// Entropy of the empirical label distribution, in bits.
pub fn label_entropy_bits(labels: &[u8], classes: usize) -> f64 {
    let mut counts = vec![0usize; classes];
    for &y in labels {
        counts[y as usize] += 1;
    }
    let n = labels.len().max(1) as f64;
    counts
        .iter()
        .filter(|&&c| c > 0)
        .map(|&c| {
            let p = c as f64 / n;
            -p * p.log2()
        })
        .sum()
}

/// How well a classifier reads the label from a view, on one set of examples.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Readout {
    pub n: usize,
    /// Error in %.
    pub error: f64,
    /// Mean cross-entropy in bits.
    pub cross_entropy_bits: f64,
    /// H(y) of these examples' labels, in bits.
    pub label_entropy_bits: f64,
    /// The Barber–Agakov lower bound on I(y; view): H(y) − CE, in bits (it can come out
    /// negative for a classifier worse than the label prior; the bound is then vacuous).
    pub information_bound_bits: f64,
}

/// Accumulates a [`Readout`] over batches of logits.
#[derive(Default)]
pub struct ReadoutSum {
    n: usize,
    wrong: usize,
    ce_nats: f64,
    labels: Vec<u8>,
}

impl ReadoutSum {
    pub fn add(&mut self, logits: &T2, labels: &[u8]) {
        let predictions = argmax_rows(logits);
        self.wrong += predictions
            .iter()
            .zip(labels)
            .filter(|(p, y)| p != y)
            .count();
        let ll = log_likelihoods(logits.clone(), labels).as_vec();
        self.ce_nats -= ll.iter().map(|&v| v as f64).sum::<f64>();
        self.n += labels.len();
        self.labels.extend_from_slice(labels);
    }

    pub fn finish(&self, classes: usize) -> Readout {
        let n = self.n.max(1) as f64;
        let ce_bits = self.ce_nats / n / std::f64::consts::LN_2;
        let h = label_entropy_bits(&self.labels, classes);
        Readout {
            n: self.n,
            error: 100.0 * self.wrong as f64 / n,
            cross_entropy_bits: ce_bits,
            label_entropy_bits: h,
            information_bound_bits: h - ce_bits,
        }
    }
}

/// Example-major features (`n × dims`) with their labels.
#[derive(Clone, Debug, Default)]
pub struct Features {
    pub dims: usize,
    pub values: Vec<f32>,
    pub labels: Vec<u8>,
}

impl Features {
    pub fn new(dims: usize) -> Features {
        Features {
            dims,
            ..Features::default()
        }
    }

    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Appends the columns of a `(dims, B)` batch.
    pub fn push_columns(&mut self, x: &T2, labels: &[u8]) {
        let (dims, b) = *x.shape();
        assert_eq!(dims, self.dims, "feature dimension");
        assert_eq!(labels.len(), b, "one label per column");
        let v = x.as_vec();
        for col in 0..b {
            self.values.extend((0..dims).map(|r| v[r * b + col]));
        }
        self.labels.extend_from_slice(labels);
    }

    /// Example `i`'s feature vector.
    pub fn row(&self, i: usize) -> &[f32] {
        &self.values[i * self.dims..(i + 1) * self.dims]
    }

    /// Examples `rows` as a standardised `(dims, B)` batch.
    fn batch(&self, dev: &Dev, rows: &[usize], scaler: &Standardizer) -> T2 {
        let b = rows.len();
        let mut x = vec![0.0f32; self.dims * b];
        for (col, &i) in rows.iter().enumerate() {
            for (d, &v) in self.row(i).iter().enumerate() {
                x[d * b + col] = (v - scaler.mean[d]) * scaler.inv_std[d];
            }
        }
        dev.tensor_from_vec(x, (self.dims, b))
    }
}

/// Per-dimension standardisation fitted on the probe's training features. It is an invertible
/// affine map, so it changes no information, only how fast the probe learns (latent scales
/// of a CE-trained flow are unconstrained).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Standardizer {
    pub mean: Vec<f32>,
    pub inv_std: Vec<f32>,
}

impl Standardizer {
    pub fn fit(features: &Features) -> Standardizer {
        let (n, dims) = (features.len().max(1) as f64, features.dims);
        let mut sum = vec![0.0f64; dims];
        let mut sq = vec![0.0f64; dims];
        for i in 0..features.len() {
            for (d, &v) in features.row(i).iter().enumerate() {
                sum[d] += v as f64;
                sq[d] += v as f64 * v as f64;
            }
        }
        let mean: Vec<f64> = sum.iter().map(|s| s / n).collect();
        let inv_std = sq
            .iter()
            .zip(&mean)
            .map(|(s, m)| {
                let var = (s / n - m * m).max(0.0);
                // Constant dimensions stay constant (0 after centring).
                if var > 1e-12 {
                    (1.0 / var.sqrt()) as f32
                } else {
                    1.0
                }
            })
            .collect();
        Standardizer {
            mean: mean.iter().map(|&m| m as f32).collect(),
            inv_std,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ProbeSettings {
    pub width: usize,
    pub layers: usize,
    pub dropout: f32,
    pub epochs: usize,
    pub batch_size: usize,
    pub lr: f32,
    pub seed: u64,
}

/// One epoch of probe training.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ProbeEpoch {
    pub epoch: usize,
    pub train_loss_bits: f64,
    pub validation: Readout,
}

/// A trained probe: the MLP, its input scaling, the training history and the epoch kept.
pub struct Probe {
    pub mlp: Mlp,
    pub scaler: Standardizer,
    pub history: Vec<ProbeEpoch>,
    /// The epoch (1-based) with the lowest validation cross-entropy, whose weights are kept.
    pub best_epoch: usize,
}

impl Probe {
    /// Readout on `features` (evaluation mode).
    pub fn readout(&self, dev: &Dev, features: &Features) -> Readout {
        readout(dev, &self.mlp, &self.scaler, features)
    }
}

/// Readout of `mlp` on standardised `features` (evaluation mode).
fn readout(dev: &Dev, mlp: &Mlp, scaler: &Standardizer, features: &Features) -> Readout {
    let mut sum = ReadoutSum::default();
    let all: Vec<usize> = (0..features.len()).collect();
    for rows in all.chunks(1000) {
        let x = features.batch(dev, rows, scaler);
        let labels: Vec<u8> = rows.iter().map(|&i| features.labels[i]).collect();
        sum.add(&mlp.forward(x, None), &labels);
        dev.empty_cache();
    }
    sum.finish(mlp.config.classes)
}

/// Trains a fresh probe on `train` with Adam; after every epoch it is scored on `validation`,
/// and the weights of the epoch with the lowest validation cross-entropy are kept (so "trained
/// to convergence" does not mean "over-fitted", and the test set never chooses anything).
/// `progress` gets (epochs done, epochs).
pub fn train_probe(
    dev: &Dev,
    train: &Features,
    validation: &Features,
    classes: usize,
    settings: &ProbeSettings,
    progress: &dyn Fn(usize, usize),
) -> Result<Probe> {
    ensure!(!train.is_empty(), "probe: no training examples");
    ensure!(!validation.is_empty(), "probe: no validation examples");
    ensure!(settings.epochs > 0, "probe: epochs must be at least 1");
    let scaler = Standardizer::fit(train);
    let config = MlpConfig {
        inputs: train.dims,
        width: settings.width,
        layers: settings.layers,
        dropout: settings.dropout,
        classes,
    };
    let mut mlp = Mlp::new(
        dev,
        "probe",
        config,
        &mut rng_for(settings.seed, "probe-init"),
    );
    let mut optimizer = Optimizer::new(OptimizerKind::Adam, dev, &mlp);
    // (validation CE, epoch, weights) of the best epoch so far.
    let mut best: Option<(f64, usize, Vec<T2>)> = None;
    let mut history = Vec::new();
    for epoch in 0..settings.epochs {
        let mut order: Vec<usize> = (0..train.len()).collect();
        order.shuffle(&mut rng_for(
            settings.seed,
            &format!("probe-shuffle/{epoch}"),
        ));
        let mut dropout_rng = rng_for(settings.seed, &format!("probe-dropout/{epoch}"));
        let mut loss_nats = 0.0f64;
        for rows in order.chunks(settings.batch_size.max(1)) {
            let x = train.batch(dev, rows, &scaler);
            let labels: Vec<u8> = rows.iter().map(|&i| train.labels[i]).collect();
            let logits = mlp.forward(x.leaky_traced(), Some(&mut dropout_rng));
            let loss = log_likelihoods(logits, &labels).mean() * -1.0;
            loss_nats += loss.retaped::<NoneTape>().array() as f64 * rows.len() as f64;
            let grads = loss.backward();
            optimizer.update(&mut mlp, &grads, settings.lr);
            drop(grads);
            dev.empty_cache();
        }
        let validation_readout = readout(dev, &mlp, &scaler, validation);
        let ce = validation_readout.cross_entropy_bits;
        if best.as_ref().is_none_or(|(best_ce, _, _)| ce < *best_ce) {
            // Parameter tensors are replaced, never mutated, by the optimiser: clones are a
            // snapshot.
            let snapshot = mlp.params().iter().map(|p| p.value.clone()).collect();
            best = Some((ce, epoch + 1, snapshot));
        }
        history.push(ProbeEpoch {
            epoch: epoch + 1,
            train_loss_bits: loss_nats / train.len() as f64 / std::f64::consts::LN_2,
            validation: validation_readout,
        });
        progress(epoch + 1, settings.epochs);
    }
    let (_, best_epoch, snapshot) = best.expect("at least one epoch ran");
    let mut values = snapshot.into_iter();
    mlp.visit_mut(&mut |p| p.value = values.next().expect("one value per parameter"));
    Ok(Probe {
        mlp,
        scaler,
        history,
        best_epoch,
    })
}
