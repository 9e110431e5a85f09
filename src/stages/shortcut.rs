//! Stage `shortcut`: how much a model trained on shiftMNIST relies on the shortcut.
//!
//! Paper: v4's shiftMNIST section, claim C10 (CE models take the shortcut and fail when it
//! moves; iCE much less). Our protocol (paper-notes § 5): the error of one trained model on
//! the training images (shortcut present), on held-out test images with their own label's
//! shortcut (`present`), with another class's (`broken`) and with none (`removed`), and how
//! often its prediction on a broken image is the class the shortcut names (`follows_shortcut`:
//! 100 % for a model that reads only the shortcut, about 0 % for one that ignores it).
//! Inputs: `weights.safetensors` (a `train` stage on a `shift_mnist` variant) and the
//! variant's arrays (`train_images.npy`, `train_labels.npy`, `test_images.npy`,
//! `test_labels.npy`, `test_shortcut_labels.npy`, `present_images.npy`, `removed_images.npy`).
//! Outputs: `shortcut.json` ([`ShortcutResult`]; errors in %).
//! Expected: a model that took the shortcut has a low present error and a broken error far
//! above its removed error; C10 asks the iCE fi-RevNet's broken error to be at most half the
//! CE fi-RevNet's.
//! Params: `train_limit`, `test_limit` (0 = all).
//!
//! Claims: C10
//! Modules: data, nn, outputs

use anyhow::{ensure, Context, Result};
use dfdx::tensor::Cache;
use ndarray::{Array1, Array3};
use ndarray_npy::ReadNpyExt;
use serde::Deserialize;
use serde_json::json;

use crate::data::Arrays;
use crate::engine::{Finished, Limit, StageContext, StageKind, TypedParams};
use crate::nn::model::Model;
use crate::nn::train::input_for;
use crate::nn::{device, Dev, HasParams};
use crate::outputs::{json_bytes, ShortcutResult};

pub struct ShortcutStage;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShortcutParams {
    train_limit: Limit,
    test_limit: Limit,
}

impl TypedParams for ShortcutParams {}

/// Predictions of `model` on the first `n` images, in batches of 500.
fn predictions(dev: &Dev, model: &Model, images: &[u8], n: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(n);
    for start in (0..n).step_by(500) {
        let batch: Vec<usize> = (start..(start + 500).min(n)).collect();
        out.extend(model.predict(input_for(dev, model, images, &batch, None)));
        dev.empty_cache();
    }
    out
}

/// % of positions where `predicted` differs from `reference` (equals it, with `equal`).
fn percent_where(predicted: &[u8], reference: &[u8], equal: bool) -> f64 {
    let hits = predicted
        .iter()
        .zip(reference)
        .filter(|(p, r)| (p == r) == equal)
        .count();
    100.0 * hits as f64 / predicted.len().max(1) as f64
}

impl StageKind for ShortcutStage {
    type Params = ShortcutParams;

    fn kind(&self) -> &str {
        "shortcut"
    }

    fn code_fingerprint(&self) -> String {
        super::code_fingerprint("shortcut")
    }

    fn run(&self, ctx: &mut StageContext, params: &ShortcutParams) -> Result<Finished> {
        let dev = device();
        let model = Model::from_safetensors(&dev, &ctx.input_named("weights.safetensors")?)?;
        let data = Arrays::read(|name| ctx.input_named(name))?;
        let images = |name: &str| -> Result<Vec<u8>> {
            let array = Array3::<u8>::read_npy(&ctx.input_named(name)?[..])
                .with_context(|| format!("decoding {name}"))?;
            ensure!(
                array.len() == data.test_images.len(),
                "{name} has {} pixels, the test set {}",
                array.len(),
                data.test_images.len()
            );
            Ok(array.iter().copied().collect())
        };
        let present = images("present_images.npy")?;
        let removed = images("removed_images.npy")?;
        let shortcut_labels =
            Array1::<u8>::read_npy(&ctx.input_named("test_shortcut_labels.npy")?[..])
                .context("decoding test_shortcut_labels.npy")?
                .to_vec();
        ensure!(
            shortcut_labels.len() == data.test_labels.len(),
            "test_shortcut_labels.npy has {} labels, the test set {}",
            shortcut_labels.len(),
            data.test_labels.len()
        );

        let n_train = params.train_limit.of(data.train_labels.len());
        let n_test = params.test_limit.of(data.test_labels.len());
        let train_labels = &data.train_labels[..n_train];
        let test_labels = &data.test_labels[..n_test];
        let on_train = predictions(&dev, &model, &data.train_images, n_train);
        let on_present = predictions(&dev, &model, &present, n_test);
        let on_broken = predictions(&dev, &model, &data.test_images, n_test);
        let on_removed = predictions(&dev, &model, &removed, n_test);

        let result = ShortcutResult {
            model: model.config(),
            parameters: model.param_count(),
            n_train,
            n_test,
            train_error: percent_where(&on_train, train_labels, false),
            present_error: percent_where(&on_present, test_labels, false),
            broken_error: percent_where(&on_broken, test_labels, false),
            removed_error: percent_where(&on_removed, test_labels, false),
            follows_shortcut: percent_where(&on_broken, &shortcut_labels[..n_test], true),
        };
        ctx.log(format!(
            "error %: train {:.2} (shortcut present), test present {:.2}, broken {:.2}, removed {:.2}; \
             {:.1} % of broken test images predicted as the shortcut's class",
            result.train_error,
            result.present_error,
            result.broken_error,
            result.removed_error,
            result.follows_shortcut
        ));
        ctx.set_metric("broken_error", json!(result.broken_error));
        ctx.write_output("shortcut.json", &json_bytes(&result)?)?;
        Ok(Finished::Done)
    }
}
