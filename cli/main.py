"""`kdcache` command line. Each command parses flags, calls one library function and reports.

    kdcache demo                                   # the embedded default: digits teacher -> cache -> info
    kdcache cache-teacher --teacher T --data D --task TASK --split train --out CACHE
    kdcache info CACHE [--json]

Errors print one line (`error: ...`) and exit 1; `kdcache --debug ...` shows the traceback instead.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from kdcache.errors import KDCacheError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Knowledge distillation from an offline teacher cache.")
_state = {"debug": False}
_out = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 160)


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


@app.command("cache-teacher")
def cache_teacher_cmd(
    teacher: Annotated[str, typer.Option(help="HF model folder, kdcache model folder, or architecture name (with --weights).")],
    task: Annotated[str, typer.Option(help="sst2 cola mrpc rte stsb qnli qqp mnli | text | cifar10 cifar100 imagefolder | digits")],
    out: Annotated[Path, typer.Option(help="Cache path to create (a Zarr v3 folder).")],
    data: Annotated[Optional[str], typer.Option(help="Dataset file or folder (GLUE task folder, CIFAR folder, image tree or zip).")] = None,
    split: Annotated[list[str], typer.Option(help="Split to cache; repeat for several (train, validation, test).")] = ["train"],
    weights: Annotated[Optional[Path], typer.Option(help="State-dict file for an architecture-name teacher.")] = None,
    tokenizer: Annotated[Optional[str], typer.Option(help="Tokenizer folder, when the teacher folder has none.")] = None,
    batch_size: Annotated[int, typer.Option(help="Rows per teacher forward pass.")] = 64,
    device: Annotated[str, typer.Option(help="auto (CUDA when present), cpu, cuda, cuda:N.")] = "auto",
    dtype: Annotated[str, typer.Option(help="Stored logits dtype: float16 or float32.")] = "float16",
    precision: Annotated[str, typer.Option(help="Teacher compute: fp32, or bf16/fp16 autocast.")] = "fp32",
    overwrite: Annotated[bool, typer.Option(help="Replace an existing cache at --out.")] = False,
    codec: Annotated[Optional[str], typer.Option(help="Logits codec (see docs/cache-format.md).")] = None,
    chunk_rows: Annotated[Optional[int], typer.Option(help="Rows per chunk (default: about 512 KiB of logits).")] = None,
    workers: Annotated[Optional[int], typer.Option(help="DataLoader worker processes (default: auto).")] = None,
    max_length: Annotated[int, typer.Option(help="Text: truncate token sequences to this length.")] = 128,
    text_column: Annotated[Optional[str], typer.Option(help="Text task: column with the text.")] = None,
    text_pair_column: Annotated[Optional[str], typer.Option(help="Text task: column with the second text of a pair.")] = None,
    label_column: Annotated[Optional[str], typer.Option(help="Text task: column with the label.")] = None,
    label_names: Annotated[Optional[str], typer.Option(help="Text task: comma-separated label names, in id order.")] = None,
    regression: Annotated[bool, typer.Option(help="Text task: float labels (one teacher output).")] = False,
    normalize: Annotated[Optional[str], typer.Option(help="Images: cifar10, cifar100, imagenet or none.")] = None,
    image_size: Annotated[Optional[int], typer.Option(help="Images: resize + center-crop to this size.")] = None,
    limit: Annotated[Optional[int], typer.Option(help="Cache only the first N rows of each split.")] = None,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Run a teacher once over a dataset and store its outputs in a Zarr cache."""
    from kdcache import format as fmt
    from kdcache.data import DataOptions
    from kdcache.info import describe_cache
    from kdcache.recipes.cache_teacher import CacheTeacherConfig, cache_teacher

    options = DataOptions(
        max_length=max_length, text_column=text_column, text_pair_column=text_pair_column, label_column=label_column,
        label_names=[n.strip() for n in label_names.split(",")] if label_names else None, regression=regression,
        normalize=normalize, image_size=image_size, limit=limit,
    )
    cfg = CacheTeacherConfig(
        teacher=teacher, task=task, out=out, data=data, splits=tuple(split), weights=str(weights) if weights else None,
        tokenizer=tokenizer, batch_size=batch_size, device=device, dtype=dtype, precision=precision,
        overwrite=overwrite, codec=codec or fmt.DEFAULT_CODEC, chunk_rows=chunk_rows, workers=workers,
        data_options=options, progress=progress, command=" ".join(["kdcache", *sys.argv[1:]]),
    )
    path = cache_teacher(cfg)
    summary = describe_cache(path)
    for s in summary["splits"]:
        rate = (summary["throughput"] or {}).get(s["name"], {}).get("rows_per_second")
        _out.print(f"cached {s['name']}: {s['rows']} rows x {s['logits_shape'][1]} outputs, "
                   f"{s['bytes_per_sample']} bytes/sample, {rate} rows/s")
    _out.print(f"wrote {path}")


