"""Device, precision and provenance helpers shared by every recipe."""

from __future__ import annotations

import contextlib
import io
import os
import platform
import sys
import time
from pathlib import Path
from importlib import metadata
from typing import Any

import torch

from kdcache.errors import KDCacheError

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
_IMPORTED = time.time()


def resolve_device(name: str = "auto") -> torch.device:
    """`auto` means CUDA when present, else CPU; an unavailable device is a clear error, not a crash."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise KDCacheError(f"unknown device {name!r} (use auto, cpu, cuda or cuda:N)") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise KDCacheError(f"device {name!r} requested but CUDA is not available on this machine")
    return device


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Mixed-precision context for inference or training; fp32 means none."""
    if precision not in PRECISIONS:
        raise KDCacheError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    dtype = PRECISIONS[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def software_versions() -> dict[str, Any]:
    """Versions recorded in every cache, so a surprising result can be traced to its software."""
    from kdcache import __version__

    return {
        "kdcache": __version__,
        "torch": torch.__version__,
        "transformers": _version("transformers"),
        "torchvision": _version("torchvision"),
        "zarr": _version("zarr"),
        "numcodecs": _version("numcodecs"),
        "python": platform.python_version(),
    }


def save_torch(obj: Any, path: Path) -> None:
    """torch.save through memory, a temporary file and a rename: a crash never leaves a half-written file, and a
    full disk or a read-only folder is an OSError naming the file (torch's own writer reports them as an internal
    enforce failure)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(buffer.getbuffer())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise OSError(exc.errno, exc.strerror, str(path)) from exc


def process_start_time() -> float:
    """When this process started (seconds since the epoch), so start-up can be measured from the very beginning,
    imports included; the time kdcache was imported where /proc cannot tell."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return time.time() - uptime + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return _IMPORTED


def utc_now() -> str:
    """The time stamps kdcache records (ISO-8601, UTC, seconds)."""
    from datetime import datetime, timezone

    return datetime.now(timezone.utc).isoformat(timespec="seconds")


#: Storage options whose values are secrets: never recorded in a cache or a run folder.
_SECRET = ("key", "secret", "token", "password", "credential", "session")


def redact(argv: list[str]) -> list[str]:
    """The command line with the values of secret --storage-option flags replaced by ***."""
    out, expect = [], False
    for arg in argv:
        if expect or arg.startswith("--storage-option="):
            head, sep, value = arg.partition("--storage-option=") if not expect else ("", "", arg)
            name, eq, _ = value.partition("=")
            if eq and any(word in name.lower() for word in _SECRET):
                arg = f"{head}{sep}{name}=***"
        expect = arg == "--storage-option"
        out.append(arg)
    return out


def command_line() -> str:
    """The command as it was typed (the program called `kdcache`), secrets removed: recorded in caches and runs."""
    return " ".join(["kdcache", *redact(sys.argv[1:])])
