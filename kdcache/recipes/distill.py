"""Recipe: train a student against a teacher cache (`kdcache distill`), or on labels alone (`kdcache train`).

    kdcache distill --cache sst2.kdcache --student bert-4layer.json --method continuation --epochs 30 --out runs/ckd
    kdcache train --model resnet20 --task cifar10 --data cifar-10-batches-py --epochs 200 --out runs/teacher

Features, and the flags that control them:
- methods (`--method`): continuation (default), vanilla, annealing, ce; their hyper-parameters (`--t-max`,
  `--margin`, `--psi`, `--reduction`, `--alpha`, `--temperature`, `--anneal-epochs`) default to `--preset`
  (`cifar`, `glue`, `small`, or `auto` by modality; kdcache/presets.py);
- curricula from one cache (kdcache/curricula.py): `prokd` follows the cached teacher checkpoints in training
  order, `curriculum` fits student layers to cached hidden-state projections before the logits (`--kd-loss`,
  `--phase-epochs`, `--layer-map`); `--checkpoint NAME` distils any other method from one cached checkpoint;
- the teacher is never loaded: logits stream from the cache (`kdcache.stream.LogitBatches`, in memory or chunk
  by chunk); the dataset named in the cache (or `--data`) is re-read and every row's fingerprint must match;
- schedules per epoch, or per step (`--schedule-unit step`) for runs of few epochs;
- evaluation every epoch on the validation split with the task's metric, best checkpoint kept in `best/`
  (a teacher folder: HF `save_pretrained` or a kdcache model folder), `metrics.jsonl` and `summary.json`;
- `--resume` continues from `last.pt`, written atomically after every epoch, with the same batches and
  schedules as an uninterrupted run; `--precision bf16|fp16` autocast; `--device auto`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdcache import curricula, losses, schedules
from kdcache.data import DataOptions, load_split, modality_of
from kdcache.errors import Interrupted, KDCacheError
from kdcache.presets import KD_LOSSES, METHODS, anneal_epochs, resolve
from kdcache.progress import progress_bar
from kdcache.reader import TeacherCache, load_cache_tokenizer, open_cache, read_cache_attrs
from kdcache.runtime import autocast, command_line, resolve_device, software_versions
from kdcache.stream import LogitBatches
from kdcache.students import build_student, save_student
from kdcache.teachers import CHECKPOINT_FILE
from kdcache.training import (LabelBatches, StudentInputs, build_lr_schedule, build_optimizer, check_alignment,
                              evaluate, load_checkpoint, rng_state, save_atomic, set_rng_state, write_error)
from kdcache.writer import utc_now

#: Fields of DistillConfig that do not change what a run computes: a resume may differ in these.
#: Paths are left out too: the cache and data are identified by their digests, so a moved run or cache resumes.
_NOT_IDENTITY = ("resume", "overwrite", "stop_after_epoch", "progress", "device", "command", "out", "cache", "data",
                 "trust_model_code")


@dataclass
class DistillConfig:
    """Everything `distill` and `train` need; None means "the preset's value" (see kdcache/presets.py)."""

    student: str
    out: Path
    cache: Path | None = None  # None: `kdcache train`, CE on the dataset's labels
    method: str = "continuation"
    data: str | None = None
    task: str | None = None  # train only (a cache names its own task)
    tokenizer: str | None = None  # train only, for text
    data_options: DataOptions = field(default_factory=DataOptions)  # train only
    val_split: str | None = None  # default: validation, else test, when present
    preset: str = "auto"
    epochs: int | None = None
    t_max: int | None = None
    margin: float | None = None
    psi: str | None = None
    reduction: str = "sample"
    alpha: float | None = None
    temperature: float | None = None
    anneal_epochs: int | None = None
    lr: float | None = None
    batch_size: int | None = None
    optimizer: str | None = None
    weight_decay: float | None = None
    momentum: float | None = None
    lr_schedule: str | None = None
    warmup_ratio: float | None = None
    max_grad_norm: float | None = None
    schedule_unit: str = "epoch"
    seed: int = 0
    precision: str = "fp32"
    device: str = "auto"
    student_kwargs: dict[str, Any] = field(default_factory=dict)
    save_every: int | None = None
    stream_mode: str = "auto"
    checkpoint: str | None = None  # distil from this cached teacher checkpoint instead of the trained teacher
    kd_loss: str | None = None  # prokd / curriculum's logits phase: vanilla (default) or continuation
    phase_epochs: str | None = None  # curriculum: epochs per projection phase ("5,5"); prokd: per checkpoint
    layer_map: str | None = None  # curriculum: teacher layer -> student layer, e.g. "2:1,4:2"
    resume: bool = False
    overwrite: bool = False
    stop_after_epoch: int | None = None
    progress: bool = True
    command: str | None = None
    trust_model_code: bool = False  # let a module:factory student (flag or model folder) import and run


@dataclass
class _Split:
    """One split as the loop sees it: inputs by row, labels, and (distill) the cache it is checked against."""

    name: str
    inputs: StudentInputs
    labels: np.ndarray
    cache: TeacherCache | None = None


def distill(cfg: DistillConfig) -> dict[str, Any]:
    """Run the recipe; returns the summary also written to RUN_DIR/summary.json."""
    device = resolve_device(cfg.device)
    out = Path(cfg.out)
    if cfg.method not in METHODS:
        raise KDCacheError(f"--method {cfg.method!r} is not one of {', '.join(METHODS)}")
    if cfg.schedule_unit not in ("epoch", "step"):
        raise KDCacheError(f"--schedule-unit {cfg.schedule_unit!r} is not one of epoch, step")
    if cfg.cache is None and cfg.method != "ce":
        raise KDCacheError(f"method {cfg.method!r} needs a teacher cache (--cache)")
    if cfg.kd_loss is not None and cfg.kd_loss not in KD_LOSSES:
        raise KDCacheError(f"--kd-loss {cfg.kd_loss!r} is not one of {', '.join(KD_LOSSES)}")
    if cfg.kd_loss is not None and cfg.method not in ("prokd", "curriculum"):
        raise KDCacheError(f"--kd-loss applies to --method prokd and curriculum, not {cfg.method}")
    if cfg.phase_epochs and cfg.method not in ("curriculum", "prokd"):
        raise KDCacheError("--phase-epochs applies to --method curriculum and prokd only")
    if cfg.layer_map and cfg.method != "curriculum":
        raise KDCacheError("--layer-map applies to --method curriculum only")
    if cfg.checkpoint is not None and cfg.method == "prokd":
        raise KDCacheError("--checkpoint picks one teacher checkpoint; --method prokd follows all of them in turn")
    if not cfg.resume and not cfg.overwrite and out.exists() and any(out.iterdir()):
        raise KDCacheError(f"{out}: already holds a run; pass --resume to continue it or --overwrite to replace it")

    # 1. Data: the cache's own dataset, re-read and checked row by row (or, for `train`, the dataset alone).
    task, kind, modality, label_names, train, val, tokenizer, teacher_attrs = _load_data(cfg, device)
    num_outputs = 1 if kind == "regression" else len(label_names or [])
    selection = val if val is not None else train
    if not _has_labels(selection.labels, kind):
        raise KDCacheError(f"split {selection.name!r} has no labels to select the best checkpoint on; "
                           "pass --val-split with a labelled split")
    if train.cache is not None:
        num_outputs = train.cache.num_outputs

    # 2. Hyper-parameters: preset, then flags; schedules validated before any work.
    preset, hp = resolve(cfg.preset, modality, {
        "epochs": cfg.epochs, "t_max": cfg.t_max, "margin": cfg.margin, "psi": cfg.psi, "alpha": cfg.alpha,
        "temperature": cfg.temperature, "lr": cfg.lr, "batch_size": cfg.batch_size, "optimizer": cfg.optimizer,
        "weight_decay": cfg.weight_decay, "momentum": cfg.momentum, "lr_schedule": cfg.lr_schedule,
        "warmup_ratio": cfg.warmup_ratio, "max_grad_norm": cfg.max_grad_norm})
    n = int(hp["epochs"])
    if n < 1 or int(hp["batch_size"]) < 1:
        raise KDCacheError("--epochs and --batch-size must be at least 1")
    schedules.parse_psi(hp["psi"])
    k_anneal = anneal_epochs(hp, n, cfg.anneal_epochs) if cfg.method == "annealing" else None
    hp["anneal_epochs"] = k_anneal
    kd_loss = (cfg.kd_loss or "vanilla") if cfg.method in ("prokd", "curriculum") else None
    if kd_loss:
        hp["kd_loss"] = kd_loss
    # Which cached teacher arrays the run reads: the trained teacher's logits, one chosen checkpoint, every
    # checkpoint in training order (prokd), or the projections and then the logits (curriculum, below).
    teacher_array = train.cache.checkpoint_array(cfg.checkpoint) if cfg.checkpoint and train.cache else "logits"
    checkpoints = train.cache.checkpoints if train.cache is not None else []
    if cfg.method == "prokd":
        arrays = curricula.prokd_arrays(checkpoints, str(cfg.cache))
    else:
        arrays = [teacher_array]

    # 3. Student, optimiser, batches.
    student = build_student(cfg.student, num_outputs, kwargs=cfg.student_kwargs, tokenizer=tokenizer, seed=cfg.seed,
                            trust_model_code=cfg.trust_model_code)
    student.model.to(device)
    _check_student_width(student, train, num_outputs, device)
    plan, tap, heads, trainable = None, None, None, student.model
    if cfg.method == "curriculum":
        plan = curricula.plan_curriculum(train.cache.projections, student.model, student.spec, n, cfg.layer_map,
                                         cfg.phase_epochs, str(cfg.cache))
        tap = curricula.student_tap(plan, student.model, student.spec)
        heads = _projection_heads(plan, tap, train, device)
        trainable = torch.nn.ModuleDict({"student": student.model, "heads": heads})
        arrays = [*dict.fromkeys(p.array for p in plan.phases), teacher_array]
    optimizer = build_optimizer(hp["optimizer"], trainable, lr=float(hp["lr"]),
                                weight_decay=float(hp["weight_decay"]), momentum=float(hp["momentum"]))
    if train.cache is not None:
        batches = LogitBatches(train.cache, int(hp["batch_size"]), seed=cfg.seed, device=device, mode=cfg.stream_mode,
                               arrays=tuple(arrays))
    else:
        batches = LabelBatches(torch.as_tensor(train.labels), int(hp["batch_size"]), seed=cfg.seed, device=device)
    steps_per_epoch = len(batches)
    total_steps = n * steps_per_epoch
    if cfg.method == "prokd":  # every checkpoint needs at least one epoch (or step) of its own: checked now
        curricula.prokd_position(1, n, 0, steps_per_epoch, len(arrays), cfg.schedule_unit)
    prokd_lengths = curricula.prokd_lengths(cfg.phase_epochs, len(arrays), n) if cfg.method == "prokd" else None
    ctx = _Context(cfg.method, hp, n, steps_per_epoch, cfg.schedule_unit, k_anneal, kd_loss, teacher_array, arrays,
                   [str(c.get("name")) for c in checkpoints], plan, prokd_lengths)
    scheduler = build_lr_schedule(hp["lr_schedule"], optimizer, total_steps=total_steps,
                                  warmup_steps=int(round(float(hp["warmup_ratio"]) * total_steps)))
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16" and device.type == "cuda")

    # 4. Run directory: fresh, or resumed from last.pt of the very same run.
    identity = _identity(cfg, hp, preset, teacher_attrs, train, _cached_sources(cfg, train.cache))
    with _run_writes(out):
        state = _prepare_run_dir(out, cfg, identity)
    start_epoch, step, best, stage1_best = 1, 0, None, None
    totals = {"train_seconds": 0.0, "train_samples": 0, "wall_seconds": 0.0}  # over every part of a resumed run
    if state is not None:
        student.model.load_state_dict(state["model"])
        if heads is not None:
            heads.load_state_dict(state["heads"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if state["scaler"]:  # empty when the run began where fp16 scaling was off (e.g. on the CPU)
            scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
        start_epoch, step, best, stage1_best = state["epoch"] + 1, state["step"], state["best"], state["stage1_best"]
        totals = state["totals"]
        _repair_best(out, state, student, num_outputs, label_names, tokenizer)
        _truncate_metrics(out / "metrics.jsonl", state["epoch"])

    teacher_val = None
    if val is not None and val.cache is not None:  # the teacher's own score, from its cached logits: a reference
        teacher_val = _teacher_metrics(val, task, kind, teacher_array)

    # 5. The loop: one epoch of minibatches, an evaluation, the checkpoints.
    wall_start, wall_before = time.perf_counter(), totals["wall_seconds"]
    epoch = start_epoch
    with progress_bar(cfg.progress) as bar, _run_writes(out), _on_interrupt(out, lambda: epoch, n, start_epoch - 1):
        task_id = bar.add_task(f"{cfg.method} {student.spec}", total=n * steps_per_epoch,
                               completed=(start_epoch - 1) * steps_per_epoch, rate="")
        for epoch in range(start_epoch, n + 1):
            if cfg.method == "annealing" and epoch == k_anneal + 1 and stage1_best is not None:
                student.model.load_state_dict(stage1_best["model"])  # stage 2 starts from the best stage-1 student
            student.model.train()
            epoch_start, loss_sum, rows_seen = time.perf_counter(), 0.0, 0
            values = {}
            phase = plan.phase_at(epoch) if plan is not None else None
            if tap is not None and phase is None:
                tap.close()  # the projection phases are over: no more hooks on the student
            picked = [_arrays_of_epoch(ctx, epoch)] if train.cache is not None else []  # `train`: labels only
            for rows, teacher, labels in batches.epoch(epoch, *picked):
                values = _schedule(ctx, epoch, step)
                target = teacher[values["array"]] if isinstance(teacher, dict) else teacher
                with autocast(device, cfg.precision):
                    if phase is not None:  # curriculum: fit one student layer to the teacher layer's projection
                        _, pooled = tap(train.inputs.batch(rows))
                        index = plan.phases.index(phase)
                        loss = losses.projection_loss(heads(curricula.head_key(index), pooled[index]), target)
                    else:
                        student_logits = student(train.inputs.batch(rows))
                if phase is None:
                    loss = _objective(values["loss"], values, hp, cfg.reduction, kind, student_logits, target, labels)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if hp["max_grad_norm"]:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(trainable.parameters(), float(hp["max_grad_norm"]))
                scaler.step(optimizer)
                scaler.update()
                lr_used = optimizer.param_groups[0]["lr"]
                scheduler.step()
                step += 1
                loss_value = float(loss.detach())
                if not math.isfinite(loss_value):
                    raise KDCacheError(f"training diverged: loss is {loss_value} at epoch {epoch}, step {step}; "
                                       "lower --lr (or use --max-grad-norm)")
                loss_sum += loss_value * len(rows)
                rows_seen += len(rows)
                bar.update(task_id, advance=1, rate=f"epoch {epoch}/{n} loss {loss_value:.4f}")
            seconds = time.perf_counter() - epoch_start
            totals["train_seconds"] += seconds
            totals["train_samples"] += rows_seen

            scores = _evaluate(student, val if val is not None else train, task, kind, device, cfg.precision)
            record = {"epoch": epoch, "loss": loss_sum / max(rows_seen, 1), **_public(values),
                      "lr": lr_used, "metric_name": _metric_name(scores, task, kind),
                      **{k: v for k, v in scores.items() if k != "rows"},
                      "split": (val or train).name, "seconds": round(seconds, 3),
                      "samples_per_second": round(rows_seen / max(seconds, 1e-9), 1)}
            # curriculum: the head is untrained until the logits phase, so only its epochs compete for best/
            eligible = phase is None
            improved = eligible and (best is None or scores["metric"] > best["metric"])
            if improved:
                best = {"metric": scores["metric"], "epoch": epoch, "scores": scores}
            if cfg.method == "annealing" and epoch <= k_anneal and (
                    stage1_best is None or scores["metric"] > stage1_best["metric"]):
                stage1_best = {"metric": scores["metric"], "epoch": epoch,
                               "model": {k: v.detach().cpu().clone() for k, v in student.model.state_dict().items()}}
            if cfg.save_every and epoch % cfg.save_every == 0:
                _save_best(student, out / "checkpoints" / f"epoch-{epoch:04d}", num_outputs, label_names, tokenizer,
                           extra={"epoch": epoch, "metric": scores["metric"]})
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
            totals["wall_seconds"] = wall_before + time.perf_counter() - wall_start
            save_atomic({"identity": identity, "totals": totals, "epoch": epoch, "step": step, "best": best, "stage1_best": stage1_best,
                         "model": student.model.state_dict(), "heads": heads.state_dict() if heads else None,
                         "optimizer": optimizer.state_dict(),
                         "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "rng": rng_state()},
                        out / "last.pt")
            if improved:  # after last.pt, so a resume can always tell whether best/ is up to date (see below)
                _save_best(student, out / "best", num_outputs, label_names, tokenizer, extra={"epoch": epoch})
            if cfg.stop_after_epoch is not None and epoch >= cfg.stop_after_epoch and epoch < n:
                break

    finished = _read_metrics(out / "metrics.jsonl")
    summary = {
        "method": cfg.method, "student": student.spec, "student_parameters": student.parameters_count(),
        "cache": str(cfg.cache) if cfg.cache else None, "task": task, "preset": preset,
        "epochs": n, "epochs_done": len(finished), "complete": len(finished) == n,
        "metric_name": finished[-1]["metric_name"] if finished else None,
        "best_metric": best["metric"] if best else None, "best_epoch": best["epoch"] if best else None,
        "best_scores": best["scores"] if best else None,
        "last_metric": finished[-1]["metric"] if finished else None,
        "teacher_metric": teacher_val["metric"] if teacher_val else None,
        "wall_seconds": round(wall_before + time.perf_counter() - wall_start, 3),
        "train_seconds": round(totals["train_seconds"], 3),
        "samples_per_second": round(totals["train_samples"] / max(totals["train_seconds"], 1e-9), 1),
        "validation_split": (val or train).name,
        "selection_note": _selection_note((val or train).name),
        "teacher_array": teacher_array if train.cache is not None else None,
        **({"checkpoints": ctx.checkpoint_names} if cfg.method == "prokd" else {}),
        **({"curriculum": plan.describe()} if plan is not None else {}),
        "hyperparameters": hp, "device": str(device), "finished": utc_now(),
    }
    with _run_writes(out):
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


@contextlib.contextmanager
def _run_writes(out: Path):
    """A failed write of the run folder (full disk, read-only file system) is one line naming the file."""
    try:
        yield
    except OSError as exc:
        raise write_error(Path(exc.filename) if exc.filename else out, exc) from exc


@contextlib.contextmanager
def _on_interrupt(out: Path, current: Any, n: int, saved_before: int):
    """Ctrl-C says where the run stopped and how to continue it (last.pt holds every finished epoch)."""
    try:
        yield
    except KeyboardInterrupt:
        epoch = current()
        saved = epoch - 1 if epoch > saved_before else saved_before
        kept = f"epochs 1-{saved} are saved in {out / 'last.pt'}" if saved else "no epoch was finished yet"
        raise Interrupted(f"interrupted in epoch {epoch} of {n}; {kept}: rerun the same command with --resume to "
                          "continue") from None


# --- data ------------------------------------------------------------------------------------------------------

def _load_data(cfg: DistillConfig, device: torch.device):
    """(task, kind, modality, label_names, train, val, tokenizer, teacher attrs), every split checked."""
    if cfg.cache is None:
        return _load_dataset_only(cfg, device)
    attrs = read_cache_attrs(cfg.cache)
    task_attrs = attrs.get("task") or {}
    task, kind, modality = task_attrs.get("name"), task_attrs.get("kind", "classification"), task_attrs.get("modality")
    modality = modality or modality_of(task)
    tokenizer = load_cache_tokenizer(cfg.cache) if modality == "text" else None
    splits = attrs.get("splits") or []
    if "train" not in splits:
        raise KDCacheError(f"{cfg.cache}: no 'train' split to distil from (splits: {', '.join(splits) or 'none'})")
    val_name = _val_split_name(cfg.val_split, splits, str(cfg.cache))
    loaded = {}
    for name in ["train"] + ([val_name] if val_name else []):
        cache = open_cache(cfg.cache, split=name)
        dataset = cache.split_attrs.get("dataset") or {}
        options = _options_from_cache(dataset, task_attrs, kind)
        data = cfg.data if cfg.data is not None else dataset.get("source")
        split = load_split(task, data, name, tokenizer=tokenizer, options=options)
        inputs = StudentInputs(split, device)
        check_alignment(inputs, cache, split.source)
        loaded[name] = _Split(name, inputs, cache.read("labels"), cache)
    return (task, kind, modality, task_attrs.get("label_names"), loaded["train"], loaded.get(val_name), tokenizer,
            attrs.get("teacher") or {})


def _load_dataset_only(cfg: DistillConfig, device: torch.device):
    if cfg.task is None:
        raise KDCacheError("kdcache train needs --task")
    modality = modality_of(cfg.task)
    tokenizer = None
    if modality == "text":
        tokenizer = _train_tokenizer(cfg)
    split = load_split(cfg.task, cfg.data, "train", tokenizer=tokenizer, options=cfg.data_options)
    inputs = StudentInputs(split, device)
    train = _Split("train", inputs, inputs.labels.numpy())
    name = cfg.val_split or "validation"
    val = None
    if name != "none":
        try:
            val_split = load_split(cfg.task, cfg.data, name, tokenizer=tokenizer, options=cfg.data_options)
        except KDCacheError:
            if cfg.val_split is not None:
                raise
            val_split = None  # no validation split in this dataset: select on train, and say so in the summary
        if val_split is not None:
            val_inputs = StudentInputs(val_split, device)
            used = val_split.preprocess.get("split_used") or name  # e.g. CIFAR's validation is its test split
            val = _Split(str(used), val_inputs, val_inputs.labels.numpy())
    return cfg.task, split.kind, modality, split.label_names, train, val, tokenizer, {}


def _train_tokenizer(cfg: DistillConfig) -> Any:
    from transformers import AutoTokenizer

    source = cfg.tokenizer or (cfg.student if Path(cfg.student).is_dir() else None)
    if source is None:
        raise KDCacheError(f"text task {cfg.task!r} needs a tokenizer: pass --tokenizer DIR")
    try:
        return AutoTokenizer.from_pretrained(str(source), local_files_only=True)
    except Exception as exc:  # noqa: BLE001
        raise KDCacheError(f"{source}: cannot load a tokenizer ({exc})".splitlines()[0]) from exc


def _val_split_name(wanted: str | None, splits: list[str], where: str) -> str | None:
    if wanted == "none":
        return None
    if wanted is not None:
        if wanted not in splits:
            raise KDCacheError(f"{where}: no split {wanted!r} to validate on (splits: {', '.join(splits)})")
        return wanted
    for name in ("validation", "test"):
        if name in splits:
            return name
    return None


def _options_from_cache(dataset: dict[str, Any], task: dict[str, Any], kind: str) -> DataOptions:
    """The loader options the teacher's data was read with, so re-reading gives the very same rows."""
    pre = dataset.get("preprocess") or {}
    options = DataOptions(limit=pre.get("limit"), subset=pre.get("subset"))
    if dataset.get("modality") == "text":
        options.max_length = int(pre.get("max_length", 128))
        if dataset.get("task") == "text":
            options.text_column, options.text_pair_column = pre.get("text_column"), pre.get("text_pair_column")
            options.label_column, options.regression = pre.get("label_column"), kind == "regression"
            options.label_names = None if kind == "regression" else task.get("label_names")
    elif dataset.get("modality") == "image":
        options.normalize, options.image_size = pre.get("normalize"), pre.get("image_size")
    return options


