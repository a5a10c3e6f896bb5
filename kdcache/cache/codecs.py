"""How a cache's bytes are transformed: the compressor presets and the checksum that ends every chain.

The winner of `benchmarks/bench_codecs.py` is DEFAULT_CODEC (benchmarks/results/codecs.md). Every chain ends in
CRC32C, so a flipped byte on any storage is an error on read, never a wrong logit.
"""

from __future__ import annotations

from typing import Any, Callable

from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec, GzipCodec, ZstdCodec

CODECS: dict[str, Callable[[int], list[Any]]] = {
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


def compressors(codec: str, itemsize: int) -> list:
    """Codec chain for one array: the named compressor, then a CRC32C checksum over the stored bytes."""
    if codec not in CODECS:
        raise ValueError(f"unknown codec {codec!r}; choose one of {', '.join(CODECS)}")
    return [*CODECS[codec](itemsize), Crc32cCodec()]


def pipeline(codec: str, itemsize: int) -> list[dict[str, Any]]:
    """The whole codec chain of an array as its zarr.json records it (little-endian bytes, the compressor, CRC32C):
    what a reader compares an array's metadata with."""
    endian = None if itemsize == 1 else "little"  # Zarr records no byte order for one-byte types (a target's ids)
    return [c.to_dict() for c in (BytesCodec(endian=endian), *compressors(codec, itemsize))]


def has_checksum(codecs: tuple) -> bool:
    """Whether an array's codec chain ends in the CRC32C every kdcache array carries."""
    return bool(codecs) and isinstance(codecs[-1], Crc32cCodec)


__all__ = ["CODECS", "DEFAULT_CODEC", "compressors", "has_checksum", "pipeline"]
