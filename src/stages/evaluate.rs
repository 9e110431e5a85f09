//! Stage `evaluate`: train and test error of a trained model in evaluation mode (no dropout,
//! no dequantisation noise).
//!
//! Paper: Table 2's logit columns (C1, C2: % error, test / train) and the CNN baseline.
//! Inputs: `weights.safetensors` (any model: it is rebuilt from the file alone) and the four
//! MNIST arrays. Outputs: `evaluation.json` {model, parameters, train_error, test_error,
//! n_train, n_test} (errors in %).
//!
//! Modules: data, nn

use anyhow::Result;
use serde_json::json;

use crate::data::Arrays;
use crate::engine::{Finished, StageContext, StageKind};
use crate::nn::model::Model;
use crate::nn::train::error_rate;
use crate::nn::{device, HasParams};

pub struct Evaluate;

impl StageKind for Evaluate {
    fn kind(&self) -> &str {
        "evaluate"
    }

    fn code_fingerprint(&self) -> String {
        super::code_fingerprint("evaluate")
    }

    fn run(&self, ctx: &mut StageContext) -> Result<Finished> {
        let dev = device();
        let model = Model::from_safetensors(&dev, &ctx.input_named("weights.safetensors")?)?;
        let data = Arrays::read(|name| ctx.input_named(name))?;
        let limit = |n: usize, l: i64| if l <= 0 { n } else { n.min(l as usize) };
        let n_train = limit(data.train_labels.len(), ctx.param_int("train_limit")?);
        let n_test = limit(data.test_labels.len(), ctx.param_int("test_limit")?);
        let test_error = error_rate(
            &dev,
            &model,
            &data.test_images,
            &data.test_labels,
            n_test,
            500,
        );
        let train_error = error_rate(
            &dev,
            &model,
            &data.train_images,
            &data.train_labels,
            n_train,
            500,
        );
        ctx.log(format!(
            "test error {test_error:.2} % on {n_test}, train error {train_error:.2} % on {n_train}"
        ));
        let result = json!({
            "model": model.config(),
            "parameters": model.param_count(),
            "test_error": test_error,
            "train_error": train_error,
            "n_test": n_test,
            "n_train": n_train,
        });
        ctx.set_metric("test_error", json!(test_error));
        ctx.write_output("evaluation.json", &serde_json::to_vec_pretty(&result)?)?;
        Ok(Finished::Done)
    }
}
