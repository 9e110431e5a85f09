//! Adversarial spheres (Gilmer et al. 2018, "Adversarial Spheres"; paper § 3's spheres
//! figure): two concentric spheres in R^d, the inner one (radius R₁, class 0) and the outer
//! one (radius R₂, class 1).
//!
//! A point is a direction drawn as a normalised standard Gaussian vector (computed in f64),
//! scaled to exactly its sphere's radius and stored as f32 (so ‖x‖ = R up to f32 rounding,
//! ≈ 1e-7 relative). The classes are balanced (⌊n/2⌋ inner points, the rest outer) and their
//! order is shuffled. Everything comes from one ChaCha8 generator seeded by (seed, purpose),
//! so a seed gives the same bytes on every machine; `train` and `test` use different purposes.
//!
//! Arrays: `x` is `n × d` f32 (example-major, as in the `.npy` files), `y` is `n` u8 labels.

use anyhow::{ensure, Context, Result};
use ndarray::{Array1, Array2};
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};

use super::npy_bytes;

/// Class 0: the inner sphere; class 1: the outer sphere.
pub const INNER: u8 = 0;
pub const OUTER: u8 = 1;

/// Points on the two spheres with their labels.
#[derive(Clone, Debug, PartialEq)]
pub struct SpherePoints {
    pub d: usize,
    /// `n × d`, example-major.
    pub x: Vec<f32>,
    pub y: Vec<u8>,
}

/// The generator for one purpose of one seed (the scheme of `nn::rng_for`, kept here so the
/// data module does not depend on the model code).
fn generator(seed: u64, purpose: &str) -> ChaCha8Rng {
    use rand::SeedableRng;
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(format!("{seed}/{purpose}").as_bytes());
    ChaCha8Rng::from_seed(digest.into())
}

/// `n` points in R^`d`: ⌊n/2⌋ on the sphere of radius `r_inner` (label 0), the rest on the
/// sphere of radius `r_outer` (label 1), in a seeded random order.
pub fn sample(
    n: usize,
    d: usize,
    r_inner: f64,
    r_outer: f64,
    seed: u64,
    purpose: &str,
) -> SpherePoints {
    assert!(d >= 1, "spheres need at least one dimension");
    let mut rng = generator(seed, &format!("spheres/{purpose}"));
    let mut y: Vec<u8> = (0..n)
        .map(|i| if i < n / 2 { INNER } else { OUTER })
        .collect();
    y.shuffle(&mut rng);
    let mut x = Vec::with_capacity(n * d);
    let mut direction = vec![0.0f64; d];
    for &label in &y {
        let radius = if label == INNER { r_inner } else { r_outer };
        let norm = loop {
            for v in direction.iter_mut() {
                *v = StandardNormal.sample(&mut rng);
            }
            let norm = direction.iter().map(|v| v * v).sum::<f64>().sqrt();
            // A zero vector has probability 0; redraw rather than divide by it.
            if norm > 0.0 {
                break norm;
            }
        };
        x.extend(direction.iter().map(|v| (v / norm * radius) as f32));
    }
    SpherePoints { d, x, y }
}

impl SpherePoints {
    pub fn len(&self) -> usize {
        self.y.len()
    }

    pub fn is_empty(&self) -> bool {
        self.y.is_empty()
    }

    /// Point `i`.
    pub fn row(&self, i: usize) -> &[f32] {
        &self.x[i * self.d..(i + 1) * self.d]
    }

    /// (inner, outer) counts.
    pub fn class_counts(&self) -> (usize, usize) {
        let inner = self.y.iter().filter(|&&l| l == INNER).count();
        (inner, self.y.len() - inner)
    }

    /// `(x.npy, y.npy)` bytes: `n × d` f32 and `n` u8.
    pub fn npy_files(&self) -> Result<(Vec<u8>, Vec<u8>)> {
        let x = Array2::from_shape_vec((self.len(), self.d), self.x.clone())?;
        let y = Array1::from_vec(self.y.clone());
        Ok((npy_bytes(&x)?, npy_bytes(&y)?))
    }

    /// Reads the two `.npy` files back (labels checked to be 0 or 1, lengths to agree).
    pub fn from_npy(x: &[u8], y: &[u8]) -> Result<SpherePoints> {
        use ndarray_npy::ReadNpyExt;
        let x = Array2::<f32>::read_npy(x).context("decoding spheres x .npy")?;
        let y = Array1::<u8>::read_npy(y).context("decoding spheres y .npy")?;
        ensure!(
            x.nrows() == y.len(),
            "{} points but {} labels",
            x.nrows(),
            y.len()
        );
        if let Some(bad) = y.iter().find(|&&l| l > OUTER) {
            anyhow::bail!("label {bad} is not a sphere (0 = inner, 1 = outer)");
        }
        Ok(SpherePoints {
            d: x.ncols(),
            x: x.iter().copied().collect(),
            y: y.to_vec(),
        })
    }
}

/// ‖x‖ in f64.
pub fn norm(x: &[f32]) -> f64 {
    x.iter().map(|&v| v as f64 * v as f64).sum::<f64>().sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn radii_are_exact_and_classes_balanced() {
        let s = sample(1001, 100, 1.0, 10.0, 0, "test");
        assert_eq!(s.len(), 1001);
        assert_eq!(s.x.len(), 1001 * 100);
        assert_eq!(s.class_counts(), (500, 501));
        for i in 0..s.len() {
            let r = if s.y[i] == INNER { 1.0 } else { 10.0 };
            let rel = (norm(s.row(i)) - r).abs() / r;
            assert!(rel < 1e-6, "point {i}: radius {} vs {r}", norm(s.row(i)));
        }
        // Shuffled: the first half is not all inner.
        assert!(s.y[..500].contains(&OUTER) && s.y[..500].contains(&INNER));
        // Directions are spread out: the mean point is near the origin.
        let mean0: f64 = (0..s.len()).map(|i| s.row(i)[0] as f64).sum::<f64>() / 1001.0;
        assert!(mean0.abs() < 0.3, "mean of x_0 {mean0}");
    }

    #[test]
    fn a_seed_gives_the_same_bytes_and_another_seed_others() {
        let a = sample(64, 10, 1.0, 10.0, 3, "train").npy_files().unwrap();
        let b = sample(64, 10, 1.0, 10.0, 3, "train").npy_files().unwrap();
        assert_eq!(a, b);
        assert_ne!(
            a.0,
            sample(64, 10, 1.0, 10.0, 4, "train").npy_files().unwrap().0
        );
        assert_ne!(
            a.0,
            sample(64, 10, 1.0, 10.0, 3, "test").npy_files().unwrap().0
        );
    }

    #[test]
    fn npy_round_trip() {
        let s = sample(20, 7, 1.0, 10.0, 0, "x");
        let (x, y) = s.npy_files().unwrap();
        assert_eq!(SpherePoints::from_npy(&x, &y).unwrap(), s);
    }
}
