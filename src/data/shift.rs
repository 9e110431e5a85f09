//! shiftMNIST builders (paper v4's shortcut experiment; our protocol, paper-notes § 5): MNIST
//! with a *shortcut*, a feature that predicts the label perfectly in training and lies at test.
//!
//! - [`Shortcut::Binary`]: the label's code drawn as four 3×3 squares in the top-left corner
//!   (rows 0–2, columns 0–11; 1.2 % of MNIST training digits have any ink there, and the block
//!   is overwritten in every image so that stray ink cannot fake a code). The code of class c
//!   is c + 1 in binary, most significant bit left, so that no class has the all-dark code of
//!   the shortcut-free set.
//! - [`Shortcut::Texture`]: one background texture per class, an oriented grating with its own
//!   angle, period and phase plus fixed noise (all drawn from the seed), blended where the digit
//!   is dark: `out = digit + (255 − digit)/255 · texture`. Where the digit is 0 the pixel *is*
//!   the texture, so the texture is readable exactly.
//!
//! Four sets come out of one MNIST dataset ([`ShiftedMnist`]): training images with their own
//! label's shortcut; the test images with their own label's shortcut (`present`, held out);
//! with the shortcut of a uniformly drawn *other* class (`broken`); and with none (`removed`).
//! A model that reads only the shortcut gets 100 % error on `broken`; one that reads the digit
//! gets its usual error on all three. Everything is a function of the MNIST bytes and the seed:
//! the same seed gives the same bytes.

use anyhow::{ensure, Result};
use ndarray::{Array1, Array3};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::{Dataset, Split, CLASSES, SIDE};

/// Which shortcut the images carry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Shortcut {
    Binary,
    Texture,
}

/// Side of one code square, in pixels.
const BIT_SIDE: usize = 3;
/// Bits of the code: 10 classes + the shortcut-free code 0 need 4.
const BITS: usize = 4;
/// Brightest value a texture reaches (of 255): dimmer than the digit strokes.
const TEXTURE_PEAK: f64 = 110.0;

/// A seeded generator per purpose (the same scheme as `nn::rng_for`; data does not depend on
/// nn).
fn rng_for(seed: u64, purpose: &str) -> ChaCha8Rng {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(format!("{seed}/shiftmnist/{purpose}").as_bytes());
    ChaCha8Rng::from_seed(digest.into())
}

/// The per-class textures, `CLASSES × 28·28` values in 0..=TEXTURE_PEAK.
#[derive(Clone, Debug, PartialEq)]
pub struct Textures(Vec<[u8; SIDE * SIDE]>);

impl Textures {
    /// Class c's grating is oriented at c·180°/10 (ten distinct orientations), has a period of
    /// 4, 5 or 6 pixels and a phase from the seed; fixed noise of ±15 % keeps it from being a
    /// pure sinusoid.
    pub fn new(seed: u64) -> Textures {
        let mut rng = rng_for(seed, "textures");
        let textures = (0..CLASSES)
            .map(|c| {
                let angle = c as f64 * std::f64::consts::PI / CLASSES as f64;
                let period = 4.0 + (c % 3) as f64;
                let phase = rng.gen::<f64>() * std::f64::consts::TAU;
                let mut t = [0u8; SIDE * SIDE];
                for (p, v) in t.iter_mut().enumerate() {
                    let (y, x) = ((p / SIDE) as f64, (p % SIDE) as f64);
                    let along = x * angle.cos() + y * angle.sin();
                    let wave = 0.5 + 0.5 * (std::f64::consts::TAU * along / period + phase).sin();
                    let noise = 0.15 * (2.0 * rng.gen::<f64>() - 1.0);
                    *v =
                        (TEXTURE_PEAK * (0.85 * wave + 0.15 + noise).clamp(0.0, 1.0)).round() as u8;
                }
                t
            })
            .collect();
        Textures(textures)
    }

    pub fn of(&self, class: u8) -> &[u8; SIDE * SIDE] {
        &self.0[class as usize]
    }
}

/// Where the code block is: `(row, column)` of every pixel of bit `bit`.
fn bit_pixels(bit: usize) -> impl Iterator<Item = usize> {
    (0..BIT_SIDE).flat_map(move |r| (0..BIT_SIDE).map(move |c| r * SIDE + bit * BIT_SIDE + c))
}

/// Clears the code block (the shortcut-free images: code 0, which no class has).
fn clear_code(image: &mut [u8]) {
    for bit in 0..BITS {
        bit_pixels(bit).for_each(|p| image[p] = 0);
    }
}

/// Draws class `class`'s code (class + 1 in binary, most significant bit left).
fn draw_code(image: &mut [u8], class: u8) {
    let code = class as usize + 1;
    for bit in 0..BITS {
        let on = (code >> (BITS - 1 - bit)) & 1 == 1;
        bit_pixels(bit).for_each(|p| image[p] = if on { 255 } else { 0 });
    }
}

