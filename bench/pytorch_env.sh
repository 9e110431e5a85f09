#!/usr/bin/env bash
# Ensure a Python venv with PyTorch exists for the PyTorch side of the
# training-step throughput benchmark (bench/pytorch_train_step.py).
#
# Venv location: ${REPRO_TORCH_VENV:-$HOME/.cache/repro/torch-venv}
#
# On success the LAST line on stdout is the venv's python path; everything
# else (progress, pip output) goes to stderr. Quiet when the venv already works.
# On failure it exits non-zero with a message on stderr, so a caller can skip
# the PyTorch side, e.g.:
#
#   if PY=$(bash bench/pytorch_env.sh | tail -n1); then ...; else echo "skipping PyTorch"; fi
#
# With REPRO_TORCH_CHECK_ONLY=1 it installs nothing: it prints the python of a venv that
# already works, or fails at once (tests use this; .ci/run and `just bench` install).
set -u -o pipefail

VENV="${REPRO_TORCH_VENV:-$HOME/.cache/repro/torch-venv}"
PY="$VENV/bin/python"

die() {
    echo "pytorch_env.sh: error: $*" >&2
    echo "pytorch_env.sh: the PyTorch side of the benchmark is unavailable" >&2
    exit 1
}

torch_ok() {
    [ -x "$PY" ] && "$PY" -c 'import torch' >/dev/null 2>&1
}

if torch_ok; then
    echo "$PY"
    exit 0
fi

if [ "${REPRO_TORCH_CHECK_ONLY:-0}" = 1 ]; then
    die "no working PyTorch venv at $VENV (REPRO_TORCH_CHECK_ONLY=1: not installing; 'bash bench/pytorch_env.sh' makes one)"
fi

command -v python3 >/dev/null 2>&1 || die "python3 not found on PATH"

echo "pytorch_env.sh: setting up PyTorch venv at $VENV (torch is a large download; this may take a few minutes)" >&2

if [ ! -x "$PY" ] || ! "$PY" -m pip --version >/dev/null 2>&1; then
    # Absent or broken venv: (re)create it. Never wipe a non-empty directory
    # that is not a venv (REPRO_TORCH_VENV may point anywhere).
    if [ -d "$VENV" ] && [ -n "$(ls -A "$VENV" 2>/dev/null)" ] && [ ! -f "$VENV/pyvenv.cfg" ]; then
        die "$VENV exists, is not empty and is not a venv; refusing to overwrite it (set REPRO_TORCH_VENV elsewhere)"
    fi
    mkdir -p "$(dirname "$VENV")" || die "cannot create $(dirname "$VENV")"
    python3 -m venv --clear "$VENV" >&2 \
        || die "'python3 -m venv $VENV' failed (on Debian/Ubuntu: apt-get install python3-venv)"
fi

"$PY" -m pip install --quiet --upgrade pip >&2 || echo "pytorch_env.sh: warning: could not upgrade pip; continuing" >&2
"$PY" -m pip install torch >&2 || die "'pip install torch' failed in $VENV"

torch_ok || die "torch installed but 'import torch' still fails in $VENV"

echo "pytorch_env.sh: torch $("$PY" -c 'import torch; print(torch.__version__)') ready" >&2
echo "$PY"