def _has_labels(labels: np.ndarray, kind: str) -> bool:
    labels = np.asarray(labels)
    return bool(len(labels)) and bool((~np.isnan(labels)).any() if kind == "regression" else (labels != -1).any())


def _selection_note(split: str) -> str | None:
    """Selecting on test or train data is legitimate but biased; every report says so next to the number."""
    if split.startswith("test"):
        return ("best checkpoint selected on the test split (the data has no validation split): "
                "the best score is optimistic; report the last-epoch score beside it")
    if split == "train":
        return "no validation split: best checkpoint selected on the training data"
    return None


def _check_student_width(student: Any, train: _Split, num_outputs: int, device: torch.device) -> None:
    rows = torch.arange(min(2, len(train.inputs)))
    try:
        with torch.inference_mode():
            student.model.eval()
            width = student(train.inputs.batch(rows)).shape[-1]
    except KDCacheError:
        raise
    except Exception as exc:  # noqa: BLE001 - any model error on this input is a user-facing mismatch
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise KDCacheError(f"student {student.spec} cannot run on this data: {message}") from exc
    if width != num_outputs:
        raise KDCacheError(f"student {student.spec} has {width} outputs but the cache's teacher has {num_outputs}")


# --- the method: schedules and objective -------------------------------------------------------------------------

