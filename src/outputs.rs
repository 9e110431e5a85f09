//! The JSON contracts between stages: every JSON output that one stage writes and another stage
//! (or the report) reads is a struct here, used by both sides. A renamed field is a compile
//! error; a file that lacks a field, or has one of the wrong type, is a load error naming the
//! file and the field ([`read_json`]), never a silent gap in the report.
//!
//! Files are written with their keys sorted at every level ([`json_bytes`]), so the bytes do not
//! depend on the order fields are declared in.
//!
//! | file | written by | read by |
//! |---|---|---|
//! | `metrics.json` | `train` | `report` |
//! | `evaluation.json` | `evaluate` | `report` |
//! | `ensemble.json` | `ensemble` | `report` |
//! | `metamers.json` | `metamers` | `probe`, `report` |
//! | `probe.json` | `probe` | `report` |
//! | `interpolation.json` | `interpolate` | `report` |
//! | `ablation.json` | `ablation` | `report` |
//! | `knn.json` | `knn` | `attack`, `report` |
//! | `invariance.json`, `examples.json` | `attack` (feature matching) | `report` |
//! | `pgd.json`, `examples.json` | `attack` (PGD) | `report` |
//! | `shortcut.json` | `shortcut` | `report` |
//!
//! (`summary.json` of the dataset stages is `crate::data::DatasetSummary`.)

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::nn::ice::AdversaryVariant;
use crate::nn::model::ModelConfig;
use crate::nn::nuisance::{ProbeEpoch, ProbeSettings, Readout};
use crate::nn::train::{EpochMetrics, TrainSettings};

/// `metrics.json` of a `train` stage.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainMetrics {
    pub model: ModelConfig,
    /// `ce` or `ice`.
    pub objective: String,
    pub settings: TrainSettings,
    pub device: String,
    pub parameters: usize,
    pub history: Vec<EpochMetrics>,
    pub final_test_error: f64,
    pub final_train_error: f64,
}

/// `evaluation.json` of an `evaluate` stage (errors in %).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Evaluation {
    pub model: ModelConfig,
    pub parameters: usize,
    pub test_error: f64,
    pub train_error: f64,
    pub n_test: usize,
    pub n_train: usize,
    /// The jointly trained iCE adversary on z_n; `null` for a model without one.
    pub adversary: Option<AdversaryReadouts>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdversaryReadouts {
    pub train: Readout,
    pub test: Readout,
}

/// `ensemble.json` of the oracle (`ensemble` stage; errors in %).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnsembleResult {
    pub members: Vec<EnsembleMember>,
    pub test_error: f64,
    pub n_test: usize,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnsembleMember {
    pub stage: String,
    pub test_error: f64,
}

/// `metamers.json` of a `metamers` stage.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetamerResult {
    pub pairs: usize,
    /// max |z_s(x_met) − z_s(A)| over all metamers (claim C5).
    pub max_logit_diff: f32,
    /// ‖F⁻¹(F(x)) − x‖∞ on data and on metamers.
    pub reconstruction_data: f32,
    pub reconstruction_metamer: f32,
    /// Fractions of metamers the oracle labels as A's / B's label (claim C6).
    pub oracle_agrees_with_logit_source: f64,
    pub oracle_agrees_with_nuisance_source: f64,
    pub oracle_members: usize,
    /// Test indices of A (logit sources) and B (nuisance sources), and the oracle's labels.
    pub logit_sources: Vec<usize>,
    pub nuisance_sources: Vec<usize>,
    pub oracle_labels: Vec<u8>,
}

/// `probe.json` of a `probe` stage.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProbeResult {
    pub settings: ProbeSettings,
    pub n_fit: usize,
    pub n_validation: usize,
    pub n_test: usize,
    /// How many metamers were scored (`null` without a metamers input).
    pub metamers: Option<usize>,
    /// By view: `z_n` and `z_s`.
    pub views: BTreeMap<String, ProbeView>,
}

/// One fresh probe's readouts.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProbeView {
    pub dims: usize,
    pub train: Readout,
    pub validation: Readout,
    pub test: Readout,
    /// On metamers, labelled by the oracle (`null` without a metamers input).
    pub metamers: Option<Readout>,
    pub best_epoch: usize,
    pub history: Vec<ProbeEpoch>,
}

