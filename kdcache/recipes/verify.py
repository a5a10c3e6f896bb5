"""Recipe: prove a cache is whole and says what its teacher said (`kdcache verify`).

    kdcache verify sst2.kdcache                                   # every chunk, checksum, place and digest
    kdcache verify sst2.kdcache --teacher models/bert-sst2        # plus 256 random rows per split recomputed
    kdcache verify s3://bucket/c10.kdcache --teacher resnet110 --weights r110.pt --sample 100000

Without a teacher it runs every check a cache can make on its own (kdcache/cache/verify.py). With a teacher it
also compares the weights' hash with the cache's, re-reads a random sample of rows from the dataset (their
fingerprints and labels must match) and recomputes the teacher's logits for them: a cache that disagrees beyond the
rounding of its storage dtype (and of the autocast it was computed under) fails.
"""

from __future__ import annotations

import functools

from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdcache.cache import Cache, TeacherCache
from kdcache.cache.verify import VerifyReport, check_cache
from kdcache.data import load_split, modality_of, recorded_options
from kdcache.errors import KDCacheError
from kdcache.fingerprint import labels_equal
from kdcache.models import Teacher, load_teacher
from kdcache.runtime import autocast, resolve_device

#: (rtol, atol) per storage dtype: a fresh logit x and a stored one s agree when |s - x| <= rtol * |x| + atol.
#: float16 keeps 11 significant bits (rounding error at most 2**-11 relative); twice that, plus an absolute
#: allowance for the few ulps by which two devices' kernels may differ, still rejects any other teacher.
STORAGE_TOLERANCE = {"float16": (2.0**-10, 1e-3), "float32": (2.0**-14, 1e-4)}
#: Teacher logits computed under autocast carry the compute dtype's own rounding, whatever the storage dtype.
COMPUTE_TOLERANCE = {"fp32": (0.0, 0.0), "fp16": (2.0**-8, 2.0**-8), "bf16": (2.0**-5, 2.0**-5)}


def tolerance(dtype: str, precision: str = "fp32") -> tuple[float, float]:
    """(rtol, atol) for comparing stored logits with fresh ones: storage rounding, widened for autocast."""
    rtol, atol = STORAGE_TOLERANCE.get(dtype, STORAGE_TOLERANCE["float16"])
    c_rtol, c_atol = COMPUTE_TOLERANCE.get(precision, COMPUTE_TOLERANCE["bf16"])
    return max(rtol, c_rtol), max(atol, c_atol)


def verify_cache(location: str | Path, *, teacher: str | None = None, weights: str | Path | None = None,
                 data: str | None = None, sample: int = 256, seed: int = 0, device: str = "auto",
                 batch_size: int = 64, rtol: float | None = None, atol: float | None = None,
                 trust_model_code: bool = False, storage_options: dict[str, Any] | None = None) -> VerifyReport:
    """Run every check on the cache (and, given `teacher`, recompute `sample` random rows per split).

    Never writes to the cache: it is opened read-only, like every reader. Input that cannot be verified at all (no
    such cache, not a kdcache cache, a newer format, a teacher that cannot be loaded) is a KDCacheError."""
    if sample < 0 or batch_size < 1:
        raise KDCacheError("--sample must be at least 0 and --batch-size at least 1")
    cache = Cache(location, allow_incomplete=True, storage_options=storage_options)
    report, splits = check_cache(cache)
    if teacher is None:
        return report
    recorded = cache.header.teacher
    if weights is None and not Path(teacher).is_dir() and recorded.get("spec") == teacher:
        weights = recorded.get("weights_file")  # an architecture name: the weights file the cache was written with
    loaded = load_teacher(teacher, weights=weights, num_outputs=recorded.get("num_outputs"),
                          trust_model_code=trust_model_code, causal_lm=cache.header.task.kind == "lm")
    dev = resolve_device(device)
    loaded.model.to(dev)
    same = loaded.sha256 == recorded.get("sha256")
    report.add("teacher", same, f"weights sha256 {loaded.sha256[:16]}... match the cache's teacher" if same else
               f"weights sha256 {loaded.sha256[:16]}... differ from the cache's teacher "
               f"{str(recorded.get('sha256'))[:16]}... ({recorded.get('spec')}): not the teacher that wrote this cache")
    if sample == 0:
        return report
    d_rtol, d_atol = tolerance(cache.header.storage.logits_dtype, cache.header.inference.get("precision", "fp32"))
    tol = (d_rtol if rtol is None else rtol, d_atol if atol is None else atol)
    modality = cache.header.task.modality or modality_of(cache.header.task.name)
    tokenizer = cache.tokenizer(trust_model_code=trust_model_code) if modality == "text" else None
    for name, split in splits.items():
        if split.split_attrs.get("complete") is True:
            _check_sample(report, cache, split, loaded, tokenizer, data=data, sample=sample, seed=seed, device=dev,
                          batch_size=batch_size, tol=tol)
    return report


