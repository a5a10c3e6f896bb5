"""The command line: a working cache-teacher/info pair, and one clear line plus exit 1 for every bad input."""

from __future__ import annotations

import errno
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import zarr

import kdcache
from kdcache.cli.main import main
from kdcache.errors import KDCacheError
from helpers import _one_error_line, run_cli
from teachers_for_tests import linear_digits, make_tiny_bert, nan_teacher


def _digits_args(weights, out, *extra):
    return ["cache-teacher", "--teacher", "teachers_for_tests:linear_digits", "--weights", weights,
            "--task", "digits", "--split", "train", "--split", "validation", "--out", out, "--no-progress",
            "--trust-model-code", *extra]


def test_cache_teacher_then_info_json(tmp_path, capsys, monkeypatch, digits_weights):
    out = tmp_path / "digits.kdcache"
    code, stdout, err = run_cli(_digits_args(digits_weights, out), capsys, monkeypatch)
    assert code == 0, err
    assert "cached train: 1437 rows x 10 outputs" in stdout
    code, stdout, _ = run_cli(["info", out, "--json"], capsys, monkeypatch)
    info = json.loads(stdout)
    assert code == 0 and info["complete"] is True and info["format_version"] == 1
    assert [(s["name"], s["rows"], s["logits_shape"]) for s in info["splits"]] == [
        ("train", 1437, [1437, 10]), ("validation", 360, [360, 10])]
    assert info["teacher"]["spec"] == "teachers_for_tests:linear_digits"
    assert info["splits"][0]["compression_ratio"] > 0 and info["size_on_disk"] > 0
    assert info["command"].startswith("kdcache cache-teacher --teacher teachers_for_tests:linear_digits")
    code, stdout, _ = run_cli(["info", out], capsys, monkeypatch)
    assert code == 0 and "complete" in stdout and "1437" in stdout
    # the stored logits are the teacher's
    model = linear_digits()
    model.load_state_dict(torch.load(digits_weights))
    cache = kdcache.open_cache(out, "validation")
    x = torch.from_numpy(__import__("sklearn.datasets").datasets.load_digits().data[cache.index[:]]).float() / 16
    expected = model(x).detach().numpy()
    assert abs(cache.logits[:].astype("float32") - expected).max() < 1e-2


def test_existing_cache_refused_without_overwrite(tmp_path, capsys, monkeypatch, digits_weights):
    out = tmp_path / "digits.kdcache"
    assert run_cli(_digits_args(digits_weights, out), capsys, monkeypatch)[0] == 0
    code, _, err = run_cli(_digits_args(digits_weights, out), capsys, monkeypatch)
    _one_error_line(code, err, str(out), "already exists; pass --overwrite")
    assert run_cli(_digits_args(digits_weights, out, "--overwrite"), capsys, monkeypatch)[0] == 0


def test_unknown_task(tmp_path, capsys, monkeypatch):
    code, _, err = run_cli(["cache-teacher", "--teacher", "resnet8", "--task", "imagenet22k", "--data", tmp_path,
                            "--out", tmp_path / "c"], capsys, monkeypatch)
    _one_error_line(code, err, "unknown task 'imagenet22k'", "sst2")


def test_missing_data_folder(tmp_path, capsys, monkeypatch, tiny_tokenizer):
    bert = make_tiny_bert(tmp_path / "bert", tiny_tokenizer)
    missing = tmp_path / "no-such-glue" / "SST-2"
    code, _, err = run_cli(["cache-teacher", "--teacher", bert, "--task", "sst2", "--data", missing,
                            "--out", tmp_path / "c", "--no-progress"], capsys, monkeypatch)
    _one_error_line(code, err, "no-such-glue")
    assert not (tmp_path / "c").exists()


def test_unknown_column_names_the_file(tmp_path, capsys, monkeypatch, tiny_tokenizer):
    bert = make_tiny_bert(tmp_path / "bert", tiny_tokenizer)
    data = tmp_path / "reviews.tsv"
    data.write_text("review\tstars\ngood film\t1\nbad film\t0\n")
    code, _, err = run_cli(["cache-teacher", "--teacher", bert, "--task", "text", "--data", data, "--text-column",
                            "sentence", "--label-column", "stars", "--out", tmp_path / "c", "--no-progress"],
                           capsys, monkeypatch)
    _one_error_line(code, err, "reviews.tsv", "sentence")


def test_label_outside_label_set(tmp_path, capsys, monkeypatch, tiny_tokenizer):
    bert = make_tiny_bert(tmp_path / "bert", tiny_tokenizer)
    data = tmp_path / "reviews.tsv"
    data.write_text("review\tstars\ngood film\t1\nbad film\t0\nodd film\t7\n")
    code, _, err = run_cli(["cache-teacher", "--teacher", bert, "--task", "text", "--data", data, "--text-column",
                            "review", "--label-column", "stars", "--label-names", "neg,pos", "--out",
                            tmp_path / "c", "--no-progress"], capsys, monkeypatch)
    _one_error_line(code, err, "reviews.tsv", "7")
    assert not (tmp_path / "c").exists()


