# Reproduction of Jacobsen et al., "Excessive Invariance Causes Adversarial Vulnerability".
# `just` alone lists the recipes.

# List the recipes
default:
    @just --list

# Run the whole pipeline (profiles: smoke, cpu, paper), render the report and export every
# stage's outputs to artifacts/exports/ (hard links: the report's provenance links reach them).
# `jobs` independent stages build at once (default: one per core); the bytes do not depend on it.
reproduce profile="cpu" jobs=num_cpus():
    cargo run --release --quiet --bin repro -- --profile {{profile}} reproduce --jobs {{jobs}}
    cargo run --release --quiet --bin repro -- --profile {{profile}} export-all

# The iCE ablation (profile `ablation` = cpu + the sweep; the shared stages are cache hits
# after `just reproduce`)
ablation jobs=num_cpus():
    cargo run --release --quiet --bin repro -- --profile ablation reproduce --jobs {{jobs}}
    cargo run --release --quiet --bin repro -- --profile ablation export-all

# Run the test suite (formatting, lints, CUDA type-check, unit, integration and end-to-end tests)
test:
    cargo fmt --check
    cargo clippy --all-targets --quiet -- -D warnings
    cargo clippy --features cuda,ci-check --all-targets --quiet -- -D warnings
    cargo test

# Where a training step's time goes: per-function profiles of the fi-RevNet CE and iCE steps and
# the CNN step at 1 and 2 threads (perf, software clock) in artifacts/bench/profile/
profile:
    bash bench/profile.sh

# Benchmarks with their peers measured in the same run (results in artifacts/bench/)
bench:
    cargo bench --bench noop_reproduce
    cargo bench --bench parallel_reproduce
    cargo bench --bench train_step

# The CUDA build (no GPU needed to build): nvcc compiles dfdx's kernels for sm_CAP and the
# repro binary links cuBLAS, cuRAND, NVRTC and the driver library; into target/cuda/ so that the
# CPU binary in target/release/ stays as it is
build-cuda cap=env_var_or_default("CUDA_COMPUTE_CAP", "80"):
    CUDA_COMPUTE_CAP={{cap}} .ci/cuda/cargo build --release --features cuda --bin repro
    @echo "target/cuda/release/repro: CUDA kernels for sm_{{cap}}"

# The device tests (conv, flow layers, inverses, log-dets, iCE, metamers) on the GPU; each says
# "skipped: no CUDA device" where there is none (REPRO_REQUIRE_CUDA=1 makes that a failure)
test-cuda cap=env_var_or_default("CUDA_COMPUTE_CAP", "80"):
    CUDA_COMPUTE_CAP={{cap}} .ci/cuda/cargo test --release --features cuda --test nn --test ice

# Show each stage as fresh, stale or missing, and why
status profile="cpu":
    cargo run --release --quiet --bin repro -- --profile {{profile}} status

# Re-hash every object in the store
verify:
    cargo run --release --quiet --bin repro -- verify

# Build only the report (and what it needs)
report profile="cpu":
    cargo run --release --quiet --bin repro -- --profile {{profile}} report

# Screenshot the rendered report (whole page, 1280 px wide, headless Chromium kept off the network)
report-shot:
    @python3 python/browser_check.py artifacts/report/index.html --screenshot artifacts/report/screenshot.png > /dev/null
    @echo artifacts/report/screenshot.png

# Delete the store, runs and report (build outputs stay)
clean:
    rm -rf artifacts
