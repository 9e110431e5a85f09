//! Stage `spheres_flow`: a fully connected fi-RevNet on the adversarial spheres, and what its
//! invariance looks like there.
//!
//! Paper: § 3, the spheres figure (d = 100, R₁ = 1, R₂ = 10); claim C9 (the fi-RevNet reaches
//! 0 % error). The model is `nn::vector_flow` (K × [ActNorm → reverse → coupling with an MLP
//! net], logits z_s = z[0..2], nuisance z_n = z[2..d]), trained with Adam on `objective` =
//! `ce` (cross-entropy on z_s) or `ice` (CE on z_s + w_adv × the paper's adversarial term of a
//! nuisance MLP on z_n, clipped at log 2 + w_mle × MLE: a learned factorial Gaussian on z_n
//! and log|det J|, in nats per dimension). Then:
//! (a) the logit classifier's train and test error;
//! (b) metamers x_met = F⁻¹(z_s(A), z_n(B)) for `pairs` seeded (inner A, outer B) test pairs:
//!     ‖x_met‖ (quartiles), the fraction the fi-RevNet calls inner (with the check that every
//!     decision equals A's and max |z_s(x_met) − z_s(A)|), reconstruction errors, and the
//!     spheres' own ground truth: the fraction of metamers nearer the outer sphere;
//! (c) a post-hoc nuisance classifier (the `probe` stage's trainer: an MLP on the frozen,
//!     standardised z_n of the first `probe_train_limit` training points, `probe_validation`
//!     of them held out to pick the epoch) and its train / test error, and for iCE the jointly
//!     trained adversary's test error beside it;
//! (d) `heatmaps.png`, 2 × 2 panels of P(outer) on a `grid` × `grid` grid spanning ±`extent`·R₂:
//!     rows = the x₁–x₂ plane (other coordinates 0) and the plane through 0, x and x_met
//!     (x = the first pair's A, axes by Gram–Schmidt, x on the horizontal axis); columns = the
//!     logit classifier and the nuisance classifier. Blue = inner (P = 0), white = 0.5, red =
//!     outer (P = 1); black circles R₁, R₂; green dot x, yellow dot x_met (bottom row only; a
//!     yellow square at the edge when x_met lies outside the panel, on the ray towards it).
//!     Each panel also scores its classifier on 720 points of each of its two circles: points
//!     of the spheres themselves, in directions the data hardly ever visits.
//! Training is short (seconds on `cpu`), so it does not checkpoint; a diverged run (a
//! non-finite loss) fails the stage instead of publishing NaNs.
//! Inputs: `summary.json`, `train_x.npy`, `train_y.npy`, `test_x.npy`, `test_y.npy` of
//! `spheres`. Outputs: `spheres.json` (`outputs::SpheresFlowResult`: the numbers above, the
//! config and training settings, the history, the figure files), `weights.safetensors` (config
//! in the metadata), `heatmaps.png`, `curve.svg` (error per epoch).
//! Expected (paper): 0 % test error for the logit classifier; metamers that keep A's logits
//! while their nuisance comes from B. Measured on `cpu` (seed 0; 4 steps, hidden 64, affine,
//! 4 epochs of the 50 000 points):
//! - CE (13–24 s on 2 shared cores): 0.00 % train and test error. Metamers: all called inner, all with A's
//!   decision (max |Δz_s| 2e-3 at their scale), but far outside both spheres (‖x_met‖ median
//!   1.8e5, quartiles 2.1e4 / 2.6e6; the affine inverse extrapolates off the data, and
//!   F(F⁻¹(z)) misses z by up to 2e6 there, against 1e-6 on data); the nuisance classifier
//!   reads the class from z_n with 0.00 % test error and calls every metamer outer.
//! - iCE (20–31 s; w_adv = w_mle = 1, 2 inner steps): 0.00 % train and test error. Metamers lie
//!   on the inner sphere (‖x_met‖ median 1.12, quartiles 1.02 / 1.24: they look like A, as the
//!   paper's iCE metamers do), max |Δz_s| 2e-6; the adversary ends confidently wrong (77 %
//!   test error: fooled, not blind) and the fresh nuisance classifier still reads z_n with
//!   3.7 % test error (CE: 0.00 %) — the information is reduced, not removed (paper-notes § 3).
//! - The logit classifiers make no error on the circles of the x–x_met plane; on the outer
//!   circle of the x₁–x₂ plane (points of the outer sphere with all their mass in two
//!   coordinates) CE errs on 0 % and iCE on 53 %: zero test error is not zero error on the
//!   sphere (Gilmer et al.'s point).
//!
//! Additive couplings (`coupling = "additive"`), otherwise the same: CE (4 epochs) 0.00 %,
//! metamers at ‖x_met‖ ≈ 350; iCE (2 epochs) 0.00 %, metamers at ≈ 17, nuisance classifier
//! 0.01 %: iCE does not empty z_n with them at this budget, hence affine in pipeline.toml.
//!
//! Params: [`FlowParams`] and the probe's, prefixed `probe_` (`crate::training::ProbeParams`).
//!
//! Claims: C9
//! Modules: data, nn, outputs, report/figures, training