/// `interpolation.json` of an `interpolate` stage.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InterpolationResult {
    pub paths: usize,
    pub steps: usize,
    pub fraction_label_changes: f64,
    pub fraction_ends_as_nuisance_source: f64,
    pub fraction_starts_as_logit_source: f64,
    pub max_logit_drift: f32,
    pub oracle_members: usize,
    pub logit_sources: Vec<usize>,
    pub nuisance_sources: Vec<usize>,
    /// `oracle_labels[p][k]`: the oracle's label of path p at step k.
    pub oracle_labels: Vec<Vec<u8>>,
}

/// `ablation.json` of the `ablation` stage.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AblationResult {
    pub model: ModelConfig,
    pub base: TrainSettings,
    pub grid_epochs: Vec<usize>,
    pub probe: ProbeSettings,
    pub n_probe_fit: usize,
    pub n_probe_validation: usize,
    pub n_test: usize,
    pub rows: Vec<AblationRow>,
}

/// One cell of the ablation grid at one epoch (the iCE fields are `null` for CE).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AblationRow {
    pub objective: String,
    pub adversary: Option<AdversaryVariant>,
    pub w_adv: Option<f32>,
    pub inner_steps: Option<usize>,
    pub epoch: usize,
    pub logit_test_error: f64,
    pub logit_train_error: f64,
    /// The jointly trained adversary's test error on z_n (iCE only).
    pub adversary_test_error: Option<f64>,
    pub probe_test_error: f64,
    pub probe_train_error: f64,
    pub probe_bound_bits: f64,
}

/// `knn.json` of the `knn` stage: the pixel-space judge of attacked images (k nearest
/// training images by L2 distance, majority vote) and its clean test error in %.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KnnResult {
    pub k: usize,
    pub n_train: usize,
    pub n_test: usize,
    pub test_error: f64,
}

/// What one judge says about a set of attacked images: the fractions it labels as the source's
/// class (the attack found an invariance), as the target's (the attack changed the digit) or
/// as another class.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JudgeFractions {
    pub source: f64,
    pub target: f64,
    pub other: f64,
}

/// Both judges on one set of attacked images, and how often they give the same label.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Judged {
    pub n: usize,
    pub oracle: JudgeFractions,
    pub knn: JudgeFractions,
    pub agreement: f64,
}

/// Mean, median and maximum of a per-example quantity.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Spread {
    pub mean: f64,
    pub median: f64,
    pub max: f64,
}

/// `invariance.json` of an `attack` stage with method `feature_matching`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InvarianceResult {
    pub model: ModelConfig,
    pub pairs: usize,
    pub steps: usize,
    pub lr: f64,
    /// Success: the model's argmax is the target's class and the relative feature distance
    /// ‖h(x) − h(t)‖² / ‖h(t)‖² is below this.
    pub success_distance: f64,
    pub oracle_members: usize,
    pub knn_k: usize,
    /// By matched feature: `logits`, `penultimate`.
    pub features: BTreeMap<String, FeatureMatching>,
}

/// The feature-matching attack on one feature.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FeatureMatching {
    pub success_rate: f64,
    /// Fraction of attacked images the model classifies as the target's class.
    pub model_says_target: f64,
    pub relative_distance: Spread,
    /// Distances of the attacked images to their sources, pixels in [0, 1].
    pub l2: Spread,
    pub linf: Spread,
    /// The judges on every attacked image, and on the successful ones (`null`: none).
    pub attacked: Judged,
    pub successful: Option<Judged>,
}

/// One row of the feature-matching attack's `examples.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InvarianceExample {
    pub feature: String,
    /// Test indices of the source s (the start) and the target t (whose features are matched).
    pub source: usize,
    pub target: usize,
    pub source_label: u8,
    pub target_label: u8,
    pub prediction: u8,
    pub relative_distance: f64,
    pub success: bool,
    pub l2: f64,
    pub linf: f64,
    pub oracle: u8,
    pub knn: u8,
}

