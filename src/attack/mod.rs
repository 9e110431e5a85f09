//! Optimisation-based attacks on a trained classifier (paper-notes § 5): the *invariance*
//! attack, which moves an image as little as it needs to make the model's features equal to
//! another image's ([`feature_matching`]), and the *sensitivity* attack, ε-bounded PGD, which
//! moves it within a small ball until the decision changes ([`pgd`]).
//!
//! Both work in image space: 28×28 images with pixels in [0, 1], in the row layout
//! `(784, B)` (pixels in rows, one image per column), so that every model is attacked in the
//! same space and the judges (`crate::oracle`, `crate::knn`) see exactly the attacked image. A
//! model enters through [`Attackable`]: its features of an image batch on any tape, and its
//! class scores from those features. [`Attacked`] wraps a trained [`Model`]: the CNN reads
//! the images as they are; the fi-RevNet reads them through its fixed input map (padding to
//! 32×32 in the digit channel, x ↦ 2x − 1), applied as a differentiable row gather so its
//! gradient reaches the image.

pub mod feature_matching;
pub mod pgd;

use dfdx::prelude::*;
use serde::{Deserialize, Serialize};

use crate::nn::gather::{RowGather, ZERO_ROW};
use crate::nn::input::{PAD, PADDED, SIDE};
use crate::nn::model::Model;
use crate::nn::ops::argmax_rows;
use crate::nn::{Dev, Tp, T2};

/// Which activations the invariance attack matches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Feature {
    /// The class scores (a fi-RevNet's z_s, through its logit BatchNorm if it has one).
    Logits,
    /// The layer the scores are read from: a CNN's 128 penultimate ReLU units; a fi-RevNet's
    /// z_s before the logit BatchNorm (the same as `logits` without one).
    Penultimate,
}

impl Feature {
    pub fn name(self) -> &'static str {
        match self {
            Feature::Logits => "logits",
            Feature::Penultimate => "penultimate",
        }
    }
}

/// A classifier as an attacker sees it.
pub trait Attackable {
    /// The features of images `(784, B)` in [0, 1], on the images' tape.
    fn features<T: Tp>(&self, images: T2<T>, feature: Feature) -> T2<T>;
    /// Class scores `(classes, B)` from the features [`Attackable::features`] returned.
    fn scores_from(&self, features: T2, feature: Feature) -> T2;

    /// Predicted classes of images `(784, B)`.
    fn predict(&self, images: &T2) -> Vec<u8> {
        let logits = self.features(images.clone(), Feature::Logits);
        argmax_rows(&self.scores_from(logits, Feature::Logits))
    }
}

/// A trained model of this crate under attack.
pub struct Attacked<'m> {
    model: &'m Model,
    /// The fi-RevNet's input map: image pixel → padded digit-channel row (zeros elsewhere).
    embed: Option<RowGather>,
}

impl<'m> Attacked<'m> {
    pub fn new(dev: &Dev, model: &'m Model) -> Attacked<'m> {
        let embed = match model {
            Model::RevNet(m) => {
                let channels = m.config.in_channels;
                let mut index = vec![ZERO_ROW; channels * PADDED * PADDED];
                for y in 0..SIDE {
                    for x in 0..SIDE {
                        let row = (channels - 1) * PADDED * PADDED + (y + PAD) * PADDED + x + PAD;
                        index[row] = y * SIDE + x;
                    }
                }
                Some(RowGather::new(dev, index, SIDE * SIDE))
            }
            Model::Cnn(_) => None,
        };
        Attacked { model, embed }
    }

    /// `cnn` or `firevnet`.
    pub fn family(&self) -> &'static str {
        match self.model {
            Model::RevNet(_) => "firevnet",
            Model::Cnn(_) => "cnn",
        }
    }
}

