//! What a weights file says about its model, beyond the tensors: everything a reader in
//! another framework needs to rebuild the model and feed it, without reading this crate.
//!
//! Metadata keys (values are strings; all but `format` and `schema` hold JSON):
//!
//! | key | content |
//! |---|---|
//! | `schema` | `repro-weights/1`: the version of this description |
//! | `config` | the model config ([`super::model::ModelConfig`]), as before |
//! | `input` | the input encoding: u8 pixels → the model's input tensor |
//! | `architecture` | every layer in order, with its formula, channels, kernel, stride, padding, bias, and the constants (zero-conv log-scale factor, affine-coupling offset, BatchNorm epsilon) |
//! | `latent` (fi-RevNet) | the order of z: its blocks (final map, split-off halves), their (C, H, W) flattening, where z_s sits |
//! | `permutations` (fi-RevNet) | the channel permutation of every flow step, as an index list |
//!
//! The description is computed from the built model (not from the config alone), and
//! `Model::from_safetensors` checks that a file's description is the one its config builds.
//! python/repro_torch.py reads it.

use std::collections::BTreeMap;

use serde_json::{json, Value};

use super::cnn::SmallCnn;
use super::flow::{
    CouplingKind, CouplingNet, FiRevNet, AFFINE_SCALE_OFFSET, BN_EPS, BN_MOMENTUM,
    ZERO_CONV_LOGS_FACTOR,
};
use super::input::{DIVISOR, PAD, PADDED, SIDE};
use super::model::Model;
use super::ops::{Conv2d, Linear};

/// The version of the description; readers check it.
pub const SCHEMA: &str = "repro-weights/1";

/// The metadata keys this module writes (besides `config` and `format`).
pub const KEYS: [&str; 5] = ["schema", "input", "architecture", "latent", "permutations"];

/// The description of `model` as metadata entries.
pub fn metadata(model: &Model) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    out.insert("schema".to_string(), SCHEMA.to_string());
    let mut put = |key: &str, value: Value| {
        out.insert(key.to_string(), value.to_string());
    };
    match model {
        Model::RevNet(m) => {
            put("input", revnet_input(m));
            put("architecture", revnet_architecture(m));
            put("latent", latent(m));
            put("permutations", permutations(m));
        }
        Model::Cnn(m) => {
            put("input", cnn_input());
            put("architecture", cnn_architecture(m));
        }
    }
    out
}

/// An f32 as the shortest decimal that reads back as the same f32 (1e-5, not 9.99…e-6).
fn number(v: f32) -> Value {
    serde_json::from_str(&v.to_string()).expect("a finite f32 prints as a JSON number")
}

fn revnet_input(m: &FiRevNet) -> Value {
    let c = m.config.in_channels;
    json!({
        "from": format!("uint8 images (N, {SIDE}, {SIDE}), pixel values k in 0..=255"),
        "shape": [c, PADDED, PADDED],
        "layout": "NCHW float32",
        "divisor": number(DIVISOR),
        "pad": PAD,
        "digit_channel": c - 1,
        "scale": 2.0,
        "shift": -1.0,
        "formula": format!(
            "u = zeros(N, {c}, {PADDED}, {PADDED}); u[:, {}, {PAD}:{}, {PAD}:{}] = k / {DIVISOR}; \
             x = 2·u − 1 (so the padding and the other channels are −1)",
            c - 1,
            PAD + SIDE,
            PAD + SIDE
        ),
        "dequantization": {
            "evaluation": "none",
            "training": format!(
                "when the training settings say dequantize (metadata `training`): u += U(0, 1/{DIVISOR}) \
                 drawn for every entry (padding and other channels included) before x = 2·u − 1"
            ),
        },
    })
}

fn cnn_input() -> Value {
    json!({
        "from": format!("uint8 images (N, {SIDE}, {SIDE}), pixel values k in 0..=255"),
        "shape": [1, SIDE, SIDE],
        "layout": "NCHW float32",
        "divisor": number(DIVISOR),
        "pad": 0,
        "digit_channel": 0,
        "scale": 1.0,
        "shift": 0.0,
        "formula": format!("x[:, 0] = k / {DIVISOR}"),
        "dequantization": {"evaluation": "none", "training": "none"},
    })
}