@dataclass
class _Context:
    """What the schedules of one run depend on, fixed before its first step."""

    method: str
    hp: dict
    n: int
    steps_per_epoch: int
    unit: str
    k_anneal: int | None
    kd_loss: str | None
    teacher_array: str  # the logits the method distils from (the trained teacher's, or --checkpoint's)
    arrays: list[str]  # every cached array the run reads (prokd: the checkpoints in training order)
    checkpoint_names: list[str]
    plan: curricula.CurriculumPlan | None
    prokd_lengths: list[int] | None = None  # Pro-KD epochs per checkpoint (--phase-epochs), else equal blocks


def _arrays_of_epoch(ctx: _Context, epoch: int) -> tuple[str, ...]:
    """The cached arrays one epoch needs: the one its first step reads, except for prokd switching checkpoints
    within an epoch (equal blocks of steps), which needs them all."""
    if ctx.method == "prokd" and ctx.unit == "step" and ctx.prokd_lengths is None:
        return tuple(ctx.arrays)
    return (_schedule(ctx, epoch, (epoch - 1) * ctx.steps_per_epoch)["array"],)


def _schedule(ctx: _Context, epoch: int, step: int) -> dict[str, Any]:
    """Everything in effect for this step: the loss, the cached array it reads, T, phi, psi, stage, checkpoint,
    curriculum phase. Epochs count from 1."""
    if ctx.method == "prokd":
        k = curricula.prokd_position(epoch, ctx.n, step, ctx.steps_per_epoch, len(ctx.arrays), ctx.unit,
                                     ctx.prokd_lengths)
        values = _method_schedule(ctx.kd_loss, ctx.hp, epoch, ctx.n, step, ctx.steps_per_epoch, ctx.unit, None)
        return {"loss": ctx.kd_loss, "array": ctx.arrays[k], "checkpoint": ctx.checkpoint_names[k], **values}
    if ctx.plan is not None:
        phase = ctx.plan.phase_at(epoch)
        if phase is not None:
            return {"loss": "projection", "array": phase.array, "phase": ctx.plan.phases.index(phase) + 1,
                    "layer": f"{phase.teacher_layer}->{phase.student_layer}"}
        # the logits phase runs its own schedules, from its first epoch as epoch 1
        before = ctx.plan.logits_from - 1
        values = _method_schedule(ctx.kd_loss, ctx.hp, epoch - before, ctx.n - before,
                                  step - before * ctx.steps_per_epoch, ctx.steps_per_epoch, ctx.unit, None)
        return {"loss": ctx.kd_loss, "array": ctx.teacher_array, "phase": len(ctx.plan.phases) + 1, **values}
    values = _method_schedule(ctx.method, ctx.hp, epoch, ctx.n, step, ctx.steps_per_epoch, ctx.unit, ctx.k_anneal)
    return {"loss": ctx.method, "array": ctx.teacher_array, **values}


