//! Stage `fashion_mnist`: Fashion-MNIST in canonical form (same arrays as `mnist`).
//!
//! Paper: the Fashion-MNIST analogue of Table 1 and the metamer grids (paper-notes § 4);
//! not in the paper's own MNIST tables. Inputs: none; reads the standard IDX files from `dir`
//! (default `/usr/share/datasets/fashion-mnist/`, Debian package `dataset-fashion-mnist`).
//! When they are absent the stage is *skipped* with the install hint, not failed.
//! Outputs: as `mnist` (60 000 train, 10 000 test, 6 000 / 1 000 per class).
//!
//! Claims: none
//! Modules: data

use std::path::PathBuf;

use anyhow::Result;

use serde::Deserialize;

use crate::data::{idx, DataSource};
use crate::engine::{Finished, StageContext, StageKind, TypedParams};

pub struct FashionMnist;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FashionMnistParams {
    /// Where the IDX files are (plain or .gz).
    dir: PathBuf,
}

impl TypedParams for FashionMnistParams {}

impl StageKind for FashionMnist {
    type Params = FashionMnistParams;

    fn kind(&self) -> &str {
        "fashion_mnist"
    }

    fn code_fingerprint(&self) -> String {
        super::code_fingerprint("fashion_mnist")
    }

    fn external_files(&self, params: &FashionMnistParams) -> Result<Vec<PathBuf>> {
        let dir = params.dir.as_path();
        Ok(idx::FILES
            .iter()
            .map(|stem| idx::find(dir, stem).unwrap_or_else(|| dir.join(stem)))
            .collect())
    }

    fn run(&self, ctx: &mut StageContext, params: &FashionMnistParams) -> Result<Finished> {
        let dir = params.dir.clone();
        if idx::dataset_files(&dir).is_err() {
            return Ok(Finished::Skipped(format!(
                "Fashion-MNIST is not installed in {}: install the Debian package (`apt-get install dataset-fashion-mnist`) \
                 or point `--set fashion_mnist.dir=PATH` at the IDX files",
                dir.display()
            )));
        }
        ctx.log(format!("reading IDX files from {}", dir.display()));
        let dataset = idx::read_dataset(&dir)?;
        let source = DataSource::Idx {
            dir: dir.display().to_string(),
            package: Some("dataset-fashion-mnist (Debian)".to_string()),
        };
        for (file, bytes) in dataset.stage_files("Fashion-MNIST", source)? {
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