use std::collections::HashMap;

use anyhow::{bail, ensure, Result};
use dfdx::prelude::*;
use rand::seq::SliceRandom;
use serde::Deserialize;
use serde_json::json;

use crate::data::spheres::{norm, SpherePoints, INNER, OUTER};
use crate::engine::{
    at_least, deserialize_params, non_negative, positive, split_prefixed, Finished, Limit,
    ParamError, Params, StageContext, StageKind, StageParams, TypedParams,
};
use crate::nn::flow::CouplingKind;
use crate::nn::nuisance::{readout_raw, train_probe, Features, Probe, ProbeSettings};
use crate::nn::ops::argmax_rows;
use crate::nn::vector_flow::{
    columns, error_rate, rows_of, train_vector_flow, VectorFlow, VectorFlowConfig,
    VectorIceSettings, VectorObjective, VectorTrainSettings,
};
use crate::nn::{device, rng_for, Dev, HasParams, DEVICE_NAME, T2};
use crate::outputs::{
    json_bytes, parse_json, HeatmapPanel, Quartiles, SpheresFlowResult, SpheresHeatmaps,
    SpheresMetamers, SpheresNuisance, SpheresSummary,
};
use crate::report::figures::{line_plot, Series};
use crate::training::ProbeParams;

pub struct SpheresFlow;

/// The flow, its training and the analyses (the probe's params come prefixed `probe_`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FlowParams {
    objective: VectorObjective,
    /// Flow steps, hidden width of the coupling MLPs, coupling kind.
    steps: usize,
    hidden: usize,
    coupling: CouplingKind,
    epochs: usize,
    batch_size: usize,
    lr: f64,
    /// Training points of the data-dependent ActNorm init.
    init_batch: usize,
    train_limit: Limit,
    test_limit: Limit,
    /// iCE only (declared by every stage of this kind; `ce` does not read them).
    w_adv: f64,
    w_mle: f64,
    inner_steps: usize,
    adversary_width: usize,
    adversary_layers: usize,
    adversary_lr: f64,
    /// Metamer pairs (inner A, outer B).
    pairs: usize,
    /// Heat-map grid points per side, and the half-width of a panel in units of R₂.
    grid: usize,
    extent: f64,
}

impl TypedParams for FlowParams {
    fn check(&self) -> Result<(), ParamError> {
        at_least("steps", self.steps, 2)?;
        at_least("hidden", self.hidden, 1)?;
        at_least("epochs", self.epochs, 1)?;
        at_least("batch_size", self.batch_size, 1)?;
        positive("lr", self.lr)?;
        at_least("init_batch", self.init_batch, 2)?;
        non_negative("w_adv", self.w_adv)?;
        non_negative("w_mle", self.w_mle)?;
        at_least("inner_steps", self.inner_steps, 1)?;
        at_least("adversary_width", self.adversary_width, 1)?;
        at_least("adversary_layers", self.adversary_layers, 1)?;
        positive("adversary_lr", self.adversary_lr)?;
        at_least("pairs", self.pairs, 1)?;
        at_least("grid", self.grid, 8)?;
        positive("extent", self.extent)
    }
}

#[derive(Debug)]
pub struct SpheresFlowParams {
    flow: FlowParams,
    probe: ProbeParams,
}

impl StageParams for SpheresFlowParams {
    fn from_params(params: &Params) -> Result<Self, ParamError> {
        let (probe, rest) = split_prefixed(params, "probe_");
        let flow = FlowParams::from_params(&rest)?;
        let prefixed = |e: ParamError| ParamError::new(format!("probe_{}", e.param), e.message);
        let probe: ProbeParams = deserialize_params(&probe).map_err(prefixed)?;
        probe.check().map_err(prefixed)?;
        Ok(SpheresFlowParams { flow, probe })
    }
}

/// Pixels per grid point and between panels.
const SCALE: usize = 2;
const GAP: usize = 6;
/// A marked point farther out than this fraction of a panel's half-width is drawn as a square
/// at this distance, on the ray from the origin towards it.
const EDGE: f64 = 0.94;
/// Points per circle when scoring the classifiers on the circles R₁, R₂ of each plane.
const CIRCLE_POINTS: usize = 720;

