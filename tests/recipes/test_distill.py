"""`distill` and `train` end to end: real data slices, every method, resume, and one clear line for bad input."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

import kdcache
from kdcache.methods import schedules
from kdcache.data import DataOptions
from kdcache.errors import KDCacheError
from kdcache.models import resnet8
from kdcache.recipes.cache_teacher import CacheTeacherConfig, cache_teacher
from kdcache.recipes.distill import DistillConfig, distill
from kdcache.models.teachers import load_teacher
from cache_edits import refresh_manifest
from teachers_for_tests import linear_digits, make_tiny_bert
from helpers import STUDENT_KW, _distill_args, _metrics, _one_error_line, run_cli

METHODS = ("ce", "vanilla", "annealing", "continuation")


# --- fixtures: caches of real data -------------------------------------------------------------------------------

def _digits_run(cache, out, method="continuation", **kw):
    args = dict(student="mlp", student_kwargs=STUDENT_KW, cache=cache, method=method, out=out, epochs=4,
                device="cpu", progress=False)
    args.update(kw)
    return distill(DistillConfig(**args))


# --- end to end on real data -------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", METHODS)
def test_every_method_on_real_sst2_with_the_teacher_deleted(tmp_path, sst2_cache, bert_student_config, method):
    summary = distill(DistillConfig(student=str(bert_student_config), cache=sst2_cache, method=method,
                                    out=tmp_path / "run", epochs=3, batch_size=16, lr=1e-3, anneal_epochs=2,
                                    device="cpu", progress=False))
    rows = _metrics(tmp_path / "run")
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert all(r["split"] == "validation" and r["metric_name"] == "accuracy" and 0 <= r["accuracy"] <= 1 for r in rows)
    assert all(np.isfinite(r["loss"]) and r["samples_per_second"] > 0 for r in rows)
    best = max(rows, key=lambda r: r["metric"])
    assert summary["best_metric"] == best["metric"] and summary["best_epoch"] == best["epoch"]
    assert summary["complete"] and summary["teacher_metric"] is not None
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["best_metric"] == summary["best_metric"]
    # best/ is a teacher folder (HF format, with the cache's tokenizer): the next hop of a TAKD chain
    student = load_teacher(str(tmp_path / "run" / "best"))
    assert student.source == "huggingface" and student.tokenizer is not None and student.num_outputs == 2


def test_distill_uses_the_cached_logits_not_a_teacher(tmp_path, digits_cache):
    """Vanilla KD with alpha 0 learns the teacher: a student trained on shuffled logits learns something else."""
    good = _digits_run(digits_cache, tmp_path / "good", "vanilla", alpha=0.0, epochs=15, lr=1e-2)
    assert good["best_metric"] > 0.5
    broken = tmp_path / "broken.kdcache"
    shutil.copytree(digits_cache, broken)
    import zarr

    logits = zarr.open_array(store=str(broken / "train" / "logits"), mode="r+")
    values = np.asarray(logits[:])
    logits[:] = values[np.random.default_rng(0).permutation(len(values))]  # right shape, wrong rows
    refresh_manifest(broken)  # and a manifest to match: what the cache says is what the student learns
    bad = _digits_run(broken, tmp_path / "bad", "vanilla", alpha=0.0, epochs=15, lr=1e-2)
    assert bad["best_metric"] < good["best_metric"] - 0.3


def test_resnet_student_on_real_cifar10_jpegs(tmp_path, cifar10_zip):
    torch.manual_seed(0)
    weights = tmp_path / "t.pt"
    torch.save(resnet8(10).state_dict(), weights)
    cache = cache_teacher(CacheTeacherConfig(teacher="resnet8", weights=str(weights), task="imagefolder",
                                             data=str(cifar10_zip), out=tmp_path / "c.kdcache", splits=("train", "test"),
                                             device="cpu", progress=False, data_options=DataOptions(limit=24,
                                                                                                    normalize="cifar10")))
    summary = distill(DistillConfig(student="resnet8", cache=cache, method="continuation", out=tmp_path / "run",
                                    epochs=2, batch_size=8, lr=0.05, device="cpu", progress=False))
    assert summary["validation_split"] == "test" and summary["epochs_done"] == 2
    assert "optimistic" in summary["selection_note"]  # selecting on test data is said next to the number
    rows = _metrics(tmp_path / "run")
    # the cifar preset fitted to 2 epochs: T_max min(20, 2), psi Eq. 7 over 2 epochs
    assert [r["T"] for r in rows] == [schedules.temperature(i, 2, 2) for i in (1, 2)] == [1, 1]
    assert summary["hyperparameters"]["psi"] == "cifar:2" and rows[-1]["psi"] == 1.0
    assert load_teacher(str(tmp_path / "run" / "best")).source == "kdcache"


def test_continuation_logs_the_schedules_of_algorithm_1(tmp_path, digits_cache):
    _digits_run(digits_cache, tmp_path / "run", epochs=6, t_max=3, psi="linear:4", margin=0.5)
    rows = _metrics(tmp_path / "run")
    assert [r["T"] for r in rows] == [3, 2, 2, 1, 1, 1]  # k = 2: T drops at epochs 2 and 4
    assert [r["phi"] for r in rows] == [pytest.approx(schedules.phi(r["T"], 3)) for r in rows]
    assert [r["psi"] for r in rows] == pytest.approx([0, 1 / 3, 2 / 3, 1, 1, 1])


def test_step_schedules_move_within_an_epoch(tmp_path, digits_cache):
    _digits_run(digits_cache, tmp_path / "run", epochs=2, t_max=4, psi="linear:2", schedule_unit="step", batch_size=256)
    rows = _metrics(tmp_path / "run")
    # the logged values are those of the epoch's last step: T counted over 12 steps (k = 3), psi at 1 + 11/6
    assert rows[-1]["T"] == 1 and rows[0]["T"] == schedules.temperature(6, 12, 4) == 2
    assert rows[0]["psi"] == pytest.approx(5 / 6)


def test_annealing_runs_two_stages_and_restarts_from_the_best_stage_1_student(tmp_path, digits_cache):
    _digits_run(digits_cache, tmp_path / "run", "annealing", epochs=5, anneal_epochs=3, t_max=3)
    rows = _metrics(tmp_path / "run")
    assert [r["stage"] for r in rows] == [1, 1, 1, 2, 2]
    assert [r["T"] for r in rows[:3]] == [schedules.temperature(i, 3, 3) for i in (1, 2, 3)]
    assert [r["psi"] for r in rows] == [0, 0, 0, 1, 1]
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=False)
    stage1 = max(rows[:3], key=lambda r: r["metric"])
    assert state["method"]["stage1_best"]["epoch"] == stage1["epoch"]


@pytest.mark.parametrize("cut", [2, 4])
def test_annealing_stage_2_is_a_run_of_its_own_and_resumes_inside_it(tmp_path, digits_cache, cut):
    """As the authors train it, stage 2 starts a fresh optimiser and learning-rate schedule over its own epochs (the
    logged lr, the epoch's last step's, jumps back up); --anneal-continuous keeps stage 1's. A run cut at the
    boundary or inside stage 2 resumes to the uninterrupted run's numbers."""
    kw = dict(epochs=6, anneal_epochs=2, t_max=2, lr_schedule="cosine", optimizer="sgd", lr=0.05)
    _digits_run(digits_cache, tmp_path / "full", "annealing", **kw)
    lrs = [r["lr"] for r in _metrics(tmp_path / "full")]  # stage 1: 2 epochs, stage 2: 4, each its own schedule
    assert lrs[0] > lrs[1] and lrs[2] > lrs[1] and lrs[2] > lrs[3] > lrs[4] > lrs[5]
    _digits_run(digits_cache, tmp_path / "continuous", "annealing", anneal_continuous=True, **kw)
    continuous = [r["lr"] for r in _metrics(tmp_path / "continuous")]
    assert all(a > b for a, b in zip(continuous, continuous[1:]))  # one schedule over the whole run
    _digits_run(digits_cache, tmp_path / "cut", "annealing", stop_after_epoch=cut, **kw)
    _digits_run(digits_cache, tmp_path / "cut", "annealing", resume=True, **kw)
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("seconds", "samples_per_second")} for r in rows]
    assert strip(_metrics(tmp_path / "cut")) == strip(_metrics(tmp_path / "full"))


