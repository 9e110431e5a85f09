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
//! Params: [`TrainParams`] (checked when the pipeline loads).
//!
//! Claims: none
//! Modules: data, nn, outputs, report/figures, training

use std::collections::HashMap;

use anyhow::Result;
use serde_json::json;

use crate::data::Arrays;
use crate::engine::{Finished, StageContext, StageKind};
use crate::nn::train::Trainer;
use crate::nn::{HasParams, DEVICE_NAME};
use crate::outputs::{json_bytes, TrainMetrics};
use crate::report::figures::{line_plot, Series};
use crate::training::{train_with_checkpoints, Objective, TrainParams};

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
    type Params = TrainParams;

    fn kind(&self) -> &str {
        "train"
    }

    fn code_fingerprint(&self) -> String {
        super::code_fingerprint("train")
    }

    fn run(&self, ctx: &mut StageContext, params: &TrainParams) -> Result<Finished> {
        let objective = match params.objective {
            Objective::Ce => "ce",
            Objective::Ice => "ice",
        }
        .to_string();
        let data = Arrays::read(|name| ctx.input_named(name))?;
        let config = params.model_config(ctx.seed());
        let settings = params.train_settings(ctx.seed());
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
        let last = trainer
            .history
            .last()
            .expect("epochs >= 1 is checked when the pipeline loads")
            .clone();
        let metrics = TrainMetrics {
            model: config,
            objective: objective.clone(),
            settings,
            device: DEVICE_NAME.to_string(),
            parameters: trainer.model.param_count(),
            history: trainer.history.clone(),
            final_test_error: last.test_error,
            final_train_error: last.train_error,
        };
        ctx.write_output("metrics.json", &json_bytes(&metrics)?)?;
        ctx.write_output(
            "curve.svg",
            curve(&format!("{} ({objective})", ctx.name()), &trainer).as_bytes(),
        )?;
        ctx.set_metric("test_error", json!(last.test_error));
        Ok(Finished::Done)
    }
}
