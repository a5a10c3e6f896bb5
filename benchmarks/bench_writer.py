"""End-to-end write speed of kdcache's cache writer with the default codec and chunk rule.

    python benchmarks/bench_writer.py [--rows 100000] [--batch 256]

Feeds realistic logits (the three teacher sets of bench_codecs.py: C = 2, 10, 100) through the same
path `cache-teacher` uses (BackgroundWriter -> SplitWriter, whole-chunk writes, CRC32C) and reports rows/s
and stored bytes per sample. The teacher is not run: this is the writer's own ceiling.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from kdcache.cache import codecs, schema
from kdcache.cache.info import describe_cache
from kdcache.cache.writer import BackgroundWriter, CacheWriter


def _logit_sets(rows: int):
    spec = importlib.util.spec_from_file_location("bench_codecs", Path(__file__).with_name("bench_codecs.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_codecs"] = module
    spec.loader.exec_module(module)
    return module.make_logit_sets(rows, quick=False)


def write_once(logits: np.ndarray, path: Path | str, batch: int, dtype: str) -> float:
    """Rows per second through the writer, from the first put to the closed, complete cache."""
    n, c = logits.shape
    labels, index = logits.argmax(1), np.arange(n)
    fps = np.arange(n, dtype=np.uint64) * np.uint64(2654435761)
    start = time.perf_counter()
    writer = CacheWriter(path, {"teacher": {"num_outputs": c}}, overwrite=True)
    split = writer.add_split("train", rows=n, num_outputs=c, kind="classification", dtype=dtype,
                             codec=codecs.DEFAULT_CODEC, chunk_rows=schema.default_chunk_rows(c, np.dtype(dtype).itemsize))
    with BackgroundWriter(split.write) as background:
        for s in range(0, n, batch):
            background.put({"logits": logits[s:s + batch], "labels": labels[s:s + batch], "index": index[s:s + batch],
                            "fingerprint": fps[s:s + batch]})
    split.close({"n": n})
    writer.finalize()
    return n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=256)
    args = parser.parse_args()
    print("| set | dtype | chunk rows | rows/s (median of 3) | logits bytes/sample | logits ratio | whole cache bytes/sample |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for logit_set in _logit_sets(args.rows):
            for dtype in ("float16", "float32"):
                path = Path(tmp) / "bench.kdcache"
                rates = sorted(write_once(logit_set.logits, path, args.batch, dtype) for _ in range(3))
                info = describe_cache(path)
                split = info["splits"][0]
                print(f"| C={logit_set.logits.shape[1]} | {dtype} | {split['chunk_rows']} | {rates[1]:,.0f} | "
                      f"{split['bytes_per_sample']} | {split['compression_ratio']}x | "
                      f"{info['size_on_disk'] / split['rows']:.2f} |")


if __name__ == "__main__":
    main()
