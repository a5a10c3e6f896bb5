"""A newcomer's first hour (issue 26, points 2, 5 and 7): training that goes wrong is said, progress reaches a log
file, and every stop explains itself in one line (SIGTERM like Ctrl-C, a rerun after bad data, torchrun, and the
messages a new user met)."""

from __future__ import annotations

import json
import re
import signal

import numpy as np
import pytest
import torch

from helpers import STUDENT_KW, _distill_args, _one_error_line, run_cli, said, signal_at, tabular_cache


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    """(data, teacher, cache) of the small tabular task (label = sign of feature 0)."""
    return tabular_cache(tmp_path_factory.mktemp("first-hour"), chunk_rows=32)


# --- 7. stops that explain themselves -------------------------------------------------------------------------

def test_sigterm_in_distill_stops_like_ctrl_c_and_the_resume_finishes(tmp_path, table, capsys, monkeypatch):
    """The process signals itself at a known place (the evaluation of epoch 2): never at a time."""
    import kdcache.train.fit as fit_module

    before = signal.getsignal(signal.SIGTERM)
    signal_at(monkeypatch, fit_module, "evaluate", 2, signal.SIGTERM)
    run = tmp_path / "run"
    code, _, err = run_cli(_distill_args(table[2], run, "--epochs", "3"), capsys, monkeypatch)
    assert code == 143 and said(err) == (f"stopped by SIGTERM: in epoch 2 of 3; epochs 1-1 are saved in "
                                           f"{run / 'last.pt'}: rerun the same command with --resume to continue"), err
    assert torch.load(run / "last.pt", weights_only=True)["epoch"] == 1  # the checkpoint is intact
    assert signal.getsignal(signal.SIGTERM) == before  # the command's handler is gone once it returns
    monkeypatch.undo()
    code, out, err = run_cli(_distill_args(table[2], run, "--epochs", "3", "--resume"), capsys, monkeypatch)
    assert code == 0 and "3/3 epochs" in out, err


def test_sigterm_in_cache_teacher_keeps_the_chunks_and_says_how_to_continue(tmp_path, table, capsys, monkeypatch):
    import kdcache.recipes.cache_teacher as recipe

    data, teacher, _ = table
    signal_at(monkeypatch, recipe, "autocast", 3, signal.SIGTERM)  # the probe pass, then batches 1 and 2
    out = tmp_path / "c.kdcache"
    args = ["cache-teacher", "--teacher", teacher, "--task", "tabular", "--data", data, "--split", "train",
            "--batch-size", "16", "--chunk-rows", "16", "--out", out, "--device", "cpu", "--no-progress"]
    code, _, err = run_cli(args, capsys, monkeypatch)
    assert code == 143 and err.strip().startswith("stopped by SIGTERM: after row 16 of 120 of split 'train'"), err
    assert "rerun the same command to continue" in err
    monkeypatch.undo()
    code, _, err = run_cli(args, capsys, monkeypatch)
    assert code == 0 and "resuming split 'train' at row 16" in err, err


# --- 5. progress everywhere ------------------------------------------------------------------------------------

_LINE = re.compile(r"kdcache: ce mlp (\d+)/16 steps \(\d+%\) epoch (\d)/2 loss \d+\.\d{4} [\d,]+ samples/s, "
                   r"(ETA|done in) \d+:\d\d:\d\d")


def _train_args(data, out, *extra):
    return ["train", "--model", "mlp", "--model-kwargs", json.dumps(STUDENT_KW), "--task", "tabular", "--data", data,
            "--epochs", "2", "--batch-size", "16", "--out", out, "--device", "cpu", *extra]


def test_a_log_file_gets_a_plain_progress_line_every_n_steps(tmp_path, table, capsys, monkeypatch):
    """stderr is not a terminal here (as in a batch job's log): 120 rows in batches of 16 are 8 steps an epoch, so
    a line every 4 steps is 4 lines, each with the epoch, the step, the loss, samples/s and the ETA."""
    code, _, err = run_cli(_train_args(table[0], tmp_path / "run", "--progress-every", "4"), capsys, monkeypatch)
    assert code == 0, err
    lines = [line for line in err.splitlines() if "steps" in line]
    matches = [_LINE.fullmatch(line) for line in lines]
    assert all(matches), lines
    assert [(int(m[1]), int(m[2])) for m in matches] == [(4, 1), (8, 1), (12, 2), (16, 2)]
    assert [m[3] for m in matches] == ["ETA", "ETA", "ETA", "done in"]
    code, _, err = run_cli(_train_args(table[0], tmp_path / "quiet", "--progress-every", "4", "--no-progress"),
                           capsys, monkeypatch)
    assert code == 0 and "steps" not in err, err