fn conv(name: &str, conv: &Conv2d) -> Value {
    json!({
        "op": "conv2d",
        "name": name,
        "in": conv.c_in,
        "out": conv.c_out,
        "kernel": conv.kernel,
        "stride": conv.stride,
        "padding": conv.pad,
        "bias": conv.bias.is_some(),
    })
}

fn linear(name: &str, layer: &Linear) -> Value {
    json!({
        "op": "linear",
        "name": name,
        "in": layer.weight.shape[1],
        "out": layer.weight.shape[0],
        "bias": true,
    })
}

fn zero_conv(name: &str, zc: &super::flow::ZeroConv) -> Value {
    let mut v = conv(name, &zc.conv);
    v["op"] = json!("zero_conv");
    v
}

fn coupling_net(net: &CouplingNet) -> Value {
    let actnorm =
        |name: &str, channels: usize| json!({"op": "actnorm", "name": name, "channels": channels});
    json!([
        conv("conv1", &net.conv1),
        actnorm("norm1", net.norm1.channels),
        {"op": "relu"},
        conv("conv2", &net.conv2),
        actnorm("norm2", net.norm2.channels),
        {"op": "relu"},
        {"op": "dropout", "p": number(net.dropout), "when": "training only"},
        zero_conv("conv3", &net.conv3),
    ])
}

fn revnet_architecture(m: &FiRevNet) -> Value {
    let mut channels = m.config.in_channels;
    let mut side = m.config.size;
    let mut levels = Vec::new();
    for (l, level) in m.levels.iter().enumerate() {
        let input = [channels, side, side];
        let (c, s) = (level.channels, level.side);
        let step = &level.steps[0];
        let kept = c / 2;
        let split = level.split.as_ref().map(|split| {
            json!({
                "name": format!("level{l}.split"),
                "kept": [kept, s, s],
                "out": [c - kept, s, s],
                "prior": zero_conv("prior", &split.prior),
            })
        });
        levels.push(json!({
            "name": format!("level{l}"),
            "input": input,
            "squeezed": [c, s, s],
            "steps": level.steps.len(),
            "step_names": (0..level.steps.len()).map(|k| format!("step{k}")).collect::<Vec<_>>(),
            "actnorm": {"name": "actnorm", "channels": c},
            "coupling": {
                "name": "coupling",
                "x_a": [kept, s, s],
                "x_b": [c - kept, s, s],
                "net": coupling_net(&step.coupling),
            },
            "split": split,
        }));
        channels = if level.split.is_some() { kept } else { c };
        side = s;
    }
    let bn = m.logit_bn.as_ref().map(|_| {
        json!({
            "name": "logit_bn",
            "channels": m.config.classes,
            "eps": number(BN_EPS),
            "momentum": number(BN_MOMENTUM),
            "formula": "evaluation: scores = (z_s − running_mean) / sqrt(running_var + eps) · weight + bias \
                        (PyTorch's BatchNorm1d; training: batch statistics, running_var from the unbiased variance)",
        })
    });
    json!({
        "model": "firevnet",
        "levels": levels,
        "order": "per level: squeeze → steps × [actnorm → permutation → coupling] → split (all levels but the last); \
                  the next level continues from the kept half",
        "squeeze": {
            "factor": 2,
            "formula": "out[:, 4c + 2·dy + dx, y, x] = in[:, c, 2y + dy, 2x + dx] \
                        (x.view(N, C, H/2, 2, W/2, 2).permute(0, 1, 3, 5, 2, 4).reshape(N, 4C, H/2, W/2))",
        },
        "actnorm": {
            "formula": "y[:, c] = (x[:, c] + bias[c]) · exp(logs[c])",
            "logdet": "H · W · Σ logs (flow steps only; the coupling net's actnorms are plain layers)",
        },
        "permutation": {
            "kind": m.config.permutation,
            "formula": "y[:, c] = x[:, perm[c]], perm = metadata `permutations`[\"level{l}.step{k}\"]",
        },
        "coupling": {
            "kind": m.config.coupling,
            "formula": match m.config.coupling {
                CouplingKind::Additive => "x_a = x[:, :C/2], x_b = x[:, C/2:]; t = net(x_a); y_b = x_b + t; y = cat(x_a, y_b)",
                CouplingKind::Affine => "x_a = x[:, :C/2], x_b = x[:, C/2:]; t = net(x_a) with 2·C_b channels; \
                    shift = t[:, :C_b], scale = sigmoid(t[:, C_b:] + affine_scale_offset); \
                    y_b = (x_b + shift) · scale; y = cat(x_a, y_b); logdet += Σ log scale",
            },
            "affine_scale_offset": number(AFFINE_SCALE_OFFSET),
        },
        "zero_conv": {
            "formula": "y[:, c] = conv2d(x, weight, bias, stride, padding)[:, c] · exp(logs_factor · logs[c])",
            "logs_factor": number(ZERO_CONV_LOGS_FACTOR),
        },
        "split": {
            "formula": "kept = h[:, :C/2], out = h[:, C/2:]; p = prior(kept) (a zero_conv); \
                        log p(out | kept) = Σ log N(out; mean = p[:, :C_out], std = exp(p[:, C_out:]))",
        },
        "prior": "N(0, I) on the final map",
        "logit_batchnorm": bn,
        "scores": if bn.is_some() { "logit_bn(z_s)" } else { "z_s" },
    })
}