/// `pgd.json` of an `attack` stage with method `pgd`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PgdResult {
    pub model: ModelConfig,
    pub examples: usize,
    pub steps: usize,
    /// Step size = step_factor · ε / steps.
    pub step_factor: f64,
    pub clean_accuracy: f64,
    pub oracle_members: usize,
    pub knn_k: usize,
    pub linf: Vec<PgdPoint>,
    pub l2: Vec<PgdPoint>,
}

/// Robust accuracy at one ε, and what the judges see on the images the attack broke.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PgdPoint {
    pub epsilon: f64,
    pub robust_accuracy: f64,
    /// Examples misclassified at the end of the attack (clean errors included).
    pub broken: usize,
    /// On the broken examples' adversarial images (`null`: none broken): the fraction each
    /// judge still labels with the true class, and the mean distance to the clean image.
    pub oracle_true: Option<f64>,
    pub knn_true: Option<f64>,
    pub mean_l2: Option<f64>,
    pub mean_linf: Option<f64>,
}

/// One row of the PGD attack's `examples.json`: one test example at one (norm, ε).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PgdExample {
    pub norm: String,
    pub epsilon: f64,
    pub index: usize,
    pub label: u8,
    pub prediction: u8,
    pub l2: f64,
    pub linf: f64,
    pub oracle: u8,
    pub knn: u8,
}

/// `shortcut.json` of a `shortcut` stage: one model trained on a shiftMNIST variant, on the
/// four sets (errors in % of the first `n_train` / `n_test` images).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShortcutResult {
    pub model: ModelConfig,
    pub parameters: usize,
    pub n_train: usize,
    pub n_test: usize,
    /// Training images, shortcut present.
    pub train_error: f64,
    /// Test images with their own label's shortcut.
    pub present_error: f64,
    /// Test images with another class's shortcut.
    pub broken_error: f64,
    /// Test images without a shortcut.
    pub removed_error: f64,
    /// % of broken test images predicted as the class their shortcut names.
    pub follows_shortcut: f64,
}

/// Pretty JSON with keys sorted at every level.
pub fn json_bytes<T: Serialize>(value: &T) -> Result<Vec<u8>> {
    // serde_json's `Value` map is sorted (no `preserve_order`), so this sorts every level.
    let tree = serde_json::to_value(value)?;
    Ok(serde_json::to_vec_pretty(&tree)?)
}

/// Parses `bytes` as `T`; `what` names the file (`metrics.json of stage train_ce`) in the
/// error, with the path of the offending field.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8], what: &str) -> Result<T> {
    let mut deserializer = serde_json::Deserializer::from_slice(bytes);
    serde_path_to_error::deserialize(&mut deserializer).with_context(|| {
        format!("{what} does not match the format its reader expects (src/outputs.rs)")
    })
}

/// Reads and parses upstream output `file` of `stage` (verified against its hash).
pub fn read_json<T: DeserializeOwned>(
    ctx: &crate::engine::StageContext,
    stage: &str,
    file: &str,
) -> Result<T> {
    parse_json(
        &ctx.input(stage, file)?,
        &format!("{file} of stage {stage}"),
    )
}

// ==== adversarial spheres (paper § 3's spheres figure; claim C9) ====================
//
// | file | written by | read by |
// |---|---|---|
// | `summary.json` | `spheres` | `spheres_flow`, `spheres_misaligned`, `report` |
// | `spheres.json` | `spheres_flow` | `report` |
// | `misaligned.json` | `spheres_misaligned` | `report` |

/// `summary.json` of the `spheres` data stage: the two spheres and the two sets.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpheresSummary {
    pub d: usize,
    /// Radius of the inner sphere (class 0) and of the outer sphere (class 1).
    pub r_inner: f64,
    pub r_outer: f64,
    pub seed: u64,
    pub train: SpheresSplit,
    pub test: SpheresSplit,
    /// max |‖x‖ − R| / R over both sets (f32 storage rounding).
    pub max_relative_radius_error: f64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpheresSplit {
    pub n: usize,
    pub inner: usize,
    pub outer: usize,
}

/// Five-number summary of a per-example quantity.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Quartiles {
    pub min: f64,
    pub q1: f64,
    pub median: f64,
    pub q3: f64,
    pub max: f64,
}

