"""Splits are never silently the same rows (issue 26): one data file named for two splits is refused in one line
that points to --holdout, and --holdout-test carves a test split out of the training rows as --holdout carves the
validation split."""

from __future__ import annotations

import json

import numpy as np
import pytest

import kdcache
from helpers import _one_error_line, run_cli


def _one_file(root, n=200):
    """A tabular dataset shipped as one .npz file (as a dataset of one file ships its rows)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 8)).astype(np.float32)
    path = root / "all.npz"
    np.savez(path, x=x, y=(x[:, 0] > 0).astype(np.int64))
    return path


def _teacher(root):
    import torch

    from kdcache.models import mlp, save_model_dir

    torch.manual_seed(0)
    kwargs = {"in_features": 8, "hidden": 8, "depth": 1}
    return save_model_dir(mlp(2, **kwargs), root / "teacher", architecture="mlp", num_classes=2, kwargs=kwargs)


def _cache(root, data, teacher, *flags):
    return ["cache-teacher", "--teacher", teacher, "--task", "tabular", "--data", data, *flags, "--out",
            root / "c.kdcache", "--device", "cpu", "--no-progress"]


@pytest.mark.parametrize("splits", [("train", "validation"), ("train", "test"), ("validation", "test")])
def test_one_file_named_for_two_splits_is_refused_in_one_line_pointing_to_holdout(tmp_path, capsys, monkeypatch,
                                                                                 splits):
    data, teacher = _one_file(tmp_path), _teacher(tmp_path)
    flags = [f for s in splits for f in ("--split", s)]
    _one_error_line(*run_cli(_cache(tmp_path, data, teacher, *flags), capsys, monkeypatch)[::2], "all.npz",
                    f"splits {splits[0]!r} and {splits[1]!r} would be the same rows", "--holdout N")
    assert not (tmp_path / "c.kdcache").exists()


def test_holdout_without_holdout_test_still_refuses_a_test_split_of_the_same_file(tmp_path, capsys, monkeypatch):
    data, teacher = _one_file(tmp_path), _teacher(tmp_path)
    _one_error_line(*run_cli(_cache(tmp_path, data, teacher, "--split", "train", "--split", "validation", "--split",
                                    "test", "--holdout", "40"), capsys, monkeypatch)[::2],
                    "'train' and 'test' would be the same rows", "--holdout-test N")


def test_a_glue_file_named_for_two_splits_is_refused(tmp_path, capsys, monkeypatch, glue_dir, tiny_tokenizer):
    from teachers_for_tests import make_tiny_bert

    teacher = make_tiny_bert(tmp_path / "bert", tiny_tokenizer)
    _one_error_line(*run_cli(["cache-teacher", "--teacher", teacher, "--task", "sst2", "--data",
                              glue_dir / "SST-2" / "dev.tsv", "--split", "train", "--split", "validation", "--out",
                              tmp_path / "c.kdcache", "--device", "cpu", "--no-progress"], capsys, monkeypatch)[::2],
                    "dev.tsv", "'train' and 'validation' would be the same rows", "--holdout")


def test_train_on_one_file_refuses_to_select_on_its_training_rows(tmp_path, capsys, monkeypatch):
    data = _one_file(tmp_path)
    args = ["train", "--model", "mlp", "--task", "tabular", "--data", data, "--epochs", "1", "--device", "cpu",
            "--no-progress"]
    _one_error_line(*run_cli([*args, "--out", tmp_path / "r1"], capsys, monkeypatch)[::2],
                    "'train' and 'validation' would be the same rows", "--holdout N", "--val-split none")
    assert not (tmp_path / "r1").exists()
    code, _, err = run_cli([*args, "--out", tmp_path / "r2", "--holdout", "40"], capsys, monkeypatch)
    assert code == 0, err
    assert json.loads((tmp_path / "r2" / "summary.json").read_text())["validation_split"] == "validation"


def test_holdout_test_carves_a_test_split_disjoint_from_train_and_validation(tmp_path, capsys, monkeypatch):
    data, teacher = _one_file(tmp_path), _teacher(tmp_path)
    code, _, err = run_cli(_cache(tmp_path, data, teacher, "--split", "train", "--split", "validation", "--split",
                                  "test", "--holdout", "40", "--holdout-test", "30"), capsys, monkeypatch)
    assert code == 0, err
    cache = tmp_path / "c.kdcache"
    train, val, test = (kdcache.open_cache(cache, split=s) for s in ("train", "validation", "test"))
    assert (len(train), len(val), len(test)) == (130, 40, 30)
    rows = [set(s.read("index").tolist()) for s in (train, val, test)]
    assert not (rows[0] & rows[1] or rows[0] & rows[2] or rows[1] & rows[2])
    assert rows[0] | rows[1] | rows[2] == set(range(200))  # every row of the file exactly once
    assert min(rows[2]) < 20 and max(rows[2]) > 180  # evenly spaced over the file, not its first rows
    assert test.split_attrs["dataset"]["preprocess"]["holdout_test"] == 30
    run = tmp_path / "run"  # distill re-reads every split from the file and checks each row against the cache
    code, _, err = run_cli(["distill", "--cache", cache, "--student", "mlp", "--epochs", "1", "--out", run,
                            "--device", "cpu", "--no-progress", "--report-split", "test"], capsys, monkeypatch)
    assert code == 0, err
    summary = json.loads((run / "summary.json").read_text())
    assert summary["validation_split"] == "validation" and summary["report_split"] == "test"


def test_holdout_test_that_leaves_no_training_rows_is_one_line(tmp_path, capsys, monkeypatch):
    data, teacher = _one_file(tmp_path, n=50), _teacher(tmp_path)
    _one_error_line(*run_cli(_cache(tmp_path, data, teacher, "--split", "train", "--split", "test", "--holdout",
                                    "20", "--holdout-test", "30"), capsys, monkeypatch)[::2],
                    "all.npz", "--holdout 20 --holdout-test 30 leaves no training rows")
    _one_error_line(*run_cli(_cache(tmp_path, data, teacher, "--holdout-test", "0"), capsys, monkeypatch)[::2],
                    "--holdout-test must be")
