"""Recipe: what was trained, side by side (`kdcache runs`), and how good the cached teacher is (`kdcache info`).

    kdcache runs runs/sst2-ckd runs/sst2-vanilla runs/c10-grid --sort best
    kdcache runs runs/ --json

`list_runs` reads run folders (`distill`, `train`, and each run of a `sweep` folder) and gives one row per run:
method, student, key hyper-parameters, seed, the best validation metric and its epoch, the test split's score at
that epoch (`--report-split`), samples/s and wall time. A run still going, or stopped, is read from its
metrics.jsonl. Nothing is loaded but the folders' JSON files, so a hundred runs list in a blink.

`teacher_metrics` scores a cache's stored teacher on each labelled split with the task's metric (what `distill`
reports as `teacher_metric`), reading at most about `MAX_SCORED_VALUES` values per split (whole chunks spread
evenly over a larger split), so `info` stays quick on an ImageNet-sized cache.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from kdcache.errors import KDCacheError

#: The columns of `kdcache runs`, in order; `--sort` takes any of these names.
COLUMNS = ("run", "method", "student", "params", "seed", "metric", "best", "epoch", "test", "samples_s", "wall_s",
           "status")
#: Columns sorted best first (higher is better); every other column ascends. Runs without a value go last.
DESCENDING = ("best", "test", "samples_s")
#: Metric names whose best is the lowest (a language model's perplexity): `best` and `test` ascend for them.
LOWER_IS_BETTER = ("perplexity",)
#: Hyper-parameters named in the `params` column when a run has them, and their short names there (`--json` gives
#: every one under its own name).
KEY_PARAMETERS = {"lr": "lr", "batch_size": "bs", "epochs": "ep", "t_max": "tmax", "margin": "margin",
                  "temperature": "T", "alpha": "alpha"}
#: How deep `kdcache runs DIR` looks for run folders under DIR: a folder of runs, or a folder of sweeps.
SEARCH_DEPTH = 2
#: The largest JSON file of a run folder read (a run's config.json and summary.json hold a few KB).
MAX_JSON_BYTES = 16 * 1024**2
#: About how many teacher values `teacher_metrics` reads per split (64 MiB as float32).
MAX_SCORED_VALUES = 2**24


def list_runs(paths: list[str | Path], sort: str | None = None) -> list[dict[str, Any]]:
    """One row per run folder found at or under `paths` (in the order found, or sorted by the column `sort`), so
    runs of different commands, methods and sweeps compare in one table."""
    if sort is not None and sort not in COLUMNS:
        raise KDCacheError(f"--sort {sort!r} is not a column; choose one of {', '.join(COLUMNS)}")
    folders: dict[Path, str] = {}  # run folder -> its name in the table: its path from the folder named
    for path in map(Path, paths):
        found = _find_runs(path)
        if not found:
            why = "no such folder" if not path.exists() else "not a run folder, and no run folder inside it"
            raise KDCacheError(f"{path}: {why} (a run folder is what distill, train or sweep write: config.json, "
                               "metrics.jsonl, summary.json)")
        for folder in found:
            folders.setdefault(folder, str(folder.relative_to(path.parent)) if path.name else str(folder))
    rows = [{**describe_run(f), "run": name} for f, name in folders.items()]
    if sort is None:
        return rows
    present = [r for r in rows if r[sort] is not None]
    lower = sort in ("best", "test") and present and all(r["metric"] in LOWER_IS_BETTER for r in present)
    ordered = sorted(present, key=lambda r: r[sort], reverse=sort in DESCENDING and not lower)
    return ordered + [r for r in rows if r[sort] is None]


def _find_runs(path: Path, depth: int = SEARCH_DEPTH) -> list[Path]:
    if _is_run(path):
        return [path]
    if depth == 0 or not path.is_dir() or path.is_symlink():
        return []
    return [run for child in sorted(path.iterdir()) for run in _find_runs(child, depth - 1)]


def _is_run(folder: Path) -> bool:
    config = _read_json(folder / "config.json")
    return isinstance(config, dict) and isinstance(config.get("config"), dict) and "hyperparameters" in config


def _read_json(path: Path) -> Any:
    """A run's JSON file, or None when it is absent, too large or not JSON (a run still starting, a foreign file)."""
    try:
        if not path.is_file() or path.stat().st_size > MAX_JSON_BYTES:
            return None
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def describe_run(folder: Path) -> dict[str, Any]:
    """One run as a row: from summary.json when the run finished, else from its metrics lines so far."""
    config = _read_json(folder / "config.json") or {}
    summary = _read_json(folder / "summary.json")
    summary = summary if isinstance(summary, dict) else None
    settings = config.get("config") or {}
    hp = (summary or {}).get("hyperparameters") or config.get("hyperparameters") or {}
    lines = _metric_lines(folder / "metrics.jsonl")
    if summary is not None:
        best, epoch = summary.get("best_metric"), summary.get("best_epoch")
        metric, test = summary.get("metric_name"), summary.get("report_metric_at_best")
        speed, wall = summary.get("samples_per_second"), summary.get("wall_seconds")
        done, total = summary.get("epochs_done"), summary.get("epochs")
        status = "complete" if summary.get("complete") else f"stopped {done}/{total}"
    else:
        scored = [r for r in lines if _number(r.get("metric")) is not None]
        pick = min if scored and scored[-1].get("metric_name") in LOWER_IS_BETTER else max
        top = pick(scored, key=lambda r: r["metric"], default=None)  # higher is better but for perplexity
        best, epoch = (top["metric"], top["epoch"]) if top else (None, None)
        metric, test = (top or {}).get("metric_name"), (top or {}).get("report_metric")
        speed = lines[-1].get("samples_per_second") if lines else None
        wall = round(sum(_number(r.get("seconds")) or 0 for r in lines), 3) if lines else None
        status = f"unfinished {len(lines)}/{hp.get('epochs', '?')}"
    student = str((summary or {}).get("student") or settings.get("student") or "")
    if "/" in student:  # a folder: its name, and its parent's where the name says little (model/, best/)
        student = "/".join(Path(student).parts[-2:]) if Path(student).name in ("model", "best") else Path(student).name
    layers = (summary or {}).get("student_layers") or settings.get("student_layers")
    return {
        "run": str(folder), "path": str(folder.resolve()), "method": (summary or {}).get("method") or settings.get("method"),
        "student": f"{student} ({layers} layers)" if layers else student or None,
        "params": " ".join(f"{short}={_short(hp[k])}" for k, short in KEY_PARAMETERS.items() if hp.get(k) is not None),
        "seed": settings.get("seed"), "metric": metric, "best": _number(best), "epoch": epoch, "test": _number(test),
        "samples_s": _number(speed), "wall_s": _number(wall), "status": status,
        "task": (summary or {}).get("task") or settings.get("task"), "cache": settings.get("cache") or
        (summary or {}).get("cache"), "validation_split": (summary or {}).get("validation_split"),
        "test_split": (summary or {}).get("report_split") or (settings.get("report_split")),
        "teacher_metric": (summary or {}).get("teacher_metric"), "hyperparameters": hp,
    }