impl Quartiles {
    /// Of `values` (linear interpolation between order statistics; all 0 when empty).
    pub fn of(values: &[f64]) -> Quartiles {
        let mut v = values.to_vec();
        v.sort_by(f64::total_cmp);
        let at = |q: f64| -> f64 {
            if v.is_empty() {
                return 0.0;
            }
            let pos = q * (v.len() - 1) as f64;
            let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
            v[lo] + (v[hi] - v[lo]) * (pos - lo as f64)
        };
        Quartiles {
            min: at(0.0),
            q1: at(0.25),
            median: at(0.5),
            q3: at(0.75),
            max: at(1.0),
        }
    }
}

/// `spheres.json` of a `spheres_flow` stage (errors in %).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpheresFlowResult {
    pub data: SpheresSummary,
    pub model: crate::nn::vector_flow::VectorFlowConfig,
    pub parameters: usize,
    pub training: crate::nn::vector_flow::VectorTrainSettings,
    pub device: String,
    pub n_train: usize,
    pub n_test: usize,
    pub history: Vec<crate::nn::vector_flow::VectorEpoch>,
    /// The logit classifier (argmax z_s), evaluation mode, on all `n_train` / `n_test` points.
    pub train_error: f64,
    pub test_error: f64,
    pub metamers: SpheresMetamers,
    pub nuisance: SpheresNuisance,
    pub heatmaps: SpheresHeatmaps,
    /// Every figure file this stage wrote.
    pub figures: Vec<String>,
}

/// Metamers x_met = F⁻¹(z_s(A), z_n(B)) of (inner A, outer B) test pairs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpheresMetamers {
    pub pairs: usize,
    /// Metamers with a non-finite coordinate (the inverse overflowed); the numbers below are
    /// over the others.
    pub non_finite: usize,
    /// ‖x_met‖, and for reference ‖A‖ (= R₁) and ‖B‖ (= R₂).
    pub norm: Quartiles,
    pub logit_source_norm: Quartiles,
    pub nuisance_source_norm: Quartiles,
    /// Fraction of metamers the fi-RevNet's logits call inner.
    pub fraction_called_inner: f64,
    /// Fraction whose decision equals A's (must be 1: x_met has A's logits).
    pub fraction_same_decision_as_logit_source: f64,
    /// max |z_s(x_met) − z_s(A)|.
    pub max_logit_diff: f32,
    /// ‖F⁻¹(F(x)) − x‖∞ on the sources A and on the metamers.
    pub reconstruction_data: f32,
    pub reconstruction_metamer: f32,
    /// The ground truth of the spheres: fraction of metamers nearer the outer sphere than the
    /// inner one (|‖x_met‖ − R₂| < |‖x_met‖ − R₁|), i.e. that "look like" B.
    pub fraction_nearer_outer: f64,
    /// Fraction the post-hoc nuisance classifier (on z_n) calls outer.
    pub nuisance_classifier_says_outer: f64,
}

/// The post-hoc nuisance classifier: an MLP trained on the frozen z_n of training points
/// (the `probe` stage's trainer), and for iCE the jointly trained adversary beside it.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpheresNuisance {
    pub settings: crate::nn::nuisance::ProbeSettings,
    pub n_fit: usize,
    pub n_validation: usize,
    pub best_epoch: usize,
    pub train: Readout,
    pub test: Readout,
    /// iCE: the adversary on the test z_n (`null` for CE).
    pub adversary_test: Option<Readout>,
}