def test_anneal_continuous_is_refused_by_other_methods(tmp_path, digits_cache):
    with pytest.raises(KDCacheError, match="--anneal-continuous applies to --method annealing only"):
        _digits_run(digits_cache, tmp_path / "run", "continuation", anneal_continuous=True)


@pytest.mark.parametrize("phi_on", ["none", "teacher", "margin"])
def test_phi_on_anneals_only_what_table_7_names(tmp_path, digits_cache, phi_on):
    """The paper's Table 7 ablation: phi anneals the teacher only, the margin only, or neither (psi still moves);
    the coefficients each epoch used are logged, and a different --phi-on is a different run."""
    _digits_run(digits_cache, tmp_path / "run", epochs=3, t_max=3, psi="linear:3", margin=0.5, phi_on=phi_on)
    rows = _metrics(tmp_path / "run")
    phis = [schedules.phi(schedules.temperature(i, 3, 3), 3) for i in (1, 2, 3)]
    assert [r["phi_teacher"] for r in rows] == (phis if phi_on == "teacher" else [1.0] * 3)
    assert [r["phi_margin"] for r in rows] == (phis if phi_on == "margin" else [1.0] * 3)
    assert [r["psi"] for r in rows] == [0.0, 0.5, 1.0]
    both = _digits_run(digits_cache, tmp_path / "both", epochs=3, t_max=3, psi="linear:3", margin=0.5)
    assert "phi_teacher" not in _metrics(tmp_path / "both")[0]
    assert [r["loss"] for r in rows] != [r["loss"] for r in _metrics(tmp_path / "both")]
    with pytest.raises(KDCacheError, match="differs in config.phi_on"):  # not the run already in the folder
        _digits_run(digits_cache, tmp_path / "both", epochs=3, t_max=3, psi="linear:3", margin=0.5, phi_on=phi_on,
                    resume=True)
    assert both["complete"]


