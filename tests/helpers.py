"""Helpers the tests share: running the CLI in-process, the one-line error contract, small file writers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from kdcache.cli.main import main

REPO = Path(__file__).resolve().parents[1]
STUDENT_KW = {"hidden": 16, "depth": 1}


def run_cli(args, capsys, monkeypatch):
    """Run `kdcache ARGS` in-process through the console-script entry point; returns (code, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["kdcache", *map(str, args)])
    code = 0
    try:
        main()
    except SystemExit as exc:
        code = exc.code or 0
    out = capsys.readouterr()
    return code, out.out, out.err


def _one_error_line(code, err, *needles):
    assert code == 1, err
    lines = [line for line in err.strip().splitlines() if not line.startswith("kdcache: ")]  # notes, not errors
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def said(err):
    """stderr without kdcache's notes (`kdcache: ...`, e.g. the settings line every run starts with)."""
    return "\n".join(line for line in err.strip().splitlines() if not line.startswith("kdcache: ")).strip()


def write_tsv(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join("\t".join(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _distill_args(cache, out, *extra):
    return ["distill", "--cache", cache, "--student", "mlp", "--student-kwargs", json.dumps(STUDENT_KW),
            "--epochs", "2", "--out", out, "--device", "cpu", "--no-progress", *extra]


def read_root_attrs(path: Path) -> dict | None:
    """A cache's root attributes, or None when there is no readable zarr.json (as the store reads them)."""
    from kdcache.cache.store import CacheStore

    meta = CacheStore(path).read_json("zarr.json")
    return meta.get("attributes", {}) if isinstance(meta, dict) else None


def tabular_cache(root: Path, *, rows=(("train", 120), ("validation", 40)), features: int = 64, seed: int = 0,
                  chunk_rows: int | None = None):
    """A tabular dataset (label = sign of feature 0) cached by a small seeded MLP teacher: (data, teacher, cache)."""
    import numpy as np
    import torch

    from kdcache.models import mlp, save_model_dir
    from kdcache.recipes.cache_teacher import CacheTeacherConfig, cache_teacher

    rng = np.random.default_rng(seed)
    data = root / "table"
    data.mkdir(parents=True)
    for split, n in rows:
        x = rng.normal(size=(n, features)).astype(np.float32)
        np.savez(data / f"{split}.npz", x=x, y=(x[:, 0] > 0).astype(np.int64))
    torch.manual_seed(seed)
    kwargs = {"in_features": features, "hidden": 8, "depth": 1}
    teacher = save_model_dir(mlp(2, **kwargs), root / "teacher", architecture="mlp", num_classes=2, kwargs=kwargs)
    cache = cache_teacher(CacheTeacherConfig(teacher=str(teacher), task="tabular", data=str(data),
                                             out=root / "c.kdcache", splits=tuple(s for s, _ in rows),
                                             device="cpu", progress=False, chunk_rows=chunk_rows))
    return data, teacher, cache


def interrupt_autocast_at(monkeypatch, call: int) -> None:
    """Make cache-teacher's `call`-th autocast (the first is the probe pass, then one per batch) a Ctrl-C: an
    interruption placed by count, never by time."""
    import kdcache.recipes.cache_teacher as recipe

    real, calls = recipe.autocast, {"n": 0}

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == call:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(recipe, "autocast", interrupted)


def signal_at(monkeypatch, module, name: str, call: int, signum: int) -> None:
    """Make the `call`-th call of `module.name` send this process `signum` first: a signal placed by count, never
    by time (Python runs the handler before the next line of the caller)."""
    import signal

    real, calls = getattr(module, name), {"n": 0}

    def signalled(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == call:
            signal.raise_signal(signum)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, signalled)


LM_WORDS = ("the king", "my lord", "good night", "sweet prince", "to be", "or not", "what light", "through yonder",
            "window breaks", "it is the east")
#: 40 documents of 2-9 phrases: about 1,400 tokens of the tiny BPE, 90 windows of 16 (the LM tests' corpus)
LM_CORPUS = [" ".join(LM_WORDS[(d * 7 + k * 3) % len(LM_WORDS)] for k in range(2 + d % 8)) + ("." if d % 3 else "!")
             for d in range(40)]


def write_lm_corpus(folder: Path) -> Path:
    """The LM corpus as `train.txt` (30 documents) and `validation.txt` (10), one document a line."""
    (folder / "train.txt").write_text("\n".join(LM_CORPUS[:30]) + "\n", encoding="utf-8")
    (folder / "validation.txt").write_text("\n".join(LM_CORPUS[30:]) + "\n", encoding="utf-8")
    return folder


def kdcache_processes(nproc: int, args) -> None:
    """`kdcache ARGS` in a child process, or under torchrun in `nproc` (gloo on CPU), one thread each; it must exit 0."""
    launcher = [] if nproc == 1 else ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")]), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, *launcher, "-m", "kdcache", *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]