def _metric_lines(path: Path) -> list[dict[str, Any]]:
    try:
        text = path.read_text(errors="replace") if path.is_file() else ""
    except OSError:
        return []
    lines = []
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a torn last line of a run that is still writing
        if isinstance(record, dict) and isinstance(record.get("epoch"), int):
            lines.append(record)
    return lines


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) \
        and math.isfinite(value) else None


def _short(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def teacher_metrics(location: Any, storage_options: dict[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """The cached teacher's score on each complete split that has labels, with the task's metric, so a cache of a
    teacher no better than chance is seen before any student is distilled from it (none for a token-level cache)."""
    import numpy as np

    from kdcache.cache.reader import Cache
    from kdcache.methods.targets import teacher_scores
    from kdcache.train.metrics import compute_metrics, primary_metric

    cache = Cache(location, allow_incomplete=True, storage_options=storage_options)
    task = cache.header.task
    scores: dict[str, dict[str, Any]] = {}
    for name in cache.splits:
        if cache.root[name].attrs.get("complete") is not True:
            continue
        split = cache.split(name)
        if split.target.positions:  # a language model's windows: its label is the next window's first token, no
            continue  # task metric (perplexity needs the targets at every position: issue 22's students)
        n, step = len(split), split.chunk_rows
        budget = max(step, MAX_SCORED_VALUES // max(int(split.num_outputs), 1))
        chunks = -(-n // step)
        picked = range(chunks) if n <= budget else np.unique(np.linspace(0, chunks - 1, max(budget // step, 1))
                                                              .round().astype(int))
        ranges = [(int(c) * step, min(n, (int(c) + 1) * step)) for c in picked]
        labels = np.concatenate([split.read("labels", a, b) for a, b in ranges]) if ranges else np.zeros(0)
        labelled = ~np.isnan(labels) if task.kind == "regression" else labels != -1
        if not labelled.any():
            continue
        outputs = np.concatenate([teacher_scores(split, "logits", a, b) for a, b in ranges])
        metrics = compute_metrics(outputs, labels, task=task.name or "", kind=task.kind)
        scores[name] = {"metric_name": primary_metric(task.name or "", task.kind), "metric": metrics["metric"],
                        "rows_scored": int(labelled.sum()), "rows": n}
    return scores


__all__ = ["COLUMNS", "describe_run", "list_runs", "teacher_metrics"]
