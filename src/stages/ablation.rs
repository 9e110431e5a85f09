//! Stage `ablation`: which iCE settings, if any, empty z_n at the `cpu` scale, and what that
//! costs in accuracy: does iCE's accuracy cost come from the adversary or from the likelihood
//! term?
//!
//! Paper: § 4 and Table 2 (claims C2, C4). The issue that introduced iCE here measured that an
//! independent PyTorch run at this scale did *not* empty z_n with either the clipped (`paper`)
//! or the shuffled-label (`confusion`) term, so instead of tuning one setting toward the
//! paper's number we sweep them. The cells: CE; CE + MLE (iCE with w_adv = 0, when
//! `grid_ce_mle`); and iCE over `grid_adversary` × `grid_w_adv` × `grid_inner_steps` ×
//! `grid_w_mle`. Each cell is scored after every epoch in `grid_epochs` (one training run per
//! cell, read at several epochs: the learning rate is constant, so the state after epoch e is
//! exactly that of an e-epoch run). Every score is the logit test error and a *fresh probe* on
//! z_n (the honest bound; the jointly trained adversary's own error is shown beside it).
//! Expected, if the paper's reading holds at this scale: CE + MLE as accurate as CE, and iCE's
//! accuracy cost growing with w_adv, not with w_mle.
//! Only in the `ablation` profile (`profiles = ["ablation", "smoke"]` in pipeline.toml).
//! Inputs: the four MNIST arrays. Params: the `train` stage's model and training params (the
//! iCE ones are the base every cell overrides), the grids, and the probe's params.
//! Outputs: `ablation.json` ([`crate::ablation::AblationResult`], one row per cell and epoch),
//! `ablation.svg` (logit test error against fresh-probe z_n test error, one colour per
//! objective and adversary variant).
//! Checkpoints: each cell's trainer after every epoch, and the finished rows, so a killed run
//! resumes where it stopped.
//!
//! Params: the `train` stage's ([`TrainParams`], `objective = "ice"`: the base every iCE cell
//! overrides), `grid_*` ([`GridParams`]) and `probe_*` ([`ProbeParams`]).
//!
//! Claims: none
//! Modules: ablation, data, nn, outputs, report/figures, training

use anyhow::{bail, Result};
use serde::Deserialize;

use crate::ablation::{variant_name, AblationResult, AblationRow as Row, CellObjective};
use crate::data::Arrays;
use crate::engine::{
    at_least, deserialize_params, non_negative, split_prefixed, Finished, ParamError, Params,
    StageContext, StageKind, StageParams, TypedParams,
};
use crate::nn::ice::{AdversaryVariant, IceSettings};
use crate::nn::model::Model;
use crate::nn::nuisance::{latent_views, readout_raw, train_probe, Features, ProbeSettings};
use crate::nn::train::{TrainSettings, Trainer};
use crate::nn::{device, rng_for, Dev};
use crate::outputs::json_bytes;
use crate::report::figures::{scatter_plot, Series};
use crate::training::{Objective, ProbeParams, TrainParams};

pub struct Ablation;

/// The sweep: every combination of the first four lists is one iCE cell, beside one CE cell
/// and (with `ce_mle`) one CE + MLE cell; each is scored after every epoch in `epochs`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GridParams {
    adversary: Vec<AdversaryVariant>,
    w_adv: Vec<f64>,
    inner_steps: Vec<usize>,
    w_mle: Vec<f64>,
    /// Also train CE + MLE (iCE with w_adv = 0 and the base's w_mle and inner steps): the
    /// baseline that separates the likelihood term's cost from the adversary's.
    ce_mle: bool,
    epochs: Vec<usize>,
}

impl TypedParams for GridParams {
    fn check(&self) -> Result<(), ParamError> {
        for (name, len) in [
            ("adversary", self.adversary.len()),
            ("w_adv", self.w_adv.len()),
            ("inner_steps", self.inner_steps.len()),
            ("w_mle", self.w_mle.len()),
            ("epochs", self.epochs.len()),
        ] {
            if len == 0 {
                return Err(ParamError::new(name, "must be a non-empty list"));
            }
        }
        for (i, &w) in self.w_adv.iter().enumerate() {
            non_negative(&format!("w_adv[{i}]"), w)?;
        }
        for (i, &w) in self.w_mle.iter().enumerate() {
            non_negative(&format!("w_mle[{i}]"), w)?;
        }
        for (i, &k) in self.inner_steps.iter().enumerate() {
            at_least(&format!("inner_steps[{i}]"), k, 1)?;
        }
        for (i, &e) in self.epochs.iter().enumerate() {
            at_least(&format!("epochs[{i}]"), e, 1)?;
        }
        Ok(())
    }
}

#[derive(Debug)]
pub struct AblationParams {
    base: TrainParams,
    grid: GridParams,
    probe: ProbeParams,
}

