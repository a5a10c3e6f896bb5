"""`kdcache` command line. Each command parses flags, calls one library function and reports.

    kdcache demo                                   # the embedded default: digits teacher -> cache -> info
    kdcache cache-teacher --teacher T --data D --task TASK --split train --out CACHE
    kdcache info CACHE [--json]
    kdcache distill --cache CACHE --student S --method continuation --epochs N --out RUN_DIR
    kdcache train --model M --task TASK --data D --epochs N --out RUN_DIR
    kdcache runs RUN_DIR... [--sort best] [--json]  # runs side by side, one line each

Errors print one line (`error: ...`) and exit 1; `kdcache --debug ...` shows the traceback instead.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import os
import shutil
import signal
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from kdcache.cli import options as o
from kdcache.errors import Interrupted, KDCacheError, SharedError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None,
                  # plain help, wrapped at the terminal's width (80 columns when there is none)
                  context_settings={"max_content_width": shutil.get_terminal_size((80, 24)).columns},
                  help="Knowledge distillation from an offline teacher cache.")
_state: dict[str, Any] = {"debug": False, "signal": None}
_out = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 160)


@contextlib.contextmanager
def _interrupts():
    """Ctrl-C prints what the recipe kept and how to continue, then exits 130 (Typer alone would exit silently);
    SIGTERM (a preempted job) is the same stop, said as such, exit 143. Under torchrun rank 0 alone says it."""
    try:
        yield
    except KeyboardInterrupt as exc:
        stopped = _state.get("signal")
        if os.environ.get("RANK", "0") == "0":
            said = str(exc).removeprefix("interrupted ") if isinstance(exc, Interrupted) else ""
            print(f"{'stopped by ' + stopped if stopped else 'interrupted'}{': ' + said if said else ''}",
                  file=sys.stderr)
        raise typer.Exit(143 if stopped else 130) from None


def _terminated(signum: int, frame: Any) -> None:
    """SIGTERM raises what Ctrl-C raises, so every recipe stops the way it stops for Ctrl-C: what it kept is kept
    (last.pt, the chunks stored) and it says how to continue."""
    _state["signal"] = signal.Signals(signum).name
    signal.signal(signum, signal.SIG_DFL)  # a second SIGTERM, while the run winds down, ends it at once
    raise KeyboardInterrupt


def _version(value: bool) -> None:
    if value:
        from kdcache import __version__

        print(f"kdcache {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks instead of one-line errors.")] = False,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")] = False,
) -> None:
    _state["debug"] = debug


_WHAT = {"--teacher": "teacher folder", "--weights": "weights file", "--student": "student folder or config file",
         "--model": "model folder or config file", "--cache": "cache", "--data": "file or folder (the dataset)",
         "--tokenizer": "tokenizer folder"}


def _exists(flag: str, value: Any) -> None:
    """A path-like flag (a folder, a file, a local cache) must exist; a URL is checked when it is opened."""
    if value is None or "://" in str(value):
        return
    text = str(value)
    if ":" in text.split("/", 1)[0] and not Path(text).expanduser().exists():
        return  # 's3:bucket/x': the store says why this is neither a path nor a URL
    if ("/" in text or text.startswith(".") or text.endswith((".json", ".tsv", ".csv", ".jsonl", ".npz", ".zip"))) \
            and not Path(text).expanduser().exists():
        raise KDCacheError(f"{text}: no such {_WHAT.get(flag, 'file or folder')} ({flag})")


def _check_training(**flags: Any) -> None:
    """The flags of distill and train, checked before anything heavy is imported (a typo costs no seconds)."""
    from kdcache import names
    from kdcache.methods.schedules import parse_psi

    for flag, choices in (("method", names.METHODS), ("kd_loss", names.KD_LOSSES), ("preset", names.PRESETS),
                          ("stream", names.STREAM_MODES), ("precision", names.PRECISIONS),
                          ("optimizer", names.OPTIMIZERS), ("lr_schedule", names.LR_SCHEDULES),
                          ("reduction", names.REDUCTIONS), ("schedule_unit", names.SCHEDULE_UNITS),
                          ("augment", names.AUGMENTS), ("task", names.TASKS), ("phi_on", names.PHI_ON),
                          ("topk_tail", names.TOPK_TAILS)):
        names.check(f"--{flag.replace('_', '-')}", flags.get(flag), choices)
    if flags.get("psi") is not None:
        parse_psi(flags["psi"])
    for flag in ("cache", "student", "model", "data", "tokenizer"):
        _exists(f"--{flag}", flags.get(flag))
    names.check_numbers(**flags)  # finite and in range: lr, seed, warmup-ratio, epochs, ...
    for flag in ("memory_budget", "keep_inputs"):
        if flags.get(flag) is not None:
            names.parse_budget(flags[flag], f"--{flag.replace('_', '-')}")


def _command() -> str:
    """The command line to record, secrets removed (imported late: the CLI starts without torch)."""
    from kdcache.runtime import command_line

    return command_line()


def _storage(items: list[str] | None) -> dict[str, Any]:
    from kdcache.cache.store import parse_storage_options

    return parse_storage_options(items)


def _data_options(**flags: Any) -> Any:
    """The reading flags shared by cache-teacher and train, as the loaders' options."""
    from kdcache.data import DataOptions

    names = flags.pop("label_names")
    return DataOptions(**flags, label_names=[n.strip() for n in names.split(",")] if names else None)


