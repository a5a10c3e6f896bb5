"""`kdcache runs` (issue 26): one line per run across run folders and sweep folders, with the test score at the
best validation epoch; and `kdcache info` scores the cached teacher on each labelled split."""

from __future__ import annotations

import json

import numpy as np
import pytest

import kdcache
from helpers import STUDENT_KW, _one_error_line, run_cli, tabular_cache


@pytest.fixture(scope="module")
def three_splits(tmp_path_factory):
    """A tabular cache with train, validation and test carved out of one file (--holdout, --holdout-test)."""
    import torch

    from kdcache.data import DataOptions
    from kdcache.models import mlp, save_model_dir
    from kdcache.recipes.cache_teacher import CacheTeacherConfig, cache_teacher

    root = tmp_path_factory.mktemp("three")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(240, 8)).astype(np.float32)
    np.savez(root / "all.npz", x=x, y=(x[:, 0] > 0).astype(np.int64))
    torch.manual_seed(0)
    kwargs = {"in_features": 8, "hidden": 8, "depth": 1}
    teacher = save_model_dir(mlp(2, **kwargs), root / "teacher", architecture="mlp", num_classes=2, kwargs=kwargs)
    return cache_teacher(CacheTeacherConfig(teacher=str(teacher), task="tabular", data=str(root / "all.npz"),
                                            out=root / "c.kdcache", splits=("train", "validation", "test"),
                                            device="cpu", progress=False,
                                            data_options=DataOptions(holdout=40, holdout_test=40)))


def _train(args, capsys, monkeypatch):
    code, out, err = run_cli([*args, "--student-kwargs", json.dumps(STUDENT_KW), "--device", "cpu", "--no-progress",
                              "--report-split", "test"], capsys, monkeypatch)
    assert code == 0, err
    return out


def test_runs_lists_lone_runs_and_sweep_runs_one_line_each_with_test_at_the_best_epoch(tmp_path, capsys, monkeypatch,
                                                                                      three_splits):
    cache = three_splits
    _train(["distill", "--cache", cache, "--student", "mlp", "--method", "vanilla", "--epochs", "3", "--out",
            tmp_path / "lone"], capsys, monkeypatch)
    _train(["sweep", "--cache", cache, "--student", "mlp", "--grid", "lr=0.5,0.001", "--seeds", "0,1", "--epochs",
            "3", "--out", tmp_path / "grid"], capsys, monkeypatch)
    code, out, err = run_cli(["runs", tmp_path / "lone", tmp_path / "grid", "--json"], capsys, monkeypatch)
    assert code == 0, err
    rows = json.loads(out)
    assert len(rows) == 5 and rows[0]["run"] == "lone" and all(r["run"].startswith("grid/") for r in rows[1:])
    for row in rows:  # every number is the run's own, from its summary and metrics lines
        folder = tmp_path / row["run"]
        summary = json.loads((folder / "summary.json").read_text())
        lines = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
        assert (row["best"], row["epoch"]) == (summary["best_metric"], summary["best_epoch"])
        assert row["test"] == next(r["report_metric"] for r in lines if r["epoch"] == row["epoch"])
        assert row["wall_s"] == summary["wall_seconds"] and row["samples_s"] == summary["samples_per_second"]
        assert row["status"] == "complete" and row["metric"] == "accuracy"
    assert {(r["seed"], r["hyperparameters"]["lr"]) for r in rows[1:]} == {(0, 0.5), (1, 0.5), (0, 0.001), (1, 0.001)}
    assert rows[0]["method"] == "vanilla" and "lr=" in rows[0]["params"] and "T=" in rows[0]["params"]

    code, out, _ = run_cli(["runs", tmp_path, "--json", "--sort", "best"], capsys, monkeypatch)
    best = [r["best"] for r in json.loads(out)]
    assert code == 0 and len(best) == 5 and best == sorted(best, reverse=True)
    code, out, _ = run_cli(["runs", tmp_path, "--json", "--sort", "wall_s"], capsys, monkeypatch)
    walls = [r["wall_s"] for r in json.loads(out)]
    assert walls == sorted(walls)

    (tmp_path / "grid").rename(tmp_path / ("a-very-long-sweep-name-" * 8))  # still one line per run
    code, out, err = run_cli(["runs", tmp_path], capsys, monkeypatch)
    assert code == 0, err
    body = [line for line in out.splitlines() if "complete" in line]
    assert len(body) == 5 and all(any(f"{r['best']:.4f}" in line for r in rows) for line in body)


