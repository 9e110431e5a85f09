//! Training objectives (the loss of one batch).
//!
//! CE (paper § 5 baseline): cross-entropy on the logits z_s, plus `nll_weight` times the
//! negative log-likelihood of the flow in bits per dimension (paper-notes § 3: the authors'
//! code trains with NLL + CE; our CE baseline defaults the weight to 0, "as the paper's text
//! implies"). The NLL term stays in the graph even at weight 0 so that every parameter gets a
//! gradient, and is reported either way.

use dfdx::prelude::*;
use rand_chacha::ChaCha8Rng;

use super::cnn::SmallCnn;
use super::flow::FiRevNet;
use super::ops::{argmax_rows, cross_entropy};
use super::{Grads, T2};

/// What one training step measured.
#[derive(Clone, Debug, Default)]
pub struct StepStats {
    pub loss: f32,
    pub ce: f32,
    pub nll_bits_per_dim: f32,
    pub errors: usize,
    /// Batch mean and unbiased variance of the logits, when a logit BatchNorm is trained.
    pub logit_batch: Option<(Vec<f32>, Vec<f32>)>,
    /// The nuisance classifier's side of an iCE step.
    pub adversary: Option<AdversaryStats>,
}

/// What the adversary did in one iCE step.
#[derive(Clone, Debug, Default)]
pub struct AdversaryStats {
    /// Its mean training cross-entropy (nats) over the inner steps, true labels.
    pub cross_entropy: f32,
    /// Its errors on the batch (evaluation mode, after the inner steps).
    pub errors: usize,
    /// The adversarial term's value as the encoder minimises it.
    pub term: f32,
}

/// ln 128 · D: the discrete-density correction for x = 2u − 1 with 256 bins per unit.
pub(crate) fn dequantisation_constant(dims: usize) -> f32 {
    dims as f32 * 128f32.ln()
}

/// CE + `nll_weight`·NLL on a fi-RevNet; returns the gradients and the batch statistics.
pub fn revnet_ce_step(
    model: &FiRevNet,
    x: T2,
    labels: &[u8],
    nll_weight: f32,
    dropout: Option<&mut ChaCha8Rng>,
) -> (Grads, StepStats) {
    let dims = model.dims();
    let b = labels.len() as f32;
    let out = model.forward(x.leaky_traced(), dropout);
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
    // Bits per dimension, batch mean: (−(log p + log det) + D ln 128) / (D ln 2).
    let nll = ((out.logp + out.logdet).sum::<(), _>() * (-1.0 / b) + dequantisation_constant(dims))
        * (1.0 / (dims as f32 * std::f32::consts::LN_2));
    let stats = StepStats {
        ce: ce.retaped::<NoneTape>().array(),
        nll_bits_per_dim: nll.retaped::<NoneTape>().array(),
        errors: predictions
            .iter()
            .zip(labels)
            .filter(|(p, y)| p != y)
            .count(),
        loss: 0.0,
        logit_batch,
        adversary: None,
    };
    let loss = ce + nll * nll_weight;
    let stats = StepStats {
        loss: loss.retaped::<NoneTape>().array(),
        ..stats
    };
    (loss.backward(), stats)
}

/// Cross-entropy on a CNN.
pub fn cnn_step(model: &SmallCnn, x: T2, labels: &[u8]) -> (Grads, StepStats) {
    let logits = model.forward(x.leaky_traced());
    let predictions = argmax_rows(&logits.retaped::<NoneTape>());
    let loss = cross_entropy(logits, labels);
    let value = loss.retaped::<NoneTape>().array();
    let errors = predictions
        .iter()
        .zip(labels)
        .filter(|(p, y)| p != y)
        .count();
    (
        loss.backward(),
        StepStats {
            loss: value,
            ce: value,
            nll_bits_per_dim: 0.0,
            errors,
            logit_batch: None,
            adversary: None,
        },
    )
}

/// Predicted classes for a batch (evaluation mode).
pub fn revnet_predict(model: &FiRevNet, x: T2) -> Vec<u8> {
    let out = model.forward(x, None);
    argmax_rows(&model.scores(out.z))
}

pub fn cnn_predict(model: &SmallCnn, x: T2) -> Vec<u8> {
    argmax_rows(&model.forward(x))
}
