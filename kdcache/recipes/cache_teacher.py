"""Recipe: run a teacher once over a dataset and store what it said about every sample.

    kdcache cache-teacher --teacher models/bert-sst2 --data ../shared/data/glue/SST-2 --task sst2 \
        --split train --split validation --out sst2.kdcache

Features, and the flags that control them:
- teachers: Hugging Face folder, kdcache model folder, or architecture name + `--weights` state dict;
- data: GLUE presets, `text` with column flags, CIFAR pickles, image folders (or their zip), bundled digits;
- inference in eval mode under `torch.inference_mode`, batched (`--batch-size`), on `--device auto`,
  optionally under bf16/fp16 autocast (`--precision`);
- storage: logits as float16 or float32 (`--dtype`), codec and chunk size (`--codec`, `--chunk-rows`),
  written on a background thread so the teacher never waits on the disk;
- safety: everything is validated (data, teacher width, a first forward pass) before the first byte is
  written; `complete: true` is the last write; an existing path is refused unless `--overwrite`; one
  writer per path (a lock that dies with its process);
- resume: an interrupted cache at `--out` is finished, not restarted, when it was begun with the same
  teacher, data and storage settings (`--resume` insists on it); only the rows not yet on disk are computed,
  from the same batch boundaries, so the arrays equal an uninterrupted run's byte for byte;
- teacher checkpoints (Pro-KD, checkpoint search): `--checkpoints 'run/checkpoints/epoch-*'` also stores the
  logits of every checkpoint, in training order, each in its own array (`checkpoint_0`, ...); the last one is
  the trained teacher, stored as `logits` (so `--teacher` may be left out);
- hidden-state projections (curriculum extraction): `--hidden-layers 2,4,6 --proj-dim D --proj-seed S`
  stores, per chosen teacher layer, its pooled representation times a fixed Gaussian matrix (`hidden_<layer>`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import io
import json
import logging
import os
import re
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdcache import format as fmt
from kdcache.data import DataOptions, SplitData, load_split, modality_of
from kdcache.data.base import LABEL_IDS
from kdcache.errors import Interrupted, KDCacheError
from kdcache.fingerprint import DIGEST_ALGORITHM, FINGERPRINT_ALGORITHM
from kdcache.progress import progress_bar
from kdcache.runtime import autocast, command_line, resolve_device, software_versions
from kdcache import hidden
from kdcache.hidden import LayerTap, parse_layers, projection_matrix
from kdcache.teachers import CHECKPOINT_FILE, Teacher, load_teacher
from kdcache.writer import BackgroundWriter, CacheWriter, WriteLock, check_destination, utc_now

log = logging.getLogger("kdcache")


@dataclass
class CacheTeacherConfig:
    """Everything `cache-teacher` needs; the CLI fills it from flags, scripts build it directly."""

    teacher: str | None
    task: str
    out: Path
    data: str | None = None
    splits: tuple[str, ...] = ("train",)
    weights: str | None = None
    tokenizer: str | None = None
    batch_size: int = 64
    device: str = "auto"
    dtype: str = "float16"
    precision: str = "fp32"
    overwrite: bool = False
    resume: bool = False
    codec: str = fmt.DEFAULT_CODEC
    chunk_rows: int | None = None
    workers: int | None = None
    data_options: DataOptions = field(default_factory=DataOptions)
    progress: bool = True
    command: str | None = None
    checkpoints: tuple[str, ...] = ()  # folders or glob patterns of teacher checkpoints (Pro-KD)
    hidden_layers: str | None = None  # e.g. "2,4,6" or "layers.0,layers.1": project these layers (curriculum)
    proj_dim: int | None = None
    proj_seed: int = 0
    trust_model_code: bool = False  # let a module:factory architecture (flag or model folder) import and run


@dataclass
class _Checkpoint:
    """One teacher checkpoint: its loaded model and what the cache records about it."""

    teacher: Teacher
    name: str
    epoch: int | None
    metric: float | None


def _fit_label_ids(teacher: Teacher, split: SplitData, width: int) -> None:
    """Integer labels name their class set only up to the largest id seen; the teacher's width completes it.

    A file whose labels are 0 and 1 may well belong to a 3-output teacher (class 2 just never occurs in it),
    but a label of 7 can never be scored by a 2-output teacher: that is a label outside the teacher's outputs.
    """
    if split.preprocess.get("label_names_from") != LABEL_IDS or not split.label_names:
        return
    if split.num_labels > width:
        raise KDCacheError(
            f"{split.source}: label {split.num_labels - 1} is outside the {width} outputs of teacher {teacher.spec} "
            f"(class ids 0..{width - 1})"
        )
    split.label_names = [str(k) for k in range(width)]


def _check_splits(teacher: Teacher, splits: list[SplitData], width: int) -> None:
    """The teacher's output width must match the label set, and every split must share one label set."""
    for split in splits:
        if len(split) == 0:
            raise KDCacheError(f"{split.source}: split {split.split!r} has no rows")
        _fit_label_ids(teacher, split, width)
    # An unlabeled classification split (label_names None: every label is -1) has no label set to compare.
    labeled = [s for s in splits if s.kind == "regression" or s.label_names is not None]
    first = labeled[0] if labeled else splits[0]
    for split in splits:
        if split.kind != first.kind or (split in labeled and split.label_names != first.label_names):
            raise KDCacheError(f"{split.source}: split {split.split!r} has other labels than split {first.split!r}")
    if first.kind == "regression" and width != 1:
        raise KDCacheError(f"teacher {teacher.spec} has {width} outputs but task {first.task} is a regression (needs 1)")
    if first.kind == "classification" and first.label_names is not None and width != first.num_labels:
        raise KDCacheError(
            f"teacher {teacher.spec} has {width} outputs but {first.source} has {first.num_labels} labels "
            f"({', '.join(first.label_names or [])})"
        )


