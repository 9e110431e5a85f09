//! Stage `shift_mnist`: a shiftMNIST variant, MNIST with a label shortcut (binary code or
//! class texture) that holds in training and is broken at test.
//!
//! Paper: v4's shiftMNIST section (claim C10; the protocol is ours, paper-notes § 5, since the
//! paper's is not available to us). The builders are `crate::data::shift`.
//! Inputs: the four MNIST arrays.
//! Outputs: the canonical four (`train_images.npy` with every image carrying its own label's
//! shortcut, `train_labels.npy`, `test_images.npy` = the *broken* test set, carrying another
//! class's shortcut, `test_labels.npy` = the true labels), so that the `train` stage trains on
//! it unchanged; plus `test_shortcut_labels.npy` (the class each broken test image's shortcut
//! names), `present_images.npy` (test images with their own label's shortcut),
//! `removed_images.npy` (no shortcut), `examples.png` (per class: a training image, its broken
//! and its shortcut-free test version; digits 84 px wide) and `summary.json`.
//! Expected: 60 000 / 10 000 images; no broken test image carries its own label's shortcut
//! (checked here, and by the builders' tests).
//! Params: `variant` (`binary` | `texture`), `seed` (the textures and the other classes).
//!
//! Claims: none
//! Modules: data, report/figures

use anyhow::{ensure, Context, Result};
use ndarray::Axis;
use serde::Deserialize;

use crate::data::shift::{read_shortcut, ShiftedMnist, Shortcut};
use crate::data::{npy_bytes, split_from_npy, DataSource, Dataset, CLASSES, SIDE};
use crate::engine::{Finished, StageContext, StageKind, TypedParams};
use crate::report::figures::image_grid_png;

pub struct ShiftMnist;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShiftMnistParams {
    variant: Shortcut,
}

impl TypedParams for ShiftMnistParams {}

/// Columns: one example per class (the first of that class in the test set); rows: the
/// training image of that class, the broken test image, the shortcut-free test image.
fn examples_png(shifted: &ShiftedMnist, mnist: &Dataset) -> Result<Vec<u8>> {
    let as_floats = |split: &crate::data::Split, i: usize| -> Vec<f32> {
        split
            .images
            .index_axis(Axis(0), i)
            .iter()
            .map(|&v| v as f32 / 255.0)
            .collect()
    };
    let first_of = |labels: &ndarray::Array1<u8>, c: u8| {
        labels
            .iter()
            .position(|&l| l == c)
            .with_context(|| format!("no example of class {c}"))
    };
    let mut train = Vec::new();
    let mut broken = Vec::new();
    let mut removed = Vec::new();
    for c in 0..CLASSES as u8 {
        let (i, j) = (
            first_of(&mnist.train.labels, c)?,
            first_of(&mnist.test.labels, c)?,
        );
        train.push(as_floats(&shifted.train, i));
        broken.push(as_floats(&shifted.broken, j));
        removed.push(as_floats(&shifted.removed, j));
    }
    let rows: Vec<Vec<&[f32]>> = [&train, &broken, &removed]
        .iter()
        .map(|row| row.iter().map(Vec::as_slice).collect())
        .collect();
    image_grid_png(&rows, SIDE, 3)
}

impl StageKind for ShiftMnist {
    type Params = ShiftMnistParams;

    fn kind(&self) -> &str {
        "shift_mnist"
    }

    fn code_fingerprint(&self) -> String {
        super::code_fingerprint("shift_mnist")
    }

    fn run(&self, ctx: &mut StageContext, params: &ShiftMnistParams) -> Result<Finished> {
        let read = |name: &str| ctx.input_named(name);
        let mnist = Dataset {
            train: split_from_npy(&read("train_images.npy")?, &read("train_labels.npy")?)
                .context("MNIST training split")?,
            test: split_from_npy(&read("test_images.npy")?, &read("test_labels.npy")?)
                .context("MNIST test split")?,
        };
        let shifted = ShiftedMnist::build(params.variant, &mnist, ctx.seed())?;

        // The shortcut must be readable where it should be and name the true class only where
        // it should; a builder bug would otherwise pass silently into every model below.
        let readable = |split: &crate::data::Split, i: usize| {
            read_shortcut(
                params.variant,
                split
                    .images
                    .index_axis(Axis(0), i)
                    .as_slice()
                    .expect("standard layout"),
                &shifted.textures,
            )
        };
        for i in 0..shifted.train.len() {
            ensure!(
                readable(&shifted.train, i) == Some(shifted.train.labels[i]),
                "training image {i}: its shortcut does not name its label"
            );
        }
        for i in 0..shifted.broken.len() {
            ensure!(
                readable(&shifted.broken, i) == Some(shifted.broken_shortcut[i])
                    && shifted.broken_shortcut[i] != shifted.broken.labels[i],
                "broken test image {i}: its shortcut is not another class's"
            );
        }

        let name = match params.variant {
            Shortcut::Binary => "shiftMNIST (binary code)",
            Shortcut::Texture => "shiftMNIST (class texture)",
        };
        let source = DataSource::Derived {
            from: "mnist".into(),
            builder: format!("{:?}", params.variant).to_lowercase(),
            seed: ctx.seed(),
        };
        let canonical = Dataset {
            train: shifted.train.clone(),
            test: shifted.broken.clone(),
        };
        for (file, bytes) in canonical.stage_files(name, source)? {
            ctx.write_output(file, &bytes)?;
        }
        ctx.write_output(
            "test_shortcut_labels.npy",
            &npy_bytes(&shifted.broken_shortcut)?,
        )?;
        ctx.write_output("present_images.npy", &npy_bytes(&shifted.present.images)?)?;
        ctx.write_output("removed_images.npy", &npy_bytes(&shifted.removed.images)?)?;
        ctx.write_output("examples.png", &examples_png(&shifted, &mnist)?)?;
        ctx.log(format!(
            "{name}: {} training images with their label's shortcut; {} test images each as present / broken / removed",
            shifted.train.len(),
            shifted.broken.len()
        ));
        Ok(Finished::Done)
    }
}