def test_the_progress_interval_is_checked_and_reaches_cache_teacher_through_the_environment(
        tmp_path, table, capsys, monkeypatch):
    _one_error_line(*run_cli(_train_args(table[0], tmp_path / "run", "--progress-every", "5x"), capsys,
                             monkeypatch)[::2], "--progress-every '5x'", "30s")
    data, teacher, _ = table
    monkeypatch.setenv("KDCACHE_PROGRESS_EVERY", "3")  # batches of 16: a line after batches 3 and 6 of 8, and the end
    code, _, err = run_cli(["cache-teacher", "--teacher", teacher, "--task", "tabular", "--data", data, "--split",
                            "train", "--batch-size", "16", "--out", tmp_path / "c", "--device", "cpu"], capsys,
                           monkeypatch)
    assert code == 0, err
    assert [line.split(" (")[0] for line in err.splitlines()] == ["kdcache: train 48/120", "kdcache: train 96/120",
                                                                 "kdcache: train 120/120"]


def test_a_terminal_bar_keeps_its_numbers_however_long_the_student_path(monkeypatch):
    import io

    from rich.console import Console

    import kdcache.progress as progress

    console = Console(force_terminal=True, width=80, record=True, file=io.StringIO())
    monkeypatch.setattr(progress, "Console", lambda **kwargs: console)
    bar = progress.progress_bar(True)
    assert not isinstance(bar, progress.Lines)
    bar.add_task("continuation /a/very/long/path/to/students/that/never/ends/bert-4layer-student.json", total=10,
                 completed=3, rate="epoch 2/30 loss 0.1234")
    console.print(bar.get_renderable())
    shown = console.export_text()
    assert "3/10" in shown and "epoch 2/30 loss 0.1234" in shown and "student.json" in shown, shown
    assert len(shown.rstrip("\n")) <= 80


# --- 2. say when training goes wrong ---------------------------------------------------------------------------

def _scripted(monkeypatch, metrics):
    """Each evaluation scores what `metrics` says, in order: a run whose validation metric takes a known path."""
    import kdcache.train.fit as fit_module

    left = list(metrics)
    monkeypatch.setattr(fit_module, "evaluate",
                        lambda *a, **k: {"accuracy": left[0], "metric": left.pop(0), "rows": 40})


def test_a_metric_that_falls_far_below_its_best_warns_once(tmp_path, table, capsys, monkeypatch):
    """The constant predictor scores 0.5 here (validation's share of the training majority), so the line is
    half-way from the best 0.9 to 0.5: 0.7. Epochs 3, 4 and 5 stay under it: one warning, at epoch 5."""
    _scripted(monkeypatch, [0.9, 0.75, 0.6, 0.55, 0.5, 0.5, 0.5])
    run = tmp_path / "run"
    code, out, err = run_cli(_distill_args(table[2], run, "--epochs", "7"), capsys, monkeypatch)
    assert code == 0, err
    warnings = [line for line in err.splitlines() if "warning:" in line]
    assert warnings == [
        "kdcache: warning: validation accuracy 0.5000 at epoch 5 has stayed under 0.7000, half-way from its best "
        "(0.9000, epoch 1) to a constant predictor's (0.5000), for 3 epochs: the run is going wrong (lower --lr, "
        "or use --max-grad-norm); best/ keeps epoch 1"], err
    assert json.loads((run / "summary.json").read_text())["warnings"] == [warnings[0].removeprefix("kdcache: ")]


@pytest.mark.parametrize("path", [[0.9, 0.6, 0.6, 0.85, 0.6, 0.6, 0.8],  # never 3 epochs in a row under 0.7
                                  [0.54, 0.5, 0.5, 0.5, 0.52, 0.5, 0.5]])  # never clearly better than 0.5: no level
def test_a_metric_that_recovers_or_never_learned_does_not_warn(tmp_path, table, capsys, monkeypatch, path):
    _scripted(monkeypatch, path)
    code, _, err = run_cli(_distill_args(table[2], tmp_path / "run", "--epochs", "7"), capsys, monkeypatch)
    assert code == 0 and "warning" not in err, err
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["warnings"] == []


