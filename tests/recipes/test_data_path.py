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
import torch

from helpers import REPO, _one_error_line, run_cli, tabular_cache


@pytest.fixture
def table_cache(tmp_path):
    """A 200-row tabular train split and a 40-row validation split, cached by a small MLP teacher."""
    data, _, cache = tabular_cache(tmp_path, rows=(("train", 200), ("validation", 40)), features=16, chunk_rows=16)
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
    code, _, err = run_cli(_args(cache, run, "--max-steps", "3", "--check-first"), capsys, monkeypatch)
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


# --- review round: what a cut-short, resumed or moved run still proves -------------------------------------------

def test_max_steps_keeps_no_model_trained_before_every_row_was_checked(tmp_path, capsys, monkeypatch, table_cache):
    """A smoke run stopped inside epoch 1 has read (and checked) only some rows: it reports its numbers and says
    so, but keeps no model; with --check-first every row is proven first and the model is kept."""
    data, cache = table_cache
    _change_row(data / "train.npz", 2)  # whether or not step 1 reaches it, nothing of this run is kept as a model
    run = tmp_path / "run"
    code, _, err = run_cli(_args(cache, run, "--max-steps", "1"), capsys, monkeypatch)
    if code == 0:
        summary = json.loads((run / "summary.json").read_text())
        assert summary["unchecked_rows"] == 200 - 16 and "no model was kept" in err
    else:
        _one_error_line(code, err, "train.npz", "row 2 ", "does not match")
    assert not (run / "best").exists() and not (run / "last.pt").exists()
    _one_error_line(*run_cli(_args(cache, run, "--max-steps", "1", "--check-first", "--overwrite"), capsys,
                             monkeypatch)[::2], "row 2 ", "does not match")


def test_max_steps_inside_the_last_epoch_is_not_a_complete_run(tmp_path, capsys, monkeypatch, table_cache):
    _, cache = table_cache
    run = tmp_path / "run"
    code, _, err = run_cli(_args(cache, run, "--max-steps", "20"), capsys, monkeypatch)  # 13 steps per epoch
    assert code == 0, err
    summary = json.loads((run / "summary.json").read_text())
    assert summary["epochs_done"] == 2 and summary["stopped_at_step"] == 20 and summary["complete"] is False


def test_a_decode_error_in_a_worker_is_one_line_naming_the_file(tmp_path, capsys, monkeypatch):
    from PIL import Image

    for split in ("train", "val"):
        for cls in ("a", "b"):
            (tmp_path / "imgs" / split / cls).mkdir(parents=True)
            for k in range(3):
                Image.new("RGB", (8, 8), (k * 40, 0, 0)).save(tmp_path / "imgs" / split / cls / f"{k}.png")
    bad = tmp_path / "imgs" / "train" / "b" / "2.png"
    bad.write_bytes(b"not a png")
    code, _, err = run_cli(["train", "--model", "mlp", "--task", "imagefolder", "--data", tmp_path / "imgs",
                            "--epochs", "1", "--num-workers", "1", "--out", tmp_path / "run", "--device", "cpu",
                            "--no-progress"], capsys, monkeypatch)
    _one_error_line(code, err, str(bad), "cannot decode image")
    assert "Traceback" not in err and "worker" not in err


@pytest.mark.parametrize("value, needle", [("e", "expected a share of RAM"), ("1.5", "a number without a unit is a "
                                                                                      "share of RAM, from 0 to 1"),
                                           ("2", "from 0 to 1"), ("12XB", "expected a share of RAM")])
def test_bad_budgets_are_one_line_before_anything_loads(tmp_path, capsys, monkeypatch, value, needle):
    for flag in ("--memory-budget", "--keep-inputs"):
        code, _, err = run_cli(["distill", "--cache", tmp_path, "--student", "mlp", "--out", tmp_path / "run", flag,
                                value], capsys, monkeypatch)
        _one_error_line(code, err, f"{flag} {value!r}", needle)  # the cache folder is not even opened


def test_budgets_read_as_shares_or_sizes():
    from kdcache.names import parse_budget, total_memory

    assert parse_budget("512MiB") == 512 * 1024**2 and parse_budget("2e9B") == 2 * 10**9
    assert parse_budget("0.5") == total_memory() // 2 and parse_budget("0") == 0
    assert parse_budget(None) == int(0.25 * total_memory())


def test_the_prefetch_thread_holds_at_most_two_windows(tmp_path):
    """One window in use and one being read: the thread starts on the next only once the loop took the last."""
    import gc
    import weakref

    from kdcache.train.batches import _prefetch

    alive, peak = set(), []

    class Window:
        pass

    def read(k):
        time.sleep(0.01)
        window = Window()
        alive.add(k)
        weakref.finalize(window, alive.discard, k)
        peak.append(len(alive))
        return window

    for window in _prefetch(read, list(range(12))):
        time.sleep(0.03)  # the loop is slower than the reads: the thread would run ahead if it could
        del window
        gc.collect()
    assert max(peak) <= 2


