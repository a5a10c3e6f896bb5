"""A run's folder: who the run is (config.json), what it did (metrics.jsonl, summary.json), where it is (last.pt),
and its best student (best/, a teacher folder for cache-teacher).

    RUN_DIR/config.json      identity (config, hyper-parameters, teacher and data digests), command, software
    RUN_DIR/metrics.jsonl    one line per finished epoch
    RUN_DIR/last.pt          everything a resume needs, written atomically after every epoch (weights-only loadable)
    RUN_DIR/best/            the best student so far (a kdcache or Hugging Face model folder)
    RUN_DIR/checkpoints/     epoch-NNNN/ every --save-every epochs
    RUN_DIR/summary.json     written at the end

Every write is one line on failure (a full disk, a read-only folder) naming the file.
"""

from __future__ import annotations

import contextlib
import errno
import json
import pickle
import shutil
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from kdcache.errors import KDCacheError
from kdcache.models import CHECKPOINT_FILE, save_student
from kdcache.runtime import save_torch, software_versions, utc_now


def differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Dotted names of the keys whose values differ between two nested dicts."""
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += differences(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}")
    return out


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_checkpoint(path: Path) -> dict[str, Any]:
    """last.pt loaded with torch's weights-only unpickler: tensors and plain values, never code, so a crafted file
    in a run folder cannot run a command when a run is resumed."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise KDCacheError(f"{path}: refusing to load it: it holds objects other than tensors and plain values, "
                           "which kdcache never writes (a tampered or foreign file)") from exc
    except Exception as exc:  # noqa: BLE001 - torch raises many types for unreadable files
        raise KDCacheError(f"{path}: unreadable checkpoint ({type(exc).__name__})") from exc
    if not isinstance(state, dict):
        raise KDCacheError(f"{path}: not a kdcache checkpoint (a {type(state).__name__}, not a mapping)")
    return state


#: 2: hyper-parameters list only what the run's method uses (0.1.0's runs have no version); 3: a `train` run's
#: data digest names its rows by what they are read with and their labels (2 hashed every row's fingerprint,
#: which took a decoding pass before the first step).
IDENTITY_VERSION = 3


def _upgrade_legacy(state: dict[str, Any], identity: dict[str, Any]) -> dict[str, Any]:
    """A last.pt written by kdcache 0.1.0 (which recorded every preset value and kept the method's state at the top
    level) in today's form, so runs started then still resume: its extra hyper-parameters are dropped only when the
    rest of the identity agrees, which the comparison after this still proves."""
    old = state.get("identity")
    if not isinstance(old, dict) or "identity_version" in old:
        return state
    old = {**old, "identity_version": 2}
    hp = old.get("hyperparameters")
    if isinstance(hp, dict):
        old["hyperparameters"] = {k: v for k, v in hp.items() if k in identity.get("hyperparameters", {})}
    method = {}
    if state.get("stage1_best") is not None:
        method["stage1_best"] = state["stage1_best"]
    if state.get("heads") is not None:
        method["modules"] = state["heads"]
    return {**state, "identity": old, "method": state.get("method", method)}


def _upgrade_digest(state: dict[str, Any], identity: dict[str, Any], legacy_digest: Callable[[], str] | None
                    ) -> dict[str, Any]:
    """A last.pt of identity version 2 in today's form: a `train` run's data digest is recomputed the old way (a
    pass over every row) and, when it matches, replaced by today's; a distill run's (the cache's) is unchanged."""
    old = state.get("identity")
    if not isinstance(old, dict) or old.get("identity_version") != 2:
        return state
    old = {**old, "identity_version": IDENTITY_VERSION}
    if (legacy_digest is not None and old.get("data_digest") != identity.get("data_digest")
            and old.get("data_digest") == legacy_digest()):
        old["data_digest"] = identity.get("data_digest")
    return {**state, "identity": old}