def _check_labels(split: SplitData, labels: torch.Tensor, index: torch.Tensor, width: int) -> None:
    if split.kind != "classification":
        return
    bad = (labels >= width) | (labels < -1)
    if bad.any():
        row = int(torch.nonzero(bad)[0])
        raise KDCacheError(
            f"{split.source}: row {int(index[row])} has label {int(labels[row])}, outside the teacher's {width} outputs"
        )


def _tokenizer_zip(tokenizer: Any) -> tuple[bytes, list[str]]:
    """The tokenizer's saved files as a deterministic zip, so a cache can re-derive text fingerprints alone."""
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        names = sorted(p.name for p in Path(tmp).iterdir() if p.is_file())
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
            for name in names:
                info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
                archive.writestr(info, (Path(tmp) / name).read_bytes(), zipfile.ZIP_DEFLATED)
    return buffer.getvalue(), names


def _loader(split: SplitData, cfg: CacheTeacherConfig, device: torch.device,
            start: int = 0) -> torch.utils.data.DataLoader:
    workers = cfg.workers
    if workers is None:  # images decode in workers; tokenised text and digits are already in memory
        workers = min(8, os.cpu_count() or 1) if split.modality == "image" and device.type == "cuda" else 0
    dataset = split.dataset if start == 0 else torch.utils.data.Subset(split.dataset, range(start, len(split)))
    return torch.utils.data.DataLoader(
        dataset, batch_size=cfg.batch_size, shuffle=False, num_workers=workers,
        collate_fn=split.collate, pin_memory=device.type == "cuda",
    )


def cache_teacher(cfg: CacheTeacherConfig) -> Path:
    """Run the recipe; returns the cache path. Raises KDCacheError on any bad input, before writing if it can."""
    if cfg.batch_size < 1:
        raise KDCacheError(f"--batch-size must be at least 1, got {cfg.batch_size}")
    if cfg.dtype not in fmt.LOGIT_DTYPES:
        _bad("--dtype", cfg.dtype, fmt.LOGIT_DTYPES)
    if cfg.codec not in fmt.CODECS:
        _bad("--codec", cfg.codec, tuple(fmt.CODECS))
    if not cfg.splits:
        raise KDCacheError("no --split given")
    if not cfg.teacher and not cfg.checkpoints:
        raise KDCacheError("no --teacher given (or --checkpoints, whose last checkpoint is then the teacher)")
    layers = parse_layers(cfg.hidden_layers)
    if layers and all(isinstance(k, int) for k in layers):
        layers = sorted(layers)  # numbered layers are stored (and later fitted) shallow to deep, however given
    if layers and (cfg.proj_dim is None or cfg.proj_dim < 1):
        raise KDCacheError("--hidden-layers needs --proj-dim D (D >= 1), the width of the random projections")
    if cfg.proj_dim is not None and not layers:
        raise KDCacheError("--proj-dim given without --hidden-layers")
    checkpoint_dirs = _expand_checkpoints(cfg.checkpoints)  # a pattern that matches nothing fails here, in a second
    device = resolve_device(cfg.device)
    modality = modality_of(cfg.task)
    lock = WriteLock(cfg.out).acquire()  # one writer per cache path, released however this process ends
    try:
        return _cache_teacher(cfg, device, modality, check_destination(cfg.out, cfg.overwrite, cfg.resume),
                              checkpoint_dirs, layers)
    finally:
        lock.release()