def test_phi_on_both_is_the_default_run_and_a_bad_value_is_one_line(tmp_path, digits_cache):
    _digits_run(digits_cache, tmp_path / "run", epochs=2, stop_after_epoch=1)
    assert _digits_run(digits_cache, tmp_path / "run", epochs=2, phi_on="both", resume=True)["complete"]
    with pytest.raises(KDCacheError, match="--phi-on 'teachr' is not one of both, teacher, margin, none"):
        _digits_run(digits_cache, tmp_path / "bad", phi_on="teachr")


def test_phi_on_is_refused_by_other_methods(tmp_path, digits_cache):
    with pytest.raises(KDCacheError, match="--phi-on applies to --method continuation only"):
        _digits_run(digits_cache, tmp_path / "run", "vanilla", phi_on="none")


def test_train_and_distill_ce_see_the_same_batches(tmp_path, digits_cache):
    """`train` (no cache) and `distill --method ce` share the loop: same seed, same student, same numbers."""
    a = _digits_run(digits_cache, tmp_path / "a", "ce", epochs=3)
    b = distill(DistillConfig(student="mlp", student_kwargs=STUDENT_KW, task="digits", method="ce", out=tmp_path / "b",
                              epochs=3, device="cpu", progress=False))
    assert a["best_metric"] == b["best_metric"]
    assert [r["loss"] for r in _metrics(tmp_path / "a")] == pytest.approx([r["loss"] for r in _metrics(tmp_path / "b")])


@pytest.mark.parametrize("method", ["continuation", "annealing"])
def test_a_resumed_run_ends_where_an_uninterrupted_one_does(tmp_path, digits_cache, method):
    kw = dict(epochs=5, anneal_epochs=3 if method == "annealing" else None, t_max=3)
    _digits_run(digits_cache, tmp_path / "full", method, **kw)
    _digits_run(digits_cache, tmp_path / "cut", method, stop_after_epoch=2, **kw)
    assert len(_metrics(tmp_path / "cut")) == 2
    summary = _digits_run(digits_cache, tmp_path / "cut", method, resume=True, **kw)
    assert summary["complete"]
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("seconds", "samples_per_second")} for r in rows]
    assert strip(_metrics(tmp_path / "cut")) == strip(_metrics(tmp_path / "full"))
    full = torch.load(tmp_path / "full" / "best" / "model.pt")
    resumed = torch.load(tmp_path / "cut" / "best" / "model.pt")
    assert all(torch.equal(full[k], resumed[k]) for k in full)


