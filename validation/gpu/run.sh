#!/usr/bin/env bash
# The GPU validation matrix in one command (about 6 minutes on one H100):
#   validation/gpu/run.sh [OUT_DIR] [matrix.py options]      OUT_DIR defaults to validation/results
# Wheels in .whl/ (validation/gpu/fetch_wheels.sh) are installed first, for machines without
# pip access; memplan itself runs from this checkout.
set -euo pipefail
cd "$(dirname "$0")/../.."
out="${1:-validation/results}"
shift || true
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/memplan-site .whl/*.whl
  export PYTHONPATH="/tmp/memplan-site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 validation/gpu/matrix.py --out-dir "$out" "$@"
