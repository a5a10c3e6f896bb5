"""`kdcache verify`: prove a cache is whole and says what its teacher said, before hours of students rely on it.

Without a teacher it checks what the cache can vouch for on its own: format and version, completeness of the
root and of every split, the arrays and their shapes, dtypes and CRC32C codec, that every chunk file exists,
every chunk's checksum, that the stored fingerprints hash to the split's recorded dataset digest, finite
logits and labels within the teacher's outputs. With a teacher it also re-reads a random sample of rows from
the dataset (their fingerprints must match) and recomputes the teacher's logits for them: a cache that
disagrees beyond the rounding of its storage dtype (and of the autocast it was computed under) fails.

Each check is one `Check`; the report passes when every check does. Input that cannot be verified at all
(no such path, not a kdcache cache, a newer format, a teacher that cannot be loaded) is a KDCacheError.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kdcache import format as fmt
from kdcache.errors import KDCacheError
from kdcache.fingerprint import dataset_digest, labels_equal
from kdcache.reader import (RECREATE_HINT, TeacherCache, chunk_file_problems, metadata_error, open_root,
                            read_cache_attrs, read_checked)

#: (rtol, atol) per storage dtype: a fresh logit x and a stored one s agree when |s - x| <= rtol * |x| + atol.
#: float16 keeps 11 significant bits (rounding error at most 2**-11 relative); twice that, plus an absolute
#: allowance for the few ulps by which two devices' kernels may differ, still rejects any other teacher.
STORAGE_TOLERANCE = {"float16": (2.0**-10, 1e-3), "float32": (2.0**-14, 1e-4)}
#: Teacher logits computed under autocast carry the compute dtype's own rounding, whatever the storage dtype.
COMPUTE_TOLERANCE = {"fp32": (0.0, 0.0), "fp16": (2.0**-8, 2.0**-8), "bf16": (2.0**-5, 2.0**-5)}

_MAX_LISTED = 3  # failures named in one check's line before "and N more"


@dataclass
class Check:
    """One verified property: a short name (e.g. `train/checksums`), whether it holds, and what was found."""

    name: str
    ok: bool
    detail: str

    def line(self) -> str:
        return f"{'ok' if self.ok else 'FAIL':4}  {self.name}: {self.detail}"


@dataclass
class VerifyReport:
    """Every check run on one cache; `ok` only when all of them passed."""

    path: str
    checks: list[Check] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    def add(self, name: str, ok: bool, detail: str) -> bool:
        self.checks.append(Check(name, bool(ok), detail))
        return bool(ok)

    def verdict(self) -> str:
        failed = [c.name for c in self.checks if not c.ok]
        if not failed:
            return f"verdict: ok, {self.path} passed all {len(self.checks)} checks"
        return f"verdict: FAIL, {len(failed)} of {len(self.checks)} checks failed ({', '.join(failed)}): {self.path}"

    def lines(self) -> list[str]:
        """One line per check, then the verdict: what `kdcache verify` prints."""
        return [c.line() for c in self.checks] + [self.verdict()]

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "ok": self.ok, "checks": [asdict(c) for c in self.checks]}


def tolerance(dtype: str, precision: str = "fp32") -> tuple[float, float]:
    """(rtol, atol) for comparing stored logits with fresh ones: storage rounding, widened for autocast."""
    rtol, atol = STORAGE_TOLERANCE.get(dtype, STORAGE_TOLERANCE["float16"])
    c_rtol, c_atol = COMPUTE_TOLERANCE.get(precision, COMPUTE_TOLERANCE["bf16"])
    return max(rtol, c_rtol), max(atol, c_atol)


def _listed(problems: list[str]) -> str:
    """The first few problems on one line; the advice to recreate the cache is left to the docs, not repeated."""
    problems = [p.removesuffix(f"; {RECREATE_HINT}") for p in problems]
    shown = "; ".join(problems[:_MAX_LISTED])
    return shown + (f"; and {len(problems) - _MAX_LISTED} more" if len(problems) > _MAX_LISTED else "")


def verify_cache(
    path: str | Path,
    *,
    teacher: str | None = None,
    weights: str | Path | None = None,
    data: str | None = None,
    sample: int = 256,
    seed: int = 0,
    device: str = "auto",
    batch_size: int = 64,
    rtol: float | None = None,
    atol: float | None = None,
    trust_model_code: bool = False,
) -> VerifyReport:
    """Run every check on the cache at `path` (and, given `teacher`, recompute `sample` random rows per split).

    Never writes to the cache: it is opened read-only, like every reader.
    """
    if sample < 0 or batch_size < 1:
        raise KDCacheError("--sample must be at least 0 and --batch-size at least 1")
    path = Path(path)
    attrs = read_cache_attrs(path, allow_incomplete=True)  # not a cache, or a newer format: nothing to verify
    report = VerifyReport(str(path))
    report.add("format", True, f"{attrs['format']} version {attrs['format_version']}")
    root = open_root(path)
    try:
        groups = sorted(root.group_keys())
        arrays = set(root.array_keys())
    except Exception as exc:  # noqa: BLE001 - zarr raises many types for damaged metadata
        raise metadata_error(path, exc) from exc
    listed = list(attrs.get("splits") or [])
    splits = listed + [g for g in groups if g not in listed]

    _check_complete(report, root, attrs, listed, groups)
    if "tokenizer" in arrays or (attrs.get("task") or {}).get("modality") == "text":
        _check_tokenizer(report, path, root, arrays)
    caches = {}
    for name in splits:
        if name not in groups:
            report.add(f"{name}/structure", False, f"split {name!r} is listed in the root attributes but has no group")
            continue
        cache = _check_split(report, path, name, attrs)
        if cache is not None:
            caches[name] = cache
    if teacher is not None:
        _check_teacher(report, path, attrs, caches, teacher=teacher, weights=weights, data=data, sample=sample,
                       seed=seed, device=device, batch_size=batch_size, rtol=rtol, atol=atol,
                       trust_model_code=trust_model_code)
    return report


# --- without a teacher -------------------------------------------------------------------------------------------

def _check_complete(report: VerifyReport, root: Any, attrs: dict, listed: list[str], groups: list[str]) -> None:
    problems = []
    if attrs.get("complete") is not True:
        problems.append("root attribute complete is not true (its writer did not finish)")
    for name in groups:
        if root[name].attrs.get("complete") is not True:
            problems.append(f"split {name!r} is incomplete")
    unlisted = [g for g in groups if g not in listed]
    if attrs.get("complete") is True and unlisted:
        problems.append(f"split(s) {', '.join(unlisted)} not in the root's splits attribute")
    if not groups:
        problems.append("no split groups")
    detail = _listed(problems) if problems else f"root and {len(groups)} split(s) complete ({', '.join(groups)})"
    report.add("complete", not problems, detail)


def _check_tokenizer(report: VerifyReport, path: Path, root: Any, arrays: set[str]) -> None:
    if "tokenizer" not in arrays:
        report.add("tokenizer", False, "a text cache must store its tokenizer (array 'tokenizer' is missing)")
        return
    array = root["tokenizer"]
    problems = chunk_file_problems(array, path / "tokenizer", f"{path}: array 'tokenizer'")
    if not problems:
        try:
            read_checked(array, path / "tokenizer", f"{path}: array 'tokenizer'")
        except KDCacheError as exc:
            problems.append(str(exc))
    report.add("tokenizer", not problems, _listed(problems) if problems else f"{array.shape[0]} bytes, checksum ok")


def _codec_problems(cache: TeacherCache, attrs: dict) -> list[str]:
    """Arrays without a trailing CRC32C (their damage would go unnoticed) or of another dtype than the format's."""
    from zarr.codecs import Crc32cCodec

    kind = cache.task_kind
    floats = (attrs.get("storage") or {}).get("logits_dtype")
    wanted = {"logits": floats, "labels": fmt.LABEL_DTYPE.get(kind),
              "index": fmt.INDEX_DTYPE, "fingerprint": fmt.FINGERPRINT_DTYPE, **{k: floats for k in cache.extra_widths}}
    problems = []
    for name in cache.names:
        array = cache.arrays[name]
        codecs = array.metadata.codecs
        if not codecs or not isinstance(codecs[-1], Crc32cCodec):
            problems.append(f"array {name!r} has no CRC32C checksum codec")
        if wanted[name] and str(array.dtype) != wanted[name]:
            problems.append(f"array {name!r} is {array.dtype}, expected {wanted[name]}")
        if array.chunks[0] != cache.chunk_rows:
            problems.append(f"array {name!r} has {array.chunks[0]} rows per chunk, logits {cache.chunk_rows}")
    unlisted = sorted(set(cache.group.array_keys()) - set(cache.names))
    if unlisted:
        problems.append(f"array(s) {', '.join(unlisted)} in the split but in neither the format nor its extra_arrays")
    return problems


