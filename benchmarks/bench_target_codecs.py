"""Sparse targets of a 1000-class teacher: bytes per row by codec, and capture rows/s against a dense capture.

    PYTHONPATH=benchmarks python benchmarks/bench_target_codecs.py --images tests/fixtures/data/cifar10-jpg \
        --rows 384 --out /tmp/bench-targets

The teacher is a torchvision ResNet-18 with 1000 outputs (random weights: only shapes and speed matter) reading
CIFAR-10 JPEGs as a feature table (`tabular`, 3x32x32 floats per row, random labels of 1000 names). Part 1
captures the same rows dense, top-10/32/100 and sampled N = 50 through `kdcache cache-teacher` and reports each
cache's stored target bytes per row, its rows/s and the kept mass and KL capture recorded. Part 2 compresses each
target array of the top-32 and sampled caches with every candidate codec (and delta over the sorted sampled ids,
which is no kdcache codec: measured to decide whether it is worth one). Prints Markdown tables.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

CANDIDATES = ("zstd3", "blosc-zstd3-shuffle", "blosc-zstd5-bitshuffle", "blosc-lz4-shuffle", "gzip5")
KINDS = {"dense": [], "top-10": ["--topk", "10"], "top-32": ["--topk", "32"], "top-100": ["--topk", "100"],
         "sampled N=50": ["--sample-tokens", "50"]}


def resnet18_flat(num_classes: int = 1000) -> nn.Module:
    """torchvision's ResNet-18 over a flat 3x32x32 feature row (the `tabular` task's input)."""
    from torchvision.models import resnet18

    return nn.Sequential(nn.Unflatten(1, (3, 32, 32)), resnet18(num_classes=num_classes))


def write_table(images: Path, rows: int, folder: Path) -> Path:
    """The JPEGs as a `tabular` split: x (rows, 3072) in [0, 1], random labels among 1000 names."""
    from PIL import Image

    files = sorted(p for p in images.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))[:rows]
    x = np.stack([np.asarray(Image.open(p).convert("RGB").resize((32, 32)), dtype=np.float32).transpose(2, 0, 1)
                  .reshape(-1) / 255 for p in files])
    y = np.random.default_rng(0).integers(0, 1000, len(x))
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(folder / "train.npz", x=x, y=y, label_names=np.array([f"class_{i:03d}" for i in range(1000)]))
    return folder


def capture(data: Path, weights: Path, out: Path, flags: list[str]) -> dict:
    args = [sys.executable, "-m", "kdcache", "cache-teacher", "--teacher", "bench_target_codecs:resnet18_flat",
            "--weights", str(weights), "--task", "tabular", "--data", str(data), "--split", "train", "--out", str(out),
            "--device", "cpu", "--batch-size", "64", "--no-progress", "--trust-model-code", "--overwrite", *flags]
    subprocess.run(args, check=True, capture_output=True, text=True)
    info = json.loads(subprocess.run([sys.executable, "-m", "kdcache", "info", str(out), "--json"], check=True,
                                     capture_output=True, text=True).stdout)
    return info


def codec_bytes(values: np.ndarray, codec: str) -> float:
    """Stored bytes per row of `values` in one chunk with `codec` (+ CRC32C), as a kdcache array stores it."""
    import zarr
    from zarr.storage import MemoryStore

    from kdcache.cache.codecs import compressors

    store = MemoryStore()
    array = zarr.create_array(store, shape=values.shape, chunks=values.shape, dtype=values.dtype,
                              compressors=compressors(codec, values.dtype.itemsize))
    array[...] = values
    stored = sum(len(v.to_bytes()) for k, v in store._store_dict.items() if "/c" in k or k.startswith("c"))
    return stored / len(values)


def delta_zstd_bytes(values: np.ndarray) -> float:
    """Delta along each row (sorted ids: small steps), then zstd 3: numcodecs, not a kdcache codec."""
    import numcodecs

    deltas = np.diff(values.astype(np.int32), axis=1, prepend=0).astype(values.dtype)
    return len(numcodecs.Zstd(level=3).encode(np.ascontiguousarray(deltas))) / len(values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=Path, default=Path("tests/fixtures/data/cifar10-jpg"))
    parser.add_argument("--rows", type=int, default=384)
    parser.add_argument("--out", type=Path, default=Path("/tmp/bench-targets"))
    parser.add_argument("--repeats", type=int, default=1,
                        help="captures of every kind, interleaved: rows/s is the median, its ratio the median of "
                             "each round's ratio to that round's dense capture")
    args = parser.parse_args()
    data = write_table(args.images, args.rows, args.out / "data")
    torch.manual_seed(0)
    weights = args.out / "resnet18.pt"
    torch.save(resnet18_flat().state_dict(), weights)

    import kdcache

    print(f"## Capture: {args.rows} rows, ResNet-18 (1000 outputs, random weights), CPU, batch 64, float16, "
          f"median of {args.repeats} interleaved round(s)\n")
    print("| target | stored B/row | raw B/row | vs dense | rows/s | vs dense | kept mass | KL |")
    print("|---|---|---|---|---|---|---|---|")
    rates: dict[str, list[float]] = {name: [] for name in KINDS}
    infos: dict[str, dict] = {}
    for _ in range(args.repeats):
        for name, flags in KINDS.items():
            infos[name] = capture(data, weights, args.out / name.replace(" ", "").replace("=", ""), flags)
            rates[name].append(infos[name]["throughput"]["train"]["rows_per_second"])
    dense_bytes = infos["dense"]["splits"][0]["bytes_per_sample"]
    for name in KINDS:
        split = infos[name]["splits"][0]
        rate = float(np.median(rates[name]))
        ratio = float(np.median([r / d for r, d in zip(rates[name], rates["dense"])]))
        raw = split["logits_bytes_raw"] / split["rows"]
        quality = split.get("target_quality") or {}
        kept, kl = quality.get("kept_mass"), quality.get("kl")
        print(f"| {name} | {split['bytes_per_sample']:.0f} | {raw:.0f} | {split['bytes_per_sample'] / dense_bytes:.0%} "
              f"| {rate:,.0f} | {ratio:.2f}x | {'-' if kept is None else f'{kept:.4f}'} "
              f"| {'-' if kl is None else f'{kl:.4f}'} |")

    print("\n## Codecs: stored bytes per row of each target array (one chunk of all rows, + CRC32C)\n")
    print("| array | dtype | raw | " + " | ".join(CANDIDATES) + " | delta + zstd3 |")
    print("|---|---|---|" + "---|" * (len(CANDIDATES) + 1))
    for cache_name, arrays in (("top-32", ("topk_values", "topk_indices", "logsumexp")),
                               ("sampledN50", ("sampled_ids", "sampled_counts", "sampled_logprobs"))):
        split = kdcache.open_cache(args.out / cache_name, "train")
        for array in arrays:
            values = split.read(array)
            sizes = [codec_bytes(values, c) for c in CANDIDATES]
            delta = f"{delta_zstd_bytes(values):.1f}" if values.dtype.kind == "u" else "-"
            print(f"| {array} | {values.dtype} | {values[0].nbytes} | " + " | ".join(f"{s:.1f}" for s in sizes)
                  + f" | {delta} |")


if __name__ == "__main__":
    start = time.perf_counter()
    main()
    print(f"\n({time.perf_counter() - start:.0f} s)")