def test_a_model_no_better_than_the_majority_class_is_said_and_recorded(tmp_path, table, capsys, monkeypatch):
    """Every training label is 0, so the model learns to say 0: exactly the majority-class predictor."""
    data = tmp_path / "table"
    data.mkdir()
    for split in ("train", "validation"):
        arrays = dict(np.load(table[0] / f"{split}.npz"))
        if split == "train":
            arrays["y"] = np.zeros_like(arrays["y"])
        np.savez(data / f"{split}.npz", **arrays)
    run = tmp_path / "run"
    code, out, err = run_cli(_train_args(data, run, "--lr", "0.05", "--epochs", "3", "--no-progress"), capsys,
                             monkeypatch)
    assert code == 0, err
    summary = json.loads((run / "summary.json").read_text())
    share = float(np.mean(np.load(data / "validation.npz")["y"] == 0))
    assert summary["baseline_metric"] == pytest.approx(share)
    assert summary["best_metric"] == pytest.approx(share) and summary["no_better_than_baseline"] is True
    assert summary["baseline_predictor"] == "always the majority class '0'"
    assert summary["teacher_no_better_than_baseline"] is None  # `train` has no cached teacher
    note = f"note: {summary['baseline_note']}"
    assert summary["clearly_better_from"] == pytest.approx(share + 0.1 * (1 - share))
    assert note in err.splitlines() and note == (
        f"note: the best model (validation accuracy {share:.4f}) is not clearly better than always the majority "
        f"class '0' ({share:.4f}; clearly better starts at {summary['clearly_better_from']:.4f}): check the learning "
        "rate and the number of epochs")


def test_a_chance_level_teacher_is_said_by_distill(tmp_path, table, capsys, monkeypatch):
    """The fixture's teacher is an untrained MLP (validation accuracy under the majority class's)."""
    run = tmp_path / "run"
    code, _, err = run_cli(_distill_args(table[2], run, "--lr", "0.01", "--epochs", "4"), capsys, monkeypatch)
    assert code == 0, err
    summary = json.loads((run / "summary.json").read_text())
    assert summary["teacher_metric"] < summary["baseline_metric"] and summary["teacher_no_better_than_baseline"]
    assert "the teacher in the cache" in summary["baseline_note"] and "nothing to teach" in summary["baseline_note"]
    assert f"note: {summary['baseline_note']}" in err.splitlines()
    assert summary["no_better_than_baseline"] == (summary["best_metric"] < summary["clearly_better_from"])


def test_selecting_on_the_test_split_is_said_at_the_start(tmp_path, table, capsys, monkeypatch):
    data = tmp_path / "table"
    data.mkdir()
    for split, name in (("train", "train"), ("validation", "test")):
        (data / f"{name}.npz").write_bytes((table[0] / f"{split}.npz").read_bytes())
    import kdcache.train.fit as fit_module

    said = []
    real = fit_module.train_together
    monkeypatch.setattr(fit_module, "train_together",
                        lambda *a, **k: said.append(capsys.readouterr().err) or real(*a, **k))
    code, _, err = run_cli(_train_args(data, tmp_path / "run", "--no-progress", "--val-split", "test"), capsys,
                           monkeypatch)
    assert code == 0, err
    assert "kdcache: note: best checkpoint selected on the test split" in said[0]  # before the first step
    assert "note: best checkpoint selected on the test split" in err  # and beside the result


# --- 7. the messages a new user met, each one line -------------------------------------------------------------

_CUDA_OOM = ("CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has a total capacity of 79.19 GiB of which 1.2 "
             "GiB is free. Including non-PyTorch memory, this process has 78.0 GiB memory in use. If reserved but "
             "unallocated memory is large try setting PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True")


def test_a_student_too_large_for_the_device_is_one_line(tmp_path, table, capsys, monkeypatch):
    """The allocator's failure is raised where a GPU raises it (placing the student, then a training step)."""
    import kdcache.train.loop as loop
    import kdcache.train.run as run_module

    def no_room(*args, **kwargs):
        raise torch.OutOfMemoryError(_CUDA_OOM)

    monkeypatch.setattr(run_module, "check_student", no_room)
    code, _, err = run_cli(_distill_args(table[2], tmp_path / "a"), capsys, monkeypatch)
    _one_error_line(code, err, "out of memory: student mlp (", "parameters) does not fit on cpu",
                    "(it asked for 20.00 GiB more)", "choose a smaller student")
    monkeypatch.undo()
    monkeypatch.setattr(loop, "_step", no_room)
    code, _, err = run_cli(_distill_args(table[2], tmp_path / "b", "--batch-size", "16"), capsys, monkeypatch)
    _one_error_line(code, err, "out of memory: training continuation mlp on cpu in epoch 1 (batches of 16)",
                    "lower --batch-size")
    assert "PYTORCH_CUDA_ALLOC_CONF" not in err


