"""What the chunk manifest costs a reader: LogitBatches epochs over a synthetic cache, with each chunk checked against
its recorded digest and with the check switched off (rows/s of reading alone, median of 3).

    python benchmarks/bench_reader_manifest.py
"""

import time, numpy as np, tempfile, statistics
from pathlib import Path
from kdcache.cache.writer import CacheWriter
from kdcache.cache import open_cache, schema
from kdcache.train.batches import LogitBatches
rng = np.random.default_rng(0)
for c, n in ((10, 1_000_000), (1000, 60_000)):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "c.kdcache"
        w = CacheWriter(path, {"teacher": {"num_outputs": c}})
        s = w.add_split("train", rows=n, num_outputs=c, codec="blosc-zstd3-shuffle", chunk_rows=schema.default_chunk_rows(c, 2))
        for a in range(0, n, 50_000):
            b = min(n, a + 50_000)
            s.write({"logits": rng.normal(size=(b - a, c)).astype(np.float32), "labels": rng.integers(0, c, b - a), "index": np.arange(a, b), "fingerprint": np.arange(a, b, dtype=np.uint64)})
        s.close({"n": n}); w.finalize()
        for mode in ("memory", "chunks"):
            res = {}
            for label in ("manifest checked", "no manifest"):
                times = []
                for _ in range(3):
                    cache = open_cache(path)
                    if label == "no manifest":
                        cache.chunk_digests = None
                    t = time.perf_counter()
                    for _ in LogitBatches(cache, 256, seed=0, mode=mode).epoch(1): pass
                    times.append(time.perf_counter() - t)
                res[label] = n / statistics.median(times)
            print(f"C={c} N={n} {mode}: {res['manifest checked']:,.0f} rows/s checked vs {res['no manifest']:,.0f} unchecked ({res['manifest checked']/res['no manifest']:.2f}x)")
