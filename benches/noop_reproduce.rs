//! Benchmark: wall time of a no-op `repro reproduce` (every stage a hit) against the
//! process's own start-up (`repro --version`), measured side by side in the same run.
//! Goal: no-op ≤ start-up + 0.3 s. Then the same no-op against the shared S3 store (moto's
//! server on 127.0.0.1, `tests/common/s3.rs`), with the local cache warm and from an empty
//! cache (another machine: every manifest and the exported outputs come down). Goal: ≤ 2 s.
//! Writes `artifacts/bench/noop_reproduce.json`.
//!
//! The S3 goal is stated for the `cpu` profile; this measures `smoke`, which has the same 59
//! stages (one manifest and one ref request each, the same listing) but smaller exported files
//! to download (a `cpu` store takes 25 minutes to build, too long for a benchmark).

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
    let s3 = s3_noop(&sandbox, runs);
    let json = serde_json::json!({
        "workload": "noop_reproduce", "runs": runs,
        "startup_median_s": startup.1, "noop_median_s": noop.1, "noop_min_s": noop.0, "noop_max_s": noop.2,
        "beyond_startup_s": beyond, "goal_s": 0.3,
        "s3": s3,
    });
    std::fs::write(
        out.join("noop_reproduce.json"),
        serde_json::to_vec_pretty(&json).unwrap(),
    )
    .unwrap();
}

/// The no-op against the shared store, warm and cold cache; `null` in the JSON where the S3
/// server cannot be installed.
fn s3_noop(sandbox: &common::Sandbox, runs: usize) -> serde_json::Value {
    let server = match common::s3::S3Server::start() {
        Ok(server) => server,
        Err(why) => {
            println!("no-op against S3: skipped: {why}");
            return serde_json::Value::Null;
        }
    };
    let store = server.url("bench");
    let repro = |cache: &Path| {
        let out = Command::new(env!("CARGO_BIN_EXE_repro"))
            .args(["--profile", "smoke", "--store", &store, "--cache"])
            .arg(cache)
            .arg("reproduce")
            .current_dir(sandbox.dir.path())
            .envs(server.env())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "repro against {store}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let warm_cache = sandbox.path("s3-cache/warm");
    repro(&warm_cache); // fill the bucket (and this cache) once
    let warm = median_seconds(runs, || repro(&warm_cache));
    let mut cold_times: Vec<f64> = (0..runs)
        .map(|i| {
            let cache = sandbox.path(&format!("s3-cache/cold-{i}"));
            let start = Instant::now();
            repro(&cache);
            start.elapsed().as_secs_f64()
        })
        .collect();
    cold_times.sort_by(f64::total_cmp);
    let cold = (cold_times[0], cold_times[runs / 2], cold_times[runs - 1]);
    for (what, t) in [("warm cache", warm), ("empty cache", cold)] {
        println!(
            "no-op reproduce against S3 (moto, 127.0.0.1), {what}: min {:.4} s, median {:.4} s, \
             max {:.4} s (goal <= 2 s: {})",
            t.0,
            t.1,
            t.2,
            if t.2 <= 2.0 { "met" } else { "MISSED" }
        );
    }
    serde_json::json!({
        "server": "moto_server (PyPI moto[server]) on 127.0.0.1",
        "profile": "smoke (59 stages, as cpu)",
        "warm_cache_median_s": warm.1, "warm_cache_max_s": warm.2,
        "empty_cache_median_s": cold.1, "empty_cache_max_s": cold.2,
        "goal_s": 2.0,
    })
}
