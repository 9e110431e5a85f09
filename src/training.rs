//! Shared by the stages that train models (`train`, `ablation`): stage params → model
//! configuration and training settings (every param is validated with a message naming the
//! stage), and the training loop with a checkpoint after every epoch, so a killed run resumes
//! where it stopped and gives the same bytes.

use anyhow::{bail, Result};

use crate::data::Arrays;
use crate::engine::{Param, StageContext};
use crate::nn::cnn::CnnConfig;
use crate::nn::flow::{CouplingKind, Permutation, RevNetConfig};
use crate::nn::ice::{AdversaryVariant, IceSettings, MleVariant};
use crate::nn::model::{Model, ModelConfig};
use crate::nn::optim::OptimizerKind;
use crate::nn::train::{TrainSettings, Trainer};
use crate::nn::{device, rng_for};

pub fn usize_param(ctx: &StageContext, name: &str) -> Result<usize> {
    let v = ctx.param_int(name)?;
    if v < 0 {
        bail!("param {}.{name} must not be negative", ctx.name());
    }
    Ok(v as usize)
}

/// The architecture from the stage's params (only the chosen model's params are read).
pub fn model_config(ctx: &StageContext) -> Result<ModelConfig> {
    Ok(match ctx.param_str("model")? {
        "firevnet" => ModelConfig::Firevnet(RevNetConfig {
            in_channels: usize_param(ctx, "in_channels")?,
            size: 32,
            levels: usize_param(ctx, "levels")?,
            steps: usize_param(ctx, "steps")?,
            hidden: usize_param(ctx, "hidden")?,
            coupling: match ctx.param_str("coupling")? {
                "additive" => CouplingKind::Additive,
                "affine" => CouplingKind::Affine,
                other => bail!(
                    "param {}.coupling: {other:?} is not additive or affine",
                    ctx.name()
                ),
            },
            permutation: match ctx.param_str("permutation")? {
                "reverse" => Permutation::Reverse,
                "shuffle" => Permutation::Shuffle,
                other => bail!(
                    "param {}.permutation: {other:?} is not reverse or shuffle",
                    ctx.name()
                ),
            },
            dropout: ctx.param_float("dropout")? as f32,
            classes: 10,
            permutation_seed: ctx.seed(),
            logit_batchnorm: ctx.param_bool("logit_batchnorm")?,
        }),
        "cnn" => ModelConfig::Cnn(CnnConfig {
            width: usize_param(ctx, "width")?,
            side: 28,
            classes: 10,
        }),
        other => bail!(
            "param {}.model: {other:?} is not firevnet or cnn",
            ctx.name()
        ),
    })
}

pub fn train_settings(ctx: &StageContext, seed: u64) -> Result<TrainSettings> {
    let milestones = match ctx.params().get("lr_milestones") {
        Some(Param::List(items)) => items
            .iter()
            .map(|i| match i {
                Param::Int(e) if *e >= 0 => Ok(*e as usize),
                other => bail!(
                    "param {}.lr_milestones: {other} is not an epoch",
                    ctx.name()
                ),
            })
            .collect::<Result<_>>()?,
        _ => bail!(
            "param {}.lr_milestones must be a list of epochs",
            ctx.name()
        ),
    };
    let is_revnet = ctx.param_str("model")? == "firevnet";
    Ok(TrainSettings {
        epochs: usize_param(ctx, "epochs")?,
        batch_size: usize_param(ctx, "batch_size")?.max(1),
        optimizer: match ctx.param_str("optimizer")? {
            "adam" => OptimizerKind::Adam,
            "adamax" => OptimizerKind::Adamax,
            other => bail!(
                "param {}.optimizer: {other:?} is not adam or adamax",
                ctx.name()
            ),
        },
        lr: ctx.param_float("lr")? as f32,
        lr_milestones: milestones,
        lr_gamma: ctx.param_float("lr_gamma")? as f32,
        seed,
        // iCE has its own MLE weight (`w_mle`); `nll_weight` is the CE objective's.
        nll_weight: if is_revnet && ctx.param_str("objective")? == "ce" {
            ctx.param_float("nll_weight")? as f32
        } else {
            0.0
        },
        dequantize: is_revnet && ctx.param_bool("dequantize")?,
        train_limit: usize_param(ctx, "train_limit")?,
        test_limit: usize_param(ctx, "test_limit")?,
        ice: match ctx.param_str("objective")? {
            "ce" => None,
            "ice" if is_revnet => Some(ice_settings(ctx)?),
            "ice" => bail!(
                "param {}.objective: iCE needs a fi-RevNet (model = \"firevnet\")",
                ctx.name()
            ),
            other => bail!(
                "param {}.objective: {other:?} is not a known objective (ce, ice)",
                ctx.name()
            ),
        },
    })
}

/// The iCE objective's params (read only when `objective = "ice"`).
pub fn ice_settings(ctx: &StageContext) -> Result<IceSettings> {
    Ok(IceSettings {
        variant: match ctx.param_str("adversary")? {
            "paper" => AdversaryVariant::Paper,
            "confusion" => AdversaryVariant::Confusion,
            "code" => AdversaryVariant::Code,
            other => bail!(
                "param {}.adversary: {other:?} is not paper, confusion or code",
                ctx.name()
            ),
        },
        w_adv: ctx.param_float("w_adv")? as f32,
        inner_steps: usize_param(ctx, "inner_steps")?,
        mle: match ctx.param_str("mle")? {
            "paper" => MleVariant::Paper,
            "code" => MleVariant::Code,
            other => bail!("param {}.mle: {other:?} is not paper or code", ctx.name()),
        },
        w_mle: ctx.param_float("w_mle")? as f32,
        adversary_width: usize_param(ctx, "adversary_width")?,
        adversary_layers: usize_param(ctx, "adversary_layers")?.max(1),
        adversary_dropout: ctx.param_float("adversary_dropout")? as f32,
        adversary_lr: ctx.param_float("adversary_lr")? as f32,
    })
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
