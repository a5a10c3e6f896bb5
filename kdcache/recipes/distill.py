"""Recipe: train a student against a teacher cache (`kdcache distill`), or on labels alone (`kdcache train`).

    kdcache distill --cache sst2.kdcache --student bert-4layer.json --method continuation --epochs 30 --out runs/ckd
    kdcache distill --cache s3://bucket/c10.kdcache --student resnet8 --method prokd --out runs/prokd
    kdcache train --model resnet20 --task cifar10 --data cifar-10-batches-py --epochs 200 --out runs/teacher

Features, and the flags that control them:
- methods (`--method`, kdcache/methods/): continuation (default), vanilla, annealing, ce, prokd (the cached teacher
  checkpoints in training order), curriculum (cached hidden-state projections, then the logits); their
  hyper-parameters default to `--preset` (`cifar`, `glue`, `small`, or `auto` by modality) and each is a flag;
- the teacher is never loaded: its outputs stream from the cache (a folder or an fsspec URL; kdcache/train/
  batches.py), and the dataset named in the cache (or `--data`) is re-read, every row's fingerprint and label
  checked against it;
- schedules per epoch, or per step (`--schedule-unit step`) for runs of few epochs;
- evaluation every epoch with the task's metric, the best student kept in `best/` (a teacher folder), metrics.jsonl
  and summary.json; `--resume` continues from last.pt with the same batches and schedules as an uninterrupted run;
  `--precision bf16|fp16` autocast; `--device auto`.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdcache.errors import KDCacheError
from kdcache.methods import MethodOptions, Run, make_method
from kdcache.models import build_student
from kdcache.progress import progress_bar
from kdcache.runtime import command_line, process_start_time, resolve_device, utc_now
from kdcache.names import parse_budget
from kdcache.train.batches import EpochOrder, TeacherTargets
from kdcache.train.config import DistillConfig, resolve
from kdcache.train.evaluation import evaluate
from kdcache.train.inputs import (RowCheck, RowRecord, RunData, check_student, has_labels, input_options, load_dataset_only, load_run_data,
                                  probe_batch, selection_note)
from kdcache.train.loop import Stepper, on_interrupt, train_epoch
from kdcache.train.metrics import compute_metrics, primary_metric
from kdcache.train.optim import build_lr_schedule, build_optimizer
from kdcache.train.run_dir import IDENTITY_VERSION, RunDir, rng_state, set_rng_state


def distill(cfg: DistillConfig) -> dict[str, Any]:
    """Run the recipe; returns the summary also written to RUN_DIR/summary.json."""
    device = resolve_device(cfg.device)
    method = make_method(cfg.method, MethodOptions(cfg.checkpoint, cfg.kd_loss, cfg.phase_epochs, cfg.layer_map,
                                                   cfg.reduction))
    if cfg.cache is None and method.needs_cache:
        raise KDCacheError(f"method {cfg.method!r} needs a teacher cache (--cache)")
    out = Path(cfg.out)
    if not cfg.resume and not cfg.overwrite and out.exists() and any(out.iterdir()):
        raise KDCacheError(f"{out}: already holds a run; pass --resume to continue it or --overwrite to replace it")

    # 1. Data: the cache's own dataset, each row checked against the cache as it is first decoded (or, for
    #    `train`, the dataset alone); inputs are decoded by worker processes, batch by batch.
    reading = input_options(cfg, device)
    budget = parse_budget(cfg.memory_budget)
    if cfg.cache is not None:
        data = load_run_data(cfg.cache, storage_options=cfg.storage_options, data=cfg.data, val_split=cfg.val_split,
                             device=device, options=reading)
    else:
        tokenizer_source = cfg.tokenizer or (cfg.student if Path(cfg.student).is_dir() else None)
        data = load_dataset_only(cfg.task, cfg.data, cfg.data_options, tokenizer_source=tokenizer_source,
                                 val_split=cfg.val_split, device=device, reading=reading)
        for split in filter(None, (data.train, data.val)):  # no cache to check against: record what is read
            split.inputs.check = RowRecord(len(split.inputs))
    if not has_labels(data.selection.labels, data.kind):
        raise KDCacheError(f"split {data.selection.name!r} has no labels to select the best checkpoint on; "
                           "pass --val-split with a labelled split")

    # 2. Hyper-parameters: the preset, the method's defaults, then flags.
    preset, hp = resolve(cfg.preset, data.modality, method, cfg)
    n, batch_size = int(hp["epochs"]), int(hp["batch_size"])

    # 3. Student, method, batches, optimiser.
    probe = probe_batch(data.train.inputs)
    student = build_student(cfg.student, data.num_outputs, kwargs=cfg.student_kwargs, tokenizer=data.tokenizer,
                            seed=cfg.seed, trust_model_code=cfg.trust_model_code, sample=probe)
    student.model.to(device)
    check_student(student, probe, data.num_outputs)
    if cfg.compile:
        student.model = torch.compile(student.model)
    steps_per_epoch = -(-len(data.train.inputs) // batch_size)
    method.setup(Run(hp, n, steps_per_epoch, cfg.schedule_unit, data.kind, data.train.cache, student, probe,
                     str(cfg.cache)))
    targets = None
    if data.train.cache is not None:  # the teacher's targets follow the epoch order (in memory, or by windows)
        targets = TeacherTargets(data.train.cache, method.arrays(), device=device, mode=cfg.stream_mode,
                                 budget_bytes=budget)
        order = targets.order(batch_size, seed=cfg.seed)
    else:
        order = EpochOrder(len(data.train.inputs), batch_size, seed=cfg.seed)
    trainable = torch.nn.ModuleList([student.model, *filter(None, [method.modules()])])
    optimizer = build_optimizer(hp["optimizer"], trainable, lr=float(hp["lr"]), weight_decay=float(hp["weight_decay"]),
                                momentum=float(hp["momentum"]), compiling=cfg.compile)
    total_steps = n * steps_per_epoch
    scheduler = build_lr_schedule(hp["lr_schedule"], optimizer, total_steps=total_steps,
                                  warmup_steps=int(round(float(hp["warmup_ratio"]) * total_steps)))
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16" and device.type == "cuda")
    stepper = Stepper(student, method, optimizer, scheduler, scaler, device, cfg.precision, hp["max_grad_norm"],
                      list(trainable.parameters()))

    # 4. Run folder: fresh, or resumed from last.pt of the very same run.
    run_dir = RunDir(out, _identity(cfg, hp, preset, data, method))
    legacy = (lambda: _legacy_digest(data, batch_size)) if data.train.cache is None else None
    state = run_dir.prepare(resume=cfg.resume, overwrite=cfg.overwrite, command=cfg.command or command_line(),
                            legacy_digest=legacy)
    progress = {"epoch": 0, "step": 0, "best": None,
                "totals": {"train_seconds": 0.0, "train_samples": 0, "wall_seconds": 0.0}}
    if state is not None:
        _restore(state, stepper, run_dir, data, progress)
        if targets is not None and state.get("targets") not in (None, targets.describe()):
            # the order depends on how the targets were held: replay the interrupted run's, whatever this machine's
            # memory or --memory-budget would choose now
            targets = TeacherTargets(data.train.cache, method.arrays(), device=device, budget_bytes=budget,
                                     mode=state["targets"]["mode"], window_chunks=state["targets"]["window_chunks"])
            order = targets.order(batch_size, seed=cfg.seed)

    progress["teacher_targets"] = targets.describe() if targets is not None else None

    # 5. The loop: one epoch of minibatches, an evaluation, the checkpoints.
    teacher_val = _teacher_metrics(data, method.teacher_array)
    _run_epochs(cfg, stepper, (order, targets), data, run_dir, progress, n)

    # 6. The summary.
    summary = _summary(cfg, stepper, data, run_dir, progress, hp, preset, n, teacher_val, device)
    run_dir.write_summary(summary)
    return summary


def _run_epochs(cfg: DistillConfig, stepper: Stepper, feed: tuple[Any, Any], data: RunData, run_dir: RunDir,
                progress: dict[str, Any], n: int) -> None:
    """Epochs after the last saved one: train, evaluate, record, keep the best, save last.pt."""
    order, targets = feed
    totals, wall_start = progress["totals"], time.perf_counter()
    wall_before, first = totals["wall_seconds"], progress["epoch"] + 1
    current = {"epoch": first}
    label = f"{stepper.method.display_name(data.kind)} {stepper.student.spec}"
    with progress_bar(cfg.progress) as bar, run_dir.writes(), \
            on_interrupt(str(run_dir.last), lambda: current["epoch"], n):
        task = bar.add_task(label, total=n * len(order), completed=(first - 1) * len(order), rate="")
        for epoch in range(first, n + 1):
            current["epoch"] = epoch
            started = time.perf_counter()
            result = train_epoch(stepper, order, targets, data.train.inputs, epoch, progress["step"],
                                 on_step=_bar(bar, task, epoch, n), log_every=cfg.log_every,
                                 max_steps=cfg.max_steps, on_batch=lambda: _started(progress))
            seconds = time.perf_counter() - started
            totals["train_seconds"] += seconds
            totals["train_samples"] += result.rows
            if result.stopped:  # cut by --max-steps
                progress["stopped_at_step"] = result.step
            unchecked = _unchecked(data)  # rows not yet compared with the cache: no model trained on them is kept
            if unchecked:
                progress["unchecked_rows"] = unchecked
            scores = evaluate(stepper.student, data.selection.inputs, data.selection.labels, task=data.task,
                              kind=data.kind, device=stepper.device, precision=cfg.precision,
                              batch_size=order.batch_size)  # a batch that trains fits in evaluation
            run_dir.append_metrics({
                "epoch": epoch, "loss": result.loss, **result.values, "lr": result.lr,
                "metric_name": primary_metric(data.task, data.kind), **{k: v for k, v in scores.items() if k != "rows"},
                "split": data.selection.name, "seconds": round(seconds, 3),
                "samples_per_second": round(result.rows / max(seconds, 1e-9), 1)})
            improved = stepper.method.eligible(epoch) and not unchecked and (
                progress["best"] is None or scores["metric"] > progress["best"]["metric"])
            if improved:
                progress["best"] = {"metric": scores["metric"], "epoch": epoch, "scores": scores}
            stepper.method.end_epoch(epoch, stepper.student, scores["metric"])
            if cfg.save_every and epoch % cfg.save_every == 0 and not unchecked:
                _save_model(run_dir, data, stepper, run_dir.out / "checkpoints" / f"epoch-{epoch:04d}",
                            {"epoch": epoch, "metric": scores["metric"]})
            progress.update(epoch=epoch, step=result.step)
            totals["wall_seconds"] = wall_before + time.perf_counter() - wall_start
            if not result.stopped:  # a run cut by --max-steps inside an epoch keeps no last.pt to resume from
                run_dir.save_state(_snapshot(stepper, progress, targets, data))
            if improved:  # after last.pt, so a resume can always tell whether best/ is up to date
                _save_model(run_dir, data, stepper, run_dir.out / "best", {"epoch": epoch})
            if result.stopped or (cfg.stop_after_epoch is not None and cfg.stop_after_epoch <= epoch < n):
                break


def _unchecked(data: RunData) -> int:
    """Train rows not yet compared with what they must be (a run cut short by --max-steps in its first epoch)."""
    check = data.train.inputs.check
    return int((~check.seen).sum()) if isinstance(check, RowCheck) else 0


def _started(progress: dict[str, Any]) -> None:
    """Start-up, once per process: from its start to the first optimiser step's beginning (the batch decoded and
    on the device; the step's own compute, which depends on the model, is not start-up)."""
    if "startup_seconds" not in progress:
        progress["startup_seconds"] = round(time.time() - process_start_time(), 3)


