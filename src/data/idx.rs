//! The IDX format of LeCun's MNIST files (also used by Fashion-MNIST): a big-endian header
//! (magic `0x0000_08NN`, NN = number of dimensions, then one u32 per dimension) followed by
//! u8 data. We read `train-images-idx3-ubyte`, `train-labels-idx1-ubyte`, `t10k-…`, each plain
//! or with `.gz`, from a directory ([`read_dataset`]) or as bytes taken from elsewhere, e.g. a
//! Debian package ([`dataset_from_bytes`]).

use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use ndarray::{Array1, Array3};

use super::{maybe_gunzip, Dataset, Split};

/// The four file stems of a dataset directory.
pub const FILES: [&str; 4] = [
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
];

/// Finds `stem` or `stem.gz` in `dir`; `None` if neither exists.
pub fn find(dir: &Path, stem: &str) -> Option<PathBuf> {
    [dir.join(stem), dir.join(format!("{stem}.gz"))]
        .into_iter()
        .find(|p| p.is_file())
}

/// The four files of a dataset directory, or an error naming the first one missing.
pub fn dataset_files(dir: &Path) -> Result<Vec<PathBuf>> {
    FILES
        .iter()
        .map(|stem| {
            find(dir, stem)
                .with_context(|| format!("{} has no {stem} (nor {stem}.gz)", dir.display()))
        })
        .collect()
}

/// Parses IDX bytes into (dimensions, data), checking that the length matches the header.
pub fn parse(bytes: &[u8], what: &Path) -> Result<(Vec<usize>, Vec<u8>)> {
    ensure!(
        bytes.len() >= 4,
        "{}: too short for an IDX header",
        what.display()
    );
    ensure!(
        bytes[0] == 0 && bytes[1] == 0 && bytes[2] == 0x08,
        "{}: not an unsigned-byte IDX file (magic {:02x?})",
        what.display(),
        &bytes[..4]
    );
    let ndim = bytes[3] as usize;
    let header = 4 + 4 * ndim;
    ensure!(
        bytes.len() >= header,
        "{}: truncated IDX header",
        what.display()
    );
    let dims: Vec<usize> = (0..ndim)
        .map(|i| {
            u32::from_be_bytes(bytes[4 + 4 * i..8 + 4 * i].try_into().expect("4 bytes")) as usize
        })
        .collect();
    let expected: usize = dims.iter().product();
    let data = &bytes[header..];
    if data.len() != expected {
        bail!(
            "{}: header says {dims:?} = {expected} bytes of data, file has {}",
            what.display(),
            data.len()
        );
    }
    Ok((dims, data.to_vec()))
}

fn decode_images(raw: Vec<u8>, path: &Path) -> Result<Array3<u8>> {
    let (dims, data) = parse(&maybe_gunzip(raw, path)?, path)?;
    ensure!(
        dims.len() == 3,
        "{}: expected 3 dimensions, found {dims:?}",
        path.display()
    );
    Ok(Array3::from_shape_vec((dims[0], dims[1], dims[2]), data)?)
}

fn decode_labels(raw: Vec<u8>, path: &Path) -> Result<Array1<u8>> {
    let (dims, data) = parse(&maybe_gunzip(raw, path)?, path)?;
    ensure!(
        dims.len() == 1,
        "{}: expected 1 dimension, found {dims:?}",
        path.display()
    );
    Ok(Array1::from_vec(data))
}

/// Reads a whole dataset directory.
pub fn read_dataset(dir: &Path) -> Result<Dataset> {
    let files = dataset_files(dir)?
        .into_iter()
        .map(|path| {
            let raw =
                std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
            Ok((path, raw))
        })
        .collect::<Result<Vec<_>>>()?;
    dataset_from_bytes(dir, files.try_into().expect("four files"))
}

/// Decodes a dataset from the bytes of its four files, in [`FILES`] order, each plain or
/// gzip-compressed. Each path names its file in errors; `origin` names where all four came
/// from (a directory, an archive).
pub fn dataset_from_bytes(origin: &Path, files: [(PathBuf, Vec<u8>); 4]) -> Result<Dataset> {
    let [train_images, train_labels, test_images, test_labels] = files;
    let train = Split::new(
        decode_images(train_images.1, &train_images.0)?,
        decode_labels(train_labels.1, &train_labels.0)?,
    )
    .with_context(|| format!("training split in {}", origin.display()))?;
    let test = Split::new(
        decode_images(test_images.1, &test_images.0)?,
        decode_labels(test_labels.1, &test_labels.0)?,
    )
    .with_context(|| format!("test split in {}", origin.display()))?;
    Ok(Dataset { train, test })
}

/// IDX bytes of an image array (used by tests to cross-check the readers).
pub fn encode_images(images: &Array3<u8>) -> Vec<u8> {
    let mut out = vec![0, 0, 0x08, 3];
    for &d in images.shape() {
        out.extend_from_slice(&(d as u32).to_be_bytes());
    }
    out.extend(images.iter());
    out
}

/// IDX bytes of a label array.
pub fn encode_labels(labels: &Array1<u8>) -> Vec<u8> {
    let mut out = vec![0, 0, 0x08, 1];
    out.extend_from_slice(&(labels.len() as u32).to_be_bytes());
    out.extend(labels.iter());
    out
}