/// Blends a texture into the dark parts of a digit.
fn blend_texture(image: &mut [u8], texture: &[u8; SIDE * SIDE]) {
    for (v, &t) in image.iter_mut().zip(texture.iter()) {
        let d = *v as u32;
        *v = (d + ((255 - d) * t as u32 + 127) / 255) as u8;
    }
}

/// The class a shortcut names, read back from an image (`None`: no readable shortcut). For the
/// binary code, the block's squares; for textures, the one texture the image agrees with on
/// its background (a blended pixel is never darker than the texture, and equals it where the
/// digit is 0), taking the texture with the most exact matches among those never violated.
pub fn read_shortcut(shortcut: Shortcut, image: &[u8], textures: &Textures) -> Option<u8> {
    match shortcut {
        Shortcut::Binary => {
            let mut code = 0usize;
            for bit in 0..BITS {
                let pixels: Vec<u8> = bit_pixels(bit).map(|p| image[p]).collect();
                let on = if pixels.iter().all(|&v| v == 255) {
                    1
                } else if pixels.iter().all(|&v| v == 0) {
                    0
                } else {
                    return None;
                };
                code = (code << 1) | on;
            }
            (1..=CLASSES).contains(&code).then(|| (code - 1) as u8)
        }
        Shortcut::Texture => (0..CLASSES as u8)
            .filter(|&c| image.iter().zip(textures.of(c)).all(|(&v, &t)| v >= t))
            .map(|c| {
                let exact = image
                    .iter()
                    .zip(textures.of(c))
                    .filter(|(v, t)| v == t)
                    .count();
                (exact, std::cmp::Reverse(c))
            })
            .max()
            .map(|(_, std::cmp::Reverse(c))| c),
    }
}

/// One image with class `class`'s shortcut (`None`: the shortcut-free version).
pub fn stamp(shortcut: Shortcut, image: &mut [u8], class: Option<u8>, textures: &Textures) {
    match (shortcut, class) {
        (Shortcut::Binary, Some(c)) => draw_code(image, c),
        (Shortcut::Binary, None) => clear_code(image),
        (Shortcut::Texture, Some(c)) => blend_texture(image, textures.of(c)),
        (Shortcut::Texture, None) => {}
    }
}

/// The four sets of one shiftMNIST variant.
#[derive(Clone, Debug, PartialEq)]
pub struct ShiftedMnist {
    /// Training images, each with its own label's shortcut.
    pub train: Split,
    /// Test images with their own label's shortcut (the shortcut still holds).
    pub present: Split,
    /// Test images with the shortcut of another class (`broken_shortcut`).
    pub broken: Split,
    /// For every broken test image, the class its shortcut names (never its label).
    pub broken_shortcut: Array1<u8>,
    /// Test images without any shortcut.
    pub removed: Split,
    pub textures: Textures,
}

impl ShiftedMnist {
    /// Builds the variant from MNIST; the other class of each broken test image is uniform
    /// over the nine classes that are not its label, drawn from `seed`.
    pub fn build(shortcut: Shortcut, mnist: &Dataset, seed: u64) -> Result<ShiftedMnist> {
        let textures = Textures::new(seed);
        let with = |split: &Split, class_of: &dyn Fn(usize) -> Option<u8>| -> Result<Split> {
            let mut images = split.images.clone();
            for (i, mut image) in images.outer_iter_mut().enumerate() {
                let pixels = image
                    .as_slice_mut()
                    .expect("a fresh Array3 is in standard layout");
                stamp(shortcut, pixels, class_of(i), &textures);
            }
            Split::new(images, split.labels.clone())
        };
        let mut rng = rng_for(seed, "other-class");
        let broken_shortcut: Array1<u8> = mnist
            .test
            .labels
            .iter()
            .map(|&label| {
                // Uniform over the other nine classes: a draw from 0..9 skipping the label.
                let draw = rng.gen_range(0..CLASSES as u8 - 1);
                if draw >= label {
                    draw + 1
                } else {
                    draw
                }
            })
            .collect();
        let train = with(&mnist.train, &|i| Some(mnist.train.labels[i]))?;
        let present = with(&mnist.test, &|i| Some(mnist.test.labels[i]))?;
        let broken = with(&mnist.test, &|i| Some(broken_shortcut[i]))?;
        let removed = with(&mnist.test, &|_| None)?;
        ensure!(
            broken_shortcut
                .iter()
                .zip(mnist.test.labels.iter())
                .all(|(s, l)| s != l),
            "a broken shortcut names the true class"
        );
        Ok(ShiftedMnist {
            train,
            present,
            broken,
            broken_shortcut,
            removed,
            textures,
        })
    }

