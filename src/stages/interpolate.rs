//! Stage `interpolate`: nuisance interpolation with the logits held fixed.
//!
//! Paper: Fig. 6/7 (claim C7): with z_s of A fixed, z_n goes linearly from A's to B's in
//! `steps` steps (t = 0 … 1); under CE the decoded image changes *class* along the path
//! (the class content lives in z_n), under iCE only its *style*. Every point on a path has
//! exactly A's logits, so the model's own decision never changes; the oracle says what the
//! image looks like. The same kind runs on Fashion-MNIST (C15: C7 on a second dataset).
//! Inputs: a fi-RevNet's `weights.safetensors`, the oracle's `member*.safetensors`, the MNIST
//! test arrays. Outputs: `interpolation.json` (per path: A, B, their labels, the oracle's
//! label at every step; the fraction of paths whose oracle label changes anywhere along the
//! path, and the fraction that end as B's label), `strips.png` (one row per path for the
//! first `grid_paths` paths: the `steps` decoded images, A's end on the left).
//! Expected: CE paths change label often (the paper's Fig. 6), iCE paths rarely (Fig. 7).
//!
//! Params: `paths` (≥ 1), `steps` (≥ 2: both ends), `grid_paths` (≤ paths).
//!
//! Claims: C7, C15
//! Modules: data, nn, oracle, outputs, report/figures

use anyhow::{bail, Result};
use dfdx::prelude::*;
use serde::Deserialize;
use serde_json::json;

use crate::data::split_from_npy;
use crate::engine::{at_least, Finished, ParamError, StageContext, StageKind, TypedParams};
use crate::nn::input::{column_image, revnet_input, revnet_to_cnn};
use crate::nn::model::{ensemble_predict, Model};
use crate::nn::{device, T2};
use crate::oracle::{oracle_members, pairs_with_different_labels};
use crate::outputs::{json_bytes, InterpolationResult};
use crate::report::figures::image_grid_png;

pub struct Interpolate;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InterpolateParams {
    paths: usize,
    /// Points per path, both ends included.
    steps: usize,
    /// How many paths the strip figure shows.
    grid_paths: usize,
}

impl TypedParams for InterpolateParams {
    fn check(&self) -> Result<(), ParamError> {
        at_least("paths", self.paths, 1)?;
        at_least("steps", self.steps, 2)?;
        if self.grid_paths > self.paths {
            return Err(ParamError::new(
                "grid_paths",
                format!(
                    "{} is out of range: at most paths ({})",
                    self.grid_paths, self.paths
                ),
            ));
        }
        Ok(())
    }
}

impl StageKind for Interpolate {
    type Params = InterpolateParams;

    fn kind(&self) -> &str {
        "interpolate"
    }

    fn code_fingerprint(&self) -> String {
        super::code_fingerprint("interpolate")
    }

