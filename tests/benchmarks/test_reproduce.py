"""The reproduction harness cannot rot: each experiment runs end to end through the CLI at its tiny scale."""

from __future__ import annotations

import csv
import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import reproduce  # noqa: E402
from teachers_for_tests import make_tiny_bert  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture
def slices(tmp_path_factory, glue_dir, cifar10_zip) -> Path:
    """The committed slices in the full data's layout, which the harness reads (its tiny scale needs no more)."""
    root = tmp_path_factory.mktemp("data")
    (root / "glue").symlink_to(glue_dir, target_is_directory=True)
    (root / "cifar10-jpg").mkdir()
    (root / "cifar10-jpg" / "cifar10-jpg-d7d0561.zip").symlink_to(cifar10_zip)
    return root


def _check(out: Path, methods: tuple[str, ...]) -> None:
    rows = list(csv.DictReader(open(out / "summary.csv")))
    assert [r["method"] for r in rows] == list(methods)
    assert all(0 <= float(r["best_mean"]) <= 1 and math.isfinite(float(r["last_mean"])) for r in rows)
    assert (out / "summary.png").stat().st_size > 1000
    assert "| continuation | 1 |" in (out / "summary.md").read_text()
    commands = (out / "commands.txt").read_text().splitlines()
    assert commands[0].startswith("kdcache train") and any(c.startswith("kdcache cache-teacher") for c in commands)


def test_vision_tiny(tmp_path, slices, monkeypatch):
    monkeypatch.setattr(reproduce, "DATA", slices)
    methods = (*reproduce.METHODS, *reproduce.VARIANTS)
    reproduce.vision(reproduce.Runner(tmp_path, "cpu", in_process=True), "tiny", 1, methods=methods)
    _check(tmp_path, methods)
    # each variant ran its method with its flags, after the preset's (so its --psi wins)
    commands = (tmp_path / "commands.txt").read_text().splitlines()
    for name, (method, flags) in reproduce.VARIANTS.items():
        line = next(c for c in commands if f"/{name}-seed0 " in c)
        assert f"--method {method} " in line and line.endswith(" ".join(flags))
    ablated = [json.loads(x) for x in (tmp_path / "continuation-phi-margin-only-seed0" / "metrics.jsonl").open()]
    assert all(r["phi_teacher"] == 1.0 and r["phi_margin"] == r["phi"] and r["psi"] == 0.5 for r in ablated)
    # selected on the held-out validation images, scored on test: a test column for every run
    rows = list(csv.DictReader(open(tmp_path / "results.csv")))
    assert rows and all(0 <= float(r["test"]) <= 1 for r in rows)
    assert "test at the best validation epoch" in (tmp_path / "summary.md").read_text()
    summary = reproduce.Runner(tmp_path, "cpu").summary(tmp_path / "continuation-seed0")
    assert summary["validation_split"] == "validation" and summary["report_split"] == "test"
    _teacher_on_the_students_rows(commands, "--subset 64 --holdout 16")
    teacher = reproduce.Runner(tmp_path, "cpu").summary(tmp_path / "teacher")
    assert teacher["validation_split"] == "validation"  # the held-out rows, named so (not `train`)


def _teacher_on_the_students_rows(commands: list[str], rows: str) -> None:
    """Issue 21: the teacher trains on exactly the rows the cache (so every student) trains on, and selects on the
    same held-out rows, which neither trains on."""
    train = next(c for c in commands if c.startswith("kdcache train"))
    caches = [c for c in commands if c.startswith("kdcache cache-teacher")]
    assert f"{rows} " in train and caches and all(f"{rows} " in c for c in caches)


