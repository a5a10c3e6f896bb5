"""--holdout (issue 14): a validation split carved out of the training rows, for datasets that ship none, so the
best checkpoint is never selected on the test split."""

from __future__ import annotations

import json

import numpy as np

import kdcache
from helpers import _one_error_line, run_cli


def _table(root, n=200, test=30):
    rng = np.random.default_rng(0)
    data = root / "table"
    data.mkdir()
    for split, rows in (("train", n), ("test", test)):
        x = rng.normal(size=(rows, 8)).astype(np.float32)
        np.savez(data / f"{split}.npz", x=x, y=(x[:, 0] > 0).astype(np.int64))
    return data


def _teacher(root):
    import torch

    from kdcache.models import mlp, save_model_dir

    torch.manual_seed(0)
    kwargs = {"in_features": 8, "hidden": 8, "depth": 1}
    return save_model_dir(mlp(2, **kwargs), root / "teacher", architecture="mlp", num_classes=2, kwargs=kwargs)


def test_a_held_out_validation_split_is_cached_apart_from_train_and_selects_the_best(tmp_path, capsys, monkeypatch):
    data, teacher, cache = _table(tmp_path), _teacher(tmp_path), tmp_path / "c.kdcache"
    code, _, err = run_cli(["cache-teacher", "--teacher", teacher, "--task", "tabular", "--data", data, "--split",
                            "train", "--split", "validation", "--split", "test", "--holdout", "40", "--out", cache,
                            "--device", "cpu", "--no-progress"], capsys, monkeypatch)
    assert code == 0, err
    train, val = (kdcache.open_cache(cache, split=s) for s in ("train", "validation"))
    assert (len(train), len(val)) == (160, 40)
    held, kept = val.read("index"), train.read("index")
    assert not set(held) & set(kept) and sorted([*held, *kept]) == list(range(200))  # disjoint, every row once
    assert held[0] == 0 and held[-1] == 199  # evenly spaced over the training rows
    run = tmp_path / "run"
    code, _, err = run_cli(["distill", "--cache", cache, "--student", "mlp", "--epochs", "2", "--out", run, "--device",
                            "cpu", "--no-progress"], capsys, monkeypatch)
    assert code == 0, err  # the re-read rows matched the cache's, split by split
    summary = json.loads((run / "summary.json").read_text())
    assert summary["validation_split"] == "validation" and summary["selection_note"] is None
    trained = tmp_path / "trained"
    code, _, err = run_cli(["train", "--model", "mlp", "--task", "tabular", "--data", data, "--holdout", "40",
                            "--epochs", "1", "--out", trained, "--device", "cpu", "--no-progress"], capsys, monkeypatch)
    assert code == 0, err
    assert json.loads((trained / "summary.json").read_text())["validation_split"] == "validation"


def test_a_holdout_that_leaves_no_training_rows_is_one_line(tmp_path, capsys, monkeypatch):
    data, teacher = _table(tmp_path), _teacher(tmp_path)
    out = tmp_path / "c.kdcache"
    _one_error_line(*run_cli(["cache-teacher", "--teacher", teacher, "--task", "tabular", "--data", data, "--split",
                              "train", "--holdout", "200", "--out", out, "--device", "cpu", "--no-progress"], capsys,
                             monkeypatch)[::2], "train.npz", "--holdout 200 leaves no training rows")
    assert not out.exists()


def test_the_test_split_is_scored_every_epoch_and_reported_at_the_best_validation_epoch(tmp_path, capsys, monkeypatch):
    data, teacher, cache = _table(tmp_path), _teacher(tmp_path), tmp_path / "c.kdcache"
    assert run_cli(["cache-teacher", "--teacher", teacher, "--task", "tabular", "--data", data, "--split", "train",
                    "--split", "validation", "--split", "test", "--holdout", "40", "--out", cache, "--device", "cpu",
                    "--no-progress"], capsys, monkeypatch)[0] == 0
    run = tmp_path / "run"
    code, _, err = run_cli(["distill", "--cache", cache, "--student", "mlp", "--epochs", "4", "--lr", "0.01", "--out",
                            run, "--device", "cpu", "--no-progress", "--report-split", "test"], capsys, monkeypatch)
    assert code == 0, err
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(r["split"] == "validation" and r["report_split"] == "test" for r in lines)
    summary = json.loads((run / "summary.json").read_text())
    best = next(r for r in lines if r["epoch"] == summary["best_epoch"])
    assert summary["report_metric_at_best"] == best["report_metric"] and summary["report_split"] == "test"
    assert summary["report_metric_last"] == lines[-1]["report_metric"]
    for split, needle in (("validation", "the split the run selects on"), ("train", "the split the run trains on"),
                          ("dev", "no split 'dev' to report on")):
        _one_error_line(*run_cli(["distill", "--cache", cache, "--student", "mlp", "--epochs", "1", "--out",
                                  tmp_path / f"bad-{split}", "--device", "cpu", "--no-progress", "--report-split", split],
                                 capsys, monkeypatch)[::2], f"--report-split {split}" if split != "dev" else "c.kdcache",
                        needle)
