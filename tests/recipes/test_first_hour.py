"""A newcomer's first hour (issue 26, points 2, 5 and 7): training that goes wrong is said, progress reaches a log
file, and every stop explains itself in one line (SIGTERM like Ctrl-C, a rerun after bad data, torchrun, and the
messages a new user met)."""

from __future__ import annotations

import json
import signal

import numpy as np
import pytest
import torch

from helpers import STUDENT_KW, _distill_args, _one_error_line, run_cli, signal_at, tabular_cache


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
    assert code == 143 and err.strip() == (f"stopped by SIGTERM: in epoch 2 of 3; epochs 1-1 are saved in "
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