const LEGEND: &str = "colour: P(outer) from blue (0, inner) through white (0.5) to red (1, outer); black circles: the spheres R1 and R2; green dot: x (an inner test point, metamer pair 0's A); yellow dot: its metamer x_met = F^-1(z_s(x), z_n(B)) with B an outer test point (a yellow square near the edge: x_met lies outside the panel, in that direction; its coordinates are x_met_in_plane). Rows: 0 = the x1-x2 plane (other coordinates 0, x1 to the right, x2 up), 1 = the plane through 0, x and x_met (x on the horizontal axis, Gram-Schmidt). Columns: 0 = the logit classifier softmax(z_s), 1 = the post-hoc nuisance classifier on z_n. Each panel spans +-extent in both axes.";

/// P(outer) = softmax(·)[1] of `(2, B)` scores, per column.
fn p_outer(scores: &T2) -> Vec<f64> {
    let b = scores.shape().1;
    let v = scores.as_vec();
    (0..b)
        .map(|col| 1.0 / (1.0 + (v[col] as f64 - v[b + col] as f64).exp()))
        .collect()
}

/// The nuisance classifier's P(outer) on z_n `(d − 2, B)` (standardised as in training).
fn nuisance_p_outer(dev: &Dev, probe: &Probe, zn: &T2) -> Vec<f64> {
    let (dims, b) = *zn.shape();
    let v = zn.as_vec();
    let mut x = vec![0.0f32; dims * b];
    for r in 0..dims {
        for col in 0..b {
            x[r * b + col] = (v[r * b + col] - probe.scaler.mean[r]) * probe.scaler.inv_std[r];
        }
    }
    p_outer(&probe.mlp.forward(dev.tensor_from_vec(x, (dims, b)), None))
}

/// Both classifiers' P(outer) at the points `u·e1 + v·e2` (plane coordinates `(u, v)`).
fn probabilities_at(
    dev: &Dev,
    flow: &VectorFlow,
    probe: &Probe,
    basis: (&[f64], &[f64]),
    points: &[(f64, f64)],
) -> (Vec<f64>, Vec<f64>) {
    let d = flow.dims();
    let (mut logit_p, mut nuisance_p) = (Vec::new(), Vec::new());
    for chunk in points.chunks(2000) {
        let b = chunk.len();
        let mut x = vec![0.0f32; d * b];
        for (col, &(u, v)) in chunk.iter().enumerate() {
            for r in 0..d {
                x[r * b + col] = (u * basis.0[r] + v * basis.1[r]) as f32;
            }
        }
        let (z, _) = flow.forward(dev.tensor_from_vec(x, (d, b)));
        logit_p.extend(p_outer(&flow.logits(z.clone())));
        nuisance_p.extend(nuisance_p_outer(dev, probe, &flow.nuisance(z)));
        dev.empty_cache();
    }
    (logit_p, nuisance_p)
}

/// The grid of a `grid` × `grid` panel spanning ±`half` (row 0 at the top: v decreases down
/// the rows).
fn panel_points(grid: usize, half: f64) -> Vec<(f64, f64)> {
    let step = 2.0 * half / grid as f64;
    (0..grid * grid)
        .map(|k| {
            let (i, j) = (k / grid, k % grid);
            (
                -half + (j as f64 + 0.5) * step,
                half - (i as f64 + 0.5) * step,
            )
        })
        .collect()
}

/// Points spaced evenly on the circle of radius `r` of a plane through the origin: points of
/// the sphere of that radius.
fn circle_points(r: f64) -> Vec<(f64, f64)> {
    (0..CIRCLE_POINTS)
        .map(|k| {
            let angle = 2.0 * std::f64::consts::PI * k as f64 / CIRCLE_POINTS as f64;
            (r * angle.cos(), r * angle.sin())
        })
        .collect()
}

/// % of `p_outer` on the wrong side of 0.5 for points of class `outer`.
fn error_percent(p_outer: &[f64], outer: bool) -> f64 {
    let wrong = p_outer.iter().filter(|&&q| (q > 0.5) != outer).count();
    100.0 * wrong as f64 / p_outer.len().max(1) as f64
}

/// Blue (0) → white (0.5) → red (1).
fn colour(p: f64) -> [u8; 3] {
    const BLUE: [f64; 3] = [33.0, 102.0, 172.0];
    const WHITE: [f64; 3] = [247.0, 247.0, 247.0];
    const RED: [f64; 3] = [178.0, 24.0, 43.0];
    let p = p.clamp(0.0, 1.0);
    let (from, to, t) = if p < 0.5 {
        (BLUE, WHITE, p / 0.5)
    } else {
        (WHITE, RED, (p - 0.5) / 0.5)
    };
    [0, 1, 2].map(|c| (from[c] + (to[c] - from[c]) * t).round() as u8)
}

