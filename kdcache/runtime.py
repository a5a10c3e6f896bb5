"""Device, precision and provenance helpers shared by every recipe."""

from __future__ import annotations

import contextlib
import io
import json
import os
import platform
import re
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


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether `exc` is an allocator's failure (CUDA's, or the CPU allocator's RuntimeError), not a bug."""
    if isinstance(exc, (MemoryError, torch.OutOfMemoryError)):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("out of memory" in text.lower() or "DefaultCPUAllocator" in text)


@contextlib.contextmanager
def out_of_memory_said(what: Any, then: str) -> Any:
    """An allocator's failure inside becomes one line: what ran out (`what`, or a callable saying it at the time),
    how much was asked for, and what to change (`then`), instead of the allocator's paragraph."""
    try:
        yield
    except Exception as exc:  # noqa: BLE001 - only allocator failures are turned into the line
        if not is_out_of_memory(exc):
            raise
        asked = re.search(r"(?i)tried to allocate ([0-9.]+ ?[KMGT]?i?B|[0-9]+ bytes)", str(exc))
        detail = f" (it asked for {asked.group(1)} more)" if asked else ""
        raise KDCacheError(f"out of memory: {what() if callable(what) else what}{detail}; {then}") from None


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


#: Storage options whose values are secrets: never recorded in a cache or a run folder. A name holding any of these
#: words is a secret at any depth (`key=`, `client_kwargs={"aws_secret_access_key": ...}`, `a.b.session_token=`).
_SECRET = ("key", "secret", "token", "password", "passwd", "credential", "session", "auth", "signature")
_URL_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.\-]*://)[^/@\s]+@")


def is_secret_name(name: str) -> bool:
    """Whether a storage option (or a key nested in one) names a secret: its value must never be recorded."""
    return any(word in str(name).lower() for word in _SECRET)


def redact_value(value: Any) -> Any:
    """`value` with every secret-named key at any depth, and any user:password@ in a URL, replaced by ***."""
    if isinstance(value, dict):
        return {k: "***" if is_secret_name(k) else redact_value(v) for k, v in value.items()}
    if isinstance(value, list):
        return [redact_value(v) for v in value]
    if isinstance(value, str):
        return _URL_USERINFO.sub(r"\1***@", value)
    return value


def _redact_option(option: str) -> str:
    name, eq, raw = option.partition("=")
    if not eq:
        return option
    if is_secret_name(name):
        return f"{name}=***"
    try:
        parsed = json.loads(raw)
    except ValueError:
        return f"{name}={redact_value(raw)}"
    if not isinstance(parsed, (dict, list)):
        return f"{name}={redact_value(raw)}"
    return f"{name}={json.dumps(redact_value(parsed), separators=(',', ':'))}"


def redact(argv: list[str]) -> list[str]:
    """The command line with the secrets of --storage-option flags (names like key, secret, token, password or
    credential, at any depth of a JSON value) and of URLs (user:password@) replaced by ***."""
    out, expect = [], False
    for arg in argv:
        if expect:
            arg = _redact_option(arg)
        elif arg.startswith("--storage-option="):
            arg = "--storage-option=" + _redact_option(arg[len("--storage-option="):])
        else:
            arg = redact_value(arg)
        expect = arg == "--storage-option"
        out.append(arg)
    return out


def command_line() -> str:
    """The command as it was typed (the program called `kdcache`), secrets removed: recorded in caches and runs."""
    return " ".join(["kdcache", *redact(sys.argv[1:])])