@app.command("cache-teacher")
def cache_teacher_cmd(
    task: o.Task, out: o.CacheOut,
    teacher: Annotated[Optional[str], typer.Option(help="HF model folder, kdcache model folder, or architecture name "
                                                        "(with --weights); default with --checkpoints: the last "
                                                        "checkpoint.")] = None,
    data: o.Data = None,
    split: Annotated[list[str], typer.Option(help="Split to cache; repeat for several (train, validation, test).")] = ["train"],
    weights: o.Weights = None, tokenizer: o.Tokenizer = None,
    batch_size: o.TeacherBatchSize = 64,
    device: o.Device = "auto",
    dtype: Annotated[str, typer.Option(help="Stored logits dtype: float16 or float32.")] = "float16",
    precision: o.Precision = "fp32", overwrite: o.Overwrite = False,
    resume: Annotated[bool, typer.Option(help="Finish an interrupted cache at --out (also done by default when its "
                                              "settings match).")] = False,
    codec: Annotated[Optional[str], typer.Option(help="Logits codec (see docs/cache-format.md).")] = None,
    chunk_rows: Annotated[Optional[int], typer.Option(help="Rows per chunk (default: about 512 KiB of logits).")] = None,
    workers: Annotated[Optional[int], typer.Option(help="DataLoader worker processes (default: auto).")] = None,
    max_length: o.MaxLength = 128, text_column: o.TextColumn = None, text_pair_column: o.TextPairColumn = None,
    label_column: o.LabelColumn = None, label_names: o.LabelNames = None, regression: o.Regression = False,
    normalize: o.Normalize = None, image_size: o.ImageSize = None, limit: o.Limit = None, subset: o.Subset = None,
    holdout: o.Holdout = None, holdout_test: o.HoldoutTest = None, seq_len: o.SeqLen = None,
    checkpoints: Annotated[Optional[list[str]], typer.Option(help="Teacher checkpoint folders or a glob "
                                                                  "('run/checkpoints/epoch-*'), stored in training "
                                                                  "order for Pro-KD; repeatable.")] = None,
    hidden_layers: Annotated[Optional[str], typer.Option(help="Teacher layers to store random projections of "
                                                              "(curriculum extraction): numbers (2,4,6) or module "
                                                              "names.")] = None,
    proj_dim: Annotated[Optional[int], typer.Option(help="With --hidden-layers: dimension D of each projection.")] = None,
    proj_seed: Annotated[int, typer.Option(help="With --hidden-layers: seed of the Gaussian projection matrices.")] = 0,
    topk: o.TopK = None, lse_temperatures: o.LseTemperatures = None, dense_fallback: o.DenseFallback = True,
    sample_tokens: o.SampleTokens = None, sample_temperature: o.SampleTemperature = 1.0, sample_seed: o.SampleSeed = 0,
    views: o.Views = None, augment: o.ViewAugment = None, view_seed: o.ViewSeed = 0,
    trust_model_code: o.TrustModelCode = False, storage_option: o.StorageOption = None, progress: o.Progress = True,
) -> None:
    """Run a teacher once over a dataset and store its outputs (dense, top-k or sampled) in a Zarr cache."""
    from kdcache import names

    names.check("--task", task, names.TASKS)
    names.check("--dtype", dtype, names.LOGIT_DTYPES)
    names.check("--precision", precision, names.PRECISIONS)
    names.check_numbers(batch_size=batch_size, chunk_rows=chunk_rows, workers=workers, max_length=max_length,
                        image_size=image_size, limit=limit, subset=subset, holdout=holdout, proj_dim=proj_dim,
                        holdout_test=holdout_test, proj_seed=proj_seed, seq_len=seq_len, views=views,
                        view_seed=view_seed)
    for flag, value in (("--teacher", teacher), ("--data", data), ("--weights", weights), ("--tokenizer", tokenizer)):
        _exists(flag, value)
    from kdcache.cache import codecs
    from kdcache.cache.info import describe_cache
    from kdcache.cache.targets import parse_temperatures
    from kdcache.recipes.cache_teacher import CacheTeacherConfig, cache_teacher

    temperatures = tuple(parse_temperatures(lse_temperatures)) if lse_temperatures is not None else None
    options = _data_options(max_length=max_length, text_column=text_column, text_pair_column=text_pair_column,
                            label_column=label_column, label_names=label_names, regression=regression,
                            normalize=normalize, image_size=image_size, limit=limit, subset=subset, holdout=holdout,
                            holdout_test=holdout_test, seq_len=seq_len)
    storage = _storage(storage_option)
    cfg = CacheTeacherConfig(
        teacher=teacher, task=task, out=out, data=data, splits=tuple(split), weights=str(weights) if weights else None,
        tokenizer=tokenizer, batch_size=batch_size, device=device, dtype=dtype, precision=precision,
        overwrite=overwrite, resume=resume, codec=codec or codecs.DEFAULT_CODEC, chunk_rows=chunk_rows, workers=workers,
        data_options=options, progress=progress, command=_command(),
        checkpoints=tuple(checkpoints or ()), hidden_layers=hidden_layers, proj_dim=proj_dim, proj_seed=proj_seed,
        trust_model_code=trust_model_code, storage_options=storage, topk=topk, lse_temperatures=temperatures,
        dense_fallback=dense_fallback, sample_tokens=sample_tokens, sample_temperature=sample_temperature,
        sample_seed=sample_seed, views=views, augment=augment, view_seed=view_seed)
    with _interrupts():
        location = cache_teacher(cfg)
    if os.environ.get("RANK", "0") != "0":  # torchrun: rank 0 reports for the capture
        return
    summary = describe_cache(location, storage)
    for s in summary["splits"]:
        rate = (summary["throughput"] or {}).get(s["name"], {}).get("rows_per_second")
        target = summary["target"]
        kind = "" if target["kind"] == "dense" else f" stored as {target['description']}"
        size = f"{s['bytes_per_token']} bytes/token" if s.get("bytes_per_token") else \
            f"{s['bytes_per_sample']} bytes/sample"
        _out.print(f"cached {s['name']}: {s['rows']} rows x {target['outputs']} outputs{kind}, {size}, {rate} rows/s")
    _out.print(f"wrote {location}")


