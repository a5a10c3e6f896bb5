"""Cache format v1: names, versions, codecs and chunking, in one place (spec: docs/cache-format.md).

A cache is a Zarr v3 group. Its root attributes describe the teacher, the task and the software; one
subgroup per split holds `logits` [N, C], `labels` [N], `index` [N] and `fingerprint` [N]. Every array
chunk ends in a CRC32C checksum. `complete: true` is written last, after every chunk and attribute.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
from zarr.codecs import BloscCodec, Crc32cCodec, GzipCodec, ZstdCodec

FORMAT_NAME = "kdcache.teacher-cache"
FORMAT_VERSION = 1

ARRAYS = ("logits", "labels", "index", "fingerprint")
LOGIT_DTYPES = ("float16", "float32")
LABEL_DTYPE = {"classification": "int64", "regression": "float32"}
INDEX_DTYPE = "int64"
FINGERPRINT_DTYPE = "uint64"

#: Logits are filled with NaN where no chunk was written, so a missing chunk can never read as zeros.
LOGITS_FILL = float("nan")

#: Codec presets for the logits array; the winner of benchmarks/bench_codecs.py is DEFAULT_CODEC.
CODECS: dict[str, Any] = {
    "none": lambda itemsize: [],
    "zstd1": lambda itemsize: [ZstdCodec(level=1)],
    "zstd3": lambda itemsize: [ZstdCodec(level=3)],
    "gzip5": lambda itemsize: [GzipCodec(level=5)],
    "blosc-zstd3-shuffle": lambda itemsize: [BloscCodec(cname="zstd", clevel=3, shuffle="shuffle", typesize=itemsize)],
    "blosc-zstd5-shuffle": lambda itemsize: [BloscCodec(cname="zstd", clevel=5, shuffle="shuffle", typesize=itemsize)],
    "blosc-zstd5-bitshuffle": lambda itemsize: [
        BloscCodec(cname="zstd", clevel=5, shuffle="bitshuffle", typesize=itemsize)
    ],
    "blosc-lz4-shuffle": lambda itemsize: [BloscCodec(cname="lz4", clevel=5, shuffle="shuffle", typesize=itemsize)],
}
DEFAULT_CODEC = "blosc-zstd3-shuffle"  # benchmarks/results/codecs.md

#: Aim for about this much raw logit data per chunk: large enough to compress well and read fast,
#: small enough that a crash loses little and a resume recomputes little.
TARGET_CHUNK_BYTES = 512 * 1024
MIN_CHUNK_ROWS = 1024
MAX_CHUNK_ROWS = 65536


def compressors(codec: str, itemsize: int) -> list:
    """Codec chain for one array: the named compressor, then a CRC32C checksum over the stored bytes."""
    if codec not in CODECS:
        raise ValueError(f"unknown codec {codec!r}; choose one of {', '.join(CODECS)}")
    return [*CODECS[codec](itemsize), Crc32cCodec()]


def default_chunk_rows(num_outputs: int, itemsize: int) -> int:
    """Power-of-two rows per chunk giving about TARGET_CHUNK_BYTES of raw logits."""
    rows = max(1, TARGET_CHUNK_BYTES // max(1, num_outputs * itemsize))
    rows = 1 << (rows.bit_length() - 1)
    return int(min(MAX_CHUNK_ROWS, max(MIN_CHUNK_ROWS, rows)))


def logits_dtype(name: str) -> np.dtype:
    if name not in LOGIT_DTYPES:
        raise ValueError(f"unknown logits dtype {name!r}; choose float16 or float32")
    return np.dtype(name)


#: Every complete split records, per array, a digest of each chunk's rows (`chunk_digests`), so a chunk file that
#: is swapped, duplicated or replaced is found at its place: a CRC32C only proves a chunk's bytes are intact.
CHUNK_DIGEST_ALGORITHM = "sha256 of the chunk's rows (stored dtype, little-endian, C order), first 16 bytes, hex"
#: The stored tokenizer's sha256 is recorded beside it; a blob or its files beyond these sizes are refused.
MAX_TOKENIZER_BLOB_BYTES = 64 * 1024**2
MAX_TOKENIZER_FILES_BYTES = 256 * 1024**2


def chunk_digest(rows: np.ndarray) -> str:
    """The digest of one chunk's rows as they are stored, binding content to its place in the manifest."""
    little = np.ascontiguousarray(rows, dtype=rows.dtype.newbyteorder("<"))
    return hashlib.sha256(little.tobytes()).hexdigest()[:32]
