#!/usr/bin/env bash
# Where a training step's time goes: samples the cpu-profile fi-RevNet CE step, the iCE step
# (flow + 5 adversary steps + prior), the small CNN step and a PGD step on it at 1 and 2 threads with `perf
# record` (software clock: hardware counters are not available on every machine), and writes
# the flat per-function profile (self time, functions above 0.5 %) of each to
# artifacts/bench/profile/<workload>_<threads>t.txt. `perf` comes from Debian's linux-perf.
set -euo pipefail
cd "$(dirname "$0")/.."
steps="${PROFILE_STEPS:-20}"
command -v perf >/dev/null || { echo "profile: perf is missing (apt-get install linux-perf)" >&2; exit 1; }
exe=$(cargo bench --bench train_step --no-run --message-format=json 2>/dev/null \
    | python3 -c 'import json,sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "train_step" and m.get("executable"):
        print(m["executable"])')
out=artifacts/bench/profile
mkdir -p "$out"
for workload in firevnet_cpu firevnet_ice cnn_small pgd_cnn; do
    for threads in 1 2; do
        data="$out/${workload}_${threads}t.perf.data"
        start=$(date +%s.%N)
        TRAIN_STEP_CHILD=$workload TRAIN_STEP_PROFILE_STEPS=$steps RAYON_NUM_THREADS=$threads \
            perf record -q -e cpu-clock -F 997 -o "$data" -- "$exe" >/dev/null
        end=$(date +%s.%N)
        report="$out/${workload}_${threads}t.txt"
        {
            echo "# $workload, $threads thread(s), $steps steps after 3 warm-up steps; wall $(python3 -c "print(f'{$end - $start:.1f}')") s for the whole process"
            perf report -i "$data" --stdio --no-children --sort symbol --percent-limit 0.5 2>/dev/null \
                | grep -v '^#' | grep -v '^$'
        } > "$report"
        rm -f "$data"
        echo "$report"
    done
done
