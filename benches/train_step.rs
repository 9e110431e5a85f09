//! Benchmark: training-step wall time (forward + backward + optimiser step, batch 128) of
//! (a) the `cpu`-profile fi-RevNet (CE + NLL, Adamax) and (b) the small CNN (CE, Adam),
//! ours against the same models in PyTorch (bench/pytorch_train_step.py), measured side by
//! side in one run at 1 and 2 threads. Prints a table and writes
//! `artifacts/bench/train_step.json`: `[{workload, threads, ours_ms, pytorch_ms, ratio}]`.
//! Goal (issue 3): ratio ≤ 2.5 at 2 threads on both. The PyTorch side runs in a cached venv
//! (bench/pytorch_env.sh); when that cannot be made, it is skipped with a message.
//!
//! Our side runs in a child process per thread count (rayon's pool size is fixed per process).
//!
//! Profiling (`just profile`): `TRAIN_STEP_CHILD=<workload> TRAIN_STEP_PROFILE_STEPS=<n>` runs
//! n steps untimed after the warm-up, for `perf record` to sample. The workloads are the two
//! above plus `firevnet_ice` (the cpu iCE step: flow + 5 adversary steps + the factorial prior),
//! which the profile covers before its PyTorch peer exists.

use std::process::Command;
use std::time::Instant;

use dfdx::prelude::*;
use rand::Rng;
use repro::nn::cnn::{CnnConfig, SmallCnn};
use repro::nn::flow::{CouplingKind, FiRevNet, Permutation, RevNetConfig};
use repro::nn::ice::{
    revnet_ice_step, AdversaryVariant, IceRngs, IceSettings, IceState, MleVariant,
};
use repro::nn::objective::{cnn_step, revnet_ce_step};
use repro::nn::optim::{Optimizer, OptimizerKind};
use repro::nn::{device, rng_for, T2};
use serde_json::{json, Value};

// The same allocator as the `repro` binary, with the same options (src/allocator.rs).
#[global_allocator]
static ALLOCATOR: repro::allocator::Allocator = mimalloc::MiMalloc;

const BATCH: usize = 128;
const WARMUP: usize = 3;
const ITERS: usize = 10;
const WORKLOADS: [&str; 2] = ["firevnet_cpu", "cnn_small"];

