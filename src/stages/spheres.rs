//! Stage `spheres`: the adversarial-spheres data set.
//!
//! Paper: § 3, the spheres figure (after Gilmer et al., "Adversarial Spheres"); claim C9
//! (measured downstream by `spheres_flow` and `spheres_misaligned`). Two concentric spheres
//! in R^d: inner radius `r_inner` (class 0), outer `r_outer` (class 1); the paper's d = 100,
//! R₁ = 1, R₂ = 10. Each point is a normalised standard Gaussian direction (f64) scaled to
//! exactly its radius, stored as f32; classes balanced, order shuffled; training and test
//! points drawn from separate seeded streams (`crate::data::spheres`).
//! Inputs: none. Outputs: `train_x.npy` (f32, train × d), `train_y.npy` (u8: 0 inner,
//! 1 outer), `test_x.npy`, `test_y.npy`, `summary.json` (d, radii, seed, class counts, the
//! largest relative radius error).
//! Expected: radii exact to f32 rounding (≈ 1e-7 relative; checked ≤ 1e-6 before anything is
//! written), classes balanced to one point, the same bytes for the same seed.
//!
//! Params: `d` (≥ 3: two logits and at least one nuisance coordinate), `r_inner`, `r_outer`
//! (0 < r_inner < r_outer), `train`, `test` (≥ 2 points each).
//!
//! Claims: none
//! Modules: data, outputs

use anyhow::{ensure, Result};
use serde::Deserialize;
use serde_json::json;

use crate::data::spheres::{norm, sample, SpherePoints, INNER};
use crate::engine::{
    at_least, positive, Finished, ParamError, StageContext, StageKind, TypedParams,
};
use crate::outputs::{json_bytes, SpheresSplit, SpheresSummary};

pub struct Spheres;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpheresParams {
    d: usize,
    r_inner: f64,
    r_outer: f64,
    /// Points in the training and the test set.
    train: usize,
    test: usize,
}

impl TypedParams for SpheresParams {
    fn check(&self) -> Result<(), ParamError> {
        at_least("d", self.d, 3)?;
        positive("r_inner", self.r_inner)?;
        positive("r_outer", self.r_outer)?;
        if self.r_outer <= self.r_inner {
            return Err(ParamError::new(
                "r_outer",
                format!(
                    "{} is out of range: must exceed r_inner ({})",
                    self.r_outer, self.r_inner
                ),
            ));
        }
        at_least("train", self.train, 2)?;
        at_least("test", self.test, 2)
    }
}

/// max |‖x‖ − R| / R over a set.
fn max_relative_radius_error(points: &SpherePoints, r_inner: f64, r_outer: f64) -> f64 {
    (0..points.len())
        .map(|i| {
            let r = if points.y[i] == INNER {
                r_inner
            } else {
                r_outer
            };
            (norm(points.row(i)) - r).abs() / r
        })
        .fold(0.0, f64::max)
}

impl StageKind for Spheres {
    type Params = SpheresParams;

    fn kind(&self) -> &str {
        "spheres"
    }

    fn code_fingerprint(&self) -> String {
        super::code_fingerprint("spheres")
    }

    fn run(&self, ctx: &mut StageContext, params: &SpheresParams) -> Result<Finished> {
        let (d, r1, r2) = (params.d, params.r_inner, params.r_outer);
        let seed = ctx.seed();
        let train = sample(params.train, d, r1, r2, seed, "train");
        let test = sample(params.test, d, r1, r2, seed, "test");
        let radius_error =
            max_relative_radius_error(&train, r1, r2).max(max_relative_radius_error(&test, r1, r2));
        ensure!(
            radius_error <= 1e-6,
            "sampled radii are off by {radius_error:.2e} (relative): more than f32 rounding"
        );
        let split = |s: &SpherePoints| {
            let (inner, outer) = s.class_counts();
            SpheresSplit {
                n: s.len(),
                inner,
                outer,
            }
        };
        let summary = SpheresSummary {
            d,
            r_inner: r1,
            r_outer: r2,
            seed,
            train: split(&train),
            test: split(&test),
            max_relative_radius_error: radius_error,
        };
        for (prefix, set) in [("train", &train), ("test", &test)] {
            let (x, y) = set.npy_files()?;
            ctx.write_output(&format!("{prefix}_x.npy"), &x)?;
            ctx.write_output(&format!("{prefix}_y.npy"), &y)?;
        }
        ctx.write_output("summary.json", &json_bytes(&summary)?)?;
        ctx.log(format!(
            "spheres in R^{d}: R1 = {r1}, R2 = {r2}; {} training and {} test points; radii exact to {radius_error:.1e} (relative)",
            train.len(),
            test.len()
        ));
        ctx.set_metric("max_relative_radius_error", json!(radius_error));
        Ok(Finished::Done)
    }
}