def _cache_teacher(cfg: CacheTeacherConfig, device: torch.device, modality: str, resuming: bool,
                   checkpoint_dirs: list[Path], layers: list) -> Path:
    # (a taken --out was refused above, before the slow work; an interrupted cache is resumed)

    # 1. Teacher and data, checked against each other before anything is written.
    checkpoints = _load_checkpoints(checkpoint_dirs, cfg.tokenizer, cfg.trust_model_code)
    final = None
    if not cfg.teacher:  # the last checkpoint in training order is the trained teacher (already loaded)
        final = checkpoints.pop()
        cfg = dataclasses.replace(cfg, teacher=final.teacher.spec)
    checkpoints = [c for c in checkpoints if Path(c.teacher.spec).resolve() != Path(cfg.teacher).resolve()]
    if checkpoints:  # every name, the teacher's included, must pick one array for --checkpoint NAME
        _check_unique_names([*((c.name, c.teacher.spec) for c in checkpoints),
                             (_checkpoint_name(Path(cfg.teacher)), cfg.teacher)])
    is_folder = Path(cfg.teacher).is_dir()
    if not is_folder:
        _check_teacher_spec(cfg.teacher, modality, cfg.tokenizer)
    teacher = final.teacher if final else load_teacher(cfg.teacher, tokenizer=cfg.tokenizer,
                                                                  trust_model_code=cfg.trust_model_code) if is_folder else None
    tokenizer = teacher.tokenizer if teacher else _standalone_tokenizer(cfg.tokenizer)
    splits = [load_split(cfg.task, cfg.data, s, tokenizer=tokenizer, options=cfg.data_options) for s in cfg.splits]
    if teacher is None:
        if splits[0].kind == "classification" and not splits[0].label_names:
            raise KDCacheError(f"{splits[0].source}: split {splits[0].split!r} has no labels, so the head of "
                               f"architecture teacher {cfg.teacher} cannot be sized; pass --label-names")
        teacher = load_teacher(cfg.teacher, weights=cfg.weights, num_outputs=splits[0].num_labels,
                               tokenizer=cfg.tokenizer, trust_model_code=cfg.trust_model_code)
    teacher.model.to(device)
    tap = LayerTap(teacher.model, layers, what=f"teacher {teacher.spec}") if layers else None
    width, hidden_widths = _probe(teacher, tap, splits[0], device, cfg.precision)
    teacher.num_outputs = width
    if teacher.label_names is None and splits[0].kind == "classification":
        teacher.label_names = splits[0].label_names
    _check_splits(teacher, splits, width)
    for checkpoint in checkpoints:
        _check_same_architecture(checkpoint.teacher, teacher)
        checkpoint.teacher.model.to(device)
    projections = {key: torch.from_numpy(projection_matrix(cfg.proj_seed, key, w, cfg.proj_dim)).to(device)
                   for key, w in zip(layers, hidden_widths)}
    # further float arrays of every split, in the order the background writer receives them
    extras = {f"checkpoint_{k}": width for k in range(len(checkpoints))}
    extras.update({hidden.array_name(key): cfg.proj_dim for key in layers})

    # 2. The cache header: who the teacher is, what the task is, how it is stored, by what software.
    itemsize = np.dtype(cfg.dtype).itemsize
    chunk_rows = cfg.chunk_rows or fmt.default_chunk_rows(width, itemsize)
    attrs = {
        "teacher": teacher.describe(),
        "task": {"name": cfg.task, "kind": splits[0].kind, "modality": modality, "label_names": splits[0].label_names},
        "storage": {"logits_dtype": cfg.dtype, "codec": cfg.codec, "checksum": "crc32c", "chunk_rows": chunk_rows},
        "inference": {"device": str(device), "precision": cfg.precision, "batch_size": cfg.batch_size},
        "fingerprint_algorithm": FINGERPRINT_ALGORITHM,
        "digest_algorithm": DIGEST_ALGORITHM,
        "software": software_versions(),
        "command": cfg.command or command_line(),
        "created": utc_now(),
    }
    if checkpoints:
        attrs["checkpoints"] = [
            *({"name": c.name, "array": f"checkpoint_{k}", "epoch": c.epoch, "metric": c.metric, "spec": c.teacher.spec,
               "sha256": c.teacher.sha256} for k, c in enumerate(checkpoints)),
            {"name": _checkpoint_name(Path(teacher.spec)), "array": "logits", **_checkpoint_meta(Path(teacher.spec)),
             "spec": teacher.spec, "sha256": teacher.sha256},
        ]
    if layers:
        attrs["hidden_projections"] = {
            "layers": layers, "dim": cfg.proj_dim, "seed": cfg.proj_seed,
            "arrays": {str(key): hidden.array_name(key) for key in layers},
            "widths": {str(key): int(m.shape[0]) for key, m in projections.items()},
            "matrix": "float32 [width, dim] = standard_normal / sqrt(dim) from numpy default_rng(SeedSequence([seed, "
                      "first 8 bytes of sha256(str(layer)) as a little-endian integer])): kdcache.hidden.projection_matrix",
            "pooling": "Hugging Face layer l: first token of hidden_states[l]; [B,C,H,W]: spatial mean; [B,L,H]: "
                       "first token; [B,H]: as is (kdcache.hidden)",
            "teacher": "the trained teacher (array logits)",
        }
    settings = {  # what a resume must not change: anything that would change a stored byte
        "teacher_sha256": teacher.sha256, "task": cfg.task, "splits": list(cfg.splits), "precision": cfg.precision,
        "batch_size": cfg.batch_size,  # batch boundaries decide text padding, and so the last bits of a logit
        "storage": {"logits_dtype": cfg.dtype, "codec": cfg.codec, "chunk_rows": chunk_rows},
        "data": {s.split: {"source": s.source, "n": len(s), "preprocess": s.preprocess} for s in splits},
        **({"checkpoints_sha256": [c.teacher.sha256 for c in checkpoints]} if checkpoints else {}),
        **({"hidden": {"layers": [str(k) for k in layers], "dim": cfg.proj_dim, "seed": cfg.proj_seed}} if layers else {}),
    }
    writer = CacheWriter(cfg.out, attrs, overwrite=cfg.overwrite, resume=resuming, settings=settings)
    if modality == "text" and tokenizer is not None:
        blob, files = _tokenizer_zip(tokenizer)
        writer.add_blob("tokenizer", blob, {"format": "zip of save_pretrained files", "files": files,
                                            "class": type(tokenizer).__name__})

    # 3. One pass per split: the teacher computes, the background writer stores.
    throughput = {}
    with progress_bar(cfg.progress) as bar:
        for split in splits:
            sink = writer.add_split(split.split, rows=len(split), num_outputs=width, kind=split.kind,
                                    dtype=cfg.dtype, codec=cfg.codec, chunk_rows=chunk_rows, source=split.source,
                                    extras=extras)
            if sink.complete:  # finished before the interruption
                throughput[split.split] = {"rows": len(split), "resumed": "already complete"}
                continue
            # Restart at the batch boundary at or before rows_done, so every batch (and its padding) is the one
            # an uninterrupted run computes; rows already on disk are recomputed and dropped.
            first = sink.rows_done - sink.rows_done % cfg.batch_size
            if first and first == sink.rows_done:
                first -= cfg.batch_size  # recompute one stored batch anyway: its fingerprints must match
            sink.skip(sink.rows_done - first)
            if sink.rows_done:
                log.info("resuming split %r at row %d of %d (rows 0-%d are on disk; the teacher recomputes from row "
                         "%d, and those rows must match)", split.split, sink.rows_done, len(split), sink.rows_done - 1,
                         first)
            task_id = bar.add_task(f"{split.split}", total=len(split), completed=first, rate="")
            start, done = time.perf_counter(), 0
            with _on_interrupt(sink, split), BackgroundWriter(sink.write) as background, torch.inference_mode():
                for batch in _loader(split, cfg, device, start=first):
                    _check_labels(split, batch.labels, batch.index, width)
                    inputs = split.prepare(batch, device)
                    with autocast(device, cfg.precision):
                        if tap is None:
                            logits, pooled = teacher(inputs), []
                        else:
                            logits, pooled = tap(inputs)
                        more = [c.teacher(inputs).float() for c in checkpoints]
                    more += [p.float() @ projections[key] for key, p in zip(layers, pooled)]
                    background.put(logits.float(), batch.labels, batch.index, batch.fingerprint, *more)
                    done += len(batch.index)
                    bar.update(task_id, advance=len(batch.index),
                               rate=f"{done / max(time.perf_counter() - start, 1e-9):,.0f} rows/s")
            seconds = time.perf_counter() - start
            digest = sink.close(_dataset_attrs(split))
            throughput[split.split] = {"rows": len(split) - first, "seconds": round(seconds, 3),
                                       "rows_per_second": round((len(split) - first) / max(seconds, 1e-9), 1),
                                       "digest": digest, **({"resumed_at_row": first} if writer.resumed else {})}
    writer.finalize({"throughput": throughput, **({"resumed": utc_now()} if writer.resumed else {})})
    return Path(cfg.out)