/// The decision-boundary heat maps: one PNG of 2 × 2 panels.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpheresHeatmaps {
    pub file: String,
    /// Grid points per side of a panel, and the half-width of a panel (in units of x).
    pub grid: usize,
    pub extent: f64,
    /// Pixels per grid point, and the gap between panels in pixels.
    pub scale: usize,
    pub gap: usize,
    /// What the colours and marks mean.
    pub legend: String,
    pub panels: Vec<HeatmapPanel>,
    /// The point x (an inner test point, metamer pair 0's A) and its metamer, in the
    /// coordinates of the x–x_met plane (x = (‖x‖, 0)).
    pub x_norm: f64,
    pub x_met_in_plane: [f64; 2],
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeatmapPanel {
    /// Position in the 2 × 2 layout (row 0 = top).
    pub row: usize,
    pub col: usize,
    /// `x1-x2` (other coordinates 0) or `x-x_met` (the plane through 0, x and x_met).
    pub plane: String,
    /// `logits` (softmax of z_s) or `nuisance` (the post-hoc classifier on z_n).
    pub classifier: String,
    /// Fraction of the panel's grid points with P(outer) > 0.5.
    pub fraction_outer: f64,
    /// Error (%) on 720 evenly spaced points of the panel's circle R₁ (true class inner) and
    /// of its circle R₂ (outer): points of the spheres themselves, in directions the data
    /// hardly visits (in the x1-x2 plane all the mass sits in two coordinates).
    pub inner_circle_error: f64,
    pub outer_circle_error: f64,
    /// P(outer) at x and at x_met (`x-x_met` panels only).
    pub p_outer_at_x: Option<f64>,
    pub p_outer_at_x_met: Option<f64>,
}

/// `misaligned.json` of the `spheres_misaligned` stage (accuracies in %).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MisalignedResult {
    pub data: SpheresSummary,
    /// The classifier: an MLP on x with coordinate `ignored_coordinate` (0-based, = d − 1)
    /// set to 0, so it cannot read x_d.
    pub classifier: crate::nn::nuisance::MlpConfig,
    pub settings: crate::nn::nuisance::ProbeSettings,
    pub ignored_coordinate: usize,
    pub n_fit: usize,
    pub n_validation: usize,
    pub n_test: usize,
    pub best_epoch: usize,
    /// On the clean test set.
    pub clean_accuracy: f64,
    /// Inner test points moved onto the outer sphere along x_d (now class 1).
    pub n_moved: usize,
    /// max |‖x_moved‖ − R₂| / R₂.
    pub moved_max_relative_radius_error: f64,
    /// On the moved set: the moved points and the outer test points (expect ≈ 50 %).
    pub moved_set_accuracy: f64,
    /// On the moved points alone (expect ≈ 0 %).
    pub moved_points_accuracy: f64,
    /// The control: the same MLP and training reading every coordinate.
    pub aligned: AlignedControl,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlignedControl {
    pub best_epoch: usize,
    pub clean_accuracy: f64,
    pub moved_set_accuracy: f64,
    pub moved_points_accuracy: f64,
}

// ==== end of adversarial spheres ====================================================

#[cfg(test)]
mod tests {
    use super::*;

    fn ensemble() -> EnsembleResult {
        EnsembleResult {
            members: vec![EnsembleMember {
                stage: "oracle_1".into(),
                test_error: 1.25,
            }],
            test_error: 1.0,
            n_test: 10_000,
        }
    }

    #[test]
    fn writer_and_reader_round_trip_with_sorted_keys() {
        let bytes = json_bytes(&ensemble()).unwrap();
        let text = String::from_utf8(bytes.clone()).unwrap();
        let (members, n_test) = (text.find("members").unwrap(), text.find("n_test").unwrap());
        assert!(members < n_test && n_test < text.find("\"test_error\": 1.0").unwrap());
        assert_eq!(
            parse_json::<EnsembleResult>(&bytes, "ensemble.json").unwrap(),
            ensemble()
        );
    }

    #[test]
    fn a_missing_or_renamed_field_is_an_error_naming_the_file_and_the_field() {
        let mut tree = serde_json::to_value(ensemble()).unwrap();
        tree.as_object_mut().unwrap().remove("test_error");
        let bytes = serde_json::to_vec(&tree).unwrap();
        let err = format!(
            "{:#}",
            parse_json::<EnsembleResult>(&bytes, "ensemble.json of stage oracle").unwrap_err()
        );
        assert!(
            err.contains("ensemble.json of stage oracle") && err.contains("test_error"),
            "{err}"
        );
        let renamed = String::from_utf8(json_bytes(&ensemble()).unwrap())
            .unwrap()
            .replace("\"stage\"", "\"stage_name\"");
        let err = format!(
            "{:#}",
            parse_json::<EnsembleResult>(renamed.as_bytes(), "ensemble.json").unwrap_err()
        );
        assert!(
            err.contains("members[0]") && err.contains("stage_name"),
            "{err}"
        );
    }
}