def _bar(bar: Any, task: Any, epoch: int, n: int) -> Any:
    """The progress bar's view of each step: it advances every step but reads the loss (a wait for the device)
    only a few times a second."""
    last = {"read": 0.0}

    def on_step(loss: torch.Tensor) -> None:
        now = time.perf_counter()
        if now - last["read"] > 0.25 and not bar.disable:  # --no-progress: never wait for the device
            last["read"] = now
            bar.update(task, advance=1, rate=f"epoch {epoch}/{n} loss {float(loss.detach()):.4f}")
        else:
            bar.update(task, advance=1)
    return on_step


def _snapshot(s: Stepper, progress: dict[str, Any], targets: Any, data: RunData) -> dict[str, Any]:
    """Everything a resume needs, as tensors and plain values (last.pt loads with torch's weights-only unpickler)."""
    return {**progress, "model": s.student.model.state_dict(), "method": s.method.state_dict(),
            "targets": targets.describe() if targets is not None else None, "rows": _row_state(data),
            "optimizer": s.optimizer.state_dict(), "scheduler": s.scheduler.state_dict(),
            "scaler": s.scaler.state_dict(), "rng": rng_state()}


def _restore(state: dict[str, Any], s: Stepper, run_dir: RunDir, data: RunData, progress: dict[str, Any]) -> None:
    s.student.model.load_state_dict(state["model"])
    s.method.load_state_dict(state["method"])
    s.optimizer.load_state_dict(state["optimizer"])
    s.scheduler.load_state_dict(state["scheduler"])
    if state["scaler"]:  # empty when the run began where fp16 scaling was off (e.g. on the CPU)
        s.scaler.load_state_dict(state["scaler"])
    set_rng_state(state["rng"])
    progress.update({k: state[k] for k in ("epoch", "step", "best", "totals")})
    for split in filter(None, (data.train, data.val)):  # `train`: the rows must be those the run trained on
        recorded = (state.get("rows") or {}).get(split.name)
        if data.train.cache is None and recorded is not None:
            split.inputs.check = RowCheck(recorded.numpy().view(np.uint64), split.inputs.labels, split.inputs.split.source,
                                          f"what this run read before ({run_dir.last})", "since the run began")
    run_dir.repair_best(state, lambda epoch: _save_model(run_dir, data, s, run_dir.out / "best", {"epoch": epoch}))
    run_dir.truncate_metrics(state["epoch"])