fn median_ms(mut step: impl FnMut()) -> f64 {
    for _ in 0..WARMUP {
        step();
    }
    // Profiling: the steps alone, no timing (the sampler measures).
    if let Some(steps) = std::env::var("TRAIN_STEP_PROFILE_STEPS")
        .ok()
        .and_then(|n| n.parse::<usize>().ok())
    {
        for _ in 0..steps {
            step();
        }
        return 0.0;
    }
    let mut times: Vec<f64> = (0..ITERS)
        .map(|_| {
            let start = Instant::now();
            step();
            start.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times[ITERS / 2]
}

/// Times our step for one workload in this process.
fn ours(workload: &str) -> f64 {
    let dev = device();
    let mut rng = rng_for(0, "bench");
    let labels: Vec<u8> = (0..BATCH).map(|_| rng.gen_range(0..10)).collect();
    match workload {
        "firevnet_cpu" | "firevnet_ice" => {
            let config = RevNetConfig {
                in_channels: 1,
                size: 32,
                levels: 3,
                steps: 4,
                hidden: 64,
                coupling: CouplingKind::Additive,
                permutation: Permutation::Reverse,
                dropout: 0.1,
                classes: 10,
                permutation_seed: 0,
                logit_batchnorm: false,
            };
            let mut model = FiRevNet::new(&dev, config, &mut rng);
            let x: T2 = dev.tensor_from_vec(
                (0..1024 * BATCH)
                    .map(|_| rng.gen_range(-1.0..1.0))
                    .collect(),
                (1024, BATCH),
            );
            let mut optim = Optimizer::new(OptimizerKind::Adamax, &dev, &model);
            let mut dropout = rng_for(0, "dropout");
            if workload == "firevnet_ice" {
                // The cpu profile's iCE settings (pipeline.toml, stage train_ice).
                let settings = IceSettings {
                    variant: AdversaryVariant::Paper,
                    w_adv: 1.0,
                    inner_steps: 5,
                    mle: MleVariant::Paper,
                    w_mle: 1.0,
                    adversary_width: 512,
                    adversary_layers: 3,
                    adversary_dropout: 0.1,
                    adversary_lr: 1e-3,
                };
                let mut ice = IceState::new(&dev, &model, settings, OptimizerKind::Adamax, 0);
                let mut rngs = IceRngs::for_epoch(0, 0);
                return median_ms(|| {
                    let (grads, _) = revnet_ice_step(
                        &model,
                        &mut ice,
                        x.clone(),
                        &labels,
                        Some(&mut dropout),
                        &mut rngs,
                    );
                    optim.update(&mut model, &grads, 1e-3);
                    if let Some((prior, optimizer)) = ice.prior.as_mut() {
                        optimizer.update(prior, &grads, 1e-3);
                    }
                    drop(grads);
                    dev.empty_cache();
                });
            }
            median_ms(|| {
                let (grads, _) =
                    revnet_ce_step(&model, x.clone(), &labels, 1.0, Some(&mut dropout));
                optim.update(&mut model, &grads, 1e-3);
                drop(grads);
                dev.empty_cache();
            })
        }
        "cnn_small" => {
            let mut model = SmallCnn::new(
                &dev,
                CnnConfig {
                    width: 16,
                    side: 28,
                    classes: 10,
                },
                &mut rng,
            );
            let x: T2 = dev.tensor_from_vec(
                (0..784 * BATCH).map(|_| rng.gen_range(-1.0..1.0)).collect(),
                (784, BATCH),
            );
            let mut optim = Optimizer::new(OptimizerKind::Adam, &dev, &model);
            median_ms(|| {
                let (grads, _) = cnn_step(&model, x.clone(), &labels);
                optim.update(&mut model, &grads, 1e-3);
                drop(grads);
                dev.empty_cache();
            })
        }
        other => panic!("unknown workload {other}"),
    }
}

fn pytorch(threads: usize) -> Option<Value> {
    let repo = env!("CARGO_MANIFEST_DIR");
    let env = Command::new("bash")
        .arg(format!("{repo}/bench/pytorch_env.sh"))
        .output()
        .ok()?;
    if !env.status.success() {
        eprintln!(
            "PyTorch side skipped: {}",
            String::from_utf8_lossy(&env.stderr).trim()
        );
        return None;
    }
    let python = String::from_utf8_lossy(&env.stdout)
        .lines()
        .last()?
        .trim()
        .to_string();
    let out = Command::new(python)
        .args([
            format!("{repo}/bench/pytorch_train_step.py"),
            "--threads".into(),
            threads.to_string(),
            "--warmup".into(),
            WARMUP.to_string(),
            "--iters".into(),
            ITERS.to_string(),
        ])
        .output()
        .ok()?;
    if !out.status.success() {
        eprintln!(
            "PyTorch side failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        return None;
    }
    serde_json::from_slice(&out.stdout).ok()
}

fn main() {
    repro::allocator::keep_freed_memory();
    if let Ok(workload) = std::env::var("TRAIN_STEP_CHILD") {
        println!("{}", ours(&workload));
        return;
    }
    let exe = std::env::current_exe().expect("own path");
    let mut rows = Vec::new();
    for threads in [1usize, 2] {
        let peer = pytorch(threads);
        for workload in WORKLOADS {
            let out = Command::new(&exe)
                .env("TRAIN_STEP_CHILD", workload)
                .env("RAYON_NUM_THREADS", threads.to_string())
                .output()
                .expect("child bench");
            let ours_ms: f64 = String::from_utf8_lossy(&out.stdout)
                .trim()
                .parse()
                .unwrap_or_else(|_| {
                    panic!("child failed: {}", String::from_utf8_lossy(&out.stderr))
                });
            let pytorch_ms = peer.as_ref().and_then(|p| {
                p["results"]
                    .as_array()?
                    .iter()
                    .find(|r| r["workload"] == workload)?["ms_median"]
                    .as_f64()
            });
            let ratio = pytorch_ms.map(|p| ours_ms / p);
            println!(
                "{workload:<14} threads {threads}: ours {ours_ms:8.1} ms  pytorch {}  ratio {}",
                pytorch_ms.map_or("   skipped".to_string(), |p| format!("{p:8.1} ms")),
                ratio.map_or("-".to_string(), |r| format!("{r:.2}"))
            );
            rows.push(json!({ "workload": workload, "threads": threads, "ours_ms": ours_ms, "pytorch_ms": pytorch_ms, "ratio": ratio }));
        }
    }
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("artifacts/bench");
    std::fs::create_dir_all(&dir).expect("bench dir");
    std::fs::write(
        dir.join("train_step.json"),
        serde_json::to_vec_pretty(&rows).expect("json"),
    )
    .expect("write");
    println!("goal: ratio <= 2.5 at 2 threads on both workloads");
}
