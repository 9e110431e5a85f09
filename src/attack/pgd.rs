//! ε-bounded projected gradient descent (Madry et al.): the *sensitivity* side of the
//! paper's contrast, as robust accuracy against ε (paper-notes § 5: "a Foolbox-style table; not
//! in the paper").
//!
//! Untargeted: maximise the cross-entropy of the true label. From a random start in the ball
//! (L∞: uniform per pixel in [−ε, ε]; L2: uniform in the ball), take `steps` steps of size
//! α = step_factor · ε / steps (L∞: along the gradient's sign; L2: along the unit gradient),
//! projecting after each onto the ball around the clean image and then onto [0, 1]^784.
//! Clipping to the box after the ball keeps the point in the ball (each coordinate moves
//! towards the clean image's, which lies in the box), so every iterate satisfies both
//! constraints; a test checks it on every step.
//!
//! An example counts as broken at the first iterate (the random start included) that the model
//! misclassifies, and that iterate is its adversarial image; it is not updated after that. A
//! clean error is broken at the start, so robust accuracy at ε = 0 is the clean accuracy.

use dfdx::prelude::*;
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;
use serde::{Deserialize, Serialize};

use super::feature_matching::select_columns;
use super::{features_and_gradient, Attackable, Feature};
use crate::nn::ops::{argmax_rows, cross_entropy};
use crate::nn::{Dev, T2};

/// The threat model.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Norm {
    Linf,
    L2,
}

impl Norm {
    pub fn name(self) -> &'static str {
        match self {
            Norm::Linf => "linf",
            Norm::L2 => "l2",
        }
    }
}

/// Sees every iterate of a run (tests check the constraints on each).
pub type Observer<'a> = dyn FnMut(&[f32]) + 'a;

/// One PGD run's settings.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Pgd {
    pub norm: Norm,
    pub epsilon: f32,
    pub steps: usize,
    pub step_factor: f32,
}

/// The outcome for one batch.
pub struct Attacked {
    /// Adversarial images `(784, B)` (column layout): the first misclassified iterate of a
    /// broken example (it is not moved after that), the last iterate of one that held.
    pub images: Vec<f32>,
    pub broken: Vec<bool>,
    /// The model's class of each returned image (when it was evaluated: at the break, or
    /// after the last step).
    pub prediction: Vec<u8>,
}

impl Pgd {
    pub fn step_size(&self) -> f32 {
        self.step_factor * self.epsilon / self.steps.max(1) as f32
    }

