//! Stage `train`: trains a fi-RevNet or the small CNN on MNIST.
//!
//! Paper: § 5 and Table 2's logit columns (claims C1, C2: CE and iCE fi-RevNets reach 0.39 % /
//! 0.38 % test error); the CNN is the standard-network baseline.
//! Objective `ce`: cross-entropy on the logits z_s, plus `nll_weight` × the flow's NLL in
//! bits/dim (paper-notes § 3: 0 by default). Objective `ice` (fi-RevNet only; § 4): CE on z_s,
//! an adversarial nuisance classifier on z_n and an MLE term, with the variants and weights of
//! `nn::ice` as params (`adversary`, `w_adv`, `inner_steps`, `mle`, `w_mle`, `adversary_*`).
//! Inputs: `train_images.npy`, `train_labels.npy`, `test_images.npy`, `test_labels.npy`.
//! Outputs: `weights.safetensors` (self-describing: config in the metadata), `metrics.json`
//! (per epoch: lr, loss, CE, NLL, train and test error; for iCE the adversary's CE and error
//! and the adversarial term), `curve.svg`, and for iCE `adversary.safetensors` (the jointly
//! trained nuisance classifier, config in the metadata; `evaluate` scores it).
//! Checkpoints after every epoch (with the adversary, the learned prior and all optimiser
//! states) and resumes from the last one; a resumed run gives the same bytes as an
//! uninterrupted one.
//! Expected: `cpu` fi-RevNet ≥ 98.5 % test accuracy, CNN ≥ 99.0 % (issue 3 targets); iCE
//! within 0.5 pt of CE (claim C2's `cpu` rule).
//!
//! Modules: data, nn, report/figures, training

use std::collections::HashMap;

use anyhow::Result;
use serde_json::json;

use crate::data::Arrays;
use crate::engine::{Finished, StageContext, StageKind};
use crate::nn::train::Trainer;
use crate::nn::{HasParams, DEVICE_NAME};
use crate::report::figures::{line_plot, Series};
use crate::training::{model_config, train_settings, train_with_checkpoints};

pub struct Train;

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