impl StageParams for AblationParams {
    fn from_params(params: &Params) -> Result<Self, ParamError> {
        let prefixed = |prefix: &'static str| {
            move |e: ParamError| ParamError::new(format!("{prefix}{}", e.param), e.message)
        };
        let (grid, rest) = split_prefixed(params, "grid_");
        let (probe, base) = split_prefixed(&rest, "probe_");
        let base = TrainParams::from_params(&base)?;
        if base.objective != Objective::Ice {
            return Err(ParamError::new(
                "objective",
                "must be \"ice\": the base every iCE cell of the sweep overrides",
            ));
        }
        let grid: GridParams = deserialize_params(&grid).map_err(prefixed("grid_"))?;
        grid.check().map_err(prefixed("grid_"))?;
        let probe: ProbeParams = deserialize_params(&probe).map_err(prefixed("probe_"))?;
        probe.check().map_err(prefixed("probe_"))?;
        Ok(AblationParams { base, grid, probe })
    }
}

/// The probe's z_n readouts of a trained flow: (test, train) error and the test bound.
fn probe_nuisance(
    dev: &Dev,
    trainer: &Trainer,
    data: &Arrays,
    fit: &[usize],
    validation: &[usize],
    n_test: usize,
    settings: &ProbeSettings,
) -> Result<(f64, f64, f64, Option<f64>)> {
    let Model::RevNet(flow) = &trainer.model else {
        bail!("the ablation trains fi-RevNets");
    };
    let views = |images: &[u8], labels: &[u8], rows: &[usize]| -> Features {
        latent_views(dev, flow, images, labels, rows).1
    };
    let fit_n = views(&data.train_images, &data.train_labels, fit);
    let validation_n = views(&data.train_images, &data.train_labels, validation);
    let test_indices: Vec<usize> = (0..n_test).collect();
    let test_n = views(&data.test_images, &data.test_labels, &test_indices);
    let probe = train_probe(dev, &fit_n, &validation_n, 10, settings, &|_, _| {})?;
    let test = probe.readout(dev, &test_n);
    let train = probe.readout(dev, &fit_n);
    let adversary = trainer
        .ice
        .as_ref()
        .map(|ice| readout_raw(dev, &ice.adversary, &test_n).error);
    Ok((
        test.error,
        train.error,
        test.information_bound_bits,
        adversary,
    ))
}

impl StageKind for Ablation {
    type Params = AblationParams;

    fn kind(&self) -> &str {
        "ablation"
    }

    fn code_fingerprint(&self) -> String {
        super::code_fingerprint("ablation")
    }

