//! Shared by the stages that train models (`train`, `ablation`): their typed parameters
//! ([`TrainParams`], checked when the pipeline loads), the model configuration and training
//! settings made from them, and the training loop with a checkpoint after every epoch, so a
//! killed run resumes where it stopped and gives the same bytes.

use anyhow::Result;
use serde::{Deserialize, Serialize};

use crate::data::Arrays;
use crate::engine::{
    at_least, non_negative, positive, probability, Limit, ParamError, StageContext, TypedParams,
};
use crate::nn::cnn::CnnConfig;
use crate::nn::flow::{CouplingKind, Permutation, RevNetConfig};
use crate::nn::ice::{AdversaryVariant, IceSettings, MleVariant};
use crate::nn::model::{Model, ModelConfig};
use crate::nn::nuisance::ProbeSettings;
use crate::nn::optim::OptimizerKind;
use crate::nn::train::{TrainSettings, Trainer};
use crate::nn::{device, rng_for};

/// Which model a training stage trains.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelKind {
    Firevnet,
    Cnn,
}

/// What it is trained for: cross-entropy, or the independence cross-entropy (fi-RevNet only).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Objective {
    Ce,
    Ice,
}

/// The parameters of a training stage. The fi-RevNet's architecture params are needed only
/// with `model = "firevnet"`, `width` only with `model = "cnn"`, the iCE params only with
/// `objective = "ice"`; a stage may declare ones its model does not read (they stay in its
/// key), but never an unknown one.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainParams {
    pub model: ModelKind,
    pub objective: Objective,
    pub optimizer: OptimizerKind,
    pub lr: f64,
    /// Epochs after which the learning rate is multiplied by `lr_gamma`.
    pub lr_milestones: Vec<usize>,
    pub lr_gamma: f64,
    pub epochs: usize,
    pub batch_size: usize,
    pub train_limit: Limit,
    pub test_limit: Limit,
    // The fi-RevNet.
    pub in_channels: Option<usize>,
    pub levels: Option<usize>,
    pub steps: Option<usize>,
    pub hidden: Option<usize>,
    pub coupling: Option<CouplingKind>,
    pub permutation: Option<Permutation>,
    pub logit_batchnorm: Option<bool>,
    pub dropout: Option<f64>,
    /// The CE objective's weight on the flow's NLL (bits/dim).
    pub nll_weight: Option<f64>,
    pub dequantize: Option<bool>,
    // The CNN.
    pub width: Option<usize>,
    // The iCE objective (`nn::ice`).
    pub adversary: Option<AdversaryVariant>,
    pub w_adv: Option<f64>,
    pub inner_steps: Option<usize>,
    pub mle: Option<MleVariant>,
    pub w_mle: Option<f64>,
    pub adversary_width: Option<usize>,
    pub adversary_layers: Option<usize>,
    pub adversary_dropout: Option<f64>,
    pub adversary_lr: Option<f64>,
}

/// The value of an optional param that the chosen model or objective needs.
fn needed<T: Copy>(value: Option<T>, param: &str, because: &str) -> Result<T, ParamError> {
    value.ok_or_else(|| ParamError::new(param, format!("missing: {because} needs it")))
}

/// The input side of the fi-RevNet (MNIST 28 padded by 2 on each side).
const REVNET_SIZE: usize = 32;

