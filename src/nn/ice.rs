//! The independence cross-entropy (iCE) objective (paper § 4; paper-notes § 3):
//!
//! ```text
//! min_θ max_θnc   L_sCE(θ) − L_nCE(θ, θnc) + L_MLE(θ)
//! ```
//!
//! One main step: the flow's forward pass; `inner_steps` updates of the nuisance classifier
//! D_θnc on the *detached* z_n with the true labels (it minimises its cross-entropy); then one
//! encoder loss `CE(z_s, y) + w_mle·MLE + w_adv·adversarial term`, whose gradient reaches the
//! flow through D (D's own parameters are not updated by it). The adversarial term has three
//! variants ([`AdversaryVariant`]), the MLE term two ([`MleVariant`]); both weights, both
//! variants and the inner-step count are stage parameters and go into the key.
//!
//! With `w_adv = 0` and `w_mle = 0` the flow's update is exactly the CE baseline's (tested to
//! the byte): D trains beside the flow on its own random streams and adds exact zeros to the
//! gradients.
//!
//! Decisions beyond paper-notes § 3: D always reads z_n, the latent without the C logit rows.
//! The authors' code feeds the whole latent with the logit entries replaced by the constant
//! 0.1; a constant input only adds a fixed bias to D's first layer, so the `code` variant here
//! differs from theirs only in that layer's initial bias. In the encoder's term D runs in
//! evaluation mode (no dropout), so the flow's gradient does not depend on D's dropout draws.

use dfdx::prelude::*;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::flow::FiRevNet;
use super::nuisance::{log_likelihoods, Mlp, MlpConfig};
use super::objective::{dequantisation_constant, StepStats};
use super::ops::{add_per_channel, argmax_rows, cross_entropy, mul_per_channel, taped};
use super::optim::{Optimizer, OptimizerKind};
use super::{rng_for, Dev, Grads, HasParams, Param, Tp, T1, T2};

/// What the encoder does with the nuisance classifier's cross-entropy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AdversaryVariant {
    /// The paper's Definition: maximise D's CE on the true labels, per example clipped at
    /// log C (a classifier at chance), so being confidently wrong earns nothing.
    Paper,
    /// Minimise D's CE to shuffled labels (push D's output towards label noise).
    Confusion,
    /// The authors' final code: *maximise* D's CE to shuffled labels (weight 0.05 there).
    Code,
}

/// Which likelihood the MLE term is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MleVariant {
    /// The paper: z_n under a learned factorial Gaussian, plus log|det J|.
    Paper,
    /// The authors' code: every dimension, N(0, I) on the final map and the conditional
    /// split priors (the flow's own NLL), plus log|det J|.
    Code,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IceSettings {
    pub variant: AdversaryVariant,
    pub w_adv: f32,
    pub inner_steps: usize,
    pub mle: MleVariant,
    pub w_mle: f32,
    /// The nuisance classifier: hidden width, linear layers, dropout (authors: 512, 3, 0.1).
    pub adversary_width: usize,
    pub adversary_layers: usize,
    pub adversary_dropout: f32,
    /// Its Adamax learning rate.
    pub adversary_lr: f32,
}

/// A factorial Gaussian over z_n with learned mean and log-scale per dimension.
pub struct FactorialGaussian {
    pub mean: Param,
    pub logs: Param,
}

impl FactorialGaussian {
    /// Starts as N(0, I).
    pub fn new(dev: &Dev, dims: usize) -> FactorialGaussian {
        FactorialGaussian {
            mean: Param::zeros(dev, "prior.mean", &[dims]),
            logs: Param::zeros(dev, "prior.logs", &[dims]),
        }
    }

    /// log N(z; μ, diag e^{2s}) per column of `z (dims, B)`.
    pub fn log_density<T: Tp>(&self, z: T2<T>) -> T1<T> {
        let (dims, b) = *z.shape();
        let centred = add_per_channel(z, taped::<_, T>(&self.mean.as_vector()).negate(), dims);
        let scaled = mul_per_channel(
            centred,
            (taped::<_, T>(&self.logs.as_vector()) * -1.0).exp(),
            dims,
        );
        let quadratic = (scaled.square() * -0.5).sum::<(usize,), Axis<0>>();
        let log_scales = taped::<_, T>(&self.logs.as_vector())
            .sum::<(), _>()
            .broadcast_like(&(b,));
        let constant = 0.5 * (2.0 * std::f32::consts::PI).ln() * dims as f32;
        (quadratic - log_scales) - constant
    }
}

impl HasParams for FactorialGaussian {
    fn visit<'a>(&'a self, f: &mut dyn FnMut(&'a Param)) {
        f(&self.mean);
        f(&self.logs);
    }
    fn visit_mut(&mut self, f: &mut dyn FnMut(&mut Param)) {
        f(&mut self.mean);
        f(&mut self.logs);
    }
}