def _check_sample(report: VerifyReport, cache: Cache, split: TeacherCache, teacher: Teacher, tokenizer: Any, *,
                  data: str | None, sample: int, seed: int, device: torch.device, batch_size: int,
                  tol: tuple[float, float]) -> None:
    """A random sample of rows: fingerprints and labels re-derived from the data, logits recomputed."""
    name, dataset = split.split, split.split_attrs.get("dataset") or {}
    try:
        source = load_split(cache.header.task.name, data if data is not None else dataset.get("source"), name,
                            tokenizer=tokenizer, options=recorded_options(dataset, cache.header.task.to_attrs()))
    except KDCacheError as exc:
        report.add(f"{name}/sample", False, f"cannot re-read the data: {exc}")
        return
    if len(source) != len(split):
        report.add(f"{name}/sample", False, f"{source.source}: has {len(source)} rows but the cache has {len(split)}; "
                                            "the data changed since the teacher was cached")
        return
    rows = np.sort(np.random.default_rng(seed).choice(len(split), size=min(sample, len(split)), replace=False))
    try:
        stored_fp, stored_labels = split.read("fingerprint")[rows], split.read("labels")[rows]
        valid = None
        if split.target.positions:  # a window's positions are its rows: those within its length are compared
            valid = np.arange(split.target.positions)[None, :] < _stored_rows(split, rows, "lengths")[:, None]
        stored_of = functools.partial(_stored_rows, split, rows, valid=valid)
        stored = stored_of("logits") if split.target.kind == "dense" else None
    except KDCacheError as exc:
        report.add(f"{name}/sample", False, str(exc))
        return
    fresh_fp, fresh, fresh_labels = _recompute(source, teacher, rows, device, batch_size,
                                               cache.header.inference.get("precision", "fp32"))
    positions = rows
    if valid is not None:
        fresh, positions = fresh[valid], np.broadcast_to(rows[:, None], valid.shape)[valid]
    differ = np.flatnonzero(fresh_fp != stored_fp)
    report.add(f"{name}/sample fingerprints", not len(differ),
               f"{len(differ)} of {len(rows)} sampled rows differ from {source.source}, first row {int(rows[differ[0]])}"
               if len(differ) else f"{len(rows)} random rows of {source.source} match")
    fresh_labels = fresh_labels.astype(stored_labels.dtype)
    wrong = np.flatnonzero(~labels_equal(stored_labels, fresh_labels))
    report.add(f"{name}/sample labels", not len(wrong),
               f"{len(wrong)} of {len(rows)} sampled rows have another label in {source.source} than in the cache, "
               f"first row {int(rows[wrong[0]])} ({fresh_labels[wrong[0]]} vs {stored_labels[wrong[0]]})"
               if len(wrong) else f"the labels of {len(rows)} random rows of {source.source} match")
    if fresh.shape[-1] != split.num_outputs:
        report.add(f"{name}/teacher logits", False,
                   f"the teacher gives {fresh.shape[-1]} outputs but the cache holds {split.num_outputs}")
        return
    rows = positions  # from here on, one row per compared target row (a token-level split's: per position)
    if cache.header.views is not None:
        _check_views(report, cache, split, source, teacher, rows, device=device, batch_size=batch_size, tol=tol,
                     seed=seed)
    if split.target.kind != "dense":
        _check_sparse(report, name, split, rows, fresh, tol, stored_of)
        return
    _check_dense(report, f"{name}/teacher logits", stored, fresh, rows, tol)