class RunDir:
    """The folder of one run (see the module docstring)."""

    def __init__(self, out: str | Path, identity: dict[str, Any]) -> None:
        self.out = Path(out)
        self.identity = identity
        self.last = self.out / "last.pt"

    @contextlib.contextmanager
    def writes(self) -> Iterator[None]:
        """A failed write of the run folder (full disk, read-only file system) is one line naming the file."""
        try:
            yield
        except OSError as exc:
            raise self.write_error(Path(exc.filename) if exc.filename else self.out, exc) from exc
        except RuntimeError as exc:  # torch's and safetensors' writers report a full disk this way
            text = str(exc)
            if not any(word in text for word in ("enforce fail", "PytorchStreamWriter", "No space left", "write")):
                raise
            raise self.write_error(self.out, OSError(errno.ENOSPC, "disk full or unwritable")) from exc

    def write_error(self, path: Path, exc: OSError) -> KDCacheError:
        """One line for a failed write: the file, the cause in words, and how to go on from here."""
        cause = "disk full" if exc.errno == errno.ENOSPC else (exc.strerror or str(exc)).lower()
        then = "then rerun with --resume" if self.last.is_file() else "then rerun the command"
        return KDCacheError(f"{path}: {cause} while writing it; the run stopped (free space or choose another "
                            f"--out, {then})")

    # --- start ------------------------------------------------------------------------------------------------------

    def prepare(self, *, resume: bool, overwrite: bool, command: str,
                legacy_digest: Callable[[], str] | None = None) -> dict[str, Any] | None:
        """Create the folder, or load last.pt for a resume after proving it belongs to this very run. A run stopped
        before its first epoch finished has no last.pt: a resume starts it again if its config.json is this run's.
        `legacy_digest` computes a `train` run's data digest as identity version 2 did, for runs begun then."""
        with self.writes():
            if resume:
                return self._resume(legacy_digest)
            if self.out.exists() and any(self.out.iterdir()):
                if not overwrite:
                    raise KDCacheError(f"{self.out}: already holds a run; pass --resume to continue it or "
                                       "--overwrite to replace it")
                if not (self.out / "config.json").is_file():
                    raise KDCacheError(f"{self.out}: refusing to overwrite: it is not a kdcache run folder")
                shutil.rmtree(self.out)
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.json").write_text(json.dumps(
                {**self.identity, "command": command, "software": software_versions(), "started": utc_now()},
                indent=2, default=str) + "\n")
        return None

    def _resume(self, legacy_digest: Callable[[], str] | None = None) -> dict[str, Any] | None:
        if not self.last.is_file():
            if self._never_finished_an_epoch():
                (self.out / "metrics.jsonl").unlink(missing_ok=True)
                return None
            raise KDCacheError(f"{self.last}: nothing to resume (no checkpoint of an earlier run)")
        state = _upgrade_legacy(load_checkpoint(self.last), self.identity)
        state = _upgrade_digest(state, self.identity, legacy_digest)
        if state.get("identity") != self.identity:
            differ = differences(state.get("identity") or {}, self.identity)
            raise KDCacheError(f"{self.last}: checkpoint of another run (differs in {', '.join(differ) or 'format'}); "
                               "resume with the same flags, or start a new --out")
        return state

    def _never_finished_an_epoch(self) -> bool:
        """This run's folder (same identity in config.json) with no trace of a finished epoch: safe to start over."""
        try:
            recorded = json.loads((self.out / "config.json").read_text())
        except (OSError, ValueError):
            return False
        same = {k: recorded.get(k) for k in self.identity} == self.identity
        finished = [p for p in ("best", "summary.json", "checkpoints") if (self.out / p).exists()]
        return same and not finished and not self.read_metrics()

    # --- during --------------------------------------------------------------------------------------------------

    def save_state(self, state: dict[str, Any]) -> None:
        """last.pt, atomically: serialised in memory, written to a temporary file, renamed."""
        save_torch({"identity": self.identity, **state}, self.last)

    def append_metrics(self, record: dict[str, Any]) -> None:
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    def read_metrics(self) -> list[dict[str, Any]]:
        path = self.out / "metrics.jsonl"
        if not path.is_file():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def truncate_metrics(self, last_epoch: int) -> None:
        """Drop metric lines of epochs after the checkpoint (an epoch that ran but was not checkpointed reruns)."""
        kept = [r for r in self.read_metrics() if r["epoch"] <= last_epoch]
        (self.out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))

    def save_model(self, student: Any, directory: Path, *, num_outputs: int, label_names: list[str] | None,
                   tokenizer: Any, extra: dict[str, Any] | None = None) -> None:
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

    def repair_best(self, state: dict[str, Any], save_best: Any) -> None:
        """A kill between last.pt and best/ leaves best/ one improvement behind: the improvement was the last epoch,
        whose weights are the ones just loaded, so save them again. A kill inside the swap leaves best.old/ alone."""
        best_dir, old = self.out / "best", self.out / "best.old"
        if old.is_dir() and not best_dir.exists():
            old.rename(best_dir)
        marker = best_dir / CHECKPOINT_FILE
        saved = json.loads(marker.read_text()).get("epoch") if marker.is_file() else None
        best = state.get("best")
        if best and saved != best["epoch"] and best["epoch"] == state["epoch"]:
            save_best(state["epoch"])

    def write_summary(self, summary: dict[str, Any]) -> None:
        with self.writes():
            (self.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")


__all__ = ["RunDir", "differences", "load_checkpoint", "rng_state", "set_rng_state"]
