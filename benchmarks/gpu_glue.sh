#!/usr/bin/env bash
# Issue 14's GLUE reruns (cpu scale: 1,000 rows, 8 epochs) on one borrowed GPU: SST-2, MRPC and CoLA, 5 seeds,
# pre-trained students (the first 2 layers of all-MiniLM-L6-v2) of a fine-tuned MiniLM-L6 teacher; SST-2 adds
# the authors'-reduction variants (continuation-mse, annealing-mse). The three tasks run side by side (each a
# process of its own: small models leave the GPU mostly idle), every kdcache command in its process
# (`--in-process`: no interpreter start per run).
#
# The device machine has neither ../shared nor zarr, and the tool carries 64 MiB: prepare three ignored folders
#   .whl/     the wheels of ../shared/device-wheels
#   .minilm/  the pre-trained encoder with its weights stored in float16 (45 MB; widened back to float32 here)
#   .data/    glue/{SST-2,CoLA,MRPC}/{train,dev}.tsv from ../shared/data
# (see docs/benchmarks.md for the commands), then:  device run (carry .whl .minilm .data):
#   bash benchmarks/gpu_glue.sh [SECONDS_PER_TASK]
# Results land in $OUT/glue-<task>.tar.gz (summary.md, results.csv, commands.txt, log.txt, each run's metrics
# and summary): one file per task, since the tool brings back at most 8 files.
set -uo pipefail
cd "$(dirname "$0")/.."
budget=${1:-420}
scale=${GLUE_SCALE:-cpu}
device=${GLUE_DEVICE:-cuda}
out=${OUT:-/tmp/gpu-glue-out}
work=${GLUE_WORK:-/tmp/gpu-glue-work}
PY=${PYTHON:-python3}
if ! $PY -c "import zarr" 2>/dev/null; then
    $PY -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
# the CLI ships as kdcache.cli (pyproject's package-dir); from a bare checkout, point the name at cli/
if [ ! -e kdcache/cli ]; then ln -s ../cli kdcache/cli; trap 'rm -f kdcache/cli' EXIT; fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false KDCACHE_DATA=$PWD/.data
rm -rf "$work" && mkdir -p "$work" "$out"
$PY - "$work/minilm" <<'EOF'
import shutil, sys
from pathlib import Path
from safetensors.torch import load_file, save_file
src, dst = Path(".minilm"), Path(sys.argv[1])
dst.mkdir(parents=True)
for f in src.iterdir():
    if f.is_file() and f.name != "model.safetensors":
        shutil.copy(f, dst / f.name)
weights = load_file(src / "model.safetensors")
save_file({k: v.float().contiguous() for k, v in weights.items()}, dst / "model.safetensors", metadata={"format": "pt"})
EOF
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || true
base=ce,vanilla,takd,annealing,continuation
for task in sst2 mrpc cola; do
    methods=$base
    [ "$task" = sst2 ] && methods=$base,continuation-mse,annealing-mse
    timeout "$budget" $PY benchmarks/reproduce.py glue --task "$task" --scale "$scale" --seeds "${GLUE_SEEDS:-5}" \
        --methods "$methods" --device "$device" --in-process --teacher-dir "$work/minilm" --out "$work/glue-$task" \
        > "$work/glue-$task.log" 2>&1 &
done
wait
# the device tool returns at most 8 files from $OUT, 2 folders deep: one archive per task
for task in sst2 mrpc cola; do
    dst=$work/out-$task/glue-$task
    mkdir -p "$dst/runs"
    grep -v -E "Writing model shards|Loading weights" "$work/glue-$task.log" | tail -60 > "$dst/log.txt"
    for f in summary.md summary.csv results.csv commands.txt; do
        [ -f "$work/glue-$task/$f" ] && cp "$work/glue-$task/$f" "$dst/"
    done
    for run in "$work/glue-$task"/*/; do
        name=$(basename "$run")
        [ -f "$run/metrics.jsonl" ] || continue
        mkdir -p "$dst/runs/$name"
        cp "$run/metrics.jsonl" "$run/summary.json" "$dst/runs/$name/" 2>/dev/null
    done
    tar -czf "$out/glue-$task.tar.gz" -C "$work/out-$task" "glue-$task"
    echo "== $task"; tail -4 "$dst/log.txt"
done
