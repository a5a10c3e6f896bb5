"""Recipe: run a teacher once over a dataset and store what it said about every sample.

    kdcache cache-teacher --teacher models/bert-sst2 --data ../shared/data/glue/SST-2 --task sst2 \
        --split train --split validation --out sst2.kdcache
    kdcache cache-teacher --teacher resnet110 --weights r110.pt --task cifar10 --data cifar-10-batches-py \
        --split train --split test --out s3://bucket/c10.kdcache --storage-option endpoint_url=http://127.0.0.1:8333

Features, and the flags that control them:
- teachers: Hugging Face folder, kdcache model folder, or architecture name + `--weights` state dict;
- data: GLUE presets, `text` with column flags, CIFAR pickles, image folders (or their zip), bundled digits;
- inference in eval mode under `torch.inference_mode`, batched (`--batch-size`), on `--device auto`, optionally
  under bf16/fp16 autocast (`--precision`);
- storage: a folder or an fsspec URL (`--out s3://...`, `--storage-option`); logits as float16 or float32
  (`--dtype`), codec and chunk size (`--codec`, `--chunk-rows`), written on a background thread;
- safety: everything is validated (data, teacher width, a first forward pass) before the first byte is written;
  `complete: true` is the last write; an existing location is refused unless `--overwrite`; one writer per cache
  (a lock that dies with its process, or a lease on an object store);
- resume: an interrupted cache at `--out` is finished, not restarted, when it was begun with the same teacher,
  data and storage settings (`--resume` insists on it), from the same batch boundaries, byte-identical;
- teacher checkpoints (Pro-KD): `--checkpoints 'run/checkpoints/epoch-*'` stores every checkpoint's logits too,
  in training order (`checkpoint_0`, ...); the last one is the trained teacher, stored as `logits`;
- sparse targets (format version 2): `--topk K` stores the K largest raw logits per row (`topk_values`), their ids
  (`topk_indices`) and the log-sum-exp over all outputs at T = 1 and each `--lse-temperatures` value (default: 1
  and every temperature the methods' presets use), so kept probabilities and tail mass are exact at those T;
  `--sample-tokens N [--sample-temperature T] [--sample-seed S]` stores RS-KD targets (unique ids of N draws from
  softmax(z/T), their counts and log-probs), drawn per row from (seed, row) so a resume or torchrun capture draws
  the same; K >= C stores dense logits (refused by `--no-dense-fallback`); each split records the kept mass and KL
  measured on its first rows (`target_quality`);
- augmented views (images): `--views V --augment cifar|imagenet[+mixup|+cutmix] [--view-seed S]` stores, beside
  the plain image's target, the teacher's target on V augmented views of every row (`view_<array>` [N, V, ...])
  and each view's explicit parameters (`view_params` [N, V, P]: crop offsets or box, flip, a mixing view's partner
  row and weight), drawn per row from (seed, row) so a resume or torchrun capture draws the same;
  `kdcache.replay_view` rebuilds the exact input the teacher saw;
- hidden-state projections (curriculum extraction): `--hidden-layers 2,4,6 --proj-dim D --proj-seed S` stores,
  per chosen teacher layer, its pooled representation times a fixed Gaussian matrix (`hidden_<layer>`); with
  `--task lm`, every position's state times that matrix, [N, S, D], and `--checkpoints` stores each checkpoint's
  dense logits per token, [N, S, C];
- several processes (torchrun): each runs the teacher on its own share of each split's chunks and writes them
  whole; rank 0 holds the lock, writes the attributes and, once every rank has finished, `complete`; the cache is
  byte-identical to one process's, and a kill of any rank resumes with any number of processes:

    torchrun --standalone --nproc-per-node 4 $(which kdcache) cache-teacher --teacher resnet110 ... --out c10.kdcache
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from kdcache.cache import codecs, schema, targets
from kdcache.cache.schema import (CheckpointEntry, DatasetInfo, Projections, RootHeader, StorageInfo, TaskInfo,
                                  TokenInfo, ViewInfo)
from kdcache.cache.store import CacheStore
from kdcache.cache.targets import QualitySum, TargetSpec
from kdcache.cache.writer import BackgroundWriter, CacheWriter, SplitWriter, check_destination, join_capture
from kdcache.data import augment as views_augment
from kdcache.data import DataOptions, SplitData, check_distinct_splits, load_split, modality_of
from kdcache.data.checks import check_batch_labels, check_splits_against_teacher
from kdcache.data.text import tokenizer_zip
from kdcache import names
from kdcache.errors import Interrupted, KDCacheError
from kdcache.fingerprint import DIGEST_ALGORITHM, FINGERPRINT_ALGORITHM
from kdcache.models import hidden
from kdcache.models.checkpoints import (TeacherCheckpoint, check_same_architecture, check_unique_names,
                                        checkpoint_meta, checkpoint_name, expand_checkpoints, load_checkpoints)
from kdcache.models.teachers import (Teacher, check_teacher_spec, load_teacher, probe_teacher,
                                     standalone_tokenizer)
from kdcache.progress import progress_bar
from kdcache.runtime import autocast, command_line, resolve_device, software_versions, utc_now
from kdcache.train.dist import World, close_world, init_world

log = logging.getLogger("kdcache")


@dataclass
class CacheTeacherConfig:
    """Everything `cache-teacher` needs; the CLI fills it from flags, scripts build it directly."""

    teacher: str | None
    task: str
    out: str | Path  # a path or an fsspec URL
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
    codec: str = codecs.DEFAULT_CODEC
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
    storage_options: dict[str, Any] = field(default_factory=dict)  # for an fsspec URL --out
    topk: int | None = None  # store the top K logits, their ids and the log-sum-exps (format version 2)
    lse_temperatures: tuple[float, ...] | None = None  # with topk; None: 1 and the presets' temperatures
    dense_fallback: bool = True  # K >= the teacher's outputs stores dense logits (False: refused)
    sample_tokens: int | None = None  # RS-KD: N draws per row, stored as unique ids, counts and log-probs
    sample_temperature: float = 1.0
    sample_seed: int = 0
    views: int | None = None  # images: the teacher's target on V augmented views of every row too
    augment: str | None = None  # with views: cifar | imagenet (kdcache.data.augment)
    view_seed: int = 0  # the views' parameters are drawn per row from (view_seed, row)


@dataclass
class _Job:
    """The teacher, its checkpoints and projections, and the data: everything checked before the first write."""

    teacher: Teacher
    splits: list[SplitData]
    width: int
    checkpoints: list[TeacherCheckpoint]
    layers: list
    tap: Any
    projections: dict[Any, torch.Tensor]
    target: TargetSpec
    tokens: TokenInfo | None = None  # --task lm: the token axis the root records
    tokenizer_blob: tuple[bytes, list[str]] | None = None  # a text teacher's tokenizer, zipped (stored in the cache)
    views: ViewInfo | None = None  # --views: the view axis the root records


def cache_teacher(cfg: CacheTeacherConfig) -> str | Path:
    """Run the recipe; returns the cache location. Raises KDCacheError on any bad input, before writing if it can.

    One process, or several under torchrun (WORLD_SIZE > 1) sharing the work: the same recipe and the same bytes."""
    world, device_name = init_world(cfg.device)
    try:
        return _capture(cfg, world, device_name)
    finally:
        close_world(world)


def _capture(cfg: CacheTeacherConfig, world: World, device_name: str) -> str | Path:
    """The recipe, for one process or several. The process of rank 0 holds the lock, checks the destination and
    creates every array; each process runs the teacher over its share of each split's chunks that no one has
    recorded yet (all of them in a fresh capture) and records each chunk it writes; rank 0 closes each split from
    the records once every process is done, and writes `complete` last. With one process every agreement below is
    a plain call. A refusal anywhere is one line for every rank (`World.agree`, `World.all_ok`), naming the rank
    when it is not rank 0's."""
    layers = world.agree(lambda: _check_flags(cfg))
    checkpoint_dirs = world.agree(lambda: expand_checkpoints(cfg.checkpoints))
    device = resolve_device(device_name)
    world.agree(lambda: CacheStore(cfg.out, cfg.storage_options) and None)  # a bad URL: one line, from rank 0
    store = CacheStore(cfg.out, cfg.storage_options)
    with contextlib.ExitStack() as held:
        lock = None

        def take() -> bool:
            nonlocal lock
            lock = held.enter_context(store.lock())  # rank 0's, released however it ends: it alone writes attributes
            return check_destination(store, cfg.overwrite, cfg.resume)

        resuming = world.agree(take)
        job = world.all_ok(lambda: _prepare(cfg, device, checkpoint_dirs, layers))
        chunk_rows = cfg.chunk_rows or schema.default_chunk_rows(job.target.row_bytes, 1,
                                                                 1 if job.target.positions else schema.MIN_CHUNK_ROWS)
        extras = {f"checkpoint_{k}": job.width for k in range(len(job.checkpoints))}
        extras.update({hidden.array_name(key): cfg.proj_dim for key in job.layers})
        specs = {s.split: schema.split_arrays(job.width, s.kind, cfg.dtype, extras, job.target, cfg.codec)
                 for s in job.splits}
        sinks: dict[str, SplitWriter] = {}
        writer: CacheWriter | None = None

        def create() -> tuple[str | None, dict[str, list[int] | None], bool]:
            nonlocal writer
            # each rank on its own cuda:LOCAL_RANK: the header names the kind, as one process on `cuda` records it
            header = _header(cfg, job, torch.device(device.type) if world.distributed else device, chunk_rows)
            writer = CacheWriter(store, header, overwrite=cfg.overwrite, resume=resuming, lock=lock)
            if job.tokenizer_blob is not None:
                blob, files = job.tokenizer_blob
                writer.add_blob(schema.TOKENIZER_ARRAY, blob, {"format": "zip of save_pretrained files",
                                                               "files": files,
                                                               "class": type(job.teacher.tokenizer).__name__})
            for split in job.splits:
                sinks[split.split] = writer.add_split(split.split, specs[split.split], rows=len(split),
                                                      codec=cfg.codec, chunk_rows=chunk_rows, source=split.source)
            pending = {name: None if sink.complete else sink.pending_chunks() for name, sink in sinks.items()}
            created = (store.read_json("zarr.json") or {}).get("attributes", {}).get("created")
            return created, pending, writer.resumed

        created, pending, resumed = world.agree(create)

        def join() -> None:  # every rank sees the cache rank 0 created, and may write there
            root = join_capture(store, created)
            for split in job.splits:
                if not world.main:
                    sinks[split.split] = SplitWriter.join(root, store, split.split, specs[split.split],
                                                          rows=len(split), chunk_rows=chunk_rows, source=split.source)

        world.all_ok(join)
        throughput = {}
        with progress_bar(cfg.progress and world.main) as bar:
            for split in job.splits:
                sink, todo = sinks[split.split], pending[split.split]
                if todo is None:  # finished before the interruption
                    throughput[split.split] = {"rows": len(split), "resumed": "already complete"}
                    continue
                throughput[split.split] = _capture_split(cfg, job, split, sink, todo, world, bar, device, resumed)
        world.agree(lambda: writer.finalize({"throughput": throughput, **({"resumed": utc_now()} if resumed else {})}))
    return cfg.out


