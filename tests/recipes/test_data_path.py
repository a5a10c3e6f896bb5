"""The student's data path (issue 12): rows checked as they are decoded with nothing kept from a run that meets a
changed row, the validation split checked at its first evaluation, --max-steps, start-up recorded, one-line
errors for flags the machine or the data cannot honour, and a command line that reports a typo without
importing torch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from helpers import REPO, _one_error_line, run_cli, tabular_cache


@pytest.fixture
def table_cache(tmp_path):
    """A 200-row tabular train split and a 40-row validation split, cached by a small MLP teacher."""
    data, _, cache = tabular_cache(tmp_path, rows=(("train", 200), ("validation", 40)), features=16)
    return data, cache


def _args(cache, out, *extra):
    return ["distill", "--cache", cache, "--student", "mlp", "--student-kwargs", '{"hidden": 4, "depth": 1}',
            "--epochs", "2", "--batch-size", "16", "--out", out, "--device", "cpu", "--no-progress", *extra]


def _change_row(path: Path, row: int) -> None:
    with np.load(path) as npz:
        x, y = npz["x"].copy(), npz["y"]
    x[row, 3] += 1.0  # the input changed, its label did not
    np.savez(path, x=x, y=y)


@pytest.mark.parametrize("row", [0, 123, 199])
def test_a_changed_training_row_stops_epoch_1_before_any_checkpoint(tmp_path, capsys, monkeypatch, table_cache, row):
    data, cache = table_cache
    _change_row(data / "train.npz", row)
    run = tmp_path / "run"
    _one_error_line(*run_cli(_args(cache, run), capsys, monkeypatch)[::2], "train.npz", f"row {row} ",
                    "does not match the cache")
    assert not (run / "best").exists() and not (run / "last.pt").exists()
    metrics = run / "metrics.jsonl"
    assert not metrics.exists() or metrics.read_text() == ""


def test_a_changed_validation_row_stops_the_run_at_its_first_evaluation(tmp_path, capsys, monkeypatch, table_cache):
    data, cache = table_cache
    _change_row(data / "validation.npz", 31)
    run = tmp_path / "run"
    _one_error_line(*run_cli(_args(cache, run), capsys, monkeypatch)[::2], "validation.npz", "row 31 ")
    assert not (run / "best").exists() and not (run / "last.pt").exists()


def test_check_first_compares_every_row_before_training(tmp_path, capsys, monkeypatch, table_cache):
    data, cache = table_cache
    for row in (5, 150):
        _change_row(data / "train.npz", row)
    _one_error_line(*run_cli(_args(cache, tmp_path / "run", "--check-first"), capsys, monkeypatch)[::2],
                    "row 5 ", "2 of 200 rows differ")


def test_max_steps_stops_after_n_optimizer_steps_and_evaluates_once(tmp_path, capsys, monkeypatch, table_cache):
    _, cache = table_cache
    run = tmp_path / "run"
    code, _, err = run_cli(_args(cache, run, "--max-steps", "3"), capsys, monkeypatch)
    assert code == 0, err
    summary = json.loads((run / "summary.json").read_text())
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert summary["max_steps"] == 3 and summary["epochs_done"] == 1 and not summary["complete"]
    assert len(metrics) == 1 and metrics[0]["metric"] == summary["best_metric"]
    assert (run / "best").is_dir() and not (run / "last.pt").exists()  # nothing to resume mid-epoch


def test_startup_seconds_count_from_process_start_to_the_first_step(tmp_path, table_cache):
    _, cache = table_cache
    run = tmp_path / "run"
    started = time.time()
    done = subprocess.run([sys.executable, "-m", "kdcache.cli.main", *map(str, _args(cache, run, "--epochs", "1"))],
                          capture_output=True, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    elapsed = time.time() - started
    assert done.returncode == 0, done.stderr
    summary = json.loads((run / "summary.json").read_text())
    assert 0 < summary["startup_seconds"] < elapsed
    assert summary["startup_seconds"] + summary["train_seconds"] <= elapsed


@pytest.mark.parametrize("flags, needles", [
    (["--num-workers", "4096"], ["--num-workers 4096: this machine has"]),
    (["--stream", "chunks", "--memory-budget", "100B"], ["a memory budget of 100 bytes holds no chunk",
                                                          "raise --memory-budget"]),
    (["--memory-budget", "lots"], ["--memory-budget 'lots': expected a share of RAM"]),
    (["--augment", "cifar"], ["--augment cifar", "images"]),
    (["--augment", "mixup"], ["--augment 'mixup' is not one of none, cifar, imagenet"]),
    (["--log-every", "-1"], ["--log-every"]),
])
def test_flags_the_machine_or_data_cannot_honour_are_one_line(tmp_path, capsys, monkeypatch, table_cache, flags,
                                                               needles):
    _, cache = table_cache
    run = tmp_path / "run"
    _one_error_line(*run_cli(_args(cache, run, *flags), capsys, monkeypatch)[::2], *needles)
    assert not (run / "best").exists()


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)})


def test_a_typo_is_reported_without_importing_torch_transformers_or_sklearn(tmp_path):
    done = _python(f"""
import sys
from kdcache.cli.main import main
sys.argv = ["kdcache", "distill", "--cache", {str(tmp_path)!r}, "--student", "mlp", "--out", {str(tmp_path / 'r')!r},
            "--method", "continuatoin"]
try:
    main()
except SystemExit as exc:
    print("exit", exc.code, sorted(m for m in ("torch", "transformers", "sklearn", "zarr") if m in sys.modules))
""")
    assert "exit 1 []" in done.stdout, (done.stdout, done.stderr)
    assert "--method 'continuatoin' is not one of" in done.stderr


def test_training_without_compile_never_imports_dynamo(table_cache, tmp_path):
    _, cache = table_cache
    done = _python(f"""
import sys
from kdcache.recipes.distill import distill
from kdcache.train.config import DistillConfig
distill(DistillConfig(cache={str(cache)!r}, student="mlp", out={str(tmp_path / 'run')!r}, epochs=1, device="cpu",
                      progress=False, student_kwargs={{"hidden": 4, "depth": 1}}))
print("dynamo imported:", "torch._dynamo" in sys.modules)
""")
    assert "dynamo imported: False" in done.stdout, (done.stdout, done.stderr)
