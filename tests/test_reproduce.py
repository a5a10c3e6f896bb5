"""The reproduction harness cannot rot: each experiment runs end to end through the CLI at its tiny scale."""

from __future__ import annotations

import csv
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import reproduce  # noqa: E402
from teachers_for_tests import make_tiny_bert  # noqa: E402

pytestmark = pytest.mark.slow


def _check(out: Path, methods: tuple[str, ...]) -> None:
    rows = list(csv.DictReader(open(out / "summary.csv")))
    assert [r["method"] for r in rows] == list(methods)
    assert all(0 <= float(r["best_mean"]) <= 1 and math.isfinite(float(r["last_mean"])) for r in rows)
    assert (out / "summary.png").stat().st_size > 1000
    assert "| continuation | 1 |" in (out / "summary.md").read_text()
    commands = (out / "commands.txt").read_text().splitlines()
    assert commands[0].startswith("kdcache train") and any(c.startswith("kdcache cache-teacher") for c in commands)


def test_vision_tiny(tmp_path, shared_data, monkeypatch):
    monkeypatch.setattr(reproduce, "DATA", shared_data)
    reproduce.vision(reproduce.Runner(tmp_path, "cpu", in_process=True), "tiny", 1)
    _check(tmp_path, reproduce.METHODS)


def test_glue_tiny_with_a_small_bert_in_place_of_minilm(tmp_path, shared_data, monkeypatch, tiny_tokenizer):
    monkeypatch.setattr(reproduce, "DATA", shared_data)
    encoder = make_tiny_bert(tmp_path / "encoder", tiny_tokenizer)
    reproduce.glue(reproduce.Runner(tmp_path / "run", "cpu", in_process=True), "tiny", 1, "mrpc", teacher_dir=str(encoder))
    _check(tmp_path / "run", reproduce.METHODS)
    assert "f1" in (tmp_path / "run" / "summary.md").read_text()