def _check_views(report: VerifyReport, cache: Cache, split: TeacherCache, source: Any, teacher: Teacher,
                 rows: np.ndarray, *, device: torch.device, batch_size: int, tol: tuple[float, float],
                 seed: int) -> None:
    """A views cache: one view of each sampled row (drawn from the seed) replayed from its stored parameters by the
    code capture used, the teacher run on it, and its stored per-view target compared like the plain one."""
    from kdcache.cache.schema import VIEW_PARAMS, VIEW_PREFIX
    from kdcache.data.augment import partner_column, partner_images, view_input
    from kdcache.train.views import check_views

    name = split.split
    try:
        info = check_views(cache.header, str(cache.store))
        views = np.random.default_rng(seed + 1).integers(0, info.count, size=len(rows))
        at = np.arange(len(rows))
        params = torch.from_numpy(_stored_rows(split, rows, VIEW_PARAMS)[at, views])
        stored_of = lambda array: _stored_rows(split, rows, VIEW_PREFIX + array)[at, views]  # noqa: E731
    except KDCacheError as exc:
        report.add(f"{name}/views", False, str(exc))
        return
    precision, fresh, column = cache.header.inference.get("precision", "fp32"), [], partner_column(info.augment)
    with torch.inference_mode():
        for i in range(0, len(rows), batch_size):
            batch = source.collate([source.dataset[int(r)] for r in rows[i:i + batch_size]])
            some = params[i:i + batch_size]
            partners = partner_images(source, some[:, column]) if column is not None else None
            fresh.append(_run_teacher(teacher, source, lambda: view_input(source, info.augment, batch.inputs, some,
                                                                          device, partners), device, precision))
    fresh_views = np.concatenate(fresh)
    if split.target.kind != "dense":
        _check_sparse(report, f"{name}/views", split, rows, fresh_views, tol, stored_of)
        return
    _check_dense(report, f"{name}/views teacher logits", stored_of("logits"), fresh_views, rows, tol,
                 what=f"recomputed views ({info.augment}, one per row)")


def _check_dense(report: VerifyReport, key: str, stored: np.ndarray, fresh: np.ndarray, rows: np.ndarray,
                 tol: tuple[float, float], what: str = "recomputed rows") -> None:
    """Stored dense logits against recomputed ones, under the tolerance of the storage dtype."""
    diff = np.abs(stored.astype(np.float32) - fresh)
    diff[~np.isfinite(diff)] = np.inf
    over = diff > tol[0] * np.abs(fresh) + tol[1]
    worst = np.unravel_index(int(np.argmax(diff)), diff.shape)
    detail = (f"largest |difference| {diff.max():.3g} (row {int(rows[worst[0]])}, output {int(worst[1])}) over "
              f"{len(rows)} {what}; tolerance {tol[0]:.3g}*|logit| + {tol[1]:.3g}")
    if over.any():
        detail += f"; {int(over.any(axis=1).sum())} row(s) beyond it"
    report.add(key, not over.any(), detail)