    /// The textures as an image array `(10, 28, 28)` (all zero for the binary variant's
    /// figure, which has none).
    pub fn texture_array(&self) -> Array3<u8> {
        let flat: Vec<u8> = self.textures.0.iter().flatten().copied().collect();
        Array3::from_shape_vec((CLASSES, SIDE, SIDE), flat).expect("10 textures of 28×28")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small MNIST stand-in: digits are random strokes avoiding nothing in particular (ink
    /// in the code block too, which the builder must overwrite).
    fn fake_mnist(n_train: usize, n_test: usize) -> Dataset {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let mut split = |n: usize| {
            let images = Array3::from_shape_fn((n, SIDE, SIDE), |_| {
                if rng.gen::<f32>() < 0.2 {
                    rng.gen()
                } else {
                    0
                }
            });
            let labels = Array1::from_shape_fn(n, |i| (i % CLASSES) as u8);
            Split::new(images, labels).unwrap()
        };
        Dataset {
            train: split(n_train),
            test: split(n_test),
        }
    }

    #[test]
    fn in_training_the_shortcut_names_the_label_and_at_test_never_the_true_one() {
        let mnist = fake_mnist(200, 300);
        for shortcut in [Shortcut::Binary, Shortcut::Texture] {
            let shifted = ShiftedMnist::build(shortcut, &mnist, 3).unwrap();
            let read = |split: &Split, i: usize| {
                read_shortcut(
                    shortcut,
                    split
                        .images
                        .index_axis(ndarray::Axis(0), i)
                        .as_slice()
                        .unwrap(),
                    &shifted.textures,
                )
            };
            for i in 0..mnist.train.len() {
                assert_eq!(
                    read(&shifted.train, i),
                    Some(mnist.train.labels[i]),
                    "{shortcut:?} train {i}"
                );
            }
            for i in 0..mnist.test.len() {
                let label = mnist.test.labels[i];
                assert_eq!(
                    read(&shifted.present, i),
                    Some(label),
                    "{shortcut:?} present {i}"
                );
                assert_eq!(
                    read(&shifted.broken, i),
                    Some(shifted.broken_shortcut[i]),
                    "{shortcut:?} broken {i}"
                );
                assert_ne!(shifted.broken_shortcut[i], label, "{shortcut:?} broken {i}");
            }
            // Labels are untouched; the shortcut-free binary set has code 0, which names no
            // class.
            assert_eq!(shifted.broken.labels, mnist.test.labels);
            if shortcut == Shortcut::Binary {
                assert!((0..mnist.test.len()).all(|i| read(&shifted.removed, i).is_none()));
            } else {
                assert_eq!(shifted.removed.images, mnist.test.images);
            }
        }
    }

    #[test]
    fn broken_shortcuts_cover_every_other_class() {
        let mnist = fake_mnist(10, 2000);
        let shifted = ShiftedMnist::build(Shortcut::Binary, &mnist, 0).unwrap();
        let mut counts = [[0usize; CLASSES]; CLASSES];
        for (l, s) in mnist.test.labels.iter().zip(shifted.broken_shortcut.iter()) {
            counts[*l as usize][*s as usize] += 1;
        }
        // 200 test images per label over 9 other classes: about 22 each.
        for (l, row) in counts.iter().enumerate() {
            for (s, &n) in row.iter().enumerate() {
                if s == l {
                    assert_eq!(n, 0);
                } else {
                    assert!(
                        (5..=45).contains(&n),
                        "label {l} got shortcut {s} {n} times"
                    );
                }
            }
        }
    }

    #[test]
    fn builders_are_byte_identical_for_a_seed_and_differ_across_seeds() {
        let mnist = fake_mnist(50, 50);
        for shortcut in [Shortcut::Binary, Shortcut::Texture] {
            let a = ShiftedMnist::build(shortcut, &mnist, 5).unwrap();
            let b = ShiftedMnist::build(shortcut, &mnist, 5).unwrap();
            assert_eq!(a, b);
            let c = ShiftedMnist::build(shortcut, &mnist, 6).unwrap();
            assert_ne!(a.broken_shortcut, c.broken_shortcut);
            if shortcut == Shortcut::Texture {
                assert_ne!(a.textures, c.textures);
            }
        }
    }

    #[test]
    fn textures_are_distinct_per_class_and_dimmer_than_strokes() {
        let t = Textures::new(0);
        for a in 0..CLASSES as u8 {
            assert!(t.of(a).iter().all(|&v| v as f64 <= TEXTURE_PEAK));
            for b in 0..a {
                let differing = t.of(a).iter().zip(t.of(b)).filter(|(x, y)| x != y).count();
                assert!(
                    differing > SIDE * SIDE / 2,
                    "textures {a} and {b} differ in {differing} pixels"
                );
            }
        }
    }
}
