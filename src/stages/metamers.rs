//! Stage `metamers`: metameric sampling on a trained fi-RevNet.
//!
//! Paper: § 3 and Fig. 4 (logit source / metamer / nuisance source); claims C5 (metamers have
//! exactly A's logits) and C6 (under CE they look like B; under iCE like A: judged by the
//! oracle). For `pairs` seeded test pairs (A, B) with different labels,
//! x_met = F⁻¹(z_s(A), z_n(B)). The same kind runs on Fashion-MNIST (C13, C14: C5 and C6 on a
//! second dataset, judged by a Fashion-MNIST oracle).
//! Inputs: a fi-RevNet's `weights.safetensors`, the oracle's `member*.safetensors`, and the
//! test arrays of the dataset the model was trained on. Outputs: `metamers.npy` (pairs × 28 × 28 f32: the digit channel of each
//! metamer, cropped to 28×28 and clamped to [0, 1], which is what the oracle sees),
//! `metamers.json` (max |z_s(x_met) − z_s(A)|, ‖F⁻¹(F(x)) − x‖∞ on data and on metamers, the
//! oracle's label per metamer and the fractions equal to label(A) / label(B)), and
//! `triplets.png` (A | metamer | B for the first `grid_pairs` pairs).
//! Expected: max logit difference ≤ 1e-4 in f32 (C5); on `cpu`, CE metamers judged as B more
//! often than as A (an independent PyTorch run measured 55 % vs 26 %).
//!
//! Params: `pairs` (≥ 1), `grid_pairs` (≤ pairs).
//!
//! Claims: C5, C6, C13, C14
//! Modules: data, nn, oracle, outputs, report/figures

use anyhow::Result;
use dfdx::prelude::*;
use serde::Deserialize;
use serde_json::json;

use crate::data::{npy_bytes, split_from_npy};
use crate::engine::{at_least, Finished, ParamError, StageContext, StageKind, TypedParams};
use crate::nn::device;
use crate::nn::input::{column_image, revnet_input, revnet_to_cnn};
use crate::nn::metamer::metameric_sample;
use crate::nn::model::{ensemble_predict, Model};
use crate::oracle::{oracle_members, pairs_with_different_labels};
use crate::outputs::{json_bytes, MetamerResult};
use crate::report::figures::image_grid_png;

pub struct Metamers;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetamerParams {
    /// Seeded test pairs (A, B) with different labels.
    pairs: usize,
    /// How many of them the triplet figure shows.
    grid_pairs: usize,
}

impl TypedParams for MetamerParams {
    fn check(&self) -> Result<(), ParamError> {
        at_least("pairs", self.pairs, 1)?;
        if self.grid_pairs > self.pairs {
            return Err(ParamError::new(
                "grid_pairs",
                format!(
                    "{} is out of range: at most pairs ({})",
                    self.grid_pairs, self.pairs
                ),
            ));
        }
        Ok(())
    }
}

impl StageKind for Metamers {
    type Params = MetamerParams;

    fn kind(&self) -> &str {
        "metamers"
    }

    fn code_fingerprint(&self) -> String {
        super::code_fingerprint("metamers")
    }

    fn run(&self, ctx: &mut StageContext, params: &MetamerParams) -> Result<Finished> {
        let dev = device();
        let Model::RevNet(model) =
            Model::from_safetensors(&dev, &ctx.input_named("weights.safetensors")?)?
        else {
            anyhow::bail!(
                "stage {}: metameric sampling needs a fi-RevNet, the weights are of a CNN",
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

        let (pairs, grid_pairs) = (params.pairs, params.grid_pairs);
        let (sources, nuisances) =
            pairs_with_different_labels(&labels, pairs, ctx.seed(), "metamer-pairs");

        let channels = model.config.in_channels;
        let (mut max_logit_diff, mut recon_data, mut recon_metamer) = (0.0f32, 0.0f32, 0.0f32);
        let mut oracle_labels = Vec::with_capacity(pairs);
        let mut metamer_images: Vec<f32> = Vec::with_capacity(pairs * 784);
        let mut grid: Vec<Vec<Vec<f32>>> = Vec::new();
        for (chunk_a, chunk_b) in sources.chunks(100).zip(nuisances.chunks(100)) {
            let xa = revnet_input(&dev, &images, chunk_a, channels, None);
            let xb = revnet_input(&dev, &images, chunk_b, channels, None);
            let m = metameric_sample(&model, &xa, &xb);
            max_logit_diff = max_logit_diff.max(m.max_logit_diff);
            recon_data = recon_data.max(m.reconstruction_data);
            recon_metamer = recon_metamer.max(m.reconstruction_metamer);
            let seen = revnet_to_cnn(&m.x, channels);
            oracle_labels.extend(ensemble_predict(&members, &seen));
            let (values, b) = (seen.as_vec(), chunk_a.len());
            let (va, vb) = (
                revnet_to_cnn(&xa, channels).as_vec(),
                revnet_to_cnn(&xb, channels).as_vec(),
            );
            for n in 0..b {
                metamer_images.extend(column_image(&values, b, n));
                if grid.len() < grid_pairs {
                    grid.push(vec![
                        column_image(&va, b, n),
                        column_image(&values, b, n),
                        column_image(&vb, b, n),
                    ]);
                }
            }
            dev.empty_cache();
        }

        let like_a = sources
            .iter()
            .zip(&oracle_labels)
            .filter(|(&a, &o)| labels[a] == o)
            .count();
        let like_b = nuisances
            .iter()
            .zip(&oracle_labels)
            .filter(|(&b, &o)| labels[b] == o)
            .count();
        let fraction = |n: usize| n as f64 / pairs as f64;
        ctx.log(format!(
            "{pairs} metamers: max |Δz_s| {max_logit_diff:.2e}, reconstruction {recon_data:.2e} (data) / {recon_metamer:.2e} (metamers); oracle says A {:.1} %, B {:.1} %",
            100.0 * fraction(like_a),
            100.0 * fraction(like_b)
        ));
        let result = MetamerResult {
            pairs,
            max_logit_diff,
            reconstruction_data: recon_data,
            reconstruction_metamer: recon_metamer,
            oracle_agrees_with_logit_source: fraction(like_a),
            oracle_agrees_with_nuisance_source: fraction(like_b),
            oracle_members: members.len(),
            logit_sources: sources,
            nuisance_sources: nuisances,
            oracle_labels,
        };
        ctx.write_output("metamers.json", &json_bytes(&result)?)?;
        let array = ndarray::Array3::from_shape_vec((pairs, 28, 28), metamer_images)?;
        ctx.write_output("metamers.npy", &npy_bytes(&array)?)?;
        let rows: Vec<Vec<&[f32]>> = grid
            .iter()
            .map(|t| t.iter().map(Vec::as_slice).collect())
            .collect();
        ctx.write_output("triplets.png", &image_grid_png(&rows, 28, 2)?)?;
        ctx.set_metric("max_logit_diff", json!(max_logit_diff));
        Ok(Finished::Done)
    }
}
