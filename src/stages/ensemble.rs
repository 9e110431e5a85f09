//! Stage `ensemble`: the *oracle* of paper-notes § 4, an ensemble of independently trained
//! classifiers (CNNs trained on clean MNIST with different seeds, one `train` stage each)
//! that later stages ask what an image looks like.
//!
//! Paper: no counterpart; it turns "looks like A / looks like B" (Figs. 4, 6, 7; claims C6,
//! C7, C11) into numbers. Inputs: every declared upstream stage's `weights.safetensors` (the
//! members, in declared order) and the MNIST test arrays. Outputs: `member<i>.safetensors`
//! (the members' weights, unchanged) and `ensemble.json` (each member's and the ensemble's
//! test error in %; the ensemble averages softmax probabilities).
//! Expected: ensemble test error at or below the best member's (≈ 1 % on `cpu`).
//!
//! Params: `test_limit` (0 = all).
//!
//! Claims: none
//! Modules: data, nn, outputs

use anyhow::{ensure, Result};
use serde::Deserialize;
use serde_json::json;

use crate::data::Arrays;
use crate::engine::{Finished, Limit, StageContext, StageKind, TypedParams};
use crate::nn::device;
use crate::nn::model::{ensemble_predict, Model};
use crate::nn::train::{error_rate, input_for};
use crate::outputs::{json_bytes, EnsembleMember, EnsembleResult};
use dfdx::prelude::Cache;

pub struct Ensemble;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnsembleParams {
    test_limit: Limit,
}

impl TypedParams for EnsembleParams {}

impl StageKind for Ensemble {
    type Params = EnsembleParams;

    fn kind(&self) -> &str {
        "ensemble"
    }

    fn code_fingerprint(&self) -> String {
        super::code_fingerprint("ensemble")
    }

    fn run(&self, ctx: &mut StageContext, params: &EnsembleParams) -> Result<Finished> {
        let dev = device();
        let data = Arrays::read(|name| ctx.input_named(name))?;
        let n = params.test_limit.of(data.test_labels.len());
        let stages: Vec<String> = ctx
            .input_stages()
            .into_iter()
            .filter(|s| ctx.input_names(s).contains(&"weights.safetensors"))
            .map(String::from)
            .collect();
        ensure!(
            !stages.is_empty(),
            "stage {} has no member weights among its inputs",
            ctx.name()
        );
        let mut members = Vec::new();
        let mut member_rows = Vec::new();
        for (i, stage) in stages.iter().enumerate() {
            let bytes = ctx.input(stage, "weights.safetensors")?;
            let model = Model::from_safetensors(&dev, &bytes)?;
            let error = error_rate(&dev, &model, &data.test_images, &data.test_labels, n, 500);
            ctx.log(format!("member {i} ({stage}): test error {error:.2} %"));
            member_rows.push(EnsembleMember {
                stage: stage.clone(),
                test_error: error,
            });
            ctx.write_output(&format!("member{i}.safetensors"), &bytes)?;
            members.push(model);
        }
        let mut wrong = 0;
        for start in (0..n).step_by(500) {
            let batch: Vec<usize> = (start..(start + 500).min(n)).collect();
            let x = input_for(&dev, &members[0], &data.test_images, &batch, None);
            wrong += ensemble_predict(&members, &x)
                .iter()
                .zip(&batch)
                .filter(|(p, &i)| **p != data.test_labels[i])
                .count();
            // Tensors built from our own buffers are never reused from dfdx's cache: without
            // this the cache grows by every batch (an OOM on the full test set).
            dev.empty_cache();
        }
        let ensemble_error = 100.0 * wrong as f64 / n.max(1) as f64;
        ctx.log(format!(
            "ensemble of {}: test error {ensemble_error:.2} % on {n}",
            members.len()
        ));
        ctx.set_metric("test_error", json!(ensemble_error));
        let result = EnsembleResult {
            members: member_rows,
            test_error: ensemble_error,
            n_test: n,
        };
        ctx.write_output("ensemble.json", &json_bytes(&result)?)?;
        Ok(Finished::Done)
    }
}