@app.command("info")
def info_cmd(cache: o.CacheArg, as_json: o.Json = False, storage_option: o.StorageOption = None) -> None:
    """Show what a cache holds: splits, shapes, teacher (and its score on each labelled split), dataset, size and
    completeness."""
    from kdcache.cache.info import describe_cache
    from kdcache.recipes.compare import teacher_metrics

    summary = describe_cache(cache, _storage(storage_option))
    scores = teacher_metrics(cache, _storage(storage_option))
    for split in summary["splits"]:
        split["teacher_metric"] = scores.get(split["name"])
    if as_json:
        print(json.dumps(summary, indent=2))
        return
    _print_info(summary)


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


#: `kdcache info` names this many labels, then counts the rest (a 1000-class cache is not 1,000 names long)
_LABELS_SHOWN = 8


def _labels(names: list | None) -> str:
    """A cache's label names in one short line: all of a few, the first few and the count of many."""
    if not names:
        return "-"
    if len(names) <= _LABELS_SHOWN:
        return ", ".join(map(str, names))
    return f"{', '.join(map(str, names[:_LABELS_SHOWN]))}, ... ({len(names)} labels)"


def _print_info(s: dict) -> None:
    teacher, task, storage = s.get("teacher") or {}, s.get("task") or {}, s.get("storage") or {}
    status = "[green]complete[/]" if s["complete"] else "[red]INCOMPLETE (not usable)[/]"
    _out.print(f"[bold]{s['path']}[/]  {s['format']} v{s['format_version']}  {status}")
    _out.print(f"teacher  {teacher.get('spec')}  ({teacher.get('source')}, {teacher.get('class')}, "
               f"{teacher.get('num_outputs')} outputs, sha256 {str(teacher.get('sha256'))[:16]}...)")
    _out.print(f"task     {task.get('name')} ({task.get('kind')}), labels: {_labels(task.get('label_names'))}")
    target = s.get("target") or {}
    _out.print(f"target   {target.get('description')}")
    tokens = s.get("tokens")
    if tokens:
        sha = str(tokens.get("tokenizer_sha256"))[:16]
        _out.print(f"tokens   tokenizer {tokens.get('tokenizer_class')} (sha256 {sha}"
                   f"...), vocabulary {tokens.get('vocab_size')}, model outputs {tokens.get('outputs')}, "
                   f"{tokens.get('seq_len')} tokens a row, EOS {tokens.get('eos_id')}; position j predicts token j + 1")
    views = s.get("views")
    if views:
        per = ", ".join(f"{x['name']} {x['bytes_per_view']}" for x in s["splits"] if x.get("bytes_per_view"))
        _out.print(f"views    {views.get('count')} {views.get('augment')} (v{views.get('version')}) views a row, "
                   f"parameters {', '.join(views.get('params') or [])}, seed {views.get('seed')}; bytes per sample "
                   f"per view: {per or '-'}")
    _out.print(f"storage  {storage.get('logits_dtype')}, codec {storage.get('codec')} + {storage.get('checksum')}, "
               f"{storage.get('chunk_rows')} rows/chunk; {_human(s['size_on_disk'])} on disk")
    _out.print(f"created  {s.get('created')} by {s.get('command')}")
    for c in s.get("checkpoints") or []:
        metric = f"{c['metric']:.4f}" if isinstance(c.get("metric"), (int, float)) else "-"
        epoch = c.get("epoch") if c.get("epoch") is not None else "-"
        _out.print(f"checkpoint  {c['name']}  epoch {epoch}  metric {metric}  -> array {c['array']}")
    hidden = s.get("hidden_projections")
    if hidden:
        widths = ", ".join(f"{k}: {w}" for k, w in (hidden.get("widths") or {}).items())
        _out.print(f"hidden   layers {', '.join(map(str, hidden['layers']))} projected to {hidden['dim']} dims "
                   f"(seed {hidden['seed']}; layer widths {widths})")
    table = Table("split", "rows", "target", "complete", "bytes/sample", "ratio", "kept mass", "KL", "teacher",
                  "source")
    for sp in s["splits"]:
        if sp.get("missing_arrays"):  # the writer stopped before creating this split's arrays
            table.add_row(sp["name"], str(sp["rows"]), "missing: " + ", ".join(sp["missing_arrays"]), "no", "-", "-",
                          "-", "-", "-", "-")
            continue
        scored = sp.get("teacher_metric") or {}
        partial = f" ({scored['rows_scored']:,} rows)" if scored and scored["rows_scored"] < sp["rows"] else ""
        teacher_score = f"{scored['metric_name']} {scored['metric']:.4f}{partial}" if scored else "-"
        shapes = ", ".join(f"{'' if a == 'logits' else a + ' '}{v['shape']} {v['dtype']}"
                           for a, v in (sp.get("target_arrays") or {}).items())
        quality = sp.get("target_quality") or {}
        kept = "-" if quality.get("kept_mass") is None else f"{quality['kept_mass']:.4f}"
        kl = "-" if quality.get("kl") is None else f"{quality['kl']:.4g}"
        done = "yes" if sp["complete"] else f"no ({sp.get('rows_stored') or 0} stored)"
        per_token = f" ({sp['bytes_per_token']}/token)" if sp.get("bytes_per_token") else ""
        table.add_row(sp["name"], str(sp["rows"]), shapes, done, str(sp["bytes_per_sample"]) + per_token,
                      f"{sp['compression_ratio']}x", kept, kl, teacher_score,
                      str(sp["source"] or "-"))  # (recorded at its end)
    _out.print(table)
    if not s["complete"]:
        _out.print("incomplete: rerun the cache-teacher command above to finish it (it resumes where it stopped)")