    /// Attacks clean images `(784, B)` with labels; `rng` draws the random start; `observe`
    /// sees every iterate (the start, then after every step).
    pub fn run<M: Attackable>(
        &self,
        dev: &Dev,
        model: &M,
        clean: &[f32],
        labels: &[u8],
        rng: &mut ChaCha8Rng,
        mut observe: Option<&mut Observer>,
    ) -> Attacked {
        let b = labels.len();
        let rows = clean.len() / b;
        let mut x = clean.to_vec();
        match self.norm {
            Norm::Linf => {
                for v in x.iter_mut() {
                    *v += self.epsilon * rng.gen_range(-1.0f32..=1.0);
                }
            }
            Norm::L2 => {
                // Gaussian direction, radius ε·u^(1/d): uniform in the ball.
                let mut delta: Vec<f32> =
                    (0..x.len()).map(|_| rng.sample(StandardNormal)).collect();
                let radii: Vec<f32> = (0..b)
                    .map(|_| self.epsilon * rng.gen::<f32>().powf(1.0 / rows as f32))
                    .collect();
                let norms = column_norms(&delta, b);
                for (i, d) in delta.iter_mut().enumerate() {
                    let n = i % b;
                    *d *= if norms[n] > 0.0 {
                        radii[n] / norms[n]
                    } else {
                        0.0
                    };
                }
                for (v, d) in x.iter_mut().zip(&delta) {
                    *v += d;
                }
            }
        }
        let all = vec![true; b];
        self.project(&mut x, clean, b, &all);
        if let Some(f) = observe.as_deref_mut() {
            f(&x);
        }

        let mut broken = vec![false; b];
        let mut prediction = vec![0u8; b];
        let alpha = self.step_size();
        // A broken example is frozen at its first misclassified iterate, and the batch shrinks
        // to the examples still holding. After the last step the iterate is only evaluated.
        for step in 0..=self.steps {
            let active: Vec<usize> = (0..b).filter(|&n| !broken[n]).collect();
            if active.is_empty() {
                break;
            }
            let a = active.len();
            let images: T2 = dev.tensor_from_vec(select_columns(&x, b, &active), (rows, a));
            let labels_a: Vec<u8> = active.iter().map(|&n| labels[n]).collect();
            let last = step == self.steps;
            let (logits, grad) = if last {
                (model.features(images, Feature::Logits), Vec::new())
            } else {
                features_and_gradient(model, &images, Feature::Logits, |logits| {
                    cross_entropy(logits, &labels_a)
                })
            };
            let classes = argmax_rows(&model.scores_from(logits, Feature::Logits));
            let mut moving = vec![false; b];
            for (j, &n) in active.iter().enumerate() {
                prediction[n] = classes[j];
                broken[n] = classes[j] != labels[n];
                moving[n] = !broken[n] && !last;
            }
            if last {
                break;
            }
            let grad_norms = column_norms(&grad, a);
            for (j, &n) in active.iter().enumerate() {
                if !moving[n] {
                    continue;
                }
                for r in 0..rows {
                    let g = grad[r * a + j];
                    x[r * b + n] += match self.norm {
                        // sign(0) = 0: no direction, no move.
                        Norm::Linf => {
                            alpha
                                * if g > 0.0 {
                                    1.0
                                } else if g < 0.0 {
                                    -1.0
                                } else {
                                    0.0
                                }
                        }
                        Norm::L2 if grad_norms[j] > 0.0 => alpha * g / grad_norms[j],
                        Norm::L2 => 0.0,
                    };
                }
            }
            self.project(&mut x, clean, b, &moving);
            if let Some(f) = observe.as_deref_mut() {
                f(&x);
            }
            dev.empty_cache();
        }
        dev.empty_cache();
        Attacked {
            images: x,
            broken,
            prediction,
        }
    }

    /// Onto the ball around `clean`, then onto [0, 1], for the `active` columns.
    fn project(&self, x: &mut [f32], clean: &[f32], b: usize, active: &[bool]) {
        match self.norm {
            Norm::Linf => {
                for (i, (v, c)) in x.iter_mut().zip(clean).enumerate() {
                    if active[i % b] {
                        *v = v.clamp(c - self.epsilon, c + self.epsilon);
                    }
                }
            }
            Norm::L2 => {
                let delta: Vec<f32> = x.iter().zip(clean).map(|(v, c)| v - c).collect();
                let norms = column_norms(&delta, b);
                for (i, (v, c)) in x.iter_mut().zip(clean).enumerate() {
                    let n = i % b;
                    if active[n] && norms[n] > self.epsilon {
                        *v = c + delta[i] * (self.epsilon / norms[n]);
                    }
                }
            }
        }
        for (i, v) in x.iter_mut().enumerate() {
            if active[i % b] {
                *v = v.clamp(0.0, 1.0);
            }
        }
    }
}