def test_a_moved_run_folder_still_resumes_and_totals_cover_both_parts(tmp_path, digits_cache):
    _digits_run(digits_cache, tmp_path / "cut", stop_after_epoch=2)
    first = json.loads((tmp_path / "cut" / "summary.json").read_text())
    shutil.move(tmp_path / "cut", tmp_path / "moved")
    summary = _digits_run(digits_cache, tmp_path / "moved", resume=True)
    assert summary["complete"] and summary["train_seconds"] > first["train_seconds"]
    assert summary["wall_seconds"] > first["wall_seconds"]


def test_selecting_on_an_unlabelled_split_is_refused(tmp_path, sst2_copy, tiny_tokenizer):
    folder = tmp_path / "SST-2"
    shutil.copytree(sst2_copy, folder)
    (folder / "test.tsv").write_text("index\tsentence\n0\ta good film\n1\ta bad film\n", encoding="utf-8")
    teacher = make_tiny_bert(tmp_path / "teacher", tiny_tokenizer)
    cache = cache_teacher(CacheTeacherConfig(teacher=str(teacher), task="sst2", data=str(folder), out=tmp_path / "c",
                                             splits=("train", "test"), device="cpu", progress=False))
    with pytest.raises(KDCacheError, match="no labels to select"):
        distill(DistillConfig(student=str(teacher), cache=cache, method="vanilla", out=tmp_path / "r", epochs=1,
                              device="cpu", progress=False))


def test_save_every_writes_teacher_checkpoints(tmp_path):
    distill(DistillConfig(student="mlp", student_kwargs=STUDENT_KW, task="digits", method="ce", out=tmp_path / "t",
                          epochs=4, save_every=2, device="cpu", progress=False))
    saved = sorted(p.name for p in (tmp_path / "t" / "checkpoints").iterdir())
    assert saved == ["epoch-0002", "epoch-0004"]
    meta = json.loads((tmp_path / "t" / "checkpoints" / "epoch-0002" / "kdcache-checkpoint.json").read_text())
    assert meta["epoch"] == 2 and 0 <= meta["metric"] <= 1
    assert load_teacher(str(tmp_path / "t" / "checkpoints" / "epoch-0004")).num_outputs == 10


# --- bad input: one line, non-zero exit ----------------------------------------------------------------------------

def test_cli_distill_and_train_succeed(tmp_path, capsys, monkeypatch, digits_cache):
    code, out, err = run_cli(_distill_args(digits_cache, tmp_path / "r"), capsys, monkeypatch)
    assert code == 0, err
    assert "continuation mlp: best accuracy" in out and "2/2 epochs" in out
    code, out, err = run_cli(["train", "--model", "mlp", "--task", "digits", "--epochs", "1", "--out", tmp_path / "t",
                              "--no-progress"], capsys, monkeypatch)
    assert code == 0, err
    assert "ce mlp: best accuracy" in out