/// One panel to draw: P(outer) per grid point, and marked points in plane coordinates.
struct Panel {
    probabilities: Vec<f64>,
    marks: Vec<([f64; 2], [u8; 3])>,
}

/// The 2 × 2 panels as an RGB PNG (white background between panels).
fn heatmap_png(panels: &[Panel; 4], grid: usize, half: f64, radii: [f64; 2]) -> Result<Vec<u8>> {
    let side = grid * SCALE;
    let width = 2 * side + 3 * GAP;
    let mut pixels = vec![255u8; width * width * 3];
    let pixel = 2.0 * half / side as f64;
    for (k, panel) in panels.iter().enumerate() {
        let (x0, y0) = (GAP + (k % 2) * (side + GAP), GAP + (k / 2) * (side + GAP));
        for py in 0..side {
            for px in 0..side {
                let (u, v) = (
                    -half + (px as f64 + 0.5) * pixel,
                    half - (py as f64 + 0.5) * pixel,
                );
                let r = u.hypot(v);
                let mut rgb = colour(panel.probabilities[(py / SCALE) * grid + px / SCALE]);
                if radii.iter().any(|&big_r| (r - big_r).abs() < 0.75 * pixel) {
                    rgb = [0, 0, 0];
                }
                for (centre, fill) in &panel.marks {
                    // A point outside the panel: a square on the ray towards it, near the edge.
                    let outside = centre[0].abs().max(centre[1].abs()) > EDGE * half;
                    let (cu, cv) = if outside {
                        let shrink = EDGE * half / centre[0].abs().max(centre[1].abs());
                        (centre[0] * shrink, centre[1] * shrink)
                    } else {
                        (centre[0], centre[1])
                    };
                    let dist = if outside {
                        ((u - cu).abs().max((v - cv).abs())) / pixel
                    } else {
                        (u - cu).hypot(v - cv) / pixel
                    };
                    if dist < 5.0 {
                        rgb = if dist < 3.6 { *fill } else { [0, 0, 0] };
                    }
                }
                let at = ((y0 + py) * width + x0 + px) * 3;
                pixels[at..at + 3].copy_from_slice(&rgb);
            }
        }
    }
    let mut out = Vec::new();
    {
        let mut encoder = png::Encoder::new(&mut out, width as u32, width as u32);
        encoder.set_color(png::ColorType::Rgb);
        encoder.set_depth(png::BitDepth::Eight);
        let mut writer = encoder.write_header()?;
        writer.write_image_data(&pixels)?;
    }
    Ok(out)
}

