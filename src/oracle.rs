//! What the stages that judge images share (`metamers`, `interpolate`): the *oracle*, an
//! ensemble of CNNs trained on clean MNIST that says what an image looks like, found among a
//! stage's inputs; and seeded pairs (A, B) of test images with different labels.

use anyhow::{ensure, Context, Result};
use rand::Rng;

use crate::engine::StageContext;
use crate::nn::model::Model;
use crate::nn::{rng_for, Dev};

/// The oracle members among the stage's inputs (`member*.safetensors`, in stage then name
/// order); an error when there are none.
pub fn oracle_members(ctx: &StageContext, dev: &Dev) -> Result<Vec<Model>> {
    let mut members = Vec::new();
    for stage in ctx.input_stages() {
        let mut names: Vec<&str> = ctx
            .input_names(stage)
            .into_iter()
            .filter(|n| n.starts_with("member"))
            .collect();
        names.sort();
        for name in names {
            members.push(
                Model::from_safetensors(dev, &ctx.input(stage, name)?)
                    .with_context(|| format!("oracle member {stage}/{name}"))?,
            );
        }
    }
    ensure!(
        !members.is_empty(),
        "stage {} has no oracle members (member*.safetensors) among its inputs",
        ctx.name()
    );
    Ok(members)
}

/// `n` pairs of indices into `labels` with different labels, drawn with replacement from the
/// generator for (`seed`, `purpose`): (logit sources A, nuisance sources B).
pub fn pairs_with_different_labels(
    labels: &[u8],
    n: usize,
    seed: u64,
    purpose: &str,
) -> (Vec<usize>, Vec<usize>) {
    let mut rng = rng_for(seed, purpose);
    let (mut sources, mut nuisances) = (Vec::with_capacity(n), Vec::with_capacity(n));
    while sources.len() < n {
        let (a, b) = (
            rng.gen_range(0..labels.len()),
            rng.gen_range(0..labels.len()),
        );
        if labels[a] != labels[b] {
            sources.push(a);
            nuisances.push(b);
        }
    }
    (sources, nuisances)
}
