//! The training loop shared by the `train` and `oracle` stages: seeded shuffling per epoch,
//! mini-batch steps, a step learning-rate schedule, per-epoch evaluation, and a checkpoint
//! (weights + optimiser state + metrics) that restores the loop exactly, so that a resumed
//! run produces the same bytes as an uninterrupted one. Every random draw of epoch `e` comes
//! from generators seeded by (seed, e), never from state carried across epochs.

use std::collections::HashMap;

use anyhow::{bail, Context, Result};
use dfdx::prelude::Cache;
use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};

pub use crate::data::Arrays;

use super::ice::{revnet_ice_step, IceRngs, IceSettings, IceState};
use super::input::{cnn_input, revnet_input};
use super::model::Model;
use super::objective::{cnn_step, revnet_ce_step, StepStats};
use super::optim::{Optimizer, OptimizerKind};
use super::{io, rng_for, Dev, HasParams};
use crate::engine::Limit;

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TrainSettings {
    pub epochs: usize,
    pub batch_size: usize,
    pub optimizer: OptimizerKind,
    pub lr: f32,
    /// Epochs at which the learning rate is multiplied by `lr_gamma` (authors: 60, 120, 160).
    pub lr_milestones: Vec<usize>,
    pub lr_gamma: f32,
    pub seed: u64,
    /// Weight of the flow's NLL (bits/dim) next to the CE (fi-RevNet only).
    pub nll_weight: f32,
    /// Uniform dequantisation noise on fi-RevNet inputs.
    pub dequantize: bool,
    /// Examples used (0 = all), for small profiles.
    pub train_limit: Limit,
    pub test_limit: Limit,
    /// The iCE objective's settings (fi-RevNet only); `None` = the CE objective.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ice: Option<IceSettings>,
}

/// What one epoch measured.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct EpochMetrics {
    pub epoch: usize,
    pub lr: f32,
    pub loss: f64,
    pub ce: f64,
    pub nll_bits_per_dim: f64,
    /// Error on the training batches as they were trained (dropout on), in %.
    pub train_error: f64,
    /// Error on the test set in evaluation mode, in %.
    pub test_error: f64,
    /// iCE only: the nuisance classifier's mean training cross-entropy (nats, inner steps).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adversary_ce: Option<f64>,
    /// iCE only: the nuisance classifier's error (%) on the training batches after its
    /// inner steps (evaluation mode).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adversary_train_error: Option<f64>,
    /// iCE only: the adversarial term as the encoder minimises it (batch mean).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adversarial_term: Option<f64>,
}

pub struct Trainer {
    pub model: Model,
    pub optimizer: Optimizer,
    pub settings: TrainSettings,
    pub history: Vec<EpochMetrics>,
    /// The adversary and learned prior of an iCE run.
    pub ice: Option<IceState>,
}

/// Prepared input for examples `batch` of `images`.
pub fn input_for(
    dev: &Dev,
    model: &Model,
    images: &[u8],
    batch: &[usize],
    noise: Option<&mut rand_chacha::ChaCha8Rng>,
) -> super::T2 {
    match model {
        Model::RevNet(m) => revnet_input(dev, images, batch, m.config.in_channels, noise),
        Model::Cnn(_) => cnn_input(dev, images, batch),
    }
}

/// Test error (%) of `model` on the first `n` examples, in batches.
pub fn error_rate(
    dev: &Dev,
    model: &Model,
    images: &[u8],
    labels: &[u8],
    n: usize,
    batch_size: usize,
) -> f64 {
    let mut wrong = 0;
    for start in (0..n).step_by(batch_size) {
        let batch: Vec<usize> = (start..(start + batch_size).min(n)).collect();
        let predictions = model.predict(input_for(dev, model, images, &batch, None));
        dev.empty_cache();
        wrong += batch
            .iter()
            .zip(&predictions)
            .filter(|(&i, &p)| labels[i] != p)
            .count();
    }
    100.0 * wrong as f64 / n.max(1) as f64
}

