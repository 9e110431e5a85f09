//! The paper's stages: one file per stage kind, each opening with the paper section and
//! claims it covers, its inputs, outputs and params, a `//! Claims:` line naming the claims its
//! stages measure (exactly those `paper/claims.toml`'s `measured_by` gives them; checked by
//! tests/stage_headers.rs) and a `//! Modules:` line naming the modules its code fingerprint
//! covers (checked by tests/fingerprint.rs). Each kind's params are a typed struct, checked
//! when the pipeline loads; the JSON it hands to other stages is a struct of
//! `crate::outputs`.
//!
//! Adding a stage kind = a file here, a line in [`registry`], and a `[[stage]]` in
//! `pipeline/pipeline.toml`. Nothing in `crate::engine` changes.

pub mod ablation;
pub mod attack;
pub mod ensemble;
pub mod evaluate;
pub mod fashion_mnist;
pub mod interpolate;
pub mod knn;
pub mod metamers;
pub mod mnist;
pub mod probe;
pub mod report;
pub mod shift_mnist;
pub mod shortcut;
pub mod spheres;
pub mod spheres_flow;
pub mod spheres_misaligned;
pub mod train;

use crate::engine::Registry;

include!(concat!(env!("OUT_DIR"), "/fingerprints.rs"));

/// The code fingerprint build.rs computed for a stage kind (its file is named after it).
pub fn code_fingerprint(kind: &str) -> String {
    CODE_FINGERPRINTS
        .iter()
        .find(|(k, _)| *k == kind)
        .map(|(_, f)| f.to_string())
        .unwrap_or_else(|| {
            panic!("no code fingerprint for stage kind {kind}: is src/stages/{kind}.rs there?")
        })
}

/// Every stage kind the paper's pipeline can use.
pub fn registry() -> Registry {
    Registry::new()
        .with(mnist::Mnist)
        .with(fashion_mnist::FashionMnist)
        .with(train::Train)
        .with(evaluate::Evaluate)
        .with(ensemble::Ensemble)
        .with(metamers::Metamers)
        .with(probe::ProbeStage)
        .with(interpolate::Interpolate)
        .with(ablation::Ablation)
        .with(knn::Knn)
        .with(attack::Attack)
        .with(shift_mnist::ShiftMnist)
        .with(shortcut::ShortcutStage)
        .with(spheres::Spheres)
        .with(spheres_flow::SpheresFlow)
        .with(spheres_misaligned::SpheresMisaligned)
        .with(report::Report)
}
