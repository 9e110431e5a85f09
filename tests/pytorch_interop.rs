//! Our weights in PyTorch: the reference module python/repro_torch.py rebuilds the smoke
//! fi-RevNets and CNN from exported weights files alone (metadata + strict `load_state_dict`)
//! and must agree with us: the same test error, z_s to 1e-4, the whole latent, its inverse
//! back to the input, the CNN's logits.
//!
//! PyTorch comes from `REPRO_TORCH_PYTHON`, or the venv `bench/pytorch_env.sh` made (this
//! test only looks for it; `.ci/run` and `just bench` install it). Without it the test is
//! skipped with a message.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use common::Sandbox;
use dfdx::prelude::*;
use ndarray::Array2;
use ndarray_npy::ReadNpyExt;
use repro::nn::device;
use repro::nn::input::{cnn_input, revnet_input};
use repro::nn::model::Model;

/// z_s (and the CNN's logits) must agree to this.
const TOLERANCE: f32 = 1e-4;

/// A python with torch, or the reason there is none.
fn torch_python() -> Result<PathBuf, String> {
    let works = |python: &Path| {
        Command::new(python)
            .args(["-c", "import torch"])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if let Some(python) = std::env::var_os("REPRO_TORCH_PYTHON") {
        let python = PathBuf::from(python);
        return if works(&python) {
            Ok(python)
        } else {
            Err(format!(
                "REPRO_TORCH_PYTHON={} cannot import torch",
                python.display()
            ))
        };
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("bench/pytorch_env.sh");
    let out = Command::new("bash")
        .arg(&script)
        .env("REPRO_TORCH_CHECK_ONLY", "1")
        .output()
        .map_err(|e| format!("running {}: {e}", script.display()))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    match stdout.lines().last() {
        Some(line) if out.status.success() && works(Path::new(line.trim())) => {
            Ok(PathBuf::from(line.trim()))
        }
        _ => Err(String::from_utf8_lossy(&out.stderr).trim().to_string()),
    }
}

/// What python/repro_torch.py printed, and the arrays it wrote.
struct Torch {
    report: serde_json::Value,
    scores: Array2<f32>,
    z: Option<Array2<f32>>,
}

fn run_torch(python: &Path, weights: &Path, mnist: &Path, n: usize, out: &Path) -> Torch {
    let module = Path::new(env!("CARGO_MANIFEST_DIR")).join("python/repro_torch.py");
    let result = Command::new(python)
        .arg(&module)
        .arg(weights)
        .arg(mnist.join("test_images.npy"))
        .arg("--labels")
        .arg(mnist.join("test_labels.npy"))
        .args(["--limit", &n.to_string(), "--out"])
        .arg(out)
        .output()
        .unwrap();
    assert!(
        result.status.success(),
        "{} failed:\n{}",
        module.display(),
        String::from_utf8_lossy(&result.stderr)
    );
    let report = serde_json::from_slice(&result.stdout).unwrap();
    let read = |name: &str| {
        let path = out.join(name);
        path.exists()
            .then(|| Array2::<f32>::read_npy(std::fs::File::open(path).unwrap()).unwrap())
    };
    Torch {
        report,
        scores: read("scores.npy").expect("scores.npy"),
        z: read("z.npy"),
    }
}

/// Our rows-layout `(R, B)` values as `(B, R)`.
fn transposed(values: &[f32], rows: usize, b: usize) -> Array2<f32> {
    Array2::from_shape_fn((b, rows), |(n, r)| values[r * b + n])
}

fn max_abs_diff(a: &Array2<f32>, b: &Array2<f32>) -> f32 {
    assert_eq!(a.shape(), b.shape());
    a.iter()
        .zip(b.iter())
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Our evaluation of a stage: (test error %, n_test).
fn our_evaluation(sb: &Sandbox, sets: &[&str], stage: &str, dir: &str) -> (f64, usize) {
    sb.ok(&[sets, &["export", stage, dir]].concat());
    let e: serde_json::Value =
        serde_json::from_slice(&std::fs::read(sb.path(&format!("{dir}/evaluation.json"))).unwrap())
            .unwrap();
    (
        e["test_error"].as_f64().unwrap(),
        e["n_test"].as_u64().unwrap() as usize,
    )
}

fn check_errors(name: &str, ours: (f64, usize), torch: &serde_json::Value) {
    let (error, n) = ours;
    assert_eq!(torch["n"].as_u64().unwrap() as usize, n);
    assert_eq!(
        torch["errors"].as_u64().unwrap() as f64,
        (error * n as f64 / 100.0).round(),
        "{name}: PyTorch's test error {} %, ours {error} %",
        torch["error_percent"]
    );
    assert_eq!(torch["error_percent"].as_f64().unwrap(), error);
}

/// One fi-RevNet: train and evaluate it under `sets`, export, compare.
fn check_revnet(sb: &Sandbox, python: &Path, name: &str, sets: &[&str]) {
    sb.ok(&[sets, &["run", "eval_ce"]].concat());
    let ours = our_evaluation(sb, sets, "eval_ce", &format!("{name}/eval"));
    let weights_dir = format!("{name}/train");
    sb.ok(&[sets, &["export", "train_ce", &weights_dir]].concat());
    let weights = sb.path(&format!("{weights_dir}/weights.safetensors"));
    let n = ours.1;
    let torch = run_torch(python, &weights, &sb.path("mnist"), n, &sb.path(name));

    let dev = device();
    let Model::RevNet(flow) =
        Model::from_safetensors(&dev, &std::fs::read(&weights).unwrap()).unwrap()
    else {
        panic!("train_ce is a fi-RevNet")
    };
    let test = repro::data::split_from_npy(
        &std::fs::read(sb.path("mnist/test_images.npy")).unwrap(),
        &std::fs::read(sb.path("mnist/test_labels.npy")).unwrap(),
    )
    .unwrap();
    let images = test.images.as_slice().unwrap();
    let batch: Vec<usize> = (0..n).collect();
    let z = flow
        .forward(
            revnet_input(&dev, images, &batch, flow.config.in_channels, None),
            None,
        )
        .z;
    let ours_z = transposed(&z.as_vec(), flow.dims(), n);
    let torch_z = torch.z.expect("z.npy");
    let z_diff = max_abs_diff(&ours_z, &torch_z);
    let logits = flow.logit_indices().to_vec();
    let z_s =
        |z: &Array2<f32>| Array2::from_shape_fn((n, logits.len()), |(i, k)| z[[i, logits[k]]]);
    let z_s_diff = max_abs_diff(&z_s(&ours_z), &z_s(&torch_z));
    let scores = flow.scores(z.clone());
    let scores_diff = max_abs_diff(
        &transposed(&scores.as_vec(), logits.len(), n),
        &torch.scores,
    );
    let reconstruction = torch.report["reconstruction_max_abs"].as_f64().unwrap();
    let reconstruction64 = torch.report["reconstruction_max_abs_float64"]
        .as_f64()
        .unwrap();
    // Our own round trip on the same images: float32 rounding, amplified where an affine
    // coupling divides by a small scale, bounds what PyTorch can do.
    let x = revnet_input(&dev, images, &batch, flow.config.in_channels, None);
    let ours_reconstruction = flow
        .inverse(z.clone())
        .as_vec()
        .iter()
        .zip(x.as_vec())
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max) as f64;
    let z_scale = ours_z.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    eprintln!(
        "pytorch interop {name} ({}): test error ours {} % / PyTorch {} % on {n}; max |Δz_s| {z_s_diff:.2e}, \
         max |Δscores| {scores_diff:.2e}, max |Δz| {z_diff:.2e} (max |z| {z_scale:.1}), \
         max |inverse(forward(x)) − x| PyTorch {reconstruction:.2e} (float64 {reconstruction64:.1e}), \
         ours {ours_reconstruction:.2e}",
        sets.join(" "),
        ours.0,
        torch.report["error_percent"]
    );
    check_errors(name, ours, &torch.report);
    assert!(z_s_diff <= TOLERANCE, "{name}: max |Δz_s| {z_s_diff}");
    assert!(
        scores_diff <= TOLERANCE,
        "{name}: max |Δscores| {scores_diff}"
    );
    assert!(
        z_diff <= TOLERANCE * z_scale.max(1.0),
        "{name}: max |Δz| {z_diff} (max |z| {z_scale})"
    );
    assert!(
        reconstruction64 <= 1e-9,
        "{name}: PyTorch's inverse is not exact in float64: {reconstruction64}"
    );
    assert!(
        reconstruction <= 1e-4_f64.max(2.0 * ours_reconstruction),
        "{name}: PyTorch's reconstruction {reconstruction}, ours {ours_reconstruction}"
    );
}

#[test]
fn pytorch_rebuilds_our_models_from_the_weights_files_and_agrees() {
    let python = match torch_python() {
        Ok(p) => p,
        Err(why) => {
            eprintln!(
                "SKIPPED: PyTorch is not available ({why}); `bash bench/pytorch_env.sh` installs it, \
                 or set REPRO_TORCH_PYTHON to a python with torch"
            );
            return;
        }
    };
    let start = Instant::now();
    let sb = Sandbox::new();
    sb.ok(&["run", "mnist"]);
    sb.ok(&["export", "mnist", "mnist"]);

    // The smoke fi-RevNet a little wider and trained a little longer, so that its logits mean
    // something (about 18 % test error instead of chance), evaluated on 1000 test images.
    let longer = [
        "--set",
        "train_ce.hidden=16",
        "--set",
        "train_ce.steps=2",
        "--set",
        "train_ce.train_limit=4096",
        "--set",
        "train_ce.epochs=2",
        "--set",
        "eval_ce.test_limit=1000",
    ];
    check_revnet(&sb, &python, "ce", &longer);
    // Every other architecture choice the metadata describes: three input channels (the digit
    // in the last), a seeded channel shuffle, affine couplings, the logit BatchNorm.
    let variant = [
        &longer[..],
        &[
            "--set",
            "train_ce.in_channels=3",
            "--set",
            "train_ce.permutation=shuffle",
            "--set",
            "train_ce.coupling=affine",
            "--set",
            "train_ce.logit_batchnorm=true",
        ],
    ]
    .concat();
    check_revnet(&sb, &python, "variant", &variant);

    // The CNN (about 12 % test error): the same test error, the same logits.
    let cnn_sets = [
        "--set",
        "cnn.train_limit=4096",
        "--set",
        "cnn.epochs=2",
        "--set",
        "eval_cnn.test_limit=1000",
    ];
    sb.ok(&[&cnn_sets[..], &["run", "eval_cnn"]].concat());
    let ours = our_evaluation(&sb, &cnn_sets, "eval_cnn", "cnn/eval");
    sb.ok(&[&cnn_sets[..], &["export", "cnn", "cnn/train"]].concat());
    let weights = sb.path("cnn/train/weights.safetensors");
    let n = ours.1;
    let torch = run_torch(&python, &weights, &sb.path("mnist"), n, &sb.path("cnn"));
    let dev = device();
    let model = Model::from_safetensors(&dev, &std::fs::read(&weights).unwrap()).unwrap();
    let test = repro::data::split_from_npy(
        &std::fs::read(sb.path("mnist/test_images.npy")).unwrap(),
        &std::fs::read(sb.path("mnist/test_labels.npy")).unwrap(),
    )
    .unwrap();
    let batch: Vec<usize> = (0..n).collect();
    let logits = model.logits(cnn_input(&dev, test.images.as_slice().unwrap(), &batch));
    let classes = logits.shape().0;
    let diff = max_abs_diff(&transposed(&logits.as_vec(), classes, n), &torch.scores);
    eprintln!(
        "pytorch interop cnn: test error ours {} % / PyTorch {} % on {n}; max |Δlogits| {diff:.2e}",
        ours.0, torch.report["error_percent"]
    );
    check_errors("cnn", ours, &torch.report);
    assert!(diff <= TOLERANCE, "cnn: max |Δlogits| {diff}");
    eprintln!("pytorch interop: {:.1} s", start.elapsed().as_secs_f64());
}

/// Without PyTorch: the description in a weights file is the model's (permutations included),
/// and a file whose description disagrees with its config does not load.
#[test]
fn the_weights_metadata_describes_the_model_and_is_checked_on_load() {
    use rand::SeedableRng;
    use repro::nn::flow::{CouplingKind, Permutation, RevNetConfig};
    use repro::nn::model::ModelConfig;
    use repro::nn::HasParams;
    let dev = device();
    let config = ModelConfig::Firevnet(RevNetConfig {
        in_channels: 3,
        size: 32,
        levels: 3,
        steps: 2,
        hidden: 4,
        coupling: CouplingKind::Affine,
        permutation: Permutation::Shuffle,
        dropout: 0.1,
        classes: 10,
        permutation_seed: 7,
        logit_batchnorm: true,
    });
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
    let model = Model::new(&dev, &config, &mut rng);
    let bytes = model.to_safetensors(Default::default()).unwrap();
    let meta = repro::nn::io::metadata(&bytes).unwrap();
    assert_eq!(meta["schema"], repro::nn::describe::SCHEMA);
    let Model::RevNet(flow) = &model else {
        unreachable!()
    };
    let permutations: serde_json::Value = serde_json::from_str(&meta["permutations"]).unwrap();
    for (l, level) in flow.levels.iter().enumerate() {
        let spatial = level.side * level.side;
        for (k, step) in level.steps.iter().enumerate() {
            let order: Vec<usize> =
                serde_json::from_value(permutations[format!("level{l}.step{k}")].clone()).unwrap();
            let rows: Vec<usize> = order
                .iter()
                .flat_map(|&c| (0..spatial).map(move |s| c * spatial + s))
                .collect();
            assert_eq!(rows, step.permutation.source, "level{l}.step{k}");
        }
    }
    let latent: serde_json::Value = serde_json::from_str(&meta["latent"]).unwrap();
    let indices: Vec<usize> = serde_json::from_value(latent["z_s"]["indices"].clone()).unwrap();
    assert_eq!(indices, flow.logit_indices());
    let architecture: serde_json::Value = serde_json::from_str(&meta["architecture"]).unwrap();
    let net = &architecture["levels"][0]["coupling"]["net"];
    for (i, conv) in [(0, "conv1"), (3, "conv2"), (7, "conv3")] {
        assert_eq!(net[i]["name"], conv);
        let has_bias = model
            .params()
            .iter()
            .any(|p| p.name == format!("level0.step0.coupling.{conv}.bias"));
        assert_eq!(net[i]["bias"], has_bias, "{conv}");
    }
    // Equal weights are equal bytes: the header is canonical.
    assert!(bytes == model.to_safetensors(Default::default()).unwrap());
    assert!(Model::from_safetensors(&dev, &bytes).is_ok());

    // A description that is not the one the config builds is refused.
    let mut tampered: std::collections::HashMap<String, String> = meta.clone();
    let mut p = permutations.clone();
    p["level0.step0"] = serde_json::json!((0..12).collect::<Vec<usize>>());
    tampered.insert("permutations".into(), p.to_string());
    let bytes = repro::nn::io::save(&model.state(), tampered).unwrap();
    let err = Model::from_safetensors(&dev, &bytes).err().unwrap();
    assert!(format!("{err:#}").contains("permutations"), "{err:#}");
}
