//! Benchmark: `repro reproduce --jobs 2` against `--jobs 1` on the `smoke` profile from an
//! empty store (issue 13: `-j 2` measurably faster than `-j 1`), alternating the two in the
//! same run, each time in a fresh scratch copy of `pipeline/` and `paper/`. The datasets come
//! from the download cache, so what is timed is the stages. Writes
//! `artifacts/bench/parallel_reproduce.json`.

use std::path::Path;
use std::process::Command;
use std::time::Instant;

// The scratch copy of `pipeline/` and `paper/` the end-to-end tests use.
#[path = "../tests/common/mod.rs"]
mod common;

/// Seconds for one `reproduce --jobs N` of `smoke` from an empty store.
fn reproduce_from_empty(jobs: &str) -> f64 {
    let sandbox = common::Sandbox::new();
    let start = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_repro"))
        .args(["--profile", "smoke", "reproduce", "--jobs", jobs])
        .current_dir(sandbox.dir.path())
        .env_remove("REPRO_STORE")
        .output()
        .unwrap();
    let seconds = start.elapsed().as_secs_f64();
    assert!(
        out.status.success(),
        "repro reproduce --jobs {jobs}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    seconds
}

fn summary(mut times: Vec<f64>) -> (f64, f64, f64) {
    times.sort_by(f64::total_cmp);
    (times[0], times[times.len() / 2], times[times.len() - 1])
}

fn main() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    reproduce_from_empty("1"); // fills the download cache; not timed
    let runs = 5;
    let (mut one, mut two) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        one.push(reproduce_from_empty("1"));
        two.push(reproduce_from_empty("2"));
    }
    let (one, two) = (summary(one), summary(two));
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!("smoke from an empty store, {cores} cores, {runs} runs each (alternating):");
    println!(
        "  --jobs 1: min {:.2} s, median {:.2} s, max {:.2} s",
        one.0, one.1, one.2
    );
    println!(
        "  --jobs 2: min {:.2} s, median {:.2} s, max {:.2} s",
        two.0, two.1, two.2
    );
    let ratio = two.1 / one.1;
    // "Measurably" faster: the slowest -j 2 run beats the fastest -j 1 run.
    let separated = two.2 < one.0;
    println!(
        "  -j 2 / -j 1 (medians): {ratio:.3}; every -j 2 run faster than every -j 1 run: {}",
        if separated {
            "yes (goal met)"
        } else {
            "no (goal MISSED)"
        }
    );
    let out = repo.join("artifacts/bench");
    std::fs::create_dir_all(&out).unwrap();
    let json = serde_json::json!({
        "workload": "parallel_reproduce", "profile": "smoke", "runs": runs, "cores": cores,
        "jobs_1_s": {"min": one.0, "median": one.1, "max": one.2},
        "jobs_2_s": {"min": two.0, "median": two.1, "max": two.2},
        "ratio_median": ratio, "separated": separated,
    });
    std::fs::write(
        out.join("parallel_reproduce.json"),
        serde_json::to_vec_pretty(&json).unwrap(),
    )
    .unwrap();
}