/// z_n of examples `indices` as an example-major feature table.
fn nuisance_features(
    dev: &Dev,
    flow: &VectorFlow,
    set: &SpherePoints,
    indices: &[usize],
) -> Features {
    let mut features = Features::new(flow.dims() - flow.config.classes);
    for batch in indices.chunks(1000) {
        let (z, _) = flow.forward(columns(dev, &set.x, set.d, batch));
        let labels: Vec<u8> = batch.iter().map(|&i| set.y[i]).collect();
        features.push_columns(&flow.nuisance(z), &labels);
        dev.empty_cache();
    }
    features
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// What the metamer pass measured, and what the figure and the probe need from it.
struct MetamerPass {
    norms: Vec<f64>,
    called_inner: usize,
    same_as_a: usize,
    max_logit_diff: f32,
    reconstruction_data: f32,
    reconstruction_metamer: f32,
    /// z_n of the metamers (labels: B's, unused).
    nuisance: Features,
    /// The first pair's A and x_met.
    first: (Vec<f32>, Vec<f32>),
}

fn metamer_pass(
    dev: &Dev,
    flow: &VectorFlow,
    test: &SpherePoints,
    sources: &[usize],
    nuisances: &[usize],
) -> MetamerPass {
    let d = flow.dims();
    let classes = flow.config.classes;
    let mut pass = MetamerPass {
        norms: Vec::new(),
        called_inner: 0,
        same_as_a: 0,
        max_logit_diff: 0.0,
        reconstruction_data: 0.0,
        reconstruction_metamer: 0.0,
        nuisance: Features::new(d - classes),
        first: (Vec::new(), Vec::new()),
    };
    for (chunk_a, chunk_b) in sources.chunks(500).zip(nuisances.chunks(500)) {
        let b = chunk_a.len();
        let xa = columns(dev, &test.x, d, chunk_a);
        let xb = columns(dev, &test.x, d, chunk_b);
        let (za, _) = flow.forward(xa.clone());
        let (zb, _) = flow.forward(xb);
        let mut z_met = zb.as_vec();
        let za_values = za.as_vec();
        z_met[..classes * b].copy_from_slice(&za_values[..classes * b]);
        let x_met = flow.inverse(dev.tensor_from_vec(z_met, (d, b)));
        let (z_of_met, _) = flow.forward(x_met.clone());
        let (logits_a, logits_met) = (flow.logits(za.clone()), flow.logits(z_of_met.clone()));
        pass.max_logit_diff = pass
            .max_logit_diff
            .max(max_abs_diff(&logits_met.as_vec(), &logits_a.as_vec()));
        pass.reconstruction_data = pass
            .reconstruction_data
            .max(max_abs_diff(&flow.inverse(za).as_vec(), &xa.as_vec()));
        pass.reconstruction_metamer = pass.reconstruction_metamer.max(max_abs_diff(
            &flow.inverse(z_of_met.clone()).as_vec(),
            &x_met.as_vec(),
        ));
        let (decided_a, decided_met) = (argmax_rows(&logits_a), argmax_rows(&logits_met));
        pass.called_inner += decided_met.iter().filter(|&&c| c == INNER).count();
        pass.same_as_a += decided_a
            .iter()
            .zip(&decided_met)
            .filter(|(a, m)| a == m)
            .count();
        let rows = rows_of(&x_met);
        pass.norms.extend(rows.iter().map(|r| norm(r)));
        if pass.first.0.is_empty() {
            pass.first = (test.row(chunk_a[0]).to_vec(), rows[0].clone());
        }
        let labels: Vec<u8> = chunk_b.iter().map(|&i| test.y[i]).collect();
        pass.nuisance
            .push_columns(&flow.nuisance(z_of_met), &labels);
        dev.empty_cache();
    }
    pass
}

/// An orthonormal basis (e1 along x, e2 the part of x_met orthogonal to x) in f64.
fn plane_basis(x: &[f32], x_met: &[f32]) -> (Vec<f64>, Vec<f64>) {
    let x: Vec<f64> = x.iter().map(|&v| v as f64).collect();
    let m: Vec<f64> = x_met.iter().map(|&v| v as f64).collect();
    let nx = x.iter().map(|v| v * v).sum::<f64>().sqrt();
    let e1: Vec<f64> = x.iter().map(|v| v / nx).collect();
    let along = e1.iter().zip(&m).map(|(a, b)| a * b).sum::<f64>();
    let mut e2: Vec<f64> = m.iter().zip(&e1).map(|(v, e)| v - along * e).collect();
    let n2 = e2.iter().map(|v| v * v).sum::<f64>().sqrt();
    if n2 > 1e-9 {
        e2.iter_mut().for_each(|v| *v /= n2);
    } else {
        // x_met parallel to x: any direction orthogonal to x spans the plane.
        let k = (0..e1.len())
            .min_by(|&i, &j| e1[i].abs().total_cmp(&e1[j].abs()))
            .unwrap_or(0);
        e2 = e1.iter().map(|e| -e1[k] * e).collect();
        e2[k] += 1.0;
        let n = e2.iter().map(|v| v * v).sum::<f64>().sqrt();
        e2.iter_mut().for_each(|v| *v /= n);
    }
    (e1, e2)
}

fn dot(a: &[f64], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(x, &y)| x * y as f64).sum()
}

impl StageKind for SpheresFlow {
    type Params = SpheresFlowParams;

    fn kind(&self) -> &str {
        "spheres_flow"
    }

    fn code_fingerprint(&self) -> String {
        super::code_fingerprint("spheres_flow")
    }

    fn run(&self, ctx: &mut StageContext, params: &SpheresFlowParams) -> Result<Finished> {
        let p = &params.flow;
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
            "the arrays have {} / {} columns, summary.json says d = {d}",
            train.d,
            test.d
        );
        let (n_train, n_test) = (p.train_limit.of(train.len()), p.test_limit.of(test.len()));
        let config = VectorFlowConfig {
            dims: d,
            steps: p.steps,
            hidden: p.hidden,
            coupling: p.coupling,
            classes: 2,
        };
        let settings = VectorTrainSettings {
            objective: p.objective,
            epochs: p.epochs,
            batch_size: p.batch_size,
            lr: p.lr as f32,
            init_batch: p.init_batch,
            seed,
            ice: (p.objective == VectorObjective::Ice).then_some(VectorIceSettings {
                w_adv: p.w_adv as f32,
                w_mle: p.w_mle as f32,
                inner_steps: p.inner_steps,
                adversary_width: p.adversary_width,
                adversary_layers: p.adversary_layers,
                adversary_lr: p.adversary_lr as f32,
            }),
        };