def _check_sparse(report: VerifyReport, name: str, split: TeacherCache, rows: np.ndarray, fresh: np.ndarray,
                  tol: tuple[float, float], stored_of: Any) -> None:
    """A sparse row against the teacher's recomputed logits: what the row claims of them must hold. Top-k: the kept
    values at their ids, no unkept output above the smallest kept one, and each log-sum-exp; sampled: each drawn id's
    log-probability. (The draws themselves are not redrawn: a logit a few ulps away may move one.) `stored_of(array)`
    reads the stored rows that `fresh` recomputed (a token-level split's: one per position)."""
    spec, z = split.target, torch.from_numpy(fresh).double()
    claims: list[tuple[str, np.ndarray, np.ndarray]] = []  # (what, stored, recomputed), compared under `tol`
    if spec.kind == "topk":
        ids = torch.from_numpy(stored_of("topk_indices").astype(np.int64))
        values = stored_of("topk_values").astype(np.float64)
        claims.append(("kept logit", values, z.gather(1, ids).numpy()))
        unkept = z.scatter(1, ids, -np.inf).max(dim=1).values.numpy()
        smallest = values.min(axis=1)
        claims.append(("largest unkept logit (not above the smallest kept)", np.maximum(smallest, unkept)[:, None],
                       smallest[:, None]))
        lse = stored_of("logsumexp").astype(np.float64).reshape(len(rows), -1)
        fresh_lse = torch.stack([torch.logsumexp(z / t, dim=1) for t in (spec.temperatures or [1.0])], 1)
        claims.append(("log-sum-exp", lse, fresh_lse.numpy()))
    else:
        ids = torch.from_numpy(stored_of("sampled_ids").astype(np.int64))
        used = stored_of("sampled_counts") > 0
        logprobs = stored_of("sampled_logprobs").astype(np.float64)
        fresh_lp = torch.log_softmax(z, dim=1).gather(1, ids).numpy()
        claims.append(("log-probability", np.where(used, logprobs, 0.0), np.where(used, fresh_lp, 0.0)))
    failed, worst = [], 0.0
    for what, stored, recomputed in claims:
        diff = np.abs(stored - recomputed)
        worst = max(worst, float(diff.max(initial=0.0)))
        over = np.flatnonzero((diff > tol[0] * np.abs(recomputed) + tol[1]).any(axis=1))
        if len(over):
            failed.append(f"{len(over)} row(s) of {len(rows)} differ in their {what}, first row {int(rows[over[0]])}")
    detail = (f"largest |difference| {worst:.3g} over {len(rows)} recomputed {spec.kind} rows; tolerance "
              f"{tol[0]:.3g}*|value| + {tol[1]:.3g}")
    report.add(f"{name}/teacher {spec.kind} rows", not failed, "; ".join([*failed, detail]))


def _recompute(source: Any, teacher: Teacher, rows: np.ndarray, device: torch.device, batch_size: int,
               precision: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fingerprints, teacher logits and labels of `rows`, from the data as it is now."""
    fingerprints, logits, labels = [], [], []
    with torch.inference_mode():
        for i in range(0, len(rows), batch_size):
            batch = source.collate([source.dataset[int(r)] for r in rows[i:i + batch_size]])
            fingerprints.append(np.asarray(batch.fingerprint, dtype=np.uint64))
            labels.append(batch.labels.numpy())
            logits.append(_run_teacher(teacher, source, lambda: source.prepare(batch, device), device, precision))
    return np.concatenate(fingerprints), np.concatenate(logits), np.concatenate(labels)


def _run_teacher(teacher: Teacher, source: Any, model_input: Any, device: torch.device,
                 precision: str) -> np.ndarray:
    """The teacher's float32 outputs on `model_input()`; any model error on that input (a mismatched teacher, plain
    rows or views alike) is one line naming the teacher and the data, not a traceback."""
    try:
        with autocast(device, precision):
            out = teacher(model_input())
    except Exception as exc:  # noqa: BLE001 - any model error on this input: a mismatched teacher
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise KDCacheError(f"teacher {teacher.spec} cannot run on {source.source}: {message}") from exc
    return out.float().cpu().numpy()


def _stored_rows(split: TeacherCache, rows: np.ndarray, array: str = "logits", *,
                 valid: np.ndarray | None = None) -> np.ndarray:
    """Stored rows of an array at the sorted `rows`, reading only the chunks they fall in (checked reads); `valid`
    [rows, S] keeps the positions within each window of a token-level split, one row per position."""
    held = split.arrays[array]
    out = np.empty((len(rows), *held.shape[1:]), dtype=held.dtype)
    chunks = rows // split.chunk_rows
    for c in np.unique(chunks):
        a = int(c) * split.chunk_rows
        block = split.read(array, a, a + split.chunk_rows)
        take = chunks == c
        out[take] = block[rows[take] - a]
    return out if valid is None else out[valid]


__all__ = ["tolerance", "verify_cache"]