/// Everything iCE trains beside the flow, and its optimisers.
pub struct IceState {
    pub settings: IceSettings,
    pub adversary: Mlp,
    pub adversary_optimizer: Optimizer,
    /// The learned factorial Gaussian (MLE variant `paper` only), trained with the flow's
    /// optimiser kind and learning rate.
    pub prior: Option<(FactorialGaussian, Optimizer)>,
}

/// The random streams of one epoch (separate from the flow's, so they never shift its draws).
pub struct IceRngs {
    pub adversary_dropout: ChaCha8Rng,
    pub shuffled_labels: ChaCha8Rng,
}

impl IceRngs {
    pub fn for_epoch(seed: u64, epoch: usize) -> IceRngs {
        IceRngs {
            adversary_dropout: rng_for(seed, &format!("ice-adversary-dropout/{epoch}")),
            shuffled_labels: rng_for(seed, &format!("ice-shuffled-labels/{epoch}")),
        }
    }
}

impl IceState {
    pub fn new(
        dev: &Dev,
        model: &FiRevNet,
        settings: IceSettings,
        flow_optimizer: OptimizerKind,
        seed: u64,
    ) -> IceState {
        let nuisance_dims = model.dims() - model.config.classes;
        let adversary = Mlp::new(
            dev,
            "adversary",
            MlpConfig {
                inputs: nuisance_dims,
                width: settings.adversary_width,
                layers: settings.adversary_layers,
                dropout: settings.adversary_dropout,
                classes: model.config.classes,
            },
            &mut rng_for(seed, "ice-adversary-init"),
        );
        let adversary_optimizer = Optimizer::new(OptimizerKind::Adamax, dev, &adversary);
        let prior = (settings.mle == MleVariant::Paper).then(|| {
            let prior = FactorialGaussian::new(dev, nuisance_dims);
            let optimizer = Optimizer::new(flow_optimizer, dev, &prior);
            (prior, optimizer)
        });
        IceState {
            settings,
            adversary,
            adversary_optimizer,
            prior,
        }
    }

    /// Checkpoint state: the adversary, the prior, and both optimisers' moments.
    pub fn parts_mut(&mut self) -> Vec<&mut dyn HasParams> {
        let mut parts: Vec<&mut dyn HasParams> =
            vec![&mut self.adversary, &mut self.adversary_optimizer];
        if let Some((prior, optimizer)) = &mut self.prior {
            parts.push(prior);
            parts.push(optimizer);
        }
        parts
    }

    pub fn parts(&self) -> Vec<&dyn HasParams> {
        let mut parts: Vec<&dyn HasParams> = vec![&self.adversary, &self.adversary_optimizer];
        if let Some((prior, optimizer)) = &self.prior {
            parts.push(prior);
            parts.push(optimizer);
        }
        parts
    }

    /// The optimisers' step counters (for bias correction), in checkpoint order.
    pub fn optimizer_steps(&self) -> Vec<u64> {
        let mut steps = vec![self.adversary_optimizer.step];
        if let Some((_, optimizer)) = &self.prior {
            steps.push(optimizer.step);
        }
        steps
    }

    pub fn set_optimizer_steps(&mut self, steps: &[u64]) {
        self.adversary_optimizer.step = steps.first().copied().unwrap_or(0);
        if let Some((_, optimizer)) = &mut self.prior {
            optimizer.step = steps.get(1).copied().unwrap_or(0);
        }
    }
}

/// `inner_steps` Adamax updates of the adversary on detached nuisance latents with the true
/// labels; returns its mean cross-entropy (nats) over those steps.
fn train_adversary(
    state: &mut IceState,
    nuisance: &T2,
    labels: &[u8],
    lr: f32,
    rng: &mut ChaCha8Rng,
) -> f32 {
    let mut total = 0.0;
    for _ in 0..state.settings.inner_steps {
        let logits = state
            .adversary
            .forward(nuisance.clone().leaky_traced(), Some(&mut *rng));
        let loss = log_likelihoods(logits, labels).mean() * -1.0;
        total += loss.retaped::<NoneTape>().array();
        let grads = loss.backward();
        state
            .adversary_optimizer
            .update(&mut state.adversary, &grads, lr);
    }
    total / state.settings.inner_steps.max(1) as f32
}