def _report_run(summary: dict) -> None:
    if os.environ.get("RANK", "0") != "0":  # torchrun: rank 0 reports for the run
        return
    metric = summary["metric_name"]
    if summary["best_metric"] is None:  # e.g. stopped inside curriculum's projection phases: no candidate yet
        best = f"no best {metric} yet (no epoch eligible so far)"
    else:
        best = f"best {metric} {summary['best_metric']:.4f} at epoch {summary['best_epoch']}"
    last = f"{summary['last_metric']:.4f}" if summary["last_metric"] is not None else "-"
    layers = f" (first {summary['student_layers']} layers)" if summary.get("student_layers") else ""
    _out.print(f"{summary.get('objective') or summary['method']} {summary['student']}{layers}: {best} (last {last}"
               + (f", teacher {summary['teacher_metric']:.4f}" if summary.get("teacher_metric") is not None else "")
               + (f", teacher agreement {summary['best_agreement']:.4f}" if summary.get("best_agreement") is not None
                  else "")
               + f"); {summary['epochs_done']}/{summary['epochs']} epochs, "
               + (f"{summary['tokens_per_second']:,.0f} tokens/s, " if summary.get("tokens_per_second") is not None
                  else f"{summary['samples_per_second']:,.0f} samples/s, ")
               + f"{summary['wall_seconds']:.1f} s")
    for note in ("selection_note", "unchecked_note", "baseline_note"):
        if summary.get(note):
            print(f"note: {summary[note]}", file=sys.stderr)


def _training(flag: str, student_kwargs: str | None, **kw: Any) -> Any:
    """The flags shared by `distill` and `train` as the recipe's config; None means the preset's value."""
    from kdcache.train.config import DistillConfig

    try:
        parsed = json.loads(student_kwargs) if student_kwargs else {}
    except ValueError as exc:
        raise KDCacheError(f"{flag} is not JSON: {exc}") from exc
    if not isinstance(parsed, dict):
        raise KDCacheError(f"{flag} must be a JSON object, e.g. '{{\"hidden\": 64}}'")
    return DistillConfig(student_kwargs=parsed, command=_command(), **kw)


@app.command("distill")
def distill_cmd(
    cache: o.CacheOpt,
    student: Annotated[str, typer.Option(help="Student: HF folder or config .json, kdcache model folder, or "
                                              "architecture name.")],
    out: o.RunOut, method: o.Method = "continuation", epochs: o.Epochs = None, data: o.DataMoved = None,
    preset: o.Preset = "auto", t_max: o.TMax = None, margin: o.Margin = None, psi: o.Psi = None,
    reduction: o.Reduction = "sample", phi_on: o.PhiOn = None, topk_tail: o.TopkTail = None, alpha: o.Alpha = None,
    temperature: o.Temperature = None, anneal_epochs: o.AnnealEpochs = None,
    anneal_continuous: o.AnnealContinuous = False, lr: o.Lr = None, batch_size: o.BatchSize = None,
    optimizer: o.Optimizer = None, weight_decay: o.WeightDecay = None, momentum: o.Momentum = None,
    lr_schedule: o.LrSchedule = None, warmup_ratio: o.WarmupRatio = None, max_grad_norm: o.MaxGradNorm = None,
    schedule_unit: o.ScheduleUnit = "epoch", absolute_schedules: o.AbsoluteSchedules = False,
    val_split: o.ValSplit = None, seed: o.Seed = 0, precision: o.Precision = "fp32", device: o.Device = "auto",
    student_kwargs: Annotated[Optional[str], typer.Option(help="JSON arguments for an architecture-name student.")] = None,
    student_layers: o.StudentLayers = None, stream: o.Stream = "auto", save_every: o.SaveEvery = None,
    checkpoint: o.Checkpoint = None, loss_chunk: o.LossChunk = None,
    kd_loss: o.KdLoss = None, phase_epochs: o.PhaseEpochs = None, layer_map: o.LayerMap = None,
    resume: o.Resume = False, overwrite: o.Overwrite = False, stop_after_epoch: o.StopAfterEpoch = None,
    augment: o.Augment = None, view_order: o.ViewOrder = None, num_workers: o.NumWorkers = None,
    memory_budget: o.MemoryBudget = None,
    keep_inputs: o.KeepInputs = None, check_first: o.CheckFirst = False, log_every: o.LogEvery = 0,
    max_steps: o.MaxSteps = None, compile: o.Compile = False, report_split: o.ReportSplit = None,
    trust_model_code: o.TrustModelCode = False, storage_option: o.StorageOption = None, progress: o.Progress = True,
    progress_every: o.ProgressEvery = None,
) -> None:
    """Train a student against a teacher cache (the teacher is never loaded)."""
    cfg = _distill_config(dict(locals()))
    from kdcache.recipes.distill import distill

    with _interrupts():
        _report_run(distill(cfg))