def _method_schedule(method: str, hp: dict, epoch: int, n: int, step: int, steps_per_epoch: int, unit: str,
                     k_anneal: int | None) -> dict[str, Any]:
    """T, phi, psi (and the Annealing-KD stage) in effect for this step; epochs count from 1."""
    t_max = int(hp["t_max"])
    if method == "continuation":
        if unit == "step":
            T = schedules.temperature(step + 1, n * steps_per_epoch, t_max)
            position = schedules.epoch_position(step, steps_per_epoch)
        else:
            T, position = schedules.temperature(epoch, n, t_max), epoch
        return {"T": T, "phi": schedules.phi(T, t_max), "psi": schedules.psi(hp["psi"], position, n)}
    if method == "annealing":
        if epoch > k_anneal:
            return {"stage": 2, "T": 1, "phi": 1.0, "psi": 1.0}
        if unit == "step":
            T = schedules.temperature(step + 1, k_anneal * steps_per_epoch, t_max)
        else:
            T = schedules.temperature(epoch, k_anneal, t_max)
        return {"stage": 1, "T": T, "phi": schedules.phi(T, t_max), "psi": 0.0}
    if method == "vanilla":
        return {"T": float(hp["temperature"]), "alpha": float(hp["alpha"])}
    return {}


def _objective(method: str, values: dict, hp: dict, reduction: str, kind: str, student_logits: torch.Tensor,
               teacher_logits: torch.Tensor | None, labels: torch.Tensor) -> torch.Tensor:
    if method == "continuation":
        return losses.continuation_kd_loss(student_logits, teacher_logits, labels, phi=values["phi"],
                                           psi=values["psi"], margin=float(hp["margin"]), reduction=reduction,
                                           kind=kind)
    if method == "annealing":
        if values["stage"] == 2:
            return losses.ce(student_logits, labels, kind=kind)
        return losses.annealing_kd_loss(student_logits, teacher_logits, phi=values["phi"])
    if method == "vanilla":
        return losses.vanilla_kd_loss(student_logits, teacher_logits, labels, temperature=values["T"],
                                      alpha=values["alpha"], kind=kind)
    return losses.ce(student_logits, labels, kind=kind)