@contextlib.contextmanager
def _on_interrupt(sink: Any, split: SplitData):
    """Ctrl-C says how far the split got (every row before rows_done is on disk) and how to continue."""
    try:
        yield
    except KeyboardInterrupt:
        raise Interrupted(f"interrupted after row {sink.rows_done} of {len(split)} of split {split.split!r} (rows "
                          f"0-{max(sink.rows_done - 1, 0)} are on disk); rerun the same command to continue") from None


def _bad(flag: str, value: str, choices: tuple[str, ...]) -> None:
    raise KDCacheError(f"{flag} {value!r} is not one of {', '.join(choices)}")


def _check_teacher_spec(spec: str, modality: str, tokenizer: str | None) -> None:
    """A teacher that is not a folder must be an architecture name; say so before the data is read."""
    if "/" in spec or spec.startswith(".") or Path(spec).exists():
        load_teacher(spec)  # raises the precise error: no such folder, or a file where a folder belongs
    if modality == "text" and tokenizer is None:
        raise KDCacheError(f"{spec}: no such teacher folder; a text task needs a Hugging Face model folder "
                           "(or an architecture name with --weights and --tokenizer DIR)")


def _standalone_tokenizer(name: str | None) -> Any:
    if name is None:
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name, local_files_only=True)
    except Exception as exc:  # noqa: BLE001
        raise KDCacheError(f"{name}: cannot load the tokenizer ({exc})".splitlines()[0]) from exc