def _distill_config(p: dict[str, Any]) -> Any:
    """distill's flags (also sweep's), checked before torch is imported, as the recipe's config."""
    _check_training(method=p["method"], kd_loss=p["kd_loss"], preset=p["preset"], stream=p["stream"],
                    precision=p["precision"], optimizer=p["optimizer"], lr_schedule=p["lr_schedule"],
                    reduction=p["reduction"], schedule_unit=p["schedule_unit"], augment=p["augment"], psi=p["psi"],
                    phi_on=p["phi_on"], topk_tail=p["topk_tail"],
                    cache=p["cache"], student=p["student"], student_layers=p["student_layers"], data=p["data"],
                    epochs=p["epochs"], batch_size=p["batch_size"], max_steps=p["max_steps"], log_every=p["log_every"],
                    num_workers=p["num_workers"], keep_inputs=p["keep_inputs"], memory_budget=p["memory_budget"])
    from kdcache import names

    names.check_numbers(**p)  # every numeric flag: lr, seed, warmup-ratio, weight-decay, ...
    if p.get("view_order") is not None:
        names.check("--view-order", p["view_order"], names.VIEW_ORDERS)
    if p.get("progress_every") is not None:
        names.parse_interval(p["progress_every"])
    import dataclasses

    from kdcache.train.config import DistillConfig

    # every flag named as its config field goes across as is; the few named otherwise, or given another form, below
    renamed = ("student_kwargs", "anneal_continuous", "absolute_schedules")
    same = {f.name for f in dataclasses.fields(DistillConfig)} - set(renamed)
    return _training("--student-kwargs", p["student_kwargs"], **{k: v for k, v in p.items() if k in same},
                     stream_mode=p["stream"], anneal_continuous=p["anneal_continuous"] or None,
                     absolute_schedules=p["absolute_schedules"] or None,
                     storage_options=_storage(p["storage_option"]))


def sweep_cmd(**p: Any) -> None:
    """Train many students from one pass over a cache: a grid of hyper-parameters crossed with seeds."""
    grid, seeds, sweep_file = p.pop("grid"), p.pop("seeds"), p.pop("sweep_file")
    if not grid and not sweep_file and not seeds:
        raise KDCacheError("sweep needs --grid NAME=V1,V2,..., --seeds or --sweep-file (else run distill)")
    cfg = _distill_config(p)
    from kdcache.recipes import sweep as sw

    grid_values, seed_list, runs = sw.read_sweep_file(sweep_file) if sweep_file else ({}, None, None)
    for name, values in sw.parse_grid(grid or []).items():
        grid_values[name] = values
    seed_list = sw.parse_seeds(seeds) if seeds else (seed_list or [cfg.seed])
    for point in [*(runs or []), *({k: v} for k, vs in grid_values.items() for v in vs)]:
        _check_training(**{k: v for k, v in point.items() if k != "seed"})  # method names, psi, epochs >= 1, ...
    with _interrupts():
        summaries = sw.sweep(sw.SweepConfig(cfg, grid_values, seed_list, runs))
    _out.print(f"{len(summaries)} runs; results in {Path(cfg.out) / 'results.md'}")
    _out.print((Path(cfg.out) / "results.md").read_text().split("\n\n", 1)[-1].rstrip())


def _sweep_signature() -> inspect.Signature:
    """distill's flags, each declared once (on distill_cmd), plus what a sweep varies."""
    extra = [
        inspect.Parameter("grid", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None, annotation=Annotated[
            Optional[list[str]], typer.Option("--grid", help="NAME=V1,V2,...: a flag's values to cross (repeat for "
                                                              "more flags), e.g. --grid margin=0,0.5 --grid lr=0.1,0.2.")]),
        inspect.Parameter("seeds", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None, annotation=Annotated[
            Optional[str], typer.Option("--seeds", help="Seeds of every grid point, e.g. 0,1,2,3,4 (default: --seed).")]),
        inspect.Parameter("sweep_file", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None, annotation=Annotated[
            Optional[Path], typer.Option("--sweep-file", help="YAML or JSON with grid:, seeds: and/or runs: (a list "
                                                              "of flag mappings) for irregular sweeps.")]),
    ]
    params = list(inspect.signature(distill_cmd, eval_str=True).parameters.values())
    return inspect.Signature(params + extra)