def test_the_chosen_settings_are_one_line_at_the_start_and_in_the_summary(tmp_path, capsys, monkeypatch, digits_cache):
    """Issue 26: `distill` and `train` say what they chose and why, before any epoch; issue 21: a run shorter than its
    preset fits the schedules to its length (one line, and summary.json), unless --absolute-schedules."""
    code, _, err = run_cli(_distill_args(digits_cache, tmp_path / "fit"), capsys, monkeypatch)
    assert code == 0, err
    lines = [line for line in err.splitlines() if "settings: " in line]
    assert len(lines) == 1 and lines[0].startswith("kdcache: settings: preset small (auto: a features task): adamw lr")
    assert "psi glue -> glue:2, T_max 10 -> 2" in lines[0]
    summary = json.loads((tmp_path / "fit" / "summary.json").read_text())
    assert summary["schedules_scaled"] == {"preset_epochs": 30, "epochs": 2, "changes": ["psi glue -> glue:2",
                                                                                         "T_max 10 -> 2"]}
    assert summary["hyperparameters"]["psi"] == "glue:2" and summary["preset_reason"] == "auto: a features task"
    assert [r["T"] for r in _metrics(tmp_path / "fit")] == [1, 1] and _metrics(tmp_path / "fit")[-1]["psi"] == 1.0
    short = [line for line in err.splitlines() if "optimiser steps in all" in line]  # issue 21: a short run is told
    assert len(short) == 1 and "--method vanilla" in short[0] and short[0].startswith("kdcache: note: this run has ")
    code, _, err = run_cli(_distill_args(digits_cache, tmp_path / "abs", "--absolute-schedules"), capsys, monkeypatch)
    assert code == 0, err
    summary = json.loads((tmp_path / "abs" / "summary.json").read_text())
    assert summary["schedules_scaled"] is None and summary["hyperparameters"]["psi"] == "glue"
    assert [r["T"] for r in _metrics(tmp_path / "abs")] == [9, 8]  # the paper's T_max 10 never gets near 1
    code, _, err = run_cli(["train", "--model", "mlp", "--task", "digits", "--epochs", "1", "--out", tmp_path / "t",
                            "--no-progress"], capsys, monkeypatch)
    assert code == 0, err
    assert [line for line in err.splitlines() if "settings: " in line] == [
        "kdcache: settings: preset small (auto: a features task): adamw lr 0.001, 1 epochs, batch 64, constant LR, "
        "weight decay 0, no clipping"]


def test_a_run_begun_with_absolute_schedules_resumes_only_with_them(tmp_path, capsys, monkeypatch, digits_cache):
    """A run begun before schedules followed --epochs (the same values as --absolute-schedules) resumes with the
    flag; without it the fitted psi differs and the resume is refused, naming it."""
    out = tmp_path / "r"
    code, _, err = run_cli(_distill_args(digits_cache, out, "--absolute-schedules", "--stop-after-epoch", "1"), capsys,
                           monkeypatch)
    assert code == 0, err
    _one_error_line(*run_cli(_distill_args(digits_cache, out, "--resume"), capsys, monkeypatch)[::2],
                    "hyperparameters.psi")
    code, _, err = run_cli(_distill_args(digits_cache, out, "--absolute-schedules", "--resume"), capsys, monkeypatch)
    assert code == 0, err
    assert json.loads((out / "summary.json").read_text())["epochs_done"] == 2


def test_train_with_holdout_names_its_selection_split_validation(tmp_path, capsys, monkeypatch):
    """Rows held out of train are the validation split, and a run that selects on them says so, not `train`."""
    code, _, err = run_cli(["train", "--model", "mlp", "--task", "digits", "--holdout", "200", "--epochs", "1",
                            "--out", tmp_path / "t", "--no-progress"], capsys, monkeypatch)
    assert code == 0, err
    summary = json.loads((tmp_path / "t" / "summary.json").read_text())
    assert summary["validation_split"] == "validation" and summary["selection_note"] is None
    assert _metrics(tmp_path / "t")[0]["split"] == "validation"


def test_incomplete_cache_is_refused(tmp_path, capsys, monkeypatch, digits_cache):
    broken = tmp_path / "c.kdcache"
    shutil.copytree(digits_cache, broken)
    meta = json.loads((broken / "zarr.json").read_text())
    meta["attributes"]["complete"] = False
    (broken / "zarr.json").write_text(json.dumps(meta))
    _one_error_line(*run_cli(_distill_args(broken, tmp_path / "r"), capsys, monkeypatch)[::2], "incomplete", str(broken))
    assert not (tmp_path / "r").exists()


def test_newer_format_version_is_refused(tmp_path, capsys, monkeypatch, digits_cache):
    broken = tmp_path / "c.kdcache"
    shutil.copytree(digits_cache, broken)
    meta = json.loads((broken / "zarr.json").read_text())
    meta["attributes"]["format_version"] = 99
    (broken / "zarr.json").write_text(json.dumps(meta))
    _one_error_line(*run_cli(_distill_args(broken, tmp_path / "r"), capsys, monkeypatch)[::2], "version 99")


