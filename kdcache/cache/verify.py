"""What a cache can prove about itself, before hours of students rely on it (the checks of `kdcache verify`).

Format and version, completeness of the root and of every split, the arrays and their shapes, dtypes and CRC32C
codec, that every chunk file exists, the chunk manifest, every chunk's checksum and place, that the stored
fingerprints hash to the split's recorded dataset digest, finite float arrays and labels within the teacher's
outputs. What only the teacher and the data can prove (recomputed rows) is `kdcache.recipes.verify`, which adds
its checks to the same report. Each check is one `Check`; the report passes when every check does.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from kdcache.cache import schema
from kdcache.cache.reader import (RECREATE_HINT, Cache, TeacherCache, chunk_file_problems, metadata_error,
                                  read_checked)
from kdcache.errors import KDCacheError
from kdcache.fingerprint import dataset_digest

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


def listed(problems: list[str]) -> str:
    """The first few problems on one line; the advice to recreate the cache is left to the docs, not repeated."""
    problems = [p.removesuffix(f"; {RECREATE_HINT}") for p in problems]
    shown = "; ".join(problems[:_MAX_LISTED])
    return shown + (f"; and {len(problems) - _MAX_LISTED} more" if len(problems) > _MAX_LISTED else "")


def check_cache(cache: Cache) -> tuple[VerifyReport, dict[str, TeacherCache]]:
    """Every check a cache can make on its own; returns the report and the splits that could be opened."""
    report = VerifyReport(str(cache.store))
    report.add("format", True, f"{cache.header.format} version {cache.header.format_version}")
    try:
        groups = cache.splits
        arrays = set(cache.root.array_keys())
    except KDCacheError:
        raise
    except Exception as exc:  # noqa: BLE001 - zarr raises many types for damaged metadata
        raise metadata_error(cache.store, exc) from exc
    listed_splits = list(cache.header.splits)
    splits = listed_splits + [g for g in groups if g not in listed_splits]
    _check_complete(report, cache, listed_splits, groups)
    if schema.TOKENIZER_ARRAY in arrays or cache.header.task.modality == "text":
        _check_tokenizer(report, cache, arrays)
    opened = {}
    for name in splits:
        if name not in groups:
            report.add(f"{name}/structure", False, f"split {name!r} is listed in the root attributes but has no group")
            continue
        split = _check_split(report, cache, name)
        if split is not None:
            opened[name] = split
    return report, opened


def _check_complete(report: VerifyReport, cache: Cache, listed_splits: list[str], groups: list[str]) -> None:
    problems = []
    if cache.header.complete is not True:
        problems.append("root attribute complete is not true (its writer did not finish)")
    for name in groups:
        if cache.root[name].attrs.get("complete") is not True:
            problems.append(f"split {name!r} is incomplete")
    unlisted = [g for g in groups if g not in listed_splits]
    if cache.header.complete is True and unlisted:
        problems.append(f"split(s) {', '.join(unlisted)} not in the root's splits attribute")
    if not groups:
        problems.append("no split groups")
    detail = listed(problems) if problems else f"root and {len(groups)} split(s) complete ({', '.join(groups)})"
    report.add("complete", not problems, detail)


def _check_tokenizer(report: VerifyReport, cache: Cache, arrays: set[str]) -> None:
    name = schema.TOKENIZER_ARRAY
    if name not in arrays:
        report.add("tokenizer", False, "a text cache must store its tokenizer (array 'tokenizer' is missing)")
        return
    array, where = cache.root[name], f"{cache.store}: array 'tokenizer'"
    problems = chunk_file_problems(array, cache.store, name, where)
    if not problems:
        try:
            read_checked(array, cache.store, name, where)
            cache.tokenizer()  # its recorded sha256 and the size limits of what it unpacks to
        except KDCacheError as exc:
            problems.append(str(exc))
    report.add("tokenizer", not problems, listed(problems) if problems else
               f"{array.shape[0]} bytes, checksum{' and sha256' if array.attrs.get('sha256') else ''} ok")


def _codec_problems(split: TeacherCache) -> list[str]:
    """Arrays in the split that neither the format nor its extra_arrays name (the dtype, shape, chunks and codecs of
    the named ones are checked when the split opens: TeacherCache._check_array_metadata)."""
    unlisted = sorted(set(split.group.array_keys()) - set(split.names))
    if unlisted:
        return [f"array(s) {', '.join(unlisted)} in the split but in neither the format nor its extra_arrays"]
    return []


@dataclass
class _Scan:
    """What one pass over every chunk of a split collects for the later checks."""

    damaged: list[str] = field(default_factory=list)
    skipped: int = 0
    fingerprints: list[np.ndarray | None] = field(default_factory=list)
    nonfinite_rows: int = 0
    first_nonfinite: tuple[str, int] | None = None
    bad_labels: int = 0
    first_bad_label: tuple[int, int] | None = None


def _scan(split: TeacherCache) -> _Scan:
    """Every chunk of every array, one at a time (bounded memory), through the checked read."""
    scan, nchunks, width = _Scan(), -(-len(split) // split.chunk_rows), split.num_outputs
    for array_name in split.names:
        present = split.present_chunks(array_name)  # what exists: a shape claiming 10^12 rows costs nothing more
        scan.skipped += nchunks - len(present)
        if array_name == "fingerprint" and len(present) < nchunks:
            scan.fingerprints.append(None)
        for c in present:
            a, b = c * split.chunk_rows, min((c + 1) * split.chunk_rows, len(split))
            try:
                values = split.read(array_name, a, b, finite=False)
            except KDCacheError as exc:
                scan.damaged.append(str(exc))
                if array_name == "fingerprint":
                    scan.fingerprints.append(None)
                continue
            if array_name == "fingerprint":
                scan.fingerprints.append(values)
            elif values.dtype.kind == "f" and array_name not in ("labels", "index"):  # logits, sparse, extras
                bad = np.flatnonzero(~np.isfinite(values.reshape(len(values), -1)).all(axis=1))
                if len(bad) and scan.first_nonfinite is None:
                    scan.first_nonfinite = (array_name, a + int(bad[0]))
                scan.nonfinite_rows += len(bad)
            elif array_name == "labels" and split.task_kind == "classification":
                bad = np.flatnonzero((values < -1) | (values >= width))
                if len(bad) and scan.first_bad_label is None:
                    scan.first_bad_label = (a + int(bad[0]), int(values[bad[0]]))
                scan.bad_labels += len(bad)
    return scan


def _check_split(report: VerifyReport, cache: Cache, name: str) -> TeacherCache | None:
    """Structure, chunk files, manifest, checksums, digest, finite floats, labels; returns the open split."""
    try:
        split = cache.split(name, check_chunks=False)
    except KDCacheError as exc:
        report.add(f"{name}/structure", False, str(exc))
        return None
    problems = _codec_problems(split)
    report.add(f"{name}/structure", not problems, listed(problems) if problems else
               f"{len(split)} rows x {split.num_outputs} outputs {split.logits.dtype}, "
               f"{len(split.names)} arrays with CRC32C, {split.chunk_rows} rows per chunk")
    missing_files = split.chunk_problems()
    nchunks = -(-len(split) // split.chunk_rows)
    report.add(f"{name}/chunk files", not missing_files, listed(missing_files) if missing_files else
               f"all {nchunks * len(split.names)} chunk files present")
    if split.split_header.complete is True:
        manifest = split.manifest_problems
        report.add(f"{name}/chunk manifest", not manifest, listed(manifest) if manifest else
                   f"one digest per chunk of all {len(split.names)} arrays; each chunk read below must match its place"
                   if split.chunk_digests is not None else
                   "none recorded (a cache written before kdcache bound chunks to their place): chunk positions are "
                   "checked only through the digest of the fingerprints; write the cache again to bind them")
    scan = _scan(split)
    total = nchunks * len(split.names)
    if scan.damaged:
        detail = f"{len(scan.damaged)} of {total} chunks damaged: {listed(scan.damaged)}"
    else:
        detail = (f"{total - scan.skipped} of {total}" if scan.skipped else f"all {total}") + " chunks match their CRC32C"
        detail += " and their place in the manifest" if split.chunk_digests else ""
    report.add(f"{name}/checksums", not scan.damaged and not scan.skipped,
               detail + (f"; {scan.skipped} not checked (chunk file missing)" if scan.skipped else ""))
    _report_digest(report, cache, split, scan)
    _report_values(report, split, scan)
    return split


def _report_digest(report: VerifyReport, cache: Cache, split: TeacherCache, scan: _Scan) -> None:
    name = split.split
    dataset = split.split_header.dataset
    recorded = dataset.digest if dataset is not None else None
    throughput = ((cache.header.throughput or {}).get(name) or {}).get("digest")
    if any(f is None for f in scan.fingerprints):
        report.add(f"{name}/digest", False, "not computed: fingerprint chunk(s) missing or damaged")
    elif recorded is None:
        report.add(f"{name}/digest", False, "the split records no dataset.digest")
    else:
        digest = dataset_digest(np.concatenate(scan.fingerprints) if scan.fingerprints else np.zeros(0, np.uint64))
        problems = []
        if digest != recorded:
            problems.append(f"stored fingerprints hash to {digest[:16]}... but dataset.digest is {recorded[:16]}...")
        if throughput is not None and throughput != recorded:
            problems.append(f"root throughput digest {throughput[:16]}... differs from dataset.digest")
        report.add(f"{name}/digest", not problems, listed(problems) if problems else
                   f"sha256 over {len(split)} fingerprints = dataset.digest {recorded[:16]}...")


def _report_values(report: VerifyReport, split: TeacherCache, scan: _Scan) -> None:
    name, width = split.split, split.num_outputs
    floats = "logits" + (f" and {len(split.extra_widths)} further float arrays" if split.extra_widths else "")
    first = scan.first_nonfinite
    report.add(f"{name}/logits finite", scan.nonfinite_rows == 0,
               f"{scan.nonfinite_rows} row(s) hold NaN or Inf, first: array {first[0]!r} row {first[1]}"
               if first else f"no NaN or Inf in the readable chunks of {floats}" if scan.damaged or scan.skipped
               else f"no NaN or Inf in {floats}")
    if split.task_kind == "classification":
        bad = scan.first_bad_label
        report.add(f"{name}/labels", scan.bad_labels == 0,
                   f"{scan.bad_labels} label(s) outside -1..{width - 1}, first row {bad[0]} (label {bad[1]})"
                   if bad else f"all within -1..{width - 1}")


__all__ = ["Check", "VerifyReport", "check_cache", "listed"]
