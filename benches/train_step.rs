//! Benchmark: one step of four CPU workloads at batch 128, ours against the same computation in
//! PyTorch (bench/pytorch_train_step.py), measured side by side in one run at 1 and 2 threads:
//!
//! - `firevnet_cpu`: the `cpu`-profile fi-RevNet's CE + NLL training step (Adamax);
//! - `firevnet_ice`: its iCE step (flow forward, 5 adversary steps on the detached z_n, CE +
//!   MLE under the learned factorial prior + the clipped adversarial term, both updates);
//! - `cnn_small`: the small CNN's CE training step (Adam);
//! - `pgd_cnn`: one L∞ PGD step on that CNN (forward + input gradient, signed step, projection).
//!
//! Each workload runs in its own process on each side, so its peak RSS (VmHWM; PyTorch's
//! ru_maxrss) is the step's, next to the RSS before the workload was built (the runtime's own).
//! Then the conv GEMMs alone: every conv shape of the fi-RevNet and CNN steps, forward + input
//! gradient + weight gradient, as GFLOP/s next to the machine's fp32 FMA peak measured by a
//! register-only FMA loop in the same run.
//!
//! Prints tables and writes `artifacts/bench/train_step.json`
//! (`[{workload, threads, ours_ms, pytorch_ms, ratio, ours_peak_rss_mb, ours_base_rss_mb,
//! pytorch_peak_rss_mb, pytorch_base_rss_mb}]`) and `artifacts/bench/conv_gflops.json`.
//! Goals (issue 12): ratio ≤ 1.0 at 2 threads and ≤ 0.9 at 1 thread on every workload; conv
//! GEMMs ≥ 50 % of peak; our peak RSS ≤ PyTorch's. The PyTorch side runs in a cached venv
//! (bench/pytorch_env.sh); when that cannot be made, it is skipped with a message.
//!
//! Our side runs in a child process per workload and thread count (rayon's pool size is fixed
//! per process). Profiling (`just profile`): `TRAIN_STEP_CHILD=<workload>
//! TRAIN_STEP_PROFILE_STEPS=<n>` runs n steps untimed after the warm-up, for `perf record`.

use std::process::Command;
use std::time::Instant;

use dfdx::prelude::*;
use rand::Rng;
use repro::attack::{features_and_gradient, Attacked, Feature};
use repro::nn::cnn::{CnnConfig, SmallCnn};
use repro::nn::flow::{CouplingKind, FiRevNet, Permutation, RevNetConfig};
use repro::nn::ice::{
    revnet_ice_step, AdversaryVariant, IceRngs, IceSettings, IceState, MleVariant,
};
use repro::nn::model::Model;
use repro::nn::objective::{cnn_step, revnet_ce_step};
use repro::nn::ops::{argmax_rows, cross_entropy, Conv2d};
use repro::nn::optim::{Optimizer, OptimizerKind};
use repro::nn::{device, rng_for, Dev, T2};
use serde_json::{json, Value};

// The same allocator as the `repro` binary, with the same options (src/allocator.rs).
#[global_allocator]
static ALLOCATOR: repro::allocator::Allocator = mimalloc::MiMalloc;

const BATCH: usize = 128;
const WARMUP: usize = 3;
const ITERS: usize = 10;
const WORKLOADS: [&str; 4] = ["firevnet_cpu", "firevnet_ice", "cnn_small", "pgd_cnn"];

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

/// A field of /proc/self/status in MB: `VmRSS` (resident now) or `VmHWM` (its peak).
fn proc_status_mb(field: &str) -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|rest| rest.split_whitespace().next()?.parse::<f64>().ok())
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

/// The `cpu` profile's fi-RevNet (pipeline.toml, stage train_ce).
fn firevnet(dev: &Dev, rng: &mut rand_chacha::ChaCha8Rng) -> FiRevNet {
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
    FiRevNet::new(dev, config, rng)
}

fn cnn(dev: &Dev, rng: &mut rand_chacha::ChaCha8Rng) -> SmallCnn {
    let config = CnnConfig {
        width: 16,
        side: 28,
        classes: 10,
    };
    SmallCnn::new(dev, config, rng)
}