def test_cifar100_configuration_on_pickles_the_test_writes(tmp_path, monkeypatch):
    """CIFAR-100 is not shipped here: its configuration runs on random pickles in CIFAR-100's layout."""
    import pickle

    import numpy as np

    rng = np.random.default_rng(0)
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    for name, n in (("train", 200), ("test", 100)):
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
                         b"fine_labels": (np.arange(n) % 100).tolist(), b"coarse_labels": [0] * n}, f)
    with open(folder / "meta", "wb") as f:
        pickle.dump({b"fine_label_names": [f"c{i}".encode() for i in range(100)],
                     b"coarse_label_names": [f"s{i}".encode() for i in range(20)]}, f)
    reproduce.vision(reproduce.Runner(tmp_path / "run", "cpu", in_process=True), "tiny", 1, cifar100=folder)
    _check(tmp_path / "run", reproduce.METHODS)
    assert "CIFAR-100" in (tmp_path / "run" / "summary.md").read_text()
    assert "--margin 10" in (tmp_path / "run" / "commands.txt").read_text()


def test_glue_tiny_with_a_small_bert_in_place_of_minilm(tmp_path, slices, monkeypatch, tiny_tokenizer):
    monkeypatch.setattr(reproduce, "DATA", slices)
    encoder = make_tiny_bert(tmp_path / "encoder", tiny_tokenizer)
    reproduce.glue(reproduce.Runner(tmp_path / "run", "cpu", in_process=True), "tiny", 1, "mrpc", teacher_dir=str(encoder))
    _check(tmp_path / "run", reproduce.METHODS)
    assert "f1" in (tmp_path / "run" / "summary.md").read_text()
    # selected on rows held out of train (the teacher's too), GLUE dev reported, never selected on
    commands = (tmp_path / "run" / "commands.txt").read_text().splitlines()
    _teacher_on_the_students_rows(commands, "--subset 48 --holdout 12")
    summary = reproduce.Runner(tmp_path, "cpu").summary(tmp_path / "run" / "continuation-seed0")
    assert summary["validation_split"] == "validation" and summary["report_split"] == "dev"
    assert summary["hyperparameters"]["psi"] == "glue:2"  # Eq. 8's shape over the tiny scale's 2 epochs


def test_seed_paired_statistics_of_two_methods():
    """Differences are paired by seed: the paired t-test's p from the differences by hand, the sign test's from the
    binomial distribution; a method beaten on every one of 5 seeds has sign-test p = 2 / 2^5."""
    from scipy import stats

    best = {"continuation": [0.71, 0.72, 0.70, 0.74, 0.73], "vanilla": [0.70, 0.70, 0.69, 0.71, 0.72]}
    results = [reproduce.Result(m, seed, v, v, 1.0, "accuracy") for m, vs in best.items() for seed, v in enumerate(vs)]
    d = reproduce.paired(results, "continuation", "vanilla")
    diffs = [a - b for a, b in zip(best["continuation"], best["vanilla"])]
    t = sum(diffs) / 5 / (stats.tstd(diffs) / math.sqrt(5))
    assert d["pairs"] == 5 and d["mean"] == pytest.approx(sum(diffs) / 5)
    assert d["t_p"] == pytest.approx(2 * stats.t.sf(abs(t), df=4))
    assert (d["wins"], d["losses"], d["ties"]) == (5, 0, 0) and d["sign_p"] == pytest.approx(2 / 2**5)
    # a seed only one method ran is not paired; equal differences leave the t-test undefined
    results.append(reproduce.Result("continuation", 5, 0.9, 0.9, 1.0, "accuracy"))
    assert reproduce.paired(results, "continuation", "vanilla")["pairs"] == 5
    same = [reproduce.Result(m, s, 0.5 + (0.1 if m == "a" else 0), 0.5, 1.0, "accuracy") for m in "ab" for s in range(3)]
    assert reproduce.paired(same, "a", "b")["t_p"] is None
    table = "\n".join(reproduce.paired_table(results))
    assert "| continuation - vanilla | 5 |" in table and "5/0/0 0.062" in table