    fn run(&self, ctx: &mut StageContext, params: &AblationParams) -> Result<Finished> {
        let dev = device();
        let data = Arrays::read(|name| ctx.input_named(name))?;
        let config = params.base.model_config(ctx.seed());
        let base = params.base.train_settings(ctx.seed());
        let base_ice = params.base.ice_settings();
        let mut epochs = params.grid.epochs.clone();
        epochs.sort_unstable();
        epochs.dedup();
        let last_epoch = *epochs.last().expect("non-empty list");

        // The cells: CE first, then CE + MLE, then iCE over the grid.
        let mut cells: Vec<(CellObjective, Option<IceSettings>)> = vec![(CellObjective::Ce, None)];
        if params.grid.ce_mle {
            cells.push((
                CellObjective::CeMle,
                Some(IceSettings {
                    w_adv: 0.0,
                    ..base_ice.clone()
                }),
            ));
        }
        for &variant in &params.grid.adversary {
            for &w_adv in &params.grid.w_adv {
                for &inner_steps in &params.grid.inner_steps {
                    for &w_mle in &params.grid.w_mle {
                        cells.push((
                            CellObjective::Ice,
                            Some(IceSettings {
                                variant,
                                w_adv: w_adv as f32,
                                inner_steps,
                                w_mle: w_mle as f32,
                                ..base_ice.clone()
                            }),
                        ));
                    }
                }
            }
        }

        let probe_settings = params.probe.settings(ctx.seed());
        let n_probe = params.probe.n_train(data.train_labels.len())?;
        let n_validation = params.probe.validation;
        let mut order: Vec<usize> = (0..n_probe).collect();
        rand::seq::SliceRandom::shuffle(
            &mut order[..],
            &mut rng_for(ctx.seed(), "probe-validation"),
        );
        let (validation, fit) = order.split_at(n_validation);
        let n_test = params.base.test_limit.of(data.test_labels.len());

        let mut rows: Vec<Row> = match ctx.checkpoint_load("rows")? {
            Some(bytes) => serde_json::from_slice(&bytes)?,
            None => Vec::new(),
        };
        let rows_per_cell = epochs.len();
        let done_cells = rows.len() / rows_per_cell;
        if done_cells > 0 {
            ctx.log(format!(
                "resumed after {done_cells} of {} cells",
                cells.len()
            ));
        }
        for (index, (objective, ice)) in cells.iter().enumerate().skip(done_cells) {
            let objective = *objective;
            let name = format!("cell{index}");
            let settings = TrainSettings {
                epochs: last_epoch,
                ice: ice.clone(),
                ..base.clone()
            };
            let model = Model::new(&dev, &config, &mut rng_for(settings.seed, "init"));
            let mut trainer = Trainer::new(&dev, model, settings, &data);
            if let Some(bytes) = ctx.checkpoint_load(&name)? {
                trainer.restore(&dev, &bytes)?;
            }
            let label = match (objective, ice) {
                (CellObjective::Ice, Some(i)) => format!(
                    "iCE {}, w_adv {}, {} inner steps, w_mle {}",
                    variant_name(i.variant),
                    i.w_adv,
                    i.inner_steps,
                    i.w_mle
                ),
                (CellObjective::CeMle, Some(i)) => format!("CE + MLE, w_mle {}", i.w_mle),
                _ => objective.label().to_string(),
            };
            // Rows are saved before the trainer, so a kill in between replays one epoch
            // (deterministically) and replaces its row instead of losing it.
            let rows_name = format!("{name}-rows");
            let mut cell_rows: Vec<Row> = match ctx.checkpoint_load(&rows_name)? {
                Some(bytes) => serde_json::from_slice(&bytes)?,
                None => Vec::new(),
            };
            while trainer.history.len() < last_epoch {
                let start = std::time::Instant::now();
                let m = trainer.run_epoch(&dev, &data, &|_| {});
                ctx.log(format!(
                    "{label}: epoch {} logit test error {:.2} % ({:.0} s)",
                    m.epoch,
                    m.test_error,
                    start.elapsed().as_secs_f64()
                ));
                if epochs.contains(&m.epoch) {
                    let (probe_test, probe_train, bound, adversary) = probe_nuisance(
                        &dev,
                        &trainer,
                        &data,
                        fit,
                        validation,
                        n_test,
                        &probe_settings,
                    )?;
                    ctx.log(format!(
                        "{label}: after epoch {}: fresh probe on z_n {probe_test:.2} % (train {probe_train:.2} %, I(y; z_n) ≥ {bound:.3} bits){}",
                        m.epoch,
                        adversary.map_or(String::new(), |a| format!(", adversary {a:.2} %"))
                    ));
                    cell_rows.retain(|r| r.epoch != m.epoch);
                    // CE + MLE has no adversarial term, so no variant; its adversary's inner
                    // steps are kept (they decide how well that watching adversary is trained).
                    let adversary_term = ice.as_ref().filter(|_| objective == CellObjective::Ice);
                    cell_rows.push(Row {
                        objective,
                        adversary: adversary_term.map(|i| i.variant),
                        w_adv: ice.as_ref().map(|i| i.w_adv),
                        inner_steps: ice.as_ref().map(|i| i.inner_steps),
                        w_mle: ice.as_ref().map(|i| i.w_mle),
                        epoch: m.epoch,
                        logit_test_error: m.test_error,
                        logit_train_error: m.train_error,
                        adversary_test_error: adversary,
                        probe_test_error: probe_test,
                        probe_train_error: probe_train,
                        probe_bound_bits: bound,
                    });
                    ctx.checkpoint_save(&rows_name, &serde_json::to_vec(&cell_rows)?)?;
                }
                ctx.checkpoint_save(&name, &trainer.checkpoint()?)?;
            }
            rows.extend(cell_rows);
            ctx.checkpoint_save("rows", &serde_json::to_vec(&rows)?)?;
        }

        // One series per objective and adversary variant, iCE split by w_mle (the axis that
        // says whether the likelihood term or the adversary costs accuracy).
        let mut series: Vec<Series> = Vec::new();
        for row in &rows {
            let name = match (row.objective, row.adversary, row.w_mle) {
                (CellObjective::Ice, Some(variant), Some(w_mle)) => {
                    format!("iCE {}, w_mle {w_mle}", variant_name(variant))
                }
                _ => row.objective.label().to_string(),
            };
            let point = (row.logit_test_error, row.probe_test_error);
            match series.iter_mut().find(|s| s.name == name) {
                Some(s) => s.points.push(point),
                None => series.push(Series {
                    name,
                    points: vec![point],
                }),
            }
        }
        ctx.write_output(
            "ablation.svg",
            scatter_plot(
                "Ablation: accuracy against label information left in z_n",
                "logit test error (%)",
                "fresh probe on z_n: test error (%)",
                &series,
            )
            .as_bytes(),
        )?;
        let result = AblationResult {
            model: config,
            base,
            grid_epochs: epochs,
            probe: probe_settings,
            n_probe_fit: fit.len(),
            n_probe_validation: validation.len(),
            n_test,
            rows,
        };
        ctx.write_output("ablation.json", &json_bytes(&result)?)?;
        Ok(Finished::Done)
    }
}