fn latent(m: &FiRevNet) -> Value {
    let last = m.levels.last().expect("at least one level");
    let (c, s) = (last.channels, last.side);
    let mut blocks = vec![json!({
        "name": "final",
        "level": m.levels.len() - 1,
        "shape": [c, s, s],
        "start": 0,
    })];
    let mut start = c * s * s;
    for (l, level) in m.levels.iter().enumerate().rev() {
        if level.split.is_some() {
            let (c, s) = (level.channels, level.side);
            let out = c - c / 2;
            blocks.push(json!({
                "name": format!("level{l}.split"),
                "level": l,
                "shape": [out, s, s],
                "start": start,
            }));
            start += out * s * s;
        }
    }
    assert_eq!(start, m.dims(), "the latent blocks cover z");
    json!({
        "dims": m.dims(),
        "formula": "z = cat(block.flatten() for block in blocks) per example; each block flattened in (C, H, W) \
                    order (channel-major); blocks: the final map, then the split-off halves from the last \
                    split level to the first",
        "blocks": blocks,
        "z_s": {
            "formula": format!("z_s[k] = final[k, {}, {}] for k < {}", s / 2, s / 2, m.config.classes),
            "indices": m.logit_indices(),
        },
        "z_n": "z without the z_s indices, the order kept",
    })
}

fn permutations(m: &FiRevNet) -> Value {
    let mut out = serde_json::Map::new();
    for (l, level) in m.levels.iter().enumerate() {
        let spatial = level.side * level.side;
        for (k, step) in level.steps.iter().enumerate() {
            let source = &step.permutation.source;
            let order: Vec<usize> = (0..step.channels)
                .map(|c| source[c * spatial] / spatial)
                .collect();
            out.insert(format!("level{l}.step{k}"), json!(order));
        }
    }
    Value::Object(out)
}

fn cnn_architecture(m: &SmallCnn) -> Value {
    let residual = |name: &str, block: &super::cnn::ResBlock| {
        json!({
            "op": "residual",
            "name": name,
            "formula": "relu(x + body(x))",
            "body": [conv("conv1", &block.conv1), {"op": "relu"}, conv("conv2", &block.conv2)],
        })
    };
    json!({
        "model": "cnn",
        "layers": [
            conv("stem", &m.stem),
            {"op": "relu"},
            residual("block1", &m.block1),
            conv("down1", &m.down1),
            {"op": "relu"},
            residual("block2", &m.block2),
            conv("down2", &m.down2),
            {"op": "relu"},
            {"op": "flatten", "formula": "(N, C, H, W) → (N, C·H·W), channel-major (torch.flatten(x, 1))"},
            linear("hidden", &m.hidden),
            {"op": "relu"},
            linear("head", &m.head),
        ],
        "scores": "the head's output (no normalisation layer)",
    })
}
