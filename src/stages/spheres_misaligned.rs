//! Stage `spheres_misaligned`: the paper's mis-aligned classifier on the spheres, one that
//! cannot read the last coordinate x_d.
//!
//! Paper: § 3, the spheres example of a classifier whose invariance is not aligned with the
//! task (the paper's Example 6); claim C9 (it drops to chance). The classifier
//! is a small MLP (the `probe` stage's trainer: ReLU MLP on standardised inputs, Adam, the
//! epoch with the lowest validation cross-entropy kept) trained on the training points with
//! x_d set to 0. Why an MLP and not the vector fi-RevNet: the point is what the classifier
//! can read, not its architecture; zeroing x_d makes it exactly invariant to x_d by
//! construction, which holds for any model on that input, and an MLP is the cheapest model
//! that separates the spheres (a fi-RevNet with x_d zeroed would no longer be bijective
//! anyway). Test: its clean accuracy; then every inner test point moves onto the outer sphere
//! along x_d, x_d ← sign(x_d)·√(R₂² − Σ_{i<d} x_i²) (sign(0) = +), so it now truly belongs to
//! class 1; accuracy on the moved set (the moved points and the outer test points) and on the
//! moved points alone. A control MLP with the same settings that reads every coordinate is
//! scored on the same sets.
//! Inputs: `summary.json`, `train_x.npy`, `train_y.npy`, `test_x.npy`, `test_y.npy` of
//! `spheres`. Outputs: `misaligned.json` (`outputs::MisalignedResult`).
//! Expected (paper): clean accuracy ≈ 100 %, moved set ≈ 50 % (chance), moved points ≈ 0 %;
//! the control stays ≈ 100 % on every set. Measured on `cpu` (seed 0; width 128, 3 layers, 5
//! epochs on 18 000 points, 4.4 s): clean 100.00 %, moved set 50.00 %, moved points 0.00 %
//! (5000 moved, radii exact to 5e-8); control 100.00 % on all three.
//!
//! Params: the MLP's and its training's (`crate::training::ProbeParams`: `width`, `layers`,
//! `dropout`, `epochs`, `batch_size`, `lr`, `train_limit`, `validation`) and `test_limit`.
//!
//! Claims: C9
//! Modules: data, nn, outputs, training

use anyhow::{ensure, Result};
use rand::seq::SliceRandom;
use serde::Deserialize;
use serde_json::json;

use crate::data::spheres::{SpherePoints, INNER, OUTER};
use crate::engine::{
    deserialize_params, split_prefixed, Finished, Limit, ParamError, Params, StageContext,
    StageKind, StageParams,
};
use crate::nn::device;
use crate::nn::nuisance::{train_probe, Features, MlpConfig, Probe};
use crate::outputs::{json_bytes, parse_json, AlignedControl, MisalignedResult, SpheresSummary};
use crate::training::ProbeParams;

pub struct SpheresMisaligned;

#[derive(Debug)]
pub struct MisalignedParams {
    mlp: ProbeParams,
    test_limit: Limit,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TestParams {
    limit: Limit,
}

impl StageParams for MisalignedParams {
    fn from_params(params: &Params) -> Result<Self, ParamError> {
        let (test, mlp) = split_prefixed(params, "test_");
        let test: TestParams = deserialize_params(&test)
            .map_err(|e| ParamError::new(format!("test_{}", e.param), e.message))?;
        let mlp = ProbeParams::from_params(&mlp)?;
        Ok(MisalignedParams {
            mlp,
            test_limit: test.limit,
        })
    }
}

/// Points `indices` of a set as features, with coordinate `blind` (if any) set to 0.
fn features(set: &SpherePoints, indices: &[usize], blind: Option<usize>) -> Features {
    let mut out = Features::new(set.d);
    for &i in indices {
        let start = out.values.len();
        out.values.extend_from_slice(set.row(i));
        if let Some(k) = blind {
            out.values[start + k] = 0.0;
        }
        out.labels.push(set.y[i]);
    }
    out
}

/// Accuracy (%) of a trained classifier on a feature table.
fn accuracy(dev: &crate::nn::Dev, probe: &Probe, set: &Features) -> f64 {
    100.0 - probe.readout(dev, set).error
}

impl StageKind for SpheresMisaligned {
    type Params = MisalignedParams;

    fn kind(&self) -> &str {
        "spheres_misaligned"
    }

    fn code_fingerprint(&self) -> String {
        super::code_fingerprint("spheres_misaligned")
    }

