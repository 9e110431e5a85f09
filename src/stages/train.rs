//! Stage `train`: trains a fi-RevNet or the small CNN on MNIST.
//!
//! Paper: § 5 and Table 2's logit columns (claim C1: a CE-trained fi-RevNet reaches 0.39 %
//! test error); the CNN is the standard-network baseline. Objective `ce`: cross-entropy on the
//! logits z_s, plus `nll_weight` × the flow's NLL in bits/dim (paper-notes § 3: 0 by default).
//! Inputs: `train_images.npy`, `train_labels.npy`, `test_images.npy`, `test_labels.npy`.
//! Outputs: `weights.safetensors` (self-describing: config in the metadata), `metrics.json`
//! (per epoch: lr, loss, CE, NLL, train and test error), `curve.svg`.
//! Checkpoints after every epoch and resumes from the last one; a resumed run gives the same
//! bytes as an uninterrupted one.
//! Expected: `cpu` fi-RevNet ≥ 98.5 % test accuracy, CNN ≥ 99.0 % (issue 3 targets).
//!
//! Modules: data, nn, report/figures

use std::collections::HashMap;

use anyhow::{bail, Result};
use serde_json::json;

use crate::data::Arrays;
use crate::engine::{Finished, Param, StageContext, StageKind};
use crate::nn::cnn::CnnConfig;
use crate::nn::flow::{CouplingKind, Permutation, RevNetConfig};
use crate::nn::ice::{AdversaryVariant, IceSettings, MleVariant};
use crate::nn::model::{Model, ModelConfig};
use crate::nn::optim::OptimizerKind;
use crate::nn::train::{TrainSettings, Trainer};
use crate::nn::{device, rng_for, HasParams, DEVICE_NAME};
use crate::report::figures::{line_plot, Series};

pub struct Train;

fn usize_param(ctx: &StageContext, name: &str) -> Result<usize> {
    let v = ctx.param_int(name)?;
    if v < 0 {
        bail!("param {}.{name} must not be negative", ctx.name());
    }
    Ok(v as usize)
}

/// The architecture from the stage's params (only the chosen model's params are read).
fn model_config(ctx: &StageContext) -> Result<ModelConfig> {
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

fn train_settings(ctx: &StageContext, seed: u64) -> Result<TrainSettings> {
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
fn ice_settings(ctx: &StageContext) -> Result<IceSettings> {
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
fn train_with_checkpoints(
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

/// Training curves: error (%) per epoch.
fn curve(title: &str, trainer: &Trainer) -> String {
    let series = |name: &str, f: &dyn Fn(&crate::nn::train::EpochMetrics) -> f64| Series {
        name: name.to_string(),
        points: trainer
            .history
            .iter()
            .map(|m| (m.epoch as f64, f(m)))
            .collect(),
    };
    line_plot(
        title,
        "epoch",
        "error (%)",
        &[
            series("train (dropout on)", &|m| m.train_error),
            series("test", &|m| m.test_error),
        ],
    )
}

impl StageKind for Train {
    fn kind(&self) -> &str {
        "train"
    }

    fn code_fingerprint(&self) -> String {
        super::code_fingerprint("train")
    }

    fn run(&self, ctx: &mut StageContext) -> Result<Finished> {
        let objective = ctx.param_str("objective")?.to_string();
        let data = Arrays::read(|name| ctx.input_named(name))?;
        let config = model_config(ctx)?;
        let settings = train_settings(ctx, ctx.seed())?;
        let trainer = train_with_checkpoints(ctx, &config, settings.clone(), &data, "trainer")?;
        let description = HashMap::from([
            ("objective".to_string(), objective.clone()),
            ("training".to_string(), serde_json::to_string(&settings)?),
        ]);
        ctx.write_output(
            "weights.safetensors",
            &trainer.model.to_safetensors(description)?,
        )?;
        if let Some(ice) = &trainer.ice {
            ctx.write_output(
                "adversary.safetensors",
                &ice.adversary
                    .to_safetensors("iCE nuisance classifier (adversary) on z_n")?,
            )?;
        }
        let last = trainer.history.last();
        let metrics = json!({
            "model": config,
            "objective": objective,
            "settings": settings,
            "device": DEVICE_NAME,
            "parameters": trainer.model.param_count(),
            "history": trainer.history,
            "final_test_error": last.map(|m| m.test_error),
            "final_train_error": last.map(|m| m.train_error),
        });
        ctx.write_output("metrics.json", &serde_json::to_vec_pretty(&metrics)?)?;
        ctx.write_output(
            "curve.svg",
            curve(&format!("{} ({objective})", ctx.name()), &trainer).as_bytes(),
        )?;
        if let Some(m) = last {
            ctx.set_metric("test_error", json!(m.test_error));
        }
        Ok(Finished::Done)
    }
}
