#!/usr/bin/env bash
# Issue 13's GPU check: the ratios of benchmarks/bench_scale.py on one GPU, in under 8 minutes.
#
# On the borrowed device machine (no zarr there; carry the wheels, see ../shared/device-wheels/README.md):
#   echo /.whl/ >> .git/info/exclude; mkdir -p .whl; cp ../shared/device-wheels/*.whl .whl/
#   device run (carry .whl):  bash benchmarks/gpu_check.sh
# Prints the table; record it, with the date and this command, in docs/benchmarks.md.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! python3 -c "import zarr" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
timeout 470 python3 benchmarks/bench_scale.py --device cuda ${OUT:+--out "$OUT/gpu_check.md"} "$@"
