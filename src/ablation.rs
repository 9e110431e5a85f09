//! The iCE ablation's output contract, `ablation.json`: what the `ablation` stage writes and
//! the report reads.
//!
//! It lives apart from [`crate::outputs`] on purpose. Code fingerprints are per declared
//! module, and every training stage declares `outputs`; a contract change there retrains every
//! model of every profile. The sweep's rows change as the questions asked of it change (issue 11
//! added the `w_mle` axis and the CE + MLE baseline), so only the stage that writes them and the
//! report that reads them declare this module.
//! (`crate::outputs::AblationResult` is the previous form of this contract; it is no longer
//! read or written and goes with the next change that retrains anyway.)

use serde::{Deserialize, Serialize};

use crate::nn::ice::AdversaryVariant;
use crate::nn::model::ModelConfig;
use crate::nn::nuisance::ProbeSettings;
use crate::nn::train::TrainSettings;

/// `ablation.json` of the `ablation` stage.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AblationResult {
    pub model: ModelConfig,
    /// The settings every cell shares (the iCE ones are the base the cells override).
    pub base: TrainSettings,
    pub grid_epochs: Vec<usize>,
    pub probe: ProbeSettings,
    pub n_probe_fit: usize,
    pub n_probe_validation: usize,
    pub n_test: usize,
    pub rows: Vec<AblationRow>,
}

/// An adversary variant as pipeline.toml spells it.
pub fn variant_name(variant: AdversaryVariant) -> &'static str {
    match variant {
        AdversaryVariant::Paper => "paper",
        AdversaryVariant::Confusion => "confusion",
        AdversaryVariant::Code => "code",
    }
}

/// Which objective a cell trains the flow with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CellObjective {
    /// Cross-entropy on z_s alone.
    Ce,
    /// CE + w_mle · MLE: iCE with w_adv = 0. The adversary still trains beside the flow (so
    /// its error says what a jointly trained classifier reads when nobody fights it), but it
    /// adds exact zeros to the flow's gradient.
    CeMle,
    /// The full iCE objective.
    Ice,
}

impl CellObjective {
    /// How the report and the logs name it.
    pub fn label(self) -> &'static str {
        match self {
            CellObjective::Ce => "CE",
            CellObjective::CeMle => "CE + MLE",
            CellObjective::Ice => "iCE",
        }
    }
}

/// One cell of the sweep at one epoch. The iCE fields are `None` where the objective has no
/// such setting (CE has no adversary and no MLE term).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AblationRow {
    pub objective: CellObjective,
    pub adversary: Option<AdversaryVariant>,
    pub w_adv: Option<f32>,
    pub inner_steps: Option<usize>,
    pub w_mle: Option<f32>,
    pub epoch: usize,
    pub logit_test_error: f64,
    pub logit_train_error: f64,
    /// The jointly trained adversary's test error on z_n (CE + MLE and iCE).
    pub adversary_test_error: Option<f64>,
    /// A fresh probe on the frozen z_n of the cell's flow after this epoch.
    pub probe_test_error: f64,
    pub probe_train_error: f64,
    pub probe_bound_bits: f64,
}