def _chunk_share(chunks: list[int], world: World) -> list[int]:
    """This rank's contiguous share of the chunks still to write (all of a split's chunks in a fresh capture), in
    chunk order: decided from the list and the world's size alone, so every rank agrees without talking."""
    bounds = np.linspace(0, len(chunks), world.size + 1).round().astype(int)
    return chunks[bounds[world.rank]:bounds[world.rank + 1]]


def _runs(chunks: list[int]) -> Iterator[tuple[int, int]]:
    """Consecutive chunks as [first, last + 1) runs."""
    begin = None
    for k, chunk in enumerate(chunks):
        if begin is None:
            begin = chunk
        if k + 1 == len(chunks) or chunks[k + 1] != chunk + 1:
            yield begin, chunk + 1
            begin = None


def _capture_split(cfg: CacheTeacherConfig, job: _Job, split: SplitData, sink: SplitWriter, todo: list[int],
                   world: World, bar: Any, device: torch.device, resumed: bool) -> dict[str, Any]:
    """One split's chunks not yet recorded (`todo`), shared among the processes, then the split closed from the
    records by rank 0; its throughput entry for the root attributes."""
    mine = _chunk_share(todo, world)
    done = set(range(sink.chunk_count)) - set(todo)
    if done and world.main:
        log.info("%s", _resuming(split, sink, done, cfg.batch_size))
    start, quality = time.perf_counter(), QualitySum()
    rows = world.all_ok(lambda: _capture_chunks(cfg, job, split, sink, mine, done, bar, device, quality,
                                                not world.distributed))
    seconds = time.perf_counter() - start
    counts = world.gather((rows, seconds, quality))
    dataset = DatasetInfo(split.task, split.source, split.split, len(split), split.modality, split.label_names,
                          split.preprocess)
    measured = functools.reduce(QualitySum.merge, (part for _, _, part in counts), QualitySum())
    digest = world.agree(lambda: sink.close(dataset, _quality_attrs(job, measured)))
    computed, seconds = sum(r for r, _, _ in counts), max(t for _, t, _ in counts)
    return {"rows": computed, "seconds": round(seconds, 3), "rows_per_second": round(computed / max(seconds, 1e-9), 1),
            "digest": digest, **({"resumed_at_chunks_stored": len(done)} if resumed else {}), "processes": world.size}


