"""kdcache sweep (issue 13): every run equals a lone distill with the same flags and seed (dropout included), the
tables sum the sweep up, a killed sweep resumes, and a bad grid is one line before anything trains."""

from __future__ import annotations

import csv
import json
import shutil

import pytest

from helpers import _one_error_line, run_cli, tabular_cache

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tabular_cache(tmp_path_factory.mktemp("sweep"), rows=(("train", 150), ("validation", 40)), features=16,
                         chunk_rows=16)[2]


def _common(cache, out, *extra):
    return ["--cache", cache, "--student", "teachers_for_tests:dropout_mlp", "--trust-model-code",
            "--epochs", "3", "--batch-size", "16", "--lr", "0.01", "--out", out, "--device", "cpu", "--no-progress",
            "--num-workers", "0", *extra]


def _metrics(run):
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in ("seconds", "samples_per_second")} for r in lines]


def test_each_run_of_a_sweep_equals_a_lone_distill(tmp_path, capsys, monkeypatch, cache):
    out = tmp_path / "sweep"
    code, stdout, err = run_cli(["sweep", *_common(cache, out), "--grid", "margin=0,2", "--grid",
                                 "method=continuation,vanilla", "--seeds", "0,1"], capsys, monkeypatch)
    assert code == 0, err
    names = sorted(p.name for p in out.iterdir() if p.is_dir())
    assert len(names) == 8 and "margin-2.0_method-vanilla_seed-1" in names
    for name, flags in (("margin-0.0_method-continuation_seed-0", ["--margin", "0", "--method", "continuation"]),
                        ("margin-2.0_method-continuation_seed-1", ["--margin", "2", "--method", "continuation",
                                                                   "--seed", "1"]),
                        ("margin-0.0_method-vanilla_seed-1", ["--margin", "0", "--method", "vanilla", "--seed", "1"])):
        lone = tmp_path / f"lone-{name}"
        assert run_cli(["distill", *_common(cache, lone), *flags], capsys, monkeypatch)[0] == 0
        assert _metrics(out / name) == _metrics(lone), name  # equal, not close: the same computation
        summary = json.loads((out / name / "summary.json").read_text())
        assert summary["best_metric"] == json.loads((lone / "summary.json").read_text())["best_metric"]
    # different margins and seeds did train different students
    assert _metrics(out / "margin-0.0_method-continuation_seed-0") != _metrics(out / "margin-0.0_method-continuation_seed-1")
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert len(rows) == 8 and {r["seed"] for r in rows} == {"0", "1"}
    table = (out / "results.md").read_text()
    assert "| margin | method | seeds |" in table and table.count("| 2 |") == 4
    assert (out / "results.png").stat().st_size > 1000
    assert "8 runs" in stdout


def test_a_killed_sweep_resumes_every_run(tmp_path, capsys, monkeypatch, cache):
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    grid = ["--grid", "lr=0.01,0.03", "--seeds", "0,1"]
    assert run_cli(["sweep", *_common(cache, whole), *grid], capsys, monkeypatch)[0] == 0
    assert run_cli(["sweep", *_common(cache, cut, "--stop-after-epoch", "1"), *grid], capsys, monkeypatch)[0] == 0
    assert all(len(_metrics(run)) == 1 for run in cut.iterdir() if run.is_dir())
    # a kill between two runs' checkpoints leaves one run an epoch behind the others
    behind = cut / "lr-0.03_seed-1"
    shutil.copytree(behind, tmp_path / "epoch-1")
    assert run_cli(["sweep", *_common(cache, cut, "--resume", "--stop-after-epoch", "2"), *grid], capsys,
                   monkeypatch)[0] == 0
    shutil.rmtree(behind)
    shutil.copytree(tmp_path / "epoch-1", behind)
    assert len(_metrics(behind)) == 1 and len(_metrics(cut / "lr-0.01_seed-0")) == 2
    assert run_cli(["sweep", *_common(cache, cut, "--resume"), *grid], capsys, monkeypatch)[0] == 0
    for run in whole.iterdir():
        if run.is_dir():
            assert _metrics(cut / run.name) == _metrics(run), run.name
    assert len(_metrics(behind)) == 3


@pytest.mark.parametrize("grid, needles", [
    (["--grid", "colour=red"], ["--grid colour", "not a flag a sweep can vary"]),
    (["--grid", "lr=fast"], ["--grid lr=fast", "not a number"]),
    (["--grid", "epochs=0,2"], ["--epochs must be at least 1"]),
    (["--grid", "method=continuation,prokd"], ["sweep run method-prokd", "checkpoint"]),
    (["--seeds", "0,x"], ["--seeds", "integers"]),
    (["--grid", "augment=none,cifar"], ["--grid augment", "not a flag a sweep can vary"]),
    (["--grid", "phase-epochs=1,1"], ["--grid phase-epochs", "hold commas", "--sweep-file"]),
])
def test_a_bad_grid_is_one_line_before_anything_trains(tmp_path, capsys, monkeypatch, cache, grid, needles):
    out = tmp_path / "bad"
    _one_error_line(*run_cli(["sweep", *_common(cache, out), *grid], capsys, monkeypatch)[::2], *needles)
    assert not any(out.rglob("metrics.jsonl"))


