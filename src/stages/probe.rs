//! Stage `probe`: how much label information is left in z_n (and, for comparison, in z_s),
//! measured by a *fresh* classifier trained to convergence on the frozen latents.
//!
//! Paper: Table 2's nuisance columns (claims C3: CE model ≈ 0.34 % test error from z_n; C4:
//! iCE model ≈ 27.7 %) and Fig. 5's information diagram (measured bounds on I(y; z_s) and
//! I(y; z_n), on clean test data and on metamers). Paper-notes § 3: an adversary trained
//! jointly with the flow can be fooled while the information stays, so this probe (a new MLP
//! of the adversary's shape, its own seed) is the honest bound; `evaluate` reports the
//! adversary beside it.
//! Protocol: latents of the first `train_limit` training images (0 = all) in evaluation mode;
//! a seeded `validation` of them is held out to choose the epoch (lowest validation CE); the
//! test set is only scored. Inputs are standardised per dimension (an invertible map).
//! On metamers (when `metamers.json` is an input): the latent of x_met is (z_s(A), z_n(B)) by
//! construction (claim C5, checked there to 1e-4), and its label y is what the oracle sees in
//! it; the probes trained on clean data score it, which bounds I(y; view) under that shift.
//! Inputs: a fi-RevNet's `weights.safetensors`, the four MNIST arrays, optionally
//! `metamers.json`. Outputs: `probe.json` (per view: train / validation / test readouts:
//! error %, cross-entropy and H(y) − CE in bits; per-epoch history; the metamer readouts),
//! `curves.svg` (validation error per epoch).
//! Expected (paper): CE nuisance ≈ 0.34 % test error, iCE ≈ 27.7 %; on `cpu`, the iCE probe
//! error should be ≥ 10× the CE one if iCE empties z_n at this scale (issue 4 measured that
//! an independent PyTorch run did *not* manage it: probe ≈ 3.3 %).
//!
//! Params: the probe's ([`ProbeParams`]) and `test_limit` (0 = all).
//!
//! Claims: C3, C4
//! Modules: data, nn, outputs, report/figures, training

use std::collections::BTreeMap;

use anyhow::{bail, Result};
use rand::seq::SliceRandom;
use serde::Deserialize;

use crate::data::Arrays;
use crate::engine::{
    deserialize_params, split_prefixed, Finished, Limit, ParamError, Params, StageContext,
    StageKind, StageParams,
};
use crate::nn::model::Model;
use crate::nn::nuisance::{latent_views, train_probe, Features, Probe, ProbeSettings};
use crate::nn::{device, rng_for, Dev};
use crate::outputs::{json_bytes, parse_json, MetamerResult, ProbeResult, ProbeView};
use crate::report::figures::{line_plot, Series};
use crate::training::ProbeParams;

pub struct ProbeStage;

/// The probe's params and how many test examples it scores.
#[derive(Debug)]
pub struct ProbeStageParams {
    probe: ProbeParams,
    test_limit: Limit,
}

/// The stage's own params, `test_*` (the rest are the probe's).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TestParams {
    limit: Limit,
}

impl StageParams for ProbeStageParams {
    fn from_params(params: &Params) -> Result<Self, ParamError> {
        let (test, probe) = split_prefixed(params, "test_");
        let test: TestParams = deserialize_params(&test)
            .map_err(|e| ParamError::new(format!("test_{}", e.param), e.message))?;
        Ok(ProbeStageParams {
            probe: ProbeParams::from_params(&probe)?,
            test_limit: test.limit,
        })
    }
}

/// The examples `rows` of a feature table.
fn subset(features: &Features, rows: &[usize]) -> Features {
    let mut out = Features::new(features.dims);
    for &i in rows {
        out.values.extend_from_slice(features.row(i));
        out.labels.push(features.labels[i]);
    }
    out
}

/// Metamer latents from the test latents of their sources, labelled by the oracle.
fn metamer_views(
    dev: &Dev,
    model: &crate::nn::flow::FiRevNet,
    data: &Arrays,
    metamers: &MetamerResult,
) -> Result<(Features, Features)> {
    let (sources, nuisances) = (&metamers.logit_sources, &metamers.nuisance_sources);
    let oracle = metamers.oracle_labels.clone();
    if sources.len() != nuisances.len() || sources.len() != oracle.len() {
        bail!("metamers.json: logit_sources, nuisance_sources and oracle_labels differ in length");
    }
    if let Some(&bad) = sources
        .iter()
        .chain(nuisances)
        .find(|&&i| i >= data.test_labels.len())
    {
        bail!("metamers.json: test index {bad} is out of range");
    }
    let (logits_a, _) = latent_views(dev, model, &data.test_images, &data.test_labels, sources);
    let (_, nuisance_b) = latent_views(dev, model, &data.test_images, &data.test_labels, nuisances);
    let relabel = |mut f: Features| {
        f.labels = oracle.clone();
        f
    };
    Ok((relabel(logits_a), relabel(nuisance_b)))
}