def _save_model(run_dir: RunDir, data: RunData, s: Stepper, directory: Path, extra: dict[str, Any]) -> None:
    run_dir.save_model(s.student, directory, num_outputs=data.num_outputs, label_names=data.label_names,
                       tokenizer=data.tokenizer, extra=extra)


def _identity(cfg: DistillConfig, hp: dict, preset: str, data: RunData, method: Any) -> dict[str, Any]:
    """What makes two runs the same run: config, resolved hyper-parameters, teacher and data digests."""

    cache = data.train.cache
    if cache is not None:
        digest = (cache.split_attrs.get("dataset") or {}).get("digest")
    else:  # `train` decodes nothing before it starts: the data is named by what it is read with and its labels
        split = data.train.inputs.split  # (not where it lies: a moved dataset still resumes; rows are checked then)
        preprocess = {k: v for k, v in split.preprocess.items() if k not in _PATH_KEYS}
        described = json.dumps({"task": split.task, "rows": len(split), "preprocess": preprocess},
                               sort_keys=True, default=str)
        digest = hashlib.sha256(described.encode() + np.ascontiguousarray(data.train.labels).tobytes()).hexdigest()
    sources = method.identity() if cache is not None else {}
    identity = {"identity_version": IDENTITY_VERSION, "config": cfg.identity(), "hyperparameters": hp, "preset": preset,
                "teacher_sha256": data.teacher.get("sha256"), "data_digest": digest,
                **({"cached_sources": sources} if sources else {})}
    return json.loads(json.dumps(identity, default=str))