def _expand_checkpoints(patterns: tuple[str, ...]) -> list[Path]:
    """Folders named by `--checkpoints` (paths or glob patterns), each pattern sorted, duplicates dropped."""
    found: list[Path] = []
    for pattern in patterns:
        matches = [Path(p) for p in sorted(glob.glob(pattern))] if glob.has_magic(pattern) else [Path(pattern)]
        if not matches or not all(m.exists() for m in matches):
            raise KDCacheError(f"--checkpoints {pattern!r}: matches no folder")
        found += [m for m in matches if m.resolve() not in {f.resolve() for f in found}]
    return found


def _checkpoint_name(path: Path) -> str:
    return path.name or str(path)


def _checkpoint_meta(path: Path) -> dict[str, Any]:
    """Epoch and validation metric of a checkpoint folder: from its kdcache-checkpoint.json (written by
    `train --save-every`), else the epoch is the last number in the folder's name (epoch-12, checkpoint-3000)."""
    meta: dict[str, Any] = {"epoch": None, "metric": None}
    if not path.is_dir():  # an architecture-name teacher: nothing recorded, and its name is no epoch
        return meta
    marker = path / CHECKPOINT_FILE
    if marker.is_file():
        try:
            recorded = json.loads(marker.read_text())
        except (OSError, ValueError) as exc:
            raise KDCacheError(f"{marker}: unreadable checkpoint description ({exc})") from exc
        meta.update({k: recorded.get(k) for k in ("epoch", "metric")})
    if meta["epoch"] is None:
        numbers = re.findall(r"\d+", path.name)
        meta["epoch"] = int(numbers[-1]) if numbers else None
    return meta