impl Attackable for Attacked<'_> {
    fn features<T: Tp>(&self, images: T2<T>, feature: Feature) -> T2<T> {
        match (self.model, feature) {
            (Model::Cnn(m), Feature::Logits) => m.forward(images),
            (Model::Cnn(m), Feature::Penultimate) => m.penultimate(images),
            (Model::RevNet(m), _) => {
                let embed = self.embed.as_ref().expect("a fi-RevNet has an input map");
                // Exactly `revnet_input` without noise: padding 0 ↦ −1, pixel u ↦ 2u − 1.
                let x = embed.apply(images) * 2.0 - 1.0;
                let z = m.forward(x, None).z;
                match feature {
                    Feature::Logits => m.scores(z),
                    Feature::Penultimate => m.logits(z),
                }
            }
        }
    }

    fn scores_from(&self, features: T2, feature: Feature) -> T2 {
        match (self.model, feature) {
            (_, Feature::Logits) => features,
            (Model::Cnn(m), Feature::Penultimate) => m.logits_from_penultimate(features),
            (Model::RevNet(m), Feature::Penultimate) => match &m.logit_bn {
                Some(bn) => bn.forward_eval(features),
                None => features,
            },
        }
    }
}

/// The features of images `(784, B)` and the gradient of `Σ_columns loss` with respect to the
/// images, where `loss` maps the taped features to a scalar. The weights are frozen meanwhile
/// ([`crate::nn::with_frozen_weights`]): no weight gradient is computed.
pub fn features_and_gradient<M: Attackable>(
    model: &M,
    images: &T2,
    feature: Feature,
    loss: impl FnOnce(T2<OwnedTape<f32, Dev>>) -> Tensor<(), f32, Dev, OwnedTape<f32, Dev>>,
) -> (T2, Vec<f32>) {
    // The weights' gradients are never read here: the ops skip them.
    crate::nn::with_frozen_weights(|| {
        // A clone keeps the tensor id, under which the gradient is found.
        let traced = images.clone().leaky_traced();
        let features = model.features(traced, feature);
        let values = features.retaped::<NoneTape>();
        let grads = loss(features).backward();
        (values, crate::nn::host_copy(&grads.get(images)))
    })
}

/// Column `n` of a `(rows, B)` buffer.
pub fn column(values: &[f32], b: usize, n: usize) -> Vec<f32> {
    let rows = values.len() / b;
    (0..rows).map(|r| values[r * b + n]).collect()
}

/// Images as rows (`n × 784`, what the kNN judge reads) from the column layout `(784, B)`.
pub fn columns_to_rows(values: &[f32], b: usize) -> Vec<f32> {
    (0..b).flat_map(|n| column(values, b, n)).collect()
}

/// The column layout `(784, B)` of test images `indices` (pixels k/256, as the CNN reads them).
pub fn image_columns(images: &[u8], indices: &[usize]) -> Vec<f32> {
    let b = indices.len();
    let mut out = vec![0.0f32; SIDE * SIDE * b];
    for (col, &i) in indices.iter().enumerate() {
        for (row, &p) in images[i * SIDE * SIDE..(i + 1) * SIDE * SIDE]
            .iter()
            .enumerate()
        {
            out[row * b + col] = p as f32 / crate::nn::input::DIVISOR;
        }
    }
    out
}

