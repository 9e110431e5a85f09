//! Stage `fashion_mnist`: Fashion-MNIST in canonical form (same arrays as `mnist`).
//!
//! Paper: the Fashion-MNIST analogue of Table 1 and the metamer grids (paper-notes § 4);
//! not in the paper's own MNIST tables. Inputs: none. By default the pinned Debian package
//! `dataset-fashion-mnist=0.0~git20200523.55506a9-1` (downloaded into the cache with
//! `apt-get download`, else with curl from the Debian pool; no root needed; SHA-256 checked),
//! unpacked in Rust; its four IDX members under `usr/share/datasets/fashion-mnist/` are
//! checked against their pinned hashes too. `dir` reads the standard IDX files (plain or .gz)
//! from a directory instead (e.g. the installed package's), `archive` a local copy of the .deb.
//! Outputs: `train_images.npy` (60000×28×28 u8), `train_labels.npy`, `test_images.npy`
//! (10000×28×28), `test_labels.npy`, and `summary.json` (sizes, class counts, source).
//! Expected: 60 000 train, 10 000 test, 6 000 / 1 000 per class; every source byte-identical.
//!
//! Claims: none
//! Modules: data

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use serde::Deserialize;

use crate::data::{deb, idx, DataSource};
use crate::engine::{Finished, ParamError, StageContext, StageKind, TypedParams};

pub struct FashionMnist;

/// Where the IDX files sit inside the package.
const DIR_IN_PACKAGE: &str = "usr/share/datasets/fashion-mnist";

/// The pinned default source, and the two local alternatives (empty = unused).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FashionMnistParams {
    /// Debian binary package and its exact version (`apt-get download PACKAGE=VERSION`).
    package: String,
    version: String,
    /// File name of the .deb and its SHA-256.
    deb: String,
    deb_sha256: String,
    /// SHA-256 of each gzip-compressed IDX file inside the package.
    train_images_sha256: String,
    train_labels_sha256: String,
    test_images_sha256: String,
    test_labels_sha256: String,
    /// Standard IDX files (plain or .gz) instead of the package.
    dir: String,
    /// A local copy of the .deb.
    archive: String,
}

impl TypedParams for FashionMnistParams {
    fn check(&self) -> Result<(), ParamError> {
        for (name, value) in [
            ("deb_sha256", &self.deb_sha256),
            ("train_images_sha256", &self.train_images_sha256),
            ("train_labels_sha256", &self.train_labels_sha256),
            ("test_images_sha256", &self.test_images_sha256),
            ("test_labels_sha256", &self.test_labels_sha256),
        ] {
            if value.len() != 64
                || !value
                    .bytes()
                    .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
            {
                return Err(ParamError::new(
                    name,
                    format!("{value:?} is not a SHA-256 (64 lower-case hex digits)"),
                ));
            }
        }
        if self.package.is_empty() || self.version.is_empty() {
            return Err(ParamError::new(
                if self.package.is_empty() {
                    "package"
                } else {
                    "version"
                },
                "must name the Debian package and its exact version",
            ));
        }
        if !self.deb.ends_with(".deb") || self.deb.contains('/') {
            return Err(ParamError::new(
                "deb",
                format!("{:?} is not a .deb file name", self.deb),
            ));
        }
        if !self.dir.is_empty() && !self.archive.is_empty() {
            return Err(ParamError::new(
                "archive",
                "set `dir` or `archive`, not both",
            ));
        }
        Ok(())
    }
}

impl FashionMnistParams {
    fn pinned(&self) -> deb::PinnedDeb {
        let hashes = [
            &self.train_images_sha256,
            &self.train_labels_sha256,
            &self.test_images_sha256,
            &self.test_labels_sha256,
        ];
        deb::PinnedDeb {
            package: self.package.clone(),
            version: self.version.clone(),
            deb: self.deb.clone(),
            deb_sha256: self.deb_sha256.clone(),
            members: idx::FILES
                .iter()
                .zip(hashes)
                .map(|(stem, sha256)| deb::PinnedMember {
                    path: format!("{DIR_IN_PACKAGE}/{stem}.gz"),
                    sha256: sha256.clone(),
                })
                .collect(),
        }
    }
}

impl StageKind for FashionMnist {
    type Params = FashionMnistParams;

    fn kind(&self) -> &str {
        "fashion_mnist"
    }

    fn code_fingerprint(&self) -> String {
        super::code_fingerprint("fashion_mnist")
    }

    /// A local directory or archive is read from outside the repository: its content goes
    /// into the key. The default source is pinned by the hashes among the params.
    fn external_files(&self, params: &FashionMnistParams) -> Result<Vec<PathBuf>> {
        let (dir, archive) = (params.dir.as_str(), params.archive.as_str());
        if !dir.is_empty() {
            let dir = Path::new(dir);
            Ok(idx::FILES
                .iter()
                .map(|stem| idx::find(dir, stem).unwrap_or_else(|| dir.join(stem)))
                .collect())
        } else if !archive.is_empty() {
            Ok(vec![PathBuf::from(archive)])
        } else {
            Ok(Vec::new())
        }
    }

    fn run(&self, ctx: &mut StageContext, params: &FashionMnistParams) -> Result<Finished> {
        let pinned = params.pinned();
        let (dataset, source_note) = if !params.dir.is_empty() {
            ctx.log(format!("reading IDX files from {}", params.dir));
            (
                idx::read_dataset(Path::new(&params.dir))?,
                DataSource::Idx {
                    dir: params.dir.clone(),
                    package: None,
                },
            )
        } else {
            let archive = if params.archive.is_empty() {
                let alternatives = format!(
                    "Instead, point `--set fashion_mnist.archive=PATH` at a copy of {}, or \
                     `--set fashion_mnist.dir=PATH` at the standard IDX files \
                     (train-images-idx3-ubyte[.gz] etc., e.g. /{DIR_IN_PACKAGE} once the package is installed)",
                    pinned.deb
                );
                let mut lines = Vec::new();
                let fetched = deb::fetch(&pinned, &alternatives, &mut |l| lines.push(l));
                lines.into_iter().for_each(|l| ctx.log(l));
                fetched?
            } else {
                PathBuf::from(&params.archive)
            };
            ctx.log(format!(
                "unpacking {DIR_IN_PACKAGE}/*.gz from {}",
                archive.display()
            ));
            let members: [(PathBuf, Vec<u8>); 4] = deb::read_members(&archive, &pinned)?
                .try_into()
                .expect("one member per IDX file");
            let dataset = idx::dataset_from_bytes(&archive, members)
                .with_context(|| format!("decoding the IDX files of {}", archive.display()))?;
            let note = DataSource::Debian {
                package: pinned.package.clone(),
                version: pinned.version.clone(),
                deb_sha256: pinned.deb_sha256.clone(),
                dir: format!("/{DIR_IN_PACKAGE}"),
                member_sha256: idx::FILES
                    .iter()
                    .zip(&pinned.members)
                    .map(|(stem, m)| (format!("{stem}.gz"), m.sha256.clone()))
                    .collect(),
            };
            (dataset, note)
        };
        for (file, bytes) in dataset.stage_files("Fashion-MNIST", source_note)? {
            ctx.write_output(file, &bytes)?;
        }
        ctx.log(format!(
            "{} train, {} test; test class counts {:?}",
            dataset.train.len(),
            dataset.test.len(),
            dataset.test.class_counts()
        ));
        Ok(Finished::Done)
    }
}