impl TypedParams for TrainParams {
    fn check(&self) -> Result<(), ParamError> {
        at_least("epochs", self.epochs, 1)?;
        at_least("batch_size", self.batch_size, 1)?;
        positive("lr", self.lr)?;
        positive("lr_gamma", self.lr_gamma)?;
        match self.model {
            ModelKind::Firevnet => {
                let why = "model = \"firevnet\"";
                let channels = needed(self.in_channels, "in_channels", why)?;
                if channels != 1 && channels != 3 {
                    return Err(ParamError::new(
                        "in_channels",
                        format!("{channels} is not allowed: 1 (the digit alone) or 3 (the digit in the last of three channels, the authors' layout)"),
                    ));
                }
                let levels = needed(self.levels, "levels", why)?;
                // Each level squeezes 2×2 (channels ×4, side ÷2) and all but the last split
                // off half the channels: the last map has in_channels·2^(levels+1) channels of
                // side 32 / 2^levels, and the 10 logits are read from its centre pixel.
                let last_channels = channels << (levels + 1).min(16);
                if levels > 5 || last_channels < 10 {
                    return Err(ParamError::new(
                        "levels",
                        format!(
                            "{levels} is out of range with in_channels = {channels}: the last map has {channels}·2^(levels+1) channels, which must hold the 10 logits, and side 32/2^levels ≥ 1 (allowed: {})",
                            if channels == 1 { "3 to 5" } else { "1 to 5" }
                        ),
                    ));
                }
                at_least("steps", needed(self.steps, "steps", why)?, 1)?;
                at_least("hidden", needed(self.hidden, "hidden", why)?, 1)?;
                needed(self.coupling, "coupling", why)?;
                needed(self.permutation, "permutation", why)?;
                needed(self.logit_batchnorm, "logit_batchnorm", why)?;
                probability("dropout", needed(self.dropout, "dropout", why)?)?;
                needed(self.dequantize, "dequantize", why)?;
                if self.objective == Objective::Ce {
                    non_negative(
                        "nll_weight",
                        needed(
                            self.nll_weight,
                            "nll_weight",
                            "the CE objective on a fi-RevNet",
                        )?,
                    )?;
                }
            }
            ModelKind::Cnn => {
                at_least("width", needed(self.width, "width", "model = \"cnn\"")?, 1)?;
                if self.objective == Objective::Ice {
                    return Err(ParamError::new(
                        "objective",
                        "\"ice\" needs a fi-RevNet (model = \"firevnet\"): it reads the nuisance variables z_n",
                    ));
                }
            }
        }
        if self.objective == Objective::Ice {
            let why = "objective = \"ice\"";
            needed(self.adversary, "adversary", why)?;
            non_negative("w_adv", needed(self.w_adv, "w_adv", why)?)?;
            at_least(
                "inner_steps",
                needed(self.inner_steps, "inner_steps", why)?,
                1,
            )?;
            needed(self.mle, "mle", why)?;
            non_negative("w_mle", needed(self.w_mle, "w_mle", why)?)?;
            at_least(
                "adversary_width",
                needed(self.adversary_width, "adversary_width", why)?,
                1,
            )?;
            at_least(
                "adversary_layers",
                needed(self.adversary_layers, "adversary_layers", why)?,
                1,
            )?;
            probability(
                "adversary_dropout",
                needed(self.adversary_dropout, "adversary_dropout", why)?,
            )?;
            positive(
                "adversary_lr",
                needed(self.adversary_lr, "adversary_lr", why)?,
            )?;
        }
        Ok(())
    }
}

// The `expect`s below hold because `check` ran when the pipeline loaded.
const CHECKED: &str = "checked when the pipeline loaded";

impl TrainParams {
    /// The architecture (`permutation_seed` is the stage's seed).
    pub fn model_config(&self, seed: u64) -> ModelConfig {
        match self.model {
            ModelKind::Firevnet => ModelConfig::Firevnet(RevNetConfig {
                in_channels: self.in_channels.expect(CHECKED),
                size: REVNET_SIZE,
                levels: self.levels.expect(CHECKED),
                steps: self.steps.expect(CHECKED),
                hidden: self.hidden.expect(CHECKED),
                coupling: self.coupling.expect(CHECKED),
                permutation: self.permutation.expect(CHECKED),
                dropout: self.dropout.expect(CHECKED) as f32,
                classes: 10,
                permutation_seed: seed,
                logit_batchnorm: self.logit_batchnorm.expect(CHECKED),
            }),
            ModelKind::Cnn => ModelConfig::Cnn(CnnConfig {
                width: self.width.expect(CHECKED),
                side: 28,
                classes: 10,
            }),
        }
    }

    /// The training settings, seeded with `seed`.
    pub fn train_settings(&self, seed: u64) -> TrainSettings {
        let is_revnet = self.model == ModelKind::Firevnet;
        TrainSettings {
            epochs: self.epochs,
            batch_size: self.batch_size,
            optimizer: self.optimizer,
            lr: self.lr as f32,
            lr_milestones: self.lr_milestones.clone(),
            lr_gamma: self.lr_gamma as f32,
            seed,
            // iCE has its own MLE weight (`w_mle`); `nll_weight` is the CE objective's.
            nll_weight: match (is_revnet, self.objective) {
                (true, Objective::Ce) => self.nll_weight.expect(CHECKED) as f32,
                _ => 0.0,
            },
            dequantize: is_revnet && self.dequantize.expect(CHECKED),
            train_limit: self.train_limit,
            test_limit: self.test_limit,
            ice: (self.objective == Objective::Ice).then(|| self.ice_settings()),
        }
    }

