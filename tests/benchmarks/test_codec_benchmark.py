"""Smoke test of benchmarks/bench_codecs.py in quick mode, and of the CRC32C checksum on a corrupted chunk file."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))


def _load_benchmark():
    # Loaded by path under another name: `import codecs` would return the standard library's codecs module.
    spec = importlib.util.spec_from_file_location("kdcache_codec_benchmark", BENCHMARKS / "bench_codecs.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


bench = _load_benchmark()
ROWS = 2000


@pytest.fixture(scope="module")
def quick_run():
    return bench.run_benchmark(rows=ROWS, quick=True, repeats=1)


def test_quick_benchmark_round_trips_every_candidate(quick_run) -> None:
    sets, results, best = quick_run
    assert [(s.name, s.logits.shape) for s in sets] == [("C=2", (ROWS, 2)), ("C=10", (ROWS, 10)), ("C=100", (ROWS, 100))]
    for s in sets:
        assert np.isfinite(s.logits.astype(np.float16)).all(), f"{s.name} logits overflow float16"
        assert s.logits.std() > 0
    assert best in bench.QUICK
    seen = {(r.data, r.dtype, r.codec + (f" ({r.variant})" if r.variant else "")) for r in results}
    for s in sets:
        for dtype in ("float16", "float32"):
            for codec in [*bench.QUICK, f"{best} (no crc)"]:
                assert (s.name, dtype, codec) in seen
    for r in results:
        assert r.lossless, f"{r.codec} on {r.data} {r.dtype} is not lossless"
        assert r.rows == ROWS and r.raw_bytes > 0 and r.stored_bytes > 0
        assert min(r.write_s, r.write_chunked_s, r.read_s) > 0
        assert min(r.mbps(r.write_s), r.mbps(r.read_s), r.margin()) > 0
    text = bench.report(sets, results, best, "pytest", repeats=1)
    assert "## Recommendation" in text and f"**{best}**" in text and "### C=100, float32" in text


def test_chunk_rule_matches_cache_format() -> None:
    from kdcache.cache import schema as fmt
    for cols in (1, 2, 10, 100, 1000, 50_000):
        for itemsize in (2, 4):
            assert bench.rule_chunk_rows(cols, itemsize) == fmt.default_chunk_rows(cols, itemsize)


def _flip_middle_byte(array_dir: Path) -> None:
    chunk = next(f for f in sorted(array_dir.rglob("*")) if f.is_file() and f.name != "zarr.json")
    raw = bytearray(chunk.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    chunk.write_bytes(bytes(raw))


@pytest.mark.parametrize("codec", ["none", "zstd3", "blosc-zstd5-shuffle"])
def test_crc32c_detects_flipped_byte(tmp_path: Path, codec: str) -> None:
    data = np.random.default_rng(0).normal(0, 3, (3000, 10)).astype(np.float16)
    for crc in (True, False):
        path = tmp_path / f"{codec}-{crc}"
        bench.make_array(path, data.shape, data.dtype, 4096, bench.chain(codec, data.itemsize, crc=crc))[:] = data
        _flip_middle_byte(path)
        arr = zarr.open_array(zarr.storage.LocalStore(path), mode="r")
        if crc:
            with pytest.raises(ValueError, match="checksum"):
                arr[:]
        elif codec == "none":  # without the checksum the corruption reads back silently
            assert arr[:].tobytes() != data.tobytes()
