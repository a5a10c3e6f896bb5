"""Content hashes that tie each cached row to the exact model input it came from.

A fingerprint is the first 8 bytes of BLAKE2b over a domain tag, the input's shape and its raw
little-endian bytes, read as an unsigned 64-bit integer. Text is hashed as its unpadded token ids
(int64), images as the uint8 pixels fed to the model (HWC, before normalisation). The dataset digest is
SHA-256 over the fingerprints in row order, so one string proves a whole split matches.
"""

from __future__ import annotations

import hashlib

import numpy as np

FINGERPRINT_ALGORITHM = "blake2b-64(tag|shape|bytes), little-endian"
DIGEST_ALGORITHM = "sha256(fingerprints as uint64 little-endian, row order)"


def _hash64(tag: bytes, array: np.ndarray) -> int:
    h = hashlib.blake2b(digest_size=8)
    h.update(tag)
    h.update(np.asarray(array.shape, dtype="<i8").tobytes())
    h.update(np.ascontiguousarray(array).tobytes())
    return int.from_bytes(h.digest(), "little")


def fingerprint_tokens(token_ids) -> int:
    """Hash unpadded token ids, so a changed token, a changed tokenizer or truncation is caught."""
    return _hash64(b"tokens", np.asarray(token_ids, dtype="<i8"))


def fingerprint_pixels(pixels: np.ndarray) -> int:
    """Hash a uint8 image exactly as the model receives it (before normalisation)."""
    pixels = np.asarray(pixels)
    if pixels.dtype != np.uint8:
        raise TypeError(f"pixels must be uint8, got {pixels.dtype}")
    return _hash64(b"pixels", pixels)


def fingerprint_features(features: np.ndarray) -> int:
    """Hash a float feature vector (tabular data such as the bundled digits) as float32."""
    return _hash64(b"features", np.asarray(features, dtype="<f4"))


def dataset_digest(fingerprints: np.ndarray) -> str:
    """One SHA-256 over a split's fingerprints in row order: equal digests mean equal inputs, same order."""
    return hashlib.sha256(np.asarray(fingerprints, dtype="<u8").tobytes()).hexdigest()


def labels_equal(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise equality of labels, where two missing regression labels (NaN) are equal: labels are checked
    against the cache like inputs, since a changed label changes what a student learns as surely."""
    a, b = np.asarray(a), np.asarray(b)
    same = a == b
    if a.dtype.kind == "f" or b.dtype.kind == "f":
        same |= np.isnan(a.astype(np.float64)) & np.isnan(b.astype(np.float64))
    return same
