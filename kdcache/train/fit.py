"""The epochs of one run, or of several runs on the same batches (`kdcache sweep`): `fit` reads as one epoch,
top to bottom; the steps themselves are kdcache/train/loop.py's, the run's set-up and summary
kdcache/train/run.py's.
"""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdcache.names import better
from kdcache.progress import Lines, progress_bar
from kdcache.runtime import out_of_memory_said, process_start_time
from kdcache.train.evaluation import evaluate, evaluate_lm, teacher_top_ids
from kdcache.train.inputs import RowCheck, RunData
from kdcache.train.loop import Member, on_interrupt, train_together
from kdcache.train.metrics import clearly_better, primary_metric
from kdcache.train.run import StudentRun, baseline, save_model, snapshot

log = logging.getLogger("kdcache")


def fit(runs: list[StudentRun], data: RunData, *, progress: bool, where: str) -> None:
    """The epochs after each run's last saved one, in one place: the runs' steps together on the same batches
    (kdcache/train/loop.py), then for each run its evaluation, metrics line, best student and last.pt. `where`
    names what a Ctrl-C leaves to resume."""
    lead = runs[0]  # runs trained together share its flags' seed and batch size, epochs, batches and targets
    cfg, world, n, order = lead.cfg, lead.stepper.world, lead.epochs, lead.order
    first = min(run.progress["epoch"] for run in runs) + 1
    wall_start = time.perf_counter()
    walls = [run.progress["totals"]["wall_seconds"] for run in runs]
    current = {"epoch": first}
    floor = baseline(data)["metric"]
    label = (f"{lead.stepper.method.display_name(data.kind)} {Path(lead.stepper.student.spec).name}" if len(runs) == 1
             else f"{len(runs)} students")
    with progress_bar(progress and world.main, cfg.progress_every) as bar, contextlib.ExitStack() as writes, \
            on_interrupt(where, lambda: current["epoch"], n), out_of_memory_said(
                lambda: (f"training {label} on {lead.stepper.device} in epoch {current['epoch']} (batches of "
                         f"{lead.batch_size})"), "lower --batch-size, use --precision bf16, or a smaller student"):
        for run in runs:
            writes.enter_context(run.run_dir.writes())
        task = bar.add_task(label, total=n * len(order), completed=(first - 1) * len(order), rate="", unit=" steps")
        for epoch in range(first, n + 1):
            current["epoch"] = epoch
            todo = [run for run in runs if run.progress["epoch"] < epoch and "stopped_at_step" not in run.progress]
            if not todo:
                continue
            # 1. The steps: each batch decoded, checked and moved once, then every run's step on it.
            started = time.perf_counter()
            for run in todo:  # a phase trained as its own run (Annealing-KD's stage 2): a fresh optimiser
                if epoch in run.stepper.method.restart_epochs() and run.new_optimiser is not None:
                    run.stepper.optimizer, run.stepper.scheduler = run.new_optimiser(epoch)
            members = [Member(run.stepper, run.progress["step"], run.progress.get("rng")) for run in todo]
            results = train_together(members, order, lead.targets, data.train.inputs, epoch,
                                     on_step=_bar(bar, task, epoch, n, len(todo), lead.batch_size),
                                     log_every=cfg.log_every,
                                     max_steps=cfg.max_steps, on_batch=lambda: [_started(r.progress) for r in todo])
            seconds = time.perf_counter() - started
            world.merge_seen(data.train.inputs.check)  # each rank checked the rows it read
            # 2. Each run: its totals, its scores and metrics line, its best student, then last.pt.
            for run, member, result in zip(todo, members, results):
                s, done, totals = run.stepper, run.progress, run.progress["totals"]
                if member.rng is not None:
                    done["rng"] = member.rng
                totals["wall_seconds"] = walls[runs.index(run)] + time.perf_counter() - wall_start
                totals["train_seconds"] += seconds
                totals["train_samples"] += result.rows
                if result.stopped:  # cut by --max-steps
                    done["stopped_at_step"] = result.step
                unchecked = _unchecked(data)  # rows not yet compared with the cache: no model trained on them is kept
                if unchecked:
                    done["unchecked_rows"] = unchecked
                scores, reported = _scores(run, data)
                if world.main:
                    run.run_dir.append_metrics(_metrics_line(epoch, result, scores, reported, seconds, data))
                improved = s.method.eligible(epoch) and not unchecked and (
                    done["best"] is None or better(scores["metric"], done["best"]["metric"], data.kind))
                if improved:
                    done["best"] = {"metric": scores["metric"], "epoch": epoch, "scores": scores}
                s.method.end_epoch(epoch, s.student, scores["metric"])
                warning = _falling(run, epoch, scores["metric"], floor, data, len(runs) > 1)
                if warning and world.main:
                    log.warning(warning)
                if run.cfg.save_every and epoch % run.cfg.save_every == 0 and not unchecked and world.main:
                    save_model(run.run_dir, data, s, run.run_dir.out / "checkpoints" / f"epoch-{epoch:04d}",
                               {"epoch": epoch, "metric": scores["metric"]})
                done.update(epoch=epoch, step=result.step)
                if not result.stopped:  # a run cut by --max-steps inside an epoch keeps no last.pt to resume from
                    state = snapshot(s, done, run.targets, data)  # (every rank: it gathers their RNG states)
                    if world.main:
                        run.run_dir.save_state(state)
                if improved and world.main:  # after last.pt, so a resume can always tell whether best/ is up to date
                    save_model(run.run_dir, data, s, run.run_dir.out / "best", {"epoch": epoch})
            stop = cfg.stop_after_epoch is not None and cfg.stop_after_epoch <= epoch < n
            if all("stopped_at_step" in run.progress for run in runs) or stop:
                break
    for run, wall in zip(runs, walls):  # the last evaluation included
        if run.progress["epoch"] >= first:
            run.progress["totals"]["wall_seconds"] = wall + time.perf_counter() - wall_start