def _public(values: dict[str, Any]) -> dict[str, Any]:
    return {k: values.get(k) for k in ("T", "phi", "psi", "alpha", "stage", "checkpoint", "phase", "layer")
            if k in values}


def _projection_heads(plan: curricula.CurriculumPlan, tap: Any, train: _Split,
                      device: torch.device) -> curricula.ProjectionHeads:
    """One head per projection phase, sized by a forward pass on two rows (seeded with the student)."""
    with torch.inference_mode():
        _, pooled = tap(train.inputs.batch(torch.arange(min(2, len(train.inputs)))))
    widths = {curricula.head_key(i): int(p.shape[-1]) for i, p in enumerate(pooled)}
    return curricula.ProjectionHeads(widths, plan.dim).to(device)


# --- evaluation and checkpoints ------------------------------------------------------------------------------------

def _evaluate(student: Any, split: _Split, task: str, kind: str, device: torch.device, precision: str) -> dict:
    return evaluate(student, split.inputs, split.labels, task=task, kind=kind, device=device, precision=precision)


def _teacher_metrics(split: _Split, task: str, kind: str, array: str) -> dict[str, float]:
    from kdcache.metrics import compute_metrics

    return compute_metrics(split.cache.read(array).astype(np.float32), split.labels, task=task, kind=kind)


