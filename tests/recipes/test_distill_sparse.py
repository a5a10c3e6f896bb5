"""Issue 20, points 1 and 3 end to end: students distilled from top-k and sampled caches.

Each method declares the kinds of target it can use; distill and sweep refuse any other kind in one line before any
data is read; the methods that accept a sparse kind train on it through the same loop (memory and chunk streaming),
and the teacher's own score is reported from the sparse rows.
"""

from __future__ import annotations

import json

import pytest

from kdcache.recipes.cache_teacher import CacheTeacherConfig, cache_teacher
from kdcache.recipes.demo import train_digits_teacher
from helpers import STUDENT_KW, _one_error_line, run_cli


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    """The digits teacher cached three ways: dense, top-3 (T = 1 and 4 recorded) and 30 samples per row."""
    root = tmp_path_factory.mktemp("sparse")
    train_digits_teacher(root / "teacher", epochs=3)
    made = {}
    for kind, extra in (("dense", {}), ("topk", {"topk": 3, "lse_temperatures": (1.0, 4.0)}),
                        ("sampled", {"sample_tokens": 30})):
        made[kind] = cache_teacher(CacheTeacherConfig(teacher=str(root / "teacher"), task="digits",
                                                      out=root / f"{kind}.kdcache", splits=("train", "validation"),
                                                      device="cpu", progress=False, chunk_rows=256, **extra))
    return made


def _distill(cache, out, *extra):
    return ["distill", "--cache", cache, "--student", "mlp", "--student-kwargs", json.dumps(STUDENT_KW), "--epochs",
            "2", "--lr", "0.01", "--out", out, "--device", "cpu", "--no-progress", *extra]


@pytest.mark.parametrize("kind, method, extra", [
    ("topk", "vanilla", ["--temperature", "4"]),
    ("topk", "continuation", ["--t-max", "2"]),
    ("topk", "annealing", ["--t-max", "1"]),  # stage 1 is 1 of the 2 epochs: T_max at most 1 (the authors' rule)
    ("topk", "ce", []),
    ("sampled", "vanilla", []),
])
@pytest.mark.parametrize("stream", ["memory", "chunks"])
def test_a_student_trains_on_a_sparse_cache(tmp_path, capsys, monkeypatch, caches, kind, method, extra, stream):
    out = tmp_path / "run"
    code, _, err = run_cli(_distill(caches[kind], out, "--method", method, "--stream", stream, *extra), capsys,
                           monkeypatch)
    assert code == 0, err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["best_metric"] > 0.5, summary  # an MLP on digits learns from the sparse rows within 2 epochs
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [line["epoch"] for line in lines] == [1, 2] and all(line["loss"] >= 0 for line in lines)


def test_the_teachers_score_from_a_top_k_cache_equals_the_dense_one(tmp_path, capsys, monkeypatch, caches):
    """The teacher column beside the student's: a top-k row's argmax is the dense row's."""
    scores = {}
    for kind in ("dense", "topk"):
        out = tmp_path / kind
        assert run_cli(_distill(caches[kind], out, "--method", "ce"), capsys, monkeypatch)[0] == 0
        summary = json.loads((out / "summary.json").read_text())
        scores[kind] = summary["teacher_metric"]
        assert summary["teacher_target"] == kind
    assert scores["topk"] == scores["dense"] and scores["dense"] > 0.5, scores


def test_a_temperature_the_cache_did_not_record_is_one_line(tmp_path, capsys, monkeypatch, caches):
    code, _, err = run_cli(_distill(caches["topk"], tmp_path / "run", "--method", "vanilla", "--temperature", "3"),
                           capsys, monkeypatch)
    _one_error_line(code, err, "temperature 3 was not recorded", "recorded: 1, 4")
    assert not (tmp_path / "run").exists()  # refused before the run folder is made: a rerun is not blocked


@pytest.mark.parametrize("kind, method, needs", [
    ("sampled", "curriculum", "needs dense logits, top-k logits with their log-sum-exp"),
    ("sampled", "prokd", "needs dense logits, top-k logits with their log-sum-exp"),
    ("sampled", "continuation", "needs dense logits, top-k logits with their log-sum-exp"),
    ("sampled", "annealing", "needs dense logits, top-k logits with their log-sum-exp"),
])
@pytest.mark.parametrize("command", ["distill", "sweep"])
def test_a_method_the_cache_cannot_serve_is_refused_before_any_data_is_read(tmp_path, capsys, monkeypatch, caches,
                                                                          kind, method, needs, command):
    import kdcache.train.run as run_module

    def never(*args, **kwargs):
        raise AssertionError("the data was read before the refusal")

    monkeypatch.setattr(run_module, "load_run_data", never)
    args = _distill(caches[kind], tmp_path / "run", "--method", method)
    if command == "sweep":
        args = ["sweep", *args[1:], "--seeds", "0,1"]
    words = {"topk": "stores top-k logits with their log-sum-exp", "sampled": "stores sampled ids (RS-KD)"}[kind]
    _one_error_line(*run_cli(args, capsys, monkeypatch)[::2], str(caches[kind]), words, f"--method {method} {needs}")


