//! One handle over the two model families, built from a JSON config and rebuilt from a
//! weights file alone (the config travels in its metadata).

use std::collections::HashMap;

use anyhow::{bail, ensure, Context, Result};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::cnn::{CnnConfig, SmallCnn};
use super::flow::{FiRevNet, RevNetConfig};
use super::{describe, io, Dev, HasParams, Param, T2};

/// Which model and its architecture, as stored in weights files under `config`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "model", rename_all = "lowercase")]
pub enum ModelConfig {
    Firevnet(RevNetConfig),
    Cnn(CnnConfig),
}

// A handful of models live at a time: their size does not matter.
#[allow(clippy::large_enum_variant)]
pub enum Model {
    RevNet(FiRevNet),
    Cnn(SmallCnn),
}

impl Model {
    pub fn new(dev: &Dev, config: &ModelConfig, rng: &mut ChaCha8Rng) -> Model {
        match config {
            ModelConfig::Firevnet(c) => Model::RevNet(FiRevNet::new(dev, c.clone(), rng)),
            ModelConfig::Cnn(c) => Model::Cnn(SmallCnn::new(dev, c.clone(), rng)),
        }
    }

    pub fn config(&self) -> ModelConfig {
        match self {
            Model::RevNet(m) => ModelConfig::Firevnet(m.config.clone()),
            Model::Cnn(m) => ModelConfig::Cnn(m.config.clone()),
        }
    }

    /// Input rows the model expects per example.
    pub fn input_channels(&self) -> usize {
        match self {
            Model::RevNet(m) => m.config.in_channels,
            Model::Cnn(_) => 1,
        }
    }

    /// The weights file: parameters plus `config`, the full description of the model
    /// ([`describe`]: input encoding, layers, latent order, permutations) and any extra
    /// metadata.
    pub fn to_safetensors(&self, mut metadata: HashMap<String, String>) -> Result<Vec<u8>> {
        metadata.insert("config".into(), serde_json::to_string(&self.config())?);
        metadata.insert("format".into(), "pt".into());
        metadata.extend(describe::metadata(self));
        io::save(&self.state(), metadata)
    }

    /// Rebuilds a model from a weights file alone.
    pub fn from_safetensors(dev: &Dev, bytes: &[u8]) -> Result<Model> {
        let meta = io::metadata(bytes)?;
        let Some(config) = meta.get("config") else {
            bail!("weights file has no `config` metadata")
        };
        let config: ModelConfig =
            serde_json::from_str(config).context("weights file `config` metadata")?;
        // Initial values are overwritten by the file; the generator only has to exist.
        let mut model = Model::new(dev, &config, &mut super::rng_for(0, "placeholder"));
        // A description that is there must be the one the config builds (older files lack it).
        for (key, value) in describe::metadata(&model) {
            if let Some(stored) = meta.get(&key) {
                ensure!(
                    *stored == value,
                    "weights file metadata `{key}` does not describe the model its `config` builds"
                );
            }
        }
        io::load_into(dev, &mut model, bytes)?;
        Ok(model)
    }

    /// Class scores `(classes, B)` of a prepared input batch (evaluation mode): the logits
    /// z_s of a fi-RevNet, the head of a CNN.
    pub fn logits(&self, x: T2) -> T2 {
        match self {
            Model::RevNet(m) => m.scores(m.forward(x, None).z),
            Model::Cnn(m) => m.forward(x),
        }
    }

    /// Predicted classes of a prepared input batch (evaluation mode).
    pub fn predict(&self, x: T2) -> Vec<u8> {
        match self {
            Model::RevNet(m) => super::objective::revnet_predict(m, x),
            Model::Cnn(m) => super::objective::cnn_predict(m, x),
        }
    }
}

impl HasParams for Model {
    fn visit<'a>(&'a self, f: &mut dyn FnMut(&'a Param)) {
        match self {
            Model::RevNet(m) => m.visit(f),
            Model::Cnn(m) => m.visit(f),
        }
    }
    fn visit_mut(&mut self, f: &mut dyn FnMut(&mut Param)) {
        match self {
            Model::RevNet(m) => m.visit_mut(f),
            Model::Cnn(m) => m.visit_mut(f),
        }
    }
    fn visit_buffers<'a>(&'a self, f: &mut dyn FnMut(&'a Param)) {
        if let Model::RevNet(m) = self {
            m.visit_buffers(f);
        }
    }
    fn visit_buffers_mut(&mut self, f: &mut dyn FnMut(&mut Param)) {
        if let Model::RevNet(m) = self {
            m.visit_buffers_mut(f);
        }
    }
}

/// The ensemble's prediction: argmax of the members' mean softmax probabilities.
pub fn ensemble_predict(members: &[Model], x: &T2) -> Vec<u8> {
    use dfdx::prelude::*;
    let mut mean: Option<T2> = None;
    for member in members {
        let p = member.logits(x.clone()).softmax::<Axis<0>>();
        mean = Some(match mean {
            Some(m) => m + p,
            None => p,
        });
    }
    super::ops::argmax_rows(&mean.expect("an ensemble has members"))
}