def _metrics_line(epoch: int, result: Any, scores: dict[str, float], reported: dict[str, Any], seconds: float,
                  data: RunData) -> dict[str, Any]:
    """One epoch's line of metrics.jsonl: the step results, the scores on the selection (and report) split, speed."""
    return {"epoch": epoch, "loss": result.loss, **result.values, "lr": result.lr,
            "metric_name": primary_metric(data.task, data.kind), **{k: v for k, v in scores.items() if k != "rows"},
            "split": data.selection.name, **reported, "seconds": round(seconds, 3),
            "samples_per_second": round(result.rows / max(seconds, 1e-9), 1),
            **_tokens_per_second(data, result.rows, seconds)}


#: A validation metric below the midpoint between its best and a constant predictor's score (half its best when
#: that score is 0) for this many epochs in a row is a run going wrong: one warning line (docs/cli.md).
FALLING_EPOCHS = 3


def _falling(run: StudentRun, epoch: int, metric: float, floor: float, data: RunData, named: bool) -> str | None:
    """The warning, once per run, for a validation metric that has fallen far below its best and stayed there
    (a diverging run whose loss never became NaN); recorded in the run's summary."""
    done, best = run.progress, run.progress["best"]
    if best is None or not better(best["metric"], clearly_better(floor), data.kind) or done.get("warnings"):
        return None  # (a run that never learned has no level to fall from: its end says so)
    line = floor + (best["metric"] - floor) / 2
    done["falling"] = done.get("falling", 0) + 1 if better(line, metric, data.kind) else 0
    if done["falling"] < FALLING_EPOCHS:
        return None
    name = f"{data.selection.name} {primary_metric(data.task, data.kind)}"
    warning = (f"warning: {name} {metric:.4f} at epoch {epoch} has stayed under {line:.4f}, half-way from its best "
               f"({best['metric']:.4f}, epoch {best['epoch']}) to a constant predictor's ({floor:.4f}), for "
               f"{FALLING_EPOCHS} epochs: the run is going wrong (lower --lr, or use --max-grad-norm); best/ keeps "
               f"epoch {best['epoch']}")
    done["warnings"] = [warning]
    return f"{run.run_dir.out}: {warning}" if named else warning