@pytest.mark.parametrize("kind", ["topk", "sampled"])
def test_verify_with_the_teacher_checks_what_a_sparse_row_claims(tmp_path, capsys, monkeypatch, caches, kind):
    import shutil

    import numpy as np
    import zarr

    from cache_edits import refresh_manifest

    teacher = caches["dense"].parent / "teacher"
    code, out, _ = run_cli(["verify", caches[kind], "--teacher", teacher, "--sample", "2000", "--device", "cpu"],
                           capsys, monkeypatch)
    assert code == 0 and f"train/teacher {kind} rows" in out, out
    copy = tmp_path / "edited.kdcache"
    shutil.copytree(caches[kind], copy)
    split = zarr.open_group(str(copy), mode="r+")["train"]
    array = {"topk": "topk_values", "sampled": "sampled_logprobs"}[kind]
    split[array][700, 0] = split[array][700, 0] + 3  # a value rewritten, its manifest recomputed to match
    refresh_manifest(copy)
    code, out, _ = run_cli(["verify", copy, "--teacher", teacher, "--sample", "2000", "--device", "cpu"], capsys,
                           monkeypatch)
    failed = [line for line in out.splitlines() if line.startswith("FAIL")]
    what = {"topk": "kept logit", "sampled": "log-probability"}[kind]
    assert code == 1 and any(f"train/teacher {kind} rows" in line and what in line and "first row 700" in line
                             for line in failed), out
    split["logsumexp" if kind == "topk" else array][5] = np.nan  # what capture never writes
    refresh_manifest(copy)
    code, out, _ = run_cli(["verify", copy], capsys, monkeypatch)
    assert code == 1 and any("train/logits finite" in line and "row 5" in line
                             for line in out.splitlines() if line.startswith("FAIL")), out


@pytest.mark.parametrize("kd_loss", ["vanilla", "continuation"])
def test_prokd_follows_dense_checkpoints_then_the_teachers_top_k_rows(tmp_path, capsys, monkeypatch, kd_loss):
    root = tmp_path
    train_digits_teacher(root / "teacher", epochs=4, checkpoint_every=2)  # epoch-0002, then the trained teacher
    cache = cache_teacher(CacheTeacherConfig(teacher=str(root / "teacher"), task="digits", out=root / "c.kdcache",
                                             splits=("train", "validation"), device="cpu", progress=False,
                                             checkpoints=(str(root / "teacher" / "checkpoints" / "epoch-*"),),
                                             topk=3, lse_temperatures=(1.0, 4.0)))
    out = tmp_path / "run"
    code, _, err = run_cli(_distill(cache, out, "--method", "prokd", "--kd-loss", kd_loss, "--epochs", "2",
                                    *(["--temperature", "4"] if kd_loss == "vanilla" else ["--t-max", "2"])),
                           capsys, monkeypatch)
    assert code == 0, err
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [line["checkpoint"] for line in lines] == ["epoch-0002", "teacher"], lines
    assert json.loads((out / "summary.json").read_text())["best_metric"] > 0.5


def test_takd_chains_through_sparse_caches(tmp_path, capsys, monkeypatch, caches):
    """Teacher -> assistant -> student with top-k caches at both links: the assistant's best/ is a teacher folder."""
    assistant = tmp_path / "assistant"
    code, _, err = run_cli(_distill(caches["topk"], assistant, "--method", "vanilla", "--temperature", "4"), capsys,
                           monkeypatch)
    assert code == 0, err
    second = tmp_path / "assistant.kdcache"
    code, _, err = run_cli(["cache-teacher", "--teacher", assistant / "best", "--task", "digits", "--split", "train",
                            "--split", "validation", "--topk", "3", "--lse-temperatures", "1,4", "--out", second,
                            "--device", "cpu", "--no-progress"], capsys, monkeypatch)
    assert code == 0, err
    code, _, err = run_cli(_distill(second, tmp_path / "student", "--method", "vanilla", "--temperature", "4"), capsys,
                           monkeypatch)
    assert code == 0, err
    summary = json.loads((tmp_path / "student" / "summary.json").read_text())
    assert summary["teacher_target"] == "topk" and summary["best_metric"] > 0.5, summary


def test_the_renormalised_tail_is_a_flag_and_another_run(tmp_path, capsys, monkeypatch, caches):
    """--topk-tail renormalised trains DistillKit's approximation, for comparison: another loss than the exact bucket
    at the same seed, any T (it needs no log-sum-exp), recorded in the run's config; refused where it means nothing."""
    losses = {}
    for tail, temperature in (("bucket", "4"), ("renormalised", "4"), ("renormalised", "3")):
        out = tmp_path / f"{tail}-{temperature}"
        code, _, err = run_cli(_distill(caches["topk"], out, "--method", "vanilla", "--temperature", temperature,
                                        "--topk-tail", tail), capsys, monkeypatch)
        assert code == 0, err
        losses[tail, temperature] = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
        config = json.loads((out / "config.json").read_text())
        assert config["config"].get("topk_tail") == (None if tail == "bucket" else tail), config["config"]
    assert losses["bucket", "4"] != losses["renormalised", "4"]
    code, _, err = run_cli(_distill(caches["dense"], tmp_path / "dense", "--method", "vanilla", "--topk-tail",
                                    "renormalised"), capsys, monkeypatch)
    _one_error_line(code, err, str(caches["dense"]), "--topk-tail applies to a top-k cache", "stores dense logits")
    code, _, err = run_cli(_distill(caches["topk"], tmp_path / "cont", "--method", "continuation", "--topk-tail",
                                    "renormalised"), capsys, monkeypatch)
    _one_error_line(code, err, "--topk-tail applies to --method vanilla only")
    code, _, err = run_cli(_distill(caches["topk"], tmp_path / "typo", "--topk-tail", "renormalized"), capsys,
                           monkeypatch)
    _one_error_line(code, err, "--topk-tail", "bucket, renormalised")
