//! Stage `knn`: the second judge of attacked images, k nearest neighbours in pixel space on the
//! training set (paper-notes § 5, "Judges of attacked images"), and its clean test error.
//!
//! Paper: no counterpart. A gradient attack on a CNN can transfer to the CNN-ensemble oracle;
//! no gradient reaches a nearest-neighbour rule on raw pixels, so the `attack` stages ask both
//! (claims C11, C12). The judge itself is rebuilt by every attack stage from the training
//! arrays (it *is* the training set); this stage fixes k and measures how good a judge it is.
//! Inputs: the four MNIST arrays. Outputs: `knn.json` ([`KnnResult`]: k, training and test
//! sizes, test error in %).
//! Expected: about 3 % test error for k = 3 on the full MNIST training set (the classic
//! figure for L2 k-NN on raw pixels is 2.8–3.1 %).
//!
//! Params: `k` (≥ 1), `test_limit` (0 = all).
//!
//! Claims: none
//! Modules: data, knn, nn, outputs

use anyhow::Result;
use serde::Deserialize;
use serde_json::json;

use crate::data::Arrays;
use crate::engine::{at_least, Finished, Limit, ParamError, StageContext, StageKind, TypedParams};
use crate::knn::{pixel_rows, NearestNeighbours};
use crate::outputs::{json_bytes, KnnResult};

pub struct Knn;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KnnParams {
    /// Neighbours per vote.
    k: usize,
    /// Test images the clean error is measured on (0 = all).
    test_limit: Limit,
}

impl TypedParams for KnnParams {
    fn check(&self) -> Result<(), ParamError> {
        at_least("k", self.k, 1)
    }
}

impl StageKind for Knn {
    type Params = KnnParams;

    fn kind(&self) -> &str {
        "knn"
    }

    fn code_fingerprint(&self) -> String {
        super::code_fingerprint("knn")
    }

    fn run(&self, ctx: &mut StageContext, params: &KnnParams) -> Result<Finished> {
        let data = Arrays::read(|name| ctx.input_named(name))?;
        let judge = NearestNeighbours::new(&data.train_images, &data.train_labels, 784, params.k);
        let n_test = params.test_limit.of(data.test_labels.len());
        let queries = pixel_rows(&data.test_images[..n_test * 784]);
        let predicted = judge.classify(&queries);
        let wrong = predicted
            .iter()
            .zip(&data.test_labels)
            .filter(|(p, y)| p != y)
            .count();
        let test_error = 100.0 * wrong as f64 / n_test.max(1) as f64;
        ctx.log(format!(
            "k = {}: test error {test_error:.2} % on {n_test} test images ({} training images)",
            params.k,
            judge.len()
        ));
        let result = KnnResult {
            k: params.k,
            n_train: judge.len(),
            n_test,
            test_error,
        };
        ctx.write_output("knn.json", &json_bytes(&result)?)?;
        ctx.set_metric("test_error", json!(test_error));
        Ok(Finished::Done)
    }
}
