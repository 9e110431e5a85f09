//! From canonical u8 images to model inputs in the row layout.
//!
//! fi-RevNet (paper-notes § 2): 28×28 padded by 2 to 32×32, placed in the last of
//! `channels` channels, uniform dequantisation noise U(0, 1/256) in training, then x ← 2x − 1.
//! CNN: x = k/256 on the plain 28×28 grid.

use dfdx::prelude::*;
use rand::Rng;
use rand_chacha::ChaCha8Rng;

use super::{Dev, T2};

pub const SIDE: usize = 28;
pub const PADDED: usize = 32;
/// Zero padding on each side of the 28×28 image in fi-RevNet inputs.
pub const PAD: usize = (PADDED - SIDE) / 2;
/// A pixel k (0..=255) becomes k / DIVISOR before any other map (both models).
pub const DIVISOR: f32 = 256.0;

/// `(channels·32·32, B)` for the examples `batch` of `images (N·28·28)`. With `noise`, every
/// entry (padding included) gets its own U(0, 1/256) draw before scaling to [−1, 1].
pub fn revnet_input(
    dev: &Dev,
    images: &[u8],
    batch: &[usize],
    channels: usize,
    mut noise: Option<&mut ChaCha8Rng>,
) -> T2 {
    let b = batch.len();
    let rows = channels * PADDED * PADDED;
    let mut x = vec![0.0f32; rows * b];
    for (col, &n) in batch.iter().enumerate() {
        let image = &images[n * SIDE * SIDE..(n + 1) * SIDE * SIDE];
        for y in 0..SIDE {
            for c in 0..SIDE {
                let row = (channels - 1) * PADDED * PADDED + (y + PAD) * PADDED + c + PAD;
                x[row * b + col] = image[y * SIDE + c] as f32 / DIVISOR;
            }
        }
    }
    for v in x.iter_mut() {
        let u = *v
            + noise
                .as_deref_mut()
                .map_or(0.0, |rng| rng.gen::<f32>() / DIVISOR);
        *v = 2.0 * u - 1.0;
    }
    dev.tensor_from_vec(x, (rows, b))
}

/// `(28·28, B)` with values k/256.
pub fn cnn_input(dev: &Dev, images: &[u8], batch: &[usize]) -> T2 {
    let b = batch.len();
    let mut x = vec![0.0f32; SIDE * SIDE * b];
    for (col, &n) in batch.iter().enumerate() {
        for (row, &v) in images[n * SIDE * SIDE..(n + 1) * SIDE * SIDE]
            .iter()
            .enumerate()
        {
            x[row * b + col] = v as f32 / DIVISOR;
        }
    }
    dev.tensor_from_vec(x, (SIDE * SIDE, b))
}

/// fi-RevNet inputs `(channels·32·32, B)` in [−1, 1] → CNN inputs `(28·28, B)` in [0, 1]:
/// the digit channel, cropped to the central 28×28 and clamped to the valid range (a metamer
/// may leave it; the oracle judges the image it would be).
pub fn revnet_to_cnn(x: &T2, channels: usize) -> T2 {
    let (_, b) = *x.shape();
    let values = x.as_vec();
    let mut out = vec![0.0f32; SIDE * SIDE * b];
    for y in 0..SIDE {
        for c in 0..SIDE {
            let src = ((channels - 1) * PADDED * PADDED + (y + 2) * PADDED + c + 2) * b;
            let dst = (y * SIDE + c) * b;
            for n in 0..b {
                out[dst + n] = ((values[src + n] + 1.0) / 2.0).clamp(0.0, 1.0);
            }
        }
    }
    x.device().tensor_from_vec(out, (SIDE * SIDE, b))
}

/// Column `n` of a `(28·28, B)` CNN input as an image (row-major 28×28).
pub fn column_image(x: &[f32], b: usize, n: usize) -> Vec<f32> {
    (0..SIDE * SIDE).map(|r| x[r * b + n]).collect()
}