        // (a) Training and the logit classifier's errors.
        let start = std::time::Instant::now();
        let steps = n_train.div_ceil(p.batch_size) * p.epochs;
        let bar = ctx.progress(steps as u64, "training the vector fi-RevNet");
        let trained = train_vector_flow(
            &dev,
            config.clone(),
            &settings,
            &train.x[..n_train * d],
            &train.y[..n_train],
            &test.x[..n_test * d],
            &test.y[..n_test],
            &|done, _| bar.set_position(done as u64),
        );
        bar.finish_and_clear();
        if let Some(bad) = trained
            .history
            .iter()
            .find(|e| !e.loss.is_finite() || !e.test_error.is_finite())
        {
            bail!(
                "stage {}: training diverged (epoch {}: loss {}, test error {}); nothing is published",
                ctx.name(),
                bad.epoch,
                bad.loss,
                bad.test_error
            );
        }
        let flow = &trained.flow;
        let train_indices: Vec<usize> = (0..n_train).collect();
        let test_indices: Vec<usize> = (0..n_test).collect();
        let train_error = error_rate(&dev, flow, &train.x, &train.y, &train_indices);
        let test_error = error_rate(&dev, flow, &test.x, &test.y, &test_indices);
        for e in &trained.history {
            ctx.log(format!(
                "epoch {}: loss {:.4}, CE {:.4}, train error {:.2} %, test error {:.2} %{}",
                e.epoch,
                e.loss,
                e.ce,
                e.train_error,
                e.test_error,
                match (e.nll_nats_per_dim, e.adversary_ce, e.adversary_error) {
                    (Some(nll), Some(ce), Some(err)) => format!(
                        "; MLE {nll:.4} nats/dim, adversary CE {ce:.4} nats, error {err:.2} %"
                    ),
                    _ => String::new(),
                }
            ));
        }
        ctx.log(format!(
            "{} ({} parameters) trained in {:.1} s: train error {train_error:.2} %, test error {test_error:.2} %",
            ctx.name(),
            flow.param_count(),
            start.elapsed().as_secs_f64()
        ));

        // (b) Metamers of seeded (inner, outer) test pairs.
        let mut inner: Vec<usize> = test_indices
            .iter()
            .copied()
            .filter(|&i| test.y[i] == INNER)
            .collect();
        let mut outer: Vec<usize> = test_indices
            .iter()
            .copied()
            .filter(|&i| test.y[i] == OUTER)
            .collect();
        inner.shuffle(&mut rng_for(seed, "spheres-metamer-sources"));
        outer.shuffle(&mut rng_for(seed, "spheres-metamer-nuisances"));
        let pairs = p.pairs.min(inner.len()).min(outer.len());
        ensure!(pairs > 0, "the test set needs points on both spheres");
        let (sources, nuisances) = (&inner[..pairs], &outer[..pairs]);
        let mut pass = metamer_pass(&dev, flow, &test, sources, nuisances);
        let (r1, r2) = (summary.r_inner, summary.r_outer);
        let non_finite = pass.norms.iter().filter(|r| !r.is_finite()).count();
        pass.norms.retain(|r| r.is_finite());
        let nearer_outer = pass
            .norms
            .iter()
            .filter(|&&r| (r - r2).abs() < (r - r1).abs())
            .count();
        let source_norms: Vec<f64> = sources.iter().map(|&i| norm(test.row(i))).collect();
        let nuisance_norms: Vec<f64> = nuisances.iter().map(|&i| norm(test.row(i))).collect();

