//! The generic pipeline engine: content-addressed stages over a crash-safe store.
//!
//! Nothing here knows about tensors, MNIST or the paper. The paper's stages (in
//! `crate::stages`) implement [`StageKind`]; the engine computes each stage's key from its code
//! fingerprint, parameters, upstream *content* and execution facts ([`key`]), reuses a
//! published manifest when the key matches, and otherwise builds the stage under a per-key lock
//! and publishes its outputs atomically ([`store`]). The DAG itself is data ([`pipeline`]).
//!
//! Module map: [`params`] (typed, canonically encoded parameters), [`key`] (stage keys),
//! [`pipeline`] (pipeline.toml + profiles + `--set`), [`stage`] (the trait and the context a
//! stage runs in), [`store`] (objects, manifests, locks), [`run`] (building and explaining),
//! [`maintain`] (`verify`, `gc`), [`export`] (`show`, `export`: a stage's current outputs),
//! [`diff`] (`diff`: two runs, or a run and a profile's current keys, compared),
//! [`remote`] (the shared S3-compatible store the local one caches).

pub mod diff;
pub mod export;
pub mod key;
pub mod maintain;
pub mod params;
pub mod pipeline;
pub mod remote;
pub mod run;
pub mod stage;
pub mod store;

pub use export::{CurrentOutputs, OutputFile};
pub use key::{ExecFacts, HashedInput, KeyFields};
pub use params::{
    at_least, deserialize_params, non_negative, positive, probability, split_prefixed, Limit,
    NoParams, Param, ParamError, Params, StageParams, TypedParams,
};
pub use pipeline::{ConfigError, Pipeline, Resources, Stage};
pub use run::{
    record_interrupted_runs, run_record_paths, CurrentStage, Engine, Outcome, RunOptions,
    RunRecord, StageRecord, StageStatus, State,
};
pub use stage::{AnyStageKind, Finished, Registry, StageContext, StageKind};
pub use store::{CorruptObject, Manifest, Store};
