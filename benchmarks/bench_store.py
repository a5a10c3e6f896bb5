"""A cache in a local folder vs the same cache on S3 (SeaweedFS on 127.0.0.1): what object storage costs.

    python benchmarks/bench_store.py --rows 1000000 --out benchmarks/results/store.md

Writes a tabular dataset of N rows (16 float32 features, 10 classes), a linear teacher, then for each storage:
`kdcache cache-teacher` (rows/s of the teacher pass, as the cache records it) and one epoch of `kdcache distill`
of a small MLP student reading the cache streamed chunk by chunk and loaded whole (rows/s of training, and the
whole command's wall time, which includes reading and checking the cache and the data). Every step is the public
CLI in a subprocess, as a user runs it. The S3 server runs on this machine, so the ratio is the cost of the object
store protocol (HTTP requests, no shared page cache), not of a network.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))


def kd(*args: str, env: dict[str, str]) -> float:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", "from kdcache.cli.main import main; main()", *map(str, args)],
                          env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"kdcache {' '.join(map(str, args))} failed:\n{done.stderr[-3000:]}")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--out", type=Path, default=None, help="Markdown file for the table (default: print only)")
    args = parser.parse_args()
    from s3_server import KEY, SECRET, SeaweedServer

    from kdcache.models import mlp, save_model_dir

    with tempfile.TemporaryDirectory() as tmp, SeaweedServer() as server:
        tmp = Path(tmp)
        rng = np.random.default_rng(0)
        x = rng.normal(size=(args.rows, 16)).astype(np.float32)
        (tmp / "data").mkdir()
        np.savez(tmp / "data" / "train.npz", x=x, y=(x[:, :10].argmax(1)).astype(np.int64))
        torch.manual_seed(0)
        teacher = save_model_dir(mlp(10, in_features=16, hidden=32, depth=1), tmp / "teacher", architecture="mlp",
                                 num_classes=10, kwargs={"in_features": 16, "hidden": 32, "depth": 1})
        server.make_bucket("bench")
        env = {**os.environ, "FSSPEC_S3_ENDPOINT_URL": server.url, "FSSPEC_S3_KEY": KEY, "FSSPEC_S3_SECRET": SECRET,
               "OMP_NUM_THREADS": "1"}
        rows = []
        for where, cache in (("local folder", tmp / "c.kdcache"), ("S3 (SeaweedFS, 127.0.0.1)", "s3://bench/c.kdcache")):
            seconds = kd("cache-teacher", "--teacher", teacher, "--task", "tabular", "--data", tmp / "data",
                         "--split", "train", "--batch-size", "4096", "--out", cache, "--device", "cpu",
                         "--no-progress", env=env)
            info = json.loads(subprocess.run([sys.executable, "-c", "from kdcache.cli.main import main; main()",
                                              "info", str(cache), "--json"], env=env, capture_output=True,
                                             text=True).stdout)
            row = {"where": where, "capture_rows_s": info["throughput"]["train"]["rows_per_second"],
                   "capture_wall_s": seconds, "bytes": info["size_on_disk"]}
            for stream in ("chunks", "memory"):
                run = tmp / f"run-{where[:5]}-{stream}"
                wall = kd("distill", "--cache", cache, "--student", "mlp", "--student-kwargs",
                          json.dumps({"in_features": 16, "hidden": 16, "depth": 1}), "--method", "vanilla",
                          "--epochs", "1", "--batch-size", "1024", "--stream", stream, "--val-split", "none",
                          "--out", run, "--device", "cpu", "--no-progress", env=env)
                summary = json.loads((run / "summary.json").read_text())
                row[f"distill_{stream}_rows_s"] = summary["samples_per_second"]
                row[f"distill_{stream}_wall_s"] = wall
            rows.append(row)
            print(row, flush=True)
    local, s3 = rows
    lines = [f"Store benchmark: {args.rows:,} rows x 10 classes (float16 logits), 2-core CPU, "
             f"{time.strftime('%Y-%m-%d')}; `python benchmarks/bench_store.py --rows {args.rows}`", "",
             "| storage | cache-teacher rows/s | cache-teacher wall s | distill epoch, chunk streaming: train rows/s "
             "| wall s | distill epoch, whole cache in memory: train rows/s | wall s | cache bytes |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['where']} | {r['capture_rows_s']:,.0f} | {r['capture_wall_s']:.1f} | "
                     f"{r['distill_chunks_rows_s']:,.0f} | {r['distill_chunks_wall_s']:.1f} | "
                     f"{r['distill_memory_rows_s']:,.0f} | {r['distill_memory_wall_s']:.1f} | {r['bytes']:,} |")
    lines.append(f"| S3 / local | {s3['capture_rows_s'] / local['capture_rows_s']:.2f}x | "
                 f"{s3['capture_wall_s'] / local['capture_wall_s']:.2f}x | "
                 f"{s3['distill_chunks_rows_s'] / local['distill_chunks_rows_s']:.2f}x | "
                 f"{s3['distill_chunks_wall_s'] / local['distill_chunks_wall_s']:.2f}x | "
                 f"{s3['distill_memory_rows_s'] / local['distill_memory_rows_s']:.2f}x | "
                 f"{s3['distill_memory_wall_s'] / local['distill_memory_wall_s']:.2f}x | |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