def test_runs_reads_an_unfinished_run_from_its_metrics_lines(tmp_path, capsys, monkeypatch, three_splits):
    run = tmp_path / "cut"
    _train(["distill", "--cache", three_splits, "--student", "mlp", "--epochs", "4", "--stop-after-epoch", "2",
            "--out", run], capsys, monkeypatch)
    (run / "summary.json").unlink(missing_ok=True)  # as a run killed before it wrote its summary leaves it
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    code, out, err = run_cli(["runs", run, "--json"], capsys, monkeypatch)
    assert code == 0, err
    (row,) = json.loads(out)
    top = max(lines, key=lambda r: r["metric"])
    assert (row["best"], row["epoch"], row["test"]) == (top["metric"], top["epoch"], top["report_metric"])
    assert row["status"] == "unfinished 2/4"


def test_runs_refuses_what_holds_no_run_and_an_unknown_column_in_one_line(tmp_path, capsys, monkeypatch):
    (tmp_path / "empty").mkdir()
    _one_error_line(*run_cli(["runs", tmp_path / "empty"], capsys, monkeypatch)[::2], "empty",
                    "not a run folder, and no run folder inside it")
    _one_error_line(*run_cli(["runs", tmp_path / "nowhere"], capsys, monkeypatch)[::2], "nowhere", "no such folder")
    _one_error_line(*run_cli(["runs", tmp_path, "--sort", "accuracy"], capsys, monkeypatch)[::2],
                    "--sort 'accuracy' is not a column", "best, epoch, test")


def test_info_scores_the_cached_teacher_on_each_labelled_split(tmp_path, capsys, monkeypatch, three_splits):
    code, out, err = run_cli(["info", three_splits, "--json"], capsys, monkeypatch)
    assert code == 0, err
    for split in json.loads(out)["splits"]:
        cache = kdcache.open_cache(three_splits, split=split["name"])
        accuracy = float((cache.read("logits").argmax(1) == cache.read("labels")).mean())
        assert split["teacher_metric"] == {"metric_name": "accuracy", "metric": pytest.approx(accuracy),
                                           "rows_scored": len(cache), "rows": len(cache)}
    code, out, _ = run_cli(["info", three_splits], capsys, monkeypatch)
    assert code == 0 and out.count("accuracy 0.") == 3


def test_info_scores_a_large_split_on_whole_chunks_spread_over_it(tmp_path, capsys, monkeypatch):
    import kdcache.recipes.compare as compare

    _, _, cache = tabular_cache(tmp_path, rows=(("train", 300),), features=8, chunk_rows=32)
    monkeypatch.setattr(compare, "MAX_SCORED_VALUES", 2 * 64)  # 2 outputs: 64 rows, two chunks of 32
    scores = compare.teacher_metrics(cache)["train"]
    split = kdcache.open_cache(cache, split="train")
    rows = np.r_[0:32, 288:300]  # the first chunk and the last (a partial one): spread over the split
    accuracy = float((split.read("logits")[rows].argmax(1) == split.read("labels")[rows]).mean())
    assert scores == {"metric_name": "accuracy", "metric": pytest.approx(accuracy), "rows_scored": 44, "rows": 300}
    code, out, _ = run_cli(["info", cache], capsys, monkeypatch)
    assert code == 0 and f"accuracy {accuracy:.4f} (44 rows)" in out