    fn run(&self, ctx: &mut StageContext, params: &InterpolateParams) -> Result<Finished> {
        let dev = device();
        let Model::RevNet(model) =
            Model::from_safetensors(&dev, &ctx.input_named("weights.safetensors")?)?
        else {
            bail!(
                "stage {}: interpolation needs a fi-RevNet, the weights are of a CNN",
                ctx.name()
            );
        };
        let members = oracle_members(ctx, &dev)?;
        let test = split_from_npy(
            &ctx.input_named("test_images.npy")?,
            &ctx.input_named("test_labels.npy")?,
        )?;
        let images: Vec<u8> = test.images.iter().copied().collect();
        let labels = test.labels.to_vec();
        let (paths, steps, grid_paths) = (params.paths, params.steps, params.grid_paths);

        let (sources, nuisances) =
            pairs_with_different_labels(&labels, paths, ctx.seed(), "interpolation-pairs");

        let channels = model.config.in_channels;
        let logit_rows = model.logit_indices().to_vec();
        // oracle[p][k]: the oracle's label of path p at step k.
        let mut oracle: Vec<Vec<u8>> = Vec::with_capacity(paths);
        let mut grid: Vec<Vec<Vec<f32>>> = Vec::new();
        let mut max_logit_drift = 0.0f32;
        for (chunk_a, chunk_b) in sources.chunks(50).zip(nuisances.chunks(50)) {
            let b = chunk_a.len();
            let za = model
                .forward(revnet_input(&dev, &images, chunk_a, channels, None), None)
                .z;
            let zb = model
                .forward(revnet_input(&dev, &images, chunk_b, channels, None), None)
                .z;
            let (rows, _) = *za.shape();
            let (va, vb) = (za.as_vec(), zb.as_vec());
            let mut chunk_labels = vec![Vec::with_capacity(steps); b];
            let mut chunk_images = vec![Vec::with_capacity(steps); b];
            for k in 0..steps {
                let t = k as f32 / (steps - 1) as f32;
                let mut z: Vec<f32> = va
                    .iter()
                    .zip(&vb)
                    .map(|(&a, &bv)| (1.0 - t) * a + t * bv)
                    .collect();
                // The logits stay A's exactly.
                for &row in &logit_rows {
                    z[row * b..(row + 1) * b].copy_from_slice(&va[row * b..(row + 1) * b]);
                }
                let x = model.inverse(dev.tensor_from_vec(z, (rows, b)));
                let drift = model
                    .logits(model.forward(x.clone(), None).z)
                    .as_vec()
                    .iter()
                    .zip(model.logits(za.clone()).as_vec())
                    .map(|(p, q)| (p - q).abs())
                    .fold(0.0f32, f32::max);
                max_logit_drift = max_logit_drift.max(drift);
                let seen: T2 = revnet_to_cnn(&x, channels);
                let predicted = ensemble_predict(&members, &seen);
                let values = seen.as_vec();
                for n in 0..b {
                    chunk_labels[n].push(predicted[n]);
                    if grid.len() + n < grid_paths {
                        chunk_images[n].push(column_image(&values, b, n));
                    }
                }
                dev.empty_cache();
            }
            // Only the first `grid_paths` paths kept their images.
            grid.extend(chunk_images.into_iter().filter(|strip| !strip.is_empty()));
            oracle.extend(chunk_labels);
        }

        let changed = oracle
            .iter()
            .filter(|path| path.iter().any(|&l| l != path[0]))
            .count();
        let ends_as_b = oracle
            .iter()
            .zip(&nuisances)
            .filter(|(path, &b)| path[steps - 1] == labels[b])
            .count();
        let starts_as_a = oracle
            .iter()
            .zip(&sources)
            .filter(|(path, &a)| path[0] == labels[a])
            .count();
        let fraction = |n: usize| n as f64 / paths as f64;
        ctx.log(format!(
            "{paths} paths of {steps} steps: oracle label changes on {:.1} %, ends as B on {:.1} %, starts as A on {:.1} %; max logit drift {max_logit_drift:.2e}",
            100.0 * fraction(changed),
            100.0 * fraction(ends_as_b),
            100.0 * fraction(starts_as_a)
        ));
        let result = InterpolationResult {
            paths,
            steps,
            fraction_label_changes: fraction(changed),
            fraction_ends_as_nuisance_source: fraction(ends_as_b),
            fraction_starts_as_logit_source: fraction(starts_as_a),
            max_logit_drift,
            oracle_members: members.len(),
            logit_sources: sources,
            nuisance_sources: nuisances,
            oracle_labels: oracle,
        };
        ctx.write_output("interpolation.json", &json_bytes(&result)?)?;
        let rows: Vec<Vec<&[f32]>> = grid
            .iter()
            .map(|strip| strip.iter().map(Vec::as_slice).collect())
            .collect();
        ctx.write_output("strips.png", &image_grid_png(&rows, 28, 2)?)?;
        ctx.set_metric("fraction_label_changes", json!(fraction(changed)));
        Ok(Finished::Done)
    }
}