def test_seeds_split_over_processes_merge_into_one_table(tmp_path):
    """`--first-seed` splits an experiment's seeds over processes; merge_results makes the one table of them."""
    notes = "**Title**\n\n| x |\n\nMetric: accuracy.\nTeacher line.\nStudents line.\n\nSeed-paired ...\n"
    for part, seeds in (("a", (0, 1)), ("b", (2,))):
        (tmp_path / part).mkdir()
        rows = [["method", "seed", "metric", "best", "last", "seconds", "test"]]
        rows += [[m, s, "accuracy", f"{0.5 + 0.1 * (m == 'continuation') + 0.01 * s:.6f}", "0.5", "1.0", ""]
                 for s in seeds for m in ("ce", "continuation")]
        with open(tmp_path / part / "results.csv", "w", newline="") as f:
            csv.writer(f).writerows(rows)
    (tmp_path / "b" / "summary.md").write_text(notes)
    text = reproduce.merge_results(tmp_path / "all", [tmp_path / "a", tmp_path / "b"])
    rows = list(csv.DictReader(open(tmp_path / "all" / "results.csv")))
    assert [(r["method"], r["seed"]) for r in rows] == [("ce", "0"), ("continuation", "0"), ("ce", "1"),
                                                        ("continuation", "1"), ("ce", "2"), ("continuation", "2")]
    assert text.startswith("**Title**") and "Teacher line." in text and "| ce - continuation | 3 | -0.1000 |" in text


def test_views_tiny(tmp_path, slices, monkeypatch):
    """Issue 23's arms (none, fresh, views-4, views-16) run end to end at the tiny scale; the measurement itself is
    the cpu scale's (docs/benchmarks.md)."""
    import views

    monkeypatch.setattr(views, "DATA", slices)
    views.views(reproduce.Runner(tmp_path, "cpu", in_process=True), "tiny", 1)
    rows = list(csv.DictReader(open(tmp_path / "summary.csv")))
    assert [r["method"] for r in rows] == ["none", "fresh", "views-4", "views-16"]
    commands = (tmp_path / "commands.txt").read_text().splitlines()
    assert sum("--views" in c and c.startswith("kdcache cache-teacher") for c in commands) == 2
    assert any("/fresh-seed0 " in c and c.endswith("--augment cifar") for c in commands)
    summary = reproduce.Runner(tmp_path, "cpu").summary(tmp_path / "views-16-seed0")
    assert summary["views"]["views"] == 16 and summary["views"]["epochs_per_view"] == 0.125
    text = (tmp_path / "summary.md").read_text()
    assert "bytes per training sample per view" in text and "Distill samples/s" in text


def test_lm_tiny(tmp_path):
    """Issue 22's arms run end to end at the tiny scale on a corpus the test writes, and `--reuse` (another
    process's seeds) trains no second teacher and captures nothing again; the measurement is the cpu scale's."""
    import lm
    from helpers import LM_CORPUS

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(LM_CORPUS * 15) + "\n", encoding="utf-8")
    out = tmp_path / "out"
    text = lm.lm(reproduce.Runner(out, "cpu", in_process=True), "tiny", 1, corpus=corpus)
    rows = list(csv.DictReader(open(out / "summary.csv")))
    assert [r["method"] for r in rows] == ["train-ce", *lm.ARMS]
    assert all(1 < float(r["best_mean"]) < 1e4 and float(r["best_mean"]) <= float(r["last_mean"]) for r in rows)
    commands = (out / "commands.txt").read_text().splitlines()
    assert commands[0].startswith("kdcache train --task lm")
    assert sum(c.startswith("kdcache cache-teacher") for c in commands) == 4
    assert any("/curriculum-seed0 " in c and "--method curriculum" in c for c in commands)
    assert "unique ids a position" in text and "bare teacher forward" in text and "(1.00x)" in text
    again = lm.lm(reproduce.Runner(out, "cpu", in_process=True), "tiny", 1, first_seed=1, corpus=corpus,
                  reuse=True, arms=("ce",))
    commands = (out / "commands.txt").read_text().splitlines()  # this run's alone
    assert len(commands) == 1 and commands[0].startswith("kdcache distill") and "/ce-seed1 " in commands[0]
    assert "| ce | 1 |" in again and "(reused)" in again