/// Times one workload's step in this process.
fn ours(workload: &str) -> f64 {
    let dev = device();
    let mut rng = rng_for(0, "bench");
    let labels: Vec<u8> = (0..BATCH).map(|_| rng.gen_range(0..10)).collect();
    match workload {
        "firevnet_cpu" | "firevnet_ice" => {
            let mut model = firevnet(&dev, &mut rng);
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
            let mut model = cnn(&dev, &mut rng);
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
        "pgd_cnn" => {
            // One step of the cpu profile's L∞ PGD (stage pgd_cnn: 40 steps, step factor 2.5)
            // at ε = 0.1, the way src/attack/pgd.rs takes it: the iterate's class (to see
            // whether it broke), the input gradient of the cross-entropy, a signed step, the
            // projection onto the ball and [0, 1].
            let model = Model::Cnn(cnn(&dev, &mut rng));
            let attacked = Attacked::new(&dev, &model);
            let clean: Vec<f32> = (0..784 * BATCH).map(|_| rng.gen_range(0.0..1.0)).collect();
            let (epsilon, alpha) = (0.1f32, 2.5 * 0.1 / 40.0);
            let mut x = clean.clone();
            median_ms(|| {
                let images: T2 = dev.tensor_from_vec(x.clone(), (784, BATCH));
                let (logits, grad) =
                    features_and_gradient(&attacked, &images, Feature::Logits, |logits| {
                        cross_entropy(logits, &labels)
                    });
                std::hint::black_box(argmax_rows(&logits));
                for ((v, g), c) in x.iter_mut().zip(&grad).zip(&clean) {
                    let sign = if *g > 0.0 {
                        1.0
                    } else if *g < 0.0 {
                        -1.0
                    } else {
                        0.0
                    };
                    *v = (*v + alpha * sign)
                        .clamp(c - epsilon, c + epsilon)
                        .clamp(0.0, 1.0);
                }
                dev.empty_cache();
            })
        }
        other => panic!("unknown workload {other}"),
    }
}

/// One conv shape of a benchmarked step: `count` convs `c_in → c_out`, k×k, on side×side.
struct ConvShape {
    net: &'static str,
    c_in: usize,
    c_out: usize,
    kernel: usize,
    stride: usize,
    side: usize,
    bias: bool,
    count: usize,
}

/// Every conv of the fi-RevNet `cpu` step (per level: the coupling's 3×3 in, 1×1 hidden, 3×3
/// out, four steps each, and the split prior's 3×3) and of the CNN step.
fn conv_shapes() -> Vec<ConvShape> {
    let mut shapes = Vec::new();
    for (level, (channels, side)) in [(4usize, 16usize), (8, 8), (16, 4)].into_iter().enumerate() {
        let half = channels / 2;
        for (c_in, c_out, kernel, bias) in [
            (half, 64, 3, false),
            (64, 64, 1, false),
            (64, half, 3, true),
        ] {
            shapes.push(ConvShape {
                net: "firevnet_cpu",
                c_in,
                c_out,
                kernel,
                stride: 1,
                side,
                bias,
                count: 4,
            });
        }
        if level < 2 {
            shapes.push(ConvShape {
                net: "firevnet_cpu",
                c_in: half,
                c_out: channels,
                kernel: 3,
                stride: 1,
                side,
                bias: true,
                count: 1,
            });
        }
    }
    for (c_in, c_out, stride, side, count) in [
        (1, 16, 1, 28, 1),
        (16, 16, 1, 28, 2),
        (16, 32, 2, 28, 1),
        (32, 32, 1, 14, 2),
        (32, 32, 2, 14, 1),
    ] {
        shapes.push(ConvShape {
            net: "cnn_small",
            c_in,
            c_out,
            kernel: 3,
            stride,
            side,
            bias: true,
            count,
        });
    }
    shapes
}

/// Times forward + input gradient + weight gradient of every conv shape, in this process.
fn conv_rows() -> Value {
    let dev = device();
    let mut rng = rng_for(0, "bench-conv");
    let rows: Vec<Value> = conv_shapes()
        .iter()
        .map(|s| {
            let conv = if s.bias {
                Conv2d::init(&dev, "conv", s.c_in, s.c_out, s.kernel, s.stride, s.kernel / 2, &mut rng)
            } else {
                Conv2d::init_without_bias(&dev, "conv", s.c_in, s.c_out, s.kernel, s.stride, s.kernel / 2, &mut rng)
            };
            let n = s.c_in * s.side * s.side;
            let x: T2 = dev.tensor_from_vec(
                (0..n * BATCH).map(|_| rng.gen_range(-1.0..1.0)).collect(),
                (n, BATCH),
            );
            let ms = median_ms(|| {
                let (y, _, _) = conv.forward(x.clone().leaky_traced(), s.side, s.side);
                let grads = y.sum::<(), _>().backward();
                drop(grads);
                dev.empty_cache();
            });
            let (out_side, _) = conv.out_size(s.side, s.side);
            // Nominal multiply-adds of one pass (padding taps included), three passes.
            let flops = 3.0 * 2.0 * (BATCH * out_side * out_side * s.c_out * s.c_in * s.kernel * s.kernel) as f64;
            json!({
                "net": s.net,
                "conv": format!("{}x{} {}->{} stride {} on {}x{}", s.kernel, s.kernel, s.c_in, s.c_out, s.stride, s.side, s.side),
                "count": s.count,
                "ms": ms,
                "gflops": flops / (ms * 1e6),
                "gflop": flops * 1e-9,
            })
        })
        .collect();
    Value::Array(rows)
}

/// fp32 GFLOP/s of a register-only FMA loop on every rayon thread: the peak the conv GEMMs are
/// measured against (AVX-512 where the CPU has it, else AVX2 + FMA, else none).
fn fma_peak_gflops() -> Option<f64> {
    let threads = rayon::current_num_threads();
    let iters = 20_000_000usize;
    let per_call = fma::flops_per_iteration()?;
    let start = Instant::now();
    rayon::broadcast(|_| std::hint::black_box(fma::run(std::hint::black_box(iters))));
    let seconds = start.elapsed().as_secs_f64();
    Some(threads as f64 * iters as f64 * per_call / seconds * 1e-9)
}

#[cfg(target_arch = "x86_64")]
mod fma {
    use std::arch::x86_64::*;

    /// Independent accumulators: enough to cover the FMA latency × units of current cores.
    const CHAINS: usize = 12;

    pub fn flops_per_iteration() -> Option<f64> {
        if is_x86_feature_detected!("avx512f") {
            Some((CHAINS * 16 * 2) as f64)
        } else if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            Some((CHAINS * 8 * 2) as f64)
        } else {
            None
        }
    }

    pub fn run(iters: usize) -> f32 {
        // SAFETY: each kernel runs only where its instruction set was detected.
        unsafe {
            if is_x86_feature_detected!("avx512f") {
                avx512(iters)
            } else {
                avx2(iters)
            }
        }
    }

    #[target_feature(enable = "avx512f")]
    unsafe fn avx512(iters: usize) -> f32 {
        let (m, a) = (_mm512_set1_ps(0.999_999), _mm512_set1_ps(1e-7));
        let mut acc = [_mm512_set1_ps(1.0); CHAINS];
        for _ in 0..iters {
            for r in acc.iter_mut() {
                *r = _mm512_fmadd_ps(*r, m, a);
            }
        }
        acc.iter().map(|&r| _mm512_reduce_add_ps(r)).sum()
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn avx2(iters: usize) -> f32 {
        let (m, a) = (_mm256_set1_ps(0.999_999), _mm256_set1_ps(1e-7));
        let mut acc = [_mm256_set1_ps(1.0); CHAINS];
        for _ in 0..iters {
            for r in acc.iter_mut() {
                *r = _mm256_fmadd_ps(*r, m, a);
            }
        }
        let mut lanes = [0.0f32; 8];
        let mut total = 0.0;
        for r in acc {
            _mm256_storeu_ps(lanes.as_mut_ptr(), r);
            total += lanes.iter().sum::<f32>();
        }
        total
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod fma {
    pub fn flops_per_iteration() -> Option<f64> {
        None
    }
    pub fn run(_: usize) -> f32 {
        0.0
    }
}

/// The venv's python (bench/pytorch_env.sh), or why there is none.
fn pytorch_python() -> Option<String> {
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
    Some(
        String::from_utf8_lossy(&env.stdout)
            .lines()
            .last()?
            .trim()
            .to_string(),
    )
}

/// PyTorch's result row for one workload, in a process of its own.
fn pytorch(python: &str, threads: usize, workload: &str) -> Option<Value> {
    let repo = env!("CARGO_MANIFEST_DIR");
    let out = Command::new(python)
        .args([
            format!("{repo}/bench/pytorch_train_step.py"),
            "--threads".into(),
            threads.to_string(),
            "--warmup".into(),
            WARMUP.to_string(),
            "--iters".into(),
            ITERS.to_string(),
            "--workloads".into(),
            workload.into(),
        ])
        .output()
        .ok()?;
    if !out.status.success() {
        eprintln!(
            "PyTorch side failed on {workload}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        return None;
    }
    let result: Value = serde_json::from_slice(&out.stdout).ok()?;
    result["results"].as_array()?.first().cloned()
}

/// Runs this bench's child mode `child` at `threads` and parses the JSON it prints.
fn child(child: &str, threads: usize) -> Value {
    let exe = std::env::current_exe().expect("own path");
    let out = Command::new(exe)
        .env("TRAIN_STEP_CHILD", child)
        .env("RAYON_NUM_THREADS", threads.to_string())
        .output()
        .expect("child bench");
    serde_json::from_slice(&out.stdout).unwrap_or_else(|_| {
        panic!(
            "child {child} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

fn main() {
    repro::allocator::keep_freed_memory();
    if let Ok(workload) = std::env::var("TRAIN_STEP_CHILD") {
        let out = match workload.as_str() {
            "conv" => conv_rows(),
            "fma_peak" => json!(fma_peak_gflops()),
            _ => {
                let base_rss_mb = proc_status_mb("VmRSS");
                let ms = ours(&workload);
                json!({ "ms": ms, "peak_rss_mb": proc_status_mb("VmHWM"), "base_rss_mb": base_rss_mb })
            }
        };
        println!("{out}");
        return;
    }
    let python = pytorch_python();
    let mb = |v: &Value| v.as_f64().map_or("-".to_string(), |x| format!("{x:.0}"));
    let mut rows = Vec::new();
    println!("workload       threads   ours ms  pytorch ms  ratio   peak RSS MB ours / pytorch (before the workload)");
    for threads in [1usize, 2] {
        for workload in WORKLOADS {
            let ours = child(workload, threads);
            let peer = python
                .as_deref()
                .and_then(|py| pytorch(py, threads, workload));
            let ours_ms = ours["ms"].as_f64().expect("ms");
            let pytorch_ms = peer.as_ref().and_then(|p| p["ms_median"].as_f64());
            let ratio = pytorch_ms.map(|p| ours_ms / p);
            let peer_field = |f: &str| peer.as_ref().map_or(Value::Null, |p| p[f].clone());
            println!(
                "{workload:<14} {threads:>7} {ours_ms:9.1} {:>11} {:>6}   {:>5} / {:>5} ({} / {})",
                pytorch_ms.map_or("skipped".to_string(), |p| format!("{p:.1}")),
                ratio.map_or("-".to_string(), |r| format!("{r:.2}")),
                mb(&ours["peak_rss_mb"]),
                mb(&peer_field("peak_rss_mb")),
                mb(&ours["base_rss_mb"]),
                mb(&peer_field("base_rss_mb")),
            );
            rows.push(json!({
                "workload": workload, "threads": threads,
                "ours_ms": ours_ms, "pytorch_ms": pytorch_ms, "ratio": ratio,
                "ours_peak_rss_mb": ours["peak_rss_mb"], "ours_base_rss_mb": ours["base_rss_mb"],
                "pytorch_peak_rss_mb": peer_field("peak_rss_mb"), "pytorch_base_rss_mb": peer_field("base_rss_mb"),
            }));
        }
    }
    println!("goals: ratio <= 0.9 at 1 thread and <= 1.0 at 2 threads; peak RSS <= PyTorch's");

    // The conv GEMMs alone, against the FMA peak of the same thread count.
    let mut conv = Vec::new();
    for threads in [1usize, 2] {
        let peak = child("fma_peak", threads).as_f64();
        let shapes = child("conv", threads);
        let shapes = shapes.as_array().expect("conv rows");
        println!(
            "\nconv GEMMs at {threads} thread(s), forward + input grad + weight grad, batch {BATCH}; fp32 FMA peak {}",
            peak.map_or("unknown".to_string(), |p| format!("{p:.0} GFLOP/s"))
        );
        for net in ["firevnet_cpu", "cnn_small"] {
            let (mut gflop, mut ms) = (0.0, 0.0);
            for s in shapes.iter().filter(|s| s["net"] == net) {
                let count = s["count"].as_f64().unwrap_or(1.0);
                gflop += count * s["gflop"].as_f64().unwrap_or(0.0);
                ms += count * s["ms"].as_f64().unwrap_or(0.0);
                println!(
                    "  {net:<13} {:<32} x{count:<2} {:7.2} ms {:6.1} GFLOP/s",
                    s["conv"].as_str().unwrap_or(""),
                    s["ms"].as_f64().unwrap_or(0.0),
                    s["gflops"].as_f64().unwrap_or(0.0),
                );
            }
            let gflops = gflop / (ms * 1e-3);
            let share = peak.map(|p| 100.0 * gflops / p);
            println!(
                "  {net:<13} all convs of a step: {gflop:.2} GFLOP in {ms:.1} ms = {gflops:.1} GFLOP/s{}",
                share.map_or(String::new(), |s| format!(" ({s:.0} % of peak)"))
            );
            conv.push(json!({ "net": net, "threads": threads, "gflop": gflop, "ms": ms, "gflops": gflops, "peak_gflops": peak, "share_of_peak": share.map(|s| s / 100.0) }));
        }
        conv.push(json!({ "threads": threads, "peak_gflops": peak, "shapes": shapes }));
    }
    println!("goal: conv GEMMs >= 50 % of the fp32 peak");

    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("artifacts/bench");
    std::fs::create_dir_all(&dir).expect("bench dir");
    for (name, value) in [
        ("train_step.json", Value::Array(rows)),
        ("conv_gflops.json", Value::Array(conv)),
    ] {
        std::fs::write(
            dir.join(name),
            serde_json::to_vec_pretty(&value).expect("json"),
        )
        .expect("write");
    }
}