def _load_checkpoints(folders: list[Path], tokenizer: str | None, trust_model_code: bool) -> list[_Checkpoint]:
    """Load every checkpoint and put them in training order: by epoch when every one has an epoch, else as given."""
    loaded = []
    for folder in folders:
        if not folder.is_dir():
            raise KDCacheError(f"{folder}: a checkpoint must be a model folder")
        meta = _checkpoint_meta(folder)
        loaded.append(_Checkpoint(load_teacher(str(folder), tokenizer=tokenizer, trust_model_code=trust_model_code),
                                  _checkpoint_name(folder),
                                  meta["epoch"], meta["metric"]))
    if loaded and all(c.epoch is not None for c in loaded):
        loaded.sort(key=lambda c: c.epoch)
    return loaded


def _check_unique_names(named: list[tuple[str, str]]) -> None:
    """(name, folder) pairs: two folders with one name would make `--checkpoint NAME` ambiguous."""
    seen: dict[str, str] = {}
    for name, spec in named:
        if name in seen:
            raise KDCacheError(f"checkpoints {seen[name]} and {spec} share the name {name!r}; "
                               "--checkpoint NAME could not tell them apart (rename one folder)")
        seen[name] = spec


def _check_same_architecture(checkpoint: Teacher, teacher: Teacher) -> None:
    """Checkpoints of one training run share the teacher's architecture: same class, same tensor names and shapes."""
    mine = {k: tuple(v.shape) for k, v in checkpoint.model.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in teacher.model.state_dict().items()}
    if type(checkpoint.model) is not type(teacher.model) or mine != theirs:
        differ = next((k for k in sorted(set(mine) | set(theirs)) if mine.get(k) != theirs.get(k)), None)
        detail = (f"{type(checkpoint.model).__name__} vs {type(teacher.model).__name__}"
                  if type(checkpoint.model) is not type(teacher.model)
                  else f"{differ}: {mine.get(differ, 'absent')} vs {theirs.get(differ, 'absent')}")
        raise KDCacheError(f"{checkpoint.spec}: checkpoint has another architecture than teacher {teacher.spec} "
                           f"({detail}); checkpoints must come from one training run")


def _probe(teacher: Teacher, tap: LayerTap | None, split: SplitData, device: torch.device,
           precision: str) -> tuple[int, list[int]]:
    """One forward pass on two rows: proves the teacher runs on this data and measures its output width (and,
    through `tap`, the widths of the pooled hidden layers to project)."""
    batch = split.collate([split.dataset[i] for i in range(min(2, len(split)))]) if len(split) else None
    if batch is None:
        raise KDCacheError(f"{split.source}: split {split.split!r} has no rows")
    try:
        with torch.inference_mode(), autocast(device, precision):
            inputs = split.prepare(batch, device)
            logits, pooled = tap(inputs) if tap is not None else (teacher(inputs), [])
    except KDCacheError:
        raise
    except Exception as exc:  # noqa: BLE001 - any model error on this input is a user-facing mismatch
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise KDCacheError(f"teacher {teacher.spec} cannot run on {split.source}: {message}") from exc
    if logits.ndim != 2:
        raise KDCacheError(f"teacher {teacher.spec} returned shape {tuple(logits.shape)}; expected [batch, outputs]")
    return int(logits.shape[1]), [int(p.shape[1]) for p in pooled]


def _dataset_attrs(split: SplitData) -> dict[str, Any]:
    return {"task": split.task, "source": split.source, "split": split.split, "n": len(split),
            "modality": split.modality, "label_names": split.label_names, "preprocess": split.preprocess}


__all__ = ["CacheTeacherConfig", "cache_teacher"]