def _metric_name(scores: dict, task: str, kind: str) -> str:
    from kdcache.metrics import primary_metric

    return primary_metric(task, kind)


def _save_best(student: Any, directory: Path, num_outputs: int, label_names: list[str] | None, tokenizer: Any,
               extra: dict[str, Any] | None = None) -> None:
    """Replace `directory` with the student as it is now, through a temporary folder and a rename."""
    tmp, old = (directory.with_name(directory.name + suffix) for suffix in (".tmp", ".old"))
    shutil.rmtree(tmp, ignore_errors=True)
    save_student(student, tmp, num_outputs=num_outputs, label_names=label_names, tokenizer=tokenizer)
    if extra:
        (tmp / CHECKPOINT_FILE).write_text(json.dumps(extra) + "\n")
    shutil.rmtree(old, ignore_errors=True)
    if directory.exists():
        directory.rename(old)
    tmp.rename(directory)
    shutil.rmtree(old, ignore_errors=True)


def _repair_best(out: Path, state: dict, student: Any, num_outputs: int, label_names: list[str] | None,
                 tokenizer: Any) -> None:
    """A kill between last.pt and best/ leaves best/ one improvement behind: the improvement was the last epoch,
    whose weights are the ones just loaded, so save them again. A kill inside the swap leaves best.old/ alone."""
    best_dir, old = out / "best", out / "best.old"
    if old.is_dir() and not best_dir.exists():
        old.rename(best_dir)
    marker = best_dir / CHECKPOINT_FILE
    saved = json.loads(marker.read_text()).get("epoch") if marker.is_file() else None
    if state["best"] and saved != state["best"]["epoch"] and state["best"]["epoch"] == state["epoch"]:
        _save_best(student, best_dir, num_outputs, label_names, tokenizer, extra={"epoch": state["epoch"]})