def _capture_chunks(cfg: CacheTeacherConfig, job: _Job, split: SplitData, sink: SplitWriter, chunks: list[int],
                    stored: set[int], bar: Any, device: torch.device, quality: QualitySum, alone: bool) -> int:
    """The teacher over this rank's chunks of one split, a run of consecutive chunks at a time; returns the rows
    written. Every batch is the one a single process computes (batches start at multiples of the batch size, which
    decide text padding and so the last bits of a logit): a run starts computing at the batch boundary at or before
    its first row and ends at the one at or after its last, and the rows beyond the run are dropped; those that are
    already stored (`stored` chunks: a resume) are compared with the stored ones first, and a run that follows a
    stored chunk recomputes at least one stored batch. `alone`: no other process writes this split."""
    rows, size, batch = sink.rows, sink.chunk_rows, cfg.batch_size
    written = sum(min(rows, (k + 1) * size) - k * size for k in chunks)
    task_id = bar.add_task(f"{split.split}", total=written, rate="")
    start_time, done = time.perf_counter(), 0
    for first_chunk, end_chunk in _runs(chunks):
        start, end = first_chunk * size, min(rows, end_chunk * size)
        begin = start - start % batch
        if begin == start and start and first_chunk - 1 in stored:
            begin -= batch  # recompute one stored batch anyway: its fingerprints must match
        stop = min(rows, -(-end // batch) * batch)
        before = all(k in stored for k in range(begin // size, first_chunk))
        after = all(k in stored for k in range(end_chunk, -(-stop // size)))
        sink.seek(start, end, begin, compare_before=before, compare_after=after)
        with _on_interrupt(sink, split, stored, alone), BackgroundWriter(sink.write) as background, \
                torch.inference_mode():
            for batch_rows in _loader(split, cfg, device, start=begin, stop=stop):
                background.put(_teacher_outputs(job, split, batch_rows, cfg, device, begin, quality))
                kept = min(end, begin + len(batch_rows.index)) - max(start, begin)
                begin += len(batch_rows.index)
                done += max(kept, 0)
                bar.update(task_id, advance=max(kept, 0),
                           rate=f"{done / max(time.perf_counter() - start_time, 1e-9):,.0f} rows/s")
    return written


def _check_flags(cfg: CacheTeacherConfig) -> list:
    """Flags that are wrong on their own, in a second; returns the hidden layers to project."""
    if cfg.batch_size < 1:
        raise KDCacheError(f"--batch-size must be at least 1, got {cfg.batch_size}")
    if cfg.dtype not in schema.LOGIT_DTYPES:
        raise KDCacheError(f"--dtype {cfg.dtype!r} is not one of {', '.join(schema.LOGIT_DTYPES)}")
    if cfg.codec not in codecs.CODECS:
        raise KDCacheError(f"--codec {cfg.codec!r} is not one of {', '.join(codecs.CODECS)}")
    if not cfg.splits:
        raise KDCacheError("no --split given")
    if not cfg.teacher and not cfg.checkpoints:
        raise KDCacheError("no --teacher given (or --checkpoints, whose last checkpoint is then the teacher)")
    layers = hidden.parse_layers(cfg.hidden_layers)
    if layers and all(isinstance(k, int) for k in layers):
        layers = sorted(layers)  # numbered layers are stored (and later fitted) shallow to deep, however given
    if layers and (cfg.proj_dim is None or cfg.proj_dim < 1):
        raise KDCacheError("--hidden-layers needs --proj-dim D (D >= 1), the width of the random projections")
    if cfg.proj_dim is not None and not layers:
        raise KDCacheError("--proj-dim given without --hidden-layers")
    _check_target_flags(cfg)
    modality = modality_of(cfg.task)  # an unknown task is one line before anything loads
    _check_view_flags(cfg, modality, layers)
    if cfg.task == "lm":
        opts = cfg.data_options
        given = [flag for flag, value in (("--limit", opts.limit), ("--subset", opts.subset),
                                          ("--holdout", opts.holdout)) if value]
        if given:
            raise KDCacheError(f"--task lm does not take {', '.join(given)} yet: it caches whole token streams (put "
                               "each split in its own file: train.txt, validation.txt)")
        if opts.seq_len is None:
            raise KDCacheError("--task lm needs --seq-len S, the tokens per row (at most the teacher's positions)")
    elif cfg.data_options.seq_len is not None:
        raise KDCacheError(f"--seq-len applies to --task lm, not {cfg.task!r} (text tasks take --max-length)")
    return layers


def _check_view_flags(cfg: CacheTeacherConfig, modality: str, layers: list) -> None:
    """--views and --augment, which go together and apply to images only."""
    if cfg.views is None and cfg.augment in (None, "none"):
        if cfg.view_seed != 0:
            raise KDCacheError("--view-seed needs --views V")
        return
    if cfg.views is None or cfg.augment in (None, "none"):
        raise KDCacheError("--views V and --augment cifar|imagenet go together: the teacher's targets on V "
                           "augmented views of every image")
    views_augment.check_view_augment(cfg.augment, modality)  # an unknown name, or inputs that are not images
    names.check_numbers(views=cfg.views, view_seed=cfg.view_seed)  # the CLI's ranges, for the Python API too
    if cfg.checkpoints or layers:
        raise KDCacheError("--views stores the trained teacher's target per view; --checkpoints and "
                           "--hidden-layers are not stored per view (cache them without --views)")


def _check_target_flags(cfg: CacheTeacherConfig) -> None:
    """The sparse-target flags that are wrong on their own (those that need the teacher's width: `_target`)."""
    if cfg.topk is not None and cfg.sample_tokens is not None:
        raise KDCacheError("--topk and --sample-tokens are two target kinds; pass one")
    if cfg.topk is not None and cfg.topk <= 0:
        raise KDCacheError(f"--topk must be at least 1, got {cfg.topk}")
    if cfg.sample_tokens is not None and cfg.sample_tokens <= 0:
        raise KDCacheError(f"--sample-tokens must be at least 1, got {cfg.sample_tokens}")
    if not 0 < cfg.sample_temperature < math.inf:
        raise KDCacheError(f"--sample-temperature must be positive and finite, got {cfg.sample_temperature}")
    if not 0 <= cfg.sample_seed <= 2**32 - 1:
        raise KDCacheError(f"--sample-seed must be 0 or more and at most {2**32 - 1:,}, got {cfg.sample_seed}")
    if cfg.sample_tokens is None and (cfg.sample_temperature != 1.0 or cfg.sample_seed != 0):
        raise KDCacheError("--sample-temperature and --sample-seed need --sample-tokens N")
    if cfg.lse_temperatures is not None:
        if cfg.topk is None:
            raise KDCacheError("--lse-temperatures needs --topk K (a dense cache is exact at every temperature)")
        if not cfg.lse_temperatures or not all(0 < t < math.inf for t in cfg.lse_temperatures):
            raise KDCacheError(f"--lse-temperatures must be positive finite numbers, got {list(cfg.lse_temperatures)}")
    if not cfg.dense_fallback and cfg.topk is None:
        raise KDCacheError("--no-dense-fallback needs --topk K")


def _target(cfg: CacheTeacherConfig, outputs: int, kind: str) -> TargetSpec:
    """The target this capture stores, now that the teacher's width and the task's kind are known."""
    if kind == "lm":  # the same kinds at every position of a window
        if cfg.topk is not None and cfg.topk >= outputs:
            raise KDCacheError(f"--topk {cfg.topk} is not below the teacher's {outputs} outputs (its vocabulary); "
                               f"choose K < {outputs}, or drop --topk to store dense logits per token")
        # the log-sum-exp at T = 1 alone by default: 20 more a token would cost more than the top-k itself
        # (docs/benchmarks.md), and no per-token method reads another T yet
        per_row = dataclasses.replace(cfg, lse_temperatures=cfg.lse_temperatures or (1.0,))
        return _target(per_row, outputs, "classification").per_token(int(cfg.data_options.seq_len or 0))
    if cfg.sample_tokens is not None:
        if kind != "classification":
            raise KDCacheError(f"--sample-tokens draws classes from the teacher's softmax; task {cfg.task!r} is "
                               f"{kind} (store its dense outputs: drop --sample-tokens)")
        return TargetSpec.sampled(outputs, cfg.sample_tokens, cfg.sample_temperature, cfg.sample_seed)
    if cfg.topk is None:
        return TargetSpec.dense(outputs, cfg.dtype)
    if cfg.topk >= outputs:
        if not cfg.dense_fallback:
            raise KDCacheError(f"--topk {cfg.topk} keeps every one of the teacher's {outputs} outputs, and "
                               "--no-dense-fallback refuses dense logits; choose K below the teacher's outputs")
        log.warning("--topk %d is not below the teacher's %d outputs: storing dense logits (exact at every "
                    "temperature)", cfg.topk, outputs)
        return TargetSpec.dense(outputs, cfg.dtype)
    if kind != "classification":
        raise KDCacheError(f"--topk on task {cfg.task!r}, which is {kind}: its outputs are values, not logits")
    temps = list(cfg.lse_temperatures) if cfg.lse_temperatures is not None else default_lse_temperatures()
    return TargetSpec.topk(outputs, cfg.topk, cfg.dtype, [1.0, *(float(t) for t in temps if float(t) != 1.0)])


def default_lse_temperatures() -> list[float]:
    """T = 1 and every temperature a method preset uses (Vanilla's T; 1..T_max of Continuation and Annealing, whose
    schedules step T down from T_max in integers): a top-k cache is exact for every preset's schedule."""
    from kdcache.methods.registry import METHODS

    return targets.default_temperatures({name: cls.defaults for name, cls in METHODS.items()})


def _prepare(cfg: CacheTeacherConfig, device: torch.device, checkpoint_dirs: list[Path], layers: list) -> _Job:
    checkpoints = load_checkpoints(checkpoint_dirs, cfg.tokenizer, cfg.trust_model_code, causal_lm=cfg.task == "lm")
    final = None
    if not cfg.teacher:  # the last checkpoint in training order is the trained teacher (already loaded)
        final = checkpoints.pop()
        cfg = dataclasses.replace(cfg, teacher=final.teacher.spec)
    checkpoints = [c for c in checkpoints if Path(c.teacher.spec).resolve() != Path(cfg.teacher).resolve()]
    if checkpoints:  # every name, the teacher's included, must pick one array for --checkpoint NAME
        check_unique_names([*((c.name, c.teacher.spec) for c in checkpoints),
                            (checkpoint_name(Path(cfg.teacher)), cfg.teacher)])
    is_folder, lm = Path(cfg.teacher).is_dir(), cfg.task == "lm"
    if not is_folder and not lm:
        check_teacher_spec(cfg.teacher, modality_of(cfg.task), cfg.tokenizer)
    teacher = final.teacher if final else load_teacher(
        cfg.teacher, tokenizer=cfg.tokenizer, trust_model_code=cfg.trust_model_code,
        causal_lm=lm) if is_folder or lm else None
    if lm:
        _check_lm_teacher(teacher, int(cfg.data_options.seq_len or 0))
    tokenizer = teacher.tokenizer if teacher else standalone_tokenizer(cfg.tokenizer, cfg.trust_model_code)
    splits = [load_split(cfg.task, cfg.data, s, tokenizer=tokenizer, options=cfg.data_options) for s in cfg.splits]
    check_distinct_splits(splits)
    if teacher is None:
        if splits[0].kind == "classification" and not splits[0].label_names:
            raise KDCacheError(f"{splits[0].source}: split {splits[0].split!r} has no labels, so the head of "
                               f"architecture teacher {cfg.teacher} cannot be sized; pass --label-names")
        teacher = load_teacher(cfg.teacher, weights=cfg.weights, num_outputs=splits[0].num_labels,
                               tokenizer=cfg.tokenizer, trust_model_code=cfg.trust_model_code)
    teacher.model.to(device)
    tap = hidden.LayerTap(teacher.model, layers, what=f"teacher {teacher.spec}", tokens=lm) if layers else None
    first = splits[0]
    if not len(first):
        raise KDCacheError(f"{first.source}: split {first.split!r} has no rows")
    with autocast(device, cfg.precision):
        probe = first.prepare(first.collate([first.dataset[i] for i in range(min(2, len(first)))]), device)
        width, hidden_widths = probe_teacher(teacher, tap, probe, first.source, tokens=lm)
    teacher.num_outputs = width
    if teacher.label_names is None and first.kind == "classification":
        teacher.label_names = first.label_names
    check_splits_against_teacher(teacher.spec, splits, width)
    for checkpoint in checkpoints:
        check_same_architecture(checkpoint.teacher, teacher)
        checkpoint.teacher.model.to(device)
    projections = {key: torch.from_numpy(hidden.projection_matrix(cfg.proj_seed, key, w, cfg.proj_dim)).to(device)
                   for key, w in zip(layers, hidden_widths)}
    blob = tokenizer_zip(teacher.tokenizer) if first.modality == "text" and teacher.tokenizer is not None else None
    tokens = None
    if lm:
        _check_vocabulary(teacher, width)
        _check_checkpoint_tokenizers(checkpoints, teacher, blob[0])
        tokens = TokenInfo(int(cfg.data_options.seq_len or 0), width, len(teacher.tokenizer),
                           int(teacher.tokenizer.eos_token_id), hashlib.sha256(blob[0]).hexdigest(),
                           type(teacher.tokenizer).__name__)
    target, views = _target(cfg, width, first.kind), None
    if cfg.views:
        layout = views_augment.LAYOUTS[cfg.augment]
        target = target.with_views(cfg.views, len(layout))
        views = ViewInfo(cfg.augment, views_augment.VERSIONS[cfg.augment], int(cfg.views), list(layout),
                         int(cfg.view_seed))
    return _Job(teacher, splits, width, checkpoints, layers, tap, projections, target, tokens, blob, views)


def _check_lm_teacher(teacher: Teacher, seq_len: int) -> None:
    """What a language-model capture needs of its teacher before any data is read: its tokenizer, and as many
    positions as a window has."""
    if teacher.tokenizer is None:
        raise KDCacheError(f"{teacher.spec}: no tokenizer in the teacher folder; pass --tokenizer DIR (the model's "
                           "own)")
    config = getattr(teacher.model, "config", None)
    positions = next((getattr(config, k) for k in ("n_positions", "max_position_embeddings", "n_ctx")
                      if isinstance(getattr(config, k, None), int)), None)
    if positions is not None and seq_len > positions:
        raise KDCacheError(f"--seq-len {seq_len} is beyond teacher {teacher.spec}'s {positions} positions; choose "
                           f"--seq-len {positions} or less")
    embeddings = teacher.model.get_input_embeddings()
    _check_vocabulary(teacher, getattr(embeddings, "num_embeddings", None))


def _check_checkpoint_tokenizers(checkpoints: list[TeacherCheckpoint], teacher: Teacher, blob: bytes) -> None:
    """A language model's checkpoint that holds a tokenizer must hold the teacher's: its logits index the same
    vocabulary as the cached windows' ids only then (a folder without one is read with the teacher's)."""
    digest = hashlib.sha256(blob).hexdigest()
    for checkpoint in checkpoints:
        tokenizer = checkpoint.teacher.tokenizer
        if tokenizer is not None and hashlib.sha256(tokenizer_zip(tokenizer)[0]).hexdigest() != digest:
            raise KDCacheError(f"{checkpoint.teacher.spec}: the checkpoint's tokenizer ({len(tokenizer)} tokens) is "
                               f"not teacher {teacher.spec}'s ({len(teacher.tokenizer)} tokens); checkpoints must "
                               "come from one training run")


def _check_vocabulary(teacher: Teacher, width: int | None) -> None:
    """Every token id of the tokenizer must be one the model reads and scores (a head may be wider: Qwen2.5's)."""
    vocab = len(teacher.tokenizer)
    if width is not None and vocab > width:
        raise KDCacheError(f"{teacher.spec}: the tokenizer has {vocab} tokens but the model only {width} outputs; "
                           "the tokenizer is not this model's")


def _header(cfg: CacheTeacherConfig, job: _Job, device: torch.device, chunk_rows: int) -> RootHeader:
    """The root attributes (schema.RootHeader), and in `write_settings` what a resume must find unchanged."""
    teacher, first = job.teacher, job.splits[0]
    header = RootHeader(
        teacher=teacher.describe(),
        task=TaskInfo(cfg.task, first.kind, first.modality, first.label_names), target=job.target, tokens=job.tokens,
        views=job.views,
        storage=StorageInfo(cfg.dtype, cfg.codec, "crc32c", chunk_rows),
        inference={"device": str(device), "precision": cfg.precision, "batch_size": cfg.batch_size},
        fingerprint_algorithm=FINGERPRINT_ALGORITHM, digest_algorithm=DIGEST_ALGORITHM,
        software=software_versions(), command=cfg.command or command_line(), created=utc_now())
    if job.checkpoints:
        header.checkpoints = [
            *(CheckpointEntry(c.name, f"checkpoint_{k}", c.epoch, c.metric, c.teacher.spec, c.teacher.sha256)
              for k, c in enumerate(job.checkpoints)),
            CheckpointEntry(checkpoint_name(Path(teacher.spec)), "logits", spec=teacher.spec, sha256=teacher.sha256,
                            **checkpoint_meta(Path(teacher.spec)))]
    if job.layers:
        header.hidden_projections = Projections(
            layers=job.layers, dim=cfg.proj_dim, seed=cfg.proj_seed,
            arrays={str(key): hidden.array_name(key) for key in job.layers},
            widths={str(key): int(m.shape[0]) for key, m in job.projections.items()},
            matrix=hidden.MATRIX_RULE, pooling=hidden.TOKEN_RULE if job.tokens is not None else hidden.POOLING_RULE,
            teacher="the trained teacher (array logits)")
    header.write_settings = {  # what a resume must not change: anything that would change a stored byte
        "teacher_sha256": teacher.sha256, "task": cfg.task, "splits": list(cfg.splits), "precision": cfg.precision,
        "batch_size": cfg.batch_size,  # batch boundaries decide text padding, and so the last bits of a logit
        "storage": {"logits_dtype": cfg.dtype, "codec": cfg.codec, "chunk_rows": chunk_rows},
        "target": job.target.to_attrs(),
        **({"tokens": job.tokens.to_attrs()} if job.tokens is not None else {}),
        **({"views": job.views.to_attrs()} if job.views is not None else {}),
        "data": {s.split: {"source": s.source, "n": len(s), "preprocess": s.preprocess} for s in job.splits},
        **({"checkpoints_sha256": [c.teacher.sha256 for c in job.checkpoints]} if job.checkpoints else {}),
        **({"hidden": {"layers": [str(k) for k in job.layers], "dim": cfg.proj_dim, "seed": cfg.proj_seed}}
           if job.layers else {}),
    }
    return header


def _quality_attrs(job: _Job, quality: QualitySum) -> dict[str, Any]:
    """The split attributes that record what a sparse target keeps (none for a dense one)."""
    record = quality.record(job.target)
    return {"target_quality": record} if record is not None else {}


def _teacher_outputs(job: _Job, split: SplitData, batch: Any, cfg: CacheTeacherConfig, device: torch.device,
                     first_row: int, quality: QualitySum) -> dict[str, Any]:
    """One batch through the teacher (and its checkpoints and projections): the arrays of its rows, whose first is
    row `first_row` of the split (a sampled target's draws depend on it); a sparse target is measured here."""
    check_batch_labels(split, batch.labels, batch.index, job.width)
    inputs = split.prepare(batch, device)
    with autocast(device, cfg.precision):
        logits, pooled = job.tap(inputs) if job.tap is not None else (job.teacher(inputs), [])
        arrays = {f"checkpoint_{k}": c.teacher(inputs).float() for k, c in enumerate(job.checkpoints)}
    arrays.update({hidden.array_name(key): p.float() @ job.projections[key] for key, p in zip(job.layers, pooled)})
    logits = logits.float()
    target = targets.target_arrays(job.target, logits, first_row)
    if job.target.positions:  # a window: positions past its length hold 0 and are measured nowhere
        valid = inputs["attention_mask"].bool()
        for values in (*target.values(), *arrays.values()):  # the checkpoints' logits and projections too
            values[~valid] = 0
        quality.add(job.target.per_row(), logits[valid], {k: v[valid] for k, v in target.items()},
                    first_row * job.target.positions)
        arrays.update(input_ids=batch.inputs["input_ids"], lengths=batch.inputs["attention_mask"].sum(dim=1))
    else:
        quality.add(job.target, logits, target, first_row)
    if job.views is not None:
        arrays.update(_view_outputs(job, split, batch, cfg, device, first_row))
    return {**target, "labels": batch.labels, "index": batch.index, "fingerprint": batch.fingerprint, **arrays}


def _view_outputs(job: _Job, split: SplitData, batch: Any, cfg: CacheTeacherConfig, device: torch.device,
                  first_row: int) -> dict[str, Any]:
    """The teacher's target arrays on every view of a batch (`view_<array>` [B, V, ...]) and the views' parameters:
    one forward pass per view, over the same rows as the plain batch."""
    images, views = batch.inputs, job.views
    rows, count = len(images), views.count
    params = views_augment.view_params(views.augment, count, views.seed, first_row, rows, images.shape[-2],
                                       images.shape[-1], len(split))
    column, outputs = views_augment.partner_column(views.augment), []
    for v in range(count):  # a mixing view decodes its partner rows here, in this process
        partners = views_augment.partner_images(split, params[:, v, column]) if column is not None else None
        with autocast(device, cfg.precision):
            outputs.append(job.teacher(views_augment.view_input(split, views.augment, images, params[:, v],
                                                                 device, partners)).float())
    logits = torch.stack(outputs, dim=1)  # B, V, C
    flat = targets.target_arrays(job.target, logits.reshape(rows * count, -1), first_row * count)
    return {**{schema.VIEW_PREFIX + k: v.reshape(rows, count, *v.shape[1:]) for k, v in flat.items()},
            schema.VIEW_PARAMS: params}


def _loader(split: SplitData, cfg: CacheTeacherConfig, device: torch.device, start: int = 0,
            stop: int | None = None) -> torch.utils.data.DataLoader:
    """Batches of rows `start:stop` only: a process decodes (images) and tokenises (text) no other rows."""
    workers = cfg.workers
    if workers is None:  # on a GPU, images decode and text tokenises in workers, beside the teacher's forward
        workers = min(8, os.cpu_count() or 1) if split.modality in ("image", "text") and device.type == "cuda" else 0
    stop = len(split) if stop is None else stop
    dataset = split.dataset if (start, stop) == (0, len(split)) else torch.utils.data.Subset(split.dataset,
                                                                                            range(start, stop))
    return torch.utils.data.DataLoader(dataset, batch_size=cfg.batch_size, shuffle=False, num_workers=workers,
                                       collate_fn=split.collate, pin_memory=device.type == "cuda")


def _stored_prefix(split: SplitData, sink: SplitWriter, stored: set[int]) -> int | None:
    """The rows stored when `stored` chunks are the split's first ones (what one process leaves), else None."""
    first_missing = next(k for k in range(sink.chunk_count + 1) if k not in stored)
    return min(len(split), first_missing * sink.chunk_rows) if stored == set(range(first_missing)) else None


def _resuming(split: SplitData, sink: SplitWriter, stored: set[int], batch_size: int) -> str:
    """The line a resume starts with: where the split continues, and which stored rows are recomputed to prove the
    data is the data the interrupted run read."""
    row = _stored_prefix(split, sink, stored)
    if row is None:
        return (f"resuming split {split.split!r}: {len(stored)} of {sink.chunk_count} chunks of {sink.chunk_rows} rows "
                "are stored; the teacher computes the others (and the stored rows of their first and last batches, "
                "which must match)")
    first = row - row % batch_size if row % batch_size else row - batch_size
    return (f"resuming split {split.split!r} at row {row} of {len(split)} (rows 0-{row - 1} are stored; the teacher "
            f"recomputes from row {first}, and those rows must match)")


@contextlib.contextmanager
def _on_interrupt(sink: SplitWriter, split: SplitData, stored: set[int], alone: bool) -> Iterator[None]:
    """Ctrl-C says how far the split got and how to continue (every recorded chunk is stored)."""
    try:
        yield
    except KeyboardInterrupt:
        row = _stored_prefix(split, sink, stored | set(sink.recorded)) if alone else None
        if row is None:
            raise Interrupted(f"interrupted in split {split.split!r} (the chunks finished so far are stored); rerun "
                              "the same command to continue") from None
        kept = f"rows 0-{row - 1} are stored" if row else "no rows are stored yet"
        raise Interrupted(f"interrupted after row {row} of {len(split)} of split {split.split!r} ({kept}); rerun the "
                          "same command to continue") from None


__all__ = ["CacheTeacherConfig", "cache_teacher"]