def test_a_sweep_file_lists_irregular_runs(tmp_path, capsys, monkeypatch, cache):
    spec = tmp_path / "grid.yaml"
    spec.write_text("runs:\n  - {method: vanilla, temperature: 2}\n  - {method: continuation, margin: 1, seed: 3}\n"
                    "seeds: [5, 6]\n")
    out = tmp_path / "sweep"
    code, _, err = run_cli(["sweep", *_common(cache, out), "--sweep-file", spec], capsys, monkeypatch)
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == [  # a run without its own seed: once per seed
        "method-continuation_margin-1.0_seed-3", "method-vanilla_temperature-2.0_seed-5",
        "method-vanilla_temperature-2.0_seed-6"]
    summary = json.loads((out / "method-vanilla_temperature-2.0_seed-5" / "summary.json").read_text())
    assert summary["hyperparameters"]["temperature"] == 2.0 and summary["method"] == "vanilla"
    assert "None" not in (out / "results.md").read_text()
    bad = tmp_path / "bad.yaml"
    bad.write_text("- just\n- a list\n")
    _one_error_line(*run_cli(["sweep", *_common(cache, tmp_path / "b"), "--sweep-file", bad], capsys,
                             monkeypatch)[::2], "bad.yaml", "sweep file")
    both = tmp_path / "both.yaml"
    both.write_text("runs:\n  - {method: vanilla}\ngrid: {margin: [0, 1]}\n")
    _one_error_line(*run_cli(["sweep", *_common(cache, tmp_path / "c"), "--sweep-file", both], capsys,
                             monkeypatch)[::2], "runs:", "grid")


def test_runs_cut_by_max_steps_count_their_unchecked_rows_as_lone_runs_do(tmp_path, capsys, monkeypatch, cache):
    out = tmp_path / "sweep"
    assert run_cli(["sweep", *_common(cache, out, "--max-steps", "3"), "--seeds", "0,1"], capsys,
                   monkeypatch)[0] == 0
    for seed in (0, 1):
        lone = tmp_path / f"lone-{seed}"
        assert run_cli(["distill", *_common(cache, lone, "--max-steps", "3", "--seed", str(seed))], capsys,
                       monkeypatch)[0] == 0
        swept = json.loads((out / f"seed-{seed}" / "summary.json").read_text())
        alone = json.loads((lone / "summary.json").read_text())
        assert swept["unchecked_rows"] == alone["unchecked_rows"] > 0
        assert (out / f"seed-{seed}" / "best").exists() == (lone / "best").exists()


def test_a_run_grouped_with_a_method_reading_more_arrays_keeps_its_own_batch_order(tmp_path, capsys, monkeypatch,
                                                                                     projection_cache):
    """Alone, continuation's logits fit the budget (memory: a full shuffle); curriculum's arrays do not (windows of
    chunks): the two are not stepped together, and each equals its lone run."""
    spec = tmp_path / "runs.yaml"
    spec.write_text('runs:\n  - {method: continuation}\n  - {method: curriculum, phase_epochs: "1,1"}\n')
    common = ["--cache", projection_cache, "--student", "mlp", "--student-kwargs", '{"hidden": 8, "depth": 2}',
              "--epochs", "3", "--batch-size", "32", "--device", "cpu", "--no-progress", "--num-workers", "0",
              "--memory-budget", "60KiB"]
    out = tmp_path / "sweep"
    code, _, err = run_cli(["sweep", *common, "--out", out, "--sweep-file", spec], capsys, monkeypatch)
    assert code == 0, err
    for name, flags in (("method-continuation_seed-0", ["--method", "continuation"]),
                        ("method-curriculum_phase-epochs-1,1_seed-0", ["--method", "curriculum", "--phase-epochs",
                                                                       "1,1"])):
        lone = tmp_path / f"lone-{name}"
        assert run_cli(["distill", *common, "--out", lone, *flags], capsys, monkeypatch)[0] == 0
        swept = json.loads((out / name / "summary.json").read_text())
        assert swept["teacher_targets"] == json.loads((lone / "summary.json").read_text())["teacher_targets"]
        assert _metrics(out / name) == _metrics(lone), name
    modes = {json.loads((out / n / "summary.json").read_text())["teacher_targets"]["mode"]
             for n in ("method-continuation_seed-0", "method-curriculum_phase-epochs-1,1_seed-0")}
    assert modes == {"memory", "chunks"}  # the case this test is about
