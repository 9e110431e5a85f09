//! Metameric sampling (paper § 3, Fig. 4): `x_met = F⁻¹(z_s(A), z_n(B))` takes the logits of A
//! and everything else of B. No optimisation: the inverse does all the work, so the metamer's
//! logits equal A's up to float rounding (claim C5), whatever it looks like.

use dfdx::prelude::*;

use super::flow::FiRevNet;
use super::T2;

/// A batch of metamers and how exact they are.
pub struct Metamers {
    /// `(D, B)` metamers in input space.
    pub x: T2,
    /// max |z_s(x_met) − z_s(A)| over the batch.
    pub max_logit_diff: f32,
    /// ‖F⁻¹(F(x)) − x‖∞ on the logit sources A (data).
    pub reconstruction_data: f32,
    /// ‖F⁻¹(F(x_met)) − x_met‖∞ (inverses can drift off the data manifold).
    pub reconstruction_metamer: f32,
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Metamers of logit sources `xa` and nuisance sources `xb` (same batch size), evaluation mode.
pub fn metameric_sample(model: &FiRevNet, xa: &T2, xb: &T2) -> Metamers {
    let za = model.forward(xa.clone(), None).z;
    let zb = model.forward(xb.clone(), None).z;
    let (rows, b) = *za.shape();
    // z_met = z(B) with the logit rows taken from z(A).
    let mut z_met = zb.as_vec();
    let za_values = za.as_vec();
    for &row in model.logit_indices() {
        z_met[row * b..(row + 1) * b].copy_from_slice(&za_values[row * b..(row + 1) * b]);
    }
    let z_met: T2 = za.device().tensor_from_vec(z_met, (rows, b));
    let x_met = model.inverse(z_met);
    let z_of_met = model.forward(x_met.clone(), None).z;
    let max_logit_diff = max_abs_diff(
        &model.logits(z_of_met.clone()).as_vec(),
        &model.logits(za.clone()).as_vec(),
    );
    let reconstruction_data = max_abs_diff(&model.inverse(za).as_vec(), &xa.as_vec());
    let reconstruction_metamer = max_abs_diff(&model.inverse(z_of_met).as_vec(), &x_met.as_vec());
    Metamers {
        x: x_met,
        max_logit_diff,
        reconstruction_data,
        reconstruction_metamer,
    }
}