def test_a_train_run_resumed_on_changed_data_names_the_row(tmp_path, capsys, monkeypatch, table_cache):
    """`train` has no cache: its first epoch records every row's fingerprint in last.pt, and a resume checks the
    rows against it as they are decoded; a moved dataset resumes."""
    data, _ = table_cache
    args = ["train", "--model", "mlp", "--model-kwargs", '{"hidden": 4, "depth": 1}', "--task", "tabular",
            "--epochs", "3", "--batch-size", "16", "--device", "cpu", "--no-progress"]
    run = tmp_path / "run"
    assert run_cli([*args, "--data", data, "--out", run, "--stop-after-epoch", "1"], capsys, monkeypatch)[0] == 0
    moved = tmp_path / "moved"
    data.rename(moved)
    _change_row(moved / "train.npz", 77)
    _one_error_line(*run_cli([*args, "--data", moved, "--out", run, "--resume"], capsys, monkeypatch)[::2],
                    "train.npz", "row 77 ", "does not match what this run read before", "last.pt")


def test_a_train_run_of_the_previous_release_resumes_after_one_pass_over_its_rows(tmp_path, capsys, monkeypatch,
                                                                                  table_cache):
    """Identity version 2 hashed every row's fingerprint into a train run's data digest: such a run resumes (the
    rows are read once to recompute it) and ends where an uninterrupted run does; changed data is refused."""
    import hashlib

    data, _ = table_cache
    args = ["train", "--model", "mlp", "--model-kwargs", '{"hidden": 4, "depth": 1}', "--task", "tabular",
            "--data", data, "--epochs", "3", "--batch-size", "16", "--device", "cpu", "--no-progress"]
    assert run_cli([*args, "--out", tmp_path / "full"], capsys, monkeypatch)[0] == 0
    cut = tmp_path / "cut"
    assert run_cli([*args, "--out", cut, "--stop-after-epoch", "1"], capsys, monkeypatch)[0] == 0
    state = torch.load(cut / "last.pt", weights_only=True)
    fingerprints = state["rows"]["train"].numpy().view(np.uint64)
    old = {**state, "identity": {**state["identity"], "identity_version": 2,
                                 "data_digest": hashlib.sha256(fingerprints.tobytes()).hexdigest()}}
    del old["rows"], old["targets"]
    torch.save(old, cut / "last.pt")
    assert run_cli([*args, "--out", cut, "--resume"], capsys, monkeypatch)[0] == 0
    metrics = [[{k: v for k, v in json.loads(line).items() if k not in ("seconds", "samples_per_second")}
                for line in (run / "metrics.jsonl").read_text().splitlines()] for run in (cut, tmp_path / "full")]
    assert metrics[0] == metrics[1]
    torch.save(old, cut / "last.pt")
    _change_row(data / "train.npz", 4)
    _one_error_line(*run_cli([*args, "--out", cut, "--resume"], capsys, monkeypatch)[::2],
                    "checkpoint of another run", "data_digest")


def test_a_resume_replays_the_chunk_order_whatever_the_budget_now(tmp_path, capsys, monkeypatch, table_cache):
    """The batch order depends on how the targets are held; last.pt records it, so a run begun streaming chunks
    and resumed with a budget that would hold the split in memory ends where an uninterrupted run does."""
    _, cache = table_cache
    chunked = ["--stream", "chunks", "--memory-budget", "1KiB", "--epochs", "3"]  # windows of 2 of 13 chunks
    assert run_cli(_args(cache, tmp_path / "full", *chunked), capsys, monkeypatch)[0] == 0
    assert run_cli(_args(cache, tmp_path / "cut", *chunked, "--stop-after-epoch", "1"), capsys, monkeypatch)[0] == 0
    state = torch.load(tmp_path / "cut" / "last.pt", weights_only=True)
    assert state["targets"]["mode"] == "chunks" and state["targets"]["window_chunks"] >= 1
    resumed = _args(cache, tmp_path / "cut", "--stream", "chunks", "--epochs", "3", "--resume")  # default budget
    assert run_cli(resumed, capsys, monkeypatch)[0] == 0
    metrics = [[{k: v for k, v in json.loads(line).items() if k not in ("seconds", "samples_per_second")}
                for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()] for run in ("cut", "full")]
    assert metrics[0] == metrics[1]
    summary = json.loads((tmp_path / "cut" / "summary.json").read_text())
    assert summary["teacher_targets"] == state["targets"]