/// L2 and L∞ distances between the columns of two `(rows, B)` buffers.
pub fn distances(a: &[f32], b_values: &[f32], b: usize) -> Vec<(f64, f64)> {
    let mut out = vec![(0.0f64, 0.0f64); b];
    for (row_a, row_b) in a.chunks(b).zip(b_values.chunks(b)) {
        for (n, (x, y)) in row_a.iter().zip(row_b).enumerate() {
            let d = (*x as f64 - *y as f64).abs();
            out[n].0 += d * d;
            out[n].1 = out[n].1.max(d);
        }
    }
    out.iter().map(|&(sq, inf)| (sq.sqrt(), inf)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::input::{cnn_input, revnet_input};
    use crate::nn::model::ModelConfig;

    /// The attacked fi-RevNet sees exactly what `revnet_input` gives the model in evaluation.
    #[test]
    fn the_firevnet_input_map_is_revnet_input() {
        let dev = crate::nn::device();
        let config: ModelConfig = serde_json::from_value(serde_json::json!({
            "model": "firevnet", "in_channels": 1, "size": 32, "levels": 3, "steps": 1,
            "hidden": 8, "coupling": "additive", "permutation": "reverse", "dropout": 0.0,
            "classes": 10, "permutation_seed": 0
        }))
        .unwrap();
        let model = Model::new(&dev, &config, &mut crate::nn::rng_for(0, "test"));
        let images: Vec<u8> = (0..3 * 784).map(|i| (i * 37 % 256) as u8).collect();
        let batch = [0, 1, 2];
        let attacked = Attacked::new(&dev, &model);
        let x = dev.tensor_from_vec(image_columns(&images, &batch), (784, 3));
        let ours = attacked.features(x, Feature::Logits).as_vec();
        let direct = model
            .logits(revnet_input(&dev, &images, &batch, 1, None))
            .as_vec();
        assert_eq!(ours, direct);
        // And the CNN reads the same columns as `cnn_input`.
        assert_eq!(
            image_columns(&images, &batch),
            cnn_input(&dev, &images, &batch).as_vec()
        );
    }

    /// Freezing the weights changes nothing an attack reads: the input gradient has the same
    /// bits as a backward pass with every gradient, and the conv and linear weights get none.
    #[test]
    fn frozen_weights_give_the_input_gradients_bits_and_no_weight_gradient() {
        use crate::nn::ops::cross_entropy;
        use crate::nn::HasParams;
        let dev = crate::nn::device();
        let configs = [
            serde_json::json!({ "model": "cnn", "width": 4, "side": 28, "classes": 10 }),
            serde_json::json!({
                "model": "firevnet", "in_channels": 1, "size": 32, "levels": 3, "steps": 1,
                "hidden": 8, "coupling": "additive", "permutation": "reverse", "dropout": 0.0,
                "classes": 10, "permutation_seed": 0
            }),
        ];
        for config in configs {
            let config: ModelConfig = serde_json::from_value(config).unwrap();
            let model = Model::new(&dev, &config, &mut crate::nn::rng_for(0, "test"));
            let attacked = Attacked::new(&dev, &model);
            let images: Vec<u8> = (0..3 * 784).map(|i| (i * 37 % 256) as u8).collect();
            let x: T2 = dev.tensor_from_vec(image_columns(&images, &[0, 1, 2]), (784, 3));
            let labels = [3u8, 1, 4];
            let loss = |logits| cross_entropy(logits, &labels);
            let (_, frozen) = features_and_gradient(&attacked, &x, Feature::Logits, loss);

            let full_pass = || {
                let traced = x.clone().leaky_traced();
                loss(attacked.features(traced, Feature::Logits)).backward()
            };
            let full = full_pass();
            assert_eq!(frozen, full.get(&x).as_vec(), "{}", attacked.family());
            assert!(frozen.iter().any(|&g| g != 0.0), "a vacuous gradient");

            let frozen_grads = crate::nn::with_frozen_weights(full_pass);
            // `Grads::get` is dfdx's only public read and panics where there is no gradient
            // (its message is printed; the test goes on).
            let has = |g: &crate::nn::Grads, p: &crate::nn::Param| {
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| g.get(&p.value))).is_ok()
            };
            // Weights off the logits' path (the fi-RevNet's prior convs) have none either way.
            let mut weights_on_path = 0;
            model.visit(&mut |p| {
                if p.name.ends_with(".weight") && p.shape.len() >= 2 && has(&full, p) {
                    weights_on_path += 1;
                    // CUDA composes dfdx's ops, which always compute weight gradients.
                    if cfg!(not(feature = "cuda")) {
                        assert!(
                            !has(&frozen_grads, p),
                            "{}: a gradient while frozen",
                            p.name
                        );
                    }
                }
            });
            assert!(weights_on_path >= 2, "{}", attacked.family());
            // The flag is back: the next pass has weight gradients again.
            assert!(crate::nn::weight_gradients_wanted());
        }
    }
}