        // (c) The post-hoc nuisance classifier on frozen z_n.
        let n_probe = params.probe.n_train(n_train)?;
        let probe_settings: ProbeSettings = params.probe.settings(seed);
        let mut order: Vec<usize> = (0..n_probe).collect();
        order.shuffle(&mut rng_for(seed, "spheres-probe-validation"));
        let (validation_rows, fit_rows) = order.split_at(params.probe.validation);
        let fit = nuisance_features(&dev, flow, &train, fit_rows);
        let validation = nuisance_features(&dev, flow, &train, validation_rows);
        let test_n = nuisance_features(&dev, flow, &test, &test_indices);
        let bar = ctx.progress(probe_settings.epochs as u64, "nuisance classifier on z_n");
        let probe = train_probe(&dev, &fit, &validation, 2, &probe_settings, &|done, _| {
            bar.set_position(done as u64)
        })?;
        bar.finish_and_clear();
        let (probe_train, probe_test) = (probe.readout(&dev, &fit), probe.readout(&dev, &test_n));
        let adversary_test = trained
            .adversary
            .as_ref()
            .map(|adversary| readout_raw(&dev, adversary, &test_n));
        let metamer_zn = {
            let all: Vec<usize> = (0..pass.nuisance.len()).collect();
            let mut values = vec![0.0f32; pass.nuisance.dims * all.len()];
            for (col, &i) in all.iter().enumerate() {
                for (r, &v) in pass.nuisance.row(i).iter().enumerate() {
                    values[r * all.len() + col] = v;
                }
            }
            dev.tensor_from_vec(values, (pass.nuisance.dims, all.len()))
        };
        let says_outer = nuisance_p_outer(&dev, &probe, &metamer_zn)
            .iter()
            .filter(|&&q| q > 0.5)
            .count();
        let fraction = |n: usize| n as f64 / pairs as f64;
        ensure!(
            pass.first.1.iter().all(|v| v.is_finite()),
            "the first metamer is not finite: no x–x_met plane to draw"
        );
        let metamers = SpheresMetamers {
            pairs,
            non_finite,
            norm: Quartiles::of(&pass.norms),
            logit_source_norm: Quartiles::of(&source_norms),
            nuisance_source_norm: Quartiles::of(&nuisance_norms),
            fraction_called_inner: fraction(pass.called_inner),
            fraction_same_decision_as_logit_source: fraction(pass.same_as_a),
            max_logit_diff: pass.max_logit_diff,
            reconstruction_data: pass.reconstruction_data,
            reconstruction_metamer: pass.reconstruction_metamer,
            fraction_nearer_outer: fraction(nearer_outer),
            nuisance_classifier_says_outer: fraction(says_outer),
        };
        ctx.log(format!(
            "{pairs} metamers: ‖x_met‖ median {:.3} (quartiles {:.3} / {:.3}); called inner {:.1} %, same decision as A {:.1} %, max |Δz_s| {:.2e}; reconstruction {:.2e} (data) / {:.2e} (metamers); nearer the outer sphere {:.1} %, nuisance classifier says outer {:.1} %",
            metamers.norm.median,
            metamers.norm.q1,
            metamers.norm.q3,
            100.0 * metamers.fraction_called_inner,
            100.0 * metamers.fraction_same_decision_as_logit_source,
            metamers.max_logit_diff,
            metamers.reconstruction_data,
            metamers.reconstruction_metamer,
            100.0 * metamers.fraction_nearer_outer,
            100.0 * metamers.nuisance_classifier_says_outer
        ));
        ctx.log(format!(
            "nuisance classifier on z_n: train error {:.2} %, test error {:.2} % (epoch {} of {}){}",
            probe_train.error,
            probe_test.error,
            probe.best_epoch,
            probe_settings.epochs,
            adversary_test
                .as_ref()
                .map(|r| format!("; the jointly trained adversary: test error {:.2} %", r.error))
                .unwrap_or_default()
        ));

        // (d) Heat maps on the x1–x2 plane and on the x–x_met plane.
        let half = p.extent * r2;
        let unit = |k: usize| -> Vec<f64> { (0..d).map(|r| (r == k) as u8 as f64).collect() };
        let (e1, e2) = (unit(0), unit(1));
        let (x, x_met) = &pass.first;
        let (f1, f2) = plane_basis(x, x_met);
        let (top_logit, top_nuisance) =
            probabilities_at(&dev, flow, &probe, (&e1, &e2), &panel_points(p.grid, half));
        let (bottom_logit, bottom_nuisance) =
            probabilities_at(&dev, flow, &probe, (&f1, &f2), &panel_points(p.grid, half));
        // Each plane's circles R₁ and R₂ lie on the spheres: (inner, outer) error per classifier.
        let circle_errors = |basis: (&[f64], &[f64])| -> [(f64, f64); 2] {
            let (inner_logit, inner_nuisance) =
                probabilities_at(&dev, flow, &probe, basis, &circle_points(r1));
            let (outer_logit, outer_nuisance) =
                probabilities_at(&dev, flow, &probe, basis, &circle_points(r2));
            [
                (
                    error_percent(&inner_logit, false),
                    error_percent(&outer_logit, true),
                ),
                (
                    error_percent(&inner_nuisance, false),
                    error_percent(&outer_nuisance, true),
                ),
            ]
        };
        let (top_circles, bottom_circles) = (circle_errors((&e1, &e2)), circle_errors((&f1, &f2)));
        let x_in_plane = [dot(&f1, x), dot(&f2, x)];
        let met_in_plane = [dot(&f1, x_met), dot(&f2, x_met)];
        let (at_logit, at_nuisance) = {
            let both = columns(&dev, &[x.clone(), x_met.clone()].concat(), d, &[0, 1]);
            let (z, _) = flow.forward(both);
            (
                p_outer(&flow.logits(z.clone())),
                nuisance_p_outer(&dev, &probe, &flow.nuisance(z)),
            )
        };
        let marks = vec![(x_in_plane, [0u8, 170, 0]), (met_in_plane, [255u8, 210, 0])];
        let outer_share =
            |ps: &[f64]| ps.iter().filter(|&&q| q > 0.5).count() as f64 / ps.len() as f64;
        let panel_info = |k: usize, ps: &[f64], at: Option<&[f64]>| {
            let circles = if k < 2 { top_circles } else { bottom_circles }[k % 2];
            HeatmapPanel {
                row: k / 2,
                col: k % 2,
                plane: if k < 2 { "x1-x2" } else { "x-x_met" }.to_string(),
                classifier: if k.is_multiple_of(2) {
                    "logits"
                } else {
                    "nuisance"
                }
                .to_string(),
                fraction_outer: outer_share(ps),
                inner_circle_error: circles.0,
                outer_circle_error: circles.1,
                p_outer_at_x: at.map(|a| a[0]),
                p_outer_at_x_met: at.map(|a| a[1]),
            }
        };
        let panels_info = vec![
            panel_info(0, &top_logit, None),
            panel_info(1, &top_nuisance, None),
            panel_info(2, &bottom_logit, Some(&at_logit)),
            panel_info(3, &bottom_nuisance, Some(&at_nuisance)),
        ];
        let png = heatmap_png(
            &[
                Panel {
                    probabilities: top_logit,
                    marks: Vec::new(),
                },
                Panel {
                    probabilities: top_nuisance,
                    marks: Vec::new(),
                },
                Panel {
                    probabilities: bottom_logit,
                    marks: marks.clone(),
                },
                Panel {
                    probabilities: bottom_nuisance,
                    marks,
                },
            ],
            p.grid,
            half,
            [r1, r2],
        )?;
        for panel in &panels_info {
            ctx.log(format!(
                "heat map {} / {}: {:.1} % of the panel called outer; error on its circles (points of the spheres) {:.1} % (R1) / {:.1} % (R2){}",
                panel.plane,
                panel.classifier,
                100.0 * panel.fraction_outer,
                panel.inner_circle_error,
                panel.outer_circle_error,
                match (panel.p_outer_at_x, panel.p_outer_at_x_met) {
                    (Some(a), Some(b)) => format!("; P(outer) {a:.3} at x, {b:.3} at x_met"),
                    _ => String::new(),
                }
            ));
        }
        let heatmaps = SpheresHeatmaps {
            file: "heatmaps.png".into(),
            grid: p.grid,
            extent: half,
            scale: SCALE,
            gap: GAP,
            legend: LEGEND.into(),
            panels: panels_info,
            x_norm: norm(x),
            x_met_in_plane: met_in_plane,
        };

