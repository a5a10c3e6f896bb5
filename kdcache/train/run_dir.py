"""A run's folder: who the run is (config.json), what it did (metrics.jsonl, summary.json), where it is (last.pt),
and its best student (best/, a teacher folder for cache-teacher).

    RUN_DIR/config.json      identity (config, hyper-parameters, teacher and data digests), command, software, and
                             `"format": "kdcache.run"`, the mark --overwrite looks for before it deletes anything
    RUN_DIR/metrics.jsonl    one line per finished epoch
    RUN_DIR/last.pt          everything a resume needs, written atomically after every epoch (weights-only loadable)
    RUN_DIR/best/            the best student so far (a kdcache or Hugging Face model folder)
    RUN_DIR/checkpoints/     epoch-NNNN/ every --save-every epochs
    RUN_DIR/summary.json     written at the end

Every write is one line on failure (a full disk, a read-only folder) naming the file. One process writes a run
folder at a time: it holds `RUN_DIR.lock` (beside the folder, so --overwrite never deletes a lock that is held).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import pickle
import shutil
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from kdcache.cache.store import LocalLock
from kdcache.errors import KDCacheError
from kdcache.models import CHECKPOINT_FILE, save_student
from kdcache.names import RUN_FORMAT
from kdcache.runtime import save_torch, software_versions, utc_now

log = logging.getLogger("kdcache")

#: config.json of every release before the mark: exactly these keys (0.1.0 had no identity_version; cached_sources
#: only where a method read more than the logits), so a run of an earlier release is still known for what it is.
LEGACY_RUN_KEYS = frozenset({"config", "hyperparameters", "preset", "teacher_sha256", "data_digest", "command",
                             "software", "started"})
LEGACY_RUN_OPTIONAL = frozenset({"identity_version", "cached_sources"})
#: What a run writes at the top of its folder, with the temporaries of its atomic writes: --overwrite deletes a
#: folder holding nothing else.
#: The largest config.json --overwrite reads to tell a run folder (a run's holds a few KB).
MAX_CONFIG_BYTES = 16 * 1024**2
RUN_ENTRIES = frozenset({"config.json", "metrics.jsonl", "metrics.jsonl.tmp", "last.pt", "last.pt.tmp", "summary.json",
                         "best", "best.tmp", "best.old", "checkpoints"})


def not_a_run(out: Path) -> str | None:
    """Why the folder `out` is not a kdcache run folder that --overwrite may delete (None when it is one): its
    config.json must say so (or hold exactly what an earlier release wrote), and it holds nothing a run never writes."""
    if out.is_symlink():
        return "it is a symbolic link"
    config = out / "config.json"
    if not config.is_file():  # (a FIFO or a device is no file: never opened)
        return "it has no config.json"
    if config.stat().st_size > MAX_CONFIG_BYTES:  # a run's is a few KB: a huge one is not read
        return f"its config.json is not a kdcache run's ({config.stat().st_size:,} bytes)"
    try:
        recorded = json.loads(config.read_text())
    except (OSError, ValueError):
        recorded = None
    if not isinstance(recorded, dict):
        return "its config.json is not a kdcache run's (not a JSON object)"
    keys = set(recorded)
    legacy = LEGACY_RUN_KEYS <= keys <= LEGACY_RUN_KEYS | LEGACY_RUN_OPTIONAL
    if recorded.get("format") != RUN_FORMAT and not legacy:
        if {"model_type", "architectures"} & keys:
            return "its config.json is a Hugging Face model's"
        return "its config.json is not a kdcache run's"
    foreign = sorted(p.name for p in out.iterdir() if p.name not in RUN_ENTRIES)
    if foreign:
        more = f" and {len(foreign) - 3} more" if len(foreign) > 3 else ""
        return f"it holds what a run never writes: {', '.join(foreign[:3])}{more}"
    return None


def never_trained(out: Path) -> bool:
    """A run folder whose run stopped before it finished an epoch (data that did not match, a refusal, a stop in
    epoch 1): it holds nothing a run wrote after starting, so a plain rerun, once the cause is fixed, replaces it
    instead of asking for --resume or --overwrite."""
    if not out.is_dir() or not_a_run(out) is not None:
        return False
    if any((out / name).exists() for name in ("last.pt", "best", "best.old", "summary.json", "checkpoints")):
        return False
    try:
        return not RunDir(out, {}).read_metrics()
    except KDCacheError:  # a damaged metrics.jsonl: not this function's to judge
        return False


def check_overwrite(out: Path) -> None:
    """--overwrite deletes a run folder and nothing else: anything else is refused in one line, untouched."""
    why = not_a_run(out)
    if why:
        raise KDCacheError(f"{out}: refusing to overwrite: not a kdcache run folder ({why}); nothing was deleted: "
                           "choose another --out")


@contextlib.contextmanager
def run_folder_lock(out: str | Path, what: str = "run folder") -> Iterator[None]:
    """Hold the run folder (or a sweep's folder) for this process alone, as the cache writer holds a cache: a second
    process on it is refused in one line, and the OS drops the lock when this process ends, however it ends."""
    lock = LocalLock(out)
    try:
        lock.acquire()
    except KDCacheError as exc:
        if not isinstance(exc.__context__, BlockingIOError):  # the lock file is a link or unusable: its own line
            raise
        raise KDCacheError(f"{out}: {what} is in use by another process ({_holder(lock.file)}); wait for it "
                           "to finish or stop it") from None
    try:
        yield
    finally:
        lock.release()


def _holder(file: Path) -> str:
    """Who holds a lock: what its holder wrote in it (`pid N`)."""
    try:
        fd = os.open(file, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            return os.read(fd, 64).decode(errors="replace").strip() or "another process"
        finally:
            os.close(fd)
    except OSError:
        return "another process"


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
                fresh = never_trained(self.out)
                if not overwrite and not fresh:
                    raise KDCacheError(f"{self.out}: already holds a run; pass --resume to continue it or "
                                       "--overwrite to replace it")
                check_overwrite(self.out)
                if fresh:
                    log.info(f"{self.out}: starting again (the run there stopped before finishing an epoch)")
                shutil.rmtree(self.out)
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.json").write_text(json.dumps(
                {"format": RUN_FORMAT, **self.identity, "command": command, "software": software_versions(),
                 "started": utc_now()}, indent=2, default=str) + "\n")
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
        """One epoch's line, whole or not at all: appended and synced, and a write the file system takes only part
        of (a full disk) taken back before the error is raised, so no half line is left for a resume to trip on."""
        path = self.out / "metrics.jsonl"
        line = (json.dumps(record) + "\n").encode()
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        size = os.fstat(fd).st_size
        try:
            done = 0
            while done < len(line):
                done += os.write(fd, line[done:])
            os.fsync(fd)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, size)
            raise OSError(exc.errno, exc.strerror, str(path)) from exc
        finally:
            os.close(fd)

    def read_metrics(self) -> list[dict[str, Any]]:
        """The epochs' lines; a last line that was never finished (no newline, or not a whole record: a crash or a
        full disk while it was written by an earlier release) is left out."""
        return self._metrics()[0]

    def _metrics(self) -> tuple[list[dict[str, Any]], bool]:
        """(the whole lines, whether a torn last line was left out); a damaged line before the last is one line."""
        path = self.out / "metrics.jsonl"
        if not path.is_file():
            return [], False
        text = path.read_text(errors="replace")
        lines = text.split("\n")
        torn = lines.pop()  # after the last newline: empty unless the last line was cut short
        records = []
        for number, line in enumerate(lines, 1):
            record = _record(line)
            if record is not None:
                records.append(record)
            elif number == len(lines) and not torn:
                torn = line
            elif line.strip():
                raise KDCacheError(f"{path}: line {number} is not an epoch's record (the file was edited or damaged); "
                                   "remove that line, or start a new --out")
        return records, bool(torn.strip())

    def truncate_metrics(self, last_epoch: int) -> None:
        """Drop metric lines of epochs after the checkpoint (an epoch that ran but was not checkpointed reruns) and a
        torn last line, rewriting the file through a temporary file and a rename."""
        records, torn = self._metrics()
        path = self.out / "metrics.jsonl"
        if torn:
            log.info(f"{path}: dropped its last line, cut short when the run stopped (its epoch runs again)")
        kept = "".join(json.dumps(r) + "\n" for r in records if r["epoch"] <= last_epoch)
        tmp = path.with_name(path.name + ".tmp")
        with self.writes():
            with open(tmp, "w") as f:
                f.write(kept)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)

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


def _record(line: str) -> dict[str, Any] | None:
    """A metrics line's record, or None when the line is not a whole one (an object with its epoch)."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) and isinstance(record.get("epoch"), int) else None


__all__ = ["RUN_FORMAT", "RunDir", "check_overwrite", "differences", "load_checkpoint", "never_trained", "not_a_run",
           "rng_state", "run_folder_lock", "set_rng_state"]