def test_student_of_another_width_is_refused(tmp_path, capsys, monkeypatch, digits_cache):
    args = ["distill", "--cache", digits_cache, "--student", "teachers_for_tests:three_outputs", "--trust-model-code", "--epochs", "1",
            "--out", tmp_path / "r", "--no-progress"]
    _one_error_line(*run_cli(args, capsys, monkeypatch)[::2], "3 outputs", "10")


def test_data_that_no_longer_matches_the_cache_is_refused(tmp_path, capsys, monkeypatch, sst2_cache, sst2_copy,
                                                          bert_student_config):
    edited = tmp_path / "SST-2"
    shutil.copytree(sst2_copy, edited)
    lines = (edited / "train.tsv").read_text(encoding="utf-8").splitlines(keepends=True)
    text, label = lines[6].rstrip("\n").split("\t")
    lines[6] = f"{text} good\t{label}\n"  # one more token in row 5 (line 0 is the header)
    (edited / "train.tsv").write_text("".join(lines), encoding="utf-8")
    args = ["distill", "--cache", sst2_cache, "--student", bert_student_config, "--data", edited, "--epochs", "1",
            "--out", tmp_path / "r", "--no-progress"]
    _one_error_line(*run_cli(args, capsys, monkeypatch)[::2], "row 5", "train.tsv", "does not match")


def test_data_with_one_extra_row_is_refused(tmp_path, capsys, monkeypatch, sst2_cache, sst2_copy, bert_student_config):
    """The cache holds every row of its file; a file that grew by one row is another dataset."""
    edited = tmp_path / "SST-2"
    shutil.copytree(sst2_copy, edited)
    with open(edited / "train.tsv", "a", encoding="utf-8") as f:
        f.write("one more good film\t1\n")
    args = ["distill", "--cache", sst2_cache, "--student", bert_student_config, "--data", edited, "--epochs", "1",
            "--out", tmp_path / "r", "--no-progress"]
    _one_error_line(*run_cli(args, capsys, monkeypatch)[::2], "61 rows", "60")


def test_resume_of_another_run_is_refused(tmp_path, capsys, monkeypatch, digits_cache):
    out = tmp_path / "r"
    assert run_cli(_distill_args(digits_cache, out, "--stop-after-epoch", "1"), capsys, monkeypatch)[0] == 0
    code, _, err = run_cli(_distill_args(digits_cache, out, "--resume", "--lr", "0.5"), capsys, monkeypatch)
    _one_error_line(code, err, "another run", "lr")
    code, _, err = run_cli(_distill_args(digits_cache, out), capsys, monkeypatch)
    _one_error_line(code, err, "already holds a run", "--resume")
    _one_error_line(*run_cli(_distill_args(digits_cache, tmp_path / "new", "--resume"), capsys, monkeypatch)[::2],
                    "nothing to resume")


def test_bad_method_and_psi_are_refused_before_any_work(tmp_path, capsys, monkeypatch, digits_cache):
    _one_error_line(*run_cli(_distill_args(digits_cache, tmp_path / "a", "--method", "magic"),
                             capsys, monkeypatch)[::2], "magic")
    _one_error_line(*run_cli(_distill_args(digits_cache, tmp_path / "b", "--psi", "cosine:3"),
                             capsys, monkeypatch)[::2], "cosine:3")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_divergence_is_one_line(tmp_path, capsys, monkeypatch, digits_cache):
    args = _distill_args(digits_cache, tmp_path / "r", "--method", "annealing", "--lr", "1e12", "--optimizer", "sgd")
    _one_error_line(*run_cli(args, capsys, monkeypatch)[::2], "diverged")


def test_distill_never_writes_to_the_cache(tmp_path, digits_cache):
    before = {p: p.stat().st_mtime_ns for p in digits_cache.rglob("*") if p.is_file()}
    _digits_run(digits_cache, tmp_path / "r", epochs=1)
    assert {p: p.stat().st_mtime_ns for p in digits_cache.rglob("*") if p.is_file()} == before