sweep_cmd.__signature__ = _sweep_signature()  # type: ignore[attr-defined]
app.command("sweep")(sweep_cmd)


@app.command("train")
def train_cmd(
    model: Annotated[str, typer.Option(help="Model: HF folder or config .json, kdcache model folder, or "
                                            "architecture name.")],
    task: o.Task, out: o.RunOut, data: o.Data = None, epochs: o.Epochs = None, tokenizer: o.Tokenizer = None,
    preset: o.Preset = "auto", lr: o.Lr = None, batch_size: o.BatchSize = None, optimizer: o.Optimizer = None,
    weight_decay: o.WeightDecay = None, momentum: o.Momentum = None, lr_schedule: o.LrSchedule = None,
    warmup_ratio: o.WarmupRatio = None, max_grad_norm: o.MaxGradNorm = None, val_split: o.ValSplit = None,
    seed: o.Seed = 0, precision: o.Precision = "fp32", device: o.Device = "auto", model_kwargs: o.ModelKwargs = None,
    student_layers: o.StudentLayers = None, save_every: o.SaveEvery = None, max_length: o.MaxLength = 128,
    text_column: o.TextColumn = None,
    text_pair_column: o.TextPairColumn = None, label_column: o.LabelColumn = None, label_names: o.LabelNames = None,
    regression: o.Regression = False, normalize: o.Normalize = None, image_size: o.ImageSize = None,
    limit: o.Limit = None, subset: o.Subset = None, holdout: o.Holdout = None, holdout_test: o.HoldoutTest = None,
    resume: o.Resume = False,
    overwrite: o.Overwrite = False, stop_after_epoch: o.StopAfterEpoch = None, augment: o.Augment = None, num_workers: o.NumWorkers = None,
    keep_inputs: o.KeepInputs = None, log_every: o.LogEvery = 0, max_steps: o.MaxSteps = None,
    compile: o.Compile = False, trust_model_code: o.TrustModelCode = False, progress: o.Progress = True,
    progress_every: o.ProgressEvery = None, seq_len: o.SeqLen = None, vocab_size: o.VocabSize = None,
) -> None:
    """Train a model on hard labels alone: a teacher to cache, or the from-scratch baseline (distill's `ce` method
    without a cache); `--task lm`: a causal language model from a config JSON, on next-token cross-entropy."""
    from kdcache import names

    names.check_numbers(**locals())  # every numeric flag as given: lr, seed, warmup-ratio, weight-decay, ...
    if progress_every is not None:
        names.parse_interval(progress_every)
    _check_training(task=task, preset=preset, precision=precision, optimizer=optimizer, lr_schedule=lr_schedule,
                    augment=augment, model=model, data=data, tokenizer=tokenizer, epochs=epochs,
                    student_layers=student_layers, batch_size=batch_size, max_steps=max_steps, log_every=log_every,
                    num_workers=num_workers, keep_inputs=keep_inputs)
    if task == "lm" or seq_len is not None or vocab_size is not None:
        return _train_lm(**{k: v for k, v in locals().items() if k != "names"})
    from kdcache.recipes.distill import distill

    options = _data_options(max_length=max_length, text_column=text_column, text_pair_column=text_pair_column,
                            label_column=label_column, label_names=label_names, regression=regression,
                            normalize=normalize, image_size=image_size, limit=limit, subset=subset, holdout=holdout,
                            holdout_test=holdout_test)
    cfg = _training(
        "--model-kwargs", model_kwargs, cache=None, student=model, student_layers=student_layers, task=task, out=out,
        method="ce", data=data,
        epochs=epochs, tokenizer=tokenizer, preset=preset, lr=lr, batch_size=batch_size, optimizer=optimizer,
        weight_decay=weight_decay, momentum=momentum, lr_schedule=lr_schedule, warmup_ratio=warmup_ratio,
        max_grad_norm=max_grad_norm, val_split=val_split, seed=seed, precision=precision, device=device,
        save_every=save_every, data_options=options, resume=resume, overwrite=overwrite,
        stop_after_epoch=stop_after_epoch, progress=progress, progress_every=progress_every,
        trust_model_code=trust_model_code, augment=augment,
        num_workers=num_workers, keep_inputs=keep_inputs, log_every=log_every, max_steps=max_steps, compile=compile)
    with _interrupts():
        _report_run(distill(cfg))


