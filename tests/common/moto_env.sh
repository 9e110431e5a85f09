#!/usr/bin/env bash
# Ensures a Python venv with moto's S3 server (`moto[server]`, from PyPI) for the tests and the
# benchmark of the shared S3 store (tests/common/s3.rs starts it on 127.0.0.1).
#
# Venv location: ${REPRO_MOTO_VENV:-$HOME/.cache/repro/moto-venv}
#
# On success the LAST line on stdout is the venv's bin/ directory; everything else goes to
# stderr. Quiet when the venv already works. On failure it exits non-zero with a message on
# stderr (the tests are then skipped, saying why).
set -u -o pipefail

VENV="${REPRO_MOTO_VENV:-$HOME/.cache/repro/moto-venv}"
BIN="$VENV/bin"
# Conditional writes (If-None-Match: * on PutObject) need moto >= 5.0.
MOTO="moto[server]==5.2.6"

die() {
    echo "moto_env.sh: error: $*" >&2
    exit 1
}

moto_ok() {
    [ -x "$BIN/moto_server" ] && "$BIN/python" -c 'import moto, boto3' >/dev/null 2>&1
}

if moto_ok; then
    echo "$BIN"
    exit 0
fi

command -v python3 >/dev/null 2>&1 || die "python3 not found on PATH"
echo "moto_env.sh: setting up $MOTO in $VENV" >&2
if [ ! -x "$BIN/python" ] || ! "$BIN/python" -m pip --version >/dev/null 2>&1; then
    if [ -d "$VENV" ] && [ -n "$(ls -A "$VENV" 2>/dev/null)" ] && [ ! -f "$VENV/pyvenv.cfg" ]; then
        die "$VENV exists, is not empty and is not a venv; refusing to overwrite it (set REPRO_MOTO_VENV elsewhere)"
    fi
    mkdir -p "$(dirname "$VENV")" || die "cannot create $(dirname "$VENV")"
    python3 -m venv --clear "$VENV" >&2 \
        || die "'python3 -m venv $VENV' failed (on Debian/Ubuntu: apt-get install python3-venv)"
fi
"$BIN/python" -m pip install --quiet "$MOTO" >&2 || die "'pip install $MOTO' failed in $VENV"
moto_ok || die "moto installed but moto_server or 'import moto, boto3' fails in $VENV"
echo "$BIN"