def _scores(run: StudentRun, data: RunData) -> tuple[dict[str, float], dict[str, Any]]:
    """The student's scores on the selection split, and (--report-split) its score on the reported split, which
    is never selected on: the test score of whichever epoch is best."""
    s, world = run.stepper, run.stepper.world
    world.sync_buffers(s.student.model)  # each rank's batch-norm statistics: the same model everywhere
    if data.kind == "lm":
        return _lm_scores(run, data)
    scores = evaluate(s.student, data.selection.inputs, data.selection.labels, task=data.task,
                      kind=data.kind, device=s.device, precision=run.cfg.precision,
                      batch_size=run.batch_size, world=world)  # a batch that trains fits in evaluation
    world.merge_seen(data.selection.inputs.check)
    if data.report is None:
        return scores, {}
    report = evaluate(s.student, data.report.inputs, data.report.labels, task=data.task, kind=data.kind,
                      device=s.device, precision=run.cfg.precision, batch_size=run.batch_size, world=world)
    world.merge_seen(data.report.inputs.check)
    return scores, {"report_split": data.report.name, "report_metric": report["metric"]}


def _lm_scores(run: StudentRun, data: RunData) -> tuple[dict[str, float], dict[str, Any]]:
    """A causal-LM student's perplexity, agreement with the teacher and tokens/s on the selection split (and its
    perplexity on --report-split)."""
    s, world = run.stepper, run.stepper.world

    def score(split: Any) -> dict[str, float]:
        if split.teacher_top is None and split.cache is not None:
            split.teacher_top = teacher_top_ids(split.cache)
        result = evaluate_lm(s.student, split.inputs, split.teacher_top, device=s.device,
                             precision=run.cfg.precision, batch_size=run.batch_size, chunk=run.cfg.loss_chunk,
                             world=world)
        world.merge_seen(split.inputs.check)
        return result

    scores = score(data.selection)
    if data.report is None:
        return scores, {}
    return scores, {"report_split": data.report.name, "report_metric": score(data.report)["metric"]}


def _tokens_per_second(data: RunData, rows: int, seconds: float) -> dict[str, float]:
    """A language model's training tokens/s: the epoch's rows times the split's mean window length (exact for a
    whole epoch, which reads every row once)."""
    if data.kind != "lm":
        return {}
    lengths = data.train.inputs.split.dataset.lengths
    tokens = rows * float(np.mean(lengths)) if len(lengths) else 0.0
    return {"tokens_per_second": round(tokens / max(seconds, 1e-9), 1)}


def _unchecked(data: RunData) -> int:
    """Train rows not yet compared with what they must be (a run cut short by --max-steps in its first epoch)."""
    check = data.train.inputs.check
    return int((~check.seen).sum()) if isinstance(check, RowCheck) else 0


def _started(progress: dict[str, Any]) -> None:
    """Start-up, once per process: from its start to the first optimiser step's beginning (the batch decoded and
    on the device; the step's own compute, which depends on the model, is not start-up)."""
    if "startup_seconds" not in progress:
        progress["startup_seconds"] = round(time.time() - process_start_time(), 3)


def _bar(bar: Any, task: Any, epoch: int, n: int, students: int = 1, batch_size: int = 0) -> Any:
    """The progress bar's view of each step: it advances every batch (after its last student's step) but reads
    the loss (a wait for the device) only a few times a second, or (plain lines in a log file) for each line,
    with the samples per second since the last line."""
    last = {"read": 0.0, "line": time.perf_counter(), "steps": 0}
    lines = isinstance(bar, Lines)

    def on_step(i: int, loss: torch.Tensor) -> None:
        if i != students - 1:
            return
        now = time.perf_counter()
        last["steps"] += 1
        if lines and bar.due(task):
            rate = last["steps"] * batch_size / max(now - last["line"], 1e-9)
            last.update(line=now, steps=0)
            bar.update(task, advance=1, rate=f"epoch {epoch}/{n} loss {float(loss.detach()):.4f} "
                                             f"{rate:,.0f} samples/s")
        elif not lines and now - last["read"] > 0.25 and not bar.disable:  # --no-progress: never wait for the device
            last["read"] = now
            bar.update(task, advance=1, rate=f"epoch {epoch}/{n} loss {float(loss.detach()):.4f}")
        else:
            bar.update(task, advance=1)
    return on_step


__all__ = ["fit"]