@app.command("runs")
def runs_cmd(
    folders: Annotated[list[Path], typer.Argument(help="Run folders, sweep folders, or folders holding them.")],
    sort: Annotated[Optional[str], typer.Option(help="Sort by a column: best, test, samples_s (best first), or run, "
                                                     "method, student, params, seed, metric, epoch, wall_s, status.")] = None,
    as_json: o.Json = False,
) -> None:
    """Compare runs, one line each: method, key hyper-parameters, seed, best validation metric and epoch, test score
    at that epoch (--report-split), samples/s and wall time."""
    from kdcache.recipes.compare import list_runs

    rows = list_runs(folders, sort=sort)
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    cells = [[r["run"], r["method"] or "-", r["student"] or "-", r["params"] or "-", _cell(r["seed"], "{}"),
              r["metric"] or "-", _cell(r["best"], "{:.4f}"), _cell(r["epoch"], "{}"), _cell(r["test"], "{:.4f}"),
              _cell(r["samples_s"], "{:,.0f}"), _cell(r["wall_s"], "{:.1f}"), r["status"]] for r in rows]
    headers = ("run", "method", "student", "params", "seed", "metric", "best", "epoch", "test@best", "samples/s",
               "wall s", "status")
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)]
    # one line per run: on a narrow terminal the run, student and params give way (the start of a run's path, the
    # end of the others goes), the numbers never do
    room = max(18, _out.width - 3 * len(headers) - 1 - sum(w for i, w in enumerate(widths) if i not in (0, 2, 3)))
    while widths[0] + widths[2] + widths[3] > room and max(widths[0], widths[2], widths[3]) > 6:
        widest = max((0, 2, 3), key=lambda i: widths[i])
        widths[widest] -= 1
    table = Table()
    for header, width in zip(headers, widths):
        table.add_column(header, no_wrap=True, width=width)
    for row in cells:
        table.add_row(*(_fit(text, width, keep_end=i == 0) for i, (text, width) in enumerate(zip(row, widths))))
    _out.print(table)


def _cell(value: Any, form: str) -> str:
    return "-" if value is None else form.format(value)


def _fit(text: str, width: int, keep_end: bool = False) -> str:
    """Text cut to `width` characters with an ellipsis where it was cut (a path keeps its end)."""
    if len(text) <= width:
        return text
    return "…" + text[len(text) - width + 1:] if keep_end else text[:width - 1] + "…"


def _train_lm(**flags: Any) -> None:
    """`train --task lm`: the flags that recipe reads; any other given is refused in one line."""
    if flags["task"] != "lm":
        raise KDCacheError(f"--seq-len and --vocab-size apply to --task lm, not {flags['task']!r}")
    reads = {"model", "task", "out", "data", "epochs", "tokenizer", "lr", "batch_size", "weight_decay", "warmup_ratio",
             "max_grad_norm", "val_split", "seed", "device", "text_column", "overwrite", "max_steps", "progress",
             "seq_len", "vocab_size", "preset", "precision", "max_length", "log_every", "compile", "regression",
             "trust_model_code", "save_every"}
    given = [f"--{k.replace('_', '-')}" for k, v in flags.items() if k not in reads and v not in (None, False)]
    defaults = (("preset", "auto"), ("precision", "fp32"), ("compile", False), ("max_length", 128), ("log_every", 0),
                ("regression", False), ("trust_model_code", False))
    fixed = [f"--{k.replace('_', '-')}" for k, default in defaults if flags[k] != default]
    if given or fixed:
        raise KDCacheError(f"train --task lm does not take {', '.join(given + fixed)} (see docs/cli.md)")
    for flag in ("data", "seq_len"):
        if flags[flag] is None:
            raise KDCacheError(f"train --task lm needs --{flag.replace('_', '-')}")
    if not str(flags["model"]).endswith(".json"):
        raise KDCacheError(f"--model {flags['model']}: train --task lm builds a model from a Hugging Face config JSON")
    from kdcache.recipes.train_lm import TrainLMConfig, train_lm

    given = {k: flags[k] for k in ("epochs", "lr", "batch_size", "weight_decay", "warmup_ratio", "max_grad_norm",
                                   "max_steps", "val_split", "text_column", "save_every") if flags[k] is not None}
    cfg = TrainLMConfig(model=flags["model"], tokenizer=flags["tokenizer"], data=flags["data"], out=flags["out"],
                        seq_len=flags["seq_len"], seed=flags["seed"], device=flags["device"],
                        overwrite=flags["overwrite"], progress=flags["progress"], vocab_size=flags["vocab_size"],
                        **given)
    with _interrupts():
        summary = train_lm(cfg)
    final = summary["final"] or {}
    ppl = f", validation perplexity {final['val_perplexity']:.2f}" if "val_perplexity" in final else ""
    _out.print(f"trained {summary['parameters']:,} parameters for {summary['steps']} steps{ppl}; wrote "
               f"{summary['model']}")


@app.command("verify")
def verify_cmd(
    cache: o.CacheArg,
    teacher: Annotated[Optional[str], typer.Option(help="Also recompute sampled rows with this teacher (as for "
                                                        "cache-teacher).")] = None,
    weights: o.Weights = None,
    data: o.DataMoved = None,
    sample: Annotated[int, typer.Option(help="With --teacher: random rows per split to recompute.")] = 256,
    seed: o.Seed = 0, device: o.Device = "auto",
    batch_size: o.TeacherBatchSize = 64,
    rtol: Annotated[Optional[float], typer.Option(help="Relative tolerance of recomputed logits (default: by dtype "
                                                       "and precision).")] = None,
    atol: Annotated[Optional[float], typer.Option(help="Absolute tolerance of recomputed logits (default: by dtype "
                                                       "and precision).")] = None,
    trust_model_code: o.TrustModelCode = False, storage_option: o.StorageOption = None, as_json: o.Json = False,
) -> None:
    """Check a cache: structure, completeness, every chunk's checksum and place, digests; with --teacher, recompute a
    sample."""
    from kdcache import names
    from kdcache.recipes.verify import verify_cache

    names.check_numbers(sample=sample, seed=seed, batch_size=batch_size, rtol=rtol, atol=atol)
    with _interrupts():
        report = verify_cache(cache, teacher=teacher, weights=weights, data=data, sample=sample, seed=seed,
                              device=device, batch_size=batch_size, rtol=rtol, atol=atol,
                              trust_model_code=trust_model_code, storage_options=_storage(storage_option))
    if as_json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print("\n".join(report.lines()))  # plain print: paths may hold [brackets] that rich would read as markup
    if not report.ok:
        raise typer.Exit(1)


