"""One progress style for every long job, drawn on stderr so stdout stays clean for --json output: a bar on a
terminal, and plain lines where stderr is a log file (a batch job, `2> log`), which a bar would leave empty until
the run ends.

The interval of the plain lines is `--progress-every` (train, distill, sweep) or the environment variable
KDCACHE_PROGRESS_EVERY (every command): `30s` (the default), `5m`, or a count of steps (`100`), which makes the
lines independent of timing.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, TextIO

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)
from rich.table import Column

from kdcache.names import parse_interval

#: The plain lines' interval when neither the flag nor the environment names one.
DEFAULT_EVERY = "30s"
EVERY_ENV = "KDCACHE_PROGRESS_EVERY"
#: The widest description a bar shows: a long student path is cut from the left, so the counts, the loss and the
#: times stay on screen however long the names are.
DESCRIPTION_WIDTH = 24


def progress_bar(enabled: bool = True, every: str | None = None) -> Any:
    """A rich progress bar with counts, elapsed and remaining time on a terminal; plain lines every `every` steps
    or seconds otherwise (`Lines`); disabled, it draws nothing. Both take rich's add_task/update."""
    console = Console(stderr=True)
    if enabled and not console.is_terminal:
        steps, seconds = parse_interval(every or os.environ.get(EVERY_ENV) or DEFAULT_EVERY,
                                        "--progress-every" if every else EVERY_ENV)
        return Lines(steps, seconds)
    return _Bar(
        TextColumn("[bold]{task.description}", table_column=Column(no_wrap=True)),
        BarColumn(),
        MofNCompleteColumn(table_column=Column(no_wrap=True)),
        TextColumn("{task.fields[rate]}", table_column=Column(no_wrap=True)),
        TimeElapsedColumn(table_column=Column(no_wrap=True)),
        TimeRemainingColumn(table_column=Column(no_wrap=True)),
        console=console,
        disable=not enabled,
    )


def short(text: str, width: int = DESCRIPTION_WIDTH) -> str:
    """`text` cut to `width` characters from the left (the end of a path names the file)."""
    return text if len(text) <= width else "…" + text[-(width - 1):]


class _Bar(Progress):
    """rich's bar, its descriptions cut to DESCRIPTION_WIDTH."""

    def add_task(self, description: str, *args: Any, **kwargs: Any) -> Any:
        return super().add_task(short(description), *args, **kwargs)


@dataclass
class _Task:
    description: str
    total: float | None
    completed: float
    fields: dict[str, Any]
    started: float
    first: float  # `completed` when the task was added (a resumed run starts part-way)
    last_line: float
    updates: int = 0
    stale: bool = False  # its `rate` was already shown (the caller refreshes it only for a line)


@dataclass
class Lines:
    """Progress as one plain line per interval: `every_steps` updates (a step, a batch), or `every_seconds`."""

    every_steps: int | None = None
    every_seconds: float | None = None
    stream: TextIO | None = None  # default: sys.stderr at the time of each line
    clock: Callable[[], float] = time.monotonic
    disable: bool = False
    tasks: list[_Task] = field(default_factory=list)

    def __enter__(self) -> "Lines":
        return self

    def __exit__(self, *exc: Any) -> None:
        """The last state of each task not yet shown (as rich leaves its bar in a log file when it stops)."""
        for t in self.tasks:
            if t.updates:
                t.updates = 0
                if t.stale:
                    t.fields["rate"] = ""
                print(self.line(t), file=self.stream or sys.stderr, flush=True)

    def add_task(self, description: str, total: float | None = None, completed: float = 0, **fields: Any) -> int:
        now = self.clock()
        self.tasks.append(_Task(description, total, completed, fields, now, completed, now))
        return len(self.tasks) - 1

    def due(self, task: int) -> bool:
        """Whether the next update of `task` prints a line (so a caller reads the loss only then)."""
        t = self.tasks[task]
        if self.every_steps is not None:
            return t.updates + 1 >= self.every_steps
        return self.clock() - t.last_line >= float(self.every_seconds or 0)

    def update(self, task: int, advance: float = 0, completed: float | None = None, **fields: Any) -> None:
        due = self.due(task)
        t = self.tasks[task]
        t.completed = completed if completed is not None else t.completed + advance
        t.fields.update(fields)
        t.stale = t.stale and "rate" not in fields
        t.updates += 1
        if due:
            t.updates, t.last_line = 0, self.clock()
            print(self.line(t), file=self.stream or sys.stderr, flush=True)
            t.stale = True

    def line(self, t: _Task) -> str:
        """`kdcache: ce mlp 150/4,500 steps (3%) epoch 2/30 loss 0.4123 1,234 samples/s, ETA 0:03:12`."""
        done = f"{t.completed:,.0f}" + (f"/{t.total:,.0f}" if t.total else "") + t.fields.get("unit", "")
        share = f" ({100 * t.completed / t.total:.0f}%)" if t.total else ""
        rate = f" {t.fields['rate']}" if t.fields.get("rate") else ""
        elapsed, moved = self.clock() - t.started, t.completed - t.first
        if t.total and t.completed >= t.total:
            eta = f", done in {_clock(elapsed)}"
        else:
            eta = f", ETA {_clock(elapsed / moved * (t.total - t.completed))}" if t.total and moved > 0 else ""
        return f"kdcache: {t.description} {done}{share}{rate}{eta}"


def _clock(seconds: float) -> str:
    seconds = int(round(max(seconds, 0)))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


__all__ = ["DEFAULT_EVERY", "EVERY_ENV", "Lines", "progress_bar", "short"]