def test_regression_task_stsb_distils_with_pearson(tmp_path, tiny_tokenizer, bert_student_config):
    """STS-B: one output, float labels; CE becomes MSE and the metric is Pearson (docs/methods.md)."""
    header = ["index", "genre", "filename", "year", "old_index", "source1", "source2", "sentence1", "sentence2", "score"]
    rng = np.random.default_rng(0)
    words = "the a good bad film movie story is was not very funny boring great".split()
    folder = tmp_path / "STS-B"
    folder.mkdir()
    for name, n in (("train.tsv", 40), ("dev.tsv", 16)):
        rows = ["\t".join(header)]
        for i in range(n):
            a, b = (" ".join(rng.choice(words, 5)) for _ in range(2))
            rows.append("\t".join([str(i), "main-captions", "MSRvid", "2012test", str(i), "none", "none", a, b,
                                   f"{rng.uniform(0, 5):.3f}"]))
        (folder / name).write_text("\n".join(rows) + "\n", encoding="utf-8")
    teacher = make_tiny_bert(tmp_path / "teacher", tiny_tokenizer, num_labels=1)
    cache = cache_teacher(CacheTeacherConfig(teacher=str(teacher), task="stsb", data=str(folder), out=tmp_path / "c",
                                             splits=("train", "validation"), device="cpu", progress=False))
    for method in METHODS:
        summary = distill(DistillConfig(student=str(bert_student_config), cache=cache, method=method,
                                        out=tmp_path / method, epochs=3, batch_size=8, lr=1e-3, anneal_epochs=2,
                                        device="cpu", progress=False))
        rows = _metrics(tmp_path / method)
        assert summary["metric_name"] == "pearson" and all("spearman" in r and -1 <= r["pearson"] <= 1 for r in rows)
        assert all(np.isfinite(r["loss"]) for r in rows)


def test_an_evenly_spaced_subset_covers_every_class_and_distills(tmp_path, cifar10_zip):
    """`--subset N` keeps N rows spread over a class-sorted folder (the first N rows are one class)."""
    torch.manual_seed(0)
    weights = tmp_path / "t.pt"
    torch.save(resnet8(10).state_dict(), weights)
    cache = cache_teacher(CacheTeacherConfig(teacher="resnet8", weights=str(weights), task="imagefolder",
                                             data=str(cifar10_zip), out=tmp_path / "c.kdcache", splits=("train", "test"),
                                             device="cpu", progress=False,
                                             data_options=DataOptions(subset=40, normalize="cifar10")))
    train = kdcache.open_cache(cache, "train")
    assert len(train) == 40 and set(np.asarray(train.labels[:]).tolist()) == set(range(10))
    index, rows = np.asarray(train.index[:]), 10 * 20  # the slice: 20 train images of each class
    assert index[0] == 0 and index[-1] == rows - 1 and np.all(np.diff(index) >= (rows - 1) // 39)
    summary = distill(DistillConfig(student="resnet8", cache=cache, method="vanilla", out=tmp_path / "run", epochs=1,
                                    batch_size=8, device="cpu", progress=False))
    assert summary["complete"]


def test_resume_repairs_best_after_a_kill_between_last_pt_and_best(tmp_path, digits_cache):
    _digits_run(digits_cache, tmp_path / "full", epochs=3)
    _digits_run(digits_cache, tmp_path / "cut", stop_after_epoch=1, epochs=3)
    shutil.rmtree(tmp_path / "cut" / "best")  # as if killed after last.pt, before best/ (epoch 1 was the best)
    _digits_run(digits_cache, tmp_path / "cut", resume=True, epochs=3)
    full, resumed = (torch.load(tmp_path / r / "best" / "model.pt") for r in ("full", "cut"))
    assert all(torch.equal(full[k], resumed[k]) for k in full)
    _digits_run(digits_cache, tmp_path / "swap", stop_after_epoch=1, epochs=3)
    (tmp_path / "swap" / "best").rename(tmp_path / "swap" / "best.old")  # killed inside the swap
    _digits_run(digits_cache, tmp_path / "swap", resume=True, epochs=3)
    assert (tmp_path / "swap" / "best" / "model.pt").is_file() and not (tmp_path / "swap" / "best.old").exists()


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_distill_trains(tmp_path, digits_cache, precision):
    """Autocast runs on the CPU too (fp16's gradient scaler only switches on under CUDA)."""
    summary = _digits_run(digits_cache, tmp_path / "run", "vanilla", epochs=3, precision=precision, lr=1e-2)
    rows = _metrics(tmp_path / "run")
    assert all(np.isfinite(r["loss"]) for r in rows) and summary["best_metric"] > 0.3


def test_chunk_streaming_distils_and_resumes_like_an_uninterrupted_run(tmp_path, digits_cache):
    kw = dict(epochs=4, stream_mode="chunks", t_max=2)
    _digits_run(digits_cache, tmp_path / "full", **kw)
    _digits_run(digits_cache, tmp_path / "cut", stop_after_epoch=2, **kw)
    with open(tmp_path / "cut" / "metrics.jsonl", "a") as f:  # an epoch that ran but was never checkpointed
        f.write(json.dumps({"epoch": 3, "loss": 0.0}) + "\n")
    _digits_run(digits_cache, tmp_path / "cut", resume=True, **kw)
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("seconds", "samples_per_second")} for r in rows]
    assert strip(_metrics(tmp_path / "cut")) == strip(_metrics(tmp_path / "full"))
    with pytest.raises(KDCacheError, match="stream_mode"):  # memory and chunk reading order batches differently
        _digits_run(digits_cache, tmp_path / "cut", resume=True, epochs=4, t_max=2)