    fn run(&self, ctx: &mut StageContext, params: &MisalignedParams) -> Result<Finished> {
        let dev = device();
        let seed = ctx.seed();
        let summary: SpheresSummary =
            parse_json(&ctx.input_named("summary.json")?, "summary.json")?;
        let train = SpherePoints::from_npy(
            &ctx.input_named("train_x.npy")?,
            &ctx.input_named("train_y.npy")?,
        )?;
        let test = SpherePoints::from_npy(
            &ctx.input_named("test_x.npy")?,
            &ctx.input_named("test_y.npy")?,
        )?;
        let d = summary.d;
        ensure!(
            train.d == d && test.d == d,
            "arrays and summary.json disagree on d"
        );
        let blind = d - 1;
        let n_train = params.mlp.n_train(train.len())?;
        let n_test = params.test_limit.of(test.len());
        let settings = params.mlp.settings(seed);

        // The moved set: inner test points pushed onto the outer sphere along x_d.
        let r2 = summary.r_outer;
        let mut moved = SpherePoints {
            d,
            x: Vec::new(),
            y: Vec::new(),
        };
        let mut moved_only = moved.clone();
        let mut radius_error = 0.0f64;
        for i in 0..n_test {
            let mut x = test.row(i).to_vec();
            if test.y[i] == INNER {
                let rest: f64 = x[..blind].iter().map(|&v| v as f64 * v as f64).sum();
                let sign = if x[blind] < 0.0 { -1.0 } else { 1.0 };
                x[blind] = (sign * (r2 * r2 - rest).max(0.0).sqrt()) as f32;
                let r = crate::data::spheres::norm(&x);
                radius_error = radius_error.max((r - r2).abs() / r2);
                moved_only.x.extend_from_slice(&x);
                moved_only.y.push(OUTER);
            }
            moved.x.extend_from_slice(&x);
            moved.y.push(OUTER);
        }
        let n_moved = moved_only.len();
        let all = |s: &SpherePoints| (0..s.len()).collect::<Vec<usize>>();

        let mut order: Vec<usize> = (0..n_train).collect();
        order.shuffle(&mut crate::nn::rng_for(
            seed,
            "spheres-misaligned-validation",
        ));
        let (validation_rows, fit_rows) = order.split_at(params.mlp.validation);
        let test_rows: Vec<usize> = (0..n_test).collect();
        let mut results = Vec::new();
        for (name, blind) in [("misaligned", Some(blind)), ("aligned", None)] {
            let fit = features(&train, fit_rows, blind);
            let validation = features(&train, validation_rows, blind);
            let bar = ctx.progress(settings.epochs as u64, &format!("{name} classifier"));
            let probe = train_probe(&dev, &fit, &validation, 2, &settings, &|done, _| {
                bar.set_position(done as u64)
            })?;
            bar.finish_and_clear();
            let clean = accuracy(&dev, &probe, &features(&test, &test_rows, blind));
            let moved_set = accuracy(&dev, &probe, &features(&moved, &all(&moved), blind));
            let moved_points = if n_moved > 0 {
                accuracy(
                    &dev,
                    &probe,
                    &features(&moved_only, &all(&moved_only), blind),
                )
            } else {
                0.0
            };
            ctx.log(format!(
                "{name} classifier{}: clean accuracy {clean:.2} %, moved set {moved_set:.2} %, moved points alone {moved_points:.2} % (epoch {} of {})",
                if blind.is_some() { " (x_d set to 0)" } else { " (reads every coordinate)" },
                probe.best_epoch,
                settings.epochs
            ));
            results.push((probe.best_epoch, clean, moved_set, moved_points, probe));
        }
        let (aligned, misaligned) = (results.pop().expect("two"), results.pop().expect("two"));
        let result = MisalignedResult {
            classifier: MlpConfig {
                inputs: d,
                width: settings.width,
                layers: settings.layers,
                dropout: settings.dropout,
                classes: 2,
            },
            data: summary,
            settings,
            ignored_coordinate: blind,
            n_fit: fit_rows.len(),
            n_validation: validation_rows.len(),
            n_test,
            best_epoch: misaligned.0,
            clean_accuracy: misaligned.1,
            n_moved,
            moved_max_relative_radius_error: radius_error,
            moved_set_accuracy: misaligned.2,
            moved_points_accuracy: misaligned.3,
            aligned: AlignedControl {
                best_epoch: aligned.0,
                clean_accuracy: aligned.1,
                moved_set_accuracy: aligned.2,
                moved_points_accuracy: aligned.3,
            },
        };
        ctx.log(format!(
            "{n_moved} inner test points moved onto the outer sphere (radius exact to {radius_error:.1e})"
        ));
        ctx.write_output("misaligned.json", &json_bytes(&result)?)?;
        ctx.set_metric("clean_accuracy", json!(result.clean_accuracy));
        ctx.set_metric("moved_set_accuracy", json!(result.moved_set_accuracy));
        Ok(Finished::Done)
    }
}
