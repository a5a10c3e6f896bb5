"""Curricula from one cache: teacher checkpoints (Pro-KD), hidden-state projections (curriculum extraction), TAKD
chains. Real data (the bundled digits, an SST-2 slice, CIFAR-10 JPEGs), tiny models built here."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
import zarr

import kdcache
from kdcache.methods import schedules
from kdcache.data import DataOptions, load_split
from kdcache.errors import KDCacheError
from kdcache.models.hidden import projection_matrix
from kdcache.models import resnet8
from kdcache.recipes.cache_teacher import CacheTeacherConfig, cache_teacher
from kdcache.recipes.distill import DistillConfig, distill
from kdcache.models.students import build_student
from kdcache.models.teachers import load_teacher, save_model_dir, weights_sha256
from kdcache.recipes.verify import verify_cache
from teachers_for_tests import make_tiny_bert
from helpers import _one_error_line, run_cli
from cache_edits import interrupt_as_an_earlier_release
from helpers import _metrics
from kdcache.methods.prokd import ProKD

TEACHER_KW = {"hidden": 32, "depth": 2}
STUDENT_KW = {"hidden": 16, "depth": 2}
F16 = dict(rtol=2.0**-10, atol=2e-3)  # float16 storage rounding


def _digits_inputs(split="train"):
    data = load_split("digits", None, split)
    batch = data.collate([data.dataset[i] for i in range(len(data))])
    return data.prepare(batch, torch.device("cpu"))


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    """An MLP teacher trained 4 epochs on digits, saving a checkpoint every epoch (as `kdcache train` does)."""
    root = tmp_path_factory.mktemp("teacher")
    distill(DistillConfig(student="mlp", student_kwargs=TEACHER_KW, task="digits", method="ce", out=root / "run",
                          epochs=4, save_every=1, device="cpu", progress=False))
    return root / "run"


def _cache(out, teacher_run, **kw):
    args = dict(teacher=None, checkpoints=(str(teacher_run / "checkpoints" / "epoch-*"),), task="digits", out=out,
                splits=("train", "validation"), device="cpu", progress=False, hidden_layers="1,2", proj_dim=8,
                proj_seed=3, chunk_rows=256)
    args.update(kw)
    return cache_teacher(CacheTeacherConfig(**args))


@pytest.fixture(scope="module")
def curriculum_cache(tmp_path_factory, teacher_run):
    """Four checkpoints (the last is the teacher) and projections of both hidden layers to 8 dimensions."""
    return _cache(tmp_path_factory.mktemp("cache") / "c.kdcache", teacher_run)


def _run(cache, out, method, **kw):
    args = dict(student="mlp", student_kwargs=STUDENT_KW, cache=cache, method=method, out=out, epochs=8, device="cpu",
                progress=False)
    args.update(kw)
    return distill(DistillConfig(**args))


# --- the checkpoint axis -----------------------------------------------------------------------------------------

def test_checkpoints_are_stored_in_training_order_with_their_epoch_metric_and_logits(curriculum_cache, teacher_run):
    cache = kdcache.open_cache(curriculum_cache, "train")
    names = [c["name"] for c in cache.checkpoints]
    assert names == ["epoch-0001", "epoch-0002", "epoch-0003", "epoch-0004"]
    assert [c["array"] for c in cache.checkpoints] == ["checkpoint_0", "checkpoint_1", "checkpoint_2", "logits"]
    x = _digits_inputs()
    for entry in cache.checkpoints:
        folder = teacher_run / "checkpoints" / entry["name"]
        recorded = json.loads((folder / "kdcache-checkpoint.json").read_text())
        assert (entry["epoch"], entry["metric"]) == (recorded["epoch"], recorded["metric"])
        teacher = load_teacher(str(folder))
        assert entry["sha256"] == teacher.sha256
        with torch.no_grad():
            direct = teacher.model(x).numpy()
        np.testing.assert_allclose(cache.read(entry["array"]).astype(np.float32), direct, **F16)
    assert cache.attrs["teacher"]["sha256"] == cache.checkpoints[-1]["sha256"]  # the last one is the teacher
    assert not np.array_equal(cache.read("checkpoint_0"), cache.read("logits"))


def test_training_order_comes_from_epochs_not_from_how_names_sort(tmp_path, teacher_run):
    """`step-5` sorts after `step-15` as text; without kdcache-checkpoint.json the number in the name is the epoch."""
    for k, epoch in enumerate((5, 10, 15, 20), start=1):
        folder = tmp_path / "ckpts" / f"step-{epoch}"
        shutil.copytree(teacher_run / "checkpoints" / f"epoch-{k:04d}", folder)
        (folder / "kdcache-checkpoint.json").unlink()
    cache = _cache(tmp_path / "c.kdcache", teacher_run, checkpoints=(str(tmp_path / "ckpts" / "step-*"),),
                   hidden_layers=None, proj_dim=None)
    entries = kdcache.open_cache(cache).checkpoints
    assert [(c["name"], c["epoch"], c["metric"]) for c in entries] == [
        ("step-5", 5, None), ("step-10", 10, None), ("step-15", 15, None), ("step-20", 20, None)]
    reference = kdcache.open_cache(_cache(tmp_path / "ref.kdcache", teacher_run, hidden_layers=None, proj_dim=None))
    np.testing.assert_array_equal(kdcache.open_cache(cache).read("checkpoint_0"), reference.read("checkpoint_0"))


def test_a_teacher_given_beside_checkpoints_is_stored_last_as_logits(tmp_path, teacher_run):
    ckpts = teacher_run / "checkpoints"
    cache = _cache(tmp_path / "c.kdcache", teacher_run, teacher=str(ckpts / "epoch-0004"),
                   checkpoints=(str(ckpts / "epoch-0001"), str(ckpts / "epoch-0002")), hidden_layers=None,
                   proj_dim=None)
    entries = kdcache.open_cache(cache).checkpoints
    assert [(c["name"], c["array"]) for c in entries] == [
        ("epoch-0001", "checkpoint_0"), ("epoch-0002", "checkpoint_1"), ("epoch-0004", "logits")]


# --- hidden-state projections ------------------------------------------------------------------------------------

def test_projections_are_reproducible_from_the_recorded_seed(tmp_path, curriculum_cache, teacher_run):
    cache = kdcache.open_cache(curriculum_cache, "train")
    info = cache.projections
    assert (info["layers"], info["dim"], info["seed"], info["widths"]) == ([1, 2], 8, 3, {"1": 32, "2": 32})
    model = load_teacher(str(teacher_run / "checkpoints" / "epoch-0004")).model
    x = _digits_inputs()
    # the MLP is Flatten, Linear, ReLU, Linear, ReLU, Linear: layer l is the output of the l-th ReLU
    with torch.no_grad():
        layers = {1: model[:3](x).numpy(), 2: model[:5](x).numpy()}
    for layer, activations in layers.items():
        matrix = projection_matrix(info["seed"], layer, activations.shape[1], info["dim"])
        assert matrix.shape == (32, 8)
        np.testing.assert_allclose(cache.read(info["arrays"][str(layer)]).astype(np.float32), activations @ matrix,
                                   **F16)
    # one layer's matrix depends on the seed and that layer only
    final = str(teacher_run / "checkpoints" / "epoch-0004")
    alone = kdcache.open_cache(_cache(tmp_path / "alone.kdcache", teacher_run, hidden_layers="2", checkpoints=(),
                                      teacher=final))
    np.testing.assert_array_equal(alone.read("hidden_2"), cache.read("hidden_2"))
    other = kdcache.open_cache(_cache(tmp_path / "seed4.kdcache", teacher_run, hidden_layers="2", proj_seed=4,
                                      checkpoints=(), teacher=final))
    assert not np.allclose(other.read("hidden_2"), cache.read("hidden_2"))


def test_bert_projection_is_the_cls_token_of_the_chosen_hidden_state(tmp_path, sst2_copy, tiny_tokenizer):
    teacher = make_tiny_bert(tmp_path / "bert", tiny_tokenizer)
    path = cache_teacher(CacheTeacherConfig(teacher=str(teacher), task="sst2", data=str(sst2_copy), out=tmp_path / "c",
                                            splits=("train",), batch_size=64, device="cpu", progress=False,
                                            hidden_layers="0,2", proj_dim=4, proj_seed=11, dtype="float32"))
    cache = kdcache.open_cache(path)
    model = load_teacher(str(teacher)).model
    data = load_split("sst2", str(sst2_copy), "train", tokenizer=load_teacher(str(teacher)).tokenizer)
    inputs = data.prepare(data.collate([data.dataset[i] for i in range(len(data))]), torch.device("cpu"))
    with torch.no_grad():
        states = model(**inputs, output_hidden_states=True).hidden_states
    for layer in (0, 2):
        expected = states[layer][:, 0].numpy() @ projection_matrix(11, layer, 32, 4)
        np.testing.assert_allclose(cache.read(f"hidden_{layer}"), expected, rtol=1e-4, atol=1e-4)


def test_resnet_layers_are_residual_blocks_pooled_by_global_average(tmp_path, cifar10_zip):
    torch.manual_seed(0)
    model = resnet8(10).eval()
    folder = save_model_dir(model, tmp_path / "resnet8", architecture="resnet8", num_classes=10)
    path = cache_teacher(CacheTeacherConfig(teacher=str(folder), task="imagefolder", data=str(cifar10_zip),
                                            out=tmp_path / "c", splits=("train",), device="cpu", progress=False,
                                            hidden_layers="1,3", proj_dim=6, dtype="float32",
                                            data_options=DataOptions(limit=16, normalize="cifar10")))
    data = load_split("imagefolder", str(cifar10_zip), "train", options=DataOptions(limit=16, normalize="cifar10"))
    x = data.prepare(data.collate([data.dataset[i] for i in range(len(data))]), torch.device("cpu"))
    with torch.no_grad():
        h = torch.relu(model.bn1(model.conv1(x)))
        blocks = []
        for block in model.layers:
            h = block(h)
            blocks.append(h.mean(dim=(2, 3)).numpy())
    cache = kdcache.open_cache(path)
    assert cache.projections["widths"] == {"1": 16, "3": 64}
    for layer in (1, 3):
        expected = blocks[layer - 1] @ projection_matrix(0, layer, blocks[layer - 1].shape[1], 6)
        np.testing.assert_allclose(cache.read(f"hidden_{layer}"), expected, rtol=1e-4, atol=1e-4)


# --- Pro-KD ------------------------------------------------------------------------------------------------------

def test_prokd_follows_the_checkpoints_in_training_order(tmp_path, curriculum_cache):
    summary = _run(curriculum_cache, tmp_path / "p", "prokd")
    used = [r["checkpoint"] for r in _metrics(tmp_path / "p")]
    names = ["epoch-0001", "epoch-0002", "epoch-0003", "epoch-0004"]
    assert used == [names[schedules.prokd_checkpoint(i, 8, 4)] for i in range(1, 9)]
    assert used == ["epoch-0001"] * 2 + ["epoch-0002"] * 2 + ["epoch-0003"] * 2 + ["epoch-0004"] * 2
    assert summary["checkpoints"] == names and summary["complete"]


@pytest.mark.parametrize("spec, expected", [
    ("1,1,2,4", [0, 1, 2, 2, 3, 3, 3, 3]),
    ("1,1,2", [0, 1, 2, 2, 3, 3, 3, 3]),  # K - 1 counts: the trained teacher takes the rest
    ("1", [0, 1, 2, 3, 3, 3, 3, 3]),  # one count for every checkpoint but the last
])
def test_prokd_phase_epochs_set_each_checkpoints_share(tmp_path, curriculum_cache, spec, expected):
    _run(curriculum_cache, tmp_path / "p", "prokd", phase_epochs=spec)
    names = ["epoch-0001", "epoch-0002", "epoch-0003", "epoch-0004"]
    assert [r["checkpoint"] for r in _metrics(tmp_path / "p")] == [names[k] for k in expected]


def test_prokd_epoch_1_trains_exactly_like_vanilla_kd_from_the_first_checkpoint(tmp_path, curriculum_cache):
    """Same seed, same schedule: the only way the two can agree bit for bit is reading the same cached array."""
    _run(curriculum_cache, tmp_path / "p", "prokd", stop_after_epoch=1)
    _run(curriculum_cache, tmp_path / "v", "vanilla", checkpoint="epoch-0001", stop_after_epoch=1)
    _run(curriculum_cache, tmp_path / "t", "vanilla", stop_after_epoch=1)  # the trained teacher: not the same
    p, v, t = (torch.load(tmp_path / r / "last.pt", weights_only=False)["model"] for r in ("p", "v", "t"))
    assert all(torch.equal(p[k], v[k]) for k in p)
    assert not all(torch.equal(p[k], t[k]) for k in p)


def test_prokd_with_per_step_schedules_switches_checkpoints_within_epochs(tmp_path, curriculum_cache, monkeypatch):

    cache = kdcache.open_cache(curriculum_cache, "train")
    owner = {}  # every stored row of every checkpoint array -> the arrays holding exactly that row
    for entry in cache.checkpoints:
        for row in cache.read(entry["array"]).astype(np.float32):
            owner.setdefault(row.tobytes(), set()).add(entry["array"])
    used = []
    original = ProKD.loss

    def spy(self, output, target, labels, plan):
        rows = target.detach().numpy()
        assert all(plan.array in owner[r.tobytes()] for r in rows), plan  # the rows really come from it
        used.append(plan.array)
        return original(self, output, target, labels, plan)

    monkeypatch.setattr(ProKD, "loss", spy)
    _run(curriculum_cache, tmp_path / "p", "prokd", epochs=2, schedule_unit="step")
    steps_total = 2 * -(-1437 // 64)
    arrays = [c["array"] for c in cache.checkpoints]
    assert used == [arrays[schedules.prokd_checkpoint(i, steps_total, 4)] for i in range(1, steps_total + 1)]
    steps = -(-1437 // 64)  # digits train rows, small preset batch 64
    names = ["epoch-0001", "epoch-0002", "epoch-0003", "epoch-0004"]
    expected = [names[schedules.prokd_checkpoint(e * steps, 2 * steps, 4)] for e in (1, 2)]  # the epoch's last step
    assert [r["checkpoint"] for r in _metrics(tmp_path / "p")] == expected == ["epoch-0003", "epoch-0004"]


def test_checkpoint_flag_distils_any_method_from_one_checkpoint(tmp_path, curriculum_cache):
    summary = _run(curriculum_cache, tmp_path / "c", "continuation", checkpoint="epoch-0002", epochs=2)
    assert summary["teacher_array"] == "checkpoint_1"
    cache = kdcache.open_cache(curriculum_cache, "validation")
    first = next(c for c in cache.checkpoints if c["name"] == "epoch-0002")
    assert summary["teacher_metric"] == pytest.approx(first["metric"], abs=2e-3)  # the checkpoint's own score


# --- curriculum extraction ---------------------------------------------------------------------------------------

def test_curriculum_fits_layers_shallow_to_deep_then_the_logits(tmp_path, curriculum_cache):
    summary = _run(curriculum_cache, tmp_path / "c", "curriculum", phase_epochs="2,1", epochs=6)
    rows = _metrics(tmp_path / "c")
    assert [r["phase"] for r in rows] == [1, 1, 2, 3, 3, 3]
    assert [r.get("layer") for r in rows] == ["1->1", "1->1", "2->2", None, None, None]
    assert "T" not in rows[0] and rows[3]["T"] == 4.0  # the logits phase is vanilla KD by default
    assert rows[1]["loss"] < rows[0]["loss"]  # phase 1 fits its projection
    assert summary["best_epoch"] >= 4  # the output layer is untrained before the logits phase: never "best"
    assert summary["curriculum"][0].startswith("epochs 1-2: student layer 1 <- projection of teacher layer 1")


def test_a_run_stopped_in_the_projection_phases_has_no_best_yet(tmp_path, capsys, monkeypatch, curriculum_cache):
    code, out, err = run_cli(_distill_args(curriculum_cache, tmp_path / "r", "--method", "curriculum",
                                           "--phase-epochs", "2,2", "--epochs", "6", "--stop-after-epoch", "2"),
                             capsys, monkeypatch)
    assert code == 0, err
    assert "no best accuracy yet" in out and "2/6 epochs" in out
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["best_epoch"] is None and not (tmp_path / "r" / "best").exists()
    code, out, err = run_cli(_distill_args(curriculum_cache, tmp_path / "r", "--method", "curriculum",
                                           "--phase-epochs", "2,2", "--epochs", "6", "--resume"), capsys, monkeypatch)
    assert code == 0, err
    assert json.loads((tmp_path / "r" / "summary.json").read_text())["best_epoch"] >= 5


def test_the_projection_phases_leave_the_output_layer_untouched(tmp_path, curriculum_cache):
    _run(curriculum_cache, tmp_path / "c", "curriculum", phase_epochs="1,1", epochs=4, stop_after_epoch=2)
    after = torch.load(tmp_path / "c" / "last.pt", weights_only=False)["model"]
    init = build_student("mlp", 10, kwargs=STUDENT_KW, seed=0).model.state_dict()
    assert torch.equal(after["5.weight"], init["5.weight"])  # the head: no gradient reaches it in phases 1-2
    assert not torch.equal(after["1.weight"], init["1.weight"]) and not torch.equal(after["3.weight"], init["3.weight"])


def test_curriculum_with_continuation_kd_runs_its_schedule_over_the_logits_phase(tmp_path, curriculum_cache):
    _run(curriculum_cache, tmp_path / "c", "curriculum", kd_loss="continuation", phase_epochs="1", epochs=6, t_max=2)
    rows = _metrics(tmp_path / "c")[2:]
    assert [r["T"] for r in rows] == [schedules.temperature(i, 4, 2) for i in range(1, 5)]


@pytest.mark.parametrize("method, stop", [("prokd", 2), ("curriculum", 2), ("curriculum", 3)])
def test_a_resumed_curriculum_run_ends_where_an_uninterrupted_one_does(tmp_path, curriculum_cache, method, stop):
    """Stopped inside a projection phase, or at its very end (the resume starts the logits phase)."""
    kw = dict(epochs=6, **({"phase_epochs": "1,2"} if method == "curriculum" else {}))
    _run(curriculum_cache, tmp_path / "full", method, **kw)
    _run(curriculum_cache, tmp_path / "cut", method, stop_after_epoch=stop, **kw)
    _run(curriculum_cache, tmp_path / "cut", method, resume=True, **kw)
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("seconds", "samples_per_second")} for r in rows]
    assert strip(_metrics(tmp_path / "cut")) == strip(_metrics(tmp_path / "full"))
    full, cut = (torch.load(tmp_path / r / "last.pt", weights_only=False) for r in ("full", "cut"))
    assert all(torch.equal(full["model"][k], cut["model"][k]) for k in full["model"])


# --- TAKD chains -------------------------------------------------------------------------------------------------

def test_takd_chain_teacher_assistant_student_is_two_caches_and_two_distills(tmp_path, capsys, monkeypatch,
                                                                             curriculum_cache):
    common = ["--device", "cpu", "--no-progress"]
    code, _, err = run_cli(["distill", "--cache", curriculum_cache, "--student", "mlp", "--student-kwargs",
                            '{"hidden": 24, "depth": 1}', "--method", "vanilla", "--epochs", "3", "--out",
                            tmp_path / "assistant", *common], capsys, monkeypatch)
    assert code == 0, err
    code, _, err = run_cli(["cache-teacher", "--teacher", tmp_path / "assistant" / "best", "--task", "digits",
                            "--split", "train", "--split", "validation", "--out", tmp_path / "assistant.kdcache",
                            *common], capsys, monkeypatch)
    assert code == 0, err
    code, out, err = run_cli(["distill", "--cache", tmp_path / "assistant.kdcache", "--student", "mlp",
                              "--student-kwargs", '{"hidden": 8, "depth": 1}', "--method", "vanilla", "--epochs", "2",
                              "--out", tmp_path / "student", *common], capsys, monkeypatch)
    assert code == 0, err
    assistant = load_teacher(str(tmp_path / "assistant" / "best"))
    hop = kdcache.open_cache(tmp_path / "assistant.kdcache")
    assert hop.attrs["teacher"]["sha256"] == weights_sha256(assistant.model)  # the second cache is the assistant's
    with torch.no_grad():
        np.testing.assert_allclose(hop.read("logits").astype(np.float32), assistant.model(_digits_inputs()).numpy(),
                                   **F16)
    assert json.loads((tmp_path / "student" / "summary.json").read_text())["cache"] == str(tmp_path / "assistant.kdcache")


def test_takd_chain_on_text_carries_the_tokenizer_through_the_assistant(tmp_path, sst2_copy, tiny_tokenizer,
                                                                         bert_student_config):
    teacher = make_tiny_bert(tmp_path / "teacher", tiny_tokenizer)
    first = cache_teacher(CacheTeacherConfig(teacher=str(teacher), task="sst2", data=str(sst2_copy),
                                             out=tmp_path / "t.kdcache", splits=("train", "validation"),
                                             device="cpu", progress=False))
    distill(DistillConfig(student=str(bert_student_config), cache=first, method="vanilla", out=tmp_path / "ta",
                          epochs=1, device="cpu", progress=False))
    second = cache_teacher(CacheTeacherConfig(teacher=str(tmp_path / "ta" / "best"), task="sst2", data=str(sst2_copy),
                                              out=tmp_path / "ta.kdcache", splits=("train", "validation"),
                                              device="cpu", progress=False))
    summary = distill(DistillConfig(student=str(bert_student_config), cache=second, method="vanilla",
                                    out=tmp_path / "s", epochs=1, device="cpu", progress=False))
    assert summary["complete"]
    a, b = (kdcache.cache.load_cache_tokenizer(c) for c in (first, second))
    assert a.get_vocab() == b.get_vocab()  # the student reads the very token ids the first teacher read


# --- trust: verify, resume, bad input ----------------------------------------------------------------------------

def test_verify_checks_every_checkpoint_and_projection_chunk(tmp_path, curriculum_cache):
    copy = tmp_path / "c.kdcache"
    shutil.copytree(curriculum_cache, copy)
    assert verify_cache(copy).ok
    chunk = copy / "train" / "checkpoint_1" / "c" / "1" / "0"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))
    report = verify_cache(copy)
    failed = [c for c in report.checks if not c.ok]
    assert [c.name for c in failed] == ["train/checksums"]
    assert "'checkpoint_1', chunk 1" in failed[0].detail
    with pytest.raises(KDCacheError, match="checkpoint_1.*chunk 1"):
        kdcache.open_cache(copy).read("checkpoint_1")


def test_an_interrupted_checkpoint_and_projection_cache_resumes_byte_identical(tmp_path, curriculum_cache,
                                                                               teacher_run):
    out = tmp_path / "c.kdcache"
    shutil.copytree(curriculum_cache, out)
    interrupt_as_an_earlier_release(out, "train", 512, drop_later_chunks=True)
    _cache(out, teacher_run)
    for name in kdcache.open_cache(curriculum_cache).names:
        a, b = (np.asarray(zarr.open_array(str(p / "train" / name), mode="r")[:]) for p in (out, curriculum_cache))
        assert a.tobytes() == b.tobytes(), name
    assert verify_cache(out).ok


def test_resume_with_another_projection_seed_is_refused(tmp_path, curriculum_cache, teacher_run):
    out = tmp_path / "c.kdcache"
    shutil.copytree(curriculum_cache, out)
    meta = json.loads((out / "zarr.json").read_text())
    meta["attributes"]["complete"] = False
    (out / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(KDCacheError, match="differs in hidden.seed"):
        _cache(out, teacher_run, proj_seed=4)


def _cache_args(teacher_run, out, *extra):
    return ["cache-teacher", "--task", "digits", "--split", "train", "--out", out, "--device", "cpu", "--no-progress",
            *extra]


def test_a_checkpoint_glob_that_matches_nothing_is_one_line(tmp_path, capsys, monkeypatch, teacher_run):
    code, _, err = run_cli(_cache_args(teacher_run, tmp_path / "c", "--checkpoints", tmp_path / "nope" / "epoch-*"),
                           capsys, monkeypatch)
    _one_error_line(code, err, "--checkpoints", "nope/epoch-*", "matches no folder")
    assert not (tmp_path / "c").exists()


def test_checkpoints_of_another_architecture_are_one_line(tmp_path, capsys, monkeypatch, teacher_run):
    other = tmp_path / "other" / "epoch-0009"
    distill(DistillConfig(student="mlp", student_kwargs={"hidden": 16, "depth": 2}, task="digits", method="ce",
                          out=tmp_path / "o", epochs=1, device="cpu", progress=False))
    shutil.copytree(tmp_path / "o" / "best", other)
    code, _, err = run_cli(_cache_args(teacher_run, tmp_path / "c", "--checkpoints",
                                       teacher_run / "checkpoints" / "epoch-*", "--checkpoints", other),
                           capsys, monkeypatch)
    _one_error_line(code, err, "other/epoch-0009", "another architecture", "1.bias: (16,) vs (32,)")
    assert not (tmp_path / "c" / "train").exists()


def test_checkpoints_sharing_a_name_are_one_line(tmp_path, capsys, monkeypatch, teacher_run):
    twin = tmp_path / "copy" / "epoch-0002"
    shutil.copytree(teacher_run / "checkpoints" / "epoch-0002", twin)
    code, _, err = run_cli(_cache_args(teacher_run, tmp_path / "c", "--checkpoints",
                                       teacher_run / "checkpoints" / "epoch-0002", "--checkpoints", twin),
                           capsys, monkeypatch)
    _one_error_line(code, err, "share the name 'epoch-0002'")


@pytest.mark.parametrize("flags, needles", [
    (["--hidden-layers", "1,2"], ["--hidden-layers needs --proj-dim"]),
    (["--hidden-layers", "5", "--proj-dim", "4"], ["has layers 1..2; layer 5 does not exist"]),
    (["--hidden-layers", "head", "--proj-dim", "4"], ["has no submodule 'head'"]),
    (["--proj-dim", "4"], ["--proj-dim given without --hidden-layers"]),
])
def test_bad_projection_flags_are_one_line(tmp_path, capsys, monkeypatch, teacher_run, flags, needles):
    code, _, err = run_cli(_cache_args(teacher_run, tmp_path / "c", "--teacher",
                                       teacher_run / "checkpoints" / "epoch-0004", *flags), capsys, monkeypatch)
    _one_error_line(code, err, *needles)


def _distill_args(cache, out, *extra, student_kwargs=STUDENT_KW):
    return ["distill", "--cache", cache, "--student", "mlp", "--student-kwargs", json.dumps(student_kwargs),
            "--epochs", "4", "--out", out, "--device", "cpu", "--no-progress", *extra]


@pytest.mark.parametrize("extra, needles", [
    (["--method", "vanilla", "--checkpoint", "epoch-0009"],
     ["no teacher checkpoint 'epoch-0009'", "epoch-0001, epoch-0002, epoch-0003, epoch-0004"]),
    (["--method", "prokd", "--epochs", "3"], ["Pro-KD needs at least one epoch per teacher checkpoint: 3 epochs < 4"]),
    (["--method", "prokd", "--checkpoint", "epoch-0001"], ["--method prokd follows all of them"]),
    (["--method", "curriculum", "--phase-epochs", "2,2"], ["take 4 of 4 epochs, leaving none"]),
    (["--method", "curriculum", "--phase-epochs", "1,x"], ["--phase-epochs '1,x'"]),
    (["--method", "curriculum", "--layer-map", "3:1"], ["teacher layer 3 has no stored projection", "projects 1, 2"]),
    (["--method", "curriculum", "--layer-map", "2:head"], ["has no submodule 'head'"]),
    (["--method", "curriculum", "--layer-map", "2:"], ["each item is TEACHER_LAYER:STUDENT_LAYER, got '2:'"]),
    (["--method", "curriculum", "--layer-map", "2:0"], ["student layers count from 1"]),
    (["--method", "curriculum", "--layer-map", "2:1,2:2"], ["teacher layer 2 is mapped twice"]),
    (["--method", "curriculum", "--layer-map", "2:3"], ["has layers 1..2; layer 3 does not exist"]),
    (["--method", "curriculum", "--kd-loss", "annealing"], ["--kd-loss 'annealing' is not one of vanilla, continuation"]),
    (["--method", "vanilla", "--phase-epochs", "2"], ["--phase-epochs applies to --method curriculum and prokd only"]),
    (["--method", "vanilla", "--layer-map", "2:1"], ["--layer-map applies to --method curriculum only"]),
    (["--method", "prokd", "--phase-epochs", "1,1,1,2"], ["Pro-KD needs 4 positive epoch counts summing to 4"]),
    (["--method", "prokd", "--phase-epochs", "2,2,2"], ["Pro-KD needs 4 positive epoch counts summing to 4"]),
])
def test_bad_curriculum_flags_are_one_line(tmp_path, capsys, monkeypatch, curriculum_cache, extra, needles):
    code, _, err = run_cli(_distill_args(curriculum_cache, tmp_path / "r", *extra), capsys, monkeypatch)
    _one_error_line(code, err, *needles)


def test_a_student_whose_layers_cannot_be_mapped_is_one_line(tmp_path, capsys, monkeypatch, curriculum_cache):
    code, _, err = run_cli(_distill_args(curriculum_cache, tmp_path / "r", "--method", "curriculum",
                                         student_kwargs={"hidden": 16, "depth": 1}), capsys, monkeypatch)
    _one_error_line(code, err, "student mlp has 1 layer(s) but the cache projects 2 teacher layers (1, 2)",
                    "--layer-map 2:1")
    # ...and the suggested map works
    code, _, err = run_cli(_distill_args(curriculum_cache, tmp_path / "r2", "--method", "curriculum", "--layer-map",
                                         "2:1", student_kwargs={"hidden": 16, "depth": 1}), capsys, monkeypatch)
    assert code == 0, err


@pytest.mark.parametrize("method, needles", [
    ("prokd", ["stores no teacher checkpoints", "cache-teacher --checkpoints"]),
    ("curriculum", ["stores no hidden-state projections", "--hidden-layers"]),
])
def test_curriculum_methods_on_a_plain_cache_are_one_line(tmp_path, capsys, monkeypatch, digits_cache, method, needles):
    code, _, err = run_cli(_distill_args(digits_cache, tmp_path / "r", "--method", method), capsys, monkeypatch)
    _one_error_line(code, err, *needles)


def test_info_lists_checkpoints_and_projections(capsys, monkeypatch, curriculum_cache):
    code, out, err = run_cli(["info", curriculum_cache], capsys, monkeypatch)
    assert code == 0, err
    assert "checkpoint  epoch-0001  epoch 1" in out and "-> array checkpoint_0" in out
    assert "layers 1, 2 projected to 8 dims (seed 3" in out
    code, out, _ = run_cli(["info", curriculum_cache, "--json"], capsys, monkeypatch)
    described = json.loads(out)
    assert [c["array"] for c in described["checkpoints"]][-1] == "logits"
    assert described["splits"][0]["extra_arrays"] == {"checkpoint_0": 10, "checkpoint_1": 10, "checkpoint_2": 10,
                                                      "hidden_1": 8, "hidden_2": 8}


@pytest.mark.parametrize("mode", ["memory", "chunks"])
def test_several_arrays_stream_from_the_very_same_rows(curriculum_cache, mode):
    from kdcache.train.batches import LogitBatches

    cache = kdcache.open_cache(curriculum_cache, "train")
    names = ("logits", "checkpoint_0", "hidden_2")
    stored = {name: cache.read(name).astype(np.float32) for name in names}
    batches = LogitBatches(cache, 100, seed=3, mode=mode, buffer_chunks=2, arrays=names)
    seen = 0
    for rows, teacher, labels in batches.epoch(1):
        assert set(teacher) == set(names)
        for name in names:
            np.testing.assert_array_equal(teacher[name].numpy(), stored[name][rows.numpy()])
        seen += len(rows)
    assert seen == len(cache)
    one = [rows for rows, _, _ in batches.epoch(1, ("checkpoint_0",))]  # picking arrays keeps the epoch's order
    both = [rows for rows, _, _ in batches.epoch(1)]
    assert all(torch.equal(a, b) for a, b in zip(one, both))
    rows, single, _ = next(iter(batches.epoch(2, ("hidden_2",))))
    np.testing.assert_array_equal(single.numpy(), stored["hidden_2"][rows.numpy()])


def test_curriculum_and_prokd_train_with_chunk_streaming(tmp_path, curriculum_cache):
    for method in ("prokd", "curriculum"):
        summary = _run(curriculum_cache, tmp_path / method, method, epochs=4, stream_mode="chunks")
        assert summary["complete"]


def test_numbered_hidden_layers_are_stored_shallow_to_deep(tmp_path, teacher_run, curriculum_cache):
    cache = kdcache.open_cache(_cache(tmp_path / "c.kdcache", teacher_run, hidden_layers="2,1", checkpoints=(),
                                      teacher=str(teacher_run / "checkpoints" / "epoch-0004")))
    assert cache.projections["layers"] == [1, 2]
    np.testing.assert_array_equal(cache.read("hidden_1"), kdcache.open_cache(curriculum_cache).read("hidden_1"))


def test_extra_arrays_edited_by_hand_are_refused_and_unlisted_arrays_reported(tmp_path, curriculum_cache):
    copy = tmp_path / "c.kdcache"
    shutil.copytree(curriculum_cache, copy)
    meta_file = copy / "train" / "zarr.json"
    meta = json.loads(meta_file.read_text())
    meta["attributes"]["extra_arrays"] = {}  # hides five arrays from every check
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(KDCacheError, match=r"train/zarr.json: attribute extra_arrays \{\} disagrees with the root"):
        kdcache.open_cache(copy)
    report = verify_cache(copy)
    assert [c.name for c in report.checks if not c.ok] == ["train/structure"]
    meta["attributes"]["extra_arrays"] = {"checkpoint_0": "ten"}
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(KDCacheError, match="extra_arrays must map array names to positive integer widths"):
        kdcache.open_cache(copy)
    # an array nobody lists: harmless to readers, reported by verify
    shutil.rmtree(copy)
    shutil.copytree(curriculum_cache, copy)
    zarr.open_group(str(copy / "validation"), mode="r+").create_array("stray", shape=(360,), dtype="float32")
    failed = {c.name: c.detail for c in verify_cache(copy).checks if not c.ok}
    assert list(failed) == ["validation/structure"] and "stray" in failed["validation/structure"]


def test_resume_into_a_cache_rebuilt_with_other_projections_is_refused(tmp_path, teacher_run, curriculum_cache):
    cache = tmp_path / "c.kdcache"
    shutil.copytree(curriculum_cache, cache)
    _run(cache, tmp_path / "r", "curriculum", epochs=4, stop_after_epoch=1)
    _cache(cache, teacher_run, proj_seed=4, overwrite=True)  # same path, same teacher and data, other targets
    with pytest.raises(KDCacheError, match="differs in cached_sources.projections.seed"):
        _run(cache, tmp_path / "r", "curriculum", epochs=4, resume=True)


def test_curriculum_on_a_hugging_face_student_by_number_and_by_module_name(tmp_path, sst2_copy, tiny_tokenizer,
                                                                           bert_student_config):
    teacher = make_tiny_bert(tmp_path / "bert", tiny_tokenizer)
    cache = cache_teacher(CacheTeacherConfig(teacher=str(teacher), task="sst2", data=str(sst2_copy), out=tmp_path / "c",
                                             splits=("train", "validation"), device="cpu", progress=False,
                                             hidden_layers="1,2", proj_dim=8))
    common = dict(student=str(bert_student_config), cache=cache, method="curriculum", epochs=3, device="cpu",
                  progress=False, phase_epochs="1")
    by_number = distill(DistillConfig(out=tmp_path / "n", layer_map="2:1", **common))
    by_name = distill(DistillConfig(out=tmp_path / "m", layer_map="2:bert.encoder.layer.0", **common))
    assert by_number["curriculum"][0].startswith("epochs 1-1: student layer 1 <- projection of teacher layer 2")
    assert by_name["curriculum"][0].startswith("epochs 1-1: student layer bert.encoder.layer.0 <- projection")
    assert by_number["complete"] and by_name["complete"]
    # hidden_states[1] is the output of encoder layer 0: the same representation, so the same training
    assert _metrics(tmp_path / "n")[0]["loss"] == pytest.approx(_metrics(tmp_path / "m")[0]["loss"], rel=1e-5)


def test_cache_format_doc_describes_every_attribute_of_a_curriculum_cache(curriculum_cache):
    import re
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[2] / "docs" / "cache-format.md").read_text()
    cache = kdcache.open_cache(curriculum_cache, "train")

    def table_keys(heading):
        section = doc.split(heading, 1)[1].split("\n## ", 1)[0]
        return {k for row in re.findall(r"^\| ([^|]+) \|", section, re.M) for k in re.findall(r"`([a-z_]+)`", row)}

    assert set(cache.attrs) <= table_keys("## Root attributes")
    assert set(cache.split_attrs) <= table_keys("## Split attributes")
    for key in (*cache.checkpoints[0], *cache.projections, *cache.attrs["write_settings"]):
        assert f"`{key}`" in doc, key
    assert re.search(r"^\s+checkpoint_0 \.\.\.\s+\[N, C\]", doc, re.M) and re.search(r"^\s+hidden_<layer>", doc, re.M)


def test_curriculum_on_a_top_k_cache_reads_the_projections_then_the_top_k_rows(tmp_path, teacher_run):
    """The projections are dense arrays of their own; the logits phase reads the trained teacher's top-k rows."""
    cache = _cache(tmp_path / "topk.kdcache", teacher_run, topk=3)
    summary = _run(cache, tmp_path / "c", "curriculum", phase_epochs="1,1", epochs=4)
    rows = _metrics(tmp_path / "c")
    assert [r["phase"] for r in rows] == [1, 2, 3, 3] and all(np.isfinite(r["loss"]) for r in rows)
    assert summary["teacher_array"] == "hidden_1,hidden_2,topk_values,topk_indices,logsumexp"