impl Trainer {
    /// A fresh model; fi-RevNets get their data-dependent ActNorm init from 512 shuffled
    /// training images (the authors' choice).
    pub fn new(dev: &Dev, mut model: Model, settings: TrainSettings, data: &Arrays) -> Trainer {
        if let Model::RevNet(m) = &mut model {
            let n = settings.train_limit.of(data.train_labels.len());
            let mut order: Vec<usize> = (0..n).collect();
            order.shuffle(&mut rng_for(settings.seed, "actnorm-init"));
            order.truncate(512);
            let mut noise = rng_for(settings.seed, "actnorm-init-noise");
            let x = revnet_input(
                dev,
                &data.train_images,
                &order,
                m.config.in_channels,
                settings.dequantize.then_some(&mut noise),
            );
            m.init(x);
        }
        let kind = settings.optimizer;
        let optimizer = Optimizer::new(kind, dev, &model);
        let ice = match (&model, &settings.ice) {
            (Model::RevNet(m), Some(ice)) => {
                Some(IceState::new(dev, m, ice.clone(), kind, settings.seed))
            }
            (Model::Cnn(_), Some(_)) => panic!("the iCE objective needs a fi-RevNet"),
            (_, None) => None,
        };
        Trainer {
            model,
            optimizer,
            settings,
            history: Vec::new(),
            ice,
        }
    }

    fn lr(&self, epoch: usize) -> f32 {
        let decays = self
            .settings
            .lr_milestones
            .iter()
            .filter(|&&m| epoch >= m)
            .count();
        self.settings.lr * self.settings.lr_gamma.powi(decays as i32)
    }

    /// Runs epoch `history.len()` and records its metrics. `progress` gets the steps done.
    pub fn run_epoch(&mut self, dev: &Dev, data: &Arrays, progress: &dyn Fn(u64)) -> EpochMetrics {
        let epoch = self.history.len();
        let s = &self.settings;
        let n = s.train_limit.of(data.train_labels.len());
        let mut order: Vec<usize> = (0..n).collect();
        order.shuffle(&mut rng_for(s.seed, &format!("shuffle/{epoch}")));
        let mut noise = rng_for(s.seed, &format!("dequantize/{epoch}"));
        let mut dropout = rng_for(s.seed, &format!("dropout/{epoch}"));
        let mut ice_rngs = IceRngs::for_epoch(s.seed, epoch);
        let lr = self.lr(epoch);
        let (mut sum, mut seen) = (StepStats::default(), 0usize);
        let (mut loss, mut ce, mut nll) = (0.0f64, 0.0f64, 0.0f64);
        let (mut adversary_ce, mut adversary_errors, mut adversarial_term) = (0.0f64, 0, 0.0f64);
        for (step, batch) in order.chunks(s.batch_size).enumerate() {
            let labels: Vec<u8> = batch.iter().map(|&i| data.train_labels[i]).collect();
            let x = input_for(
                dev,
                &self.model,
                &data.train_images,
                batch,
                s.dequantize.then_some(&mut noise),
            );
            let (grads, stats) = match (&self.model, &mut self.ice) {
                (Model::RevNet(m), Some(ice)) => {
                    revnet_ice_step(m, ice, x, &labels, Some(&mut dropout), &mut ice_rngs)
                }
                (Model::RevNet(m), None) => {
                    revnet_ce_step(m, x, &labels, s.nll_weight, Some(&mut dropout))
                }
                (Model::Cnn(m), _) => cnn_step(m, x, &labels),
            };
            self.optimizer.update(&mut self.model, &grads, lr);
            if let Some((prior, optimizer)) = self.ice.as_mut().and_then(|i| i.prior.as_mut()) {
                optimizer.update(prior, &grads, lr);
            }
            drop(grads);
            if let (Model::RevNet(m), Some((mean, var))) = (&mut self.model, &stats.logit_batch) {
                m.logit_bn
                    .as_mut()
                    .expect("batch statistics come from a logit BatchNorm")
                    .update(mean, var);
            }
            // Tensors built from our own buffers enter dfdx's allocation cache when dropped but
            // are never taken from it again: empty it every step or it grows without bound.
            dev.empty_cache();
            let w = batch.len() as f64;
            loss += stats.loss as f64 * w;
            ce += stats.ce as f64 * w;
            nll += stats.nll_bits_per_dim as f64 * w;
            sum.errors += stats.errors;
            if let Some(a) = &stats.adversary {
                adversary_ce += a.cross_entropy as f64 * w;
                adversary_errors += a.errors;
                adversarial_term += a.term as f64 * w;
            }
            seen += batch.len();
            progress(step as u64 + 1);
        }
        let test_n = s.test_limit.of(data.test_labels.len());
        let metrics = EpochMetrics {
            epoch: epoch + 1,
            lr,
            loss: loss / seen as f64,
            ce: ce / seen as f64,
            nll_bits_per_dim: nll / seen as f64,
            train_error: 100.0 * sum.errors as f64 / seen as f64,
            test_error: error_rate(
                dev,
                &self.model,
                &data.test_images,
                &data.test_labels,
                test_n,
                500,
            ),
            adversary_ce: self.ice.as_ref().map(|_| adversary_ce / seen as f64),
            adversary_train_error: self
                .ice
                .as_ref()
                .map(|_| 100.0 * adversary_errors as f64 / seen as f64),
            adversarial_term: self.ice.as_ref().map(|_| adversarial_term / seen as f64),
        };
        self.history.push(metrics.clone());
        metrics
    }