#: Preprocessing records that name where files lie, left out of a `train` run's data digest.
_PATH_KEYS = ("files", "tokenizer")


def _legacy_digest(data: RunData, batch_size: int) -> str:
    """A `train` run's data digest as identity version 2 made it: SHA-256 of every train row's fingerprint."""
    fingerprints = np.zeros(len(data.train.inputs), dtype=np.uint64)
    rows = np.arange(len(fingerprints))
    for done, batch in data.train.inputs._decoded([rows[a:a + batch_size] for a in range(0, len(rows), batch_size)],
                                                  fresh=True):
        fingerprints[done] = np.asarray(batch.fingerprint, dtype=np.uint64)
    return hashlib.sha256(fingerprints.tobytes()).hexdigest()


def _row_state(data: RunData) -> dict[str, torch.Tensor] | None:
    """`train`: the fingerprints of every row read, once every row has been (for a resume to check against)."""
    if data.train.cache is not None:
        return None
    rows = {}
    for split in filter(None, (data.train, data.val)):
        check = split.inputs.check
        if check is not None and check.done:
            rows[split.name] = torch.from_numpy(check.fingerprints.view(np.int64).copy())
    return rows or None


def _teacher_metrics(data: RunData, array: str | None) -> dict[str, float] | None:
    """The teacher's own score on the selection split, from its cached outputs: a reference beside the student's."""
    split = data.val
    if split is None or split.cache is None or array is None:
        return None
    return compute_metrics(split.cache.read(array).astype(np.float32), split.labels, task=data.task, kind=data.kind)