/// Trains one probe and scores it everywhere.
fn probe_view(
    ctx: &mut StageContext,
    dev: &Dev,
    view: &str,
    sets: [&Features; 3],
    metamers: Option<&Features>,
    settings: &ProbeSettings,
) -> Result<(Probe, ProbeView)> {
    let [train, validation, test] = sets;
    let bar = ctx.progress(settings.epochs as u64, &format!("probe on {view}"));
    let probe = train_probe(dev, train, validation, 10, settings, &|done, _| {
        bar.set_position(done as u64)
    })?;
    bar.finish_and_clear();
    let (train_r, validation_r, test_r) = (
        probe.readout(dev, train),
        probe.readout(dev, validation),
        probe.readout(dev, test),
    );
    let metamer_r = metamers.map(|m| probe.readout(dev, m));
    ctx.log(format!(
        "probe on {view} ({} dims): test error {:.2} %, train error {:.2} %, I(y; {view}) ≥ {:.3} of {:.3} bits (test); epoch {} of {} kept",
        train.dims,
        test_r.error,
        train_r.error,
        test_r.information_bound_bits,
        test_r.label_entropy_bits,
        probe.best_epoch,
        settings.epochs
    ));
    let view = ProbeView {
        dims: train.dims,
        train: train_r,
        validation: validation_r,
        test: test_r,
        metamers: metamer_r,
        best_epoch: probe.best_epoch,
        history: probe.history.clone(),
    };
    Ok((probe, view))
}

impl StageKind for ProbeStage {
    type Params = ProbeStageParams;

    fn kind(&self) -> &str {
        "probe"
    }

    fn code_fingerprint(&self) -> String {
        super::code_fingerprint("probe")
    }

    fn run(&self, ctx: &mut StageContext, params: &ProbeStageParams) -> Result<Finished> {
        let dev = device();
        let Model::RevNet(model) =
            Model::from_safetensors(&dev, &ctx.input_named("weights.safetensors")?)?
        else {
            bail!(
                "stage {}: the probe reads latents of a fi-RevNet, the weights are of a CNN",
                ctx.name()
            );
        };
        let data = Arrays::read(|name| ctx.input_named(name))?;
        let n_train = params.probe.n_train(data.train_labels.len())?;
        let n_test = params.test_limit.of(data.test_labels.len());
        let n_validation = params.probe.validation;
        let settings = params.probe.settings(ctx.seed());

        let start = std::time::Instant::now();
        let train_indices: Vec<usize> = (0..n_train).collect();
        let test_indices: Vec<usize> = (0..n_test).collect();
        let (train_s, train_n) = latent_views(
            &dev,
            &model,
            &data.train_images,
            &data.train_labels,
            &train_indices,
        );
        let (test_s, test_n) = latent_views(
            &dev,
            &model,
            &data.test_images,
            &data.test_labels,
            &test_indices,
        );
        let metamers = match ctx.optional_input_named("metamers.json")? {
            Some(bytes) => {
                let result: MetamerResult = parse_json(&bytes, "metamers.json")?;
                Some(metamer_views(&dev, &model, &data, &result)?)
            }
            None => None,
        };
        ctx.log(format!(
            "latents of {n_train} training and {n_test} test images in {:.0} s",
            start.elapsed().as_secs_f64()
        ));

        let mut order = train_indices.clone();
        order.shuffle(&mut rng_for(settings.seed, "probe-validation"));
        let (validation_rows, fit_rows) = order.split_at(n_validation);
        let mut views = BTreeMap::new();
        let mut curves = Vec::new();
        for (view, train_all, test, metamer) in [
            ("z_n", &train_n, &test_n, metamers.as_ref().map(|m| &m.1)),
            ("z_s", &train_s, &test_s, metamers.as_ref().map(|m| &m.0)),
        ] {
            let (fit, validation) = (
                subset(train_all, fit_rows),
                subset(train_all, validation_rows),
            );
            let (probe, view_result) = probe_view(
                ctx,
                &dev,
                view,
                [&fit, &validation, test],
                metamer,
                &settings,
            )?;
            curves.push(Series {
                name: format!("{view} (validation)"),
                points: probe
                    .history
                    .iter()
                    .map(|e| (e.epoch as f64, e.validation.error))
                    .collect(),
            });
            ctx.set_metric(
                &format!("{view}_test_error"),
                serde_json::json!(view_result.test.error),
            );
            views.insert(view.to_string(), view_result);
        }
        let result = ProbeResult {
            settings,
            n_fit: fit_rows.len(),
            n_validation,
            n_test,
            metamers: metamers.as_ref().map(|m| m.0.len()),
            views,
        };
        ctx.write_output("probe.json", &json_bytes(&result)?)?;
        ctx.write_output(
            "curves.svg",
            line_plot(
                &format!("{}: fresh probes", ctx.name()),
                "epoch",
                "validation error (%)",
                &curves,
            )
            .as_bytes(),
        )?;
        Ok(Finished::Done)
    }
}
