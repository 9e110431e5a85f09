//! Reproduction of Jacobsen, Behrmann, Zemel & Bethge, *Excessive Invariance Causes
//! Adversarial Vulnerability* (ICLR 2019), as a content-addressed pipeline.
//!
//! Two halves that do not know each other's insides:
//! - [`engine`]: a generic DAG of stages over a content-addressed store (keys, locks,
//!   atomic publishing, explain, verify, gc). Knows nothing about tensors or the paper.
//! - the paper: [`stages`] (one file per stage kind, each naming the paper section it covers),
//!   built on [`data`] (dataset readers), [`nn`] (models on dfdx), [`training`] (stage params
//!   → training settings, the checkpointed loop), [`oracle`] and [`knn`] (the two judges of
//!   what an image looks like), [`attack`] (feature matching and PGD in image space),
//!   [`outputs`] (the JSON contracts between stages; [`ablation`] holds the iCE sweep's own)
//!   and [`report`] (figures, HTML rendering).
//!
//! The binary `repro` (src/main.rs) is the command line over both; [`allocator`] is the memory
//! allocator it and the benchmarks run on.

pub mod ablation;
pub mod allocator;
pub mod attack;
pub mod data;
pub mod engine;
pub mod knn;
pub mod nn;
pub mod oracle;
pub mod outputs;
pub mod report;
pub mod slurm;
pub mod stages;
pub mod training;