def test_teacher_width_differs_from_label_set(tmp_path, capsys, monkeypatch, tiny_tokenizer, glue_dir):
    bert = make_tiny_bert(tmp_path / "bert3", tiny_tokenizer, num_labels=3)
    code, _, err = run_cli(["cache-teacher", "--teacher", bert, "--task", "sst2", "--data", glue_dir / "SST-2",
                            "--limit", "8", "--out", tmp_path / "c", "--no-progress"], capsys, monkeypatch)
    _one_error_line(code, err, "has 3 outputs", "SST-2/train.tsv has 2 labels")
    assert not (tmp_path / "c").exists()


def test_weights_of_another_width_are_refused(tmp_path, capsys, monkeypatch):
    weights = tmp_path / "five.pt"
    torch.save(linear_digits(5).state_dict(), weights)
    code, _, err = run_cli(_digits_args(weights, tmp_path / "c"), capsys, monkeypatch)
    _one_error_line(code, err, "five.pt", "shape mismatch")


def test_nan_teacher_leaves_an_incomplete_cache_that_is_refused(tmp_path, capsys, monkeypatch):
    weights = tmp_path / "nan.pt"
    torch.save(nan_teacher().state_dict(), weights)
    out = tmp_path / "c"
    args = _digits_args(weights, out)
    args[2] = "teachers_for_tests:nan_teacher"
    code, _, err = run_cli(args, capsys, monkeypatch)
    _one_error_line(code, err, "NaN or Inf", "split 'train'")
    with pytest.raises(KDCacheError, match="incomplete"):
        kdcache.open_cache(out)
    code, stdout, _ = run_cli(["info", out, "--json"], capsys, monkeypatch)
    assert code == 0 and json.loads(stdout)["complete"] is False


def test_full_disk_is_one_line_and_never_complete(tmp_path, capsys, monkeypatch, digits_weights):
    calls = {"n": 0}
    original = zarr.storage.LocalStore.set

    async def set_until_full(self, key, value, *args, **kwargs):
        calls["n"] += 1
        if "/c/" in key and calls["n"] > 12:  # let the metadata through, then fill the disk on a chunk
            raise OSError(errno.ENOSPC, "No space left on device")
        return await original(self, key, value, *args, **kwargs)

    monkeypatch.setattr(zarr.storage.LocalStore, "set", set_until_full)
    out = tmp_path / "c"
    code, _, err = run_cli(_digits_args(digits_weights, out, "--chunk-rows", "64"), capsys, monkeypatch)
    _one_error_line(code, err, str(out), "disk full")
    monkeypatch.undo()
    with pytest.raises(KDCacheError, match="incomplete"):
        kdcache.open_cache(out)


def test_debug_flag_shows_the_traceback(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["kdcache", "--debug", "info", str(tmp_path / "absent")])
    with pytest.raises(KDCacheError, match="no such cache"):
        main()


def test_console_script_exit_codes(tmp_path):
    script = Path(sys.executable).parent / "kdcache"
    bad = subprocess.run([script, "info", tmp_path / "absent"], capture_output=True, text=True)
    assert bad.returncode == 1 and bad.stderr.strip() == f"error: {tmp_path / 'absent'}: no such cache"
    usage = subprocess.run([script, "cache-teacher", "--teacher", "x"], capture_output=True, text=True)
    assert usage.returncode == 2 and "Missing option" in usage.stderr


@pytest.mark.parametrize("command", [[], ["cache-teacher"], ["distill"], ["train"], ["verify"], ["info"], ["demo"]])
def test_help_fits_80_columns_and_shows_switches_as_switches(command):
    """Plain help, wrapped at the terminal's width: a switch (--json, --debug) takes no value, so none is shown."""
    env = {**os.environ, "COLUMNS": "80", "TERM": "dumb"}
    done = subprocess.run([sys.executable, "-m", "kdcache.cli", *command, "--help"], capture_output=True, text=True,
                          env=env)
    assert done.returncode == 0, done.stderr
    assert "<bool>" not in done.stdout and "╭" not in done.stdout
    assert max(len(line) for line in done.stdout.splitlines()) <= 80, done.stdout
    if command in ([], ["info"]):
        assert re.search(r"^  --(debug|json) +\S", done.stdout, re.M), done.stdout
    if command == ["distill"]:  # a wider terminal gets wider help, not a column cut at 80
        wide = subprocess.run([sys.executable, "-m", "kdcache.cli", *command, "--help"], capture_output=True,
                              text=True, env={**env, "COLUMNS": "160"}).stdout
        assert 80 < max(len(line) for line in wide.splitlines()) <= 160


def test_a_local_path_with_a_colon_is_a_path(tmp_path, capsys, monkeypatch, digits_weights):
    """`sst2:bert.kdcache` is a file name (sst2 is no storage protocol); `s3:bucket/c` would be a URL missing //."""
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(_digits_args(digits_weights, "sst2:bert.kdcache"), capsys, monkeypatch)
    assert code == 0 and (tmp_path / "sst2:bert.kdcache" / "zarr.json").is_file(), err