def _cached_sources(cfg: DistillConfig, cache: TeacherCache | None) -> dict[str, Any]:
    """What the run reads from the cache beyond the trained teacher's logits, identified by content (checkpoint
    hashes, the projections' layers, width and seed), so a cache rebuilt at the same path cannot be resumed into."""
    if cache is None:
        return {}
    by_name = {c.get("name"): c.get("sha256") for c in cache.checkpoints}
    sources: dict[str, Any] = {}
    if cfg.method == "prokd":
        sources["checkpoints_sha256"] = [c.get("sha256") for c in cache.checkpoints]
    if cfg.checkpoint is not None:
        sources["checkpoint_sha256"] = by_name.get(cfg.checkpoint)
    if cfg.method == "curriculum" and cache.projections:
        sources["projections"] = {k: cache.projections.get(k) for k in ("layers", "dim", "seed", "widths")}
    return sources


#: Config fields added after runs existed: left out of the identity while unset, so those runs still resume.
_OPTIONAL_FIELDS = ("checkpoint", "kd_loss", "phase_epochs", "layer_map")


def _identity(cfg: DistillConfig, hp: dict, preset: str, teacher: dict, train: _Split,
              sources: dict[str, Any]) -> dict[str, Any]:
    """What makes two runs the same run: config, resolved hyper-parameters, teacher and data digests."""
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(cfg).items()
              if k not in _NOT_IDENTITY and not (k in _OPTIONAL_FIELDS and v is None)}
    digest = (train.cache.split_attrs.get("dataset") or {}).get("digest") if train.cache is not None else \
        hashlib.sha256(train.inputs.fingerprints.tobytes()).hexdigest()
    identity = {"config": config, "hyperparameters": hp, "preset": preset, "teacher_sha256": teacher.get("sha256"),
                "data_digest": digest, **({"cached_sources": sources} if sources else {})}
    return json.loads(json.dumps(identity, default=str))