    pub fn steps_per_epoch(&self, data: &Arrays) -> u64 {
        self.settings
            .train_limit
            .of(data.train_labels.len())
            .div_ceil(self.settings.batch_size) as u64
    }

    /// Weights, optimiser state and history in one safetensors file.
    pub fn checkpoint(&self) -> Result<Vec<u8>> {
        let mut meta = HashMap::new();
        let mut params = self.model.state();
        params.extend(self.optimizer.params());
        if let Some(ice) = &self.ice {
            for part in ice.parts() {
                params.extend(part.params());
            }
            meta.insert(
                "ice_optimizer_steps".into(),
                serde_json::to_string(&ice.optimizer_steps())?,
            );
        }
        meta.insert(
            "config".into(),
            serde_json::to_string(&self.model.config())?,
        );
        meta.insert("history".into(), serde_json::to_string(&self.history)?);
        meta.insert("optimizer_step".into(), self.optimizer.step.to_string());
        io::save(&params, meta)
    }

    /// Restores a checkpoint written by [`Trainer::checkpoint`] for the same configuration.
    pub fn restore(&mut self, dev: &Dev, bytes: &[u8]) -> Result<()> {
        let meta = io::metadata(bytes)?;
        let config: super::model::ModelConfig =
            serde_json::from_str(meta.get("config").context("checkpoint without config")?)?;
        if config != self.model.config() {
            bail!("checkpoint is for another model configuration");
        }
        /// Everything a checkpoint holds, as one parameter container.
        struct Parts<'a>(Vec<&'a mut dyn HasParams>);
        impl HasParams for Parts<'_> {
            fn visit<'b>(&'b self, f: &mut dyn FnMut(&'b super::Param)) {
                self.0.iter().for_each(|p| p.visit(f));
            }
            fn visit_mut(&mut self, f: &mut dyn FnMut(&mut super::Param)) {
                self.0.iter_mut().for_each(|p| p.visit_mut(f));
            }
            fn visit_buffers_mut(&mut self, f: &mut dyn FnMut(&mut super::Param)) {
                self.0.iter_mut().for_each(|p| p.visit_buffers_mut(f));
            }
        }
        let mut parts: Vec<&mut dyn HasParams> = vec![&mut self.model, &mut self.optimizer];
        if let Some(ice) = &mut self.ice {
            parts.extend(ice.parts_mut());
        }
        io::load_into(dev, &mut Parts(parts), bytes)?;
        if let Some(ice) = &mut self.ice {
            let steps: Vec<u64> = serde_json::from_str(
                meta.get("ice_optimizer_steps")
                    .context("iCE checkpoint without ice_optimizer_steps")?,
            )?;
            ice.set_optimizer_steps(&steps);
        }
        self.history =
            serde_json::from_str(meta.get("history").context("checkpoint without history")?)?;
        self.optimizer.step = meta
            .get("optimizer_step")
            .context("checkpoint without optimizer_step")?
            .parse()?;
        Ok(())
    }
}