        let mut curves = vec![
            Series {
                name: "train (during the epoch)".into(),
                points: trained
                    .history
                    .iter()
                    .map(|e| (e.epoch as f64, e.train_error))
                    .collect(),
            },
            Series {
                name: "test".into(),
                points: trained
                    .history
                    .iter()
                    .map(|e| (e.epoch as f64, e.test_error))
                    .collect(),
            },
        ];
        if trained.adversary.is_some() {
            curves.push(Series {
                name: "adversary on z_n".into(),
                points: trained
                    .history
                    .iter()
                    .map(|e| (e.epoch as f64, e.adversary_error.unwrap_or(0.0)))
                    .collect(),
            });
        }
        let objective = match p.objective {
            VectorObjective::Ce => "ce",
            VectorObjective::Ice => "ice",
        };
        let weights = flow.to_safetensors(HashMap::from([
            ("objective".to_string(), objective.to_string()),
            ("training".to_string(), serde_json::to_string(&settings)?),
        ]))?;
        let result = SpheresFlowResult {
            data: summary,
            model: config,
            parameters: flow.param_count(),
            training: settings,
            device: DEVICE_NAME.to_string(),
            n_train,
            n_test,
            history: trained.history.clone(),
            train_error,
            test_error,
            metamers,
            nuisance: SpheresNuisance {
                settings: probe_settings,
                n_fit: fit.len(),
                n_validation: validation.len(),
                best_epoch: probe.best_epoch,
                train: probe_train,
                test: probe_test,
                adversary_test,
            },
            heatmaps,
            figures: vec!["heatmaps.png".into(), "curve.svg".into()],
        };
        ctx.write_output("weights.safetensors", &weights)?;
        ctx.write_output("heatmaps.png", &png)?;
        ctx.write_output(
            "curve.svg",
            line_plot(
                &format!("{} ({objective}): error per epoch", ctx.name()),
                "epoch",
                "error (%)",
                &curves,
            )
            .as_bytes(),
        )?;
        ctx.write_output("spheres.json", &json_bytes(&result)?)?;
        ctx.set_metric("test_error", json!(result.test_error));
        ctx.set_metric("metamer_median_norm", json!(result.metamers.norm.median));
        ctx.set_metric(
            "metamer_nearer_outer",
            json!(result.metamers.fraction_nearer_outer),
        );
        ctx.set_metric("nuisance_test_error", json!(result.nuisance.test.error));
        Ok(Finished::Done)
    }
}
