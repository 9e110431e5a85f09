//! Benchmark: wall time of a no-op `repro reproduce` (every stage a hit) against the
//! process's own start-up (`repro --version`), measured side by side in the same run.
//! Goal: no-op ≤ start-up + 0.3 s. Writes `artifacts/bench/noop_reproduce.json`.

use std::path::Path;
use std::process::Command;
use std::time::Instant;

// The scratch copy of `pipeline/` and `paper/` the end-to-end tests use.
#[path = "../tests/common/mod.rs"]
mod common;

fn median_seconds(runs: usize, mut f: impl FnMut()) -> (f64, f64, f64) {
    let mut times: Vec<f64> = (0..runs)
        .map(|_| {
            let start = Instant::now();
            f();
            start.elapsed().as_secs_f64()
        })
        .collect();
    times.sort_by(f64::total_cmp);
    (times[0], times[runs / 2], times[runs - 1])
}

fn main() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let sandbox = common::Sandbox::new();
    let repro = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_repro"))
            .args(args)
            .current_dir(sandbox.dir.path())
            .env_remove("REPRO_STORE")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "repro {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    repro(&["--profile", "smoke", "reproduce"]); // fill the store once
    let runs = 15;
    let startup = median_seconds(runs, || repro(&["--version"]));
    let noop = median_seconds(runs, || repro(&["--profile", "smoke", "reproduce"]));
    let beyond = noop.1 - startup.1;
    println!(
        "start-up (repro --version): min {:.4} s, median {:.4} s, max {:.4} s",
        startup.0, startup.1, startup.2
    );
    println!(
        "no-op reproduce (all hits): min {:.4} s, median {:.4} s, max {:.4} s",
        noop.0, noop.1, noop.2
    );
    println!(
        "no-op beyond start-up: {beyond:.4} s (goal <= 0.3 s: {})",
        if beyond <= 0.3 { "met" } else { "MISSED" }
    );
    let out = repo.join("artifacts/bench");
    std::fs::create_dir_all(&out).unwrap();
    let json = serde_json::json!({
        "workload": "noop_reproduce", "runs": runs,
        "startup_median_s": startup.1, "noop_median_s": noop.1, "noop_min_s": noop.0, "noop_max_s": noop.2,
        "beyond_startup_s": beyond, "goal_s": 0.3,
    });
    std::fs::write(
        out.join("noop_reproduce.json"),
        serde_json::to_vec_pretty(&json).unwrap(),
    )
    .unwrap();
}