def test_a_cpu_allocator_failure_anywhere_else_is_one_line(tmp_path, table, capsys, monkeypatch):
    import kdcache.cache.info as info

    def no_room(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate "
                           "memory: you tried to allocate 10000000000000 bytes. Error code 12")

    monkeypatch.setattr(info, "Cache", no_room)
    code, _, err = run_cli(["info", table[2]], capsys, monkeypatch)
    _one_error_line(code, err, "out of memory", "--batch-size", "--debug")


def test_info_on_an_interrupted_cache_says_how_far_it_got_not_source_none(tmp_path, table, capsys, monkeypatch):
    from helpers import interrupt_autocast_at

    data, teacher, _ = table
    interrupt_autocast_at(monkeypatch, 3)  # the probe pass, then batches 1 and 2: rows 0-15 are stored
    out = tmp_path / "c.kdcache"
    assert run_cli(["cache-teacher", "--teacher", teacher, "--task", "tabular", "--data", data, "--batch-size", "16",
                    "--chunk-rows", "16", "--out", out, "--device", "cpu", "--no-progress"], capsys,
                   monkeypatch)[0] == 130
    code, shown, err = run_cli(["info", out], capsys, monkeypatch)
    assert code == 0, err
    assert "None" not in shown and "no (16 stored)" in shown, shown
    assert shown.rstrip().splitlines()[-1].startswith("incomplete: rerun the cache-teacher command above")
    code, shown, _ = run_cli(["info", out, "--json"], capsys, monkeypatch)
    assert json.loads(shown)["splits"][0]["rows_stored"] == 16


@pytest.mark.parametrize("what", ["plain folder", "run folder", "model folder", "data folder"])
def test_info_on_a_folder_that_is_not_a_cache_says_what_it_is(tmp_path, table, capsys, monkeypatch, what):
    data, teacher, cache = table
    if what == "run folder":
        folder = tmp_path / "run"
        assert run_cli(_distill_args(cache, folder, "--epochs", "1"), capsys, monkeypatch)[0] == 0
    else:
        folder = {"plain folder": tmp_path, "model folder": teacher, "data folder": data}[what]
    said = {"plain folder": "no zarr.json; a cache is the --out folder of kdcache cache-teacher",
            "data folder": "no zarr.json; a cache is the --out folder of kdcache cache-teacher",
            "run folder": "it is a run folder of kdcache train/distill",
            "model folder": "it is a kdcache model folder; make a cache of it with kdcache cache-teacher"}[what]
    for args in (["info", folder], _distill_args(folder, tmp_path / "out")):
        code, _, err = run_cli(args, capsys, monkeypatch)
        _one_error_line(code, err, f"{folder}: not a kdcache cache ({said}")
        assert "Zarr" not in err


def test_a_run_folder_given_as_a_model_points_to_its_best_model(tmp_path, table, capsys, monkeypatch):
    data, _, cache = table
    run = tmp_path / "run"
    assert run_cli(_distill_args(cache, run, "--epochs", "1"), capsys, monkeypatch)[0] == 0
    said = f"{run}: is a kdcache run folder, not a model folder; its best model is {run / 'best'}"
    for args in (["cache-teacher", "--teacher", run, "--task", "tabular", "--data", data, "--out", tmp_path / "c",
                  "--device", "cpu", "--no-progress"],
                 _distill_args(cache, tmp_path / "student", "--student", run),
                 _train_args(data, tmp_path / "model", "--model", run)):
        code, _, err = run_cli(args, capsys, monkeypatch)
        _one_error_line(code, err, said)
        assert "Hugging Face" not in err
    code, _, err = run_cli(["cache-teacher", "--teacher", run / "best", "--task", "tabular", "--data", data, "--out",
                            tmp_path / "c", "--device", "cpu", "--no-progress"], capsys, monkeypatch)
    assert code == 0, err  # where the message points is a teacher that caches


def test_a_run_stopped_by_bad_data_reruns_as_typed_once_the_data_is_fixed(tmp_path, table, capsys, monkeypatch):
    data, _, cache = table
    moved = tmp_path / "moved"
    moved.mkdir()
    for split in ("train", "validation"):
        arrays = dict(np.load(data / f"{split}.npz"))
        if split == "train":
            arrays["x"][100] += 1  # one row no longer the row the teacher saw
        np.savez(moved / f"{split}.npz", **arrays)
    run = tmp_path / "run"
    args = _distill_args(cache, run, "--data", moved)
    _one_error_line(*run_cli(args, capsys, monkeypatch)[::2], "row 100", "does not match the cache")
    assert sorted(p.name for p in run.iterdir()) == ["config.json"]  # the run never finished an epoch
    for split in ("train", "validation"):  # the data fixed
        (moved / f"{split}.npz").write_bytes((data / f"{split}.npz").read_bytes())
    code, out, err = run_cli(args, capsys, monkeypatch)  # the same command, no --resume, no --overwrite
    assert code == 0 and "2/2 epochs" in out, err
    assert f"kdcache: {run}: starting again (the run there stopped before finishing an epoch)" in err
    code, _, err = run_cli(args, capsys, monkeypatch)  # a run with a finished epoch is still never replaced silently
    _one_error_line(code, err, "already holds a run", "--resume")