    /// The iCE objective's settings (`objective = "ice"` only).
    pub fn ice_settings(&self) -> IceSettings {
        IceSettings {
            variant: self.adversary.expect(CHECKED),
            w_adv: self.w_adv.expect(CHECKED) as f32,
            inner_steps: self.inner_steps.expect(CHECKED),
            mle: self.mle.expect(CHECKED),
            w_mle: self.w_mle.expect(CHECKED) as f32,
            adversary_width: self.adversary_width.expect(CHECKED),
            adversary_layers: self.adversary_layers.expect(CHECKED),
            adversary_dropout: self.adversary_dropout.expect(CHECKED) as f32,
            adversary_lr: self.adversary_lr.expect(CHECKED) as f32,
        }
    }
}

/// A fresh post-hoc probe on frozen latents (the `probe` stage's params; the `ablation`
/// stage's `probe_*` params): an MLP of the adversary's shape, trained on the first
/// `train_limit` training latents of which a seeded `validation` are held out to pick the epoch.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProbeParams {
    pub width: usize,
    pub layers: usize,
    pub dropout: f64,
    pub epochs: usize,
    pub batch_size: usize,
    pub lr: f64,
    pub train_limit: Limit,
    pub validation: usize,
}

impl TypedParams for ProbeParams {
    fn check(&self) -> Result<(), ParamError> {
        at_least("width", self.width, 1)?;
        at_least("layers", self.layers, 1)?;
        probability("dropout", self.dropout)?;
        at_least("epochs", self.epochs, 1)?;
        at_least("batch_size", self.batch_size, 1)?;
        positive("lr", self.lr)?;
        at_least("validation", self.validation, 1)?;
        let limit = self.train_limit.raw();
        if limit != 0 && self.validation >= limit {
            return Err(ParamError::new(
                "validation",
                format!(
                    "{} is out of range: the held-out examples must be fewer than train_limit ({limit})",
                    self.validation
                ),
            ));
        }
        Ok(())
    }
}

impl ProbeParams {
    pub fn settings(&self, seed: u64) -> ProbeSettings {
        ProbeSettings {
            width: self.width,
            layers: self.layers,
            dropout: self.dropout as f32,
            epochs: self.epochs,
            batch_size: self.batch_size,
            lr: self.lr as f32,
            seed,
        }
    }

    /// How many training examples the probe sees (fit + validation), of `available`; an
    /// error when the validation set would take them all.
    pub fn n_train(&self, available: usize) -> Result<usize> {
        let n = self.train_limit.of(available);
        anyhow::ensure!(
            self.validation < n,
            "param validation = {} must be below the {n} training examples",
            self.validation
        );
        Ok(n)
    }
}

/// Trains one model with per-epoch checkpoints named `checkpoint`; returns the trainer.
pub fn train_with_checkpoints(
    ctx: &mut StageContext,
    config: &ModelConfig,
    settings: TrainSettings,
    data: &Arrays,
    checkpoint: &str,
) -> Result<Trainer> {
    let dev = device();
    let model = Model::new(&dev, config, &mut rng_for(settings.seed, "init"));
    let epochs = settings.epochs;
    let mut trainer = Trainer::new(&dev, model, settings, data);
    if let Some(bytes) = ctx.checkpoint_load(checkpoint)? {
        trainer.restore(&dev, &bytes)?;
        ctx.log(format!(
            "{checkpoint}: resumed after epoch {}",
            trainer.history.len()
        ));
    }
    while trainer.history.len() < epochs {
        let bar = ctx.progress(
            trainer.steps_per_epoch(data),
            &format!("{checkpoint} epoch {}/{epochs}", trainer.history.len() + 1),
        );
        let start = std::time::Instant::now();
        let m = trainer.run_epoch(&dev, data, &|done| bar.set_position(done));
        bar.finish_and_clear();
        ctx.log(format!(
            "{checkpoint} epoch {}: loss {:.4}, CE {:.4}, NLL {:.3} bits/dim, train error {:.2} %, test error {:.2} % ({:.0} s)",
            m.epoch,
            m.loss,
            m.ce,
            m.nll_bits_per_dim,
            m.train_error,
            m.test_error,
            start.elapsed().as_secs_f64()
        ));
        ctx.checkpoint_save(checkpoint, &trainer.checkpoint()?)?;
    }
    Ok(trainer)
}