@app.command("demo")
def demo_cmd(
    workdir: Annotated[Path, typer.Option(help="Where the demo writes its teacher, cache and runs.")] = Path("kdcache-demo"),
    epochs: Annotated[int, typer.Option(help="Teacher training epochs.")] = 30,
    student_epochs: Annotated[Optional[int], typer.Option(help="Student epochs (default 60).")] = None,
) -> None:
    """The embedded default: digits teacher -> cache -> one student per method, and a table of the results."""
    from kdcache import names
    from kdcache.recipes.demo import run_demo

    names.check_numbers(epochs=epochs, student_epochs=student_epochs)
    with _interrupts():
        result = run_demo(workdir, epochs=epochs, student_epochs=student_epochs, console=_out)
    _print_info(result["cache"])
    table = Table("run", "best val accuracy", "epoch", "last", "seconds", "samples/s",
                  title=f"students: mlp {result['student']}, {result['epochs']} epochs; "
                        f"teacher accuracy {result['teacher_accuracy']:.4f}")
    for r in result["runs"]:
        table.add_row(r["run"], f"{r['best_accuracy']:.4f}", str(r["best_epoch"]), f"{r['last_accuracy']:.4f}",
                      f"{r['seconds']:.1f}", f"{r['samples_per_second']:,.0f}")
    _out.print(table)


def _quiet_libraries() -> None:
    """Hugging Face draws its own progress bars on stderr; ours is the only one a user should see."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if "transformers" in sys.modules:  # already imported (in-process callers): switch the bars off directly
        import transformers

        transformers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()


def _log_to_stderr() -> None:
    """The recipes report what they do beyond the progress bar (e.g. the row a capture resumes at) on the
    `kdcache` logger; the command line shows those lines on stderr."""
    logger = logging.getLogger("kdcache")
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("kdcache: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


class _StderrHandler(logging.Handler):
    """Writes to whatever sys.stderr is when a line is logged (not when the handler was made)."""

    def emit(self, record: logging.LogRecord) -> None:
        print(self.format(record), file=sys.stderr)


def _tell_torchrun(message: str) -> None:
    """Under torchrun, the one line also goes in the error file torchrun reads, so its own report of the failure
    ends with kdcache's line (`traceback : kdcache: ...` under "Root Cause") rather than a link to its docs."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    import time

    with contextlib.suppress(OSError):
        Path(path).write_text(json.dumps({"message": f"kdcache: {message}", "timestamp": int(time.time())}))


def _out_of_memory(exc: BaseException) -> bool:
    from kdcache.runtime import is_out_of_memory

    return is_out_of_memory(exc)


def _peer_gone(exc: BaseException) -> bool:
    """Under torchrun, a collective that failed because another process of the run stopped (it prints why)."""
    if os.environ.get("WORLD_SIZE", "1") in ("", "1"):
        return False
    text = str(exc)
    return "Dist" in type(exc).__name__ or any(s in text for s in ("Connection closed by peer", "[gloo]", "NCCL",
                                                                   "Connection reset by peer", "Broken pipe"))


def main() -> None:
    """Console-script entry point: usage errors exit 2 (Typer's own), bad input one line and exit 1, Ctrl-C 130."""
    _quiet_libraries()
    _log_to_stderr()
    _state["signal"] = None
    previous = None
    if os.environ.get("RANK", "0") == "0":  # torchrun's other ranks keep SIGTERM's default: they end at once, silent
        try:
            previous = signal.signal(signal.SIGTERM, _terminated)
        except ValueError:  # not the main thread (an embedding caller): SIGTERM keeps its meaning there
            pass
    try:
        app()  # standalone mode: Typer reports usage errors itself and exits
    except Exception as exc:  # noqa: BLE001 - the user sees one line; --debug shows the traceback
        if _state["debug"]:
            raise
        if isinstance(exc, SharedError) or _peer_gone(exc):  # torchrun: said once, by the process that knows
            if isinstance(exc, SharedError):
                _tell_torchrun(str(exc))
        elif isinstance(exc, KDCacheError):
            print(f"error: {exc}", file=sys.stderr)
            _tell_torchrun(str(exc))
        elif isinstance(exc, OSError) and exc.filename:  # a file the recipes did not expect to fail: still one line
            print(f"error: {exc.filename}: {(exc.strerror or str(exc)).lower()}", file=sys.stderr)
        elif isinstance(exc, MemoryError) or ("torch" in sys.modules and _out_of_memory(exc)):
            print("error: out of memory (a model, batch, cache or dataset larger than this machine or device can "
                  "hold: try a smaller --batch-size); rerun with --debug for the traceback", file=sys.stderr)
        else:
            detail = str(exc).splitlines()[0] if str(exc) else ""
            print(f"error: {type(exc).__name__}: {detail} (internal error; rerun with --debug for the traceback)",
                  file=sys.stderr)
        sys.exit(1)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    main()