@pytest.mark.slow
def test_under_torchrun_the_one_line_ends_torchrun_s_own_report(tmp_path, table):
    """Rank 0 says the line once; every rank hands it to torchrun's error file, so torchrun's report (which a child
    cannot switch off) names it under Root Cause instead of a link to its docs."""
    import os
    import subprocess
    import sys

    from helpers import REPO

    held = tmp_path / "run"
    held.mkdir()
    (held / "notes.txt").write_text("not a run\n")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "kdcache", *map(str, _distill_args(table[2], held, "--num-workers", "0"))],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    said = f"{held}: already holds a run; pass --resume to continue it or --overwrite to replace it"
    assert [line for line in proc.stderr.splitlines() if line.startswith("error: ")] == [f"error: {said}"]
    root_cause = proc.stderr.split("Root Cause")[1]
    assert f"traceback : kdcache: {said}" in root_cause, proc.stderr[-3000:]
    assert "To enable traceback" not in proc.stderr


_SIGNALS_ITS_GROUP = """
import os, signal, sys
import kdcache.train.loop as loop
from kdcache.cli.main import main

real, calls = loop._step, {"n": 0}
def step(*args, **kwargs):
    calls["n"] += 1
    if calls["n"] == 10:  # step 2 of epoch 2, its DataLoader worker running: the whole group, as a scheduler sends it
        os.killpg(os.getpgid(0), signal.SIGTERM)
    return real(*args, **kwargs)
loop._step = step
sys.argv = ["kdcache", *sys.argv[1:]]
main()
"""


@pytest.mark.slow
def test_sigterm_to_the_whole_process_group_stops_the_run_not_its_workers_first(tmp_path, table):
    """A real process (its own session, so the signal reaches it and its DataLoader worker only) signals its whole
    group at a counted step: the exit status, the one line and last.pt are those of the in-process test. (Which of
    the two processes takes the signal first is the OS's choice; the worker ignores it, so either order ends here.)"""
    import os
    import subprocess
    import sys

    from helpers import REPO

    script = tmp_path / "signals_its_group.py"
    script.write_text(_SIGNALS_ITS_GROUP)
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'tests'}", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(script), *map(str, _distill_args(table[2], run, "--epochs", "3",
                                                                                "--num-workers", "1",
                                                                                "--keep-inputs", "0",
                                                                                "--batch-size", "16"))],
                          env=env, capture_output=True, text=True, timeout=300, start_new_session=True)
    assert proc.returncode == 143, proc.stderr[-2000:]
    assert said(proc.stderr) == (f"stopped by SIGTERM: in epoch 2 of 3; epochs 1-1 are saved in {run / 'last.pt'}: "
                                   "rerun the same command with --resume to continue"), proc.stderr[-2000:]
    assert torch.load(run / "last.pt", weights_only=True)["epoch"] == 1


def test_plain_lines_every_n_seconds_follow_the_clock_they_are_given():
    """The default interval is a time: here a clock the test moves, so no line depends on how fast the test runs."""
    import io

    from kdcache.progress import Lines

    now, stream = {"t": 0.0}, io.StringIO()
    lines = Lines(every_seconds=30, stream=stream, clock=lambda: now["t"])
    task = lines.add_task("train", total=100, completed=20, rate="")  # a resumed capture: 20 rows were done
    for t, rows in ((10, 10), (29, 10), (31, 10), (50, 10), (62, 10)):
        now["t"] = t
        lines.update(task, advance=rows, rate=f"{rows / 10:.0f} rows/s")
    lines.__exit__(None, None, None)
    # at 31 s: 30 rows in 31 s, 50 left; at 62 s: 50 rows in 62 s, 30 left; at the end, nothing new to say
    assert stream.getvalue().splitlines() == ["kdcache: train 50/100 (50%) 1 rows/s, ETA 0:00:52",
                                              "kdcache: train 70/100 (70%) 1 rows/s, ETA 0:00:37"]