def test_a_digits_cache_of_the_first_rows_distils(tmp_path):
    """--limit is recorded with the rows it kept, so distill re-reads those rows and no more."""
    from kdcache.recipes.demo import train_digits_teacher

    train_digits_teacher(tmp_path / "teacher", epochs=1)
    cache = cache_teacher(CacheTeacherConfig(teacher=str(tmp_path / "teacher"), task="digits", out=tmp_path / "c.kdcache",
                                             splits=("train", "validation"), device="cpu", progress=False,
                                             data_options=DataOptions(limit=100)))
    assert len(kdcache.open_cache(cache)) == 100
    assert _digits_run(cache, tmp_path / "run", epochs=1)["epochs_done"] == 1


def test_a_run_started_by_release_0_1_0_still_resumes(tmp_path, digits_cache):
    """kdcache 0.1.0 recorded every preset value in a run's identity and kept Annealing-KD's stage-1 best at the top
    of last.pt: such a run resumes, and ends where an uninterrupted run does."""
    import torch

    kw = dict(epochs=4, anneal_epochs=2, t_max=2)
    _digits_run(digits_cache, tmp_path / "full", "annealing", **kw)
    _digits_run(digits_cache, tmp_path / "cut", "annealing", stop_after_epoch=3, **kw)
    last = tmp_path / "cut" / "last.pt"
    state = torch.load(last, weights_only=True)
    legacy = {**state, "stage1_best": state["method"]["stage1_best"], "heads": None}
    del legacy["method"]
    legacy["identity"] = {k: v for k, v in state["identity"].items() if k != "identity_version"}
    legacy["identity"]["hyperparameters"] = {**state["identity"]["hyperparameters"], "margin": 1.0, "psi": "glue",
                                             "temperature": 4.0, "alpha": 0.5}  # 0.1.0's whole preset table
    torch.save(legacy, last)
    _digits_run(digits_cache, tmp_path / "cut", "annealing", resume=True, **kw)
    timeless = [[{k: v for k, v in r.items() if k not in ("seconds", "samples_per_second")} for r in _metrics(run)]
                for run in (tmp_path / "cut", tmp_path / "full")]
    assert timeless[0] == timeless[1]
    legacy["identity"]["hyperparameters"]["lr"] = 0.5  # a legacy run of other settings is still another run
    torch.save(legacy, last)
    with pytest.raises(KDCacheError, match=r"checkpoint of another run \(differs in hyperparameters.lr"):
        _digits_run(digits_cache, tmp_path / "cut", "annealing", resume=True, **kw)
