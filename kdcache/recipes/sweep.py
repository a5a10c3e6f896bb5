"""Recipe: many students from one pass over a teacher cache (`kdcache sweep`).

    kdcache sweep --cache c10.kdcache --student resnet8 --grid margin=0,0.5,1 --grid t-max=5,10 --seeds 0,1,2 \
        --out runs/margins
    kdcache sweep --cache sst2.kdcache --student bert-4layer.json --sweep-file grid.yaml --out runs/sst2

A sweep is the runs `distill` would make, one per point of the grid and seed, each in `OUT/<name>/` with the
files a lone run writes. The data is read once, and students that share a seed and a batch size (so the same
batches: the order depends on (seed, epoch) alone) are stepped together on each batch: decoded, checked against
the cache and moved to the device once, the teacher's rows gathered once. Each student keeps its own random stream
(swapped in for its steps), so its metrics equal those of a lone `distill` with the same flags and seed. At the end,
`results.csv` and `results.md` (mean and spread over seeds per grid point) and `results.png` (the metric against
each swept value) sum the sweep up. `--resume` continues every run where it stopped.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import itertools
import json
import math
import os
import shutil
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kdcache.errors import KDCacheError
from kdcache.runtime import resolve_device
from kdcache.train.config import HYPERPARAMETERS, DistillConfig
from kdcache.train.dist import World
from kdcache.train.run_dir import not_a_run, rng_state, run_folder_lock
from kdcache.train.fit import fit
from kdcache.train.run import (StudentRun, attach_targets, build_run, close_run, load_data, method_for, open_folder,
                               targets_plan)

#: DistillConfig fields a sweep may vary: what a run computes, never where its data lies.
SWEEPABLE = (*HYPERPARAMETERS, "method", "reduction", "phi_on", "topk_tail", "schedule_unit", "kd_loss", "phase_epochs",
             "layer_map", "checkpoint", "student", "student_layers", "preset")
#: Flags whose values hold commas: swept from a sweep file's lists, not `--grid NAME=V1,V2`.
COMMA_VALUES = ("phase_epochs", "layer_map")
#: The most runs one sweep may hold, counted before any is expanded: a few bytes of grid can describe 10^10.
MAX_RUNS = 10_000
#: The largest sweep file read: a sweep is a few lines, and YAML aliases are refused (they expand without bound).
MAX_SWEEP_FILE_BYTES = 1024**2


@dataclass
class SweepConfig:
    """A sweep: the flags every run shares (`base`, whose `out` is the sweep's folder) and what varies."""

    base: DistillConfig
    grid: dict[str, list[Any]] = field(default_factory=dict)  # DistillConfig field -> values, crossed
    seeds: list[int] = field(default_factory=lambda: [0])
    runs: list[dict[str, Any]] | None = None  # or explicit runs (a sweep file's `runs:`), each with its own seed


def parse_grid(items: list[str]) -> dict[str, list[Any]]:
    """`NAME=V1,V2,...` flags (a flag's name, with dashes) as DistillConfig fields and typed values."""
    grid: dict[str, list[Any]] = {}
    for item in items:
        name, sep, values = item.partition("=")
        if not sep or not values.strip():
            raise KDCacheError(f"--grid {item!r}: expected NAME=V1,V2,... (e.g. --grid margin=0,0.5,1)")
        key = _field(name)
        if key in COMMA_VALUES:
            raise KDCacheError(f"--grid {name}: its values hold commas (5,5 or 2:1,4:2); list them in a --sweep-file "
                               f"(grid: {{{name.strip().lstrip('-')}: [\"5,5\", \"3,7\"]}})")
        if key in grid:
            raise KDCacheError(f"--grid {name}: given twice; list every value in one --grid")
        grid[key] = [_typed(key, v.strip()) for v in values.split(",")]
    return grid


def parse_seeds(text: str | None) -> list[int]:
    if not text:
        return [0]
    try:
        seeds = [int(s) for s in text.split(",")]
    except ValueError:
        raise KDCacheError(f"--seeds {text!r}: expected integers separated by commas, e.g. 0,1,2") from None
    from kdcache import names

    for seed in seeds:
        names.check_numbers(seed=seed)
    if len(set(seeds)) != len(seeds):
        raise KDCacheError(f"--seeds {text!r}: a seed is listed twice")
    return seeds


def read_sweep_file(path: Path) -> tuple[dict[str, list[Any]], list[int] | None, list[dict[str, Any]] | None]:
    """A sweep file (YAML or JSON): `grid: {name: [values]}`, `seeds: [..]`, and/or `runs: [{name: value, ...}]`
    for anything irregular (each run may carry its own `seed`)."""
    text = _read_bounded(Path(path))
    try:
        if Path(path).suffix == ".json":
            spec = json.loads(text)
        else:
            import yaml

            if any(isinstance(event, yaml.AliasEvent) for event in yaml.parse(text, Loader=yaml.SafeLoader)):
                raise KDCacheError(f"{path}: YAML aliases (*name) are not accepted in a sweep file (they can expand "
                                   "without bound); write the values out")
            spec = yaml.safe_load(text)
    except KDCacheError:
        raise
    except Exception as exc:  # noqa: BLE001 - json's ValueError or yaml's YAMLError: one line naming the file
        raise KDCacheError(f"{path}: not a sweep file ({_short(str(exc).splitlines()[0] if str(exc) else exc)})") from None
    if not isinstance(spec, dict) or not set(spec) <= {"grid", "seeds", "runs"} or not spec:
        raise KDCacheError(f"{path}: a sweep file is a mapping with `grid`, `seeds` and/or `runs`")
    grid = {}
    if not isinstance(spec.get("grid") or {}, dict):
        raise KDCacheError(f"{path}: `grid` must be a mapping of flag to a list of values")
    for name, values in (spec.get("grid") or {}).items():
        values = values if isinstance(values, list) else [values]
        grid[_field(name)] = [_typed(_field(name), str(v)) for v in values]
    seeds = spec.get("seeds")
    if seeds is not None:
        seeds = parse_seeds(",".join(map(str, seeds if isinstance(seeds, list) else [seeds])))
    runs = None
    if spec.get("runs") is not None:
        if not isinstance(spec["runs"], list) or not all(isinstance(r, dict) for r in spec["runs"]):
            raise KDCacheError(f"{path}: `runs` must be a list of mappings of flag to value")
        runs = [{(k if k == "seed" else _field(str(k))): (_seed(v, path) if k == "seed" else _typed(_field(str(k)), str(v)))
                 for k, v in run.items()} for run in spec["runs"]]
    return grid, seeds, runs


def _read_bounded(path: Path) -> str:
    """The sweep file's text, read only if it is a regular file of at most MAX_SWEEP_FILE_BYTES (a FIFO or a link
    to /dev/zero would otherwise hang or fill the memory)."""
    import stat

    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise KDCacheError(f"{path}: not a regular file; a sweep file is a YAML or JSON file")
            if info.st_size > MAX_SWEEP_FILE_BYTES:
                raise KDCacheError(f"{path}: {info.st_size:,} bytes, more than a sweep file's limit of "
                                   f"{MAX_SWEEP_FILE_BYTES:,}")
            data = os.read(fd, MAX_SWEEP_FILE_BYTES + 1)
        finally:
            os.close(fd)
        return data.decode("utf-8")
    except OSError as exc:
        raise KDCacheError(f"{path}: cannot read the sweep file ({(exc.strerror or str(exc)).lower()})") from None
    except UnicodeDecodeError:
        raise KDCacheError(f"{path}: not a sweep file (not UTF-8 text)") from None


def _seed(value: Any, path: Path) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise KDCacheError(f"{path}: a run's seed must be an integer, got {_short(repr(value))}")
    return value


def _short(text: str, limit: int = 80) -> str:
    """A value quoted in an error line, cut so that a hostile input cannot make the line itself huge."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text):,} characters)"


def _field(name: str) -> str:
    key = name.strip().lstrip("-").replace("-", "_")
    if key not in SWEEPABLE:
        raise KDCacheError(f"--grid {name}: not a flag a sweep can vary; choose from "
                           f"{', '.join(k.replace('_', '-') for k in SWEEPABLE)}")
    return key


def _typed(key: str, value: str) -> Any:
    kind = {f.name: str(f.type) for f in dataclasses.fields(DistillConfig)}[key]
    try:
        if kind.startswith("int"):
            return int(value)
        if kind.startswith("float"):
            return float(value)
    except ValueError:
        what = "an integer" if kind.startswith("int") else "a number"
        raise KDCacheError(f"--grid {key.replace('_', '-')}={_short(value)}: {_short(repr(value))} is not {what}") from None
    return value


def expand(cfg: SweepConfig) -> list[tuple[str, dict[str, Any]]]:
    """(name, overrides) of every run: the grid crossed with the seeds, or the explicit runs."""
    if cfg.runs is not None:
        if cfg.grid:
            raise KDCacheError("a sweep file's runs: list every run; a grid (grid: or --grid) cannot be crossed with "
                               "it: put the grid's values into the runs")
        # a run with its own seed is that run; a run without one is run once per seed
        count = sum(1 if "seed" in run else len(cfg.seeds or [cfg.base.seed]) for run in cfg.runs)
        if count > MAX_RUNS:
            raise KDCacheError(f"the sweep lists {count:,} runs, more than the limit of {MAX_RUNS:,}; split it")
        points = [dict(run) if "seed" in run else {**run, "seed": seed}
                  for run in cfg.runs for seed in ([None] if "seed" in run else cfg.seeds or [cfg.base.seed])]
    else:
        keys = list(cfg.grid)
        count = math.prod(len(cfg.grid[k]) for k in keys) * len(cfg.seeds)
        if count > MAX_RUNS:
            raise KDCacheError(f"the sweep describes {count:,} runs ({' x '.join(str(len(cfg.grid[k])) for k in keys)} "
                               f"values x {len(cfg.seeds)} seeds), more than the limit of {MAX_RUNS:,}; split it")
        points = [{**dict(zip(keys, values)), "seed": seed}
                  for values in itertools.product(*(cfg.grid[k] for k in keys)) for seed in cfg.seeds]
    named = [(_name(point), point) for point in points]
    names = [name for name, _ in named]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise KDCacheError(f"the sweep lists the run {twice[0]} more than once")
    return named


def _name(point: dict[str, Any]) -> str:
    """A folder name that says what the run is: `margin-0.5_t-max-5_seed-0`."""
    parts = [f"{k.replace('_', '-')}-{Path(str(v)).name if k == 'student' else v}" for k, v in point.items()]
    return "_".join(parts).replace("/", "-").replace(" ", "")


def sweep(cfg: SweepConfig) -> list[dict[str, Any]]:
    """Run every student of the sweep; returns their summaries (also in OUT/<name>/summary.json and the tables)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise KDCacheError("sweep runs in one process: launch it without torchrun (distill takes torchrun)")
    out = Path(cfg.base.out)
    named = expand(cfg)
    spec = {"grid": cfg.grid, "seeds": cfg.seeds, "runs": cfg.runs, "names": [name for name, _ in named]}
    with contextlib.ExitStack() as held:  # the sweep's folder and each of its runs', this process's alone
        held.enter_context(run_folder_lock(out, "sweep folder"))
        _prepare_folder(out, spec, held, resume=cfg.base.resume, overwrite=cfg.base.overwrite)
        return _sweep(cfg, out, named, spec)


def _sweep(cfg: SweepConfig, out: Path, named: list[tuple[str, dict[str, Any]]], spec: dict[str, Any]
           ) -> list[dict[str, Any]]:
    """The sweep in its folder, once this process holds it and every run's."""
    world, device = World(), resolve_device(cfg.base.device)
    for method in dict.fromkeys(point.get("method", cfg.base.method) for _, point in named):
        method_for(dataclasses.replace(cfg.base, method=method))  # one the cache cannot serve: before the data

    # 1. The data, once for every run (a grid never varies where the data lies).
    data = load_data(cfg.base, world, device)

    # 2. Every student built and its method set up before any trains: a method that needs arrays the cache lacks
    #    stops the sweep here, with one line.
    runs: list[StudentRun] = []
    for name, point in named:
        run_cfg = dataclasses.replace(cfg.base, **point, out=out / name, overwrite=False,
                                      resume=(out / name / "config.json").is_file())
        try:
            runs.append(build_run(run_cfg, data, world, device))
        except KDCacheError as exc:
            raise KDCacheError(f"sweep run {name}: {exc}") from None
        runs[-1].progress["rng"] = rng_state()  # its own random stream, as a lone run's after this point
    (out / "sweep.json").write_text(json.dumps(spec, indent=2, default=str) + "\n")
    for run in runs:
        open_folder(run, data)
        if run.state is not None:  # resumed: the stream its interrupted run saved
            run.progress["rng"] = run.state["rng"]

    # 3. Students that see the same batches train together: same seed, batch size, epochs, and teacher targets
    #    held the same way (memory or windows of chunks: the order depends on it), as each would be alone.
    groups: dict[tuple, list[StudentRun]] = {}
    for run in runs:
        groups.setdefault((run.cfg.seed, run.batch_size, run.epochs, targets_plan(run, data)), []).append(run)
    summaries: dict[str, dict[str, Any]] = {}
    for group in groups.values():
        _as_if_alone(data, group[0].cfg)
        attach_targets(group, data)
        fit(group, data, progress=cfg.base.progress, where=f"{out} (every run's last.pt)")
        for run in group:
            summaries[run.run_dir.out.name] = close_run(run, data)
            run.stepper = run.targets = run.order = run.state = None  # this group's memory, freed for the next

    # 4. The tables.
    ordered = [(name, point, summaries[name]) for name, point in named]
    write_results(out, ordered, list(cfg.grid) if cfg.runs is None else sorted({k for _, p in named for k in p} - {"seed"}))
    return [summary for _, _, summary in ordered]


def _as_if_alone(data: Any, cfg: DistillConfig) -> None:
    """The shared inputs as a lone run of this group would read them: its seed draws the augmented views, and
    with --max-steps a group checks (and counts as unchecked) only the rows it reads itself, so a cut run keeps a
    model exactly when its lone run would."""
    inputs = data.train.inputs
    inputs.seed = cfg.seed
    if cfg.max_steps is not None:
        inputs.forget()


def _prepare_folder(out: Path, spec: dict[str, Any], held: contextlib.ExitStack, *, resume: bool,
                    overwrite: bool) -> None:
    """The sweep's folder checked (a resume of this very sweep, or a fresh or replaceable folder), each of its runs'
    folders locked in `held`, and the folder emptied when replacing it (but for the locks held, so no other process
    can take a run meanwhile)."""
    recorded = out / "sweep.json"
    if resume:
        if recorded.is_file():
            old = json.loads(recorded.read_text())
            if old.get("names") != spec["names"]:
                raise KDCacheError(f"{recorded}: a sweep of other runs; resume it with the same --grid, --seeds and "
                                   "sweep file, or start a new --out")
        _lock_runs(out, spec["names"], held)
        return
    replace = out.exists() and any(out.iterdir())
    if replace:
        if not overwrite:
            raise KDCacheError(f"{out}: already holds a sweep or a run; pass --resume to continue it or --overwrite "
                               "to replace it")
        why = not_a_sweep(out)
        if why:
            raise KDCacheError(f"{out}: refusing to overwrite: not a kdcache sweep folder ({why}); nothing was "
                               "deleted: choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    names = list(dict.fromkeys(spec["names"] + (_names(out) if replace else [])))  # the old runs too: deleted
    _lock_runs(out, names, held)
    if replace:
        for entry in out.iterdir():
            if entry.name not in {f"{name}.lock" for name in names}:
                shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()


def _lock_runs(out: Path, names: list[str], held: contextlib.ExitStack) -> None:
    for name in names:
        held.enter_context(run_folder_lock(out / name))


def _names(out: Path) -> list[str]:
    """The runs a sweep's sweep.json lists."""
    return json.loads((out / "sweep.json").read_text())["names"]


#: What a sweep writes at the top of its folder beside its runs' folders (and their locks).
SWEEP_ENTRIES = frozenset({"sweep.json", "results.csv", "results.md", "results.png"})


def not_a_sweep(out: Path) -> str | None:
    """Why `out` is not a sweep's folder that --overwrite may delete (None when it is one): its sweep.json lists its
    runs, each a run folder, and it holds nothing else a sweep never writes."""
    if out.is_symlink():
        return "it is a symbolic link"
    try:
        spec = json.loads((out / "sweep.json").read_text())
    except FileNotFoundError:
        return "it has no sweep.json"
    except (OSError, ValueError):
        spec = None
    if (not isinstance(spec, dict) or set(spec) != {"grid", "seeds", "runs", "names"}
            or not isinstance(spec["names"], list) or not all(isinstance(n, str) and n for n in spec["names"])):
        return "its sweep.json is not a kdcache sweep's"
    names = spec["names"]
    known = SWEEP_ENTRIES | set(names) | {f"{name}.lock" for name in names}
    foreign = sorted(p.name for p in out.iterdir() if p.name not in known)
    if foreign:
        more = f" and {len(foreign) - 3} more" if len(foreign) > 3 else ""
        return f"it holds what a sweep never writes: {', '.join(foreign[:3])}{more}"
    for name in names:
        run = out / name
        if run.is_symlink() or (run.exists() and (not run.is_dir() or any(run.iterdir()))):
            why = not_a_run(run)
            if why:
                return f"its run {name}: {why}"
    return None


def write_results(out: Path, rows: list[tuple[str, dict[str, Any], dict[str, Any]]], swept: list[str]) -> None:
    """results.csv (one row a run), results.md (mean and spread over seeds per grid point) and results.png."""
    columns = ["run", *swept, "seed", "best_metric", "best_epoch", "last_metric", "samples_per_second"]
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        for name, point, summary in rows:
            writer.writerow([name, *(point.get(k) for k in swept), point.get("seed"),
                             *(summary.get(k) for k in columns[len(swept) + 2:])])
    metric = next((s["metric_name"] for _, _, s in rows if s.get("metric_name")), "metric")
    groups: dict[tuple, list[float]] = {}
    for _, point, summary in rows:
        value = summary.get("best_metric")
        groups.setdefault(tuple(point.get(k) for k in swept), []).append(value)
    lines = [f"| {' | '.join(k.replace('_', '-') for k in swept) or 'run'} | seeds | best {metric}: mean | sd | min | max |",
             "|" + "---|" * (len(swept or ['run']) + 5)]
    for key, values in groups.items():
        got = [v for v in values if v is not None]
        mean = f"{statistics.fmean(got):.4f}" if got else "-"
        sd = f"{statistics.stdev(got):.4f}" if len(got) > 1 else "-"
        low, high = (f"{min(got):.4f}", f"{max(got):.4f}") if got else ("-", "-")
        shown = ["-" if v is None else str(v) for v in key]
        lines.append(f"| {' | '.join(shown) or 'all'} | {len(values)} | {mean} | {sd} | {low} | {high} |")
    (out / "results.md").write_text(f"Best validation {metric} of each run, over seeds per grid point "
                                    f"(results.csv has every run).\n\n" + "\n".join(lines) + "\n")
    _plot(out / "results.png", groups, swept, metric)


def _plot(path: Path, groups: dict[tuple, list[float]], swept: list[str], metric: str) -> None:
    """The metric against each swept value (mean over the other values and seeds, with the spread as bars);
    skipped without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    if not swept:
        return
    fig, axes = plt.subplots(1, len(swept), figsize=(4 * len(swept), 3.2), squeeze=False)
    for ax, (i, key) in zip(axes[0], enumerate(swept)):
        by_value: dict[Any, list[float]] = {}
        for point, values in groups.items():
            by_value.setdefault(point[i], []).extend(v for v in values if v is not None)
        labels = list(by_value)
        means = [statistics.fmean(v) if v else float("nan") for v in by_value.values()]
        spread = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in by_value.values()]
        ax.errorbar(range(len(labels)), means, yerr=spread, marker="o", capsize=3)
        ax.set_xticks(range(len(labels)), [str(v) for v in labels])
        ax.set_xlabel(key.replace("_", "-"))
        ax.set_ylabel(f"best {metric}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


__all__ = ["SWEEPABLE", "SweepConfig", "expand", "not_a_sweep", "parse_grid", "parse_seeds", "read_sweep_file", "sweep",
           "write_results"]