def _check_split(report: VerifyReport, path: Path, name: str, attrs: dict) -> TeacherCache | None:
    """Structure, chunk files, checksums, digest, finite logits, labels; returns the open split when usable."""
    try:
        cache = TeacherCache(path, name, allow_incomplete=True, check_chunks=False)
    except KDCacheError as exc:
        report.add(f"{name}/structure", False, str(exc))
        return None
    problems = _codec_problems(cache, attrs)
    report.add(f"{name}/structure", not problems, _listed(problems) if problems else
               f"{len(cache)} rows x {cache.num_outputs} outputs {cache.logits.dtype}, "
               f"{len(cache.names)} arrays with CRC32C, {cache.chunk_rows} rows per chunk")

    missing_files = cache.chunk_problems()
    nchunks = -(-len(cache) // cache.chunk_rows)
    report.add(f"{name}/chunk files", not missing_files, _listed(missing_files) if missing_files else
               f"all {nchunks * len(cache.names)} chunk files present")
    if cache.split_attrs.get("complete") is True:
        manifest = cache.manifest_problems
        report.add(f"{name}/chunk manifest", not manifest, _listed(manifest) if manifest else
                   f"one digest per chunk of all {len(cache.names)} arrays; each chunk read below must match its place"
                   if cache.chunk_digests is not None else
                   "none recorded (a cache written before kdcache bound chunks to their place): chunk positions are "
                   "checked only through the digest of the fingerprints; write the cache again to bind them")

    # Every chunk of every array, one at a time (bounded memory), collecting what the later checks need.
    damaged, skipped = [], 0
    fingerprints: list[np.ndarray | None] = []
    nonfinite_rows, first_nonfinite = 0, None
    bad_labels, first_bad_label = 0, None
    width, kind = cache.num_outputs, cache.task_kind
    for array_name in cache.names:
        present = cache.present_chunks(array_name)  # what exists: a shape claiming 10^12 rows costs nothing more
        skipped += nchunks - len(present)
        if array_name == "fingerprint" and len(present) < nchunks:
            fingerprints.append(None)
        for c in present:
            a, b = c * cache.chunk_rows, min((c + 1) * cache.chunk_rows, len(cache))
            try:
                values = cache.read(array_name, a, b)
            except KDCacheError as exc:
                damaged.append(str(exc))
                if array_name == "fingerprint":
                    fingerprints.append(None)
                continue
            if array_name == "fingerprint":
                fingerprints.append(values)
            elif array_name == "logits" or array_name in cache.extra_widths:
                bad = np.flatnonzero(~np.isfinite(values).all(axis=1))
                if len(bad) and first_nonfinite is None:
                    first_nonfinite = (array_name, a + int(bad[0]))
                nonfinite_rows += len(bad)
            elif array_name == "labels" and kind == "classification":
                bad = np.flatnonzero((values < -1) | (values >= width))
                if len(bad) and first_bad_label is None:
                    first_bad_label = (a + int(bad[0]), int(values[bad[0]]))
                bad_labels += len(bad)
    total = nchunks * len(cache.names)
    if damaged:
        detail = f"{len(damaged)} of {total} chunks damaged: {_listed(damaged)}"
    else:
        detail = f"{total - skipped} of {total}" if skipped else f"all {total}"
        detail += " chunks match their CRC32C" + (" and their place in the manifest" if cache.chunk_digests else "")
    report.add(f"{name}/checksums", not damaged and not skipped,
               detail + (f"; {skipped} not checked (chunk file missing)" if skipped else ""))

    recorded = (cache.split_attrs.get("dataset") or {}).get("digest")
    throughput = ((attrs.get("throughput") or {}).get(name) or {}).get("digest")
    if any(f is None for f in fingerprints):
        report.add(f"{name}/digest", False, "not computed: fingerprint chunk(s) missing or damaged")
    elif recorded is None:
        report.add(f"{name}/digest", False, "the split records no dataset.digest")
    else:
        digest = dataset_digest(np.concatenate(fingerprints) if fingerprints else np.zeros(0, np.uint64))
        problems = []
        if digest != recorded:
            problems.append(f"stored fingerprints hash to {digest[:16]}... but dataset.digest is {recorded[:16]}...")
        if throughput is not None and throughput != recorded:
            problems.append(f"root throughput digest {throughput[:16]}... differs from dataset.digest")
        report.add(f"{name}/digest", not problems, _listed(problems) if problems else
                   f"sha256 over {len(cache)} fingerprints = dataset.digest {recorded[:16]}...")

    floats = "logits" + (f" and {len(cache.extra_widths)} further float arrays" if cache.extra_widths else "")
    report.add(f"{name}/logits finite", nonfinite_rows == 0,
               f"{nonfinite_rows} row(s) hold NaN or Inf, first: array {first_nonfinite[0]!r} row {first_nonfinite[1]}"
               if nonfinite_rows else f"no NaN or Inf in the readable chunks of {floats}" if damaged or skipped
               else f"no NaN or Inf in {floats}")
    if kind == "classification":
        report.add(f"{name}/labels", bad_labels == 0,
                   f"{bad_labels} label(s) outside -1..{width - 1}, first row {first_bad_label[0]} "
                   f"(label {first_bad_label[1]})" if bad_labels else f"all within -1..{width - 1}")
    return cache


# --- with a teacher ----------------------------------------------------------------------------------------------

def _check_teacher(report: VerifyReport, path: Path, attrs: dict, caches: dict[str, TeacherCache], *, teacher: str,
                   weights: str | Path | None, data: str | None, sample: int, seed: int, device: str,
                   batch_size: int, rtol: float | None, atol: float | None, trust_model_code: bool) -> None:
    """Weights hash, then a sample of rows per split: fingerprints re-derived from the data, logits recomputed."""
    import torch

    from kdcache.data import load_split, modality_of
    from kdcache.reader import load_cache_tokenizer
    from kdcache.recipes.distill import _options_from_cache  # the very options distill re-reads data with
    from kdcache.runtime import autocast, resolve_device
    from kdcache.teachers import load_teacher

    recorded = attrs.get("teacher") or {}
    task_attrs = attrs.get("task") or {}
    task, kind = task_attrs.get("name"), task_attrs.get("kind", "classification")
    dev = resolve_device(device)
    if weights is None and not Path(teacher).is_dir() and recorded.get("spec") == teacher:
        weights = recorded.get("weights_file")  # an architecture name: the weights file the cache was written with
    loaded = load_teacher(teacher, weights=weights, num_outputs=recorded.get("num_outputs"),
                          trust_model_code=trust_model_code)
    loaded.model.to(dev)
    same = loaded.sha256 == recorded.get("sha256")
    report.add("teacher", same, f"weights sha256 {loaded.sha256[:16]}... match the cache's teacher" if same else
               f"weights sha256 {loaded.sha256[:16]}... differ from the cache's teacher "
               f"{str(recorded.get('sha256'))[:16]}... ({recorded.get('spec')}): not the teacher that wrote this cache")
    if sample == 0:
        return
    storage = attrs.get("storage") or {}
    precision = (attrs.get("inference") or {}).get("precision", "fp32")
    d_rtol, d_atol = tolerance(storage.get("logits_dtype", "float16"), precision)
    rtol, atol = d_rtol if rtol is None else rtol, d_atol if atol is None else atol
    modality = task_attrs.get("modality") or modality_of(task)
    tokenizer = None
    for name, cache in caches.items():
        if cache.split_attrs.get("complete") is not True:
            continue
        dataset = cache.split_attrs.get("dataset") or {}
        if modality == "text" and tokenizer is None:
            tokenizer = load_cache_tokenizer(path)
        try:
            split = load_split(task, data if data is not None else dataset.get("source"), name, tokenizer=tokenizer,
                               options=_options_from_cache(dataset, task_attrs, kind))
        except KDCacheError as exc:
            report.add(f"{name}/sample", False, f"cannot re-read the data: {exc}")
            continue
        if len(split) != len(cache):
            report.add(f"{name}/sample", False, f"{split.source}: has {len(split)} rows but the cache has "
                                                f"{len(cache)}; the data changed since the teacher was cached")
            continue
        rows = np.sort(np.random.default_rng(seed).choice(len(cache), size=min(sample, len(cache)), replace=False))
        try:
            stored_fp = cache.read("fingerprint")[rows]
            stored_labels = cache.read("labels")[rows]
            stored = _stored_rows(cache, rows)
        except KDCacheError as exc:
            report.add(f"{name}/sample", False, str(exc))
            continue
        fresh_fp, fresh, fresh_labels = [], [], []
        with torch.inference_mode():
            for i in range(0, len(rows), batch_size):
                batch = split.collate([split.dataset[int(r)] for r in rows[i:i + batch_size]])
                fresh_fp.append(np.asarray(batch.fingerprint, dtype=np.uint64))
                fresh_labels.append(batch.labels.numpy())
                try:
                    with autocast(dev, precision):
                        out = loaded(split.prepare(batch, dev))
                except Exception as exc:  # noqa: BLE001 - any model error on this input: a mismatched teacher
                    message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                    raise KDCacheError(f"teacher {teacher} cannot run on {split.source}: {message}") from exc
                fresh.append(out.float().cpu().numpy())
        fresh_fp, fresh = np.concatenate(fresh_fp), np.concatenate(fresh)
        differ = np.flatnonzero(fresh_fp != stored_fp)
        report.add(f"{name}/sample fingerprints", not len(differ),
                   f"{len(differ)} of {len(rows)} sampled rows differ from {split.source}, "
                   f"first row {int(rows[differ[0]])}"
                   if len(differ) else f"{len(rows)} random rows of {split.source} match")
        fresh_labels = np.concatenate(fresh_labels).astype(stored_labels.dtype)
        wrong = np.flatnonzero(~labels_equal(stored_labels, fresh_labels))
        report.add(f"{name}/sample labels", not len(wrong),
                   f"{len(wrong)} of {len(rows)} sampled rows have another label in {split.source} than in the cache, "
                   f"first row {int(rows[wrong[0]])} ({fresh_labels[wrong[0]]} vs {stored_labels[wrong[0]]})"
                   if len(wrong) else f"the labels of {len(rows)} random rows of {split.source} match")
        if fresh.shape[1] != stored.shape[1]:
            report.add(f"{name}/teacher logits", False,
                       f"the teacher gives {fresh.shape[1]} outputs but the cache holds {stored.shape[1]}")
            continue
        stored = stored.astype(np.float32)
        diff = np.abs(stored - fresh)
        diff[~np.isfinite(diff)] = np.inf
        over = diff > rtol * np.abs(fresh) + atol
        worst = np.unravel_index(int(np.argmax(diff)), diff.shape)
        detail = (f"largest |difference| {diff.max():.3g} (row {int(rows[worst[0]])}, output {int(worst[1])}) over "
                  f"{len(rows)} recomputed rows; tolerance {rtol:.3g}*|logit| + {atol:.3g}")
        if over.any():
            detail += f"; {int(over.any(axis=1).sum())} row(s) beyond it"
        report.add(f"{name}/teacher logits", not over.any(), detail)


def _stored_rows(cache: TeacherCache, rows: np.ndarray) -> np.ndarray:
    """Stored logits of the sorted `rows`, reading only the chunks they fall in (checked reads)."""
    out = np.empty((len(rows), cache.num_outputs), dtype=cache.logits.dtype)
    chunks = rows // cache.chunk_rows
    for c in np.unique(chunks):
        a = int(c) * cache.chunk_rows
        block = cache.read("logits", a, a + cache.chunk_rows)
        take = chunks == c
        out[take] = block[rows[take] - a]
    return out


__all__ = ["Check", "VerifyReport", "tolerance", "verify_cache"]