/// L2 norm of each column of a `(rows, B)` buffer (accumulated in f64).
fn column_norms(values: &[f32], b: usize) -> Vec<f32> {
    let mut sums = vec![0.0f64; b];
    for (i, v) in values.iter().enumerate() {
        sums[i % b] += (*v as f64) * (*v as f64);
    }
    sums.iter().map(|s| s.sqrt() as f32).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::Tp;

    /// A small nonlinear classifier on 16 pixels: scores = V relu(W x).
    struct Toy {
        w: T2,
        v: T2,
    }

    impl Attackable for Toy {
        fn features<T: Tp>(&self, images: T2<T>, _feature: Feature) -> T2<T> {
            let h = self.w.clone().retaped::<T>().matmul(images).relu();
            self.v.clone().retaped::<T>().matmul(h)
        }
        fn scores_from(&self, features: T2, _feature: Feature) -> T2 {
            features
        }
    }

    const DIMS: usize = 16;
    const B: usize = 24;

    fn setup() -> (Dev, Toy, Vec<f32>, Vec<u8>) {
        let dev = crate::nn::device();
        let mut rng = crate::nn::rng_for(0, "pgd-toy");
        let mut random =
            |n: usize| -> Vec<f32> { (0..n).map(|_| rng.gen_range(-1.0..1.0)).collect() };
        let toy = Toy {
            w: dev.tensor_from_vec(random(32 * DIMS), (32, DIMS)),
            v: dev.tensor_from_vec(random(4 * 32), (4, 32)),
        };
        let clean: Vec<f32> = random(DIMS * B).iter().map(|v| (v + 1.0) / 2.0).collect();
        // Labels: the toy's own predictions, except a few it gets wrong.
        let mut labels = toy.predict(&dev.tensor_from_vec(clean.clone(), (DIMS, B)));
        labels[0] = (labels[0] + 1) % 4;
        labels[5] = (labels[5] + 2) % 4;
        (dev, toy, clean, labels)
    }

    #[test]
    fn pgd_never_leaves_the_ball_or_the_box() {
        let (dev, toy, clean, labels) = setup();
        for (norm, epsilon) in [
            (Norm::Linf, 0.1),
            (Norm::Linf, 0.3),
            (Norm::L2, 0.5),
            (Norm::L2, 2.0),
        ] {
            let pgd = Pgd {
                norm,
                epsilon,
                steps: 20,
                step_factor: 2.5,
            };
            let mut iterates = 0;
            let mut check = |x: &[f32]| {
                iterates += 1;
                assert!(
                    x.iter().all(|v| (0.0..=1.0).contains(v)),
                    "{norm:?} left [0, 1]"
                );
                let delta: Vec<f32> = x.iter().zip(&clean).map(|(a, c)| a - c).collect();
                let sizes: Vec<f32> = match norm {
                    Norm::Linf => (0..B)
                        .map(|n| {
                            (0..DIMS)
                                .map(|r| delta[r * B + n].abs())
                                .fold(0.0, f32::max)
                        })
                        .collect(),
                    Norm::L2 => column_norms(&delta, B),
                };
                // The L2 rescaling rounds: allow a few ulps of ε.
                let limit = epsilon * (1.0 + 4.0 * f32::EPSILON);
                assert!(
                    sizes.iter().all(|&s| s <= limit),
                    "{norm:?} ε = {epsilon}: {sizes:?}"
                );
            };
            let result = pgd.run(
                &dev,
                &toy,
                &clean,
                &labels,
                &mut crate::nn::rng_for(0, "start"),
                Some(&mut check),
            );
            // The start and every step were observed; the run ends early only once every
            // example is broken (then nothing moves any more).
            assert!(iterates >= 2, "{iterates} iterates");
            assert!(
                iterates == 21 || result.broken.iter().all(|&b| b),
                "stopped after {iterates} iterates with examples still holding"
            );
            // The attack does something on this toy: more than the two clean errors break.
            if epsilon >= 0.3 || norm == Norm::L2 {
                let broken = result.broken.iter().filter(|&&b| b).count();
                assert!(broken > 2, "{norm:?} ε = {epsilon}: {broken} broken");
            }
            assert!(
                result.broken[0] && result.broken[5],
                "clean errors count as broken"
            );
        }
    }

    #[test]
    fn pgd_at_epsilon_zero_leaves_accuracy_unchanged() {
        let (dev, toy, clean, labels) = setup();
        let clean_prediction = toy.predict(&dev.tensor_from_vec(clean.clone(), (DIMS, B)));
        for norm in [Norm::Linf, Norm::L2] {
            let pgd = Pgd {
                norm,
                epsilon: 0.0,
                steps: 10,
                step_factor: 2.5,
            };
            let result = pgd.run(
                &dev,
                &toy,
                &clean,
                &labels,
                &mut crate::nn::rng_for(0, "start"),
                None,
            );
            assert_eq!(result.images, clean, "{norm:?}");
            assert_eq!(result.prediction, clean_prediction);
            let wrong: Vec<bool> = clean_prediction
                .iter()
                .zip(&labels)
                .map(|(p, y)| p != y)
                .collect();
            assert_eq!(result.broken, wrong);
        }
    }
}