def _summary(cfg: DistillConfig, s: Stepper, data: RunData, run_dir: RunDir, progress: dict[str, Any], hp: dict,
             preset: str, n: int, teacher_val: dict | None, device: torch.device) -> dict[str, Any]:
    finished, best, totals = run_dir.read_metrics(), progress["best"], progress["totals"]
    return {
        "method": cfg.method, "objective": s.method.display_name(data.kind), "student": s.student.spec,
        "student_parameters": s.student.parameters_count(), "cache": str(cfg.cache) if cfg.cache else None,
        "task": data.task, "preset": preset, "epochs": n, "epochs_done": len(finished),
        "complete": len(finished) == n and "stopped_at_step" not in progress, "metric_name": finished[-1]["metric_name"] if finished else None,
        "best_metric": best["metric"] if best else None, "best_epoch": best["epoch"] if best else None,
        "best_scores": best["scores"] if best else None,
        "last_metric": finished[-1]["metric"] if finished else None,
        "teacher_metric": teacher_val["metric"] if teacher_val else None,
        "wall_seconds": round(totals["wall_seconds"], 3), "train_seconds": round(totals["train_seconds"], 3),
        "samples_per_second": round(totals["train_samples"] / max(totals["train_seconds"], 1e-9), 1),
        "validation_split": data.selection.name, "selection_note": selection_note(data.selection.name),
        "teacher_array": s.method.teacher_array if data.train.cache is not None else None,
        **s.method.describe(), "hyperparameters": hp, "device": str(device), "finished": utc_now(),
        "startup_seconds": progress.get("startup_seconds"), "max_steps": cfg.max_steps,
        "stopped_at_step": progress.get("stopped_at_step"),
        "unchecked_rows": progress.get("unchecked_rows", 0),
        "unchecked_note": (f"--max-steps ended the run with {progress['unchecked_rows']:,} of "
                           f"{len(data.train.inputs):,} training rows not yet read, so not yet checked against the "
                           "cache: no model was kept (--check-first checks every row first)"
                           if progress.get("unchecked_rows") else None),
        "teacher_targets": progress.get("teacher_targets"),
    }


__all__ = ["DistillConfig", "distill"]
