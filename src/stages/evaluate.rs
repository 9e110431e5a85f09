//! Stage `evaluate`: train and test error of a trained model in evaluation mode (no dropout,
//! no dequantisation noise).
//!
//! Paper: Table 2's logit columns (C1, C2: % error, test / train) and the CNN baseline; for
//! an iCE model also the nuisance columns as the *jointly trained adversary* sees them
//! (paper-notes § 3: measurement (a); the fresh probe is the `probe` stage).
//! Inputs: `weights.safetensors` (any model: it is rebuilt from the file alone), the four
//! MNIST arrays, and optionally `adversary.safetensors` (iCE's nuisance classifier).
//! Outputs: `evaluation.json` ([`Evaluation`]: model, parameters, train_error, test_error,
//! n_train, n_test, and with an adversary `adversary: {train, test}` readouts: error %,
//! cross-entropy and the bound H(y) − CE on I(y; z_n) in bits) (errors in %).
//! Params: `train_limit`, `test_limit` (0 = all).
//!
//! Claims: C1, C2
//! Modules: data, nn, outputs

use anyhow::Result;
use serde::Deserialize;
use serde_json::json;

use crate::data::Arrays;
use crate::engine::{Finished, Limit, StageContext, StageKind, TypedParams};
use crate::nn::model::Model;
use crate::nn::nuisance::{latent_views, readout_raw, Mlp};
use crate::nn::train::error_rate;
use crate::nn::{device, HasParams};
use crate::outputs::{json_bytes, AdversaryReadouts, Evaluation};

pub struct Evaluate;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvaluateParams {
    train_limit: Limit,
    test_limit: Limit,
}

impl TypedParams for EvaluateParams {}

impl StageKind for Evaluate {
    type Params = EvaluateParams;

    fn kind(&self) -> &str {
        "evaluate"
    }

    fn code_fingerprint(&self) -> String {
        super::code_fingerprint("evaluate")
    }

    fn run(&self, ctx: &mut StageContext, params: &EvaluateParams) -> Result<Finished> {
        let dev = device();
        let model = Model::from_safetensors(&dev, &ctx.input_named("weights.safetensors")?)?;
        let data = Arrays::read(|name| ctx.input_named(name))?;
        let n_train = params.train_limit.of(data.train_labels.len());
        let n_test = params.test_limit.of(data.test_labels.len());
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
        let adversary = match (ctx.optional_input_named("adversary.safetensors")?, &model) {
            (Some(bytes), Model::RevNet(flow)) => {
                let mlp = Mlp::from_safetensors(&dev, "adversary", &bytes)?;
                let readout = |images: &[u8], labels: &[u8], n: usize| {
                    let indices: Vec<usize> = (0..n).collect();
                    let (_, nuisance) = latent_views(&dev, flow, images, labels, &indices);
                    readout_raw(&dev, &mlp, &nuisance)
                };
                let test = readout(&data.test_images, &data.test_labels, n_test);
                let train = readout(&data.train_images, &data.train_labels, n_train);
                ctx.log(format!(
                    "adversary on z_n: test error {:.2} %, train error {:.2} %, I(y; z_n) ≥ {:.3} bits (test)",
                    test.error, train.error, test.information_bound_bits
                ));
                ctx.set_metric("adversary_test_error", json!(test.error));
                Some(AdversaryReadouts { train, test })
            }
            (Some(_), Model::Cnn(_)) => {
                anyhow::bail!("stage {}: an adversary input needs a fi-RevNet", ctx.name())
            }
            (None, _) => None,
        };
        let result = Evaluation {
            model: model.config(),
            parameters: model.param_count(),
            test_error,
            train_error,
            n_test,
            n_train,
            adversary,
        };
        ctx.set_metric("test_error", json!(test_error));
        ctx.write_output("evaluation.json", &json_bytes(&result)?)?;
        Ok(Finished::Done)
    }
}