def _prepare_run_dir(out: Path, cfg: DistillConfig, identity: dict[str, Any]) -> dict[str, Any] | None:
    """Create RUN_DIR, or load last.pt for --resume after proving it belongs to this very run. A run stopped
    before its first epoch was saved has no last.pt: --resume starts it again if its config.json is this run's."""
    last = out / "last.pt"
    if cfg.resume:
        if not last.is_file():
            if _same_run(out / "config.json", identity):
                (out / "metrics.jsonl").unlink(missing_ok=True)
                return None
            raise KDCacheError(f"{last}: nothing to resume (no checkpoint of an earlier run)")
        state = load_checkpoint(last)
        if state.get("identity") != identity:
            differ = _differences(state.get("identity") or {}, identity)
            raise KDCacheError(f"{last}: checkpoint of another run (differs in {', '.join(differ) or 'format'}); "
                               "resume with the same flags, or start a new --out")
        return state
    if out.exists() and any(out.iterdir()):
        if not cfg.overwrite:
            raise KDCacheError(f"{out}: already holds a run; pass --resume to continue it or --overwrite to replace it")
        if not (out / "config.json").is_file():
            raise KDCacheError(f"{out}: refusing to overwrite: it is not a kdcache run folder")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps({**identity, "command": cfg.command or command_line(),
                                                 "software": software_versions(), "started": utc_now()},
                                                indent=2, default=str) + "\n")
    return None


def _same_run(config: Path, identity: dict[str, Any]) -> bool:
    """Whether a run folder's config.json was written by this very run (same identity)."""
    try:
        recorded = json.loads(config.read_text())
    except (OSError, ValueError):
        return False
    return {k: recorded.get(k) for k in identity} == identity


def _differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    keys = sorted(set(old) | set(new))
    out = []
    for k in keys:
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}")
    return out


def _truncate_metrics(path: Path, last_epoch: int) -> None:
    """Drop metric lines of epochs after the checkpoint (an epoch that ran but was not checkpointed reruns)."""
    kept = [r for r in _read_metrics(path) if r["epoch"] <= last_epoch]
    path.write_text("".join(json.dumps(r) + "\n" for r in kept))


def _read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


__all__ = ["DistillConfig", "distill"]