/// One iCE step on a fi-RevNet: trains the adversary (inner steps, done here), then returns
/// the encoder loss's gradients (for the flow and, with the `paper` MLE, the prior) and the
/// batch statistics. `lr` is the flow's current learning rate (the adversary keeps its own).
pub fn revnet_ice_step(
    model: &FiRevNet,
    state: &mut IceState,
    x: T2,
    labels: &[u8],
    dropout: Option<&mut ChaCha8Rng>,
    rngs: &mut IceRngs,
) -> (Grads, StepStats) {
    let settings = state.settings.clone();
    let classes = model.config.classes;
    let dims = model.dims();
    let b = labels.len() as f32;
    let out = model.forward(x.leaky_traced(), dropout);

    // The adversary's own game, on latents that carry no gradient to the flow.
    let detached = model.nuisance(out.z.retaped::<NoneTape>());
    let adversary_ce = train_adversary(
        state,
        &detached,
        labels,
        settings.adversary_lr,
        &mut rngs.adversary_dropout,
    );
    drop(detached);

    let z_for_adversary = out.z.with_empty_tape();
    let z_for_prior = out.z.with_empty_tape();
    let logits = model.logits(out.z);
    let (scores, logit_batch) = match &model.logit_bn {
        Some(bn) => {
            let (scores, mean, var) = bn.forward_train(logits);
            (scores, Some((mean, var)))
        }
        None => (logits, None),
    };
    let predictions = argmax_rows(&scores.retaped::<NoneTape>());
    let ce = cross_entropy(scores, labels);

    // MLE term in bits per dimension (the same normalisation for both variants).
    let to_bits = 1.0 / (dims as f32 * std::f32::consts::LN_2);
    let nll = match &state.prior {
        None => {
            ((out.logp + out.logdet).sum::<(), _>() * (-1.0 / b) + dequantisation_constant(dims))
                * to_bits
        }
        Some((prior, _)) => {
            let log_density = prior.log_density(model.nuisance(z_for_prior));
            // The split priors are not part of this likelihood; `× 0` keeps them in the graph
            // (their gradient is exactly zero) so every flow parameter has a gradient.
            (((log_density + out.logdet).sum::<(), _>() + out.logp.sum::<(), _>() * 0.0)
                * (-1.0 / b)
                + dequantisation_constant(dims))
                * to_bits
        }
    };

    // The adversarial term, as the encoder minimises it.
    let adversary_logits = state
        .adversary
        .forward(model.nuisance(z_for_adversary), None);
    let adversary_predictions = argmax_rows(&adversary_logits.retaped::<NoneTape>());
    let log_chance = (classes as f32).ln();
    let (adversarial, adversarial_value) = match settings.variant {
        AdversaryVariant::Paper => {
            let log_likelihood = log_likelihoods(adversary_logits, labels);
            // min(CE_i, log C): the gradient of CE_i where CE_i < log C, zero elsewhere.
            let below: Vec<f32> = log_likelihood
                .retaped::<NoneTape>()
                .as_vec()
                .iter()
                .map(|&ll| if -ll < log_chance { 1.0 } else { 0.0 })
                .collect();
            let clipped_value: f32 = log_likelihood
                .retaped::<NoneTape>()
                .as_vec()
                .iter()
                .map(|&ll| (-ll).min(log_chance))
                .sum::<f32>()
                / b;
            let mask: T1 = log_likelihood
                .device()
                .tensor_from_vec(below, (labels.len(),));
            // −mean(min(CE_i, log C)) up to a constant: minimising it maximises D's CE.
            (
                (log_likelihood * mask).sum::<(), _>() * (1.0 / b),
                -clipped_value,
            )
        }
        AdversaryVariant::Confusion | AdversaryVariant::Code => {
            let mut shuffled = labels.to_vec();
            shuffled.shuffle(&mut rngs.shuffled_labels);
            let mean_ll = log_likelihoods(adversary_logits, &shuffled).mean();
            if settings.variant == AdversaryVariant::Confusion {
                // + CE to shuffled labels.
                let term = mean_ll * -1.0;
                let value = term.retaped::<NoneTape>().array();
                (term, value)
            } else {
                // − CE to shuffled labels.
                let value = mean_ll.retaped::<NoneTape>().array();
                (mean_ll, value)
            }
        }
    };

    let stats = StepStats {
        ce: ce.retaped::<NoneTape>().array(),
        nll_bits_per_dim: nll.retaped::<NoneTape>().array(),
        errors: count_errors(&predictions, labels),
        loss: 0.0,
        logit_batch,
        adversary: Some(super::objective::AdversaryStats {
            cross_entropy: adversary_ce,
            errors: count_errors(&adversary_predictions, labels),
            term: adversarial_value,
        }),
    };
    // Same association as the CE step (ce + nll·w), then the adversarial term.
    let loss = ce + nll * settings.w_mle;
    let loss = loss + adversarial * settings.w_adv;
    let stats = StepStats {
        loss: loss.retaped::<NoneTape>().array(),
        ..stats
    };
    (loss.backward(), stats)
}

fn count_errors(predictions: &[u8], labels: &[u8]) -> usize {
    predictions
        .iter()
        .zip(labels)
        .filter(|(p, y)| p != y)
        .count()
}