@app.command("info")
def info_cmd(
    cache: Annotated[Path, typer.Argument(help="Cache path.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")] = False,
) -> None:
    """Show what a cache holds: splits, shapes, teacher, dataset, size and completeness."""
    from kdcache.info import describe_cache

    summary = describe_cache(cache)
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


def _print_info(s: dict) -> None:
    teacher, task, storage = s.get("teacher") or {}, s.get("task") or {}, s.get("storage") or {}
    status = "[green]complete[/]" if s["complete"] else "[red]INCOMPLETE (not usable)[/]"
    _out.print(f"[bold]{s['path']}[/]  {s['format']} v{s['format_version']}  {status}")
    _out.print(f"teacher  {teacher.get('spec')}  ({teacher.get('source')}, {teacher.get('class')}, "
               f"{teacher.get('num_outputs')} outputs, sha256 {str(teacher.get('sha256'))[:16]}...)")
    _out.print(f"task     {task.get('name')} ({task.get('kind')}), labels: {', '.join(task.get('label_names') or []) or '-'}")
    _out.print(f"storage  {storage.get('logits_dtype')}, codec {storage.get('codec')} + {storage.get('checksum')}, "
               f"{storage.get('chunk_rows')} rows/chunk; {_human(s['size_on_disk'])} on disk")
    _out.print(f"created  {s.get('created')} by {s.get('command')}")
    table = Table("split", "rows", "logits", "complete", "bytes/sample", "ratio", "source")
    for sp in s["splits"]:
        if sp.get("missing_arrays"):  # the writer stopped before creating this split's arrays
            table.add_row(sp["name"], str(sp["rows"]), "missing: " + ", ".join(sp["missing_arrays"]), "no", "-", "-", "-")
            continue
        table.add_row(sp["name"], str(sp["rows"]), f"{sp['logits_shape']} {sp['logits_dtype']}",
                      "yes" if sp["complete"] else "no", str(sp["bytes_per_sample"]), f"{sp['compression_ratio']}x",
                      str(sp["source"]))
    _out.print(table)


@app.command("demo")
def demo_cmd(
    workdir: Annotated[Path, typer.Option(help="Where the demo writes its teacher and cache.")] = Path("kdcache-demo"),
    epochs: Annotated[int, typer.Option(help="Teacher training epochs.")] = 30,
) -> None:
    """The embedded default: train a teacher on scikit-learn's digits, cache it, and show the cache."""
    from kdcache.demo import run_demo

    _print_info(run_demo(workdir, epochs=epochs, console=_out))


def _quiet_libraries() -> None:
    """Hugging Face draws its own progress bars on stderr; ours is the only one a user should see."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if "transformers" in sys.modules:  # already imported (in-process callers): switch the bars off directly
        import transformers

        transformers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()


def main() -> None:
    """Console-script entry point: usage errors exit 2 (Typer's own), bad input one line and exit 1."""
    _quiet_libraries()
    try:
        app()  # standalone mode: Typer reports usage errors itself and exits
    except KeyboardInterrupt:
        print("error: interrupted; any cache being written is left incomplete and will not be used", file=sys.stderr)
        sys.exit(130)
    except Exception as exc:  # noqa: BLE001 - the user sees one line; --debug shows the traceback
        if _state["debug"]:
            raise
        if isinstance(exc, KDCacheError):
            print(f"error: {exc}", file=sys.stderr)
        else:
            detail = str(exc).splitlines()[0] if str(exc) else ""
            print(f"error: {type(exc).__name__}: {detail} (internal error; rerun with --debug for the traceback)",
                  file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
